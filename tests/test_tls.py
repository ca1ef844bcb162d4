"""nbdd over TLS: X.509 certificates and pre-shared keys.

Real clients (nbdinfo, nbdcopy, qemu-img, qemu-io, libnbd) connect over
unix and TCP sockets; the protocol corners (STARTTLS with a payload,
injected plaintext, state wiped by STARTTLS, a second STARTTLS) are
driven by tests/nbdraw.py with the socket wrapped in Python's ssl
module once the daemon has acknowledged STARTTLS.

What a user relies on: --tls=require never serves a byte in
plaintext; tls-required and tls-allow exports are invisible to whoever
may not use them; a bad credential is refused cleanly, logged with the
peer, and does not disturb anyone else; SIGHUP swaps credentials for
new connections without touching established ones.

The certificates (two CAs, server and client certificates, an expired
and a revoked one, a CRL) and the PSK files are made once per module
with certtool and psktool.
"""
import json
import os
import re
import shutil
import signal
import ssl
import struct
import time

import nbd
import pytest

import nbdraw as nr
from conftest import NBDD, blockdev_args, export_args
from helpers import (DATA, HOLE_ZERO, KiB, MiB, block_status, file_extents,
                     merge, pattern, read_file, run, sha256_file, wait_for)
from nbdraw import Closed, NBDRaw
from pki import PKI, write_file
from qmp import QMP

SIZE = 16 * MiB
DATA_REGIONS = [(0, 64 * KiB), (1 * MiB + 512, 300 * KiB),
                (9 * MiB, 4 * KiB), (SIZE - 128 * KiB, 128 * KiB)]

CLIENT1_DN = "CN=client1,O=nbdd test,C=GB"
CLIENT2_DN = "CN=client2,O=nbdd test,C=GB"

HANDSHAKE_FAILED = r"TLS handshake failed: .+: closing$"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki")).make()


# ---------------------------------------------------------------------
# Servers and clients

@pytest.fixture
def image(raw_image):
    """A 16 MiB image whose only data is DATA_REGIONS."""
    return raw_image(SIZE, [(o, pattern(o, n)) for o, n in DATA_REGIONS],
                     name="disk.img")


def start(nbdd_server, img, tls="require", certs=None, psk=None,
          verify=False, exports=None, extra=()):
    args = ["--tls", tls]
    if certs:
        args += ["--tls-certificates", certs]
    if psk:
        args += ["--tls-psk", psk]
    if verify:
        args.append("--tls-verify-peer")
    args += blockdev_args(img)
    args += export_args() if exports is None else exports
    return nbdd_server(args + list(extra))


def x509_uri(srv, cdir, export="disk0", tcp=False):
    if tcp:
        return (f"nbds://127.0.0.1:{srv.port}/{export}"
                f"?tls-certificates={cdir}")
    return (f"nbds+unix:///{export}?socket={srv.sock}"
            f"&tls-certificates={cdir}")


def psk_uri(srv, pskfile, user="alice", export="disk0", tcp=False):
    if tcp:
        return (f"nbds://{user}@127.0.0.1:{srv.port}/{export}"
                f"?tls-psk-file={pskfile}")
    return (f"nbds+unix://{user}@/{export}?socket={srv.sock}"
            f"&tls-psk-file={pskfile}")


def tls_handle(certs=None, psk=None, user="alice", tls=nbd.TLS_REQUIRE):
    """A libnbd handle with X.509 (@certs, a client directory) or PSK
    credentials.  Note that libnbd checks the server's certificate only
    over TCP, where it has a host name to check it against."""
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_tls(tls)
    if certs:
        h.set_tls_certificates(certs)
    if psk:
        h.set_tls_psk_file(psk)
        h.set_tls_username(user)
    return h


def tls_connect(srv, export="disk0", tcp=False, **kw):
    """A libnbd handle connected over TLS (unless @tls says otherwise)."""
    h = tls_handle(**kw)
    h.set_export_name(export)
    if tcp:
        h.connect_tcp("127.0.0.1", str(srv.port))
    else:
        h.connect_unix(srv.sock)
    return h


def refused(srv, export="disk0", tcp=False, **kw):
    """The libnbd connection (handshake, TLS, or GO) fails."""
    h = tls_handle(**kw)
    h.set_export_name(export)
    with pytest.raises(nbd.Error):
        if tcp:
            h.connect_tcp("127.0.0.1", str(srv.port))
        else:
            h.connect_unix(srv.sock)
    del h


def served(srv, img, export="disk0", tcp=False, **kw):
    """A client with good credentials connects over TLS and reads the
    image's first bytes."""
    h = tls_connect(srv, export, tcp=tcp, **kw)
    assert h.get_tls_negotiated()
    assert h.pread(4096, 0) == read_file(img, 0, 4096)
    h.shutdown()


def log_lines(srv, regex):
    return [line for line in srv.output().splitlines()
            if re.search(regex, line)]


def wait_log(srv, regex, count=1, seconds=10):
    """Wait for at least @count log lines matching @regex; return them."""
    def enough():
        lines = log_lines(srv, regex)
        return lines if len(lines) >= count else None

    lines = wait_for(enough, seconds)
    assert lines, f"fewer than {count} log lines match {regex!r}:\n" + \
        srv.output()
    return lines


def ident_re(identity=None):
    """The log line of an established TLS session."""
    who = "anonymous" if identity is None else "'" + re.escape(identity) + "'"
    return r"^nbdd: (unix:fd\d+|127\.0\.0\.1:\d+): TLS \(TLS1\.[23]\)\S*" \
        r", client " + who + "$"


def ssl_context(pki, cafile=None, cert=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile or pki.ca_a)
    if cert:
        ctx.load_cert_chain(cert[0], cert[1])
    return ctx


_OPEN = []


def raw(srv, tcp=True):
    """A raw connection past the greeting; closed when the test ends."""
    c = NBDRaw.tcp(srv.port) if tcp else NBDRaw.unix(srv.sock)
    _OPEN.append(c)
    # How nbdd names it in its log.
    c.peer = "127.0.0.1:%d" % c.sock.getsockname()[1] if tcp else None
    assert c.handshake() == nr.FLAG_FIXED_NEWSTYLE | nr.FLAG_NO_ZEROES
    return c


@pytest.fixture(autouse=True)
def _close_raw(nbdd_server):
    """Close raw connections before the daemon is stopped."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def ack(reps):
    assert [r.reply for r in reps] == [nr.REP_ACK], reps


def only_error(reps, err):
    assert len(reps) == 1 and reps[0].reply == err, \
        f"expected only 0x{err:x}, got {reps!r}"
    reps[0].data.decode("utf-8")


def starttls(c, pki, cert=None, suppress_ragged_eofs=True):
    """STARTTLS on raw connection @c, then the TLS handshake with
    Python's ssl: returns a raw connection over the TLS socket."""
    ack(c.option(nr.OPT_STARTTLS))
    ctx = ssl_context(pki, cert=cert)
    s = ctx.wrap_socket(c.sock, server_hostname="localhost",
                        suppress_ragged_eofs=suppress_ragged_eofs)
    t = NBDRaw(s, c.timeout)
    t.peer = c.peer
    _OPEN.append(t)
    return t


def export_names(reps):
    out = []
    for r in reps:
        if r.reply == nr.REP_SERVER:
            n = struct.unpack(">I", r.data[:4])[0]
            out.append(r.data[4:4 + n].decode())
    assert reps[-1].reply == nr.REP_ACK, reps
    return sorted(out)


def read_simple(c, offset, length, cookie=7):
    """READ with simple replies expected: the data."""
    c.send_request(nr.CMD_READ, offset=offset, length=length, cookie=cookie)
    r = c.read_reply(length)
    assert r.kind == "simple", f"expected a simple reply, got {r!r}"
    assert r.cookie == cookie and r.error == 0, r
    return r.data


