"""nbdctl fleece start, stop and list.

Like test_nbdctl.py, these start the real daemon with a state dir and
drive it with nbdctl; the snapshot export is read with libnbd and
nbdinfo, and written to through a live writable export with libnbd."""
import json
import os
import re
import sqlite3

import nbd
import pytest

from conftest import make_image
from helpers import run
from test_nbdctl import MiB, admin, ctl, raw_spec  # noqa: F401

KiB = 1 << 10
CONTEXT = "qemu:dirty-bitmap:"
HEADERS = ["ID", "NODE", "EXPORT", "BITMAPS", "SNAPSHOT", "SCRATCH", "LIMIT",
           "AGE", "CLIENTS", "STATE", "ERROR"]


def fleeces(text):
    """The rows of 'nbdctl fleece list': the last column, ERROR, is
    free text with blanks in it."""
    lines = text.splitlines()
    assert lines[0].split() == HEADERS, lines[0]
    return [dict(zip(HEADERS, line.split(None, len(HEADERS) - 1)))
            for line in lines[1:]]


def live_disk(srv, tmp_path, node="d0", size=4 * MiB, pattern=b"o"):
    """A raw node, filled with @pattern, and a writable export 'live' of
    it; returns a libnbd handle on the export."""
    img = make_image(tmp_path / f"{node}.img", size, [(0, pattern * size)])
    ctl(srv.admin, "node", "add", raw_spec(img, node))
    ctl(srv.admin, "export", "add", node, "--writable", "--name", "live")
    return srv.connect("live")


def dirty_runs(srv, export, name):
    out = run(["nbdinfo", "--json", "--map=" + CONTEXT + name,
               srv.uri(export)]).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out)
            if e["type"] & 1]


def bitmap_count(srv, node, name):
    v = json.loads(ctl(srv.admin, "--json", "bitmap", "list", node).stdout)
    return [b["count"] for b in v if b["name"] == name][0]


def table_bitmap(srv):
    """d0's one bitmap, as 'nbdctl bitmap list d0' shows it."""
    out = ctl(srv.admin, "bitmap", "list", "d0").stdout.splitlines()
    return dict(zip(out[0].split(), out[1].split()))


def scratch_dir(srv):
    return os.path.join(os.path.dirname(srv.admin), "fleece")


def test_fleece_start_list_stop(admin, tmp_path):
    h = live_disk(admin, tmp_path)
    ctl(admin.admin, "bitmap", "add", "d0", "b0")
    h.pwrite(b"a" * 4096, MiB)                  # in b0 before the start

    p = ctl(admin.admin, "fleece", "start", "d0", "--id", "f1", "--bitmap",
            "b0", "--export", "snap1", "--scratch-limit", "2M")
    assert p.stdout == "fleece f1: d0 as it is now, exported as snap1\n"
    assert os.listdir(scratch_dir(admin)) == ["f1.qcow2"]

    # Live writes after the start change the disk, not the snapshot.
    h.pwrite(b"n" * 4096, 0)
    h.pwrite(b"m" * 4096, 2 * MiB)
    s = admin.connect("snap1")
    assert s.pread(4096, 0) == b"o" * 4096
    assert s.pread(4096, MiB) == b"a" * 4096
    assert s.pread(4096, 2 * MiB) == b"o" * 4096
    assert h.pread(4096, 0) == b"n" * 4096
    # Writes to the snapshot are refused; TRIM is allowed.
    assert s.can_trim()
    with pytest.raises(nbd.Error) as e:
        s.pwrite(b"x" * 512, 0)
    assert e.value.errno == "EPERM"
    # The frozen bits: only the write before the start.
    assert dirty_runs(admin, "snap1", "b0") == [(MiB, 64 * KiB)]

    rows = fleeces(ctl(admin.admin, "fleece", "list").stdout)
    assert len(rows) == 1
    r = rows[0]
    assert re.fullmatch(r"\d\d:\d\d", r.pop("AGE")), r
    # Two clusters of old data saved, 64K each; one client (s).
    assert r == {"ID": "f1", "NODE": "d0", "EXPORT": "snap1",
                 "BITMAPS": "b0", "SNAPSHOT": "full", "SCRATCH": "128K",
                 "LIMIT": "2M",
                 "CLIENTS": "1", "STATE": "running", "ERROR": "-"}
    assert table_bitmap(admin)["FROZEN"] == "yes"

    # TRIM means backed up: the saved data there is freed.
    s.trim(64 * KiB, 0)
    assert fleeces(ctl(admin.admin, "fleece", "list").stdout)[0][
        "SCRATCH"] == "64K"

    # Stop disconnects the backup client, removes the export, the
    # nodes and the scratch image; the bitmap keeps only the writes
    # since the start.
    assert ctl(admin.admin, "fleece", "stop", "f1", "--success").stdout == ""
    with pytest.raises(nbd.Error):
        s.pread(4096, 0)
    assert ctl(admin.admin, "fleece", "list").stdout.splitlines() == [
        "ID  NODE  EXPORT  BITMAPS  SNAPSHOT  SCRATCH  LIMIT  AGE  CLIENTS  "
        "STATE  ERROR"]
    assert os.listdir(scratch_dir(admin)) == []
    exports = json.loads(ctl(admin.admin, "--json", "export", "list").stdout)
    assert [e["id"] for e in exports] == ["live"]
    assert exports[0]["node-name"] == "d0"
    nodes = [n["node-name"] for n in
             json.loads(ctl(admin.admin, "--json", "node", "list").stdout)]
    assert not [n for n in nodes if n.startswith("f1-")]
    assert table_bitmap(admin)["FROZEN"] == "no"
    assert bitmap_count(admin, "d0", "b0") == 2 * 64 * KiB
    # The live export goes on.
    h.pwrite(b"z" * 4096, 0)
    assert h.pread(4096, 0) == b"z" * 4096
    h.shutdown()


