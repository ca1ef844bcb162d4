"""nbdctl bitmap, and export add --bitmap.

Like test_nbdctl.py, these start the real daemon with a state dir and
drive it with nbdctl; the bitmaps' effect is checked with libnbd
writes, nbdinfo --map and qemu-img info."""
import json
import os
import re
import time

import pytest

from conftest import make_image
from helpers import run
from test_nbdctl import MiB, admin, ctl, raw_spec, table  # noqa: F401

KiB = 1 << 10
CONTEXT = "qemu:dirty-bitmap:"


def bitmaps(sock, *node):
    """nbdctl --json bitmap list [NODE], by (node, name)."""
    out = ctl(sock, "--json", "bitmap", "list", *node).stdout
    return {(b["node"], b["name"]): b for b in json.loads(out)}


def raw_node(srv, tmp_path, name, size=4 * MiB):
    img = make_image(tmp_path / f"{name}.img", size)
    ctl(srv.admin, "node", "add", raw_spec(img, name))
    return img


def write(srv, export, data, offset):
    h = srv.connect(export)
    h.pwrite(data, offset)
    h.shutdown()


def test_bitmap_add_list_remove(admin, tmp_path):
    raw_node(admin, tmp_path, "d0")
    raw_node(admin, tmp_path, "d1")
    assert ctl(admin.admin, "bitmap", "add", "d0", "b0").stdout == ""
    ctl(admin.admin, "bitmap", "add", "d0", "b1", "--granularity", "4K",
        "--disabled")
    ctl(admin.admin, "bitmap", "add", "d1", "c0")
    rows = table(ctl(admin.admin, "bitmap", "list").stdout)
    assert rows == [
        {"NODE": "d0", "NAME": "b0", "GRANULARITY": "64K", "COUNT": "0",
         "RECORDING": "yes", "BUSY": "no", "FROZEN": "no",
         "PERSISTENT": "no", "INCONSISTENT": "no"},
        {"NODE": "d0", "NAME": "b1", "GRANULARITY": "4K", "COUNT": "0",
         "RECORDING": "no", "BUSY": "no", "FROZEN": "no",
         "PERSISTENT": "no", "INCONSISTENT": "no"},
        {"NODE": "d1", "NAME": "c0", "GRANULARITY": "64K", "COUNT": "0",
         "RECORDING": "yes", "BUSY": "no", "FROZEN": "no",
         "PERSISTENT": "no", "INCONSISTENT": "no"},
    ]
    # One node's only.
    assert [r["NAME"] for r in
            table(ctl(admin.admin, "bitmap", "list", "d1").stdout)] == ["c0"]
    assert bitmaps(admin.admin, "d1") == {("d1", "c0"): {
        "node": "d1", "name": "c0", "count": 0, "granularity": 65536,
        "recording": True, "busy": False, "frozen": False,
        "persistent": False, "inconsistent": False}}
    p = ctl(admin.admin, "bitmap", "list", "nope", expect=1)
    assert p.stderr == ("nbdctl: bitmap list: no node named 'nope' (see "
                        "nbdctl node list)\n")

    ctl(admin.admin, "bitmap", "remove", "d0", "b0")
    assert set(bitmaps(admin.admin)) == {("d0", "b1"), ("d1", "c0")}
    p = ctl(admin.admin, "bitmap", "remove", "d0", "b0", expect=1)
    assert p.stderr == "nbdctl: node 'd0' has no bitmap 'b0'\n"
    p = ctl(admin.admin, "bitmap", "add", "d0", "b1", expect=1)
    assert p.stderr == "nbdctl: node 'd0' already has a bitmap 'b1'\n"
    p = ctl(admin.admin, "bitmap", "add", "nope", "b", expect=1)
    assert p.stderr.startswith("nbdctl: ") and "nope" in p.stderr
    # No bitmaps: just the header.
    ctl(admin.admin, "bitmap", "remove", "d0", "b1")
    assert ctl(admin.admin, "bitmap", "list", "d0").stdout.splitlines() \
        == ["NODE  NAME  GRANULARITY  COUNT  RECORDING  BUSY  FROZEN  "
            "PERSISTENT  INCONSISTENT"]
    assert bitmaps(admin.admin, "d0") == {}