def tls_closed(t, timeout=5):
    """The daemon ends the TLS session with close_notify and closes:
    with ragged EOFs not suppressed, recv returns b'' only after a
    close_notify."""
    t.sock.settimeout(timeout)
    got = b""
    while True:
        chunk = t.sock.recv(65536)
        if not chunk:
            return got
        got += chunk


# ---------------------------------------------------------------------
# 1. nbdinfo and nbdcopy

CREDS = ["x509", "psk"]
TRANSPORTS = pytest.mark.parametrize("tcp", [False, True],
                                     ids=["unix", "tcp"])


def cred_uri(pki, srv, cred, tcp, export="disk0"):
    if cred == "x509":
        return x509_uri(srv, pki.certs["client1"], export, tcp)
    return psk_uri(srv, pki.psk, "alice", export, tcp)


def cred_server(nbdd_server, pki, img, cred, **kw):
    if cred == "x509":
        return start(nbdd_server, img, certs=pki.server, **kw)
    return start(nbdd_server, img, psk=pki.psk, **kw)


@pytest.mark.parametrize("cred", CREDS)
@TRANSPORTS
def test_nbdinfo(nbdd_server, pki, image, cred, tcp):
    """nbdinfo over TLS: the session is encrypted, the export's size
    and map are right, and the daemon logs who the client is."""
    srv = cred_server(nbdd_server, pki, image, cred)
    uri = cred_uri(pki, srv, cred, tcp)
    doc = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    assert doc["TLS"] is True
    (e,) = doc["exports"]
    assert e["export-name"] == "disk0"
    assert e["export-size"] == SIZE
    m = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    got = merge([(x["length"], x["type"]) for x in m])
    assert got == merge(file_extents(image)), m
    wait_log(srv, ident_re(CLIENT1_DN if cred == "x509" else "alice"))
    lst = run(["nbdinfo", "--list", uri.replace("/disk0", "/")]).stdout
    assert 'export="disk0"' in lst, lst


@pytest.mark.parametrize("cred", CREDS)
@TRANSPORTS
def test_nbdcopy(nbdd_server, pki, image, tmp_path, cred, tcp):
    """nbdcopy over TLS, both directions, bit-exact (several
    connections, many requests in flight)."""
    srv = cred_server(nbdd_server, pki, image, cred)
    uri = cred_uri(pki, srv, cred, tcp)
    out = str(tmp_path / "out.img")
    run(["nbdcopy", uri, out])
    assert sha256_file(out) == sha256_file(image)
    src = str(tmp_path / "new.img")
    with open(src, "wb") as f:
        f.write(pattern(99, SIZE))
    run(["nbdcopy", "--flush", src, uri])
    assert sha256_file(image) == sha256_file(src)


# ---------------------------------------------------------------------
# 2. qemu-img and qemu-io

def qemu_creds(pki, cred):
    if cred == "x509":
        return ("tls-creds-x509,id=tls0,endpoint=client,"
                f"dir={pki.certs['client1']}")
    return ("tls-creds-psk,id=tls0,endpoint=client,username=alice,"
            f"dir={os.path.dirname(pki.psk)}")


def qemu_opts(srv, tcp, export="disk0"):
    if tcp:
        server = ("server.type=inet,server.host=127.0.0.1,"
                  f"server.port={srv.port}")
    else:
        # No host name to check the certificate against: say it.
        server = (f"server.type=unix,server.path={srv.sock},"
                  "tls-hostname=localhost")
    return f"driver=nbd,{server},export={export},tls-creds=tls0"


@pytest.mark.parametrize("cred", CREDS)
@TRANSPORTS
def test_qemu_img(nbdd_server, pki, image, tmp_path, cred, tcp):
    """qemu-img info, compare and convert (both ways) over TLS."""
    srv = cred_server(nbdd_server, pki, image, cred)
    obj = ["--object", qemu_creds(pki, cred)]
    opts = qemu_opts(srv, tcp)
    info = json.loads(run(["qemu-img", "info", "--output=json"] + obj +
                          ["--image-opts", opts]).stdout)
    assert info["virtual-size"] == SIZE
    out = str(tmp_path / "out.img")
    run(["qemu-img", "convert"] + obj + ["--image-opts", opts,
                                         "-O", "raw", out])
    assert sha256_file(out) == sha256_file(image)
    local = f"driver=raw,file.driver=file,file.filename={out}"
    run(["qemu-img", "compare"] + obj + ["--image-opts", opts, local])
    # Change the copy, and write it back through the export.
    with open(out, "r+b") as f:
        f.seek(5 * MiB + 3)
        f.write(pattern(5, 200 * KiB))
    p = run(["qemu-img", "compare"] + obj + ["--image-opts", opts, local],
            check=False)
    assert p.returncode == 1, p
    run(["qemu-img", "convert", "-n"] + obj +
        ["-f", "raw", out, "--target-image-opts", opts])
    assert sha256_file(image) == sha256_file(out)


@pytest.mark.parametrize("cred", CREDS)
@TRANSPORTS
def test_qemu_io(nbdd_server, pki, image, cred, tcp):
    """qemu-io writes (aligned and not), reads back, writes zeroes,
    discards and flushes over TLS; the image holds what was written."""
    srv = cred_server(nbdd_server, pki, image, cred)
    cmds = ["write -P 0x5a 2M 1M", "read -P 0x5a 2M 1M",
            "write -P 0x33 4095 3", "read -P 0x33 4095 3",
            "write -z 9M 4k", "read -P 0 9M 4k",
            "discard 12M 64k", "read -v 0 16", "flush"]
    argv = ["qemu-io", "--object", qemu_creds(pki, cred), "--image-opts"]
    for c in cmds:
        argv += ["-c", c]
    p = run(argv + [qemu_opts(srv, tcp)])
    assert "fail" not in p.stdout.lower(), p.stdout
    assert "error" not in p.stdout.lower(), p.stdout
    assert read_file(image, 2 * MiB, MiB) == b"\x5a" * MiB
    assert read_file(image, 4095, 3) == b"\x33" * 3
    assert read_file(image, 9 * MiB, 4 * KiB) == bytes(4 * KiB)
    assert read_file(image, 0, 4095) == pattern(0, 64 * KiB)[:4095]


# ---------------------------------------------------------------------
# 3. libnbd

@pytest.mark.parametrize("cred", CREDS)
@TRANSPORTS
def test_libnbd_commands(nbdd_server, pki, image, cred, tcp):
    """Every command over TLS, checked against the image file: pread,
    pwrite (FUA), flush, zero, trim, cache, block status; then 64
    requests of 256 KiB in flight at once, and the whole 16 MiB export
    read and written in one request."""
    srv = cred_server(nbdd_server, pki, image, cred)
    kw = {"certs": pki.certs["client1"]} if cred == "x509" else \
        {"psk": pki.psk}
    h = tls_connect(srv, tcp=tcp, **kw)
    assert h.get_tls_negotiated()
    assert h.get_size() == SIZE
    assert h.pread(300 * KiB, 1 * MiB + 512) == pattern(1 * MiB + 512,
                                                        300 * KiB)
    data = pattern(7, 3 * MiB + 5)
    h.pwrite(data, 4 * MiB - 1, nbd.CMD_FLAG_FUA)
    assert h.pread(len(data), 4 * MiB - 1) == data
    h.flush()
    assert read_file(image, 4 * MiB - 1, len(data)) == data
    h.zero(128 * KiB, 4 * MiB)
    h.trim(64 * KiB, 5 * MiB)
    h.cache(1 * MiB, 0)
    h.flush()
    assert read_file(image, 4 * MiB, 128 * KiB) == bytes(128 * KiB)
    assert h.pread(8, 0) == pattern(0, 8)
    assert block_status(h, 0, 64 * KiB) == [(64 * KiB, DATA)]
    assert block_status(h, 12 * MiB, 64 * KiB)[0][1] == HOLE_ZERO

    # Many requests in flight: replies are encrypted in whatever order
    # they finish and must all arrive intact.
    bufs = []
    for i in range(64):
        buf = nbd.Buffer(256 * KiB)
        bufs.append((buf, h.aio_pread(buf, (i * 256 * KiB) % SIZE)))
    deadline = time.monotonic() + 30
    while h.aio_in_flight() > 0:
        assert time.monotonic() < deadline, "replies did not all arrive"
        h.poll(1000)
    assert all(h.aio_command_completed(c) for _, c in bufs)
    img = read_file(image)
    for i, (buf, _) in enumerate(bufs):
        off = (i * 256 * KiB) % SIZE
        assert bytes(buf.to_bytearray()) == img[off:off + 256 * KiB], i
    # The whole export in one request each way.
    assert h.pread(SIZE, 0) == img
    whole = pattern(8, SIZE)
    h.pwrite(whole, 0)
    h.flush()
    assert read_file(image) == whole
    h.shutdown()


