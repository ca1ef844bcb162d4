/* The 'nbd' protocol driver: a remote NBD export as a node, through
 * libnbd (a backing file on another appliance, or a job's target).
 *
 * Options, after QEMU's nbd driver where it has them:
 *   server          {"type": "unix", "path": P} or
 *                   {"type": "inet", "host": H, "port": "N"}
 *   export          the export name ("" by default)
 *   uri             instead of server and export: a libnbd URI
 *                   (nbd://, nbds://, nbd+unix://, nbds+unix://)
 *   tls-certificates, tls-psk, tls-username
 *                   TLS (required once given): an X.509 directory as
 *                   nbdd's own --tls-certificates (the server's name
 *                   is checked against its certificate), or a psktool
 *                   file and the username in it
 *   reconnect-delay seconds a request waits for the server to come
 *                   back before it fails (default 10; 0: after one
 *                   attempt)
 *   connections     how many connections to open when the server
 *                   allows multi-conn (default 4); else one
 *   read-only
 *
 * Threads.  Requests are pipelined: a request is issued with libnbd's
 * aio calls on the connection with the fewest requests in flight, from
 * the worker that makes it, and that worker sleeps until its reply.
 * Each connection has a dispatcher thread that polls the socket, lets
 * libnbd read the replies, and wakes the workers they answer.  So one
 * connection carries as many requests at once as there are workers,
 * and a request costs one round trip, not one round trip per request
 * ahead of it.
 *
 * Reconnects.  When a connection dies (the server went away), libnbd
 * fails the requests in flight on it; each is issued again on another
 * connection, or waits up to reconnect-delay for one to come back:
 * NBD reads and writes are idempotent, so nothing is lost and nothing
 * is applied twice in effect.  After the delay a request fails with
 * EIO; the next one tries again.  The dispatcher of a dead connection
 * closes it once no request uses it, and connects again while requests
 * wait for a connection, or while another connection is up (the server
 * is back: the pool fills up again).  An attempt is bounded in time and
 * ends when the node closes.
 *
 * The threads start when the node opens: the daemon opens nodes after
 * it forks into the background.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <libnbd.h>

#include "cleanup.h"
#include "driver.h"
#include "log.h"
#include "options.h"
#include "utils.h"

#define MAX_CONNECTIONS 16
#define MAX_RETRIES 5           /* connections dying under one request */
#define RETRY_NS 200000000      /* between connection attempts */
/* How often a request waiting for a connection, or a dispatcher with
 * requests in flight, looks whether nbdd is shutting down; and how
 * long requests in flight then get to be answered before their
 * connection is dropped (a server that never answers must not hold
 * the shutdown up).
 */
#define SHUTDOWN_CHECK_NS 200000000
#define SHUTDOWN_GRACE_NS 3000000000ull
#define CONNECT_TIMEOUT_S 10    /* for one attempt, handshake included */
/* Requests in flight on a connection at most: each holds a sleeping
 * worker, and a server that stops answering must not cost a thread per
 * request queued behind it.
 */
#define MAX_IN_FLIGHT 32

struct nbd_state;

struct nbd_conn {
  struct nbd_state *s;
  pthread_t thread;
  bool has_thread;
  int wake_fd;                  /* eventfd: look at the handle again */

  /* Under s->lock. */
  struct nbd_handle *h;         /* NULL: not connected */
  bool dead;                    /* h died: no new requests on it */
  unsigned users;               /* requests holding h */
  atomic_bool stop;             /* the node is closing */

  /* The dispatcher's own. */
  bool grace_started;           /* nbdd shuts down with requests on h */
  bool grace_over;              /* ...and h was dropped for them */
  struct timespec grace_end;
};

struct nbd_state {
  /* Where, from the options (constant once open). */
  char *uri;                    /* or: */
  char *path, *host, *port, *export;
  char *tls_certificates, *tls_psk, *tls_username;
  double reconnect_delay;
  char *name;                   /* for messages */

  pthread_mutex_t lock;         /* the conns' shared fields, and: */
  pthread_cond_t changed;       /* a connection came, died or was freed */
  unsigned waiting;             /* requests waiting for a connection */
  unsigned live;                /* connections up and not dead */
  uint64_t attempts;            /* connection attempts finished */
  char *last_error;             /* of the last failed attempt */

  unsigned nr_conns;
  struct nbd_conn conns[MAX_CONNECTIONS];
  bool can_fua, can_flush, can_trim, can_zero, can_fast_zero, can_cache;
  bool has_block_status;
  int64_t block_min, block_max, block_pref;     /* -1: not said */
};

/* ---- connecting ---- */

static bool
dead (struct nbd_handle *h)
{
  return nbd_aio_is_dead (h) == 1 || nbd_aio_is_closed (h) == 1;
}

