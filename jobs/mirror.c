/* The mirror job (QEMU's blockdev-mirror): copy a live node to a target
 * node, local or remote (an 'nbd' node: live storage migration between
 * two appliances), then, on block-job-complete, move the node's users
 * onto the target.
 *
 * What is left to copy is a bitmap on the source, internal to the job:
 * all of it (sync=full), what the top layer holds (top) or nothing
 * (none) at first, and every write since.  Each of the job's copiers
 * (its thread and three more, so that copies to a remote target
 * overlap their round trips) takes a dirty run no other copy is under
 * way in, clears its bits, reads it from the source and writes it to
 * the target.  A guest write that races with the copy marks its
 * bits before it starts and again once it is done (an internal bitmap,
 * graph/dirty.c), so whichever side of the clear it falls on, it is
 * copied again.  Once the bitmap is empty the job is ready, and goes on
 * copying new writes until it is completed: then, with the source
 * drained, the last dirty runs are copied, the target flushed, and the
 * users moved, in one admin command.
 *
 * copy-mode write-blocking (QEMU's active mirroring) takes the guest's
 * writes out of the copy list: the job sets a write hook on the source
 * (graph/io.c), and a guest write is also written to the target before
 * it is acknowledged, where the target holds the source already (the
 * granules clean in the bitmap), so the copy list only shrinks and the
 * job converges however fast the guest writes.  The bitmap is then
 * marked by the hook alone, not by the request path.  Two writes to
 * one range must reach the target in the order they reached the
 * source: an active write holds its range from before the source write
 * until the target write is done, in a list the copiers keep out of,
 * as they keep out of each other's copies.  A write that finds its
 * range held (by a copy, or by another write) does not wait for it: it
 * marks its range before and after, as in background mode, and leaves
 * it to the copiers.  So a guest write never waits for the job, only
 * for its own write to the target, and a discard, whose effect on the
 * target need not be the source's, is always left to the copiers.  A
 * write to the target that fails leaves its range marked and is one of
 * the job's errors, as a copy that fails is (on-target-error): the job
 * fails, goes on, or pauses, and while it is paused so, writes are
 * only marked.  The guest's write has succeeded either way.
 *
 * Completion copies what is still marked with the source drained; an
 * error there that the job goes on from refuses the completion and
 * starts the copiers again.
 *
 * block-commit of the active layer is the same job (QEMU's
 * commit_active_start is a mirror too): the source is the top of the
 * chain, the target the base below it, and what is left to copy starts
 * as what the layers above the base hold.  The layers in between are
 * held as block-commit holds them (chain.c), and the base's backing
 * edge lets the job write under it; on completion the users of the top
 * move onto the base.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bitmap.h"
#include "chain.h"
#include "job.h"
#include "log.h"
#include "mirror.h"
#include "utils.h"

#define MIRROR_CHUNK_MAX (UINT64_C (64) << 20)
#define COMMIT_GRANULARITY 65536
#define MIRROR_COPIERS 4

/* Pacing: the copiers judge, slice by slice, whether they gain on the
 * guest's writes.
 */
#define PACE_SLICE_NS 250000000ULL
#define PACE_IDLE_SLICES 7      /* a losing copy runs one slice in 8 */
#define PACE_MIN_CLEAN 64       /* granules: fewer tell A badly */
#define PACE_MIN_DIRTIED 16     /* granules: fewer say nothing */

/* A background copy that cannot catch up.  A guest write that dirties
 * a clean granule undoes a copy.  Guest writes covering A granules a
 * second, spread over the node, dirty A * K / T of them again each
 * second, K of its T granules being clean.  Copying at best F granules
 * a second (the copiers' rate in a slice where they never ran dry),
 * the job can converge only if F > A: else everything it copies is
 * dirtied again before it could finish, and what the copy takes (CPU,
 * bandwidth) is taken from the guest for nothing but a shorter
 * catch-up later.  Such a job copies one slice in eight (still
 * measuring A and F) until the guest slows down.
 *
 * A is told at the end of each copied slice two ways: the granules the
 * guest's writes covered (the bitmap's marks), which counts a granule
 * written twice twice, and (dD + C) * T / K from the C granules the
 * copiers cleared and the move dD of the dirty count, which assumes
 * writes spread evenly.  The smaller is taken, so that neither a guest
 * rewriting a few granules over and over nor one writing in sequence
 * just behind the copy (every write on a clean granule) looks faster
 * than it is.  Where hardly any granule stays clean for long enough to
 * be seen (A far above F on a small node), the marks alone tell A,
 * and the guest must also have undone at least half the slice's copies
 * (the count fell by less than half of them; not all, since a slice
 * that follows idle ones starts with none clean, and gains a few).
 */