def test_plaintext_refused_under_require(nbdd_server, pki, image):
    """--tls=require: a client that does not do TLS gets nothing, over
    unix or TCP; TLS clients are served meanwhile."""
    srv = start(nbdd_server, image, certs=pki.server, psk=pki.psk)
    for tcp in (False, True):
        refused(srv, tcp=tcp, tls=nbd.TLS_DISABLE)
        h = nbd.NBD()
        with pytest.raises(nbd.Error):
            h.connect_uri(srv.uri(tcp=tcp))
    served(srv, image, certs=pki.certs["anon"])
    served(srv, image, tcp=True, psk=pki.psk, user="bob")
    wait_log(srv, ident_re("bob"))
    wait_log(srv, ident_re())


def test_tls_on(nbdd_server, pki, image):
    """--tls=on: a client that may do TLS (TLS_ALLOW) gets it; a client
    that does not still gets the export in plaintext."""
    srv = start(nbdd_server, image, tls="on", certs=pki.server)
    h = tls_connect(srv, tls=nbd.TLS_ALLOW, certs=pki.certs["client2"])
    assert h.get_tls_negotiated()
    assert h.pread(4096, 0) == read_file(image, 0, 4096)
    wait_log(srv, ident_re(CLIENT2_DN))
    h2 = tls_connect(srv, tcp=True, tls=nbd.TLS_DISABLE)
    assert not h2.get_tls_negotiated()
    assert h2.pread(4096, 9 * MiB) == read_file(image, 9 * MiB, 4096)
    h2.shutdown()
    h.shutdown()
    doc = json.loads(run(["nbdinfo", "--json", srv.uri()]).stdout)
    assert doc["TLS"] is False


# ---------------------------------------------------------------------
# 4. tls-required exports with --tls=on

