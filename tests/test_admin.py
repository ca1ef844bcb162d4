"""The admin socket: QMP framing, the graph commands, the catalogue.

Each test starts the real daemon with a state dir, talks QMP to it
with the plain client in qmp.py, and checks the result with real NBD
clients, qemu-img, and the catalogue file itself (sqlite3)."""
import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import tempfile
import threading
import time

import nbd
import pytest

from admintools import (FAIL, MiB, qcow2_graph, qemu_img_check, raw_node,
                        restart, start)
from conftest import NBDD, make_image
from helpers import pattern, run
from qmp import QMP, QMPError


def test_greeting_and_negotiation(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin, negotiate=False) as q:
        assert q.greeting["QMP"]["version"]["package"].startswith("nbdd ")
        assert q.greeting["QMP"]["capabilities"] == []
        r = q.execute("query-version")
        assert r["error"]["class"] == "CommandNotFound"
        assert "qmp_capabilities" in r["error"]["desc"]
        assert q.execute("qmp_capabilities", id=7) == {"return": {}, "id": 7}
        assert q.cmd("query-version")["package"].startswith("nbdd ")
        r = q.execute("qmp_capabilities")
        assert r["error"]["class"] == "CommandNotFound"
        names = {c["name"] for c in q.cmd("query-commands")}
        for n in ("blockdev-add", "blockdev-del", "blockdev-create",
                  "blockdev-insert-node", "blockdev-remove-node",
                  "block-export-add", "block-export-del", "transaction",
                  "query-connections", "query-stats", "quit"):
            assert n in names


