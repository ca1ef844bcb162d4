"""Persistent bitmaps in qcow2 (formats/qcow2-bitmap.c) against QEMU.

nbdd's side is tests/test-qcow2-bitmap, a helper that lists, reads and
stores bitmaps through the driver (there is no QMP command for them
yet); QEMU's side is qemu-img (info, check, bitmap), qemu-io (its writes
dirty enabled bitmaps) and qemu-nbd exporting a bitmap as the meta
context qemu:dirty-bitmap:NAME, read by nbdinfo --map.  Both directions:
bits QEMU records are read by nbdd, bits nbdd stores are seen by QEMU,
and either side can change or remove what the other wrote.  The daemon
itself now serves images with bitmaps read-write, marking them in use.
"""
import json
import os

import pytest

from conftest import TOP_DIR
from helpers import KiB, MiB, run
from qemutools import create, qemu_img, qemu_io

def _find_helper():
    for d in (os.environ.get("top_builddir"), os.path.join(TOP_DIR, "build"),
              TOP_DIR):
        if d:
            p = os.path.join(d, "tests", "test-qcow2-bitmap")
            if os.access(p, os.X_OK):
                return p
    return None


HELPER = _find_helper()
if HELPER is None:
    raise RuntimeError("tests/test-qcow2-bitmap not found: build it "
                       "('make check' does) or set top_builddir")


# -- nbdd's view ---------------------------------------------------------

def nbdd_list(img):
    """{name: (granularity, in_use, auto)}"""
    out = run([HELPER, "list", str(img)]).stdout
    res = {}
    for line in out.splitlines():
        name, g, iu, au = line.split()
        res[name] = (int(g), iu == "1", au == "1")
    return res


def nbdd_read(img, name):
    """The dirty ranges of bitmap @name: [(offset, length)]."""
    out = run([HELPER, "read", str(img), name]).stdout
    return [tuple(int(x) for x in line.split()) for line in out.splitlines()]


def nbdd_store(img, *specs, check=True):
    """specs: (name, granularity, flags, [(offset, length)])."""
    args = []
    for name, gran, flags, ranges in specs:
        r = ",".join(f"{o}+{n}" for o, n in ranges) or "-"
        args.append(f"{name}:{gran}:{flags or '-'}:{r}")
    return run([HELPER, "store", str(img)] + args, check=check)


# -- QEMU's view ---------------------------------------------------------

def qemu_bitmaps(img, force_share=False):
    """{name: (granularity, set of flags)} as qemu-img info lists them
    (with @force_share, while another program has the image open)."""
    doc = json.loads(qemu_img("info", *(["-U"] if force_share else []),
                              "--output=json", img).stdout)
    bms = doc.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: (b["granularity"], set(b["flags"])) for b in bms}


def qemu_dirty(img, name):
    """The dirty ranges QEMU exports for bitmap @name (qemu-nbd -B,
    nbdinfo --map): [(offset, length)], merged."""
    p = run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", "--",
             "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name, str(img), "]"])
    out = []
    for e in json.loads(p.stdout):
        if e["type"] & 1:
            if out and out[-1][0] + out[-1][1] == e["offset"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["offset"], e["length"]))
    return out