def test_fleece_incremental(admin, tmp_path):
    """--incremental: the snapshot holds the bitmap's dirty clusters
    only; writes elsewhere save nothing, reads there fail."""
    h = live_disk(admin, tmp_path)
    ctl(admin.admin, "bitmap", "add", "d0", "b0")
    h.pwrite(b"a" * 4096, MiB)
    ctl(admin.admin, "fleece", "start", "d0", "--id", "f1", "--bitmap",
        "b0", "--incremental")
    h.pwrite(b"n" * 4096, 0)                    # not dirty: no copy
    h.pwrite(b"m" * 4096, MiB)                  # dirty: 64K saved
    [r] = fleeces(ctl(admin.admin, "fleece", "list").stdout)
    assert (r["SNAPSHOT"], r["SCRATCH"]) == ("incremental", "64K")
    assert json.loads(ctl(admin.admin, "--json", "fleece", "list").stdout)[
        0]["incremental"] is True
    s = admin.connect("f1")
    assert s.pread(4096, MiB) == b"a" * 4096
    with pytest.raises(nbd.Error) as e:
        s.pread(4096, 0)
    assert e.value.errno == "EIO"
    assert dirty_runs(admin, "f1", "b0") == [(MiB, 64 * KiB)]
    s.shutdown()
    ctl(admin.admin, "fleece", "stop", "f1", "--success")
    h.shutdown()


def test_fleece_stop_failure_keeps_the_bits(admin, tmp_path):
    h = live_disk(admin, tmp_path)
    ctl(admin.admin, "bitmap", "add", "d0", "b0")
    h.pwrite(b"a" * 4096, 0)
    h.pwrite(b"a" * 4096, MiB)
    ctl(admin.admin, "fleece", "start", "d0", "--id", "f", "--bitmap", "b0")
    h.pwrite(b"b" * 4096, 3 * MiB)
    s = admin.connect("f")
    s.trim(64 * KiB, 0)                         # [0, 64K) backed up
    s.shutdown()
    # A failed backup: the frozen bits not trimmed come back, with the
    # writes since the start.
    ctl(admin.admin, "fleece", "stop", "f", "--failure")
    assert bitmap_count(admin, "d0", "b0") == 2 * 64 * KiB
    ctl(admin.admin, "export", "add", "d0", "--name", "chk", "--bitmap",
        "b0")
    assert dirty_runs(admin, "chk", "b0") == [(MiB, 64 * KiB),
                                              (3 * MiB, 64 * KiB)]
    h.shutdown()


