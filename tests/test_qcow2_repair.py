"""The qcow2 driver, dirty images: a read-write open rebuilds the
refcounts of an image left dirty by an unclean shutdown (lazy refcounts),
as QEMU does, and lazy refcounts in nbdd's own write path.

Images are crashed by the real tools (qemu-io's 'abort', SIGKILL of
nbdd), repaired by nbdd, and judged by QEMU: 'qemu-img check' must find
nothing, and 'qemu-img compare' must match a copy that
'qemu-img check -r all' repaired."""
import json
import os
import shutil
import signal
import struct
import subprocess

import pytest

from conftest import NBDD, Server, have
from helpers import KiB, MiB, pattern, run
import qemutools
from qemutools import qemu_img, qemu_io

pytestmark = pytest.mark.skipif(
    not (have("qemu-img") and have("qemu-io")),
    reason="needs qemu-img and qemu-io")


# -- QEMU's side ----------------------------------------------------------

def create(path, size, opts="", backing=None):
    """A qcow2 image with lazy refcounts, which a crash leaves dirty."""
    return qemutools.create(path, size, "lazy_refcounts=on" +
                            ("," + opts if opts else ""), backing=backing)


def crash(img, *cmds):
    """Run @cmds in qemu-io, then abort it: lazy refcounts leave the
    image dirty with stale refcounts."""
    p = qemu_io(img, *cmds, "abort", check=False)
    assert p.returncode != 0, p.stdout
    assert is_dirty(img)


def info(img):
    return json.loads(qemu_img("info", "-U", "--output=json", img).stdout)


def is_dirty(img):
    return info(img).get("dirty-flag", False)


def check(img):
    """qemu-img check's exit code: 0 clean, 2 errors, 3 leaks."""
    return qemu_img("check", img, check=False).returncode


def repaired_copy(img, tmp_path):
    """What QEMU makes of @img: a copy repaired by check -r all."""
    ref = tmp_path / "qemu-repaired.qcow2"
    shutil.copyfile(img, ref)
    assert qemu_img("check", "-r", "all", ref, check=False).returncode == 0
    return ref


def raw_bytes(img, tmp_path):
    out = tmp_path / "expected.raw"
    qemu_img("convert", "-U", "-O", "raw", img, out)
    return out.read_bytes()


# -- nbdd's side ------------------------------------------------------------

def rw_spec(img, extra=None):
    spec = {"driver": "qcow2", "node-name": "disk0",
            "file": {"driver": "file", "filename": str(img)}}
    spec.update(extra or {})
    return json.dumps(spec)


def rw_args(img, extra=None):
    return ["--blockdev", rw_spec(img, extra),
            "--export", "type=nbd,id=e0,node-name=disk0,name=disk0,"
            "writable=on"]


def read_all(h, chunk=4 * MiB):
    size = h.get_size()
    return b"".join(h.pread(min(chunk, size - off), off)
                    for off in range(0, size, chunk))


def refuse(tmp_path, img):
    """nbdd must refuse to open @img read-write (exit 1, no crash)."""
    args = [NBDD, "-f", "--exit-with-parent",
            "--listen", "unix:" + str(tmp_path / "refused.sock")] + \
        rw_args(img)
    p = run(args, check=False, stderr=subprocess.STDOUT, timeout=60)
    out = p.stdout
    assert p.returncode == 1, f"nbdd exited with {p.returncode}:\n{out}"
    assert "Sanitizer" not in out and "runtime error" not in out, out
    return out


# -- repair: images crashed by qemu-io --------------------------------------

def setup_compressed(img):
    qemu_io(img, "write -c -P 0x61 0 64k", "write -c -P 0x62 64k 64k",
            "write -c -P 0x63 1M 64k")


def setup_snapshots(img):
    qemu_io(img, "write -P 0x41 0 256k", "write -c -P 0x42 1M 64k")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0x43 64k 64k", "write -P 0x44 2M 128k")
    qemu_img("snapshot", "-c", "s2", img)


