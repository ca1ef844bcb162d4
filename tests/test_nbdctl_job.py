"""nbdctl mirror and nbdctl job list, wait, pause, resume, speed,
complete, cancel and dismiss.

Like test_nbdctl.py, these start the real daemon with a state dir and
drive it with nbdctl; the disk is written and read through a live
writable export with libnbd while the mirror runs, and the target's
image file is compared with what was written."""
import json
import os
import pty
import random
import re
import sqlite3
import subprocess
import time

import pytest

from conftest import NBDCTL, Server, blockdev_args, export_args, make_image
from helpers import run
from test_nbdctl import MiB, admin, ctl, raw_spec  # noqa: F401

KiB = 1 << 10
HEADERS = ["ID", "TYPE", "STATUS", "PROGRESS", "SPEED", "READY", "ERROR"]
BAR = re.compile(r"\[(#*)(\.*)\] +(\d+)%")


def jobs(text):
    """The rows of 'nbdctl job list'.  PROGRESS ("[###.......]  30%")
    holds blanks, and so may ERROR, the last column: the columns are
    cut where the header puts them."""
    lines = text.splitlines()
    assert lines[0].split() == HEADERS, lines[0]
    starts = [lines[0].index(h) for h in HEADERS]
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in
                 zip(starts, starts[1:] + [len(line)])]
        rows.append(dict(zip(HEADERS, cells)))
    return rows


def job_json(srv, jid):
    v = json.loads(ctl(srv.admin, "--json", "job", "list").stdout)
    found = [j for j in v if j["id"] == jid]
    return found[0] if found else None


