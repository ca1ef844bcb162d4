"""Fleecing: fleece-start / fleece-stop / query-fleeces, the point-in-time
snapshot export, TRIM as "backed up", the scratch limit, and a crash in
the middle.  Real daemon, real clients (libnbd, nbdcopy, qemu-img)."""
import json
import os
import signal
import subprocess
import threading

import nbd
import pytest

from admintools import FAIL, MiB, qcow2_graph, qemu_img_check, raw_node, \
    start
from conftest import Server
from helpers import run
from qmp import QMP, QMPError

CTX = "qemu:dirty-bitmap:"


def live(q, node="disk0", export="live"):
    q.cmd("block-export-add", type="nbd", id=export, node_name=node,
          name=export, writable=True)


def dirty_runs(h, name, size):
    runs, off = [], 0
    while off < size:
        got = []

        def cb(ctx, o, entries, err):
            if ctx == CTX + name:
                got.extend(zip(entries[0::2], entries[1::2]))
            return 0

        h.block_status(size - off, off, cb)
        for length, flags in got:
            if flags & 1:
                if runs and sum(runs[-1]) == off:
                    runs[-1] = (runs[-1][0], runs[-1][1] + length)
                else:
                    runs.append((off, length))
            off += length
    return runs


def bitmap(q, node, name):
    for n in q.cmd("query-named-block-nodes"):
        if n["node-name"] == node:
            for b in n.get("dirty-bitmaps", []):
                if b["name"] == name:
                    return b
    return None


def snapshot(srv, export, bitmaps=()):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    for b in bitmaps:
        h.add_meta_context(CTX + b)
    h.connect_uri(srv.uri(export))
    return h


def fill(h, size, seed):
    """A recognisable pattern per MiB."""
    for off in range(0, size, MiB):
        h.pwrite(bytes([(seed + off // MiB) % 251 + 1]) * MiB, off)


def test_snapshot_keeps_the_point_in_time(nbdd_server, tmp_path):
    """Writes, zeroes and discards through the live export after
    fleece-start never show in the snapshot; nbdcopy and qemu-img read
    it back equal to the disk as recorded at fleece time."""
    size = 32 * MiB
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        qcow2_graph(q, tmp_path, size=size)
        live(q)
        h = srv.connect("live")
        fill(h, 24 * MiB, 7)
        h.flush()
        before = str(tmp_path / "before.raw")
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
             srv.uri("live"), before])
        r = q.cmd("fleece-start", node="disk0", id="f1", export="snap1")
        assert r == {"id": "f1", "export": "snap1"}
        h.pwrite(b"\xee" * (3 * MiB + 4096), MiB - 4096)
        h.zero(2 * MiB, 8 * MiB)
        h.trim(MiB, 12 * MiB)
        h.pwrite(b"\xdd" * 4096, 30 * MiB)      # a hole before
        copy = str(tmp_path / "copy.raw")
        run(["nbdcopy", srv.uri("snap1"), copy])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", before, copy])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", before,
             srv.uri("snap1")])
        # The live disk has the new data.
        assert h.pread(4096, MiB) == b"\xee" * 4096
        assert h.pread(4096, 8 * MiB) == b"\0" * 4096
        s = snapshot(srv, "snap1")
        assert s.pread(4096, 30 * MiB) == b"\0" * 4096
        with pytest.raises(nbd.Error) as e:
            s.pwrite(b"x" * 512, 0)
        assert e.value.errno == "EPERM"
        s.shutdown()
        info = q.cmd("query-fleeces")
        assert [f["id"] for f in info] == ["f1"]
        assert info[0]["node"] == "disk0" and info[0]["export"] == "snap1"
        assert info[0]["state"] == "running"
        # Old data of every cluster written was saved once.
        assert info[0]["scratch-bytes"] >= 4 * MiB
        q.cmd("fleece-stop", id="f1", outcome="success")
        assert q.cmd("query-fleeces") == []
        assert not os.listdir(srv.state / "fleece")
        names = [n["node-name"] for n in q.cmd("query-named-block-nodes")]
        assert not [n for n in names if n.startswith("f1-")]
        assert "snap1" not in [e["id"] for e in q.cmd("query-block-exports")]
        # The live export goes on, on the node itself again.
        h.pwrite(b"\xcc" * 4096, 0)
        assert h.pread(4096, 0) == b"\xcc" * 4096
        h.shutdown()


