/* The worker pool: disk I/O never runs on the event loop.
 *
 * The loop thread appends requests to 'todo' and signals one worker;
 * a worker runs the request (I/O and reply encoding), appends it to
 * 'done' and wakes the loop with ev_async_send, which libev coalesces,
 * so a burst of completions costs one wakeup.  The loop then queues
 * every completed reply and flushes each connection once.
 *
 * Locking: todo_lock protects todo and quit; done_lock protects done.
 * A request is owned by exactly one side at a time.
 */
#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>

#include "internal.h"
#include "log.h"

static pthread_mutex_t todo_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t todo_cond = PTHREAD_COND_INITIALIZER;
static struct request *todo_head, *todo_tail;
static bool quit;
static unsigned idle_workers;

static pthread_mutex_t done_lock = PTHREAD_MUTEX_INITIALIZER;
static struct request *done_head, *done_tail;

static struct ev_loop *loop;
static ev_async done_async;
static pthread_t *threads;
static unsigned nr_threads;

static void *
worker_main (void *arg)
{
  for (;;) {
    struct request *req;
    bool busy;

    pthread_mutex_lock (&todo_lock);
    while (todo_head == NULL && !quit) {
      idle_workers++;
      pthread_cond_wait (&todo_cond, &todo_lock);
      idle_workers--;
    }
    req = todo_head;
    if (req == NULL) {          /* quit, and nothing left to do */
      pthread_mutex_unlock (&todo_lock);
      return NULL;
    }
    todo_head = req->next;
    if (todo_head == NULL)
      todo_tail = NULL;
    busy = todo_head != NULL;
    pthread_mutex_unlock (&todo_lock);

    request_run (req);
    /* When requests trickle in (low queue depth), latency is all, and
     * the reply goes straight out.  Under load the loop gathers many
     * replies into one writev, which is cheaper.
     */
    if (!busy)
      conn_send_direct (req);

    req->next = NULL;
    pthread_mutex_lock (&done_lock);
    if (done_tail)
      done_tail->next = req;
    else
      done_head = req;
    done_tail = req;
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
    tx_request_completed (req->conn, req);
    conn_request_done (req);
  }
  conns_flush_dirty ();
}

void
workers_submit (struct request *req)
{
  bool wake;

  req->next = NULL;
  pthread_mutex_lock (&todo_lock);
  if (todo_tail)
    todo_tail->next = req;
  else
    todo_head = req;
  todo_tail = req;
  wake = idle_workers > 0;
  pthread_mutex_unlock (&todo_lock);
  if (wake)
    pthread_cond_signal (&todo_cond);
}

int
workers_start (struct ev_loop *l, unsigned nr, struct error **errp)
{
  sigset_t all, old;

  loop = l;
  ev_async_init (&done_async, done_cb);
  ev_async_start (loop, &done_async);
  ev_unref (loop);              /* the pool alone keeps no loop alive */

  threads = calloc (nr, sizeof *threads);
  if (threads == NULL) {
    error_setg_errno (errp, errno, "allocating worker threads");
    return -1;
  }
  /* Signals are the loop's business: workers block them all. */
  sigfillset (&all);
  pthread_sigmask (SIG_BLOCK, &all, &old);
  for (nr_threads = 0; nr_threads < nr; ++nr_threads) {
    int err = pthread_create (&threads[nr_threads], NULL, worker_main,
                              NULL);
    if (err) {
      pthread_sigmask (SIG_SETMASK, &old, NULL);
      error_setg_errno (errp, err, "starting worker thread");
      workers_stop ();
      return -1;
    }
  }
  pthread_sigmask (SIG_SETMASK, &old, NULL);
  return 0;
}

/* Let the workers finish what is queued, join them, and hand the last
 * completions back to their connections.
 */
void
workers_stop (void)
{
  pthread_mutex_lock (&todo_lock);
  quit = true;
  pthread_cond_broadcast (&todo_cond);
  pthread_mutex_unlock (&todo_lock);
  for (unsigned i = 0; i < nr_threads; ++i)
    pthread_join (threads[i], NULL);
  free (threads);
  threads = NULL;
  nr_threads = 0;
  if (loop) {
    done_cb (loop, &done_async, 0);
    ev_ref (loop);
    ev_async_stop (loop, &done_async);
  }
}
