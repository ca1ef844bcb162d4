"""A small raw NBD client for protocol tests.

It speaks the wire format directly (struct, big-endian) so that tests
can send anything: lying lengths, options in the wrong order, invalid
flags, half-sent payloads.  It validates only what it must in order to
frame the byte stream (magics, header sizes); judging the content is
up to the test.

Every receive has a timeout, so a server that hangs makes the test
fail with socket.timeout instead of hanging it.
"""
import errno
import select
import socket
import struct
import time

# Handshake.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009
REP_ERR_EXT_HEADER_REQD = 0x8000000A

# NBD_REP_INFO types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags.
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11
TF_BLOCK_STAT_PAYLOAD = 1 << 12

# Requests and replies.
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002

# Transmission errors.
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

MAX_STRING = 4096

DEFAULT_TIMEOUT = 5.0


class Closed(Exception):
    """The peer closed the connection (EOF or reset) while we expected
    more bytes.  .data holds what had arrived of the partial read."""

    def __init__(self, msg, data=b""):
        super().__init__(msg)
        self.data = data


def _is_reset(e):
    return isinstance(e, (ConnectionResetError, BrokenPipeError)) or \
        getattr(e, "errno", None) in (errno.ECONNRESET, errno.EPIPE)


def recv_exact(sock, n, timeout=DEFAULT_TIMEOUT):
    """Read exactly @n bytes.  Raises Closed on EOF/reset and
    socket.timeout if they do not all arrive within @timeout seconds."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout(
                f"timed out after {timeout}s waiting for {n} bytes "
                f"(got {len(buf)})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except OSError as e:
            if _is_reset(e):
                raise Closed(f"connection reset after {len(buf)} of {n} "
                             "bytes", bytes(buf)) from e
            raise
        if not chunk:
            raise Closed(f"EOF after {len(buf)} of {n} bytes", bytes(buf))
        buf += chunk
    return bytes(buf)


def expect_closed(sock, timeout=DEFAULT_TIMEOUT, allow_data=False):
    """Assert that the server closes the connection within @timeout:
    recv returns b'' or fails with ECONNRESET.  Bytes that arrive first
    are an assertion failure unless @allow_data; they are returned."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"server did not close the connection within {timeout}s "
                f"(received {len(got)} bytes: {bytes(got[:64])!r})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError as e:
            if _is_reset(e):
                break
            raise
        if not chunk:
            break
        got += chunk
        if not allow_data:
            raise AssertionError(
                f"expected the server to close the connection, but it sent "
                f"{bytes(got[:64])!r}")
    return bytes(got)


def expect_quiet(sock, wait=0.2):
    """Assert that nothing arrives (and the connection is not closed)
    within @wait seconds."""
    r, _, _ = select.select([sock], [], [], wait)
    if r:
        sock.settimeout(0.1)
        try:
            data = sock.recv(64)
        except OSError as e:
            raise AssertionError(f"unexpected socket error: {e}") from e
        if not data:
            raise AssertionError("server closed the connection unexpectedly")
        raise AssertionError(f"unexpected extra bytes: {data!r}")


class OptReply:
    """One option reply: the option echoed, the reply type, its data."""

    def __init__(self, option, reply, data):
        self.option = option
        self.reply = reply
        self.data = data

    @property
    def is_error(self):
        return bool(self.reply & 0x80000000)

    def __repr__(self):
        return (f"OptReply(option={self.option}, reply=0x{self.reply:x}, "
                f"len={len(self.data)}, data={self.data[:40]!r})")