def setup_backing(img):
    base = img.parent / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, 4 * MiB)
    qemu_io(base, "write -P 0x55 0 4M")
    os.unlink(img)
    create(img, 4 * MiB, backing=base.name)


CRASH = ["write -P 0x5a 0 128k", "write -P 0x5b 1M 4k",
         "write -P 0x5c 3M 100k", "write -z 2M 64k"]

CASES = {
    # name: (create options, size, setup, commands before the abort)
    "default": ("", 4 * MiB, None, CRASH),
    "compressed": ("", 4 * MiB, setup_compressed,
                   ["write -P 0x5a 4k 4k", "write -c -P 0x5d 2M 64k",
                    "write -P 0x5b 1M 64k", "write -P 0x5c 3M 64k"]),
    "snapshots": ("", 4 * MiB, setup_snapshots,
                  ["write -P 0x5a 0 8k", "write -P 0x5b 1M 4k",
                   "write -P 0x5c 2M 64k", "write -P 0x5d 3M 64k"]),
    "extended-l2": ("extended_l2=on,cluster_size=128k", 8 * MiB, None,
                    ["write -P 0x5a 4k 4k", "write -P 0x5b 1M 8k",
                     "write -z 2M 128k", "write -P 0x5c 5M 300k"]),
    "cluster-512": ("cluster_size=512", 1 * MiB, None,
                    ["write -P 0x5a 0 64k", "write -P 0x5b 300k 1k",
                     "write -P 0x5c 700k 100k"]),
    "refcount-1": ("refcount_bits=1", 4 * MiB, None, CRASH),
    "refcount-64": ("refcount_bits=64", 4 * MiB, None, CRASH),
    "backing": ("", 4 * MiB, setup_backing,
                ["write -P 0x5a 4k 4k", "write -P 0x5b 1M 100k",
                 "write -z 3M 64k"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_repair_after_qemu_crash(nbdd_server, tmp_path, case):
    opts, size, setup, cmds = CASES[case]
    img = create(tmp_path / "a.qcow2", size, opts)
    if setup:
        setup(img)
    crash(img, *cmds)
    assert check(img) == 2                      # stale refcounts: errors
    ref = repaired_copy(img, tmp_path)
    want = raw_bytes(ref, tmp_path)

    srv = nbdd_server(rw_args(img))
    out = srv.output()
    assert "rebuilt refcounts (" in out and str(img) in out, out
    assert "after an unclean shutdown" in out, out
    h = srv.connect()
    assert read_all(h) == want
    # New allocations go through the new structure: write some more,
    # the same on the copy QEMU repaired.
    for i, (off, n) in enumerate([(8 * KiB, 4 * KiB), (size - 70 * KiB,
                                                        70 * KiB)]):
        h.pwrite(pattern(i, n), off)
        (tmp_path / "buf").write_bytes(pattern(i, n))
        qemu_io(ref, "write -s %s %d %d" % (tmp_path / "buf", off, n))
    h.flush()
    h.shutdown()
    srv.stop()

    assert not is_dirty(img)
    assert check(img) == 0, qemu_img("check", img, check=False).stdout
    p = qemu_img("compare", ref, img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    if case == "snapshots":
        snaps = [s["name"] for s in info(img).get("snapshots", [])]
        assert snaps == ["s1", "s2"]


def test_repair_counts_what_it_found(nbdd_server, tmp_path):
    """The clusters in use: header, L1, one L2, 2 data, the new reftable
    and its one block."""
    img = create(tmp_path / "a.qcow2", 4 * MiB)
    crash(img, "write -P 1 0 128k")
    srv = nbdd_server(rw_args(img))
    assert "rebuilt refcounts (7 clusters in use)" in srv.output()


def test_repair_is_not_needed_read_only(nbdd_server, tmp_path):
    """A read-only open serves a dirty image as it is."""
    img = create(tmp_path / "a.qcow2", 4 * MiB)
    crash(img, "write -P 0x33 0 64k")
    before = img.read_bytes()
    srv = nbdd_server(rw_args(img, {"read-only": True})[:2] + [
        "--export", "type=nbd,id=e0,node-name=disk0,name=disk0"])
    assert srv.connect().pread(4096, 0) == b"\x33" * 4096
    srv.stop()
    assert img.read_bytes() == before
    assert "rebuilt" not in srv.output()


# -- hostile dirty images -------------------------------------------------

def peek(img, offset, fmt):
    with open(img, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def poke(img, offset, fmt, *values):
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


COPIED = 1 << 63
COMPRESSED = 1 << 62


def l1_offset(img):
    return peek(img, 40, ">Q")


def l2_offset(img):
    return peek(img, l1_offset(img), ">Q") & 0x00fffffffffffe00


def data_cluster(img):
    return peek(img, l2_offset(img), ">Q") & 0x00fffffffffffe00


def set_l1(img, value):
    poke(img, l1_offset(img), ">Q", value)


def set_l2(img, index, value):
    poke(img, l2_offset(img) + 8 * index, ">Q", value)


def compressed_past_eof(img):
    # 64 KiB clusters: the sector count is bits 54-61.
    size = os.path.getsize(img)
    set_l2(img, 5, COMPRESSED | (200 << 54) | (size - 1000))


@pytest.mark.parametrize("damage,message", [
    (lambda p: set_l1(p, COPIED | 1 << 40),
     "L2 table (entry 0 of the active L1 table) at 0x10000000000 "
     "(65536 bytes) is past the end of the file"),
    (lambda p: set_l1(p, COPIED | 0x30200),
     "L2 table offset 0x30200 (entry 0 of the active L1 table) is not "
     "cluster aligned"),
    (lambda p: set_l1(p, COPIED | 0x30000 | 1 << 60),
     "has reserved bits set"),
    (lambda p: set_l2(p, 0, COPIED | 1 << 40),
     "data cluster of L2 entry at 0x"),
    (lambda p: set_l2(p, 1, COPIED | 0x50200),
     "data cluster 0x50200 of L2 entry at 0x"),
    (lambda p: set_l2(p, 1, COPIED | 0x50000 | 1 << 3),
     "has reserved bits set"),
    (compressed_past_eof, "compressed cluster of L2 entry at 0x"),
    (lambda p: set_l2(p, 1, 0x30000 | COPIED),
     "of the active L1 table is referenced 2 times"),
    # A snapshot table over data: garbage sizes.
    (lambda p: poke(p, 60, ">IQ", 1, data_cluster(p)),
     "bytes of extra data (at most 1024)"),
])
def test_hostile_dirty_image(tmp_path, damage, message):
    img = create(tmp_path / "v.qcow2", 4 * MiB)
    crash(img, "write -P 0x61 0 128k")
    damage(img)
    before = img.read_bytes()
    out = refuse(tmp_path, img)
    assert "qcow2: %s: cannot repair: " % img in out, out
    assert message in out, out
    assert img.read_bytes() == before


def test_too_many_clusters_to_count(tmp_path):
    """Memory is bounded: a huge (sparse) file is refused, not counted."""
    img = create(tmp_path / "v.qcow2", 4 * MiB, "cluster_size=512")
    crash(img, "write -P 0x61 0 4k")
    os.truncate(img, 64 << 30)                  # 2^27 clusters of 512 B
    before_size = os.path.getsize(img)
    out = refuse(tmp_path, img)
    assert "more than the 67108864 the repair counts in memory" in out, out
    assert os.path.getsize(img) == before_size


# -- lazy refcounts in nbdd's own write path -------------------------------

def crashing_server(tmp_path, args):
    """A server outside the fixture, to be killed: its own directory,
    so that its pidfile does not fool the next one."""
    d = tmp_path / "crashing"
    d.mkdir()
    return Server(d, args)


def kill(srv):
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    srv.log.close()


def test_lazy_sigkill_then_repair(nbdd_server, tmp_path):
    img = create(tmp_path / "a.qcow2", 8 * MiB)
    srv = crashing_server(tmp_path, rw_args(img))
    h = srv.connect()
    assert not is_dirty(img)                    # nothing written yet
    h.pwrite(b"\x11" * (192 * KiB), 0)
    h.flush()
    assert is_dirty(img)                        # marked before any L2
    # Not flushed: this may or may not survive, but the repair and
    # QEMU's must agree on what did.
    h.pwrite(b"\x22" * (64 * KiB), 4 * MiB)
    kill(srv)

    assert is_dirty(img)
    ref = repaired_copy(img, tmp_path)
    want = raw_bytes(ref, tmp_path)
    assert want[:192 * KiB] == b"\x11" * (192 * KiB)

    srv = nbdd_server(rw_args(img))
    assert "rebuilt refcounts" in srv.output()
    h = srv.connect()
    assert read_all(h) == want
    h.shutdown()
    srv.stop()
    assert not is_dirty(img)
    assert check(img) == 0
    assert qemu_img("compare", ref, img, check=False).returncode == 0


def test_lazy_sigkill_stale_refcounts(nbdd_server, tmp_path):
    """Without a flush, lazy L2 tables can reach the disk before their
    refcounts: QEMU's check sees errors, nbdd repairs them."""
    img = create(tmp_path / "a.qcow2", 2 * MiB, "cluster_size=4k")
    srv = crashing_server(tmp_path, rw_args(img))
    h = srv.connect()
    # 4 KiB clusters: an L2 table maps 2 MiB, so each write below needs
    # a new L2 table, which is written (with its L1 entry) at once.
    h.pwrite(b"\x33" * 4096, 0)
    kill(srv)
    assert is_dirty(img)
    assert check(img) == 2
    srv = nbdd_server(rw_args(img))
    assert "rebuilt refcounts" in srv.output()
    srv.connect().shutdown()
    srv.stop()
    assert not is_dirty(img)
    assert check(img) == 0


def test_lazy_clean_shutdown(nbdd_server, tmp_path):
    img = create(tmp_path / "a.qcow2", 4 * MiB)
    srv = nbdd_server(rw_args(img))
    h = srv.connect()
    h.pwrite(b"\x44" * (128 * KiB), 64 * KiB)
    h.flush()
    assert is_dirty(img)
    h.shutdown()
    srv.stop()
    assert not is_dirty(img)
    assert check(img) == 0
    assert "rebuilt" not in srv.output()


@pytest.mark.parametrize("lazy_bit,option,lazy", [
    (True, None, True),
    (True, False, False),
    (False, None, False),
    (False, True, True),
])
def test_lazy_option(nbdd_server, tmp_path, lazy_bit, option, lazy):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             "lazy_refcounts=" + ("on" if lazy_bit else "off"), img, 4 * MiB)
    extra = {} if option is None else {"lazy-refcounts": option}
    srv = nbdd_server(rw_args(img, extra))
    h = srv.connect()
    h.pwrite(b"\x55" * 4096, 0)
    h.flush()
    assert is_dirty(img) == lazy
    h.shutdown()
    srv.stop()
    assert not is_dirty(img)
    assert check(img) == 0
    assert info(img)["format-specific"]["data"]["lazy-refcounts"] == lazy_bit


def test_lazy_refused_on_v2(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", img,
             1 * MiB)
    args = [NBDD, "-f", "--exit-with-parent",
            "--listen", "unix:" + str(tmp_path / "r.sock")] + \
        rw_args(img, {"lazy-refcounts": True})
    p = run(args, check=False, timeout=60)
    assert p.returncode == 1
    assert "lazy refcounts need a version 3 image" in p.stdout + p.stderr