struct pace {
  uint64_t slice_start;               /* ns; 0: start one */
  uint64_t dirty0;                    /* granules dirty at its start */
  uint64_t marks0;                    /* the bitmap's marks then */
  unsigned pauses0;                   /* the job's pauses then */
  uint64_t cleared;                   /* granules taken for copies */
  bool ran_dry;                       /* a copier found nothing to copy */
  bool idle;                          /* this slice is one not copied */
  unsigned idle_left;                 /* slices still to sit out */
  bool losing;                        /* what was judged last */
};

struct mirror {
  struct node *source, *target;       /* references */
  struct node_root target_root;       /* the job's write edge */
  struct dirty_bitmap *bm;            /* internal, on source */
  uint64_t chunk;
  struct chain_hold hold;             /* active commit: the layers */
  uint32_t granularity;               /* of bm */
  bool active;                        /* write-blocking: the hook is set */
  bool linked;                        /* bm is on the source's list */
  struct node_write_hook hook;        /* on the source */
  pthread_mutex_t lock;               /* the copiers' below, and clears */
  uint64_t cursor;                    /* where the next copy starts */
  unsigned in_flight;                 /* copies under way */
  int error;                          /* the first copy that failed */
  /* Their ranges: two copies of one range at once could land in the
   * wrong order (the older data last) with its bits clear.
   */
  struct { uint64_t start, end; } flight[MIRROR_COPIERS];
  /* Write-blocking: the active writes under way (their ranges live on
   * the stacks of the guest requests); copiers keep out of them too.
   */
  struct node_io_range *writes;
  struct pace pace;                   /* under the lock */
};

static struct mirror *
mirror_of (struct job *job)
{
  return job->opaque;
}

static void
update_len (struct job *job)
{
  struct mirror *m = mirror_of (job);

  atomic_store (&job->len, atomic_load (&job->offset) +
                bitmap_count (m->bm->bm));
}

static int
copy (struct node *from, struct node *to, void *buf, uint64_t n,
      uint64_t off, bool *is_read)
{
  int r = node_pread (from, buf, n, off, 0);

  *is_read = r < 0;
  return r < 0 ? r : node_pwrite (to, buf, n, off, 0);
}

/* The job's copy: one root at a time, since a drain of both (the
 * target under the source: an active commit) would wait forever for a
 * job inside one and waiting at the other.  A guest write between the
 * read and the write marks the run again: it is copied again.
 */
static int
copy_through_roots (struct job *job, void *buf, uint64_t n, uint64_t off,
                    bool *is_read)
{
  struct mirror *m = mirror_of (job);
  struct node *src = root_io_begin (&job->root), *dst;
  int r = node_pread (src, buf, n, off, 0);

  root_io_end (&job->root);
  *is_read = r < 0;
  if (r < 0)
    return r;
  dst = root_io_begin (&m->target_root);
  r = node_pwrite (dst, buf, n, off, 0);
  root_io_end (&m->target_root);
  return r;
}

/* Under the lock: judge afresh from the next slice (a new thread, a
 * new copy mode: what came before says nothing of what comes).
 */
static void
pace_reset (struct mirror *m)
{
  m->pace.slice_start = 0;
  m->pace.idle = false;
  m->pace.idle_left = 0;
}

/* ---- write-blocking: the source's write hook ---- */

/* Under the lock: whether [start, end) overlaps a copy or an active
 * write under way.  Copies are of whole granules: a write overlaps one
 * exactly when its granules do.
 */
static bool
range_busy (const struct mirror *m, uint64_t start, uint64_t end)
{
  for (unsigned i = 0; i < MIRROR_COPIERS; ++i)
    if (m->flight[i].end != 0 && m->flight[i].start < end &&
        start < m->flight[i].end)
      return true;
  for (const struct node_io_range *w = m->writes; w; w = w->next)
    if (w->start < end && start < w->end)
      return true;
  return false;
}

/* Before a write reaches the source: hold its range (w->hooked), or,
 * if that is not to be had at once (or the job has failed, or it is a
 * discard), mark it for the copiers, as a background mirror would.
 */
