"""qcow2 image creation (formats/qcow2-create.c) judged by QEMU's tools.

Images are made by tests/test-qcow2-create (qcow2_create on a real
'file' node) and must pass 'qemu-img check', show the options asked for
in 'qemu-img info', take writes with qemu-io, and match what
'qemu-img create' makes with the same options: byte for byte without
preallocation, the same 'qemu-img map' with it.
"""
import json
import os

import pytest

from conftest import TOP_DIR, have
from helpers import KiB, MiB, run

pytestmark = pytest.mark.skipif(not (have("qemu-img") and have("qemu-io")),
                                reason="no qemu-img/qemu-io")

GiB = 1 << 30
TiB = 1 << 40


def _find_helper():
    for d in (os.environ.get("top_builddir"), os.path.join(TOP_DIR, "build"),
              TOP_DIR):
        if d:
            p = os.path.join(d, "tests", "test-qcow2-create")
            if os.access(p, os.X_OK):
                return p
    return None


HELPER = _find_helper()
if HELPER is None:
    pytestmark = pytest.mark.skip(reason="tests/test-qcow2-create not built")


def create(path, check=True, **opts):
    """Create @path (emptied first) from blockdev-create options; keys
    use '_' for QEMU's '-'."""
    with open(path, "wb"):
        pass
    spec = {k.replace("_", "-"): v for k, v in opts.items()}
    return run([HELPER, "create", str(path), json.dumps(spec)], check=check)


def qemu_img_create(path, size, backing_fmt=None, **opts):
    """The same image by qemu-img create, from the same options."""
    o = []
    names = {"version": "compat", "cluster_size": "cluster_size",
             "refcount_bits": "refcount_bits", "extended_l2": "extended_l2",
             "compression_type": "compression_type",
             "lazy_refcounts": "lazy_refcounts",
             "preallocation": "preallocation"}
    backing = opts.pop("backing_file", None)
    for k, v in opts.items():
        if k == "version":
            v = {"v2": "0.10", "v3": "1.1"}[v]
        elif isinstance(v, bool):
            v = "on" if v else "off"
        o.append("%s=%s" % (names[k], v))
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if o:
        argv += ["-o", ",".join(o)]
    if backing:
        argv += ["-b", backing, "-F", backing_fmt]
    run(argv + [str(path), str(size)], cwd=os.path.dirname(path))


def check(path):
    p = run(["qemu-img", "check", "--output=json", str(path)], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout)
    for k in ("corruptions", "leaks", "check-errors", "corruptions-fixed",
              "leaks-fixed"):
        assert r.get(k, 0) == 0, r
    return r


def info(path):
    p = run(["qemu-img", "info", "--output=json", str(path)])
    return json.loads(p.stdout)


def qemu_io(path, *cmds, fmt="qcow2"):
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    p = run(argv + [str(path)], cwd=os.path.dirname(path))
    assert "fail" not in p.stdout.lower(), p.stdout
    assert "error" not in p.stdout.lower(), p.stdout
    return p.stdout


def qmap(path, zero=True):
    """'qemu-img map' without host offsets, adjacent equal runs merged
    (the offsets differ when QEMU places tables differently).  zero=False
    drops the "zero" flag too."""
    p = run(["qemu-img", "map", "--output=json", str(path)])
    out = []
    for e in json.loads(p.stdout):
        key = (e["depth"], e["present"], e["zero"] if zero else None,
               e["data"])
        if out and out[-1][0] == key and out[-1][1] + out[-1][2] == e["start"]:
            out[-1][2] += e["length"]
        else:
            out.append([key, e["start"], e["length"]])
    return out


