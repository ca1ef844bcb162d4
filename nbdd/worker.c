/* The worker pool: disk I/O never runs on the event loop.
 *
 * Submission is batched: while the loop parses a burst of pipelined
 * requests it collects them in 'pending' (loop thread only), and at
 * the end of the event workers_kick moves them all to 'runq' under one
 * lock and wakes one worker per WORKER_BATCH of them.  A worker takes
 * up to WORKER_BATCH requests at a time, runs each (I/O and reply
 * encoding), and hands them back through 'done' with one ev_async_send,
 * which libev coalesces, so a burst costs a few wakeups, not one per
 * request.  On 2 cores this is what keeps context switches, not I/O,
 * from being the cost of a 4k write.
 *
 * Workers send the replies of their batch themselves, one writev per
 * connection (conn_send_direct), when nothing else is queued there:
 * that takes the copy into the socket off the loop thread and saves a
 * trip through it.
 *
 * A worker that sleeps inside the graph (a throttle holding a request
 * back, a write waiting for its dirty bit to be durable) says so: the
 * requests of its batch not started yet go back to the queue, and
 * while it sleeps with work queued and nobody idle, an extra worker is
 * started in its place; extras leave when they find nothing to do.  So
 * a throttled client costs threads, not the service of every other
 * client, and writers that wait for one flush all reach it.
 *
 * Locking: runq_lock protects runq, quit, idle_workers, sleeping and
 * nr_extra; done_lock protects done.  A request is owned by exactly one
 * side at a time.
 */
#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "internal.h"
#include "log.h"

#define WORKER_BATCH 8
#define WORKER_BATCH_BYTES (128u << 10)

static pthread_mutex_t runq_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t runq_cond = PTHREAD_COND_INITIALIZER;
static struct request *runq_head, *runq_tail;
static unsigned runq_len;
static bool quit;
static unsigned idle_workers;
static unsigned sleeping;       /* workers asleep in the graph */
static unsigned nr_extra;       /* extra workers running */
static pthread_cond_t extras_gone = PTHREAD_COND_INITIALIZER;
#define MAX_EXTRA_WORKERS 1024
#define EXTRA_LINGER_NS 50000000  /* 50 ms */

static pthread_mutex_t done_lock = PTHREAD_MUTEX_INITIALIZER;
static struct request *done_head, *done_tail;

/* Loop thread only: submitted during this event, not yet kicked. */
static struct request *pending_head, *pending_tail;
static unsigned pending_len;
/* Loop thread only: submitted and not yet back through done_cb. */
static unsigned outstanding;

static struct ev_loop *loop;
static ev_async done_async;
static pthread_t *threads;
static unsigned nr_threads;

/* Append the chain first..last (linked by ->next) to a queue. */
static void
chain_append (struct request **head, struct request **tail,
              struct request *first, struct request *last)
{
  if (*tail)
    (*tail)->next = first;
  else
    *head = first;
  *tail = last;
}

static void *worker_main (void *arg);

/* With runq_lock held: if queued work waits while no worker is idle
 * and some are asleep in the graph, start an extra one.
 */
static void
maybe_add_worker_locked (void)
{
  pthread_attr_t attr;
  pthread_t t;

  if (quit || runq_head == NULL || idle_workers > 0 ||
      nr_extra >= sleeping || nr_extra >= MAX_EXTRA_WORKERS)
    return;
  pthread_attr_init (&attr);
  pthread_attr_setdetachstate (&attr, PTHREAD_CREATE_DETACHED);
  if (thread_create_quiet (&t, &attr, worker_main, (void *) 1) == 0)
    nr_extra++;
  pthread_attr_destroy (&attr);
}

/* The worker thread's batch: the request running, and the last one. */
static __thread struct request *running, **batch_last;

/* The requests of this worker's batch that have not started go back to
 * the head of the queue, for another worker: they must not wait for
 * this one to wake up.
 */
static void
hand_back_locked (void)
{
  struct request *rest, *tail;
  unsigned n = 1;

  if (running == NULL || running->next == NULL)
    return;
  rest = running->next;
  for (tail = rest; tail->next; tail = tail->next)
    n++;
  running->next = NULL;
  *batch_last = running;
  tail->next = runq_head;
  runq_head = rest;
  if (runq_tail == NULL)
    runq_tail = tail;
  runq_len += n;
  if (idle_workers > 0)
    pthread_cond_signal (&runq_cond);
}

/* Only a worker running a request counts: a job's threads sleep in
 * the graph too, and they hold no batch and take no worker's place.
 */
static __thread unsigned asleep_depth;  /* sleeps may nest */

static void
sleep_begin (void)
{
  if (running == NULL || asleep_depth++ > 0)
    return;
  pthread_mutex_lock (&runq_lock);
  sleeping++;
  hand_back_locked ();
  maybe_add_worker_locked ();
  pthread_mutex_unlock (&runq_lock);
}

static void
sleep_end (void)
{
  if (asleep_depth == 0 || --asleep_depth > 0)
    return;
  pthread_mutex_lock (&runq_lock);
  sleeping--;
  pthread_mutex_unlock (&runq_lock);
}

