/* Client connections: buffered non-blocking input, the output queue,
 * back-pressure and lifetime.
 *
 * Input is read into a 64 KiB buffer, so one recv picks up many
 * pipelined request headers; a WRITE payload is copied out of it and
 * the rest is received straight into the request's buffer.  Output is
 * a queue of iovec runs sent with one writev per event; workers may
 * also write replies directly (conn_send_direct), under send_lock.
 *
 * Lifetime: a connection whose client went away is 'dead' (fds closed,
 * watchers stopped) but lives on until its last request comes back
 * from the workers; conn_reap frees it then.  Nothing frees a conn
 * from inside its own callbacks: closing only marks it.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "cleanup.h"
#include "internal.h"
#include "log.h"

#define MAX_IOV 64
#define MAX_SEND_PER_EVENT (8u << 20)  /* fairness between clients */
/* TLS: a worker encrypts replies under one hold of send_lock up to
 * this much, then lets the loop in.
 */
#define TLS_BATCH_BYTES (64u << 10)
#define MAX_FREE_REQS 128
#define KEEP_BUF_CAP (16u << 20)        /* larger buffers are not kept */
#define MAX_FREE_BYTES (32u << 20)      /* buffers kept per connection */
#define MAX_KEPT_BYTES (128u << 20)     /* ...and by all connections */
#define KEEP_EXTENTS 256                /* larger extent arrays freed */
#define RECV_BUDGET 16                  /* reads per readable event */

static struct conn *conns;              /* all live or dying conns */
static unsigned nr_conns;               /* live ones: not yet closed */
static uint64_t last_conn_id;
static struct conn *dirty_list;
/* Buffer bytes held in all connections' free lists.  Reusing buffers
 * matters: a fresh 256 KiB buffer is a fresh mapping, and faulting its
 * pages in costs more than the read that fills it.
 */
static size_t kept_bytes;

static void conn_io_cb (struct ev_loop *loop, ev_io *w, int revents);
static void conn_write_cb (struct ev_loop *loop, ev_io *w, int revents);
static void conn_timeout_cb (struct ev_loop *loop, ev_timer *w,
                             int revents);

unsigned
conn_count (void)
{
  return nr_conns;
}

static bool
in_handshake (const struct conn *c)
{
  return c->state == CS_CFLAGS || c->state == CS_OPTION ||
    c->state == CS_OPTION_DATA || c->state == CS_OPTION_SKIP ||
    c->state == CS_TLS_HANDSHAKE;
}

bool
conn_evict_handshake (void)
{
  struct conn *oldest = NULL;

  /* New connections go to the head: the last match is the oldest. */
  for (struct conn *c = conns; c; c = c->next)
    if (!c->dead && in_handshake (c))
      oldest = c;
  if (oldest == NULL)
    return false;
  nbdd_info ("%s: closing a connection still in the handshake to make "
             "room for a new client", oldest->peer);
  conn_close (oldest, NULL);
  return true;
}

struct conn *
conn_new (struct ev_loop *loop, int in_fd, int out_fd, const char *peer,
          struct error **errp)
{
  struct conn *c = calloc (1, sizeof *c);

  if (c == NULL)
    goto out_err;
  c->inbuf = malloc (CONN_INBUF_SIZE);
  c->peer = strdup (peer);
  if (c->inbuf == NULL || c->peer == NULL)
    goto out_free;

  pthread_mutex_init (&c->send_lock, NULL);
  c->loop = loop;
  c->id = ++last_conn_id;
  c->started = ev_time ();
  c->in_fd = in_fd;
  c->out_fd = out_fd;
  c->is_stdio = in_fd != out_fd;
  c->state = CS_CFLAGS;
  ev_io_init (&c->rio, conn_io_cb, in_fd, EV_READ);
  ev_io_init (&c->wio, conn_write_cb, out_fd, EV_WRITE);
  ev_timer_init (&c->handshake_timer, conn_timeout_cb,
                 config.handshake_timeout, 0);
  if (config.handshake_timeout > 0)
    ev_timer_start (loop, &c->handshake_timer);

  c->next = conns;
  if (conns)
    conns->prev = c;
  conns = c;
  nr_conns++;

  c->reading = true;
  ev_io_start (loop, &c->rio);
  hs_start (c);
  return c;

 out_free:
  free (c->inbuf);
  free (c->peer);
  free (c);
 out_err:
  error_setg_errno (errp, ENOMEM, "allocating connection");
  return NULL;
}

