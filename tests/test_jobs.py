"""Block jobs: blockdev-mirror to a local node and to another nbdd over
TLS, with a writer running the whole time; pause, resume, speed,
cancel, complete, dismiss; and the operations a running job refuses."""
import os
import random
import threading
import time

import nbd
import pytest

from admintools import MiB, qcow2_graph, qemu_img_check, restart, start
from conftest import Server, blockdev_args, export_args, make_image
from pki import PKI
from qmp import QMP, QMPError

SIZE = 32 * MiB


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki")).make()


class Writer(threading.Thread):
    """Random writes through an export, keeping a model of what the
    disk must hold: every acknowledged write lands in it."""

    def __init__(self, uri, size, model, seed=1):
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.size = size
        self.model = model
        self.rnd = random.Random(seed)
        self.halt = threading.Event()
        self.writes = 0
        self.error = None

    def run(self):
        try:
            while not self.halt.is_set():
                n = self.rnd.choice([512, 4096, 65536, 131072])
                off = self.rnd.randrange(0, self.size - n)
                data = self.rnd.randbytes(n)
                self.h.pwrite(data, off)
                self.model[off:off + n] = data
                self.writes += 1
                # A guest's pace, not a flood: the mirror must catch up
                # (under the sanitizers too) to become ready.
                time.sleep(0.001)
            self.h.flush()
        except Exception as e:              # noqa: BLE001
            self.error = e

    def stop(self):
        self.halt.set()
        self.join(60)
        assert self.error is None, self.error
        self.h.shutdown()


def live_disk(q, tmp_path, size=SIZE):
    img = qcow2_graph(q, tmp_path, size=size)
    q.cmd("block-export-add", type="nbd", id="live", node_name="disk0",
          name="live", writable=True)
    return img


def seed(srv, size, model):
    h = srv.connect("live")
    rnd = random.Random(0)
    for off in range(0, size, 4 * MiB):
        data = rnd.randbytes(MiB)
        h.pwrite(data, off)
        model[off:off + MiB] = data
    h.flush()
    h.shutdown()


def raw_target(q, tmp_path, name="tgt", size=SIZE):
    img = make_image(tmp_path / f"{name}.img", size)
    q.cmd_args("blockdev-add", {"driver": "raw", "node-name": name,
                                "file": {"driver": "file", "filename": img}})
    return img


def status_events(q, jid, until):
    """The statuses JOB_STATUS_CHANGE gave @jid, up to @until."""
    seen = []
    while not seen or seen[-1] != until:
        ev = q.wait_event("JOB_STATUS_CHANGE")
        if ev["data"]["id"] == jid:
            seen.append(ev["data"]["status"])
    return seen


def job(q, jid):
    for j in q.cmd("query-block-jobs"):
        if j["device"] == jid:
            return j
    return None


