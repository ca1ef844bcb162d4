"""block-stream and block-commit on a qcow2 chain base <- mid <- top with
data in every layer (written by qemu-io, zero clusters included), while
a guest writes to the top through an export.  After each job the
guest's view is checked bit for bit against a model of every write the
guest made (qemu-img compare, once the daemon has closed the images),
every image passes qemu-img check, and qemu-img info --backing-chain
shows the new chain (the header names the new backing file).  Also:
cancelling in the middle leaves the chain as it was, and the operations
a running job cannot allow are refused, naming it."""
import json
import os
import random
import signal
import threading
import time

import nbd
import pytest

from admintools import MiB, restart, start
from conftest import Server
from helpers import run
from qemutools import create, qemu_img, qemu_io
from qmp import QMP, QMPError

SIZE = 32 * MiB


class Writer(threading.Thread):
    """Random writes (and a few zeroes) through an export, keeping a
    model of what the disk must hold: every acknowledged write lands in
    it.  Small writes, many of them into ranges the top does not hold
    yet: they race with what a stream copies there."""

    def __init__(self, uri, model, seed=1, pace=0.001):
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.model = model
        self.rnd = random.Random(seed)
        self.pace = pace
        self.halt = threading.Event()
        self.writes = 0
        self.error = None

    def run(self):
        try:
            while not self.halt.is_set():
                n = self.rnd.choice([512, 4096, 4096, 65536, 200000])
                off = self.rnd.randrange(0, SIZE - n)
                if self.rnd.random() < 0.1:
                    self.h.zero(n, off)
                    self.model[off:off + n] = bytes(n)
                else:
                    data = self.rnd.randbytes(n)
                    self.h.pwrite(data, off)
                    self.model[off:off + n] = data
                self.writes += 1
                time.sleep(self.pace)
            self.h.flush()
        except Exception as e:              # noqa: BLE001
            self.error = e

    def stop(self):
        self.halt.set()
        self.join(60)
        assert self.error is None, self.error
        self.h.shutdown()


def make_chain(tmp_path):
    """base.qcow2 <- mid.qcow2 <- top.qcow2, each holding data of its
    own over the others' (whole and partial clusters), mid a zero
    cluster over base's data.  Returns the paths and, for each layer,
    what its chain reads (raw files made by qemu-img convert)."""
    p = {n: str(tmp_path / f"{n}.qcow2") for n in ("base", "mid", "top")}
    create(p["base"], SIZE)
    create(p["mid"], SIZE, backing=p["base"])
    create(p["top"], SIZE, backing=p["mid"])
    qemu_io(p["base"], "write -P 0x11 0 4M", "write -P 0x12 8M 4M",
            "write -P 0x13 20M 2M", "write -P 0x14 30M 2M")
    qemu_io(p["mid"], "write -P 0x21 2M 4M", "write -P 0x22 12M 2M",
            "write -z 8M 1M", "write -P 0x23 28M 1M",
            "write -P 0x24 100k 10k", "write -P 0x25 31M 64k")
    qemu_io(p["top"], "write -P 0x31 3M 2M", "write -P 0x32 16M 1M",
            "write -P 0x33 21M 64k", "write -z 30M 256k")
    views = {}
    for n in ("base", "mid", "top"):
        views[n] = str(tmp_path / f"{n}-view.raw")
        qemu_img("convert", "-f", "qcow2", "-O", "raw", p[n], views[n])
    return p, views


def add_chain(q, p, slow_reads=False):
    """The chain as named nodes (base and mid read-write, for commit),
    and a writable export of the top.  @slow_reads: the top reads mid
    through a throttle, so that a stream's copies take long enough for
    guest writes to land while they run."""
    q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "base",
                                "file": {"driver": "file",
                                         "filename": p["base"]}})
    q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "mid",
                                "backing": "base",
                                "file": {"driver": "file",
                                         "filename": p["mid"]}})
    below_top = "mid"
    if slow_reads:
        q.cmd_args("blockdev-add", {"driver": "throttle", "node-name": "thr",
                                    "limits": {"bps-read": 8 * MiB},
                                    "file": "mid"})
        below_top = "thr"
    q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                "backing": below_top,
                                "file": {"driver": "file",
                                         "filename": p["top"]}})
    q.cmd("block-export-add", type="nbd", id="live", node_name="top",
          name="live", writable=True)