def test_bitmap_granularity(admin, tmp_path):
    raw_node(admin, tmp_path, "d0")
    ctl(admin.admin, "bitmap", "add", "d0", "g64", "--granularity", "64K")
    ctl(admin.admin, "bitmap", "add", "d0", "g512", "--granularity", "512")
    ctl(admin.admin, "bitmap", "add", "d0", "g1m", "--granularity", "1M")
    got = bitmaps(admin.admin)
    assert got[("d0", "g64")]["granularity"] == 65536
    assert got[("d0", "g512")]["granularity"] == 512
    assert got[("d0", "g1m")]["granularity"] == MiB
    # The daemon checks the range and says why.
    for bad in ("1000", "256", "4G"):
        p = ctl(admin.admin, "bitmap", "add", "d0", "bad",
                "--granularity", bad, expect=1)
        assert p.stderr.startswith("nbdctl: granularity must be a power "
                                   "of 2 from 512 bytes to 2 GiB"), p.stderr
    p = ctl(admin.admin, "bitmap", "add", "d0", "bad", "--granularity",
            "1000", expect=1)
    assert p.stderr == ("nbdctl: granularity must be a power of 2 from 512 "
                        "bytes to 2 GiB, not 1000\n")
    assert ("d0", "bad") not in bitmaps(admin.admin)
    # Not a size at all: nbdctl's own usage error.
    p = ctl(admin.admin, "bitmap", "add", "d0", "bad", "--granularity",
            "lots", expect=2)
    assert p.stderr.startswith("nbdctl bitmap add: --granularity: expected "
                               "a size")


def test_bitmap_persistent_in_qcow2(admin, tmp_path):
    img = str(tmp_path / "p.qcow2")
    ctl(admin.admin, "image", "create", "--size", "8M", img)
    ctl(admin.admin, "node", "add",
        f"driver=qcow2,node-name=q0,file.driver=file,file.filename={img}")
    ctl(admin.admin, "bitmap", "add", "q0", "pb", "--persistent",
        "--granularity", "128K")
    ctl(admin.admin, "bitmap", "add", "q0", "tb")
    rows = {r["NAME"]: r for r in
            table(ctl(admin.admin, "bitmap", "list", "q0").stdout)}
    assert rows["pb"]["PERSISTENT"] == "yes"
    assert rows["pb"]["GRANULARITY"] == "128K"
    assert rows["tb"]["PERSISTENT"] == "no"
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json",
                           img]).stdout)
    stored = {b["name"]: b for b in
              info["format-specific"]["data"].get("bitmaps", [])}
    assert set(stored) == {"pb"}
    assert stored["pb"]["granularity"] == 128 * KiB

    ctl(admin.admin, "bitmap", "remove", "q0", "pb")
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json",
                           img]).stdout)
    assert info["format-specific"]["data"].get("bitmaps", []) == []

    # A raw node keeps one in a sidecar in the state dir.
    raw_node(admin, tmp_path, "d0")
    ctl(admin.admin, "bitmap", "add", "d0", "pb", "--persistent")
    rows = {r["NAME"]: r for r in
            table(ctl(admin.admin, "bitmap", "list", "d0").stdout)}
    assert rows["pb"]["PERSISTENT"] == "yes"
    assert os.path.exists(os.path.join(os.path.dirname(admin.admin),
                                       "bitmaps", "d0.bitmaps"))
    # A read-only node cannot.
    ro = make_image(tmp_path / "ro.img", MiB)
    ctl(admin.admin, "node", "add",
        f"driver=raw,node-name=ro,read-only=on,file.driver=file,"
        f"file.filename={ro}")
    p = ctl(admin.admin, "bitmap", "add", "ro", "pb", "--persistent",
            expect=1)
    assert p.stderr.startswith("nbdctl: node 'ro' (driver raw, read-only) "
                               "cannot store bitmaps")