def check(img):
    p = qemu_img("check", "--output=json", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


# -- QEMU writes, nbdd reads -----------------------------------------------

def test_read_what_qemu_recorded(tmp_path):
    """Bits recorded by qemu-io writes in enabled bitmaps of several
    granularities read the same through nbdd as through qemu-nbd."""
    img = create(tmp_path / "a.qcow2", 64 * MiB)
    qemu_img("bitmap", "--add", img, "g64k")
    qemu_img("bitmap", "--add", "-g", "4K", img, "g4k")
    qemu_img("bitmap", "--add", "-g", "1M", img, "g1m")
    qemu_img("bitmap", "--add", "--disable", img, "off")
    qemu_io(img, "write -q 0 1", "write -q 5M 300K", "write -q 33M 4K",
            "write -q 67108352 512")
    got = nbdd_list(img)
    assert got == {"g64k": (65536, False, True), "g4k": (4096, False, True),
                   "g1m": (MiB, False, True), "off": (65536, False, False)}
    for name in got:
        assert nbdd_read(img, name) == qemu_dirty(img, name), name
    assert nbdd_read(img, "off") == []
    assert nbdd_read(img, "g4k")[1] == (5 * MiB, 300 * KiB)


# -- nbdd stores, QEMU reads -----------------------------------------------

STORED = [
    ("a", 65536, "a", [(MiB, 64 * KiB), (10 * MiB + 1, 200 * KiB)]),
    ("b", 131072, "", [(0, 1), (64 * MiB - 1, 1)]),
    ("c", 512, "a", [(7 * MiB + 512, 1024)]),
    ("empty", 65536, "a", []),
]


def test_store_seen_by_qemu(tmp_path):
    """Stored bitmaps pass qemu-img check, are listed by qemu-img info
    with their granularity and flags, and qemu-nbd exports exactly the
    bits stored; the stored ones replace what was there."""
    img = create(tmp_path / "a.qcow2", 64 * MiB)
    qemu_img("bitmap", "--add", img, "old")
    nbdd_store(img, *STORED)
    check(img)
    assert qemu_bitmaps(img) == {"a": (65536, {"auto"}),
                                 "b": (131072, set()),
                                 "c": (512, {"auto"}),
                                 "empty": (65536, {"auto"})}
    assert qemu_dirty(img, "a") == [(MiB, 64 * KiB),
                                    (10 * MiB, 4 * 64 * KiB)]
    assert qemu_dirty(img, "b") == [(0, 128 * KiB),
                                    (64 * MiB - 128 * KiB, 128 * KiB)]
    assert qemu_dirty(img, "c") == [(7 * MiB + 512, 1024)]
    assert qemu_dirty(img, "empty") == []
    for name in ("a", "b", "c", "empty"):
        assert nbdd_read(img, name) == qemu_dirty(img, name)


def test_store_in_use_flag(tmp_path):
    """A bitmap stored IN_USE is inconsistent for QEMU: listed with
    in-use, refused by qemu-nbd -B, removable by qemu-img."""
    img = create(tmp_path / "a.qcow2", 16 * MiB)
    nbdd_store(img, ("u", 65536, "au", [(0, 1)]), ("ok", 65536, "", []))
    check(img)
    assert qemu_bitmaps(img) == {"u": (65536, {"in-use", "auto"}),
                                 "ok": (65536, set())}
    assert nbdd_list(img)["u"] == (65536, True, True)
    p = run(["qemu-nbd", "-r", "-f", "qcow2", "-B", "u", str(img)],
            check=False, timeout=30)
    assert p.returncode != 0 and "inconsistent" in p.stderr
    qemu_img("bitmap", "--remove", img, "u")
    check(img)
    assert nbdd_list(img) == {"ok": (65536, False, False)}


def test_qemu_changes_what_nbdd_stored(tmp_path):
    """QEMU loads nbdd's bitmaps, records its own writes in the enabled
    ones, merges, removes, and stores them back; nbdd reads the result;
    and nbdd removes them all."""
    img = create(tmp_path / "a.qcow2", 64 * MiB)
    nbdd_store(img, *STORED)
    qemu_io(img, "write -q 20M 64K")
    check(img)
    assert nbdd_read(img, "a") == [(MiB, 64 * KiB), (10 * MiB, 256 * KiB),
                                   (20 * MiB, 64 * KiB)]
    assert nbdd_read(img, "b") == [(0, 128 * KiB),
                                   (64 * MiB - 128 * KiB, 128 * KiB)]
    qemu_img("bitmap", "--add", "-g", "512", "--merge", "c", img, "m")
    qemu_img("bitmap", "--remove", img, "a")
    check(img)
    assert nbdd_read(img, "m") == nbdd_read(img, "c") == \
        [(7 * MiB + 512, 1024), (20 * MiB, 64 * KiB)]
    assert set(nbdd_list(img)) == {"b", "c", "empty", "m"}
    nbdd_store(img)
    check(img)
    assert qemu_bitmaps(img) == {}
    with open(img, "rb") as f:
        f.seek(88)
        assert int.from_bytes(f.read(8), "big") & 1 == 0


def test_refused_stores(tmp_path):
    """What QEMU refuses to store is refused before anything changes."""
    img = create(tmp_path / "a.qcow2", 16 * MiB)
    nbdd_store(img, ("keep", 65536, "a", [(0, 1)]))
    # The helper's read-write open marks 'keep' in use, once.
    run([HELPER, "open-rw", str(img)])
    before = open(img, "rb").read()
    for spec, words in [(("x" * 1024, 65536, "", []), "name"),
                        (("g", 256, "", []), "granularity"),
                        (("g", 3 * 65536, "", []), "granularity")]:
        p = nbdd_store(img, spec, check=False)
        assert p.returncode == 1 and words in p.stderr, p.stderr
    p = nbdd_store(img, ("d", 65536, "", []), ("d", 512, "", []),
                   check=False)
    assert p.returncode == 1 and "twice" in p.stderr, p.stderr
    v2 = create(tmp_path / "v2.qcow2", 16 * MiB, opts="compat=0.10")
    p = nbdd_store(v2, ("b", 65536, "", []), check=False)
    assert p.returncode == 1 and "version 3" in p.stderr, p.stderr
    assert open(img, "rb").read() == before
    check(img)


# -- read-write opens ------------------------------------------------------

def test_read_write_open_marks_in_use(tmp_path):
    """A read-write open sets IN_USE on every bitmap before any write, so
    QEMU never trusts a bitmap that missed writes; a session that clears
    it again (after storing, in the daemon) leaves them valid."""
    img = create(tmp_path / "a.qcow2", 16 * MiB)
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", "--disable", img, "b1")
    qemu_io(img, "write -q 1M 4K")
    run([HELPER, "open-rw", str(img)])
    check(img)
    assert qemu_bitmaps(img) == {"b0": (65536, {"in-use", "auto"}),
                                 "b1": (65536, {"in-use"})}
    assert nbdd_list(img)["b0"] == (65536, True, True)
    qemu_img("bitmap", "--remove", img, "b1")
    check(img)

    img2 = create(tmp_path / "b.qcow2", 16 * MiB)
    qemu_img("bitmap", "--add", img2, "b0")
    qemu_io(img2, "write -q 1M 4K")
    run([HELPER, "clear-in-use", str(img2)])
    assert qemu_bitmaps(img2) == {"b0": (65536, {"auto"})}
    assert qemu_dirty(img2, "b0") == [(MiB, 64 * KiB)]


def test_daemon_records_into_qemus_bitmaps(nbdd_server, tmp_path):
    """An image with bitmaps qemu-img made: nbdd serves it read-write,
    records the writes in the bitmaps it loaded (the enabled one only),
    keeps them valid all along (write intent: the image always holds a
    superset of the writes), and stores them back at a clean stop, so
    QEMU finds them dirty exactly where nbdd wrote; the image checks
    clean."""
    from test_qcow2_write import serve
    img = create(tmp_path / "a.qcow2", 16 * MiB)
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", img, "off")
    qemu_img("bitmap", "--disable", img, "off")
    qemu_io(img, "write -P 1 0 4K")      # recorded by QEMU, kept by nbdd
    srv = serve(nbdd_server, img)
    h = srv.connect()
    assert not h.is_read_only()
    h.pwrite(b"\x5a" * (256 * KiB), 3 * MiB)
    h.zero(64 * KiB, 8 * MiB + 100)
    h.flush()
    assert qemu_bitmaps(img, force_share=True) == {"b0": (65536, {"auto"}),
                                                   "off": (65536, set())}
    h.shutdown()
    srv.stop()
    check(img)
    assert qemu_bitmaps(img) == {"b0": (65536, {"auto"}),
                                 "off": (65536, set())}
    assert qemu_dirty(img, "b0") == [(0, 64 * KiB), (3 * MiB, 256 * KiB),
                                     (8 * MiB, 2 * 64 * KiB)]
    assert qemu_dirty(img, "off") == []
    qemu_io(img, "read -q -P 0x5a 3M 256K")


@pytest.mark.parametrize("seed", range(3))
def test_kill_9_leaves_bitmaps_usable(tmp_path, seed):
    """kill -9 at a random moment under write load: the bitmap is not
    in use, QEMU and nbdd both trust it, and it covers every write that
    was acknowledged (write intent: a granule's bit is in the image
    before the first write into it).  QEMU would have lost it."""
    import random
    import signal
    import threading
    import time
    from conftest import Server
    from test_qcow2_write import export, qcow2_spec
    size = 256 * MiB
    img = create(tmp_path / "a.qcow2", size)
    qemu_img("bitmap", "--add", img, "b0")
    d = tmp_path / "daemon"
    d.mkdir()
    srv = Server(d, ["--blockdev", qcow2_spec(img)] + export())
    rnd = random.Random(seed)
    acked = []
    try:
        h = srv.connect()
        killer = threading.Timer(rnd.uniform(0.2, 0.6), os.kill,
                                 (srv.proc.pid, signal.SIGKILL))
        killer.start()
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                off = rnd.randrange(0, size // 4096) * 4096
                h.pwrite(b"k" * 4096, off)
                acked.append(off)
        except Exception:       # noqa: BLE001 -- the kill ends it
            pass
        killer.join()
        srv.proc.wait(timeout=20)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        srv.log.close()
    assert srv.proc.returncode == -signal.SIGKILL
    assert len(acked) > 20, "too few writes before the kill"
    assert qemu_bitmaps(img) == {"b0": (65536, {"auto"})}
    p = qemu_img("check", img, check=False)
    assert p.returncode in (0, 3), p.stdout
    dirty = qemu_dirty(img, "b0")

    def covered(off):
        return any(o <= off and off + 4096 <= o + n for o, n in dirty)

    missing = [o for o in acked if not covered(o)]
    assert not missing, f"acknowledged writes not in the bitmap: {missing[:5]}"
    assert nbdd_list(img)["b0"][1] is False


def test_stale_extension_dropped(tmp_path):
    """Autoclear bit clear (a program without bitmap support wrote the
    image): nbdd lists nothing and a read-write open drops the extension,
    as QEMU does; only leaks remain."""
    img = create(tmp_path / "a.qcow2", 16 * MiB)
    qemu_img("bitmap", "--add", img, "b0")
    with open(img, "r+b") as f:
        f.seek(88)
        f.write(bytes(8))
    assert nbdd_list(img) == {}
    run([HELPER, "open-rw", str(img)])
    assert qemu_bitmaps(img) == {}
    p = qemu_img("check", img, check=False)
    assert p.returncode in (0, 3), p.stdout


def test_repair_keeps_bitmap_clusters(tmp_path):
    """A dirty image (stale refcounts) is repaired at the read-write
    open; the repair counts the bitmap directory, tables and data, so
    qemu-img check finds neither leaks nor corruption and the bitmap
    keeps its place (in use now)."""
    img = create(tmp_path / "a.qcow2", 16 * MiB)
    qemu_img("bitmap", "--add", img, "b0")
    qemu_io(img, "write -q 1M 64K")
    with open(img, "r+b") as f:
        f.seek(72)
        v = int.from_bytes(f.read(8), "big")
        f.seek(72)
        f.write((v | 1).to_bytes(8, "big"))
    run([HELPER, "open-rw", str(img)])
    check(img)
    assert qemu_bitmaps(img) == {"b0": (65536, {"in-use", "auto"})}
    # Its contents missed that session: clearing IN_USE leaves it alone.
    run([HELPER, "clear-in-use", str(img)])
    assert qemu_bitmaps(img) == {"b0": (65536, {"in-use", "auto"})}
