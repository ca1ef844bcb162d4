"""Dirty bitmaps: recording every write, the QMP lifecycle, and export
as qemu:dirty-bitmap:NAME to real clients (libnbd, nbdinfo, qemu-img).

Bitmaps here are transient: they live as long as the daemon."""
import json
import random

import nbd
import pytest

from conftest import make_image
from helpers import run
from qmp import QMP, QMPError
from admintools import FAIL, MiB, qcow2_graph, raw_node, restart, start

CONTEXT = "qemu:dirty-bitmap:"


def dirty_map(h, name, size):
    """[(offset, length)] of the dirty runs of context NAME."""
    ctx = CONTEXT + name
    runs = []
    off = 0
    while off < size:
        got = []

        def cb(metacontext, o, entries, err):
            if metacontext == ctx:
                got.extend(zip(entries[0::2], entries[1::2]))
            return 0

        h.block_status(size - off, off, cb)
        assert got, "no extents"
        for length, flags in got:
            if flags & 1:
                if runs and runs[-1][0] + runs[-1][1] == off:
                    runs[-1] = (runs[-1][0], runs[-1][1] + length)
                else:
                    runs.append((off, length))
            off += length
            if off >= size:
                break
    return runs


def expected_runs(granules, g, size):
    runs = []
    for k in sorted(granules):
        start, end = k * g, min((k + 1) * g, size)
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end - runs[-1][0])
        else:
            runs.append((start, end - start))
    return runs


def touch(granules, g, off, length):
    for k in range(off // g, (off + length - 1) // g + 1):
        granules.add(k)


def connect_ctx(srv, export, names):
    h = nbd.NBD()
    for n in names:
        h.add_meta_context(n)
    h.connect_uri(srv.uri(export))
    return h


@pytest.mark.parametrize("granularity", [65536, 4096])
def test_random_writes_are_recorded(nbdd_server, tmp_path, granularity):
    size = 32 * MiB
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        qcow2_graph(q, tmp_path, size=size)
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0",
              granularity=granularity)
        q.cmd_args("block-export-add", {
            "type": "nbd", "id": "e0", "node-name": "disk0",
            "writable": True, "bitmaps": ["b0"]})
        h = connect_ctx(srv, "disk0", [CONTEXT + "b0"])
        assert h.can_meta_context(CONTEXT + "b0")
        rnd = random.Random(granularity)
        granules = set()
        for i in range(300):
            off = rnd.randrange(0, size - 65536)
            length = rnd.randrange(1, 65536)
            op = rnd.choice(["write", "write", "zero", "trim"])
            if op == "write":
                h.pwrite(bytes([i % 256]) * length, off)
            elif op == "zero":
                h.zero(length, off)
            else:
                # A discard only changes (and marks) what it covers of
                # the qcow2 clusters: align it to them.
                off, length = off // 65536 * 65536, 65536
                h.trim(length, off)
            touch(granules, granularity, off, length)
        assert dirty_map(h, "b0", size) == \
            expected_runs(granules, granularity, size)
        info = {n["node-name"]: n for n in
                q.cmd("query-named-block-nodes")}["disk0"]
        b0 = info["dirty-bitmaps"][0]
        assert b0["name"] == "b0" and b0["granularity"] == granularity
        assert b0["recording"] and b0["busy"] and not b0["persistent"]
        assert b0["count"] == sum(l for _, l in
                                  expected_runs(granules, granularity, size))
        h.shutdown()