def test_bitmap_disable_enable_clear(admin, tmp_path):
    raw_node(admin, tmp_path, "d0")
    ctl(admin.admin, "export", "add", "d0", "--writable")
    ctl(admin.admin, "bitmap", "add", "d0", "b0", "--disabled")

    def row():
        return table(ctl(admin.admin, "bitmap", "list", "d0").stdout)[0]

    assert (row()["RECORDING"], row()["COUNT"]) == ("no", "0")
    write(admin, "d0", b"a" * 4096, 0)
    assert row()["COUNT"] == "0"

    ctl(admin.admin, "bitmap", "enable", "d0", "b0")
    assert row()["RECORDING"] == "yes"
    write(admin, "d0", b"b" * 4096, MiB)
    write(admin, "d0", b"c", 2 * MiB + 65535)
    assert row()["COUNT"] == "128K"
    write(admin, "d0", b"cd", 2 * MiB + 65535)    # and the next granule
    assert row()["COUNT"] == "192K"

    ctl(admin.admin, "bitmap", "disable", "d0", "b0")
    assert row()["RECORDING"] == "no"
    write(admin, "d0", b"d" * 4096, 3 * MiB)
    assert bitmaps(admin.admin)[("d0", "b0")]["count"] == 192 * KiB

    ctl(admin.admin, "bitmap", "clear", "d0", "b0")
    assert (row()["RECORDING"], row()["COUNT"]) == ("no", "0")
    p = ctl(admin.admin, "bitmap", "enable", "d0", "nope", expect=1)
    assert p.stderr == "nbdctl: node 'd0' has no bitmap 'nope'\n"


def test_bitmap_merge_across_nodes(admin, tmp_path):
    raw_node(admin, tmp_path, "d0")
    raw_node(admin, tmp_path, "d1")
    ctl(admin.admin, "export", "add", "d0", "--writable")
    ctl(admin.admin, "export", "add", "d1", "--writable")
    ctl(admin.admin, "bitmap", "add", "d0", "target", "--disabled")
    ctl(admin.admin, "bitmap", "add", "d0", "same")
    ctl(admin.admin, "bitmap", "add", "d1", "other", "--granularity", "4K")
    ctl(admin.admin, "bitmap", "add", "d1", "other2", "--granularity", "4K")
    write(admin, "d0", b"x" * 100, 0)                 # same: [0, 64K)
    write(admin, "d1", b"y" * 4096, MiB + 8192)       # other: one 4K
    write(admin, "d1", b"z" * 4096, 3 * MiB)          # both others

    # A name on NODE, then OTHERNODE:NAME: the target (64K granules)
    # gains every granule that overlaps a dirty range of a source.
    ctl(admin.admin, "bitmap", "merge", "d0", "target", "same",
        "d1:other")
    got = bitmaps(admin.admin)
    assert got[("d0", "target")]["count"] == 3 * 64 * KiB
    assert got[("d0", "same")]["count"] == 64 * KiB
    assert got[("d1", "other")]["count"] == 8 * KiB
    row = [r for r in table(ctl(admin.admin, "bitmap", "list").stdout)
           if r["NAME"] == "target"][0]
    assert row["COUNT"] == "192K" and row["RECORDING"] == "no"

    # Into a bitmap of another node from this one's, by node:name too.
    ctl(admin.admin, "bitmap", "merge", "d1", "other2", "d0:same",
        "d1:other")
    # other2 recorded the writes to d1 itself, as other did.
    assert bitmaps(admin.admin, "d1")[("d1", "other2")]["count"] == \
        64 * KiB + 8 * KiB
    p = ctl(admin.admin, "bitmap", "merge", "d0", "target", "d1:nope",
            expect=1)
    assert p.stderr == "nbdctl: node 'd1' has no bitmap 'nope'\n"
    p = ctl(admin.admin, "bitmap", "merge", "d0", "target", "nope",
            expect=1)
    assert p.stderr.startswith("nbdctl: ") and "nope" in p.stderr


