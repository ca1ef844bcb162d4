"""The daemon itself: command line, start-up, shutdown, limits and the
block graph options (raw windows, O_DIRECT files)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import nbd
import pytest

from conftest import NBDD, TESTS_DIR, Server, blockdev_args, export_args
from helpers import (DATA, HOLE_ZERO, KiB, MiB, connect_within,
                     file_extents, layout, map_export, nbd_errno, pattern,
                     read_file, wait_for)


def run_nbdd(args, timeout=10, **kw):
    """Run nbdd expecting it to exit by itself within @timeout."""
    try:
        return subprocess.run([NBDD] + args, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        pytest.fail(f"nbdd {args} kept running instead of exiting")


def pid_alive(pid):
    """True if @pid runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ------------------------------------------------------------ CLI

def test_version():
    p = run_nbdd(["--version"])
    assert p.returncode == 0, p
    assert "nbdd" in p.stdout
    assert any(c.isdigit() for c in p.stdout)


def test_help():
    p = run_nbdd(["--help"])
    assert p.returncode == 0, p
    for opt in ("--blockdev", "--export", "--listen", "--stdio",
                "--pidfile", "--threads"):
        assert opt in p.stdout, opt


@pytest.fixture
def img(raw_image):
    return raw_image(4 * MiB, [(0, b"nbdd" * 1024)])


def bad(tmp_path, img, extra, blockdev=None, export=None):
    """nbdd with @extra options and an otherwise valid set-up."""
    if blockdev is None:
        blockdev = blockdev_args(img, node="d0")
    if export is None:
        export = export_args(node="d0", name="disk0")
    return run_nbdd(["-f", "--exit-with-parent",
                     "--listen", f"unix:{tmp_path}/bad.sock"] +
                    extra + blockdev + export)


def assert_one_line_error(p, *words):
    """Non-zero exit and a one-line message naming one of @words (a
    "Try --help" hint may follow it, nothing else)."""
    assert p.returncode != 0, p
    lines = [line for line in p.stderr.splitlines()
             if line.strip() and "--help" not in line]
    assert len(lines) == 1, f"expected one line, got:\n{p.stderr}"
    assert any(w in lines[0] for w in words), \
        f"message does not name {words}: {lines[0]!r}"


@pytest.mark.parametrize("extra,words", [
    (["--threads", "0"], ["threads"]),
    (["--threads", "abc"], ["threads"]),
    (["--threads", "-3"], ["threads"]),
    (["--max-connections", "abc"], ["max-connections"]),
    (["--handshake-timeout", "abc"], ["handshake-timeout"]),
    (["--poll-max-ns", "abc"], ["poll-max-ns"]),
    (["--poll-max-ns", "-1"], ["poll-max-ns"]),
    (["--poll-max-ns", "10000001"], ["poll-max-ns"]),
    (["--listen", "foo:bar"], ["listen", "foo:bar"]),
    (["--listen", "tcp:127.0.0.1:notaport"], ["listen", "notaport"]),
], ids=["threads-0", "threads-abc", "threads-neg", "max-conn-abc",
        "handshake-abc", "poll-abc", "poll-neg", "poll-huge", "listen-foo",
        "listen-port"])
def test_bad_option(tmp_path, img, extra, words):
    assert_one_line_error(bad(tmp_path, img, extra), *words)


