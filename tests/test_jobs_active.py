"""blockdev-mirror copy-mode write-blocking (QEMU's active mirroring): a
guest write to the source also goes to the target before it is
acknowledged, where the target holds the source already, so the mirror
catches up while the guest writes; a target that fails under a guest
write fails the job, never the guest's write."""
import random
import threading
import time

import nbd
import pytest

from admintools import MiB, qcow2_graph, start
from conftest import Server, blockdev_args, export_args, make_image
from helpers import run
from qmp import QMP, QMPError

SIZE = 32 * MiB


class Writer(threading.Thread):
    """Random writes as fast as they are answered, through an export,
    into [lo, hi) of the disk.  With @model (a bytearray of the disk)
    every acknowledged write lands in it; without, the writer shares its
    range with others and what it leaves there is undefined (only the
    source and the target must agree on it)."""

    def __init__(self, uri, lo, hi, model=None, seed=1):
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.lo, self.hi = lo, hi
        self.model = model
        self.rnd = random.Random(seed)
        self.halt = threading.Event()
        self.writes = 0
        self.error = None

    def run(self):
        try:
            while not self.halt.is_set():
                n = self.rnd.choice([512, 4096, 4096, 65536, 131072])
                off = self.rnd.randrange(self.lo, self.hi - n)
                if self.rnd.random() < 0.1:
                    self.h.zero(n, off)
                    data = bytes(n)
                else:
                    data = self.rnd.randbytes(n)
                    self.h.pwrite(data, off)
                if self.model is not None:
                    self.model[off:off + n] = data
                self.writes += 1
            self.h.flush()
        except Exception as e:              # noqa: BLE001
            self.error = e

    def stop(self):
        self.halt.set()
        self.join(60)
        assert not self.is_alive()
        assert self.error is None, self.error
        self.h.shutdown()


def live_disk(q, tmp_path):
    img = qcow2_graph(q, tmp_path, size=SIZE)
    q.cmd("block-export-add", type="nbd", id="live", node_name="disk0",
          name="live", writable=True)
    return img


def seed(srv, model):
    h = srv.connect("live")
    rnd = random.Random(0)
    for off in range(0, SIZE, 2 * MiB):
        data = rnd.randbytes(MiB)
        h.pwrite(data, off)
        model[off:off + MiB] = data
    h.flush()
    h.shutdown()


def read_all(h):
    got = bytearray()
    for off in range(0, SIZE, 4 * MiB):
        got += h.pread(4 * MiB, off)
    return bytes(got)


def job(q, jid):
    for j in q.cmd("query-block-jobs"):
        if j["device"] == jid:
            return j
    return None


def caught_up(j):
    return j["offset"] == j["len"]