def test_export_bitmap_shows_writes_and_is_busy(admin, tmp_path):
    raw_node(admin, tmp_path, "d0")
    ctl(admin.admin, "bitmap", "add", "d0", "inc0")
    ctl(admin.admin, "export", "add", "d0", "--writable", "--name", "w")
    ctl(admin.admin, "export", "add", "d0", "--name", "backup",
        "--bitmap", "inc0")
    # The same bitmap named NODE:NAME.
    ctl(admin.admin, "export", "add", "d0", "--name", "backup2",
        "--bitmap", "d0:inc0")

    # Writes through the other export of the same node are recorded.
    h = admin.connect("w")
    h.pwrite(b"x" * 4096, MiB + 65536 - 100)    # two granules
    h.pwrite(b"y", 3 * MiB)
    h.shutdown()
    want = [(MiB, 2 * 65536), (3 * MiB, 65536)]
    for export in ("backup", "backup2"):
        out = run(["nbdinfo", "--json", "--map=" + CONTEXT + "inc0",
                   admin.uri(export)]).stdout
        runs = [(e["offset"], e["length"]) for e in json.loads(out)
                if e["type"] & 1]
        assert runs == want, (export, out)

    # Exported, it is busy: it still records, but cannot be changed.
    row = table(ctl(admin.admin, "bitmap", "list").stdout)[0]
    assert (row["BUSY"], row["COUNT"]) == ("yes", "192K")
    for cmd, verb in (("clear", "changed"), ("disable", "changed"),
                      ("remove", "removed")):
        p = ctl(admin.admin, "bitmap", cmd, "d0", "inc0", expect=1)
        assert p.stderr == ("nbdctl: bitmap 'inc0' is in use by 2 exports "
                            f"and cannot be {verb}\n"), (cmd, p.stderr)
    ctl(admin.admin, "export", "remove", "backup")
    ctl(admin.admin, "export", "remove", "backup2")
    row = table(ctl(admin.admin, "bitmap", "list").stdout)[0]
    assert row["BUSY"] == "no"
    ctl(admin.admin, "bitmap", "clear", "d0", "inc0")
    assert bitmaps(admin.admin)[("d0", "inc0")]["count"] == 0

    p = ctl(admin.admin, "export", "add", "d0", "--name", "b3",
            "--bitmap", "nope", expect=1)
    assert p.stderr.startswith("nbdctl: ") and "nope" in p.stderr


def dirty_runs(srv, export, name):
    """The dirty ranges nbdinfo --map shows for bitmap @name."""
    out = run(["nbdinfo", "--json", "--map=" + CONTEXT + name,
               srv.uri(export)]).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out)
            if e["type"] & 1]


