#!/usr/bin/python3
"""Seed corpus for fuzz-qmp: admin sessions that use each command.

Usage: make-qmp-corpus.py DIR.  File names are relative (the fuzzer
runs in a scratch directory) and sizes small."""
import json
import os
import sys

CAPS = {"execute": "qmp_capabilities"}

SESSIONS = {
    "queries": [{"execute": c} for c in (
        "query-version", "query-commands", "query-named-block-nodes",
        "query-block-exports", "query-connections", "query-stats")],
    "create-add-export": [
        {"execute": "blockdev-create", "arguments": {"options": {
            "driver": "file", "filename": "f.img", "size": 1048576}}},
        {"execute": "blockdev-add", "arguments": {
            "driver": "raw", "node-name": "r0",
            "file": {"driver": "file", "filename": "f.img"}}},
        {"execute": "block-export-add", "arguments": {
            "type": "nbd", "id": "x", "node-name": "r0", "writable": True}},
        {"execute": "block-export-del", "arguments": {"id": "x",
                                                      "mode": "hard"}},
        {"execute": "blockdev-del", "arguments": {"node-name": "r0"}}],
    "qcow2": [
        {"execute": "blockdev-create", "arguments": {"options": {
            "driver": "qcow2", "size": 1048576,
            "file": {"driver": "file", "filename": "q.qcow2"}}}},
        {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "q0", "backing": None,
            "file": {"driver": "file", "filename": "q.qcow2"}}},
        {"execute": "blockdev-snapshot", "arguments": {"node": "disk0",
                                                       "overlay": "q0"}}],
    "throttle": [
        {"execute": "blockdev-add", "arguments": {
            "driver": "throttle", "node-name": "t0", "file": "disk0",
            "throttle-group": "g", "limits": {"iops-total": 1000}}},
        {"execute": "blockdev-insert-node", "arguments": {"node": "disk0",
                                                          "filter": "t0"}},
        {"execute": "block-set-io-throttle", "arguments": {
            "group": "g", "iops": 10, "bps_wr": 1000000}},
        {"execute": "blockdev-remove-node", "arguments": {"filter": "t0"}},
        {"execute": "blockdev-replace", "arguments": {
            "parent-type": "export", "export-id": "e0",
            "new-child": "disk0"}}],
    "transaction": [
        {"execute": "transaction", "arguments": {"actions": [
            {"type": "blockdev-add", "data": {
                "driver": "raw", "node-name": "a",
                "file": {"driver": "file", "filename": "f.img"}}},
            {"type": "block-export-add", "data": {
                "type": "nbd", "id": "y", "node-name": "a"}},
            {"type": "block-export-add", "data": {
                "type": "nbd", "id": "y", "node-name": "a"}}]}}],
    "errors": [
        {"execute": "nope"}, {"execute": "blockdev-del"},
        {"execute": "blockdev-del", "arguments": {"node-name": 1}},
        {"execute": "quit"}],
}


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, cmds in SESSIONS.items():
        with open(os.path.join(out, name), "w") as f:
            for i, c in enumerate([CAPS] + cmds):
                c = dict(c, id=i)
                f.write(json.dumps(c) + "\n")
    with open(os.path.join(out, "garbage"), "wb") as f:
        f.write(b'{"execute": "qmp_capabilities"}\n{bad\n[1]\n'
                b'{"execute": "query-version", "id": [[[]]]}\n')


if __name__ == "__main__":
    main()
