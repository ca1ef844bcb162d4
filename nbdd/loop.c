/* The event loop, with adaptive polling.
 *
 * A client at queue depth 1 sends its next request a few tens of
 * microseconds after our reply.  Blocking in epoll_wait in between
 * costs a sleep and a wakeup from the other CPU, which on a virtual
 * machine is most of the round trip.  So, as QEMU's iothreads do
 * (poll-max-ns), the loop first looks for events without blocking for
 * a while before it sleeps.  The window adapts: it grows while the
 * waits it sees are short, and shrinks when they are longer than the
 * limit, so a daemon whose clients are idle or slow never spins.
 *
 * It only polls while no request is with the workers: their
 * completions wake the loop anyway, and the CPU is theirs.
 */
#include <config.h>

#include <inttypes.h>
#include <stdint.h>
#include <time.h>

#include "internal.h"
#include "log.h"

#define POLL_START_NS 4000      /* the first window, when one is earned */

static bool quit;
static uint64_t woke_ns;        /* when the last wait ended */
static bool woke_busy;          /* and whether it found anything */

/* libev calls this after each wait, with the events it found pending:
 * the moment the wait ended, before any callback runs.
 */
static void
invoke_pending (struct ev_loop *loop)
{
  woke_busy = ev_pending_count (loop) > 0;
  woke_ns = monotonic_ns ();
  ev_invoke_pending (loop);
}

/* QEMU's rule: a wait the window would have covered leaves it, a wait
 * longer than the limit shrinks it (halved here; QEMU's default resets
 * it), a shorter one grows it, never past the limit.
 */
static uint64_t
adjust (uint64_t poll_ns, uint64_t waited_ns, uint64_t max_ns)
{
  if (waited_ns <= poll_ns)
    return poll_ns;
  if (waited_ns > max_ns)
    return poll_ns / 2 < POLL_START_NS ? 0 : poll_ns / 2;
  if (poll_ns < max_ns)
    return poll_ns == 0 ? MIN ((uint64_t) POLL_START_NS, max_ns)
      : MIN (poll_ns * 2, max_ns);
  return poll_ns;
}

static struct ev_loop *running_loop;

void
daemon_quit (void)
{
  shutting_down = true;
  if (running_loop)
    loop_quit (running_loop);
}

void
loop_run (struct ev_loop *loop)
{
  const uint64_t max_ns = config.poll_max_ns;
  uint64_t poll_ns = 0;
  uint64_t polls = 0, polls_paid = 0;  /* for -v, and the tests */

  running_loop = loop;
  if (max_ns == 0) {
    ev_run (loop, 0);
    return;
  }
  ev_set_invoke_pending_cb (loop, invoke_pending);
  quit = false;
  while (!quit) {
    uint64_t start = monotonic_ns ();

    if (poll_ns > 0 && workers_outstanding () == 0) {
      polls++;
      do {
        woke_busy = false;
        if (!ev_run (loop, EVRUN_NOWAIT) || quit)
          goto out;
      } while (!woke_busy && monotonic_ns () - start < poll_ns);
      if (woke_busy) {
        polls_paid++;
        continue;               /* it paid: look again after this event */
      }
    }
    if (!ev_run (loop, EVRUN_ONCE))
      break;
    if (woke_busy)
      poll_ns = adjust (poll_ns, woke_ns - start, max_ns);
  }
 out:
  ev_set_invoke_pending_cb (loop, ev_invoke_pending);
  debug ("event loop: polled %" PRIu64 " times, %" PRIu64 " found input",
         polls, polls_paid);
}

void
loop_quit (struct ev_loop *loop)
{
  quit = true;
  ev_break (loop, EVBREAK_ALL);
}