def test_mirror_to_a_local_node_under_writes(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    model = bytearray(SIZE)
    with QMP(srv.admin) as q:
        live_disk(q, tmp_path)
        seed(srv, SIZE, model)
        tgt = raw_target(q, tmp_path)
        w = Writer(srv.uri("live"), SIZE, model)
        w.start()
        q.cmd("blockdev-mirror", job_id="m0", device="disk0", target="tgt",
              sync="full")
        ev = q.wait_event("BLOCK_JOB_READY", timeout=60)
        assert ev["data"]["device"] == "m0" and ev["data"]["type"] == "mirror"
        j = job(q, "m0")
        assert j["ready"] and j["status"] == "ready"
        assert j["offset"] >= SIZE
        # Refused while it runs, naming the job.
        with pytest.raises(QMPError, match="job 'm0'"):
            q.cmd("block_resize", node_name="disk0", size=2 * SIZE)
        with pytest.raises(QMPError, match="in use"):
            q.cmd("blockdev-del", node_name="tgt")
        with pytest.raises(QMPError, match="in use by job 'm0'"):
            q.cmd("blockdev-mirror", job_id="m1", device="disk0",
                  target="tgt", sync="full")
        time.sleep(0.3)                     # writes while ready
        q.cmd("block-job-complete", device="m0")
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
        assert "error" not in ev["data"]
        # The export moved to the target; the writer never noticed.
        exports = {e["id"]: e for e in q.cmd("query-block-exports")}
        assert exports["live"]["node-name"] == "tgt"
        assert status_events(q, "m0", "null")[-2:] == ["concluded", "null"]
        assert job(q, "m0") is None                 # auto-dismissed
        time.sleep(0.3)
        w.stop()
        assert w.writes > 50
    with open(tgt, "rb") as f:
        assert f.read() == model
    # The node names no internal bitmap.
    with QMP(srv.admin) as q:
        for n in q.cmd("query-named-block-nodes"):
            assert all(not b["name"].startswith("#")
                       for b in n.get("dirty-bitmaps", []))


@pytest.mark.parametrize("force", [False, True])
def test_cancel_of_a_ready_mirror(nbdd_server, tmp_path, force):
    """As in QEMU: without force, a ready mirror is brought in sync and
    ends completed, with nothing moved (a point-in-time copy), and the
    source goes on; with force it is abandoned where it is."""
    srv = start(nbdd_server, tmp_path)
    model = bytearray(SIZE)
    with QMP(srv.admin) as q:
        live_disk(q, tmp_path)
        seed(srv, SIZE, model)
        tgt = raw_target(q, tmp_path)
        w = Writer(srv.uri("live"), SIZE, model, seed=4)
        w.start()
        q.cmd("blockdev-mirror", job_id="m0", device="disk0", target="tgt",
              sync="full")
        q.wait_event("BLOCK_JOB_READY", timeout=60)
        time.sleep(0.3)                     # writes while ready
        # A paused job copies nothing more: the last write is on the
        # source alone.
        q.cmd("block-job-pause", device="m0")
        w.stop()
        time.sleep(0.2)                     # a copy under way ends
        h = srv.connect("live")
        h.pwrite(b"L" * 4096, 8192)
        h.flush()
        h.shutdown()
        model[8192:8192 + 4096] = b"L" * 4096
        if not force:
            # Not while paused: the sync is for a job that copies.
            with pytest.raises(QMPError, match="job 'm0' is paused: resume"):
                q.cmd("block-job-cancel", device="m0")
            q.cmd("block-job-resume", device="m0")
        q.cmd("block-job-cancel", device="m0", force=force)
        ev = q.wait_event("BLOCK_JOB_CANCELLED" if force
                          else "BLOCK_JOB_COMPLETED", timeout=30)
        assert ev["data"]["device"] == "m0" and "error" not in ev["data"]
        if not force:
            assert ev["data"]["offset"] == ev["data"]["len"]
        assert job(q, "m0") is None
        # Nothing moved, and the job let go of the target.
        exports = {e["id"]: e for e in q.cmd("query-block-exports")}
        assert exports["live"]["node-name"] == "disk0"
        q.cmd("blockdev-del", node_name="tgt")
        with open(tgt, "rb") as f:
            synced = f.read() == model
        assert synced != force
        # The source takes writes, with no job's bitmap left on it.
        h = srv.connect("live")
        h.pwrite(b"A" * 4096, 0)
        assert h.pread(4096, 0) == b"A" * 4096
        h.shutdown()
        assert not [b for n in q.cmd("query-named-block-nodes")
                    for b in n.get("dirty-bitmaps", [])]


def test_cancel_at_random_points(nbdd_server, tmp_path):
    """Mirrors and backups cancelled at random points of their copy,
    with a writer running the whole time: each ends cancelled and lets
    go of its target, the export never moves, a backup's bitmap keeps
    its bits, and the disk holds every write."""
    rnd = random.Random(8)
    srv = start(nbdd_server, tmp_path)
    model = bytearray(SIZE)
    with QMP(srv.admin) as q:
        img = live_disk(q, tmp_path)
        # Seeded under the bitmap: a backup has 8 MiB to copy at least
        # (its bits come back at each cancel), 2 s at its speed.
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0")
        seed(srv, SIZE, model)
        assert bits(q, "disk0", "b0")["count"] >= 8 * MiB
        w = Writer(srv.uri("live"), SIZE, model, seed=5)
        w.start()
        for i in range(8):
            raw_target(q, tmp_path)
            kind = ("mirror", "backup")[i % 2]
            before = bits(q, "disk0", "b0")["count"]
            if kind == "mirror":
                q.cmd("blockdev-mirror", job_id="j", device="disk0",
                      target="tgt", sync="full", speed=16 * MiB)
            else:
                q.cmd("blockdev-backup", job_id="j", device="disk0",
                      target="tgt", sync="bitmap", bitmap="b0",
                      bitmap_mode="on-success", speed=4 * MiB)
            time.sleep(0 if i < 2 else rnd.uniform(0, 0.5))
            q.cmd("block-job-cancel", device="j")
            ev = q.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
            assert ev["data"]["device"] == "j", ev
            assert job(q, "j") is None
            q.cmd("blockdev-del", node_name="tgt")
            assert {e["id"]: e for e in q.cmd("query-block-exports")}[
                "live"]["node-name"] == "disk0"
            # The frozen bits came back, and the writes since were added.
            b = bits(q, "disk0", "b0")
            assert not b["frozen"] and b["count"] >= before, (b, before)
        w.stop()
        h = srv.connect("live")
        assert b"".join(h.pread(4 * MiB, off)
                        for off in range(0, SIZE, 4 * MiB)) == model
        h.shutdown()
    srv.stop()
    qemu_img_check(img)


def test_live_migration_to_another_nbdd_over_tls(nbdd_server, tmp_path,
                                                 pki):
    """Two appliances: the disk moves from this one to the other while
    the guest writes, over NBD with TLS."""
    other = tmp_path / "other"
    other.mkdir()
    remote_img = make_image(other / "disk.img", SIZE)
    remote = Server(other, blockdev_args(remote_img) + export_args() +
                    ["--tls", "require", "--tls-certificates", pki.server])
    try:
        srv = start(nbdd_server, tmp_path)
        model = bytearray(SIZE)
        with QMP(srv.admin) as q:
            live_disk(q, tmp_path)
            seed(srv, SIZE, model)
            q.cmd_args("blockdev-add", {
                "driver": "nbd", "node-name": "away",
                "server": {"type": "inet", "host": "127.0.0.1",
                           "port": str(remote.port)},
                "export": "disk0",
                "tls-certificates": pki.certs["client1"]})
            w = Writer(srv.uri("live"), SIZE, model, seed=2)
            w.start()
            q.cmd("blockdev-mirror", job_id="mig", device="disk0",
                  target="away", sync="full", buf_size=4 * MiB)
            q.wait_event("BLOCK_JOB_READY", timeout=120)
            q.cmd("block-job-complete", device="mig")
            q.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
            assert {e["id"]: e for e in q.cmd("query-block-exports")}[
                "live"]["node-name"] == "away"
            time.sleep(0.2)
            w.stop()
        with open(remote_img, "rb") as f:
            assert f.read() == model
    finally:
        remote.stop()


def test_pause_speed_cancel_and_dismiss(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    model = bytearray(SIZE)
    with QMP(srv.admin) as q:
        src = live_disk(q, tmp_path)
        seed(srv, SIZE, model)
        raw_target(q, tmp_path)
        q.cmd("blockdev-mirror", job_id="slow", device="disk0", target="tgt",
              sync="full", speed=4 * MiB, auto_dismiss=False)
        time.sleep(0.5)
        j = job(q, "slow")
        assert j["status"] == "running" and j["speed"] == 4 * MiB
        assert 0 < j["offset"] < SIZE and j["len"] >= SIZE
        assert status_events(q, "slow", "running") == ["running"]
        q.cmd("block-job-pause", device="slow")
        assert status_events(q, "slow", "paused") == ["paused"]
        time.sleep(0.3)
        at = job(q, "slow")["offset"]
        time.sleep(0.5)
        assert job(q, "slow")["offset"] <= at + 1 * MiB
        with pytest.raises(QMPError, match="not ready"):
            q.cmd("block-job-complete", device="slow")
        q.cmd("block-job-set-speed", device="slow", speed=1 * MiB)
        q.cmd("block-job-resume", device="slow")
        assert job(q, "slow")["speed"] == 1 * MiB
        q.cmd("block-job-cancel", device="slow")
        ev = q.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
        assert ev["data"]["device"] == "slow"
        assert job(q, "slow")["status"] == "concluded"
        with pytest.raises(QMPError, match="ended"):
            q.cmd("block-job-pause", device="slow")
        q.cmd("job-dismiss", id="slow")
        assert q.cmd("query-block-jobs") == []
        with pytest.raises(QMPError) as e:
            q.cmd("job-dismiss", id="slow")
        assert e.value.cls == "DeviceNotFound"
        # Nothing moved; the source is whole and free again.
        assert {e["id"]: e for e in q.cmd("query-block-exports")}[
            "live"]["node-name"] == "disk0"
        q.cmd("blockdev-del", node_name="tgt")
        h = srv.connect("live")
        got = bytearray()
        for off in range(0, SIZE, 4 * MiB):
            got += h.pread(4 * MiB, off)
        assert got == model
        h.shutdown()
    assert src


def test_bad_mirror_arguments(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        live_disk(q, tmp_path)
        raw_target(q, tmp_path)
        raw_target(q, tmp_path, "small", size=SIZE // 2)
        for args, match in [
                ({"device": "nope", "target": "tgt", "sync": "full"},
                 "does not exist"),
                ({"device": "disk0", "target": "disk0", "sync": "full"},
                 "another node"),
                ({"device": "disk0", "target": "small", "sync": "full"},
                 "same size"),
                ({"device": "disk0", "target": "tgt", "sync": "most"},
                 "sync must be"),
                ({"device": "disk0", "target": "tgt", "sync": "full",
                  "granularity": 1000}, "power of 2"),
                ({"device": "disk0", "target": "tgt", "sync": "full",
                  "buf-size": 100}, "buf-size"),
        ]:
            a = {"job-id": "bad"}
            a.update(args)
            with pytest.raises(QMPError, match=match):
                q.cmd_args("blockdev-mirror", a)
        assert q.cmd("query-block-jobs") == []
        with pytest.raises(QMPError, match="not valid"):
            q.cmd("blockdev-mirror", job_id="1bad", device="disk0",
                  target="tgt", sync="full")
        for cmd in ("block-job-pause", "block-job-resume",
                    "block-job-cancel", "block-job-complete"):
            with pytest.raises(QMPError) as e:
                q.cmd(cmd, device="nope")
            assert e.value.cls == "DeviceNotFound"


# ---------------------------------------------------------------------
# blockdev-backup: a point-in-time push

def record(srv, out):
    from helpers import run
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri("live"),
         str(out)])
    return str(out)


def bits(q, node, name):
    for n in q.cmd("query-named-block-nodes"):
        if n["node-name"] == node:
            for b in n["dirty-bitmaps"]:
                if b["name"] == name:
                    return b
    return None


def test_full_then_incremental_backup_under_writes(nbdd_server, tmp_path):
    import shutil
    srv = start(nbdd_server, tmp_path)
    model = bytearray(SIZE)
    with QMP(srv.admin) as q:
        live_disk(q, tmp_path)
        seed(srv, SIZE, model)
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0",
              persistent=True)
        # Full: the target holds the disk as it was at the start.
        ref0 = record(srv, tmp_path / "ref0.raw")
        full = raw_target(q, tmp_path, "full")
        w = Writer(srv.uri("live"), SIZE, model, seed=3)
        q.cmd("blockdev-backup", job_id="b-full", device="disk0",
              target="full", sync="full", speed=64 * MiB)
        w.start()
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert ev["data"]["device"] == "b-full" and "error" not in ev["data"]
        assert ev["data"]["type"] == "backup"
        w.stop()
        assert open(full, "rb").read() == open(ref0, "rb").read()
        q.cmd("blockdev-del", node_name="full")
        # The writes since are what b0 holds now; an incremental on a
        # copy of the full backup gives the disk as it is at its start.
        dirty = bits(q, "disk0", "b0")["count"]
        assert 0 < dirty < SIZE
        inc = str(tmp_path / "inc.img")
        shutil.copy(full, inc)
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "inc",
                                    "file": {"driver": "file",
                                             "filename": inc}})
        ref1 = record(srv, tmp_path / "ref1.raw")
        w = Writer(srv.uri("live"), SIZE, model, seed=4)
        q.cmd("blockdev-backup", job_id="b-inc", device="disk0",
              target="inc", sync="incremental", bitmap="b0")
        j = job(q, "b-inc")
        assert j is None or j["len"] == dirty
        w.start()
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert "error" not in ev["data"]
        w.stop()
        assert open(inc, "rb").read() == open(ref1, "rb").read()
        # Success: b0 holds only what was written since the incremental.
        b = bits(q, "disk0", "b0")
        assert not b["frozen"] and b["count"] < SIZE
        events = [(e["event"], e["session"]) for e in
                  q.cmd("query-bitmap-lineage", node="disk0", name="b0")]
        assert events[-2:] == [("fork", "b-inc"), ("unfork-success", "b-inc")]
        # The live export is back on the node itself.
        assert {e["id"]: e for e in q.cmd("query-block-exports")}[
            "live"]["node-name"] == "disk0"
        assert not [n for n in q.cmd("query-named-block-nodes")
                    if n["node-name"].startswith("#backup")]