class Reply:
    """One transmission reply: a simple reply (kind 'simple': .error,
    .data) or one chunk of a structured/extended reply (kind
    'structured'/'extended': .flags, .type, .offset (extended only),
    .payload)."""

    def __init__(self, kind, cookie, error=0, data=b"", flags=0, type=None,
                 offset=None, payload=b""):
        self.kind = kind
        self.cookie = cookie
        self.error = error
        self.data = data
        self.flags = flags
        self.type = type
        self.offset = offset
        self.payload = payload

    @property
    def done(self):
        return self.kind == "simple" or bool(self.flags & REPLY_FLAG_DONE)

    # Payload parsers.  Each raises ValueError on a malformed payload.

    def offset_data(self):
        """OFFSET_DATA -> (offset, data)."""
        if len(self.payload) < 9:
            raise ValueError(
                f"OFFSET_DATA payload too short: {self.payload!r}")
        return struct.unpack(">Q", self.payload[:8])[0], self.payload[8:]

    def offset_hole(self):
        """OFFSET_HOLE -> (offset, length)."""
        if len(self.payload) != 12:
            raise ValueError(f"OFFSET_HOLE payload length {len(self.payload)}")
        return struct.unpack(">QI", self.payload)

    def error_chunk(self):
        """ERROR / ERROR_OFFSET -> (error, message, offset or None)."""
        p = self.payload
        if len(p) < 6:
            raise ValueError(f"ERROR payload too short: {p!r}")
        err, mlen = struct.unpack(">IH", p[:6])
        if 6 + mlen > len(p):
            raise ValueError(f"ERROR message length {mlen} overruns "
                             f"payload {len(p)}")
        msg = p[6:6 + mlen]
        off = None
        if self.type == REPLY_TYPE_ERROR_OFFSET:
            if len(p) != 6 + mlen + 8:
                raise ValueError("ERROR_OFFSET payload length wrong")
            off = struct.unpack(">Q", p[6 + mlen:])[0]
        elif len(p) != 6 + mlen:
            raise ValueError(f"ERROR payload {len(p)} != 6 + msglen {mlen}")
        return err, msg, off

    def block_status(self):
        """BLOCK_STATUS -> (context id, [(length, flags), ...])."""
        p = self.payload
        if len(p) < 4 or (len(p) - 4) % 8:
            raise ValueError(f"BLOCK_STATUS payload length {len(p)}")
        ctx = struct.unpack(">I", p[:4])[0]
        descs = [struct.unpack(">II", p[i:i + 8]) for i in range(4, len(p), 8)]
        return ctx, descs

    def block_status_ext(self):
        """BLOCK_STATUS_EXT -> (context id, [(length, flags), ...]);
        checks that the count field matches the payload length."""
        p = self.payload
        if len(p) < 8 or (len(p) - 8) % 16:
            raise ValueError(f"BLOCK_STATUS_EXT payload length {len(p)}")
        ctx, count = struct.unpack(">II", p[:8])
        descs = [struct.unpack(">QQ", p[i:i + 16])
                 for i in range(8, len(p), 16)]
        if count != len(descs):
            raise ValueError(f"BLOCK_STATUS_EXT count {count} but "
                             f"{len(descs)} descriptors")
        return ctx, descs

    @property
    def err(self):
        """The error code of a simple reply or ERROR chunk, else 0."""
        if self.kind == "simple":
            return self.error
        if self.type in (REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET):
            return self.error_chunk()[0]
        return 0

    def __repr__(self):
        if self.kind == "simple":
            return (f"Reply(simple, cookie=0x{self.cookie:x}, "
                    f"error={self.error}, datalen={len(self.data)})")
        extra = f", offset={self.offset}" if self.offset is not None else ""
        return (f"Reply({self.kind}, cookie=0x{self.cookie:x}, "
                f"flags={self.flags}, type=0x{self.type:x}{extra}, "
                f"payload={self.payload[:32]!r}"
                f"{'...' if len(self.payload) > 32 else ''})")


