"""contrib/nbdd-backup, the reference backup client: full and
incremental backups into a qcow2 chain, restore, and the failure paths.

The pull itself (block status, copy through qemu-nbd, qcow2 chain,
manifest) is tested on its own against a bitmap forked with
block-dirty-bitmap-fork and exported read-only, which the client pulls
with --export (no fleecing).  The tests at the end go through the
fleecing API (fleece-start/fleece-stop, docs/backup.md) with a writer
running during the pulls."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import nbd
import pytest

from conftest import TOP_DIR, make_image
from helpers import map_export, run, wait_for
from qmp import QMP
from admintools import MiB, qcow2_graph, start

BACKUP = os.path.join(TOP_DIR, "contrib", "nbdd-backup")
CONTEXT = "qemu:dirty-bitmap:"
SIZE = 64 * MiB


def backup(*args, check=True, timeout=60):
    """Run nbdd-backup ARGS; with CHECK, it must exit 0."""
    cmd = [sys.executable, BACKUP] + [str(a) for a in args]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError("%r exited with %d\nstdout:\n%s\nstderr:\n%s" %
                             (cmd, p.returncode, p.stdout, p.stderr))
    return p


def points(dest):
    with open(os.path.join(dest, "manifest.json")) as f:
        return json.load(f)["points"]


def dir_state(dest):
    """Everything in DEST, by name, with its bytes (the images' size and
    mtime: they are large): a failure must leave this unchanged."""
    out = {}
    for name in sorted(os.listdir(dest)):
        path = os.path.join(dest, name)
        if name == "manifest.json":
            with open(path, "rb") as f:
                out[name] = f.read()
        else:
            st = os.stat(path)
            out[name] = (st.st_size, st.st_mtime_ns)
    return out


def bitmaps(q, node="disk0"):
    n = {x["node-name"]: x for x in q.cmd("query-named-block-nodes")}[node]
    return {b["name"]: b for b in n["dirty-bitmaps"]}


def rd_bytes(q, export_id):
    return {e["id"]: e for e in q.cmd("query-stats")["exports"]}[
        export_id]["rd_bytes"]


def record(img, fmt, out):
    """A raw copy of the disk as it is now (no writes may run; the
    daemon's metadata must be flushed)."""
    run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", img, str(out)])
    return str(out)


def restore_and_compare(dest, n, ref, tmp_path, fmt="raw"):
    out = tmp_path / f"restored-{n}.{fmt}"
    args = ["restore", "--dest", dest, "--output", out, "--format", fmt]
    if n is not None:
        args += ["--point", n]
    backup(*args)
    run(["qemu-img", "compare", "-q", "-f", fmt, "-F", "raw", str(out), ref])
    out.unlink()


def scribble(h, rnd, size, n, max_len=256 * 1024):
    """N random writes, write-zeroes and discards through handle H."""
    for i in range(n):
        length = rnd.randrange(1, max_len)
        off = rnd.randrange(0, size - length)
        op = rnd.choice(["write", "write", "write", "zero", "trim"])
        if op == "write":
            h.pwrite(rnd.randbytes(length), off)
        elif op == "zero":
            h.zero(length, off)
        else:
            h.trim(65536, off // 65536 * 65536)


def qemu_nbd_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] == "Z"
    except FileNotFoundError:
        return True


def make_disk(nbdd_server, tmp_path, fmt, size=SIZE):
    """A daemon with node disk0 (FMT) holding the persistent bitmap b0,
    exported writable as 'disk0'.  Returns (server, qmp, image, handle)."""
    srv = start(nbdd_server, tmp_path)
    q = QMP(srv.admin)
    if fmt == "qcow2":
        img = qcow2_graph(q, tmp_path, size=size)
    else:
        img = make_image(tmp_path / "disk0.img", size)
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "disk0",
                                    "file": {"driver": "file",
                                             "filename": img}})
    q.cmd("block-dirty-bitmap-add", node="disk0", name="b0", persistent=True)
    q.cmd("block-export-add", type="nbd", id="live", node_name="disk0",
          name="disk0", writable=True)
    return srv, q, img, srv.connect("disk0")