static void
conn_free (struct conn *c)
{
  struct request *r;
  struct out_item *it;

  assert (c->in_flight == 0);
  assert (c->reads_ahead == 0 && c->read_bytes_ahead == 0);
  while ((it = c->out_head) != NULL) {
    c->out_head = it->next;
    it->release (c, it);
  }
  kept_bytes -= c->free_bytes;
  while ((r = c->free_reqs) != NULL) {
    c->free_reqs = r->next;
    extents_free (&r->extents);
    free (r->buf);
    free (r);
  }
  if (c->prev)
    c->prev->next = c->next;
  else
    conns = c->next;
  if (c->next)
    c->next->prev = c->prev;
  tls_free (c);
  if (c->exp) {
    c->exp->nr_clients--;
    export_unref (c->exp);
  }
  pthread_mutex_destroy (&c->send_lock);
  free (c->optbuf);
  free (c->meta_export);
  free (c->inbuf);
  free (c->peer);
  free (c);
}

/* Free the conn if it is dead and nothing refers to it any more. */
static void
conn_reap (struct conn *c)
{
  if (!c->dead || c->in_flight > 0 || c->in_dirty_list)
    return;
  bool exit_loop = c->exit_loop_on_close;
  struct ev_loop *loop = c->loop;
  debug ("%s: connection ended: %" PRIu64 " requests, %" PRIu64
         " reads zero-copy", c->peer, c->nr_requests, c->nr_spliced);
  conn_free (c);
  listeners_pause (loop, false);
  if (exit_loop)
    loop_quit (loop);
}

void
conn_close (struct conn *c, const char *why)
{
  struct out_item *it;

  if (c->dead)
    return;
  if (why)
    debug ("%s: closing connection: %s", c->peer, why);
  c->reading = false;
  nr_conns--;
  ev_io_stop (c->loop, &c->rio);
  ev_io_stop (c->loop, &c->wio);
  ev_timer_stop (c->loop, &c->handshake_timer);
  /* Under the lock: a worker may be about to send on these fds. */
  pthread_mutex_lock (&c->send_lock);
  c->dead = true;
  close (c->in_fd);
  if (c->out_fd != c->in_fd)
    close (c->out_fd);
  c->in_fd = c->out_fd = -1;
  it = c->out_head;
  c->out_head = c->out_tail = NULL;
  pthread_mutex_unlock (&c->send_lock);
  /* Queued output will never be sent. */
  while (it != NULL) {
    struct out_item *next = it->next;
    it->release (c, it);
    it = next;
  }
  if (c->cur) {
    conn_request_put (c, c->cur);
    c->cur = NULL;
  }
  conn_mark_dirty (c);          /* reaped at a safe point */
}

void
conns_close_export (struct export *exp)
{
  struct conn *c, *next;

  for (c = conns; c; c = next) {
    next = c->next;
    if (c->exp == exp)
      conn_close (c, "its export was deleted");
  }
}

struct conn *
conn_first (void)
{
  return conns;
}

void
conns_close_all (const char *why)
{
  struct conn *c, *next;

  for (c = conns; c; c = next) {
    next = c->next;
    conn_close (c, why);
  }
}

/* Every reply has gone: say goodbye (TLS close_notify) and close once
 * that has gone too.
 */
static void
conn_finish (struct conn *c)
{
  bool empty;

  pthread_mutex_lock (&c->send_lock);
  if (c->tls_up && !c->tls_bye_sent) {
    c->tls_bye_sent = true;
    tls_bye (c);
  }
  empty = c->out_head == NULL && !c->out_partial;
  pthread_mutex_unlock (&c->send_lock);
  if (empty)
    conn_close (c, "finished");
  else
    conn_mark_dirty (c);
}

void
conn_drain (struct conn *c)
{
  c->state = CS_DRAIN;
  if (c->reading) {
    ev_io_stop (c->loop, &c->rio);
    c->reading = false;
  }
  if (c->in_flight == 0 && c->out_head == NULL)
    conn_finish (c);
}

void
conn_queue (struct conn *c, struct out_item *item)
{
  if (c->dead) {
    item->release (c, item);
    return;
  }
  item->next = NULL;
  item->pos = 0;
  item->encrypt = false;
  pthread_mutex_lock (&c->send_lock);
  /* A TLS reply waits in plaintext, and conn_flush encrypts it when
   * its turn comes, at the end of this event, with the other replies
   * made meanwhile, so that their records leave in one write: at most
   * a stage (256 KiB) of them is encrypted ahead of what the socket
   * takes.
   */
  item->encrypt = c->tls_up;
  if (c->out_tail)
    c->out_tail->next = item;
  else
    c->out_head = item;
  c->out_tail = item;
  pthread_mutex_unlock (&c->send_lock);
  conn_mark_dirty (c);
}

/* The rest of a reply a worker sent in part goes out before anything
 * else.  Its iovecs already say how far it got.
 */
static void
conn_queue_head (struct conn *c, struct out_item *item)
{
  pthread_mutex_lock (&c->send_lock);
  item->next = c->out_head;
  c->out_head = item;
  if (c->out_tail == NULL)
    c->out_tail = item;
  c->out_partial = false;
  pthread_mutex_unlock (&c->send_lock);
  conn_mark_dirty (c);
}