def test_nbdinfo_and_qemu_img_map_show_the_bitmap(nbdd_server, tmp_path):
    size = 16 * MiB
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        raw_node(q, tmp_path, "d0")
        q.cmd("block_resize", node_name="d0", size=size)
        q.cmd("block-dirty-bitmap-add", node="d0", name="inc")
        q.cmd("block-export-add", type="nbd", id="w", node_name="d0",
              writable=True)
        h = srv.connect("d0")
        h.pwrite(b"x" * 100, 70000)         # granule 1
        h.pwrite(b"y" * 65536, 5 * MiB)     # granules 80
        h.zero(200000, 8 * MiB + 1)         # 128..131
        h.shutdown()
        q.cmd("block-export-del", id="w")
        q.cmd_args("block-export-add", {
            "type": "nbd", "id": "r", "node-name": "d0", "name": "ro",
            "bitmaps": [{"node": "d0", "name": "inc"}]})
    want = [(65536, 65536), (5 * MiB, 65536), (8 * MiB, 4 * 65536)]
    out = run(["nbdinfo", "--json", "--map=" + CONTEXT + "inc",
               srv.uri("ro")]).stdout
    runs = [(e["offset"], e["length"]) for e in json.loads(out)
            if e["type"] & 1]
    assert runs == want
    out = run(["qemu-img", "map", "--output=json", "--image-opts",
               f"driver=nbd,export=ro,server.type=unix,"
               f"server.path={srv.sock},x-dirty-bitmap={CONTEXT}inc"]).stdout
    # qemu-img reports dirty as "data": false with x-dirty-bitmap.
    dirty = [(e["start"], e["length"]) for e in json.loads(out)
             if not e["data"]]
    assert dirty == want
    out = run(["nbdinfo", "--list", "--json", srv.uri("")]).stdout
    exports = {e["export-name"]: e for e in json.loads(out)["exports"]}
    assert CONTEXT + "inc" in exports["ro"]["contexts"]


def test_lifecycle_commands(nbdd_server, tmp_path):
    size = 4 * MiB
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        raw_node(q, tmp_path, "d0")
        q.cmd("block-dirty-bitmap-add", node="d0", name="a")
        q.cmd("block-dirty-bitmap-add", node="d0", name="b",
              granularity=1 << 20, disabled=True)
        q.cmd("block-export-add", type="nbd", id="w", node_name="d0",
              writable=True)
        h = srv.connect("d0")

        def counts():
            n = {x["node-name"]: x for x in
                 q.cmd("query-named-block-nodes")}["d0"]
            return {b["name"]: (b["count"], b["recording"])
                    for b in n["dirty-bitmaps"]}

        h.pwrite(b"1" * 4096, 0)
        assert counts() == {"a": (65536, True), "b": (0, False)}
        q.cmd("block-dirty-bitmap-enable", node="d0", name="b")
        q.cmd("block-dirty-bitmap-disable", node="d0", name="a")
        h.pwrite(b"2" * 4096, 2 * MiB)
        assert counts() == {"a": (65536, False), "b": (MiB, True)}
        # a |= b: a's 64k granules covering b's 1M one.
        q.cmd("block-dirty-bitmap-merge", node="d0", target="a",
              bitmaps=["b"])
        assert counts()["a"] == (65536 + MiB, False)
        q.cmd("block-dirty-bitmap-clear", node="d0", name="b")
        assert counts()["b"] == (0, True)
        with pytest.raises(QMPError) as e:
            q.cmd("block-dirty-bitmap-add", node="d0", name="a")
        assert "already has a bitmap 'a'" in e.value.desc
        with pytest.raises(QMPError) as e:
            q.cmd("block-dirty-bitmap-add", node="d0", name="c",
                  granularity=1000)
        assert "power of 2" in e.value.desc
        with pytest.raises(QMPError) as e:
            q.cmd("block-dirty-bitmap-remove", node="d0", name="zz")
        assert e.value.cls == "DeviceNotFound"
        # A failed transaction puts every bitmap back as it was.
        before = counts()
        with pytest.raises(QMPError):
            q.cmd("transaction", actions=[
                {"type": "block-dirty-bitmap-clear",
                 "data": {"node": "d0", "name": "a"}},
                {"type": "block-dirty-bitmap-remove",
                 "data": {"node": "d0", "name": "b"}},
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "d0", "name": "new"}}, FAIL])
        assert counts() == before
        q.cmd("block-dirty-bitmap-remove", node="d0", name="b")
        assert set(counts()) == {"a"}
        h.shutdown()