static void
active_before (void *opaque, struct node_write *w)
{
  struct mirror *m = mirror_of (opaque);
  uint64_t end = w->offset + w->count;

  w->hooked = false;
  if (w->kind != NODE_WRITE_DISCARD) {
    pthread_mutex_lock (&m->lock);
    if (m->error == 0 && !job_io_stopped (opaque) &&
        !range_busy (m, w->offset, end)) {
      w->range.start = w->offset;
      w->range.end = end;
      w->range.next = m->writes;
      m->writes = &w->range;
      w->hooked = true;
    }
    pthread_mutex_unlock (&m->lock);
  }
  if (!w->hooked)
    bitmap_set (m->bm->bm, w->offset, w->count);
}

/* The parts of the write that the target holds already (clean: the
 * copiers are out of the range while it is held, so none can clear a
 * bit under us) go to the target too; dirty parts are the copiers'.
 * 0, 1 if the target is being drained (the parts are left to the
 * copiers), or -errno.
 */
static int
write_clean (struct job *job, const struct node_write *w)
{
  struct mirror *m = mirror_of (job);
  uint64_t off = w->offset, end = w->offset + w->count;
  struct node *dst = root_io_try_begin (&m->target_root);
  int r = 0;

  if (dst == NULL)
    return 1;
  while (r == 0 && (off = bitmap_next_clean (m->bm->bm, off,
                                             end)) != UINT64_MAX) {
    uint64_t next = bitmap_next_dirty (m->bm->bm, off, end);
    if (next == UINT64_MAX)
      next = end;
    /* No FUA: completing the job flushes the target. */
    if (w->kind == NODE_WRITE_DATA)
      r = node_pwrite (dst, (const char *) w->buf + (off - w->offset),
                       next - off, off, 0);
    else
      r = node_zero (dst, next - off, off, w->flags & NODE_MAY_TRIM);
    if (r == 0) {               /* len first: offset <= len */
      atomic_fetch_add (&job->len, next - off);
      atomic_fetch_add (&job->offset, next - off);
    }
    off = next;
  }
  root_io_end (&m->target_root);
  return r;
}

/* After the write to the source, with its result. */
static void
active_after (void *opaque, struct node_write *w, int ret)
{
  struct job *job = opaque;
  struct mirror *m = mirror_of (job);
  bool first = false, fail;
  int r;

  if (!w->hooked) {
    /* Again once it is done: a copier may have cleared the bits and
     * read the range meanwhile.
     */
    bitmap_set (m->bm->bm, w->offset, w->count);
    return;
  }
  /* A failed write may have changed part of the range: copy it all. */
  r = ret < 0 ? ret : write_clean (job, w);
  /* Marked before the range is let go, for the copiers to find. */
  if (r != 0)
    bitmap_set (m->bm->bm, w->offset, w->count);
  /* on-target-error: the range is the copiers' again, or the job
   * fails.
   */
  fail = ret == 0 && r < 0 && job_error (job, false, r) == JOB_ERROR_REPORT;
  pthread_mutex_lock (&m->lock);
  for (struct node_io_range **p = &m->writes; *p; p = &(*p)->next)
    if (*p == &w->range) {
      *p = w->range.next;
      break;
    }
  if (fail && m->error == 0) {
    m->error = r;
    first = true;
  }
  pthread_mutex_unlock (&m->lock);
  if (first)
    nbdd_warn ("mirror '%s': a guest write to '%s' at %" PRIu64 " could "
               "not be written to target '%s': %s: the job fails",
               job->id, m->source->name, w->offset, m->target->name,
               strerror (-r));
}

/* Write-blocking, with the source drained: the write hook marks the
 * bitmap from now on, not the request path.
 */
static int
hook_on (struct job *job, struct error **errp)
{
  struct mirror *m = mirror_of (job);

  m->hook.before = active_before;
  m->hook.after = active_after;
  m->hook.opaque = job;
  if (node_write_hook_set (m->source, &m->hook) < 0) {
    error_setg (errp, "mirror: node '%s' has a write-blocking mirror "
                "already", m->source->name);
    return -1;
  }
  __atomic_store_n (&m->bm->enabled, false, __ATOMIC_RELAXED);
  pthread_mutex_lock (&m->lock);
  m->active = true;
  pace_reset (m);
  pthread_mutex_unlock (&m->lock);
  return 0;
}

/* With the source drained: back to background mode, the bitmap marked
 * by the request path again.
 */
static void
hook_off (struct job *job)
{
  struct mirror *m = mirror_of (job);

  if (!m->active)
    return;
  node_write_hook_clear (m->source, &m->hook);
  __atomic_store_n (&m->bm->enabled, true, __ATOMIC_RELAXED);
  pthread_mutex_lock (&m->lock);
  m->active = false;
  pace_reset (m);
  pthread_mutex_unlock (&m->lock);
}

/* ---- the copiers ---- */

