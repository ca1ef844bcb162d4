"""The qemu:allocation-depth meta context.

Backing chains are made with qemu-img and qemu-io, served by nbdd and,
on the same image, by qemu-nbd -A (read-only), and what the two say is
compared with real clients: nbdinfo --map and --list, libnbd's
block_status with both contexts at once, and a raw socket for the
negotiation and the reply layout (one status chunk per selected
context, in id order, the last one DONE).
"""
import json
import os
import socket
import subprocess
import time

import nbd
import pytest

import nbdraw as nr
from conftest import blockdev_args, export_args, have
from helpers import KiB, MiB, map_export, merge, run
from nbdraw import NBDRaw

pytestmark = pytest.mark.skipif(
    not all(have(p) for p in ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")),
    reason="needs qemu-img, qemu-io, qemu-nbd and nbdinfo")

BASE = "base:allocation"
DEPTH = "qemu:allocation-depth"


# -- images --------------------------------------------------------------

def create(path, size, backing=None, backing_fmt="qcow2", opts=""):
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", opts]
    if backing:
        argv += ["-b", str(backing), "-F", backing_fmt]
    run(argv + [str(path), str(size)])
    return path


def qemu_io(img, *cmds, fmt="qcow2"):
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    run(argv + [str(img)])


def raw_file(path, size, data=()):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in data:
            f.seek(off)
            f.write(b"\xab" * n)
    return path


def chain_two(d):
    """qcow2 over qcow2: data in the base only, in both, zeroes and an
    unmapped range in the top (still 'allocated' there), compressed
    clusters in the base."""
    base = create(d / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 1 0 192k", "write -P 2 1M 128k",
            "write -c -P 3 3M 64k")
    top = create(d / "top.qcow2", 4 * MiB, backing=base)
    qemu_io(top, "write -P 4 64k 64k", "write -z 2M 64k",
            "write -z -u 1M 64k")
    return top, "qcow2", {0, 1, 2}


def chain_three(d):
    """top -> mid -> base, every depth present."""
    base = create(d / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 1 0 1M")
    mid = create(d / "mid.qcow2", 4 * MiB, backing=base)
    qemu_io(mid, "write -P 2 512k 1M")
    top = create(d / "top.qcow2", 4 * MiB, backing=mid)
    qemu_io(top, "write -P 3 1M 1M", "write -P 3 3M 64k")
    return top, "qcow2", {0, 1, 2, 3}


def chain_raw_base(d):
    """qcow2 over a sparse raw base: a raw node holds every byte, holes
    included, so nothing is depth 0."""
    base = raw_file(d / "base.raw", 4 * MiB, [(1 * MiB, 4096)])
    top = create(d / "top.qcow2", 4 * MiB, backing=base, backing_fmt="raw")
    qemu_io(top, "write -P 5 2M 64k")
    return top, "qcow2", {1, 2}


def chain_short_base(d):
    """An overlay larger than its backing: past the backing's end, the
    zeroes count as the backing's (depth 2), not as absent (QEMU's
    block status says so since 5.2, and qemu-nbd reports it)."""
    base = create(d / "base.qcow2", 1 * MiB)
    qemu_io(base, "write -P 1 0 512k")
    top = create(d / "top.qcow2", 4 * MiB, backing=base)
    qemu_io(top, "write -P 2 3M 64k")
    return top, "qcow2", {0, 1, 2}


def chain_short_mid(d):
    """A short middle layer hides the base past its end: depth 2 there,
    whatever the base holds."""
    base = create(d / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 1 0 4M")
    mid = create(d / "mid.qcow2", 2 * MiB, backing=base)
    qemu_io(mid, "write -P 2 512k 64k")
    top = create(d / "top.qcow2", 4 * MiB, backing=mid)
    qemu_io(top, "write -P 3 3M 64k")
    return top, "qcow2", {1, 2, 3}


def chain_short_deep(d):
    """A short base under a full-size middle layer: depth 3 past the
    base's end."""
    base = create(d / "base.qcow2", 1 * MiB)
    qemu_io(base, "write -P 1 0 512k")
    mid = create(d / "mid.qcow2", 4 * MiB, backing=base)
    qemu_io(mid, "write -P 2 3M 64k")
    top = create(d / "top.qcow2", 4 * MiB, backing=mid)
    qemu_io(top, "write -P 3 0 64k")
    return top, "qcow2", {0, 1, 2, 3}


def chain_subclusters(d):
    """Extended L2: a 4k write allocates one subcluster in the top, the
    rest of its cluster still comes from the base."""
    base = create(d / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 1 0 1M")
    top = create(d / "top.qcow2", 4 * MiB, backing=base,
                 opts="extended_l2=on,cluster_size=128k")
    qemu_io(top, "write -P 2 68k 4k", "write -P 2 1536k 8k")
    return top, "qcow2", {0, 1, 2}


def chain_fragmented(d):
    """Many small extents: 4k clusters, a third in the top, half in the
    base, so that a map takes several requests and descriptors."""
    base = create(d / "base.qcow2", 4 * MiB, opts="cluster_size=4k")
    qemu_io(base, *["write -P 1 %d 4k" % (i * 8 * KiB) for i in range(512)])
    top = create(d / "top.qcow2", 4 * MiB, backing=base,
                 opts="cluster_size=4k")
    qemu_io(top, *["write -P 2 %d 4k" % (i * 12 * KiB) for i in range(341)])
    return top, "qcow2", {0, 1, 2}


def single_qcow2(d):
    img = create(d / "one.qcow2", 4 * MiB)
    qemu_io(img, "write -P 1 64k 64k", "write -z 1M 64k")
    return img, "qcow2", {0, 1}


def single_raw(d):
    return raw_file(d / "one.raw", 4 * MiB, [(0, 4096), (2 * MiB, 8192)]), \
        "raw", {1}


CHAINS = {
    "two": chain_two,
    "three": chain_three,
    "raw-base": chain_raw_base,
    "short-base": chain_short_base,
    "short-mid": chain_short_mid,
    "short-deep": chain_short_deep,
    "subclusters": chain_subclusters,
    "fragmented": chain_fragmented,
    "qcow2": single_qcow2,
    "raw": single_raw,
}


# -- servers -------------------------------------------------------------

def serve_nbdd(nbdd_server, img, fmt):
    """A read-only node and export 'disk0', so qemu tools can read the
    image at the same time."""
    if fmt == "raw":
        args = blockdev_args(img, extra="read-only=on")
    else:
        args = ["--blockdev", json.dumps({
            "driver": "qcow2", "node-name": "disk0", "read-only": True,
            "file": {"driver": "file", "filename": str(img)}})]
    return nbdd_server(args + export_args(writable=False))


def listening(path):
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


@pytest.fixture
def qemu_nbd(tmp_path):
    """Factory: qemu_nbd(img, fmt) serves @img read-only with
    qemu:allocation-depth (-A) as export 'disk0'; returns its URI."""
    procs = []

    def start(img, fmt):
        sock = tmp_path / ("qemu-nbd-%d.sock" % len(procs))
        p = subprocess.Popen(["qemu-nbd", "-r", "-A", "-t", "-f", fmt,
                              "-x", "disk0", "-k", str(sock), str(img)],
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        procs.append(p)
        # The socket file appears at bind(), before listen(): wait
        # until a connection goes through.
        deadline = time.monotonic() + 20
        while not listening(sock):
            if p.poll() is not None:
                raise RuntimeError("qemu-nbd exited: " +
                                   p.stderr.read().decode(errors="replace"))
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.02)
        return f"nbd+unix:///disk0?socket={sock}"

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture
def three(nbdd_server, qemu_nbd, tmp_path):
    """The three-deep chain served by both: (nbdd server, qemu-nbd URI)."""
    img, fmt, _ = chain_three(tmp_path)
    return serve_nbdd(nbdd_server, img, fmt), qemu_nbd(img, fmt)


# -- what a client sees ----------------------------------------------------

def nbdinfo_depth(uri, size):
    """nbdinfo --map=qemu:allocation-depth --json, checked to tile the
    export, as merged [(length, depth)]."""
    doc = json.loads(run(["nbdinfo", "--map=" + DEPTH, "--json",
                          uri]).stdout)
    pos = 0
    for e in doc:
        assert e["offset"] == pos and e["length"] > 0, doc
        pos += e["length"]
    assert pos == size, doc
    return merge([(e["length"], e["type"]) for e in doc])


def connect(uri, contexts):
    h = nbd.NBD()
    for ctx in contexts:
        h.add_meta_context(ctx)
    h.connect_uri(uri)
    for ctx in contexts:
        assert h.can_meta_context(ctx), ctx
    return h


def status(h, offset, length, flags=0):
    """One BLOCK_STATUS: [(context, [(length, flags), ...])] in the
    order the callbacks came."""
    got = []

    def cb(ctx, off, entries, err):
        assert err.value == 0
        assert off == offset
        got.append((ctx, list(zip(entries[::2], entries[1::2]))))
        return 0

    h.block_status(length, offset, cb, flags)
    return got


def map_both(h):
    """The whole export's maps of both contexts, from requests that
    select both, as {context: merged [(length, flags)]}."""
    size = h.get_size()
    maps = {BASE: [], DEPTH: []}
    off = 0
    while off < size:
        got = status(h, off, size - off)
        assert [c for c, _ in got] == [BASE, DEPTH], got
        step = None
        for ctx, ext in got:
            assert ext and all(n > 0 for n, _ in ext), got
            total = sum(n for n, _ in ext)
            assert total <= size - off, got
            step = total if step is None else min(step, total)
        # Take both up to the shorter one: the next request covers the
        # rest.
        for ctx, ext in got:
            left = step
            for n, fl in ext:
                if left == 0:
                    break
                maps[ctx].append((min(n, left), fl))
                left -= min(n, left)
        off += step
    return {k: merge(v) for k, v in maps.items()}


def depth_at(depth_map, offset):
    pos = 0
    for n, d in depth_map:
        if pos <= offset < pos + n:
            return d, pos + n - offset
        pos += n
    raise AssertionError(f"offset {offset} past the map")


def list_contexts(uri, queries):
    """LIST_META_CONTEXT with @queries (libnbd sends the added contexts
    as the queries; none: list everything)."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    for q in queries:
        h.add_meta_context(q)
    h.connect_uri(uri)
    names = []
    h.opt_list_meta_context(lambda name: names.append(name) or 0)
    h.opt_abort()
    return names


# -- depth values match QEMU -------------------------------------------------

@pytest.mark.parametrize("kind", sorted(CHAINS))
def test_depth_matches_qemu_nbd(nbdd_server, qemu_nbd, tmp_path, kind):
    img, fmt, depths = CHAINS[kind](tmp_path)
    srv = serve_nbdd(nbdd_server, img, fmt)
    size = connect(srv.uri(), []).get_size()
    got = nbdinfo_depth(srv.uri(), size)
    want = nbdinfo_depth(qemu_nbd(img, fmt), size)
    assert got == want
    assert {d for _, d in got} == depths


def test_depth_known_layout(three):
    """The three-deep chain, by hand: base [0, 1M), mid [512k, 1.5M),
    top [1M, 2M) and [3M, 3M + 64k)."""
    srv, _ = three
    assert nbdinfo_depth(srv.uri(), 4 * MiB) == [
        (512 * KiB, 3), (512 * KiB, 2), (1 * MiB, 1), (1 * MiB, 0),
        (64 * KiB, 1), (1 * MiB - 64 * KiB, 0)]


def test_depth_known_layout_short(nbdd_server, tmp_path):
    """Short layers, by hand (see chain_short_base, chain_short_deep)."""
    args = []
    for name, make in [("short", chain_short_base), ("deep", chain_short_deep)]:
        d = tmp_path / name
        d.mkdir()
        img, _, _ = make(d)
        args += ["--blockdev", json.dumps({
            "driver": "qcow2", "node-name": name, "read-only": True,
            "file": {"driver": "file", "filename": str(img)}})]
        args += export_args(node=name, name=name, writable=False)
    srv = nbdd_server(args)
    assert nbdinfo_depth(srv.uri("short"), 4 * MiB) == [
        (512 * KiB, 2), (512 * KiB, 0), (2 * MiB, 2), (64 * KiB, 1),
        (1 * MiB - 64 * KiB, 2)]
    assert nbdinfo_depth(srv.uri("deep"), 4 * MiB) == [
        (64 * KiB, 1), (448 * KiB, 3), (512 * KiB, 0), (2 * MiB, 3),
        (64 * KiB, 2), (1 * MiB - 64 * KiB, 3)]


# -- libnbd: both contexts at once -----------------------------------------

def test_both_contexts_one_callback_each(three):
    srv, quri = three
    for uri in (srv.uri(), quri):       # qemu-nbd behaves the same
        h = connect(uri, [BASE, DEPTH])
        for off, ln in [(0, 4 * MiB), (700 * KiB, 1 * MiB), (4 * MiB - 1, 1),
                        (1 * MiB + 1, 3 * MiB - 1)]:
            got = status(h, off, ln)
            assert [c for c, _ in got] == [BASE, DEPTH], (uri, got)
            for _, ext in got:
                assert ext and all(n > 0 for n, _ in ext), got
                assert sum(n for n, _ in ext) <= ln, got
        h.shutdown()


def test_both_contexts_maps(three):
    """Selecting both changes neither: the depth map is qemu-nbd's, the
    allocation map is the one nbdd gives with base:allocation alone."""
    srv, quri = three
    maps = map_both(connect(srv.uri(), [BASE, DEPTH]))
    assert maps[DEPTH] == nbdinfo_depth(quri, 4 * MiB)
    assert maps[BASE] == map_export(connect(srv.uri(), [BASE]))


def test_req_one(three):
    srv, quri = three
    want = nbdinfo_depth(quri, 4 * MiB)
    h = connect(srv.uri(), [BASE, DEPTH])
    for off in [0, 100 * KiB, 512 * KiB, 1 * MiB - 1, 2 * MiB, 3 * MiB + 4095,
                4 * MiB - 512]:
        ln = 4 * MiB - off
        got = status(h, off, ln, nbd.CMD_FLAG_REQ_ONE)
        assert [c for c, _ in got] == [BASE, DEPTH], got
        for _, ext in got:
            assert len(ext) == 1 and 0 < ext[0][0] <= ln, got
        d, run_left = depth_at(want, off)
        assert got[1][1][0] == (run_left, d), (off, got)


def test_depth_only(three):
    srv, quri = three
    h = connect(srv.uri(), [DEPTH])
    assert not h.can_meta_context(BASE)
    got = status(h, 0, 4 * MiB)
    assert [c for c, _ in got] == [DEPTH]
    assert merge(got[0][1]) == nbdinfo_depth(quri, 4 * MiB)


# -- listing -----------------------------------------------------------------

def test_nbdinfo_list(three):
    srv, quri = three
    for uri in (srv.uri(), quri):
        doc = json.loads(run(["nbdinfo", "--list", "--json", uri]).stdout)
        [exp] = doc["exports"]
        assert exp["contexts"] == [BASE, DEPTH], (uri, exp)


@pytest.mark.parametrize("queries,want", [
    ([], [BASE, DEPTH]),
    (["qemu:"], [DEPTH]),
    (["base:"], [BASE]),
    ([DEPTH], [DEPTH]),
    (["qemu:foo", "qemu:allocation-depth:x", "qemu:allocation"], []),
    (["qemu:", "base:allocation", DEPTH], [BASE, DEPTH]),
    (["qemu:dirty-bitmap:"], []),
], ids=["all", "qemu-ns", "base-ns", "exact", "unknown", "mixed",
        "no-bitmaps"])
def test_list_queries(three, queries, want):
    srv, quri = three
    assert list_contexts(srv.uri(), queries) == want
    assert list_contexts(quri, queries) == want


# -- raw protocol --------------------------------------------------------------

def raw_conn(srv, mode="structured"):
    c = NBDRaw.unix(srv.sock)
    assert c.handshake(nr.FLAG_C_FIXED_NEWSTYLE | nr.FLAG_C_NO_ZEROES) == 3
    if mode == "structured":
        assert [r.reply for r in c.structured_reply()] == [nr.REP_ACK]
    elif mode == "extended":
        assert [r.reply for r in c.extended_headers()] == [nr.REP_ACK]
    c.mode = mode
    return c


def meta_list(c, reps, opt):
    """[(id, name)] of the META_CONTEXT replies, which end with ACK."""
    assert reps[-1].reply == nr.REP_ACK and reps[-1].data == b"", reps
    assert all(r.reply == nr.REP_META_CONTEXT and r.option == opt
               for r in reps[:-1]), reps
    return [c.parse_meta_context(r) for r in reps[:-1]]


def status_chunks(c, flags, offset, length, cookie=0x77):
    """Send one BLOCK_STATUS; return [(id, descriptors)] of its chunks,
    after checking the layout: status chunks only, DONE on the last
    one alone, every descriptor non-empty and within the request."""
    c.send_request(nr.CMD_BLOCK_STATUS, flags, offset, length, cookie)
    chunks = c.read_chunks()
    out = []
    for i, ch in enumerate(chunks):
        assert ch.cookie == cookie
        assert bool(ch.done) == (i == len(chunks) - 1), chunks
        if c.mode == "extended":
            assert ch.type == nr.REPLY_TYPE_BLOCK_STATUS_EXT, chunks
            assert ch.offset == offset
            ctx, descs = ch.block_status_ext()
        else:
            assert ch.type == nr.REPLY_TYPE_BLOCK_STATUS, chunks
            ctx, descs = ch.block_status()
        assert descs and all(n > 0 for n, _ in descs), chunks
        assert sum(n for n, _ in descs) <= length, chunks
        if flags & nr.CMD_FLAG_REQ_ONE:
            assert len(descs) == 1, chunks
        out.append((ctx, descs))
    return out


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_raw_set_both(three, mode):
    srv, quri = three
    want = nbdinfo_depth(quri, 4 * MiB)
    c = raw_conn(srv, mode)
    # Listed twice and in reverse: each is answered once, in id order.
    ctx, reps = c.set_meta_context("disk0", [DEPTH, BASE, DEPTH])
    got = meta_list(c, reps, nr.OPT_SET_META_CONTEXT)
    assert [n for _, n in got] == [BASE, DEPTH], got
    ids = [i for i, _ in got]
    assert 0 not in ids and ids == sorted(set(ids)), got
    c.go_ok()

    chunks = status_chunks(c, 0, 0, 4 * MiB)
    assert [i for i, _ in chunks] == ids, chunks
    assert merge(chunks[1][1]) == want
    assert all(fl & ~(nr.STATE_HOLE | nr.STATE_ZERO) == 0
               for _, fl in chunks[0][1]), chunks

    # REQ_ONE, and a request that ends inside an extent.
    chunks = status_chunks(c, nr.CMD_FLAG_REQ_ONE, 600 * KiB, 100)
    assert [i for i, _ in chunks] == ids
    assert chunks[1][1] == [(100, 2)]
    chunks = status_chunks(c, 0, 1 * MiB - 10, 20)
    assert [i for i, _ in chunks] == ids
    assert chunks[1][1] == [(10, 2), (10, 1)]
    c.send_request(nr.CMD_DISC)
    c.expect_closed()


def test_raw_set_depth_only(three):
    srv, _ = three
    c = raw_conn(srv)
    ctx, reps = c.set_meta_context("disk0", [DEPTH, "qemu:nosuch"])
    [(i, name)] = meta_list(c, reps, nr.OPT_SET_META_CONTEXT)
    assert name == DEPTH and i != 0
    c.go_ok()
    [(ctx_id, descs)] = status_chunks(c, 0, 3 * MiB, 1 * MiB)
    assert ctx_id == i and descs == [(64 * KiB, 1), (1 * MiB - 64 * KiB, 0)]


@pytest.mark.parametrize("queries", [["qemu:"], ["qemu:allocation"], []],
                         ids=["namespace", "partial", "none"])
def test_raw_set_selects_nothing(three, queries):
    """A SET takes full names only: 'qemu:' is no wildcard there."""
    srv, _ = three
    c = raw_conn(srv)
    ctx, reps = c.set_meta_context("disk0", queries)
    assert meta_list(c, reps, nr.OPT_SET_META_CONTEXT) == []
    c.go_ok()
    c.send_request(nr.CMD_BLOCK_STATUS, 0, 0, 4096, 5)
    [r] = c.read_chunks()
    assert r.err == nr.EINVAL and r.done


@pytest.mark.parametrize("queries,want", [
    (["qemu:"], [DEPTH]),
    ([], [BASE, DEPTH]),
    (["base:", "qemu:"], [BASE, DEPTH]),
    (["qemu:allocation-depth"], [DEPTH]),
    (["qemu:foo", "qemu"], []),
])
def test_raw_list(three, queries, want):
    """LIST answers with id 0, works without structured replies, and
    changes no selection."""
    srv, _ = three
    c = raw_conn(srv, mode="simple")
    ctx, reps = c.set_meta_context("disk0", queries, nr.OPT_LIST_META_CONTEXT)
    got = meta_list(c, reps, nr.OPT_LIST_META_CONTEXT)
    assert got == [(0, n) for n in want]


def test_raw_set_without_structured_replies(three):
    srv, _ = three
    c = raw_conn(srv, mode="simple")
    ctx, reps = c.set_meta_context("disk0", [BASE, DEPTH])
    assert len(reps) == 1 and reps[0].reply == nr.REP_ERR_INVALID, reps
    c.go_ok()
    c.send_request(nr.CMD_BLOCK_STATUS, 0, 0, 4096, 5)
    r = c.read_reply()
    assert r.kind == "simple" and r.error == nr.EINVAL


def test_raw_set_replaced(three):
    """A second SET replaces the first: after [both] then [depth], only
    the depth chunk comes."""
    srv, _ = three
    c = raw_conn(srv)
    c.set_meta_context("disk0", [BASE, DEPTH])
    ctx, _ = c.set_meta_context("disk0", [DEPTH])
    assert list(ctx) == [DEPTH]
    c.go_ok()
    chunks = status_chunks(c, 0, 0, 4 * MiB)
    assert [i for i, _ in chunks] == [ctx[DEPTH]]