/* An item sending the one buffer @iov describes. */
static void
out_item_init (struct out_item *it, struct iovec *iov,
               void (*release) (struct conn *c, struct out_item *item))
{
  *it = (struct out_item) { .iov = iov, .niov = 1, .release = release };
}

struct copied_item {
  struct out_item out;
  struct iovec iov;
  unsigned char data[];
};

static void
copied_item_release (struct conn *c, struct out_item *item)
{
  free (container_of (item, struct copied_item, out));
}

int
conn_queue_copy (struct conn *c, const void *data, size_t len)
{
  struct copied_item *ci = malloc (sizeof *ci + len);

  if (ci == NULL) {
    conn_close (c, "out of memory");
    return -1;
  }
  memcpy (ci->data, data, len);
  ci->iov.iov_base = ci->data;
  ci->iov.iov_len = len;
  out_item_init (&ci->out, &ci->iov, copied_item_release);
  conn_queue (c, &ci->out);
  return 0;
}

/* Bytes queued by conn_send_locked: TLS records the socket did not
 * take at once.  Later records are appended while there is room.
 */
#define BYTE_CHUNK_SIZE (64u << 10)

struct byte_chunk {
  struct out_item out;
  struct iovec iov;
  size_t cap, used;
  unsigned char data[];
};

static void
byte_chunk_release (struct conn *c, struct out_item *item)
{
  struct byte_chunk *bc = container_of (item, struct byte_chunk, out);

  c->queued_bytes -= bc->used;  /* send_lock is held, or c is dying */
  free (bc);
}

/* Link a new chunk where conn_send_locked's overflow goes: at the
 * tail, or, while conn_flush encrypts the replies it took from the
 * head (c->push_front), in front of everything still queued, after
 * what those replies already put there (c->push_after).
 */
static void
link_chunk (struct conn *c, struct out_item *item)
{
  if (c->push_front) {
    if (c->push_after) {
      item->next = c->push_after->next;
      c->push_after->next = item;
    }
    else {
      item->next = c->out_head;
      c->out_head = item;
    }
    if (item->next == NULL)
      c->out_tail = item;
    c->push_after = item;
    return;
  }
  item->next = NULL;
  if (c->out_tail)
    c->out_tail->next = item;
  else
    c->out_head = item;
  c->out_tail = item;
}

static int
queue_bytes_locked (struct conn *c, const void *data, size_t len)
{
  struct out_item *at = c->push_front ? c->push_after : c->out_tail;
  struct byte_chunk *bc;

  if (at && at->release == byte_chunk_release) {
    bc = container_of (at, struct byte_chunk, out);
    if (bc->cap - bc->used >= len) {
      memcpy (bc->data + bc->used, data, len);
      bc->used += len;
      bc->iov.iov_len += len;   /* a queued chunk is never empty */
      c->queued_bytes += len;
      return 0;
    }
  }
  bc = malloc (sizeof *bc + MAX (len, (size_t) BYTE_CHUNK_SIZE));
  if (bc == NULL)
    return -1;
  bc->cap = MAX (len, (size_t) BYTE_CHUNK_SIZE);
  bc->used = len;
  memcpy (bc->data, data, len);
  bc->iov.iov_base = bc->data;
  bc->iov.iov_len = len;
  out_item_init (&bc->out, &bc->iov, byte_chunk_release);
  link_chunk (c, &bc->out);
  c->queued_bytes += len;
  return 0;
}

int
conn_send_locked (struct conn *c, const struct iovec *iov, int niov)
{
  bool first = c->push_front ? c->push_after == NULL : c->out_head == NULL;
  size_t sent = 0;

  if (c->dead)
    return 0;                   /* nobody to send to */
  if (first && !c->out_partial) {
    ssize_t r;
    do
      r = writev (c->out_fd, iov, niov);
    while (r == -1 && errno == EINTR);
    if (r > 0)
      sent = r;                 /* on error the loop finds it at flush */
  }
  for (int i = 0; i < niov; ++i) {
    if (sent >= iov[i].iov_len) {
      sent -= iov[i].iov_len;
      continue;
    }
    if (queue_bytes_locked (c, (const char *) iov[i].iov_base + sent,
                            iov[i].iov_len - sent) == -1)
      return -1;
    sent = 0;
  }
  return 0;
}

size_t
conn_input_buffered (const struct conn *c)
{
  return c->in_end - c->in_start;
}

void
conn_mark_dirty (struct conn *c)
{
  if (c->in_dirty_list)
    return;
  c->in_dirty_list = true;
  c->dirty_next = dirty_list;
  dirty_list = c;
}

void
conns_flush_dirty (void)
{
  workers_kick ();
  while (dirty_list) {
    struct conn *c = dirty_list;
    dirty_list = c->dirty_next;
    c->in_dirty_list = false;
    if (!c->dead)
      conn_flush (c);
    conn_reap (c);
  }
  workers_kick ();              /* what flushing let us read */
}