def test_bitmap_fork_then_unfork_failure(admin, tmp_path):
    raw_node(admin, tmp_path, "d0")
    ctl(admin.admin, "export", "add", "d0", "--writable", "--name", "w")
    ctl(admin.admin, "bitmap", "add", "d0", "inc0")
    write(admin, "w", b"a" * 4096, 0)

    assert ctl(admin.admin, "bitmap", "fork", "d0", "inc0", "--session",
               "bk1").stdout == ""
    row = table(ctl(admin.admin, "bitmap", "list").stdout)[0]
    assert (row["FROZEN"], row["BUSY"], row["COUNT"]) == ("yes", "yes", "64K")
    b = bitmaps(admin.admin)[("d0", "inc0")]
    assert (b["frozen"], b["busy"]) == (True, True)
    # Frozen, it cannot be changed.
    p = ctl(admin.admin, "bitmap", "clear", "d0", "inc0", expect=1)
    assert p.stderr == ("nbdctl: bitmap 'inc0' is forked: end the fork "
                        "first (block-dirty-bitmap-unfork)\n")
    p = ctl(admin.admin, "bitmap", "fork", "d0", "inc0", expect=1)
    assert p.stderr.startswith("nbdctl: bitmap 'inc0' is forked")

    # A write after the fork goes to the successor, not the frozen bits
    # a backup exports.
    ctl(admin.admin, "export", "add", "d0", "--name", "backup", "--bitmap",
        "inc0")
    write(admin, "w", b"b" * 4096, 2 * MiB)
    assert dirty_runs(admin, "backup", "inc0") == [(0, 64 * KiB)]
    assert table(ctl(admin.admin, "bitmap", "list").stdout)[0]["COUNT"] \
        == "64K"
    p = ctl(admin.admin, "bitmap", "unfork", "d0", "inc0", "--failure",
            expect=1)
    assert p.stderr == ("nbdctl: bitmap 'inc0' is exported: delete the "
                        "export before ending the fork\n")
    ctl(admin.admin, "export", "remove", "backup")

    # A failed backup loses nothing: the successor's write is back.
    assert ctl(admin.admin, "bitmap", "unfork", "d0", "inc0",
               "--failure").stdout == ""
    row = table(ctl(admin.admin, "bitmap", "list").stdout)[0]
    assert (row["FROZEN"], row["BUSY"], row["COUNT"]) == ("no", "no", "128K")
    ctl(admin.admin, "export", "add", "d0", "--name", "backup", "--bitmap",
        "inc0")
    assert dirty_runs(admin, "backup", "inc0") == [(0, 64 * KiB),
                                                   (2 * MiB, 64 * KiB)]


def test_bitmap_fork_then_unfork_success(admin, tmp_path):
    raw_node(admin, tmp_path, "d0")
    ctl(admin.admin, "export", "add", "d0", "--writable", "--name", "w")
    ctl(admin.admin, "bitmap", "add", "d0", "inc0")
    write(admin, "w", b"a" * 4096, 0)
    write(admin, "w", b"a" * 4096, MiB)
    ctl(admin.admin, "bitmap", "fork", "d0", "inc0")
    write(admin, "w", b"b" * 4096, 3 * MiB)
    assert bitmaps(admin.admin)[("d0", "inc0")]["count"] == 128 * KiB

    # The backup took the frozen bits: only the later write is left.
    ctl(admin.admin, "bitmap", "unfork", "d0", "inc0", "--success")
    row = table(ctl(admin.admin, "bitmap", "list").stdout)[0]
    assert (row["FROZEN"], row["BUSY"], row["COUNT"]) == ("no", "no", "64K")
    ctl(admin.admin, "export", "add", "d0", "--name", "backup", "--bitmap",
        "inc0")
    assert dirty_runs(admin, "backup", "inc0") == [(3 * MiB, 64 * KiB)]