def wait_for(what, cond, timeout=60):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def remote_target(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    img = make_image(other / "disk.img", SIZE)
    return Server(other, blockdev_args(img) + export_args()), img


def add_away(q, remote, reconnect_delay=10):
    q.cmd_args("blockdev-add", {
        "driver": "nbd", "node-name": "away",
        "reconnect-delay": reconnect_delay,
        "server": {"type": "unix", "path": remote.sock},
        "export": "disk0"})


def test_write_blocking_mirror_catches_up_while_the_guest_writes(
        nbdd_server, tmp_path):
    """Writers never stop: the mirror to another nbdd still becomes
    ready, and from then on the target holds every acknowledged write
    even with the job paused (no copier running).  Two of the writers
    share a range, so their writes meet each other's and the copies."""
    remote, remote_img = remote_target(tmp_path)
    srv = start(nbdd_server, tmp_path)
    model = bytearray(SIZE)
    try:
        with QMP(srv.admin) as q:
            live_disk(q, tmp_path)
            seed(srv, model)
            add_away(q, remote)
            # Three writers with a range each, two sharing the last.
            part = SIZE // 4
            writers = [Writer(srv.uri("live"), i * part, (i + 1) * part,
                              model, seed=i + 1) for i in range(3)]
            hot = [Writer(srv.uri("live"), 3 * part, SIZE, seed=10 + i)
                   for i in range(2)]
            for w in writers + hot:
                w.start()
            wait_for("the writers", lambda: all(w.writes > 20
                                                for w in writers + hot))
            q.cmd("blockdev-mirror", job_id="m", device="disk0",
                  target="away", sync="full", copy_mode="write-blocking")
            ev = q.wait_event("BLOCK_JOB_READY", timeout=120)
            assert ev["data"]["device"] == "m"
            # Ready while every writer was still writing, and they go on.
            counts = [w.writes for w in writers + hot]
            assert all(w.is_alive() and w.error is None
                       for w in writers + hot)
            wait_for("more writes after ready",
                     lambda: all(w.writes > c + 20 for w, c in
                                 zip(writers + hot, counts)))
            assert job(q, "m")["status"] == "ready"
            # The shared range's writes that met each other were left to
            # the copiers: once they are copied, pause the job.
            for w in hot:
                w.stop()
            wait_for("the copiers", lambda: caught_up(job(q, "m")))
            q.cmd("block-job-pause", device="m")
            counts = [w.writes for w in writers]
            wait_for("writes while paused",
                     lambda: all(w.writes > c + 50
                                 for w, c in zip(writers, counts)))
            for w in writers:
                w.stop()
            # No copier ran in their ranges since the copy list was
            # empty: the writes went to the target themselves.
            with open(remote_img, "rb") as f:
                assert f.read(3 * part) == bytes(model[:3 * part])
            # And the shared range is the source's (a copy of it may
            # have been under way at the pause).
            h = srv.connect("live")
            source = read_all(h)
            h.shutdown()
            assert source[:3 * part] == bytes(model[:3 * part])

            def same():
                with open(remote_img, "rb") as f:
                    return f.read() == source
            wait_for("the target to be the source", same, timeout=10)
            q.cmd("block-job-resume", device="m")
            q.cmd("block-job-complete", device="m")
            ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
            assert "error" not in ev["data"]
            assert ev["data"]["offset"] >= SIZE
            assert {e["id"]: e for e in q.cmd("query-block-exports")}[
                "live"]["node-name"] == "away"
            q.cmd("block-export-add", type="nbd", id="src",
                  node_name="disk0", name="src")
            run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                 srv.uri("src"), remote_img])
            # qemu-img has exited, but nbdd may not have seen its
            # connection close yet (a safe delete refuses until then).
            wait_for("qemu-img's connection to close", lambda: {
                e["id"]: e for e in q.cmd("query-block-exports")}[
                    "src"]["connections"] == 0)
            q.cmd("block-export-del", id="src")
    finally:
        srv.stop()
        remote.stop()
    with open(remote_img, "rb") as f:
        assert f.read()[:3 * part] == bytes(model[:3 * part])


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_a_write_reaches_the_target_before_it_is_answered(
        nbdd_server, tmp_path, mode):
    """With the job paused after ready: in write-blocking mode a write
    and a write-zeroes are on the target when they are acknowledged;
    in background mode they wait for the copiers.  A discard is left to
    the copiers in both.  Either way the completed target is the
    source."""
    srv = start(nbdd_server, tmp_path)
    model = bytearray(SIZE)
    with QMP(srv.admin) as q:
        live_disk(q, tmp_path)
        seed(srv, model)
        tgt = make_image(tmp_path / "tgt.img", SIZE)
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                    "file": {"driver": "file",
                                             "filename": tgt}})
        q.cmd("blockdev-mirror", job_id="m", device="disk0", target="tgt",
              sync="full", copy_mode=mode, auto_dismiss=False)
        q.wait_event("BLOCK_JOB_READY", timeout=60)
        q.cmd("block-job-pause", device="m")
        time.sleep(0.1)     # a copier past its pause point finds it
        h = srv.connect("live")
        before = job(q, "m")["offset"]
        h.pwrite(b"A" * 8192, 5 * MiB + 4096)          # inside a granule
        h.pwrite(b"B" * (3 * 65536), 9 * MiB)          # whole granules
        h.zero(65536, 0)                               # was seed data
        h.trim(2 * MiB, 16 * MiB)
        with open(tgt, "rb") as f:
            t = f.read()
        active = mode == "write-blocking"
        assert (t[5 * MiB + 4096:5 * MiB + 12288] == b"A" * 8192) == active
        assert (t[9 * MiB:9 * MiB + 3 * 65536] == b"B" * 3 * 65536) == active
        assert (t[:65536] == bytes(65536)) == active
        assert t[16 * MiB:18 * MiB] == bytes(model[16 * MiB:18 * MiB])
        j = job(q, "m")
        if active:
            assert j["offset"] == before + 8192 + 3 * 65536 + 65536
        q.cmd("block-job-resume", device="m")
        wait_for("ready again", lambda: job(q, "m")["status"] == "ready")
        q.cmd("block-job-complete", device="m")
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
        assert "error" not in ev["data"]
        source = read_all(h)
        h.shutdown()
        q.cmd("job-dismiss", id="m")
    with open(tgt, "rb") as f:
        assert f.read() == source
    assert source[5 * MiB + 4096:5 * MiB + 12288] == b"A" * 8192