def test_address_in_use(tmp_path, img):
    """A TCP address that is taken is a start-up error naming it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        p = bad(tmp_path, img, ["--listen", f"tcp:127.0.0.1:{port}"])
    assert_one_line_error(p, str(port))


def test_unknown_option(tmp_path, img):
    assert_one_line_error(bad(tmp_path, img, ["--no-such-option"]),
                          "no-such-option")


def test_unknown_driver(tmp_path, img):
    p = bad(tmp_path, img, [],
            blockdev=["--blockdev", "driver=nosuch,node-name=d0"])
    assert_one_line_error(p, "nosuch")


def test_missing_file(tmp_path, img):
    missing = str(tmp_path / "missing.img")
    p = bad(tmp_path, img, [], blockdev=blockdev_args(missing, node="d0"))
    assert_one_line_error(p, "missing.img")


def test_export_unknown_node(tmp_path, img):
    p = bad(tmp_path, img, [], export=export_args(node="nonode"))
    assert_one_line_error(p, "nonode")


def test_duplicate_export_name(tmp_path, img):
    p = bad(tmp_path, img, [],
            export=export_args(node="d0", name="dupname") +
            ["--export", "type=nbd,id=other,node-name=d0,name=dupname"])
    assert_one_line_error(p, "dupname")


def test_duplicate_node_name(tmp_path, img):
    p = bad(tmp_path, img, [],
            blockdev=blockdev_args(img, node="d0") +
            blockdev_args(img, node="d0"))
    assert_one_line_error(p, "d0")


def test_malformed_spec(tmp_path, img):
    p = bad(tmp_path, img, [], blockdev=["--blockdev", '{"driver": "raw",'])
    assert_one_line_error(p, "blockdev", "JSON", "json")


# ------------------------------------------------- configuration forms

def test_json_specs(nbdd_server, img):
    """--blockdev and --export also take JSON."""
    bd = {"driver": "raw", "node-name": "d",
          "file": {"driver": "file", "filename": img}}
    ex = {"type": "nbd", "id": "e", "node-name": "d", "name": "j",
          "writable": True}
    srv = nbdd_server(["--blockdev", json.dumps(bd),
                       "--export", json.dumps(ex)])
    h = srv.connect(export="j")
    assert not h.is_read_only()
    assert h.pread(4096, 0) == b"nbdd" * 1024
    h.pwrite(b"json", 4096)
    h.shutdown()
    assert read_file(img, 4096, 4) == b"json"


def test_keyval_doubled_comma(nbdd_server, raw_image):
    """A ',,' in a keyval value is a literal comma."""
    path = raw_image(1 * MiB, [(0, b"comma")], name="a,b.img")
    srv = nbdd_server(["--blockdev",
                       "driver=raw,node-name=d,file.driver=file,"
                       "file.filename=" + path.replace(",", ",,")] +
                      export_args(node="d", description="x,,y"))
    h = srv.connect(set_full_info=True)
    assert h.get_export_description() == "x,y"
    assert h.pread(5, 0) == b"comma"
    h.shutdown()


def test_export_name_defaults_to_node(nbdd_server, img):
    srv = nbdd_server(blockdev_args(img, node="mynode") +
                      ["--export", "type=nbd,id=e,node-name=mynode"])
    h = srv.connect(export="mynode", set_full_info=True)
    assert h.get_canonical_export_name() == "mynode"
    assert h.pread(4096, 0) == b"nbdd" * 1024
    h.shutdown()


@pytest.mark.parametrize("extra", ["", ",writable=off"],
                         ids=["absent", "off"])
def test_read_only_by_default(nbdd_server, img, extra):
    srv = nbdd_server(blockdev_args(img) +
                      ["--export", "type=nbd,id=e,node-name=disk0,"
                       "name=disk0" + extra])
    h = srv.connect(strict=False)
    assert h.is_read_only()
    assert nbd_errno(h.pwrite, b"x", 0) == "EPERM"
    h.shutdown()
    assert read_file(img, 0, 4) == b"nbdd"


def test_threads_one(nbdd_server, img):
    """With a single worker thread, many requests in flight still all
    complete."""
    srv = nbdd_server(["--threads", "1"] + blockdev_args(img) +
                      export_args())
    h = srv.connect()
    bufs = [nbd.Buffer(4096) for _ in range(64)]
    for i in range(64):
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i]) * 4096),
                     MiB + i * 4096)
    for i, b in enumerate(bufs):
        h.aio_pread(b, MiB + i * 4096)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i, b in enumerate(bufs):
        assert b.to_bytearray() == bytearray([i]) * 4096
    h.shutdown()


def cpu_seconds(pid):
    """User plus system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("poll", ["0", "64000", "10000000"])