/* A dirty run [start, *endp), whole granules, must not overlap the
 * range [fs, fe) of a copy or a write under way, taken to whole
 * granules: true if the run begins inside it (*fromp: where to look
 * again), else the run stops short of it.
 */
static bool
starts_inside (const struct mirror *m, uint64_t start, uint64_t *endp,
               uint64_t fs, uint64_t fe, uint64_t *fromp)
{
  fs = ROUND_DOWN (fs, (uint64_t) m->granularity);
  fe = ROUND_UP (fe, (uint64_t) m->granularity);
  if (fs <= start && start < fe) {
    *fromp = fe;
    return true;
  }
  if (start < fs && fs < *endp)
    *endp = fs;
  return false;
}

/* Under the lock: the first dirty run at or after @from that no copy
 * or active write under way overlaps, at most a chunk long (its end in
 * *endp), or UINT64_MAX.
 */
static uint64_t
next_free_run (struct mirror *m, uint64_t from, uint64_t size,
               uint64_t *endp)
{
  for (;;) {
    uint64_t start = bitmap_next_dirty (m->bm->bm, from, size), end;
    bool moved = false;

    if (start == UINT64_MAX)
      return UINT64_MAX;
    end = bitmap_next_clean (m->bm->bm, start, MIN (size, start + m->chunk));
    if (end == UINT64_MAX)
      end = MIN (size, start + m->chunk);
    for (unsigned i = 0; i < MIRROR_COPIERS && !moved; ++i)
      moved = m->flight[i].end != 0 &&
        starts_inside (m, start, &end, m->flight[i].start, m->flight[i].end,
                       &from);
    for (const struct node_io_range *w = m->writes; w && !moved; w = w->next)
      moved = starts_inside (m, start, &end, w->start, w->end, &from);
    if (!moved) {
      *endp = end;
      return start;
    }
  }
}

/* Under the lock, at the end of a copied slice: whether the guest
 * dirties granules faster than the job can copy them (struct pace);
 * *ratep and *capp are A and F.
 */
static bool
pace_judge (struct mirror *m, uint64_t now, double *ratep, double *capp)
{
  struct pace *p = &m->pace;
  double secs = (double) (now - p->slice_start) / 1e9;
  uint64_t g = m->granularity;
  uint64_t total = ROUND_UP (bitmap_size (m->bm->bm), g) / g;
  uint64_t dirty = bitmap_count_granules (m->bm->bm);
  uint64_t clean_sum = 2 * total - dirty - p->dirty0;   /* 2 * mean K */
  uint64_t marks = __atomic_load_n (&m->bm->marks, __ATOMIC_RELAXED);
  double dirtied = (double) dirty - (double) p->dirty0 + (double) p->cleared;

  if (p->ran_dry || p->cleared == 0)
    return false;               /* F unknown, or nothing to lose on */
  *capp = (double) p->cleared / secs;
  *ratep = (double) (marks - p->marks0) / secs;
  if (clean_sum < 2 * PACE_MIN_CLEAN)
    return dirty + p->cleared / 2 >= p->dirty0 && *ratep > *capp;
  *ratep = MIN (*ratep, dirtied * (double) total * 2 / (double) clean_sum
                / secs);
  return dirtied >= PACE_MIN_DIRTIED && *ratep > *capp;
}

/* Under the lock: 0 if a copier may copy now, or how long to wait.
 * Only a background copy paces itself: a write-blocking job's list
 * only shrinks.
 */
static uint64_t
pace (struct job *job, struct mirror *m)
{
  struct pace *p = &m->pace;
  uint64_t now = monotonic_ns ();
  unsigned pauses = job_pauses (job);

  if (m->active)
    return 0;
  if (p->slice_start != 0 && pauses == p->pauses0 &&
      now - p->slice_start < PACE_SLICE_NS)
    return p->idle ? p->slice_start + PACE_SLICE_NS - now : 0;
  /* A slice ends; one that a pause cut is not judged. */
  if (p->slice_start != 0 && pauses == p->pauses0 && !p->idle) {
    double rate = 0, cap = 0;
    bool losing = pace_judge (m, now, &rate, &cap);

    if (losing)
      p->idle_left = PACE_IDLE_SLICES;
    if (losing && !p->losing)
      debug ("job '%s': the guest dirties about %.0f granules/s, the job "
             "copies %.0f/s: copying one slice in %d", job->id, rate, cap,
             PACE_IDLE_SLICES + 1);
    else if (!losing && p->losing)
      debug ("job '%s': copying at full speed", job->id);
    p->losing = losing;
  }
  p->idle = p->idle_left > 0;
  if (p->idle)
    p->idle_left--;
  p->slice_start = now;
  p->pauses0 = pauses;
  p->dirty0 = bitmap_count_granules (m->bm->bm);
  p->marks0 = __atomic_load_n (&m->bm->marks, __ATOMIC_RELAXED);
  p->cleared = 0;
  p->ran_dry = false;
  return p->idle ? PACE_SLICE_NS : 0;
}

