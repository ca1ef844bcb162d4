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
 *                   back before it fails (default 10; 0: fails at once)
 *   connections     how many connections to open when the server
 *                   allows multi-conn (default 4); else one
 *   read-only
 *
 * Threads.  A libnbd handle runs one synchronous call at a time, so
 * the node keeps a pool of connections, each used by one request at a
 * time.  A request that finds its connection dead (the server went
 * away) reconnects it, waiting up to reconnect-delay, and retries on
 * the new connection: NBD reads and writes are idempotent, so nothing
 * is lost and nothing is applied twice in effect.  After the delay it
 * fails with EIO; the next request tries again.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libnbd.h>

#include "cleanup.h"
#include "driver.h"
#include "log.h"
#include "options.h"
#include "utils.h"

#define MAX_CONNECTIONS 16
#define MAX_RETRIES 5           /* connections dying under one request */

struct nbd_conn {
  struct nbd_handle *h;         /* NULL: to be (re)connected */
  bool busy;                    /* lock */
};

struct nbd_state {
  /* Where, from the options (constant once open). */
  char *uri;                    /* or: */
  char *path, *host, *port, *export;
  char *tls_certificates, *tls_psk, *tls_username;
  double reconnect_delay;
  char *name;                   /* for messages */

  pthread_mutex_t lock;         /* conns[].busy */
  pthread_cond_t free;          /* a connection was given back */
  unsigned nr_conns;
  struct nbd_conn conns[MAX_CONNECTIONS];
  bool can_fua, can_flush, can_trim, can_zero, can_fast_zero, can_cache;
  bool has_block_status;
};

/* ---- connecting ---- */

static struct nbd_handle *
conn_open (struct nbd_state *s, struct error **errp)
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
    if (nbd_connect_uri (h, s->uri) == -1)
      goto fail;
  }
  else {
    if (nbd_set_export_name (h, s->export) == -1)
      goto fail;
    if (s->path ? nbd_connect_unix (h, s->path) == -1
        : nbd_connect_tcp (h, s->host, s->port) == -1)
      goto fail;
  }
  return h;

 fail:
  error_setg (errp, "nbd: %s: %s", s->name, nbd_get_error ());
  nbd_close (h);
  return NULL;
}

static bool
dead (struct nbd_handle *h)
{
  return nbd_aio_is_dead (h) == 1 || nbd_aio_is_closed (h) == 1;
}

/* Take a connection, connected: waits for a free one, and while the
 * server is away, up to reconnect-delay.  NULL: -errno in *err.
 */
static struct nbd_conn *
conn_get (struct nbd_state *s, int *err)
{
  struct nbd_conn *c = NULL;
  struct timespec start, now;
  struct error *e = NULL;

  pthread_mutex_lock (&s->lock);
  for (;;) {
    for (unsigned i = 0; i < s->nr_conns && c == NULL; ++i)
      if (!s->conns[i].busy)
        c = &s->conns[i];
    if (c)
      break;
    pthread_cond_wait (&s->free, &s->lock);
  }
  c->busy = true;
  pthread_mutex_unlock (&s->lock);

  if (c->h && !dead (c->h))
    return c;
  clock_gettime (CLOCK_MONOTONIC, &start);
  for (;;) {
    if (c->h) {
      nbd_close (c->h);
      c->h = NULL;
    }
    if ((c->h = conn_open (s, &e)) != NULL)
      return c;
    clock_gettime (CLOCK_MONOTONIC, &now);
    if ((now.tv_sec - start.tv_sec) +
        (now.tv_nsec - start.tv_nsec) / 1e9 >= s->reconnect_delay) {
      nbdd_warn ("%s (giving up after %g s)", e->msg, s->reconnect_delay);
      error_free (e);
      break;
    }
    error_free (e);
    e = NULL;
    node_io_sleep_begin ();
    nanosleep (&(struct timespec) { .tv_nsec = 200000000 }, NULL);
    node_io_sleep_end ();
  }
  pthread_mutex_lock (&s->lock);
  c->busy = false;
  pthread_cond_signal (&s->free);
  pthread_mutex_unlock (&s->lock);
  *err = -EIO;
  return NULL;
}

static void
conn_put (struct nbd_state *s, struct nbd_conn *c)
{
  pthread_mutex_lock (&s->lock);
  c->busy = false;
  pthread_cond_signal (&s->free);
  pthread_mutex_unlock (&s->lock);
}

/* Run @call on a connection (named h); a connection that died under
 * it is made again and the request retried, a few times at most.
 */
#define WITH_RETRY(s, r, call)                                          \
  do {                                                                  \
    for (unsigned try_ = 0; ; ++try_) {                                 \
      struct nbd_conn *c_ = conn_get ((s), &(r));                      \
      struct nbd_handle *h = c_ ? c_->h : NULL;                        \
      if (c_ == NULL)                                                   \
        break;                                                          \
      (r) = (call);                                                     \
      if ((r) == -1) {                                                  \
        int e_ = nbd_get_errno ();                                      \
        bool retry_ = dead (h);                                         \
        if (!retry_)                                                    \
          nbdd_debug ("nbd: %s: %s", (s)->name, nbd_get_error ());      \
        (r) = -(e_ ? e_ : EIO);                                         \
        conn_put ((s), c_);                                             \
        if (retry_ && try_ < MAX_RETRIES)                               \
          continue;                                                     \
        break;                                                          \
      }                                                                 \
      (r) = 0;                                                          \
      conn_put ((s), c_);                                               \
      break;                                                            \
    }                                                                   \
  } while (0)