def test_socket_mode_and_default_path(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    st = os.stat(srv.admin)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_bad_input_keeps_the_session(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        q.send_raw(b'{"execute": "query-version", oops}\n')
        r = q.reply()
        assert r["error"]["class"] == "GenericError"
        assert "JSON" in r["error"]["desc"]
        q.send_raw(b"[1, 2, 3]\n")
        assert q.reply()["error"]["class"] == "GenericError"
        q.send_raw(b'{"execute": "query-version", "bogus": 1}\n')
        assert "bogus" in q.reply()["error"]["desc"]
        q.send_raw(b'{"execute": "quit", "arguments": [1]}\n')
        assert "arguments" in q.reply()["error"]["desc"]
        r = q.execute("no-such-command", id="x")
        assert r["error"]["class"] == "CommandNotFound"
        assert r["id"] == "x"
        with pytest.raises(QMPError) as e:
            q.cmd("blockdev-del", node_name="nothere")
        assert e.value.cls == "DeviceNotFound"
        with pytest.raises(QMPError) as e:
            q.cmd("blockdev-del", node_name=17)
        assert e.value.cls == "GenericError"
        # Two commands in one write, split across writes: both answered.
        q.send_raw(b'{"execute": "query-version", "id": 1}'
                   b'{"execute": "query-ver')
        time.sleep(0.1)
        q.send_raw(b'sion", "id": 2}\n')
        assert q.reply()["id"] == 1
        assert q.reply()["id"] == 2
        assert q.cmd("query-version")["package"].startswith("nbdd ")
    assert srv.alive()


def test_oversized_message_closes_only_that_session(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as other, QMP(srv.admin) as q:
        with pytest.raises((EOFError, ConnectionResetError, BrokenPipeError)):
            q.send_raw(b'{"execute": "' + b"a" * (2 * MiB))
            q.reply()
        assert other.cmd("query-version")["package"].startswith("nbdd ")
    assert "over 1048576 bytes" in srv.output()


def test_wrong_uid_is_refused(nbdd_server, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test switches to uid 65534 and must run as root")
    # Somewhere another user can reach: pytest's own dirs are 0700.
    sockdir = tempfile.mkdtemp(prefix="nbdd-admin-")
    os.chmod(sockdir, 0o711)
    try:
        srv = start(nbdd_server, tmp_path,
                    ["--admin-socket", sockdir + "/admin.sock"])
        srv.admin = sockdir + "/admin.sock"
        check_uid_refusal(srv)
        srv.stop()
    finally:
        shutil.rmtree(sockdir)


def check_uid_refusal(srv):

    def connect_as_nobody():
        """errno of connect, or the first bytes the daemon sent."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(10)
                try:
                    s.connect(srv.admin)
                except OSError as e:
                    os.write(w, f"errno {e.errno}".encode())
                    os._exit(0)
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                os.write(w, data[:4000])
            finally:
                os._exit(0)
        os.close(w)
        out = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            out += chunk
        os.close(r)
        os.waitpid(pid, 0)
        return out.decode()

    import errno
    assert stat.S_IMODE(os.stat(srv.admin).st_mode) == 0o600
    assert connect_as_nobody() == f"errno {errno.EACCES}"
    # Even with the file opened up, SO_PEERCRED keeps the user out.
    os.chmod(srv.admin, 0o666)
    reply = connect_as_nobody()
    assert "may not administer" in reply
    assert "QMP" not in reply
    assert "refused uid 65534" in srv.output()


def test_lifecycle_survives_restart(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        img = qcow2_graph(q, tmp_path)
        q.cmd("block-export-add", type="nbd", id="e0", node_name="disk0",
              name="vm0", writable=True, description="the disk")
        exports = q.cmd("query-block-exports")
        assert [(e["id"], e["name"], e["node-name"], e["writable"])
                for e in exports] == [("e0", "vm0", "disk0", True)]
    h = srv.connect("vm0")
    data = pattern(1, 4 * MiB)
    h.pwrite(data, 1 * MiB)
    h.flush()
    h.shutdown()

    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        exports = q.cmd("query-block-exports")
        assert [(e["id"], e["name"], e["node-name"], e["writable"],
                 e.get("description")) for e in exports] == \
            [("e0", "vm0", "disk0", True, "the disk")]
        nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
        assert nodes["disk0"]["drv"] == "qcow2"
        assert nodes["disk0"]["image"]["virtual-size"] == 64 * MiB
        assert nodes["disk0"]["file"] == img
        users = nodes["disk0"]["users"]
        assert users[0]["kind"] == "export" and users[0]["name"] == "e0"
        assert "write" in users[0]["perm"]
    h = srv.connect("vm0")
    assert h.get_size() == 64 * MiB
    assert h.pread(4 * MiB, 1 * MiB) == data
    h.shutdown()
    srv.stop()
    qemu_img_check(img)


class Writer(threading.Thread):
    """Writes distinct blocks through NBD until stopped; every write
    must succeed.  Remembers what it wrote, for checking afterwards."""

    def __init__(self, srv, export, size, block=64 * 1024):
        super().__init__()
        self.h = srv.connect(export)
        self.size, self.block = size, block
        self.stop_flag = threading.Event()
        self.written = {}
        self.nr_batches = 0
        self.error = None

    def run(self):
        i = 0
        errors = []

        def done(err):
            if err.value:
                errors.append(err.value)
            return 1

        try:
            while not self.stop_flag.is_set():
                off = (i * self.block) % self.size
                # Several in flight: the drain must wait for them.
                for k in range(8):
                    o = (off + k * self.block) % self.size
                    b = pattern(i + k, self.block)
                    self.h.aio_pwrite(b, o, completion=done)
                    self.written[o] = b
                while self.h.aio_in_flight() > 0:
                    self.h.poll(-1)
                if errors:
                    raise RuntimeError(f"write failed: errno {errors[0]}")
                self.nr_batches += 1
                i += 8
            self.h.flush()
        except Exception as e:      # noqa: BLE001 -- reported by the test
            self.error = e


def test_insert_and_remove_throttle_while_writing(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        img = qcow2_graph(q, tmp_path, size=16 * MiB)
        q.cmd("block-export-add", type="nbd", id="e0", node_name="disk0",
              writable=True)
        q.cmd_args("blockdev-add", {"driver": "throttle", "node-name": "t0",
                                    "throttle-group": "g0",
                                    "limits": {"iops-total": 200},
                                    "file": "disk0"})
        w = Writer(srv, "disk0", 16 * MiB)
        w.start()
        try:
            time.sleep(0.3)
            q.cmd("blockdev-insert-node", node="disk0", filter="t0")
            exp = q.cmd("query-block-exports")[0]
            assert exp["node-name"] == "t0"
            time.sleep(0.5)
            q.cmd("block-set-io-throttle", group="g0", iops=1000)
            time.sleep(0.3)
            q.cmd("blockdev-remove-node", filter="t0")
            assert q.cmd("query-block-exports")[0]["node-name"] == "disk0"
            time.sleep(0.3)
            q.cmd("blockdev-insert-node", node="disk0", filter="t0")
            time.sleep(0.3)
        finally:
            w.stop_flag.set()
            w.join(60)
        assert w.error is None, w.error
        assert not w.is_alive()
        assert w.nr_batches > 10
        nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
        assert nodes["t0"]["throttle-group"] == "g0"
        assert [u["name"] for u in nodes["t0"]["users"]] == ["e0"]
        assert [u["name"] for u in nodes["disk0"]["users"]] == ["t0"]

    h = srv.connect("disk0")
    for off, b in w.written.items():
        assert h.pread(len(b), off) == b, f"data lost at {off}"
    h.shutdown()

    # The filter, its place and its group's limits are recorded.
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert q.cmd("query-block-exports")[0]["node-name"] == "t0"
        q.cmd("blockdev-remove-node", filter="t0")
        q.cmd("blockdev-del", node_name="t0")
        assert "t0" not in {n["node-name"] for n in
                            q.cmd("query-named-block-nodes")}
    h = srv.connect("disk0")
    off, b = next(iter(w.written.items()))
    assert h.pread(len(b), off) == b
    h.shutdown()
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert q.cmd("query-block-exports")[0]["node-name"] == "disk0"
    srv.stop()
    qemu_img_check(img)


def test_permission_conflict_names_both_users(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    img = make_image(tmp_path / "f.img", 0)
    run(["qemu-img", "create", "-f", "qcow2", img, "16M"])
    with QMP(srv.admin) as q:
        q.cmd_args("blockdev-add", {"driver": "file", "node-name": "f0",
                                    "filename": img})
        q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "q0",
                                    "file": "f0"})
        with pytest.raises(QMPError) as e:
            q.cmd("block-export-add", type="nbd", id="raw-f0",
                  node_name="f0", writable=True)
        assert "conflicting permissions on node 'f0'" in e.value.desc
        assert "export 'raw-f0'" in e.value.desc
        assert "node 'q0' (child 'file')" in e.value.desc
        assert q.cmd("query-block-exports") == []
        # Reading the file under the qcow2 node is allowed.
        q.cmd("block-export-add", type="nbd", id="ro-f0", node_name="f0")
        q.cmd("block-export-add", type="nbd", id="q", node_name="q0",
              writable=True)
        # A second writable qcow2 on the same file is not.
        with pytest.raises(QMPError) as e:
            q.cmd_args("blockdev-add", {"driver": "qcow2",
                                        "node-name": "q1", "file": "f0"})
        assert "conflicting permissions" in e.value.desc
        assert "q1" not in {n["node-name"] for n in
                            q.cmd("query-named-block-nodes")}
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert sorted(e["id"] for e in q.cmd("query-block-exports")) == \
            ["q", "ro-f0"]


def test_delete_in_use(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    img = make_image(tmp_path / "d.img", 4 * MiB)
    with QMP(srv.admin) as q:
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "d0",
                                    "file": {"driver": "file",
                                             "filename": img}})
        q.cmd("block-export-add", type="nbd", id="e0", node_name="d0")
        with pytest.raises(QMPError) as e:
            q.cmd("blockdev-del", node_name="d0")
        assert e.value.desc == "node 'd0' is in use by export 'e0'"
        with pytest.raises(QMPError) as e:
            q.cmd("block-export-del", id="nope")
        assert e.value.cls == "DeviceNotFound"
        q.cmd("block-export-del", id="e0")
        q.cmd("blockdev-del", node_name="d0")
        assert q.cmd("query-named-block-nodes") == []
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert q.cmd("query-named-block-nodes") == []
        assert q.cmd("query-block-exports") == []


def test_export_del_safe_refuses_hard_disconnects(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    img = make_image(tmp_path / "d.img", 4 * MiB)
    with QMP(srv.admin) as q, QMP(srv.admin) as watcher:
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "d0",
                                    "file": {"driver": "file",
                                             "filename": img}})
        q.cmd("block-export-add", type="nbd", id="e0", node_name="d0",
              writable=True)
        h = srv.connect("d0")
        h.pwrite(b"x" * 4096, 0)
        conns = q.cmd("query-connections")
        assert len(conns) == 1
        assert conns[0]["export"] == "e0"
        assert conns[0]["bytes-written"] == 4096
        assert conns[0]["tls"] is False
        assert q.cmd("query-block-exports")[0]["connections"] == 1
        with pytest.raises(QMPError) as e:
            q.cmd("block-export-del", id="e0")
        assert "1 client connected" in e.value.desc
        assert h.pread(4096, 0) == b"x" * 4096
        q.cmd("block-export-del", id="e0", mode="hard")
        ev = watcher.wait_event("BLOCK_EXPORT_DELETED")
        assert ev["data"] == {"id": "e0"}
        assert ev["timestamp"]["seconds"] > 0
        with pytest.raises(nbd.Error):
            h.pread(4096, 0)
        assert q.cmd("query-block-exports") == []
        out = run(["nbdinfo", "--list", srv.uri("")], check=False)
        assert "d0" not in out.stdout


def test_transaction_is_all_or_nothing(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    img = make_image(tmp_path / "d.img", 4 * MiB)
    add = {"type": "blockdev-add",
           "data": {"driver": "raw", "node-name": "d0",
                    "file": {"driver": "file", "filename": img}}}
    exp = {"type": "block-export-add",
           "data": {"type": "nbd", "id": "e0", "node-name": "d0"}}
    with QMP(srv.admin) as q:
        with pytest.raises(QMPError) as e:
            q.cmd("transaction", actions=[add, exp, exp])
        assert "action 2" in e.value.desc
        assert "already" in e.value.desc
        assert q.cmd("query-named-block-nodes") == []
        assert q.cmd("query-block-exports") == []
        with pytest.raises(QMPError) as e:
            q.cmd("transaction", actions=[{"type": "quit"}])
        assert "cannot be part of a transaction" in e.value.desc
        q.cmd("transaction", actions=[add, exp])
        assert [e["id"] for e in q.cmd("query-block-exports")] == ["e0"]
    db = sqlite3.connect(str(srv.state / "catalog.db"))
    assert [r[0] for r in db.execute("select name from nodes")] == ["d0"]
    assert [r[0] for r in db.execute("select id from exports")] == ["e0"]
    db.close()


def test_two_admin_clients(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    img = make_image(tmp_path / "d.img", 4 * MiB)
    with QMP(srv.admin) as a, QMP(srv.admin) as b:
        a.cmd_args("blockdev-add", {"driver": "raw", "node-name": "d0",
                                    "file": {"driver": "file",
                                             "filename": img}})
        assert "d0" in {n["node-name"] for n in
                        b.cmd("query-named-block-nodes")}
        b.cmd("block-export-add", type="nbd", id="e0", node_name="d0")
        assert [e["id"] for e in a.cmd("query-block-exports")] == ["e0"]
        a.cmd("block-export-del", id="e0")
        assert a.wait_event("BLOCK_EXPORT_DELETED")["data"]["id"] == "e0"
        assert b.wait_event("BLOCK_EXPORT_DELETED")["data"]["id"] == "e0"


def test_audit_log(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    img = make_image(tmp_path / "d.img", 4 * MiB)
    with QMP(srv.admin) as q:
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "d0",
                                    "file": {"driver": "file",
                                             "filename": img}})
        with pytest.raises(QMPError):
            q.cmd("blockdev-del", node_name="missing")
    db = sqlite3.connect(str(srv.state / "catalog.db"))
    rows = db.execute("select uid, pid, command, arguments, result "
                      "from audit order by id").fetchall()
    db.close()
    assert [r[2] for r in rows] == ["blockdev-add", "blockdev-del"]
    assert all(r[0] == os.getuid() and r[1] == os.getpid() for r in rows)
    assert json.loads(rows[0][3])["node-name"] == "d0"
    assert rows[0][4] is None
    assert "missing" in rows[1][4]


def test_stats(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    img = make_image(tmp_path / "d.img", 4 * MiB)
    with QMP(srv.admin) as q:
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "d0",
                                    "file": {"driver": "file",
                                             "filename": img}})
        q.cmd("block-export-add", type="nbd", id="e0", node_name="d0",
              writable=True)
        h = srv.connect("d0", strict=False)
        h.pwrite(b"a" * 8192, 0)
        h.pread(4096, 0)
        h.flush()
        h.zero(4096, 65536)
        h.trim(4096, 65536)
        with pytest.raises(nbd.Error):
            h.pread(4096, 4 * MiB)
        st = q.cmd("query-stats")
        assert st["connections"] == 1
        assert st["nodes"] == 2
        e = st["exports"][0]
        assert (e["id"], e["wr_operations"], e["wr_bytes"], e["rd_operations"],
                e["rd_bytes"], e["flush_operations"], e["zero_operations"],
                e["discard_operations"], e["failed_operations"]) == \
            ("e0", 1, 8192, 1, 4096, 1, 1, 1, 1)
        h.shutdown()


def test_command_line_definitions_are_not_recorded(nbdd_server, tmp_path):
    img = make_image(tmp_path / "d.img", 4 * MiB)
    srv = start(nbdd_server, tmp_path, [
        "--blockdev", f"driver=raw,node-name=cli0,file.driver=file,"
        f"file.filename={img}",
        "--export", "type=nbd,id=cli,node-name=cli0"])
    with QMP(srv.admin) as q:
        assert [e["id"] for e in q.cmd("query-block-exports")] == ["cli"]
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert q.cmd("query-block-exports") == []
        assert q.cmd("query-named-block-nodes") == []


def daemon_fails(tmp_path, args):
    """Start nbdd expecting it to refuse: its exit status and stderr."""
    p = subprocess.run([NBDD, "-f", "--exit-with-parent",
                        "--listen", "unix:" + str(tmp_path / "x.sock")] +
                       args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=30)
    return p.returncode, p.stderr


def test_catalogue_errors_stop_the_start(nbdd_server, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    db = state / "catalog.db"
    db.write_bytes(b"this is not a database" * 100)
    rc, err = daemon_fails(tmp_path, ["--state-dir", str(state)])
    assert rc == 1 and "corrupt" in err, err
    assert not (tmp_path / "x.sock").exists()

    db.unlink()
    c = sqlite3.connect(str(db))
    c.execute("pragma user_version = 99")
    c.commit()
    c.close()
    rc, err = daemon_fails(tmp_path, ["--state-dir", str(state)])
    assert rc == 1 and "newer" in err, err

    db.unlink()
    srv = start(nbdd_server, tmp_path)
    srv.stop()
    c = sqlite3.connect(str(db), isolation_level=None)
    c.execute("begin exclusive")
    try:
        rc, err = daemon_fails(tmp_path, ["--state-dir", str(state)])
    finally:
        c.execute("rollback")
        c.close()
    assert rc == 1 and "locked" in err, err


def test_two_daemons_on_one_state_dir(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    rc, err = daemon_fails(tmp_path, ["--state-dir", str(srv.state)])
    assert rc == 1 and "in use" in err, err
    with QMP(srv.admin) as q:
        assert q.cmd("query-version")


def test_recorded_node_that_cannot_open_stops_the_start(nbdd_server,
                                                        tmp_path):
    srv = start(nbdd_server, tmp_path)
    img = make_image(tmp_path / "d.img", 4 * MiB)
    with QMP(srv.admin) as q:
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "d0",
                                    "file": {"driver": "file",
                                             "filename": img}})
    srv.stop()
    os.unlink(img)
    rc, err = daemon_fails(tmp_path, ["--state-dir", str(srv.state)])
    assert rc == 1
    assert "node 'd0'" in err and "d.img" in err, err


def test_quit(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert q.cmd("quit") == {}
    srv.proc.wait(timeout=20)
    assert srv.proc.returncode == 0
    assert not os.path.exists(srv.admin)


def test_blockdev_snapshot_moves_the_export_to_the_overlay(nbdd_server,
                                                           tmp_path):
    srv = start(nbdd_server, tmp_path)
    ov_img = str(tmp_path / "ov.qcow2")
    a, b = pattern(10, MiB), pattern(11, MiB)
    with QMP(srv.admin) as q:
        base_img = qcow2_graph(q, tmp_path, size=16 * MiB)
        q.cmd("block-export-add", type="nbd", id="e0", node_name="disk0",
              writable=True)
        h = srv.connect("disk0")
        h.pwrite(a, 0)
        h.pwrite(a, 4 * MiB)
        w = Writer(srv, "disk0", 2 * MiB)
        w.start()
        q.cmd("blockdev-create", options={
            "driver": "qcow2", "size": 16 * MiB,
            "backing-file": base_img, "backing-fmt": "qcow2",
            "file": {"driver": "file", "filename": ov_img}})
        q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "ov",
                                    "backing": None,
                                    "file": {"driver": "file",
                                             "filename": ov_img}})
        # Refused: a raw overlay, and the node as its own overlay.
        with pytest.raises(QMPError) as e:
            q.cmd("blockdev-snapshot", node="disk0", overlay="disk0")
        assert "own overlay" in e.value.desc
        time.sleep(0.2)
        q.cmd("blockdev-snapshot", node="disk0", overlay="ov")
        time.sleep(0.2)
        w.stop_flag.set()
        w.join(60)
        assert w.error is None, w.error
        assert w.nr_batches > 2
        assert q.cmd("query-block-exports")[0]["node-name"] == "ov"
        nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
        assert {"child": "backing", "node-name": "disk0"} in \
            nodes["ov"]["children"]
        assert [(u["kind"], u["name"]) for u in nodes["disk0"]["users"]] == \
            [("node", "ov")]
        # A second snapshot onto the same overlay is refused.
        with pytest.raises(QMPError) as e:
            q.cmd("blockdev-snapshot", node="disk0", overlay="ov")
        assert "in use" in e.value.desc
        h.pwrite(b, 4 * MiB)
        h.flush()
        assert h.pread(MiB, 4 * MiB) == b
        assert h.pread(MiB, 8 * MiB) == bytes(MiB)
        got = h.pread(2 * MiB, 0)
        for off, data in w.written.items():
            assert got[off:off + len(data)] == data
        h.shutdown()

    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert q.cmd("query-block-exports")[0]["node-name"] == "ov"
    h = srv.connect("disk0")
    assert h.pread(MiB, 4 * MiB) == b
    assert h.pread(2 * MiB, 0) == got
    h.shutdown()
    srv.stop()
    qemu_img_check(base_img)
    qemu_img_check(ov_img)
    # The old top kept what it had at the snapshot; qemu sees the chain.
    base = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 8M 1M",
                base_img]).stdout
    assert "read 1048576/1048576" in base
    info = json.loads(run(["qemu-img", "info", "--output=json",
                           "--backing-chain", ov_img]).stdout)
    assert info[0]["backing-filename"] == base_img
    converted = str(tmp_path / "flat.raw")
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", ov_img,
         converted])
    with open(converted, "rb") as f:
        assert f.read(2 * MiB) == got
        f.seek(4 * MiB)
        assert f.read(MiB) == b
    with open(converted, "rb") as f:
        f.seek(4 * MiB)
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov_img,
         converted])


def test_throttled_client_does_not_hold_up_others(nbdd_server, tmp_path):
    """Requests a throttle holds back sleep on worker threads; the pool
    grows past --threads so that other exports are still served."""
    srv = start(nbdd_server, tmp_path, ["--threads", "4"])
    slow_img = make_image(tmp_path / "slow.img", 4 * MiB)
    fast_img = make_image(tmp_path / "fast.img", 4 * MiB)
    with QMP(srv.admin) as q:
        for name, img in (("slow", slow_img), ("fast", fast_img)):
            q.cmd_args("blockdev-add", {"driver": "raw", "node-name": name,
                                        "file": {"driver": "file",
                                                 "filename": img}})
        q.cmd_args("blockdev-add", {"driver": "throttle", "node-name": "t0",
                                    "limits": {"iops-total": 2},
                                    "file": "slow"})
        q.cmd("block-export-add", type="nbd", id="slow", node_name="t0")
        q.cmd("block-export-add", type="nbd", id="fast", node_name="fast",
              writable=True)
    slow = srv.connect("t0")
    # 32 reads at 2 per second: 16 s of queue, far more than 4 workers.
    for i in range(32):
        slow.aio_pread(nbd.Buffer(4096), i * 4096)
    time.sleep(0.5)
    fast = srv.connect("fast")
    t = time.monotonic()
    # Writes: they always need a worker (small reads of cached data
    # are served on the event loop).
    for i in range(50):
        fast.pwrite(b"w" * 4096, i * 4096)
    elapsed = time.monotonic() - t
    # Held up behind the throttle, this would take most of 16 s.
    assert elapsed < 8, f"the unthrottled export took {elapsed:.1f} s"
    fast.shutdown()
    # Taking the throttle out drains it: the backlog goes at once.
    t = time.monotonic()
    with QMP(srv.admin) as q:
        q.cmd("blockdev-remove-node", filter="t0")
    while slow.aio_in_flight() > 0:
        slow.poll(-1)
    assert time.monotonic() - t < 8
    slow.shutdown()


def test_client_closing_with_replies_pending(nbdd_server, tmp_path):
    """Commands pipelined and the socket closed at once: the replies
    have nowhere to go, and the daemon must not care."""
    srv = start(nbdd_server, tmp_path)
    burst = b'{"execute": "qmp_capabilities"}\n' + \
        b'{"execute": "query-named-block-nodes"}\n' * 200
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.admin)
        s.sendall(burst)
        s.close()
    with QMP(srv.admin) as q:
        assert q.cmd("query-version")["package"].startswith("nbdd ")
    assert srv.alive()


def test_session_that_does_not_read(nbdd_server, tmp_path):
    """Replies go out before more is read: a client that sends and never
    reads is not answered without bound, and others are served."""
    srv = start(nbdd_server, tmp_path)
    lazy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lazy.connect(srv.admin)
    lazy.setblocking(False)
    sent = 0
    msg = b'{"execute": "query-commands"}\n'
    lazy.sendall(b'{"execute": "qmp_capabilities"}\n')
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            lazy.send(msg)
            sent += 1
    except BlockingIOError:
        pass
    assert sent < 100000, "the daemon kept reading from a client " \
        "that does not read its replies"
    with QMP(srv.admin) as q:
        assert q.cmd("query-version")["package"].startswith("nbdd ")
    lazy.close()


def test_deep_json_is_refused(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        q.send_raw(b"[" * 100 + b"]" * 100 + b"\n")
        r = q.reply()
        assert "too deep" in r["error"]["desc"]
        assert q.cmd("query-version")


def test_transaction_conflicts_within_itself(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        raw_node(q, tmp_path, "d0")
        q.cmd("block-export-add", type="nbd", id="e0", node_name="d0")
        # The same export deleted twice.
        d = {"type": "block-export-del", "data": {"id": "e0"}}
        with pytest.raises(QMPError) as e:
            q.cmd("transaction", actions=[d, d])
        assert "already being deleted" in e.value.desc
        assert [x["id"] for x in q.cmd("query-block-exports")] == ["e0"]
        # A node deleted, then used: the second action cannot find it.
        q.cmd("block-export-del", id="e0")
        img = str(tmp_path / "d0.img")
        with pytest.raises(QMPError) as e:
            q.cmd("transaction", actions=[
                {"type": "blockdev-del", "data": {"node-name": "d0"}},
                {"type": "blockdev-add", "data": {
                    "driver": "raw", "node-name": "r0", "file": "d0"}}])
        assert "'d0'" in e.value.desc and "does not exist" in e.value.desc
        names = {n["node-name"] for n in q.cmd("query-named-block-nodes")}
        assert "d0" in names and "r0" not in names
        # A node deleted frees its name for the rest of the transaction
        # (its image stays open, and locked, until the commit).
        q.cmd("transaction", actions=[
            {"type": "blockdev-del", "data": {"node-name": "d0"}},
            {"type": "blockdev-add", "data": {
                "driver": "raw", "node-name": "d0",
                "file": {"driver": "file", "filename": img,
                         "locking": "off", "read-only": True}}}])
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert [n["node-name"] for n in q.cmd("query-named-block-nodes")
                if not n["node-name"].startswith("#")] == ["d0"]


def test_failed_transaction_undoes_graph_changes(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    ov_img = str(tmp_path / "ov.qcow2")
    with QMP(srv.admin) as q:
        base_img = qcow2_graph(q, tmp_path, size=16 * MiB)
        q.cmd("block-export-add", type="nbd", id="e0", node_name="disk0",
              writable=True)
        q.cmd_args("blockdev-add", {"driver": "throttle", "node-name": "t0",
                                    "limits": {"iops-total": 100000},
                                    "file": "disk0"})
        q.cmd("blockdev-create", options={
            "driver": "qcow2", "size": 16 * MiB, "backing-file": base_img,
            "backing-fmt": "qcow2",
            "file": {"driver": "file", "filename": ov_img}})
        q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "ov",
                                    "backing": None,
                                    "file": {"driver": "file",
                                             "filename": ov_img}})
        w = Writer(srv, "disk0", 4 * MiB)
        w.start()
        try:
            for actions in (
                    [{"type": "blockdev-insert-node",
                      "data": {"node": "disk0", "filter": "t0"}}, FAIL],
                    [{"type": "blockdev-snapshot",
                      "data": {"node": "disk0", "overlay": "ov"}}, FAIL]):
                time.sleep(0.2)
                with pytest.raises(QMPError):
                    q.cmd("transaction", actions=actions)
                assert q.cmd("query-block-exports")[0]["node-name"] == \
                    "disk0"
            q.cmd("blockdev-insert-node", node="disk0", filter="t0")
            time.sleep(0.2)
            with pytest.raises(QMPError):
                q.cmd("transaction", actions=[
                    {"type": "blockdev-remove-node",
                     "data": {"filter": "t0"}}, FAIL])
            assert q.cmd("query-block-exports")[0]["node-name"] == "t0"
            nodes = {n["node-name"]: n for n in
                     q.cmd("query-named-block-nodes")}
            assert [u["name"] for u in nodes["t0"]["users"]] == ["e0"]
            assert [u["name"] for u in nodes["disk0"]["users"]] == ["t0"]
            assert nodes["ov"]["users"] == []
            assert {"child": "backing", "node-name": "disk0"} not in \
                nodes["ov"]["children"]
            time.sleep(0.2)
        finally:
            w.stop_flag.set()
            w.join(60)
        assert w.error is None, w.error
    # Every acknowledged write is in the export, none went to the
    # overlay that was taken back.
    h = srv.connect("disk0")
    for off, b in w.written.items():
        assert h.pread(len(b), off) == b, f"write at {off} lost"
    h.shutdown()
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert q.cmd("query-block-exports")[0]["node-name"] == "t0"


def test_blockdev_snapshot_refusals(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        qcow2_graph(q, tmp_path, size=16 * MiB)
        raw_node(q, tmp_path, "r0")
        with pytest.raises(QMPError) as e:
            q.cmd("blockdev-snapshot", node="disk0", overlay="r0")
        assert "use a qcow2 overlay" in e.value.desc
        small = str(tmp_path / "small.qcow2")
        run(["qemu-img", "create", "-f", "qcow2", small, "8M"])
        q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "small",
                                    "backing": None,
                                    "file": {"driver": "file",
                                             "filename": small}})
        with pytest.raises(QMPError) as e:
            q.cmd("blockdev-snapshot", node="disk0", overlay="small")
        assert "smaller" in e.value.desc
        ro = str(tmp_path / "ro.qcow2")
        run(["qemu-img", "create", "-f", "qcow2", ro, "16M"])
        q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "ro",
                                    "read-only": True, "backing": None,
                                    "file": {"driver": "file",
                                             "filename": ro}})
        with pytest.raises(QMPError) as e:
            q.cmd("blockdev-snapshot", node="disk0", overlay="ro")
        assert "read-only" in e.value.desc
        with pytest.raises(QMPError) as e:
            q.cmd("blockdev-snapshot", node="disk0", overlay="nope")
        assert e.value.cls == "DeviceNotFound"


def test_recorded_nodes_may_use_command_line_nodes(nbdd_server, tmp_path):
    img = make_image(tmp_path / "d.img", 4 * MiB)
    cli = ["--blockdev", f"driver=file,node-name=f0,filename={img}"]
    srv = start(nbdd_server, tmp_path, cli)
    with QMP(srv.admin) as q:
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "r0",
                                    "file": "f0"})
        # A throttle group named like its node is no reference to it.
        q.cmd_args("blockdev-add", {"driver": "throttle", "node-name": "t0",
                                    "throttle-group": "t0", "file": "r0"})
        q.cmd("block-export-add", type="nbd", id="e0", node_name="t0")
    srv.stop()
    srv = start(nbdd_server, tmp_path, cli)
    with QMP(srv.admin) as q:
        assert q.cmd("query-block-exports")[0]["node-name"] == "t0"
    h = srv.connect("t0")
    assert h.get_size() == 4 * MiB
    h.shutdown()


def test_blockdev_replace(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    a = make_image(tmp_path / "a.img", 4 * MiB, [(0, b"A" * 4096)])
    b = make_image(tmp_path / "b.img", 4 * MiB, [(0, b"B" * 4096)])
    c = make_image(tmp_path / "c.img", 8 * MiB)
    with QMP(srv.admin) as q:
        for name, img in (("fa", a), ("fb", b), ("fc", c)):
            q.cmd_args("blockdev-add", {"driver": "file", "node-name": name,
                                        "filename": img})
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "r0",
                                    "file": "fa"})
        q.cmd("block-export-add", type="nbd", id="e0", node_name="r0",
              name="disk")
        q.cmd("block-export-add", type="nbd", id="e1", node_name="fa",
              name="plain")
        h = srv.connect("disk")
        assert h.pread(4, 0) == b"AAAA"
        # The node under an export...
        q.cmd("blockdev-replace", parent_type="export", export_id="e1",
              new_child="fb")
        # ...and a node's child.
        q.cmd("blockdev-replace", parent_type="driver", node_name="r0",
              child="file", new_child="fb")
        assert h.pread(4, 0) == b"BBBB"
        with pytest.raises(QMPError) as e:
            q.cmd("blockdev-replace", parent_type="driver", node_name="r0",
                  child="file", new_child="fc")
        assert "same size" in e.value.desc
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "r1",
                                    "file": "r0"})
        with pytest.raises(QMPError) as e:
            q.cmd("blockdev-replace", parent_type="driver", node_name="r0",
                  child="file", new_child="r1")
        assert "loop" in e.value.desc
        with pytest.raises(QMPError) as e:
            q.cmd("blockdev-replace", parent_type="driver", node_name="r0",
                  child="backing", new_child="fa")
        assert "no child 'backing'" in e.value.desc
        assert h.pread(4, 0) == b"BBBB"
        h.shutdown()
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        exports = {e["id"]: e["node-name"] for e in
                   q.cmd("query-block-exports")}
        assert exports == {"e0": "r0", "e1": "fb"}
    for name in ("disk", "plain"):
        h = srv.connect(name)
        assert h.pread(4, 0) == b"BBBB"
        h.shutdown()


def test_admin_group(nbdd_server, tmp_path):
    """--admin-group: the socket is 0660 in that group, and its members
    (here 'nobody', whose group is 'nogroup') are served."""
    import grp
    gid = grp.getgrnam("nogroup").gr_gid
    sockdir = tempfile.mkdtemp(prefix="nbdd-admin-")
    os.chmod(sockdir, 0o711)
    try:
        path = sockdir + "/admin.sock"
        srv = start(nbdd_server, tmp_path, ["--admin-socket", path,
                                            "--admin-group", "nogroup"])
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == gid
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(65534)
                with QMP(path) as q:
                    os.write(w, q.cmd("query-version")["package"].encode())
            finally:
                os._exit(0)
        os.close(w)
        got = os.read(r, 4096).decode()
        os.close(r)
        os.waitpid(pid, 0)
        assert got.startswith("nbdd "), got
        srv.stop()
    finally:
        shutil.rmtree(sockdir)


@pytest.mark.parametrize("cluster", ["64k", "512"])
def test_block_resize_qcow2(nbdd_server, tmp_path, cluster):
    """Growing a qcow2 node: its L1 table grows (with 512-byte clusters
    to many clusters), the image checks clean, and old and new areas
    hold what was written."""
    srv = start(nbdd_server, tmp_path)
    img = str(tmp_path / "g.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         f"cluster_size={cluster}", img, "1M"])
    new_size = 2 << 30 if cluster == "64k" else 64 * MiB
    a, b = pattern(20, 65536), pattern(21, 65536)
    with QMP(srv.admin) as q:
        q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "g",
                                    "file": {"driver": "file",
                                             "filename": img}})
        q.cmd("block-export-add", type="nbd", id="e0", node_name="g",
              writable=True)
        h = srv.connect("g")
        h.pwrite(a, 0)
        h.flush()
        q.cmd("block_resize", node_name="g", size=new_size)
        with pytest.raises(QMPError) as e:
            q.cmd("block_resize", node_name="g", size=MiB)
        assert "cannot shrink" in e.value.desc
        h.shutdown()
        nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
        assert nodes["g"]["image"]["virtual-size"] == new_size
    h = srv.connect("g")
    assert h.get_size() == new_size
    h.pwrite(b, new_size - 65536)
    h.flush()
    assert h.pread(65536, 0) == a
    assert h.pread(65536, new_size - 65536) == b
    assert h.pread(4096, new_size // 2) == bytes(4096)
    h.shutdown()
    srv.stop()
    qemu_img_check(img)
    info = json.loads(run(["qemu-img", "info", "--output=json", img]).stdout)
    assert info["virtual-size"] == new_size
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 1M 1M", img])
    got = run(["qemu-io", "-f", "qcow2", "-c",
               f"read -v {new_size - 65536} 16", img]).stdout
    assert got.split("\n")[0].split(":")[1].split()[:4] == \
        [f"{x:02x}" for x in b[:4]]


def test_block_resize_raw_and_refusals(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    img = make_image(tmp_path / "r.img", 4 * MiB)
    with QMP(srv.admin) as q:
        raw_node(q, tmp_path, "r0")
        q.cmd("block_resize", node_name="r0", size=8 * MiB)
        assert os.path.getsize(tmp_path / "r0.img") == 8 * MiB
        q.cmd_args("blockdev-add", {"driver": "throttle", "node-name": "t0",
                                    "file": "r0"})
        with pytest.raises(QMPError) as e:
            q.cmd("block_resize", node_name="r0", size=16 * MiB)
        assert "used by node 't0'" in e.value.desc
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "win",
                                    "offset": 4096, "file": {
                                        "driver": "file",
                                        "filename": img}})
        with pytest.raises(QMPError) as e:
            q.cmd("block_resize", node_name="win", size=16 * MiB)
        assert "Operation not supported" in e.value.desc
        with pytest.raises(QMPError) as e:
            q.cmd("transaction", actions=[{"type": "block_resize", "data": {
                "node-name": "r0", "size": 16 * MiB}}])
        assert "cannot be part of a transaction" in e.value.desc
