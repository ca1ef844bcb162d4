/* The 'throttle' filter driver: QEMU's throttle groups.
 *
 * Design.  A group (struct throttle_group) holds the leaky buckets of
 * throttle-bucket.c and is shared by every throttle node naming it.
 * A request on a throttle node first passes the group's gate
 * (tg_admit), then goes to the child unchanged.  The gate, per
 * direction (reads; writes, write-zeroes and discards):
 *
 *   - if nobody is queued and the buckets let the request go, it is
 *     counted and goes at once;
 *   - otherwise it joins the tail of the direction's FIFO and sleeps
 *     in the worker thread running it, on a condition variable of its
 *     own (on its stack).  Only the head of the FIFO sleeps with a
 *     deadline, the time the buckets say it must wait; the others
 *     sleep until they become the head.  So requests of all the nodes
 *     of a group are admitted in arrival order, and each admission
 *     wakes exactly one thread.
 *
 * Flush, cache, block status and allocation depth are not throttled.
 * Reads that must not block (pread_nowait, read_splice) are refused
 * when they would wait, and the caller falls back to a worker.
 *
 * drain_begin on any node of a group opens the gate of the whole group
 * until the matching drain_end: every sleeper is woken and goes, and
 * so does every request that arrives meanwhile.  Requests admitted
 * during a drain are still counted, as in QEMU, so the average holds
 * over time.  throttle_group_set empties the buckets and wakes the
 * heads, so new limits apply to the requests already waiting.
 *
 * Threads.  Groups are created, joined, left, listed and configured
 * on the main thread ('groups', 'name', 'refcnt').  The gate runs on
 * worker threads (and for pread_nowait on the event loop) under the
 * group's 'lock', which is a leaf: it is never held across I/O or
 * while sleeping, so the loop thread never waits long for it.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cleanup.h"
#include "filter.h"
#include "options.h"
#include "throttle-bucket.h"
#include "throttle.h"
#include "utils.h"

#define MAX_GROUP_NAME 128

/* A request sleeping at the gate.  Lives on its thread's stack. */
struct tg_waiter {
  pthread_cond_t cond;
  struct tg_waiter *prev, *next;
};

struct tg_queue {
  struct tg_waiter *head, *tail;
};

struct throttle_group {
  /* Main thread. */
  char *name;
  unsigned refcnt;              /* nodes in the group */
  struct throttle_group *next;  /* in 'groups' */
  pthread_condattr_t condattr;  /* CLOCK_MONOTONIC, for waiters */

  /* Some limit is set: read without the lock as a fast path, written
   * under it.
   */
  bool enabled;

  pthread_mutex_t lock;         /* protects everything below */
  struct tb_state tb;
  struct tg_queue queue[2];     /* [is_write] */
  unsigned drain_count;         /* drain_begin calls not yet ended */
};

struct throttle_state {
  struct node_child *file;      /* first: see filter.h */
  struct throttle_group *group;
  unsigned drain_count;         /* this node's share of the group's */
};

/* Every group.  Main thread only. */
static struct throttle_group *groups;

static struct throttle_group *
group_find (const char *name)
{
  for (struct throttle_group *g = groups; g; g = g->next)
    if (strcmp (g->name, name) == 0)
      return g;
  return NULL;
}

bool
throttle_group_exists (const char *group)
{
  return group != NULL && group_find (group) != NULL;
}

/* A new group with @lim and no nodes, in 'groups'. */
static struct throttle_group *
group_new (const char *name, const struct tb_limits *lim,
           struct error **errp)
{
  struct throttle_group *g;

  if (*name == '\0' || strlen (name) > MAX_GROUP_NAME) {
    error_setg (errp, "throttle group '%.80s': the name must have 1 to %d "
                "characters", name, MAX_GROUP_NAME);
    return NULL;
  }
  g = calloc (1, sizeof *g);
  if (g == NULL || (g->name = strdup (name)) == NULL) {
    free (g);
    error_setg_errno (errp, ENOMEM, "throttle group '%s'", name);
    return NULL;
  }
  pthread_mutex_init (&g->lock, NULL);
  pthread_condattr_init (&g->condattr);
  pthread_condattr_setclock (&g->condattr, CLOCK_MONOTONIC);
  tb_reset (&g->tb, lim, monotonic_ns ());
  g->enabled = tb_limits_enabled (lim);
  g->next = groups;
  groups = g;
  return g;
}