def test_fleece_defaults_and_json(admin, tmp_path):
    h = live_disk(admin, tmp_path)
    for name in ("a", "b\x1b[2J"):
        ctl(admin.admin, "bitmap", "add", "d0", name)
    # The daemon picks the id; the export is named after it.
    v = json.loads(ctl(admin.admin, "--json", "fleece", "start", "d0",
                       "--bitmap", "a", "--bitmap", "b\x1b[2J").stdout)
    assert v == {"id": "fleece0", "export": "fleece0"}
    s = admin.connect("fleece0")
    assert s.pread(4096, 0) == b"o" * 4096
    s.shutdown()

    # --json after the subcommand, as for every command: the daemon's
    # list as it is.
    v = json.loads(ctl(admin.admin, "fleece", "list", "--json").stdout)
    assert len(v) == 1
    f = v[0]
    assert f["scratch-file"] == os.path.join(scratch_dir(admin),
                                             "fleece0.qcow2")
    assert 0 <= f["age"] < 600 and f["started"] > 0
    assert {k: f[k] for k in ("id", "node", "export", "bitmaps",
                              "scratch-bytes", "scratch-limit", "clients",
                              "state")} == {
        "id": "fleece0", "node": "d0", "export": "fleece0",
        "bitmaps": ["a", "b\x1b[2J"], "scratch-bytes": 0,
        "scratch-limit": 0, "clients": 0, "state": "running"}
    assert "error" not in f

    # The table escapes the bitmap names; no limit shows as "-".
    out = ctl(admin.admin, "fleece", "list").stdout
    assert "\x1b" not in out
    r = fleeces(out)[0]
    assert (r["BITMAPS"], r["SCRATCH"], r["LIMIT"], r["CLIENTS"]) == \
        ("a,b\\x1b[2J", "0", "-", "0")

    # A second one, of another node, gets the next id.
    img = make_image(tmp_path / "d1.img", MiB)
    ctl(admin.admin, "node", "add", raw_spec(img, "d1"))
    assert ctl(admin.admin, "fleece", "start", "d1").stdout == \
        "fleece fleece1: d1 as it is now, exported as fleece1\n"
    rows = fleeces(ctl(admin.admin, "fleece", "list").stdout)
    assert sorted((r["ID"], r["NODE"]) for r in rows) == \
        [("fleece0", "d0"), ("fleece1", "d1")]

    assert json.loads(ctl(admin.admin, "--json", "fleece", "stop",
                          "fleece0", "--failure").stdout) == {}
    assert json.loads(ctl(admin.admin, "fleece", "stop", "fleece1",
                          "--success", "--json").stdout) == {}
    assert json.loads(ctl(admin.admin, "--json", "fleece",
                          "list").stdout) == []
    h.shutdown()


def test_fleece_broken_shows_in_list(admin, tmp_path):
    """Past the scratch limit the snapshot breaks: the list says so and
    why, the snapshot fails its reads, and the live disk took every
    write."""
    h = live_disk(admin, tmp_path, size=8 * MiB)
    ctl(admin.admin, "fleece", "start", "d0", "--id", "f",
        "--scratch-limit", "1M")
    s = admin.connect("f")
    h.pwrite(b"x" * 512 * KiB, 0)               # fits
    assert s.pread(4096, 0) == b"o" * 4096
    r = fleeces(ctl(admin.admin, "fleece", "list").stdout)[0]
    assert (r["SCRATCH"], r["LIMIT"], r["STATE"], r["ERROR"]) == \
        ("512K", "1M", "running", "-")

    h.pwrite(b"y" * 4 * MiB, 2 * MiB)           # does not
    r = fleeces(ctl(admin.admin, "fleece", "list").stdout)[0]
    assert (r["ID"], r["LIMIT"], r["STATE"]) == ("f", "1M", "broken")
    assert r["ERROR"] == ("the scratch limit of 1048576 bytes was "
                          "reached"), r
    v = json.loads(ctl(admin.admin, "--json", "fleece", "list").stdout)[0]
    assert v["state"] == "broken" and v["error"] == r["ERROR"]
    assert v["scratch-bytes"] <= MiB
    with pytest.raises(nbd.Error) as e:
        s.pread(4096, 0)
    assert e.value.errno == "EIO"
    assert h.pread(4 * MiB, 2 * MiB) == b"y" * 4 * MiB
    s.shutdown()
    ctl(admin.admin, "fleece", "stop", "f", "--failure")
    assert fleeces(ctl(admin.admin, "fleece", "list").stdout) == []
    h.shutdown()