@pytest.fixture
def mixed(nbdd_server, pki, image, raw_image):
    """--tls=on with a TLS-only export 'secure' (over the image) and a
    plain export 'plain' (1 MiB of 'plain')."""
    plain = raw_image(MiB, [(0, b"plain" * (MiB // 5))], name="plain.img")
    args = (blockdev_args(plain, node="p") +
            export_args(node="p", name="plain") +
            ["--export", "type=nbd,id=sec,node-name=disk0,name=secure,"
             "writable=on,tls-required=on"])
    return start(nbdd_server, image, tls="on", certs=pki.server,
                 exports=args, extra=[])


def test_tls_required_export_plaintext(mixed, pki, image):
    """Before TLS, a tls-required export is not listed, INFO and GO
    say TLS_REQD (and the stream stays usable), meta contexts of it
    are refused; the plain export works."""
    c = raw(mixed)
    assert export_names(c.option(nr.OPT_LIST)) == ["plain"]
    only_error(c.info("secure"), nr.REP_ERR_TLS_REQD)
    only_error(c.go("secure"), nr.REP_ERR_TLS_REQD)
    ack(c.structured_reply())
    _, reps = c.set_meta_context("secure", ["base:allocation"])
    assert reps[-1].is_error, reps
    # Unknown names look TLS-only too, so those cannot be probed.
    only_error(c.go("nosuch"), nr.REP_ERR_TLS_REQD)
    assert c.go_ok("plain")[0] == MiB
    c.send_request(nr.CMD_READ, offset=0, length=10)
    data, _ = nr.assemble_read(c.read_chunks(10), 0, 10)
    assert data == b"plainplain"


def test_tls_required_export_name_closes(mixed):
    """The old EXPORT_NAME option cannot say why: a tls-required export
    asked for in plaintext ends the session; the plain one works."""
    c = raw(mixed)
    c.send_option(nr.OPT_EXPORT_NAME, b"secure")
    c.expect_closed()
    c = raw(mixed)
    size, _, _ = c.export_name("plain", no_zeroes=True)
    assert size == MiB


def test_tls_required_export_tls_clients(mixed, pki, image):
    """Over TLS both exports are listed and usable; a plaintext libnbd
    client cannot open the TLS-only one."""
    uri = f"nbds+unix:///?socket={mixed.sock}&tls-certificates=" + \
        pki.certs["anon"]
    doc = json.loads(run(["nbdinfo", "--list", "--json", uri]).stdout)
    assert doc["TLS"] is True
    assert sorted(e["export-name"] for e in doc["exports"]) == \
        ["plain", "secure"]
    doc = json.loads(run(["nbdinfo", "--list", "--json",
                          f"nbd+unix:///?socket={mixed.sock}"]).stdout)
    assert [e["export-name"] for e in doc["exports"]] == ["plain"]
    served(mixed, image, "secure", certs=pki.certs["anon"])
    served(mixed, image, "secure", tcp=True, tls=nbd.TLS_ALLOW,
           certs=pki.certs["client1"])
    refused(mixed, "secure", tls=nbd.TLS_DISABLE)
    h = tls_connect(mixed, "plain", tls=nbd.TLS_ALLOW,
                    certs=pki.certs["anon"])
    assert h.get_tls_negotiated()
    assert h.pread(5, 0) == b"plain"
    # Raw: the same export over STARTTLS, with EXPORT_NAME.
    c = raw(mixed)
    t = starttls(c, pki)
    size, _, _ = t.export_name("secure", no_zeroes=True)
    assert size == SIZE
    assert read_simple(t, 0, 4096) == read_file(image, 0, 4096)


# ---------------------------------------------------------------------
# 5. tls-allow

ALLOW_EXPORTS = ["pub", "alice", "c1", "both-kv", "both-json", "bob-json"]


@pytest.fixture
def allow(nbdd_server, pki, image):
    """--tls=on with certificates (CA A's CRL loaded, no
    --tls-verify-peer) and PSK, and one node exported as:
    'pub' (anyone, even in plaintext), 'alice' (keyval, PSK user),
    'c1' (keyval, client1's subject with its commas doubled), 'both-kv'
    (keyval list of both), 'both-json' (JSON array of both), 'bob-json'
    (JSON, a single string)."""
    def kv(name, allow):
        return ["--export", f"type=nbd,id={name},node-name=disk0,"
                f"name={name},{allow}"]

    def js(name, allow):
        return ["--export", json.dumps({
            "type": "nbd", "id": name, "node-name": "disk0", "name": name,
            "writable": True, "tls-allow": allow})]

    c1 = CLIENT1_DN.replace(",", ",,")
    exports = (export_args(name="pub") +
               kv("alice", "tls-allow=alice") +
               kv("c1", f"tls-allow={c1}") +
               kv("both-kv", f"tls-allow.0=alice,tls-allow.1={c1}") +
               js("both-json", ["alice", CLIENT1_DN]) +
               js("bob-json", "bob"))
    return start(nbdd_server, image, tls="on", certs=pki.server_crl,
                 psk=pki.psk, exports=exports)


ALLOWED = {
    # client: (how it connects, its identity in the log, exports)
    "alice": ("psk", "alice", ["pub", "alice", "both-kv", "both-json"]),
    "bob": ("psk", "bob", ["pub", "bob-json"]),
    "client1": ("x509", CLIENT1_DN, ["pub", "c1", "both-kv", "both-json"]),
    "client2": ("x509", CLIENT2_DN, ["pub"]),
    "anon": ("x509", None, ["pub"]),
    # client1's subject, but a certificate that does not verify.
    "expired": ("x509", None, ["pub"]),
    "revoked": ("x509", None, ["pub"]),
    "impostor": ("x509", None, ["pub"]),
    "wrong-purpose": ("x509", None, ["pub"]),
}


@pytest.mark.parametrize("client", ALLOWED)
def test_tls_allow(allow, pki, image, client):
    """Each client sees in LIST exactly the exports it is allowed, can
    open those and gets ERR_UNKNOWN (as if they did not exist) for the
    others.  A certificate that does not verify (expired, revoked,
    other CA) is anonymous, whatever subject it claims."""
    how, ident, want = ALLOWED[client]
    if how == "psk":
        kw = {"psk": pki.psk, "user": client}
        base = psk_uri(allow, pki.psk, client, export="")
    else:
        kw = {"certs": pki.certs[client]}
        base = x509_uri(allow, pki.certs[client], export="")
    before = len(allow.output())
    doc = json.loads(run(["nbdinfo", "--list", "--json", base]).stdout)
    assert doc["TLS"] is True
    assert sorted(e["export-name"] for e in doc["exports"]) == sorted(want)
    for name in ALLOW_EXPORTS:
        if name in want:
            served(allow, image, name, **kw)
            continue
        h = tls_handle(**kw)
        h.set_opt_mode(True)
        h.connect_unix(allow.sock)
        assert h.get_tls_negotiated()
        h.set_export_name(name)
        with pytest.raises(nbd.Error) as e:
            h.opt_info()
        assert e.value.errno == "ENOENT", e.value
        with pytest.raises(nbd.Error) as e:
            h.opt_go()
        assert e.value.errno == "ENOENT", e.value
        h.opt_abort()
        who = "an anonymous client" if ident is None \
            else f"client '{ident}'"
        wait_log(allow, re.escape(f": {who} is not allowed export "
                                  f"'{name}'"))
    # Every session of this client was logged with its identity.
    new = allow.output()[before:].splitlines()
    sessions = [line for line in new if ": TLS (" in line]
    assert sessions, new
    for line in sessions:
        assert re.search(ident_re(ident), line), line


def test_tls_allow_plaintext(allow):
    """With --tls=on, a plaintext client sees only the unrestricted
    export: tls-allow implies TLS, so INFO/GO say TLS_REQD."""
    c = raw(allow)
    assert export_names(c.option(nr.OPT_LIST)) == ["pub"]
    for name in ALLOW_EXPORTS[1:]:
        only_error(c.info(name), nr.REP_ERR_TLS_REQD)
        only_error(c.go(name), nr.REP_ERR_TLS_REQD)
    assert c.go_ok("pub")[0] == SIZE


def test_tls_allow_impostor_raw(allow, pki, image):
    """A certificate with client1's subject signed by another CA, sent
    whatever the server asks for (OpenSSL does; gnutls clients do not
    offer a certificate the server's CA list does not name): it is
    anonymous and cannot use client1's export."""
    c = raw(allow)
    t = starttls(c, pki, cert=pki.impostor)
    assert export_names(t.option(nr.OPT_LIST)) == ["pub"]
    only_error(t.go("c1"), nr.REP_ERR_UNKNOWN)
    _, reps = t.set_meta_context("c1", ["base:allocation"],
                                 opt=nr.OPT_LIST_META_CONTEXT)
    only_error(reps, nr.REP_ERR_UNKNOWN)
    wait_log(allow, "^nbdd: " + re.escape(c.peer) + r": TLS .*, client "
             "anonymous$")
    assert t.go_ok("pub")[0] == SIZE
    assert read_simple(t, 0, 4096) == read_file(image, 0, 4096)
    # The genuine client1 over the same raw path gets in.
    c = raw(allow)
    t = starttls(c, pki, cert=pki.client1)
    assert export_names(t.option(nr.OPT_LIST)) == sorted(
        ["pub", "c1", "both-kv", "both-json"])
    wait_log(allow, "^nbdd: " + re.escape(c.peer) + r": TLS .*, client '" +
             re.escape(CLIENT1_DN) + "'$")
    assert t.go_ok("c1")[0] == SIZE
    assert read_simple(t, 9 * MiB, 4096) == read_file(image, 9 * MiB, 4096)
    # EXPORT_NAME cannot say no: the impostor is disconnected.
    c = raw(allow)
    t = starttls(c, pki, cert=pki.impostor)
    t.send_option(nr.OPT_EXPORT_NAME, b"c1")
    with pytest.raises((Closed, ssl.SSLError)):
        t.recv(1)
    wait_log(allow, "^nbdd: " + re.escape(c.peer) + ": NBD_OPT_EXPORT_NAME: "
             "export not allowed 'c1': closing$")


# ---------------------------------------------------------------------
# 6. Bad credentials and protocol abuse.  Each is refused cleanly,
# logged with the peer, and a well-behaved client is served after it.

FAILED_RE = r"^nbdd: (127\.0\.0\.1:\d+|unix:fd\d+): " + HANDSHAKE_FAILED


def handshake_failed(srv, c=None, count=1):
    """nbdd logged @count failed handshakes (for raw connection @c:
    one naming its address)."""
    if c is not None:
        return wait_log(srv, "^nbdd: " + re.escape(c.peer) + ": " +
                        HANDSHAKE_FAILED)
    lines = wait_log(srv, FAILED_RE, count)
    assert len(lines) == count, lines
    return lines


@pytest.mark.parametrize("bad", ["wrong-key", "unknown-user"])
@TRANSPORTS
def test_bad_psk(nbdd_server, pki, image, bad, tcp):
    """A wrong key, or a user nbdd does not know: the handshake fails,
    the client gets an error, the log says so; alice gets in."""
    srv = start(nbdd_server, image, psk=pki.psk)
    if bad == "wrong-key":
        refused(srv, tcp=tcp, psk=pki.psk_wrong, user="alice")
    else:
        refused(srv, tcp=tcp, psk=pki.psk_carol, user="carol")
    handshake_failed(srv)
    assert not log_lines(srv, ident_re("carol"))
    served(srv, image, tcp=tcp, psk=pki.psk, user="alice")
    assert len(log_lines(srv, ident_re("alice"))) == 1


@pytest.mark.parametrize("client", ["impostor", "expired", "revoked",
                                    "anon", "trust-b", "wrong-purpose"])
def test_verify_peer_refuses(nbdd_server, pki, image, client):
    """--tls-verify-peer: a certificate from another CA, an expired or
    revoked one, or none at all is refused at the handshake; so is a
    client that does not trust the server.  client1 and client2 are
    served."""
    srv = start(nbdd_server, image, certs=pki.server_crl, verify=True)
    refused(srv, tcp=True, certs=pki.certs[client])
    handshake_failed(srv)
    served(srv, image, tcp=True, certs=pki.certs["client1"])
    served(srv, image, certs=pki.certs["client2"])
    wait_log(srv, ident_re(CLIENT1_DN))
    wait_log(srv, ident_re(CLIENT2_DN))
    assert not log_lines(srv, ident_re())


def test_verify_peer_impostor_raw(nbdd_server, pki, image):
    """--tls-verify-peer with a client (OpenSSL) that presents a
    certificate from another CA: no option is answered, the failure is
    logged with the client's address."""
    srv = start(nbdd_server, image, certs=pki.server, verify=True)
    c = raw(srv)
    with pytest.raises((ssl.SSLError, Closed, OSError)):
        t = starttls(c, pki, cert=pki.impostor)
        # TLS 1.3: the server judges the certificate after the client
        # has finished its side of the handshake.
        t.option(nr.OPT_LIST)
    handshake_failed(srv, c)
    c = raw(srv)
    t = starttls(c, pki, cert=pki.client1)
    assert t.go_ok()[0] == SIZE
    assert read_simple(t, 0, 4096) == read_file(image, 0, 4096)


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    struct.pack(">QII", nr.IHAVEOPT, nr.OPT_LIST, 0),
    b"\x16\x03\x01\x00\x04\x01\x00\x00\x00",
], ids=["http", "nbd-option", "tiny-hello"])
def test_garbage_instead_of_client_hello(nbdd_server, pki, image, garbage):
    """Bytes after the STARTTLS ACK that are not a TLS handshake end
    the connection (at most a TLS alert comes back), nothing is taken
    as an option, and the failure is logged with the peer."""
    srv = start(nbdd_server, image, tls="on", certs=pki.server)
    c = raw(srv)
    ack(c.option(nr.OPT_STARTTLS))
    c.send(garbage)
    got = c.expect_closed(allow_data=True)
    assert not got or got[0] == 0x15, f"not a TLS alert: {got!r}"
    handshake_failed(srv, c)
    served(srv, image, certs=pki.certs["client1"])


def test_garbage_inside_tls(nbdd_server, pki, image):
    """Bytes that are not a TLS record, written under an established
    session, end that session (they cannot be authenticated); nbdd
    goes on serving."""
    srv = start(nbdd_server, image, certs=pki.server)
    t = starttls(raw(srv), pki)
    assert t.go_ok()[0] == SIZE
    os.write(t.sock.fileno(), NBDRaw.request_bytes(nr.CMD_READ, length=512))
    with pytest.raises((Closed, ssl.SSLError, OSError)):
        r = t.read_reply(512)
        raise AssertionError(f"a reply to a forged request: {r!r}")
    served(srv, image, tcp=True, certs=pki.certs["client1"])


class Dribble:
    """A TLS client (Python's ssl over memory BIOs) that writes every
    TLS byte it produces to the socket @piece bytes at a time, with a
    pause between pieces: the daemon sees the handshake and the
    records in fragments.  It has the socket methods NBDRaw uses."""

    def __init__(self, sock, ctx, piece=7):
        self.sock, self.piece = sock, piece
        self.timeout = 5
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out,
                                server_hostname="localhost")
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self):
        data = self.out.read()
        for i in range(0, len(data), self.piece):
            self.sock.sendall(data[i:i + self.piece])
            time.sleep(0.0005)

    def _fill(self):
        self.sock.settimeout(self.timeout)
        data = self.sock.recv(65536)
        if not data:
            raise Closed("EOF in a TLS record")
        self.inc.write(data)

    def settimeout(self, t):
        self.timeout = t

    def sendall(self, data):
        self.obj.write(data)
        self._flush()

    def recv(self, n):
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                self._fill()

    def close(self):
        self.sock.close()