def test_failed_and_cancelled_backups_keep_the_bits(nbdd_server, tmp_path):
    """The target goes away mid-backup (an nbd node whose server stops):
    the job fails, the guest never sees an error, and the bitmap gets
    its frozen bits back; a cancel does the same; bitmap-mode 'always'
    drops them even so."""
    other = tmp_path / "other"
    other.mkdir()
    remote_img = make_image(other / "t.img", SIZE)
    remote = Server(other, blockdev_args(remote_img) + export_args())
    srv = start(nbdd_server, tmp_path)
    model = bytearray(SIZE)
    with QMP(srv.admin) as q:
        live_disk(q, tmp_path)
        seed(srv, SIZE, model)
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0")
        h = srv.connect("live")
        h.pwrite(b"x" * 8 * MiB, 0)
        q.cmd_args("blockdev-add", {
            "driver": "nbd", "node-name": "away", "reconnect-delay": 0,
            "server": {"type": "unix", "path": remote.sock},
            "export": "disk0"})
        q.cmd("blockdev-backup", job_id="doomed", device="disk0",
              target="away", sync="incremental", bitmap="b0",
              speed=1 * MiB)
        time.sleep(0.5)
        remote.stop()
        h.pwrite(b"y" * MiB, 0)                 # the guest goes on
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert ev["data"]["error"]
        b = bits(q, "disk0", "b0")
        assert not b["frozen"] and b["count"] == 8 * MiB
        assert h.pread(MiB, 0) == b"y" * MiB
        raw_target(q, tmp_path)
        q.cmd("blockdev-backup", job_id="c", device="disk0", target="tgt",
              sync="bitmap", bitmap="b0", bitmap_mode="on-success",
              speed=1 * MiB)
        time.sleep(0.3)
        q.cmd("block-job-cancel", device="c")
        q.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
        assert bits(q, "disk0", "b0")["count"] == 8 * MiB
        q.cmd("blockdev-backup", job_id="a", device="disk0", target="tgt",
              sync="bitmap", bitmap="b0", bitmap_mode="always",
              speed=1 * MiB)
        time.sleep(0.3)
        q.cmd("block-job-cancel", device="a")
        q.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
        assert bits(q, "disk0", "b0")["count"] == 0
        h.shutdown()


