"""nbdd seen through libnbd's Python bindings: every command and flag."""
import os

import nbd
import pytest

from conftest import blockdev_args, export_args, stdio_handle
from helpers import (DATA, HOLE_ZERO, KiB, MiB, allocated, block_status,
                     file_extents, layout, map_export, nbd_errno, pattern,
                     read_file)

SIZE = 16 * MiB
# The 'disk' fixture's image: 4 KiB of "nbdd" at 0, 64 KiB of 0xaa at 8 MiB.
DISK_HEAD = b"nbdd" * 1024
DISK_MID = b"\xaa" * 65536


def expected_disk(offset, length):
    """What the 'disk' fixture's export holds at [offset, offset+length)."""
    img = bytearray(SIZE)
    img[0:4096] = DISK_HEAD
    img[8 * MiB:8 * MiB + 65536] = DISK_MID
    return bytes(img[offset:offset + length])


@pytest.fixture
def big(nbdd_server, raw_image):
    """A writable, empty 64 MiB export: room for maximum-size requests."""
    img = raw_image(64 * MiB)
    srv = nbdd_server(blockdev_args(img) + export_args())
    return srv, img


# ---------------------------------------------------------------- info

def test_size_name_description_block_size(nbdd_server, raw_image):
    """get_size, the canonical name, the description and the block size
    constraints are what the export was configured with."""
    img = raw_image(SIZE)
    srv = nbdd_server(blockdev_args(img) +
                      export_args(description="the first disk"))
    h = srv.connect(set_full_info=True)
    assert h.get_size() == SIZE
    assert h.get_canonical_export_name() == "disk0"
    assert h.get_export_description() == "the first disk"
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
    h.shutdown()


def test_default_export_name(disk):
    """With exactly one export, the empty name "" selects it, and the
    server reports its canonical name."""
    srv, _ = disk
    h = srv.connect(export="", set_full_info=True)
    assert h.get_size() == SIZE
    assert h.get_canonical_export_name() == "disk0"
    assert h.pread(4096, 0) == DISK_HEAD
    h.shutdown()


def test_default_name_with_several_exports(nbdd_server, raw_image):
    """With more than one export, "" is not a name: the handshake
    fails rather than picking one."""
    img = raw_image(SIZE)
    srv = nbdd_server(blockdev_args(img) + export_args() +
                      export_args(name="other"))
    with pytest.raises(nbd.Error):
        srv.connect(export="")
    srv.connect(export="other").shutdown()


def test_option_mode(disk):
    """In option mode a failed NBD_OPT_INFO does not end the
    handshake: list, info on a bad and a good name, then go."""
    srv, _ = disk
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(srv.uri("nosuch"))
    names = []
    assert h.opt_list(lambda name, desc: names.append(name) or 0) == 1
    assert names == ["disk0"]
    with pytest.raises(nbd.Error):
        h.opt_info()
    h.set_export_name("disk0")
    h.opt_info()
    assert h.get_size() == SIZE
    contexts = []
    h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
    assert nbd.CONTEXT_BASE_ALLOCATION in contexts
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.add_meta_context("nbdd:no-such-context")
    h.opt_go()
    assert h.aio_is_ready()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert not h.can_meta_context("nbdd:no-such-context")
    assert h.pread(4096, 0) == DISK_HEAD
    assert block_status(h, 0, 65536)[0] == (4096, DATA)
    h.shutdown()


def test_unknown_export_refused(disk):
    """Asking for an export that does not exist fails the handshake."""
    srv, _ = disk
    with pytest.raises(nbd.Error):
        srv.connect(export="nosuch")
    # The server is unharmed.
    srv.connect().shutdown()


def test_writable_flags(disk):
    """A writable export advertises every command it implements."""
    srv, _ = disk
    h = srv.connect(add_meta_context=nbd.CONTEXT_BASE_ALLOCATION)
    assert h.get_structured_replies_negotiated()
    assert not h.is_read_only()
    assert h.can_flush()
    assert h.can_fua()
    assert h.can_trim()
    assert h.can_zero()
    assert h.can_fast_zero()
    assert h.can_cache()
    assert h.can_df()
    assert h.can_multi_conn()
    assert not h.is_rotational()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.shutdown()