/* ---- the data path ---- */

static int
nbd_drv_pread (struct node *node, void *buf, uint32_t count,
               uint64_t offset, unsigned flags)
{
  struct nbd_state *s = node->opaque;
  int r;

  WITH_RETRY (s, r, nbd_pread (h, buf, count, offset, 0));
  return r;
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
    WITH_RETRY (s, r, nbd_flush (h, 0));
  return r;
}

static int
nbd_drv_pwrite (struct node *node, const void *buf, uint32_t count,
                uint64_t offset, unsigned flags)
{
  struct nbd_state *s = node->opaque;
  int r;

  WITH_RETRY (s, r, nbd_pwrite (h, buf, count, offset, fua (s, flags)));
  return fua_fallback (node, r, flags);
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
    uint64_t n = MIN (count, UINT64_C (1) << 30);
    WITH_RETRY (s, r, nbd_zero (h, n, offset, f));
    if (r < 0)
      return r;
    count -= n;
    offset += n;
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
    uint64_t n = MIN (count, UINT64_C (1) << 30);
    WITH_RETRY (s, r, nbd_trim (h, n, offset, fua (s, flags)));
    if (r < 0)
      return r;
    count -= n;
    offset += n;
  }
  return fua_fallback (node, 0, flags);
}

static int
nbd_drv_flush (struct node *node)
{
  struct nbd_state *s = node->opaque;
  int r;

  if (!s->can_flush)
    return 0;
  WITH_RETRY (s, r, nbd_flush (h, 0));
  return r;
}

static int
nbd_drv_cache (struct node *node, uint64_t count, uint64_t offset)
{
  struct nbd_state *s = node->opaque;
  int r;

  if (!s->can_cache)
    return 0;
  WITH_RETRY (s, r, nbd_cache (h, MIN (count, UINT64_C (1) << 30), offset,
                               0));
  return r;
}

struct status_ctx {
  struct extent_list *el;
  uint64_t want;
  int r;
};

static int
status_cb (void *opaque, const char *metacontext, uint64_t offset,
           uint32_t *entries, size_t nr_entries, int *error)
{
  struct status_ctx *sc = opaque;

  if (strcmp (metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  for (size_t i = 0; i + 1 < nr_entries && sc->r == 0; i += 2) {
    uint64_t len = entries[i];
    if (len == 0 || sc->el->end >= sc->want)
      break;
    len = MIN (len, sc->want - sc->el->end);
    if (extents_add (sc->el, len,
                     entries[i + 1] & (EXTENT_HOLE | EXTENT_ZERO)) != 0)
      sc->r = 1;
  }
  return 0;
}

static int
nbd_drv_block_status (struct node *node, uint64_t count, uint64_t offset,
                      struct extent_list *el)
{
  struct nbd_state *s = node->opaque;
  struct status_ctx sc = { .el = el, .want = offset + count };
  size_t len0 = el->len;
  uint64_t end0 = el->end;
  int r;

  if (!s->has_block_status)
    return extents_add (el, count, 0) < 0 ? -ENOMEM : 0;
  WITH_RETRY (s, r, (el->len = len0, el->end = end0, sc.r = 0,
                     nbd_block_status (h, MIN (count, UINT64_C (1) << 30),
                                       offset,
                                       (nbd_extent_callback) {
                                         .callback = status_cb,
                                         .user_data = &sc },
                                       0)));
  if (r < 0)
    return r;
  /* A server may answer with less than asked, never with nothing. */
  if (el->end == end0 && extents_add (el, MIN (count, UINT64_C (1) << 30),
                                      0) < 0)
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

  pthread_mutex_init (&s->lock, NULL);
  pthread_cond_init (&s->free, NULL);
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
  if ((h = conn_open (s, errp)) == NULL)
    return -1;
  s->conns[0].h = h;
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
  node->can_flush = s->can_flush;
  node->can_trim = s->can_trim;
  node->can_zero = s->can_zero;
  node->can_fast_zero = s->can_fast_zero;
  node->can_cache = s->can_cache;
  node->has_block_status = s->has_block_status;
  return 0;
}

/* Also after a failed open. */
static void
nbd_drv_close (struct node *node)
{
  struct nbd_state *s = node->opaque;

  for (unsigned i = 0; i < MAX_CONNECTIONS; ++i)
    if (s->conns[i].h) {
      nbd_shutdown (s->conns[i].h, 0);
      nbd_close (s->conns[i].h);
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
  pthread_cond_destroy (&s->free);
  pthread_mutex_destroy (&s->lock);
}

static void
nbd_drv_refresh_limits (struct node *node, struct node_limits *limits)
{
  struct nbd_state *s = node->opaque;
  struct nbd_handle *h = s->conns[0].h;
  int64_t min = h ? nbd_get_block_size (h, LIBNBD_SIZE_MINIMUM) : -1;
  int64_t max = h ? nbd_get_block_size (h, LIBNBD_SIZE_MAXIMUM) : -1;
  int64_t pref = h ? nbd_get_block_size (h, LIBNBD_SIZE_PREFERRED) : -1;

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
