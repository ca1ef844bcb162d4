"""The 'nbd' protocol node: a remote NBD export (another nbdd here) as a
node of the graph, over a unix socket or TCP, with or without TLS, that
rides out the remote going away."""
import os
import re
import subprocess
import threading
import time

import nbd
import pytest

from admintools import MiB, start
from conftest import Server, blockdev_args, export_args, make_image
from helpers import map_export, run
from pki import PKI
from qmp import QMP, QMPError

SIZE = 16 * MiB
# Data with holes between: what a remote's block status should show.
PATTERN = [(0, b"head" * 1024), (2 * MiB + 512, os.urandom(3 * MiB)),
           (9 * MiB, b"\xa5" * 65536), (SIZE - 4096, b"tail" * 1024)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki")).make()


class Remote:
    """A second nbdd serving IMG as 'disk0', in its own directory, that
    can be stopped and started again on the same sockets."""

    def __init__(self, d, img, extra=()):
        self.dir = d
        self.dir.mkdir(exist_ok=True)
        self.args = blockdev_args(img) + export_args() + list(extra)
        self.srv = None
        self.port = None
        self.start()

    def start(self):
        """The first start listens on TCP too; a restart on the unix
        socket only (another process may have the port by then)."""
        self.srv = Server(self.dir, self.args, tcp=self.port is None)
        if self.port is None:
            self.port = self.srv.port
        return self

    @property
    def sock(self):
        return self.srv.sock

    def stop(self):
        self.srv.stop()
        if os.path.exists(self.srv.pidfile):
            os.unlink(self.srv.pidfile)


@pytest.fixture
def remote(tmp_path):
    remotes = []

    def make(img, extra=()):
        r = Remote(tmp_path / f"remote{len(remotes)}", img, extra)
        remotes.append(r)
        return r

    yield make
    for r in remotes:
        if r.srv.alive():
            r.srv.stop()


def add_nbd(q, name="rem", **opts):
    spec = {"driver": "nbd", "node-name": name}
    spec.update({k.replace("_", "-"): v for k, v in opts.items()})
    q.cmd_args("blockdev-add", spec)


def test_remote_export_as_a_node(nbdd_server, remote, tmp_path):
    img = make_image(tmp_path / "remote.img", SIZE, PATTERN)
    rem = remote(img)
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        add_nbd(q, server={"type": "unix", "path": rem.sock},
                export="disk0")
        add_nbd(q, "rem-tcp", uri=f"nbd://127.0.0.1:{rem.port}/disk0")
        q.cmd("block-export-add", type="nbd", id="e0", node_name="rem",
              name="via", writable=True)
        q.cmd("block-export-add", type="nbd", id="e1", node_name="rem-tcp",
              name="via-tcp")
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", img,
             srv.uri("via")])
        h = srv.connect("via")
        h.pwrite(b"R" * 70000, 5 * MiB + 3)
        h.zero(MiB, 8 * MiB)
        h.trim(MiB, 10 * MiB)
        h.flush()
        with open(img, "rb") as f:
            f.seek(5 * MiB + 3)
            assert f.read(70000) == b"R" * 70000
            f.seek(8 * MiB)
            assert f.read(MiB) == b"\0" * MiB
        t = srv.connect("via-tcp")
        assert t.pread(70000, 5 * MiB + 3) == b"R" * 70000
        assert t.is_read_only()
        # Holes the remote reports come through as holes.
        mine = nbd.NBD()
        mine.add_meta_context("base:allocation")
        mine.connect_uri(srv.uri("via-tcp"))
        theirs = nbd.NBD()
        theirs.add_meta_context("base:allocation")
        theirs.connect_uri(f"nbd+unix:///disk0?socket={rem.sock}")
        m = map_export(mine)
        assert m == map_export(theirs)
        assert any(flags & 1 for _, flags in m)     # there are holes
        mine.shutdown()
        theirs.shutdown()
        info = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
        assert info["rem"]["drv"] == "nbd"
        h.shutdown()
        t.shutdown()