def read_all(srv, export="live"):
    h = srv.connect(export)
    got = bytearray()
    for off in range(0, SIZE, 4 * MiB):
        got += h.pread(4 * MiB, off)
    h.shutdown()
    return got


def nodes(q):
    return {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}


def backing_of(q, name):
    for c in nodes(q)[name]["children"]:
        if c["child"] == "backing":
            return c["node-name"]
    return None


def job(q, jid):
    for j in q.cmd("query-block-jobs"):
        if j["device"] == jid:
            return j
    return None


def wait_end(q, jid, timeout=120):
    """BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED of job @jid."""
    deadline = time.monotonic() + timeout
    while True:
        for i, e in enumerate(q.events):
            if e["event"] in ("BLOCK_JOB_COMPLETED",
                              "BLOCK_JOB_CANCELLED") and \
                    e["data"]["device"] == jid:
                return q.events.pop(i)
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {jid} did not end")
        try:
            q.wait_event("(only collecting events)", timeout=0.2)
        except TimeoutError:
            pass


def save_model(tmp_path, model, name="model.raw"):
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(model)
    return path


def compare(a, fa, b, fb):
    """Bit for bit, through the backing chains the headers name."""
    run(["qemu-img", "compare", "-f", fa, "-F", fb, a, b], timeout=120)


def check_images(*imgs):
    for img in imgs:
        run(["qemu-img", "check", "-f", "qcow2", img])


def backing_format(img):
    info = json.loads(run(["qemu-img", "info", "--output=json", img]).stdout)
    return info.get("backing-filename-format")


def chain_files(img):
    info = json.loads(run(["qemu-img", "info", "--output=json",
                           "--backing-chain", img]).stdout)
    return [i["filename"] for i in info]


def run_with_writer(srv, q, model, start_job, seed=1, pace=0.001,
                    head_start=0.2):
    """Start the writer, then the job (start_job(q)), and return the
    writer still running."""
    w = Writer(srv.uri("live"), model, seed=seed, pace=pace)
    w.start()
    time.sleep(head_start)
    start_job(q)
    return w


@pytest.mark.parametrize("with_base,slow_reads",
                         [(False, False), (True, False), (False, True),
                          (True, True)],
                         ids=["whole-chain", "base-node",
                              "whole-chain-slow-reads",
                              "base-node-slow-reads"])
def test_stream_under_writes(nbdd_server, tmp_path, with_base, slow_reads):
    p, views = make_chain(tmp_path)
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        add_chain(q, p, slow_reads)
        model = read_all(srv)
        with open(views["top"], "rb") as f:
            assert model == f.read()
        args = {"job-id": "s0", "device": "top"}
        if with_base:
            args["base-node"] = "base"
        w = run_with_writer(srv, q, model,
                            lambda q: q.cmd_args("block-stream", args))
        ev = wait_end(q, "s0")
        assert ev["event"] == "BLOCK_JOB_COMPLETED", ev
        assert "error" not in ev["data"], ev
        assert ev["data"]["type"] == "stream"
        assert ev["data"]["offset"] == ev["data"]["len"] == SIZE
        time.sleep(0.2)                     # writes on the new chain
        w.stop()
        assert w.writes > 50
        assert job(q, "s0") is None         # auto-dismissed
        assert backing_of(q, "top") == ("base" if with_base else None)
        # The layers dropped are free again.
        dropped = ["thr", "mid"] if slow_reads else ["mid"]
        assert nodes(q)[dropped[0]]["users"] == []
        assert read_all(srv) == model
        for n in dropped + ([] if with_base else ["base"]):
            q.cmd("blockdev-del", node_name=n)
    # The catalogue has the new chain too.
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert backing_of(q, "top") == ("base" if with_base else None)
    assert read_all(srv) == model
    srv.stop()
    ref = save_model(tmp_path, model)
    compare(p["top"], "qcow2", ref, "raw")
    check_images(p["base"], p["mid"], p["top"])
    assert chain_files(p["top"]) == \
        ([p["top"], p["base"]] if with_base else [p["top"]])
    if with_base:
        assert backing_format(p["top"]) == "qcow2"
    # What the layers below held is untouched.
    compare(p["mid"], "qcow2", views["mid"], "raw")
    compare(p["base"], "qcow2", views["base"], "raw")


