"""Helpers shared by the client-based end-to-end tests.

Plain functions (no fixtures): running client programs with a timeout,
connecting with a deadline, collecting block status, and describing
what a file holds so that tests can compare the daemon's view of an
image with the image itself.
"""
import errno
import hashlib
import os
import random
import subprocess
import time

import nbd

KiB = 1 << 10
MiB = 1 << 20

# base:allocation flags, as nbdinfo prints them.
DATA = 0
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO


def run(cmd, timeout=60, check=True, **kw):
    """Run a client program; fail the test with its output on error."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    p = subprocess.run(cmd, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError("%r exited with %d\nstdout:\n%s\nstderr:\n%s" %
                             (cmd, p.returncode, p.stdout, p.stderr))
    return p


def pattern(seed, n):
    """@n reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def read_file(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def allocated(path):
    """Bytes the filesystem has allocated for @path."""
    return os.stat(path).st_blocks * 512


def file_extents(path):
    """[(length, flags)] of @path as SEEK_DATA/SEEK_HOLE report it,
    with base:allocation flags (data 0, hole 3)."""
    size = os.path.getsize(path)
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = size
            if data > off:
                out.append((data - off, HOLE_ZERO))
                off = data
                continue
            hole = os.lseek(fd, off, os.SEEK_HOLE)
            out.append((hole - off, DATA))
            off = hole
    finally:
        os.close(fd)
    return out


def merge(extents):
    """Join neighbouring extents that have the same flags."""
    out = []
    for length, flags in extents:
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))
    return out


def layout(size, data_regions):
    """Expected merged extents of an image of @size whose only data is
    @data_regions [(offset, length)], sorted and disjoint."""
    out = []
    pos = 0
    for off, length in data_regions:
        if off > pos:
            out.append((off - pos, HOLE_ZERO))
        out.append((length, DATA))
        pos = off + length
    if pos < size:
        out.append((size - pos, HOLE_ZERO))
    return merge(out)


def block_status(h, offset, length, flags=0):
    """One NBD_CMD_BLOCK_STATUS for base:allocation: [(length, flags)]."""
    got = []

    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            assert off == offset
            got.append(list(zip(entries[0::2], entries[1::2])))
        return 0

    h.block_status(length, offset, cb, flags)
    assert len(got) == 1, f"base:allocation reported {len(got)} times"
    return got[0]


def map_export(h, size=None):
    """The whole export's base:allocation map, merged."""
    if size is None:
        size = h.get_size()
    out = []
    off = 0
    while off < size:
        ext = block_status(h, off, size - off)
        assert ext, f"empty block status reply at {off}"
        for length, flags in ext:
            assert length > 0, f"zero-length extent at {off}"
            length = min(length, size - off)
            out.append((length, flags))
            off += length
            if off >= size:
                break
    return merge(out)


def connect_within(uri, seconds=10, prepare=None):
    """Connect to @uri, failing (nbd.Error or TimeoutError) if the
    handshake does not finish in @seconds: a server that accepts and
    then says nothing must not hang the test."""
    h = nbd.NBD()
    if prepare:
        prepare(h)
    h.aio_connect_uri(uri)
    deadline = time.monotonic() + seconds
    while not h.aio_is_ready():
        if h.aio_is_dead() or h.aio_is_closed():
            raise nbd.Error("connection died during handshake")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no handshake from {uri} in {seconds}s")
        h.poll(int(left * 1000) + 1)
    return h


def wait_for(cond, seconds=10, step=0.02):
    """Poll @cond until true; return its last value."""
    deadline = time.monotonic() + seconds
    while True:
        v = cond()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


def nbd_errno(fn, *args):
    """Call fn(*args) and return the errno name of the nbd.Error it
    raises; fail if it succeeds."""
    try:
        fn(*args)
    except nbd.Error as e:
        return e.errno
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} succeeded")
