"""What a block job does when its copy fails: QEMU's on-source-error,
on-target-error (blockdev-mirror) and on-error (block-stream,
block-commit), with BLOCK_JOB_ERROR events and the io-status of
query-block-jobs.

The failing side is a real NBD server, nbdkit, behind an 'nbd' node:
its error filter fails every request while a file exists, so a test
makes a target full (ENOSPC) or a backing file unreadable (EIO) at will
and then makes it good again."""
import os
import subprocess
import time

import pytest

from admintools import MiB, restart, start
from conftest import make_image
from qmp import QMP, QMPError
from test_jobs import Writer, job, live_disk, seed
from test_nbdctl import ctl
from test_nbdctl_job import jobs

SIZE = 64 * MiB


class Kit:
    """nbdkit on a unix socket with the error filter: @plugin_args
    (memory by default), failing with @error while self.fail exists."""

    def __init__(self, d, error, plugin_args=None, ops="error-rate=100%"):
        self.sock = str(d / "kit.sock")
        self.fail = d / "kit.fail"
        self.p = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-U", self.sock,
             "--filter=error"] +
            (plugin_args or ["memory", f"size={SIZE}"]) +
            [f"error={error}", ops, f"error-file={self.fail}"])
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            assert self.p.poll() is None, "nbdkit exited"
            assert time.monotonic() < deadline, "nbdkit did not listen"
            time.sleep(0.02)

    def failing(self, on):
        if on:
            self.fail.touch()
        else:
            self.fail.unlink()

    def stop(self):
        self.p.kill()               # it would wait for nbdd's connections
        self.p.wait(10)


@pytest.fixture
def kit(tmp_path):
    kits = []

    def make(*args, **kw):
        k = Kit(tmp_path, *args, **kw)
        kits.append(k)
        return k

    yield make
    for k in kits:
        k.stop()


def add_remote(q, name, sock, **opts):
    spec = {"driver": "nbd", "node-name": name,
            "server": {"type": "unix", "path": sock}}
    spec.update(opts)
    q.cmd_args("blockdev-add", spec)


def read_all(srv, name):
    h = srv.connect(name)
    data = b"".join(h.pread(16 * MiB, off) for off in range(0, SIZE, 16 * MiB))
    h.shutdown()
    return data


def live_disk_and_target(srv, q, tmp_path, k):
    """The live disk, seeded (its model returned), and @k's export as
    node 'tgt'."""
    live_disk(q, tmp_path, SIZE)
    model = bytearray(SIZE)
    seed(srv, SIZE, model)
    add_remote(q, "tgt", k.sock)
    return model


def overlay_on_remote(q, tmp_path, k):
    """A qcow2 node 'top', empty, whose backing node 'rem' is @k's
    export."""
    ov = str(tmp_path / "top.qcow2")
    add_remote(q, "rem", k.sock, **{"read-only": True})
    q.cmd("blockdev-create", job_id="c", options={
        "driver": "qcow2", "size": SIZE,
        "file": {"driver": "file", "filename": ov}})
    q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                "backing": "rem",
                                "file": {"driver": "file", "filename": ov}})


def wait_status(q, jid, status, timeout=30):
    deadline = time.monotonic() + timeout
    while (j := job(q, jid))["status"] != status:
        assert time.monotonic() < deadline, j
        time.sleep(0.05)
    return j


def resume_until_ready(q, jid, timeout=60):
    """block-job-resume while paused, and again if a copy that was under way when the
    target came back still failed and stopped the job once more (as in
    QEMU, an error after the resume stops it again), until it is
    ready."""
    deadline = time.monotonic() + timeout
    while (j := job(q, jid))["status"] != "ready":
        assert time.monotonic() < deadline, j
        if j["status"] == "paused":
            q.cmd("block-job-resume", device=jid)
        time.sleep(0.05)