def test_commit_below_the_active_layer_under_writes(nbdd_server, tmp_path):
    p, views = make_chain(tmp_path)
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        add_chain(q, p)
        model = read_all(srv)
        w = run_with_writer(
            srv, q, model,
            lambda q: q.cmd("block-commit", job_id="c0", device="top",
                            top_node="mid", base_node="base"))
        ev = wait_end(q, "c0")
        assert ev["event"] == "BLOCK_JOB_COMPLETED", ev
        assert "error" not in ev["data"], ev
        assert ev["data"]["type"] == "commit"
        time.sleep(0.2)
        w.stop()
        assert backing_of(q, "top") == "base"
        assert nodes(q)["mid"]["users"] == []
        assert read_all(srv) == model
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert backing_of(q, "top") == "base"
    assert read_all(srv) == model
    srv.stop()
    compare(p["top"], "qcow2", save_model(tmp_path, model), "raw")
    # The base holds what mid's chain read; mid is as it was.
    compare(p["base"], "qcow2", views["mid"], "raw")
    compare(p["mid"], "qcow2", views["mid"], "raw")
    check_images(p["base"], p["mid"], p["top"])
    assert chain_files(p["top"]) == [p["top"], p["base"]]
    assert backing_format(p["top"]) == "qcow2"


def test_active_commit_under_writes(nbdd_server, tmp_path):
    p, views = make_chain(tmp_path)
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        add_chain(q, p)
        model = read_all(srv)
        w = run_with_writer(
            srv, q, model,
            lambda q: q.cmd("block-commit", job_id="a0", device="top",
                            base_node="base"))
        ev = q.wait_event("BLOCK_JOB_READY", timeout=120)
        assert ev["data"]["device"] == "a0"
        assert ev["data"]["type"] == "commit"
        assert job(q, "a0")["status"] == "ready"
        # While it runs: nobody else writes or resizes the base, the
        # layers in between, or the top's size; the chain holds still.
        with pytest.raises(QMPError, match="job 'a0'"):
            q.cmd("block_resize", node_name="top", size=2 * SIZE)
        with pytest.raises(QMPError, match="job 'a0'"):
            q.cmd("block-export-add", type="nbd", id="b", node_name="base",
                  name="b", writable=True)
        with pytest.raises(QMPError, match="job 'a0'"):
            q.cmd("block-export-add", type="nbd", id="m", node_name="mid",
                  name="m", writable=True)
        with pytest.raises(QMPError, match="in use"):
            q.cmd("blockdev-del", node_name="mid")
        with pytest.raises(QMPError, match="job 'a0'"):
            q.cmd("blockdev-replace", parent_type="driver", node_name="top",
                  child="backing", new_child="base")
        time.sleep(0.3)                     # writes while ready
        q.cmd("block-job-complete", device="a0")
        ev = wait_end(q, "a0")
        assert ev["event"] == "BLOCK_JOB_COMPLETED"
        assert "error" not in ev["data"], ev
        exports = {e["id"]: e for e in q.cmd("query-block-exports")}
        assert exports["live"]["node-name"] == "base"
        time.sleep(0.3)                     # writes on the base
        w.stop()
        assert read_all(srv) == model
        assert nodes(q)["top"]["users"] == []
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert {e["id"]: e for e in q.cmd("query-block-exports")}[
            "live"]["node-name"] == "base"
    assert read_all(srv) == model
    srv.stop()
    compare(p["base"], "qcow2", save_model(tmp_path, model), "raw")
    check_images(p["base"], p["mid"], p["top"])
    assert chain_files(p["base"]) == [p["base"]]


