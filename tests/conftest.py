"""Fixtures for nbdd's end-to-end tests.

Every test starts the real daemon and talks to it with real clients.
$NBDD names the binary under test ('make check' sets it); otherwise the
in-tree build is used.
"""
import os
import shutil
import signal
import socket
import subprocess
import time

import nbd
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TOP_DIR = os.path.dirname(TESTS_DIR)


def _find_nbdd():
    env = os.environ.get("NBDD")
    if env:
        return env
    for d in ("build", "."):
        p = os.path.join(TOP_DIR, d, "nbdd", "nbdd")
        if os.access(p, os.X_OK):
            return p
    raise RuntimeError("nbdd binary not found: build it or set $NBDD")


NBDD = _find_nbdd()


def _find_nbdctl():
    """$NBDCTL, else the nbdctl of the build tree under test."""
    env = os.environ.get("NBDCTL")
    if env:
        return env
    candidates = []
    if os.environ.get("top_builddir"):
        candidates.append(os.path.join(os.environ["top_builddir"], "nbdd",
                                       "nbdctl"))
    candidates.append(os.path.join(os.path.dirname(NBDD), "nbdctl"))
    for d in ("build", "."):
        candidates.append(os.path.join(TOP_DIR, d, "nbdd", "nbdctl"))
    for p in candidates:
        if os.access(p, os.X_OK):
            return p
    raise RuntimeError("nbdctl binary not found: build it or set $NBDCTL")


NBDCTL = _find_nbdctl()


def free_tcp_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_image(path, size, pattern=None, sparse=True):
    """Create a raw image of @size bytes.  @pattern is a list of
    (offset, bytes) written into it; the rest is a hole (or zeroes
    if not sparse)."""
    with open(path, "wb") as f:
        if sparse:
            f.truncate(size)
        else:
            chunk = b"\0" * (1 << 20)
            left = size
            while left > 0:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                left -= n
        for off, data in pattern or []:
            f.seek(off)
            f.write(data)
    return str(path)


def blockdev_args(image, node="disk0", fmt="raw", extra=""):
    """--blockdev arguments for a raw-over-file node named @node."""
    spec = f"driver={fmt},node-name={node},file.driver=file,file.filename={image}"
    if extra:
        spec += "," + extra
    return ["--blockdev", spec]


def export_args(node="disk0", name="disk0", writable=True, description=None):
    spec = f"type=nbd,id=exp-{name or 'default'},node-name={node},name={name}"
    if writable:
        spec += ",writable=on"
    if description:
        spec += f",description={description}"
    return ["--export", spec]


def thread_stacks(pid):
    """Where each thread of @pid is, if gdb is installed: for a daemon
    that does not exit, the place it is stuck."""
    if shutil.which("gdb") is None:
        return ""
    try:
        r = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex",
                            "thread apply all bt 12"], capture_output=True,
                           text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "\n(gdb timed out)"
    return "\n--- threads:\n" + "\n".join(
        line for line in r.stdout.splitlines()
        if line.startswith(("Thread ", "#")))


class Server:
    """A running nbdd with a unix socket and a TCP listener on
    127.0.0.1.  It exits with the test process (--exit-with-parent)."""

    def __init__(self, tmp_path, args, tcp=True):
        self.dir = tmp_path
        self.sock = str(tmp_path / "nbdd.sock")
        self.pidfile = str(tmp_path / "nbdd.pid")
        self.logfile = str(tmp_path / "nbdd.log")
        self.port = free_tcp_port() if tcp else None
        cmd = [NBDD, "-f", "--exit-with-parent", "--pidfile", self.pidfile,
               "--listen", "unix:" + self.sock]
        if tcp:
            cmd += ["--listen", f"tcp:127.0.0.1:{self.port}"]
        cmd += args
        self.cmd = cmd
        self.log = open(self.logfile, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.pidfile):
            if self.proc.poll() is not None:
                raise RuntimeError("nbdd exited with %d:\n%s" %
                                   (self.proc.returncode, self.output()))
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("nbdd did not start:\n" + self.output())
            time.sleep(0.01)

    def uri(self, export="disk0", tcp=False):
        if tcp:
            return f"nbd://127.0.0.1:{self.port}/{export}"
        return f"nbd+unix:///{export}?socket={self.sock}"

    def connect(self, export="disk0", strict=True, tcp=False, **kw):
        h = nbd.NBD()
        if not strict:
            h.set_strict_mode(0)
        for k, v in kw.items():
            getattr(h, k)(v)
        h.connect_uri(self.uri(export, tcp=tcp))
        return h

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.logfile, "rb") as f:
            return f.read().decode(errors="replace")

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        """SIGTERM; the daemon must exit 0 and sanitizers stay quiet."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                stacks = thread_stacks(self.proc.pid)
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("nbdd did not exit on SIGTERM:\n" +
                                     self.output() + stacks)
        self.log.close()
        out = self.output()
        assert "ERROR: AddressSanitizer" not in out, out
        assert "ERROR: LeakSanitizer" not in out, out
        assert "WARNING: ThreadSanitizer" not in out, out
        assert "runtime error:" not in out, out
        assert self.proc.returncode == 0, \
            f"nbdd exited with {self.proc.returncode}:\n{out}"


@pytest.fixture
def nbdd_server(tmp_path):
    """Factory: nbdd_server(args) starts a daemon; all are stopped and
    checked (exit status, sanitizer output) when the test ends."""
    servers = []

    def start(args, tcp=True):
        s = Server(tmp_path, args, tcp=tcp)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def raw_image(tmp_path):
    """Factory: raw_image(size, pattern=None, sparse=True) -> path."""
    n = [0]

    def make(size, pattern=None, sparse=True, name=None):
        n[0] += 1
        path = tmp_path / (name or f"disk{n[0]}.img")
        return make_image(path, size, pattern, sparse)

    return make


@pytest.fixture
def disk(nbdd_server, raw_image):
    """A writable 16 MiB export 'disk0' with some data and holes:
    returns (server, image path)."""
    img = raw_image(16 << 20, [(0, b"nbdd" * 1024), (8 << 20, b"\xaa" * 65536)])
    srv = nbdd_server(blockdev_args(img) + export_args())
    return srv, img


def stdio_handle(args, strict=True):
    """A libnbd handle talking to 'nbdd --stdio' (one connection)."""
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.connect_command([NBDD, "--stdio"] + args)
    return h


def have(prog):
    return shutil.which(prog) is not None