def until(cond, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def live_disk(srv, tmp_path, size=8 * MiB, node="d0", target="t0"):
    """A raw node @node filled with random data and exported writable as
    'live', a raw node @target of the same size; returns a libnbd
    handle on 'live', the target's image and the model of the disk."""
    rnd = random.Random(size)
    model = bytearray(rnd.randbytes(size))
    img = make_image(tmp_path / f"{node}.img", size, [(0, bytes(model))])
    tgt = make_image(tmp_path / f"{target}.img", size)
    ctl(srv.admin, "node", "add", raw_spec(img, node))
    ctl(srv.admin, "node", "add", raw_spec(tgt, target))
    ctl(srv.admin, "export", "add", node, "--writable", "--name", "live")
    return srv.connect("live"), tgt, model


def write(h, model, data, off):
    h.pwrite(data, off)
    model[off:off + len(data)] = data


def exports(srv):
    return {e["id"]: e for e in
            json.loads(ctl(srv.admin, "--json", "export", "list").stdout)}


def test_mirror_ready_complete(admin, tmp_path, nbdd_server):
    """A full mirror started with nbdctl, followed to ready, completed:
    the export moves to the target with its client connected, every
    write lands in the target, and the move is in the catalogue."""
    h, tgt, model = live_disk(admin, tmp_path)
    p = ctl(admin.admin, "mirror", "d0", "t0", "--sync", "full")
    assert p.stdout == "job mirror-d0: mirroring d0 to t0 (sync full)\n"
    write(h, model, b"w" * 70000, 3 * MiB + 5)      # while it copies

    p = ctl(admin.admin, "job", "wait", "mirror-d0", "--ready",
            "--progress")
    assert p.stdout == ""
    # Not a terminal: a line per status and per 10%, the last one ready.
    last = p.stderr.splitlines()[-1]
    assert last == "mirror-d0: [##########] 100%  ready  -", p.stderr

    rows = jobs(ctl(admin.admin, "job", "list").stdout)
    assert rows == [{"ID": "mirror-d0", "TYPE": "mirror", "STATUS": "ready",
                     "PROGRESS": "[##########] 100%", "SPEED": "-",
                     "READY": "yes", "ERROR": "-"}]
    j = job_json(admin, "mirror-d0")
    assert {k: j[k] for k in ("type", "device", "status", "ready", "speed",
                              "auto-dismiss")} == {
        "type": "mirror", "device": "mirror-d0", "status": "ready",
        "ready": True, "speed": 0, "auto-dismiss": True}
    assert j["offset"] == j["len"] >= 8 * MiB

    # Ready, it goes on copying new writes.
    write(h, model, b"r" * 4096, 0)
    write(h, model, b"R" * 131072, 8 * MiB - 131072)
    assert exports(admin)["live"]["node-name"] == "d0"
    assert ctl(admin.admin, "job", "complete", "mirror-d0").stdout == ""
    assert exports(admin)["live"]["node-name"] == "t0"
    # The same client, now on the target.
    write(h, model, b"after" * 1000, 6 * MiB)
    h.flush()
    assert h.pread(8 * MiB, 0) == model
    with open(tgt, "rb") as f:
        assert f.read() == model
    # Auto-dismissed once it concluded.
    until(lambda: job_json(admin, "mirror-d0") is None)
    assert jobs(ctl(admin.admin, "job", "list").stdout) == []
    # d0 is free again.
    ctl(admin.admin, "node", "remove", "d0")
    h.shutdown()

    # The move is recorded: after a restart the export is on t0.
    admin.stop()
    srv = nbdd_server(["--state-dir", os.path.dirname(admin.admin)],
                      tcp=False)
    srv.admin = admin.admin
    assert exports(srv)["live"]["node-name"] == "t0"
    h = srv.connect("live")
    assert h.pread(8 * MiB, 0) == model
    h.shutdown()


def test_mirror_write_blocking(admin, tmp_path):
    """--copy-mode write-blocking: once ready, a write is on the target
    when it is acknowledged, even with the job paused."""
    h, tgt, model = live_disk(admin, tmp_path)
    p = ctl(admin.admin, "mirror", "d0", "t0", "--sync", "full",
            "--copy-mode", "write-blocking")
    assert p.stdout == ("job mirror-d0: mirroring d0 to t0 (sync full, "
                        "copy-mode write-blocking)\n")
    ctl(admin.admin, "job", "wait", "mirror-d0", "--ready")
    ctl(admin.admin, "job", "pause", "mirror-d0")
    write(h, model, b"p" * 8192, 5 * MiB + 512)
    with open(tgt, "rb") as f:
        assert f.read() == model
    ctl(admin.admin, "job", "resume", "mirror-d0")
    ctl(admin.admin, "job", "complete", "mirror-d0")
    assert exports(admin)["live"]["node-name"] == "t0"
    h.shutdown()


def test_pause_resume_speed_cancel_dismiss(admin, tmp_path):
    h, tgt, model = live_disk(admin, tmp_path)
    p = ctl(admin.admin, "--json", "mirror", "d0", "t0", "--sync", "full",
            "--id", "slow", "--speed", "1M", "--no-auto-dismiss",
            "--granularity", "64K", "--buf-size", "256K")
    assert json.loads(p.stdout) == {"id": "slow"}
    r = jobs(ctl(admin.admin, "job", "list").stdout)[0]
    assert (r["ID"], r["STATUS"], r["SPEED"], r["READY"]) == \
        ("slow", "running", "1M/s", "no")
    m = BAR.fullmatch(r["PROGRESS"])
    assert m and len(m.group(1)) + len(m.group(2)) == 10
    assert len(m.group(1)) == int(m.group(3)) // 10 and int(m.group(3)) < 50

    assert ctl(admin.admin, "job", "pause", "slow").stdout == ""
    assert job_json(admin, "slow")["status"] == "paused"
    assert jobs(ctl(admin.admin, "job", "list").stdout)[0]["STATUS"] == \
        "paused"
    assert json.loads(ctl(admin.admin, "job", "resume", "slow",
                          "--json").stdout) == {}
    assert job_json(admin, "slow")["status"] == "running"

    ctl(admin.admin, "job", "speed", "slow", "2M")
    assert job_json(admin, "slow")["speed"] == 2 * MiB
    assert jobs(ctl(admin.admin, "job", "list").stdout)[0]["SPEED"] == \
        "2M/s"
    ctl(admin.admin, "job", "speed", "slow", "1536K")
    assert jobs(ctl(admin.admin, "job", "list").stdout)[0]["SPEED"] == \
        "1.5M/s"
    ctl(admin.admin, "job", "speed", "slow", "0")   # no limit
    assert jobs(ctl(admin.admin, "job", "list").stdout)[0]["SPEED"] == "-"
    ctl(admin.admin, "job", "speed", "slow", "512K")

    # A wait that sees the cancel says so and exits 1.  Its first
    # progress line means it is following the job.  (--force: the job
    # may be ready by now, and a ready mirror cancelled without it ends
    # completed, its target in sync.)
    w = subprocess.Popen([NBDCTL, "--socket", admin.admin, "job", "wait",
                          "slow", "--progress"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert w.stderr.readline().startswith("slow: [")
    assert ctl(admin.admin, "job", "cancel", "slow", "--force").stdout == ""
    out, err = w.communicate(timeout=30)
    assert w.returncode == 1, err
    assert out == ""
    assert err.splitlines()[-1] == "nbdctl: job 'slow' was cancelled"

    # Not dismissed: it stays, concluded, until job dismiss.
    r = jobs(ctl(admin.admin, "job", "list").stdout)[0]
    assert (r["ID"], r["STATUS"], r["READY"], r["ERROR"]) == \
        ("slow", "concluded", "no", "cancelled")
    assert ctl(admin.admin, "job", "dismiss", "slow").stdout == ""
    assert json.loads(ctl(admin.admin, "--json", "job", "list").stdout) == []
    p = ctl(admin.admin, "job", "dismiss", "slow", expect=1)
    assert p.stderr == "nbdctl: job 'slow' does not exist\n"

    # Nothing moved: the export is on d0, which is whole, and the
    # target is free.
    assert exports(admin)["live"]["node-name"] == "d0"
    assert h.pread(8 * MiB, 0) == model
    ctl(admin.admin, "node", "remove", "t0")
    h.shutdown()


def test_cancel_force_and_wait_done(admin, tmp_path):
    """--force reaches the daemon; a sync=none mirror is ready at once;
    job wait --done on a job that is concluded already."""
    h, tgt, model = live_disk(admin, tmp_path, size=2 * MiB)
    ctl(admin.admin, "mirror", "d0", "t0", "--sync", "none", "--id", "n",
        "--no-auto-dismiss")
    p = ctl(admin.admin, "--json", "job", "wait", "n", "--ready")
    v = json.loads(p.stdout)
    assert (v["id"], v["status"], v["ready"]) == ("n", "ready", True)
    # Only what is written from now on is copied.
    write(h, model, b"n" * 65536, 65536)
    ctl(admin.admin, "job", "cancel", "n", "--force")
    until(lambda: job_json(admin, "n")["status"] == "concluded")
    # Ended, but by a cancel: not done as asked.
    p = ctl(admin.admin, "--json", "job", "wait", "n", "--done", expect=1)
    assert json.loads(p.stdout)["status"] == "concluded"
    assert p.stderr == "nbdctl: job 'n' was cancelled\n"
    p = ctl(admin.admin, "job", "wait", "n", "--ready", expect=1)
    assert p.stderr == "nbdctl: job 'n' was cancelled\n"
    ctl(admin.admin, "job", "dismiss", "n")
    db = os.path.join(os.path.dirname(admin.admin), "catalog.db")
    c = sqlite3.connect(db)
    try:
        args = [json.loads(r[0]) for r in c.execute(
            "SELECT arguments FROM audit WHERE command = 'block-job-cancel'")]
    finally:
        c.close()
    assert args == [{"device": "n", "force": True}]
    h.shutdown()


def test_wait_progress_on_a_terminal(admin, tmp_path):
    """On a terminal, --progress redraws one line in place and ends it
    when the wait is over."""
    h, tgt, model = live_disk(admin, tmp_path, size=2 * MiB)
    ctl(admin.admin, "mirror", "d0", "t0", "--sync", "full", "--speed",
        "2M", "--buf-size", "128K")
    master, slave = pty.openpty()
    try:
        p = subprocess.run([NBDCTL, "--socket", admin.admin, "job", "wait",
                            "mirror-d0", "--ready", "--progress"],
                           stdout=subprocess.PIPE, stderr=slave, timeout=60)
        os.close(slave)
        slave = None
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:                 # EIO: the other end is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert p.returncode == 0 and p.stdout == b""
    text = out.decode()
    # The terminal turns "\n" into "\r\n".
    assert text.endswith("\r\n") and text.count("\n") == 1, text
    frames = text[:-2].split("\r")[1:]
    assert len(frames) >= 2, text                  # drawn more than once
    # Blanks cover the end of a longer line drawn before ("running").
    assert frames[-1].rstrip(" ") == \
        "mirror-d0: [##########] 100%  ready  2M/s", text
    assert len(frames[-1]) >= max(len(f.rstrip(" ")) for f in frames)
    assert all(f.startswith("mirror-d0: [") for f in frames), text
    ctl(admin.admin, "job", "cancel", "mirror-d0")
    h.shutdown()


def test_mirror_to_an_nbd_node_that_fails(admin, tmp_path):
    """The target is an nbd node (another nbdd): when it goes away for
    good the job fails, job wait says why and exits 1, and job list
    shows the error until the job is dismissed."""
    other = tmp_path / "other"
    other.mkdir()
    remote_img = make_image(other / "disk.img", 8 * MiB)
    remote = Server(other, blockdev_args(remote_img) + export_args(),
                    tcp=False)
    try:
        rnd = random.Random(1)
        img = make_image(tmp_path / "d0.img", 8 * MiB,
                         [(0, rnd.randbytes(8 * MiB))])
        ctl(admin.admin, "node", "add", raw_spec(img))
        ctl(admin.admin, "node", "add", json.dumps({
            "driver": "nbd", "node-name": "away",
            "server": {"type": "unix", "path": remote.sock},
            "export": "disk0", "reconnect-delay": 0}))
        # Slow, so that it is still copying when the remote goes.
        ctl(admin.admin, "mirror", "d0", "away", "--sync", "full", "--id",
            "mig", "--speed", "64K", "--buf-size", "64K",
            "--no-auto-dismiss")
        w = subprocess.Popen([NBDCTL, "--socket", admin.admin, "job",
                              "wait", "mig", "--done", "--progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        assert w.stderr.readline().startswith("mig: [")
        remote.stop()
        out, err = w.communicate(timeout=60)
        assert w.returncode == 1, err
        assert re.fullmatch(r"nbdctl: job 'mig' failed: .+",
                            err.splitlines()[-1]), err
        r = jobs(ctl(admin.admin, "job", "list").stdout)[0]
        assert (r["ID"], r["STATUS"]) == ("mig", "concluded")
        assert r["ERROR"] != "-"
        assert r["ERROR"] == job_json(admin, "mig")["error"]
        ctl(admin.admin, "job", "dismiss", "mig")
        ctl(admin.admin, "node", "remove", "away")
    finally:
        if remote.alive():
            remote.stop()


def test_job_refused(admin, tmp_path):
    """What the daemon refuses exits 1 with its reason on one line, and
    nothing on stdout; so does waiting for a job that does not exist."""
    h, tgt, model = live_disk(admin, tmp_path)
    small = make_image(tmp_path / "small.img", 4 * MiB)
    ctl(admin.admin, "node", "add", raw_spec(small, "small"))

    def refused(*args):
        p = ctl(admin.admin, *args, expect=1)
        assert p.stdout == ""
        assert p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith("nbdctl: ")
        return p.stderr

    assert "same size" in refused("mirror", "d0", "small", "--sync", "full")
    assert refused("mirror", "nope", "t0", "--sync", "full") == \
        "nbdctl: node 'nope' does not exist\n"
    assert "power of 2" in refused("mirror", "d0", "t0", "--sync", "full",
                                   "--granularity", "1000")
    assert "buf-size" in refused("mirror", "d0", "t0", "--sync", "full",
                                 "--buf-size", "1K", "--granularity", "64K")
    assert "another node" in refused("mirror", "d0", "d0", "--sync", "full")
    for sub in ("pause", "resume", "complete", "cancel", "dismiss"):
        assert refused("job", sub, "nope") == \
            "nbdctl: job 'nope' does not exist\n"
    assert refused("job", "speed", "nope", "1M") == \
        "nbdctl: job 'nope' does not exist\n"
    assert refused("job", "wait", "nope") == \
        "nbdctl: no job 'nope' (see nbdctl job list)\n"
    assert json.loads(ctl(admin.admin, "--json", "job", "list").stdout) == []

    # While a mirror runs (slowly, so it is not ready yet).
    ctl(admin.admin, "mirror", "d0", "t0", "--sync", "full", "--speed",
        "64K", "--buf-size", "64K")
    assert refused("mirror", "d0", "t0", "--sync", "full") == \
        "nbdctl: node 'd0' is in use by job 'mirror-d0': end the job first\n"
    assert "is not ready" in refused("job", "complete", "mirror-d0")
    assert "is not paused" in refused("job", "resume", "mirror-d0")
    assert "only a concluded job" in refused("job", "dismiss", "mirror-d0")
    # Its nodes stay, at their size; its source is not fleeced; nobody
    # else writes to its target.
    assert "job 'mirror-d0'" in refused("node", "remove", "t0")
    assert "job 'mirror-d0'" in refused("node", "remove", "d0")
    assert "job 'mirror-d0'" in refused(
        "qmp", "block_resize", '{"node-name": "d0", "size": 16777216}')
    assert "end the job first" in refused("fleece", "start", "d0")
    assert "conflicting permissions" in refused(
        "export", "add", "t0", "--writable", "--name", "w")
    # The live export is not disturbed.
    write(h, model, b"x" * 4096, 0)
    assert h.pread(4096, 0) == b"x" * 4096

    ctl(admin.admin, "job", "cancel", "mirror-d0")
    until(lambda: job_json(admin, "mirror-d0") is None)
    assert refused("job", "pause", "mirror-d0") == \
        "nbdctl: job 'mirror-d0' does not exist\n"
    ctl(admin.admin, "node", "remove", "t0")
    h.shutdown()


def test_backup_stream_commit(admin, tmp_path):
    """nbdctl backup, commit and stream start QEMU's jobs with their
    defaults; each is followed with job wait --done and its result
    checked in the images."""
    h, tgt, model = live_disk(admin, tmp_path, size=4 * MiB)
    before = bytes(model)
    p = ctl(admin.admin, "backup", "d0", "t0", "--sync", "full",
            "--no-auto-dismiss", "--speed", "64M")
    assert p.stdout == "job backup-d0: backing up d0 to t0 (sync full)\n"
    write(h, model, b"w" * 65536, MiB)      # after the point in time
    ctl(admin.admin, "job", "wait", "backup-d0", "--done")
    ctl(admin.admin, "job", "dismiss", "backup-d0")
    with open(tgt, "rb") as f:
        assert f.read() == before
    h.shutdown()
    ctl(admin.admin, "export", "remove", "live")

    # A chain base <- mid <- top, base and mid added read-only.
    imgs = {n: str(tmp_path / f"{n}.qcow2") for n in ("base", "mid", "top")}
    run(["qemu-img", "create", "-q", "-f", "qcow2", imgs["base"], "4M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", imgs["base"]])
    for n, below in (("mid", "base"), ("top", "mid")):
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", imgs[below],
             "-F", "qcow2", imgs[n]])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 1M", imgs["mid"]])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 2M 1M", imgs["top"]])
    view = str(tmp_path / "top.raw")
    run(["qemu-img", "convert", "-O", "raw", imgs["top"], view])
    for n, below in (("base", None), ("mid", "base"), ("top", "mid")):
        spec = {"driver": "qcow2", "node-name": n, "backing": below,
                "file": {"driver": "file", "filename": imgs[n]}}
        if n != "top":
            spec["read-only"] = True
            spec["file"]["read-only"] = True
        ctl(admin.admin, "node", "add", json.dumps(spec))
    p = ctl(admin.admin, "commit", "top", "--top", "mid", "--base", "base",
            "--no-auto-dismiss")
    assert p.stdout == "job top: committing mid into base\n"
    ctl(admin.admin, "job", "wait", "top", "--done")
    ctl(admin.admin, "job", "dismiss", "top")
    p = ctl(admin.admin, "stream", "top", "--id", "s", "--no-auto-dismiss")
    assert p.stdout == "job s: streaming into top its whole backing chain\n"
    ctl(admin.admin, "job", "wait", "s", "--done")
    ctl(admin.admin, "job", "dismiss", "s")
    nodes = {n["node-name"]: n for n in json.loads(
        ctl(admin.admin, "--json", "node", "list").stdout)}
    assert not [c for c in nodes["top"].get("children", [])
                if c["child"] == "backing"]
    for n in ("top", "mid", "base"):
        ctl(admin.admin, "node", "remove", n)
    info = json.loads(run(["qemu-img", "info", "--output=json",
                           imgs["top"]]).stdout)
    assert "backing-filename" not in info
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", imgs["top"],
         view])
    run(["qemu-img", "check", "-f", "qcow2", imgs["base"]])