@TRANSPORTS
def test_fragmented_tls(nbdd_server, pki, image, tcp):
    """The TLS handshake and the records after it arriving a few bytes
    at a time (a slow link) are put together: LIST, GO, a 100 KiB
    WRITE and READs work."""
    srv = start(nbdd_server, image, certs=pki.server)
    c = raw(srv, tcp=tcp)
    ack(c.option(nr.OPT_STARTTLS))
    d = Dribble(c.sock, ssl_context(pki, cert=pki.client1))
    t = NBDRaw(d)
    assert export_names(t.option(nr.OPT_LIST)) == ["disk0"]
    assert t.go_ok()[0] == SIZE
    d.piece = 997
    data = pattern(31, 100 * KiB)
    t.send_request(nr.CMD_WRITE, offset=3 * MiB, data=data)
    r = t.read_reply()
    assert r.kind == "simple" and r.error == 0, r
    assert read_simple(t, 3 * MiB, len(data)) == data
    assert read_simple(t, 0, 4096) == read_file(image, 0, 4096)
    wait_log(srv, ident_re(CLIENT1_DN))


def test_starttls_with_payload(nbdd_server, pki, image):
    """STARTTLS with a payload is ERR_INVALID and changes nothing: a
    proper STARTTLS then works."""
    srv = start(nbdd_server, image, tls="on", certs=pki.server)
    c = raw(srv)
    only_error(c.option(nr.OPT_STARTTLS, b"abcd"), nr.REP_ERR_INVALID)
    assert export_names(c.option(nr.OPT_LIST)) == ["disk0"]
    t = starttls(c, pki)
    assert t.go_ok()[0] == SIZE
    assert read_simple(t, 0, 4096) == read_file(image, 0, 4096)


@pytest.mark.parametrize("payload", [b"", b"xyz"], ids=["empty", "payload"])
def test_second_starttls(nbdd_server, pki, image, payload):
    """STARTTLS inside TLS is ERR_INVALID; the session goes on."""
    srv = start(nbdd_server, image, certs=pki.server)
    c = raw(srv)
    t = starttls(c, pki)
    only_error(t.option(nr.OPT_STARTTLS, payload), nr.REP_ERR_INVALID)
    assert export_names(t.option(nr.OPT_LIST)) == ["disk0"]
    assert t.go_ok()[0] == SIZE
    assert read_simple(t, 9 * MiB, 4096) == read_file(image, 9 * MiB, 4096)