static void
deadline_after (struct timespec *ts, uint64_t ns)
{
  clock_gettime (CLOCK_MONOTONIC, ts);
  ts->tv_sec += (time_t) (ns / 1000000000);
  ts->tv_nsec += (long) (ns % 1000000000);
  if (ts->tv_nsec >= 1000000000) {
    ts->tv_sec++;
    ts->tv_nsec -= 1000000000;
  }
}

/* Milliseconds to @ts, 0 once past. */
static int
ms_until (const struct timespec *ts)
{
  struct timespec now;
  int64_t ms;

  clock_gettime (CLOCK_MONOTONIC, &now);
  ms = (ts->tv_sec - now.tv_sec) * 1000 +
    (ts->tv_nsec - now.tv_nsec) / 1000000;
  return ms > 0 ? (int) MIN (ms, INT32_MAX) : 0;
}

static bool
before (const struct timespec *a, const struct timespec *b)
{
  return a->tv_sec < b->tv_sec ||
    (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

static bool
past (const struct timespec *ts)
{
  struct timespec now;

  clock_gettime (CLOCK_MONOTONIC, &now);
  return !before (&now, ts);
}

/* Drive libnbd's handshake on @h to its end: at most
 * CONNECT_TIMEOUT_S, and no longer than until @c (if any) is told to
 * stop, so that a server that accepts and says nothing holds up
 * neither the node's users nor its closing.  0, or -1 with errp.
 */
static int
handshake (struct nbd_state *s, struct nbd_conn *c, struct nbd_handle *h,
           struct error **errp)
{
  struct timespec deadline;

  deadline_after (&deadline, (uint64_t) CONNECT_TIMEOUT_S * 1000000000);
  while (nbd_aio_is_connecting (h) == 1) {
    unsigned dir = nbd_aio_get_direction (h);
    struct pollfd fds[2] = {
      { .fd = nbd_aio_get_fd (h),
        .events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                  ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0) },
      { .fd = c ? c->wake_fd : -1, .events = POLLIN },
    };
    int ms = ms_until (&deadline), r;

    if (c && atomic_load (&c->stop)) {
      error_setg (errp, "nbd: %s: the node is closing", s->name);
      return -1;
    }
    if (ms == 0) {
      error_setg (errp, "nbd: %s: no answer to the handshake in %d s",
                  s->name, CONNECT_TIMEOUT_S);
      return -1;
    }
    r = poll (fds, 2, ms);
    if (r == -1 && errno != EINTR) {
      error_setg_errno (errp, errno, "nbd: %s: poll", s->name);
      return -1;
    }
    if (r <= 0)
      continue;
    if (fds[1].revents & POLLIN) {
      uint64_t v;
      if (read (c->wake_fd, &v, sizeof v) == -1 && errno != EAGAIN)
        nbdd_debug ("nbd: wake: %m");
    }
    if ((fds[0].revents & (POLLIN | POLLHUP | POLLERR)) &&
        (dir & LIBNBD_AIO_DIRECTION_READ)) {
      if (nbd_aio_notify_read (h) == -1)
        break;
    }
    else if (fds[0].revents & (POLLOUT | POLLHUP | POLLERR)) {
      if (nbd_aio_notify_write (h) == -1)
        break;
    }
  }
  if (nbd_aio_is_ready (h) != 1) {
    error_setg (errp, "nbd: %s: %s", s->name, nbd_get_error ());
    return -1;
  }
  return 0;
}

/* A new connection, for @c (NULL: the node's first, at open). */
static struct nbd_handle *
conn_open (struct nbd_state *s, struct nbd_conn *c, struct error **errp)
{
  struct nbd_handle *h = nbd_create ();

  if (h == NULL) {
    error_setg (errp, "nbd: %s: %s", s->name, nbd_get_error ());
    return NULL;
  }
  if ((s->tls_certificates || s->tls_psk) &&
      (nbd_set_tls (h, LIBNBD_TLS_REQUIRE) == -1 ||
       (s->tls_certificates &&
        nbd_set_tls_certificates (h, s->tls_certificates) == -1) ||
       (s->tls_psk && nbd_set_tls_psk_file (h, s->tls_psk) == -1) ||
       (s->tls_username &&
        nbd_set_tls_username (h, s->tls_username) == -1)))
    goto fail;
  if (nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1)
    goto fail;
  if (s->uri) {
    if (nbd_aio_connect_uri (h, s->uri) == -1)
      goto fail;
  }
  else {
    if (nbd_set_export_name (h, s->export) == -1)
      goto fail;
    if (s->path ? nbd_aio_connect_unix (h, s->path) == -1
        : nbd_aio_connect_tcp (h, s->host, s->port) == -1)
      goto fail;
  }
  if (handshake (s, c, h, errp) == -1) {
    nbd_close (h);
    return NULL;
  }
  return h;

 fail:
  error_setg (errp, "nbd: %s: %s", s->name, nbd_get_error ());
  nbd_close (h);
  return NULL;
}

static void
wake (struct nbd_conn *c)
{
  uint64_t one = 1;

  /* EAGAIN: a wake-up is pending already. */
  if (write (c->wake_fd, &one, sizeof one) == -1 && errno != EAGAIN)
    nbdd_debug ("nbd: wake: %m");
}

/* Under s->lock: no new request goes to @c; its dispatcher closes the
 * handle once the requests holding it are gone.
 */
static void
mark_dead (struct nbd_conn *c)
{
  struct nbd_state *s = c->s;

  if (c->dead)
    return;
  c->dead = true;
  s->live--;
  pthread_cond_broadcast (&s->changed);
  wake (c);
}

/* Under s->lock, after a failed attempt: sleep before the next one,
 * 200 ms while requests wait, else longer and longer up to 6.4 s (the
 * server may be gone for good).  A request arriving cuts the long
 * sleep short.
 */
static void
retry_sleep (struct nbd_conn *c, unsigned failures)
{
  struct nbd_state *s = c->s;
  struct timespec soon, late;

  deadline_after (&soon, RETRY_NS);
  deadline_after (&late, (uint64_t) RETRY_NS << MIN (failures, 5u));
  while (!atomic_load (&c->stop) && !past (&soon))
    pthread_cond_timedwait (&s->changed, &s->lock, &soon);
  while (!atomic_load (&c->stop) && s->waiting == 0 && !past (&late))
    pthread_cond_timedwait (&s->changed, &s->lock, &late);
}

/* Wait for the socket or a wake-up, and let libnbd go on.  Whether the
 * handle died.
 */
static bool
poll_once (struct nbd_conn *c, struct nbd_handle *h)
{
  int fd = nbd_aio_get_fd (h);
  unsigned dir = nbd_aio_get_direction (h);
  /* Until nbdd shuts down, the start of it wakes us; from then on we
   * look at the clock (end_grace).  Without the eventfd, always.
   */
  int quit_fd = node_io_shutting_down () ? -1 : node_io_shutdown_fd ();
  int timeout_ms = quit_fd >= 0 ? -1 : SHUTDOWN_CHECK_NS / 1000000;
  struct pollfd fds[3] = {
    { .fd = c->wake_fd, .events = POLLIN },
    { .fd = fd, .events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                          ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0) },
    { .fd = quit_fd, .events = POLLIN },
  };
  uint64_t v;

  if (fd < 0 || dead (h))
    return true;
  if (poll (fds, 3, timeout_ms) == -1) {
    if (errno == EINTR)
      return false;
    /* Let libnbd find the socket closed and fail what is on it. */
    nbdd_warn ("nbd: %s: poll: %m: dropping the connection", c->s->name);
    shutdown (fd, SHUT_RDWR);
    nbd_aio_notify_read (h);
    return dead (h);
  }
  if ((fds[0].revents & POLLIN) &&
      read (c->wake_fd, &v, sizeof v) == -1 && errno != EAGAIN)
    nbdd_debug ("nbd: wake: %m");
  if ((fds[1].revents & POLLIN) ||
      ((fds[1].revents & (POLLHUP | POLLERR)) &&
       (dir & LIBNBD_AIO_DIRECTION_READ)))
    nbd_aio_notify_read (h);
  else if (fds[1].revents & (POLLOUT | POLLHUP | POLLERR))
    nbd_aio_notify_write (h);
  return dead (h);
}