/* A node leaves @g: the last one frees it. */
static void
group_unref (struct throttle_group *g)
{
  struct throttle_group **pp;

  assert (g->refcnt > 0);
  if (--g->refcnt > 0)
    return;
  for (pp = &groups; *pp != g; pp = &(*pp)->next)
    assert (*pp != NULL);
  *pp = g->next;
  assert (g->queue[0].head == NULL && g->queue[1].head == NULL);
  pthread_condattr_destroy (&g->condattr);
  pthread_mutex_destroy (&g->lock);
  free (g->name);
  free (g);
}

/* Wake every sleeper of @g to look again.  Lock held. */
static void
group_wake_all (struct throttle_group *g)
{
  for (int d = 0; d < 2; ++d)
    for (struct tg_waiter *w = g->queue[d].head; w; w = w->next)
      pthread_cond_signal (&w->cond);
}

/* New limits, effective at once.  Lock not held. */
static void
group_apply (struct throttle_group *g, const struct tb_limits *lim)
{
  pthread_mutex_lock (&g->lock);
  tb_reset (&g->tb, lim, monotonic_ns ());
  __atomic_store_n (&g->enabled, tb_limits_enabled (lim), __ATOMIC_RELEASE);
  /* Only the heads sleep with a deadline, but waking everyone is
   * simpler and limits change rarely.
   */
  group_wake_all (g);
  pthread_mutex_unlock (&g->lock);
}

static bool
group_enabled (struct throttle_group *g)
{
  return __atomic_load_n (&g->enabled, __ATOMIC_ACQUIRE);
}

static void
ns_to_timespec (uint64_t ns, struct timespec *ts)
{
  ts->tv_sec = ns / 1000000000;
  ts->tv_nsec = ns % 1000000000;
}

static void
queue_append (struct tg_queue *q, struct tg_waiter *w)
{
  w->next = NULL;
  w->prev = q->tail;
  if (q->tail)
    q->tail->next = w;
  else
    q->head = w;
  q->tail = w;
}

static void
queue_remove (struct tg_queue *q, struct tg_waiter *w)
{
  if (w->prev)
    w->prev->next = w->next;
  else
    q->head = w->next;
  if (w->next)
    w->next->prev = w->prev;
  else
    q->tail = w->prev;
}

/* The gate: return when a request of @bytes in direction @is_write may
 * start, and count it.  Worker threads.
 */
static void
tg_admit (struct throttle_group *g, bool is_write, uint64_t bytes)
{
  struct tg_queue *q = &g->queue[is_write];
  struct tg_waiter w;

  if (!group_enabled (g))
    return;
  pthread_mutex_lock (&g->lock);
  if (g->drain_count == 0 &&
      (q->head != NULL || tb_wait (&g->tb, is_write, monotonic_ns ()) > 0)) {
    /* This worker may sleep for long: let the daemon put another to
     * work for everyone else.
     */
    pthread_mutex_unlock (&g->lock);
    node_io_sleep_begin ();
    pthread_mutex_lock (&g->lock);
    pthread_cond_init (&w.cond, &g->condattr);
    queue_append (q, &w);
    while (g->drain_count == 0) {
      if (q->head == &w) {
        uint64_t now = monotonic_ns ();
        uint64_t wait = tb_wait (&g->tb, is_write, now);
        struct timespec deadline;

        if (wait == 0)
          break;
        ns_to_timespec (now + wait, &deadline);
        pthread_cond_timedwait (&w.cond, &g->lock, &deadline);
      }
      else
        pthread_cond_wait (&w.cond, &g->lock);
    }
    queue_remove (q, &w);
    if (q->head)                /* the next in line takes over */
      pthread_cond_signal (&q->head->cond);
    pthread_cond_destroy (&w.cond);
    tb_account (&g->tb, is_write, bytes);
    pthread_mutex_unlock (&g->lock);
    node_io_sleep_end ();
    return;
  }
  tb_account (&g->tb, is_write, bytes);
  pthread_mutex_unlock (&g->lock);
}