/* One of the job's copiers: take the next dirty run (under the lock,
 * which is also what lets several clear bits), copy it, go on.
 */
static int
copier (struct job *job)
{
  struct mirror *m = mirror_of (job);
  uint64_t size = node_size (m->source);
  void *buf = malloc (m->chunk);
  int r = 0;

  if (buf == NULL)
    return -ENOMEM;
  while (!job_pause_point (job)) {
    uint64_t start, end, n, wait;
    unsigned slot;
    bool is_read, retry;

    pthread_mutex_lock (&m->lock);
    if (m->error) {
      pthread_mutex_unlock (&m->lock);
      break;
    }
    start = next_free_run (m, m->cursor, size, &end);
    if (start == UINT64_MAX && m->cursor > 0) {
      m->cursor = 0;            /* the rest is before where we were */
      start = next_free_run (m, 0, size, &end);
    }
    if (start != UINT64_MAX && (wait = pace (job, m)) > 0) {
      pthread_mutex_unlock (&m->lock);
      job_wait (job, wait);
      continue;
    }
    if (start == UINT64_MAX) {
      /* Caught up once nobody is copying either. */
      bool idle = m->in_flight == 0;
      m->pace.ran_dry = true;
      pthread_mutex_unlock (&m->lock);
      if (idle) {
        update_len (job);
        job_set_ready (job);
      }
      nanosleep (&(struct timespec) { .tv_nsec = idle ? 5000000 : 500000 },
                 NULL);
      continue;
    }
    n = end - start;
    bitmap_clear (m->bm->bm, start, n);
    m->pace.cleared += ROUND_UP (n, (uint64_t) m->granularity) /
      m->granularity;
    m->cursor = end;
    for (slot = 0; m->flight[slot].end != 0; ++slot)
      ;
    m->flight[slot].start = start;
    m->flight[slot].end = end;
    m->in_flight++;
    pthread_mutex_unlock (&m->lock);

    r = copy_through_roots (job, buf, n, start, &is_read);
    retry = r < 0 && job_error (job, is_read, r) != JOB_ERROR_REPORT;

    pthread_mutex_lock (&m->lock);
    m->in_flight--;
    m->flight[slot].start = m->flight[slot].end = 0;
    if (r < 0) {
      bitmap_set (m->bm->bm, start, n);
      if (!retry)
        m->error = r;
    }
    pthread_mutex_unlock (&m->lock);
    if (r < 0 && !retry)
      break;
    if (r < 0) {
      /* Copied again later (after a pause, for 'stop'). */
      r = 0;
      update_len (job);
      job_error_wait (job);
      continue;
    }
    job_rate_limit (job, n);
    update_len (job);
  }
  free (buf);
  return r;
}

static void *
copier_thread (void *arg)
{
  copier (arg);
  return NULL;
}

/* Several copies in flight: a remote target is far, each copy waits
 * for its round trip.  The job's thread is one copier; it starts the
 * others and waits for them.
 */
static int
mirror_run (struct job *job)
{
  struct mirror *m = mirror_of (job);
  pthread_t more[MIRROR_COPIERS - 1];
  unsigned started = 0;
  int r;

  pthread_mutex_lock (&m->lock);
  pace_reset (m);
  pthread_mutex_unlock (&m->lock);

  for (; started < MIRROR_COPIERS - 1; ++started)
    if (thread_create_quiet (&more[started], NULL, copier_thread, job) != 0)
      break;
  r = copier (job);
  for (unsigned i = 0; i < started; ++i)
    pthread_join (more[i], NULL);
  return r < 0 ? r : m->error;
}

/* Drained: the bitmap off the source, the edges gone. */
static void
let_go (struct job *job)
{
  struct mirror *m = mirror_of (job);

  hook_off (job);
  if (m->bm) {
    if (m->linked)
      dirty_bitmap_unlink (m->bm);
    m->linked = false;
    dirty_bitmap_free (m->bm);
    m->bm = NULL;
  }
  if (root_node (&job->root))
    root_detach (&job->root);
  if (root_node (&m->target_root))
    root_detach (&m->target_root);
  /* After the write edge into the base (see chain_release). */
  chain_release (&m->hold);
}