/* Under s->lock, on the dispatcher: once nbdd shuts down, the requests
 * on @h get SHUTDOWN_GRACE_NS to be answered; past that the socket is
 * shut, libnbd fails them, and they give up (no connection is waited
 * for while shutting down).
 */
static void
end_grace (struct nbd_conn *c, struct nbd_handle *h)
{
  int fd;

  if (!node_io_shutting_down () || dead (h))
    return;
  if (c->users == 0) {
    c->grace_started = false;   /* the next request has its own */
    return;
  }
  if (!c->grace_started) {
    c->grace_started = true;
    deadline_after (&c->grace_end, SHUTDOWN_GRACE_NS);
  }
  else if (!c->grace_over && past (&c->grace_end) &&
           (fd = nbd_aio_get_fd (h)) >= 0) {
    c->grace_over = true;
    nbdd_warn ("nbd: %s: %u request%s not answered as nbdd shuts down: "
               "dropping the connection", c->s->name, c->users,
               c->users == 1 ? "" : "s");
    /* libnbd finds the socket closed at the next poll.  (Only a worker
     * could close it in between, by killing the handle; at shutdown no
     * new socket can take its number.)
     */
    shutdown (fd, SHUT_RDWR);
    wake (c);
  }
}

/* A connection's thread: (re)connects it when wanted, reads its
 * replies, and closes it when it died and nobody holds it.
 */