def expect_info(path, size, version="v3", cluster_size=64 * KiB,
                refcount_bits=16, extended_l2=False, compression_type="zlib",
                lazy_refcounts=False, backing_file=None, backing_fmt=None,
                **_):
    i = info(path)
    assert i["format"] == "qcow2"
    assert i["virtual-size"] == size
    assert i["cluster-size"] == cluster_size
    d = i["format-specific"]["data"]
    assert d["compat"] == {"v2": "0.10", "v3": "1.1"}[version]
    assert d["refcount-bits"] == refcount_bits
    if version == "v3":
        assert d["extended-l2"] == extended_l2
        assert d["compression-type"] == compression_type
        assert d["lazy-refcounts"] == lazy_refcounts
        assert d["corrupt"] is False
    assert i.get("backing-filename") == backing_file
    assert i.get("backing-filename-format") == backing_fmt
    assert i.get("dirty-flag", False) is False
    return i


def write_read(path, size, fmt="qcow2"):
    """Guest writes work, and the image is still clean after them."""
    n = min(64 * KiB, size)
    cmds = ["write -P 0x5a 0 %d" % n, "read -P 0x5a 0 %d" % n]
    if size >= 2 * n:
        end = size - n
        cmds += ["write -P 0xa5 %d %d" % (end, n),
                 "read -P 0xa5 %d %d" % (end, n),
                 "read -P 0x5a 0 %d" % n]
    qemu_io(path, *cmds)
    check(path)


def same_bytes(ours, theirs):
    """Ours is QEMU's file, possibly followed by zeroes to the end of
    the last cluster (we size the file in whole clusters)."""
    a = open(ours, "rb").read()
    b = open(theirs, "rb").read()
    assert len(a) >= len(b)
    assert a[:len(b)] == b, "first difference at byte %d" % next(
        i for i in range(len(b)) if a[i] != b[i])
    assert a[len(b):].count(0) == len(a) - len(b)


# Odd sizes end in a partial cluster and a partial L2 table.
SIZE = 100 * MiB + 512

BASE = [dict(version="v2", cluster_size=cs) for cs in
        (512, 4 * KiB, 64 * KiB, 2 * MiB)]
BASE += [dict(cluster_size=cs, refcount_bits=rb)
         for cs in (512, 4 * KiB, 64 * KiB, 2 * MiB) for rb in (1, 16, 64)]
FEATURES = [
    dict(extended_l2=True, cluster_size=16 * KiB),
    dict(extended_l2=True),
    dict(extended_l2=True, cluster_size=2 * MiB, refcount_bits=64),
    dict(compression_type="zstd"),
    dict(compression_type="zlib", version="v3"),
    dict(lazy_refcounts=True),
    dict(lazy_refcounts=True, compression_type="zstd", extended_l2=True,
         refcount_bits=1, cluster_size=32 * KiB),
    dict(cluster_size=8 * KiB, refcount_bits=2),     # feature table again
    dict(cluster_size=1 * KiB, refcount_bits=4),
]


def ident(o):
    return ",".join("%s=%s" % kv for kv in sorted(o.items())) or "default"


@pytest.mark.parametrize("opts", BASE + FEATURES, ids=ident)
def test_matrix(tmp_path, opts):
    img = tmp_path / "a.qcow2"
    create(img, size=SIZE, **opts)
    check(img)
    expect_info(img, SIZE, **opts)
    ref = tmp_path / "q.qcow2"
    qemu_img_create(str(ref), SIZE, **opts)
    same_bytes(img, ref)
    write_read(img, SIZE)


@pytest.mark.parametrize("size", [0, 512, 64 * KiB, 64 * KiB + 512])
def test_small_sizes(tmp_path, size):
    img = tmp_path / "a.qcow2"
    create(img, size=size)
    check(img)
    expect_info(img, size)
    ref = tmp_path / "q.qcow2"
    qemu_img_create(str(ref), size)
    same_bytes(img, ref)
    if size:
        write_read(img, size)


