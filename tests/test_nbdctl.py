"""nbdctl, the admin CLI.

The tests start the real daemon with a state dir and drive its admin
socket (docs/admin.md) with nbdctl, checking the results with nbdinfo,
libnbd and qemu-img, and nbdctl's exit codes when the daemon refuses,
stalls or cannot be reached."""
import json
import os
import shutil
import stat
import subprocess
import tempfile

import nbd
import pytest

from conftest import NBDCTL, make_image
from helpers import run

MiB = 1 << 20


def ctl(sock, *args, expect=0, timeout=60, **kw):
    """Run 'nbdctl --socket SOCK ARGS', checking its exit status.  @kw
    goes to subprocess.run (cwd, env, user, group...)."""
    cmd = [NBDCTL] + (["--socket", sock] if sock else []) + list(args)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=timeout, **kw)
    assert "Sanitizer" not in p.stderr and "runtime error:" not in p.stderr, \
        p.stderr
    if expect is not None:
        assert p.returncode == expect, \
            "%r exited with %d, not %d\nstdout:\n%s\nstderr:\n%s" % (
                cmd, p.returncode, expect, p.stdout, p.stderr)
    return p


def table(text):
    """A table nbdctl printed: a list of dicts by column title."""
    lines = text.splitlines()
    heads = lines[0].split()
    return [dict(zip(heads, line.split())) for line in lines[1:]]


# ---- end to end, against the daemon ----

@pytest.fixture
def admin(nbdd_server, tmp_path):
    """A daemon with a state dir, hence an admin socket: srv.admin."""
    state = tmp_path / "state"
    srv = nbdd_server(["--state-dir", str(state)], tcp=False)
    srv.admin = str(state / "admin.sock")
    return srv


def raw_spec(img, node="d0"):
    return f"driver=raw,node-name={node},file.driver=file,file.filename={img}"


def test_node_add_list_remove(admin, tmp_path):
    img = make_image(tmp_path / "d0.img", 4 * MiB)
    p = ctl(admin.admin, "node", "add", raw_spec(img))
    assert p.stdout == ""
    rows = table(ctl(admin.admin, "node", "list").stdout)
    d0 = [r for r in rows if r["NAME"] == "d0"]
    assert d0 and d0[0]["DRIVER"] == "raw" and d0[0]["RO"] == "no"
    assert d0[0]["SIZE"] == "4M" and d0[0]["FILE"] == img
    nodes = json.loads(ctl(admin.admin, "--json", "node", "list").stdout)
    n = [x for x in nodes if x["node-name"] == "d0"][0]
    assert n["image"]["virtual-size"] == 4 * MiB

    ctl(admin.admin, "node", "remove", "d0")
    names = [x["node-name"] for x in
             json.loads(ctl(admin.admin, "node", "list", "--json").stdout)]
    assert "d0" not in names


def test_node_add_json_spec(admin, tmp_path):
    img = make_image(tmp_path / "d0.img", MiB)
    spec = json.dumps({"driver": "raw", "node-name": "j0",
                       "file": {"driver": "file", "filename": img}})
    ctl(admin.admin, "node", "add", spec)
    assert "j0" in [r["NAME"] for r in
                    table(ctl(admin.admin, "node", "list").stdout)]


def nbdinfo_sees(sock, export):
    p = run(["nbdinfo", "--list", "--json", f"nbd+unix://?socket={sock}"],
            check=False)
    if p.returncode != 0:
        return False
    return export in [e["export-name"] for e in
                      json.loads(p.stdout)["exports"]]