def test_read_only_flags_and_eperm(nbdd_server, raw_image):
    """Without writable=on the export is read-only: no trim/zero, and
    the server itself refuses writes with EPERM."""
    img = raw_image(SIZE, [(0, b"ro" * 2048)])
    srv = nbdd_server(blockdev_args(img) + export_args(writable=False))
    h = srv.connect()
    assert h.is_read_only()
    assert not h.can_trim()
    assert not h.can_zero()
    assert not h.can_fast_zero()
    assert h.can_flush()
    assert h.can_fua()
    assert h.can_cache()
    assert h.can_df()
    assert h.can_multi_conn()
    # libnbd refuses on its own...
    assert nbd_errno(h.pwrite, b"x" * 512, 0) == "EPERM"
    assert h.pread(4096, 0) == b"ro" * 2048
    h.shutdown()
    # ...and so does the server when libnbd lets the request through.
    h = srv.connect(strict=False)
    assert nbd_errno(h.pwrite, b"x" * 512, 0) == "EPERM"
    assert nbd_errno(h.zero, 512, 0) == "EPERM"
    assert nbd_errno(h.trim, 512, 0) == "EPERM"
    assert h.pread(4096, 0) == b"ro" * 2048
    h.flush()
    h.shutdown()
    assert read_file(img, 0, 4096) == b"ro" * 2048


# ------------------------------------------------------- read and write

@pytest.mark.parametrize("offset,length", [
    (0, 4096),              # aligned
    (64 * KiB, 128 * KiB),  # aligned, several blocks
    (4097, 3333),           # unaligned start and end
    (4095, 2),              # straddles a block boundary
    (12345, 1),             # one byte
    (SIZE - 1, 1),          # the last byte
    (8 * MiB - 100, 65636), # across a data/hole boundary
])
def test_pwrite_pread_roundtrip(disk, offset, length):
    """Data written at any offset/length reads back, leaves its
    neighbours alone and reaches the image file."""
    srv, img = disk
    h = srv.connect()
    data = pattern(offset, length)
    h.pwrite(data, offset)
    assert h.pread(length, offset) == data
    # The bytes around it are unchanged.
    lo = max(0, offset - 5000)
    hi = min(SIZE, offset + length + 5000)
    want = bytearray(expected_disk(lo, hi - lo))
    want[offset - lo:offset - lo + length] = data
    assert h.pread(hi - lo, lo) == bytes(want)
    h.flush()
    h.shutdown()
    assert read_file(img, lo, hi - lo) == bytes(want)


def test_pread_existing_data(disk):
    """Reads see the image file's contents, holes read as zeroes."""
    srv, _ = disk
    h = srv.connect()
    assert h.pread(SIZE, 0) == expected_disk(0, SIZE)
    assert h.pread(3, 4094) == b"dd\0"
    h.shutdown()


def test_max_size_requests(big):
    """32 MiB reads and writes (the advertised maximum) work, aligned
    or not."""
    srv, img = big
    h = srv.connect()
    for off in (0, 12345):
        data = pattern(off, 32 * MiB)
        h.pwrite(data, off)
        assert h.pread(32 * MiB, off) == data
    h.flush()
    h.shutdown()
    assert read_file(img, 12345, 32 * MiB) == data


def test_oversized_requests_einval(big):
    """READ/WRITE above the 32 MiB maximum are refused with EINVAL and
    the connection stays usable; commands without payload may be
    larger."""
    srv, img = big
    h = srv.connect(strict=False)
    h.pwrite(b"\x55" * 4096, 0)
    assert nbd_errno(h.pread, 32 * MiB + 1, 0) == "EINVAL"
    assert nbd_errno(h.pwrite, b"\x66" * (32 * MiB + 1), 0) == "EINVAL"
    assert h.pread(4096, 0) == b"\x55" * 4096
    # No payload, so no limit below the export size.
    h.zero(48 * MiB, 0)
    h.trim(48 * MiB, 0)
    h.cache(48 * MiB, 0)
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()


