"""The qcow2 driver, read side (read-only nodes): images made by qemu-img and qemu-io,
served by the real daemon, read by real NBD clients, and compared with
what QEMU itself says the image holds (qemu-img convert -O raw for the
bytes, qemu-img map for the allocation)."""
import json
import os
import random
import struct
import subprocess

import nbd
import pytest

from conftest import NBDD, have
from helpers import KiB, MiB, map_export, merge, run
from qemutools import create, qemu_img, qemu_io, qemu_map

pytestmark = pytest.mark.skipif(
    not (have("qemu-img") and have("qemu-io") and have("nbdinfo")),
    reason="needs qemu-img, qemu-io and nbdinfo")


# -- making images -----------------------------------------------------

def cluster_size(img):
    return json.loads(qemu_img("info", "--output=json", img).stdout)[
        "cluster-size"]


def fill(img, cs, size):
    """A mix of everything a reader meets: data at odd offsets and
    lengths, zeroes over data and over nothing, a discarded range and
    compressed clusters.  Laid out in clusters (at least 16), so that no
    compressed write lands on an allocated cluster."""
    n = size // cs
    assert n >= 16
    q, h = n // 4 * cs, (n // 2 + 1) * cs
    cmds = [
        "write -P 0x11 0 4k",
        "write -P 0x22 12k 100k",
        "write -z %d %d" % (q, 2 * cs),                     # zero, no data
        "write -P 0x33 %d %d" % (h + 512, 2 * cs + 1024),
        "write -P 0x44 %d %d" % (size - 2 * cs, 2 * cs),
        "write -z %d %d" % (size - 2 * cs, cs),              # zero over data
        "write -z -u %d %d" % (size - cs, cs),               # unmap
    ]
    cmds += ["write -c -P 0x%02x %d %d" % (0x50 + i, q + (2 + i) * cs, cs)
             for i in range(3)]
    qemu_io(img, *cmds)


# -- what QEMU says -----------------------------------------------------

def qemu_raw(img, tmp_path, spec=None):
    out = tmp_path / ("expected-%d.raw" % random.getrandbits(32))
    src = spec if spec else str(img)
    qemu_img("convert", "-O", "raw", src, out)
    with open(out, "rb") as f:
        data = f.read()
    out.unlink()
    return data




# -- the daemon --------------------------------------------------------

def qcow2_spec(img, node="disk0", extra=None):
    """A read-only qcow2 node (this module reads; test_qcow2_write.py
    writes), so qemu-img can read the image while nbdd serves it."""
    spec = {"driver": "qcow2", "node-name": node, "read-only": True,
            "file": {"driver": "file", "filename": str(img)}}
    spec.update(extra or {})
    return json.dumps(spec)


def serve(nbdd_server, img, extra=None, more=()):
    return nbdd_server(list(more) + [
        "--blockdev", qcow2_spec(img, extra=extra),
        "--export", "type=nbd,id=e0,node-name=disk0,name=disk0"])


def read_all(h, chunk=4 * MiB):
    size = h.get_size()
    return b"".join(h.pread(min(chunk, size - off), off)
                    for off in range(0, size, chunk))


def check_same(srv, img, tmp_path, spec=None):
    """Bytes and map, through libnbd and nbdinfo, against QEMU."""
    h = srv.connect(add_meta_context=nbd.CONTEXT_BASE_ALLOCATION)
    want = qemu_raw(img, tmp_path, spec)
    assert h.get_size() == len(want)
    got = read_all(h)
    if got != want:
        bad = next(i for i in range(len(want)) if got[i] != want[i])
        raise AssertionError(f"first difference at byte {bad:#x}: "
                             f"got {got[bad]:#x}, want {want[bad]:#x}")
    want_map = qemu_map(spec if spec else str(img))
    assert map_export(h) == want_map
    doc = json.loads(run(["nbdinfo", "--map", "--json",
                          srv.uri()]).stdout)
    assert merge([(e["length"], e["type"]) for e in doc]) == want_map
    h.shutdown()


# -- reads and maps match QEMU ----------------------------------------