def test_polling_serves_and_idles(nbdd_server, img, poll):
    """Whatever --poll-max-ns allows, queue-depth-1 traffic (reads the
    loop serves itself, writes the workers do) is served right, and once
    the client goes quiet the daemon stops polling: a second of idle
    costs it next to no CPU, even with the longest window allowed."""
    srv = nbdd_server(["-v", "--poll-max-ns", poll] + blockdev_args(img) +
                      export_args(writable=True))
    h = srv.connect()
    for i in range(2000):
        off = (i * 7919 % 1024) * 4096
        if i % 2:
            h.pwrite(bytes([i % 251]) * 4096, off)
            assert h.pread(4096, off) == bytes([i % 251]) * 4096
        else:
            h.pread(4096, off)
    pid = srv.proc.pid
    time.sleep(0.2)
    before = cpu_seconds(pid)
    time.sleep(1)
    idle = cpu_seconds(pid) - before
    assert idle < 0.1, f"{idle:.2f} s of CPU in a second of idle"
    h.shutdown()
    srv.stop()
    # With the longest window, polling engaged and caught requests; with
    # none, it never ran.
    m = re.search(r"event loop: polled (\d+) times, (\d+) found input",
                  srv.output())
    if poll == "0":
        assert m is None, srv.output()
    else:
        assert m, srv.output()
        if poll == "10000000":
            assert int(m.group(2)) > 0, m.group(0)


def test_client_vanishes_mid_request(nbdd_server, img):
    """Clients that hang up with replies still owed (large reads in
    flight) do not take the daemon down."""
    srv = nbdd_server(blockdev_args(img) + export_args())
    for _ in range(5):
        h = srv.connect()
        for i in range(32):
            h.aio_pread(nbd.Buffer(MiB), (i % 4) * MiB)
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(4 * MiB)), 0)
        h.poll(0)
        del h                   # closes the socket, no NBD_CMD_DISC
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(srv.sock)
    raw.close()                 # before even reading the greeting
    time.sleep(0.2)
    assert srv.alive()
    h = srv.connect(tcp=True)
    assert h.pread(4, 0) == b"nbdd"
    h.shutdown()


def test_many_clients(nbdd_server, img):
    """Fifty clients at once, each served."""
    srv = nbdd_server(blockdev_args(img) + export_args())
    hs = [srv.connect(tcp=(i % 2 == 0)) for i in range(50)]
    for i, h in enumerate(hs):
        h.pwrite(bytes([i]) * 512, MiB + i * 512)
    for i, h in enumerate(hs):
        assert h.pread(512, MiB + i * 512) == bytes([i]) * 512
        h.shutdown()


def test_several_listeners(nbdd_server, img, tmp_path):
    """Every --listen address serves."""
    second = str(tmp_path / "second.sock")
    srv = nbdd_server(["--listen", "unix:" + second] + blockdev_args(img) +
                      export_args())
    for uri in (srv.uri(), srv.uri(tcp=True),
                f"nbd+unix:///disk0?socket={second}"):
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.pread(4, 0) == b"nbdd"
        h.shutdown()


# -------------------------------------------------- start-up and exit

def test_pidfile(nbdd_server, img):
    """The pidfile holds the daemon's pid and is removed on exit;
    SIGTERM with clients connected exits 0."""
    srv = nbdd_server(blockdev_args(img) + export_args())
    with open(srv.pidfile) as f:
        assert int(f.read().strip()) == srv.proc.pid
    h1 = srv.connect()
    h2 = srv.connect(tcp=True)
    assert h1.pread(4, 0) == b"nbdd"
    srv.stop()
    assert srv.proc.returncode == 0
    assert not os.path.exists(srv.pidfile)
    # The clients see the connection gone.
    with pytest.raises(nbd.Error):
        h2.pread(4, 0)
    del h1


