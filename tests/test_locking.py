"""nbdd takes QEMU's image locks, byte for byte.

What a user relies on: while nbdd serves an image, qemu-img and qemu-io
cannot write it (and, if nbdd writes it, qemu-img convert cannot copy
it without -U), exactly as if qemu-storage-daemon had it open; and nbdd refuses to
open an image that a QEMU process is writing.  locking=off on the file
node turns this off, as in QEMU.  The locks go when nbdd does.
"""
import subprocess

import pytest

from conftest import NBDD, blockdev_args, export_args
from helpers import MiB

LOCK_WORDS = ("lock", "another process")


@pytest.fixture
def img(raw_image):
    return raw_image(4 * MiB, [(0, b"nbdd" * 1024)])


def qemu(*args):
    return subprocess.run(list(args), capture_output=True, text=True,
                          timeout=60)


def refused_by_lock(p):
    assert p.returncode != 0, p
    assert all(w in p.stderr for w in LOCK_WORDS), p.stderr


def test_writer_locks_out_qemu(nbdd_server, img, tmp_path):
    """A read-write file node: qemu-io cannot write the image, and
    qemu-img convert, which wants a stable source, needs -U (force
    share) to copy it."""
    srv = nbdd_server(blockdev_args(img) + export_args())
    refused_by_lock(qemu("qemu-io", "-f", "raw", "-c", "write 0 4k", img))
    copy = str(tmp_path / "copy.raw")
    p = qemu("qemu-img", "convert", "-f", "raw", "-O", "raw", img, copy)
    refused_by_lock(p)
    assert 'shared "write" lock' in p.stderr, p.stderr
    p = qemu("qemu-img", "convert", "-U", "-f", "raw", "-O", "raw", img,
             copy)
    assert p.returncode == 0, p.stderr
    h = srv.connect()
    assert h.pread(4096, 0) == b"nbdd" * 1024
    h.shutdown()


def test_reader_lets_qemu_read(nbdd_server, img):
    """A read-only file node lets others read (qemu-img convert copies
    it) but not write underneath it."""
    srv = nbdd_server(blockdev_args(img, extra="file.read-only=on") +
                      export_args(writable=False))
    p = qemu("qemu-img", "convert", "-f", "raw", "-O", "raw", img,
             img + ".copy")
    assert p.returncode == 0, p.stderr
    p = qemu("qemu-io", "-f", "raw", "-c", "write 0 4k", img)
    refused_by_lock(p)
    assert '"write" lock' in p.stderr, p.stderr
    assert srv.connect().pread(4, 0) == b"nbdd"


@pytest.fixture
def qemu_nbd_holds(img, tmp_path):
    """qemu-nbd serving the image read-write, as a QEMU user would."""
    sock = tmp_path / "qemu-nbd.sock"
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "--socket", str(sock),
                          "--persistent", img],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(500):
            if sock.exists() or p.poll() is not None:
                break
            subprocess.run(["sleep", "0.01"])
        assert sock.exists(), p.stderr.read() if p.poll() is not None else ""
        yield p
    finally:
        p.kill()
        p.wait()


def run_nbdd(tmp_path, args):
    return subprocess.run([NBDD, "-f", "--listen",
                           f"unix:{tmp_path}/refused.sock"] + args,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("ro", [False, True], ids=["rw", "ro"])
def test_nbdd_refuses_image_qemu_writes(qemu_nbd_holds, img, tmp_path, ro):
    """nbdd does not start on an image a QEMU process writes, and says
    which lock it could not get."""
    extra = "file.read-only=on" if ro else ""
    p = run_nbdd(tmp_path, blockdev_args(img, extra=extra) +
                 export_args(writable=not ro))
    assert p.returncode != 0, p
    assert img in p.stderr and "lock" in p.stderr, p.stderr


def test_locking_off(nbdd_server, qemu_nbd_holds, img):
    """locking=off takes no locks and checks none (as in QEMU): nbdd
    starts next to qemu-nbd, and once qemu-nbd is gone QEMU may write
    the image nbdd still serves."""
    srv = nbdd_server(blockdev_args(img, extra="file.locking=off") +
                      export_args())
    assert srv.connect().pread(4, 0) == b"nbdd"
    qemu_nbd_holds.kill()
    qemu_nbd_holds.wait()
    p = qemu("qemu-io", "-f", "raw", "-c", "write 0 4k", img)
    assert p.returncode == 0, p.stderr


def test_locks_go_with_nbdd(nbdd_server, img):
    """Once nbdd has stopped, QEMU may write the image again."""
    srv = nbdd_server(blockdev_args(img) + export_args())
    refused_by_lock(qemu("qemu-io", "-f", "raw", "-c", "write 0 4k", img))
    srv.stop()
    p = qemu("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", img)
    assert p.returncode == 0, p.stderr


def test_bad_locking_value(tmp_path, img):
    p = run_nbdd(tmp_path, blockdev_args(img, extra="file.locking=maybe") +
                 export_args())
    assert p.returncode != 0
    assert "locking" in p.stderr and "maybe" in p.stderr, p.stderr