def test_backup_refusals(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        live_disk(q, tmp_path)
        raw_target(q, tmp_path)
        raw_target(q, tmp_path, "small", size=SIZE // 2)
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0")
        for args, match in [
                ({"target": "tgt", "sync": "top"}, "sync must be"),
                ({"target": "tgt", "sync": "incremental"}, "needs a"),
                ({"target": "tgt", "sync": "full", "bitmap": "b0"},
                 "takes no"),
                ({"target": "tgt", "sync": "incremental", "bitmap": "zz"},
                 "no bitmap"),
                ({"target": "small", "sync": "full"}, "smaller"),
                ({"target": "disk0", "sync": "full"}, "another node"),
                ({"target": "tgt", "sync": "bitmap", "bitmap": "b0",
                  "bitmap-mode": "sometimes"}, "bitmap-mode"),
        ]:
            a = {"job-id": "bad", "device": "disk0"}
            a.update(args)
            with pytest.raises(QMPError, match=match):
                q.cmd_args("blockdev-backup", a)
        assert q.cmd("query-block-jobs") == []
        assert not bits(q, "disk0", "b0")["frozen"]
        q.cmd("blockdev-backup", job_id="slow", device="disk0",
              target="tgt", sync="full", speed=1 * MiB)
        with pytest.raises(QMPError, match="being backed up"):
            q.cmd("blockdev-backup", job_id="two", device="disk0",
                  target="small", sync="full")
        with pytest.raises(QMPError, match="#backup:slow"):
            q.cmd("block_resize", node_name="disk0", size=2 * SIZE)
        with pytest.raises(QMPError, match="in use"):
            q.cmd("blockdev-del", node_name="tgt")
        q.cmd("block-job-cancel", device="slow")
        q.wait_event("BLOCK_JOB_CANCELLED", timeout=30)


def test_a_paused_job_comes_back_paused(nbdd_server, tmp_path):
    """A pause the user asked for outlives a restart of the daemon; a
    resume does too."""
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        live_disk(q, tmp_path)
        raw_target(q, tmp_path)
        q.cmd("blockdev-mirror", job_id="m", device="disk0", target="tgt",
              sync="full", speed=1 * MiB)
        q.cmd("block-job-pause", device="m")
    srv = restart(srv, nbdd_server, tmp_path)
    assert "job 'm' (blockdev-mirror) was cut short by the stop: started " \
        "again, paused as it was" in srv.output()
    with QMP(srv.admin) as q:
        j = job(q, "m")
        assert j["status"] == "paused", j
        o = j["offset"]
        time.sleep(0.5)
        assert job(q, "m")["offset"] == o        # it copies nothing
        q.cmd("block-job-resume", device="m")
        assert job(q, "m")["status"] == "running"
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert job(q, "m")["status"] == "running"
        q.cmd("block-job-cancel", device="m")
        q.wait_event("BLOCK_JOB_CANCELLED", timeout=30)


def test_jobs_after_a_restart(tmp_path):
    """kill -9 with a mirror and a backup running: at the next start the
    mirror runs again (same arguments) and the backup has ended as a
    failure, its bitmap whole.  A catalogue from before jobs were kept
    (schema 1) is brought up to date on the way."""
    import os
    import signal
    import sqlite3
    state = tmp_path / "state"

    def daemon():
        s = Server(tmp_path, ["--state-dir", str(state)])
        s.admin = str(state / "admin.sock")
        return s

    srv = daemon()
    try:
        with QMP(srv.admin) as q:
            qcow2_graph(q, tmp_path, size=SIZE)
            q.cmd("block-dirty-bitmap-add", node="disk0", name="b0",
                  persistent=True)
            q.cmd("block-export-add", type="nbd", id="live",
                  node_name="disk0", name="live", writable=True)
            h = srv.connect("live")
            h.pwrite(b"a" * 4 * MiB, 0)
            h.flush()
            raw_target(q, tmp_path)
            raw_target(q, tmp_path, "bk")
            raw_target(q, tmp_path, "other")
            q.cmd("blockdev-backup", job_id="b", device="disk0",
                  target="bk", sync="incremental", bitmap="b0",
                  speed=1 * MiB)
            q.cmd("blockdev-mirror", job_id="m", device="other",
                  target="tgt", sync="full", speed=1 * MiB)
            with pytest.raises(QMPError, match="in use by job 'm'"):
                q.cmd("blockdev-backup", job_id="b2", device="tgt",
                      target="other", sync="full")
            h.pwrite(b"b" * MiB, 20 * MiB)
            h.flush()
            os.kill(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(timeout=20)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        srv.log.close()
    os.unlink(tmp_path / "nbdd.pid")
    # As an older daemon left it: no jobs table, schema 1 (but the rows
    # are ours to keep: put them back after).
    db = sqlite3.connect(state / "catalog.db")
    rows = db.execute("select id, spec from jobs order by seq").fetchall()
    assert [r[0] for r in rows] == ["b", "m"]
    db.execute("drop table jobs")
    db.execute("pragma user_version = 1")
    db.commit()
    db.close()
    srv = daemon()
    srv.stop()
    db = sqlite3.connect(state / "catalog.db")
    assert db.execute("pragma user_version").fetchone()[0] == 2
    db.executemany("insert into jobs (id, spec) values (?, ?)", rows)
    db.commit()
    db.close()
    srv = daemon()
    try:
        with QMP(srv.admin) as q:
            jobs = {j["device"]: j for j in q.cmd("query-block-jobs")}
            assert list(jobs) == ["m"] and jobs["m"]["type"] == "mirror"
            assert jobs["m"]["offset"] < SIZE      # copying from scratch
            b = bits(q, "disk0", "b0")
            assert not b["frozen"] and b["count"] >= 5 * MiB
            events = [(e["event"], e["session"]) for e in
                      q.cmd("query-bitmap-lineage", node="disk0",
                            name="b0")]
            assert events[-2:] == [("fork", "b"), ("unfork-failure", "b")]
            q.cmd("block-job-cancel", device="m")
            q.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
        out = srv.output()
        assert "job 'm' (blockdev-mirror) was cut short" in out
        assert "job 'b' (blockdev-backup) was cut short" in out
    finally:
        srv.stop()
    srv = daemon()
    try:
        with QMP(srv.admin) as q:
            assert q.cmd("query-block-jobs") == []    # cancelled: gone
    finally:
        srv.stop()


def remote_target(tmp_path):
    """Another nbdd, in tmp_path/other, serving an empty disk: the
    server, its image, and the arguments to start it again."""
    other = tmp_path / "other"
    other.mkdir()
    img = make_image(other / "disk.img", SIZE)
    args = blockdev_args(img) + export_args()
    return Server(other, args), img, args


def mirror_under_way(q, srv, tmp_path, remote, model, reconnect_delay):
    """The live disk, seeded (into @model), mirrored to @remote at
    8 MiB/s through an nbd node: returns with the copy under way."""
    live_disk(q, tmp_path)
    seed(srv, SIZE, model)
    q.cmd_args("blockdev-add", {
        "driver": "nbd", "node-name": "away",
        "reconnect-delay": reconnect_delay,
        "server": {"type": "unix", "path": remote.sock}, "export": "disk0"})
    q.cmd("blockdev-mirror", job_id="m", device="disk0", target="away",
          sync="full", speed=8 * MiB)
    time.sleep(1)
    assert 0 < job(q, "m")["offset"] < SIZE


def mirror_completes(q, srv, remote):
    """Full speed, ready, complete: no error.  A missing READY shows the
    events and both daemons' logs, to tell which side lost the other."""
    q.cmd("block-job-set-speed", device="m", speed=0)
    try:
        q.wait_event("BLOCK_JOB_READY", timeout=60)
    except TimeoutError:
        raise AssertionError(
            f"events: {q.events}\n--- local:\n{srv.output()}"
            f"\n--- remote:\n{remote.output()}") from None
    q.cmd("block-job-complete", device="m")
    ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
    assert "error" not in ev["data"]


def test_mirror_rides_out_a_remote_restart(nbdd_server, tmp_path):
    """The destination appliance restarts in the middle of a mirror: the
    nbd node waits for it (reconnect-delay) and the mirror goes on to
    the end, nothing lost."""
    remote, remote_img, args = remote_target(tmp_path)
    srv = start(nbdd_server, tmp_path)
    model = bytearray(SIZE)
    try:
        with QMP(srv.admin) as q:
            mirror_under_way(q, srv, tmp_path, remote, model, 20)
            remote.stop()
            time.sleep(1)
            remote = Server(remote.dir, args, tcp=False)
            # The restarted daemon listens on the same path.
            assert os.path.exists(remote.sock), remote.output()
            mirror_completes(q, srv, remote)
        with open(remote_img, "rb") as f:
            assert f.read() == model
    finally:
        remote.stop()


def test_shutdown_does_not_wait_for_a_lost_remote(nbdd_server, tmp_path):
    """SIGTERM while a mirror's remote target is down and its
    reconnect-delay (300 s) runs: the copies waiting for the remote give
    up, and nbdd exits at once (Server.stop allows 20 s) keeping the
    job.  With the remote back, the next start picks the mirror up and
    it completes, nothing lost."""
    remote, remote_img, args = remote_target(tmp_path)
    srv = start(nbdd_server, tmp_path)
    model = bytearray(SIZE)
    try:
        with QMP(srv.admin) as q:
            mirror_under_way(q, srv, tmp_path, remote, model, 300)
            remote.stop()
            time.sleep(0.5)             # a copy now waits for the remote
        srv.stop()
        assert "(giving up: shutting down)" in srv.output(), srv.output()
        remote = Server(remote.dir, args, tcp=False)
        srv = restart(srv, nbdd_server, tmp_path)
        with QMP(srv.admin) as q:
            mirror_completes(q, srv, remote)
        with open(remote_img, "rb") as f:
            assert f.read() == model
    finally:
        remote.stop()


def test_a_running_mirror_keeps_its_nodes(nbdd_server, tmp_path):
    """Graph changes under a mirror are refused, naming it; a complete
    that fails (the remote target gone after ready) fails the job and
    leaves the source as it was."""
    other = tmp_path / "other"
    other.mkdir()
    remote_img = make_image(other / "disk.img", SIZE)
    remote = Server(other, blockdev_args(remote_img) + export_args())
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        live_disk(q, tmp_path)
        raw_target(q, tmp_path)
        raw_target(q, tmp_path, "tgt2")
        q.cmd("blockdev-mirror", job_id="m", device="disk0", target="tgt",
              sync="full", speed=1 * MiB, buf_size=65536)
        q.cmd_args("blockdev-add", {"driver": "throttle", "node-name": "t",
                                    "throttle-group": "g", "file": "disk0"})
        for cmd, args in [
                ("blockdev-mirror", {"job-id": "m2", "device": "disk0",
                                     "target": "tgt2", "sync": "full"}),
                ("blockdev-insert-node", {"node": "disk0", "filter": "t"}),
                ("fleece-start", {"node": "tgt"}),
                ("fleece-start", {"node": "disk0"}),
                ("blockdev-backup", {"job-id": "b", "device": "disk0",
                                     "target": "tgt2", "sync": "full"}),
        ]:
            with pytest.raises(QMPError, match="job 'm'"):
                q.cmd_args(cmd, args)
        q.cmd("block-job-cancel", device="m")
        q.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
        j = job(q, "m")
        assert j is None or j.get("error") == "cancelled"
        q.cmd("blockdev-del", node_name="t")
        # A complete whose last copy cannot reach the target.
        q.cmd_args("blockdev-add", {
            "driver": "nbd", "node-name": "away", "reconnect-delay": 0,
            "server": {"type": "unix", "path": remote.sock},
            "export": "disk0"})
        q.cmd("blockdev-mirror", job_id="m3", device="disk0",
              target="away", sync="full")
        q.wait_event("BLOCK_JOB_READY", timeout=60)
        remote.stop()
        h = srv.connect("live")
        h.pwrite(b"z" * MiB, 0)                 # dirty again
        # Either the complete's last copy fails, or a copier has met the
        # missing target first and failed the job: the same end.
        with pytest.raises(QMPError,
                           match="last copy|does not exist|not ready"):
            q.cmd("block-job-complete", device="m3")
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
        assert ev["data"]["device"] == "m3" and ev["data"]["error"]
        assert {e["id"]: e for e in q.cmd("query-block-exports")}[
            "live"]["node-name"] == "disk0"
        for n in q.cmd("query-named-block-nodes"):
            assert not n.get("dirty-bitmaps")
        h.pwrite(b"w" * MiB, MiB)
        assert h.pread(MiB, 0) == b"z" * MiB
        h.shutdown()


def test_speed_is_kept(nbdd_server, tmp_path):
    """A 2 MiB/s mirror of 1 MiB copies moves about 2 MiB a second."""
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        live_disk(q, tmp_path)
        raw_target(q, tmp_path)
        q.cmd("blockdev-mirror", job_id="m", device="disk0", target="tgt",
              sync="full", speed=2 * MiB)
        t0 = time.monotonic()
        time.sleep(2)
        done = job(q, "m")["offset"]
        rate = done / (time.monotonic() - t0)
        assert 1 * MiB <= rate <= 4 * MiB, rate
        q.cmd("block-job-cancel", device="m")
        q.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