def test_write_blocking_target_failure_fails_the_job_not_the_guest(
        nbdd_server, tmp_path):
    """The other appliance goes away after ready: the next guest writes
    still succeed (the source has them), the first that cannot reach
    the target fails the job, which leaves the source as it was."""
    remote, remote_img = remote_target(tmp_path)
    srv = start(nbdd_server, tmp_path)
    model = bytearray(SIZE)
    try:
        with QMP(srv.admin) as q:
            live_disk(q, tmp_path)
            seed(srv, model)
            add_away(q, remote, reconnect_delay=0)
            q.cmd("blockdev-mirror", job_id="m", device="disk0",
                  target="away", sync="full", copy_mode="write-blocking")
            q.wait_event("BLOCK_JOB_READY", timeout=60)
            h = srv.connect("live")
            h.pwrite(b"r" * 65536, MiB)         # reaches the target
            with open(remote_img, "rb") as f:
                f.seek(MiB)
                assert f.read(65536) == b"r" * 65536
            model[MiB:MiB + 65536] = b"r" * 65536
            remote.stop()
            rnd = random.Random(5)
            for i in range(20):
                off = rnd.randrange(0, SIZE - 65536)
                data = bytes([i + 1]) * 65536
                h.pwrite(data, off)             # never fails
                model[off:off + 65536] = data
            h.zero(65536, 2 * MiB)
            model[2 * MiB:2 * MiB + 65536] = bytes(65536)
            ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
            assert ev["data"]["device"] == "m"
            assert "Input/output error" in ev["data"]["error"]
            wait_for("the job to go", lambda: job(q, "m") is None)
            assert {e["id"]: e for e in q.cmd("query-block-exports")}[
                "live"]["node-name"] == "disk0"
            for n in q.cmd("query-named-block-nodes"):
                assert not n.get("dirty-bitmaps")
            h.pwrite(b"w" * 4096, 3 * MiB)
            model[3 * MiB:3 * MiB + 4096] = b"w" * 4096
            assert read_all(h) == bytes(model)
            h.shutdown()
            # Nothing stops a new mirror to another target.
            tgt = make_image(tmp_path / "tgt.img", SIZE)
            q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                        "file": {"driver": "file",
                                                 "filename": tgt}})
            q.cmd("blockdev-mirror", job_id="m2", device="disk0",
                  target="tgt", sync="full", copy_mode="write-blocking")
            q.wait_event("BLOCK_JOB_READY", timeout=60)
            q.cmd("block-job-complete", device="m2")
            ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
            assert "error" not in ev["data"]
        out = srv.output()
        assert "mirror 'm': a guest write to 'disk0'" in out
        assert "could not be written to target 'away'" in out
    finally:
        srv.stop()
        remote.stop()
    with open(tgt, "rb") as f:
        assert f.read() == bytes(model)