def test_sigterm_during_io(nbdd_server, img):
    """SIGTERM while requests are in flight still exits 0, promptly."""
    srv = nbdd_server(blockdev_args(img) + export_args())
    h = srv.connect()
    for i in range(64):
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"\x5a") * 65536),
                     (i % 48) * 65536)
        h.aio_pread(nbd.Buffer(65536), (i % 48) * 65536)
    h.poll(0)
    srv.proc.send_signal(signal.SIGTERM)
    try:
        while h.aio_in_flight() > 0:
            h.poll(1000)
    except nbd.Error:
        pass                    # the server may cut the connection
    srv.proc.wait(timeout=20)
    srv.stop()


@pytest.mark.parametrize("remote", [False, True])
def test_background(tmp_path, img, remote):
    """Without -f the daemon forks: the command exits 0 with the
    listeners already open (a client may connect at once), and the
    pidfile, once written, names the background process.  Also when the
    disk is an nbd node (another nbdd's export): its connection threads
    must run in the background process, not die with the parent."""
    sock = str(tmp_path / "bg.sock")
    pidfile = str(tmp_path / "bg.pid")
    log = open(tmp_path / "bg.log", "wb")
    pid = None
    far = None
    if remote:
        (tmp_path / "far").mkdir()
        far = Server(tmp_path / "far", blockdev_args(img) + export_args(),
                     tcp=False)
        disk = ["--blockdev", json.dumps({
            "driver": "nbd", "node-name": "disk0", "export": "disk0",
            "server": {"type": "unix", "path": far.sock}})]
    else:
        disk = blockdev_args(img)
    try:
        p = subprocess.Popen([NBDD, "--pidfile", pidfile,
                              "--listen", "unix:" + sock] +
                             disk + export_args(),
                             stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT)
        try:
            rc = p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            pytest.fail("nbdd without -f did not go into the background")
        assert rc == 0, read_file(tmp_path / "bg.log")
        h = connect_within(f"nbd+unix:///disk0?socket={sock}", 10)
        assert h.pread(4, 0) == b"nbdd"
        h.shutdown()
        assert wait_for(lambda: os.path.exists(pidfile), 10)
        with open(pidfile) as f:
            pid = int(f.read().strip())
        assert pid != p.pid and pid_alive(pid)
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: not pid_alive(pid), 20), "still running"
        assert wait_for(lambda: not os.path.exists(pidfile), 5)
    finally:
        log.close()
        if pid is None and wait_for(lambda: os.path.exists(pidfile), 5):
            with open(pidfile) as f:
                pid = int(f.read().strip() or 0)
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        if far:
            far.stop()


def test_exit_with_parent(tmp_path, img):
    """--exit-with-parent: the daemon goes when its parent does."""
    pidfile = str(tmp_path / "c.pid")
    script = ('"$@" >/dev/null 2>&1 & echo $!; n=0; '
              f'while [ ! -e {pidfile} ] && [ $n -lt 200 ]; do '
              'sleep 0.05; n=$((n+1)); done')
    p = subprocess.run(["sh", "-c", script, "sh", NBDD, "-f",
                        "--exit-with-parent", "--pidfile", pidfile,
                        "--listen", f"unix:{tmp_path}/c.sock"] +
                       blockdev_args(img) + export_args(),
                       stdout=subprocess.PIPE, text=True, timeout=20)
    pid = int(p.stdout.split()[0])
    try:
        assert wait_for(lambda: not pid_alive(pid), 10), \
            "nbdd outlived its parent"
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("family", ["unix", "tcp"])
def test_socket_activation(tmp_path, img, family):
    """LISTEN_FDS=1/LISTEN_PID: nbdd serves the inherited socket on
    fd 3 and needs no --listen."""
    if family == "unix":
        path = str(tmp_path / "act.sock")
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(path)
        uri = f"nbd+unix:///disk0?socket={path}"
    else:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind(("127.0.0.1", 0))
        uri = f"nbd://127.0.0.1:{ls.getsockname()[1]}/disk0"
    ls.listen(8)
    fd = ls.fileno()

    def to_fd3():
        if fd == 3:
            os.set_inheritable(3, True)
        else:
            os.dup2(fd, 3)

    pidfile = str(tmp_path / "act.pid")
    log = open(tmp_path / "act.log", "wb")
    proc = subprocess.Popen(
        ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", NBDD, "-f",
         "--exit-with-parent", "--pidfile", pidfile] +
        blockdev_args(img) + export_args(),
        env=dict(os.environ, LISTEN_FDS="1"), preexec_fn=to_fd3,
        close_fds=False, stdout=log, stderr=subprocess.STDOUT)
    ls.close()
    try:
        assert wait_for(lambda: os.path.exists(pidfile) or
                        proc.poll() is not None, 20)
        assert proc.poll() is None, read_file(tmp_path / "act.log")
        h = connect_within(uri, 10)
        assert h.pread(4096, 0) == b"nbdd" * 1024
        h.pwrite(b"activated", 8192)
        h.shutdown()
        assert read_file(img, 8192, 9) == b"activated"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, read_file(tmp_path / "act.log")
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def have_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6(nbdd_server, img):
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    srv = nbdd_server(["--listen", f"tcp:[::1]:{port}"] +
                      blockdev_args(img) + export_args())
    h = nbd.NBD()
    h.set_export_name("disk0")
    h.connect_tcp("::1", str(port))
    assert h.pread(4, 0) == b"nbdd"
    h.shutdown()
    srv.connect().shutdown()


