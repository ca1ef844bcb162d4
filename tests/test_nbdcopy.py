"""nbdcopy to, from and between nbdd exports: bit-exact copies."""
import random

import pytest

from conftest import blockdev_args, export_args, have
from helpers import KiB, MiB, allocated, pattern, run, sha256_file

pytestmark = pytest.mark.skipif(not have("nbdcopy"), reason="no nbdcopy")

SIZE = 24 * MiB


def scattered(seed):
    """Data regions of a sparse image: a few dozen random-length runs at
    random (often unaligned) offsets, plus the first and last bytes."""
    rng = random.Random(seed)
    regions = [(0, 1), (SIZE - 1, 1)]
    for _ in range(40):
        length = rng.choice([1, 511, 4096, 65536, 300000, 1 * MiB + 3])
        regions.append((rng.randrange(1, SIZE - length - 1), length))
    return [(off, pattern(seed * 1000003 + off, n)) for off, n in regions]


@pytest.fixture
def pair(nbdd_server, raw_image):
    """Exports 'src' (scattered data) and 'dst' (empty), both writable,
    with their image paths."""
    src = raw_image(SIZE, scattered(1), name="src.img")
    dst = raw_image(SIZE, name="dst.img")
    srv = nbdd_server(blockdev_args(src, node="s") +
                      blockdev_args(dst, node="d") +
                      export_args(node="s", name="src") +
                      export_args(node="d", name="dst"))
    return srv, src, dst


def nbdcopy(*args):
    return run(["nbdcopy"] + list(args), timeout=60)


OPTS = {
    "plain": [],
    "flush": ["--flush"],
    "conn4": ["--connections", "4"],
    "conn4-flush": ["--connections", "4", "--flush"],
    "32M-requests": ["--request-size", str(32 * MiB), "--requests", "4"],
}


@pytest.mark.parametrize("opts", OPTS.values(), ids=OPTS.keys())
def test_file_to_nbd(pair, opts):
    srv, src, dst = pair
    nbdcopy(*opts, src, srv.uri("dst"))
    assert sha256_file(dst) == sha256_file(src)


@pytest.mark.parametrize("opts", OPTS.values(), ids=OPTS.keys())
def test_nbd_to_file(pair, tmp_path, opts):
    srv, src, _ = pair
    out = str(tmp_path / "out.img")
    nbdcopy(*opts, srv.uri("src"), out)
    assert sha256_file(out) == sha256_file(src)


@pytest.mark.parametrize("opts", OPTS.values(), ids=OPTS.keys())
def test_nbd_to_nbd(pair, opts):
    """Between two exports of one server, over unix and TCP."""
    srv, src, dst = pair
    nbdcopy(*opts, srv.uri("src"), srv.uri("dst", tcp=True))
    assert sha256_file(dst) == sha256_file(src)


def test_overwrite_existing_data(pair):
    """Copying over a destination full of data replaces all of it,
    holes in the source included."""
    srv, src, dst = pair
    with open(dst, "r+b") as f:
        f.write(b"\xff" * SIZE)
    nbdcopy("--flush", src, srv.uri("dst"))
    assert sha256_file(dst) == sha256_file(src)


def test_round_trip_through_nbd(pair, tmp_path):
    """file -> export -> export -> file gives back the same bytes."""
    srv, src, _ = pair
    out = str(tmp_path / "back.img")
    nbdcopy(src, srv.uri("dst"))
    nbdcopy("--connections", "4", srv.uri("dst"), srv.uri("src"))
    nbdcopy(srv.uri("src", tcp=True), out)
    assert sha256_file(out) == sha256_file(src)


def test_copy_keeps_holes(pair):
    """A sparse source copied into an empty export leaves the
    destination image about as sparse as the source: holes are
    zeroed by punching, not by writing zeroes."""
    srv, src, dst = pair
    nbdcopy("--flush", src, srv.uri("dst"))
    assert sha256_file(dst) == sha256_file(src)
    assert allocated(dst) <= allocated(src) + 1 * MiB, \
        (allocated(src), allocated(dst))
    assert allocated(dst) < SIZE // 2
    assert allocated(dst) >= 64 * KiB
