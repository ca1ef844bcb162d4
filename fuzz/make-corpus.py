#!/usr/bin/python3
"""Write the seed corpus for fuzz-protocol: whole client sessions that
reach every option and command, so the fuzzer starts deep in the
protocol instead of at the greeting."""
import os
import struct
import sys

IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513
EXT_REQ = 0x21e41c71


def opt(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def name_infos(name, infos=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + \
        b"".join(struct.pack(">H", i) for i in infos)


def meta(name, queries):
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def req(typ, off, count, flags=0, cookie=1, data=b""):
    return struct.pack(">IHHQQI", REQ, flags, typ, cookie, off, count) + data


def ext_req(typ, off, count, flags=0, cookie=1, data=b""):
    return struct.pack(">IHHQQQ", EXT_REQ, flags, typ, cookie, off,
                       count) + data


CFLAGS = struct.pack(">I", 3)
SEEDS = {
    "go-read": CFLAGS + opt(7, name_infos("", [3])) +
    req(0, 0, 4096) + req(2, 0, 0),
    "sr-meta-rw": CFLAGS + opt(8) +
    opt(10, meta("disk0", ["base:allocation"])) +
    opt(7, name_infos("disk0", [0, 1, 2, 3])) +
    req(1, 512, 4, data=b"abcd", flags=1) + req(0, 0, 8192, flags=4) +
    req(7, 0, 1 << 20, flags=8) + req(4, 4096, 4096) +
    req(6, 8192, 65536, flags=2) + req(5, 0, 4096) + req(3, 0, 0) +
    req(2, 0, 0),
    "extended": CFLAGS + opt(11) +
    opt(10, meta("disk0", ["base:allocation"])) +
    opt(7, name_infos("disk0")) +
    ext_req(1, 0, 3, flags=0x20, data=b"xyz") + ext_req(0, 0, 65536) +
    ext_req(7, 0, 1 << 20) + ext_req(2, 0, 0),
    # both meta contexts: one status chunk each, and the LIST forms
    "meta-depth": CFLAGS + opt(8) +
    opt(9, meta("disk0", ["qemu:", "base:", "qemu:dirty-bitmap:"])) +
    opt(10, meta("disk0", ["qemu:allocation-depth", "base:allocation",
                           "qemu:nosuch"])) +
    opt(7, name_infos("disk0")) +
    req(7, 0, 1 << 20) + req(7, 4095, 3, flags=8) + req(2, 0, 0),
    "meta-depth-extended": CFLAGS + opt(11) +
    opt(10, meta("disk0", ["qemu:allocation-depth"])) +
    opt(7, name_infos("disk0")) +
    ext_req(7, 0, 1 << 20) + ext_req(7, 1, 1, flags=8) + ext_req(2, 0, 0),
    "list-info-abort": CFLAGS + opt(3) + opt(6, name_infos("ro", [1, 2])) +
    opt(9, meta("disk0", [])) + opt(99, b"junk") + opt(5) + opt(2),
    "export-name": struct.pack(">I", 1) + opt(1, b"disk0") +
    req(0, 1000, 100) + req(1, 0, 2, data=b"hi"),
    # zero-length requests, and reads large enough to be spliced
    "lengths": CFLAGS + opt(7, name_infos("disk0")) +
    req(0, 0, 0) + req(1, 0, 0) + req(0, 0, 128 << 10) +
    req(0, 4095, 256 << 10) + req(0, 0, 256 << 10),
}

out = sys.argv[1] if len(sys.argv) > 1 else "corpus"
os.makedirs(out, exist_ok=True)
for name, data in SEEDS.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