# ------------------------------------------------------------- limits

def test_max_connections(nbdd_server, img):
    """With --max-connections 2 a third client is turned away while
    the first two keep working; a freed slot is usable again."""
    srv = nbdd_server(["--max-connections", "2"] + blockdev_args(img) +
                      export_args())
    h1 = srv.connect()
    h2 = srv.connect(tcp=True)
    with pytest.raises(nbd.Error):
        connect_within(srv.uri(), 5)
    with pytest.raises(nbd.Error):
        connect_within(srv.uri(tcp=True), 5)
    assert h1.pread(4, 0) == b"nbdd"
    assert h2.pread(4, 0) == b"nbdd"
    h1.shutdown()
    del h1

    def third():
        try:
            return connect_within(srv.uri(), 5)
        except nbd.Error:
            return None

    h3 = wait_for(third, 10, 0.1)
    assert h3, "no connection accepted after one closed"
    assert h3.pread(4, 0) == b"nbdd"
    assert h2.pread(4, 0) == b"nbdd"
    h3.shutdown()
    h2.shutdown()


NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"


def read_until_eof(s, deadline):
    data = b""
    while True:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(4096)
        except socket.timeout:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def test_handshake_timeout(nbdd_server, img):
    """--handshake-timeout 1: clients that stall in the handshake are
    dropped after about a second; clients past the handshake are not."""
    srv = nbdd_server(["--handshake-timeout", "1"] + blockdev_args(img) +
                      export_args())
    good = srv.connect()
    t0 = time.monotonic()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(srv.sock)
    partial = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    assert partial.recv(18, socket.MSG_WAITALL)[:16] == NBDMAGIC + IHAVEOPT
    partial.sendall(b"\0\0\0\3")        # client flags, then nothing
    got, eof = read_until_eof(silent, t0 + 6)
    assert eof, "silent client still connected after 6s"
    assert got.startswith(NBDMAGIC + IHAVEOPT)
    _, eof = read_until_eof(partial, t0 + 6)
    assert eof, "stalled client still connected after 6s"
    assert time.monotonic() - t0 >= 0.9, "dropped before the timeout"
    silent.close()
    partial.close()
    # An idle client in transmission outlives the timeout.
    time.sleep(max(0, t0 + 2.2 - time.monotonic()))
    assert good.pread(4, 0) == b"nbdd"
    good.shutdown()
    srv.connect(tcp=True).shutdown()


# ----------------------------------------------------- raw windows

WIN = 1 * MiB