def error_events(q, jid):
    """The BLOCK_JOB_ERROR events of @jid received so far."""
    q.cmd("query-version")          # everything before it has arrived
    evs = [e for e in q.events if e["event"] == "BLOCK_JOB_ERROR" and
           e["data"]["device"] == jid]
    for e in evs:
        q.events.remove(e)
    return [e["data"] for e in evs]


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_mirror_pauses_on_a_full_target_and_resumes(nbdd_server, tmp_path,
                                                    kit, copy_mode):
    """on-target-error=stop: the target fills up during the copy, the
    job pauses with io-status nospace while the guest goes on writing
    (never failed), and once there is room, block-job-resume copies what
    is left; after completion the target holds every write."""
    k = kit("ENOSPC")
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        model = live_disk_and_target(srv, q, tmp_path, k)
        k.failing(True)
        w = Writer(srv.uri("live"), SIZE, model)
        w.start()
        ctl(srv.admin, "mirror", "disk0", "tgt", "--sync", "full", "--id",
            "m", "--copy-mode", copy_mode, "--on-target-error", "stop")
        ev = q.wait_event("BLOCK_JOB_ERROR")
        assert ev["data"] == {"device": "m", "operation": "write",
                              "action": "stop"}
        j = wait_status(q, "m", "paused")
        assert j["io-status"] == "nospace"
        assert not j["ready"]
        time.sleep(0.2)                 # copies under way have ended
        error_events(q, "m")
        time.sleep(0.5)                 # stays paused; the guest writes
        assert job(q, "m")["status"] == "paused"
        assert error_events(q, "m") == []       # nothing tried meanwhile
        assert w.error is None and w.is_alive()
        row = jobs(ctl(srv.admin, "job", "list").stdout)[0]
        assert (row["STATUS"], row["ERROR"]) == \
            ("paused", "stopped: io-status nospace")
        r = ctl(srv.admin, "job", "wait", "m", expect=1)
        assert "stopped on an I/O error (io-status nospace)" in r.stderr

        k.failing(False)
        q.cmd("block-job-resume", device="m")
        assert job(q, "m")["io-status"] == "ok"
        resume_until_ready(q, "m")
        w.stop()
        assert w.writes > 0
        q.cmd("block-job-complete", device="m")
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert "error" not in ev["data"], ev
        assert all(e["action"] == "stop" and e["operation"] == "write"
                   for e in error_events(q, "m"))
    # The export now reads the target: all that the guest wrote is there.
    assert read_all(srv, "live") == model


@pytest.mark.parametrize("error,on_error,action", [
    ("ENOSPC", None, "report"),
    ("EIO", "enospc", "report"),
    ("ENOSPC", "ignore", "ignore"),
    ("ENOSPC", "enospc", "stop"),
])
def test_mirror_error_actions(nbdd_server, tmp_path, kit, error, on_error,
                              action):
    """Each action as QEMU has it: report fails the job with the
    target's error, ignore copies the range again later without
    pausing, enospc stops on a full target and reports anything else."""
    k = kit(error)
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        model = live_disk_and_target(srv, q, tmp_path, k)
        k.failing(True)
        args = {"job-id": "m", "device": "disk0", "target": "tgt",
                "sync": "full"}
        if on_error:
            args["on-target-error"] = on_error
        q.cmd_args("blockdev-mirror", args)
        ev = q.wait_event("BLOCK_JOB_ERROR")
        assert ev["data"] == {"device": "m", "operation": "write",
                              "action": action}
        if action == "report":
            ev = q.wait_event("BLOCK_JOB_COMPLETED")
            want = ("No space left on device" if error == "ENOSPC"
                    else "Input/output error")
            assert want in ev["data"]["error"], ev
            return
        if action == "ignore":
            error_events(q, "m")
            time.sleep(1)
            j = job(q, "m")
            assert (j["status"], j["io-status"], j["ready"]) == \
                ("running", "ok", False)
            # Again and again, but a copier tries every 100 ms, not in
            # a loop: at most 4 copiers x 10 a second.
            assert 1 <= len(error_events(q, "m")) <= 50
            k.failing(False)
        else:
            j = wait_status(q, "m", "paused")
            assert j["io-status"] == "nospace"
            k.failing(False)
            resume_until_ready(q, "m")
        wait_status(q, "m", "ready", timeout=60)
        q.cmd("block-job-complete", device="m")
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert "error" not in ev["data"], ev
    assert read_all(srv, "live") == model