def test_active_commit_cancelled_once_ready(nbdd_server, tmp_path):
    """Cancelled without force once ready, an active commit ends as in
    QEMU: the base holds everything the top reads, and nothing moves;
    the top stays the active layer on its whole chain."""
    p, views = make_chain(tmp_path)
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        add_chain(q, p)
        model = read_all(srv)
        w = run_with_writer(
            srv, q, model,
            lambda q: q.cmd("block-commit", job_id="a0", device="top",
                            base_node="base"))
        q.wait_event("BLOCK_JOB_READY", timeout=120)
        time.sleep(0.3)                     # writes while ready
        w.stop()
        q.cmd("block-job-cancel", device="a0")
        ev = wait_end(q, "a0")
        assert ev["event"] == "BLOCK_JOB_COMPLETED"
        assert "error" not in ev["data"], ev
        assert {e["id"]: e for e in q.cmd("query-block-exports")}[
            "live"]["node-name"] == "top"
        assert backing_of(q, "top") == "mid"
        assert backing_of(q, "mid") == "base"
        assert read_all(srv) == model
    srv.stop()
    compare(p["base"], "qcow2", save_model(tmp_path, model), "raw")
    compare(p["top"], "qcow2", save_model(tmp_path, model), "raw")
    check_images(p["base"], p["mid"], p["top"])
    assert chain_files(p["top"]) == [p["top"], p["mid"], p["base"]]


def add_top_only(q, p):
    """Only the top, its chain opened from the headers: the layers
    below are read-only nodes, as QEMU opens backing files."""
    q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                "file": {"driver": "file",
                                         "filename": p["top"]}})
    q.cmd("block-export-add", type="nbd", id="live", node_name="top",
          name="live", writable=True)
    mid = backing_of(q, "top")
    base = backing_of(q, mid)
    assert nodes(q)[mid]["ro"] and nodes(q)[base]["ro"]
    return mid, base


def test_commit_into_layers_opened_read_only(nbdd_server, tmp_path):
    """block-commit reopens the read-only layers it writes into (the
    base, and the overlay whose header changes), as QEMU does; while
    another program holds the base open for reading, the reopen fails
    naming the lock, and the chain goes on as it was."""
    p, views = make_chain(tmp_path)
    odir = tmp_path / "other"
    odir.mkdir()
    other = Server(odir, ["--state-dir", str(odir / "state")], tcp=False)
    with QMP(str(odir / "state" / "admin.sock")) as o:
        o.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "b",
                                    "read-only": True,
                                    "file": {"driver": "file",
                                             "filename": p["base"],
                                             "read-only": True}})
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        mid, base = add_top_only(q, p)
        model = read_all(srv)
        with pytest.raises(QMPError, match='"write" lock'):
            q.cmd("block-commit", job_id="c0", device="top", top_node=mid,
                  base_node=base)
        assert nodes(q)[base]["ro"]
        assert read_all(srv) == model
        other.stop()
        w = run_with_writer(
            srv, q, model,
            lambda q: q.cmd("block-commit", job_id="c0", device="top",
                            top_node=mid, base_node=base))
        ev = wait_end(q, "c0")
        assert ev["event"] == "BLOCK_JOB_COMPLETED", ev
        assert "error" not in ev["data"], ev
        time.sleep(0.2)
        w.stop()
        assert backing_of(q, "top") == base
        assert not nodes(q)[base]["ro"]
        assert read_all(srv) == model
    srv = restart(srv, nbdd_server, tmp_path)
    assert read_all(srv) == model
    with QMP(srv.admin) as q:
        base = backing_of(q, "top")
        assert nodes(q)[base]["ro"]         # opened as a backing file
        # The active layer's users could not move onto a layer the
        # catalogue cannot name: refused, saying what to do.
        with pytest.raises(QMPError, match="add it with blockdev-add"):
            q.cmd("block-commit", job_id="a0", device="top")
        assert nodes(q)[base]["ro"]
        # Named, read-only as libvirt adds backing layers: it works.
        q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "b2",
                                    "read-only": True, "backing": None,
                                    "file": {"driver": "file",
                                             "filename": p["base"],
                                             "read-only": True}})
        q.cmd("blockdev-replace", parent_type="driver", node_name="top",
              child="backing", new_child="b2")
        assert base not in nodes(q)         # closed with its last user
        w = run_with_writer(
            srv, q, model,
            lambda q: q.cmd("block-commit", job_id="a0", device="top"))
        q.wait_event("BLOCK_JOB_READY", timeout=120)
        assert not nodes(q)["b2"]["ro"]
        time.sleep(0.2)
        q.cmd("block-job-complete", device="a0")
        ev = wait_end(q, "a0")
        assert ev["event"] == "BLOCK_JOB_COMPLETED", ev
        assert "error" not in ev["data"], ev
        time.sleep(0.2)
        w.stop()
        assert {e["id"]: e for e in q.cmd("query-block-exports")}[
            "live"]["node-name"] == "b2"
        assert read_all(srv) == model
    # The catalogue has the export on b2, read-write now.
    srv = restart(srv, nbdd_server, tmp_path)
    assert read_all(srv) == model
    with QMP(srv.admin) as q:
        assert not nodes(q)["b2"]["ro"]
        h = srv.connect("live")
        h.pwrite(b"x" * 4096, 0)
        model[0:4096] = b"x" * 4096
        h.shutdown()
    srv.stop()
    compare(p["base"], "qcow2", save_model(tmp_path, model), "raw")
    check_images(p["base"], p["mid"], p["top"])
    assert chain_files(p["base"]) == [p["base"]]