/* For requests that must not block: may one start now, without
 * overtaking anyone?  Counted only once it did (tg_count), so that a
 * request the child refuses and the caller retries is counted once.
 * Two such requests can both see room for one: a small overshoot that
 * the next waits make up for.
 */
static bool
tg_may_start_now (struct throttle_group *g, bool is_write)
{
  bool r;

  if (!group_enabled (g))
    return true;
  pthread_mutex_lock (&g->lock);
  r = g->drain_count > 0 ||
    (g->queue[is_write].head == NULL &&
     tb_wait (&g->tb, is_write, monotonic_ns ()) == 0);
  pthread_mutex_unlock (&g->lock);
  return r;
}

static void
tg_count (struct throttle_group *g, bool is_write, uint64_t bytes)
{
  if (!group_enabled (g))
    return;
  pthread_mutex_lock (&g->lock);
  tb_account (&g->tb, is_write, bytes);
  pthread_mutex_unlock (&g->lock);
}

/* Fail if @o has a key that is not a limit name of @names. */
static int
limits_check_keys (struct json_object *o, const struct tb_names *names,
                   const char *what, struct error **errp)
{
  json_object_object_foreach (o, key, val) {
    bool known = strcmp (key, names->iops_size) == 0;

    (void) val;
    for (int i = 0; !known && i < TB_COUNT; ++i)
      known = strcmp (key, names->avg[i]) == 0 ||
        strcmp (key, names->max[i]) == 0 ||
        strcmp (key, names->length[i]) == 0;
    if (!known) {
      error_setg (errp, "%s: unknown limit '%.80s'", what, key);
      return -1;
    }
  }
  return 0;
}

/* Read the limits named by @names from @o into @lim (names absent
 * leave their value) and check the result.  0 or -1 with errp.
 */
static int
limits_parse (struct json_object *o, const struct tb_names *names,
              const char *what, struct tb_limits *lim, struct error **errp)
{
  struct tb_limits l = *lim;

  if (!json_object_is_type (o, json_type_object)) {
    error_setg (errp, "%s: the limits must be an object", what);
    return -1;
  }
  for (int i = 0; i < TB_COUNT; ++i)
    if (opt_get_uint64 (o, what, names->avg[i], false, &l.avg[i],
                        errp) == -1 ||
        opt_get_uint64 (o, what, names->max[i], false, &l.max[i],
                        errp) == -1 ||
        opt_get_uint64 (o, what, names->length[i], false,
                        &l.burst_length[i], errp) == -1)
      return -1;
  if (opt_get_uint64 (o, what, names->iops_size, false, &l.iops_size,
                      errp) == -1)
    return -1;
  if (tb_limits_check (&l, names, errp) == -1) {
    error_prepend (errp, "%s", what);
    return -1;
  }
  *lim = l;
  return 0;
}

int
throttle_group_set (const char *group, struct json_object *args,
                    struct error **errp)
{
  struct throttle_group *g = group_find (group);
  struct tb_limits lim;
  char what[128];

  snprintf (what, sizeof what, "block-set-io-throttle: throttle group "
            "'%.80s'", group);
  if (g == NULL) {
    error_setg (errp, "%s: no such group", what);
    return -1;
  }
  /* The command describes the whole configuration: what it does not
   * name is unlimited, as in QEMU.
   */
  tb_limits_init (&lim);
  if (limits_parse (args, &tb_names_qmp, what, &lim, errp) == -1)
    return -1;
  group_apply (g, &lim);
  return 0;
}

int
throttle_group_set_limits (const char *group, struct json_object *limits,
                           struct error **errp)
{
  struct throttle_group *g = group_find (group);
  struct tb_limits lim;
  char what[128];

  snprintf (what, sizeof what, "throttle group '%.80s'", group);
  if (g)
    lim = g->tb.lim;            /* main thread: only we change it */
  else
    tb_limits_init (&lim);
  if ((json_object_is_type (limits, json_type_object) &&
       limits_check_keys (limits, &tb_names_limits, what, errp) == -1) ||
      limits_parse (limits, &tb_names_limits, what, &lim, errp) == -1)
    return -1;
  if (g == NULL)
    return group_new (group, &lim, errp) ? 0 : -1;
  group_apply (g, &lim);
  return 0;
}

