/* A node's dirty bitmaps, and the hook that records writes in them.
 *
 * Every write, write-zeroes and discard on a node passes node_pwrite,
 * node_zero or node_discard (graph/io.c), which mark the node's enabled
 * bitmaps before the request goes to the driver: a bit is set before
 * the data it stands for can reach the disk, and a failed request
 * leaves at most a bit too many, never one too few.  No driver or
 * filter can write around it.
 *
 * The list of a node's bitmaps changes only while the node is drained
 * (no request inside), so the hook reads it without a lock; a bitmap's
 * bits are set with atomics (bitmaps/bitmap.c), and 'enabled' is read
 * and written atomically.
 */
#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "graph.h"

#define MAX_BITMAP_NAME 1023    /* QEMU's limit (qcow2 stores it) */

void
dirty_mark (struct node *node, uint64_t offset, uint64_t count)
{
  for (struct dirty_bitmap *d = node->dirty; d; d = d->next)
    if (__atomic_load_n (&d->enabled, __ATOMIC_RELAXED))
      bitmap_set (d->bm, offset, count);
}

struct dirty_bitmap *
dirty_bitmap_find (const struct node *node, const char *name)
{
  for (struct dirty_bitmap *d = node->dirty; d; d = d->next)
    if (strcmp (d->name, name) == 0)
      return d;
  return NULL;
}

struct dirty_bitmap *
dirty_bitmap_create (struct node *node, const char *name,
                     uint32_t granularity, bool persistent, bool enabled,
                     struct error **errp)
{
  struct dirty_bitmap *d;

  if (name[0] == '\0' || strlen (name) > MAX_BITMAP_NAME) {
    error_setg (errp, "bitmap names are 1 to %d bytes", MAX_BITMAP_NAME);
    return NULL;
  }
  if (dirty_bitmap_find (node, name)) {
    error_setg (errp, "node '%s' already has a bitmap '%.80s'", node->name,
                name);
    return NULL;
  }
  if (granularity < 512 || granularity > (UINT32_C (1) << 31) ||
      (granularity & (granularity - 1))) {
    error_setg (errp, "granularity must be a power of 2 from 512 bytes "
                "to 2 GiB, not %" PRIu32, granularity);
    return NULL;
  }
  d = calloc (1, sizeof *d);
  if (d == NULL || (d->name = strdup (name)) == NULL ||
      (d->bm = bitmap_new (node_size (node), granularity)) == NULL) {
    if (d)
      free (d->name);
    free (d);
    error_setg (errp, "out of memory for bitmap '%.80s'", name);
    return NULL;
  }
  d->node = node;
  d->persistent = persistent;
  d->enabled = enabled;
  return d;
}

void
dirty_bitmap_link (struct dirty_bitmap *d)
{
  struct dirty_bitmap **pp = (struct dirty_bitmap **) &d->node->dirty;

  /* At the end: query-named-block-nodes lists them in creation order. */
  while (*pp)
    pp = &(*pp)->next;
  d->next = NULL;
  *pp = d;
}

void
dirty_bitmap_unlink (struct dirty_bitmap *d)
{
  struct dirty_bitmap **pp = (struct dirty_bitmap **) &d->node->dirty;

  while (*pp && *pp != d)
    pp = &(*pp)->next;
  if (*pp)
    *pp = d->next;
  d->next = NULL;
}

void
dirty_bitmap_free (struct dirty_bitmap *d)
{
  if (d == NULL)
    return;
  bitmap_free (d->bm);
  free (d->name);
  free (d);
}

void
dirty_bitmaps_free_all (struct node *node)
{
  struct dirty_bitmap *d = node->dirty, *next;

  for (; d; d = next) {
    next = d->next;
    dirty_bitmap_free (d);
  }
  node->dirty = NULL;
}

int
dirty_bitmaps_resize (struct node *node, uint64_t size)
{
  for (struct dirty_bitmap *d = node->dirty; d; d = d->next)
    if (bitmap_resize (d->bm, size) == -1)
      return -ENOMEM;
  return 0;
}