@pytest.fixture
def bases(tmp_path):
    """A raw and a qcow2 base with 0x11 in their first 64k."""
    raw = tmp_path / "base.raw"
    with open(raw, "wb") as f:
        f.write(b"\x11" * 65536)
        f.truncate(SIZE)
    q = tmp_path / "base.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), str(SIZE)])
    qemu_io(q, "write -P 0x11 0 64k")
    (tmp_path / "sub").mkdir()
    return tmp_path


BACKING = [
    dict(backing_file="base.qcow2", backing_fmt="qcow2"),
    dict(backing_file="base.raw", backing_fmt="raw"),
    dict(backing_file="base.qcow2"),                  # format probed
    dict(backing_file="sub/../base.raw", backing_fmt="raw"),
    dict(backing_file="ABS/base.qcow2", backing_fmt="qcow2"),
    dict(backing_file="ABS/base.raw"),
    dict(backing_file="base.qcow2", backing_fmt="qcow2", version="v2"),
    dict(backing_file="base.qcow2", backing_fmt="qcow2", cluster_size=512),
    dict(backing_file="base.qcow2", backing_fmt="qcow2", extended_l2=True,
         preallocation="metadata"),
    dict(backing_file="base.raw", backing_fmt="raw", extended_l2=True,
         preallocation="full"),
]


@pytest.mark.parametrize("opts", BACKING, ids=ident)
def test_backing(bases, opts):
    opts = dict(opts)
    opts["backing_file"] = opts["backing_file"].replace("ABS", str(bases))
    img = bases / "overlay.qcow2"
    create(img, size=SIZE, **opts)
    check(img)
    # The name is stored as given; QEMU resolves it against the
    # overlay's directory, whatever the current directory.
    expect_info(img, SIZE, **opts)
    out = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 64k",
               "-c", "read -P 0 64k 64k", str(img)], cwd="/").stdout
    assert "fail" not in out.lower(), out
    qemu_io(img, "write -P 0x5a 64k 64k", "read -P 0x11 0 64k",
            "read -P 0x5a 64k 64k")
    check(img)
    if "backing_fmt" in opts and not opts.get("preallocation"):
        ref = bases / "q.qcow2"
        qemu_img_create(str(ref), SIZE, **opts)
        create(img, size=SIZE, **opts)      # unwritten again
        same_bytes(img, ref)


PREALLOC = [dict(), dict(version="v2"), dict(cluster_size=512),
            dict(cluster_size=4 * KiB, refcount_bits=64),
            dict(extended_l2=True), dict(cluster_size=2 * MiB),
            dict(cluster_size=2 * MiB, extended_l2=True, refcount_bits=1)]


@pytest.mark.parametrize("size", [24 * MiB, 24 * MiB + 512])
@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("opts", PREALLOC, ids=ident)
def test_preallocation(tmp_path, mode, opts, size):
    img = tmp_path / "a.qcow2"
    create(img, size=size, preallocation=mode, **opts)
    check(img)
    expect_info(img, size, **opts)
    ref = tmp_path / "q.qcow2"
    qemu_img_create(str(ref), size, preallocation=mode, **opts)
    # Allocation must match.  "zero" is a guess QEMU makes from the
    # host file (SEEK_DATA at file system block granularity, and a
    # heuristic comparing its allocated size with the refcounts), so it
    # differs with where the tables sit: what matters is that the guest
    # reads zeroes.
    assert qmap(img, zero=False) == qmap(ref, zero=False)
    qemu_io(img, "read -P 0 0 %d" % size)
    ours, theirs = os.stat(img), os.stat(ref)
    # Both hold every data cluster; ours is never larger than QEMU's
    # but for rounding to whole clusters (QEMU moves its refcount table
    # as the image grows, and may leave the old one free behind it).
    cs = opts.get("cluster_size", 64 * KiB)
    assert size <= ours.st_size <= theirs.st_size + cs
    if mode == "metadata":
        # The data area is a hole: only metadata takes space.
        assert ours.st_blocks * 512 < size // 4
        assert ours.st_blocks <= theirs.st_blocks + cs // 512 + 8
    else:
        assert ours.st_blocks * 512 >= size
    write_read(img, size)