def test_bitmap_unfork_refused(admin, tmp_path):
    raw_node(admin, tmp_path, "d0")
    ctl(admin.admin, "bitmap", "add", "d0", "b0")
    p = ctl(admin.admin, "bitmap", "unfork", "d0", "b0", "--success",
            expect=1)
    assert p.stderr == "nbdctl: bitmap 'b0' is not forked\n"
    p = ctl(admin.admin, "bitmap", "unfork", "d0", "nope", "--failure",
            expect=1)
    assert p.stderr == "nbdctl: node 'd0' has no bitmap 'nope'\n"
    p = ctl(admin.admin, "bitmap", "fork", "d0", "nope", expect=1)
    assert p.stderr == "nbdctl: node 'd0' has no bitmap 'nope'\n"
    # An exported bitmap cannot be forked.
    ctl(admin.admin, "export", "add", "d0", "--bitmap", "b0")
    p = ctl(admin.admin, "bitmap", "fork", "d0", "b0", expect=1)
    assert p.stderr == ("nbdctl: bitmap 'b0' is in use by 1 export and "
                        "cannot be changed\n")


ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def test_bitmap_lineage(admin, tmp_path):
    start = int(time.time())
    raw_node(admin, tmp_path, "d0")
    raw_node(admin, tmp_path, "d1")
    for args in (["add", "d0", "b0"], ["add", "d1", "c0"],
                 ["fork", "d0", "b0", "--session", "bk1"],
                 ["unfork", "d0", "b0", "--failure"],
                 ["fork", "d0", "b0", "--session", "bk2"],
                 ["unfork", "d0", "b0", "--success"],
                 ["clear", "d0", "b0"], ["merge", "d0", "b0", "d1:c0"],
                 ["fork", "d0", "b0"], ["unfork", "d0", "b0", "--success"],
                 ["remove", "d1", "c0"]):
        ctl(admin.admin, "bitmap", *args)
    end = int(time.time())

    out = ctl(admin.admin, "bitmap", "lineage").stdout
    assert out.splitlines()[0].split() == ["ID", "TIME", "NODE", "NAME",
                                           "EVENT", "PARENT", "SESSION"]
    rows = table(out)
    assert [(r["NODE"], r["NAME"], r["EVENT"], r["PARENT"], r["SESSION"])
            for r in rows] == [
        ("d0", "b0", "add", "-", "-"),
        ("d1", "c0", "add", "-", "-"),
        ("d0", "b0", "fork", "-", "bk1"),
        ("d0", "b0", "unfork-failure", "-", "-"),
        ("d0", "b0", "fork", "-", "bk2"),
        ("d0", "b0", "unfork-success", "-", "-"),
        ("d0", "b0", "clear", "-", "-"),
        ("d0", "b0", "merge", "d1:c0", "-"),
        ("d0", "b0", "fork", "-", "-"),
        ("d0", "b0", "unfork-success", "-", "-"),
        ("d1", "c0", "remove", "-", "-"),
    ]
    ids = [int(r["ID"]) for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    # --json prints the return value; TIME is its epoch seconds in UTC.
    v = json.loads(ctl(admin.admin, "--json", "bitmap", "lineage").stdout)
    assert [e["id"] for e in v] == ids
    assert v[2] == {"id": ids[2], "node": "d0", "name": "b0",
                    "event": "fork", "parent": None, "session": "bk1",
                    "time": v[2]["time"]}
    for e, r in zip(v, rows):
        assert start <= e["time"] <= end
        assert ISO_UTC.match(r["TIME"]), r["TIME"]
        assert r["TIME"] == time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                          time.gmtime(e["time"]))

    # One node's, one bitmap's.
    assert [r["EVENT"] for r in
            table(ctl(admin.admin, "bitmap", "lineage", "d1").stdout)] \
        == ["add", "remove"]
    v = json.loads(ctl(admin.admin, "bitmap", "lineage", "d0", "b0",
                       "--json").stdout)
    assert [e["event"] for e in v] == [
        "add", "fork", "unfork-failure", "fork", "unfork-success", "clear",
        "merge", "fork", "unfork-success"]
    assert json.loads(ctl(admin.admin, "--json", "bitmap", "lineage", "d0",
                          "nope").stdout) == []
    assert table(ctl(admin.admin, "bitmap", "lineage", "nope").stdout) == []


def test_bitmap_lineage_is_escaped_in_tables(admin, tmp_path):
    raw_node(admin, tmp_path, "d0")
    ctl(admin.admin, "bitmap", "add", "d0", "b\x1b[2J")
    ctl(admin.admin, "bitmap", "fork", "d0", "b\x1b[2J", "--session",
        "s\x1b]0;x\x07\n")
    out = ctl(admin.admin, "bitmap", "lineage").stdout
    assert "\x1b" not in out and "\x07" not in out
    rows = table(out)
    assert [(r["NAME"], r["EVENT"], r["SESSION"]) for r in rows] == [
        ("b\\x1b[2J", "add", "-"),
        ("b\\x1b[2J", "fork", "s\\x1b]0;x\\x07\\n")]
    v = json.loads(ctl(admin.admin, "--json", "bitmap", "lineage").stdout)
    assert v[1]["session"] == "s\x1b]0;x\x07\n"