def test_stream_into_a_layer_added_read_only(nbdd_server, tmp_path):
    """block-stream into a backing layer added read-only (as libvirt
    adds them) reopens it read-write, in the catalogue too; the top
    reads the same."""
    p, views = make_chain(tmp_path)
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        for name, backing in (("base", None), ("mid", "base")):
            q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": name,
                                        "read-only": True, "backing": backing,
                                        "file": {"driver": "file",
                                                 "filename": p[name],
                                                 "read-only": True}})
        q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                    "backing": "mid",
                                    "file": {"driver": "file",
                                             "filename": p["top"]}})
        q.cmd("block-export-add", type="nbd", id="live", node_name="top",
              name="live", writable=True)
        model = read_all(srv)
        q.cmd("block-stream", job_id="s0", device="mid")
        ev = wait_end(q, "s0")
        assert ev["event"] == "BLOCK_JOB_COMPLETED", ev
        assert "error" not in ev["data"], ev
        assert not nodes(q)["mid"]["ro"] and nodes(q)["base"]["ro"]
        assert backing_of(q, "mid") is None
        assert read_all(srv) == model
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert not nodes(q)["mid"]["ro"]
        assert backing_of(q, "mid") is None
    assert read_all(srv) == model
    srv.stop()
    assert chain_files(p["top"]) == [p["top"], p["mid"]]
    compare(p["mid"], "qcow2", views["mid"], "raw")
    compare(p["top"], "qcow2", views["top"], "raw")
    check_images(p["base"], p["mid"], p["top"])


