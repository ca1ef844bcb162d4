"""A background mirror that cannot catch up with the guest holds back.

Writes spread over the disk, covering more granules a second than the
job copies, dirty again everything it copies: the copy only takes from
the guest.  The job then copies one slice of time in eight until the
guest slows down, and catches up once it has.  A guest it can outrun
gets the job's full speed, whatever the shape of its writes.

The job's speed makes its copy rate known and the same in every build,
so that 'faster than the job' holds under the sanitizers too.  The
daemon runs with -v, and its estimate of the guest's rate is checked
against the rate the test's own writers reached."""
import random
import re
import threading
import time

import nbd
import pytest

from admintools import MiB, start
from qmp import QMP
from test_jobs import job, live_disk, raw_target, seed

GRANULE = 64 * 1024
SETTLE = 1.0                # seconds for the job to judge
WINDOW = 2.0                # seconds over which the copy is measured


class Writers:
    """@n threads, each on its own connection, writing @bs blocks as
    fast as they can (or @pause apart): at random, each thread in its
    own stripe of blocks so that the model is exact, or in sequence
    from the start of the disk."""

    def __init__(self, uri, model, n=1, bs=4096, pause=0.0,
                 sequential=False):
        self.uri, self.model, self.n, self.bs = uri, model, n, bs
        self.pause, self.sequential = pause, sequential
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
            blocks = len(self.model) // self.bs
            k = 0
            while not self.halt.is_set():
                if self.sequential:
                    off = (k % blocks) * self.bs
                    k += 1
                else:
                    off = (rnd.randrange(blocks // self.n) * self.n + i) * \
                        self.bs
                data = rnd.randbytes(self.bs)
                h.pwrite(data, off)
                self.model[off:off + self.bs] = data
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


def measure(q, w, seconds=WINDOW):
    """What the job copied in @seconds, and the writes a second then."""
    o0, w0 = job(q, "m0")["offset"], w.total()
    time.sleep(seconds)
    return job(q, "m0")["offset"] - o0, (w.total() - w0) / seconds


def mirror(srv, q, tmp_path, size, speed):
    model = bytearray(size)
    live_disk(q, tmp_path, size)
    seed(srv, size, model)
    tgt = raw_target(q, tmp_path, size=size)
    q.cmd("blockdev-mirror", job_id="m0", device="disk0", target="tgt",
          sync="full", speed=speed)
    return tgt, model


def finish(q, tgt, model):
    """At full speed, ready once the guest has stopped; completed, the
    target holds every acknowledged write."""
    q.cmd("block-job-set-speed", device="m0", speed=0)
    q.wait_event("BLOCK_JOB_READY", timeout=60)
    q.cmd("block-job-complete", device="m0")
    ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
    assert "error" not in ev["data"], ev
    with open(tgt, "rb") as f:
        assert f.read() == model


def estimates(srv):
    """The guest rates the job logged when it began to hold back."""
    with open(srv.logfile, "rb") as f:
        log = f.read().decode(errors="replace")
    return [float(x) for x in re.findall(
        r"job 'm0': the guest dirties about (\d+) granules/s", log)]


@pytest.mark.parametrize("size,speed,threads,pause", [
    # So fast over so few granules that hardly one stays clean: the
    # job's marks tell the rate.
    (64 * MiB, 32 * MiB, 3, 0),
    # Slower, over more: a granule stays clean long enough to be
    # counted, and the rate is also told from the dirty count and the
    # clean share.
    (256 * MiB, 16 * MiB, 1, 0.0005),
], ids=["few-granules", "many-granules"])
def test_a_mirror_the_guest_outpaces_holds_back(nbdd_server, tmp_path,
                                                size, speed, threads, pause):
    srv = start(nbdd_server, tmp_path, ["-v"])
    with QMP(srv.admin) as q:
        tgt, model = mirror(srv, q, tmp_path, size, speed)
        with Writers(srv.uri("live"), model, n=threads, pause=pause) as w:
            time.sleep(SETTLE)
            copied, rate = measure(q, w)
            j = job(q, "m0")
            # Switching copy modes while it holds back, and back again.
            for mode in ("write-blocking", "background") * 2:
                q.cmd("block-job-change", id="m0", type="mirror",
                      copy_mode=mode)
                time.sleep(0.1)
        # The guest covered more granules a second than the job copies
        # (else this test proves nothing), and the job, which copies
        # @speed a second when it copies, copied at most half of that.
        assert rate > 2 * speed / GRANULE, rate
        assert copied <= speed * WINDOW / 2, (copied, rate)
        assert not j["ready"], j
        # It judged the guest faster than itself, and no faster than it
        # is (a judgement in the first second, while the writers were
        # still reaching their pace, may see much less than the test
        # measured later).
        est = estimates(srv)
        assert est and speed / GRANULE < max(est) < rate * 3, (est, rate)
        finish(q, tgt, model)


def test_a_mirror_that_gains_on_the_guest_copies_at_its_speed(
        nbdd_server, tmp_path):
    """A guest writing in sequence behind the copy hits only clean
    granules, but at a sixth of the job's rate: the job keeps its
    speed, also after a pause."""
    speed = 32 * MiB
    srv = start(nbdd_server, tmp_path, ["-v"])
    with QMP(srv.admin) as q:
        tgt, model = mirror(srv, q, tmp_path, 256 * MiB, speed)
        with Writers(srv.uri("live"), model, bs=GRANULE, pause=0.01,
                     sequential=True) as w:
            time.sleep(SETTLE)
            copied, rate = measure(q, w)
            assert 10 < rate < speed / GRANULE / 4, rate
            assert copied >= speed * WINDOW * 0.7, (copied, rate)
            # A pause is no slice of copying to judge the job by.
            q.cmd("block-job-pause", device="m0")
            time.sleep(1.5)
            q.cmd("block-job-resume", device="m0")
            copied, rate = measure(q, w)
            assert copied >= speed * WINDOW * 0.7, (copied, rate)
        assert estimates(srv) == []
        finish(q, tgt, model)