def test_bitmaps_fork_and_their_outcomes(nbdd_server, tmp_path):
    """The snapshot exports the frozen bits; the successor records the
    writes after the start; success keeps only those, failure both."""
    size = 64 * MiB
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        qcow2_graph(q, tmp_path, size=size)
        live(q)
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0",
              persistent=True)
        h = srv.connect("live")
        h.pwrite(b"a" * MiB, 0)
        h.pwrite(b"b" * 4096, 10 * MiB)
        for outcome, expect in (("success", [(20 * MiB, 65536)]),
                                ("failure", [(0, MiB), (10 * MiB, 65536),
                                             (20 * MiB, 65536)])):
            q.cmd("fleece-start", node="disk0", id="f", bitmaps=["b0"])
            h.pwrite(b"c" * 4096, 20 * MiB)
            s = snapshot(srv, "f", ["b0"])
            assert dirty_runs(s, "b0", size) == [(0, MiB), (10 * MiB, 65536)]
            assert bitmap(q, "disk0", "b0")["frozen"]
            with pytest.raises(QMPError, match="forked"):
                q.cmd("block-dirty-bitmap-clear", node="disk0", name="b0")
            s.shutdown()
            q.cmd("fleece-stop", id="f", outcome=outcome)
            b = bitmap(q, "disk0", "b0")
            assert not b["frozen"]
            assert b["count"] == sum(n for _, n in expect), outcome
            q.cmd("block-export-add", type="nbd", id="chk", node_name="disk0",
                  name="chk", bitmaps=["b0"])
            c = snapshot(srv, "chk", ["b0"])
            assert dirty_runs(c, "b0", size) == expect, outcome
            c.shutdown()
            q.cmd("block-export-del", id="chk")
            if outcome == "success":
                # As it was before this round, for the failure round.
                h.pwrite(b"a" * MiB, 0)
                h.pwrite(b"b" * 4096, 10 * MiB)
                q.cmd("block-dirty-bitmap-clear", node="disk0", name="b0")
                h.pwrite(b"a" * MiB, 0)
                h.pwrite(b"b" * 4096, 10 * MiB)
        lineage = [(e["event"], e["session"])
                   for e in q.cmd("query-bitmap-lineage", node="disk0",
                                  name="b0")]
        assert ("fork", "f") in lineage
        assert ("unfork-success", "f") in lineage
        assert ("unfork-failure", "f") in lineage
        h.shutdown()


