/* The block-stream job (QEMU's block-stream): make the top of a
 * backing chain hold what the layers between it and a base hold, then
 * drop those layers from the chain: the top's backing node becomes the
 * base (or none), in the graph, in the image's header and in the
 * catalogue.
 *
 * The job reads each range the top does not hold through the top
 * (which reads the chain) and writes it into the top.  The guest goes
 * on writing to the top meanwhile, and a guest write must never be
 * overwritten by the older data the job read.  QEMU streams through a
 * copy-on-read filter whose writes are serialising requests; nbdd does
 * the same with a write guard (graph/io.c): for each range to copy,
 *
 *   1. outside the guard, the allocation depth says whether some layer
 *      above the base holds the range and the top does not (else it is
 *      skipped: most of a well-used top is);
 *   2. the guard is taken: guest writes to the range that are running
 *      finish first, new ones wait;
 *   3. under the guard, the depth is asked again, piece by piece: a
 *      guest write between 1 and 2 made the top hold that piece, which
 *      is then left alone; the other pieces are read through the top
 *      and written into it;
 *   4. the guard goes, and the waiting guest writes run, over what the
 *      job wrote.
 *
 * So a guest write either ran before step 3 (the job sees the top
 * holds it and skips it) or after step 4 (it overwrites the copy): the
 * copy never lands on top of it.  A guest write to a range the job is
 * not copying never waits.  What the job writes equals what the guest
 * reads there already (it is the chain's data), which is why the job
 * takes only 'write-unchanged' on the top.
 *
 * The layers being dropped (and the links of the chain) are held for
 * the job's whole run (chain.c): nobody else writes or resizes them,
 * and the chain cannot be rewired under it.  The end runs in a
 * transaction of the daemon's (prepare): drained, the top is flushed,
 * then its backing changes.  Cancelled or failed, the top keeps what
 * was copied (it is the chain's data: the guest sees no difference)
 * and the chain stays as it was.
 */
#include <config.h>

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>

#include "chain.h"
#include "job.h"
#include "log.h"
#include "stream.h"
#include "utils.h"

/* Bytes per step, as QEMU's STREAM_CHUNK: a guest write that meets the
 * guard waits for at most one such copy.
 */
#define STREAM_CHUNK (UINT64_C (512) << 10)

struct stream {
  struct node *top;             /* a reference */
  struct node *base;            /* a reference, or NULL: to the bottom */
  /* Ranges at depths 2..copy_depth are copied: held by a layer between
   * the top and the base.
   */
  unsigned copy_depth;
  char *backing_file;           /* what the header will name, or NULL */
  struct chain_hold hold;
  bool guards;                  /* node_guards_enable on the top */
};

static struct stream *
stream_of (struct job *job)
{
  return job->opaque;
}

static bool
wanted (const struct stream *s, unsigned depth)
{
  return depth >= 2 && depth <= s->copy_depth;
}

/* Steps 2 to 4 of the design comment for [off, off + n). */
static int
copy_guarded (struct stream *s, struct node *top, void *buf, uint64_t n,
              uint64_t off, bool *is_read)
{
  struct node_io_range g;
  uint64_t done = 0;
  int r = 0;

  node_guard_begin (top, off, n, &g);
  while (done < n && r == 0) {
    uint64_t pnum;
    unsigned depth;

    *is_read = true;
    if ((r = node_allocation_depth (top, n - done, off + done, &pnum,
                                    &depth)) < 0)
      break;
    if (wanted (s, depth)) {
      r = node_pread (top, buf, pnum, off + done, 0);
      *is_read = r < 0;         /* else a failure is the write's */
      /* Zeroes go in as zeroes the top holds (zero clusters): a hole
       * would show the base through once the layers are gone.
       */
      if (r == 0)
        r = is_zero (buf, pnum)
          ? node_zero (top, pnum, off + done, NODE_GUARDED)
          : node_pwrite (top, buf, pnum, off + done, NODE_GUARDED);
    }
    done += pnum;
  }
  node_guard_end (top, &g);
  return r;
}

static int
stream_run (struct job *job)
{
  struct stream *s = stream_of (job);
  uint64_t size = node_size (s->top), off = 0;
  void *buf = malloc (STREAM_CHUNK);
  int r = 0, ignored = 0;

  if (buf == NULL)
    return -ENOMEM;
  while (off < size && !job_pause_point (job)) {
    uint64_t pnum = 0;
    unsigned depth = 0;
    struct node *top = root_io_begin (&job->root);
    bool is_read = true;

    r = node_allocation_depth (top, MIN (STREAM_CHUNK, size - off), off,
                               &pnum, &depth);
    if (r == 0 && wanted (s, depth))
      r = copy_guarded (s, top, buf, pnum, off, &is_read);
    root_io_end (&job->root);
    if (r < 0) {
      /* As QEMU: stop copies the range again after the resume; ignore
       * skips it, and the job fails at the end, keeping the backing
       * chain it still needs.
       */
      enum job_error_action a = job_error (job, is_read, r);
      if (a == JOB_ERROR_STOP) {
        r = 0;
        job_error_wait (job);
        continue;
      }
      if (a == JOB_ERROR_REPORT)
        break;
      if (ignored == 0)
        ignored = r;
      r = 0;
      if (pnum == 0)            /* not even its extent is known */
        pnum = MIN (STREAM_CHUNK, size - off);
      atomic_fetch_add (&job->offset, pnum);
      off += pnum;
      continue;
    }
    if (wanted (s, depth))
      job_rate_limit (job, pnum);
    else
      atomic_fetch_add (&job->offset, pnum);
    off += pnum;
  }
  free (buf);
  return r < 0 ? r : ignored;
}