IMAGE_KINDS = {
    "default": ("", 4 * MiB),
    "cluster-512": ("cluster_size=512", 1 * MiB),
    "cluster-4k": ("cluster_size=4k", 2 * MiB),
    "cluster-2m": ("cluster_size=2M", 32 * MiB),
    "v2": ("compat=0.10", 4 * MiB),
    "v2-cluster-4k": ("compat=0.10,cluster_size=4k", 2 * MiB),
    "refcount-1": ("refcount_bits=1", 4 * MiB),
    "refcount-64": ("refcount_bits=64", 4 * MiB),
    "lazy-refcounts": ("lazy_refcounts=on", 4 * MiB),
    "zstd": ("compression_type=zstd", 4 * MiB),
    "extended-l2": ("extended_l2=on,cluster_size=128k", 8 * MiB),
    "extended-l2-16k": ("extended_l2=on,cluster_size=16k", 4 * MiB),
    "extended-l2-zstd": ("extended_l2=on,compression_type=zstd", 4 * MiB),
    "odd-size": ("", 4 * MiB + 3 * 512),
}


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_read_matches_qemu(nbdd_server, tmp_path, kind):
    opts, size = IMAGE_KINDS[kind]
    img = create(tmp_path / "a.qcow2", size, opts)
    cs = cluster_size(img)
    fill(img, cs, size - size % cs)
    srv = serve(nbdd_server, img)
    check_same(srv, img, tmp_path)


