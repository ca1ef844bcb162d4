"""fio's nbd engine against nbdd: verified random I/O, several jobs."""
import json
import subprocess

import pytest

from conftest import blockdev_args, export_args, have
from helpers import MiB, read_file, run


def _fio_has_nbd():
    if not have("fio"):
        return False
    try:
        p = subprocess.run(["fio", "--enghelp"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "nbd" in p.stdout.split()


if not _fio_has_nbd():
    pytest.skip("fio without the nbd ioengine", allow_module_level=True)

SIZE = 16 * MiB


@pytest.fixture
def export(nbdd_server, raw_image):
    img = raw_image(SIZE)
    srv = nbdd_server(blockdev_args(img) + export_args())
    return srv, img


def fio(tmp_path, uri, *opts):
    """Run one fio job file worth of options; return the jobs' JSON."""
    out = tmp_path / "fio.json"
    run(["fio", "--name=t", "--ioengine=nbd", f"--uri={uri}",
         "--verify_state_save=0", "--runtime=30",
         "--output-format=json", f"--output={out}"] + list(opts),
        timeout=90, cwd=str(tmp_path))
    jobs = json.loads(out.read_text())["jobs"]
    for j in jobs:
        assert j["error"] == 0, j
    return jobs


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_randrw_verify(export, tmp_path, tcp):
    """Random 4k reads and writes, 16 deep, then every written block
    read back and checked (crc32c)."""
    srv, _ = export
    (job,) = fio(tmp_path, srv.uri(tcp=tcp), "--rw=randrw", "--bs=4k",
                 "--iodepth=16", "--size=8M", "--verify=crc32c",
                 "--verify_fatal=1")
    assert job["write"]["io_bytes"] > 0
    # The verify pass reads back everything written.
    assert job["read"]["io_bytes"] >= job["write"]["io_bytes"]


def test_unaligned_verify(export, tmp_path):
    """Verified random 3000-byte writes at unaligned offsets."""
    srv, _ = export
    (job,) = fio(tmp_path, srv.uri(), "--rw=randwrite", "--bs=3000",
                 "--iodepth=8", "--offset=12345", "--size=3000000",
                 "--verify=crc32c", "--verify_fatal=1")
    assert job["write"]["io_bytes"] == 3000000
    assert job["read"]["io_bytes"] == 3000000


def test_data_lands_in_image(export, tmp_path):
    """What fio writes is what the image file holds."""
    srv, img = export
    fio(tmp_path, srv.uri(), "--rw=write", "--bs=64k", "--iodepth=8",
        "--size=8M", "--offset=4M", "--buffer_pattern=0x5a4b3c2d",
        "--end_fsync=1")
    assert read_file(img, 4 * MiB, 8 * MiB) == b"\x5a\x4b\x3c\x2d" * (2 * MiB)
    assert read_file(img, 0, 4 * MiB) == bytes(4 * MiB)


def test_two_jobs_then_new_client(export, tmp_path):
    """Two jobs, one connection each, that hang up without
    NBD_CMD_DISC: the server survives and serves the next client."""
    srv, _ = export
    jobs = fio(tmp_path, srv.uri(tcp=True), "--rw=randrw", "--bs=4k",
               "--iodepth=16", "--numjobs=2", "--size=8M",
               "--offset_increment=8M", "--verify=crc32c",
               "--verify_fatal=1")
    assert len(jobs) == 2
    assert srv.alive()
    h = srv.connect()
    h.pwrite(b"still here", 0)
    assert h.pread(10, 0) == b"still here"
    h.shutdown()
    assert srv.alive()