static void *
dispatcher (void *arg)
{
  struct nbd_conn *c = arg;
  struct nbd_state *s = c->s;
  unsigned failures = 0;

  pthread_mutex_lock (&s->lock);
  while (!atomic_load (&c->stop)) {
    struct nbd_handle *h = c->h;

    if (h == NULL) {
      struct error *e = NULL;

      /* Nobody to connect for, or nbdd shuts down (and nobody waits
       * for a connection any more).
       */
      if ((s->waiting == 0 && s->live == 0) || node_io_shutting_down ()) {
        pthread_cond_wait (&s->changed, &s->lock);
        continue;
      }
      pthread_mutex_unlock (&s->lock);
      h = conn_open (s, c, &e);
      pthread_mutex_lock (&s->lock);
      s->attempts++;
      if (h) {
        c->h = h;
        c->dead = false;
        c->grace_started = c->grace_over = false;
        s->live++;
        failures = 0;
      }
      else {
        nbdd_debug ("%s", e->msg);
        free (s->last_error);
        s->last_error = strdup (e->msg);
        error_free (e);
        failures++;
      }
      pthread_cond_broadcast (&s->changed);
      if (h == NULL)
        retry_sleep (c, failures);
    }
    else if (c->dead) {
      if (c->users > 0 && !dead (h)) {
        /* Given up on while the handle lives (a reply said the server
         * is shutting down): the requests still on it get their
         * replies, or fail when it dies.
         */
        pthread_mutex_unlock (&s->lock);
        poll_once (c, h);
        pthread_mutex_lock (&s->lock);
        end_grace (c, h);
        continue;
      }
      if (c->users > 0) {
        pthread_cond_wait (&s->changed, &s->lock);
        continue;
      }
      c->h = NULL;
      pthread_mutex_unlock (&s->lock);
      nbd_close (h);
      pthread_mutex_lock (&s->lock);
    }
    else {
      bool died;

      pthread_mutex_unlock (&s->lock);
      died = poll_once (c, h);
      pthread_mutex_lock (&s->lock);
      if (died)
        mark_dead (c);
      else
        end_grace (c, h);
    }
  }
  pthread_mutex_unlock (&s->lock);
  return NULL;
}

/* Take the live connection with the fewest requests on it; while there
 * is none, wait up to reconnect-delay (and for one attempt at least).
 * NULL: -errno in *err.
 */
static struct nbd_conn *
conn_get (struct nbd_state *s, int *err)
{
  struct nbd_conn *best = NULL;
  struct timespec deadline, soon;
  uint64_t attempts0 = 0;
  bool waiting = false;

  pthread_mutex_lock (&s->lock);
  for (;;) {
    for (unsigned i = 0; i < s->nr_conns; ++i) {
      struct nbd_conn *c = &s->conns[i];
      if (c->h && !c->dead && (best == NULL || c->users < best->users))
        best = c;
    }
    if (best && best->users < MAX_IN_FLIGHT)
      break;
    if (best) {                 /* all full: wait for a reply, awake */
      best = NULL;
      pthread_cond_wait (&s->changed, &s->lock);
      continue;
    }
    if (node_io_shutting_down ())
      break;                    /* no connection is waited for */
    if (!waiting) {
      waiting = true;
      s->waiting++;
      attempts0 = s->attempts;
      deadline_after (&deadline, (uint64_t) (s->reconnect_delay * 1e9));
      pthread_cond_broadcast (&s->changed);     /* dispatchers: connect */
      pthread_mutex_unlock (&s->lock);
      node_io_sleep_begin ();
      pthread_mutex_lock (&s->lock);
      continue;
    }
    if (node_io_shutting_down ())
      break;
    if (s->attempts != attempts0 && past (&deadline))
      break;
    /* Until an attempt is over (one at least, even with no delay) and
     * then until the deadline, looking at the shutdown flag now and
     * then: nobody wakes us for it.
     */
    deadline_after (&soon, SHUTDOWN_CHECK_NS);
    pthread_cond_timedwait (&s->changed, &s->lock,
                            s->attempts != attempts0 && before (&deadline, &soon)
                            ? &deadline : &soon);
  }
  if (best)
    best->users++;
  if (waiting)
    s->waiting--;
  if (best == NULL && node_io_shutting_down ())
    nbdd_warn ("%s (giving up: shutting down)",
               s->last_error ? s->last_error : "nbd: no connection");
  else if (best == NULL)
    nbdd_warn ("%s (giving up after %g s)",
               s->last_error ? s->last_error : "nbd: no connection",
               s->reconnect_delay);
  pthread_mutex_unlock (&s->lock);
  if (waiting)
    node_io_sleep_end ();
  *err = -EIO;
  return best;
}

static void
conn_put (struct nbd_state *s, struct nbd_conn *c, bool died)
{
  pthread_mutex_lock (&s->lock);
  if (c->users-- == MAX_IN_FLIGHT || (died && !c->dead))
    pthread_cond_broadcast (&s->changed);       /* room, or gone */
  if (died)
    mark_dead (c);
  if (c->dead && c->users == 0) {
    pthread_cond_broadcast (&s->changed);
    wake (c);                   /* its dispatcher may be polling it */
  }
  pthread_mutex_unlock (&s->lock);
}

/* ---- requests ---- */