class ForkedExport:
    """What the fleecing API will do, done by hand: fork b0 and export
    the (quiescent) node read-only as 'bk' with the frozen bits; at the
    end, unfork (success or failure) as fleece-stop would."""

    def __init__(self, q, h):
        self.q = q
        h.flush()
        q.cmd("block-dirty-bitmap-fork", node="disk0", name="b0")
        self.count = bitmaps(q)["b0"]["count"]
        q.cmd_args("block-export-add", {"type": "nbd", "id": "bk",
                                        "node-name": "disk0", "name": "bk",
                                        "bitmaps": ["b0"]})

    def end(self, outcome="success"):
        self.rd_bytes = rd_bytes(self.q, "bk")
        self.q.cmd("block-export-del", id="bk")
        self.q.cmd("block-dirty-bitmap-unfork", node="disk0", name="b0",
                   outcome=outcome)


def data_bytes(srv, export):
    """Bytes of EXPORT that base:allocation does not report as zero."""
    h = srv.connect(export, add_meta_context=nbd.CONTEXT_BASE_ALLOCATION)
    try:
        return sum(length for length, flags in map_export(h)
                   if not flags & nbd.STATE_ZERO)
    finally:
        h.shutdown()


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_full_and_incrementals_restore_every_point(nbdd_server, tmp_path,
                                                   fmt):
    """A full backup and three incremental ones (one after the disk
    grew), each pulled over another kind of address: every point restores
    to the disk as it was, the full one read only allocated data, each
    incremental one exactly the dirty bytes of the bitmap."""
    srv, q, img, h = make_disk(nbdd_server, tmp_path, fmt)
    dest = str(tmp_path / "backups")
    rnd = random.Random(fmt)
    for k in range(12):
        h.pwrite(rnd.randbytes(512 * 1024), rnd.randrange(0, 60) * MiB)
    wheres = [srv.sock, "unix:" + srv.sock,
              f"nbd://127.0.0.1:{srv.port}",
              f"nbd+unix:///whatever?socket={srv.sock}"]
    refs = []
    size = SIZE
    for i, where in enumerate(wheres):
        kind = "full" if i == 0 else "incremental"
        if i == 2:
            # The disk grows: the new point is larger than its backing.
            h.shutdown()
            size = SIZE + 16 * MiB
            q.cmd("block_resize", node_name="disk0", size=size)
            h = srv.connect("disk0")
            h.pwrite(b"end" * 1000, size - 3000)
        if i > 0:
            scribble(h, rnd, size, 40)
        fe = ForkedExport(q, h)
        refs.append(record(img, fmt, tmp_path / f"ref-{i}.raw"))
        expect = fe.count if kind == "incremental" else data_bytes(srv, "bk")
        start_rd = rd_bytes(q, "bk")
        p = backup(kind, "--export", "bk", "--nbd", where, "--dest", dest,
                   "--node", "disk0", "--bitmap", "b0")
        fe.end()
        assert f"{kind} backup {i} " in p.stdout
        pt = points(dest)[i]
        assert pt["bytes-copied"] == expect
        assert fe.rd_bytes - start_rd == expect, \
            "the client read more than it copied"
        if kind == "full":
            assert 0 < expect < size / 4          # the holes were skipped
        else:
            assert 0 < expect < size / 2
        assert pt["size"] == size
        assert (pt["index"], pt["kind"], pt["node"], pt["bitmap"]) == \
            (i, kind, "disk0", "b0")
        assert pt["time"].endswith("Z")
        assert pt["file"].startswith(f"{i:04d}-{kind}-")
        info = json.loads(run(["qemu-img", "info", "--output=json",
                               os.path.join(dest, pt["file"])]).stdout)
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == size
        if i == 0:
            assert "backing-filename" not in info
        else:
            # Relative: the backup directory can move.
            assert info["backing-filename"] == points(dest)[i - 1]["file"]
            assert pt["backing"] == points(dest)[i - 1]["file"]
    h.shutdown()

    assert sorted(os.listdir(dest)) == sorted(
        ["manifest.json"] + [p["file"] for p in points(dest)])
    # The chain still restores from another place.
    moved = str(tmp_path / "moved")
    os.rename(dest, moved)
    for i, ref in enumerate(refs):
        restore_and_compare(moved, i, ref, tmp_path)
        run(["qemu-img", "check", "-q",
             os.path.join(moved, points(moved)[i]["file"])])
    restore_and_compare(moved, None, refs[-1], tmp_path, fmt="qcow2")
    restore_and_compare(moved, -3, refs[1], tmp_path)

    out = backup("list", "--dest", moved).stdout.splitlines()
    assert out[0].split() == ["POINT", "KIND", "TIME", "SIZE", "COPIED",
                              "FILE"]
    assert [line.split()[:2] for line in out[1:]] == [
        ["0", "full"], ["1", "incremental"], ["2", "incremental"],
        ["3", "incremental"]]
    assert json.loads(backup("list", "--dest", moved, "--json").stdout) == \
        points(moved)
    q.close()


