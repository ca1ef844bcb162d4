"""nbdd --config FILE: 'key = value' lines that are the long options.

The daemon is started for real and read with real clients (nbdinfo,
libnbd); bad files must fail the start with FILE:LINE and exit 1."""
import os
import subprocess

import nbd
import pytest

from conftest import NBDD, TOP_DIR, have, make_image
from helpers import run


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
    if have("nbdinfo"):
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
    """etc/nbdd.conf, as shipped, starts a daemon (its state dir
    overridden on the command line)."""
    sample = os.path.join(TOP_DIR, "etc", "nbdd.conf")
    img = make_image(tmp_path / "d0.img", 65536, [(0, b"samp")])
    h = nbd.NBD()
    h.connect_command([NBDD, "--config", sample, "--stdio",
                       "--state-dir", str(tmp_path / "state"),
                       "--exit-with-parent",
                       "--blockdev", f"driver=raw,node-name=d0,"
                       f"file.driver=file,file.filename={img}",
                       "--export", "type=nbd,id=e0,node-name=d0"])
    assert h.pread(4, 0) == b"samp"
    h.shutdown()


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
    conf = write_conf(tmp_path, "state-dir = /tmp/x\n"
                                "admin-group = no-such-group-nbdd\n")
    status, err = start_fails(["--config", conf])
    assert status == 1
    assert f"{conf}:2: admin-group: no such group" in err


def test_admin_group_needs_a_socket(tmp_path):
    status, err = start_fails(["--admin-group", "root"])
    assert status == 1
    assert "--admin-group needs an admin socket" in err


def test_admin_socket_path_too_long(tmp_path):
    status, err = start_fails(["--admin-socket", "/tmp/" + "x" * 200])
    assert status == 1
    assert "too long for a unix socket" in err


def test_help_mentions_config_and_admin():
    p = run([NBDD, "--help"])
    for opt in ("--config FILE", "--admin-socket PATH",
                "--admin-group GROUP"):
        assert opt in p.stdout
    assert "command line replace" in p.stdout
