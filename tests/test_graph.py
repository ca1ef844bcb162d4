"""Graphs with more than one path to a node: every path goes through
the same request path, so unaligned writes through different parents of
an O_DIRECT file node never lose each other's bytes."""
import os

import nbd
import pytest

from helpers import KiB, MiB


def direct_io_works(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def test_unaligned_writes_through_two_parents(nbdd_server, raw_image):
    """File node f0 (cache.direct=on) is exported itself and through a
    raw node r0 on top of it.  Unaligned writes to neighbouring bytes of
    one 4 KiB block, one through each export, all survive."""
    img = raw_image(1 * MiB, sparse=False)
    if not direct_io_works(img):
        pytest.skip("the test directory's filesystem has no O_DIRECT")
    srv = nbdd_server([
        "--blockdev", f"driver=file,node-name=f0,filename={img},cache.direct=on",
        "--blockdev", "driver=raw,node-name=r0,file=f0",
        "--export", "type=nbd,id=ef,node-name=f0,name=f0,writable=on",
        "--export", "type=nbd,id=er,node-name=r0,name=r0,writable=on",
    ])
    ha = srv.connect(export="r0")
    hb = srv.connect(export="f0")
    for rnd in range(100):
        a = bytes([rnd % 250 + 1]) * 100
        b = bytes([rnd % 250 + 2]) * 3996
        # Both in flight at once, on two connections.
        ca = ha.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(a)), 0)
        cb = hb.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b)), 100)
        while not (ha.aio_command_completed(ca) and
                   hb.aio_command_completed(cb)):
            if not ha.aio_command_completed(ca):
                ha.poll(-1)
            if not hb.aio_command_completed(cb):
                hb.poll(-1)
        got = ha.pread(4 * KiB, 0)
        assert got[:100] == a, f"round {rnd}: bytes 0-99 lost"
        assert got[100:] == b, f"round {rnd}: bytes 100-4095 lost"