def test_a_new_full_backup_starts_a_new_chain(nbdd_server, tmp_path):
    srv, q, img, h = make_disk(nbdd_server, tmp_path, "qcow2", size=8 * MiB)
    dest = str(tmp_path / "backups")
    refs = []
    for i, kind in enumerate(["full", "incremental", "full", "incremental"]):
        h.pwrite(bytes([i + 1]) * 70000, i * MiB + 12345)
        fe = ForkedExport(q, h)
        refs.append(record(img, "qcow2", tmp_path / f"ref-{i}.raw"))
        backup(kind, "--export", "bk", "--nbd", srv.sock, "--dest", dest,
               "--node", "disk0", "--bitmap", "b0")
        fe.end()
    pts = points(dest)
    assert [p["backing"] for p in pts] == [None, pts[0]["file"], None,
                                           pts[2]["file"]]
    for i, ref in enumerate(refs):
        restore_and_compare(dest, i, ref, tmp_path)
    h.shutdown()
    q.close()


def test_failures_leave_the_chain_unchanged(nbdd_server, tmp_path):
    srv, q, img, h = make_disk(nbdd_server, tmp_path, "qcow2", size=8 * MiB)
    h.pwrite(b"x" * 100000, 0)
    dest = tmp_path / "backups"
    dest.mkdir()
    common = ["--nbd", srv.sock, "--dest", dest]

    def fails(*args, msg):
        before = dir_state(dest)
        p = backup(*args, check=False)
        assert p.returncode == 1, p
        assert msg in p.stderr, p.stderr
        assert p.stderr.startswith("nbdd-backup: ")
        assert len(p.stderr.splitlines()) == 1, p.stderr
        assert dir_state(dest) == before
        return p

    fe = ForkedExport(q, h)
    # Nothing to build on.
    p = fails("incremental", "--export", "bk", *common,
              msg=f"no full backup in {dest}: run 'nbdd-backup full' first")
    assert p.stderr.startswith("nbdd-backup: incremental backup failed: ")
    assert os.listdir(dest) == []
    fails("incremental", "--export", "bk", "--nbd", srv.sock, "--dest",
          tmp_path / "nope", msg="nope does not exist")
    assert not os.path.exists(tmp_path / "nope")
    backup("full", "--export", "bk", *common, "--node", "disk0",
           "--bitmap", "b0")
    fe.end()

    h.pwrite(b"y" * 100000, 4 * MiB)
    fe = ForkedExport(q, h)
    # NBD: no server there, an export that does not exist, an export
    # without the bitmap.
    for kind in ("full", "incremental"):
        fails(kind, "--export", "bk", "--nbd", tmp_path / "no.sock",
              "--dest", dest, "--bitmap", "b0",
              msg="cannot connect to export 'bk' at " +
              str(tmp_path / "no.sock"))
    fails("incremental", "--export", "bk", "--nbd",
          f"nbd://127.0.0.1:{srv.port + 1 if srv.port < 65535 else 1}",
          "--dest", dest, msg="cannot connect to export 'bk'")
    fails("incremental", "--export", "nope", *common,
          msg="cannot connect to export 'nope'")
    fails("incremental", "--export", "disk0", *common,
          msg="export 'disk0' does not offer qemu:dirty-bitmap:b0")
    # Not this chain's bitmap or node.
    fails("incremental", "--export", "bk", *common, "--bitmap", "b1",
          msg="follows bitmap 'b0', not 'b1'")
    fails("incremental", "--export", "bk", *common, "--node", "d9",
          msg="follows node 'disk0', not 'd9'")
    # The admin socket: not there; a node the daemon does not have.
    fails("incremental", "--admin", tmp_path / "no-admin.sock", *common,
          msg="cannot connect to the admin socket " +
          str(tmp_path / "no-admin.sock"))
    fails("full", "--admin", srv.admin, *common, "--node", "nope",
          "--bitmap", "b0", msg="the daemon has no node 'nope' (nodes: ")
    # The chain's last image is gone.
    last = os.path.join(dest, points(dest)[-1]["file"])
    os.rename(last, last + ".away")
    fails("incremental", "--export", "bk", *common, msg="is missing")
    os.rename(last + ".away", last)
    # After all that, the chain goes on.
    backup("incremental", "--export", "bk", *common)
    fe.end()
    assert [p["kind"] for p in points(dest)] == ["full", "incremental"]
    assert points(dest)[1]["bytes-copied"] == 2 * 65536

    # restore: no such point; an output that exists.
    out = tmp_path / "out.raw"
    out.write_bytes(b"keep")
    p = backup("restore", "--dest", dest, "--point", 2, "--output", out,
               check=False)
    assert p.returncode == 1
    assert "no point 2 in" in p.stderr and "points are 0 to 1" in p.stderr
    p = backup("restore", "--dest", dest, "--output", out, check=False)
    assert p.returncode == 1 and "exists: remove it or use --force" in \
        p.stderr
    assert out.read_bytes() == b"keep"
    backup("restore", "--dest", dest, "--output", out, "--force")
    assert out.stat().st_size == 8 * MiB
    p = backup("list", "--dest", tmp_path / "nope", check=False)
    assert p.returncode == 1 and "does not exist" in p.stderr
    h.shutdown()
    q.close()