static int
add_uint (struct json_object *o, const char *key, uint64_t v)
{
  struct json_object *n = json_object_new_int64 (v);

  if (n == NULL || json_object_object_add (o, key, n) != 0) {
    json_object_put (n);
    return -1;
  }
  return 0;
}

struct json_object *
throttle_group_limits (const char *group)
{
  struct throttle_group *g = group_find (group);
  const struct tb_names *n = &tb_names_limits;
  const struct tb_limits *lim;
  struct json_object *o;

  if (g == NULL)
    return NULL;
  lim = &g->tb.lim;             /* main thread: only we change it */
  o = json_object_new_object ();
  if (o == NULL)
    return NULL;
  for (int i = 0; i < TB_COUNT; ++i)
    if (add_uint (o, n->avg[i], lim->avg[i]) == -1 ||
        add_uint (o, n->max[i], lim->max[i]) == -1 ||
        add_uint (o, n->length[i], lim->burst_length[i]) == -1)
      goto out_nomem;
  if (add_uint (o, n->iops_size, lim->iops_size) == -1)
    goto out_nomem;
  return o;

 out_nomem:
  json_object_put (o);
  return NULL;
}

const char *
throttle_node_group (const struct node *node)
{
  const struct throttle_state *s;

  if (node->drv != &throttle_driver)
    return NULL;
  s = node->opaque;
  return s->group ? s->group->name : NULL;
}

static const char *const throttle_keys[] = {
  "driver", "node-name", "file", "throttle-group", "limits", "read-only",
  "auto-read-only", "cache.direct", "cache.no-flush", "discard",
  "detect-zeroes", NULL
};

static int
throttle_open (struct node *node, struct json_object *opts,
               struct error **errp)
{
  struct throttle_state *s = node->opaque;
  struct json_object *limits_opt = NULL;
  const char *name = node->name;
  struct throttle_group *g;
  struct tb_limits lim;
  bool ro = false;
  char what[128];

  if (opt_check_keys (opts, "throttle", throttle_keys, errp) == -1 ||
      opt_get_string (opts, "throttle", "throttle-group", false, &name,
                      errp) == -1 ||
      opt_get_bool (opts, "throttle", "read-only", false, &ro, errp) == -1)
    return -1;
  snprintf (what, sizeof what, "throttle: throttle group '%.80s'", name);
  tb_limits_init (&lim);
  if (json_object_object_get_ex (opts, "limits", &limits_opt) &&
      limits_opt != NULL &&
      ((json_object_is_type (limits_opt, json_type_object) &&
        limits_check_keys (limits_opt, &tb_names_limits, what,
                           errp) == -1) ||
       limits_parse (limits_opt, &tb_names_limits, what, &lim,
                     errp) == -1))
    return -1;

  s->file = node_open_child (node, opts, "file",
                             CHILD_FILTERED | CHILD_PRIMARY, errp);
  if (s->file == NULL)
    return -1;

  g = group_find (name);
  if (g && limits_opt && !tb_limits_equal (&g->tb.lim, &lim)) {
    error_setg (errp, "%s: the group exists with other limits", what);
    return -1;
  }
  if (g == NULL && (g = group_new (name, &lim, errp)) == NULL)
    return -1;
  g->refcnt++;
  s->group = g;

  node->size = s->file->node->size;
  node->read_only = ro || s->file->node->read_only;
  node->can_flush = s->file->node->can_flush;
  node->can_trim = s->file->node->can_trim;
  node->can_zero = s->file->node->can_zero;
  node->can_fast_zero = s->file->node->can_fast_zero;
  node->can_cache = s->file->node->can_cache;
  node->is_rotational = s->file->node->is_rotational;
  node->has_block_status = s->file->node->has_block_status;
  return 0;
}

/* Also called after a failed open, with or without a group. */
static void
throttle_close (struct node *node)
{
  struct throttle_state *s = node->opaque;
  struct throttle_group *g = s->group;

  if (g == NULL)
    return;
  /* A drain that never ended must not keep the group open forever. */
  pthread_mutex_lock (&g->lock);
  assert (g->drain_count >= s->drain_count);
  g->drain_count -= s->drain_count;
  pthread_mutex_unlock (&g->lock);
  s->drain_count = 0;
  s->group = NULL;
  group_unref (g);
}