def test_exported_bitmap_is_busy(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        raw_node(q, tmp_path, "d0")
        q.cmd("block-dirty-bitmap-add", node="d0", name="a")
        q.cmd_args("block-export-add", {"type": "nbd", "id": "e",
                                        "node-name": "d0", "bitmaps": ["a"]})
        for cmd in ("remove", "clear", "enable", "disable"):
            with pytest.raises(QMPError) as e:
                q.cmd("block-dirty-bitmap-" + cmd, node="d0", name="a")
            assert "in use by 1 export" in e.value.desc
        with pytest.raises(QMPError) as e:
            q.cmd_args("block-export-add", {
                "type": "nbd", "id": "f", "node-name": "d0", "name": "f",
                "bitmaps": ["nope"]})
        assert "no bitmap 'nope'" in e.value.desc
        q.cmd("block-export-del", id="e")
        q.cmd("block-dirty-bitmap-remove", node="d0", name="a")


def test_bitmap_below_a_filter(nbdd_server, tmp_path):
    """A bitmap on a node records writes that reach it through a filter
    inserted above; a bitmap found by name below the exported node."""
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        raw_node(q, tmp_path, "d0")
        q.cmd("block-dirty-bitmap-add", node="d0", name="a")
        q.cmd_args("blockdev-add", {"driver": "throttle", "node-name": "t0",
                                    "file": "d0"})
        q.cmd_args("block-export-add", {"type": "nbd", "id": "e",
                                        "node-name": "t0", "writable": True,
                                        "bitmaps": ["a"]})
        h = connect_ctx(srv, "t0", [CONTEXT + "a"])
        h.pwrite(b"z" * 10, 3 * MiB + 5)
        assert dirty_map(h, "a", 4 * MiB) == [(3 * MiB, 65536)]
        h.shutdown()


def qemu_bitmap_flags(img, force_share=False):
    doc = json.loads(run(["qemu-img", "info"] +
                         (["-U"] if force_share else []) +
                         ["--output=json", img]).stdout)
    return {b["name"]: sorted(b["flags"]) for b in
            doc.get("format-specific", {}).get("data", {}).get("bitmaps", [])}


def test_persistent_bitmap_lifecycle(nbdd_server, tmp_path):
    """A persistent bitmap is in the image as soon as it is added (and
    valid all along: write intent keeps it a superset of the writes),
    holds what was written when the daemon stops, comes back at the
    next start, and qemu-img agrees at every step."""
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        img = qcow2_graph(q, tmp_path, size=16 * MiB)
        q.cmd("block-dirty-bitmap-add", node="disk0", name="p",
              persistent=True)
        assert qemu_bitmap_flags(img, True) == {"p": ["auto"]}
        ro = make_image(tmp_path / "ro.img", MiB)
        q.cmd_args("blockdev-add", {"driver": "raw", "node-name": "ro",
                                    "read-only": True,
                                    "file": {"driver": "file",
                                             "filename": ro}})
        with pytest.raises(QMPError) as e:
            q.cmd("block-dirty-bitmap-add", node="ro", name="x",
                  persistent=True)
        assert "cannot store bitmaps" in e.value.desc
        q.cmd("block-export-add", type="nbd", id="e0", node_name="disk0",
              writable=True)
        h = srv.connect("disk0")
        h.pwrite(b"p" * 4096, 5 * MiB)
        h.flush()
        h.shutdown()
    srv.stop()
    assert qemu_bitmap_flags(img) == {"p": ["auto"]}
    run(["qemu-img", "check", img])

    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        info = {n["node-name"]: n for n in
                q.cmd("query-named-block-nodes")}["disk0"]
        assert [(b["name"], b["persistent"], b["count"], b["inconsistent"])
                for b in info["dirty-bitmaps"]] == [("p", True, 65536, False)]
        q.cmd("block-export-del", id="e0")
        q.cmd_args("block-export-add", {"type": "nbd", "id": "bk",
                                        "node-name": "disk0",
                                        "name": "backup", "bitmaps": ["p"]})
        h = connect_ctx(srv, "backup", [CONTEXT + "p"])
        assert dirty_map(h, "p", 16 * MiB) == [(5 * MiB, 65536)]
        h.shutdown()
        q.cmd("block-export-del", id="bk")
        q.cmd("block-dirty-bitmap-remove", node="disk0", name="p")
        assert qemu_bitmap_flags(img, True) == {}
    srv.stop()
    assert qemu_bitmap_flags(img) == {}
    run(["qemu-img", "check", img])


def bitmaps_of(q, node):
    n = {x["node-name"]: x for x in q.cmd("query-named-block-nodes")}[node]
    return {b["name"]: b for b in n["dirty-bitmaps"]}


def test_fork_and_unfork(nbdd_server, tmp_path):
    """Fork freezes the bits a backup reads (exported) while a successor
    records new writes; unfork success drops the frozen bits, failure
    merges the successor back.  Every step is in the lineage."""
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        raw_node(q, tmp_path, "d0")
        q.cmd("block-dirty-bitmap-add", node="d0", name="inc")
        q.cmd("block-export-add", type="nbd", id="w", node_name="d0",
              writable=True)
        w = srv.connect("d0")
        w.pwrite(b"1" * 4096, 0)
        q.cmd("block-dirty-bitmap-fork", node="d0", name="inc",
              session="backup-1")
        b = bitmaps_of(q, "d0")["inc"]
        assert b["frozen"] and b["busy"] and b["count"] == 65536
        for cmd in ("clear", "enable", "disable", "remove"):
            with pytest.raises(QMPError) as e:
                q.cmd("block-dirty-bitmap-" + cmd, node="d0", name="inc")
            assert "forked" in e.value.desc
        with pytest.raises(QMPError) as e:
            q.cmd("block-dirty-bitmap-fork", node="d0", name="inc")
        assert "forked" in e.value.desc
        # Written during the backup: not in the frozen bits.
        w.pwrite(b"2" * 4096, MiB)
        q.cmd_args("block-export-add", {"type": "nbd", "id": "bk",
                                        "node-name": "d0", "name": "bk",
                                        "bitmaps": ["inc"]})
        h = connect_ctx(srv, "bk", [CONTEXT + "inc"])
        assert dirty_map(h, "inc", 4 * MiB) == [(0, 65536)]
        h.shutdown()
        with pytest.raises(QMPError) as e:
            q.cmd("block-dirty-bitmap-unfork", node="d0", name="inc",
                  outcome="success")
        assert "exported" in e.value.desc
        q.cmd("block-export-del", id="bk")
        # The backup failed: nothing is lost.
        q.cmd("block-dirty-bitmap-unfork", node="d0", name="inc",
              outcome="failure")
        b = bitmaps_of(q, "d0")["inc"]
        assert not b["frozen"] and b["count"] == 2 * 65536
        # Again, and this time it succeeds: only what came after stays.
        q.cmd("block-dirty-bitmap-fork", node="d0", name="inc")
        w.pwrite(b"3" * 4096, 2 * MiB)
        q.cmd("block-dirty-bitmap-unfork", node="d0", name="inc",
              outcome="success")
        assert bitmaps_of(q, "d0")["inc"]["count"] == 65536
        with pytest.raises(QMPError) as e:
            q.cmd("block-dirty-bitmap-unfork", node="d0", name="inc",
                  outcome="success")
        assert "not forked" in e.value.desc
        # A failed transaction undoes a fork and an unfork.
        q.cmd("block-dirty-bitmap-fork", node="d0", name="inc")
        with pytest.raises(QMPError):
            q.cmd("transaction", actions=[
                {"type": "block-dirty-bitmap-unfork",
                 "data": {"node": "d0", "name": "inc",
                          "outcome": "success"}}, FAIL])
        assert bitmaps_of(q, "d0")["inc"]["frozen"]
        q.cmd("block-dirty-bitmap-unfork", node="d0", name="inc",
              outcome="failure")
        w.shutdown()
        rows = q.cmd("query-bitmap-lineage", node="d0", name="inc")
        assert [r["event"] for r in rows] == [
            "add", "fork", "unfork-failure", "fork", "unfork-success",
            "fork", "unfork-failure"]
        assert rows[1]["session"] == "backup-1"
        assert all(r["time"] > 0 for r in rows)
        q.cmd("block-dirty-bitmap-add", node="d0", name="other")
        q.cmd("block-dirty-bitmap-merge", node="d0", target="other",
              bitmaps=["inc"])
        rows = q.cmd("query-bitmap-lineage", name="other")
        assert [(r["event"], r["parent"]) for r in rows] == \
            [("add", None), ("merge", "d0:inc")]


def test_crash_during_a_fork_ends_as_failure(tmp_path):
    """kill -9 while a persistent bitmap is forked: at the next start
    the bitmap covers the frozen bits and the successor's (a failed
    backup), so the next incremental backup is still complete."""
    import os
    import signal
    from conftest import Server
    from qmp import QMP as Q
    state = tmp_path / "state"
    srv = Server(tmp_path, ["--state-dir", str(state)])
    admin = str(state / "admin.sock")
    try:
        with Q(admin) as q:
            img = qcow2_graph(q, tmp_path, size=256 * MiB)
            q.cmd("block-dirty-bitmap-add", node="disk0", name="p",
                  persistent=True)
            q.cmd("block-export-add", type="nbd", id="e0",
                  node_name="disk0", writable=True)
            h = srv.connect("disk0")
            h.pwrite(b"a" * 4096, 0)
            q.cmd("block-dirty-bitmap-fork", node="disk0", name="p")
            h.pwrite(b"b" * 4096, 200 * MiB)
            h.flush()
            os.kill(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(timeout=20)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        srv.log.close()
    assert qemu_bitmap_flags(img) == {"p": ["auto"]}
    os.unlink(tmp_path / "nbdd.pid")      # left by the killed daemon
    srv = Server(tmp_path, ["--state-dir", str(state)])
    try:
        with Q(admin) as q:
            b = bitmaps_of(q, "disk0")["p"]
            assert not b["inconsistent"] and not b["frozen"]
            # Both writes, the one before the fork and the one after:
            # the 64 MiB regions write intent marked around each.
            assert b["count"] == 2 * 64 * MiB
    finally:
        srv.stop()


def test_drift_between_catalogue_and_images(nbdd_server, tmp_path):
    """Bitmaps changed by another program while nbdd was stopped: a
    removed one and one added are reported (log and lineage) and the
    catalogue follows; one re-made with another granularity is not
    trusted."""
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        img = qcow2_graph(q, tmp_path, size=16 * MiB)
        for name in ("gone", "regran", "kept"):
            q.cmd("block-dirty-bitmap-add", node="disk0", name=name,
                  persistent=True)
    srv.stop()
    run(["qemu-img", "bitmap", "--remove", img, "gone"])
    run(["qemu-img", "bitmap", "--remove", img, "regran"])
    run(["qemu-img", "bitmap", "--add", "-g", "131072", img, "regran"])
    run(["qemu-img", "bitmap", "--add", img, "new"])
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        bms = bitmaps_of(q, "disk0")
        assert sorted(bms) == ["kept", "new", "regran"]
        assert bms["regran"]["inconsistent"] and not bms["kept"][
            "inconsistent"] and not bms["new"]["inconsistent"]
        events = {(r["name"], r["event"]) for r in
                  q.cmd("query-bitmap-lineage", node="disk0")}
        assert {("gone", "lost"), ("new", "found"),
                ("regran", "changed")} <= events
        assert ("kept", "lost") not in events
    out = srv.output()
    assert "bitmap 'gone' is gone from the image" in out
    assert "bitmap 'new' is in the image but was not known" in out
    assert "bitmap 'regran' has a granularity of 131072" in out
    # Reported once: the catalogue now knows.
    srv = restart(srv, nbdd_server, tmp_path)
    assert "gone from the image" not in srv.output()
    assert "was not known" not in srv.output()


def test_raw_node_keeps_persistent_bitmaps_in_a_sidecar(nbdd_server,
                                                        tmp_path):
    """A raw node's persistent bitmap lives in STATE_DIR/bitmaps: it
    comes back after a restart, survives kill -9 with every
    acknowledged write in it, and a sidecar that belongs to another
    image is set aside, not loaded."""
    import os
    import random
    import signal
    from conftest import Server
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        raw_node(q, tmp_path, "d0")
        q.cmd("block-dirty-bitmap-add", node="d0", name="p", persistent=True,
              granularity=4096)
        q.cmd("block-export-add", type="nbd", id="e", node_name="d0",
              writable=True)
        h = srv.connect("d0")
        h.pwrite(b"s" * 10, 100000)
        h.shutdown()
    assert (srv.state / "bitmaps" / "d0.bitmaps").exists()
    srv = restart(srv, nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        p = bitmaps_of(q, "d0")["p"]
        assert (p["persistent"], p["count"], p["inconsistent"]) == \
            (True, 4096, False)
    srv.stop()

    # kill -9 under write load.
    srv = Server(tmp_path, ["--state-dir", str(srv.state)])
    rnd = random.Random(7)
    acked = []
    try:
        h = srv.connect("d0")
        for i in range(200):
            off = rnd.randrange(0, 4 * MiB // 4096) * 4096
            h.pwrite(b"k" * 4096, off)
            acked.append(off)
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(timeout=20)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        srv.log.close()
    os.unlink(tmp_path / "nbdd.pid")
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert not bitmaps_of(q, "d0")["p"]["inconsistent"]
        q.cmd("block-export-del", id="e")
        q.cmd_args("block-export-add", {"type": "nbd", "id": "b",
                                        "node-name": "d0", "name": "b",
                                        "bitmaps": ["p"]})
        h = connect_ctx(srv, "b", [CONTEXT + "p"])
        runs = dirty_map(h, "p", 4 * MiB)
        h.shutdown()
        q.cmd("block-export-del", id="b")
    for off in acked + [98304]:
        assert any(o <= off < o + n for o, n in runs), off
    srv.stop()

    # Another image under the same node-name: the sidecar is not its.
    img = tmp_path / "d0.img"
    with open(img, "r+b") as f:
        f.truncate(8 * MiB)
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert bitmaps_of(q, "d0") == {}
        events = [r["event"] for r in q.cmd("query-bitmap-lineage",
                                            node="d0", name="p")]
        assert events[-1] == "lost"
    assert "is not this node's (it is for a node of another size)" in \
        srv.output()
    assert (srv.state / "bitmaps" / "d0.bitmaps.stale").exists()


def test_one_block_status_for_several_contexts(nbdd_server, tmp_path):
    """An export with two bitmaps: one BLOCK_STATUS returns
    base:allocation and both qemu:dirty-bitmap contexts, each right."""
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        raw_node(q, tmp_path, "d0")
        q.cmd("block-dirty-bitmap-add", node="d0", name="a")
        q.cmd("block-export-add", type="nbd", id="w", node_name="d0",
              writable=True)
        w = srv.connect("d0")
        w.pwrite(b"1" * 4096, 0)
        q.cmd("block-dirty-bitmap-add", node="d0", name="b",
              granularity=1 << 20)
        w.pwrite(b"2" * 4096, 2 * MiB)
        w.shutdown()
        q.cmd_args("block-export-add", {"type": "nbd", "id": "r",
                                        "node-name": "d0", "name": "r",
                                        "bitmaps": ["a", "b"]})
    h = connect_ctx(srv, "r", ["base:allocation", CONTEXT + "a",
                               CONTEXT + "b"])
    got = {}

    def cb(metacontext, off, entries, err):
        got[metacontext] = list(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(4 * MiB, 0, cb)
    assert set(got) == {"base:allocation", CONTEXT + "a", CONTEXT + "b"}
    assert got[CONTEXT + "a"][:3] == [(65536, 1), (2 * MiB - 65536, 0),
                                      (65536, 1)]
    assert got[CONTEXT + "b"][:2] == [(2 * MiB, 0), (MiB, 1)]
    h.shutdown()


def kill_and_restart(srv, nbdd_server, tmp_path):
    import os
    import signal
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(timeout=20)
    srv.log.close()
    srv.stop = lambda: None             # killed on purpose: no checks
    os.unlink(tmp_path / "nbdd.pid")
    return start(nbdd_server, tmp_path)


@pytest.mark.parametrize("kind", ["qcow2", "raw"])
def test_write_after_clear_is_durable(nbdd_server, tmp_path, kind):
    """After a clear, writes into granules that were dirty before, and
    next to them, are in the image's bitmap when they are acknowledged
    (the race where a concurrent flush rewrites the unit is closed by
    rebasing what the image is taken to hold at the clear; this test
    runs the writes one after another); and a disabled bitmap stays
    disabled across kill -9."""
    import subprocess
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        if kind == "qcow2":
            qcow2_graph(q, tmp_path, name="d0", size=16 * MiB)
        else:
            raw_node(q, tmp_path, "d0")
        q.cmd("block-dirty-bitmap-add", node="d0", name="p", persistent=True)
        q.cmd("block-dirty-bitmap-add", node="d0", name="off",
              persistent=True)
        q.cmd("block-export-add", type="nbd", id="w", node_name="d0",
              writable=True)
        h = srv.connect("d0")
        h.pwrite(b"x" * 4096, 0)            # granule 0: X
        q.cmd("block-dirty-bitmap-clear", node="d0", name="p")
        h.pwrite(b"y" * 4096, 65536)        # granule 1: Y, same unit
        h.pwrite(b"x" * 4096, 0)            # X again: must be durable
        q.cmd("block-dirty-bitmap-disable", node="d0", name="off")
        h.shutdown()
    proc = srv.proc
    srv = kill_and_restart(srv, nbdd_server, tmp_path)
    assert proc.returncode == -9
    with QMP(srv.admin) as q:
        b = bitmaps_of(q, "d0")
        assert not b["p"]["inconsistent"]
        assert b["p"]["count"] == 2 * 65536
        assert b["off"]["recording"] is False
        q.cmd("block-dirty-bitmap-remove", node="d0", name="off")
        q.cmd("block-export-del", id="w")
        q.cmd_args("block-export-add", {"type": "nbd", "id": "r",
                                        "node-name": "d0", "name": "r",
                                        "bitmaps": ["p"]})
        h = connect_ctx(srv, "r", [CONTEXT + "p"])
        assert dirty_map(h, "p", 4 * MiB) == [(0, 2 * 65536)]
        h.shutdown()


def test_bitmaps_across_resize(nbdd_server, tmp_path):
    """Growing a node with a persistent bitmap: the bitmap grows with
    it, records writes past the old end, and is valid for qemu-img and
    at the next start; an exported bitmap's node cannot be resized."""
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        img = qcow2_graph(q, tmp_path, name="d0", size=16 * MiB)
        q.cmd("block-dirty-bitmap-add", node="d0", name="p", persistent=True)
        q.cmd_args("block-export-add", {"type": "nbd", "id": "r",
                                        "node-name": "d0", "name": "r",
                                        "bitmaps": ["p"]})
        with pytest.raises(QMPError) as e:
            q.cmd("block_resize", node_name="d0", size=32 * MiB)
        assert "exported" in e.value.desc
        q.cmd("block-export-del", id="r")
        q.cmd("block_resize", node_name="d0", size=32 * MiB)
        q.cmd("block-export-add", type="nbd", id="w", node_name="d0",
              writable=True)
        h = srv.connect("d0")
        h.pwrite(b"z" * 4096, 30 * MiB)
        h.shutdown()
        assert bitmaps_of(q, "d0")["p"]["count"] == 65536
        # The file under a writable format grows with it: no bitmaps.
        f2 = str(tmp_path / "f2.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", f2, "1M"])
        q.cmd_args("blockdev-add", {"driver": "file", "node-name": "f2",
                                    "filename": f2})
        q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": "q2",
                                    "file": "f2"})
        with pytest.raises(QMPError) as e:
            q.cmd("block-dirty-bitmap-add", node="f2", name="f")
        assert "put the bitmap on the format node" in e.value.desc
    assert qemu_bitmap_flags(img, True) == {"p": ["auto"]}
    srv = restart(srv, nbdd_server, tmp_path)
    srv.stop()
    run(["qemu-img", "check", img])
    out = run(["nbdinfo", "--json", "--map=" + CONTEXT + "p", "--", "[",
               "qemu-nbd", "-r", "-f", "qcow2", "-B", "p", img, "]"]).stdout
    assert [(e["offset"], e["length"]) for e in json.loads(out)
            if e["type"] & 1] == [(30 * MiB, 65536)]