def test_errors_once_ready(nbdd_server, tmp_path, kit):
    """The target fills up after the mirror is ready.  In write-blocking
    mode a guest write sent on to the target fails there: the job pauses
    (on-target-error=stop) and the guest's write succeeds; writes while
    it is paused are only marked.  Once there is room, it is resumed and
    completes with every write on the target."""
    k = kit("ENOSPC")
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        model = live_disk_and_target(srv, q, tmp_path, k)
        q.cmd_args("blockdev-mirror", {
            "job-id": "m", "device": "disk0", "target": "tgt",
            "sync": "full", "copy-mode": "write-blocking",
            "on-target-error": "stop"})
        q.wait_event("BLOCK_JOB_READY", timeout=60)
        k.failing(True)
        w = Writer(srv.uri("live"), SIZE, model)
        w.start()
        ev = q.wait_event("BLOCK_JOB_ERROR")
        assert ev["data"] == {"device": "m", "operation": "write",
                              "action": "stop"}
        j = wait_status(q, "m", "paused")
        assert (j["io-status"], j["ready"]) == ("nospace", True)
        writes = w.writes
        time.sleep(0.3)
        assert w.writes > writes and w.error is None    # never failed
        w.stop()

        k.failing(False)
        resume_until_ready(q, "m")
        q.cmd("block-job-complete", device="m")
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert "error" not in ev["data"], ev
    assert read_all(srv, "live") == model


def test_complete_on_a_full_target_is_refused(nbdd_server, tmp_path, kit):
    """on-target-error=ignore: a ready mirror whose target fills up stays
    ready, and block-job-complete, whose last copy fails, is refused
    with the job going on, not failed; once there is room it completes
    with every write on the target."""
    k = kit("ENOSPC")
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        model = live_disk_and_target(srv, q, tmp_path, k)
        q.cmd_args("blockdev-mirror", {
            "job-id": "m", "device": "disk0", "target": "tgt",
            "sync": "full", "on-target-error": "ignore"})
        q.wait_event("BLOCK_JOB_READY", timeout=60)
        k.failing(True)
        h = srv.connect("live")
        h.pwrite(b"x" * 4096, 5 * MiB)
        model[5 * MiB:5 * MiB + 4096] = b"x" * 4096
        h.shutdown()
        with pytest.raises(QMPError, match="the last copy to 'tgt': No "
                           "space left on device: the job goes on"):
            q.cmd("block-job-complete", device="m")
        j = job(q, "m")
        assert (j["status"], j["io-status"]) == ("ready", "ok")
        assert error_events(q, "m")[0] == {
            "device": "m", "operation": "write", "action": "ignore"}
        k.failing(False)
        deadline = time.monotonic() + 30
        while True:                     # until the copiers caught up
            try:
                q.cmd("block-job-complete", device="m")
                break
            except QMPError as e:
                assert "goes on" in str(e), e
                assert time.monotonic() < deadline
                time.sleep(0.2)
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert "error" not in ev["data"], ev
    assert read_all(srv, "live") == model


@pytest.mark.parametrize("how", ["complete", "cancel"])
def test_a_last_copy_that_fails_ends_the_job_for_good(nbdd_server, tmp_path,
                                                     kit, how):
    """on-target-error=report: a ready mirror whose last copy fails, at
    block-job-complete or at a cancel that brings the target in sync,
    fails (the complete says so; the cancel, as in QEMU, leaves it to
    the event), nothing moves, and the job does not come back with the
    next start of the daemon."""
    k = kit("ENOSPC")
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        live_disk_and_target(srv, q, tmp_path, k)
        q.cmd("blockdev-mirror", job_id="m", device="disk0", target="tgt",
              sync="full")
        q.wait_event("BLOCK_JOB_READY", timeout=60)
        k.failing(True)
        h = srv.connect("live")
        h.pwrite(b"x" * 4096, 5 * MiB)
        h.shutdown()
        if how == "complete":
            with pytest.raises(QMPError, match="the last copy to 'tgt': No "
                               "space left on device$"):
                q.cmd("block-job-complete", device="m")
        else:
            q.cmd("block-job-cancel", device="m")
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
        assert "No space left on device" in ev["data"]["error"], ev
        assert job(q, "m") is None
        assert {e["id"]: e for e in q.cmd("query-block-exports")}[
            "live"]["node-name"] == "disk0"
    k.failing(False)
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert q.cmd("query-block-jobs") == []