static void
throttle_drain_begin (struct node *node)
{
  struct throttle_state *s = node->opaque;
  struct throttle_group *g = s->group;

  pthread_mutex_lock (&g->lock);
  g->drain_count++;
  s->drain_count++;
  group_wake_all (g);
  pthread_mutex_unlock (&g->lock);
}

static void
throttle_drain_end (struct node *node)
{
  struct throttle_state *s = node->opaque;
  struct throttle_group *g = s->group;

  pthread_mutex_lock (&g->lock);
  assert (s->drain_count > 0 && g->drain_count > 0);
  g->drain_count--;
  s->drain_count--;
  pthread_mutex_unlock (&g->lock);
}

/* A filter asks of its child exactly what its own users ask of it. */
static void
throttle_child_perm (struct node *node, const struct node_child *c,
                     unsigned perm, unsigned shared,
                     unsigned *child_perm, unsigned *child_shared)
{
  *child_perm = perm;
  *child_shared = shared;
}

static void
throttle_refresh_limits (struct node *node, struct node_limits *limits)
{
  struct throttle_state *s = node->opaque;

  /* As raw: the child aligns and splits for itself. */
  limits->request_alignment = 1;
  limits->max_transfer = 0;
  limits->opt_transfer = s->file->node->limits.opt_transfer;
}

static int
throttle_pread (struct node *node, void *buf, uint32_t count,
                uint64_t offset, unsigned flags)
{
  struct throttle_state *s = node->opaque;

  tg_admit (s->group, false, count);
  return node_pread (s->file->node, buf, count, offset, flags);
}

static int
throttle_pread_nowait (struct node *node, void *buf, uint32_t count,
                       uint64_t offset)
{
  struct throttle_state *s = node->opaque;
  int r;

  if (!tg_may_start_now (s->group, false))
    return -EAGAIN;
  r = node_pread_nowait (s->file->node, buf, count, offset);
  if (r == 0)
    tg_count (s->group, false, count);
  return r;
}

static int
throttle_read_splice (struct node *node, int pipe_fd, size_t pipe_size,
                      uint32_t count, uint64_t offset)
{
  struct throttle_state *s = node->opaque;
  int r;

  if (!tg_may_start_now (s->group, false))
    return -ENOTSUP;
  r = node_read_splice (s->file->node, pipe_fd, pipe_size, count, offset);
  if (r == 0)
    tg_count (s->group, false, count);
  return r;
}

static int
throttle_pwrite (struct node *node, const void *buf, uint32_t count,
                 uint64_t offset, unsigned flags)
{
  struct throttle_state *s = node->opaque;

  tg_admit (s->group, true, count);
  return node_pwrite (s->file->node, buf, count, offset, flags);
}

/* Write-zeroes and discard count as writes of the bytes they cover, as
 * in QEMU's throttle driver.
 */
static int
throttle_zero (struct node *node, uint64_t count, uint64_t offset,
               unsigned flags)
{
  struct throttle_state *s = node->opaque;

  tg_admit (s->group, true, count);
  return node_zero (s->file->node, count, offset, flags);
}

static int
throttle_discard (struct node *node, uint64_t count, uint64_t offset,
                  unsigned flags)
{
  struct throttle_state *s = node->opaque;

  tg_admit (s->group, true, count);
  return node_discard (s->file->node, count, offset, flags);
}

const struct node_driver throttle_driver = {
  .name             = "throttle",
  .instance_size    = sizeof (struct throttle_state),
  .is_filter        = true,
  .open             = throttle_open,
  .close            = throttle_close,
  .refresh_limits   = throttle_refresh_limits,
  .pread            = throttle_pread,
  .pwrite           = throttle_pwrite,
  .pread_nowait     = throttle_pread_nowait,
  .read_splice      = throttle_read_splice,
  .zero             = throttle_zero,
  .discard          = throttle_discard,
  .flush            = filter_flush,
  .cache            = filter_cache,
  .block_status     = filter_block_status,
  .allocation_depth = filter_allocation_depth,
  .child_perm       = throttle_child_perm,
  .drain_begin      = throttle_drain_begin,
  .drain_end        = throttle_drain_end,
};