def test_export_add_list_remove(admin, tmp_path):
    img = make_image(tmp_path / "d0.img", 2 * MiB, [(0, b"exported")])
    ctl(admin.admin, "node", "add", raw_spec(img))
    ctl(admin.admin, "export", "add", "d0", "--writable",
        "--description", "a test disk")
    rows = table(ctl(admin.admin, "export", "list").stdout)
    assert rows == [{"ID": "d0", "NAME": "d0", "NODE": "d0",
                     "WRITABLE": "yes", "CONNECTIONS": "0"}]
    assert nbdinfo_sees(admin.sock, "d0")
    h = admin.connect("d0")
    assert h.pread(8, 0) == b"exported"
    assert not h.is_read_only()

    # A client is connected: a safe delete is refused, --force is not.
    p = ctl(admin.admin, "export", "remove", "d0", expect=1)
    assert p.stderr.startswith("nbdctl: ")
    ctl(admin.admin, "export", "remove", "d0", "--force")
    assert not nbdinfo_sees(admin.sock, "d0")
    with pytest.raises(nbd.Error):
        admin.connect("d0")


def test_export_id_and_name(admin, tmp_path):
    img = make_image(tmp_path / "d0.img", MiB)
    ctl(admin.admin, "node", "add", raw_spec(img))
    ctl(admin.admin, "export", "add", "d0", "--id", "exp0", "--name", "vm")
    e = json.loads(ctl(admin.admin, "--json", "export", "list").stdout)
    assert len(e) == 1
    assert (e[0]["id"], e[0]["name"], e[0]["node-name"], e[0]["writable"]) \
        == ("exp0", "vm", "d0", False)
    h = admin.connect("vm")
    assert h.is_read_only()
    h.shutdown()
    ctl(admin.admin, "export", "remove", "exp0")


def test_removing_a_node_in_use_is_refused(admin, tmp_path):
    img = make_image(tmp_path / "d0.img", MiB)
    ctl(admin.admin, "node", "add", raw_spec(img))
    ctl(admin.admin, "export", "add", "d0", "--id", "e-d0")
    p = ctl(admin.admin, "node", "remove", "d0", expect=1)
    # One line, the daemon's reason, naming the node and its user.
    assert p.stderr.startswith("nbdctl: ")
    assert p.stderr.count("\n") == 1
    assert "d0" in p.stderr and "e-d0" in p.stderr
    assert p.stdout == ""


def test_image_create_qcow2(admin, tmp_path):
    # A relative name: nbdctl makes it absolute for the daemon.
    ctl(admin.admin, "image", "create", "--size", "64M",
        "--cluster-size", "128K", "new.qcow2", cwd=tmp_path)
    img = str(tmp_path / "new.qcow2")
    run(["qemu-img", "check", "-f", "qcow2", img])
    info = json.loads(run(["qemu-img", "info", "--output=json", img]).stdout)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 64 * MiB
    assert info["cluster-size"] == 128 << 10

    # An overlay of it.
    ctl(admin.admin, "image", "create", "--size", "64M", "--backing", img,
        "--backing-format", "qcow2", str(tmp_path / "top.qcow2"))
    info = json.loads(run(["qemu-img", "info", "--output=json",
                           str(tmp_path / "top.qcow2")]).stdout)
    assert info["backing-filename"] == img
    assert info.get("backing-filename-format") == "qcow2"
    run(["qemu-img", "check", str(tmp_path / "top.qcow2")])


def test_image_create_raw(admin, tmp_path):
    img = tmp_path / "r.img"
    ctl(admin.admin, "image", "create", "--format", "raw", "--size", "3M",
        str(img))
    assert os.path.getsize(img) == 3 * MiB


def test_snapshot(admin, tmp_path):
    base = str(tmp_path / "base.qcow2")
    ctl(admin.admin, "image", "create", "--size", "8M", base)
    ctl(admin.admin, "node", "add",
        f"driver=qcow2,node-name=vm,file.driver=file,file.filename={base}")
    ctl(admin.admin, "export", "add", "vm", "--writable")
    h = admin.connect("vm")
    h.pwrite(b"before" * 10, 0)
    h.flush()

    p = ctl(admin.admin, "snapshot", "vm", "--overlay-file", "snap1.qcow2",
            cwd=tmp_path)
    overlay = str(tmp_path / "snap1.qcow2")
    assert "snap1" in p.stdout and overlay in p.stdout
    h.pwrite(b"after!" * 10, 0)
    h.flush()
    assert h.pread(60, 0) == b"after!" * 10
    h.shutdown()

    nodes = json.loads(ctl(admin.admin, "--json", "node", "list").stdout)
    snap = [n for n in nodes if n["node-name"] == "snap1"][0]
    assert snap["drv"] == "qcow2"
    assert any(u["kind"] == "export" for u in snap["users"])
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json",
                           overlay]).stdout)
    assert info["backing-filename"] == base
    # The base still holds what was there before the snapshot.
    out = run(["qemu-io", "-U", "-r", "-f", "qcow2", "-c",
               "read -v 0 6", base]).stdout
    assert "before" in out, out


