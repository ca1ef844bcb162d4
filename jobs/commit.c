/* The block-commit job for a layer that is not the active one (QEMU's
 * commit_start): copy what the top and the layers down to the base
 * hold into the base, then drop them from the chain: the node above
 * the top (the overlay) gets the base as its backing node, in the
 * graph, in its image's header and in the catalogue.  (The active
 * layer is committed by a mirror: mirror.c, commit_active_create.)
 *
 * Nobody writes to the layers being committed while the job runs
 * (chain.c holds them: the guest writes to the overlay or above), so
 * what the job reads from them holds still.  The job writes into the
 * base only ranges some layer above it holds: the chain never reads
 * the base there, so readers through the overlay see no change, which
 * is why the backing edge into the base may share 'write' with the job
 * (chain_share_write) while nobody else may write the base or resize
 * it.  Ranges a layer holds as zeroes are zeroed in the base, which may
 * hold data there.
 *
 * The end runs in a transaction of the daemon's (prepare): drained,
 * the base is flushed, then the overlay's backing moves to it.
 * Cancelled or failed, the base keeps what was copied (hidden under
 * the layers, which stay) and the chain is as it was.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>

#include "chain.h"
#include "commit.h"
#include "job.h"
#include "log.h"
#include "utils.h"

#define COMMIT_CHUNK (UINT64_C (512) << 10)

struct commit {
  struct node *overlay, *top, *base;  /* references */
  unsigned copy_depth;          /* depths 1..copy_depth are copied */
  char *backing_file;           /* what the overlay's header will name */
  struct chain_hold hold;       /* the top's root reads */
};

static struct commit *
commit_of (struct job *job)
{
  return job->opaque;
}

/* One root at a time (never two nested, which a drain of both could
 * deadlock): what is read holds still, since nobody writes the layers.
 */
static int
copy_range (struct job *job, void *buf, uint64_t n, uint64_t off,
            bool *is_read)
{
  struct commit *c = commit_of (job);
  struct node_root *from = chain_first_root (&c->hold);
  struct node *n_from = root_io_begin (from), *to;
  int r = node_pread (n_from, buf, n, off, 0);

  root_io_end (from);
  *is_read = r < 0;
  if (r < 0)
    return r;
  to = root_io_begin (&job->root);
  r = is_zero (buf, n) ? node_zero (to, n, off, 0)
    : node_pwrite (to, buf, n, off, 0);
  root_io_end (&job->root);
  return r;
}

static int
commit_run (struct job *job)
{
  struct commit *c = commit_of (job);
  struct node_root *from = chain_first_root (&c->hold);
  uint64_t size = node_size (c->top), off = 0;
  void *buf = malloc (COMMIT_CHUNK);
  int r = 0;

  if (buf == NULL)
    return -ENOMEM;
  while (off < size && !job_pause_point (job)) {
    uint64_t pnum;
    unsigned depth;
    struct node *top = root_io_begin (from);
    bool copy, is_read = true;

    r = node_allocation_depth (top, MIN (COMMIT_CHUNK, size - off), off,
                               &pnum, &depth);
    root_io_end (from);
    copy = depth >= 1 && depth <= c->copy_depth;
    if (r == 0 && copy)
      r = copy_range (job, buf, pnum, off, &is_read);
    if (r < 0 && job_error (job, is_read, r) != JOB_ERROR_REPORT) {
      r = 0;                    /* on-error: this range again, as QEMU */
      job_error_wait (job);
      continue;
    }
    if (r < 0)
      break;
    if (copy)
      job_rate_limit (job, pnum);
    else
      atomic_fetch_add (&job->offset, pnum);
    off += pnum;
  }
  free (buf);
  return r;
}

static void
let_go (struct job *job)
{
  struct commit *c = commit_of (job);

  /* The write edge into the base first: the base's backing edge stops
   * sharing 'write' in chain_release.
   */
  if (root_node (&job->root))
    root_detach (&job->root);
  chain_release (&c->hold);
}

static int
commit_prepare (struct job *job, const struct job_graph_ops *ops,
                struct error **errp)
{
  struct commit *c = commit_of (job);
  struct node *nodes[] = { c->overlay, c->base };
  int r;

  if (ops->drain (ops->ctx, nodes, 2, errp) == -1)
    return -1;
  /* The base holds the data durably before the overlay's header names
   * it instead of the layers that held it.
   */
  if ((r = node_flush (c->base)) < 0) {
    error_setg_errno (errp, -r, "commit '%s': flushing '%s'", job->id,
                      c->base->name);
    return -1;
  }
  let_go (job);
  return ops->set_backing (ops->ctx, c->overlay, c->base, c->backing_file,
                           errp);
}

