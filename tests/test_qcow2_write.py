"""The qcow2 driver, write side (formats/qcow2-write.c, qcow2-alloc.c and
the write-back metadata cache): real NBD clients write through the real
daemon, and QEMU is the oracle.

Most tests apply one list of operations twice: through nbdd (libnbd
pwrite, zero with and without NO_HOLE, trim) to an image, and through
'qemu-io -f qcow2' (write, write -z, write -z -u, discard) to a copy of
the same starting image.  After nbdd has stopped (it holds QEMU's image
locks while it runs), the image must pass 'qemu-img check', read the
same as QEMU's copy ('qemu-img compare') and show nothing odd in
'qemu-img info'.  A Python model of the bytes checks the reads made
while the writes go on.
"""
import json
import os
import random
import signal
import struct
import subprocess
import threading
import time

import nbd
import pytest

from conftest import NBDD, Server, have
from helpers import KiB, MiB, merge, run
import qemutools
from qemutools import create, qemu_img, qemu_map

pytestmark = pytest.mark.skipif(
    not (have("qemu-img") and have("qemu-io") and have("nbdinfo")),
    reason="needs qemu-img, qemu-io and nbdinfo")


# -- QEMU's tools --------------------------------------------------------

def qemu_io(img, cmds, fmt="qcow2"):
    """qemu-io with a list of commands (the workloads build lists)."""
    qemutools.qemu_io(img, *cmds, fmt=fmt)


def copy(src, dst):
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())
    return dst


def info(img):
    return json.loads(qemu_img("info", "--output=json", img).stdout)


def raw_bytes(spec, tmp_path):
    """What QEMU reads from @spec (a file name or 'json:...')."""
    out = tmp_path / ("raw-%08x.raw" % random.getrandbits(32))
    qemu_img("convert", "-O", "raw", spec, out)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_map_layers(src):
    """qemu-img map with the layer each range comes from: merged
    [(length, depth, data, zero)], depth None for unallocated."""
    doc = json.loads(qemu_img("map", "--output=json", src).stdout)
    out = []
    for e in doc:
        key = (e["depth"] if e.get("present", True) else None,
               e["data"], e["zero"])
        if out and out[-1][1:] == key:
            out[-1] = (out[-1][0] + e["length"],) + key
        else:
            out.append((e["length"],) + key)
    return out


def check_image(img, allow=(0,)):
    """qemu-img check: exit status in @allow; returns the JSON report."""
    p = qemu_img("check", "--output=json", img, check=False)
    assert p.returncode in allow, \
        f"qemu-img check {img}: exit {p.returncode}\n{p.stdout}{p.stderr}"
    return json.loads(p.stdout) if p.stdout.strip() else {}