def test_snapshot_of_missing_node(admin, tmp_path):
    p = ctl(admin.admin, "snapshot", "nope", "--overlay-file",
            str(tmp_path / "s.qcow2"), expect=1)
    assert "no node named 'nope'" in p.stderr
    assert not (tmp_path / "s.qcow2").exists()


def test_snapshot_checks_before_creating_the_file(admin, tmp_path):
    """A bad or taken overlay node name, or a node whose file name is
    relative, is refused before blockdev-create: no stray file."""
    img = make_image(tmp_path / "d0.img", MiB)
    ctl(admin.admin, "node", "add", raw_spec(img, "vm"))
    overlay = tmp_path / "s.qcow2"

    for bad in ("1st", "a b", "a/b", "x" * 129, ""):
        p = ctl(admin.admin, "snapshot", "vm", "--overlay-file",
                str(overlay), "--overlay-node", bad, expect=2)
        assert "--overlay-node: '%s' is not a valid node name" % bad \
            in p.stderr
    # 128 bytes is nbdd's limit (graph/node.c), not QEMU's 31.
    p = ctl(admin.admin, "snapshot", "vm", "--overlay-file", str(overlay),
            "--overlay-node", "vm", expect=1)
    assert p.stderr == ("nbdctl: snapshot: the overlay's node name 'vm' is "
                        "in use: choose another with --overlay-node NAME\n")
    # The default name, from the file's: vm.qcow2 gives vm.
    p = ctl(admin.admin, "snapshot", "vm", "--overlay-file",
            str(tmp_path / "vm.qcow2"), expect=1)
    assert "the overlay's node name 'vm' is in use" in p.stderr
    assert not (tmp_path / "vm.qcow2").exists()

    # The daemon resolves a relative name against its working directory
    # (ours), but the overlay would look next to itself.
    rel = os.path.relpath(make_image(tmp_path / "r.img", MiB))
    assert not rel.startswith("/")
    ctl(admin.admin, "node", "add", raw_spec(rel, "relnode"))
    p = ctl(admin.admin, "snapshot", "relnode", "--overlay-file",
            str(overlay), expect=1)
    assert p.stderr == (f"nbdctl: snapshot: node 'relnode' reads '{rel}', "
                        "which is not an absolute file name: the overlay "
                        "could not find its backing file (add the node "
                        "again with an absolute file name)\n")
    assert not overlay.exists()

    # A valid name of 128 bytes goes through.
    long_name = "s" * 128
    ctl(admin.admin, "snapshot", "vm", "--overlay-file", str(overlay),
        "--overlay-node", long_name)
    assert long_name in [r["NAME"] for r in
                         table(ctl(admin.admin, "node", "list").stdout)]


def test_tables_and_errors_escape_control_characters(admin, tmp_path):
    """Names and file names are anyone's text: a table or an error
    message must not carry escape sequences, newlines or invalid UTF-8
    to the terminal."""
    evil = tmp_path / "d\x1b[2J\n.img"
    make_image(evil, MiB)
    ctl(admin.admin, "node", "add", json.dumps(
        {"driver": "raw", "node-name": "d0",
         "file": {"driver": "file", "filename": str(evil)}}))
    out = ctl(admin.admin, "node", "list").stdout
    assert "\x1b" not in out
    d0 = [r for r in table(out) if r["NAME"] == "d0"][0]
    assert d0["FILE"] == f"{tmp_path}/d\\x1b[2J\\n.img"

    # Export names may hold anything (up to 4096 bytes): a tab, a
    # backslash, invalid UTF-8, a C1 CSI; valid UTF-8 stays.
    name = "vm\tone\\é\u009b".encode() + b"\xff"
    ctl(admin.admin, "export", "add", "d0", "--name", name)
    rows = table(ctl(admin.admin, "export", "list").stdout)
    shown = "vm\\tone\\\\é\\xc2\\x9b\\xff"
    assert rows == [{"ID": shown, "NAME": shown, "NODE": "d0",
                     "WRITABLE": "no", "CONNECTIONS": "0"}]

    # The daemon's refusal quotes the name: one escaped line.
    p = ctl(admin.admin, "export", "add", "d0", "--id", "other",
            "--name", name, expect=1)
    assert p.stderr == f"nbdctl: export: name '{shown}' is already exported\n"