static int
commit_finish (struct job *job, bool ok, struct error **errp)
{
  struct commit *c = commit_of (job);

  if (root_node (&job->root) || chain_is_held (&c->hold)) {
    struct graph_drain *d = graph_drain_begin (&c->overlay, 1, errp);
    if (d == NULL)
      return -1;
    let_go (job);
    graph_drain_end (d);
  }
  return ok ? 0 : -1;
}

static void
commit_destroy (struct commit *c)
{
  chain_release (&c->hold);
  chain_hold_free (&c->hold);
  node_unref (c->overlay);
  node_unref (c->top);
  node_unref (c->base);
  free (c->backing_file);
  free (c);
}

static void
commit_free (struct job *job)
{
  if (job->opaque)
    commit_destroy (job->opaque);
}

static const struct job_driver commit_driver = {
  .type = "commit",
  .run = commit_run,
  .prepare = commit_prepare,
  .finish = commit_finish,
  .free = commit_free,
};

struct job *
commit_create (const char *id, struct node *overlay, struct node *top,
               struct node *base, const char *backing_file, uint64_t speed,
               bool auto_dismiss, const struct job_graph_ops *ops,
               struct error **errp)
{
  struct node_child *oe = chain_backing_edge (overlay), *into_base = NULL;
  unsigned depth = chain_depth (top, base);
  struct commit *c;
  struct job *job;

  if (overlay->drv->change_backing_file == NULL) {
    error_setg (errp, "block-commit: the header of node '%s' (driver %s), "
                "right above '%s', cannot name the new backing file",
                overlay->name, overlay->drv->name, top->name);
    return NULL;
  }
  if (oe == NULL || oe->node != top) {
    error_setg (errp, "block-commit: node '%s' is not the overlay of '%s'",
                overlay->name, top->name);
    return NULL;
  }
  if (depth < 2) {
    error_setg (errp, "block-commit: base node '%s' is not below '%s' in "
                "its backing chain", base->name, top->name);
    return NULL;
  }
  if (node_size (base) < node_size (top)) {
    error_setg (errp, "block-commit: base node '%s' (%" PRIu64 " bytes) is "
                "smaller than '%s' (%" PRIu64 " bytes)", base->name,
                node_size (base), top->name, node_size (top));
    return NULL;
  }
  if (job_id_check (id, errp) == -1 ||
      (base->read_only && ops->reopen_rw (ops->ctx, base, errp) == -1) ||
      (overlay->read_only && ops->reopen_rw (ops->ctx, overlay, errp) == -1))
    return NULL;
  for (struct node *l = top; l != base; l = chain_next_edge (l)->node)
    into_base = chain_next_edge (l);
  c = calloc (1, sizeof *c);
  if (c == NULL) {
    error_setg (errp, "out of memory");
    return NULL;
  }
  c->backing_file = backing_file ? strdup (backing_file)
    : chain_file_name (base, errp);
  if (c->backing_file == NULL) {
    if (backing_file)
      error_setg (errp, "out of memory");
    free (c);
    return NULL;
  }
  if (chain_hold_init (&c->hold, id, errp) == -1) {
    free (c->backing_file);
    free (c);
    return NULL;
  }
  node_ref (overlay);
  node_ref (top);
  node_ref (base);
  c->overlay = overlay;
  c->top = top;
  c->base = base;
  c->copy_depth = depth - 1;
  if ((job = job_new (id, &commit_driver, c, speed, auto_dismiss,
                      errp)) == NULL) {
    commit_destroy (c);
    return NULL;
  }
  /* The layers hold still (the top is read), the chain's links from
   * the overlay down to the base stay, and the job alone writes the
   * base, under the backing edge that shadows what it writes.
   */
  if (chain_hold_layers (&c->hold, top, base, PERM_CONSISTENT_READ,
                         errp) == -1 ||
      chain_freeze (&c->hold, oe, errp) == -1 ||
      chain_freeze_links (&c->hold, top, base, errp) == -1 ||
      chain_share_write (&c->hold, into_base, errp) == -1 ||
      root_attach (&job->root, base, PERM_WRITE,
                   PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
                   c->hold.user, errp) == -1)
    goto fail;
  atomic_store (&job->len, node_size (top));
  return job;

 fail:
  job_discard (job);
  return NULL;
}