/* Move pipe data into the socket: bytes moved, or -1 with errno. */
static ssize_t
splice_out (struct conn *c, struct out_item *it)
{
  size_t moved = 0;

  while (it->pipe_left > 0) {
    ssize_t r = splice (it->pipe->rd, NULL, c->out_fd, NULL, it->pipe_left,
                        SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1 && errno == EAGAIN) {
      /* The socket is full, or (never expected) the pipe is empty: the
       * pipe's write end is open, so that too reads as EAGAIN, and
       * waiting for the socket would then spin.
       */
      int held;
      if (ioctl (it->pipe->rd, FIONREAD, &held) == 0 && held == 0) {
        errno = EIO;
        return -1;
      }
      if (moved > 0)
        break;
    }
    if (r == -1)
      return -1;
    it->pipe_left -= r;
    moved += r;
  }
  return moved;
}

/* Drop @sent bytes from the head of the queue, releasing the items
 * that are now wholly sent.  Called with send_lock held.
 */
static void
consume (struct conn *c, size_t sent)
{
  while (c->out_head) {
    struct out_item *it = c->out_head;
    while (it->pos < it->niov) {
      struct iovec *v = &it->iov[it->pos];
      if (v->iov_len > sent) {
        v->iov_base = (char *) v->iov_base + sent;
        v->iov_len -= sent;
        sent = 0;
        break;
      }
      sent -= v->iov_len;
      v->iov_len = 0;
      it->pos++;
    }
    if (it->pos < it->niov || it->pipe_left > 0)
      break;
    c->out_head = it->next;
    if (c->out_head == NULL)
      c->out_tail = NULL;
    it->release (c, it);        /* only recycles: takes no lock */
  }
}

/* Send queued output: one writev of up to MAX_IOV iovecs, up to and
 * including the header of the first spliced READ, whose data then goes
 * from its pipe; repeated while the socket takes everything, up to
 * MAX_SEND_PER_EVENT bytes.
 */
void
conn_flush (struct conn *c)
{
  size_t sent_total = 0;
  bool write_error = false, waiting, empty;

  pthread_mutex_lock (&c->send_lock);
  while (c->out_head && !c->dead && !c->out_partial) {
    struct iovec iov[MAX_IOV];
    struct out_item *head = c->out_head;
    int n = 0;
    size_t want = 0;
    ssize_t r;

    if (head->encrypt) {
      /* TLS replies' turn: encrypt them now, the run of them at the
       * head.  Their records go to the socket together, and what does
       * not fit goes back to the head, in front of what is left.
       */
      bool full;
      c->push_front = true;
      c->push_after = NULL;
      tls_send_begin (c);
      r = 0;
      do {
        c->out_head = head->next;
        if (c->out_head == NULL)
          c->out_tail = NULL;
        r = tls_send_part (c, head->iov, head->niov);
        for (unsigned i = 0; i < head->niov; ++i)
          sent_total += head->iov[i].iov_len;
        head->release (c, head);
        head = c->out_head;
      } while (r == 0 && head && head->encrypt && c->push_after == NULL &&
               sent_total < MAX_SEND_PER_EVENT);
      if (tls_send_end (c) == -1)
        r = -1;
      full = c->push_after != NULL;
      c->push_front = false;
      c->push_after = NULL;
      if (r == -1) {
        write_error = true;
        break;
      }
      if (full || sent_total >= MAX_SEND_PER_EVENT)
        break;
      continue;
    }

    for (struct out_item *it = c->out_head; it && n < MAX_IOV;
         it = it->next) {
      if (it->encrypt)
        break;                  /* bytes before it go first */
      for (unsigned i = it->pos; i < it->niov && n < MAX_IOV; ++i) {
        if (it->iov[i].iov_len == 0)
          continue;
        iov[n++] = it->iov[i];
        want += it->iov[i].iov_len;
      }
      if (it->pipe_left > 0)
        break;
    }

    if (n > 0) {
      do
        r = writev (c->out_fd, iov, n);
      while (r == -1 && errno == EINTR);
      if (r == -1) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
          write_error = true;
        break;
      }
      consume (c, r);
      sent_total += r;
      if ((size_t) r < want)
        break;
    }
    else
      consume (c, 0);

    head = c->out_head;
    if (head && !head->encrypt && head->pos == head->niov &&
        head->pipe_left > 0) {
      r = splice_out (c, head);
      if (r == -1) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
          write_error = true;
        break;
      }
      sent_total += r;
      if (head->pipe_left > 0)
        break;
      consume (c, 0);
    }
    if (sent_total >= MAX_SEND_PER_EVENT)
      break;
  }
  waiting = c->out_head != NULL && !c->out_partial;
  empty = c->out_head == NULL && !c->out_partial;
  pthread_mutex_unlock (&c->send_lock);

  if (write_error) {
    conn_close (c, "write error");
    return;
  }
  if (c->dead)
    return;
  if (waiting) {
    if (!ev_is_active (&c->wio))
      ev_io_start (c->loop, &c->wio);
  }
  else {
    if (ev_is_active (&c->wio))
      ev_io_stop (c->loop, &c->wio);
    if (empty && c->state == CS_DRAIN && c->in_flight == 0)
      conn_finish (c);
  }
  if (!c->dead)
    conn_update_reading (c);
}