def test_incremental_fleece_saves_only_what_the_bitmaps_mark(nbdd_server,
                                                            tmp_path):
    """incremental: true keeps the point in time only where the frozen
    bitmaps mark (what an incremental backup reads): writes elsewhere
    save nothing, reads there fail, and the dirty extents read back as
    they were at the start."""
    size = 64 * MiB
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        qcow2_graph(q, tmp_path, size=size)
        live(q)
        h = srv.connect("live")
        fill(h, size, 3)
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0")
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b1",
              granularity=4096)
        h.pwrite(b"a" * MiB, 4 * MiB)           # b0 and b1
        q.cmd("block-dirty-bitmap-disable", node="disk0", name="b0")
        h.pwrite(b"b" * 4096, 40 * MiB + 8192)  # b1 only, mid-cluster
        h.flush()
        with pytest.raises(QMPError, match="needs 'bitmaps'"):
            q.cmd("fleece-start", node="disk0", incremental=True)
        q.cmd("fleece-start", node="disk0", id="f", bitmaps=["b0", "b1"],
              incremental=True)
        [info] = q.cmd("query-fleeces")
        assert info["incremental"] is True
        # Writes all over the disk: only the marked clusters are saved.
        for off in range(0, size, MiB):
            h.pwrite(b"z" * 4096, off)
        h.pwrite(b"z" * MiB, 4 * MiB)
        h.pwrite(b"y" * 8192, 40 * MiB)
        saved = q.cmd("query-fleeces")[0]["scratch-bytes"]
        assert saved == MiB + 65536, saved
        s = snapshot(srv, "f", ["b0", "b1"])
        assert dirty_runs(s, "b0", size) == [(4 * MiB, MiB)]
        assert dirty_runs(s, "b1", size) == [(4 * MiB, MiB),
                                              (40 * MiB + 8192, 4096)]
        assert s.pread(MiB, 4 * MiB) == b"a" * MiB
        assert s.pread(4096, 40 * MiB + 8192) == b"b" * 4096
        # Within the saved cluster, the rest is as it was too.
        assert s.pread(8192, 40 * MiB) == bytes([(3 + 40) % 251 + 1]) * 8192
        # Outside: the live node moved on, so the snapshot says so.
        for off in (0, 8 * MiB, 40 * MiB + 65536, size - 4096):
            with pytest.raises(nbd.Error) as e:
                s.pread(4096, off)
            assert e.value.errno == "EIO", off
        # And its status there is a hole, not zeroes: no copy takes it
        # for zeroes.
        got = {}

        def cb(ctx, o, entries, err):
            if ctx == "base:allocation":
                got[o] = entries[1]
            return 0

        for off in (0, 40 * MiB + 65536):
            got.clear()
            s.block_status(4096, off, cb)
            assert got == {off: 1}, (off, got)       # HOLE, not ZERO
        got.clear()
        s.block_status(4096, 4 * MiB, cb)
        assert got == {4 * MiB: 0}                   # saved data
        s.shutdown()
        p = run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                 srv.uri("f"), str(tmp_path / "all.raw")], check=False)
        assert p.returncode != 0
        # An incremental client (qemu-img map, then reads of the dirty
        # extents only) gets exactly the old data.
        m = json.loads(run(["qemu-img", "map", "--output=json",
                            "--image-opts", "driver=nbd,server.type=unix,"
                            f"server.path={srv.sock},export=f,"
                            f"x-dirty-bitmap={CTX}b1"]).stdout)
        # With x-dirty-bitmap, qemu reports dirty extents as not data.
        dirty = [(e["start"], e["length"]) for e in m if not e["data"]]
        assert dirty == [(4 * MiB, MiB), (40 * MiB + 8192, 4096)]
        copy = tmp_path / "inc.raw"
        with open(copy, "wb") as f:
            f.truncate(size)
        c = snapshot(srv, "f")
        with open(copy, "r+b") as f:
            for at, length in dirty:
                f.seek(at)
                f.write(c.pread(length, at))
        c.shutdown()
        with open(copy, "rb") as f:
            f.seek(4 * MiB)
            assert f.read(MiB) == b"a" * MiB
        q.cmd("fleece-stop", id="f", outcome="success")
        assert q.cmd("query-fleeces") == []
        h.shutdown()


def test_trim_consumes(nbdd_server, tmp_path):
    """TRIM on the snapshot: the scratch space goes, the range can no
    longer be read, and a failure merges back only the frozen bits not
    consumed (the successor's are kept whatever their range)."""
    size = 64 * MiB
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        qcow2_graph(q, tmp_path, size=size)
        live(q)
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0")
        h = srv.connect("live")
        h.pwrite(b"a" * 4 * MiB, 0)
        h.pwrite(b"b" * MiB, 16 * MiB)
        q.cmd("fleece-start", node="disk0", id="f", bitmaps=["b0"])
        h.pwrite(b"c" * 4 * MiB, 0)             # 4 MiB saved
        used = q.cmd("query-fleeces")[0]["scratch-bytes"]
        assert used == 4 * MiB
        s = snapshot(srv, "f", ["b0"])
        assert s.can_trim()
        assert s.pread(MiB, 0) == b"a" * MiB
        s.trim(2 * MiB, 0)                      # backed up
        s.trim(1000, 16 * MiB)                  # no whole granule: nothing
        assert q.cmd("query-fleeces")[0]["scratch-bytes"] == 2 * MiB
        with pytest.raises(nbd.Error) as e:
            s.pread(4096, MiB)
        assert e.value.errno == "EIO"
        assert s.pread(4096, 2 * MiB) == b"a" * 4096
        assert dirty_runs(s, "b0", size) == [(2 * MiB, 2 * MiB),
                                             (16 * MiB, MiB)]
        # Writes there are not saved again.
        h.pwrite(b"d" * MiB, 0)
        assert q.cmd("query-fleeces")[0]["scratch-bytes"] == 2 * MiB
        s.shutdown()
        q.cmd("fleece-stop", id="f", outcome="failure")
        b = bitmap(q, "disk0", "b0")
        # 2-4 MiB and 16 MiB frozen, not consumed; 0-4 MiB successor.
        assert b["count"] == 4 * MiB + MiB
        h.shutdown()


