"""nbdd --config FILE: 'key = value' lines that are the long options.

The daemon is started for real and read with real clients (nbdinfo,
libnbd); bad files must fail the start with FILE:LINE and exit 1."""
import grp
import os
import re
import socket
import stat
import subprocess

import nbd
import pytest

from conftest import NBDD, TOP_DIR, free_tcp_port, make_image
from helpers import run

SAMPLE = os.path.join(TOP_DIR, "etc", "nbdd.conf")


def write_conf(tmp_path, text, name="nbdd.conf"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def start_fails(args, timeout=20):
    """Run nbdd with @args, expecting a start-up failure: (status,
    stderr)."""
    p = subprocess.run([NBDD, "-f", "--exit-with-parent"] + args,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=timeout)
    assert p.returncode != 0, f"nbdd started:\n{p.stdout}{p.stderr}"
    return p.returncode, p.stderr


def test_config_file_serves(nbdd_server, tmp_path):
    img = make_image(tmp_path / "d0.img", 1 << 20,
                     [(0, b"from the config file")])
    sock = str(tmp_path / "conf.sock")
    conf = write_conf(tmp_path, f"""\
# A comment, then a blank line.

listen = unix:{sock}
   # indented comment
blockdev = driver=raw,node-name=d0,file.driver=file,file.filename={img}
export   type=nbd,id=e0,node-name=d0,name=disk,writable=on
threads = 2
foreground = yes
""")
    nbdd_server(["--config", conf], tcp=False)
    p = run(["nbdinfo", "--size", f"nbd+unix:///disk?socket={sock}"])
    assert p.stdout.strip() == str(1 << 20)
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///disk?socket={sock}")
    assert h.pread(20, 0) == b"from the config file"
    assert not h.is_read_only()
    h.shutdown()


def test_json_spec_with_spaces_and_hash(nbdd_server, tmp_path):
    """The value is the rest of the line: JSON with blanks, and a '#'
    inside a value, are kept as written."""
    d = tmp_path / "dir#1"
    d.mkdir()
    img = make_image(d / "d0.img", 65536, [(0, b"json")])
    conf = write_conf(tmp_path, f"""\
blockdev = {{"driver": "raw", "node-name": "d0", "file": {{"driver": "file", "filename": "{img}"}}}}
export = type=nbd,id=e0,node-name=d0,name=disk0
""")
    srv = nbdd_server(["--config", conf], tcp=False)
    h = srv.connect("disk0")
    assert h.pread(4, 0) == b"json"
    assert h.is_read_only()
    h.shutdown()


def test_command_line_overrides_file(nbdd_server, tmp_path):
    """The file is read first wherever --config stands: the command
    line's --pidfile (before --config) wins over the file's, and its
    --blockdev/--export add to the file's."""
    img0 = make_image(tmp_path / "d0.img", 65536, [(0, b"zero")])
    img1 = make_image(tmp_path / "d1.img", 65536, [(0, b"one!")])
    file_pid = tmp_path / "from-file.pid"
    conf = write_conf(tmp_path, f"""\
pidfile = {file_pid}
max-connections = 1
blockdev = driver=raw,node-name=d0,file.driver=file,file.filename={img0}
export = type=nbd,id=e0,node-name=d0,name=disk0
""")
    # The fixture puts its own --pidfile first, then these.
    srv = nbdd_server(["--max-connections", "4", "--config", conf,
                       "--blockdev",
                       f"driver=raw,node-name=d1,file.driver=file,"
                       f"file.filename={img1}",
                       "--export", "type=nbd,id=e1,node-name=d1,name=disk1"],
                      tcp=False)
    assert os.path.exists(srv.pidfile)
    assert not file_pid.exists()
    # Both exports, and room for more than the file's one connection.
    h0 = srv.connect("disk0")
    h1 = srv.connect("disk1")
    assert h0.pread(4, 0) == b"zero"
    assert h1.pread(4, 0) == b"one!"
    h0.shutdown()
    h1.shutdown()


def test_flags_yes_no_and_stdio(tmp_path):
    """Flags take yes/no, on/off, true/false; 'stdio = on' in the file
    makes a --stdio server that libnbd's connect_command can drive."""
    img = make_image(tmp_path / "d0.img", 65536, [(0, b"flag")])
    conf = write_conf(tmp_path, f"""\
stdio = on
exit-with-parent = true
tls-verify-peer = no
foreground = off
blockdev = driver=raw,node-name=d0,file.driver=file,file.filename={img}
export = type=nbd,id=e0,node-name=d0
""")
    h = nbd.NBD()
    h.connect_command([NBDD, "--config", conf])
    assert h.pread(4, 0) == b"flag"
    h.shutdown()


def test_sample_config_parses(tmp_path):
    """etc/nbdd.conf, as shipped, starts a daemon (its state dir and
    admin socket overridden on the command line)."""
    img = make_image(tmp_path / "d0.img", 65536, [(0, b"samp")])
    h = nbd.NBD()
    h.connect_command([NBDD, "--config", SAMPLE, "--stdio",
                       "--state-dir", str(tmp_path / "state"),
                       "--admin-socket", str(tmp_path / "admin.sock"),
                       "--exit-with-parent",
                       "--blockdev", f"driver=raw,node-name=d0,"
                       f"file.driver=file,file.filename={img}",
                       "--export", "type=nbd,id=e0,node-name=d0"])
    assert h.pread(4, 0) == b"samp"
    h.shutdown()


def sample_examples():
    """(line number, key) of each example in etc/nbdd.conf: a line that
    is a '#' right before a key (prose has a blank after its '#')."""
    with open(SAMPLE) as f:
        return [(n, m.group(1)) for n, line in enumerate(f, 1)
                for m in [re.match(r"#([a-z][a-z-]*)( |=|$)", line)] if m]


def have_ipv6():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
        return True
    except OSError:
        return False


def have_group(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def sample_with(tmp_path, uncomment):
    """etc/nbdd.conf with the lines numbered in @uncomment uncommented
    and its paths moved under @tmp_path: (config file, {name: path})."""
    dirs = {"/run/nbdd": tmp_path / "run", "/var/lib/nbdd":
            tmp_path / "state", "/srv/images": tmp_path / "images",
            "/etc/nbdd": tmp_path / "etc"}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    port = str(free_tcp_port())
    out = []
    with open(SAMPLE) as f:
        for n, line in enumerate(f, 1):
            if n in uncomment:
                line = line[1:]
            for old, new in dirs.items():
                line = line.replace(old, str(new))
            out.append(line.replace(":10809", ":" + port))
    return write_conf(tmp_path, "".join(out)), dirs


# What each example line does alone, in a test: None when the daemon
# starts, else the error it must stop with (the lines that need
# something a test does not have, or another line).
SAMPLE_EXPECT = {
    "listen": None,
    "tls": "nbdd: --tls=require needs --tls-certificates or --tls-psk",
    "tls-certificates": "TLS credentials given but --tls is off",
    "tls-verify-peer": "--tls-verify-peer needs --tls-certificates",
    "tls-psk": "TLS credentials given but --tls is off",
    "admin-group": None if have_group("nbdd-admin")
    else "LINE: admin-group: no such group 'nbdd-admin'",
    "threads": None,
    "max-connections": None,
    "handshake-timeout": None,
    "poll-max-ns": None,
    "verbose": None,
    "pidfile": None,
    "blockdev": None,
    "export": "export: node 'disk0' does not exist",
}


@pytest.mark.parametrize("lineno, key", sample_examples(),
                         ids=lambda v: str(v))
def test_sample_config_examples(nbdd_server, tmp_path, lineno, key):
    """Every commented example in etc/nbdd.conf works when uncommented,
    or fails with the error that says what else it needs."""
    assert key in SAMPLE_EXPECT, f"line {lineno}: no expectation for {key}"
    conf, dirs = sample_with(tmp_path, {lineno})
    if key == "listen" and "[::]" in open(conf).read().splitlines()[
            lineno - 1] and not have_ipv6():
        pytest.skip("no IPv6")
    if key == "blockdev":
        run(["qemu-img", "create", "-q", "-f", "qcow2",
             str(dirs["/srv/images"] / "disk0.qcow2"), "1M"])
    expect = SAMPLE_EXPECT[key]
    if expect is None:
        nbdd_server(["--config", conf], tcp=False)
    else:
        status, err = start_fails(["--config", conf, "--listen",
                                   "unix:" + str(tmp_path / "x.sock")])
        assert status == 1
        assert expect.replace("LINE", f"{conf}:{lineno}") in err, err


def test_sample_config_blockdev_and_export(nbdd_server, tmp_path):
    """The sample's blockdev and export lines together serve disk0."""
    lines = {n for n, key in sample_examples()
             if key in ("blockdev", "export")}
    assert len(lines) == 2
    conf, dirs = sample_with(tmp_path, lines)
    img = str(dirs["/srv/images"] / "disk0.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 4", img])
    srv = nbdd_server(["--config", conf], tcp=False)
    h = srv.connect("disk0")
    assert h.pread(4, 0) == b"aaaa"
    assert not h.is_read_only()
    h.shutdown()
    # The sample's admin socket, moved under tmp_path.
    assert os.path.exists(dirs["/run/nbdd"] / "admin.sock")


@pytest.mark.parametrize("keys, message", [
    (("tls", "tls-certificates", "tls-verify-peer"),
     "nbdd: error: TLS: ETC/pki/ca-cert.pem: needed by --tls-verify-peer, "
     "but missing"),
    (("tls", "tls-psk"),
     "nbdd: error: TLS: ETC/keys.psk: No such file or directory"),
])
def test_sample_config_tls(tmp_path, keys, message):
    """The sample's TLS lines, together, are valid: the daemon goes on
    to load the credentials, which a test does not have."""
    lines = {n for n, key in sample_examples() if key in keys}
    assert len(lines) == len(keys)
    conf, dirs = sample_with(tmp_path, lines)
    status, err = start_fails(["--config", conf, "--listen",
                               "unix:" + str(tmp_path / "x.sock")])
    assert status == 1
    assert message.replace("ETC", str(dirs["/etc/nbdd"])) in err, err


def test_comment_after_a_value(nbdd_server, tmp_path):
    """A '#' after a blank starts a comment; one inside a word does not
    (test_json_spec_with_spaces_and_hash)."""
    state = tmp_path / "state"
    conf = write_conf(tmp_path, f"""\
state-dir = {state} # the catalogue
threads = 2\t# tab, then a comment
foreground   # a bare flag
""")
    srv = nbdd_server(["--config", conf], tcp=False)
    assert os.path.exists(state / "admin.sock")
    assert [p.name for p in tmp_path.iterdir() if "#" in p.name] == []
    srv.stop()
    conf = write_conf(tmp_path, "threads = # none\n")
    status, err = start_fails(["--config", conf])
    assert f"{conf}:1: threads: expected a value" in err, err


def test_crlf_and_byte_order_mark(tmp_path):
    """A file from a Windows editor: UTF-8 BOM, CR LF line ends."""
    img = make_image(tmp_path / "d0.img", 65536, [(0, b"crlf")])
    text = (f"\ufeff# made on Windows\r\n"
            f"stdio = on\r\n"
            f"exit-with-parent\r\n"
            f"\r\n"
            f"blockdev = driver=raw,node-name=d0,file.driver=file,"
            f"file.filename={img}\r\n"
            f"export = type=nbd,id=e0,node-name=d0,name=disk\r\n")
    conf = tmp_path / "win.conf"
    conf.write_bytes(text.encode())
    h = nbd.NBD()
    h.connect_command([NBDD, "--config", str(conf)])
    assert h.get_size() == 65536
    assert h.pread(4, 0) == b"crlf"
    h.shutdown()


def test_command_line_turns_off_a_flag(nbdd_server, tmp_path):
    """--flag=no undoes the file's 'flag = yes'."""
    img = make_image(tmp_path / "d0.img", 65536, [(0, b"flag")])
    conf = write_conf(tmp_path, f"""\
stdio = yes
blockdev = driver=raw,node-name=d0,file.driver=file,file.filename={img}
export = type=nbd,id=e0,node-name=d0,name=disk0
""")
    # The fixture listens on a socket, which --stdio refuses.
    status, err = start_fails(["--config", conf, "--listen",
                               "unix:" + str(tmp_path / "x.sock")])
    assert "--stdio cannot be combined with --listen" in err
    srv = nbdd_server(["--config", conf, "--stdio=no"], tcp=False)
    h = srv.connect("disk0")
    assert h.pread(4, 0) == b"flag"
    h.shutdown()
    status, err = start_fails(["--foreground=maybe"])
    assert status == 1
    assert ("nbdd: --foreground: expected yes or no (or on/off, "
            "true/false), got 'maybe'") in err


@pytest.mark.parametrize("key, value", [
    ("state-dir", "state"),
    ("pidfile", "run/nbdd.pid"),
    ("admin-socket", "admin.sock"),
    ("tls-certificates", "pki"),
    ("tls-psk", "./keys.psk"),
    ("listen", "unix:nbdd.sock"),
])
def test_relative_paths_refused_in_a_file(tmp_path, key, value):
    """nbdd's working directory (/ under systemd) is not the file's."""
    conf = write_conf(tmp_path, f"threads = 2\n{key} = {value}\n")
    status, err = start_fails(["--config", conf])
    assert status == 1
    path = value[5:] if key == "listen" else value
    assert (f"nbdd: {conf}:2: {key}: '{path}' is a relative path: give an "
            "absolute one") in err, err


@pytest.mark.parametrize("lines, bad_line, message", [
    (["threads = 2", "", "threads = many"], 3,
     "threads: already set on line 1"),
    (["# ok", "threads = many"], 2,
     "threads: expected a number from 1 to 1024, got 'many'"),
    (["listen = udp:1.2.3.4:5"], 1,
     "listen: expected unix:PATH or tcp:HOST:PORT, got 'udp:1.2.3.4:5'"),
    (["state-dir"], 1, "state-dir: expected a value"),
    (["no-such-option = 1"], 1, "unknown key 'no-such-option'"),
    (["--threads = 2"], 1, "write the key without '--'"),
    (["config = /etc/other.conf"], 1, "config: not allowed in a config file"),
    (["tls = sometimes"], 1, "tls: expected off, on or require, got "
     "'sometimes'"),
    (["handshake-timeout = -1"], 1, "handshake-timeout: expected seconds"),
    (["verbose = 5"], 1, "verbose: expected yes, no or a count from 0 to 2, "
     "got '5'"),
])
def test_errors_name_file_and_line(tmp_path, lines, bad_line, message):
    conf = write_conf(tmp_path, "\n".join(lines) + "\n")
    status, err = start_fails(["--config", conf])
    assert status == 1
    assert f"nbdd: {conf}:{bad_line}: {message}" in err, err


def test_bad_boolean(tmp_path):
    conf = write_conf(tmp_path, "foreground = yes\n"
                                "tls-verify-peer = maybe\n")
    status, err = start_fails(["--config", conf])
    assert status == 1
    assert (f"nbdd: {conf}:2: tls-verify-peer: expected yes or no "
            "(or on/off, true/false), got 'maybe'") in err, err


def test_missing_file_and_config_twice(tmp_path):
    status, err = start_fails(["--config", str(tmp_path / "nope.conf")])
    assert status == 1
    assert "--config: cannot open" in err and "nope.conf" in err
    assert "No such file or directory" in err
    conf = write_conf(tmp_path, "threads = 2\n")
    status, err = start_fails(["--config", conf, "--config", conf])
    assert status == 1
    assert "--config: given twice" in err
    status, err = start_fails(["--config", str(tmp_path)])
    assert status == 1
    assert (f"nbdd: --config: '{tmp_path}' is a directory, not a config "
            "file") in err, err


def test_command_line_value_errors_unchanged(tmp_path):
    """Command-line messages keep their --option form."""
    status, err = start_fails(["--threads", "0"])
    assert status == 1
    assert "nbdd: --threads: expected a number from 1 to 1024, got '0'" in err


def test_admin_group_must_exist(tmp_path):
    status, err = start_fails(["--state-dir", str(tmp_path / "s"),
                               "--admin-group", "no-such-group-nbdd"])
    assert status == 1
    assert "--admin-group: no such group 'no-such-group-nbdd'" in err
    conf = write_conf(tmp_path, f"state-dir = {tmp_path / 's'}\n"
                                "admin-group = no-such-group-nbdd\n")
    status, err = start_fails(["--config", conf])
    assert status == 1
    assert f"{conf}:2: admin-group: no such group" in err


def test_admin_group_in_the_state_dir_warns(nbdd_server, tmp_path):
    """The default admin socket is in the 0700 state dir, which the
    group cannot pass through: the daemon says so, and starts."""
    state = tmp_path / "s"
    srv = nbdd_server(["--state-dir", str(state), "--admin-group", "root"],
                      tcp=False)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert ("nbdd: warning: --admin-group root: members of the group "
            f"cannot reach the admin socket {state}/admin.sock if the "
            "state dir is mode 0700") in srv.output()


def test_admin_group_needs_a_socket(tmp_path):
    status, err = start_fails(["--admin-group", "root"])
    assert status == 1
    assert "--admin-group needs an admin socket" in err


def test_admin_socket_path_too_long(tmp_path):
    status, err = start_fails(["--admin-socket", str(tmp_path / ("x" * 200))])
    assert status == 1
    assert "too long for a unix socket" in err


def test_help_mentions_config_and_admin():
    p = run([NBDD, "--help"])
    for opt in ("--config FILE", "--admin-socket PATH",
                "--admin-group GROUP"):
        assert opt in p.stdout
    assert "command line replace" in p.stdout
