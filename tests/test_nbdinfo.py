"""nbdd seen through nbdinfo: listing, JSON details, maps and --can."""
import json

import pytest

from conftest import blockdev_args, export_args, have
from helpers import (DATA, HOLE_ZERO, KiB, MiB, file_extents, layout,
                     pattern, run)

pytestmark = pytest.mark.skipif(not have("nbdinfo"), reason="no nbdinfo")

SIZE = 16 * MiB
DATA_REGIONS = [(0, 64 * KiB), (2 * MiB, 192 * KiB), (9 * MiB, 4 * KiB),
                (SIZE - 128 * KiB, 128 * KiB)]


def uri(srv, export, tcp):
    return srv.uri(export, tcp=tcp)


def nbdinfo(*args, check=True):
    return run(["nbdinfo"] + list(args), timeout=30, check=check)


@pytest.fixture
def sparse(nbdd_server, raw_image):
    """A writable export 'disk0' over a 16 MiB image with DATA_REGIONS
    as its only data, and a read-only export 'ro' of the same image."""
    img = raw_image(SIZE, [(o, pattern(o, n)) for o, n in DATA_REGIONS])
    want = layout(SIZE, DATA_REGIONS)
    if file_extents(img) != want:
        pytest.skip("the filesystem does not report holes exactly")
    srv = nbdd_server(blockdev_args(img) + export_args() +
                      export_args(name="ro", writable=False))
    return srv, want


@pytest.fixture
def three(nbdd_server, raw_image):
    """Three exports with different sizes, modes and descriptions."""
    args = []
    for i, size in enumerate((1 * MiB, 2 * MiB, 3 * MiB)):
        args += blockdev_args(raw_image(size), node=f"n{i}")
    args += export_args(node="n0", name="disk0",
                        description="first,, data disk")
    args += export_args(node="n1", name="backup", writable=False,
                        description="second")
    args += export_args(node="n2", name="scratch")
    return nbdd_server(args)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_list_text(three, tcp):
    """--list shows every export with its description."""
    base = (f"nbd://127.0.0.1:{three.port}" if tcp
            else f"nbd+unix:///?socket={three.sock}")
    out = nbdinfo("--list", base).stdout
    for name in ("disk0", "backup", "scratch"):
        assert f'export="{name}":' in out, out
    assert "description: first, data disk" in out, out
    assert "description: second" in out, out


def test_list_json(three):
    """--list --json: names, descriptions, sizes and read-only state
    of each export."""
    out = nbdinfo("--list", "--json", f"nbd+unix:///?socket={three.sock}")
    doc = json.loads(out.stdout)
    assert doc["protocol"] == "newstyle-fixed"
    assert doc["structured"] is True
    exports = {e["export-name"]: e for e in doc["exports"]}
    assert sorted(exports) == ["backup", "disk0", "scratch"]
    assert exports["disk0"]["description"] == "first, data disk"
    assert exports["backup"]["description"] == "second"
    assert "description" not in exports["scratch"]
    assert exports["disk0"]["export-size"] == 1 * MiB
    assert exports["backup"]["export-size"] == 2 * MiB
    assert exports["scratch"]["export-size"] == 3 * MiB
    assert exports["disk0"]["is_read_only"] is False
    assert exports["backup"]["is_read_only"] is True
    assert exports["scratch"]["is_read_only"] is False


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_json(sparse, tcp):
    """--json on one export: size, flags, block sizes, contexts."""
    srv, _ = sparse
    doc = json.loads(nbdinfo("--json", uri(srv, "disk0", tcp)).stdout)
    assert doc["protocol"] == "newstyle-fixed"
    assert doc["TLS"] is False
    assert doc["structured"] is True
    (e,) = doc["exports"]
    assert e["export-name"] == "disk0"
    assert e["export-size"] == SIZE
    assert "base:allocation" in e["contexts"]
    assert e["is_read_only"] is False
    assert e["is_rotational"] is False
    for flag in ("can_cache", "can_df", "can_fast_zero", "can_flush",
                 "can_fua", "can_multi_conn", "can_trim", "can_zero"):
        assert e[flag] is True, flag
    assert e["block_size_minimum"] == 1
    assert e["block_size_preferred"] == 4096
    assert e["block_size_maximum"] == 32 * MiB


def test_json_read_only(sparse):
    srv, _ = sparse
    (e,) = json.loads(nbdinfo("--json", srv.uri("ro")).stdout)["exports"]
    assert e["is_read_only"] is True
    assert e["can_trim"] is False
    assert e["can_zero"] is False
    assert e["can_fast_zero"] is False
    for flag in ("can_cache", "can_df", "can_flush", "can_fua",
                 "can_multi_conn"):
        assert e[flag] is True, flag


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_map(sparse, tcp):
    """--map lists exactly the image's data and holes."""
    srv, want = sparse
    out = nbdinfo("--map", uri(srv, "disk0", tcp)).stdout
    got = []
    pos = 0
    for line in out.splitlines():
        off, length, flags, desc = line.split(None, 3)
        assert int(off) == pos, out
        pos += int(length)
        got.append((int(length), int(flags)))
        assert desc == {DATA: "data", HOLE_ZERO: "hole,zero"}[int(flags)], out
    assert got == want, out


def test_map_json(sparse):
    srv, want = sparse
    doc = json.loads(nbdinfo("--map", "--json", srv.uri("ro")).stdout)
    assert [(e["length"], e["type"]) for e in doc] == want
    assert doc[0]["offset"] == 0


def test_map_totals(sparse):
    """--map --totals adds up data and holes exactly."""
    srv, _ = sparse
    out = nbdinfo("--map", "--totals", srv.uri("disk0")).stdout
    totals = {}
    for line in out.splitlines():
        size, pct, flags, desc = line.split(None, 3)
        totals[int(flags)] = int(size)
    data = sum(n for _, n in DATA_REGIONS)
    assert totals == {DATA: data, HOLE_ZERO: SIZE - data}, out


CAN = ["write", "trim", "zero", "fast-zero", "flush", "fua", "multi-conn",
       "cache", "df", "read", "connect", "structured-reply"]
READ_ONLY_CANNOT = {"write", "trim", "zero", "fast-zero"}


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_can(sparse, tcp):
    """nbdinfo --can exits 0 for what the export supports, 2 for what
    it does not; --is read-only likewise."""
    srv, _ = sparse
    rw = uri(srv, "disk0", tcp)
    ro = uri(srv, "ro", tcp)
    for what in CAN:
        assert nbdinfo("--can", what, rw, check=False).returncode == 0, what
        want = 2 if what in READ_ONLY_CANNOT else 0
        got = nbdinfo("--can", what, ro, check=False).returncode
        assert got == want, f"--can {what} on a read-only export: {got}"
    assert nbdinfo("--is", "read-only", rw, check=False).returncode == 2
    assert nbdinfo("--is", "read-only", ro, check=False).returncode == 0
    assert nbdinfo("--is", "rotational", rw, check=False).returncode == 2


def test_unknown_export(sparse):
    """Asking for a missing export is an error, not a hang."""
    srv, _ = sparse
    p = nbdinfo(srv.uri("nosuch"), check=False)
    assert p.returncode == 1, p