static void *
worker_main (void *arg)
{
  bool extra = arg != NULL;

  for (;;) {
    struct request *batch, *last, *req;
    unsigned n;
    uint64_t bytes;

    pthread_mutex_lock (&runq_lock);
    while (runq_head == NULL && !quit && !extra) {
      idle_workers++;
      pthread_cond_wait (&runq_cond, &runq_lock);
      idle_workers--;
    }
    /* An extra lingers a moment: sleepers come in bursts (a flush of
     * dirty bits), and a thread per sleeper would be the cost.
     */
    if (runq_head == NULL && !quit && extra) {
      struct timespec ts;
      clock_gettime (CLOCK_REALTIME, &ts);
      ts.tv_nsec += EXTRA_LINGER_NS;
      if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
      }
      idle_workers++;
      pthread_cond_timedwait (&runq_cond, &runq_lock, &ts);
      idle_workers--;
    }
    if (runq_head == NULL) {    /* quit (or an extra out of work) */
      if (extra && --nr_extra == 0)
        pthread_cond_broadcast (&extras_gone);
      pthread_mutex_unlock (&runq_lock);
      return NULL;
    }
    /* Small requests in batches; big ones one at a time, so that
     * several workers copy in parallel.
     */
    batch = last = runq_head;
    bytes = last->bytes;
    for (n = 1; n < WORKER_BATCH && last->next &&
           bytes + last->next->bytes <= WORKER_BATCH_BYTES; ++n) {
      last = last->next;
      bytes += last->bytes;
    }
    runq_head = last->next;
    if (runq_head == NULL)
      runq_tail = NULL;
    runq_len -= n;
    pthread_mutex_unlock (&runq_lock);
    last->next = NULL;

    batch_last = &last;
    for (req = batch; req; req = req->next) {
      running = req;
      request_run (req);
    }
    running = NULL;
    /* Send the replies from here, one writev per connection: the loop
     * thread has enough to do, and this saves a trip through it.
     */
    for (req = batch; req; ) {
      unsigned run = conn_send_direct (req);
      while (run-- > 0)
        req = req->next;
    }

    pthread_mutex_lock (&done_lock);
    chain_append (&done_head, &done_tail, batch, last);
    pthread_mutex_unlock (&done_lock);
    ev_async_send (loop, &done_async);
  }
}

static void
done_cb (struct ev_loop *l, ev_async *w, int revents)
{
  struct request *req, *next;

  pthread_mutex_lock (&done_lock);
  req = done_head;
  done_head = done_tail = NULL;
  pthread_mutex_unlock (&done_lock);

  for (; req; req = next) {
    next = req->next;
    outstanding--;
    tx_request_completed (req->conn, req);
    conn_request_done (req);
  }
  conns_flush_dirty ();
}

void
workers_submit (struct request *req)
{
  req->next = NULL;
  chain_append (&pending_head, &pending_tail, req, req);
  pending_len++;
  outstanding++;
}

unsigned
workers_outstanding (void)
{
  return outstanding;
}

void
workers_kick (void)
{
  unsigned wake;

  if (pending_head == NULL)
    return;
  pthread_mutex_lock (&runq_lock);
  chain_append (&runq_head, &runq_tail, pending_head, pending_tail);
  runq_len += pending_len;
  wake = MIN (idle_workers, (runq_len + WORKER_BATCH - 1) / WORKER_BATCH);
  if (sleeping > 0)
    maybe_add_worker_locked ();
  pthread_mutex_unlock (&runq_lock);
  pending_head = pending_tail = NULL;
  pending_len = 0;
  while (wake-- > 0)
    pthread_cond_signal (&runq_cond);
}

int
workers_start (struct ev_loop *l, unsigned nr, struct error **errp)
{
  loop = l;
  graph_set_sleep_hooks (sleep_begin, sleep_end);
  ev_async_init (&done_async, done_cb);
  ev_async_start (loop, &done_async);
  ev_unref (loop);              /* the pool alone keeps no loop alive */

  threads = calloc (nr, sizeof *threads);
  if (threads == NULL) {
    error_setg_errno (errp, errno, "allocating worker threads");
    return -1;
  }
  for (nr_threads = 0; nr_threads < nr; ++nr_threads) {
    int err = thread_create_quiet (&threads[nr_threads], NULL, worker_main,
                                   NULL);
    if (err) {
      error_setg_errno (errp, err, "starting worker thread");
      workers_stop ();
      return -1;
    }
  }
  return 0;
}

/* Let the workers finish what is queued, join them, and hand the last
 * completions back to their connections.
 */
void
workers_stop (void)
{
  workers_kick ();
  pthread_mutex_lock (&runq_lock);
  quit = true;
  pthread_cond_broadcast (&runq_cond);
  pthread_mutex_unlock (&runq_lock);
  for (unsigned i = 0; i < nr_threads; ++i)
    pthread_join (threads[i], NULL);
  pthread_mutex_lock (&runq_lock);
  while (nr_extra > 0)
    pthread_cond_wait (&extras_gone, &runq_lock);
  pthread_mutex_unlock (&runq_lock);
  graph_set_sleep_hooks (NULL, NULL);
  free (threads);
  threads = NULL;
  nr_threads = 0;
  if (loop) {
    done_cb (loop, &done_async, 0);
    ev_ref (loop);
    ev_async_stop (loop, &done_async);
  }
}
