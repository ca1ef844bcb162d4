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

from conftest import NBDD, blockdev_args, export_args
from helpers import MiB, connect_within, wait_for

NBD_MAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054


def greet(path):
    """A raw client that reads the greeting and then stalls."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    hdr = b""
    while len(hdr) < 18:
        chunk = s.recv(18 - len(hdr))
        assert chunk, "server closed during the greeting"
        hdr += chunk
    assert struct.unpack(">Q", hdr[:8])[0] == NBD_MAGIC
    return s


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
    size = 512 * MiB
    # Data every other 4 KiB in the first 64 MiB: many extents.
    pattern = [(off, b"x") for off in range(0, 64 * MiB, 8192)]
    img = raw_image(size, pattern)
    srv = nbdd_server(blockdev_args(img) + export_args(writable=False))
    pid = srv.proc.pid
    before = rss_kib(pid)

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(srv.sock)
    s.recv(18, socket.MSG_WAITALL)
    s.sendall(struct.pack(">I", 3))

    def option(opt, data=b""):
        s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def replies_until_ack():
        while True:
            hdr = s.recv(20, socket.MSG_WAITALL)
            _, _, rep, length = struct.unpack(">QIII", hdr)
            if length:
                s.recv(length, socket.MSG_WAITALL)
            if rep == 1:
                return

    option(8)                                   # STRUCTURED_REPLY
    replies_until_ack()
    q = b"base:allocation"
    name = b"disk0"
    option(10, struct.pack(">I", len(name)) + name + struct.pack(">I", 1) +
           struct.pack(">I", len(q)) + q)       # SET_META_CONTEXT
    replies_until_ack()
    option(7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    replies_until_ack()                          # GO

    req = struct.pack(">IHHQQI", 0x25609513, 0, 7, 1, 0, 64 * MiB)
    s.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    burst = req * 100
    while time.monotonic() < deadline and sent < 2000 * len(req):
        try:
            sent += s.send(burst)
        except BlockingIOError:
            time.sleep(0.05)
    time.sleep(1)
    grown_mib = (rss_kib(pid) - before) / 1024
    # The budget is 128 MiB per connection; allow the allocator slack.
    assert grown_mib < 300, f"RSS grew by {grown_mib:.0f} MiB"
    s.close()
    h = srv.connect(export="disk0")
    assert h.pread(1, 0) == b"x"
