"""Block jobs: blockdev-mirror to a local node and to another nbdd over
TLS, with a writer running the whole time; pause, resume, speed,
cancel, complete, dismiss; and the operations a running job refuses."""
import random
import threading
import time

import nbd
import pytest

from admintools import MiB, qcow2_graph, start
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
        with pytest.raises(QMPError, match="exists"):
            q.cmd("blockdev-mirror", job_id="m0", device="disk0",
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