/* One request in flight: its worker sleeps on @done, which libnbd's
 * free callback posts, once, whether or not the request was issued.
 */
struct request {
  sem_t done;
  int error;
};

static int
request_complete (void *opaque, int *error)
{
  struct request *rq = opaque;

  rq->error = *error;
  return 1;                     /* retire it */
}

static void
request_free (void *opaque)
{
  struct request *rq = opaque;

  sem_post (&rq->done);
}

/* Issues a request on @h with @cb: a cookie, or -1 (cb freed). */
typedef int64_t (*issue_fn) (struct nbd_handle *h, void *args,
                             nbd_completion_callback cb);

/* Run a request to its end, on another connection when its own died
 * under it (a few times at most).  0 or -errno.
 */
static int
run (struct nbd_state *s, issue_fn issue, void *args)
{
  for (unsigned try = 0; ; ++try) {
    struct request rq = { .error = 0 };
    struct nbd_conn *c;
    bool died;
    int err;

    if ((c = conn_get (s, &err)) == NULL)
      return err;
    sem_init (&rq.done, 0, 0);
    if (issue (c->h, args,
               (nbd_completion_callback) { .callback = request_complete,
                                           .user_data = &rq,
                                           .free = request_free }) == -1) {
      rq.error = nbd_get_errno ();
      if (rq.error == 0)
        rq.error = EIO;
      if (!dead (c->h))
        nbdd_debug ("nbd: %s: %s", s->name, nbd_get_error ());
    }
    else if (nbd_aio_get_direction (c->h) & LIBNBD_AIO_DIRECTION_WRITE)
      wake (c);                 /* the rest of it waits for the socket */
    /* A round trip is a sleep: the rest of this worker's batch goes to
     * other workers meanwhile.
     */
    if (sem_trywait (&rq.done) == -1) {
      node_io_sleep_begin ();
      while (sem_wait (&rq.done) == -1)
        ;                       /* EINTR */
      node_io_sleep_end ();
    }
    sem_destroy (&rq.done);
    /* ESHUTDOWN: the server is going away; the connection with it. */
    died = rq.error != 0 && (dead (c->h) || rq.error == ESHUTDOWN);
    conn_put (s, c, died);
    if (rq.error == 0)
      return 0;
    if (!died)
      return -rq.error;         /* the server's answer */
    if (node_io_shutting_down ())
      return -EIO;              /* no other connection is waited for */
    if (try >= MAX_RETRIES) {
      nbdd_warn ("nbd: %s: connections keep dying under a request: "
                 "giving up", s->name);
      return -EIO;
    }
  }
}

/* ---- the data path ---- */

struct rw_args {
  void *buf;
  uint64_t count, offset;
  uint32_t flags;
};

static int64_t
issue_pread (struct nbd_handle *h, void *args, nbd_completion_callback cb)
{
  struct rw_args *a = args;

  return nbd_aio_pread (h, a->buf, a->count, a->offset, cb, 0);
}

static int64_t
issue_pwrite (struct nbd_handle *h, void *args, nbd_completion_callback cb)
{
  struct rw_args *a = args;

  return nbd_aio_pwrite (h, a->buf, a->count, a->offset, cb, a->flags);
}

static int64_t
issue_zero (struct nbd_handle *h, void *args, nbd_completion_callback cb)
{
  struct rw_args *a = args;

  return nbd_aio_zero (h, a->count, a->offset, cb, a->flags);
}

static int64_t
issue_trim (struct nbd_handle *h, void *args, nbd_completion_callback cb)
{
  struct rw_args *a = args;

  return nbd_aio_trim (h, a->count, a->offset, cb, a->flags);
}

static int64_t
issue_flush (struct nbd_handle *h, void *args, nbd_completion_callback cb)
{
  return nbd_aio_flush (h, cb, 0);
}

static int64_t
issue_cache (struct nbd_handle *h, void *args, nbd_completion_callback cb)
{
  struct rw_args *a = args;

  return nbd_aio_cache (h, a->count, a->offset, cb, 0);
}

static int
nbd_drv_pread (struct node *node, void *buf, uint32_t count,
               uint64_t offset, unsigned flags)
{
  struct rw_args a = { .buf = buf, .count = count, .offset = offset };

  return run (node->opaque, issue_pread, &a);
}

static uint32_t
fua (const struct nbd_state *s, unsigned flags)
{
  return (flags & NODE_FUA) && s->can_fua ? LIBNBD_CMD_FLAG_FUA : 0;
}

/* Without FUA on the server, a FUA request is the request and a flush. */
static int
fua_fallback (struct node *node, int r, unsigned flags)
{
  struct nbd_state *s = node->opaque;

  if (r == 0 && (flags & NODE_FUA) && !s->can_fua && s->can_flush)
    r = run (s, issue_flush, NULL);
  return r;
}

static int
nbd_drv_pwrite (struct node *node, const void *buf, uint32_t count,
                uint64_t offset, unsigned flags)
{
  struct nbd_state *s = node->opaque;
  struct rw_args a = { .buf = (void *) buf, .count = count,
                       .offset = offset, .flags = fua (s, flags) };

  return fua_fallback (node, run (s, issue_pwrite, &a), flags);
}