def test_preallocation_reads_zero(tmp_path):
    """Over an old image full of data, preallocated clusters still read
    as zeroes: the file is emptied first."""
    img = tmp_path / "a.qcow2"
    create(img, size=4 * MiB, preallocation="full")
    qemu_io(img, "write -P 0x77 0 4M")
    create(img, size=4 * MiB, preallocation="metadata")
    check(img)
    qemu_io(img, "read -P 0 0 4M")


def test_large_sparse(tmp_path):
    """The largest sizes QEMU allows stay sparse and fast: 128 GiB with
    512-byte clusters and 64-bit refcounts (a 32 MiB L1 table in 65536
    clusters, many refblocks, a multi-cluster reftable), 4 TiB with 4k
    clusters, 2 EiB with 2 MiB clusters."""
    for size, cs, rb in ((128 * GiB, 512, 64), (4 * TiB, 4 * KiB, 16),
                         (2 << 60, 2 * MiB, 16)):
        img = tmp_path / ("big-%d.qcow2" % cs)
        create(img, size=size, cluster_size=cs, refcount_bits=rb)
        check(img)
        expect_info(img, size, cluster_size=cs, refcount_bits=rb)
        assert os.stat(img).st_blocks * 512 < 4 * MiB
        qemu_io(img, "write -P 0x5a 0 64k", "read -P 0x5a 0 64k",
                "write -P 0xa5 %d 64k" % (size - 64 * KiB),
                "read -P 0xa5 %d 64k" % (size - 64 * KiB))
        check(img)
        run([HELPER, "check", str(img)])


def test_too_large(tmp_path):
    """4 TiB with 512-byte clusters would need a 256 MiB L1 table, past
    QEMU's 32 MiB limit: refused with QEMU's hint, file untouched."""
    img = tmp_path / "a.qcow2"
    p = create(img, check=False, size=4 * TiB, cluster_size=512)
    assert p.returncode == 1
    assert "try using a larger cluster size" in p.stderr
    assert "at most 137438953472 bytes" in p.stderr
    assert os.stat(img).st_size == 0


@pytest.mark.parametrize("opts,msg", [
    (dict(size=1000), "multiple of 512"),
    (dict(size=SIZE, cluster_size=3000), "power of two between 512 and 2048k"),
    (dict(size=SIZE, cluster_size=4 * MiB), "cluster size 4194304"),
    (dict(size=SIZE, refcount_bits=12), "power of two and may not exceed 64"),
    (dict(size=SIZE, version="v2", refcount_bits=1), "compatibility level"),
    (dict(size=SIZE, version="v2", lazy_refcounts=True), "lazy refcounts"),
    (dict(size=SIZE, version="v2", compression_type="zstd"), "non-zlib"),
    (dict(size=SIZE, extended_l2=True, cluster_size=8192), "at least 16384"),
    (dict(size=SIZE, backing_fmt="raw"), "without a backing file"),
    (dict(size=SIZE, backing_file="b", preallocation="falloc"),
     "preallocation=falloc can only be used"),
    (dict(size=SIZE, preallocation="sparse"), "invalid value 'sparse'"),
    (dict(size=SIZE, compression_type="lz4"), "invalid value 'lz4'"),
    (dict(size=SIZE, version="v1"), "invalid value 'v1'"),
    (dict(size=SIZE, backing_file="x" * 1024), "too long"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_options(tmp_path, opts, msg):
    img = tmp_path / "a.qcow2"
    with open(img, "wb") as f:
        f.write(b"old data")
    spec = {k.replace("_", "-"): v for k, v in opts.items()}
    p = run([HELPER, "create", str(img), json.dumps(spec)], check=False)
    assert p.returncode == 1
    assert p.stderr.startswith("qcow2: "), p.stderr
    assert msg in p.stderr, p.stderr
    assert open(img, "rb").read() == b"old data"