def test_exit_4_when_stdout_cannot_be_written(admin):
    """Output lost (a full disk, a closed pipe) is not success."""
    for args in (["--json", "node", "list"], ["stats"], ["--help"],
                 ["--version"]):
        with open("/dev/full", "w") as full:
            p = subprocess.run([NBDCTL, "--socket", admin.admin] + args,
                               stdout=full, stderr=subprocess.PIPE,
                               text=True, timeout=60)
        assert p.returncode == 4, (args, p.stderr)
        assert p.stderr == ("nbdctl: cannot write to standard output: No "
                            "space left on device\n")
    # A command the daemon refused keeps its own status.
    with open("/dev/full", "w") as full:
        p = subprocess.run([NBDCTL, "--socket", admin.admin, "node",
                            "remove", "nope"], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    assert p.returncode == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change uid")
def test_admin_group_member(nbdd_server):
    """A member of --admin-group (nobody, in nogroup) reaches the socket
    in a directory it may only pass through; a non-member is refused by
    the socket's mode and told why, directories included."""
    # Not under tmp_path: pytest makes that 0700, which nobody cannot
    # pass through.
    d = tempfile.mkdtemp(prefix="nbdd-admin-")
    try:
        os.chmod(d, 0o711)
        sock = os.path.join(d, "admin.sock")
        nbdd_server(["--admin-socket", sock, "--admin-group", "nogroup"],
                    tcp=False)
        st = os.stat(sock)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 65534

        p = ctl(sock, "stats", user=65534, group=65534, extra_groups=[])
        assert p.stdout.startswith("uptime ")

        p = ctl(sock, "stats", user=65534, group=1, extra_groups=[],
                expect=3)
        lines = p.stderr.splitlines()
        assert lines[0] == ("nbdctl: cannot connect to the admin socket "
                            f"{sock}: Permission denied")
        assert lines[1].startswith(f"nbdctl: {sock} serves root, the "
                                   "daemon's user and the group given to "
                                   "nbdd --admin-group")
        assert ("Each directory above the socket must also let them "
                "through (x permission)") in lines[1]
    finally:
        shutil.rmtree(d)


def test_json_output_parses(admin, tmp_path):
    img = make_image(tmp_path / "d0.img", MiB)
    ctl(admin.admin, "node", "add", raw_spec(img))
    ctl(admin.admin, "export", "add", "d0")
    for args in (["node", "list"], ["export", "list"], ["connections"],
                 ["stats"]):
        v = json.loads(ctl(admin.admin, "--json", *args).stdout)
        assert isinstance(v, list if args[0] != "stats" else dict)
    st = json.loads(ctl(admin.admin, "--json", "stats").stdout)
    assert st["nodes"] >= 1 and "uptime-seconds" in st
    assert [e["id"] for e in st["exports"]] == ["d0"]
    # A change prints the return value, {}.
    assert json.loads(ctl(admin.admin, "--json", "export", "remove",
                          "d0").stdout) == {}


def test_connections_and_stats_tables(admin, tmp_path):
    img = make_image(tmp_path / "d0.img", MiB)
    ctl(admin.admin, "node", "add", raw_spec(img))
    ctl(admin.admin, "export", "add", "d0", "--writable")
    h = admin.connect("d0")
    h.pwrite(b"x" * 65536, 0)
    h.pread(4096, 0)
    rows = table(ctl(admin.admin, "connections").stdout)
    assert len(rows) == 1
    r = rows[0]
    assert r["EXPORT"] == "d0" and r["TLS"] == "no"
    assert r["BYTES-IN"] == "64K" and r["BYTES-OUT"] == "4K"
    out = ctl(admin.admin, "stats").stdout
    assert "connections  1" in out
    st = table(out.split("\n\n", 1)[1])
    assert st[0]["EXPORT"] == "d0" and st[0]["WRITES"] == "1"
    h.shutdown()


def test_throttle(admin, tmp_path):
    img = make_image(tmp_path / "d0.img", MiB)
    ctl(admin.admin, "node", "add", raw_spec(img))
    ctl(admin.admin, "node", "add", json.dumps(
        {"driver": "throttle", "node-name": "t0", "file": "d0",
         "throttle-group": "g0", "limits": {}}))
    ctl(admin.admin, "throttle", "--node", "t0", "--iops", "1000",
        "--bps-write", "10M")
    ctl(admin.admin, "throttle", "--group", "g0", "--iops", "0")
    p = ctl(admin.admin, "throttle", "--group", "no-such-group",
            "--iops", "5", expect=1)
    assert p.stderr.startswith("nbdctl: ")


def test_qmp_passthrough(admin, tmp_path):
    v = json.loads(ctl(admin.admin, "qmp", "query-version").stdout)
    assert v["package"].startswith("nbdd ")
    assert json.loads(ctl(admin.admin, "qmp",
                          '{"execute": "query-block-exports"}').stdout) == []
    img = make_image(tmp_path / "d0.img", MiB)
    ctl(admin.admin, "qmp", "blockdev-add", json.dumps(
        {"driver": "raw", "node-name": "q0",
         "file": {"driver": "file", "filename": img}}))
    assert json.loads(ctl(admin.admin, "qmp", "blockdev-del",
                          '{"node-name": "q0"}').stdout) == {}
    p = ctl(admin.admin, "qmp", "blockdev-del", '{"node-name": "q0"}',
            expect=1)
    assert p.stderr.startswith("nbdctl: ") and "q0" in p.stderr
    p = ctl(admin.admin, "qmp", "no-such-command", expect=1)
    assert p.stderr.startswith("nbdctl: ")


def test_state_dir_option_and_env(admin, tmp_path):
    state = os.path.dirname(admin.admin)
    ctl(None, "--state-dir", state, "export", "list")
    env = dict(os.environ, NBDD_ADMIN_SOCKET=admin.admin)
    ctl(None, "export", "list", env=env)


def test_quit(admin):
    ctl(admin.admin, "quit")
    admin.proc.wait(timeout=20)
    assert admin.proc.returncode == 0


# ---- exit codes without a daemon ----

def test_exit_3_when_the_socket_is_missing(tmp_path):
    sock = str(tmp_path / "nope.sock")
    p = ctl(sock, "node", "list", expect=3)
    assert f"cannot connect to the admin socket {sock}" in p.stderr
    assert "--socket" in p.stderr and "--state-dir" in p.stderr
    p = ctl(None, "--state-dir", str(tmp_path), "stats", expect=3)
    assert str(tmp_path / "admin.sock") in p.stderr
    env = dict(os.environ, NBDD_ADMIN_SOCKET=sock)
    p = ctl(None, "stats", env=env, expect=3)
    assert sock in p.stderr


def test_exit_3_when_nobody_listens(tmp_path):
    import socket
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()                   # a socket file with nobody behind it
    p = ctl(path, "stats", expect=3)
    assert "Connection refused" in p.stderr


@pytest.mark.parametrize("args", [
    [],
    ["frobnicate"],
    ["node"],
    ["node", "frob"],
    ["node", "add"],
    ["node", "add", "a", "b"],
    ["node", "list", "extra"],
    ["export", "add"],
    ["export", "add", "d0", "--no-such-option"],
    ["export", "remove"],
    ["image", "create", "x.qcow2"],
    ["image", "create", "--size", "ten", "x.qcow2"],
    ["image", "create", "--format", "vmdk", "--size", "1M", "x"],
    ["image", "create", "--format", "raw", "--size", "1M",
     "--backing", "b", "x"],
    ["snapshot", "d0"],
    ["throttle", "--iops", "5"],
    ["throttle", "--node", "a", "--group", "b", "--iops", "5"],
    ["throttle", "--node", "a"],
    ["throttle", "--node", "a", "--iops", "lots"],
    ["qmp"],
    ["qmp", "{not json"],
    ["qmp", '{"arguments": {}}'],
    ["qmp", "query-stats", "[1]"],
    ["--timeout", "0", "stats"],
    ["--socket", "", "stats"],
    ["--state-dir", "", "stats"],
    ["--socket", "/" + "s" * 108, "stats"],
    ["--state-dir", "/" + "d" * 100, "stats"],
    ["qmp", '{"execute": "query-stats"} trailing'],
    ["qmp", '{"execute": "query-stats"}{}'],
    ["qmp", "query-stats", '{} x'],
    ["snapshot", "d0", "--overlay-file", "f", "--overlay-node", "9"],
])
def test_exit_2_for_bad_usage(tmp_path, args):
    """Usage errors exit 2 before anything is sent: with no daemon at
    the socket, reaching it would have been exit 3."""
    sock = str(tmp_path / "none.sock")
    p = ctl(sock, *args, expect=2)
    assert p.stderr, "no message"


def test_usage_messages(tmp_path):
    p = ctl(None, "--socket", "", "stats", expect=2)
    assert p.stderr == ("nbdctl: --socket: expected a path, got an empty "
                        "string\n")
    long = "/" + "s" * 108
    p = ctl(None, "--socket", long, "stats", expect=2)
    assert p.stderr == (f"nbdctl: --socket: '{long}' is too long for a "
                        "unix socket path (at most 107 bytes)\n")
    p = ctl(None, "qmp", '{"execute": "query-stats"} trailing', expect=2)
    assert "JSON: unexpected text after the JSON object: 'trailing'" \
        in p.stderr
    # Size options all name themselves with their dashes.
    p = ctl(None, "throttle", "--node", "t", "--bps", "lots", expect=2)
    assert p.stderr.startswith("nbdctl throttle: --bps: expected a size")
    p = ctl(None, "image", "create", "--size", "lots", "x", expect=2)
    assert p.stderr.startswith("nbdctl image create: --size: expected a "
                               "size")


def test_default_socket_is_in_the_runtime_dir():
    env = {k: v for k, v in os.environ.items() if k != "NBDD_ADMIN_SOCKET"}
    p = ctl(None, "--help", env=env)
    assert "/run/nbdd/admin.sock" in p.stdout
    if not os.path.exists("/run/nbdd/admin.sock"):
        p = ctl(None, "stats", env=env, expect=3)
        assert "/run/nbdd/admin.sock" in p.stderr


def test_socket_and_state_dir_are_exclusive(tmp_path):
    p = ctl(None, "--socket", "a", "--state-dir", "b", "stats", expect=2)
    assert "not both" in p.stderr


def test_help():
    p = ctl(None, "--help")
    for word in ("node add", "export remove", "image create", "snapshot",
                 "throttle", "connections", "qmp", "Exit status"):
        assert word in p.stdout
    p = ctl(None, "export", "add", "--help")
    assert p.stdout.startswith("Usage: nbdctl export add NODE")


def test_exit_3_when_the_daemon_stalls(admin):
    """A daemon that stops answering: nbdctl gives up after --timeout."""
    os.kill(admin.proc.pid, 19)            # SIGSTOP
    try:
        p = ctl(admin.admin, "--timeout", "1", "stats", expect=3)
    finally:
        os.kill(admin.proc.pid, 18)        # SIGCONT
    assert p.stderr == (f"nbdctl: {admin.admin}: no answer from the daemon "
                        "within 1 second (raise --timeout if it is just "
                        "busy)\n")
    ctl(admin.admin, "stats")