static int
nbd_drv_zero (struct node *node, uint64_t count, uint64_t offset,
              unsigned flags)
{
  struct nbd_state *s = node->opaque;
  uint32_t f = fua (s, flags);
  int r;

  if (!s->can_zero)
    return -ENOTSUP;
  if (flags & NODE_FAST_ZERO) {
    if (!s->can_fast_zero)
      return -ENOTSUP;
    f |= LIBNBD_CMD_FLAG_FAST_ZERO;
  }
  if (!(flags & NODE_MAY_TRIM))
    f |= LIBNBD_CMD_FLAG_NO_HOLE;
  /* A request is at most 4 GiB on the wire. */
  while (count > 0) {
    struct rw_args a = { .count = MIN (count, UINT64_C (1) << 30),
                         .offset = offset, .flags = f };
    if ((r = run (s, issue_zero, &a)) < 0)
      return r;
    count -= a.count;
    offset += a.count;
  }
  return fua_fallback (node, 0, flags);
}

static int
nbd_drv_discard (struct node *node, uint64_t count, uint64_t offset,
                 unsigned flags)
{
  struct nbd_state *s = node->opaque;
  int r;

  if (!s->can_trim)
    return 0;                   /* advisory */
  while (count > 0) {
    struct rw_args a = { .count = MIN (count, UINT64_C (1) << 30),
                         .offset = offset, .flags = fua (s, flags) };
    if ((r = run (s, issue_trim, &a)) < 0)
      return r;
    count -= a.count;
    offset += a.count;
  }
  return fua_fallback (node, 0, flags);
}

static int
nbd_drv_flush (struct node *node)
{
  struct nbd_state *s = node->opaque;

  if (!s->can_flush)
    return 0;
  return run (s, issue_flush, NULL);
}

static int
nbd_drv_cache (struct node *node, uint64_t count, uint64_t offset)
{
  struct nbd_state *s = node->opaque;
  struct rw_args a = { .count = MIN (count, UINT64_C (1) << 30),
                       .offset = offset };

  if (!s->can_cache)
    return 0;
  return run (s, issue_cache, &a);
}

struct status_args {
  struct extent_list *el;
  size_t len0;                  /* where this request's extents start */
  uint64_t end0;
  uint64_t last0;               /* the length of el->v[len0 - 1] */
  uint64_t count, offset, want;
  int r;                        /* of extents_add: 1 full, -ENOMEM */
};