class NBDRaw:
    """A raw NBD connection.  The caller drives every step.

    .extended is set by extended_headers() once the server ACKed
    EXTENDED_HEADERS; send_request() then uses 32-byte headers unless
    told otherwise."""

    def __init__(self, sock, timeout=DEFAULT_TIMEOUT):
        self.sock = sock
        self.timeout = timeout
        self.extended = False
        sock.settimeout(timeout)

    @classmethod
    def unix(cls, path, timeout=DEFAULT_TIMEOUT):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(path)
        return cls(s, timeout)

    @classmethod
    def tcp(cls, port, host="127.0.0.1", timeout=DEFAULT_TIMEOUT):
        s = socket.create_connection((host, port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(s, timeout)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Bytes.

    def recv(self, n, timeout=None):
        return recv_exact(self.sock, n, timeout or self.timeout)

    def send(self, data, tolerate_close=False):
        """Send all of @data.  With @tolerate_close, a reset/EPIPE from a
        server that already hung up is swallowed and False returned."""
        self.sock.settimeout(self.timeout)
        try:
            self.sock.sendall(data)
        except OSError as e:
            if tolerate_close and _is_reset(e):
                return False
            raise
        return True

    def expect_closed(self, timeout=None, allow_data=False):
        return expect_closed(self.sock, timeout or self.timeout, allow_data)

    def expect_quiet(self, wait=0.2):
        expect_quiet(self.sock, wait)

    # Handshake.

    def read_greeting(self):
        """Read the 18-byte greeting; check both magics; return gflags."""
        data = self.recv(18)
        magic, ihaveopt, gflags = struct.unpack(">QQH", data)
        if magic != NBDMAGIC or ihaveopt != IHAVEOPT:
            raise ValueError(f"bad greeting {data!r}")
        return gflags

    def send_cflags(self, cflags):
        self.send(struct.pack(">I", cflags))

    def handshake(self, cflags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        """Greeting + client flags; returns gflags."""
        g = self.read_greeting()
        self.send_cflags(cflags)
        return g

    @staticmethod
    def option_bytes(opt, data=b"", length=None, magic=IHAVEOPT):
        """The bytes of one option; @length overrides the true length."""
        if length is None:
            length = len(data)
        return struct.pack(">QII", magic, opt, length) + data

    def send_option(self, opt, data=b"", length=None, magic=IHAVEOPT,
                    tolerate_close=False):
        return self.send(self.option_bytes(opt, data, length, magic),
                         tolerate_close)

    def read_option_reply(self, max_len=64 << 20):
        hdr = self.recv(20)
        magic, opt, rep, length = struct.unpack(">QIII", hdr)
        if magic != REPLY_MAGIC:
            raise ValueError(f"bad option reply magic 0x{magic:x}: {hdr!r}")
        if length > max_len:
            raise ValueError(f"option reply length {length} too large")
        return OptReply(opt, rep, self.recv(length) if length else b"")

    def read_option_replies(self, opt=None):
        """Read replies up to and including the final one (ACK or an
        error).  If @opt is given, every reply must echo it."""
        out = []
        while True:
            r = self.read_option_reply()
            if opt is not None and r.option != opt:
                raise ValueError(f"reply echoes option {r.option}, "
                                 f"expected {opt}: {r!r}")
            out.append(r)
            if r.reply == REP_ACK or r.is_error:
                return out

    def option(self, opt, data=b"", length=None):
        """Send one option and return the list of its replies."""
        self.send_option(opt, data, length)
        return self.read_option_replies(opt)

    def export_name(self, name, no_zeroes=False):
        """Send EXPORT_NAME and read the reply: (size, eflags, zeroes)."""
        if isinstance(name, str):
            name = name.encode()
        self.send_option(OPT_EXPORT_NAME, name)
        size, eflags = struct.unpack(">QH", self.recv(10))
        zeroes = b"" if no_zeroes else self.recv(124)
        return size, eflags, zeroes

    @staticmethod
    def info_payload(name, infos=(), namelen=None, ninfos=None):
        """Payload of INFO/GO; @namelen/@ninfos override the fields."""
        if isinstance(name, str):
            name = name.encode()
        if namelen is None:
            namelen = len(name)
        if ninfos is None:
            ninfos = len(infos)
        return (struct.pack(">I", namelen) + name + struct.pack(">H", ninfos)
                + b"".join(struct.pack(">H", i) for i in infos))

    @staticmethod
    def meta_payload(name, queries=()):
        """Payload of LIST/SET_META_CONTEXT."""
        if isinstance(name, str):
            name = name.encode()
        out = struct.pack(">I", len(name)) + name
        out += struct.pack(">I", len(queries))
        for q in queries:
            if isinstance(q, str):
                q = q.encode()
            out += struct.pack(">I", len(q)) + q
        return out

    @staticmethod
    def parse_info(reply):
        """NBD_REP_INFO -> (type, body)."""
        if len(reply.data) < 2:
            raise ValueError(f"short NBD_REP_INFO {reply!r}")
        return struct.unpack(">H", reply.data[:2])[0], reply.data[2:]

    @staticmethod
    def parse_info_export(body):
        """INFO_EXPORT body -> (size, eflags)."""
        if len(body) != 10:
            raise ValueError(f"INFO_EXPORT body length {len(body)}")
        return struct.unpack(">QH", body)

    @staticmethod
    def parse_meta_context(reply):
        """NBD_REP_META_CONTEXT -> (id, name)."""
        if len(reply.data) <= 4:
            raise ValueError(f"short NBD_REP_META_CONTEXT {reply!r}")
        return struct.unpack(">I", reply.data[:4])[0], reply.data[4:].decode()

    def info(self, name, infos=(), opt=OPT_INFO):
        return self.option(opt, self.info_payload(name, infos))

    def go(self, name, infos=()):
        """OPT_GO; returns the replies.  On ACK the connection is in
        transmission."""
        return self.info(name, infos, OPT_GO)

    def go_ok(self, name="disk0", infos=()):
        """OPT_GO that must succeed: returns (size, eflags) from the
        INFO_EXPORT reply."""
        reps = self.go(name, infos)
        if reps[-1].reply != REP_ACK:
            raise AssertionError(f"GO {name!r} failed: {reps!r}")
        for r in reps:
            if r.reply == REP_INFO and self.parse_info(r)[0] == INFO_EXPORT:
                return self.parse_info_export(self.parse_info(r)[1])
        raise AssertionError(f"GO {name!r}: no INFO_EXPORT in {reps!r}")

    def structured_reply(self):
        return self.option(OPT_STRUCTURED_REPLY)

    def extended_headers(self):
        reps = self.option(OPT_EXTENDED_HEADERS)
        if reps[-1].reply == REP_ACK:
            self.extended = True
        return reps

    def set_meta_context(self, name, queries, opt=OPT_SET_META_CONTEXT):
        """SET (or LIST) META_CONTEXT: returns ({name: id}, replies)."""
        reps = self.option(opt, self.meta_payload(name, queries))
        ctx = {}
        for r in reps:
            if r.reply == REP_META_CONTEXT:
                i, n = self.parse_meta_context(r)
                ctx[n] = i
        return ctx, reps

    # Transmission.

    @staticmethod
    def request_bytes(cmd, flags=0, offset=0, length=0, cookie=1,
                      data=b"", extended=False):
        if extended:
            hdr = struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, cmd,
                              cookie, offset & (2**64 - 1),
                              length & (2**64 - 1))
        else:
            hdr = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie,
                              offset & (2**64 - 1), length & (2**32 - 1))
        return hdr + data

    def send_request(self, cmd, flags=0, offset=0, length=None, cookie=1,
                     data=b"", extended=None, tolerate_close=False):
        """Send one request header (+ @data).  @length defaults to
        len(data); @extended defaults to whether EH was negotiated."""
        if length is None:
            length = len(data)
        if extended is None:
            extended = self.extended
        return self.send(self.request_bytes(cmd, flags, offset, length,
                                            cookie, data, extended),
                         tolerate_close)

    def read_reply(self, data_len=0, timeout=None):
        """Read one simple reply or one chunk.  For a simple reply with
        error 0, @data_len bytes of READ data follow and are read;
        @data_len may be a function of the cookie when several requests
        are in flight (a simple reply does not say its own length)."""
        t = timeout or self.timeout
        magic = struct.unpack(">I", recv_exact(self.sock, 4, t))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", recv_exact(self.sock, 12, t))
            if callable(data_len):
                data_len = data_len(cookie)
            data = recv_exact(self.sock, data_len, t) if (err == 0 and
                                                          data_len) else b""
            return Reply("simple", cookie, error=err, data=data)
        if magic == STRUCTURED_REPLY_MAGIC:
            flags, typ, cookie, length = struct.unpack(
                ">HHQI", recv_exact(self.sock, 16, t))
            payload = recv_exact(self.sock, length, t) if length else b""
            return Reply("structured", cookie, flags=flags, type=typ,
                         payload=payload)
        if magic == EXTENDED_REPLY_MAGIC:
            flags, typ, cookie, offset, length = struct.unpack(
                ">HHQQQ", recv_exact(self.sock, 28, t))
            if length > (64 << 20) + 64:
                raise ValueError(f"extended chunk length {length} too large")
            payload = recv_exact(self.sock, length, t) if length else b""
            return Reply("extended", cookie, flags=flags, type=typ,
                         offset=offset, payload=payload)
        raise ValueError(f"bad reply magic 0x{magic:08x}")

    def read_chunks(self, data_len=0, timeout=None):
        """Read one complete reply: a simple reply, or chunks up to and
        including the one with DONE.  Returns the list of Reply.  All
        chunks must carry the same cookie (use with one request in
        flight)."""
        out = [self.read_reply(data_len, timeout)]
        while not out[-1].done:
            r = self.read_reply(data_len, timeout)
            if r.kind == "simple":
                raise ValueError(f"simple reply inside a chunked reply: "
                                 f"{out!r} then {r!r}")
            if r.cookie != out[0].cookie:
                raise ValueError(f"cookie changed within a reply: {out!r} "
                                 f"then {r!r}")
            out.append(r)
        return out

    def request(self, cmd, flags=0, offset=0, length=None, cookie=1,
                data=b"", read_len=None):
        """Send one request and read its complete reply (a list)."""
        self.send_request(cmd, flags, offset, length, cookie, data)
        if read_len is None:
            read_len = length if cmd == CMD_READ and length else 0
        return self.read_chunks(read_len)


def reply_error(chunks):
    """The error of a complete reply: 0 on success, else the error of
    the simple reply or of the (first) ERROR chunk."""
    for c in chunks:
        if c.err:
            return c.err
    return 0


def assemble_read(chunks, offset, length):
    """Check a structured/extended READ reply and rebuild the data.

    Asserts what a client relies on: every content chunk lies within
    the request, chunks do not overlap, together they cover the request
    exactly, only the last chunk has DONE, and there is no error.
    Returns (data, [chunk types])."""
    buf = bytearray(length)
    covered = []
    types = []
    for i, c in enumerate(chunks):
        assert c.kind != "simple", f"simple reply to a structured READ: {c!r}"
        assert bool(c.flags & REPLY_FLAG_DONE) == (i == len(chunks) - 1), \
            f"DONE flag misplaced in {chunks!r}"
        types.append(c.type)
        if c.type == REPLY_TYPE_OFFSET_DATA:
            off, data = c.offset_data()
            n = len(data)
        elif c.type == REPLY_TYPE_OFFSET_HOLE:
            off, n = c.offset_hole()
            assert n > 0, f"OFFSET_HOLE of size 0: {c!r}"
            data = bytes(n)
        elif c.type == REPLY_TYPE_NONE:
            assert c.payload == b"", f"NONE chunk with payload: {c!r}"
            assert c.flags & REPLY_FLAG_DONE, f"NONE without DONE: {c!r}"
            continue
        else:
            raise AssertionError(f"unexpected chunk in READ reply: {c!r}")
        assert offset <= off and off + n <= offset + length, \
            f"chunk [{off}, +{n}) outside request [{offset}, +{length})"
        for a, b in covered:
            assert off + n <= a or b <= off, \
                f"chunk [{off}, {off + n}) overlaps [{a}, {b})"
        covered.append((off, off + n))
        buf[off - offset:off - offset + n] = data
    total = sum(b - a for a, b in covered)
    assert total == length, \
        f"chunks cover {total} bytes of a {length}-byte request: {chunks!r}"
    return bytes(buf), types
