"""nbdd used by QEMU's block layer: qemu-img and qemu-io."""
import json
import shutil

import pytest

from conftest import blockdev_args, export_args, have
from helpers import (KiB, MiB, file_extents, layout, pattern, read_file,
                     run, sha256_file)

pytestmark = pytest.mark.skipif(not (have("qemu-img") and have("qemu-io")),
                                reason="no qemu-img/qemu-io")

SIZE = 16 * MiB
DATA_REGIONS = [(0, 256 * KiB), (3 * MiB, 128 * KiB), (10 * MiB, 4 * KiB)]

TRANSPORTS = pytest.mark.parametrize("tcp", [False, True],
                                     ids=["unix", "tcp"])


@pytest.fixture
def sparse(nbdd_server, raw_image):
    """Writable 'disk0' and read-only 'ro' exports of an image whose
    data is DATA_REGIONS, plus an empty writable 'dst'."""
    img = raw_image(SIZE, [(o, pattern(o, n)) for o, n in DATA_REGIONS],
                    name="src.img")
    dst = raw_image(SIZE, name="dst.img")
    srv = nbdd_server(blockdev_args(img) + blockdev_args(dst, node="d") +
                      export_args() + export_args(name="ro", writable=False) +
                      export_args(node="d", name="dst"))
    return srv, img, dst


def qemu_img(*args, check=True):
    return run(["qemu-img"] + list(args), timeout=60, check=check)


def qemu_io(target, cmds, image_opts=False, read_only=False, check=True):
    argv = ["qemu-io"]
    argv += ["--image-opts"] if image_opts else ["-f", "raw"]
    if read_only:
        argv.append("-r")
    for c in cmds:
        argv += ["-c", c]
    p = run(argv + [target], timeout=60, check=check)
    if check:
        assert "fail" not in p.stdout.lower(), p.stdout
        assert "error" not in p.stdout.lower(), p.stdout
    return p


def image_opts(srv, export, tcp):
    if tcp:
        server = ("server.type=inet,server.host=127.0.0.1,"
                  f"server.port={srv.port}")
    else:
        server = f"server.type=unix,server.path={srv.sock}"
    return f"driver=nbd,{server},export={export}"


@TRANSPORTS
def test_img_info(sparse, tcp):
    srv, _, _ = sparse
    info = json.loads(qemu_img("info", "--output=json",
                               srv.uri("disk0", tcp=tcp)).stdout)
    assert info["virtual-size"] == SIZE
    assert info["format"] == "raw"


@TRANSPORTS
def test_img_map(sparse, tcp):
    """qemu-img map shows the image's data and holes at their exact
    offsets."""
    srv, img, _ = sparse
    want = layout(SIZE, DATA_REGIONS)
    if file_extents(img) != want:
        pytest.skip("the filesystem does not report holes exactly")
    out = qemu_img("map", "--output=json", "-f", "raw",
                   srv.uri("ro", tcp=tcp)).stdout
    got = []
    pos = 0
    for e in json.loads(out):
        assert e["start"] == pos
        pos += e["length"]
        kind = (e["data"], e["zero"])
        assert kind in ((True, False), (False, True)), e
        if got and got[-1][0] == kind:
            got[-1][1] += e["length"]
        else:
            got.append([kind, e["length"]])
    assert pos == SIZE
    assert [(n, 0 if k[0] else 3) for k, n in got] == want, out


def test_img_compare(sparse, tmp_path):
    """qemu-img compare finds the export identical to its image and
    spots a one-byte change made through the export."""
    srv, img, _ = sparse
    copy = str(tmp_path / "copy.img")
    shutil.copyfile(img, copy)
    assert qemu_img("compare", "-f", "raw", "-F", "raw", srv.uri("disk0"),
                    copy).returncode == 0
    qemu_io(srv.uri("disk0", tcp=True), ["write -P 0x01 5000192 1"])
    p = qemu_img("compare", "-f", "raw", "-F", "raw", srv.uri("disk0"),
                 copy, check=False)
    assert p.returncode == 1, p
    assert "offset 5000192" in p.stdout, p.stdout


@TRANSPORTS
def test_convert_to_nbd(sparse, raw_image, tcp):
    """qemu-img convert into an existing export writes every byte."""
    srv, _, dst = sparse
    src = raw_image(SIZE, [(o, pattern(o + 1, n)) for o, n in
                           [(0, 1), (77777, 1 * MiB), (9 * MiB + 5, 4096),
                            (SIZE - 300, 300)]])
    qemu_img("convert", "-n", "-f", "raw", "-O", "raw", src,
             srv.uri("dst", tcp=tcp))
    assert sha256_file(dst) == sha256_file(src)