/* TLS connections with READ data not yet encrypted (loop thread). */
static unsigned tls_readers;

void
conn_read_ahead (struct conn *c, struct request *req)
{
  if (req->count == 0)
    return;                     /* nothing to read ahead, nothing to undo */
  req->ahead = req->count;
  c->read_bytes_ahead += req->count;
  if (c->reads_ahead++ == 0)
    tls_readers++;
}

/* How much READ data a TLS connection may read ahead: its share of
 * TLS_AHEAD_BYTES, and no less than TLS_MIN_AHEAD_BYTES.
 */
static uint64_t
tls_ahead_limit (void)
{
  uint64_t share = TLS_AHEAD_BYTES / (tls_readers > 0 ? tls_readers : 1);

  return MAX (share, (uint64_t) TLS_MIN_AHEAD_BYTES);
}

/* Requests are recycled per connection, with their buffers. */
struct request *
conn_request_get (struct conn *c, uint64_t count)
{
  struct request *req = c->free_reqs;

  if (req) {
    c->free_reqs = req->next;
    c->nr_free_reqs--;
    c->free_bytes -= req->buf_cap;
    kept_bytes -= req->buf_cap;
  }
  else {
    req = malloc (sizeof *req);
    if (req == NULL)
      return NULL;
    req->buf = NULL;
    req->buf_cap = 0;
    extents_init (&req->extents, 0, 1);
  }
  req->next = NULL;
  req->conn = c;
  req->nbd_err = 0;
  req->err = 0;
  req->errmsg = NULL;
  req->payload_got = 0;
  req->spliced = req->sent = req->partial = false;
  req->out.pipe = NULL;
  req->out.pipe_left = 0;
  req->out.encrypt = false;
  req->bytes = 0;
  req->ahead = 0;
  if (count > req->buf_cap) {
    void *nb;
    size_t cap = ROUND_UP (count, (uint64_t) 4096);
    free (req->buf);
    req->buf = NULL;
    req->buf_cap = 0;
    if (posix_memalign (&nb, 4096, cap) != 0) {
      extents_free (&req->extents);
      free (req);
      return NULL;
    }
    req->buf = nb;
    req->buf_cap = cap;
  }
  /* Requests in flight keep the loop running, even after the client
   * went away, so their completions are always collected.
   */
  if (c->in_flight++ == 0)
    ev_ref (c->loop);
  req->bytes = count;
  c->in_flight_bytes += count;
  return req;
}

void
conn_request_charge (struct conn *c, struct request *req, uint64_t bytes)
{
  req->bytes += bytes;
  c->in_flight_bytes += bytes;
}

void
conn_request_put (struct conn *c, struct request *req)
{
  assert (c->in_flight > 0);
  if (req->out.pipe) {
    pipe_put (req->out.pipe);
    req->out.pipe = NULL;
  }
  if (--c->in_flight == 0)
    ev_unref (c->loop);
  c->in_flight_bytes -= req->bytes;
  if (req->ahead > 0) {
    c->read_bytes_ahead -= req->ahead;
    if (--c->reads_ahead == 0)
      tls_readers--;
  }
  if (c->nr_free_reqs < MAX_FREE_REQS && !c->dead) {
    /* An idle connection holds little: big buffers and extent arrays
     * go back to the allocator.
     */
    if (req->buf_cap > KEEP_BUF_CAP ||
        c->free_bytes + req->buf_cap > MAX_FREE_BYTES ||
        kept_bytes + req->buf_cap > MAX_KEPT_BYTES) {
      free (req->buf);
      req->buf = NULL;
      req->buf_cap = 0;
    }
    if (req->extents.cap > KEEP_EXTENTS)
      extents_free (&req->extents);
    c->free_bytes += req->buf_cap;
    kept_bytes += req->buf_cap;
    req->next = c->free_reqs;
    c->free_reqs = req;
    c->nr_free_reqs++;
  }
  else {
    extents_free (&req->extents);
    free (req->buf);
    free (req);
  }
}

static void
request_release (struct conn *c, struct out_item *item)
{
  struct request *req = container_of (item, struct request, out);

  conn_request_put (c, req);
}