def test_usage_errors(tmp_path):
    p = backup(check=False)
    assert p.returncode == 2 and "a command is needed" in p.stderr
    for args in (["full", "--dest", tmp_path, "--node", "n"],
                 ["full", "--dest", tmp_path, "--bitmap", "b"],
                 ["full", "--dest", tmp_path, "--bitmap", "b", "--export",
                  "e", "--admin", "/x"],
                 ["incremental", "--dest", tmp_path, "--max-rate", "fast"],
                 ["restore", "--dest", tmp_path, "--output", "x",
                  "--format", "vmdk"],
                 ["restore", "--dest", tmp_path],
                 ["bogus"]):
        p = backup(*args, check=False)
        assert p.returncode == 2, (args, p)
        assert "usage: nbdd-backup" in p.stderr
    assert os.listdir(tmp_path) == []
    p = backup("--help")
    assert "full" in p.stdout and "restore" in p.stdout
    p = backup("incremental", "--help")
    assert "--export NAME" in p.stdout and "test suite" in p.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM,
                                 signal.SIGKILL],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_backup_adds_nothing(nbdd_server, tmp_path, sig):
    """A signal in the middle of a pull: no point, no temporary image
    once the next run has looked, no qemu-nbd left; and the next backup
    works."""
    srv, q, img, h = make_disk(nbdd_server, tmp_path, "raw", size=32 * MiB)
    h.pwrite(random.Random(1).randbytes(24 * MiB), 0)
    dest = str(tmp_path / "backups")
    fe = ForkedExport(q, h)
    ref = record(img, "raw", tmp_path / "ref.raw")
    os.mkdir(dest)
    p = subprocess.Popen([sys.executable, BACKUP, "full", "-v", "--export",
                          "bk", "--nbd", srv.sock, "--dest", dest,
                          "--bitmap", "b0", "--max-rate", "8M"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    pid = None
    lines = []
    for line in p.stderr:
        lines.append(line)
        if "qemu-nbd (pid" in line:
            pid = int(line.split("(pid ")[1].split(")")[0])
        if "copied" in line:
            break
    assert pid, "".join(lines)
    p.send_signal(sig)
    err = p.stderr.read()
    p.wait(timeout=30)
    assert p.returncode == (1 if sig != signal.SIGKILL else -sig)
    if sig != signal.SIGKILL:
        name = signal.Signals(sig).name
        assert f"full backup failed: interrupted by {name}; nothing was " \
            "added to the backup directory" in err
        assert os.listdir(dest) == []
    assert wait_for(lambda: qemu_nbd_gone(pid))
    backup("full", "--export", "bk", "--nbd", srv.sock, "--dest", dest,
           "--bitmap", "b0")
    fe.end()
    assert [x["index"] for x in points(dest)] == [0]
    assert sorted(os.listdir(dest)) == sorted(["manifest.json",
                                               points(dest)[0]["file"]])
    restore_and_compare(dest, 0, ref, tmp_path)
    h.shutdown()
    q.close()


# ---------------------------------------------------------------------
# Through the fleecing API (docs/backup.md, fleece-start/fleece-stop).

class Writer(threading.Thread):
    """Random writes to the live export until stopped; pause() waits for
    the write in flight and flushes, resume() lets it go on."""

    def __init__(self, srv, size, seed):
        super().__init__(daemon=True)
        self.h = srv.connect("disk0")
        self.size = size
        self.rnd = random.Random(seed)
        self.lock = threading.Lock()
        self.done = False
        self.writes = 0
        self.error = None

    def run(self):
        try:
            while not self.done:
                with self.lock:
                    if self.done:
                        break
                    scribble(self.h, self.rnd, self.size, 1, 128 * 1024)
                    self.writes += 1
                time.sleep(0.002)
        except Exception as e:          # reported by stop()
            self.error = e

    def pause(self):
        self.lock.acquire()
        self.h.flush()

    def resume(self):
        self.lock.release()

    def stop(self):
        self.done = True
        self.join(30)
        assert self.error is None, self.error
        self.h.shutdown()


def fleece_backup(srv, q, kind, dest, writer, extra=()):
    """Run nbdd-backup KIND while WRITER is paused; resume WRITER as soon
    as the fleece exists (the disk frozen in the snapshot), so the pull
    runs under writes.  Returns the finished process."""
    p = subprocess.Popen([sys.executable, BACKUP, kind, "--admin", srv.admin,
                          "--nbd", srv.sock, "--dest", dest, "--node",
                          "disk0", "--bitmap", "b0"] + list(extra),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        wait_for(lambda: p.poll() is not None or any(
            f["node"] == "disk0" for f in q.cmd("query-fleeces")), 30)
    finally:
        writer.resume()
    out, err = p.communicate(timeout=60)
    p.stdout_text, p.stderr_text = out, err
    return p


def assert_clean(q):
    """No fleece left, no guard bitmap left, b0 not frozen."""
    assert q.cmd("query-fleeces") == []
    bms = bitmaps(q)
    assert set(bms) == {"b0"}, bms
    assert not bms["b0"].get("frozen") and not bms["b0"]["inconsistent"]


def fleece_disk(nbdd_server, tmp_path):
    srv, q, img, h = make_disk(nbdd_server, tmp_path, "qcow2")
    q.cmd("block-dirty-bitmap-remove", node="disk0", name="b0")
    rnd = random.Random(7)
    for k in range(16):
        h.pwrite(rnd.randbytes(MiB), rnd.randrange(0, 63) * MiB)
    h.flush()
    return srv, q, img, h


def test_fleece_full_and_incrementals_under_writes(nbdd_server, tmp_path):
    """A full backup, then three rounds of writes and an incremental
    backup, a writer running during every pull: each point restores to
    the disk as it was at its fleece-start."""
    srv, q, img, h = fleece_disk(nbdd_server, tmp_path)
    dest = str(tmp_path / "backups")
    writer = Writer(srv, SIZE, 1)
    writer.pause()
    writer.start()
    refs = []
    for i in range(4):
        kind = "full" if i == 0 else "incremental"
        if i > 0:
            writer.pause()                      # between rounds: writes
            scribble(h, random.Random(i), SIZE, 30)
            h.flush()
            expect = bitmaps(q)["b0"]["count"]
        refs.append(record(img, "qcow2", tmp_path / f"ref-{i}.raw"))
        p = fleece_backup(srv, q, kind, dest, writer)
        assert p.returncode == 0, p.stderr_text
        pt = points(dest)[i]
        assert pt["kind"] == kind and pt["fleece"]
        if kind == "incremental":
            assert pt["bytes-copied"] == expect
        else:
            bm = bitmaps(q)["b0"]
            assert bm["persistent"] and bm["recording"]
        assert_clean(q)
        time.sleep(0.2)                 # writes after the pull, too
    writer.stop()
    assert writer.writes > 0
    for i, ref in enumerate(refs):
        restore_and_compare(dest, i, ref, tmp_path)
    h.shutdown()
    q.close()


def test_fleece_failed_backups_lose_no_bits(nbdd_server, tmp_path):
    """An incremental backup interrupted after some TRIMs (which consume
    frozen bits), and one killed: the next incremental one still copies
    every changed byte, so its point restores to the disk as it was."""
    srv, q, img, h = fleece_disk(nbdd_server, tmp_path)
    dest = str(tmp_path / "backups")
    writer = Writer(srv, SIZE, 2)
    writer.pause()
    writer.start()
    p = fleece_backup(srv, q, "full", dest, writer)
    assert p.returncode == 0, p.stderr_text

    for sig in (signal.SIGINT, signal.SIGKILL):
        writer.pause()
        rnd = random.Random(sig)
        for k in range(24):
            h.pwrite(rnd.randbytes(MiB), rnd.randrange(0, 63) * MiB)
        h.flush()
        expect = bitmaps(q)["b0"]["count"]
        ref = record(img, "qcow2", tmp_path / f"ref-{sig}.raw")
        before = dir_state(dest)
        # Paused writer: the bitmap must come back exactly.
        p = subprocess.Popen([sys.executable, BACKUP, "incremental", "-v",
                              "--admin", srv.admin, "--nbd", srv.sock,
                              "--dest", dest, "--max-rate", "8M"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        lines = []
        for line in p.stderr:
            lines.append(line)
            if "trimmed" in line:
                break
        assert any("trimmed" in x for x in lines), "".join(lines)
        p.send_signal(sig)
        err = p.stderr.read()
        p.wait(30)
        if sig == signal.SIGINT:
            assert p.returncode == 1
            assert "interrupted by SIGINT" in err
            assert dir_state(dest) == before
            assert_clean(q)
            assert bitmaps(q)["b0"]["count"] == expect
        else:
            # The fleece outlives a killed client: the next run says so.
            [f] = q.cmd("query-fleeces")
            p = backup("incremental", "--admin", srv.admin, "--nbd",
                       srv.sock, "--dest", dest, check=False)
            assert p.returncode == 1
            assert f"fleece '{f['id']}' of node 'disk0' with bitmap 'b0' " \
                "is running" in p.stderr
            q.cmd("fleece-stop", id=f["id"], outcome="failure")
            # The guard still holds what the TRIMs consumed.
            assert "b0" + ".nbdd-backup-guard" in bitmaps(q)
        p = fleece_backup(srv, q, "incremental", dest, writer)
        assert p.returncode == 0, p.stderr_text
        assert points(dest)[-1]["bytes-copied"] == expect
        assert_clean(q)
        restore_and_compare(dest, None, ref, tmp_path)
    writer.stop()
    h.shutdown()
    q.close()


def test_daemon_killed_inside_a_round(tmp_path):
    """kill -9 of nbdd while an incremental backup pulls (after some of
    its TRIMs): the backup fails and adds nothing, the restarted daemon
    ends the fleece as a failure, and the next incremental backup still
    restores to the disk as it was."""
    from conftest import Server

    def daemon():
        return Server(tmp_path, ["--state-dir", str(tmp_path / "state")])

    srv = daemon()
    q = QMP(str(tmp_path / "state" / "admin.sock"))
    srv.admin = str(tmp_path / "state" / "admin.sock")
    img = qcow2_graph(q, tmp_path, size=SIZE)
    q.cmd("block-dirty-bitmap-add", node="disk0", name="b0", persistent=True)
    q.cmd("block-export-add", type="nbd", id="live", node_name="disk0",
          name="disk0", writable=True)
    h = srv.connect("disk0")
    rnd = random.Random(5)
    for k in range(16):
        h.pwrite(rnd.randbytes(MiB), rnd.randrange(0, 63) * MiB)
    h.flush()
    dest = str(tmp_path / "backups")
    backup("full", "--admin", srv.admin, "--nbd", srv.sock, "--dest", dest,
           "--node", "disk0", "--bitmap", "b0")
    for k in range(24):
        h.pwrite(rnd.randbytes(MiB), rnd.randrange(0, 63) * MiB)
    h.flush()
    h.shutdown()
    ref = record(img, "qcow2", tmp_path / "ref.raw")
    before = dir_state(dest)
    p = subprocess.Popen([sys.executable, BACKUP, "incremental", "-v",
                          "--admin", srv.admin, "--nbd", srv.sock,
                          "--dest", dest, "--max-rate", "8M"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    lines = []
    for line in p.stderr:
        lines.append(line)
        if "trimmed" in line:
            break
    assert any("trimmed" in x for x in lines), "".join(lines)
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(20)
    srv.log.close()
    q.close()
    p.stderr.read()
    assert p.wait(30) == 1
    assert dir_state(dest) == before
    os.unlink(tmp_path / "nbdd.pid")
    srv = daemon()
    srv.admin = str(tmp_path / "state" / "admin.sock")
    try:
        with QMP(srv.admin) as q:
            assert q.cmd("query-fleeces") == []
            p = backup("incremental", "--admin", srv.admin, "--nbd",
                       srv.sock, "--dest", dest)
            assert set(bitmaps(q)) == {"b0"}
        restore_and_compare(dest, None, ref, tmp_path)
    finally:
        srv.stop()