def test_bad_copy_mode(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        live_disk(q, tmp_path)
        make_image(tmp_path / "tgt.img", SIZE)
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                    "file": {"driver": "file",
                                             "filename":
                                             str(tmp_path / "tgt.img")}})
        base = {"job-id": "m", "device": "disk0", "target": "tgt",
                "sync": "full"}
        with pytest.raises(QMPError, match="copy-mode must be 'background' "
                           "or 'write-blocking', not 'active'"):
            q.cmd_args("blockdev-mirror", dict(base, **{"copy-mode":
                                                        "active"}))
        with pytest.raises(QMPError, match="'copy-mode' must be a string"):
            q.cmd_args("blockdev-mirror", dict(base, **{"copy-mode": 1}))
        # block-commit has no copy mode (as in QEMU).
        with pytest.raises(QMPError, match="copy-mode"):
            q.cmd_args("block-commit", {"device": "disk0",
                                        "copy-mode": "write-blocking"})
        assert q.cmd("query-block-jobs") == []


def paused_write_reaches(q, h, tgt, off):
    """Pause the ready job m, write at @off: whether the target has it
    at once.  The job resumes."""
    q.cmd("block-job-pause", device="m")
    time.sleep(0.1)     # a copier past its pause point finds it
    data = random.Random(off).randbytes(4096)
    h.pwrite(data, off)
    with open(tgt, "rb") as f:
        f.seek(off)
        got = f.read(4096) == data
    q.cmd("block-job-resume", device="m")
    return got


def test_block_job_change(tmp_path):
    """block-job-change switches a running mirror's copy-mode either
    way, and a restart picks the job up in the mode it last had."""
    state = tmp_path / "state"

    def daemon():
        s = Server(tmp_path, ["--state-dir", str(state)])
        s.admin = str(state / "admin.sock")
        return s

    srv = daemon()
    try:
        with QMP(srv.admin) as q:
            live_disk(q, tmp_path)
            tgt = make_image(tmp_path / "tgt.img", SIZE)
            q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                        "file": {"driver": "file",
                                                 "filename": tgt}})
            q.cmd("blockdev-mirror", job_id="m", device="disk0",
                  target="tgt", sync="full")
            q.wait_event("BLOCK_JOB_READY", timeout=60)
            h = srv.connect("live")
            assert not paused_write_reaches(q, h, tgt, 0)
            for bad, match in [
                    ({"id": "m", "type": "commit",
                      "copy-mode": "write-blocking"},
                     "type must be 'mirror', not 'commit'"),
                    ({"id": "m", "type": "mirror", "copy-mode": "fast"},
                     "copy-mode must be 'background' or 'write-blocking'"),
                    ({"id": "m", "type": "mirror"},
                     "'copy-mode' is missing"),
                    ({"id": "m", "type": "mirror", "copy-mode":
                      "write-blocking", "speed": 1}, "speed")]:
                with pytest.raises(QMPError, match=match):
                    q.cmd_args("block-job-change", bad)
            with pytest.raises(QMPError) as e:
                q.cmd("block-job-change", id="nope", type="mirror",
                      copy_mode="write-blocking")
            assert e.value.cls == "DeviceNotFound"
            assert not paused_write_reaches(q, h, tgt, 4096)
            q.cmd("block-job-change", id="m", type="mirror",
                  copy_mode="write-blocking")
            q.cmd("block-job-change", id="m", type="mirror",
                  copy_mode="write-blocking")       # no change
            wait_for("ready", lambda: caught_up(job(q, "m")))
            assert paused_write_reaches(q, h, tgt, 8192)
            q.cmd("block-job-change", id="m", type="mirror",
                  copy_mode="background")
            assert not paused_write_reaches(q, h, tgt, 12288)
            q.cmd("block-job-change", id="m", type="mirror",
                  copy_mode="write-blocking")
            h.shutdown()
    finally:
        srv.stop()
    srv = daemon()
    try:
        with QMP(srv.admin) as q:
            # Started again before we could listen for its events.
            wait_for("ready", lambda: job(q, "m")["status"] == "ready")
            h = srv.connect("live")
            assert paused_write_reaches(q, h, tgt, 16384)
            q.cmd("block-job-complete", device="m")
            ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
            assert "error" not in ev["data"]
            source = read_all(h)
            h.shutdown()
    finally:
        srv.stop()
    with open(tgt, "rb") as f:
        assert f.read() == source