def test_reopened_base_keeps_its_bitmaps_through_a_crash(tmp_path):
    """A persistent bitmap on a base added read-only gets write intent
    when an active commit reopens the base: after a kill -9 it still
    holds the commit's writes, and is not inconsistent."""
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    create(base, SIZE)
    create(top, SIZE, backing=base)
    qemu_img("bitmap", "--add", base, "b0")
    qemu_io(top, "write -P 0x44 4M 8M")
    state = tmp_path / "state"
    srv = Server(tmp_path, ["--state-dir", str(state)])
    admin = str(state / "admin.sock")
    try:
        with QMP(admin) as q:
            q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "base",
                                        "read-only": True,
                                        "file": {"driver": "file",
                                                 "filename": base,
                                                 "read-only": True}})
            q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                        "backing": "base",
                                        "file": {"driver": "file",
                                                 "filename": top}})
            q.cmd("block-commit", job_id="a0", device="top")
            q.wait_event("BLOCK_JOB_READY", timeout=60)
            b0 = [b for b in nodes(q)["base"]["dirty-bitmaps"]
                  if b["name"] == "b0"][0]
            assert b0["count"] >= 8 * MiB
            os.kill(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(timeout=20)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        srv.log.close()
    os.unlink(tmp_path / "nbdd.pid")
    srv = Server(tmp_path, ["--state-dir", str(state)])
    try:
        with QMP(admin) as q:
            assert not nodes(q)["base"]["ro"]   # recorded read-write
            b0 = [b for b in nodes(q)["base"]["dirty-bitmaps"]
                  if b["name"] == "b0"][0]
            assert not b0["inconsistent"]
            assert b0["count"] >= 8 * MiB
            # The commit was picked up again at the start.
            assert job(q, "a0") is not None
    finally:
        srv.stop()


def test_inline_read_only_chain_stays_read_only(nbdd_server, tmp_path):
    """A stream into a top given with its chain inline reopens the top
    alone: the layers below stay read-only, across a restart too; and a
    stream refused after its checks reopens nothing."""
    p, views = make_chain(tmp_path)
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        q.cmd_args("blockdev-add", {
            "driver": "qcow2", "node-name": "top", "read-only": True,
            "file": {"driver": "file", "filename": p["top"],
                     "read-only": True},
            "backing": {
                "driver": "qcow2", "node-name": "mid", "read-only": True,
                "file": {"driver": "file", "filename": p["mid"],
                         "read-only": True},
                "backing": {
                    "driver": "qcow2", "node-name": "base",
                    "read-only": True, "backing": None,
                    "file": {"driver": "file", "filename": p["base"],
                             "read-only": True}}}})
        # Refused by its own checks: nothing reopened.
        with pytest.raises(QMPError, match="needs 'base-node'"):
            q.cmd("block-stream", job_id="s0", device="top",
                  backing_file="x")
        assert all(nodes(q)[n]["ro"] for n in ("top", "mid", "base"))
        # A stream into the top, cancelled: the top was reopened, the
        # layers below were not, and the catalogue says so.
        q.cmd("block-stream", job_id="s1", device="top", speed=65536)
        assert not nodes(q)["top"]["ro"]
        q.cmd("block-job-cancel", device="s1")
        assert wait_end(q, "s1")["event"] == "BLOCK_JOB_CANCELLED"
        assert nodes(q)["mid"]["ro"] and nodes(q)["base"]["ro"]
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert not nodes(q)["top"]["ro"]
        assert nodes(q)["mid"]["ro"] and nodes(q)["base"]["ro"]


def test_stream_with_the_chain_inline(nbdd_server, tmp_path):
    """A top given with its chain inline in its spec: the stream ends
    with the top's spec holding the base's, in the catalogue too."""
    p, views = make_chain(tmp_path)
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        q.cmd_args("blockdev-add", {
            "driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": p["top"]},
            "backing": {
                "driver": "qcow2", "node-name": "mid",
                "file": {"driver": "file", "filename": p["mid"]},
                "backing": {
                    "driver": "qcow2", "node-name": "base", "backing": None,
                    "file": {"driver": "file", "filename": p["base"]}}}})
        q.cmd("block-export-add", type="nbd", id="live", node_name="top",
              name="live", writable=True)
        model = read_all(srv)
        q.cmd("block-stream", job_id="s1", device="top", base_node="base")
        ev = wait_end(q, "s1")
        assert "error" not in ev["data"], ev
        assert backing_of(q, "top") == "base"
        assert read_all(srv) == model
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert backing_of(q, "top") == "base"
    assert read_all(srv) == model
    srv.stop()
    assert chain_files(p["top"]) == [p["top"], p["base"]]
    compare(p["top"], "qcow2", views["top"], "raw")