@pytest.fixture
def window(nbdd_server, raw_image):
    """Export 'w' of the 1 MiB window at 1 MiB of a 4 MiB image with
    data in and around the window."""
    regions = [(0, 64 * KiB), (WIN + 64 * KiB, 64 * KiB),
               (2 * WIN - 4 * KiB, 8 * KiB), (3 * WIN, 64 * KiB)]
    img = raw_image(4 * MiB, [(o, pattern(o, n)) for o, n in regions])
    srv = nbdd_server([
        "--blockdev",
        f"driver=raw,node-name=d,offset={WIN},size={WIN},"
        f"file.driver=file,file.filename={img}"] +
        export_args(node="d", name="w"))
    return srv, img, read_file(img)


def test_raw_offset_without_size(nbdd_server, raw_image):
    """A raw node with only an offset reaches to the end of the file."""
    img = raw_image(3 * MiB, [(MiB, b"start"), (3 * MiB - 3, b"end")])
    srv = nbdd_server([
        "--blockdev", f"driver=raw,node-name=d,offset={MiB},"
        f"file.driver=file,file.filename={img}"] +
        export_args(node="d", name="w"))
    h = srv.connect(export="w")
    assert h.get_size() == 2 * MiB
    assert h.pread(5, 0) == b"start"
    assert h.pread(3, 2 * MiB - 3) == b"end"
    h.shutdown()


def test_raw_window_reads(window):
    srv, img, orig = window
    h = srv.connect(export="w", add_meta_context="base:allocation")
    assert h.get_size() == WIN
    assert h.pread(WIN, 0) == orig[WIN:2 * WIN]
    assert h.pread(10, WIN - 10) == orig[2 * WIN - 10:2 * WIN]
    if file_extents(img)[:4] == [
            (64 * KiB, DATA), (WIN - 64 * KiB, HOLE_ZERO),
            (64 * KiB, DATA), (WIN - 68 * KiB, HOLE_ZERO)]:
        assert map_export(h) == layout(WIN, [(64 * KiB, 64 * KiB),
                                             (WIN - 4 * KiB, 4 * KiB)])
    h.shutdown()


def test_raw_window_writes_stay_inside(window):
    """Writes, zeroes and trims land inside the window only; past its
    end is out of range."""
    srv, img, orig = window
    h = srv.connect(export="w", strict=False)
    h.pwrite(b"\x01" * 10, 0)
    h.pwrite(b"\x02" * 10, WIN - 10)
    assert nbd_errno(h.pwrite, b"\x03" * 10, WIN - 5) == "ENOSPC"
    assert nbd_errno(h.zero, 8192, WIN - 4096) == "ENOSPC"
    assert nbd_errno(h.trim, 8192, WIN - 4096) == "EINVAL"
    assert nbd_errno(h.pread, 8192, WIN - 4096) == "EINVAL"
    h.zero(64 * KiB, 64 * KiB)
    h.trim(4 * KiB, WIN - 4 * KiB)
    h.flush()
    h.shutdown()
    now = read_file(img)
    assert now[:WIN] == orig[:WIN]
    assert now[2 * WIN:] == orig[2 * WIN:]
    assert now[WIN:WIN + 10] == b"\x01" * 10
    assert now[WIN + 64 * KiB:WIN + 128 * KiB] == bytes(64 * KiB)
    assert len(now) == 4 * MiB


# ------------------------------------------------------------- O_DIRECT