def test_stream_ignore_skips_and_fails_at_the_end(nbdd_server, tmp_path,
                                                  kit):
    """block-stream on-error=ignore, as QEMU: the unreadable ranges are
    skipped, the rest is copied, and the job fails at the end with the
    error, keeping the backing file it still needs."""
    base = make_image(tmp_path / "base.img", SIZE,
                      [(0, os.urandom(MiB)), (40 * MiB, b"b" * MiB)])
    k = kit("EIO", ["file", base], "error-pread-rate=100%")
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        overlay_on_remote(q, tmp_path, k)
        k.failing(True)
        q.cmd_args("block-stream", {"device": "top", "job-id": "s",
                                    "on-error": "ignore"})
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert "Input/output error" in ev["data"]["error"], ev
        assert all(e == {"device": "s", "operation": "read",
                         "action": "ignore"} for e in error_events(q, "s"))
        top = [n for n in q.cmd("query-named-block-nodes")
               if n["node-name"] == "top"][0]
        assert [c["node-name"] for c in top["children"]
                if c["child"] == "backing"] == ["rem"]


def test_stream_pauses_on_an_unreadable_backing_file(nbdd_server,
                                                      tmp_path, kit):
    """block-stream on-error=stop: the backing file (on another server)
    fails its reads, the stream pauses with io-status failed and a
    'read' error, and after a resume it ends as usual: the overlay holds
    the backing data and has no backing file left."""
    base = make_image(tmp_path / "base.img", SIZE,
                      [(0, os.urandom(3 * MiB)), (40 * MiB, b"b" * MiB)])
    k = kit("EIO", ["file", base], "error-pread-rate=100%")
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        overlay_on_remote(q, tmp_path, k)
        with pytest.raises(QMPError, match="'on-error' must be"):
            q.cmd_args("block-stream", {"device": "top", "on-error": "x"})
        k.failing(True)
        q.cmd_args("block-stream", {"device": "top", "job-id": "s",
                                    "on-error": "stop"})
        ev = q.wait_event("BLOCK_JOB_ERROR")
        assert ev["data"] == {"device": "s", "operation": "read",
                              "action": "stop"}
        j = wait_status(q, "s", "paused")
        assert j["io-status"] == "failed"
        k.failing(False)
        q.cmd("block-job-resume", device="s")
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert "error" not in ev["data"], ev
        top = [n for n in q.cmd("query-named-block-nodes")
               if n["node-name"] == "top"][0]
        assert [c for c in top["children"] if c["child"] == "backing"] \
            == [], top
        q.cmd("block-export-add", type="nbd", id="e", node_name="top",
              name="top")
    with open(base, "rb") as f:
        assert read_all(srv, "top") == f.read()


def test_backup_and_bad_values_are_refused(nbdd_server, tmp_path, kit):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        live_disk(q, tmp_path, SIZE)
        q.cmd_args("blockdev-add", {
            "driver": "raw", "node-name": "t2", "file": {
                "driver": "file",
                "filename": make_image(tmp_path / "t2.img", SIZE)}})
        with pytest.raises(QMPError, match="'on-target-error' must be "
                           "'report', 'ignore'"):
            q.cmd_args("blockdev-mirror", {
                "job-id": "m", "device": "disk0", "target": "t2",
                "sync": "full", "on-target-error": "retry"})
        with pytest.raises(QMPError, match="must be 'report': a copy that "
                           "fails breaks"):
            q.cmd_args("blockdev-backup", {
                "job-id": "b", "device": "disk0", "target": "t2",
                "sync": "full", "on-source-error": "stop"})
        assert q.cmd("query-block-jobs") == []
    r = ctl(srv.admin, "mirror", "disk0", "t2", "--sync", "full",
            "--on-source-error", "sometimes", expect=2)
    assert "expected report, ignore, stop or enospc" in r.stderr