def test_qcow2_overlay_on_a_remote_backing(nbdd_server, remote, tmp_path):
    """A backing file on another appliance: a local qcow2 overlay reads
    through the nbd node, and writes stay local."""
    img = make_image(tmp_path / "base.img", SIZE, PATTERN)
    before = open(img, "rb").read()
    rem = remote(img)
    srv = start(nbdd_server, tmp_path)
    ov = str(tmp_path / "overlay.qcow2")
    with QMP(srv.admin) as q:
        add_nbd(q, server={"type": "unix", "path": rem.sock},
                export="disk0", read_only=True)
        q.cmd("blockdev-create", job_id="c", options={
            "driver": "qcow2", "size": SIZE,
            "file": {"driver": "file", "filename": ov}})
        q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                    "backing": "rem",
                                    "file": {"driver": "file",
                                             "filename": ov}})
        q.cmd("block-export-add", type="nbd", id="e", node_name="top",
              name="top", writable=True)
        h = srv.connect("top")
        assert h.pread(MiB, 2 * MiB) == before[2 * MiB:3 * MiB]
        h.pwrite(b"L" * 4096, 0)
        assert h.pread(4096, 0) == b"L" * 4096
        h.shutdown()
    assert open(img, "rb").read() == before


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_tls(nbdd_server, remote, tmp_path, pki, kind):
    img = make_image(tmp_path / "remote.img", SIZE, PATTERN)
    if kind == "x509":
        rem = remote(img, ["--tls", "require", "--tls-certificates",
                           pki.server])
        creds = {"tls-certificates": pki.certs["client1"]}
    else:
        rem = remote(img, ["--tls", "require", "--tls-psk", pki.psk])
        creds = {"tls-psk": pki.psk, "tls-username": "alice"}
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        with pytest.raises(QMPError, match="nbd: .*"):
            add_nbd(q, "plain", server={"type": "unix", "path": rem.sock},
                    export="disk0")
        add_nbd(q, server={"type": "inet", "host": "127.0.0.1",
                           "port": str(rem.port)}, export="disk0",
                **creds)
        q.cmd("block-export-add", type="nbd", id="e", node_name="rem",
              name="via")
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", img,
             srv.uri("via")])
        h = srv.connect("via")
        assert h.pread(MiB, 0) == open(img, "rb").read(MiB)
        h.shutdown()


def wait_for_socket(path, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, "nbdkit exited"
        assert time.monotonic() < deadline, "nbdkit did not listen"
        time.sleep(0.02)


def most_in_flight(log):
    """The most requests nbdkit's log filter saw outstanding at once on
    one connection."""
    now, most = {}, 0
    for line in log.splitlines():
        m = re.search(r"connection=(\d+) (\.\.\.)?(Read|Write) id=", line)
        if m:
            c = m.group(1)
            now[c] = now.get(c, 0) + (-1 if m.group(2) else 1)
            most = max(most, now[c])
    return most


@pytest.fixture
def nbdkit(tmp_path):
    """Factory: nbdkit(args) serves on a unix socket in tmp_path and
    returns its path; killed when the test ends (it would wait for
    nbdd's connection)."""
    kits = []

    def make(args):
        sock = str(tmp_path / "kit.sock")
        kit = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U",
                                sock] + args)
        kits.append(kit)
        wait_for_socket(sock, kit)
        return sock

    yield make
    for kit in kits:
        kit.kill()
        kit.wait(10)


def through_node(nbdd_server, tmp_path, sock, connections, writable=True):
    """nbdd with an nbd node on the server at @sock, exported as
    'via'."""
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        add_nbd(q, server={"type": "unix", "path": sock},
                connections=connections)
        q.cmd("block-export-add", type="nbd", id="e", node_name="rem",
              name="via", writable=writable)
    return srv