@pytest.mark.parametrize("args", [
    ["job"],
    ["job", "frob"],
    ["job", "list", "x"],
    ["job", "list", "--force"],
    ["job", "pause"],
    ["job", "pause", "a", "b"],
    ["job", "resume"],
    ["job", "complete"],
    ["job", "complete", "a", "--force"],
    ["job", "cancel"],
    ["job", "cancel", "a", "b"],
    ["job", "cancel", "a", "--force=yes"],
    ["job", "dismiss"],
    ["job", "speed", "a"],
    ["job", "speed", "a", "fast"],
    ["job", "speed", "a", "-1"],
    ["job", "speed", "a", "1M", "2M"],
    ["job", "wait"],
    ["job", "wait", "a", "b"],
    ["job", "wait", "a", "--ready", "--done"],
    ["job", "wait", "a", "--soon"],
    ["mirror"],
    ["mirror", "d0"],
    ["mirror", "d0", "t0"],
    ["mirror", "d0", "t0", "t1", "--sync", "full"],
    ["mirror", "d0", "t0", "--sync"],
    ["mirror", "d0", "t0", "--sync", "most"],
    ["mirror", "d0", "t0", "--sync", "full", "--id", ""],
    ["mirror", "d0", "t0", "--sync", "full", "--id", "bad id"],
    ["mirror", "d0", "t0", "--sync", "full", "--id", "9lives"],
    ["mirror", "#file0", "t0", "--sync", "full"],
    ["mirror", "d0", "t0", "--sync", "full", "--speed", "lots"],
    ["mirror", "d0", "t0", "--sync", "full", "--granularity", "-1"],
    ["mirror", "d0", "t0", "--sync", "full", "--buf-size", ""],
    ["mirror", "d0", "t0", "--sync", "full", "--no-auto-dismiss=no"],
    ["mirror", "d0", "t0", "--sync", "full", "--force"],
    ["mirror", "d0", "t0", "--sync", "full", "--copy-mode", "active"],
    ["mirror", "d0", "t0", "--sync", "full", "--copy-mode"],
    ["backup"],
    ["backup", "d0", "t0"],
    ["backup", "d0", "t0", "--sync", "top"],
    ["backup", "d0", "t0", "--sync", "full", "--bitmap", "b"],
    ["backup", "d0", "t0", "--sync", "incremental"],
    ["backup", "d0", "t0", "--sync", "bitmap", "--bitmap", ""],
    ["backup", "d0", "t0", "--sync", "bitmap", "--bitmap", "b",
     "--bitmap-mode", "sometimes"],
    ["backup", "d0", "--sync", "full"],
    ["stream"],
    ["stream", "a", "b"],
    ["stream", "a", "--base", ""],
    ["stream", "a", "--top", "b"],
    ["stream", "a", "--speed", "x"],
    ["commit"],
    ["commit", "a", "--top", ""],
    ["commit", "a", "--id", "bad id"],
])
def test_job_exit_2_for_bad_usage(tmp_path, args):
    """Usage errors exit 2 before anything is sent: with no daemon at
    the socket, reaching it would have been exit 3."""
    sock = str(tmp_path / "none.sock")
    p = ctl(sock, *args, expect=2)
    assert p.stderr, "no message"
    assert p.stdout == ""


