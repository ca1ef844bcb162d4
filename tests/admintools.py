"""Helpers for the tests that drive the admin socket: a daemon with a
state dir, graphs built through QMP, and an action that always fails
(to make a transaction roll back)."""
from conftest import make_image
from helpers import run

MiB = 1 << 20


def start(nbdd_server, tmp_path, extra=()):
    state = tmp_path / "state"
    srv = nbdd_server(["--state-dir", str(state)] + list(extra))
    srv.state = state
    srv.admin = str(state / "admin.sock")
    return srv


def restart(srv, nbdd_server, tmp_path):
    srv.stop()
    return start(nbdd_server, tmp_path)


def qcow2_graph(q, tmp_path, name="disk0", size=64 * MiB):
    """blockdev-create a qcow2 image and add it as node @name."""
    img = str(tmp_path / f"{name}.qcow2")
    q.cmd("blockdev-create", job_id="c-" + name,
          options={"driver": "qcow2", "size": size,
                   "file": {"driver": "file", "filename": img}})
    q.cmd_args("blockdev-add", {"driver": "qcow2", "node-name": name,
                                "file": {"driver": "file",
                                         "filename": img}})
    return img


def qemu_img_check(img):
    run(["qemu-img", "check", "-f", "qcow2", img])


def raw_node(q, tmp_path, name):
    img = make_image(tmp_path / f"{name}.img", 4 * MiB)
    q.cmd_args("blockdev-add", {"driver": "raw", "node-name": name,
                                "file": {"driver": "file", "filename": img}})
    return img


FAIL = {"type": "block-export-add",
        "data": {"type": "nbd", "id": "x", "node-name": "no-such-node"}}