/* The thread ended by itself: an error, or a cancel.  The target keeps
 * what was copied; nothing moves.
 */
static int
mirror_finish (struct job *job, bool ok, struct error **errp)
{
  struct mirror *m = mirror_of (job);
  struct graph_drain *d = graph_drain_begin (&m->source, 1, errp);

  if (d == NULL)
    return -1;
  let_go (job);
  graph_drain_end (d);
  return ok ? 0 : -1;
}

static int
mirror_complete (struct job *job, const struct job_graph_ops *ops,
                 bool pivot, struct error **errp)
{
  struct mirror *m = mirror_of (job);
  struct node *nodes[] = { m->source, m->target };
  uint64_t size = node_size (m->source), off = 0;
  bool is_read = false;
  void *buf;
  int r = 0;

  /* On a failure the job fails (or goes on, as on-*-error says) and
   * leaves the graph as it was.
   */
  if (ops->drain (ops->ctx, nodes, 2, errp) == -1) {
    mirror_finish (job, false, NULL);
    return -1;
  }
  /* Drained: the bitmap holds still; what it still marks goes now. */
  if ((buf = malloc (m->chunk)) == NULL) {
    error_setg (errp, "out of memory");
    let_go (job);
    return -1;
  }
  while (r == 0 &&
         (off = bitmap_next_dirty (m->bm->bm, off, size)) != UINT64_MAX) {
    uint64_t end = bitmap_next_clean (m->bm->bm, off,
                                      MIN (size, off + m->chunk));
    if (end == UINT64_MAX)
      end = MIN (size, off + m->chunk);
    if ((r = copy (m->source, m->target, buf, end - off, off,
                   &is_read)) == 0) {
      bitmap_clear (m->bm->bm, off, end - off);
      atomic_fetch_add (&job->offset, end - off);
    }
    off = end;
  }
  free (buf);
  if (r == 0)
    r = node_flush (m->target);
  if (r < 0) {
    bool go_on = job_error (job, is_read, r) != JOB_ERROR_REPORT;

    error_setg (errp, "mirror '%s': the last copy %s '%s': %s%s",
                job->id, is_read ? "from" : "to",
                is_read ? m->source->name : m->target->name,
                strerror (-r), !go_on ? ""
                : is_read ? ": the job goes on (on-source-error)"
                : ": the job goes on (on-target-error)");
    if (go_on)
      return -2;                /* what is left is still marked */
    let_go (job);               /* the job fails: nothing moves */
    return -1;
  }
  atomic_store (&job->len, atomic_load (&job->offset));
  let_go (job);
  return pivot ? ops->replace (ops->ctx, m->source, m->target, errp) : 0;
}

static void
mirror_free (struct job *job)
{
  struct mirror *m = mirror_of (job);

  if (m == NULL)
    return;
  /* A finish that could not drain left the bitmap on the source and
   * the hook set, which writes under way may still reach: kept, not
   * freed, rather than freed under them.
   */
  if (m->linked || m->active) {
    nbdd_warn ("job '%s': its source '%s' could not be drained at the "
               "end: the job's state stays in memory", job->id,
               m->source->name);
    job->keep_memory = true;
    return;
  }
  if (m->bm)                    /* never started: never linked */
    dirty_bitmap_free (m->bm);
  if (root_node (&m->target_root))
    root_detach (&m->target_root);
  chain_release (&m->hold);
  chain_hold_free (&m->hold);
  root_destroy (&m->target_root);
  pthread_mutex_destroy (&m->lock);
  node_unref (m->source);
  node_unref (m->target);
  free (m);
}

static const struct job_driver mirror_driver = {
  .type = "mirror",
  .run = mirror_run,
  .finish = mirror_finish,
  .complete = mirror_complete,
  .free = mirror_free,
};

/* Mark what the first @layers layers of @n's chain hold: sync=top
 * copies what @n itself holds (1), an active commit what the layers
 * above the base hold.
 */
static int
mark_top (struct node *n, unsigned layers, struct bitmap *b,
          struct error **errp)
{
  uint64_t size = node_size (n), off = 0;

  while (off < size) {
    uint64_t pnum;
    unsigned depth;
    int r = node_allocation_depth (n, size - off, off, &pnum, &depth);
    if (r < 0) {
      error_setg_errno (errp, -r, "mirror: allocation of '%s'", n->name);
      return -1;
    }
    if (depth >= 1 && depth <= layers)
      bitmap_set (b, off, pnum);
    off += pnum;
  }
  return 0;
}