/* Drained, or never started: the guards off, every edge let go. */
static void
let_go (struct job *job)
{
  struct stream *s = stream_of (job);

  if (s->guards) {
    node_guards_disable (s->top);
    s->guards = false;
  }
  if (root_node (&job->root))
    root_detach (&job->root);
  chain_release (&s->hold);
}

static int
stream_prepare (struct job *job, const struct job_graph_ops *ops,
                struct error **errp)
{
  struct stream *s = stream_of (job);
  int r;

  if (ops->drain (ops->ctx, &s->top, 1, errp) == -1)
    return -1;
  /* What was copied is durable before the header stops naming the
   * layers it came from.
   */
  if ((r = node_flush (s->top)) < 0) {
    error_setg_errno (errp, -r, "stream '%s': flushing '%s'", job->id,
                      s->top->name);
    return -1;
  }
  let_go (job);
  return ops->set_backing (ops->ctx, s->top, s->base, s->backing_file,
                           errp);
}

static int
stream_finish (struct job *job, bool ok, struct error **errp)
{
  struct stream *s = stream_of (job);

  if (s->guards || root_node (&job->root) || chain_is_held (&s->hold)) {
    struct graph_drain *d = graph_drain_begin (&s->top, 1, errp);
    if (d == NULL)
      return -1;
    let_go (job);
    graph_drain_end (d);
  }
  return ok ? 0 : -1;
}

static void
stream_destroy (struct stream *s)
{
  /* Released already, unless the job failed to start (then its guards
   * were never enabled) or finish could not drain the top: then the
   * guards are left on it, since a write may still be listed there.
   */
  if (s->guards)
    nbdd_warn ("stream: node '%s' keeps its write guards (it could not "
               "be drained)", s->top->name);
  chain_release (&s->hold);
  chain_hold_free (&s->hold);
  node_unref (s->top);
  if (s->base)
    node_unref (s->base);
  free (s->backing_file);
  free (s);
}

static void
stream_free (struct job *job)
{
  if (job->opaque)
    stream_destroy (job->opaque);
}

static const struct job_driver stream_driver = {
  .type = "stream",
  .run = stream_run,
  .prepare = stream_prepare,
  .finish = stream_finish,
  .free = stream_free,
};

struct job *
stream_create (const char *id, struct node *top, struct node *base,
               const char *backing_file, uint64_t speed, bool auto_dismiss,
               const struct job_graph_ops *ops, struct error **errp)
{
  struct node_child *be = chain_backing_edge (top);
  struct stream *s;
  struct job *job;
  struct graph_drain *d;
  unsigned depth = base ? chain_depth (top, base) : UINT_MAX;

  if (top->drv->change_backing_file == NULL || top->drv->set_backing == NULL) {
    error_setg (errp, "block-stream: node '%s' (driver %s) cannot change "
                "its backing file: stream into a qcow2 node", top->name,
                top->drv->name);
    return NULL;
  }
  if (be == NULL) {
    error_setg (errp, "block-stream: node '%s' has no backing node: there "
                "is nothing to stream", top->name);
    return NULL;
  }
  if (base && depth < 2) {
    error_setg (errp, "block-stream: base node '%s' is not below '%s' in "
                "its backing chain", base->name, top->name);
    return NULL;
  }
  if (base == NULL && backing_file) {
    error_setg (errp, "block-stream: 'backing-file' needs 'base-node' "
                "(without a base, '%s' will have no backing file)",
                top->name);
    return NULL;
  }
  if (job_id_check (id, errp) == -1 ||
      (top->read_only && ops->reopen_rw (ops->ctx, top, errp) == -1))
    return NULL;
  s = calloc (1, sizeof *s);
  if (s == NULL) {
    error_setg (errp, "out of memory");
    return NULL;
  }
  if (base) {
    s->backing_file = backing_file ? strdup (backing_file)
      : chain_file_name (base, errp);
    if (s->backing_file == NULL) {
      if (backing_file)
        error_setg (errp, "out of memory");
      free (s);
      return NULL;
    }
  }
  if (chain_hold_init (&s->hold, id, errp) == -1) {
    free (s->backing_file);
    free (s);
    return NULL;
  }
  node_ref (top);
  s->top = top;
  if (base)
    node_ref (base);
  s->base = base;
  s->copy_depth = base ? depth - 1 : UINT_MAX;
  if ((job = job_new (id, &stream_driver, s, speed, auto_dismiss,
                      errp)) == NULL) {
    stream_destroy (s);
    return NULL;
  }
  /* The guest goes on writing to the top; the job writes there only
   * what reads the same already.  The layers to drop and the chain's
   * links stay as they are until the job ends.
   */
  if (root_attach (&job->root, top,
                   PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
                   PERM_ALL & ~PERM_RESIZE, s->hold.user, errp) == -1 ||
      chain_hold_layers (&s->hold, be->node, base, 0, errp) == -1 ||
      chain_freeze (&s->hold, &job->root.edge, errp) == -1 ||
      chain_freeze_links (&s->hold, top, base, errp) == -1)
    goto fail;
  /* From here every write to the top is listed for the guards. */
  if ((d = graph_drain_begin (&top, 1, errp)) == NULL)
    goto fail;
  if (node_guards_enable (top) < 0) {
    graph_drain_end (d);
    error_setg (errp, "out of memory");
    goto fail;
  }
  s->guards = true;
  graph_drain_end (d);
  atomic_store (&job->len, node_size (top));
  return job;

 fail:
  job_discard (job);
  return NULL;
}