def test_scratch_limit_breaks_the_snapshot_not_the_disk(nbdd_server,
                                                        tmp_path):
    size = 32 * MiB
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        qcow2_graph(q, tmp_path, size=size)
        live(q)
        h = srv.connect("live")
        fill(h, size, 3)
        q.cmd("fleece-start", node="disk0", id="f", scratch_limit=MiB)
        s = snapshot(srv, "f")
        h.pwrite(b"x" * 512 * 1024, 0)          # fits
        assert s.pread(4096, 0) == bytes([4]) * 4096
        h.pwrite(b"y" * 4 * MiB, 4 * MiB)       # does not
        ev = q.wait_event("FLEECE_BROKEN")
        assert ev["data"]["id"] == "f"
        assert "scratch limit" in ev["data"]["reason"]
        info = q.cmd("query-fleeces")[0]
        assert info["state"] == "broken" and "scratch limit" in info["error"]
        assert info["scratch-bytes"] <= MiB
        with pytest.raises(nbd.Error) as e:
            s.pread(4096, 0)
        assert e.value.errno == "EIO"
        # The live disk took every write.
        h.pwrite(b"z" * MiB, 20 * MiB)
        assert h.pread(4 * MiB, 4 * MiB) == b"y" * 4 * MiB
        assert h.pread(MiB, 20 * MiB) == b"z" * MiB
        s.shutdown()
        q.cmd("fleece-stop", id="f", outcome="failure")
        h.shutdown()