void
conn_request_done (struct request *req)
{
  struct conn *c = req->conn;

  req->out.iov = req->iov;
  req->out.release = request_release;
  if (req->sent) {
    /* A worker sent it: only the bookkeeping is left. */
    conn_request_put (c, req);
    conn_mark_dirty (c);        /* drain, reap, or read more */
    return;
  }
  if (req->partial && !c->dead) {
    conn_queue_head (c, &req->out);
    return;
  }
  conn_queue (c, &req->out);
  if (c->dead)
    conn_mark_dirty (c);        /* maybe the last one: reap */
}

/* Mark up to @sent bytes of req's reply as gone and return how many
 * it took.  If that is not all of it, the rest is a partial reply the
 * loop must send before anything else.  Called with send_lock held.
 */
static size_t
mark_sent (struct conn *c, struct request *req, size_t sent)
{
  size_t took = 0;
  unsigned i;

  for (i = 0; i < req->out.niov; ++i) {
    struct iovec *v = &req->iov[i];
    if (v->iov_len > sent - took) {
      v->iov_base = (char *) v->iov_base + (sent - took);
      v->iov_len -= sent - took;
      took = sent;
      break;
    }
    took += v->iov_len;
    v->iov_len = 0;
  }
  if (i == req->out.niov && req->out.pipe_left == 0) {
    req->sent = true;
    return took;
  }
  if (took > 0) {
    req->partial = true;
    c->out_partial = true;
  }
  return took;
}

unsigned
conn_send_direct (struct request *first)
{
  struct conn *c = first->conn;
  struct iovec iov[MAX_IOV];
  struct request *req, *end;
  unsigned n = 0, nreq = 0;
  ssize_t r;

  /* Gather the run of requests for this connection, whole replies
   * only, up to MAX_IOV iovecs.
   */
  for (req = first; req && req->conn == c; req = req->next) {
    if (req->spliced) {         /* dealt with by conn_send_spliced */
      nreq++;
      continue;
    }
    req->sent = req->partial = false;
    if (n + req->out.niov > MAX_IOV)
      break;
    for (unsigned k = 0; k < req->out.niov; ++k)
      iov[n++] = req->iov[k];
    nreq++;
  }
  end = req;
  for (; req && req->conn == c; req = req->next) {
    if (!req->spliced)
      req->sent = req->partial = false;
    nreq++;
  }
  if (n == 0)
    return nreq;

  if (c->tls_up) {
    /* Encrypt each reply whole, in turn: the records go out at once or
     * are queued in order, so every reply counts as sent.  Small
     * replies share a hold of the lock and their writes, up to
     * TLS_BATCH_BYTES, so that the loop never waits for a long batch.
     * A reply that fails (or, when the last write of a hold fails, its
     * last reply) is left to the loop, which finds the session broken
     * and closes the connection.
     */
    for (req = first; req != end; ) {
      struct request *last = NULL;
      size_t batch = 0;
      int e = 0;
      pthread_mutex_lock (&c->send_lock);
      /* Behind queued output it is for the loop to encrypt later. */
      if (c->dead || c->out_head != NULL) {
        pthread_mutex_unlock (&c->send_lock);
        break;
      }
      tls_send_begin (c);
      do {
        e = tls_send_part (c, req->iov, req->out.niov);
        if (e == -1)
          break;
        req->sent = true;
        last = req;
        for (unsigned k = 0; k < req->out.niov; ++k)
          batch += req->iov[k].iov_len;
        req = req->next;
      } while (req != end && batch < TLS_BATCH_BYTES);
      if (tls_send_end (c) == -1 && e == 0) {
        e = -1;
        last->sent = false;
      }
      pthread_mutex_unlock (&c->send_lock);
      if (e == -1)
        break;
    }
    return nreq;
  }

  pthread_mutex_lock (&c->send_lock);
  if (c->dead || c->out_head != NULL || c->out_partial) {
    pthread_mutex_unlock (&c->send_lock);
    return nreq;                /* the loop will queue them */
  }
  do
    r = writev (c->out_fd, iov, n);
  while (r == -1 && errno == EINTR);
  if (r > 0) {
    /* Mark what went out; a reply cut short is finished by the loop
     * before anything else.
     */
    size_t left = r;
    for (req = first; req != end && left > 0; req = req->next)
      if (!req->spliced)
        left -= mark_sent (c, req, left);
  }
  /* EAGAIN or an error: what did not go out is queued by the loop,
   * which finds any error itself.
   */
  pthread_mutex_unlock (&c->send_lock);
  return nreq;
}

