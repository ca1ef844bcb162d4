"""A background mirror that cannot catch up with the guest holds back.

Random writes spread over the whole disk, faster than the job copies
granules, dirty again everything it copies: the copy only takes from
the guest.  The job then copies one slice of time in eight until the
guest slows down, and catches up once it has.  A guest it can outrun
gets the job's full speed.

The job's speed (block-job-set-speed) makes its copy rate known and
the same in every build, so that 'faster than the job' holds under the
sanitizers too."""
import random
import threading
import time

import nbd

from admintools import MiB, start
from qmp import QMP
from test_jobs import job, live_disk, raw_target, seed

SIZE = 64 * MiB
SPEED = 8 * MiB             # 128 granules of 64 KiB a second
WINDOW = 4.0                # seconds over which the copy is measured


class Flood:
    """@n threads, each on its own connection, writing 4 KiB blocks at
    random over the disk as fast as they can (or @pause apart), each
    in its own stripe of blocks so that the model is exact."""

    def __init__(self, uri, model, n=3, pause=0.0):
        self.uri, self.model, self.n, self.pause = uri, model, n, pause
        self.halt = threading.Event()
        self.writes = [0] * n
        self.errors = []
        self.threads = [threading.Thread(target=self.run, args=(i,),
                                         daemon=True) for i in range(n)]

    def run(self, i):
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            rnd = random.Random(i)
            blocks = SIZE // 4096
            while not self.halt.is_set():
                off = (rnd.randrange(blocks // self.n) * self.n + i) * 4096
                data = rnd.randbytes(4096)
                h.pwrite(data, off)
                self.model[off:off + 4096] = data
                self.writes[i] += 1
                if self.pause:
                    time.sleep(self.pause)
            h.flush()
            h.shutdown()
        except Exception as e:              # noqa: BLE001
            self.errors.append(e)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.halt.set()
        for t in self.threads:
            t.join(60)
        assert not self.errors, self.errors

    def total(self):
        return sum(self.writes)


def copied_over(q, seconds):
    """What the job copied in @seconds, and the guest's writes then."""
    before = job(q, "m0")["offset"]
    time.sleep(seconds)
    return job(q, "m0")["offset"] - before


def mirror(srv, q, tmp_path, model):
    live_disk(q, tmp_path, SIZE)
    seed(srv, SIZE, model)
    tgt = raw_target(q, tmp_path, size=SIZE)
    q.cmd("blockdev-mirror", job_id="m0", device="disk0", target="tgt",
          sync="full", speed=SPEED)
    return tgt


def finish(q, tgt, model):
    """Ready once the guest has stopped, complete, and the target holds
    every acknowledged write."""
    q.wait_event("BLOCK_JOB_READY", timeout=60)
    q.cmd("block-job-complete", device="m0")
    ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
    assert "error" not in ev["data"], ev
    with open(tgt, "rb") as f:
        assert f.read() == model


def test_a_mirror_the_guest_outpaces_holds_back(nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path, ["-v"])
    model = bytearray(SIZE)
    with QMP(srv.admin) as q:
        tgt = mirror(srv, q, tmp_path, model)
        with Flood(srv.uri("live"), model) as flood:
            time.sleep(1.0)                 # the job has judged
            w0 = flood.total()
            copied = copied_over(q, WINDOW)
            rate = (flood.total() - w0) / WINDOW
            j = job(q, "m0")
        # The guest dirtied more granules a second than the job copies
        # (else this test proves nothing), and the job, which copies
        # SPEED a second when it copies, copied at most half of that.
        assert rate > 4 * SPEED / 65536, rate
        assert copied <= SPEED * WINDOW / 2, (copied, rate)
        assert j["status"] == "running" and not j["ready"], j
        assert j["len"] - j["offset"] > SIZE // 2, j     # still dirty
        # The guest stops: the job copies at its speed again.
        t0 = time.monotonic()
        finish(q, tgt, model)
        assert time.monotonic() - t0 < 40


def test_a_mirror_that_gains_on_the_guest_copies_at_its_speed(
        nbdd_server, tmp_path):
    srv = start(nbdd_server, tmp_path)
    model = bytearray(SIZE)
    with QMP(srv.admin) as q:
        tgt = mirror(srv, q, tmp_path, model)
        # About 20 writes a second: a sixth of what the job copies.
        with Flood(srv.uri("live"), model, n=1, pause=0.05) as flood:
            time.sleep(1.0)
            copied = copied_over(q, WINDOW)
            assert flood.total() > 20
        assert copied >= SPEED * WINDOW * 0.7, copied
        finish(q, tgt, model)