def test_crash_mid_fleece_ends_it_as_failure(tmp_path):
    """kill -9 with a fleece running: at the next start the session is
    gone, its scratch deleted, the bitmap holds frozen and successor
    bits, and the lineage says the fork failed."""
    state = tmp_path / "state"
    srv = Server(tmp_path, ["--state-dir", str(state)])
    admin = str(state / "admin.sock")
    try:
        with QMP(admin) as q:
            img = qcow2_graph(q, tmp_path, size=256 * MiB)
            q.cmd("block-dirty-bitmap-add", node="disk0", name="p",
                  persistent=True)
            live(q)
            h = srv.connect("live")
            h.pwrite(b"a" * 4096, 0)
            q.cmd("fleece-start", node="disk0", id="f", bitmaps=["p"])
            h.pwrite(b"b" * 4096, 200 * MiB)
            h.flush()
            scratch = q.cmd("query-fleeces")[0]["scratch-file"]
            assert os.path.exists(scratch)
            os.kill(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(timeout=20)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        srv.log.close()
    os.unlink(tmp_path / "nbdd.pid")
    srv = Server(tmp_path, ["--state-dir", str(state)])
    try:
        with QMP(admin) as q:
            assert q.cmd("query-fleeces") == []
            assert not os.path.exists(scratch)
            b = bitmap(q, "disk0", "p")
            assert not b["inconsistent"] and not b["frozen"]
            assert b["count"] == 2 * 64 * MiB   # both writes' regions
            events = [(e["event"], e["session"]) for e in
                      q.cmd("query-bitmap-lineage", node="disk0", name="p")]
            assert events[-2:] == [("fork", "f"), ("unfork-failure", "f")]
            # The live export is back on the node, and a new fleece
            # works.
            assert [e["node-name"] for e in q.cmd("query-block-exports")] \
                == ["disk0"]
            q.cmd("fleece-start", node="disk0", id="f", bitmaps=["p"])
            q.cmd("fleece-stop", id="f", outcome="success")
        assert "cut short" in srv.output()
    finally:
        srv.stop()
    qemu_img_check(img)


def test_errors_are_clear_and_change_nothing(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        qcow2_graph(q, tmp_path)
        raw_node(q, tmp_path, "r0")
        live(q)
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0")
        q.cmd("block-export-add", type="nbd", id="withb", node_name="disk0",
              name="withb", bitmaps=["b0"])

        def refused(match, cls="GenericError", **args):
            with pytest.raises(QMPError, match=match) as e:
                q.cmd("fleece-start", **args)
            assert e.value.cls == cls

        refused("does not exist", "DeviceNotFound", node="nope")
        refused("has no bitmap 'zz'", "DeviceNotFound", node="disk0",
                bitmaps=["zz"])
        refused("in use by 1 export", node="disk0", bitmaps=["b0"])
        refused("not valid", node="disk0", id="bad id")
        refused("export 'live' exists", node="disk0", export="live")
        refused("unexpected|not allowed|unknown", node="disk0", bogus=1)
        q.cmd("fleece-start", node="disk0", id="f")
        refused("already fleeced by 'f'", node="disk0", id="g")
        refused("fleece 'f' exists", node="r0", id="f")
        refused("is a copy-before-write node", node="f-cbw")
        refused("is a snapshot-access node", node="f-snap")
        with pytest.raises(QMPError, match="another node"):
            q.cmd_args("blockdev-add", {"driver": "copy-before-write",
                                        "node-name": "c0", "file": "r0",
                                        "target": "r0"})
        # Nothing the refusals made is left over.
        assert [f["id"] for f in q.cmd("query-fleeces")] == ["f"]
        assert sorted(os.listdir(srv.state / "fleece")) == ["f.qcow2"]
        # Graph changes that would break the snapshot are refused.
        with pytest.raises(QMPError, match="resize"):
            q.cmd("block_resize", node_name="disk0", size=128 * MiB)
        with pytest.raises(QMPError, match="in use"):
            q.cmd("blockdev-del", node_name="f-snap")
        with pytest.raises(QMPError) as e:
            q.cmd("fleece-stop", id="nope", outcome="success")
        assert e.value.cls == "DeviceNotFound"
        with pytest.raises(QMPError, match="outcome"):
            q.cmd("fleece-stop", id="f", outcome="maybe")
        # Two fleeces of different nodes at once.
        q.cmd("fleece-start", node="r0", id="g")
        assert sorted(f["id"] for f in q.cmd("query-fleeces")) == ["f", "g"]
        q.cmd("fleece-stop", id="f", outcome="success")
        q.cmd("fleece-stop", id="g", outcome="failure")
        assert q.cmd("query-fleeces") == []


def test_start_in_a_failed_transaction_leaves_nothing(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        qcow2_graph(q, tmp_path)
        live(q)
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0")
        with pytest.raises(QMPError):
            q.cmd("transaction", actions=[
                {"type": "fleece-start",
                 "data": {"node": "disk0", "id": "f", "bitmaps": ["b0"]}},
                FAIL])
        assert q.cmd("query-fleeces") == []
        assert not os.path.exists(srv.state / "fleece" / "f.qcow2")
        assert not bitmap(q, "disk0", "b0")["frozen"]
        names = [n["node-name"] for n in q.cmd("query-named-block-nodes")]
        assert not [n for n in names if n.startswith("f-")]
        # And in a transaction that succeeds, with a bitmap made there.
        q.cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk0", "name": "b1"}},
            {"type": "fleece-start",
             "data": {"node": "disk0", "id": "f", "bitmaps": ["b1"]}}])
        assert q.cmd("query-fleeces")[0]["bitmaps"] == ["b1"]
        q.cmd("fleece-stop", id="f", outcome="success")


def test_live_writer_and_disconnecting_client(nbdd_server, tmp_path):
    """A writer hammers the live export from before the start to after
    the stop; a backup client reads part of the snapshot and goes away;
    the snapshot always equals the disk at the start, no live write
    fails, and the image stays consistent."""
    size = 16 * MiB
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        img = qcow2_graph(q, tmp_path, size=size)
        live(q)
        h = srv.connect("live")
        fill(h, size, 11)
        stop = threading.Event()
        errors = []

        def writer():
            w = srv.connect("live")
            n = 0
            try:
                while not stop.is_set():
                    off = (n * 69632) % (size - 4096)
                    w.pwrite(bytes([n % 256]) * 4096, off)
                    n += 1
                w.flush()
            except Exception as e:          # noqa: BLE001
                errors.append(e)
            w.shutdown()

        # The point in time: the writer starts after the recording.
        before = str(tmp_path / "before.raw")
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
             srv.uri("live"), before])
        q.cmd("fleece-start", node="disk0", id="f")
        t = threading.Thread(target=writer)
        t.start()
        try:
            part = snapshot(srv, "f")
            assert part.pread(MiB, 0) == open(before, "rb").read(MiB)
            del part                         # goes away mid-backup
            copy = str(tmp_path / "copy.raw")
            run(["nbdcopy", srv.uri("f"), copy])
            run(["qemu-img", "compare", "-f", "raw", "-F", "raw", before,
                 copy])
            q.cmd("fleece-stop", id="f", outcome="success")
        finally:
            stop.set()
            t.join()
        assert not errors
        h.shutdown()
    srv.stop()
    qemu_img_check(img)


