"""Large READs of cached data are spliced from the page cache into the
socket.  What a client relies on is unchanged: the bytes are the
image's, in every reply mode and over both transports, whether the
client reads promptly, slowly, or goes away with replies unread, and
whether or not the daemon's pool of pipes runs dry.

With -v the daemon logs, per connection, how many reads went zero-copy
and, at exit, how many pipes are still in use: the tests use that to
check the path they mean to test really ran, and that no pipe is lost.
"""
import os
import re
import time

import pytest

import nbdraw as nr
from conftest import blockdev_args, export_args
from helpers import KiB, MiB, pattern, wait_for

SIZE = 64 * MiB


@pytest.fixture
def data_disk(nbdd_server, raw_image):
    """A fully allocated image of pseudo-random data: (server, bytes)."""
    data = pattern(7, SIZE)
    img = raw_image(SIZE, [(0, data)])
    srv = nbdd_server(["-v"] + blockdev_args(img) + export_args())
    return srv, data


def ended(srv):
    """(requests, zero-copy reads) of each connection that has ended."""
    return [(int(a), int(b)) for a, b in re.findall(
        r"connection ended: (\d+) requests, (\d+) reads zero-copy",
        srv.output())]


def stop_and_check_pipes(srv):
    """Stop the daemon; every pipe must be back in the pool."""
    srv.stop()
    m = re.search(r"zero-copy pipes at exit: (\d+) open, (\d+) in use",
                  srv.output())
    assert m, srv.output()
    assert int(m.group(2)) == 0, m.group(0)
    return int(m.group(1))


def connect(srv, mode, tcp=False):
    c = nr.NBDRaw.tcp(srv.port) if tcp else nr.NBDRaw.unix(srv.sock)
    c.handshake()
    if mode == "structured":
        assert c.structured_reply()[-1].reply == nr.REP_ACK
    elif mode == "extended":
        assert c.extended_headers()[-1].reply == nr.REP_ACK
    c.go_ok()
    return c


def read_reply_data(c, mode, offset, length):
    """Read one complete READ reply and return its data."""
    if mode == "simple":
        r = c.read_reply(length)
        assert r.kind == "simple" and r.error == 0, r
        return r.data, r.cookie
    chunks = c.read_chunks()
    data, _ = nr.assemble_read(chunks, offset, length)
    return data, chunks[0].cookie


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
def test_large_reads_return_image_data(data_disk, mode, tcp):
    """Reads around and across the splice thresholds (64 KiB to the
    256 KiB pipe size and past it), aligned and not."""
    srv, data = data_disk
    c = connect(srv, mode, tcp)
    cases = [(0, 64 * KiB), (12345, 64 * KiB + 1), (1 * MiB, 128 * KiB),
             (3 * MiB + 7, 256 * KiB), (SIZE - 256 * KiB, 256 * KiB),
             (5 * MiB, 256 * KiB + 4096), (9 * MiB + 511, 2 * MiB)]
    for i, (off, n) in enumerate(cases):
        c.send_request(nr.CMD_READ, offset=off, length=n, cookie=i + 1)
        got, cookie = read_reply_data(c, mode, off, n)
        assert cookie == i + 1
        assert got == data[off:off + n], f"bad data at {off}+{n}"
    c.close()
    # Three fit a pipe: 64 KiB + 1, 128 KiB, and the aligned 256 KiB.
    assert wait_for(lambda: ended(srv), 10)
    assert ended(srv) == [(len(cases), 3)], ended(srv)
    stop_and_check_pipes(srv)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("mode", ["simple", "structured"])
def test_slow_reader_gets_every_reply(data_disk, mode, tcp):
    """300 pipelined page-aligned 256 KiB reads (75 MiB: more than the
    socket holds, more than the pool has pipes), mixed with small reads
    served on the loop thread, and nothing read for a while.  Replies
    queue with their pipes, part-sent ones resume, the pool runs dry
    and later reads are copied: every reply arrives whole and right."""
    srv, data = data_disk
    c = connect(srv, mode, tcp)
    want = {}
    reqs = []
    for i in range(1, 301):
        if i % 5 == 0:
            off, size = (i * 7919) % (SIZE - 4096), 4096
        else:
            off, size = ((i * 4099 * 61) % (SIZE - 256 * KiB)) & ~4095, \
                256 * KiB
        want[i] = (off, size)
        reqs.append(nr.NBDRaw.request_bytes(nr.CMD_READ, offset=off,
                                            length=size, cookie=i))
    c.send(b"".join(reqs))
    time.sleep(1)
    seen = set()
    for _ in range(len(want)):
        if mode == "simple":
            r = c.read_reply(lambda cookie: want[cookie][1])
            assert r.error == 0, r
            got, cookie = r.data, r.cookie
        else:
            chunks = c.read_chunks()
            cookie = chunks[0].cookie
            got, _ = nr.assemble_read(chunks, *want[cookie])
        off, size = want[cookie]
        assert got == data[off:off + size], f"bad data for cookie {cookie}"
        seen.add(cookie)
    assert seen == set(want)
    c.close()
    wait_for(lambda: ended(srv), 10)
    (nreq, spliced), = ended(srv)
    assert nreq == 300
    assert spliced >= 100, f"only {spliced} reads were spliced"
    stop_and_check_pipes(srv)