def compressible(seed, n):
    """Text-like bytes: compressible, but not trivially."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghij") for _ in range(rnd.randint(2, 9)))
             for _ in range(300)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
    return bytes(out[:n])


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", ["512", "64k", "2M"])
def test_convert_compressed(nbdd_server, tmp_path, ctype, cs):
    """qemu-img convert -c packs compressed clusters byte by byte, the
    last one sharing sectors with the next; every one must decompress."""
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(6 * MiB)
        f.write(compressible(1, 1 * MiB + 777))
        f.seek(3 * MiB + 4 * KiB)
        f.write(compressible(2, 2 * MiB))
        f.seek(5 * MiB)
        f.write(os.urandom(64 * KiB))          # stored uncompressed
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"compression_type={ctype},cluster_size={cs}", raw, img)
    srv = serve(nbdd_server, img)
    h = srv.connect()
    with open(raw, "rb") as f:
        assert read_all(h) == f.read()
    check_same(srv, img, tmp_path)


def test_unaligned_reads(nbdd_server, tmp_path):
    """Reads that start and end inside clusters, subclusters and
    compressed clusters."""
    img = create(tmp_path / "a.qcow2", 4 * MiB, "extended_l2=on")
    fill(img, 64 * KiB, 4 * MiB)
    srv = serve(nbdd_server, img)
    want = qemu_raw(img, tmp_path)
    h = srv.connect()
    rnd = random.Random(7)
    for _ in range(300):
        off = rnd.randrange(len(want))
        n = rnd.randint(1, min(300 * KiB, len(want) - off))
        assert h.pread(n, off) == want[off:off + n], (off, n)


# -- backing chains ----------------------------------------------------

def make_chain(tmp_path, base_size=2 * MiB, top_size=4 * MiB, opts="",
               relative=True):
    base = create(tmp_path / "base.qcow2", base_size, opts)
    qemu_io(base, "write -P 0xb1 0 1M", "write -P 0xb2 1536k 512k")
    name = "base.qcow2" if relative else str(base)
    top = create(tmp_path / "top.qcow2", top_size, opts, backing=name)
    qemu_io(top, "write -P 0x71 64k 64k", "write -z 256k 64k",
            "write -P 0x72 %d 64k" % (3 * MiB), "write -z 1600k 8k")
    return base, top


@pytest.mark.parametrize("opts", ["", "extended_l2=on,cluster_size=128k",
                                  "compat=0.10"])
def test_backing_chain(nbdd_server, tmp_path, opts):
    """The header's (relative) backing file is opened read-only; the
    overlay is larger than its backing, which reads as zeroes."""
    base, top = make_chain(tmp_path, opts=opts)
    srv = serve(nbdd_server, top)
    check_same(srv, top, tmp_path)


def test_backing_three_deep_mixed_formats(nbdd_server, tmp_path):
    """raw (probed: the header names no format) <- qcow2 <- qcow2."""
    raw = tmp_path / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(3 * MiB)
        f.seek(512 * KiB)
        f.write(b"\xaa" * (256 * KiB))
    mid = create(tmp_path / "mid.qcow2", 3 * MiB, backing=raw,
                 backing_fmt="raw")
    qemu_io(mid, "write -P 0xbb 600k 100k")
    # Hide the backing format extension (an unknown extension now, to
    # be skipped): the driver must probe the backing file's format.
    assert peek(mid, 112, ">I") == 0xe2792aca
    poke(mid, 112, ">I", 0x0badf00d)
    top = create(tmp_path / "top.qcow2", 4 * MiB, backing=mid)
    qemu_io(top, "write -P 0xcc 640k 8k")
    srv = serve(nbdd_server, top)
    check_same(srv, top, tmp_path)


def test_backing_null(nbdd_server, tmp_path):
    base, top = make_chain(tmp_path)
    srv = serve(nbdd_server, top, extra={"backing": None})
    spec = "json:" + json.dumps({"driver": "qcow2", "backing": None,
                                 "file": {"driver": "file",
                                          "filename": str(top)}})
    check_same(srv, top, tmp_path, spec=spec)
    h = srv.connect()
    assert h.pread(64 * KiB, 0) == b"\0" * (64 * KiB)


def test_backing_node_reference(nbdd_server, tmp_path):
    """'backing': a node-name given earlier on the command line."""
    base, top = make_chain(tmp_path)
    srv = serve(nbdd_server, top, extra={"backing": "base0"},
                more=["--blockdev", qcow2_spec(base, node="base0")])
    check_same(srv, top, tmp_path)


def test_subclusters_over_backing(nbdd_server, tmp_path):
    """Extended L2 over a backing file: a 4k write allocates one
    subcluster, the rest of its cluster still comes from the backing."""
    base = create(tmp_path / "base.qcow2", 1 * MiB, "cluster_size=128k")
    qemu_io(base, "write -P 0x5a 0 1M")
    top = create(tmp_path / "top.qcow2", 1 * MiB,
                 "extended_l2=on,cluster_size=128k", backing=base)
    qemu_io(top, "write -P 0x01 4k 4k", "write -z 64k 8k",
            "write -P 0x02 200k 12k")
    srv = serve(nbdd_server, top)
    check_same(srv, top, tmp_path)
    h = srv.connect()
    assert h.pread(12 * KiB, 0) == (b"\x5a" * 4096 + b"\x01" * 4096 +
                                    b"\x5a" * 4096)


# -- many readers at once -----------------------------------------------

def test_concurrent_reads_small_cache(nbdd_server, tmp_path):
    """Four connections, many reads in flight, an L2 cache of four
    512-byte slices: constant eviction, and every byte still right."""
    img = create(tmp_path / "a.qcow2", 16 * MiB, "cluster_size=4k")
    rnd = random.Random(3)
    cmds = ["write -P 0x%02x %d %d" % (rnd.randrange(1, 256),
                                        rnd.randrange(0, 8 * MiB - 64 * KiB,
                                                      512),
                                        rnd.randrange(512, 64 * KiB, 512))
            for _ in range(200)]
    cmds += ["write -c -P 0x%02x %d 4k" % (i + 1, 8 * MiB + i * 8 * KiB)
             for i in range(64)]
    qemu_io(img, *cmds)
    want = qemu_raw(img, tmp_path)
    srv = serve(nbdd_server, img, extra={"l2-cache-size": 2048,
                                         "l2-cache-entry-size": 512})
    hs = [srv.connect() for _ in range(4)]
    pending = []
    for i in range(400):
        h = hs[i % 4]
        off = rnd.randrange(len(want) - 256 * KiB)
        n = rnd.randint(1, 256 * KiB)
        buf = nbd.Buffer(n)
        pending.append((h, h.aio_pread(buf, off), buf, off, n))
        if len(pending) >= 64:
            h0, c, b, o, n0 = pending.pop(0)
            while not h0.aio_command_completed(c):
                h0.poll(-1)
            assert b.to_bytearray() == want[o:o + n0], (o, n0)
    for h0, c, b, o, n0 in pending:
        while not h0.aio_command_completed(c):
            h0.poll(-1)
        assert b.to_bytearray() == want[o:o + n0], (o, n0)


# -- options -----------------------------------------------------------

def refuse(tmp_path, blockdevs, export=True):
    """Start nbdd with @blockdevs; it must exit 1 (not crash) and say
    why.  Returns its stderr."""
    args = [NBDD, "-f", "--exit-with-parent",
            "--listen", "unix:" + str(tmp_path / "refused.sock")]
    for b in blockdevs:
        args += ["--blockdev", b]
    if export:
        args += ["--export", "type=nbd,id=e0,node-name=disk0,name=disk0"]
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=30)
    assert p.returncode == 1, f"nbdd exited with {p.returncode}:\n{p.stdout}"
    assert "Sanitizer" not in p.stdout and "runtime error" not in p.stdout, \
        p.stdout
    return p.stdout


def test_bad_cache_entry_size(tmp_path):
    img = create(tmp_path / "a.qcow2", 1 * MiB)
    out = refuse(tmp_path, [qcow2_spec(img, extra={
        "l2-cache-entry-size": 1000})])
    assert "l2-cache-entry-size must be a power of two" in out


# -- hostile images ----------------------------------------------------

HDR = struct.Struct(">IIQIIQIIQQIIQ")   # the 72-byte version 2 header


def header(img):
    with open(img, "rb") as f:
        return list(HDR.unpack(f.read(HDR.size)))


def poke(img, offset, fmt, *values):
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def peek(img, offset, fmt):
    with open(img, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


@pytest.fixture
def victim(tmp_path):
    img = create(tmp_path / "v.qcow2", 4 * MiB)
    qemu_io(img, "write -P 0x61 0 128k", "write -c -P 0x62 1M 64k")
    return img


@pytest.mark.parametrize("damage,message", [
    (lambda p: os.truncate(p, 50), "too short for a qcow2 header"),
    (lambda p: poke(p, 0, ">I", 0x514649fc), "bad magic"),
    (lambda p: poke(p, 4, ">I", 7), "unsupported qcow2 version 7"),
    (lambda p: poke(p, 20, ">I", 30), "unsupported cluster size"),
    (lambda p: poke(p, 40, ">Q", 1 << 40), "L1 table at 0x10000000000"),
    (lambda p: poke(p, 40, ">Q", 0x30200), "L1 table offset 0x30200 is "
     "not cluster aligned"),
    (lambda p: poke(p, 24, ">Q", 1 << 62), "too small for the virtual size"),
    (lambda p: poke(p, 36, ">I", 1 << 30), "L1 table of 1073741824 entries "
     "is too large"),
    (lambda p: poke(p, 56, ">I", 1 << 20), "refcount table of 1048576 "
     "clusters is too large"),
    (lambda p: poke(p, 100, ">I", 1 << 20), "exceeds the cluster size"),
    (lambda p: poke(p, 72, ">Q", 1 << 10), "unsupported incompatible "
     "feature(s): bit 10 (unknown)"),
    (lambda p: poke(p, 72, ">Q", 1 << 2), "external data file"),
    (lambda p: poke(p, 32, ">I", 1), "encrypted images (crypt_method 1, "
     "AES-CBC) are not supported"),
    (lambda p: poke(p, 32, ">I", 2), "LUKS"),
    (lambda p: poke(p, 60, ">I", 1 << 20), "too many snapshots"),
    (lambda p: (poke(p, 8, ">QI", 0x200, 5000)), "backing file name is too "
     "long"),
    (lambda p: poke(p, 116, ">I", 1 << 30), "header extension 0x6803f857 "
     "at 0x70 is too large"),
])
def test_hostile_header(tmp_path, victim, damage, message):
    damage(victim)
    out = refuse(tmp_path, [qcow2_spec(victim)])
    assert message in out, out
    assert str(victim) in out, out


def test_named_unknown_feature(tmp_path, victim):
    """Unknown incompatible bits are named from the feature table."""
    # Rename the table's first entry (incompatible bit 0, "dirty bit")
    # to bit 12 "frobnicated".
    assert peek(victim, 112, ">I") == 0x6803f857
    poke(victim, 120, ">BB46s", 0, 12, b"frobnicated")
    poke(victim, 72, ">Q", 1 << 12)
    out = refuse(tmp_path, [qcow2_spec(victim)])
    assert "bit 12 (frobnicated)" in out, out


def test_corrupt_bit_read_only(nbdd_server, tmp_path, victim):
    """An image marked corrupt is served read-only, with a warning."""
    poke(victim, 72, ">Q", 1 << 1)
    srv = serve(nbdd_server, victim)
    assert srv.connect().pread(4096, 0) == b"\x61" * 4096
    assert "marked corrupt" in srv.output()


def test_dirty_bit(nbdd_server, tmp_path, victim):
    poke(victim, 72, ">Q", 1 << 0)
    srv = serve(nbdd_server, victim)
    assert srv.connect().pread(4096, 0) == b"\x61" * 4096


def test_backing_loop(tmp_path):
    a = create(tmp_path / "a.qcow2", 1 * MiB)
    b = create(tmp_path / "b.qcow2", 1 * MiB, backing=a)
    qemu_img("rebase", "-u", "-F", "qcow2", "-b", b, a)   # a -> b -> a
    out = refuse(tmp_path, [qcow2_spec(b)])
    assert "backing chain loop" in out, out
    # A self loop, named through a symlink so the names differ.
    c = create(tmp_path / "c.qcow2", 1 * MiB)
    os.symlink(c, tmp_path / "c-link.qcow2")
    qemu_img("rebase", "-u", "-F", "qcow2", "-b", "c-link.qcow2", c)
    out = refuse(tmp_path, [qcow2_spec(c)])
    assert "backing chain loop" in out, out


def test_chain_too_deep(tmp_path):
    prev = create(tmp_path / "l0.qcow2", 64 * KiB)
    for i in range(1, 67):
        prev = create(tmp_path / f"l{i}.qcow2", 64 * KiB, backing=prev)
    out = refuse(tmp_path, [qcow2_spec(prev)])
    assert "backing chain is too deep" in out, out


def test_missing_backing(tmp_path):
    base, top = make_chain(tmp_path)
    os.unlink(base)
    out = refuse(tmp_path, [qcow2_spec(top)])
    assert "backing file" in out and "base.qcow2" in out, out


def l2_offset(img):
    l1 = header(img)[8]
    return peek(img, l1, ">Q") & 0x00fffffffffffe00


def test_corrupt_l2_entry_fails_only_its_reads(nbdd_server, tmp_path,
                                               victim):
    """A bad L2 entry found at run time: EIO for the reads that need it,
    a log line that names it, and the daemon keeps serving the rest."""
    l2 = l2_offset(victim)
    entry = peek(victim, l2, ">Q")
    poke(victim, l2, ">Q", entry | 0x200)                # unaligned
    poke(victim, l2 + 8 * 16, ">Q", (1 << 62) | (1 << 50))  # compressed, EOF
    srv = serve(nbdd_server, victim)
    h = srv.connect()
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 0)
    assert e.value.errno == "EIO"
    with pytest.raises(nbd.Error):
        h.pread(4096, 16 * 64 * KiB)
    assert h.pread(4096, 64 * KiB) == b"\x61" * 4096
    with pytest.raises(nbd.Error):
        h.block_status(4096, 0, lambda *a: 0)
    out = srv.output()
    assert "is not cluster aligned" in out and "for guest offset 0x0 " in out
    assert "outside the data area" in out


def test_garbage_compressed_data(nbdd_server, tmp_path, victim):
    """Compressed data that does not decompress: EIO, not a crash."""
    l2 = l2_offset(victim)
    entry = peek(victim, l2 + 8 * 16, ">Q")      # the cluster at 1M
    assert entry & (1 << 62)
    coff = entry & ((1 << 54) - 1)
    poke(victim, coff, ">16s", os.urandom(16))
    srv = serve(nbdd_server, victim)
    h = srv.connect()
    with pytest.raises(nbd.Error) as e:
        h.pread(64 * KiB, 1 * MiB)
    assert e.value.errno == "EIO"
    assert "cannot decompress" in srv.output()
    assert h.pread(4096, 0) == b"\x61" * 4096


def test_l2_table_past_eof(nbdd_server, tmp_path, victim):
    l1 = header(victim)[8]
    poke(victim, l1, ">Q", (1 << 63) | (1 << 40))
    srv = serve(nbdd_server, victim)
    h = srv.connect()
    with pytest.raises(nbd.Error):
        h.pread(512, 0)
    assert "past the end of the file" in srv.output()


def test_random_header_damage(tmp_path):
    """Random bytes over the header: refused or served, never a crash."""
    rnd = random.Random(11)
    base = create(tmp_path / "r.qcow2", 1 * MiB)
    qemu_io(base, "write -P 0x61 0 64k")
    pristine = open(base, "rb").read()
    for i in range(40):
        data = bytearray(pristine)
        for _ in range(rnd.randint(1, 6)):
            data[rnd.randrange(0, 512)] = rnd.randrange(256)
        img = tmp_path / f"r{i}.qcow2"
        img.write_bytes(bytes(data))
        args = [NBDD, "--stdio", "--blockdev", qcow2_spec(img),
                "--export", "type=nbd,id=e0,node-name=disk0,name=disk0"]
        p = subprocess.run(args, input=b"", capture_output=True, timeout=30)
        assert p.returncode in (0, 1), (i, p.returncode, p.stderr)
        assert b"Sanitizer" not in p.stderr and b"runtime error" not in \
            p.stderr, p.stderr
