"""Resource limits a hostile or careless client must not get around:
file descriptors running out, idle handshakes filling every slot, and
replies a client never reads.  Each test ends with a real client being
served."""
import os
import resource
import socket
import struct
import subprocess
import time

import nbd
import pytest

import nbdraw
from conftest import NBDD, blockdev_args, export_args
from helpers import MiB, connect_within, wait_for

def greet(path):
    """A raw client that reads the greeting and then stalls."""
    c = nbdraw.NBDRaw.unix(path)
    c.read_greeting()
    return c.sock


def test_accept_resumes_after_emfile(tmp_path, raw_image):
    """When accept() runs out of descriptors, nbdd pauses accepting and
    resumes: once the clients are gone, a new one is served."""
    img = raw_image(4 * MiB, [(0, b"nbdd")])
    sock = str(tmp_path / "s.sock")
    pidfile = str(tmp_path / "pid")

    def limit_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    p = subprocess.Popen([NBDD, "-f", "--exit-with-parent",
                          "--threads", "2", "--max-connections", "0",
                          "--pidfile", pidfile, "--listen", "unix:" + sock] +
                         blockdev_args(img) + export_args(),
                         preexec_fn=limit_fds, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.exists(pidfile), 20)
        clients = []
        for _ in range(80):     # more than the daemon has descriptors
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock)
            clients.append(s)
        time.sleep(0.5)
        for s in clients:
            s.close()
        h = connect_within(f"nbd+unix:///disk0?socket={sock}", 10)
        assert h.pread(4, 0) == b"nbdd"
        h.shutdown()
    finally:
        p.terminate()
        _, err = p.communicate(timeout=20)
    assert p.returncode == 0, err.decode()
    assert b"pausing" in err      # it did run out, and said so


def test_idle_handshakes_do_not_lock_out_clients(nbdd_server, raw_image):
    """With every slot taken by clients stalled in the handshake, a new
    client still gets in: the oldest stalled one makes room."""
    img = raw_image(4 * MiB, [(0, b"nbdd")])
    srv = nbdd_server(["--max-connections", "3", "--handshake-timeout",
                       "60"] + blockdev_args(img) + export_args())
    stalled = [greet(srv.sock) for _ in range(3)]
    h = connect_within(srv.uri(), 10)
    assert h.pread(4, 0) == b"nbdd"
    # The oldest stalled client was the one closed.
    stalled[0].settimeout(5)
    assert stalled[0].recv(1) == b""
    h.shutdown()
    for s in stalled:
        s.close()


def test_connected_clients_are_not_evicted(nbdd_server, raw_image):
    """Clients past the handshake keep their slots: at the limit a new
    client is refused instead."""
    img = raw_image(4 * MiB, [(0, b"nbdd")])
    srv = nbdd_server(["--max-connections", "2"] + blockdev_args(img) +
                      export_args())
    h1 = srv.connect()
    h2 = srv.connect()
    with pytest.raises(nbd.Error):
        connect_within(srv.uri(), 3)
    assert h1.pread(4, 0) == b"nbdd" and h2.pread(4, 0) == b"nbdd"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_unread_block_status_replies_are_bounded(nbdd_server, raw_image):
    """A client that pipelines block status requests over a fragmented
    image and never reads the replies costs a bounded amount of memory:
    nbdd stops reading its requests."""
    size = 128 * MiB
    # Data every other 4 KiB: 32768 extents, about 800 KiB of server
    # memory per reply.
    pattern = [(off, b"x") for off in range(0, size, 8192)]
    img = raw_image(size, pattern)
    srv = nbdd_server(blockdev_args(img) + export_args(writable=False))
    pid = srv.proc.pid
    before = rss_kib(pid)

    c = nbdraw.NBDRaw.unix(srv.sock)
    c.handshake()
    c.structured_reply()
    ctx, _ = c.set_meta_context("disk0", ["base:allocation"])
    assert "base:allocation" in ctx
    c.go_ok("disk0")

    # Block status over all of it, many times, never reading.
    burst = c.request_bytes(nbdraw.CMD_BLOCK_STATUS, length=size) * 100
    s = c.sock
    s.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sent < 20 * len(burst):
        try:
            sent += s.send(burst)
        except BlockingIOError:
            time.sleep(0.05)
    # Wait until the daemon has done all it will (RSS stops moving).
    last, grown_mib = -1, 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.5)
        grown_mib = (rss_kib(pid) - before) / 1024
        if abs(grown_mib - last) < 1:
            break
        last = grown_mib
    # 256 unread replies would hold about 200 MiB; the in-flight budget
    # stops reading at a quarter of that.  ASan needs some slack;
    # ThreadSanitizer's shadow memory several times as much.
    limit = 400 if "TSAN_OPTIONS" in os.environ else 130
    assert grown_mib < limit, f"RSS grew by {grown_mib:.0f} MiB"
    c.close()
    h = srv.connect(export="disk0")
    assert h.pread(1, 0) == b"x"
