"""Raw-socket protocol tests for nbdd.

Each case drives the NBD protocol byte by byte (tests/nbdraw.py) and
asserts the exact reply a client relies on, or a clean disconnect.
After every abusive case the daemon must still be running and a fresh
libnbd client must still be able to connect and read.

The numbers come from the NBD specification (doc/proto.md with the
extended-headers extension) and from nbdd's documented limits:
option payloads up to 1 MiB, at most 64 + 8 x (number of exports)
options per connection, payloads up to 32 MiB, block size constraints
(1, 4096, 32 MiB).
"""
import os
import struct
import time

import nbd
import pytest

import nbdraw as nr
from conftest import blockdev_args, export_args
from nbdraw import Closed, NBDRaw, assemble_read

SIZE = 16 << 20
DATA0 = b"nbdd" * 1024                 # at offset 0
DATA8 = bytes(range(256)) * 256        # 64 KiB at 8 MiB
DESC = "nbdd-test-disk"

BIG = 8 << 30
BIG_DATA = [(0, b"B" * 65536), (2 << 30, b"C" * 65536)]

MIB = 1 << 20
MAX_PAYLOAD = 32 * MIB
MAX_OPTION = 1 * MIB

ALWAYS = (nr.TF_HAS_FLAGS | nr.TF_SEND_FLUSH | nr.TF_SEND_FUA |
          nr.TF_SEND_CACHE | nr.TF_CAN_MULTI_CONN)
WRITABLE = ALWAYS | nr.TF_SEND_TRIM | nr.TF_SEND_WRITE_ZEROES | \
    nr.TF_SEND_FAST_ZERO
READONLY = ALWAYS | nr.TF_READ_ONLY

MODES = ["simple", "structured"]
ODD_COOKIES = [0xDEADBEEFCAFEF00D, 0, 2**64 - 1, 0x8000000000000001]


def option_cap(nexports):
    """Options a client may send on one connection."""
    return 64 + 8 * nexports


# ---------------------------------------------------------------------
# Servers.  Each fixture checks, after the test, that the daemon still
# runs and serves a fresh libnbd client.

@pytest.fixture
def srv(nbdd_server, raw_image):
    """One writable 16 MiB export 'disk0' (description DESC) with data
    at 0 and at 8 MiB, holes elsewhere."""
    img = raw_image(SIZE, [(0, DATA0), (8 * MIB, DATA8)])
    s = nbdd_server(blockdev_args(img) + export_args(description=DESC))
    s.image = img
    yield s
    close_all()
    assert_server_ok(s, expect=DATA0)


@pytest.fixture
def ro(nbdd_server, raw_image):
    """The same image exported read-only."""
    img = raw_image(SIZE, [(0, DATA0), (8 * MIB, DATA8)])
    s = nbdd_server(blockdev_args(img) + export_args(writable=False))
    yield s
    close_all()
    assert_server_ok(s, expect=DATA0)