def header_word(img, offset):
    with open(img, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def assert_sane(img):
    """What a user looks at afterwards: clean check, not marked corrupt
    or dirty, no leaked clusters."""
    r = check_image(img)
    for k in ("corruptions", "leaks", "check-errors"):
        assert r.get(k, 0) == 0, r
    i = info(img)
    spec = i.get("format-specific", {}).get("data", {})
    assert spec.get("corrupt", False) is False, i
    if spec.get("compat") != "0.10":
        assert header_word(img, 72) & 3 == 0, "dirty or corrupt bit left set"


def assert_same(img, ref):
    """Both images read the same (qemu-img compare; ref may be raw)."""
    fmt = "raw" if str(ref).endswith(".raw") else "qcow2"
    p = qemu_img("compare", "-f", "qcow2", "-F", fmt, img, ref, check=False)
    assert p.returncode == 0, \
        f"qemu-img compare {img} {ref}: exit {p.returncode}\n" \
        f"{p.stdout}{p.stderr}"


# -- the daemon --------------------------------------------------------

def qcow2_spec(img, node="disk0", read_only=False, extra=None):
    spec = {"driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "filename": str(img)}}
    if read_only:
        spec["read-only"] = True
    spec.update(extra or {})
    return json.dumps(spec)


def export(node="disk0", writable=True):
    e = f"type=nbd,id=e0,node-name={node},name=disk0"
    return ["--export", e + (",writable=on" if writable else "")]


def serve(nbdd_server, img, read_only=False, extra=None):
    return nbdd_server(["--blockdev", qcow2_spec(img, read_only=read_only,
                                                 extra=extra)] +
                       export(writable=not read_only))


def read_all(h, chunk=4 * MiB):
    size = h.get_size()
    return b"".join(h.pread(min(chunk, size - off), off)
                    for off in range(0, size, chunk))


def first_difference(got, want):
    n = min(len(got), len(want))
    bad = next((i for i in range(n) if got[i] != want[i]), n)
    return (f"first difference at byte {bad:#x} of {len(want):#x}: got "
            f"{got[bad:bad + 8].hex()}, want {want[bad:bad + 8].hex()}")


# -- workloads -----------------------------------------------------------

class Patterns:
    """A few random files that qemu-io repeats to fill its write buffer
    ('write -s'); write k of n bytes is the same bytes through libnbd."""

    LENGTHS = (509, 4093, 8191, 65521, 7, 131071)

    def __init__(self, tmp_path, seed):
        rnd = random.Random(seed)
        self.files = []
        self.blobs = []
        for i, n in enumerate(self.LENGTHS):
            blob = rnd.randbytes(n)
            path = tmp_path / f"pattern-{seed}-{i}"
            path.write_bytes(blob)
            self.files.append(str(path))
            self.blobs.append(blob)

    def data(self, k, n):
        blob = self.blobs[k]
        return (blob * (n // len(blob) + 1))[:n]


def random_ops(rnd, size, cs, n, kinds=("write", "zero", "zero-trim",
                                         "trim", "read")):
    """@n operations on an image of @size with clusters of @cs: writes,
    zeroes (NO_HOLE and not), trims and reads, at cluster boundaries and
    anywhere, some inside one cluster, some across several."""
    weights = {"write": 6, "zero": 2, "zero-trim": 2, "trim": 2, "read": 2}
    kinds = list(kinds)
    ops = []
    maxlen = min(3 * cs, 3 * MiB)
    for _ in range(n):
        kind = rnd.choices(kinds, [weights[k] for k in kinds])[0]
        shape = rnd.random()
        if shape < 0.35:            # whole clusters
            off = rnd.randrange(0, size // cs) * cs
            length = rnd.randint(1, max(1, maxlen // cs)) * cs
        elif shape < 0.7:           # inside one cluster
            c = rnd.randrange(0, size // cs) * cs
            a = rnd.randrange(0, cs)
            off, length = c + a, rnd.randint(1, cs - a)
        else:                       # anywhere
            off = rnd.randrange(0, size)
            length = rnd.randint(1, maxlen)
        length = max(1, min(length, size - off))
        ops.append((kind, off, length, rnd.randrange(len(Patterns.LENGTHS)),
                    rnd.random() < 0.1))
    return ops


class Model:
    """The bytes the image should hold, for checking reads made while
    writes go on.  @backing: what shows through unallocated clusters
    (discard on a v2 image)."""

    def __init__(self, data, cs, version=3, backing=None):
        self.b = bytearray(data)
        self.cs = cs
        self.version = version
        self.backing = backing

    def apply(self, kind, off, length, data=None):
        if kind == "write":
            self.b[off:off + length] = data
        elif kind in ("zero", "zero-trim"):
            self.b[off:off + length] = bytes(length)
        elif kind == "trim":
            # Whole clusters only: partial ones are left alone.
            a = -(-off // self.cs) * self.cs
            e = (off + length) // self.cs * self.cs
            if e > a:
                if self.version >= 3 or self.backing is None:
                    self.b[a:e] = bytes(e - a)
                else:
                    under = self.backing[a:e].ljust(e - a, b"\0")
                    self.b[a:e] = under


def run_nbd(h, ops, pats, model=None):
    """Apply @ops through libnbd, checking reads against @model."""
    for kind, off, length, k, fua in ops:
        flags = nbd.CMD_FLAG_FUA if fua else 0
        if kind == "write":
            data = pats.data(k, length)
            h.pwrite(data, off, flags)
        elif kind == "zero":
            h.zero(length, off, flags | nbd.CMD_FLAG_NO_HOLE)
        elif kind == "zero-trim":
            h.zero(length, off, flags)
        elif kind == "trim":
            h.trim(length, off, flags)
        elif kind == "read":
            got = h.pread(length, off)
            if model is not None:
                want = bytes(model.b[off:off + length])
                assert got == want, f"read {length}@{off:#x}: " + \
                    first_difference(got, want)
            continue
        if model is not None:
            model.apply(kind, off, length,
                        pats.data(k, length) if kind == "write" else None)


def qemu_io_cmds(ops, pats):
    """The same operations as qemu-io commands."""
    cmds = []
    for kind, off, length, k, fua in ops:
        f = " -f" if fua else ""
        if kind == "write":
            cmds.append(f"write -q{f} -s {pats.files[k]} {off} {length}")
        elif kind == "zero":
            cmds.append(f"write -q{f} -z {off} {length}")
        elif kind == "zero-trim":
            cmds.append(f"write -q{f} -z -u {off} {length}")
        elif kind == "trim":
            cmds.append(f"discard -q {off} {length}")
    return cmds


def prefill(img, cs, size, compressed=True):
    """Data, zeroes and (optionally) compressed clusters for the writes
    to land on."""
    n = size // cs
    cmds = [f"write -q -P 0x11 0 {min(size, 3 * cs)}",
            f"write -q -P 0x22 {n // 2 * cs + 100} {cs}",
            f"write -q -z {n // 3 * cs} {2 * cs}",
            f"write -q -P 0x33 {(n - 3) * cs} {2 * cs}",
            f"write -q -z {(n - 3) * cs} {cs}"]
    if compressed:
        cmds += [f"write -q -c -P 0x{0x50 + i:02x} {(n // 4 + i) * cs} {cs}"
                 for i in range(3)]
    qemu_io(img, cmds)


def workload(nbdd_server, tmp_path, img, ops, pats, extra=None,
             version=3, backing=None):
    """Apply @ops to @img through nbdd and to a copy through qemu-io;
    returns the reference copy.  nbdd is stopped (and its exit checked)
    before QEMU looks at either."""
    ref = copy(img, tmp_path / "reference.qcow2")
    start = raw_bytes(str(img), tmp_path)
    cs = info(img)["cluster-size"]
    model = Model(start, cs, version, backing)
    srv = serve(nbdd_server, img, extra=extra)
    h = srv.connect()
    run_nbd(h, ops, pats, model)
    h.flush()
    h.shutdown()
    srv.stop()
    qemu_io(ref, qemu_io_cmds(ops, pats))
    assert_sane(img)
    check_image(ref)
    assert_same(img, ref)
    got = raw_bytes(str(img), tmp_path)
    assert got == bytes(model.b), first_difference(got, bytes(model.b))
    return ref


# -- 1. random workloads on every kind of image ---------------------------

IMAGE_KINDS = {
    "default": ("", 8 * MiB),
    "cluster-512": ("cluster_size=512", 1 * MiB),
    "cluster-4k": ("cluster_size=4k", 2 * MiB),
    "cluster-2m": ("cluster_size=2M", 32 * MiB),
    "refcount-1": ("refcount_bits=1", 8 * MiB),
    "refcount-64": ("refcount_bits=64", 8 * MiB),
    "v2": ("compat=0.10", 8 * MiB),
    "extended-l2-64k": ("extended_l2=on,cluster_size=64k", 8 * MiB),
    "extended-l2-128k": ("extended_l2=on,cluster_size=128k", 8 * MiB),
    "zstd": ("compression_type=zstd", 8 * MiB),
    "lazy-refcounts": ("lazy_refcounts=on", 8 * MiB),
}


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_random_workload(nbdd_server, tmp_path, kind):
    """Writes, zeroes with and without NO_HOLE and trims, anywhere, over
    data, zeroes, compressed clusters and nothing: the image passes
    qemu-img check and reads as QEMU's copy after the same operations."""
    opts, size = IMAGE_KINDS[kind]
    img = create(tmp_path / "a.qcow2", size, opts)
    cs = info(img)["cluster-size"]
    # refcount_bits=1 cannot count compressed clusters sharing a host
    # cluster; QEMU itself refuses to make them.
    prefill(img, cs, size, compressed=(kind != "refcount-1"))
    pats = Patterns(tmp_path, 1)
    ops = random_ops(random.Random(kind), size, cs, 120)
    workload(nbdd_server, tmp_path, img, ops, pats,
             version=2 if kind == "v2" else 3)


def test_zero_flags(nbdd_server, tmp_path):
    """Whole clusters zeroed are metadata only: with NO_HOLE the cluster
    stays allocated (QEMU: zero flag over the old offset), without it
    the cluster is freed; both read as zeroes and QEMU's map agrees."""
    img = create(tmp_path / "a.qcow2", 1 * MiB)
    qemu_io(img, ["write -q -P 0x61 0 256k"])
    srv = serve(nbdd_server, img)
    h = srv.connect()
    h.zero(64 * KiB, 0, nbd.CMD_FLAG_NO_HOLE)
    h.zero(64 * KiB, 64 * KiB)
    h.trim(64 * KiB, 128 * KiB)
    h.shutdown()
    srv.stop()
    assert_sane(img)
    doc = json.loads(qemu_img("map", "--output=json", img).stdout)
    first = {e["start"]: e for e in doc}
    assert first[0]["zero"] and not first[0]["data"]
    assert "offset" in first[0], "NO_HOLE zeroing dropped the cluster"
    assert first[64 * KiB]["zero"] and "offset" not in first[64 * KiB]
    assert raw_bytes(str(img), tmp_path)[:192 * KiB] == bytes(192 * KiB)
    assert raw_bytes(str(img), tmp_path)[192 * KiB:256 * KiB] == \
        b"\x61" * (64 * KiB)


def test_discard_partial_cluster_is_left_alone(nbdd_server, tmp_path):
    """Discard is advisory, as in QEMU: the partial clusters at either
    end of a trim keep their data, the whole ones read as zeroes."""
    img = create(tmp_path / "a.qcow2", 1 * MiB)
    qemu_io(img, ["write -q -P 0x61 0 512k"])
    srv = serve(nbdd_server, img)
    h = srv.connect()
    h.trim(200 * KiB, 10 * KiB)
    got = h.pread(512 * KiB, 0)
    h.shutdown()
    srv.stop()
    want = (b"\x61" * (64 * KiB) + bytes(128 * KiB) +
            b"\x61" * (320 * KiB))
    assert got == want, first_difference(got, want)
    assert_sane(img)


def test_discard_tail_of_unaligned_image(nbdd_server, tmp_path):
    """QEMU discards the partial cluster at the end of an image whose
    size is not a multiple of the cluster size (qcow2_co_pdiscard's
    special case); nbdd must read the same as QEMU afterwards."""
    size = 1 * MiB + 4 * KiB
    img = create(tmp_path / "a.qcow2", size)
    qemu_io(img, [f"write -q -P 0x61 0 {size}"])
    ref = copy(img, tmp_path / "reference.qcow2")
    srv = serve(nbdd_server, img)
    h = srv.connect()
    h.trim(4 * KiB, 1 * MiB)
    h.shutdown()
    srv.stop()
    qemu_io(ref, [f"discard -q {1 * MiB} {4 * KiB}"])
    assert_sane(img)
    assert_same(img, ref)


# -- 2. backing chains ------------------------------------------------------

def make_base(tmp_path, fmt, size):
    """A backing file of @fmt with data nearly everywhere (so that
    copy-on-write shows), and its bytes."""
    rnd = random.Random(5)
    data = bytearray(rnd.randbytes(size))
    data[size // 2:size // 2 + 128 * KiB] = bytes(128 * KiB)   # a hole
    raw = tmp_path / "base.raw"
    raw.write_bytes(bytes(data))
    if fmt == "raw":
        return raw, bytes(data)
    base = tmp_path / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, base)
    raw.unlink()
    return base, bytes(data)


@pytest.mark.parametrize("opts", [
    "", "cluster_size=4k", "compat=0.10",
    "extended_l2=on,cluster_size=128k", "extended_l2=on,cluster_size=64k"])
@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_backing_workload(nbdd_server, tmp_path, opts, base_fmt):
    """An overlay over a shorter backing file: partial-cluster writes
    copy the backing data around them, zeroes and trims hide it (or, on
    v2, trims show it again), and past the backing's end reads zeroes."""
    base_size, size = 3 * MiB, 4 * MiB
    base, base_data = make_base(tmp_path, base_fmt, base_size)
    img = create(tmp_path / "top.qcow2", size, opts, backing=base.name,
                 backing_fmt=base_fmt)
    cs = info(img)["cluster-size"]
    qemu_io(img, [f"write -q -P 0x71 {cs} {cs}",
                  f"write -q -z {4 * cs} {cs}"])
    pats = Patterns(tmp_path, 2)
    kinds = ["write", "zero", "zero-trim", "trim", "read"]
    if "0.10" in opts:
        # QEMU ignores discard on a v2 overlay (no zero flag: it would
        # show the backing); nbdd shows the backing, as documented.
        # test_v2_trim_over_backing covers that.
        kinds.remove("trim")
    ops = random_ops(random.Random(opts + base_fmt), size, cs, 100, kinds)
    workload(nbdd_server, tmp_path, img, ops, pats,
             version=2 if "0.10" in opts else 3, backing=base_data)


def test_v2_trim_over_backing(nbdd_server, tmp_path):
    """A v2 image has no zero flag: a trimmed cluster of an overlay
    could only become unallocated and show stale backing data again, so
    a trim there does nothing, as in QEMU."""
    base, base_data = make_base(tmp_path, "qcow2", 1 * MiB)
    img = create(tmp_path / "top.qcow2", 1 * MiB, "compat=0.10",
                 backing=base.name)
    qemu_io(img, ["write -q -P 0x71 0 256k"])
    srv = serve(nbdd_server, img)
    h = srv.connect()
    h.trim(160 * KiB, 50 * KiB)
    h.trim(256 * KiB, 0)
    got = h.pread(256 * KiB, 0)
    h.shutdown()
    srv.stop()
    want = b"\x71" * (256 * KiB)
    assert got == want, first_difference(got, want)
    assert_sane(img)
    assert raw_bytes(str(img), tmp_path)[:256 * KiB] == want


@pytest.mark.parametrize("cs", ["64k", "128k"])
def test_subclusters_copy_only_what_is_touched(nbdd_server, tmp_path, cs):
    """Extended L2 over a backing file: a write allocates only the
    subclusters it touches (copying the backing into their unwritten
    parts); the rest of the cluster still comes from the backing, in the
    same layout as QEMU's after the same writes."""
    base, base_data = make_base(tmp_path, "qcow2", 2 * MiB)
    img = create(tmp_path / "top.qcow2", 2 * MiB,
                 f"extended_l2=on,cluster_size={cs}", backing=base.name)
    csz = info(img)["cluster-size"]
    sc = csz // 32
    pats = Patterns(tmp_path, 3)
    ops = [("write", sc, sc, 0, False),                 # one whole subcluster
           ("write", 5 * sc + 100, 10, 1, False),       # inside one
           ("write", 8 * sc - 7, 14, 2, False),         # across two
           ("write", csz + 3 * sc, 2 * sc, 3, False),   # next cluster
           ("write", 4 * csz - sc // 2, sc, 4, False),  # across clusters
           ("write", 5 * sc + 200, 10, 5, False),       # same subcluster
           ("zero", 6 * csz, csz, 0, False),            # whole cluster
           ("trim", 7 * csz, csz, 0, False)]
    ref = workload(nbdd_server, tmp_path, img, ops, pats, backing=base_data)
    got = qemu_map_layers(str(img))
    assert got == qemu_map_layers(str(ref))
    # The first cluster: subclusters 1, 5, 7 and 8 are the overlay's, the
    # others still the backing's.
    doc = json.loads(qemu_img("map", "--output=json", img).stdout)
    layer = {}
    for e in doc:
        for o in range(e["start"], e["start"] + e["length"], sc):
            if o < csz:
                layer[o // sc] = e["depth"]
    assert [i for i in range(32) if layer[i] == 0] == [1, 5, 7, 8]


# -- 3. internal snapshots --------------------------------------------------

def snapshot_image(tmp_path, opts=""):
    img = create(tmp_path / "a.qcow2", 4 * MiB, opts)
    qemu_io(img, ["write -q -P 0x61 0 1M", "write -q -P 0x62 2M 640k",
                  "write -q -c -P 0x63 3M 64k"])
    before = raw_bytes(str(img), tmp_path)
    qemu_img("snapshot", "-c", "s1", img)
    return img, before


def snapshot_bytes(img, tmp_path):
    out = tmp_path / "s1.raw"
    qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", img, out)
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.mark.parametrize("kinds", [("write", "read"),
                                   ("write", "zero", "zero-trim", "trim",
                                    "read")],
                         ids=["writes", "everything"])
def test_snapshot_unchanged(nbdd_server, tmp_path, kinds):
    """Writes (and zeroes and trims) through nbdd after 'qemu-img
    snapshot -c': the clusters and L2 tables the snapshot shares are
    copied, never changed, so the snapshot still holds what it held."""
    img, before = snapshot_image(tmp_path)
    pats = Patterns(tmp_path, 4)
    ops = random_ops(random.Random(len(kinds)), 4 * MiB, 64 * KiB, 100,
                     kinds)
    workload(nbdd_server, tmp_path, img, ops, pats)
    got = snapshot_bytes(img, tmp_path)
    assert got == before, "snapshot s1 changed: " + \
        first_difference(got, before)


@pytest.mark.parametrize("op", ["zero", "zero-trim", "trim"])
def test_snapshot_whole_cluster_zero(nbdd_server, tmp_path, op):
    """One whole-cluster zero or trim of a cluster the snapshot shares,
    on an image without a backing file: the snapshot keeps its data."""
    img, before = snapshot_image(tmp_path)
    srv = serve(nbdd_server, img)
    h = srv.connect()
    run_nbd(h, [(op, 0, 64 * KiB, 0, False)], None)
    assert h.pread(64 * KiB, 0) == bytes(64 * KiB)
    h.shutdown()
    srv.stop()
    got = snapshot_bytes(img, tmp_path)
    assert got[:64 * KiB] == before[:64 * KiB], \
        "snapshot s1 changed: " + first_difference(got, before)
    assert_sane(img)


# -- 4. compressed images ---------------------------------------------------

@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", ["4k", "64k"])
def test_overwrite_compressed(nbdd_server, tmp_path, ctype, cs):
    """Writes into clusters that 'qemu-img convert -c' packed byte by
    byte: each is decompressed into a new cluster around the write, and
    the old compressed bytes are released (several share a host
    cluster, so their refcounts must stay exact)."""
    size = 4 * MiB
    rnd = random.Random(6)
    words = [bytes(rnd.choice(b"abcdefgh") for _ in range(rnd.randint(2, 8)))
             for _ in range(200)]
    text = b" ".join(rnd.choice(words) for _ in range(size // 5))[:size]
    raw = tmp_path / "src.raw"
    raw.write_bytes(text.ljust(size, b"\0"))
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"compression_type={ctype},cluster_size={cs}", raw, img)
    csz = info(img)["cluster-size"]
    pats = Patterns(tmp_path, 7)
    ops = random_ops(random.Random(ctype + cs), size, csz, 120)
    workload(nbdd_server, tmp_path, img, ops, pats)


# -- 5. refcount structures grow -----------------------------------------

@pytest.mark.skipif(not have("nbdcopy"), reason="needs nbdcopy")
@pytest.mark.parametrize("refbits", [16, 64])
def test_refcount_table_growth(nbdd_server, tmp_path, refbits):
    """512-byte clusters and 12 MiB of data: many new refcount blocks
    and several bigger refcount tables, all while nbdcopy writes over
    four connections.  The data is right and the refcounts exact."""
    size = 16 * MiB
    src = tmp_path / "src.raw"
    data = random.Random(8).randbytes(12 * MiB)
    src.write_bytes(data)
    img = create(tmp_path / "a.qcow2", size,
                 f"cluster_size=512,refcount_bits={refbits}")
    before = info(img)
    srv = serve(nbdd_server, img)
    run(["nbdcopy", "--connections=4", "--requests=16", str(src),
         srv.uri()], timeout=300)
    srv.stop()
    assert_sane(img)
    got = raw_bytes(str(img), tmp_path)
    assert got[:len(data)] == data, first_difference(got, data)
    assert got[len(data):] == bytes(size - len(data))
    # The table did grow (so the test tests what it says).
    with open(img, "rb") as f:
        f.seek(48)
        rt_off, rt_clusters = struct.unpack(">QI", f.read(12))
    assert rt_clusters > 1, (rt_off, rt_clusters, before)


# -- 6. concurrent allocating writes ----------------------------------------

def assert_bytes_from(got, off, a, b):
    """Each byte of @got (read at @off) is the byte of @a or of @b."""
    for i in range(0, len(got), 512):
        g = got[i:i + 512]
        if g == a[off + i:off + i + len(g)] or g == b[off + i:off + i + len(g)]:
            continue
        for j, x in enumerate(g):
            at = off + i + j
            assert x in (a[at], b[at]), \
                f"read at {off:#x}: byte {at:#x} is {x:#x}, neither " \
                f"{a[at]:#x} (written) nor {b[at]:#x} (before)"


def wait_all(handles):
    for h in handles:
        while h.aio_in_flight() > 0:
            h.poll(-1)


@pytest.mark.parametrize("opts", ["", "cluster_size=4k",
                                  "extended_l2=on,cluster_size=128k"])
def test_concurrent_allocating_writes(nbdd_server, tmp_path, opts):
    """Many writes in flight at once, over three connections, into the
    same unallocated clusters of an overlay: pieces of one cluster,
    overlapping pieces, whole clusters, and reads among them.  Each
    write puts the bytes of one random 'final' buffer at its offsets, so
    whatever the order the result is that buffer where anything was
    written and the backing elsewhere; a read sees, byte by byte, the
    backing or the final buffer, never anything else (a cluster pointed
    at before its data is written would read as zeroes)."""
    size = 4 * MiB
    base, base_data = make_base(tmp_path, "qcow2", size)
    img = create(tmp_path / "top.qcow2", size, opts, backing=base.name)
    cs = info(img)["cluster-size"]
    final = random.Random(9).randbytes(size)
    rnd = random.Random(10)
    srv = serve(nbdd_server, img)
    hs = [srv.connect() for _ in range(3)]
    written = bytearray(size)   # 1 where some write lands
    reads = []
    # Six rounds, each on clusters nothing has allocated yet.
    order = rnd.sample(range(size // cs), size // cs)
    per_round = min(12, len(order) // 6)
    for r in range(6):
        for c in order[r * per_round:(r + 1) * per_round]:
            c *= cs
            pieces = []
            for _ in range(rnd.randint(3, 8)):
                a = rnd.randrange(0, cs)
                b = rnd.randint(a + 1, min(cs, a + max(1, cs // 3)))
                pieces.append((c + a, b - a))
            if rnd.random() < 0.2:
                pieces.append((c, cs))
            if rnd.random() < 0.3 and c + cs < size:   # across two clusters
                pieces.append((c + cs - 100, 200))
            for off, n in pieces:
                h = rnd.choice(hs)
                h.aio_pwrite(final[off:off + n], off)
                written[off:off + n] = b"\1" * n
                if rnd.random() < 0.3:
                    buf = nbd.Buffer(cs)
                    h2 = rnd.choice(hs)
                    h2.aio_pread(buf, c)
                    reads.append((buf, c))
        wait_all(hs)
    for buf, off in reads:
        assert_bytes_from(buf.to_bytearray(), off, final, base_data)
    for h in hs:
        h.shutdown()
    expected = bytes(f if w else b
                     for f, w, b in zip(final, written, base_data))
    want = tmp_path / "expected.raw"
    want.write_bytes(expected)
    srv.stop()
    assert_sane(img)
    assert_same(img, want)


# -- 7. crash safety ------------------------------------------------------------

SECTOR = 512
FILL = b"\x11" * SECTOR


def stamp(op_id, sector):
    """The bytes write @op_id puts in @sector: it names both."""
    return struct.pack(">QQ", op_id, sector) * (SECTOR // 16)


class Crasher:
    """Writes (some with FUA), zeroes and periodic flushes, 16 in flight,
    until the daemon dies; remembers which operations were acknowledged
    in a way that promises durability, and when each was issued and
    completed (operations in flight together may land in either order)."""

    def __init__(self, h, rnd, span, zeroes=True):
        self.h = h
        self.weights = [20, 2, 1] if zeroes else [1, 0, 0]
        self.rnd = rnd
        self.span = span                # sectors
        self.ops = [None]               # op id -> (kind, first, count)
        self.issued = [0]               # op id -> clock at issue
        self.completed = [None]         # op id -> clock at completion
        self.clock = 0
        self.durable = set()
        self.acked = []                 # acknowledged, not yet durable

    def tick(self):
        self.clock += 1
        return self.clock

    def next_op(self):
        rnd = self.rnd
        first = rnd.randrange(self.span)
        count = rnd.randint(1, 384 if rnd.random() < 0.1 else 32)
        count = min(count, self.span - first)
        kind = rnd.choices(["write", "zero", "zero-trim"], self.weights)[0]
        op_id = len(self.ops)
        self.ops.append((kind, first, count))
        fua = rnd.random() < 0.2
        flags = nbd.CMD_FLAG_FUA if fua else 0
        if kind == "write":
            buf = b"".join(stamp(op_id, first + i) for i in range(count))
            c = self.h.aio_pwrite(buf, first * SECTOR, flags=flags)
        else:
            if kind == "zero":
                flags |= nbd.CMD_FLAG_NO_HOLE
            c = self.h.aio_zero(count * SECTOR, first * SECTOR, flags=flags)
        self.issued.append(self.tick())
        self.completed.append(None)
        return c, op_id, fua

    def run(self, deadline):
        pending = {}                    # cookie -> what it completes
        try:
            n = 0
            while time.monotonic() < deadline:
                while len(pending) < 16:
                    n += 1
                    if n % 200 == 0:
                        c = self.h.aio_flush()
                        pending[c] = ("flush", list(self.acked))
                        self.acked = []
                    else:
                        c, op_id, fua = self.next_op()
                        pending[c] = ("fua" if fua else "op", op_id)
                self.h.poll(-1)
                for c in list(pending):
                    if not self.h.aio_command_completed(c):
                        continue
                    what, arg = pending.pop(c)
                    if what == "flush":
                        self.durable.update(arg)
                        continue
                    self.completed[arg] = self.tick()
                    if what == "fua":
                        self.durable.add(arg)
                    else:
                        self.acked.append(arg)
        except nbd.Error:
            pass                        # the daemon is gone

    def before(self, j, d):
        """Did op @j complete before op @d was issued?"""
        return self.completed[j] is not None and \
            self.completed[j] < self.issued[d]


def verify_after_crash(data, crasher, prefilled):
    """Every sector holds what was there before (the prefill in the
    first @prefilled sectors, zeroes after), or the stamp of an
    operation that covers it; and where a durable operation wrote, the
    sector holds its data, or that of an operation that may have landed
    after it (one not completed before it was issued)."""
    cover = {}
    for op_id in range(1, len(crasher.ops)):
        kind, first, count = crasher.ops[op_id]
        for s in range(first, first + count):
            cover.setdefault(s, []).append(op_id)
    # Untouched sectors: as before.
    prev = 0
    for s in sorted(cover) + [len(data) // SECTOR]:
        for a in range(prev, s):
            want = FILL if a < prefilled else bytes(SECTOR)
            got = data[a * SECTOR:(a + 1) * SECTOR]
            assert got == want, f"untouched sector {a} changed: " + \
                got[:16].hex()
        prev = s + 1
    for s, ops in cover.items():
        got = data[s * SECTOR:(s + 1) * SECTOR]
        if got == FILL and s < prefilled:
            holders = []                # the old data
        elif got == bytes(SECTOR):
            holders = [o for o in ops if crasher.ops[o][0] != "write"]
            if s >= prefilled:
                holders.append(0)       # the old data too
        else:
            op_id = struct.unpack(">Q", got[:8])[0]
            assert op_id in ops and got == stamp(op_id, s), \
                f"sector {s} ({s * SECTOR:#x}) holds garbage: {got[:16].hex()}"
            holders = [op_id]
        for d in ops:
            if d not in crasher.durable:
                continue
            ok = any(o == d or (o != 0 and not crasher.before(o, d))
                     for o in holders)
            assert ok, (f"sector {s} ({s * SECTOR:#x}): durable op {d} "
                        f"{crasher.ops[d]} lost; the sector holds "
                        f"{holders or 'the old data'}")


# Freeing a cluster (zeroing) makes the next allocation write the L2
# cache back (QEMU's dependency rule), which hides lost FUA semantics;
# so most runs only write.
CRASH_RUNS = [(opts, seed, seed == 2)
              for opts in ("", "extended_l2=on,cluster_size=128k",
                           "cluster_size=4k")
              for seed in range(3)]


@pytest.mark.parametrize("opts,seed,zeroes", CRASH_RUNS)
def test_kill_9(tmp_path, opts, seed, zeroes):
    """kill -9 at a random moment while writes (and zeroes) are in
    flight: qemu-img check finds no corruption (leaks are allowed, as
    after a QEMU crash) and every operation acknowledged with FUA, or
    before a completed FLUSH, is there."""
    # A span big enough that writes keep allocating until the kill.
    size = 160 * MiB
    span = 128 * MiB // SECTOR
    img = create(tmp_path / "a.qcow2", size, opts)
    qemu_io(img, ["write -q -P 0x11 0 1M"])
    rnd = random.Random(1000 + seed)
    d = tmp_path / "daemon"
    d.mkdir()
    srv = Server(d, ["--blockdev", qcow2_spec(img)] + export())
    try:
        h = srv.connect()
        crasher = Crasher(h, rnd, span, zeroes)
        delay = rnd.uniform(0.1, 0.8)
        killer = threading.Timer(delay, os.kill,
                                 (srv.proc.pid, signal.SIGKILL))
        killer.start()
        crasher.run(time.monotonic() + delay + 10)
        killer.join()
        srv.proc.wait(timeout=20)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        srv.log.close()
    assert srv.proc.returncode == -signal.SIGKILL, srv.output()
    assert "Sanitizer" not in srv.output(), srv.output()
    assert len(crasher.durable) > 10, "the test wrote too little to test"
    r = check_image(img, allow=(0, 3))
    assert r.get("corruptions", 0) == 0, r
    assert info(img)["format-specific"]["data"].get("corrupt") is False
    data = raw_bytes(str(img), tmp_path)
    verify_after_crash(data, crasher, 1 * MiB // SECTOR)


def test_reopen_after_kill_9(nbdd_server, tmp_path):
    """An image left by kill -9 (leaks at most) opens read-write again,
    takes writes and closes clean but for the old leaks."""
    img = create(tmp_path / "a.qcow2", 16 * MiB)
    d = tmp_path / "daemon"
    d.mkdir()
    srv = Server(d, ["--blockdev", qcow2_spec(img)] + export())
    try:
        h = srv.connect()
        for i in range(64):
            h.pwrite(bytes([i + 1]) * 70000, i * 100000)
        h.flush()
        for i in range(64):
            h.pwrite(b"\xee" * 5000, i * 100000 + 8 * MiB)
    finally:
        srv.proc.kill()
        srv.proc.wait()
        srv.log.close()
    check_image(img, allow=(0, 3))
    srv = serve(nbdd_server, img)
    h = srv.connect()
    h.pwrite(b"\x77" * 300000, 15 * MiB)
    for i in range(64):
        assert h.pread(70000, i * 100000) == bytes([i + 1]) * 70000
    h.shutdown()
    srv.stop()
    r = check_image(img, allow=(0, 3))
    assert r.get("corruptions", 0) == 0, r
    assert raw_bytes(str(img), tmp_path)[15 * MiB:15 * MiB + 300000] == \
        b"\x77" * 300000


# -- 8. clean shutdown --------------------------------------------------------

@pytest.mark.parametrize("caches", [None, {"l2-cache-size": 2048,
                                           "l2-cache-entry-size": 512,
                                           "refcount-cache-size": 2048}],
                         ids=["default-caches", "tiny-caches"])
@pytest.mark.parametrize("opts", ["cluster_size=4k",
                                  "extended_l2=on,cluster_size=16k"])
def test_sigterm_writes_metadata_back(nbdd_server, tmp_path, opts, caches):
    """No FLUSH, no FUA: SIGTERM alone must write all metadata back.
    Small clusters spread the writes over many L2 tables and refcount
    blocks; tiny caches evict dirty slices all the time."""
    size = 8 * MiB
    img = create(tmp_path / "a.qcow2", size, opts)
    cs = info(img)["cluster-size"]
    prefill(img, cs, size)
    ref = copy(img, tmp_path / "reference.qcow2")
    pats = Patterns(tmp_path, 11)
    ops = [op[:4] + (False,)
           for op in random_ops(random.Random(12), size, cs, 200)]
    srv = serve(nbdd_server, img, extra=caches)
    h = srv.connect()
    run_nbd(h, ops, pats)
    srv.stop()              # SIGTERM while the client is still connected
    del h
    qemu_io(ref, qemu_io_cmds(ops, pats))
    assert_sane(img)
    assert_same(img, ref)


# -- 9. what cannot be opened read-write --------------------------------------

def refuse(tmp_path, spec):
    """nbdd must exit 1, not crash, and say why; returns its output."""
    args = [NBDD, "-f", "--exit-with-parent",
            "--listen", "unix:" + str(tmp_path / "refused.sock"),
            "--blockdev", spec] + export()
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=30)
    assert p.returncode == 1, f"nbdd exited with {p.returncode}:\n{p.stdout}"
    assert "Sanitizer" not in p.stdout and "runtime error" not in p.stdout, \
        p.stdout
    return p.stdout


def set_incompat(img, bit):
    with open(img, "r+b") as f:
        f.seek(72)
        v = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", v | (1 << bit)))


def break_bitmap(img):
    """Set a reserved flag (bit 2) of the first bitmap directory entry,
    which QEMU and nbdd refuse."""
    with open(img, "r+b") as f:
        f.seek(100)
        pos = struct.unpack(">I", f.read(4))[0]
        while True:
            f.seek(pos)
            typ, n = struct.unpack(">II", f.read(8))
            assert typ != 0, "no bitmaps extension"
            if typ == 0x23852875:
                f.seek(pos + 8 + 16)
                d = struct.unpack(">Q", f.read(8))[0]
                f.seek(d + 12)
                f.write(struct.pack(">I", 4 | 2))
                return
            pos += 8 + (n + 7) // 8 * 8


@pytest.mark.parametrize("what,words", [
    ("bitmap", ["persistent bitmaps are invalid", "read-only"]),
    ("corrupt", ["marked corrupt", "read-only"]),
])
def test_refused_read_write(nbdd_server, tmp_path, what, words):
    """An image with a broken persistent bitmap (valid ones are served
    read-write: test_qcow2_bitmap.py) and one marked corrupt:
    read-write is refused, naming the image and the reason; read-only
    serves the data and leaves the image as it was.  (A dirty image is
    repaired instead: test_qcow2_repair.py.)"""
    img = create(tmp_path / "a.qcow2", 4 * MiB)
    qemu_io(img, ["write -q -P 0x61 0 128k"])
    if what == "corrupt":
        set_incompat(img, 1)
    else:
        qemu_img("bitmap", "--add", img, "b0")
        break_bitmap(img)
    before = open(img, "rb").read()
    out = refuse(tmp_path, qcow2_spec(img))
    for w in words:
        assert w in out, out
    assert str(img) in out, out
    assert open(img, "rb").read() == before
    srv = serve(nbdd_server, img, read_only=True)
    h = srv.connect()
    assert h.is_read_only()
    assert h.pread(128 * KiB, 0) == b"\x61" * (128 * KiB)
    h.shutdown()
    srv.stop()
    assert open(img, "rb").read() == before


# -- 10. hostile metadata on the write path ---------------------------------

def l2_table(img):
    l1 = header_word(img, 40)
    return header_word(img, l1) & 0x00fffffffffffe00


@pytest.mark.parametrize("target", ["l1", "reftable", "refblock", "l2",
                                    "unaligned", "l1-at-reftable"])
def test_l2_entry_points_at_metadata(nbdd_server, tmp_path, target):
    """An L2 entry (or L1 entry) that points at the image's own metadata
    or at an unaligned offset: a write there fails with EIO and leaves
    the metadata as it was (QEMU's overlap check marks the image corrupt
    and fails the write); other clusters still work and the daemon
    exits cleanly."""
    img = create(tmp_path / "a.qcow2", 4 * MiB)
    qemu_io(img, ["write -q -P 0x61 0 128k", "write -q -P 0x62 1M 64k"])
    l1 = header_word(img, 40)
    rt = header_word(img, 48)
    rb = header_word(img, rt)
    l2 = l2_table(img)
    copied = 1 << 63
    point = {"l1": l1, "reftable": rt, "refblock": rb, "l2": l2}
    with open(img, "r+b") as f:
        if target == "l1-at-reftable":
            f.seek(l1)
            f.write(struct.pack(">Q", rt | copied))
        elif target == "unaligned":
            f.seek(l2)
            f.write(struct.pack(">Q", (header_word(img, l2) + 0x200) |
                                copied))
        else:
            f.seek(l2)
            f.write(struct.pack(">Q", point[target] | copied))
    meta = {o: open(img, "rb").read()[o:o + 64 * KiB]
            for o in (0, l1, rt, rb, l2)}
    srv = serve(nbdd_server, img)
    h = srv.connect()
    err = None
    try:
        h.pwrite(b"\xcc" * 4096, 0)
        h.flush()
    except nbd.Error as e:
        err = e.errno
    try:
        h.flush()
    except nbd.Error:
        pass
    assert srv.alive()
    if target != "l1-at-reftable":
        assert h.pread(4096, 1 * MiB) == b"\x62" * 4096
    h.shutdown()
    srv.stop()
    now = open(img, "rb").read()
    for o, was in meta.items():
        if o == l2 and target == "unaligned":
            continue
        if o == 0:
            # Only the corrupt bit (incompatible features, byte 72) may
            # change in the header.
            now0 = now[:72] + now[80:64 * KiB]
            assert now0 == was[:72] + was[80:], "header overwritten"
            continue
        assert now[o:o + 64 * KiB] == was, \
            f"metadata at {o:#x} overwritten (write error: {err})"
    assert err == "EIO"
    assert "corrupt" in srv.output()
    if target != "unaligned":
        # As QEMU: marked corrupt, so it opens read-only until repaired.
        assert header_word(img, 72) & (1 << 1)


# -- 11. block status after writes -------------------------------------------

def coarse(extents):
    """Drop the zero flag from data extents: qemu-img map also reports
    zero for allocated clusters whose bytes are a hole in the file (a
    new cluster written only in part), which NBD clients need not be
    told."""
    return merge([(n, f if f & nbd.STATE_HOLE else 0) for n, f in extents])


def nbd_map(srv):
    doc = json.loads(run(["nbdinfo", "--map", "--json", srv.uri()]).stdout)
    return coarse([(e["length"], e["type"]) for e in doc])


@pytest.mark.parametrize("kind", ["default", "extended-l2-128k", "v2",
                                  "cluster-4k"])
def test_block_status_after_writes(nbdd_server, tmp_path, kind):
    """After writes, zeroes and trims, nbdd (restarted read-only) maps
    the image as qemu-img map does: data, zeroes and holes."""
    opts, size = IMAGE_KINDS[kind]
    img = create(tmp_path / "a.qcow2", size, opts)
    cs = info(img)["cluster-size"]
    prefill(img, cs, size)
    pats = Patterns(tmp_path, 13)
    ops = random_ops(random.Random(kind + "map"), size, cs, 100)
    workload(nbdd_server, tmp_path, img, ops, pats,
             version=2 if kind == "v2" else 3)
    srv = serve(nbdd_server, img, read_only=True)
    assert nbd_map(srv) == coarse(qemu_map(str(img)))


def test_block_status_over_backing(nbdd_server, tmp_path):
    """The same for an overlay: what it holds, what shows through."""
    base, base_data = make_base(tmp_path, "qcow2", 3 * MiB)
    img = create(tmp_path / "top.qcow2", 4 * MiB, "", backing=base.name)
    pats = Patterns(tmp_path, 14)
    ops = random_ops(random.Random(15), 4 * MiB, 64 * KiB, 80)
    workload(nbdd_server, tmp_path, img, ops, pats, backing=base_data)
    srv = serve(nbdd_server, img, read_only=True)
    assert nbd_map(srv) == coarse(qemu_map(str(img)))