def test_nbdinfo_sees_the_snapshot_bitmap(nbdd_server, tmp_path):
    size = 64 * MiB
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        qcow2_graph(q, tmp_path, size=size)
        live(q)
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0")
        h = srv.connect("live")
        h.pwrite(b"a" * 4096, 5 * MiB)
        q.cmd("fleece-start", node="disk0", id="f", bitmaps=["b0"])
        h.pwrite(b"b" * 4096, 9 * MiB)
        out = subprocess.run(["nbdinfo", "--map=" + CTX + "b0",
                              srv.uri("f")], check=True,
                             capture_output=True, text=True).stdout
        dirty = [line.split()[:2] for line in out.splitlines()
                 if line.split()[2] == "1"]
        assert dirty == [[str(5 * MiB), "65536"]]
        q.cmd("fleece-stop", id="f", outcome="success")
        h.shutdown()


def test_scratch_dir_that_vanishes(nbdd_server, tmp_path):
    """The scratch image deleted under a running fleece: the open image
    goes on serving, and the stop does not trip on the missing file."""
    import shutil
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        qcow2_graph(q, tmp_path, size=16 * MiB)
        live(q)
        h = srv.connect("live")
        fill(h, 16 * MiB, 5)
        q.cmd("fleece-start", node="disk0", id="f")
        shutil.rmtree(srv.state / "fleece")
        h.pwrite(b"n" * MiB, 0)
        s = snapshot(srv, "f")
        assert s.pread(MiB, 0) == bytes([6]) * MiB
        s.shutdown()
        q.cmd("fleece-stop", id="f", outcome="success")
        assert q.cmd("query-fleeces") == []
        # A new fleece makes the directory again.
        q.cmd("fleece-start", node="disk0", id="f")
        q.cmd("fleece-stop", id="f", outcome="success")
        h.shutdown()


def test_scratch_leftovers_go_at_start(nbdd_server, tmp_path):
    """A scratch image without a session (the daemon killed inside
    fleece-start, before the catalogue had it) is deleted at start."""
    srv = start(nbdd_server, tmp_path)
    srv.stop()
    (srv.state / "fleece").mkdir()
    stray = srv.state / "fleece" / "lost.qcow2"
    stray.write_bytes(b"QFI\xfb" + b"\0" * 508)
    keep = srv.state / "fleece" / "notes.txt"
    keep.write_text("not ours to delete")
    srv = start(nbdd_server, tmp_path)
    with QMP(srv.admin) as q:
        assert q.cmd("query-fleeces") == []
    assert not stray.exists() and keep.exists()