def test_clients_leaving_with_unsent_data_leak_nothing(data_disk):
    """Clients that queue many large reads and hang up without reading
    cost the daemon nothing lasting: pipes holding their unsent data
    are closed, the pool refills, the next client's reads still go
    zero-copy and are right, and at exit every pipe is accounted for."""
    srv, data = data_disk
    size = 256 * KiB
    rounds = 6
    for _ in range(rounds):
        c = connect(srv, "structured")
        c.send(b"".join(nr.NBDRaw.request_bytes(
            nr.CMD_READ, offset=(i * size) % SIZE, length=size, cookie=i)
            for i in range(200)))
        time.sleep(0.3)
        c.close()
    assert wait_for(lambda: len(ended(srv)) == rounds, 20), srv.output()
    c = connect(srv, "extended")
    for i in range(20):
        off = (i * 3 + 1) * MiB
        c.send_request(nr.CMD_READ, offset=off, length=size, cookie=i)
        got, _ = read_reply_data(c, "extended", off, size)
        assert got == data[off:off + size]
    c.close()
    assert wait_for(lambda: len(ended(srv)) == rounds + 1, 20)
    assert ended(srv)[-1] == (20, 20), ended(srv)[-1]
    assert stop_and_check_pipes(srv) > 0


def test_df_and_allocated_zeroes(nbdd_server, raw_image):
    """A spliced read with DF is one OFFSET_DATA chunk.  Zeroes the file
    has allocated are read back right; like qemu-nbd, nbdd sends them
    as data when the read is spliced (holes come from allocation)."""
    img = raw_image(8 * MiB, [(0, pattern(5, 4 * MiB))], sparse=False)
    srv = nbdd_server(["-v"] + blockdev_args(img) + export_args())
    c = connect(srv, "structured")
    c.send_request(nr.CMD_READ, nr.CMD_FLAG_DF, offset=MiB,
                   length=256 * KiB)
    chunks = c.read_chunks()
    data, types = nr.assemble_read(chunks, MiB, 256 * KiB)
    assert types == [nr.REPLY_TYPE_OFFSET_DATA], types
    assert data == pattern(5, 4 * MiB)[MiB:MiB + 256 * KiB]
    c.send_request(nr.CMD_READ, offset=6 * MiB, length=256 * KiB, cookie=2)
    data, _ = nr.assemble_read(c.read_chunks(), 6 * MiB, 256 * KiB)
    assert data == bytes(256 * KiB)
    c.close()
    assert wait_for(lambda: ended(srv), 10)
    assert ended(srv)[0] == (2, 2), ended(srv)
    stop_and_check_pipes(srv)


@pytest.mark.parametrize("shift", [1, 4095])
def test_reads_through_a_raw_offset(nbdd_server, raw_image, shift):
    """A raw node's offset moves page-aligned export reads off the
    page grid in the file: a 256 KiB read then spans one page more
    than a pipe holds.  The data is still right."""
    data = pattern(3, 8 * MiB)
    img = raw_image(8 * MiB + shift, [(shift, data)])
    srv = nbdd_server(["-v"] + blockdev_args(img, extra=f"offset={shift}") +
                      export_args())
    for mode in ("simple", "structured"):
        c = connect(srv, mode)
        for i, off in enumerate([0, MiB, 8 * MiB - 256 * KiB]):
            c.send_request(nr.CMD_READ, offset=off, length=256 * KiB,
                           cookie=i + 1)
            got, _ = read_reply_data(c, mode, off, 256 * KiB)
            assert got == data[off:off + 256 * KiB]
            # 192 KiB span at most 49 pages: those still fit.
            c.send_request(nr.CMD_READ, offset=off, length=192 * KiB,
                           cookie=i + 10)
            got, _ = read_reply_data(c, mode, off, 192 * KiB)
            assert got == data[off:off + 192 * KiB]
        c.close()
    assert wait_for(lambda: len(ended(srv)) == 2, 10)
    # 256 KiB off the page grid cannot be spliced, 192 KiB can.
    assert ended(srv) == [(6, 3), (6, 3)], ended(srv)
    stop_and_check_pipes(srv)


def test_sparse_ranges_still_read_as_holes(nbdd_server, raw_image):
    """Spliced data cannot be looked at, so ranges the file does not
    allocate keep going out as hole chunks, never as zeroes on the
    wire."""
    img = raw_image(8 * MiB, [(MiB, b"\x55" * (64 * KiB))])
    srv = nbdd_server(blockdev_args(img) + export_args())
    c = connect(srv, "structured")
    c.send_request(nr.CMD_READ, offset=4 * MiB, length=256 * KiB)
    chunks = c.read_chunks()
    data, types = nr.assemble_read(chunks, 4 * MiB, 256 * KiB)
    assert data == bytes(256 * KiB)
    assert set(types) == {nr.REPLY_TYPE_OFFSET_HOLE}, types
    # Data next to a hole: right bytes, some of them as a hole chunk.
    c.send_request(nr.CMD_READ, offset=MiB, length=256 * KiB, cookie=2)
    chunks = c.read_chunks()
    data, types = nr.assemble_read(chunks, MiB, 256 * KiB)
    assert data == b"\x55" * (64 * KiB) + bytes(192 * KiB)
    assert nr.REPLY_TYPE_OFFSET_HOLE in types
    c.close()


def test_read_after_write_sees_new_data(data_disk):
    """A spliced read after an acknowledged write returns the written
    bytes, also when the write was unaligned and partly overlaps."""
    srv, data = data_disk
    c = connect(srv, "structured")
    new = pattern(11, 200 * KiB)
    off = 2 * MiB + 333
    r = c.request(nr.CMD_WRITE, offset=off, data=new)
    assert nr.reply_error(r) == 0
    c.send_request(nr.CMD_READ, offset=2 * MiB, length=256 * KiB, cookie=2)
    got, _ = read_reply_data(c, "structured", 2 * MiB, 256 * KiB)
    expect = bytearray(data[2 * MiB:2 * MiB + 256 * KiB])
    expect[333:333 + len(new)] = new
    assert got == bytes(expect)
    c.close()
