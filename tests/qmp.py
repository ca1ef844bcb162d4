"""A plain QMP client for the tests: JSON over a unix socket, nothing
borrowed from nbdd.  Replies are matched to commands by order (the
daemon answers one command at a time); events are kept aside."""
import json
import socket
import time


class QMPError(Exception):
    def __init__(self, cls, desc):
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc


class QMP:
    def __init__(self, path, negotiate=True, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        # A unix socket whose backlog is full refuses at once (EAGAIN)
        # instead of waiting: wait here.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.buf = b""
        self.events = []
        self.replies = []               # read while waiting for events
        self.greeting = self.recv()
        if negotiate:
            self.cmd("qmp_capabilities")

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv(self):
        """The next message (reply, event or greeting)."""
        dec = json.JSONDecoder()
        while True:
            try:
                text = self.buf.decode()
            except UnicodeDecodeError:
                text = None             # a character split across reads
            if text is not None and text.strip():
                stripped = text.lstrip()
                try:
                    obj, end = dec.raw_decode(stripped)
                    self.buf = stripped[end:].encode()
                    return obj
                except json.JSONDecodeError:
                    pass
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the daemon closed the session")
            self.buf += chunk

    def reply(self):
        """The next reply, setting events aside."""
        if self.replies:
            return self.replies.pop(0)
        while True:
            m = self.recv()
            if "event" in m:
                self.events.append(m)
                continue
            return m

    def execute(self, name, args=None, id=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        if id is not None:
            msg["id"] = id
        self.send_raw(json.dumps(msg).encode() + b"\n")
        return self.reply()

    def cmd(self, _command, **args):
        """Run a command: its return value, or QMPError.  Argument
        names are QEMU's with '_' for '-'."""
        r = self.execute(_command, {k.replace("_", "-"): v
                                    for k, v in args.items()} or None)
        if "error" in r:
            raise QMPError(r["error"]["class"], r["error"]["desc"])
        return r["return"]

    def cmd_args(self, name, args):
        """As cmd, with the arguments as a dict (keys kept as given)."""
        r = self.execute(name, args)
        if "error" in r:
            raise QMPError(r["error"]["class"], r["error"]["desc"])
        return r["return"]

    def wait_event(self, name, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {name} event")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                m = self.recv()
            except socket.timeout:
                continue
            finally:
                self.sock.settimeout(30)
            if "event" in m:
                self.events.append(m)
            else:
                self.replies.append(m)