static int
status_cb (void *opaque, const char *metacontext, uint64_t offset,
           uint32_t *entries, size_t nr_entries, int *error)
{
  struct status_args *sa = opaque;

  if (strcmp (metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  for (size_t i = 0; i + 1 < nr_entries && sa->r == 0; i += 2) {
    uint64_t len = entries[i];
    if (len == 0 || sa->el->end >= sa->want)
      break;
    len = MIN (len, sa->want - sa->el->end);
    sa->r = extents_add (sa->el, len,
                         entries[i + 1] & (EXTENT_HOLE | EXTENT_ZERO));
  }
  return 0;
}

/* Each try starts the list again where the request began. */
static int64_t
issue_block_status (struct nbd_handle *h, void *args,
                    nbd_completion_callback cb)
{
  struct status_args *sa = args;

  sa->el->len = sa->len0;
  sa->el->end = sa->end0;
  if (sa->len0 > 0)             /* a first extent may have merged in */
    sa->el->v[sa->len0 - 1].length = sa->last0;
  sa->r = 0;
  return nbd_aio_block_status (h, sa->count, sa->offset,
                               (nbd_extent_callback) {
                                 .callback = status_cb,
                                 .user_data = sa },
                               cb, 0);
}

static int
nbd_drv_block_status (struct node *node, uint64_t count, uint64_t offset,
                      struct extent_list *el)
{
  struct nbd_state *s = node->opaque;
  struct status_args sa = { .el = el, .len0 = el->len, .end0 = el->end,
                            .last0 = el->len ? el->v[el->len - 1].length
                                             : 0,
                            .count = MIN (count, UINT64_C (1) << 30),
                            .offset = offset, .want = offset + count };
  int r;

  if (!s->has_block_status)
    return extents_add (el, count, 0) < 0 ? -ENOMEM : 0;
  if ((r = run (s, issue_block_status, &sa)) < 0)
    return r;
  if (sa.r < 0)
    return sa.r;
  /* A server may answer with less than asked, never with nothing. */
  if (el->end == sa.end0 && extents_add (el, sa.count, 0) < 0)
    return -ENOMEM;
  return 0;
}

/* ---- the node ---- */

static const char *const nbd_keys[] = {
  "driver", "node-name", "server", "export", "uri", "tls-certificates",
  "tls-psk", "tls-username", "reconnect-delay",
  "connections", "read-only", "auto-read-only", "cache.direct",
  "cache.no-flush", "discard", "detect-zeroes", NULL
};
static const char *const server_keys[] = {
  "type", "path", "host", "port", NULL
};

static int
dup_opt (struct json_object *o, const char *key, bool required, char **r,
         struct error **errp)
{
  const char *v = NULL;

  if (opt_get_string (o, "nbd", key, required, &v, errp) == -1)
    return -1;
  if (v && (*r = strdup (v)) == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  return 0;
}

static int
parse_server (struct nbd_state *s, struct json_object *opts,
              struct error **errp)
{
  struct json_object *srv;
  const char *type;

  if (!json_object_object_get_ex (opts, "server", &srv) ||
      !json_object_is_type (srv, json_type_object)) {
    error_setg (errp, "nbd: give 'server' (an object) or 'uri'");
    return -1;
  }
  if (opt_check_keys (srv, "nbd: server", server_keys, errp) == -1 ||
      opt_get_string (srv, "nbd: server", "type", true, &type, errp) == -1)
    return -1;
  if (strcmp (type, "unix") == 0) {
    if (dup_opt (srv, "path", true, &s->path, errp) == -1)
      return -1;
    if (s->path[0] != '/') {
      error_setg (errp, "nbd: server path '%s' must be absolute", s->path);
      return -1;
    }
  }
  else if (strcmp (type, "inet") == 0) {
    if (dup_opt (srv, "host", true, &s->host, errp) == -1 ||
        dup_opt (srv, "port", false, &s->port, errp) == -1)
      return -1;
    if (s->port == NULL && (s->port = strdup ("10809")) == NULL) {
      error_setg (errp, "out of memory");
      return -1;
    }
  }
  else {
    error_setg (errp, "nbd: server type '%.40s' is not 'unix' or 'inet'",
                type);
    return -1;
  }
  return 0;
}

static int
nbd_drv_open (struct node *node, struct json_object *opts,
              struct error **errp)
{
  struct nbd_state *s = node->opaque;
  struct json_object *v;
  struct nbd_handle *h;
  uint64_t conns = 4;
  bool ro = false;
  int64_t size;

  pthread_condattr_t attr;

  pthread_mutex_init (&s->lock, NULL);
  pthread_condattr_init (&attr);
  pthread_condattr_setclock (&attr, CLOCK_MONOTONIC);
  pthread_cond_init (&s->changed, &attr);
  pthread_condattr_destroy (&attr);
  for (unsigned i = 0; i < MAX_CONNECTIONS; ++i) {
    s->conns[i].s = s;
    s->conns[i].wake_fd = -1;
  }
  s->reconnect_delay = 10;
  if (opt_check_keys (opts, "nbd", nbd_keys, errp) == -1 ||
      dup_opt (opts, "uri", false, &s->uri, errp) == -1 ||
      dup_opt (opts, "export", false, &s->export, errp) == -1 ||
      dup_opt (opts, "tls-certificates", false, &s->tls_certificates,
               errp) == -1 ||
      dup_opt (opts, "tls-psk", false, &s->tls_psk, errp) == -1 ||
      dup_opt (opts, "tls-username", false, &s->tls_username, errp) == -1 ||
      opt_get_uint64 (opts, "nbd", "connections", false, &conns,
                      errp) == -1 ||
      opt_get_bool (opts, "nbd", "read-only", false, &ro, errp) == -1)
    return -1;
  if (json_object_object_get_ex (opts, "reconnect-delay", &v) && v) {
    errno = 0;
    s->reconnect_delay = json_object_get_double (v);
    if ((!json_object_is_type (v, json_type_int) &&
         !json_object_is_type (v, json_type_double)) ||
        !(s->reconnect_delay >= 0 && s->reconnect_delay <= 3600)) {
      error_setg (errp, "nbd: 'reconnect-delay' must be seconds from 0 "
                  "to 3600");
      return -1;
    }
  }
  if (conns < 1 || conns > MAX_CONNECTIONS) {
    error_setg (errp, "nbd: 'connections' must be from 1 to %d",
                MAX_CONNECTIONS);
    return -1;
  }
  if (s->uri && (s->export || json_object_object_get_ex (opts, "server",
                                                         NULL))) {
    error_setg (errp, "nbd: give 'uri', or 'server' and 'export', not "
                "both");
    return -1;
  }
  if (s->uri == NULL) {
    if (parse_server (s, opts, errp) == -1)
      return -1;
    if (s->export == NULL && (s->export = strdup ("")) == NULL) {
      error_setg (errp, "out of memory");
      return -1;
    }
  }
  if (s->tls_psk && s->tls_certificates) {
    error_setg (errp, "nbd: give 'tls-certificates' or 'tls-psk', not "
                "both");
    return -1;
  }
  if (asprintf (&s->name, "%s", s->uri ? s->uri : s->path ? s->path
                : s->host) == -1) {
    s->name = NULL;
    error_setg (errp, "out of memory");
    return -1;
  }

  /* The first connection says what the server offers. */
  if ((h = conn_open (s, NULL, errp)) == NULL)
    return -1;
  s->conns[0].h = h;
  s->live = 1;
  s->nr_conns = nbd_can_multi_conn (h) == 1 ? (unsigned) conns : 1;
  if ((size = nbd_get_size (h)) < 0) {
    error_setg (errp, "nbd: %s: %s", s->name, nbd_get_error ());
    return -1;
  }
  node->size = size;
  node->read_only = ro || nbd_is_read_only (h) == 1;
  s->can_flush = nbd_can_flush (h) == 1;
  s->can_fua = nbd_can_fua (h) == 1;
  s->can_trim = nbd_can_trim (h) == 1;
  s->can_zero = nbd_can_zero (h) == 1;
  s->can_fast_zero = nbd_can_fast_zero (h) == 1;
  s->can_cache = nbd_can_cache (h) == 1;
  s->has_block_status =
    nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  s->block_min = nbd_get_block_size (h, LIBNBD_SIZE_MINIMUM);
  s->block_max = nbd_get_block_size (h, LIBNBD_SIZE_MAXIMUM);
  s->block_pref = nbd_get_block_size (h, LIBNBD_SIZE_PREFERRED);
  node->can_flush = s->can_flush;
  node->can_trim = s->can_trim;
  node->can_zero = s->can_zero;
  node->can_fast_zero = s->can_fast_zero;
  node->can_cache = s->can_cache;
  node->has_block_status = s->has_block_status;

  /* The other connections open at once, in their threads. */
  for (unsigned i = 0; i < s->nr_conns; ++i) {
    struct nbd_conn *c = &s->conns[i];
    int e;

    if ((c->wake_fd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK)) == -1) {
      error_setg_errno (errp, errno, "nbd: eventfd");
      return -1;
    }
    e = thread_create_quiet (&c->thread, NULL, dispatcher, c);
    if (e != 0) {
      error_setg_errno (errp, e, "nbd: pthread_create");
      return -1;
    }
    c->has_thread = true;
  }
  return 0;
}

/* Also after a failed open. */
static void
nbd_drv_close (struct node *node)
{
  struct nbd_state *s = node->opaque;

  /* All told first: none may start a connection while others close. */
  pthread_mutex_lock (&s->lock);
  for (unsigned i = 0; i < MAX_CONNECTIONS; ++i)
    atomic_store (&s->conns[i].stop, true);
  pthread_cond_broadcast (&s->changed);
  pthread_mutex_unlock (&s->lock);
  for (unsigned i = 0; i < MAX_CONNECTIONS; ++i)
    if (s->conns[i].has_thread)
      wake (&s->conns[i]);
  for (unsigned i = 0; i < MAX_CONNECTIONS; ++i) {
    struct nbd_conn *c = &s->conns[i];

    if (c->has_thread)
      pthread_join (c->thread, NULL);
    if (c->h) {
      /* NBD_CMD_DISC as far as it goes without waiting: a server that
       * stopped reading must not hold the close up.
       */
      if (!dead (c->h))
        nbd_aio_disconnect (c->h, 0);
      nbd_close (c->h);
    }
    if (c->wake_fd >= 0)
      close (c->wake_fd);
  }
  free (s->uri);
  free (s->path);
  free (s->host);
  free (s->port);
  free (s->export);
  free (s->tls_certificates);
  free (s->tls_psk);
  free (s->tls_username);
  free (s->name);
  free (s->last_error);
  pthread_cond_destroy (&s->changed);
  pthread_mutex_destroy (&s->lock);
}

static void
nbd_drv_refresh_limits (struct node *node, struct node_limits *limits)
{
  struct nbd_state *s = node->opaque;
  int64_t min = s->block_min, max = s->block_max, pref = s->block_pref;

  limits->request_alignment = min > 0 && min <= 65536 ? (uint32_t) min : 1;
  /* libnbd refuses requests over 64 MiB of payload; NBD servers over
   * 32 MiB as a rule.
   */
  limits->max_transfer = max > 0 && max < (32 << 20) ? (uint32_t) max
    : 32u << 20;
  limits->max_transfer = ROUND_DOWN (limits->max_transfer,
                                     limits->request_alignment);
  limits->opt_transfer = pref > 0 && pref <= (32 << 20) ? (uint32_t) pref
    : 0;
}

const struct node_driver nbd_driver = {
  .name           = "nbd",
  .instance_size  = sizeof (struct nbd_state),
  .open           = nbd_drv_open,
  .close          = nbd_drv_close,
  .refresh_limits = nbd_drv_refresh_limits,
  .pread          = nbd_drv_pread,
  .pwrite         = nbd_drv_pwrite,
  .zero           = nbd_drv_zero,
  .discard        = nbd_drv_discard,
  .flush          = nbd_drv_flush,
  .cache          = nbd_drv_cache,
  .block_status   = nbd_drv_block_status,
};