@pytest.mark.parametrize("kind", ["stream", "commit", "active-commit"])
def test_cancel_in_the_middle(nbdd_server, tmp_path, kind):
    p, views = make_chain(tmp_path)
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        add_chain(q, p)
        model = read_all(srv)
        if kind == "stream":
            cmd = ("block-stream", {"job-id": "j", "device": "top",
                                    "speed": 4 * MiB})
        elif kind == "commit":
            cmd = ("block-commit", {"job-id": "j", "device": "top",
                                    "top-node": "mid", "base-node": "base",
                                    "speed": 4 * MiB})
        else:
            cmd = ("block-commit", {"job-id": "j", "device": "top",
                                    "base-node": "base", "speed": 4 * MiB})
        # A slow writer: a fast one would soon fill the top, leaving a
        # stream nothing to copy.
        w = run_with_writer(srv, q, model,
                            lambda q: q.cmd_args(cmd[0], cmd[1]), seed=3,
                            pace=0.02, head_start=0)
        time.sleep(0.5)
        j = job(q, "j")
        assert j["status"] == "running", j
        assert 0 < j["offset"] < SIZE
        q.cmd("block-job-cancel", device="j")
        ev = wait_end(q, "j")
        assert ev["event"] == "BLOCK_JOB_CANCELLED"
        time.sleep(0.2)
        w.stop()
        # Nothing moved; every layer is free again but for the chain.
        assert backing_of(q, "top") == "mid"
        assert backing_of(q, "mid") == "base"
        assert {e["id"]: e for e in q.cmd("query-block-exports")}[
            "live"]["node-name"] == "top"
        assert [u["kind"] for u in nodes(q)["base"]["users"]] == ["node"]
        assert read_all(srv) == model
    srv.stop()
    compare(p["top"], "qcow2", save_model(tmp_path, model), "raw")
    check_images(p["base"], p["mid"], p["top"])
    assert chain_files(p["top"]) == [p["top"], p["mid"], p["base"]]
    # The base holds, at most, data hidden under mid or top: what mid's
    # chain reads changes only if top's data went into the base.
    if kind != "active-commit":
        compare(p["mid"], "qcow2", views["mid"], "raw")
    if kind == "stream":
        compare(p["base"], "qcow2", views["base"], "raw")