def client_hello(pki):
    """The bytes of a real TLS ClientHello (Python's ssl, memory BIO)."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl_context(pki).wrap_bio(inc, out, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = out.read()
    assert hello[0] == 0x16, hello[:16]
    return hello


@pytest.mark.parametrize("after", ["option", "client-hello"])
@TRANSPORTS
def test_plaintext_injection(nbdd_server, pki, image, after, tcp):
    """CVE-2021-3716: bytes sent right behind STARTTLS, before nbdd's
    ACK, were sent in plaintext: nbdd must not take them as options
    (nor as TLS data), and closes without acknowledging STARTTLS."""
    srv = start(nbdd_server, image, tls="on", certs=pki.server)
    c = raw(srv, tcp=tcp)
    extra = (NBDRaw.option_bytes(nr.OPT_GO, NBDRaw.info_payload("disk0"))
             if after == "option" else client_hello(pki))
    c.send(NBDRaw.option_bytes(nr.OPT_STARTTLS) + extra)
    c.expect_closed()
    who = re.escape(c.peer) if tcp else r"unix:fd\d+"
    wait_log(srv, "^nbdd: " + who + ": data after NBD_OPT_STARTTLS")
    served(srv, image, tcp=tcp, certs=pki.certs["client1"])


def test_stalled_tls_handshake(nbdd_server, pki, image):
    """--handshake-timeout covers the TLS handshake and the options
    after it: a client silent after the STARTTLS ACK, one that sends
    half a ClientHello, and one idle inside TLS are all dropped after
    about a second; a TLS client in transmission is not."""
    srv = start(nbdd_server, image, certs=pki.server,
                extra=["--handshake-timeout", "1"])
    live = tls_connect(srv, tcp=True, certs=pki.certs["client1"])
    t0 = time.monotonic()
    silent = raw(srv)
    ack(silent.option(nr.OPT_STARTTLS))
    half = raw(srv)
    ack(half.option(nr.OPT_STARTTLS))
    hello = client_hello(pki)
    half.send(hello[:len(hello) // 2])
    idle = starttls(raw(srv), pki)
    for c in (silent, half):
        c.expect_closed(timeout=6, allow_data=True)
    with pytest.raises((Closed, ssl.SSLError, OSError)):
        idle.recv(1, timeout=6)
    assert time.monotonic() - t0 >= 0.9, "dropped before the timeout"
    wait_log(srv, r": handshake not finished after 1 seconds: closing$", 3)
    time.sleep(max(0, t0 + 1.5 - time.monotonic()))
    assert live.pread(4096, 0) == read_file(image, 0, 4096)
    live.shutdown()
    served(srv, image, certs=pki.certs["client2"])


def test_require_refuses_options(nbdd_server, pki, image):
    """--tls=require: every option before STARTTLS but ABORT is
    TLS_REQD, payloads are skipped so the stream stays in sync, and
    STARTTLS still works after all of them."""
    srv = start(nbdd_server, image, certs=pki.server)
    c = raw(srv)
    meta = NBDRaw.meta_payload("disk0", ["base:allocation"])
    for opt, data in [
            (nr.OPT_LIST, b""), (nr.OPT_INFO, NBDRaw.info_payload("disk0")),
            (nr.OPT_GO, NBDRaw.info_payload("disk0", [nr.INFO_NAME])),
            (nr.OPT_STRUCTURED_REPLY, b""), (nr.OPT_EXTENDED_HEADERS, b""),
            (nr.OPT_LIST_META_CONTEXT, meta),
            (nr.OPT_SET_META_CONTEXT, meta), (nr.OPT_PEEK_EXPORT, b""),
            (99, b"\xff" * 100), (nr.OPT_LIST, b"\0" * 5000),
            (nr.OPT_GO, b"\0\0\0\x05disk0")]:     # truncated payload
        only_error(c.option(opt, data), nr.REP_ERR_TLS_REQD)
    t = starttls(c, pki)
    assert export_names(t.option(nr.OPT_LIST)) == ["disk0"]
    ack(t.structured_reply())
    assert t.go_ok()[0] == SIZE
    t.send_request(nr.CMD_READ, offset=0, length=4096)
    data, _ = nr.assemble_read(t.read_chunks(4096), 0, 4096)
    assert data == read_file(image, 0, 4096)


def test_require_export_name_closes(nbdd_server, pki, image):
    """--tls=require: plaintext EXPORT_NAME (which has no error reply)
    ends the session, logged; ABORT before TLS is acknowledged."""
    srv = start(nbdd_server, image, certs=pki.server)
    c = raw(srv)
    c.send_option(nr.OPT_EXPORT_NAME, b"disk0")
    c.expect_closed()
    wait_log(srv, "^nbdd: " + re.escape(c.peer) +
             ": NBD_OPT_EXPORT_NAME without TLS: closing$")
    c = raw(srv)
    ack(c.option(nr.OPT_ABORT))
    c.expect_closed()
    c = raw(srv)
    t = starttls(c, pki)
    assert t.export_name("disk0", no_zeroes=True)[0] == SIZE
    assert read_simple(t, 0, 4096) == read_file(image, 0, 4096)


@pytest.mark.parametrize("state", ["structured", "extended", "meta"])
def test_starttls_forgets_state(nbdd_server, pki, image, state):
    """Whatever was negotiated in plaintext is forgotten by STARTTLS
    (an attacker may have injected it): after structured replies or
    extended headers in plaintext, a GO over TLS gets simple replies;
    a meta context chosen in plaintext is not active over TLS."""
    srv = start(nbdd_server, image, tls="on", certs=pki.server)
    c = raw(srv)
    if state == "extended":
        ack(c.extended_headers())
    else:
        ack(c.structured_reply())
    if state == "meta":
        ctx, _ = c.set_meta_context("disk0", ["base:allocation"])
        assert list(ctx) == ["base:allocation"]
    t = starttls(c, pki)
    if state == "meta":
        ack(t.structured_reply())
    size, eflags = t.go_ok()
    assert size == SIZE
    if state != "meta":
        assert not eflags & nr.TF_SEND_DF, hex(eflags)     # simple mode
        assert read_simple(t, 0, 4096) == read_file(image, 0, 4096)
        return
    assert eflags & nr.TF_SEND_DF
    reps = t.request(nr.CMD_BLOCK_STATUS, offset=0, length=4096)
    assert nr.reply_error(reps) == nr.EINVAL, reps
    t.send_request(nr.CMD_READ, offset=0, length=4096, cookie=2)
    data, _ = nr.assemble_read(t.read_chunks(4096), 0, 4096)
    assert data == read_file(image, 0, 4096)


def test_extended_headers_inside_tls(nbdd_server, pki, image):
    """Extended headers negotiated inside TLS work: 64-bit requests and
    extended replies, READ and WRITE, through the session."""
    srv = start(nbdd_server, image, certs=pki.server)
    t = starttls(raw(srv), pki)
    ack(t.extended_headers())
    assert t.go_ok()[0] == SIZE
    data = pattern(21, 70000)
    reps = t.request(nr.CMD_WRITE, offset=2 * MiB + 1, data=data)
    assert nr.reply_error(reps) == 0 and reps[0].kind == "extended", reps
    t.send_request(nr.CMD_READ, offset=2 * MiB + 1, length=len(data),
                   cookie=3)
    chunks = t.read_chunks()
    assert all(c.kind == "extended" for c in chunks), chunks
    got, _ = nr.assemble_read(chunks, 2 * MiB + 1, len(data))
    assert got == data
    assert read_file(image, 2 * MiB + 1, len(data)) == data


def test_close_notify(nbdd_server, pki, image):
    """The end of a TLS session is a TLS close_notify, so that a client
    can tell it from a truncation: after NBD_CMD_DISC, and after
    NBD_OPT_ABORT inside TLS."""
    srv = start(nbdd_server, image, certs=pki.server)
    t = starttls(raw(srv), pki, suppress_ragged_eofs=False)
    assert t.go_ok()[0] == SIZE
    assert read_simple(t, 0, 512) == read_file(image, 0, 512)
    t.send_request(nr.CMD_DISC)
    assert tls_closed(t) == b""
    t = starttls(raw(srv), pki, suppress_ragged_eofs=False)
    ack(t.option(nr.OPT_ABORT))
    assert tls_closed(t) == b""


def taken_requests(admin):
    """How many requests nbdd has read from its only connection."""
    with QMP(admin) as q:
        conns = q.cmd("query-connections")
    assert len(conns) == 1, conns
    return conns[0]["requests"]


def test_slow_reader(nbdd_server, pki, image, tmp_path):
    """A client that sends 96 READs of 1 MiB before reading any reply
    gets every reply, intact, once it reads.  Meanwhile nbdd has taken
    only a few of them off the socket: it reads data at most 4 MiB
    ahead of what it has encrypted, and stops while 4 MiB of records
    wait for the client, so a client that does not read costs it
    little memory (the socket buffer holds a few more)."""
    state = tmp_path / "state"
    srv = start(nbdd_server, image, certs=pki.server,
                extra=["--state-dir", str(state)])
    t = starttls(raw(srv, tcp=False), pki)
    t.go_ok()
    n = 96
    t.send(b"".join(NBDRaw.request_bytes(nr.CMD_READ, offset=(i * MiB) % SIZE,
                                         length=MiB, cookie=i)
                    for i in range(n)))
    with open("/proc/sys/net/core/wmem_max") as f:
        sndbuf = 2 * min(int(f.read()), 2 * MiB)   # as the kernel counts
    # 4 MiB of data ahead, 4 MiB of records queued (and the reply that
    # crossed the mark), what the socket holds.
    most = 4 + 4 + 1 + -(-sndbuf // MiB)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        taken = taken_requests(str(state / "admin.sock"))
        assert 2 <= taken <= most, (taken, most)
        time.sleep(0.05)
    assert srv.alive()
    img = read_file(image)
    seen = set()
    for _ in range(n):
        r = t.read_reply(MiB, timeout=20)
        assert r.kind == "simple" and r.error == 0, r
        off = (r.cookie * MiB) % SIZE
        assert r.data == img[off:off + MiB], r.cookie
        seen.add(r.cookie)
    assert seen == set(range(n))
    assert read_simple(t, 0, 4096) == img[:4096]


# ---------------------------------------------------------------------
# 7. SIGHUP: new credentials for new connections

def sighup(srv, regex, count):
    srv.proc.send_signal(signal.SIGHUP)
    return wait_log(srv, regex, count)


RELOADED = r"^nbdd: TLS credentials reloaded$"
RELOAD_FAILED = r"^nbdd: error: TLS reload failed, keeping the old " \
    r"credentials: .+"


def test_sighup_reload_certificates(nbdd_server, pki, image, tmp_path):
    """The server certificate is replaced by one from CA B and SIGHUP
    sent: new clients must trust B, the connection opened before goes
    on (the checks of the server's certificate are over TCP: libnbd
    checks it only there).  Then a broken key file, and a missing
    certificate: each reload fails, is logged, and the credentials
    loaded before keep working."""
    sdir = tmp_path / "certs"
    shutil.copytree(pki.server, sdir)
    srv = start(nbdd_server, image, certs=str(sdir))
    old = tls_connect(srv, tcp=True, certs=pki.certs["client1"])
    assert old.pread(4096, 0) == read_file(image, 0, 4096)
    refused(srv, tcp=True, certs=pki.certs["trust-b"])
    shutil.copy(pki.server_b[0], sdir / "server-cert.pem")
    shutil.copy(pki.server_b[1], sdir / "server-key.pem")
    sighup(srv, RELOADED, 1)
    served(srv, image, tcp=True, certs=pki.certs["trust-b"])
    served(srv, image, certs=pki.certs["trust-b"])
    refused(srv, tcp=True, certs=pki.certs["client1"])
    old.pwrite(b"still here", 5 * MiB)
    assert old.pread(10, 5 * MiB) == b"still here"

    write_file(sdir / "server-key.pem", "-----BEGIN PRIVATE KEY-----\nnot "
               "a key\n-----END PRIVATE KEY-----\n")
    line = sighup(srv, RELOAD_FAILED, 1)[0]
    assert "server-key.pem" in line, line
    assert len(log_lines(srv, RELOADED)) == 1
    served(srv, image, tcp=True, certs=pki.certs["trust-b"])
    refused(srv, tcp=True, certs=pki.certs["client1"])
    os.unlink(sdir / "server-cert.pem")
    sighup(srv, RELOAD_FAILED, 2)
    served(srv, image, tcp=True, certs=pki.certs["trust-b"])
    assert old.pread(10, 5 * MiB) == b"still here"
    old.shutdown()
    assert srv.alive()


def test_sighup_reload_crl(nbdd_server, pki, image, tmp_path):
    """--tls-verify-peer: a CRL added and SIGHUP sent shuts out the
    revoked certificate for new connections; its session already open
    goes on."""
    sdir = tmp_path / "certs"
    shutil.copytree(pki.server, sdir)
    srv = start(nbdd_server, image, certs=str(sdir), verify=True)
    old = tls_connect(srv, certs=pki.certs["revoked"])
    served(srv, image, certs=pki.certs["revoked"])
    shutil.copy(pki.server_crl + "/ca-crl.pem", sdir / "ca-crl.pem")
    sighup(srv, RELOADED, 1)
    refused(srv, tcp=True, certs=pki.certs["revoked"])
    handshake_failed(srv)
    served(srv, image, certs=pki.certs["client1"])
    assert old.pread(4096, 0) == read_file(image, 0, 4096)
    old.shutdown()


def test_sighup_reload_psk(nbdd_server, pki, image, tmp_path):
    """A new PSK file (alice with another key) and SIGHUP: alice's new
    key works for new connections, the old one no longer does, and
    the session opened with it goes on."""
    keys = str(tmp_path / "keys.psk")
    shutil.copy(pki.psk, keys)
    srv = start(nbdd_server, image, psk=keys)
    old = tls_connect(srv, psk=pki.psk)
    shutil.copy(pki.psk_wrong, keys)
    sighup(srv, RELOADED, 1)
    served(srv, image, tcp=True, psk=pki.psk_wrong)
    refused(srv, psk=pki.psk)
    refused(srv, psk=pki.psk, user="bob")
    assert old.pread(4096, 0) == read_file(image, 0, 4096)
    old.shutdown()


def test_sighup_failed_psk_reload_keeps_old_keys(nbdd_server, pki, image,
                                                tmp_path):
    """The PSK file removed and SIGHUP sent: nbdd logs that the reload
    failed and that it keeps the old credentials, and it does: alice
    still gets in."""
    keys = str(tmp_path / "keys.psk")
    shutil.copy(pki.psk, keys)
    srv = start(nbdd_server, image, psk=keys)
    served(srv, image, psk=pki.psk)
    os.rename(keys, keys + ".old")
    sighup(srv, RELOAD_FAILED, 1)
    served(srv, image, psk=pki.psk)


def test_sighup_without_tls(nbdd_server, image):
    """SIGHUP with TLS off changes nothing and does not stop nbdd."""
    srv = nbdd_server(blockdev_args(image) + export_args())
    srv.proc.send_signal(signal.SIGHUP)
    time.sleep(0.2)
    assert srv.alive()
    h = srv.connect()
    assert h.pread(4096, 0) == read_file(image, 0, 4096)
    h.shutdown()
    assert not log_lines(srv, "TLS")


# ---------------------------------------------------------------------
# 8. Latency: no Nagle stall

@pytest.mark.parametrize("cred", CREDS)
def test_no_nagle_stall_tcp(nbdd_server, pki, image, cred):
    """200 sequential 4 KiB reads, then 200 writes, then 200 rounds of
    two reads in flight, over TLS on TCP, take well under 4 s each.
    A reply that waits for the client's delayed ACK (Nagle: a reply
    sent in pieces, or a second reply behind an unacknowledged one on
    a socket without TCP_NODELAY) costs 40 ms, 8 s in all; this
    catches that stall, not slowness.  (Checked: nbdd with its
    TCP_NODELAY taken away by an LD_PRELOAD shim fails the two-in-
    flight part with 8.6 s.)"""
    srv = cred_server(nbdd_server, pki, image, cred)
    kw = {"certs": pki.certs["client1"]} if cred == "x509" else \
        {"psk": pki.psk}
    h = tls_connect(srv, tcp=True, **kw)
    h.pread(4096, 0)

    def timed(what, fn):
        t0 = time.monotonic()
        for i in range(200):
            fn((i * 4096 * 7) % (SIZE - 8192))
        took = time.monotonic() - t0
        assert took < 4, f"200 {what} took {took:.2f} s"

    def two_reads(off):
        a, b = nbd.Buffer(4096), nbd.Buffer(4096)
        cookies = [h.aio_pread(a, off), h.aio_pread(b, off + 4096)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert all(h.aio_command_completed(c) for c in cookies)

    timed("reads", lambda off: h.pread(4096, off))
    timed("writes", lambda off: h.pwrite(b"\x5a" * 4096, off))
    timed("pairs of reads", two_reads)
    assert h.pread(4096, 7 * 4096) == b"\x5a" * 4096
    h.shutdown()


# ---------------------------------------------------------------------
# More clients and set-ups

def test_pipelined_requests(nbdd_server, pki, image):
    """Hundreds of requests in TLS records sent at once, more than
    nbdd takes in flight for one connection: 300 WRITEs of 20 KiB (6
    MiB in one send), then 600 READs of 4 KiB sent before any reply is
    read.  Every reply arrives and the image holds every write."""
    srv = start(nbdd_server, image, certs=pki.server)
    t = starttls(raw(srv), pki)
    t.go_ok()
    n, wlen = 300, 20 * KiB
    data = pattern(11, n * wlen)
    reqs = b"".join(
        NBDRaw.request_bytes(nr.CMD_WRITE, offset=i * wlen + 3, length=wlen,
                             cookie=i, data=data[i * wlen:(i + 1) * wlen])
        for i in range(n))
    t.send(reqs)
    seen = set()
    for _ in range(n):
        r = t.read_reply(0, timeout=20)
        assert r.kind == "simple" and r.error == 0, r
        seen.add(r.cookie)
    assert seen == set(range(n))
    assert read_file(image, 3, n * wlen) == data
    img = read_file(image)
    m = 600
    # The last READ asks for nothing: it is answered, and costs the
    # connection nothing afterwards.
    t.send(b"".join(NBDRaw.request_bytes(nr.CMD_READ, offset=i * 4096 + 1,
                                         length=4096 if i < m else 0,
                                         cookie=i)
                    for i in range(m + 1)))
    seen = set()
    for _ in range(m + 1):
        r = t.read_reply(lambda cookie: 4096 if cookie < m else 0,
                         timeout=20)
        assert r.kind == "simple" and r.error == 0, r
        off = r.cookie * 4096 + 1
        size = 4096 if r.cookie < m else 0
        assert r.data == img[off:off + size], r.cookie
        seen.add(r.cookie)
    assert seen == set(range(m + 1))
    t.send_request(nr.CMD_DISC)
    srv.stop()


@pytest.mark.parametrize("cred", ["x509", "psk"])
def test_server_picks_aes_gcm(nbdd_server, pki, image, cred):
    """nbdd chooses the cipher, AES-128-GCM first, even where the client
    would rather have ChaCha20 (gnutls clients with PSK): with AES
    instructions it is several times cheaper, and the cipher is most of
    what TLS costs a server.  A client that offers only ChaCha20 is
    still served."""
    srv = start(nbdd_server, image, certs=pki.server, psk=pki.psk)
    kw = {"psk": pki.psk} if cred == "psk" else {"certs": pki.certs["client1"]}
    served(srv, image, **kw)
    wait_log(srv, r": TLS \(TLS1\.3\)-.*-\(AES-128-GCM\), client ")
    c = raw(srv)
    ack(c.option(nr.OPT_STARTTLS))
    ctx = ssl_context(pki, cert=pki.client1)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+CHACHA20")
    s = ctx.wrap_socket(c.sock, server_hostname="localhost")
    assert "CHACHA20" in s.cipher()[0], s.cipher()
    t = NBDRaw(s)
    _OPEN.append(t)
    assert t.go_ok()[0] == SIZE


def test_tls12(nbdd_server, pki, image):
    """A TLS 1.2 client is served too, and named by its certificate;
    with --tls-verify-peer a certificate from another CA fails the
    TLS 1.2 handshake itself."""
    srv = start(nbdd_server, image, certs=pki.server, psk=pki.psk)
    c = raw(srv)
    ack(c.option(nr.OPT_STARTTLS))
    ctx = ssl_context(pki, cert=pki.client1)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    s = ctx.wrap_socket(c.sock, server_hostname="localhost")
    assert s.version() == "TLSv1.2"
    t = NBDRaw(s)
    _OPEN.append(t)
    assert t.go_ok()[0] == SIZE
    assert read_simple(t, 0, 65536) == read_file(image, 0, 65536)
    wait_log(srv, "^nbdd: " + re.escape(c.peer) + r": TLS \(TLS1\.2\).*, "
             "client '" + re.escape(CLIENT1_DN) + "'$")


def test_tls12_verify_peer(nbdd_server, pki, image):
    srv = start(nbdd_server, image, certs=pki.server, verify=True)
    c = raw(srv)
    ack(c.option(nr.OPT_STARTTLS))
    ctx = ssl_context(pki, cert=pki.impostor)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(c.sock, server_hostname="localhost")
    handshake_failed(srv, c)
    served(srv, image, tcp=True, certs=pki.certs["client1"])


def test_stdio_has_no_tls(tmp_path, pki, image):
    """--stdio cannot do TLS (no socket to hand to it): STARTTLS is
    refused with ERR_POLICY and a client that can do without TLS gets
    the export in plaintext."""
    h = nbd.NBD()
    h.set_tls(nbd.TLS_ALLOW)
    h.set_tls_certificates(pki.certs["client1"])
    h.connect_command([NBDD, "--stdio", "--tls", "on",
                       "--tls-certificates", pki.server] +
                      blockdev_args(image) + export_args())
    assert not h.get_tls_negotiated()
    assert h.pread(4096, 0) == read_file(image, 0, 4096)
    h.shutdown()


def run_nbdd(tmp_path, args):
    try:
        return run([NBDD, "-f", "--exit-with-parent", "--listen",
                    f"unix:{tmp_path}/bad.sock"] + args, timeout=10,
                   check=False)
    except Exception as e:         # subprocess.TimeoutExpired
        pytest.fail(f"nbdd {args} kept running instead of exiting: {e}")


BAD_CONFIGS = {
    "tls-bogus": (["--tls", "maybe"], [], ["--tls", "maybe"]),
    "no-creds": (["--tls", "on"], [], ["--tls"]),
    "creds-tls-off": (["--tls-psk", "PSK"], [], ["--tls"]),
    "verify-no-certs": (["--tls", "on", "--tls-psk", "PSK",
                         "--tls-verify-peer"], [], ["verify-peer"]),
    "missing-psk": (["--tls", "on", "--tls-psk", "NOFILE"], [],
                    ["nosuch.psk"]),
    "missing-certs": (["--tls", "on", "--tls-certificates", "NODIR"], [],
                      ["server-cert.pem", "server-key.pem"]),
    "required-tls-off": ([], ["tls-required=on"], ["tls-required"]),
    "allow-tls-off": ([], ["tls-allow=alice"], ["tls-allow"]),
    "allow-number": (["--tls", "on", "--tls-psk", "PSK"],
                     ["tls-allow.0=alice", "tls-allow.2=bob"],
                     ["tls-allow"]),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config(tmp_path, pki, image, case):
    """Inconsistent TLS set-ups are start-up errors that name what is
    wrong."""
    args, export_extra, words = BAD_CONFIGS[case]
    args = [a.replace("PSK", pki.psk)
            .replace("NOFILE", str(tmp_path / "nosuch.psk"))
            .replace("NODIR", str(tmp_path)) for a in args]
    spec = "type=nbd,id=e,node-name=disk0,name=disk0"
    for e in export_extra:
        spec += "," + e
    p = run_nbdd(tmp_path, args + blockdev_args(image) + ["--export", spec])
    assert p.returncode != 0, p
    assert any(w in p.stderr for w in words), p.stderr


PSK_FILES = {
    "short-key": ("alice:" + "ab" * 15 + "\n", "at least 16 bytes"),
    "odd-digits": ("alice:" + "a" * 65 + "\n", "hex digits"),
    "not-hex": ("alice:" + "zz" * 32 + "\n", "hex digits"),
    "no-colon": ("alice" + "ab" * 32 + "\n", "username:hexkey"),
    "equals-in-user": ("CN=alice:" + "ab" * 32 + "\n", "'='"),
    "twice": ("alice:" + "ab" * 32 + "\nalice:" + "cd" * 32 + "\n",
              "twice"),
    "empty": ("\n\n", "no keys"),
}


@pytest.mark.parametrize("case", PSK_FILES)
def test_bad_psk_file(tmp_path, image, case):
    """A PSK file nbdd cannot trust is a start-up error naming the file
    and line: keys shorter than 128 bits, usernames that could pass for
    a certificate subject in tls-allow, a user given twice."""
    text, word = PSK_FILES[case]
    f = tmp_path / "keys.psk"
    f.write_text(text)
    p = run_nbdd(tmp_path, ["--tls", "require", "--tls-psk", str(f)] +
                 blockdev_args(image) + export_args())
    assert p.returncode != 0, p
    assert word in p.stderr and str(f) in p.stderr, p.stderr


def test_unknown_names_look_tls_only(mixed):
    """Before TLS, an export name that does not exist is answered like a
    TLS-only one (ERR_TLS_REQD), so TLS-only exports cannot be found by
    trying names; the plain export is still served."""
    c = raw(mixed)
    ack(c.structured_reply())
    only_error(c.go("no-such-export"), nr.REP_ERR_TLS_REQD)
    only_error(c.info("secure"), nr.REP_ERR_TLS_REQD)
    c.go_ok("plain")