void
conn_send_spliced (struct request *req)
{
  struct conn *c = req->conn;
  size_t hdr_len = 0;
  ssize_t r;

  req->sent = req->partial = false;
  for (unsigned i = 0; i < req->out.niov; ++i)
    hdr_len += req->iov[i].iov_len;

  pthread_mutex_lock (&c->send_lock);
  c->nr_spliced++;
  if (c->dead || c->out_head != NULL || c->out_partial)
    goto out;                   /* the loop queues it, pipe and all */
  /* The header, held back by MSG_MORE to leave with the data. */
  do {
    struct msghdr m = { .msg_iov = req->iov, .msg_iovlen = req->out.niov };
    r = sendmsg (c->out_fd, &m, MSG_MORE | MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (r == -1 && errno == EINTR);
  if (r <= 0 || mark_sent (c, req, r) < hdr_len)
    goto out;                   /* the loop finds any error itself */
  splice_out (c, &req->out);
  if (req->out.pipe_left == 0) {
    req->sent = true;
    req->partial = false;
    c->out_partial = false;
  }
 out:
  pthread_mutex_unlock (&c->send_lock);
}

void
request_reply_now (struct conn *c, struct request *req)
{
  reply_encode (req);
  conn_request_done (req);
}

/* Input the TLS session holds (decrypted, or read ahead) is not in
 * the socket, so the socket will not say it is there: queue a readable
 * event for it while the connection reads.
 */
static void
wake_if_tls_pending (struct conn *c)
{
  bool pending;

  if (!c->tls_up || !c->reading || c->dead)
    return;
  pthread_mutex_lock (&c->send_lock);
  pending = tls_pending (c);
  pthread_mutex_unlock (&c->send_lock);
  if (pending)
    ev_feed_event (c->loop, &c->rio, EV_READ);
}

/* Back-pressure: read more only while in-flight work is bounded. */
void
conn_update_reading (struct conn *c)
{
  bool want = !c->dead && c->state != CS_DRAIN &&
    c->in_flight < MAX_IN_FLIGHT &&
    c->in_flight_bytes < MAX_IN_FLIGHT_BYTES;

  /* Encrypted replies waiting for the client count too: their
   * requests are gone, their bytes are not.  And READ data is read
   * only a little ahead of the encryption (TLS_AHEAD_BYTES).
   */
  if (want && c->tls) {
    pthread_mutex_lock (&c->send_lock);
    uint64_t limit = tls_ahead_limit ();
    want = c->in_flight_bytes + c->queued_bytes < MAX_IN_FLIGHT_BYTES &&
      c->queued_bytes < limit &&
      (c->read_bytes_ahead + c->queued_bytes < limit ||
       c->reads_ahead < TLS_MIN_READS);
    pthread_mutex_unlock (&c->send_lock);
  }

  if (want && !c->reading) {
    c->reading = true;
    ev_io_start (c->loop, &c->rio);
    /* Input may already be buffered: parse it now. */
    if (conn_process_input (c) == -1)
      return;
    wake_if_tls_pending (c);
  }
  else if (!want && c->reading) {
    c->reading = false;
    ev_io_stop (c->loop, &c->rio);
  }
}

static size_t
in_avail (const struct conn *c)
{
  return c->in_end - c->in_start;
}

/* Drop up to c->skip buffered bytes. */
static void
skip_buffered (struct conn *c)
{
  size_t n = MIN ((uint64_t) in_avail (c), c->skip);

  c->in_start += n;
  c->skip -= n;
}

/* Parse as much buffered input as the state allows.  Returns 1 when it
 * needs more input, 0 when it must stop (back-pressure, drain), -1 if
 * the connection was closed.
 */
int
conn_process_input (struct conn *c)
{
  for (;;) {
    size_t avail = in_avail (c);
    const unsigned char *p = c->inbuf + c->in_start;
    int r;

    if (c->dead)
      return -1;
    switch (c->state) {
    case CS_CFLAGS:
      if (avail < 4)
        return 1;
      c->in_start += 4;
      r = hs_on_cflags (c, p);
      break;
    case CS_OPTION:
      if (avail < sizeof (struct nbd_new_option))
        return 1;
      c->in_start += sizeof (struct nbd_new_option);
      r = hs_on_option_header (c, p);
      break;
    case CS_OPTION_DATA: {
      size_t n = MIN (avail, (size_t) (c->optlen - c->opt_got));
      memcpy (c->optbuf + c->opt_got, p, n);
      c->in_start += n;
      c->opt_got += n;
      if (c->opt_got < c->optlen)
        return 1;
      r = hs_on_option_data (c);
      break;
    }
    case CS_OPTION_SKIP:
      skip_buffered (c);
      if (c->skip > 0)
        return 1;
      hs_option_skipped (c);
      r = 0;
      break;
    case CS_REQUEST: {
      size_t hlen = c->mode == MODE_EXTENDED
        ? sizeof (struct nbd_extended_request)
        : sizeof (struct nbd_request);
      if (!c->reading)
        return 0;               /* back-pressure */
      if (avail < hlen)
        return 1;
      c->in_start += hlen;
      r = tx_on_request_header (c, p);
      break;
    }
    case CS_PAYLOAD: {
      struct request *req = c->cur;
      size_t n = MIN ((uint64_t) avail, req->count - req->payload_got);
      memcpy ((char *) req->buf + req->payload_got, p, n);
      c->in_start += n;
      req->payload_got += n;
      if (req->payload_got < req->count)
        return 1;
      tx_on_payload_done (c);
      r = 0;
      break;
    }
    case CS_PAYLOAD_SKIP:
      skip_buffered (c);
      if (c->skip > 0)
        return 1;
      tx_on_payload_skipped (c);
      r = 0;
      break;
    case CS_TLS_HANDSHAKE:
      return 1;                 /* gnutls reads the socket itself */
    case CS_DRAIN:
      c->in_start = c->in_end = 0;      /* nothing after DISC counts */
      return 0;
    default:
      abort ();
    }
    if (r < 0 || c->dead)
      return -1;
  }
}

/* read(2) from the client, through TLS once it is up.  *drained says
 * whether another read would only find nothing.
 */
static ssize_t
conn_recv (struct conn *c, void *buf, size_t len, bool *drained)
{
  ssize_t r;

  if (!c->tls_up) {
    do
      r = read (c->in_fd, buf, len);
    while (r == -1 && errno == EINTR);
    *drained = r >= 0 && (size_t) r < len;
    return r;
  }
  pthread_mutex_lock (&c->send_lock);
  do
    r = tls_recv (c, buf, len);
  while (r == -1 && errno == EINTR);
  *drained = r > 0 && tls_drained (c);
  pthread_mutex_unlock (&c->send_lock);
  return r;
}

/* One step of the TLS handshake.  False if the connection was closed
 * or must wait for the client.
 */
static bool
conn_tls_handshake (struct conn *c)
{
  int r;

  pthread_mutex_lock (&c->send_lock);
  r = tls_handshake (c);
  pthread_mutex_unlock (&c->send_lock);
  conn_mark_dirty (c);          /* handshake records to send */
  if (r < 0) {
    conn_close (c, NULL);
    return false;
  }
  if (r == 0)
    return false;
  c->tls_up = true;
  c->state = CS_OPTION;         /* negotiation starts afresh */
  return true;
}

static void
conn_on_readable (struct conn *c)
{
  bool drained = false;

  c->inline_bytes = 0;
  /* Parse, then read: every byte read is parsed before returning, as
   * the socket will not say again that it is there.
   */
  for (int reads = 0; ; ++reads) {
    ssize_t r;
    size_t want;
    int pr = conn_process_input (c);

    if (pr <= 0)
      break;                    /* closed, or stopped by back-pressure */
    /* A read that came back short emptied the socket: another would
     * only say EAGAIN.  Past the budget, other clients get a turn
     * (the socket is level-triggered, so what is left wakes us again).
     */
    if (drained || reads >= RECV_BUDGET)
      break;
    if (c->state == CS_TLS_HANDSHAKE) {
      if (!conn_tls_handshake (c))
        break;
      continue;
    }

    /* A large WRITE payload goes straight into its buffer. */
    if (c->state == CS_PAYLOAD && in_avail (c) == 0) {
      struct request *req = c->cur;
      want = req->count - req->payload_got;
      r = conn_recv (c, (char *) req->buf + req->payload_got, want,
                     &drained);
      if (r > 0) {
        req->payload_got += r;
        if (req->payload_got == req->count)
          tx_on_payload_done (c);
        continue;
      }
    }
    else {
      if (c->in_start == c->in_end)
        c->in_start = c->in_end = 0;
      else if (c->in_start > 0 && CONN_INBUF_SIZE - c->in_end < 4096) {
        memmove (c->inbuf, c->inbuf + c->in_start, in_avail (c));
        c->in_end -= c->in_start;
        c->in_start = 0;
      }
      want = CONN_INBUF_SIZE - c->in_end;
      r = conn_recv (c, c->inbuf + c->in_end, want, &drained);
      if (r > 0) {
        c->in_end += r;
        continue;
      }
    }
    if (r == 0) {
      conn_close (c, "client closed the connection");
      break;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK)
      break;
    conn_close (c, "read error");
    break;
  }
  /* Input left in the session when the budget ran out. */
  wake_if_tls_pending (c);
  conns_flush_dirty ();
}

static void
conn_io_cb (struct ev_loop *loop, ev_io *w, int revents)
{
  struct conn *c = container_of (w, struct conn, rio);

  conn_on_readable (c);
}

static void
conn_write_cb (struct ev_loop *loop, ev_io *w, int revents)
{
  struct conn *c = container_of (w, struct conn, wio);

  conn_flush (c);
  conns_flush_dirty ();
}

static void
conn_timeout_cb (struct ev_loop *loop, ev_timer *w, int revents)
{
  struct conn *c = container_of (w, struct conn, handshake_timer);

  nbdd_info ("%s: handshake not finished after %g seconds: closing",
             c->peer, config.handshake_timeout);
  conn_close (c, NULL);
  conns_flush_dirty ();
}