def test_convert_to_nbd_overwrites(sparse, raw_image):
    """Converting a mostly empty image over a full export zeroes the
    rest, out of order and with many requests in flight."""
    srv, _, dst = sparse
    with open(dst, "r+b") as f:
        f.write(b"\xee" * SIZE)
    src = raw_image(SIZE, [(1 * MiB, b"x" * 4096)])
    qemu_img("convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw",
             src, srv.uri("dst"))
    assert sha256_file(dst) == sha256_file(src)


@TRANSPORTS
def test_convert_from_nbd(sparse, tmp_path, tcp):
    srv, img, _ = sparse
    out = str(tmp_path / "out.img")
    qemu_img("convert", "-W", "-f", "raw", "-O", "raw",
             srv.uri("ro", tcp=tcp), out)
    assert sha256_file(out) == sha256_file(img)


QEMU_IO_CMDS = [
    "write -P 0xab 0 64k",
    "read -P 0xab 0 64k",
    "write -z 64k 64k",
    "read -P 0 64k 64k",
    "discard 128k 64k",
    "flush",
    "aio_write -P 0xcd 256k 64k",
    "aio_write -P 0xce 320k 64k",
    "aio_write -z 384k 64k",
    "aio_flush",
    "read -P 0xcd 256k 64k",
    "read -P 0xce 320k 64k",
    "read -P 0 384k 64k",
    "write -f -P 0x11 512k 4k",
    "write -P 0x22 1000 3000",
    "read -P 0x22 1000 3000",
    "readv -P 0xab 8k 4k 512 4k",
    "writev -P 0x33 600k 512 1k 2560",
    "read -P 0x33 600k 4k",
    "write -z -u 3m 64k",
    "read -P 0 3m 64k",
    "flush",
]


def check_qemu_io_result(img):
    """The image holds what QEMU_IO_CMDS wrote."""
    def is_(off, length, byte):
        assert read_file(img, off, length) == bytes([byte]) * length, \
            f"at {off}"
    is_(0, 1000, 0xab)
    is_(1000, 3000, 0x22)
    is_(4000, 64 * KiB - 4000, 0xab)
    is_(64 * KiB, 64 * KiB, 0)
    is_(256 * KiB, 64 * KiB, 0xcd)
    is_(320 * KiB, 64 * KiB, 0xce)
    is_(384 * KiB, 64 * KiB, 0)
    is_(512 * KiB, 4 * KiB, 0x11)
    is_(600 * KiB, 4 * KiB, 0x33)
    is_(3 * MiB, 64 * KiB, 0)
    # Untouched data stays.
    assert read_file(img, 3 * MiB + 64 * KiB, 64 * KiB) == \
        pattern(3 * MiB, 128 * KiB)[64 * KiB:]


@TRANSPORTS
def test_qemu_io_uri(sparse, tcp):
    srv, img, _ = sparse
    qemu_io(srv.uri("disk0", tcp=tcp), QEMU_IO_CMDS)
    check_qemu_io_result(img)


@TRANSPORTS
def test_qemu_io_image_opts(sparse, tcp):
    srv, img, _ = sparse
    qemu_io(image_opts(srv, "disk0", tcp), QEMU_IO_CMDS, image_opts=True)
    check_qemu_io_result(img)


def test_qemu_io_read_only(sparse):
    """A read-only export reads fine and cannot be written."""
    srv, img, _ = sparse
    qemu_io(srv.uri("ro"), ["read -P 0 1m 64k"], read_only=True)
    p = qemu_io(srv.uri("ro"), ["write -P 0x44 0 4k"], check=False)
    assert p.returncode != 0, p
    assert read_file(img, 0, 4096) == pattern(0, 256 * KiB)[:4096]


def test_qemu_img_bench(sparse):
    """Many writes in flight (qemu-img bench, queue depth 32) land
    where they should."""
    srv, img, _ = sparse
    qemu_img("bench", "-f", "raw", "-w", "-c", "2048", "-d", "32",
             "-s", "4k", "--pattern=0x5a", srv.uri("disk0"))
    qemu_img("bench", "-f", "raw", "-c", "2048", "-d", "32", "-s", "4k",
             srv.uri("disk0"))
    assert read_file(img, 0, 8 * MiB) == b"\x5a" * (8 * MiB)