def test_bitmap_json_output(admin, tmp_path):
    raw_node(admin, tmp_path, "d0")
    for args in (["add", "d0", "a", "--granularity", "64K"],
                 ["add", "d0", "b"], ["disable", "d0", "a"],
                 ["enable", "d0", "a"], ["clear", "d0", "a"],
                 ["merge", "d0", "a", "b", "d0:b"], ["remove", "d0", "b"],
                 ["fork", "d0", "a"], ["unfork", "d0", "a", "--failure"],
                 ["fork", "d0", "a", "--session", "s"],
                 ["unfork", "d0", "a", "--success"]):
        p = ctl(admin.admin, "--json", "bitmap", *args)
        assert json.loads(p.stdout) == {}, args
    # --json after the subcommand, as for every command.
    v = json.loads(ctl(admin.admin, "bitmap", "list", "--json").stdout)
    assert v == [{"node": "d0", "name": "a", "count": 0,
                  "granularity": 65536, "recording": True, "busy": False,
                  "frozen": False, "persistent": False,
                  "inconsistent": False}]
    assert json.loads(ctl(admin.admin, "--json", "bitmap", "list",
                          "d0").stdout) == v
    ctl(admin.admin, "export", "add", "d0", "--bitmap", "a")
    assert json.loads(ctl(admin.admin, "--json", "export", "remove",
                          "d0").stdout) == {}


def test_bitmap_names_are_escaped_in_tables(admin, tmp_path):
    raw_node(admin, tmp_path, "d0")
    ctl(admin.admin, "bitmap", "add", "d0", "b\x1b[2J\tx")
    out = ctl(admin.admin, "bitmap", "list").stdout
    assert "\x1b" not in out
    assert table(out)[0]["NAME"] == "b\\x1b[2J\\tx"
    # JSON keeps the name as it is.
    assert ("d0", "b\x1b[2J\tx") in bitmaps(admin.admin)


@pytest.mark.parametrize("args", [
    ["bitmap"],
    ["bitmap", "frob"],
    ["bitmap", "fork"],
    ["bitmap", "fork", "d0"],
    ["bitmap", "fork", "d0", "a", "b"],
    ["bitmap", "fork", "d0", "a", "--session"],
    ["bitmap", "fork", "d0", "a", "--success"],
    ["bitmap", "unfork", "d0", "a"],
    ["bitmap", "unfork", "d0", "a", "--success", "--failure"],
    ["bitmap", "unfork", "d0", "a", "--failure", "--success"],
    ["bitmap", "unfork", "d0", "--success"],
    ["bitmap", "unfork", "d0", "a", "b", "--failure"],
    ["bitmap", "unfork", "d0", "a", "--outcome", "success"],
    ["bitmap", "lineage", "d0", "a", "b"],
    ["bitmap", "lineage", "--session", "x"],
    ["bitmap", "add"],
    ["bitmap", "add", "d0"],
    ["bitmap", "add", "d0", "b", "c"],
    ["bitmap", "add", "d0", "b", "--granularity", "lots"],
    ["bitmap", "add", "d0", "b", "--granularity"],
    ["bitmap", "add", "d0", "b", "--no-such-option"],
    ["bitmap", "remove", "d0"],
    ["bitmap", "clear"],
    ["bitmap", "enable", "d0", "b", "c"],
    ["bitmap", "disable", "d0"],
    ["bitmap", "merge", "d0", "t"],
    ["bitmap", "merge", "d0", "t", ""],
    ["bitmap", "merge", "d0", "t", "1x:y"],
    ["bitmap", "merge", "d0", "t", ":y"],
    ["bitmap", "merge", "d0", "t", "d1:"],
    ["bitmap", "list", "a", "b"],
    ["export", "add", "d0", "--bitmap", ""],
    ["export", "add", "d0", "--bitmap", "no de:b"],
    ["export", "add", "d0", "--bitmap"],
])
def test_bitmap_exit_2_for_bad_usage(tmp_path, args):
    """Usage errors exit 2 before anything is sent: with no daemon at
    the socket, reaching it would have been exit 3."""
    sock = str(tmp_path / "none.sock")
    p = ctl(sock, *args, expect=2)
    assert p.stderr, "no message"
    assert p.stdout == ""