def test_requests_are_pipelined_on_a_connection(nbdd_server, tmp_path,
                                                 nbdkit):
    """Requests through the node do not wait for each other: eight reads
    and eight writes in flight go out together on the node's one
    connection, and each is answered with its own data.  (The remote is
    nbdkit, with a delay on every request and a log of when each starts
    and ends.)"""
    log = tmp_path / "kit.log"
    sock = nbdkit(["--filter=log", "--filter=delay", "memory", "size=16M",
                   f"logfile={log}", "rdelay=200ms", "wdelay=200ms"])
    srv = through_node(nbdd_server, tmp_path, sock, connections=1)
    h = srv.connect("via")
    writes = [h.aio_pwrite(bytes([i + 1]) * 4096, i * MiB)
              for i in range(8)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in writes)
    bufs = [nbd.Buffer(4096) for _ in range(8)]
    reads = [h.aio_pread(b, i * MiB) for i, b in enumerate(bufs)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in reads)
    for i, b in enumerate(bufs):
        assert b.to_bytearray() == bytes([i + 1]) * 4096
    h.shutdown()
    text = log.read_text()
    assert len(set(re.findall(r"connection=(\d+) Connect", text))) == 1
    assert most_in_flight(text) >= 4, text


def test_a_server_that_says_it_is_shutting_down(nbdd_server, tmp_path,
                                                nbdkit):
    """The remote answers one WRITE with ESHUTDOWN while seven others
    are in flight on the same connection (the spec's soft disconnect).
    The node stops sending on that connection but still reads the
    replies of the seven, then retries the eighth on a new connection:
    every write succeeds and reads back.  (The remote is nbdkit's eval
    plugin over a file; the first write at offset 0 fails, the others
    take 300 ms.)"""
    img = make_image(tmp_path / "kit.img", 16 * MiB)
    mark = tmp_path / "failed-once"
    sock = nbdkit(
        ["eval", "thread_model=echo parallel",
         "get_size=echo %d" % (16 * MiB),
         f"pread=dd if={img} iflag=skip_bytes,count_bytes skip=$4 "
         "count=$3 status=none",
         f'pwrite=if [ "$4" = 0 ] && mkdir {mark} 2>/dev/null; then '
         'echo "ESHUTDOWN going away" >&2; exit 1; fi; sleep 0.3; '
         f"dd of={img} oflag=seek_bytes conv=notrunc seek=$4 status=none"])
    srv = through_node(nbdd_server, tmp_path, sock, connections=1)
    h = srv.connect("via")
    writes = [h.aio_pwrite(bytes([i + 1]) * 4096, i * MiB)
              for i in range(1, 8)]
    time.sleep(0.1)                     # on the wire before the eighth
    writes.append(h.aio_pwrite(b"\x01" * 4096, 0))
    deadline = time.monotonic() + 30
    while h.aio_in_flight() > 0:
        assert time.monotonic() < deadline, "writes never answered"
        h.poll(1000)
    assert all(h.aio_command_completed(c) for c in writes)
    assert mark.exists()
    for i in range(8):
        assert h.pread(4096, i * MiB) == bytes([i + 1]) * 4096, i
    h.shutdown()
    assert "ESHUTDOWN" not in srv.output()


@pytest.mark.parametrize("connections", [1, 2])
def test_shutdown_drops_a_server_that_never_answers(nbdd_server, tmp_path,
                                                     nbdkit, connections):
    """A read through the node is in flight on a server that takes 10
    minutes to answer (nbdkit with a delay) when nbdd is told to stop:
    the request gets a few seconds, then the connection is dropped and
    nbdd exits (Server.stop allows 20 s), saying why.  With a second
    connection idle, the failed read is not tried again there."""
    log = tmp_path / "kit.log"
    sock = nbdkit(["--filter=log", "--filter=delay", "memory", "size=16M",
                   f"logfile={log}", "rdelay=600"])
    srv = through_node(nbdd_server, tmp_path, sock, connections,
                       writable=False)
    h = srv.connect("via")
    h.aio_pread(nbd.Buffer(4096), 0)
    deadline = time.monotonic() + 10
    while not re.search(r"Read id=", log.read_text()):
        assert time.monotonic() < deadline, "the read never came"
        time.sleep(0.05)
    srv.stop()
    assert re.search(r"nbd: .*: 1 request not answered as nbdd shuts down: "
                     r"dropping the connection", srv.output()), srv.output()


