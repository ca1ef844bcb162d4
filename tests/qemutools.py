"""QEMU's own tools as the qcow2 tests use them: they make the images,
and they are the oracle every image nbdd reads or writes is checked
against."""
import json

import nbd

from helpers import merge, run


def qemu_img(*args, check=True):
    return run(["qemu-img"] + [str(a) for a in args], timeout=300,
               check=check)


def qemu_io(img, *cmds, fmt="qcow2", check=True):
    """Run qemu-io commands, in order, in one process.  qemu-io reports
    a failed command on its output and still exits 0: with @check that
    fails the test too."""
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    p = run(argv + [str(img)], timeout=300, check=check)
    if check:
        bad = [line for line in (p.stdout + p.stderr).splitlines()
               if "error" in line.lower() or "failed" in line.lower()]
        assert not bad, "qemu-io: " + "\n".join(bad)
    return p


def create(path, size, opts="", backing=None, backing_fmt="qcow2"):
    """qemu-img create -f qcow2, with -o @opts and a backing file."""
    argv = ["create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", opts]
    if backing:
        argv += ["-b", str(backing)]
        if backing_fmt:
            argv += ["-F", backing_fmt]
    qemu_img(*argv, path, size)
    return path


def qemu_map(src):
    """qemu-img map's view as merged [(length, base:allocation flags)]."""
    doc = json.loads(qemu_img("map", "--output=json", src).stdout)
    return merge([(e["length"],
                   (0 if e["data"] else nbd.STATE_HOLE) |
                   (nbd.STATE_ZERO if e["zero"] else 0)) for e in doc])