def test_fleece_refused(admin, tmp_path):
    """What the daemon refuses exits 1 with its reason, and changes
    nothing."""
    h = live_disk(admin, tmp_path)
    ctl(admin.admin, "bitmap", "add", "d0", "b0")

    def refused(*args):
        p = ctl(admin.admin, "fleece", *args, expect=1)
        assert p.stdout == ""
        assert p.stderr.count("\n") == 1
        return p.stderr

    assert refused("start", "nope") == \
        "nbdctl: node 'nope' does not exist\n"
    assert refused("start", "d0", "--bitmap", "nope") == \
        "nbdctl: node 'd0' has no bitmap 'nope'\n"
    assert refused("start", "d0", "--export", "live") == \
        "nbdctl: export 'live' exists\n"
    assert refused("start", "d0", "--export", "x y").startswith(
        "nbdctl: fleece-start: export 'x y' is not valid")
    # The id's length limit is the daemon's.
    assert refused("start", "d0", "--id", "f" * 65).startswith(
        "nbdctl: fleece-start: id 'fff")
    assert refused("stop", "nope", "--success") == \
        "nbdctl: fleece 'nope' does not exist\n"
    assert json.loads(ctl(admin.admin, "--json", "fleece",
                          "list").stdout) == []
    assert not os.path.exists(scratch_dir(admin)) or \
        os.listdir(scratch_dir(admin)) == []

    ctl(admin.admin, "fleece", "start", "d0", "--id", "f")
    assert refused("start", "d0", "--id", "g") == \
        ("nbdctl: node 'd0' is already fleeced by 'f': stop that fleece "
         "first\n")
    assert refused("start", "d0", "--id", "f") == \
        "nbdctl: fleece 'f' exists\n"
    # Its nodes and the node under it cannot go, nor can it grow.
    p = ctl(admin.admin, "node", "remove", "f-snap", expect=1)
    assert p.stderr == "nbdctl: node 'f-snap' is in use by export 'f'\n"
    p = ctl(admin.admin, "node", "remove", "d0", expect=1)
    assert p.stderr == ("nbdctl: node 'd0' is in use by node 'f-cbw' "
                        "(child 'file')\n")
    p = ctl(admin.admin, "qmp", "block_resize",
            '{"node-name": "d0", "size": 8388608}', expect=1)
    assert "resize" in p.stderr
    assert [r["ID"] for r in
            fleeces(ctl(admin.admin, "fleece", "list").stdout)] == ["f"]
    ctl(admin.admin, "fleece", "stop", "f", "--success")
    # Stopped, it is gone.
    assert refused("stop", "f", "--failure") == \
        "nbdctl: fleece 'f' does not exist\n"
    h.shutdown()


def test_fleece_needs_a_state_dir(nbdd_server, tmp_path):
    sock = str(tmp_path / "admin.sock")
    srv = nbdd_server(["--admin-socket", sock], tcp=False)
    img = make_image(tmp_path / "d0.img", MiB)
    ctl(sock, "node", "add", raw_spec(img))
    p = ctl(sock, "fleece", "start", "d0", expect=1)
    assert p.stderr == ("nbdctl: fleece-start: fleecing needs a state dir "
                        "(--state-dir) for its scratch image\n")
    assert srv.alive()


@pytest.mark.parametrize("args", [
    ["fleece"],
    ["fleece", "frob"],
    ["fleece", "start"],
    ["fleece", "start", "d0", "d1"],
    ["fleece", "start", "d0", "--id"],
    ["fleece", "start", "d0", "--id", ""],
    ["fleece", "start", "d0", "--id", "bad id"],
    ["fleece", "start", "d0", "--id", "9lives"],
    ["fleece", "start", "d0", "--bitmap"],
    ["fleece", "start", "d0", "--bitmap", ""],
    ["fleece", "start", "d0", "--bitmap", "a", "--bitmap", "a"],
    ["fleece", "start", "d0", "--export", ""],
    ["fleece", "start", "d0", "--scratch-limit", "lots"],
    ["fleece", "start", "d0", "--scratch-limit", "-1"],
    ["fleece", "start", "d0", "--scratch-limit"],
    ["fleece", "start", "d0", "--success"],
    ["fleece", "start", "d0", "--no-such-option"],
    ["fleece", "start", "d0", "--incremental"],
    ["fleece", "start", "d0", "--incremental=yes", "--bitmap", "b"],
    ["fleece", "stop"],
    ["fleece", "stop", "f"],
    ["fleece", "stop", "--success"],
    ["fleece", "stop", "f", "g", "--success"],
    ["fleece", "stop", "f", "--success", "--failure"],
    ["fleece", "stop", "f", "--failure", "--success"],
    ["fleece", "stop", "f", "--outcome", "success"],
    ["fleece", "list", "f"],
    ["fleece", "list", "--id", "f"],
])
def test_fleece_exit_2_for_bad_usage(tmp_path, args):
    """Usage errors exit 2 before anything is sent: with no daemon at
    the socket, reaching it would have been exit 3."""
    sock = str(tmp_path / "none.sock")
    p = ctl(sock, *args, expect=2)
    assert p.stderr, "no message"
    assert p.stdout == ""


