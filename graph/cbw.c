/* The 'copy-before-write' filter: a point-in-time snapshot of the node
 * it filters, kept by saving old data to a target before a write
 * changes it (QEMU's block/copy-before-write.c, in nbdd's terms).
 *
 * The snapshot is read through a 'snapshot-access' node
 * (snapshot-access.c) from the target where the old data was saved and
 * from the filtered node elsewhere.  Per cluster (64 KiB), three sets:
 *
 *   copied  the snapshot's data is in the target (never written again)
 *   gone    the snapshot's user discarded it: done with, unreadable
 *   done    copied or gone: a write there copies nothing
 *   unkept  (an incremental snapshot) gone from the start: never the
 *           snapshot's, so its status there is unknown, not zeroes
 *
 * Races.  A write that finds a cluster not done copies it before going
 * on; a snapshot read of a cluster not copied reads the live node.  The
 * two must not overlap, so both register their cluster range in 'busy'
 * and wait for any overlapping range there first.  A write whose
 * clusters are all done, the common case, takes no lock at all: done
 * is only ever set, and what is done is read from the target.
 *
 * Breaking.  When a copy fails (the target is full, or past the
 * scratch limit, or the live node fails to read) the snapshot breaks,
 * as QEMU's on-cbw-error=break-snapshot: its reads fail with EIO from
 * then on and writes stop copying.  The live node never sees an error
 * because of the snapshot.  A read that was under way when the
 * snapshot broke fails too, since a write may have changed what it
 * read.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "cbw.h"
#include "cleanup.h"
#include "filter.h"
#include "log.h"
#include "options.h"
#include "utils.h"

#define CBW_CLUSTER (UINT64_C (64) << 10)
#define CBW_COPY_MAX (UINT64_C (1) << 20)   /* one read + write */

struct busy_range {
  uint64_t start, end;
  struct busy_range *next;
};

struct cbw_state {
  struct node_child *file, *target;   /* file first: see filter.h */
  uint64_t cluster;
  uint64_t limit;               /* bytes of target; 0: none */
  struct bitmap *copied, *gone, *done;
  struct bitmap *unkept;        /* gone from the start: NULL, or see
                                 * cbw_copy_only */
  atomic_uint_fast64_t used;    /* bytes of target holding saved data */
  atomic_bool broken;
  struct cbw_hooks hooks;       /* main thread sets, before any I/O */
  bool detaching;               /* main thread: see cbw_child_perm */

  pthread_mutex_t lock;         /* busy, reason */
  pthread_cond_t cond;          /* a busy range went */
  struct busy_range *busy;
  char reason[256];
};

bool
cbw_is (const struct node *node)
{
  return node->drv == &cbw_driver;
}

/* ---- busy ranges ---- */

static bool
overlaps_busy (const struct cbw_state *s, uint64_t start, uint64_t end)
{
  for (const struct busy_range *b = s->busy; b; b = b->next)
    if (b->start < end && start < b->end)
      return true;
  return false;
}

/* Wait until nothing overlaps [start, end), then hold it in @me. */
static void
busy_enter_locked (struct cbw_state *s, struct busy_range *me,
                   uint64_t start, uint64_t end)
{
  while (overlaps_busy (s, start, end))
    pthread_cond_wait (&s->cond, &s->lock);
  me->start = start;
  me->end = end;
  me->next = s->busy;
  s->busy = me;
}

static void
busy_leave (struct cbw_state *s, struct busy_range *me)
{
  pthread_mutex_lock (&s->lock);
  for (struct busy_range **p = &s->busy; *p; p = &(*p)->next)
    if (*p == me) {
      *p = me->next;
      break;
    }
  pthread_cond_broadcast (&s->cond);
  pthread_mutex_unlock (&s->lock);
}

/* ---- breaking ---- */