@pytest.fixture
def multi(nbdd_server, raw_image):
    """Two exports: 'disk0' (writable, 16 MiB, description 'first disk')
    and 'disk1' (read-only, 1 MiB, no description, filled with 'disk1')."""
    a = raw_image(SIZE, [(0, DATA0), (8 * MIB, DATA8)])
    b = raw_image(MIB, [(0, b"disk1" * (MIB // 5))])
    s = nbdd_server(
        blockdev_args(a, node="n0") + blockdev_args(b, node="n1") +
        export_args(node="n0", name="disk0", description="first disk") +
        export_args(node="n1", name="disk1", writable=False))
    yield s
    close_all()
    assert_server_ok(s, "disk0", expect=DATA0)
    assert_server_ok(s, "disk1", expect=b"disk1" * 200)


@pytest.fixture
def big(nbdd_server, raw_image):
    """A writable sparse 8 GiB export 'disk0' with 64 KiB of data at 0
    and at 2 GiB."""
    img = raw_image(BIG, BIG_DATA)
    s = nbdd_server(blockdev_args(img) + export_args())
    s.image = img
    yield s
    close_all()
    assert_server_ok(s, expect=BIG_DATA[0][1])


# ---------------------------------------------------------------------
# Helpers

def assert_server_ok(srv, export="disk0", expect=None, timeout=10):
    """The daemon still runs and a fresh libnbd client connects and
    reads 512 bytes at offset 0 (compared with @expect if given).
    libnbd is driven through its poll loop so a hang fails the test."""
    assert srv.alive(), "nbdd died:\n" + srv.output()
    h = nbd.NBD()
    deadline = time.monotonic() + timeout
    h.aio_connect_uri(srv.uri(export))
    while h.aio_is_connecting():
        assert time.monotonic() < deadline, "libnbd connect timed out"
        h.poll(100)
    assert h.aio_is_ready(), "libnbd could not connect"
    buf = nbd.Buffer(512)
    cookie = h.aio_pread(buf, 0)
    while not h.aio_command_completed(cookie):
        assert time.monotonic() < deadline, "libnbd read timed out"
        h.poll(100)
    data = bytes(buf.to_bytearray())
    del h
    if expect is not None:
        assert data == expect[:512]
    assert srv.alive(), "nbdd died:\n" + srv.output()


_OPEN = []


def connect(srv, tcp=False, timeout=5.0):
    """A raw connection; it is closed when the test ends."""
    if tcp:
        c = NBDRaw.tcp(srv.port, timeout=timeout)
    else:
        c = NBDRaw.unix(srv.sock, timeout=timeout)
    _OPEN.append(c)
    return c


def close_all():
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture(autouse=True)
def _close_connections(nbdd_server):
    """Close raw connections before the daemon is stopped (this fixture
    depends on nbdd_server, so its teardown runs first)."""
    yield
    close_all()


def negotiated(srv, cflags=3, tcp=False):
    c = connect(srv, tcp)
    assert c.handshake(cflags) == 3
    return c


def ack(reps):
    assert [r.reply for r in reps] == [nr.REP_ACK], reps
    assert reps[0].data == b"", reps


def only_error(reps, err):
    """Exactly one reply, the error @err, with a message of at most
    4096 bytes of UTF-8."""
    assert len(reps) == 1 and reps[0].reply == err, \
        f"expected only 0x{err:x}, got {reps!r}"
    assert len(reps[0].data) <= nr.MAX_STRING, len(reps[0].data)
    reps[0].data.decode("utf-8")


def opt_result(c, opt):
    """Read the replies to @opt, or 'closed' if the server hung up."""
    try:
        return c.read_option_replies(opt)
    except Closed as e:
        assert e.data == b"", f"partial option reply before close: {e.data!r}"
        return "closed"


def assert_in_sync(c, name="disk0", size=SIZE):
    """The option stream is still framed correctly: INFO works."""
    reps = c.info(name)
    assert reps[-1].reply == nr.REP_ACK, reps
    exports = [c.parse_info_export(c.parse_info(r)[1]) for r in reps
               if r.reply == nr.REP_INFO and c.parse_info(r)[0] == 0]
    assert len(exports) == 1 and exports[0][0] == size, reps


def invalid_or_disconnect(c, opt):
    """ERR_INVALID with the stream still in sync, or a clean close."""
    res = opt_result(c, opt)
    if res == "closed":
        return
    only_error(res, nr.REP_ERR_INVALID)
    assert_in_sync(c)


def expect_option_disconnect(c, opt, timeout=3):
    """The server hangs up promptly; at most an error reply to @opt may
    come first."""
    data = c.expect_closed(timeout=timeout, allow_data=True)
    while data:
        assert len(data) >= 20, f"partial reply before close: {data!r}"
        magic, o, rep, ln = struct.unpack(">QIII", data[:20])
        assert magic == nr.REPLY_MAGIC and o == opt and rep & 0x80000000, \
            f"unexpected bytes before close: {data[:64]!r}"
        data = data[20 + ln:]


def opened(srv, export="disk0", mode="simple", meta=True, tcp=False):
    """A raw connection in transmission.  @mode: 'simple', 'structured'
    or 'extended'.  With @meta in structured/extended mode,
    base:allocation is selected and its id stored in .ctx."""
    c = negotiated(srv, tcp=tcp)
    c.mode = mode
    c.ctx = None
    if mode == "structured":
        ack(c.structured_reply())
    elif mode == "extended":
        ack(c.extended_headers())
    if meta and mode != "simple":
        ctx, reps = c.set_meta_context(export, ["base:allocation"])
        assert list(ctx) == ["base:allocation"], reps
        c.ctx = ctx["base:allocation"]
    c.size, c.eflags = c.go_ok(export)
    return c


class Result:
    def __init__(self, err, data=b"", chunks=(), descs=None):
        self.err = err
        self.data = data
        self.chunks = chunks
        self.descs = descs

    def __repr__(self):
        return f"Result(err={self.err}, chunks={self.chunks!r})"


def check_extents(descs, length, req_one):
    """What a client relies on in a block status reply."""
    assert descs, "block status reply with no descriptors"
    for ln, fl in descs:
        assert ln > 0, f"zero-length descriptor in {descs}"
        assert fl & ~(nr.STATE_HOLE | nr.STATE_ZERO) == 0, descs
    assert sum(ln for ln, _ in descs[:-1]) < length, \
        f"descriptors before the last reach past the request: {descs}"
    if req_one:
        assert len(descs) == 1, f"REQ_ONE but {len(descs)} descriptors"
        assert descs[0][0] <= length, f"REQ_ONE descriptor {descs} > {length}"


def check_reply(c, chunks, cmd, flags, offset, length, cookie):
    """Validate one complete reply according to the connection's mode
    and return a Result."""
    assert chunks[0].cookie == cookie, \
        f"cookie 0x{chunks[0].cookie:x} != 0x{cookie:x}"
    if c.mode == "simple":
        r = chunks[0]
        assert r.kind == "simple", f"chunk without structured replies: {r!r}"
        return Result(r.error, r.data, chunks)
    kinds = {ch.kind for ch in chunks}
    if c.mode == "extended":
        assert kinds == {"extended"}, \
            f"non-extended reply in EH mode: {chunks!r}"
        for ch in chunks:
            assert ch.offset == offset % 2**64, \
                f"extended chunk offset {ch.offset} != request offset {offset}"
    else:
        assert "extended" not in kinds, chunks
        if "simple" in kinds:
            r = chunks[0]
            assert cmd != nr.CMD_READ, \
                f"simple reply to READ in SR mode: {r!r}"
            assert r.error == 0, f"error as a simple reply in SR mode: {r!r}"
            return Result(0, b"", chunks)
    if any(ch.type & 0x8000 for ch in chunks):
        assert len(chunks) == 1 and chunks[0].type == nr.REPLY_TYPE_ERROR \
            and chunks[0].done, \
            f"expected one ERROR chunk with DONE: {chunks!r}"
        err, msg, _ = chunks[0].error_chunk()
        assert err != 0, "ERROR chunk with error 0"
        assert len(msg) <= nr.MAX_STRING
        return Result(err, b"", chunks)
    if cmd == nr.CMD_READ:
        data, types = assemble_read(chunks, offset, length)
        if flags & nr.CMD_FLAG_DF and length:
            content = [t for t in types if t != nr.REPLY_TYPE_NONE]
            assert content == [nr.REPLY_TYPE_OFFSET_DATA], \
                f"DF read must be one OFFSET_DATA chunk: {chunks!r}"
        return Result(0, data, chunks)
    if cmd == nr.CMD_BLOCK_STATUS:
        want = nr.REPLY_TYPE_BLOCK_STATUS_EXT if c.mode == "extended" \
            else nr.REPLY_TYPE_BLOCK_STATUS
        status = [ch for ch in chunks if ch.type != nr.REPLY_TYPE_NONE]
        assert len(status) == 1 and status[0].type == want, \
            f"expected one status chunk of type {want}: {chunks!r}"
        for ch in chunks:
            if ch.type == nr.REPLY_TYPE_NONE:
                assert ch.done and ch.payload == b"", chunks
        assert chunks[-1].done
        if c.mode == "extended":
            ctx, descs = status[0].block_status_ext()
        else:
            ctx, descs = status[0].block_status()
        assert ctx == c.ctx, f"context id {ctx} != negotiated {c.ctx}"
        check_extents(descs, length, flags & nr.CMD_FLAG_REQ_ONE)
        return Result(0, b"", chunks, descs)
    assert len(chunks) == 1 and chunks[0].type == nr.REPLY_TYPE_NONE and \
        chunks[0].done and chunks[0].payload == b"", \
        f"expected NONE with DONE: {chunks!r}"
    return Result(0, b"", chunks)


def do(c, cmd, flags=0, offset=0, length=0, data=b"", cookie=0x1234):
    """Send one request, read and validate its reply: a Result."""
    c.send_request(cmd, flags, offset, length, cookie, data)
    chunks = c.read_chunks(length if cmd == nr.CMD_READ else 0)
    return check_reply(c, chunks, cmd, flags, offset, length, cookie)


def read_ok(c, offset, length, expect):
    r = do(c, nr.CMD_READ, 0, offset, length, cookie=0x5EAD)
    assert r.err == 0, r
    assert r.data == expect, "READ returned wrong data"


def assert_conn_works(c):
    read_ok(c, 0, 4096, DATA0)


def is_sparse(path, offset):
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            return os.lseek(fd, offset, os.SEEK_DATA) != offset
        except OSError:
            return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------
# Greeting and client flags

def test_greeting_is_18_bytes(srv):
    c = connect(srv)
    data = c.recv(18)
    assert struct.unpack(">QQH", data) == (nr.NBDMAGIC, nr.IHAVEOPT, 0x0003)
    c.expect_quiet(0.3)
    c.send_cflags(3)
    ack(c.option(nr.OPT_ABORT))
    c.expect_closed()


@pytest.mark.parametrize("cflags", [0x4, 0x7, 0x80000000, 0xFFFFFFFF])
def test_unknown_client_flags_disconnect(srv, cflags):
    c = connect(srv)
    c.handshake(cflags)
    c.expect_closed()
    assert_server_ok(srv, expect=DATA0)


def test_nonfixed_newstyle_export_name(srv):
    c = negotiated(srv, cflags=0)
    size, eflags, zeroes = c.export_name("disk0")
    assert (size, eflags) == (SIZE, WRITABLE)
    assert zeroes == bytes(124)
    c.mode = "simple"
    assert_conn_works(c)


@pytest.mark.parametrize("opt", [nr.OPT_LIST, nr.OPT_INFO, nr.OPT_GO,
                                 nr.OPT_STRUCTURED_REPLY, 99])
def test_nonfixed_newstyle_other_option_disconnects(srv, opt):
    c = negotiated(srv, cflags=0)
    payload = b""
    if opt in (nr.OPT_INFO, nr.OPT_GO):
        payload = NBDRaw.info_payload("disk0")
    c.send_option(opt, payload)
    c.expect_closed()
    assert_server_ok(srv)


# ---------------------------------------------------------------------
# NBD_OPT_EXPORT_NAME

def test_export_name_with_zeroes(srv):
    c = negotiated(srv, cflags=nr.FLAG_C_FIXED_NEWSTYLE)
    size, eflags, zeroes = c.export_name("disk0")
    assert (size, eflags) == (SIZE, WRITABLE)
    assert zeroes == bytes(124)
    c.mode = "simple"
    assert_conn_works(c)


def test_export_name_no_zeroes(srv):
    c = negotiated(srv)
    size, eflags, _ = c.export_name("disk0", no_zeroes=True)
    assert (size, eflags) == (SIZE, WRITABLE)
    c.expect_quiet(0.2)
    c.mode = "simple"
    # The very next bytes must be the reply to this READ.
    assert_conn_works(c)


def test_export_name_read_only(ro):
    c = negotiated(ro)
    size, eflags, _ = c.export_name("disk0", no_zeroes=True)
    assert (size, eflags) == (SIZE, READONLY)


def test_export_name_after_structured_reply_has_df(srv):
    c = negotiated(srv)
    ack(c.structured_reply())
    size, eflags, _ = c.export_name("disk0", no_zeroes=True)
    assert (size, eflags) == (SIZE, WRITABLE | nr.TF_SEND_DF)
    c.mode = "structured"
    assert_conn_works(c)


@pytest.mark.parametrize("name", ["nosuch", "disk00", "Disk0"])
def test_export_name_unknown_disconnects(srv, name):
    c = negotiated(srv)
    c.send_option(nr.OPT_EXPORT_NAME, name.encode())
    c.expect_closed()
    assert_server_ok(srv)


# ---------------------------------------------------------------------
# NBD_OPT_ABORT

@pytest.mark.parametrize("payload", [b"", b"ignored payload!"])
def test_abort(srv, payload):
    c = negotiated(srv)
    ack(c.option(nr.OPT_ABORT, payload))
    c.expect_closed()
    assert_server_ok(srv)


def test_abort_then_close_at_once(srv):
    for _ in range(20):
        c = negotiated(srv)
        c.send_option(nr.OPT_ABORT)
        c.close()
    assert_server_ok(srv)


# ---------------------------------------------------------------------
# NBD_OPT_LIST

def test_list(multi):
    c = negotiated(multi)
    reps = c.option(nr.OPT_LIST)
    assert reps[-1].reply == nr.REP_ACK and reps[-1].data == b""
    seen = {}
    for r in reps[:-1]:
        assert r.reply == nr.REP_SERVER, reps
        n = struct.unpack(">I", r.data[:4])[0]
        assert n <= len(r.data) - 4, r
        seen[r.data[4:4 + n].decode()] = r.data[4 + n:].decode()
    assert len(reps) == 3, reps
    assert seen == {"disk0": "first disk", "disk1": ""}
    assert_in_sync(c)


def test_list_with_data(srv):
    c = negotiated(srv)
    only_error(c.option(nr.OPT_LIST, b"abcd"), nr.REP_ERR_INVALID)
    reps = c.option(nr.OPT_LIST)
    assert [r.reply for r in reps] == [nr.REP_SERVER, nr.REP_ACK], reps
    assert reps[0].data == struct.pack(">I", 5) + b"disk0" + DESC.encode()


# ---------------------------------------------------------------------
# Unsupported options, STARTTLS

@pytest.mark.parametrize("opt", [nr.OPT_PEEK_EXPORT, 99, 0, 12, 0x80000000])
@pytest.mark.parametrize("plen", [0, 100])
def test_unsupported_option(srv, opt, plen):
    c = negotiated(srv)
    only_error(c.option(opt, b"\x00" * plen), nr.REP_ERR_UNSUP)
    assert_in_sync(c)


def test_starttls_not_configured(srv):
    c = negotiated(srv)
    only_error(c.option(nr.OPT_STARTTLS), nr.REP_ERR_POLICY)
    assert_in_sync(c)
    c.go_ok()


def test_starttls_with_payload(srv):
    c = negotiated(srv)
    only_error(c.option(nr.OPT_STARTTLS, b"xyz"), nr.REP_ERR_INVALID)
    assert_in_sync(c)


# ---------------------------------------------------------------------
# NBD_OPT_INFO and NBD_OPT_GO

def infos_of(c, reps):
    """{info type: [body, ...]} of the NBD_REP_INFO replies."""
    out = {}
    for r in reps:
        if r.reply == nr.REP_INFO:
            t, body = c.parse_info(r)
            out.setdefault(t, []).append(body)
    return out


@pytest.mark.parametrize("opt", [nr.OPT_INFO, nr.OPT_GO])
def test_info_export_always_sent(srv, opt):
    c = negotiated(srv)
    reps = c.info("disk0", opt=opt)
    assert reps[-1].reply == nr.REP_ACK and reps[-1].data == b"", reps
    assert all(r.reply == nr.REP_INFO for r in reps[:-1]), reps
    infos = infos_of(c, reps)
    assert len(infos.get(nr.INFO_EXPORT, [])) == 1, reps
    assert c.parse_info_export(infos[nr.INFO_EXPORT][0]) == (SIZE, WRITABLE)
    if opt == nr.OPT_GO:
        c.mode = "simple"
        assert_conn_works(c)


@pytest.mark.parametrize("opt", [nr.OPT_INFO, nr.OPT_GO])
def test_info_requested_items(srv, opt):
    c = negotiated(srv)
    reps = c.info("disk0", [nr.INFO_NAME, nr.INFO_DESCRIPTION,
                            nr.INFO_BLOCK_SIZE, 999], opt=opt)
    assert reps[-1].reply == nr.REP_ACK, reps
    infos = infos_of(c, reps)
    assert infos.get(nr.INFO_NAME) == [b"disk0"], reps
    assert infos.get(nr.INFO_DESCRIPTION) == [DESC.encode()], reps
    assert infos.get(nr.INFO_BLOCK_SIZE) == \
        [struct.pack(">III", 1, 4096, MAX_PAYLOAD)], reps
    assert len(infos.get(nr.INFO_EXPORT, [])) == 1, reps
    if opt == nr.OPT_GO:
        c.mode = "simple"
        assert_conn_works(c)


@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
def test_info_then_go_identical(srv, mode):
    c = negotiated(srv)
    if mode == "structured":
        ack(c.structured_reply())
    elif mode == "extended":
        ack(c.extended_headers())
    want = [nr.INFO_BLOCK_SIZE, nr.INFO_NAME]
    i = infos_of(c, c.info("disk0", want))
    g = infos_of(c, c.go("disk0", want))
    assert i == g
    flags = WRITABLE | (nr.TF_SEND_DF if mode != "simple" else 0)
    assert c.parse_info_export(g[nr.INFO_EXPORT][0]) == (SIZE, flags)


@pytest.mark.parametrize("opt", [nr.OPT_INFO, nr.OPT_GO])
@pytest.mark.parametrize("name", ["nosuch", "disk00", "a" * 4096],
                         ids=["nosuch", "disk00", "a4096"])
def test_info_unknown_export(srv, opt, name):
    c = negotiated(srv)
    only_error(c.info(name, [nr.INFO_NAME], opt=opt), nr.REP_ERR_UNKNOWN)
    assert_in_sync(c)
    c.go_ok()
    c.mode = "simple"
    assert_conn_works(c)


def _bad_info_payloads():
    name = b"disk0"
    good = struct.pack(">I", 5) + name + struct.pack(">HH", 1, 0)
    return {
        "trailing-byte": good + b"\0",
        "missing-info": struct.pack(">I", 5) + name + struct.pack(">H", 1),
        "odd-info": struct.pack(">I", 5) + name + struct.pack(">H", 1) + b"\0",
        "short-info-list": struct.pack(">I", 5) + name +
        struct.pack(">HH", 2, 0),
        "extra-info": good + struct.pack(">H", 2),
        "namelen-plus-1": struct.pack(">I", 6) + name + struct.pack(">H", 0),
        "namelen-minus-1": struct.pack(">I", 4) + name + struct.pack(">H", 0),
        "empty": b"",
        "3-bytes": b"\0\0\0",
        "no-ninfos": struct.pack(">I", 0),
        "half-ninfos": struct.pack(">I", 0) + b"\0",
        "ninfos-65535-short": struct.pack(">I", 5) + name +
        struct.pack(">HHH", 65535, 0, 1),
    }


BAD_INFO = _bad_info_payloads()


def _info_length_ok(p):
    """Whether an INFO/GO payload satisfies optlen == 4+namelen+2+2n."""
    if len(p) < 6:
        return False
    namelen = struct.unpack(">I", p[:4])[0]
    if 4 + namelen + 2 > len(p):
        return False
    n = struct.unpack(">H", p[4 + namelen:6 + namelen])[0]
    return len(p) == 4 + namelen + 2 + 2 * n


@pytest.mark.parametrize("opt", [nr.OPT_INFO, nr.OPT_GO])
@pytest.mark.parametrize("case", sorted(BAD_INFO))
def test_info_length_validation(srv, opt, case):
    c = negotiated(srv)
    payload = BAD_INFO[case]
    assert not _info_length_ok(payload), "test case is not malformed"
    only_error(c.option(opt, payload), nr.REP_ERR_INVALID)
    assert_in_sync(c)


# ---------------------------------------------------------------------
# NBD_OPT_STRUCTURED_REPLY and NBD_OPT_EXTENDED_HEADERS

def test_structured_reply(srv):
    c = negotiated(srv)
    ack(c.structured_reply())
    only_error(c.structured_reply(), nr.REP_ERR_INVALID)
    size, eflags = c.go_ok()
    assert eflags == WRITABLE | nr.TF_SEND_DF


def test_structured_reply_with_payload(srv):
    c = negotiated(srv)
    only_error(c.option(nr.OPT_STRUCTURED_REPLY, b"x"), nr.REP_ERR_INVALID)
    # The failed request changed nothing: the next one is the first.
    ack(c.structured_reply())


def test_structured_reply_after_extended_headers(srv):
    c = negotiated(srv)
    ack(c.extended_headers())
    only_error(c.structured_reply(), nr.REP_ERR_EXT_HEADER_REQD)
    assert_in_sync(c)


def test_extended_headers(srv):
    c = negotiated(srv)
    ack(c.extended_headers())
    only_error(c.option(nr.OPT_EXTENDED_HEADERS), nr.REP_ERR_INVALID)
    size, eflags = c.go_ok()
    assert (size, eflags) == (SIZE, WRITABLE | nr.TF_SEND_DF)


def test_extended_headers_with_payload(srv):
    c = negotiated(srv)
    only_error(c.option(nr.OPT_EXTENDED_HEADERS, b"\0\0\0\0"),
               nr.REP_ERR_INVALID)
    ack(c.extended_headers())


def test_export_name_after_extended_headers_disconnects(srv):
    c = negotiated(srv)
    ack(c.extended_headers())
    c.send_option(nr.OPT_EXPORT_NAME, b"disk0")
    c.expect_closed()
    assert_server_ok(srv)


# ---------------------------------------------------------------------
# Meta contexts

def meta_replies(c, reps, opt):
    """[(id, name)] of the META_CONTEXT replies; the last must be ACK."""
    assert reps[-1].reply == nr.REP_ACK and reps[-1].data == b"", reps
    out = []
    for r in reps[:-1]:
        assert r.reply == nr.REP_META_CONTEXT and r.option == opt, reps
        out.append(c.parse_meta_context(r))
    return out


def test_list_meta_context_all(srv):
    c = negotiated(srv)
    ack(c.structured_reply())
    _, reps = c.set_meta_context("disk0", [], nr.OPT_LIST_META_CONTEXT)
    names = [n for _, n in meta_replies(c, reps, nr.OPT_LIST_META_CONTEXT)]
    assert "base:allocation" in names
    assert len(names) == len(set(names)), names


def test_list_meta_context_base_wildcard(srv):
    c = negotiated(srv)
    ack(c.structured_reply())
    _, reps = c.set_meta_context("disk0", ["base:"], nr.OPT_LIST_META_CONTEXT)
    names = [n for _, n in meta_replies(c, reps, nr.OPT_LIST_META_CONTEXT)]
    assert names == ["base:allocation"]


@pytest.mark.parametrize("opt", [nr.OPT_LIST_META_CONTEXT,
                                 nr.OPT_SET_META_CONTEXT])
def test_meta_context_unknown_namespace_ignored(srv, opt):
    c = negotiated(srv)
    ack(c.structured_reply())
    _, reps = c.set_meta_context("disk0", ["nosuch:thing", "x-nbdd:y",
                                           "base:nosuch"], opt)
    ack(reps)


@pytest.mark.parametrize("opt", [nr.OPT_LIST_META_CONTEXT,
                                 nr.OPT_SET_META_CONTEXT])
def test_meta_context_unknown_export(srv, opt):
    c = negotiated(srv)
    ack(c.structured_reply())
    _, reps = c.set_meta_context("nosuch", ["base:allocation"], opt)
    only_error(reps, nr.REP_ERR_UNKNOWN)
    assert_in_sync(c)


def _meta_overruns():
    n = struct.pack(">I", 5) + b"disk0"
    return {
        "query-len-past-end": n + struct.pack(">II", 1, 100) + b"base:",
        "nq-2-one-query": n + struct.pack(">II", 2, 15) + b"base:allocation",
        "namelen-past-end": struct.pack(">I", 50) + b"disk0" +
        struct.pack(">I", 0),
        "no-nq": n,
        "half-query-len": n + struct.pack(">I", 1) + b"\0\0",
        "query-len-huge": n + struct.pack(">II", 1, 0xFFFFFFFF) + b"base:",
        "nq-huge": n + struct.pack(">II", 0xFFFFFFFF, 5) + b"base:",
    }


META_OVERRUNS = _meta_overruns()


@pytest.mark.parametrize("opt", [nr.OPT_LIST_META_CONTEXT,
                                 nr.OPT_SET_META_CONTEXT])
@pytest.mark.parametrize("case", sorted(META_OVERRUNS))
def test_meta_context_length_overrun(srv, opt, case):
    c = negotiated(srv)
    ack(c.structured_reply())
    only_error(c.option(opt, META_OVERRUNS[case]), nr.REP_ERR_INVALID)
    assert_in_sync(c)


def test_set_meta_context_before_structured_reply(srv):
    c = negotiated(srv)
    _, reps = c.set_meta_context("disk0", ["base:allocation"])
    only_error(reps, nr.REP_ERR_INVALID)
    assert_in_sync(c)


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_set_meta_context(srv, mode):
    c = opened(srv, mode=mode)
    r = do(c, nr.CMD_BLOCK_STATUS, 0, 0, SIZE)
    assert r.err == 0, r
    # Data at 0 and at 8 MiB must not be reported as reading zero.
    pos = 0
    for ln, fl in r.descs:
        if pos <= 0 < pos + ln or pos <= 8 * MIB < pos + ln:
            assert not fl & nr.STATE_ZERO, r.descs
        pos += ln


def test_set_meta_context_one_reply(srv):
    c = negotiated(srv)
    ack(c.structured_reply())
    _, reps = c.set_meta_context("disk0", ["base:allocation"])
    ctxs = meta_replies(c, reps, nr.OPT_SET_META_CONTEXT)
    assert [n for _, n in ctxs] == ["base:allocation"]


@pytest.mark.parametrize("queries", [["base:"], []],
                         ids=["base-wildcard", "no-queries"])
def test_set_meta_context_selects_nothing(srv, queries):
    c = negotiated(srv)
    ack(c.structured_reply())
    _, reps = c.set_meta_context("disk0", queries)
    ack(reps)
    c.go_ok()
    c.mode, c.ctx = "structured", None
    assert do(c, nr.CMD_BLOCK_STATUS, 0, 0, 4096).err == nr.EINVAL


def test_set_meta_context_replaces_previous(srv):
    c = negotiated(srv)
    ack(c.structured_reply())
    ctx, _ = c.set_meta_context("disk0", ["base:allocation"])
    assert list(ctx) == ["base:allocation"]
    ack(c.set_meta_context("disk0", ["base:"])[1])
    c.go_ok()
    c.mode, c.ctx = "structured", None
    assert do(c, nr.CMD_BLOCK_STATUS, 0, 0, 4096).err == nr.EINVAL


def test_set_meta_context_other_export_dropped(multi):
    c = negotiated(multi)
    ack(c.structured_reply())
    ctx, _ = c.set_meta_context("disk0", ["base:allocation"])
    assert list(ctx) == ["base:allocation"]
    assert c.go_ok("disk1")[0] == MIB
    c.mode, c.ctx = "structured", None
    assert do(c, nr.CMD_BLOCK_STATUS, 0, 0, 4096).err == nr.EINVAL
    read_ok(c, 0, 10, b"disk1disk1")


def test_block_status_without_context(srv):
    for mode in ("simple", "structured"):
        c = opened(srv, mode=mode, meta=False)
        assert do(c, nr.CMD_BLOCK_STATUS, 0, 0, 4096).err == nr.EINVAL
        assert_conn_works(c)


# ---------------------------------------------------------------------
# Transmission, compact headers

@pytest.mark.parametrize("mode", MODES)
def test_commands(srv, mode):
    c = opened(srv, mode=mode)
    read_ok(c, 0, 4096, DATA0)
    read_ok(c, 8 * MIB, 65536, DATA8)
    pat = b"W" * 4096
    assert do(c, nr.CMD_WRITE, 0, MIB, 4096, pat).err == 0
    read_ok(c, MIB, 4096, pat)
    assert do(c, nr.CMD_FLUSH).err == 0
    assert do(c, nr.CMD_TRIM, 0, MIB, 4096).err == 0
    assert do(c, nr.CMD_CACHE, 0, 0, 65536).err == 0
    assert do(c, nr.CMD_WRITE, 0, 2 * MIB, 8192, b"Z" * 8192).err == 0
    assert do(c, nr.CMD_WRITE_ZEROES, 0, 2 * MIB, 4096).err == 0
    assert do(c, nr.CMD_WRITE_ZEROES, nr.CMD_FLAG_NO_HOLE,
              2 * MIB + 4096, 4096).err == 0
    read_ok(c, 2 * MIB, 8192, bytes(8192))
    r = do(c, nr.CMD_BLOCK_STATUS, 0, 0, SIZE)
    assert r.err == (0 if mode == "structured" else nr.EINVAL)
    c.send_request(nr.CMD_DISC)
    c.expect_closed()
    assert_server_ok(srv, expect=DATA0)


@pytest.mark.parametrize("mode", MODES)
def test_disc_with_requests_in_flight(srv, mode):
    c = opened(srv, mode=mode)
    c.send(c.request_bytes(nr.CMD_READ, 0, 0, 4096, cookie=1) +
           c.request_bytes(nr.CMD_WRITE, 0, MIB, 512, cookie=2,
                           data=b"d" * 512) +
           c.request_bytes(nr.CMD_DISC, cookie=3))
    got = {}
    for _ in range(2):
        r = c.read_chunks(lambda ck: 4096 if ck == 1 else 0)
        got[r[0].cookie] = r
    assert sorted(got) == [1, 2]
    assert check_reply(c, got[1], nr.CMD_READ, 0, 0, 4096, 1).data == DATA0
    assert check_reply(c, got[2], nr.CMD_WRITE, 0, MIB, 512, 2).err == 0
    c.expect_closed()


@pytest.mark.parametrize("mode", MODES)
def test_cookies_echoed(srv, mode):
    c = opened(srv, mode=mode)
    for ck in ODD_COOKIES:
        r = do(c, nr.CMD_READ, 0, 0, 4096, cookie=ck)
        assert r.err == 0 and r.data == DATA0
        assert do(c, nr.CMD_FLUSH, cookie=ck).err == 0
        assert do(c, nr.CMD_READ, 0, SIZE, 512, cookie=ck).err == nr.EINVAL


def _read_replies(c, n, data_len):
    """Read @n complete replies with possibly interleaved chunks:
    {cookie: [[chunks of reply 1], ...]} in arrival order per cookie.
    Chunks with the same cookie are grouped into one reply until DONE."""
    out = {}
    open_ = {}
    done = 0
    while done < n:
        r = c.read_reply(data_len)
        cur = open_.setdefault(r.cookie, [])
        cur.append(r)
        if r.done:
            out.setdefault(r.cookie, []).append(open_.pop(r.cookie))
            done += 1
    return out


@pytest.mark.parametrize("mode", MODES)
def test_same_cookie_twice_in_flight(srv, mode):
    c = opened(srv, mode=mode)
    ck = 0xDEADBEEFCAFEF00D
    c.send(c.request_bytes(nr.CMD_READ, 0, 0, 4096, cookie=ck) +
           c.request_bytes(nr.CMD_READ, 0, 8 * MIB, 4096, cookie=ck))
    if mode == "simple":
        datas = sorted(c.read_reply(4096).data for _ in range(2))
        assert datas == sorted([DATA0, DATA8[:4096]])
        return
    # Chunks of two replies with one cookie may interleave: rebuild by
    # offset.
    chunks = []
    dones = 0
    while dones < 2:
        r = c.read_reply()
        assert r.cookie == ck and r.kind == "structured", r
        chunks.append(r)
        dones += r.done
    got = {}
    for ch in chunks:
        if ch.type == nr.REPLY_TYPE_OFFSET_DATA:
            off, d = ch.offset_data()
            got[off] = d
        else:
            assert ch.type == nr.REPLY_TYPE_NONE, ch
    assert got == {0: DATA0, 8 * MIB: DATA8[:4096]}


@pytest.mark.parametrize("mode", MODES)
def test_pipelined_requests(srv, mode):
    c = opened(srv, mode=mode)
    reqs = b""
    for i in range(32):
        reqs += c.request_bytes(nr.CMD_READ, 0, 8 * MIB + i * 2048, 2048,
                                cookie=0x1000 + i)
    c.send(reqs)
    replies = _read_replies(c, 32, 2048)
    assert sorted(replies) == [0x1000 + i for i in range(32)]
    for ck, [chunks] in replies.items():
        i = ck - 0x1000
        r = check_reply(c, chunks, nr.CMD_READ, 0, 8 * MIB + i * 2048, 2048,
                        ck)
        assert r.data == DATA8[i * 2048:(i + 1) * 2048]


OUT_OF_RANGE = [(SIZE, 512), (SIZE - 512, 1024), (2**64 - 512, 1024),
                (2**63, 512), (SIZE + MIB, 4096)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cmd,err", [
    (nr.CMD_READ, nr.EINVAL), (nr.CMD_TRIM, nr.EINVAL),
    (nr.CMD_CACHE, nr.EINVAL), (nr.CMD_BLOCK_STATUS, nr.EINVAL),
    (nr.CMD_WRITE, nr.ENOSPC), (nr.CMD_WRITE_ZEROES, nr.ENOSPC)],
    ids=["read", "trim", "cache", "block_status", "write", "write_zeroes"])
def test_out_of_range(srv, mode, cmd, err):
    # (Block status in simple mode is EINVAL anyway: no context.)
    c = opened(srv, mode=mode)
    for off, ln in OUT_OF_RANGE:
        data = b"\x5a" * ln if cmd == nr.CMD_WRITE else b""
        r = do(c, cmd, 0, off, ln, data, cookie=off)
        assert r.err == err, f"offset {off:#x} length {ln}: {r!r}"
        assert_conn_works(c)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cmd", [99, nr.CMD_RESIZE, 9, 0xFFFF])
def test_unknown_command(srv, mode, cmd):
    c = opened(srv, mode=mode)
    assert do(c, cmd, 0, 0, 4096).err == nr.EINVAL
    assert_conn_works(c)


ALL_CMDS = [nr.CMD_READ, nr.CMD_WRITE, nr.CMD_FLUSH, nr.CMD_TRIM,
            nr.CMD_CACHE, nr.CMD_WRITE_ZEROES, nr.CMD_BLOCK_STATUS]
ALL_FLAGS = [0, nr.CMD_FLAG_FUA, nr.CMD_FLAG_NO_HOLE, nr.CMD_FLAG_DF,
             nr.CMD_FLAG_REQ_ONE, nr.CMD_FLAG_FAST_ZERO,
             nr.CMD_FLAG_PAYLOAD_LEN, 0x40, 0x8000]
WRITE_CMDS = (nr.CMD_WRITE, nr.CMD_TRIM, nr.CMD_WRITE_ZEROES)
CMD_ARGS = {  # offset, length
    nr.CMD_READ: (0, 4096), nr.CMD_WRITE: (MIB, 4096),
    nr.CMD_FLUSH: (0, 0), nr.CMD_TRIM: (3 * MIB, 4096),
    nr.CMD_CACHE: (0, 4096), nr.CMD_WRITE_ZEROES: (2 * MIB, 4096),
    nr.CMD_BLOCK_STATUS: (0, MIB),
}


def expected_errors(cmd, flag, mode, writable):
    """The errors the spec allows for @cmd with the single flag @flag."""
    valid = {
        nr.CMD_READ: nr.CMD_FLAG_FUA | (nr.CMD_FLAG_DF if mode != "simple"
                                        else 0),
        nr.CMD_WRITE: nr.CMD_FLAG_FUA,
        nr.CMD_FLUSH: nr.CMD_FLAG_FUA,
        nr.CMD_TRIM: nr.CMD_FLAG_FUA,
        nr.CMD_CACHE: nr.CMD_FLAG_FUA,
        nr.CMD_WRITE_ZEROES: nr.CMD_FLAG_FUA | nr.CMD_FLAG_NO_HOLE |
        (nr.CMD_FLAG_FAST_ZERO if writable else 0),
        nr.CMD_BLOCK_STATUS: nr.CMD_FLAG_FUA | nr.CMD_FLAG_REQ_ONE,
    }[cmd]
    bad = flag & ~valid
    if not writable and cmd in WRITE_CMDS:
        if cmd == nr.CMD_WRITE and not bad:
            return {nr.EPERM}
        # Not advertised (TRIM, WRITE_ZEROES) or a bad flag: either.
        return {nr.EPERM, nr.EINVAL}
    if bad:
        return {nr.EINVAL}
    if cmd == nr.CMD_BLOCK_STATUS and mode == "simple":
        return {nr.EINVAL}
    if cmd == nr.CMD_WRITE_ZEROES and flag & nr.CMD_FLAG_FAST_ZERO:
        return {0, nr.ENOTSUP}
    return {0}


def flag_matrix(srv, mode, writable):
    c = opened(srv, mode=mode)
    assert c.eflags == (WRITABLE if writable else READONLY) | \
        (nr.TF_SEND_DF if mode != "simple" else 0)
    wrong = []
    n = 0
    for cmd in ALL_CMDS:
        for flag in ALL_FLAGS:
            n += 1
            off, ln = CMD_ARGS[cmd]
            data = b"\x77" * ln if cmd == nr.CMD_WRITE else b""
            r = do(c, cmd, flag, off, ln, data, cookie=0xF1A60000 + n)
            want = expected_errors(cmd, flag, mode, writable)
            if r.err not in want:
                wrong.append(f"cmd {cmd} flags {flag:#x}: got error "
                             f"{r.err}, expected one of {sorted(want)}")
            if cmd == nr.CMD_READ and r.err == 0:
                assert r.data == DATA0
    assert not wrong, "\n".join(wrong)
    assert_conn_works(c)
    assert_server_ok(srv, expect=DATA0)


@pytest.mark.parametrize("mode", MODES)
def test_every_flag_on_every_command(srv, mode):
    flag_matrix(srv, mode, True)


@pytest.mark.parametrize("mode", MODES)
def test_every_flag_on_every_command_read_only(ro, mode):
    flag_matrix(ro, mode, False)


def test_fast_zero_read_only(ro):
    for mode in MODES:
        c = opened(ro, mode=mode)
        assert not c.eflags & nr.TF_SEND_FAST_ZERO
        r = do(c, nr.CMD_WRITE_ZEROES, nr.CMD_FLAG_FAST_ZERO, 0, 4096)
        assert r.err in (nr.EINVAL, nr.EPERM), r
        assert_conn_works(c)
    assert_server_ok(ro, expect=DATA0)


@pytest.mark.parametrize("mode", MODES)
def test_read_req_one_einval(srv, mode):
    c = opened(srv, mode=mode)
    assert do(c, nr.CMD_READ, nr.CMD_FLAG_REQ_ONE, 0, 4096).err == nr.EINVAL


def test_read_df_without_structured_replies(srv):
    c = opened(srv, mode="simple")
    assert not c.eflags & nr.TF_SEND_DF
    assert do(c, nr.CMD_READ, nr.CMD_FLAG_DF, 0, 4096).err == nr.EINVAL
    assert_conn_works(c)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flags", [0x8000, nr.CMD_FLAG_REQ_ONE,
                                   nr.CMD_FLAG_PAYLOAD_LEN])
def test_write_bad_flags_payload_consumed(srv, mode, flags):
    c = opened(srv, mode=mode)
    # The payload looks like a READ request: if it were parsed as one,
    # a reply with cookie 0x666 would appear.
    trap = c.request_bytes(nr.CMD_READ, 0, 0, 512, cookie=0x666)
    payload = (trap * (4096 // len(trap) + 1))[:4096]
    r = do(c, nr.CMD_WRITE, flags, MIB, 4096, payload, cookie=0x777)
    assert r.err == nr.EINVAL
    r = do(c, nr.CMD_READ, 0, 0, 4096, cookie=0x888)
    assert r.err == 0 and r.data == DATA0


@pytest.mark.parametrize("mode", MODES)
def test_read_max_payload(big, mode):
    c = opened(big, mode=mode)
    r = do(c, nr.CMD_READ, 0, 1 << 30, MAX_PAYLOAD)
    assert r.err == 0 and r.data == bytes(MAX_PAYLOAD)
    for ln in (MAX_PAYLOAD + 1, 64 * MIB, 0xFFFFFFFF):
        assert do(c, nr.CMD_READ, 0, 1 << 30, ln).err == nr.EINVAL, ln
        read_ok(c, 0, 4096, BIG_DATA[0][1][:4096])


@pytest.mark.parametrize("mode", MODES)
def test_write_max_payload(big, mode):
    c = opened(big, mode=mode)
    assert do(c, nr.CMD_WRITE, 0, 1 << 30, MAX_PAYLOAD,
              b"\1" * MAX_PAYLOAD).err == 0
    # The payload is made of READ requests: if it were not consumed,
    # replies with cookie 0x666 would show up.
    trap = c.request_bytes(nr.CMD_READ, 0, 0, 512, cookie=0x666)
    payload = (trap * ((MAX_PAYLOAD + 1) // len(trap) + 1))[:MAX_PAYLOAD + 1]
    c.send_request(nr.CMD_WRITE, 0, 3 << 30, MAX_PAYLOAD + 1, cookie=9)
    c.send(payload, tolerate_close=True)
    try:
        chunks = c.read_chunks()
        r = check_reply(c, chunks, nr.CMD_WRITE, 0, 3 << 30,
                        MAX_PAYLOAD + 1, 9)
        assert r.err == nr.EINVAL, r
        c.send_request(nr.CMD_READ, 0, 3 << 30, 4096, cookie=10,
                       tolerate_close=True)
        chunks = c.read_chunks(4096)
    except Closed:
        # A clean disconnect is allowed instead.
        assert_server_ok(big, expect=BIG_DATA[0][1])
        return
    r = check_reply(c, chunks, nr.CMD_READ, 0, 3 << 30, 4096, 10)
    assert r.err == 0 and r.data == bytes(4096)


@pytest.mark.parametrize("mode", MODES)
def test_read_length_zero(srv, mode):
    c = opened(srv, mode=mode)
    r = do(c, nr.CMD_READ, 0, 0, 0)
    assert r.err in (0, nr.EINVAL) and r.data == b""
    assert_conn_works(c)


def test_block_status_length_zero(srv):
    c = opened(srv, mode="structured")
    assert do(c, nr.CMD_BLOCK_STATUS, 0, 0, 0).err == nr.EINVAL
    assert_conn_works(c)


BS_HUGE = [(0, 0xFFFFFFFF), (0, 0xFFFFFE00), (4 << 30, 0xFFFFFFFF),
           (4 << 30, 0xFFFFFE00), ((4 << 30) + 1, 0xFFFFFFFF),
           (1 << 30, 0xFFFFFFFF)]


@pytest.mark.parametrize("req_one", [0, nr.CMD_FLAG_REQ_ONE],
                         ids=["all", "req_one"])
def test_block_status_huge_range(big, req_one):
    c = opened(big, mode="structured")
    for off, ln in BS_HUGE:
        r = do(c, nr.CMD_BLOCK_STATUS, req_one, off, ln)
        assert r.err == 0, (off, ln, r)
        if off == 0:
            assert not r.descs[0][1] & nr.STATE_ZERO, r.descs
    assert_server_ok(big, expect=BIG_DATA[0][1])


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_structured_read_sparse(srv, mode):
    assert is_sparse(srv.image, 4 * MIB)
    c = opened(srv, mode=mode)
    r = do(c, nr.CMD_READ, 0, 4 * MIB, MIB)
    assert r.data == bytes(MIB)
    types = {ch.type for ch in r.chunks} - {nr.REPLY_TYPE_NONE}
    assert types == {nr.REPLY_TYPE_OFFSET_HOLE}, r.chunks
    r = do(c, nr.CMD_READ, 0, 0, 4096)
    assert r.data == DATA0
    assert [ch.type for ch in r.chunks if ch.type != nr.REPLY_TYPE_NONE] == \
        [nr.REPLY_TYPE_OFFSET_DATA]
    # Hole, data, hole: chunks cover the request exactly (do() checks).
    r = do(c, nr.CMD_READ, 0, 8 * MIB - 65536, 3 * 65536)
    assert r.data == bytes(65536) + DATA8 + bytes(65536)
    types = {ch.type for ch in r.chunks}
    assert nr.REPLY_TYPE_OFFSET_DATA in types
    assert nr.REPLY_TYPE_OFFSET_HOLE in types


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_read_df_one_chunk(srv, mode):
    c = opened(srv, mode=mode)
    r = do(c, nr.CMD_READ, nr.CMD_FLAG_DF, 8 * MIB - 65536, 3 * 65536)
    assert r.data == bytes(65536) + DATA8 + bytes(65536)
    r = do(c, nr.CMD_READ, nr.CMD_FLAG_DF, 4 * MIB, 65536)
    assert r.data == bytes(65536)


def test_structured_error_chunk(srv):
    c = opened(srv, mode="structured")
    c.send_request(nr.CMD_READ, 0, SIZE, 4096, cookie=42)
    chunks = c.read_chunks()
    assert len(chunks) == 1, chunks
    ch = chunks[0]
    assert ch.kind == "structured" and ch.type == nr.REPLY_TYPE_ERROR
    assert ch.flags & nr.REPLY_FLAG_DONE and ch.cookie == 42
    err, msg, _ = ch.error_chunk()
    assert err == nr.EINVAL and len(msg) <= nr.MAX_STRING
    msg.decode("utf-8")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("off,ln", [(4096, 0), (0, 4096), (1, 1)])
def test_flush_nonzero_offset_length(srv, mode, off, ln):
    c = opened(srv, mode=mode)
    assert do(c, nr.CMD_FLUSH, 0, off, ln).err == nr.EINVAL
    assert do(c, nr.CMD_FLUSH).err == 0


@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
def test_bad_request_magic_disconnects(srv, mode):
    c = opened(srv, mode=mode)
    c.send(struct.pack(">IHHQQI", 0x12345678, 0, nr.CMD_READ, 1, 0, 512) +
           bytes(4))
    c.expect_closed(allow_data=True)
    assert_server_ok(srv)


# ---------------------------------------------------------------------
# Extended headers

def test_extended_every_command(srv):
    c = opened(srv, mode="extended")
    assert c.eflags == WRITABLE | nr.TF_SEND_DF
    read_ok(c, 0, 4096, DATA0)
    read_ok(c, 8 * MIB + 100, 1000, DATA8[100:1100])
    pat = b"E" * 8192
    r = do(c, nr.CMD_WRITE, nr.CMD_FLAG_PAYLOAD_LEN, 3 * MIB, 8192, pat)
    assert r.err == 0
    read_ok(c, 3 * MIB, 8192, pat)
    assert do(c, nr.CMD_FLUSH).err == 0
    assert do(c, nr.CMD_TRIM, 0, 3 * MIB, 4096).err == 0
    assert do(c, nr.CMD_CACHE, 0, 4096, 4096).err == 0
    assert do(c, nr.CMD_WRITE_ZEROES, 0, 3 * MIB + 4096, 4096).err == 0
    read_ok(c, 3 * MIB + 4096, 4096, bytes(4096))
    r = do(c, nr.CMD_BLOCK_STATUS, 0, 0, SIZE)
    assert r.err == 0 and not r.descs[0][1] & nr.STATE_ZERO
    r = do(c, nr.CMD_BLOCK_STATUS, nr.CMD_FLAG_REQ_ONE, 4096, SIZE - 4096)
    assert r.err == 0
    # Errors are extended ERROR chunks carrying the request's offset.
    assert do(c, nr.CMD_READ, 0, SIZE, 512).err == nr.EINVAL
    assert do(c, nr.CMD_READ, 0, 2**64 - 512, 1024).err == nr.EINVAL
    assert do(c, 99, 0, 512, 512).err == nr.EINVAL
    assert do(c, nr.CMD_WRITE_ZEROES, 0, SIZE, 512).err == nr.ENOSPC
    assert do(c, nr.CMD_READ, 0x8000, 0, 512).err == nr.EINVAL
    c.send_request(nr.CMD_DISC)
    c.expect_closed()
    assert_server_ok(srv, expect=DATA0)


def test_extended_cookies(srv):
    c = opened(srv, mode="extended")
    for ck in ODD_COOKIES:
        assert do(c, nr.CMD_READ, 0, 0, 4096, cookie=ck).data == DATA0
        assert do(c, nr.CMD_FLUSH, cookie=ck).err == 0


def test_extended_oversize_lengths(srv):
    c = opened(srv, mode="extended")
    for ln in (MAX_PAYLOAD + 1, 1 << 32, (1 << 32) + 512, 2**64 - 1):
        assert do(c, nr.CMD_READ, 0, 0, ln).err == nr.EINVAL, ln
        assert_conn_works(c)


@pytest.mark.parametrize("cmd", [nr.CMD_READ, nr.CMD_FLUSH,
                                 nr.CMD_BLOCK_STATUS, nr.CMD_CACHE])
def test_extended_payload_on_payloadless_command(srv, cmd):
    c = opened(srv, mode="extended")
    trap = c.request_bytes(nr.CMD_READ, 0, 0, 512, cookie=0x666,
                           extended=True)
    c.send_request(cmd, nr.CMD_FLAG_PAYLOAD_LEN, 0, len(trap), cookie=5,
                   data=trap)
    chunks = c.read_chunks()
    assert check_reply(c, chunks, cmd, nr.CMD_FLAG_PAYLOAD_LEN, 0,
                       len(trap), 5).err == nr.EINVAL
    assert_conn_works(c)


def test_extended_compact_request_disconnects(srv):
    c = opened(srv, mode="extended")
    # A whole 32-byte header, starting with the compact magic.
    c.send(c.request_bytes(nr.CMD_READ, 0, 0, 512, extended=False) +
           bytes(4))
    c.expect_closed(allow_data=True)
    assert_server_ok(srv)


@pytest.mark.parametrize("req_one", [0, nr.CMD_FLAG_REQ_ONE],
                         ids=["all", "req_one"])
def test_extended_block_status_over_4g(big, req_one):
    c = opened(big, mode="extended")
    for off, ln in [(0, 6 << 30), (1 << 30, 7 << 30), (0, BIG),
                    (4 << 30, 4 << 30), (0, 0xFFFFFFFF)]:
        r = do(c, nr.CMD_BLOCK_STATUS, req_one, off, ln)
        assert r.err == 0, (off, ln, r)
        if off == 0:
            assert not r.descs[0][1] & nr.STATE_ZERO
    assert do(c, nr.CMD_BLOCK_STATUS, 0, 1, BIG).err == nr.EINVAL
    assert_server_ok(big, expect=BIG_DATA[0][1])


# ---------------------------------------------------------------------
# Known CVEs turned into test cases

@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_garbage_before_greeting(srv, tcp):
    """CVE-2017-7539: unexpected data during negotiation."""
    c = connect(srv, tcp)
    c.send(b"\xff" * 4096)
    try:
        c.read_greeting()
    except Closed:
        pass
    c.expect_closed(allow_data=True)
    assert_server_ok(srv, expect=DATA0)


def test_everything_before_reading_greeting(srv):
    """CVE-2017-7539: client flags, options and a request in one write
    before the greeting was read."""
    c = connect(srv)
    c.send(struct.pack(">I", 3) +
           c.option_bytes(nr.OPT_STRUCTURED_REPLY) +
           c.option_bytes(nr.OPT_SET_META_CONTEXT,
                          c.meta_payload("disk0", ["base:allocation"])) +
           c.option_bytes(nr.OPT_GO, c.info_payload("disk0")) +
           c.request_bytes(nr.CMD_READ, 0, 0, 4096, cookie=77))
    assert c.read_greeting() == 3
    ack(c.read_option_replies(nr.OPT_STRUCTURED_REPLY))
    assert c.read_option_replies(nr.OPT_SET_META_CONTEXT)[-1].reply == \
        nr.REP_ACK
    assert c.read_option_replies(nr.OPT_GO)[-1].reply == nr.REP_ACK
    c.mode = "structured"
    chunks = c.read_chunks()
    assert check_reply(c, chunks, nr.CMD_READ, 0, 0, 4096, 77).data == DATA0


def test_close_at_every_offset(srv):
    """CVE-2017-7539, CVE-2013-7441: hang up at every byte of the
    greeting, the client flags and the first option."""
    for n in range(19):
        c = connect(srv)
        if n:
            c.recv(n)
        c.close()
    stream = struct.pack(">I", 3) + NBDRaw.option_bytes(
        nr.OPT_GO, NBDRaw.info_payload("disk0", [nr.INFO_BLOCK_SIZE]))
    for n in range(len(stream) + 1):
        c = connect(srv)
        c.recv(18)
        c.send(stream[:n])
        c.close()
    # Hang up with replies pending.
    for opt, payload in [(nr.OPT_LIST, b""), (99, b""),
                         (nr.OPT_INFO, NBDRaw.info_payload("nosuch"))]:
        c = negotiated(srv)
        c.send_option(opt, payload)
        c.close()
    assert_server_ok(srv, expect=DATA0)


@pytest.mark.parametrize("opt", [99, nr.OPT_LIST, nr.OPT_STRUCTURED_REPLY,
                                 nr.OPT_STARTTLS, nr.OPT_INFO, nr.OPT_GO,
                                 nr.OPT_EXPORT_NAME,
                                 nr.OPT_SET_META_CONTEXT])
def test_option_length_4g(srv, opt):
    """CVE-2017-15119: a 4 GiB option is refused at once, not read."""
    c = negotiated(srv)
    c.send_option(opt, b"\0" * 16, length=0xFFFFFFFF)
    expect_option_disconnect(c, opt)
    assert_server_ok(srv, expect=DATA0)


def test_option_payload_limit(srv):
    c = negotiated(srv)
    only_error(c.option(99, b"\0" * MAX_OPTION), nr.REP_ERR_UNSUP)
    assert_in_sync(c)
    c.send_option(99, b"\0" * 1024, length=MAX_OPTION + 1)
    expect_option_disconnect(c, 99)
    assert_server_ok(srv, expect=DATA0)


NAME_LENGTHS = [256, 257, 4095, 4096, 4097, 65535]


@pytest.mark.parametrize("opt", [nr.OPT_INFO, nr.OPT_GO,
                                 nr.OPT_LIST_META_CONTEXT,
                                 nr.OPT_SET_META_CONTEXT])
def test_long_export_names(srv, opt):
    """CVE-2017-15118, CVE-2020-10761: long unknown names; error
    messages stay within 4096 bytes."""
    for n in NAME_LENGTHS:
        c = negotiated(srv)
        if opt in (nr.OPT_LIST_META_CONTEXT, nr.OPT_SET_META_CONTEXT):
            ack(c.structured_reply())
            payload = c.meta_payload("a" * n, ["base:allocation"])
        else:
            payload = c.info_payload("a" * n, [nr.INFO_NAME])
        c.send_option(opt, payload)
        if n <= 4096:
            only_error(c.read_option_replies(opt), nr.REP_ERR_UNKNOWN)
            assert_in_sync(c)
        else:
            invalid_or_disconnect(c, opt)
        c.close()
    assert_server_ok(srv, expect=DATA0)


def test_long_export_names_export_name(srv):
    for n in NAME_LENGTHS:
        c = negotiated(srv)
        c.send_option(nr.OPT_EXPORT_NAME, b"a" * n, tolerate_close=True)
        c.expect_closed()
    assert_server_ok(srv, expect=DATA0)


@pytest.mark.parametrize("opt", [nr.OPT_INFO, nr.OPT_GO,
                                 nr.OPT_LIST_META_CONTEXT,
                                 nr.OPT_SET_META_CONTEXT])
@pytest.mark.parametrize("namelen", [0xFFFFFFFF, 0xFFFFFFFE, 0x80000000],
                         ids=hex)
@pytest.mark.parametrize("optlen", [10, 1024])
def test_namelen_overflow(srv, opt, namelen, optlen):
    """CVE-2022-26495: namelen + 1 wraps; the PoC sends optlen 1024."""
    c = negotiated(srv)
    if opt in (nr.OPT_LIST_META_CONTEXT, nr.OPT_SET_META_CONTEXT):
        ack(c.structured_reply())
    c.send_option(opt, struct.pack(">I", namelen) + b"A" * (optlen - 4))
    invalid_or_disconnect(c, opt)
    assert_server_ok(srv, expect=DATA0)


@pytest.mark.parametrize("opt", [nr.OPT_INFO, nr.OPT_GO])
@pytest.mark.parametrize("optlen", [6, 7, 1028, 1029, 65536])
def test_namelen_beyond_option(srv, opt, optlen):
    """CVE-2022-26496: namelen > optlen - 6."""
    c = negotiated(srv)
    for namelen in sorted({optlen - 5, max(4096, optlen + 1)}):
        c.send_option(opt, struct.pack(">I", namelen) + b"B" * (optlen - 4))
        only_error(c.read_option_replies(opt), nr.REP_ERR_INVALID)
        assert_in_sync(c)
    assert_server_ok(srv, expect=DATA0)


def _go_and_read(c, name, size, head):
    assert c.go_ok(name)[0] == size
    c.mode = "simple"
    read_ok(c, 0, len(head), head)


def test_info_go_sequences(multi):
    """CVE-2019-14851: INFO before GO, in every order."""
    d1 = b"disk1" * 200
    c = negotiated(multi)
    assert_in_sync(c, "disk0")
    _go_and_read(c, "disk0", SIZE, DATA0)

    c = negotiated(multi)
    assert_in_sync(c, "disk0")
    _go_and_read(c, "disk1", MIB, d1)

    c = negotiated(multi)
    only_error(c.info("nosuch"), nr.REP_ERR_UNKNOWN)
    _go_and_read(c, "disk0", SIZE, DATA0)

    c = negotiated(multi)
    for i in range(option_cap(2) - 1):
        assert_in_sync(c, ("disk0", "disk1")[i % 2], (SIZE, MIB)[i % 2])
    _go_and_read(c, "disk1", MIB, d1)

    c = negotiated(multi)
    assert_in_sync(c, "disk1", MIB)
    ack(c.option(nr.OPT_ABORT))
    c.expect_closed()
    assert_server_ok(multi, expect=DATA0)
    assert_server_ok(multi, "disk1", expect=d1)


def test_handshake_timeout(nbdd_server, raw_image):
    """CVE-2024-7409: stalled handshakes are dropped after the timeout
    and do not lock out real clients."""
    img = raw_image(SIZE, [(0, DATA0)])
    srv = nbdd_server(blockdev_args(img) + export_args() +
                      ["--handshake-timeout", "1"])
    t0 = time.monotonic()
    stalled = []
    for i in range(4):
        stalled.append(connect(srv))                       # nothing read
        c = connect(srv)
        c.read_greeting()                                  # no cflags
        stalled.append(c)
        c = connect(srv)
        c.read_greeting()
        c.send(b"\0\0")                                    # half cflags
        stalled.append(c)
        c = negotiated(srv)
        c.send(struct.pack(">Q", nr.IHAVEOPT))             # half header
        stalled.append(c)
        c = negotiated(srv)
        c.send_option(99, b"x" * 10, length=100)           # half payload
        stalled.append(c)
        c = negotiated(srv)
        ack(c.structured_reply())                          # idle
        stalled.append(c)
    # A real client gets through while they stall.
    assert_server_ok(srv, expect=DATA0)
    # A transmission-phase connection is not subject to the timeout.
    live = opened(srv)
    # A client dripping valid options is dropped too.
    drip = negotiated(srv)
    dropped = False
    while time.monotonic() - t0 < 4:
        try:
            drip.send_option(99, tolerate_close=True)
            only_error(drip.read_option_replies(99), nr.REP_ERR_UNSUP)
        except Closed:
            dropped = True
            break
        time.sleep(0.1)
    assert dropped, "a slow handshake was not timed out"
    for c in stalled:
        c.expect_closed(timeout=max(0.5, 4 - (time.monotonic() - t0)),
                        allow_data=True)
    assert_conn_works(live)
    assert_server_ok(srv, expect=DATA0)


def test_stalled_connections_do_not_lock_out(nbdd_server, raw_image):
    """CVE-2024-7409: more stalled handshakes than the connection limit
    (default 100) keep real clients out for at most the handshake
    timeout."""
    img = raw_image(SIZE, [(0, DATA0)])
    srv = nbdd_server(blockdev_args(img) + export_args() +
                      ["--handshake-timeout", "1"])
    t0 = time.monotonic()
    stalled = [connect(srv) for _ in range(150)]
    deadline = t0 + 5
    while True:
        assert srv.alive(), "nbdd died:\n" + srv.output()
        try:
            assert_server_ok(srv, expect=DATA0, timeout=2)
            break
        except (nbd.Error, AssertionError) as e:
            assert time.monotonic() < deadline, \
                f"real clients still locked out after 5 s: {e}"
            time.sleep(0.1)
    for c in stalled:
        c.expect_closed(timeout=max(0.5, deadline - time.monotonic()),
                        allow_data=True)
        c.close()
    assert_server_ok(srv, expect=DATA0)


def test_option_count_limit(srv):
    cap = option_cap(1)
    c = negotiated(srv)
    for _ in range(cap - 1):
        only_error(c.option(99), nr.REP_ERR_UNSUP)
    c.go_ok()
    c.mode = "simple"
    assert_conn_works(c)

    c = negotiated(srv)
    for _ in range(cap):
        only_error(c.option(99), nr.REP_ERR_UNSUP)
    c.send_option(nr.OPT_GO, c.info_payload("disk0"))
    expect_option_disconnect(c, nr.OPT_GO)
    assert_server_ok(srv, expect=DATA0)


def test_option_count_limit_scales_with_exports(multi):
    cap = option_cap(2)
    c = negotiated(multi)
    for _ in range(cap - 1):
        assert_in_sync(c)
    _go_and_read(c, "disk0", SIZE, DATA0)

    c = negotiated(multi)
    for _ in range(cap):
        assert_in_sync(c)
    c.send_option(nr.OPT_INFO, c.info_payload("disk0"))
    expect_option_disconnect(c, nr.OPT_INFO)
    assert_server_ok(multi, expect=DATA0)


def test_option_flood(srv):
    c = negotiated(srv)
    c.send(c.option_bytes(99) * 2000, tolerate_close=True)
    n = 0
    while True:
        try:
            r = c.read_option_reply()
        except Closed as e:
            assert e.data == b""
            break
        assert r.option == 99 and r.reply == nr.REP_ERR_UNSUP, r
        n += 1
    assert n <= option_cap(1)
    assert_server_ok(srv, expect=DATA0)


def test_pipelined_reads_then_hangup(srv):
    """CVE-2017-10664 (SIGPIPE), nbdkit 9d82aa4f (replies queued for a
    client that hung up)."""
    for i in range(20):
        c = opened(srv, mode=MODES[i % 2])
        reqs = b""
        for j in range(64):
            off = ((j * MIB) % SIZE) if j != 17 else SIZE   # one error
            reqs += c.request_bytes(nr.CMD_READ, 0, off, MIB, cookie=j)
        c.send(reqs)
        if i % 5 == 0:
            c.recv(100)
        c.close()
    for _ in range(3):
        c = opened(srv)
        c.send_request(nr.CMD_READ, 0, 0, MAX_PAYLOAD >> 1)
        c.close()
    assert_server_ok(srv, expect=DATA0)


@pytest.mark.parametrize("length", [0xFFFFFFFF, MAX_PAYLOAD + 1])
def test_write_half_payload_then_close(srv, length):
    for mode in MODES:
        c = opened(srv, mode=mode)
        c.send_request(nr.CMD_WRITE, 0, 0, length, cookie=1)
        c.send(b"\0" * MIB, tolerate_close=True)
        c.close()
    assert_server_ok(srv, expect=DATA0)


def test_write_4g_not_consumed(srv):
    """CVE-2017-15119 for requests: a 4 GiB WRITE is refused promptly
    (an EINVAL and/or a disconnect), not read to the end."""
    c = opened(srv)
    c.send_request(nr.CMD_WRITE, 0, 0, 0xFFFFFFFF, cookie=0xABC)
    c.send(b"\0" * 65536, tolerate_close=True)
    data = c.expect_closed(timeout=5, allow_data=True)
    if data:
        assert len(data) >= 16 and struct.unpack(">IIQ", data[:16]) == \
            (nr.SIMPLE_REPLY_MAGIC, nr.EINVAL, 0xABC), data[:64]
    assert_server_ok(srv, expect=DATA0)


def test_connect_close_loop(srv):
    for i in range(300):
        tcp = bool(i % 2)
        kind = i % 5
        c = connect(srv, tcp)
        if kind >= 1:
            c.read_greeting()
        if kind >= 2:
            c.send_cflags(3)
        if kind >= 3:
            c.go_ok()
        if kind == 4:
            c.send(c.request_bytes(nr.CMD_READ, 0, 0, 4096)[:10])
        c.close()
    assert_server_ok(srv, expect=DATA0)
