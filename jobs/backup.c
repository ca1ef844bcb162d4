/* The backup job (QEMU's blockdev-backup): push a point-in-time copy of
 * a live node to a target node, all of it (sync=full) or the clusters a
 * bitmap marks (incremental, bitmap) -- the push counterpart of a
 * fleece.
 *
 * A copy-before-write filter (graph/cbw.c) goes above the source with
 * the backup target as its target, so a guest write first saves the old
 * data of its clusters there; the job's thread saves every other
 * cluster of the copy set the same way.  Each cluster is copied once,
 * by whichever comes first.  When the thread is done the target holds
 * the source as it was at the start; the filter leaves the graph and
 * the bitmap's fork ends (frozen bits dropped on success, merged back
 * on failure, as its mode says).
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backup.h"
#include "bitmap.h"
#include "cbw.h"
#include "job.h"
#include "log.h"
#include "utils.h"

#define BACKUP_CHUNK (UINT64_C (1) << 20)

struct backup {
  struct node *source, *target, *cbw;   /* references */
  struct dirty_bitmap *bm;      /* forked: its frozen bits are the set */
  enum backup_bitmap_mode mode;
  void (*unforked) (struct dirty_bitmap *d, bool success, const char *job);
};

static struct backup *
backup_of (struct job *job)
{
  return job->opaque;
}

static int
backup_run (struct job *job)
{
  struct backup *b = backup_of (job);
  uint64_t size = node_size (b->source), off = 0;
  const char *why;

  for (;;) {
    uint64_t end, n;

    if (job_pause_point (job))
      return 0;
    if (b->bm) {
      off = bitmap_next_dirty (b->bm->bm, off, size);
      if (off == UINT64_MAX)
        break;
      end = bitmap_next_clean (b->bm->bm, off, MIN (size,
                                                    off + BACKUP_CHUNK));
      if (end == UINT64_MAX)
        end = MIN (size, off + BACKUP_CHUNK);
    }
    else {
      if (off >= size)
        break;
      end = MIN (size, off + BACKUP_CHUNK);
    }
    n = end - off;
    if (!cbw_all_done (b->cbw, off, n)) {
      root_io_begin (&job->root);
      cbw_copy (b->cbw, off, n);
      root_io_end (&job->root);
    }
    if ((why = cbw_broken_reason (b->cbw)) != NULL) {
      nbdd_warn ("backup '%s': %s", job->id, why);
      return -EIO;
    }
    job_rate_limit (job, n);
    off = end;
  }
  /* What guest writes saved is on the target too: flush it all. */
  {
    int r = node_flush (b->target);
    if (r < 0)
      return r;
  }
  return 0;
}

/* The filter out of the graph, its users back on the source; the
 * bitmap's fork ended.
 */
static int
backup_finish (struct job *job, bool ok, struct error **errp)
{
  struct backup *b = backup_of (job);
  struct node *nodes[] = { b->source, b->cbw };
  struct graph_drain *d = graph_drain_begin (nodes, 2, errp);
  struct node_child **moved = NULL;
  size_t nr_moved = 0;
  int r = 0;

  if (d == NULL)
    return -1;
  cbw_stop (b->cbw);
  if (root_node (&job->root))
    root_detach (&job->root);
  cbw_set_detaching (b->cbw, true);
  if (graph_replace_node (b->cbw, b->source, NULL, &moved, &nr_moved,
                          errp) == -1)
    r = -1;
  free (moved);
  if (b->bm && b->bm->successor) {
    bool success = b->mode == BACKUP_BITMAP_ALWAYS ||
      (ok && b->mode == BACKUP_BITMAP_ON_SUCCESS);
    dirty_bitmap_unfork (b->bm, success);
    dirty_bitmap_rebase (b->bm);
    if (b->unforked)
      b->unforked (b->bm, success, job->id);
  }
  graph_drain_end (d);
  return ok && r == 0 ? 0 : -1;
}

static void
backup_free (struct job *job)
{
  struct backup *b = backup_of (job);

  if (b == NULL)
    return;
  if (b->cbw)
    node_unref (b->cbw);        /* unregistered: ours alone */
  node_unref (b->source);
  node_unref (b->target);
  free (b);
}

static const struct job_driver backup_driver = {
  .type = "backup",
  .run = backup_run,
  .finish = backup_finish,
  .free = backup_free,
};

struct job *
backup_create (const char *id, struct node *source, struct node *target,
               struct dirty_bitmap *bm, enum backup_bitmap_mode mode,
               uint64_t speed, bool auto_dismiss,
               void (*unforked) (struct dirty_bitmap *, bool, const char *),
               struct node **cbwp, struct error **errp)
{
  struct json_object *spec;
  struct backup *b;
  struct job *job;
  char user[160];

  if (source == target) {
    error_setg (errp, "backup: the target must be another node than '%s'",
                source->name);
    return NULL;
  }
  if (node_size (target) < node_size (source)) {
    error_setg (errp, "backup: target '%s' (%" PRIu64 " bytes) is smaller "
                "than '%s' (%" PRIu64 " bytes)", target->name,
                node_size (target), source->name, node_size (source));
    return NULL;
  }
  b = calloc (1, sizeof *b);
  if (b == NULL) {
    error_setg (errp, "out of memory");
    return NULL;
  }
  node_ref (source);
  node_ref (target);
  b->source = source;
  b->target = target;
  b->bm = bm;
  b->mode = mode;
  b->unforked = unforked;
  spec = json_object_new_object ();
  json_object_object_add (spec, "driver",
                          json_object_new_string ("copy-before-write"));
  json_object_object_add (spec, "file", json_object_new_string (source->name));
  json_object_object_add (spec, "target",
                          json_object_new_string (target->name));
  snprintf (user, sizeof user, "#backup:%s", id);   /* named for messages */
  b->cbw = node_new (&cbw_driver, user, spec, errp);
  json_object_put (spec);
  if (b->cbw == NULL ||
      (job = job_new (id, &backup_driver, b, speed, auto_dismiss,
                      errp)) == NULL) {
    if (b->cbw)
      node_unref (b->cbw);
    node_unref (source);
    node_unref (target);
    free (b);
    return NULL;
  }
  /* Sharing everything until the source's users are on it (the
   * caller's part): the job's edge must not keep them off the source.
   */
  cbw_set_detaching (b->cbw, true);
  if (bm)
    cbw_copy_only (b->cbw, (const struct bitmap *[]) { bm->bm }, 1, false);
  atomic_store (&job->len, bm ? bitmap_count (bm->bm) : node_size (source));
  snprintf (user, sizeof user, "job '%s'", id);
  if (root_attach (&job->root, b->cbw, PERM_CONSISTENT_READ, PERM_ALL,
                   user, errp) == -1) {
    job_discard (job);
    return NULL;
  }
  *cbwp = b->cbw;
  return job;
}