def _direct_ok(d):
    """Whether files in @d can be opened and written with O_DIRECT."""
    path = os.path.join(d, ".odirect-probe")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        os.pwrite(fd, buf, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.fixture
def direct_dir(tmp_path):
    """A directory whose filesystem supports O_DIRECT: the test's own
    tmp directory, else one under the tests directory, else skip."""
    if _direct_ok(str(tmp_path)):
        yield tmp_path
        return
    try:
        d = tempfile.mkdtemp(prefix="direct-", dir=TESTS_DIR)
    except OSError:
        pytest.skip("no O_DIRECT-capable directory")
    try:
        if not _direct_ok(d):
            pytest.skip("neither tmp nor the tests directory supports "
                        "O_DIRECT")
        from pathlib import Path
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def open_flags(pid, path):
    """The open(2) flags of each of @pid's descriptors for @path."""
    flags = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != path:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("flags:"):
                        flags.append(int(line.split()[1], 8))
        except FileNotFoundError:
            pass
    return flags


def unaligned_io(srv, img, size, data):
    """Unaligned reads, writes and zeroes through @srv's export,
    checked against the image file."""
    h = srv.connect()
    assert h.get_size() == size
    want = bytearray(data)
    for off, n in [(4095, 2), (1000, 3000), (5000, 10000), (12345, 1),
                   (size - 1000, 1000), (size - 1, 1), (MiB, 65536)]:
        assert h.pread(n, off) == bytes(want[off:off + n])
        new = pattern(off + 1, n)
        h.pwrite(new, off)
        want[off:off + n] = new
        assert h.pread(n, off) == new
    h.zero(3000, 70000)
    want[70000:73000] = bytes(3000)
    h.flush()
    assert h.pread(size, 0) == bytes(want)
    h.shutdown()
    assert read_file(img) == bytes(want)


def test_cache_direct_unaligned(nbdd_server, direct_dir):
    """With cache.direct=on, unaligned reads and writes still work
    (read-modify-write), up to the last byte of the image."""
    size = 4 * MiB
    data = pattern(9, size)
    img = str(direct_dir / "direct.img")
    with open(img, "wb") as f:
        f.write(data)
    srv = nbdd_server(blockdev_args(img, extra="file.cache.direct=on") +
                      export_args())
    flags = open_flags(srv.proc.pid, os.path.realpath(img))
    assert flags and all(f & os.O_DIRECT for f in flags), \
        f"image not opened with O_DIRECT: {[oct(f) for f in flags]}"
    unaligned_io(srv, img, size, data)


def test_cache_direct_odd_size(nbdd_server, direct_dir):
    """An image whose size is not a multiple of the block size, with
    cache.direct=on: either refused at start-up with a message naming
    the file, or served correctly (size unchanged, tail included)."""
    size = 4 * MiB + 1000
    data = pattern(10, size)
    img = str(direct_dir / "odd.img")
    with open(img, "wb") as f:
        f.write(data)
    try:
        srv = nbdd_server(blockdev_args(img, extra="file.cache.direct=on") +
                          export_args())
    except RuntimeError as e:
        msg = str(e).splitlines()
        assert "exited with 1" in msg[0], e
        assert len([m for m in msg[1:] if m.strip()]) == 1, e
        assert "odd.img" in msg[1], e
        return
    unaligned_io(srv, img, size, data)


def test_cache_direct_concurrent_rmw(nbdd_server, direct_dir):
    """Concurrent unaligned writes into the same block, from several
    connections, all survive the read-modify-write."""
    img = str(direct_dir / "direct.img")
    with open(img, "wb") as f:
        f.write(b"\xff" * MiB)
    srv = nbdd_server(["--threads", "8"] +
                      blockdev_args(img, extra="file.cache.direct=on") +
                      export_args())
    hs = [srv.connect() for _ in range(4)]
    # 4 connections x 8 requests x 100 bytes: 32 slices of the first
    # 3200 bytes, all in flight at once, most sharing a 4k block.
    for rnd in range(5):
        for i, h in enumerate(hs):
            for j in range(8):
                k = i * 8 + j
                h.aio_pwrite(nbd.Buffer.from_bytearray(
                    bytearray([rnd * 32 + k]) * 100), k * 100 + rnd * 512)
        while any(h.aio_in_flight() for h in hs):
            for h in hs:
                if h.aio_in_flight():
                    h.poll(10)
        got = hs[0].pread(3200, rnd * 512)
        want = b"".join(bytes([rnd * 32 + k]) * 100 for k in range(32))
        assert got == want, f"round {rnd}: lost updates"
    for h in hs:
        h.flush()
        h.shutdown()