/* The job's edges: the guest goes on writing to the source; nobody
 * else may write to the target, and neither may change size.
 */
static int
attach_edges (struct job *job, const char *user, struct error **errp)
{
  struct mirror *m = mirror_of (job);

  m->target_root.kind = "job";
  m->target_root.owner_name = job->id;
  m->target_root.owner = job;
  if (root_attach (&job->root, m->source, PERM_CONSISTENT_READ,
                   PERM_ALL & ~PERM_RESIZE, user, errp) == -1 ||
      root_attach (&m->target_root, m->target, PERM_WRITE,
                   PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED, user,
                   errp) == -1)
    return -1;
  return 0;
}

/* The copy list: everything, or what the first @layers layers of the
 * source's chain hold (0: nothing), then every write (@active: through
 * the write hook).
 */
static int
start_bitmap (struct job *job, bool all, unsigned layers,
              uint32_t granularity, bool active, struct error **errp)
{
  struct mirror *m = mirror_of (job);
  struct graph_drain *d;
  char name[160];

  snprintf (name, sizeof name, "#mirror:%s", job->id);
  if ((m->bm = dirty_bitmap_create_internal (m->source, name, granularity,
                                             errp)) == NULL)
    return -1;
  m->granularity = granularity;
  if (all)
    bitmap_set_all (m->bm->bm);
  else if (layers > 0 && mark_top (m->source, layers, m->bm->bm,
                                   errp) == -1)
    return -1;
  /* From here every write to the source is marked too. */
  if ((d = graph_drain_begin (&m->source, 1, errp)) == NULL)
    return -1;
  if (active && hook_on (job, errp) == -1) {
    graph_drain_end (d);
    return -1;
  }
  dirty_bitmap_link (m->bm);
  m->linked = true;
  graph_drain_end (d);
  /* A write between the marking and the link, to a range the layers
   * did not hold, was marked by neither: mark again what they hold now
   * (the bitmap only gains bits).  Unable to, copy everything, which
   * is always right.
   */
  if (!all && layers > 0) {
    struct error *err = NULL;
    if (mark_top (m->source, layers, m->bm->bm, &err) == -1) {
      nbdd_warn ("%s '%s': %s: copying everything", job->drv->type,
                 job->id, err->msg);
      error_free (err);
      bitmap_set_all (m->bm->bm);
    }
  }
  atomic_store (&job->len, bitmap_count (m->bm->bm));
  return 0;
}

enum mirror_copy_mode
mirror_copy_mode (struct job *job)
{
  return mirror_of (job)->active ? MIRROR_COPY_WRITE_BLOCKING
    : MIRROR_COPY_BACKGROUND;
}

int
mirror_change_copy_mode (struct job *job, enum mirror_copy_mode mode,
                         struct error **errp)
{
  struct mirror *m = mirror_of (job);
  struct graph_drain *d;
  int r;

  if (job->drv != &mirror_driver) {
    error_setg (errp, "job '%s' is a %s job: only a mirror has a copy "
                "mode", job->id, job->drv->type);
    return -1;
  }
  /* Ended: let_go has taken the bitmap off the source. */
  if (job->status == JOB_CONCLUDED || job->status == JOB_ABORTING ||
      m->bm == NULL) {
    error_setg (errp, "job '%s' has ended: its copy mode cannot change",
                job->id);
    return -1;
  }
  if (m->active == (mode == MIRROR_COPY_WRITE_BLOCKING))
    return 0;
  /* Drained: no write is between its marks of the bitmap, or holds a
   * range, when the hook takes the bitmap over or gives it back.
   */
  if ((d = graph_drain_begin (&m->source, 1, errp)) == NULL)
    return -1;
  r = 0;
  if (mode == MIRROR_COPY_WRITE_BLOCKING)
    r = hook_on (job, errp);
  else
    hook_off (job);
  graph_drain_end (d);
  return r;
}

/* A job of @drv copying @source to @target, with no edges yet. */
static struct job *
mirror_new (const char *id, const struct job_driver *drv,
            struct node *source, struct node *target, uint64_t speed,
            uint32_t granularity, uint64_t buf_size, bool auto_dismiss,
            struct error **errp)
{
  struct mirror *m;
  struct job *job;