def test_remote_that_goes_away_and_comes_back(nbdd_server, remote,
                                               tmp_path):
    """Writes through the node while the remote restarts, from four
    clients at once on one connection, so that several are in flight on
    it when it dies: they wait and land, none is lost.  A remote away longer
    than reconnect-delay fails requests with EIO, and the node works
    again once it is back."""
    img = make_image(tmp_path / "remote.img", SIZE)
    rem = remote(img)
    srv = start(nbdd_server, tmp_path)
    writers = 4

    def pattern(i, k):
        return bytes([(i * writers + k) % 250 + 1]) * 4096

    with QMP(srv.admin) as q:
        add_nbd(q, server={"type": "unix", "path": rem.sock},
                export="disk0", reconnect_delay=15, connections=1)
        add_nbd(q, "short", server={"type": "unix", "path": rem.sock},
                export="disk0", reconnect_delay=0.5)
        q.cmd("block-export-add", type="nbd", id="e", node_name="rem",
              name="via", writable=True)
        q.cmd("block-export-add", type="nbd", id="s", node_name="short",
              name="short")
        s = srv.connect("short")
        done, errors = [], []

        def writer(k):
            w = srv.connect("via")
            try:
                for i in range(200):
                    w.pwrite(pattern(i, k), i * 65536 + k * 8192)
                    done.append(i)
                    time.sleep(0.005)
                w.flush()
            except nbd.Error as e:
                errors.append(e)
            w.shutdown()

        threads = [threading.Thread(target=writer, args=(k,))
                   for k in range(writers)]
        for t in threads:
            t.start()
        while len(done) < 40 * writers:
            time.sleep(0.01)
        rem.stop()
        with pytest.raises(nbd.Error) as e:
            s.pread(4096, 0)                    # 0.5 s: gives up
        assert e.value.errno == "EIO"
        time.sleep(1)
        rem.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(done) == 200 * writers
        with open(img, "rb") as f:
            data = f.read()
        for i in range(200):
            for k in range(writers):
                at = i * 65536 + k * 8192
                assert data[at:at + 4096] == pattern(i, k), (i, k)
        assert s.pread(4096, 65536) == pattern(1, 0)    # back
        s.shutdown()


def test_bad_options_are_refused_clearly(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    nowhere = str(tmp_path / "nobody-listens.sock")
    with QMP(srv.admin) as q:
        for spec, match in [
                ({}, "give 'server'"),
                ({"server": {"type": "vsock", "cid": 3}}, "unknown|not"),
                ({"server": {"type": "udp", "path": "/x"}}, "'unix' or"),
                ({"server": {"type": "unix", "path": "rel.sock"}},
                 "absolute"),
                ({"server": {"type": "unix", "path": nowhere}},
                 "nobody-listens"),
                ({"uri": "nbd+unix:///?socket=" + nowhere,
                  "export": "x"}, "not both"),
                ({"uri": "gopher://x"}, "nbd: "),
                ({"server": {"type": "unix", "path": nowhere},
                  "connections": 0}, "connections"),
                ({"server": {"type": "unix", "path": nowhere},
                  "reconnect-delay": -1}, "reconnect-delay"),
                ({"server": {"type": "unix", "path": nowhere},
                  "tls-psk": "/a", "tls-certificates": "/b"}, "not both"),
        ]:
            with pytest.raises(QMPError, match=match):
                add_nbd(q, "bad", **spec)
        assert "bad" not in [n["node-name"]
                             for n in q.cmd("query-named-block-nodes")]