def test_fleece_usage_errors_send_nothing(admin, tmp_path):
    """With a daemon there, a usage error still reaches nothing: the
    audit log records every start and stop the daemon gets, refused or
    not."""
    db = os.path.join(os.path.dirname(admin.admin), "catalog.db")

    def audited():
        c = sqlite3.connect(db)
        try:
            return [r[0] for r in c.execute(
                "SELECT command FROM audit WHERE command LIKE 'fleece-%' "
                "ORDER BY id")]
        finally:
            c.close()

    ctl(admin.admin, "fleece", "start", "d0", "--scratch-limit", "x",
        expect=2)
    ctl(admin.admin, "fleece", "start", "d0", "--id", "bad id", expect=2)
    ctl(admin.admin, "fleece", "stop", "f", expect=2)
    ctl(admin.admin, "fleece", "stop", "f", "--success", "--failure",
        expect=2)
    assert audited() == []
    ctl(admin.admin, "fleece", "start", "nope", expect=1)
    ctl(admin.admin, "fleece", "stop", "f", "--success", expect=1)
    assert audited() == ["fleece-start", "fleece-stop"]


def test_fleece_usage_messages():
    start = ("Usage: nbdctl fleece start NODE [--id ID] [--bitmap NAME]... "
             "[--export NAME] [--scratch-limit SIZE] [--incremental]\n")
    p = ctl(None, "fleece", "start", expect=2)
    assert p.stderr == "nbdctl fleece start: expected one NODE\n" + start
    p = ctl(None, "fleece", "start", "d0", "--id", "bad id", expect=2)
    assert p.stderr == ("nbdctl fleece start: --id: 'bad id' is not a valid "
                        "fleece id (a letter, then letters, digits, '-', "
                        "'.' and '_')\n" + start)
    p = ctl(None, "fleece", "start", "d0", "--scratch-limit", "lots",
            expect=2)
    assert p.stderr.startswith("nbdctl fleece start: --scratch-limit: "
                               "expected a size")
    p = ctl(None, "fleece", "start", "d0", "--bitmap", "a", "--bitmap", "a",
            expect=2)
    assert p.stderr == ("nbdctl fleece start: --bitmap: 'a' is given "
                        "twice\n" + start)
    p = ctl(None, "fleece", "start", "d0", "--incremental", expect=2)
    assert p.stderr == ("nbdctl fleece start: --incremental needs a "
                        "--bitmap: the snapshot holds only what the bitmaps "
                        "mark\n" + start)
    stop = "Usage: nbdctl fleece stop ID --success|--failure\n"
    p = ctl(None, "fleece", "stop", "f", expect=2)
    assert p.stderr == ("nbdctl fleece stop: expected --success or "
                        "--failure\n" + stop)
    p = ctl(None, "fleece", "stop", "f", "--success", "--failure", expect=2)
    assert p.stderr == ("nbdctl fleece stop: give --success or --failure, "
                        "not both\n" + stop)
    p = ctl(None, "fleece", "stop", "--failure", expect=2)
    assert p.stderr == "nbdctl fleece stop: expected one fleece ID\n" + stop
    p = ctl(None, "fleece", "list", "x", expect=2)
    assert p.stderr == ("nbdctl fleece list: expected no arguments\n"
                        "Usage: nbdctl fleece list\n")


def test_fleece_help():
    p = ctl(None, "fleece", "--help")
    assert p.stdout.startswith("Usage: nbdctl [OPTIONS] fleece SUBCOMMAND")
    subs = [line.split()[1] for line in p.stdout.splitlines()
            if line.startswith("  fleece ")]
    assert subs == ["start", "stop", "list"]
    for cmd in ("fleece-start", "fleece-stop", "query-fleeces"):
        assert cmd in p.stdout
    assert ctl(None, "fleece", "-h").stdout == p.stdout

    p = ctl(None, "--help")
    for word in ("fleece start NODE", "fleece stop ID --success|--failure",
                 "fleece list", "bitmap lineage"):
        assert word in p.stdout, word
    # Next to the bitmap commands.
    assert p.stdout.index("bitmap lineage") < p.stdout.index("fleece start") \
        < p.stdout.index("connections")

    p = ctl(None, "fleece", "start", "--help")
    assert p.stdout.startswith(
        "Usage: nbdctl fleece start NODE [--id ID] [--bitmap NAME]... "
        "[--export NAME]\n                           [--scratch-limit SIZE] "
        "[--incremental]\n")
    assert "qemu:dirty-bitmap:NAME" in p.stdout
    p = ctl(None, "fleece", "stop", "--help")
    assert p.stdout.startswith("Usage: nbdctl fleece stop ID "
                               "--success|--failure\n")
    p = ctl(None, "fleece", "list", "--help")
    assert p.stdout.startswith("Usage: nbdctl fleece list\n")
    assert "ERROR" in p.stdout