static void
cbw_break (struct cbw_state *s, bool notify, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

static void
cbw_break (struct cbw_state *s, bool notify, const char *fmt, ...)
{
  va_list ap;
  bool first;

  pthread_mutex_lock (&s->lock);
  first = !atomic_load (&s->broken);
  if (first) {
    va_start (ap, fmt);
    vsnprintf (s->reason, sizeof s->reason, fmt, ap);
    va_end (ap);
    atomic_store (&s->broken, true);
  }
  pthread_mutex_unlock (&s->lock);
  if (first && notify && s->hooks.broken)
    s->hooks.broken (s->hooks.opaque, s->reason);
}

void
cbw_stop (struct node *cbw)
{
  cbw_break (cbw->opaque, false, "the snapshot was ended");
}

const char *
cbw_broken_reason (struct node *cbw)
{
  struct cbw_state *s = cbw->opaque;

  return atomic_load (&s->broken) ? s->reason : NULL;
}

uint64_t
cbw_scratch_bytes (struct node *cbw)
{
  struct cbw_state *s = cbw->opaque;

  return atomic_load (&s->used);
}

void
cbw_set_detaching (struct node *cbw, bool detaching)
{
  struct cbw_state *s = cbw->opaque;

  s->detaching = detaching;
}

void
cbw_set_hooks (struct node *cbw, const struct cbw_hooks *hooks)
{
  struct cbw_state *s = cbw->opaque;

  s->hooks = *hooks;
}

/* ---- the write side ---- */

/* Save the clusters of [start, end) not done yet, holding the range. */
static void
copy_range (struct node *node, uint64_t start, uint64_t end)
{
  struct cbw_state *s = node->opaque;
  CLEANUP_FREE char *buf = NULL;
  uint64_t off = start;

  while (off < end && !atomic_load (&s->broken)) {
    uint64_t run_end, len;
    int r;

    off = bitmap_next_clean (s->done, off, end);
    if (off == UINT64_MAX)
      break;
    run_end = bitmap_next_dirty (s->done, off, end);
    if (run_end == UINT64_MAX)
      run_end = end;
    len = MIN (run_end - off, CBW_COPY_MAX);
    if (buf == NULL && (buf = malloc (CBW_COPY_MAX)) == NULL) {
      cbw_break (s, true, "out of memory saving old data");
      return;
    }
    /* Reserved before the copy, so that copies at once cannot pass
     * the limit together.
     */
    if (atomic_fetch_add (&s->used, len) + len > s->limit && s->limit) {
      atomic_fetch_sub (&s->used, len);
      cbw_break (s, true, "the scratch limit of %" PRIu64 " bytes was "
                 "reached", s->limit);
      return;
    }
    if ((r = node_pread (s->file->node, buf, len, off, 0)) < 0) {
      atomic_fetch_sub (&s->used, len);
      cbw_break (s, true, "reading the old data at %" PRIu64 ": %s", off,
                 strerror (-r));
      return;
    }
    if ((r = node_pwrite (s->target->node, buf, len, off, 0)) < 0) {
      atomic_fetch_sub (&s->used, len);
      cbw_break (s, true, "saving the old data at %" PRIu64 " to '%s': %s",
                 off, s->target->node->name, strerror (-r));
      return;
    }
    bitmap_set (s->copied, off, len);
    bitmap_set (s->done, off, len);
    off += len;
  }
}

/* Before [offset, offset + count) of the live node changes.  Never
 * fails: a snapshot that cannot keep up breaks instead.
 */
static void
before_write (struct node *node, uint64_t offset, uint64_t count)
{
  struct cbw_state *s = node->opaque;
  uint64_t start = ROUND_DOWN (offset, s->cluster);
  uint64_t end = MIN (ROUND_UP (offset + count, s->cluster), node->size);
  struct busy_range me;

  if (count == 0 || atomic_load (&s->broken) ||
      bitmap_next_clean (s->done, start, end) == UINT64_MAX)
    return;
  pthread_mutex_lock (&s->lock);
  busy_enter_locked (s, &me, start, end);
  pthread_mutex_unlock (&s->lock);
  copy_range (node, start, end);
  busy_leave (s, &me);
}

void
cbw_copy (struct node *cbw, uint64_t offset, uint64_t count)
{
  before_write (cbw, offset, count);
}

bool
cbw_all_done (struct node *cbw, uint64_t offset, uint64_t count)
{
  struct cbw_state *s = cbw->opaque;

  return bitmap_next_clean (s->done, offset, offset + count) == UINT64_MAX;
}

int
cbw_copy_only (struct node *cbw, const struct bitmap *const *sets,
               size_t nr_sets, bool rest_unreadable)
{
  struct cbw_state *s = cbw->opaque;
  uint64_t size = cbw->size;

  /* Done is what need not be copied: everything no set marks, to the
   * cluster.  Gone as well if the snapshot is not to be read there.
   */
  if (rest_unreadable && s->unkept == NULL &&
      (s->unkept = bitmap_new (size, s->cluster)) == NULL)
    return -ENOMEM;
  bitmap_set_all (s->done);
  if (rest_unreadable) {
    bitmap_set_all (s->gone);
    bitmap_set_all (s->unkept);
  }
  for (size_t i = 0; i < nr_sets; ++i) {
    uint64_t off = 0;

    while ((off = bitmap_next_dirty (sets[i], off, size)) != UINT64_MAX) {
      uint64_t end = bitmap_next_clean (sets[i], off, size);
      uint64_t a, b;
      if (end == UINT64_MAX)
        end = size;
      a = ROUND_DOWN (off, s->cluster);
      b = MIN (ROUND_UP (end, s->cluster), size);
      bitmap_clear (s->done, a, b - a);
      if (rest_unreadable) {
        bitmap_clear (s->gone, a, b - a);
        bitmap_clear (s->unkept, a, b - a);
      }
      off = end;
    }
  }
  return 0;
}

static int
cbw_pwrite (struct node *node, const void *buf, uint32_t count,
            uint64_t offset, unsigned flags)
{
  struct cbw_state *s = node->opaque;

  before_write (node, offset, count);
  return node_pwrite (s->file->node, buf, count, offset, flags);
}

static int
cbw_zero (struct node *node, uint64_t count, uint64_t offset,
          unsigned flags)
{
  struct cbw_state *s = node->opaque;

  before_write (node, offset, count);
  return node_zero (s->file->node, count, offset, flags);
}

static int
cbw_discard (struct node *node, uint64_t count, uint64_t offset,
             unsigned flags)
{
  struct cbw_state *s = node->opaque;

  before_write (node, offset, count);
  return node_discard (s->file->node, count, offset, flags);
}

/* ---- the snapshot's side ---- */

static int
read_runs (struct cbw_state *s, char *buf, uint64_t count, uint64_t offset)
{
  uint64_t end = offset + count, off = offset;
  int r = 0;

  while (off < end && r == 0) {
    bool in_target = bitmap_get (s->copied, off);
    uint64_t next = in_target ? bitmap_next_clean (s->copied, off, end)
      : bitmap_next_dirty (s->copied, off, end);
    uint64_t n;

    if (next == UINT64_MAX)
      next = end;
    n = next - off;
    r = node_pread (in_target ? s->target->node : s->file->node,
                    buf + (off - offset), n, off, 0);
    off = next;
  }
  return r;
}

int
cbw_snapshot_read (struct node *cbw, void *buf, uint32_t count,
                   uint64_t offset)
{
  struct cbw_state *s = cbw->opaque;
  uint64_t start = ROUND_DOWN (offset, s->cluster);
  uint64_t end = MIN (ROUND_UP (offset + count, s->cluster), cbw->size);
  struct busy_range me;
  int r;

  if (atomic_load (&s->broken) ||
      !bitmap_range_is_zero (s->gone, offset, count))
    return -EIO;
  /* All saved: the target's data never changes. */
  if (bitmap_next_clean (s->copied, offset, offset + count) == UINT64_MAX)
    r = node_pread (s->target->node, buf, count, offset, 0);
  else {
    pthread_mutex_lock (&s->lock);
    busy_enter_locked (s, &me, start, end);
    pthread_mutex_unlock (&s->lock);
    /* A discard may have given the range up while we waited. */
    r = bitmap_range_is_zero (s->gone, offset, count)
      ? read_runs (s, buf, count, offset) : -EIO;
    busy_leave (s, &me);
  }
  if (r == 0 && atomic_load (&s->broken))
    r = -EIO;
  return r;
}

int
cbw_snapshot_discard (struct node *cbw, uint64_t count, uint64_t offset)
{
  struct cbw_state *s = cbw->opaque;
  uint64_t start = ROUND_UP (offset, s->cluster);
  uint64_t end = offset + count == cbw->size ? cbw->size
    : ROUND_DOWN (offset + count, s->cluster);
  uint64_t freed = 0, off;
  struct busy_range me;

  /* Once stopped or broken, the snapshot's owner may be gone. */
  if (atomic_load (&s->broken))
    return -EIO;
  if (start >= end)
    return 0;
  pthread_mutex_lock (&s->lock);
  busy_enter_locked (s, &me, start, end);
  for (off = start;
       (off = bitmap_next_dirty (s->copied, off, end)) != UINT64_MAX;
       off += s->cluster) {
    off = ROUND_DOWN (off, s->cluster);
    if (!bitmap_get (s->gone, off))
      freed += MIN (s->cluster, cbw->size - off);
  }
  bitmap_set (s->gone, start, end - start);
  bitmap_set (s->done, start, end - start);
  atomic_fetch_sub (&s->used, freed);
  pthread_mutex_unlock (&s->lock);
  if (freed > 0)
    node_discard (s->target->node, end - start, start, 0);
  busy_leave (s, &me);
  if (s->hooks.consumed)
    s->hooks.consumed (s->hooks.opaque, start, end - start);
  return 0;
}

/* Saved: data; discarded: a hole of zeroes; else as the live node says
 * now, which is the snapshot's while the range is held.
 */
int
cbw_snapshot_block_status (struct node *cbw, uint64_t count,
                           uint64_t offset, struct extent_list *el)
{
  struct cbw_state *s = cbw->opaque;
  uint64_t end = offset + count, off = offset;
  int r = 0;

  if (atomic_load (&s->broken))
    return -EIO;
  while (off < end && r == 0) {
    uint64_t next, gone_next = bitmap_next_dirty (s->gone, off, end);
    bool is_gone = gone_next == off;

    if (is_gone) {
      /* Trimmed: a hole of zeroes.  Never kept: a hole, not zeroes
       * (reads fail there), so that no copy takes it for zeroes.
       */
      bool unkept = s->unkept && bitmap_get (s->unkept, off);
      uint64_t other = !s->unkept ? UINT64_MAX : unkept
        ? bitmap_next_clean (s->unkept, off, end)
        : bitmap_next_dirty (s->unkept, off, end);

      next = bitmap_next_clean (s->gone, off, end);
      if (next == UINT64_MAX)
        next = end;
      next = MIN (next, other);
      r = extents_add (el, next - off,
                       unkept ? EXTENT_HOLE : EXTENT_HOLE | EXTENT_ZERO);
    }
    else if (bitmap_get (s->copied, off)) {
      next = bitmap_next_clean (s->copied, off, end);
      next = MIN (next == UINT64_MAX ? end : next, gone_next);
      r = extents_add (el, next - off, 0);
    }
    else {
      struct extent_list sub;
      struct busy_range me;

      next = bitmap_next_dirty (s->copied, off, end);
      next = MIN (next == UINT64_MAX ? end : next, gone_next);
      pthread_mutex_lock (&s->lock);
      busy_enter_locked (s, &me, ROUND_DOWN (off, s->cluster),
                         MIN (ROUND_UP (next, s->cluster), cbw->size));
      pthread_mutex_unlock (&s->lock);
      /* A write may have saved part of the range while we waited: the
       * live node's status no longer speaks for that part.
       */
      {
        uint64_t saved = bitmap_next_dirty (s->copied, off, next);
        if (saved == off || !bitmap_range_is_zero (s->gone, off,
                                                     next - off)) {
          busy_leave (s, &me);
          continue;
        }
        if (saved != UINT64_MAX)
          next = saved;
      }
      extents_init (&sub, off, el->max ? el->max : 1024);
      r = node_block_status (s->file->node, next - off, &sub);
      busy_leave (s, &me);
      if (r == 0) {
        uint64_t at = off;
        for (size_t i = 0; i < sub.len && at < next && r == 0; ++i) {
          uint64_t n = MIN (sub.v[i].length, next - at);
          r = extents_add (el, n, sub.v[i].flags);
          at += n;
        }
        next = at;
      }
      extents_free (&sub);
    }
    if (r == 1)                 /* the list is full */
      break;
    off = next;
  }
  if (r >= 0 && atomic_load (&s->broken))
    return -EIO;
  return r < 0 ? r : 0;
}

/* ---- the node ---- */

static const char *const cbw_keys[] = {
  "driver", "node-name", "file", "target", "scratch-limit", NULL
};

static int
cbw_open (struct node *node, struct json_object *opts, struct error **errp)
{
  struct cbw_state *s = node->opaque;
  uint64_t size;

  pthread_mutex_init (&s->lock, NULL);
  pthread_cond_init (&s->cond, NULL);
  atomic_init (&s->used, 0);
  atomic_init (&s->broken, false);
  s->cluster = CBW_CLUSTER;
  if (opt_check_keys (opts, "copy-before-write", cbw_keys, errp) == -1 ||
      opt_get_size (opts, "copy-before-write", "scratch-limit", false,
                    &s->limit, errp) == -1)
    return -1;
  s->file = node_open_child (node, opts, "file",
                             CHILD_FILTERED | CHILD_PRIMARY, errp);
  if (s->file == NULL)
    return -1;
  s->target = node_open_child (node, opts, "target", CHILD_DATA, errp);
  if (s->target == NULL)
    return -1;
  size = s->file->node->size;
  if (s->file->node->growable) {
    error_setg (errp, "copy-before-write: '%s' is the file of a writable "
                "format node and grows with it: filter the format node",
                s->file->node->name);
    return -1;
  }
  if (s->target->node == s->file->node) {
    error_setg (errp, "copy-before-write: the target must be another node "
                "than '%s'", s->file->node->name);
    return -1;
  }
  if (s->target->node->size < size) {
    error_setg (errp, "copy-before-write: target '%s' (%" PRIu64 " bytes) "
                "is smaller than '%s' (%" PRIu64 " bytes)",
                s->target->node->name, s->target->node->size,
                s->file->node->name, size);
    return -1;
  }
  if (s->target->node->read_only) {
    error_setg (errp, "copy-before-write: target '%s' is read-only",
                s->target->node->name);
    return -1;
  }
  s->copied = bitmap_new (size, s->cluster);
  s->gone = bitmap_new (size, s->cluster);
  s->done = bitmap_new (size, s->cluster);
  if (s->copied == NULL || s->gone == NULL || s->done == NULL) {
    error_setg (errp, "copy-before-write: out of memory");
    return -1;
  }

  node->size = size;
  node->read_only = s->file->node->read_only;
  node->can_flush = s->file->node->can_flush;
  node->can_trim = s->file->node->can_trim;
  node->can_zero = s->file->node->can_zero;
  node->can_fast_zero = s->file->node->can_fast_zero;
  node->can_cache = s->file->node->can_cache;
  node->is_rotational = s->file->node->is_rotational;
  node->has_block_status = s->file->node->has_block_status;
  return 0;
}

/* Also after a failed open. */
static void
cbw_close (struct node *node)
{
  struct cbw_state *s = node->opaque;

  bitmap_free (s->copied);
  bitmap_free (s->gone);
  bitmap_free (s->done);
  bitmap_free (s->unkept);
  pthread_cond_destroy (&s->cond);
  pthread_mutex_destroy (&s->lock);
}

static void
cbw_refresh_limits (struct node *node, struct node_limits *limits)
{
  struct cbw_state *s = node->opaque;

  limits->request_alignment = 1;
  limits->max_transfer = 0;
  limits->opt_transfer = s->file->node->limits.opt_transfer;
}

/* As QEMU's: once the filter has users, nobody else may write to or
 * resize the node under it, which would change the snapshot unseen.
 * Before that (opening it, while the live node's users are still
 * elsewhere), and while its users move back (detaching), it shares
 * all.  The target is the filter's alone.
 */
static void
cbw_child_perm (struct node *node, const struct node_child *c,
                unsigned perm, unsigned shared,
                unsigned *child_perm, unsigned *child_shared)
{
  struct cbw_state *s = node->opaque;

  if (c == s->target) {
    *child_perm = PERM_CONSISTENT_READ | PERM_WRITE;
    *child_shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
    return;
  }
  *child_perm = perm;
  *child_shared = shared;
  if (node->nr_parents > 0 && !s->detaching) {
    *child_perm |= PERM_CONSISTENT_READ;
    *child_shared &= ~(PERM_WRITE | PERM_RESIZE);
  }
}

const struct node_driver cbw_driver = {
  .name             = "copy-before-write",
  .instance_size    = sizeof (struct cbw_state),
  .is_filter        = true,
  .open             = cbw_open,
  .close            = cbw_close,
  .refresh_limits   = cbw_refresh_limits,
  .pread            = filter_pread,
  .pwrite           = cbw_pwrite,
  .pread_nowait     = filter_pread_nowait,
  .read_splice      = filter_read_splice,
  .zero             = cbw_zero,
  .discard          = cbw_discard,
  .flush            = filter_flush,
  .cache            = filter_cache,
  .block_status     = filter_block_status,
  .allocation_depth = filter_allocation_depth,
  .child_perm       = cbw_child_perm,
};