def test_job_usage_errors_send_nothing(admin, tmp_path):
    """With a daemon there, a usage error still reaches nothing: the
    audit log records every job command the daemon gets, refused or
    not."""
    db = os.path.join(os.path.dirname(admin.admin), "catalog.db")

    def audited():
        c = sqlite3.connect(db)
        try:
            return [r[0] for r in c.execute(
                "SELECT command FROM audit WHERE command LIKE 'block%job%' "
                "OR command IN ('blockdev-mirror', 'job-dismiss') "
                "ORDER BY id")]
        finally:
            c.close()

    ctl(admin.admin, "mirror", "d0", "t0", expect=2)
    ctl(admin.admin, "mirror", "d0", "t0", "--sync", "all", expect=2)
    ctl(admin.admin, "mirror", "d0", "t0", "--sync", "full", "--speed",
        "x", expect=2)
    ctl(admin.admin, "job", "speed", "j", "x", expect=2)
    ctl(admin.admin, "job", "cancel", "j", "k", expect=2)
    ctl(admin.admin, "job", "dismiss", expect=2)
    assert audited() == []
    ctl(admin.admin, "mirror", "d0", "t0", "--sync", "full", expect=1)
    ctl(admin.admin, "job", "speed", "j", "1M", expect=1)
    ctl(admin.admin, "job", "dismiss", "j", expect=1)
    assert audited() == ["blockdev-mirror", "block-job-set-speed",
                         "job-dismiss"]