def test_refusals(nbdd_server, tmp_path):
    p, _ = make_chain(tmp_path)
    ov = create(str(tmp_path / "ov.qcow2"), SIZE, backing=p["top"])
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        add_chain(q, p)
        q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "ov",
                                    "backing": None,
                                    "file": {"driver": "file",
                                             "filename": ov}})
        for cmd, args, match in [
                ("block-stream", {"device": "base"}, "nothing to stream"),
                ("block-stream", {"device": "top", "base-node": "ov"},
                 "not in the backing chain"),
                ("block-stream", {"device": "top", "base-node": "nope"},
                 "does not exist"),
                ("block-stream", {"device": "top", "base-node": "top"},
                 "device itself"),
                ("block-stream", {"device": "top", "backing-file": "x"},
                 "needs 'base-node'"),
                ("block-stream", {"device": "top", "on-error": "sometimes"},
                 "on-error"),
                ("block-commit", {"device": "top", "top-node": "mid",
                                  "base-node": "mid"}, "same node"),
                ("block-commit", {"device": "top", "top-node": "base",
                                  "base-node": "mid"},
                 "not in the backing chain"),
                ("block-commit", {"device": "base"}, "no backing node"),
                ("block-commit", {"device": "top", "backing-file": "x"},
                 "active layer"),
        ]:
            with pytest.raises(QMPError, match=match):
                q.cmd_args(cmd, args)
        assert q.cmd("query-block-jobs") == []

        # A slow stream holds the chain.
        q.cmd("block-stream", job_id="s0", device="top", speed=1 * MiB)
        with pytest.raises(QMPError, match="ends by itself"):
            q.cmd("block-job-complete", device="s0")
        with pytest.raises(QMPError, match="job 's0' does not allow"):
            q.cmd("block_resize", node_name="top", size=2 * SIZE)
        # The layers to drop: nobody else writes them.
        with pytest.raises(QMPError) as e:
            q.cmd("block-export-add", type="nbd", id="m", node_name="mid",
                  name="m", writable=True)
        assert "export 'm'" in e.value.desc and "job 's0'" in e.value.desc
        # The chain's links and the job's edge do not move.
        with pytest.raises(QMPError) as e:
            q.cmd("block-commit", job_id="c0", device="top",
                  top_node="mid", base_node="base")
        assert "job 's0'" in e.value.desc
        with pytest.raises(QMPError, match="job 's0'"):
            q.cmd("blockdev-replace", parent_type="driver", node_name="top",
                  child="backing", new_child="base")
        with pytest.raises(QMPError, match="job 's0'"):
            q.cmd("blockdev-snapshot", node="top", overlay="ov")
        with pytest.raises(QMPError, match="in use"):
            q.cmd("blockdev-del", node_name="mid")
        # Refused commands changed nothing.
        assert backing_of(q, "top") == "mid"
        assert nodes(q)["ov"]["users"] == []
        assert backing_of(q, "ov") is None
        q.cmd("block-job-cancel", device="s0")
        assert wait_end(q, "s0")["event"] == "BLOCK_JOB_CANCELLED"

        # A commit below the active layer: the base is the job's alone.
        q.cmd("block-commit", job_id="c1", device="top", top_node="mid",
              base_node="base", speed=1 * MiB)
        with pytest.raises(QMPError) as e:
            q.cmd("block-export-add", type="nbd", id="b", node_name="base",
                  name="b", writable=True)
        assert "export 'b'" in e.value.desc and "job 'c1'" in e.value.desc
        with pytest.raises(QMPError, match="job 'c1'"):
            q.cmd("block-stream", job_id="s1", device="top")
        # Reading the base is fine.
        q.cmd("block-export-add", type="nbd", id="b", node_name="base",
              name="b")
        q.cmd("block-export-del", id="b")
        q.cmd("block-job-cancel", device="c1")
        assert wait_end(q, "c1")["event"] == "BLOCK_JOB_CANCELLED"
        assert q.cmd("query-block-jobs") == []
        # Free again: the same stream runs now.
        q.cmd("block-stream", job_id="s2", device="top", base_node="mid")
        ev = wait_end(q, "s2")
        assert ev["event"] == "BLOCK_JOB_COMPLETED" and \
            "error" not in ev["data"]
        assert backing_of(q, "top") == "mid"
    srv.stop()
    check_images(p["base"], p["mid"], p["top"])


def test_shutdown_while_jobs_run(nbdd_server, tmp_path):
    """SIGTERM with a stream and a commit running: both are cancelled,
    the daemon exits cleanly, and the chain is as it was."""
    p, views = make_chain(tmp_path)
    other = {n: str(tmp_path / f"o-{n}.qcow2") for n in ("base", "top")}
    create(other["base"], SIZE)
    create(other["top"], SIZE, backing=other["base"])
    qemu_io(other["base"], "write -P 0x41 0 8M")
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        add_chain(q, p)
        q.cmd("block-stream", job_id="s0", device="top", speed=1 * MiB)
        q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "obase",
                                    "file": {"driver": "file",
                                             "filename": other["base"]}})
        q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "otop",
                                    "backing": "obase",
                                    "file": {"driver": "file",
                                             "filename": other["top"]}})
        q.cmd("block-commit", job_id="a0", device="otop", speed=1 * MiB)
        time.sleep(0.3)
        assert {j["device"] for j in q.cmd("query-block-jobs")} == \
            {"s0", "a0"}
    srv.stop()
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        # Picked up again (the catalogue keeps running jobs); cancelled
        # here, they leave the chain as it was.  (The active commit may
        # be ready: only force abandons it rather than syncing the base.)
        assert {j["device"] for j in q.cmd("query-block-jobs")} == \
            {"s0", "a0"}
        for j in ("s0", "a0"):
            q.cmd("block-job-cancel", device=j, force=True)
        for j in ("s0", "a0"):
            q.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
        assert backing_of(q, "top") == "mid"
        assert backing_of(q, "otop") == "obase"
    with open(views["top"], "rb") as f:
        assert read_all(srv) == f.read()
    srv.stop()
    check_images(p["base"], p["mid"], p["top"], other["base"], other["top"])
    assert chain_files(p["top"]) == [p["top"], p["mid"], p["base"]]