  if (buf_size == 0)
    buf_size = UINT64_C (1) << 20;
  if (buf_size < granularity || buf_size > MIRROR_CHUNK_MAX) {
    error_setg (errp, "%s: buf-size must be from the granularity "
                "(%" PRIu32 ") to %" PRIu64 " bytes", drv->type, granularity,
                MIRROR_CHUNK_MAX);
    return NULL;
  }
  m = calloc (1, sizeof *m);
  if (m == NULL) {
    error_setg (errp, "out of memory");
    return NULL;
  }
  root_init (&m->target_root);
  pthread_mutex_init (&m->lock, NULL);
  node_ref (source);
  node_ref (target);
  m->source = source;
  m->target = target;
  m->chunk = ROUND_DOWN (buf_size, (uint64_t) granularity);
  if ((job = job_new (id, drv, m, speed, auto_dismiss, errp)) == NULL) {
    root_destroy (&m->target_root);
    pthread_mutex_destroy (&m->lock);
    node_unref (source);
    node_unref (target);
    free (m);
    return NULL;
  }
  return job;
}

struct job *
mirror_create (const char *id, struct node *source, struct node *target,
               enum mirror_sync sync, enum mirror_copy_mode copy_mode,
               uint64_t speed, uint32_t granularity, uint64_t buf_size,
               bool auto_dismiss, struct error **errp)
{
  struct job *job;
  char user[160];

  if (source == target) {
    error_setg (errp, "mirror: the target must be another node than "
                "'%s'", source->name);
    return NULL;
  }
  if (node_size (target) != node_size (source)) {
    error_setg (errp, "mirror: target '%s' has %" PRIu64 " bytes, source "
                "'%s' %" PRIu64 ": they must be the same size",
                target->name, node_size (target), source->name,
                node_size (source));
    return NULL;
  }
  if (target->read_only) {
    error_setg (errp, "mirror: target '%s' is read-only", target->name);
    return NULL;
  }
  if ((job = mirror_new (id, &mirror_driver, source, target, speed,
                         granularity, buf_size, auto_dismiss,
                         errp)) == NULL)
    return NULL;
  snprintf (user, sizeof user, "job '%s'", id);
  if (attach_edges (job, user, errp) == -1 ||
      start_bitmap (job, sync == MIRROR_SYNC_FULL,
                    sync == MIRROR_SYNC_TOP ? 1 : 0, granularity,
                    copy_mode == MIRROR_COPY_WRITE_BLOCKING, errp) == -1) {
    job_discard (job);
    return NULL;
  }
  return job;
}

static const struct job_driver commit_active_driver = {
  .type = "commit",
  .run = mirror_run,
  .finish = mirror_finish,
  .complete = mirror_complete,
  .free = mirror_free,
};

struct job *
commit_active_create (const char *id, struct node *top, struct node *base,
                      uint64_t speed, bool auto_dismiss,
                      const struct job_graph_ops *ops, struct error **errp)
{
  unsigned depth = chain_depth (top, base);
  struct node_child *into_base = NULL;
  struct mirror *m;
  struct job *job;

  if (depth < 2) {
    error_setg (errp, "block-commit: base node '%s' is not below '%s' in "
                "its backing chain", base->name, top->name);
    return NULL;
  }
  if (node_size (base) != node_size (top)) {
    error_setg (errp, "block-commit: base node '%s' has %" PRIu64 " bytes, "
                "'%s' %" PRIu64 ": the users of the active layer move to "
                "the base, which must be the same size", base->name,
                node_size (base), top->name, node_size (top));
    return NULL;
  }
  if (job_id_check (id, errp) == -1 ||
      (base->read_only && ops->reopen_rw (ops->ctx, base, errp) == -1))
    return NULL;
  for (struct node *l = top; l != base; l = chain_next_edge (l)->node)
    into_base = chain_next_edge (l);
  if ((job = mirror_new (id, &commit_active_driver, top, base, speed,
                         COMMIT_GRANULARITY, 0, auto_dismiss,
                         errp)) == NULL)
    return NULL;
  m = mirror_of (job);
  /* The layers between hold still and the chain stays as it is (the
   * job's source edge included: the users of the top move only at
   * completion); the job writes the base under its backing edge.
   */
  if (chain_hold_init (&m->hold, id, errp) == -1 ||
      chain_hold_layers (&m->hold, chain_next_edge (top)->node, base, 0,
                         errp) == -1 ||
      chain_freeze_links (&m->hold, top, base, errp) == -1 ||
      chain_share_write (&m->hold, into_base, errp) == -1 ||
      attach_edges (job, m->hold.user, errp) == -1 ||
      chain_freeze (&m->hold, &job->root.edge, errp) == -1 ||
      start_bitmap (job, false, depth - 1, COMMIT_GRANULARITY, false,
                    errp) == -1) {
    job_discard (job);
    return NULL;
  }
  return job;
}