def test_job_usage_messages():
    mirror = ("Usage: nbdctl mirror NODE TARGET --sync full|top|none "
              "[--id ID] [--speed SIZE] [--granularity SIZE] "
              "[--buf-size SIZE] [--copy-mode background|write-blocking] "
              "[--on-source-error ACTION] [--on-target-error ACTION] "
              "[--no-auto-dismiss]\n")
    p = ctl(None, "mirror", "d0", "t0", expect=2)
    assert p.stderr == ("nbdctl mirror: --sync full|top|none is required\n"
                        + mirror)
    p = ctl(None, "mirror", "d0", "--sync", "full", expect=2)
    assert p.stderr == "nbdctl mirror: expected NODE TARGET\n" + mirror
    p = ctl(None, "mirror", "d0", "t0", "--sync", "most", expect=2)
    assert p.stderr == ("nbdctl mirror: --sync: expected full, top or none, "
                        "got 'most'\n" + mirror)
    p = ctl(None, "mirror", "d0", "t0", "--sync", "full", "--id", "bad id",
            expect=2)
    assert p.stderr == ("nbdctl mirror: --id: 'bad id' is not a valid job "
                        "id (a letter, then letters, digits, '-', '.' and "
                        "'_')\n" + mirror)
    # The default id is made from NODE: one that cannot be needs --id.
    p = ctl(None, "mirror", "#file0", "t0", "--sync", "full", expect=2)
    assert p.stderr == ("nbdctl mirror: 'mirror-#file0' is not a valid job "
                        "id: give one with --id\n" + mirror)
    p = ctl(None, "mirror", "n" * 128, "t0", "--sync", "full", expect=2)
    assert "give one with --id" in p.stderr
    p = ctl(None, "mirror", "d0", "t0", "--sync", "full", "--speed", "lots",
            expect=2)
    assert p.stderr.startswith("nbdctl mirror: --speed: expected a size")
    p = ctl(None, "mirror", "d0", "t0", "--sync", "full", "--copy-mode",
            "active", expect=2)
    assert p.stderr == ("nbdctl mirror: --copy-mode: expected background or "
                        "write-blocking, got 'active'\n" + mirror)

    speed = "Usage: nbdctl job speed ID SPEED\n"
    p = ctl(None, "job", "speed", "j", "fast", expect=2)
    assert p.stderr == ("nbdctl job speed: SPEED: expected bytes per second "
                        "(a number, optionally with K, M, G or T; 0 for no "
                        "limit), got 'fast'\n" + speed)
    p = ctl(None, "job", "speed", "j", expect=2)
    assert p.stderr == "nbdctl job speed: expected ID SPEED\n" + speed
    p = ctl(None, "job", "cancel", expect=2)
    assert p.stderr == ("nbdctl job cancel: expected one job ID\n"
                        "Usage: nbdctl job cancel ID [--force]\n")
    p = ctl(None, "job", "wait", "j", "--ready", "--done", expect=2)
    assert p.stderr == ("nbdctl job wait: give --ready or --done, not both\n"
                        "Usage: nbdctl job wait ID [--ready|--done] "
                        "[--progress]\n")
    p = ctl(None, "job", "list", "x", expect=2)
    assert p.stderr == ("nbdctl job list: expected no arguments\n"
                        "Usage: nbdctl job list\n")