def test_fua(disk):
    """FUA is accepted on write, write-zeroes and trim."""
    srv, img = disk
    h = srv.connect()
    h.pwrite(b"\x11" * 8192, 1 * MiB, nbd.CMD_FLAG_FUA)
    assert read_file(img, 1 * MiB, 8192) == b"\x11" * 8192
    h.zero(4096, 1 * MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(8192, 1 * MiB) == bytes(4096) + b"\x11" * 4096
    assert read_file(img, 1 * MiB, 8192) == bytes(4096) + b"\x11" * 4096
    h.trim(4096, 1 * MiB + 4096, nbd.CMD_FLAG_FUA)
    h.shutdown()


def test_fua_on_any_command(disk):
    """The spec lets FUA be set on every command once SEND_FUA is
    negotiated; the server must accept it (even by ignoring it)."""
    srv, _ = disk
    h = srv.connect(strict=False,
                    add_meta_context=nbd.CONTEXT_BASE_ALLOCATION)
    assert h.pread(4096, 0, nbd.CMD_FLAG_FUA) == DISK_HEAD
    h.flush(nbd.CMD_FLAG_FUA)
    h.cache(4096, 0, nbd.CMD_FLAG_FUA)
    h.shutdown()


def test_flush(disk):
    srv, img = disk
    h = srv.connect()
    h.pwrite(b"flushed!", 100)
    h.flush()
    assert read_file(img, 100, 8) == b"flushed!"
    h.shutdown()


# ------------------------------------------------------- trim and zero

def test_trim_releases_blocks(nbdd_server, raw_image):
    """Trim succeeds and gives the image file's blocks back (its
    contents afterwards are not specified)."""
    img = raw_image(SIZE)
    srv = nbdd_server(blockdev_args(img) + export_args())
    h = srv.connect()
    h.pwrite(pattern(1, 4 * MiB), 4 * MiB)
    h.flush()
    before = allocated(img)
    assert before >= 4 * MiB
    h.trim(4 * MiB, 4 * MiB)
    h.flush()
    after = allocated(img)
    assert after <= before - 2 * MiB, (before, after)
    h.shutdown()


def test_trim_unaligned_keeps_neighbours(disk):
    """Trimming a range that does not cover whole blocks leaves every
    byte outside the range alone."""
    srv, img = disk
    h = srv.connect()
    data = pattern(5, 65536)
    h.pwrite(data, 6 * MiB)
    h.trim(4000, 6 * MiB + 1000)
    h.trim(10000, 6 * MiB + 20000)
    got = h.pread(65536, 6 * MiB)
    assert got[:1000] == data[:1000]
    assert got[5000:20000] == data[5000:20000]
    assert got[30000:] == data[30000:]
    h.flush()
    h.shutdown()
    on_disk = read_file(img, 6 * MiB, 65536)
    assert on_disk[:1000] == data[:1000]
    assert on_disk[5000:20000] == data[5000:20000]
    assert on_disk[30000:] == data[30000:]


def test_zero(disk):
    """Write-zeroes (without NO_HOLE) makes the range read as zeroes."""
    srv, img = disk
    h = srv.connect()
    h.pwrite(b"\x77" * 65536, 2 * MiB)
    h.zero(32768, 2 * MiB + 1000)
    want = b"\x77" * 1000 + bytes(32768) + b"\x77" * (65536 - 33768)
    assert h.pread(65536, 2 * MiB) == want
    h.flush()
    assert read_file(img, 2 * MiB, 65536) == want
    h.shutdown()


def test_zero_no_hole(nbdd_server, raw_image):
    """Write-zeroes with NO_HOLE reads back as zeroes and keeps the
    range allocated in the image file."""
    img = raw_image(SIZE)
    srv = nbdd_server(blockdev_args(img) + export_args())
    h = srv.connect()
    h.pwrite(pattern(2, 4 * MiB), 4 * MiB)
    h.flush()
    before = allocated(img)
    h.zero(4 * MiB, 4 * MiB, nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    assert h.pread(4 * MiB, 4 * MiB) == bytes(4 * MiB)
    assert read_file(img, 4 * MiB, 4 * MiB) == bytes(4 * MiB)
    assert allocated(img) >= before, (before, allocated(img))
    h.shutdown()


def test_fast_zero(disk):
    """FAST_ZERO either zeroes the range or fails with ENOTSUP and
    leaves the data alone."""
    srv, _ = disk
    h = srv.connect()
    data = pattern(3, 65536)
    h.pwrite(data, 3 * MiB)
    try:
        h.zero(65536, 3 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    except nbd.Error as e:
        assert e.errno == "ENOTSUP", e
        assert h.pread(65536, 3 * MiB) == data
    else:
        assert h.pread(65536, 3 * MiB) == bytes(65536)
    h.shutdown()


def test_cache(disk):
    srv, _ = disk
    h = srv.connect()
    h.cache(SIZE, 0)
    h.cache(1, 12345)
    assert h.pread(4096, 0) == DISK_HEAD
    h.shutdown()


# ---------------------------------------------------------- block status

SPARSE_DATA = [(0, 64 * KiB), (1 * MiB, 128 * KiB), (5 * MiB, 64 * KiB),
               (SIZE - 64 * KiB, 64 * KiB)]


@pytest.fixture
def sparse(nbdd_server, raw_image):
    """A 16 MiB image whose only data is SPARSE_DATA."""
    img = raw_image(SIZE, [(off, pattern(off, n)) for off, n in SPARSE_DATA])
    want = layout(SIZE, SPARSE_DATA)
    if file_extents(img) != want:
        pytest.skip("the filesystem does not report holes exactly")
    srv = nbdd_server(blockdev_args(img) + export_args())
    return srv, img, want


def test_block_status_map(sparse):
    """base:allocation reports holes as HOLE|ZERO and data as 0, with
    the image's exact boundaries."""
    srv, _, want = sparse
    h = srv.connect(add_meta_context=nbd.CONTEXT_BASE_ALLOCATION)
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert map_export(h) == want
    h.shutdown()


def test_block_status_partial(sparse):
    """A request starting inside a data region describes it from the
    requested offset to the region's end, not beyond."""
    srv, _, _ = sparse
    h = srv.connect(add_meta_context=nbd.CONTEXT_BASE_ALLOCATION)
    ext = block_status(h, 1 * MiB + 4096, 1 * MiB)
    assert ext[0][1] == DATA
    assert 0 < ext[0][0] <= 128 * KiB - 4096
    if len(ext) > 1:
        assert ext[1][1] == HOLE_ZERO
    h.shutdown()


def test_block_status_req_one(sparse):
    """REQ_ONE yields exactly one extent, no longer than requested."""
    srv, _, _ = sparse
    h = srv.connect(add_meta_context=nbd.CONTEXT_BASE_ALLOCATION)
    ext = block_status(h, 0, 1 * MiB, nbd.CMD_FLAG_REQ_ONE)
    assert len(ext) == 1
    assert 0 < ext[0][0] <= 64 * KiB and ext[0][1] == DATA
    ext = block_status(h, 64 * KiB, 4 * MiB, nbd.CMD_FLAG_REQ_ONE)
    assert len(ext) == 1
    assert 0 < ext[0][0] <= 1 * MiB - 64 * KiB and ext[0][1] == HOLE_ZERO
    ext = block_status(h, 100, 1000, nbd.CMD_FLAG_REQ_ONE)
    assert len(ext) == 1
    assert 0 < ext[0][0] <= 1000 and ext[0][1] == DATA
    h.shutdown()


def test_block_status_follows_writes(sparse):
    """Writing into a hole turns it into data; trimming a whole
    region gives a hole back."""
    srv, _, _ = sparse
    h = srv.connect(add_meta_context=nbd.CONTEXT_BASE_ALLOCATION)
    h.pwrite(b"\x01" * 65536, 10 * MiB)
    h.trim(64 * KiB, 5 * MiB)
    h.flush()
    regions = [r for r in SPARSE_DATA if r[0] != 5 * MiB]
    regions.append((10 * MiB, 65536))
    assert map_export(h) == layout(SIZE, sorted(regions))
    h.shutdown()


def test_offsets_above_4g(nbdd_server, raw_image):
    """Offsets past 4 GiB are not truncated anywhere: data lands at the
    right place in an 8 GiB sparse image."""
    img = raw_image(8 << 30)
    srv = nbdd_server(blockdev_args(img) + export_args())
    h = srv.connect(strict=False, add_meta_context=nbd.CONTEXT_BASE_ALLOCATION)
    assert h.get_size() == 8 << 30
    off = (5 << 30) + 12345
    h.pwrite(b"far away", off)
    h.pwrite(b"end", (8 << 30) - 3)
    h.zero(4096, (4 << 30) + 4096, nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    assert h.pread(8, off) == b"far away"
    assert h.pread(3, (8 << 30) - 3) == b"end"
    assert h.pread(8, off - (4 << 30)) == bytes(8)
    assert nbd_errno(h.pread, 4, (8 << 30) - 3) == "EINVAL"
    assert nbd_errno(h.pwrite, b"x", 8 << 30) == "ENOSPC"
    ext = block_status(h, (5 << 30), 1 << 20)
    h.shutdown()
    # The 8 bytes at 5 GiB + 12345 allocated one filesystem block.
    fd = os.open(img, os.O_RDONLY)
    data = os.lseek(fd, 5 << 30, os.SEEK_DATA)
    hole = os.lseek(fd, data, os.SEEK_HOLE)
    os.close(fd)
    assert ext[:2] == [(data - (5 << 30), HOLE_ZERO), (hole - data, DATA)], \
        ext
    assert read_file(img, off, 8) == b"far away"
    assert read_file(img, (8 << 30) - 3, 3) == b"end"
    assert read_file(img, off - (4 << 30), 8) == bytes(8)


def test_odd_size_export(nbdd_server, raw_image):
    """An image whose size is no multiple of any block size is served
    to its last byte, and not one byte further."""
    size = 1000001
    img = raw_image(size, [(size - 100, b"\x7e" * 100)])
    srv = nbdd_server(blockdev_args(img) + export_args())
    h = srv.connect(strict=False, add_meta_context=nbd.CONTEXT_BASE_ALLOCATION)
    assert h.get_size() == size
    assert h.pread(100, size - 100) == b"\x7e" * 100
    h.pwrite(b"\x01", size - 1)
    assert nbd_errno(h.pwrite, b"\x01\x02", size - 1) == "ENOSPC"
    assert nbd_errno(h.pread, 2, size - 1) == "EINVAL"
    assert map_export(h, size) == [
        (n, f) for n, f in file_extents(img)]
    ext = block_status(h, size - 50, 50)
    assert sum(n for n, _ in ext) <= 50 and ext[0][1] == DATA
    h.zero(1, size - 2)
    h.flush()
    h.shutdown()
    assert os.path.getsize(img) == size
    assert read_file(img, size - 3, 3) == b"\x7e\x00\x01"


def test_same_node_two_exports(nbdd_server, raw_image):
    """Two exports of one node, one writable and one read-only, see
    the same data."""
    img = raw_image(SIZE)
    srv = nbdd_server(blockdev_args(img) + export_args() +
                      export_args(name="view", writable=False))
    rw = srv.connect()
    ro = srv.connect(export="view")
    assert ro.is_read_only() and not rw.is_read_only()
    rw.pwrite(b"shared", 4096)
    rw.flush()
    assert ro.pread(6, 4096) == b"shared"
    rw.shutdown()
    ro.shutdown()


# ------------------------------------------------------------ parallelism

def test_many_requests_in_flight(disk):
    """64 writes then 64 reads in flight at once all complete, each
    reply matched to its request."""
    srv, _ = disk
    h = srv.connect()
    n, size = 64, 65536 + 512
    data = [pattern(100 + i, size) for i in range(n)]
    offs = [i * 200 * KiB + i for i in range(n)]
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), o)
               for d, o in zip(data, offs)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    bufs = [nbd.Buffer(size) for _ in range(n)]
    cookies = [h.aio_pread(b, o) for b, o in zip(bufs, offs)]
    # Mix writes elsewhere into the same batch of reads.
    marks = nbd.Buffer.from_bytearray(bytearray(b"\x42" * 512))
    cookies += [h.aio_pwrite(marks, 14 * MiB + i * 4096) for i in range(16)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    for b, d in zip(bufs, data):
        assert b.to_bytearray() == d
    assert h.pread(512, 14 * MiB + 15 * 4096) == b"\x42" * 512
    h.shutdown()


def test_multi_conn(disk):
    """Several connections share one export: after a flush on one,
    the others see the data."""
    srv, img = disk
    hs = [srv.connect(tcp=(i % 2 == 1)) for i in range(4)]
    for h in hs:
        assert h.can_multi_conn()
    for i, h in enumerate(hs):
        h.pwrite(bytes([i + 1]) * 65536, 4 * MiB + i * 65536)
    for h in hs:
        h.flush()
    for h in hs:
        for i in range(4):
            want = bytes([i + 1]) * 65536
            assert h.pread(65536, 4 * MiB + i * 65536) == want
    for h in hs:
        h.shutdown()
    for i in range(4):
        assert read_file(img, 4 * MiB + i * 65536, 65536) == \
            bytes([i + 1]) * 65536


# ----------------------------------------------- what strict libnbd forbids

def test_out_of_range(disk):
    """Requests past the end: EINVAL for read/trim/cache/block status,
    ENOSPC for write/write-zeroes; the data stays put."""
    srv, img = disk
    h = srv.connect(strict=False,
                    add_meta_context=nbd.CONTEXT_BASE_ALLOCATION)
    assert nbd_errno(h.pread, 4096, SIZE - 2048) == "EINVAL"
    assert nbd_errno(h.pread, 1, SIZE) == "EINVAL"
    assert nbd_errno(h.pread, 512, 1 << 62) == "EINVAL"
    assert nbd_errno(h.pwrite, b"\x99" * 4096, SIZE - 2048) == "ENOSPC"
    assert nbd_errno(h.pwrite, b"\x99", SIZE) == "ENOSPC"
    assert nbd_errno(h.zero, 4096, SIZE - 2048) == "ENOSPC"
    assert nbd_errno(h.trim, 4096, SIZE - 2048) == "EINVAL"
    assert nbd_errno(h.cache, 4096, SIZE - 2048) == "EINVAL"
    assert nbd_errno(block_status, h, SIZE - 2048, 4096) == "EINVAL"
    assert nbd_errno(block_status, h, SIZE, 1) == "EINVAL"
    # The connection is still in sync.
    assert h.pread(2048, SIZE - 2048) == bytes(2048)
    h.shutdown()
    assert os.path.getsize(img) == SIZE


@pytest.mark.parametrize("cmd,flags", [
    ("pread", 1 << 7),
    ("pread", 1 << 15),
    ("pwrite", 1 << 9),
    ("zero", 1 << 6),
    ("pread", nbd.CMD_FLAG_FAST_ZERO),
    ("pread", nbd.CMD_FLAG_REQ_ONE),
    ("pwrite", nbd.CMD_FLAG_REQ_ONE),
    ("pwrite", nbd.CMD_FLAG_NO_HOLE),
    ("trim", nbd.CMD_FLAG_FAST_ZERO),
])
def test_bad_flags_einval(disk, cmd, flags):
    """Unknown flag bits, or flags that belong to another command,
    are refused with EINVAL and nothing is written."""
    srv, img = disk
    h = srv.connect(strict=False)
    call = {
        "pread": lambda: h.pread(4096, 0, flags),
        "pwrite": lambda: h.pwrite(b"\x99" * 4096, 0, flags),
        "zero": lambda: h.zero(4096, 0, flags),
        "trim": lambda: h.trim(4096, 0, flags),
    }[cmd]
    assert nbd_errno(call) == "EINVAL"
    assert h.pread(4096, 0) == DISK_HEAD
    h.shutdown()
    assert read_file(img, 0, 4096) == DISK_HEAD


def test_df_read(sparse):
    """With structured replies, a DF read arrives as one data chunk
    even across holes, with the right bytes."""
    srv, img, _ = sparse
    h = srv.connect(strict=False)
    assert h.can_df()
    want = read_file(img, 0, 2 * MiB)
    assert h.pread(2 * MiB, 0, nbd.CMD_FLAG_DF) == want
    chunks = []

    def chunk(buf, offset, status, err):
        chunks.append((offset, len(buf), status))
        return 0

    buf = h.pread_structured(2 * MiB, 0, chunk, nbd.CMD_FLAG_DF)
    assert buf == want
    assert chunks == [(0, 2 * MiB, nbd.READ_DATA)]
    h.shutdown()


def test_structured_read_chunks(sparse):
    """Without DF, structured read chunks (data or hole) tile the
    request exactly and carry the right bytes."""
    srv, img, _ = sparse
    h = srv.connect()
    chunks = []

    def chunk(buf, offset, status, err):
        chunks.append((offset, len(buf), status))
        return 0

    buf = h.pread_structured(2 * MiB, 0, chunk)
    assert buf == read_file(img, 0, 2 * MiB)
    chunks.sort()
    pos = 0
    for off, n, status in chunks:
        assert off == pos and status in (nbd.READ_DATA, nbd.READ_HOLE)
        pos += n
    assert pos == 2 * MiB
    h.shutdown()


def test_simple_replies(disk):
    """Without structured replies every command still works (with
    simple replies) except block status, which libnbd cannot ask for;
    DF is not advertised."""
    srv, img = disk
    h = srv.connect(set_request_structured_replies=False,
                    add_meta_context=nbd.CONTEXT_BASE_ALLOCATION)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df()
    assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.can_trim() and h.can_zero() and h.can_cache() and h.can_fua()
    assert h.pread(4096, 0) == DISK_HEAD
    h.pwrite(b"simple", 4 * MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(6, 4 * MiB) == b"simple"
    h.zero(4096, 8 * MiB)
    assert h.pread(4096, 8 * MiB) == bytes(4096)
    h.trim(4096, 12 * MiB)
    h.cache(4096, 0)
    h.flush()
    with pytest.raises(nbd.Error):
        block_status(h, 0, 4096)
    h.shutdown()
    assert read_file(img, 4 * MiB, 6) == b"simple"


def test_simple_replies_errors(disk):
    """Errors come back in simple replies too, and the stream stays in
    sync."""
    srv, _ = disk
    h = srv.connect(strict=False, set_request_structured_replies=False)
    assert nbd_errno(h.pread, 4096, SIZE - 2048) == "EINVAL"
    assert nbd_errno(h.pwrite, b"x" * 4096, SIZE - 2048) == "ENOSPC"
    assert h.pread(4096, 0) == DISK_HEAD
    h.shutdown()


# --------------------------------------------------------------- stdio

def test_stdio(raw_image):
    """--stdio serves one connection on stdin/stdout."""
    img = raw_image(SIZE, [(0, DISK_HEAD)])
    h = stdio_handle(blockdev_args(img) + export_args())
    assert h.get_size() == SIZE
    assert not h.is_read_only()
    assert h.pread(4096, 0) == DISK_HEAD
    h.pwrite(b"via stdio", 1 * MiB)
    h.zero(4096, 0)
    h.flush()
    h.shutdown()
    assert read_file(img, 1 * MiB, 9) == b"via stdio"
    assert read_file(img, 0, 4096) == bytes(4096)


def test_stdio_read_only(raw_image):
    img = raw_image(SIZE, [(0, DISK_HEAD)])
    h = stdio_handle(blockdev_args(img) + export_args(writable=False),
                     strict=False)
    assert h.is_read_only()
    assert nbd_errno(h.pwrite, b"x", 0) == "EPERM"
    assert h.pread(4096, 0) == DISK_HEAD
    h.shutdown()