def test_bitmap_usage_messages():
    p = ctl(None, "bitmap", "merge", "d0", "t", expect=2)
    assert p.stderr == ("nbdctl bitmap merge: expected NODE TARGET "
                        "SOURCE...\nUsage: nbdctl bitmap merge NODE TARGET "
                        "SOURCE...\n")
    p = ctl(None, "bitmap", "merge", "d0", "t", "1x:y", expect=2)
    assert p.stderr.startswith("nbdctl bitmap merge: SOURCE: '1x:y': "
                               "expected NAME or NODE:NAME, and '1x' is not "
                               "a valid node name\n")
    p = ctl(None, "export", "add", "d0", "--bitmap", "d1:", expect=2)
    assert p.stderr.startswith("nbdctl export add: --bitmap: 'd1:': "
                               "expected a bitmap name after the colon\n")
    p = ctl(None, "bitmap", "add", "d0", expect=2)
    assert p.stderr.startswith("nbdctl bitmap add: expected NODE NAME\n")
    usage = "Usage: nbdctl bitmap unfork NODE NAME --success|--failure\n"
    p = ctl(None, "bitmap", "unfork", "d0", "b", expect=2)
    assert p.stderr == ("nbdctl bitmap unfork: expected --success or "
                        "--failure\n" + usage)
    p = ctl(None, "bitmap", "unfork", "d0", "b", "--success", "--failure",
            expect=2)
    assert p.stderr == ("nbdctl bitmap unfork: give --success or --failure, "
                        "not both\n" + usage)
    p = ctl(None, "bitmap", "unfork", "d0", "--failure", expect=2)
    assert p.stderr == ("nbdctl bitmap unfork: expected NODE NAME\n" +
                        usage)


def test_bitmap_help():
    p = ctl(None, "bitmap", "--help")
    subs = [line.split()[1] for line in p.stdout.splitlines()
            if line.startswith("  bitmap ")]
    assert subs == ["add", "remove", "clear", "enable", "disable", "merge",
                    "fork", "unfork", "list", "lineage"]
    assert p.stdout.startswith("Usage: nbdctl [OPTIONS] bitmap SUBCOMMAND")
    for sub in subs:
        assert f"block-dirty-bitmap-{sub}" in p.stdout or \
            sub in ("list", "lineage")
    assert "query-bitmap-lineage" in p.stdout
    assert ctl(None, "bitmap", "-h").stdout == p.stdout
    # A group's help is not a command's: still a usage error otherwise.
    ctl(None, "bitmap", "--help", "x", expect=2)

    p = ctl(None, "--help")
    for word in ("bitmap add", "bitmap merge", "bitmap list", "--bitmap"):
        assert word in p.stdout, word
    p = ctl(None, "bitmap", "add", "--help")
    assert p.stdout.startswith("Usage: nbdctl bitmap add NODE NAME "
                               "[--granularity SIZE] [--persistent]")
    p = ctl(None, "bitmap", "merge", "--help")
    assert "OTHERNODE:NAME" in p.stdout
    p = ctl(None, "bitmap", "fork", "--help")
    assert p.stdout.startswith("Usage: nbdctl bitmap fork NODE NAME "
                               "[--session LABEL]\n")
    p = ctl(None, "bitmap", "unfork", "--help")
    assert p.stdout.startswith("Usage: nbdctl bitmap unfork NODE NAME "
                               "--success|--failure\n")
    p = ctl(None, "bitmap", "lineage", "--help")
    assert p.stdout.startswith("Usage: nbdctl bitmap lineage "
                               "[NODE [NAME]]\n")
    p = ctl(None, "bitmap", "list", "--help")
    assert "FROZEN" in p.stdout
    p = ctl(None, "export", "add", "--help")
    assert "[--bitmap NAME|NODE:NAME]..." in p.stdout