def test_job_help():
    p = ctl(None, "job", "--help")
    assert p.stdout.startswith("Usage: nbdctl [OPTIONS] job SUBCOMMAND")
    subs = [line.split()[1] for line in p.stdout.splitlines()
            if line.startswith("  job ")]
    assert subs == ["list", "wait", "pause", "resume", "speed", "complete",
                    "cancel", "dismiss"]
    for cmd in ("query-block-jobs", "block-job-pause", "block-job-resume",
                "block-job-set-speed", "block-job-complete",
                "block-job-cancel", "job-dismiss"):
        assert cmd in p.stdout, cmd
    assert ctl(None, "job", "-h").stdout == p.stdout

    p = ctl(None, "--help")
    for word in ("mirror NODE TARGET --sync MODE", "job list",
                 "job wait ID [--ready|--done]", "job speed ID SPEED",
                 "job cancel ID [--force]"):
        assert word in p.stdout, word
    # After fleecing, before the inspection commands.
    assert p.stdout.index("fleece list") < p.stdout.index("mirror NODE") \
        < p.stdout.index("job list") < p.stdout.index("connections")

    p = ctl(None, "mirror", "--help")
    assert p.stdout.startswith(
        "Usage: nbdctl mirror NODE TARGET --sync full|top|none [--id ID] "
        "[--speed SIZE]\n")
    assert "blockdev-mirror" in p.stdout and "mirror-NODE" in p.stdout
    p = ctl(None, "job", "wait", "--help")
    assert p.stdout.startswith("Usage: nbdctl job wait ID [--ready|--done] "
                               "[--progress]\n")
    p = ctl(None, "job", "list", "--help")
    assert p.stdout.startswith("Usage: nbdctl job list\n")
    assert "PROGRESS" in p.stdout
