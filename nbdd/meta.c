/* Meta contexts: what NBD_CMD_BLOCK_STATUS can describe.
 *
 * An export offers a small table of contexts, in ascending id order.
 * NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT match their
 * queries against that table (meta_query), and a connection keeps what
 * its SET selected as a bitmask over the table's positions, so a
 * BLOCK_STATUS reply walks the table once and sends one chunk per
 * selected context, in id order.
 *
 * Query syntax, as qemu-nbd's (docs/interop/nbd.rst): a full context
 * name selects that context for LIST and SET; for LIST only, a
 * namespace ("base:", "qemu:") or a context's group (such as
 * "qemu:dirty-bitmap:") lists every context in it.  Unknown names and
 * namespaces are ignored, never an error.
 *
 * Every export offers the two fixed contexts; an export with bitmaps
 * builds its own table when it is created, with one
 * qemu:dirty-bitmap:NAME per bitmap (ids from META_ID_DIRTY_BITMAP
 * up, after the fixed ones).  The table never changes afterwards.
 */
#include <config.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "internal.h"

#define BITMAP_GROUP "qemu:dirty-bitmap:"

/* base:allocation: the node's holes and zeroes. */
static int
base_allocation_extents (const struct meta_context *mc, struct node *node,
                         uint64_t count, struct extent_list *el)
{
  return node_block_status (node, count, el);
}

/* qemu:allocation-depth: which layer of the backing chain holds each
 * range (0 none, 1 the node itself, 2 its backing, ...), as QEMU's
 * bdrv_is_allocated_above.
 */
static int
allocation_depth_extents (const struct meta_context *mc, struct node *node,
                          uint64_t count, struct extent_list *el)
{
  uint64_t offset = el->end, end = el->end + count;

  while (offset < end) {
    uint64_t pnum;
    unsigned depth;
    int r = node_allocation_depth (node, end - offset, offset, &pnum,
                                   &depth);

    if (r < 0)
      return r;
    r = extents_add (el, pnum, depth);
    if (r < 0)
      return r;
    if (r == 1)
      break;                    /* the list is full */
    offset += pnum;
  }
  return 0;
}

/* qemu:dirty-bitmap:NAME: dirty (1) or clean (0), a granule at a
 * time, as qemu-nbd sends it.  Bits set while this runs may or may not
 * be seen; they are for the next backup either way.
 */
static int
dirty_bitmap_extents (const struct meta_context *mc, struct node *node,
                      uint64_t count, struct extent_list *el)
{
  const struct dirty_bitmap *d = mc->opaque;
  uint64_t offset = el->end, end = el->end + count;
  uint64_t size = bitmap_size (d->bm);

  /* A bitmap shorter than the node (a backing node's) is clean past
   * its end.
   */
  while (offset < end) {
    uint64_t next;
    bool dirty = offset < size && bitmap_get (d->bm, offset);
    int r;

    if (offset >= size)
      next = end;
    else {
      next = dirty ? bitmap_next_clean (d->bm, offset, MIN (end, size))
        : bitmap_next_dirty (d->bm, offset, MIN (end, size));
      if (next == UINT64_MAX)
        next = MIN (end, size);
    }
    r = extents_add (el, next - offset, dirty ? 1 : 0);
    if (r < 0)
      return r;
    if (r == 1)
      break;
    offset = next;
  }
  return 0;
}

static const struct meta_context fixed_contexts[] = {
  { .name = "base:allocation", .group_len = 5,
    .id = META_ID_BASE_ALLOCATION, .extents = base_allocation_extents },
  { .name = "qemu:allocation-depth", .group_len = 5,
    .id = META_ID_ALLOCATION_DEPTH, .extents = allocation_depth_extents },
};

#define NR_FIXED (sizeof fixed_contexts / sizeof fixed_contexts[0])

const struct meta_context *
meta_contexts (const struct export *exp, size_t *nr)
{
  if (exp && exp->contexts) {
    *nr = exp->nr_contexts;
    return exp->contexts;
  }
  *nr = NR_FIXED;
  return fixed_contexts;
}

int
meta_export_init (struct export *exp, struct error **errp)
{
  struct meta_context *mc;
  size_t n = NR_FIXED + exp->nr_bitmaps;

  if (exp->nr_bitmaps == 0)
    return 0;
  if (n > MAX_META_CONTEXTS) {
    error_setg (errp, "export: at most %zu bitmaps",
                MAX_META_CONTEXTS - NR_FIXED);
    return -1;
  }
  mc = calloc (n, sizeof *mc);
  if (mc == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  memcpy (mc, fixed_contexts, sizeof fixed_contexts);
  for (size_t i = 0; i < exp->nr_bitmaps; ++i) {
    struct meta_context *m = &mc[NR_FIXED + i];
    char *name;

    if (asprintf (&name, BITMAP_GROUP "%s", exp->bitmaps[i]->name) == -1) {
      exp->contexts = mc;
      exp->nr_contexts = NR_FIXED + i;
      meta_export_free (exp);
      error_setg (errp, "out of memory");
      return -1;
    }
    m->name = name;
    m->group_len = strlen (BITMAP_GROUP);
    m->id = META_ID_DIRTY_BITMAP + i;
    m->extents = dirty_bitmap_extents;
    m->opaque = exp->bitmaps[i];
  }
  exp->contexts = mc;
  exp->nr_contexts = n;
  return 0;
}

void
meta_export_free (struct export *exp)
{
  for (size_t i = NR_FIXED; i < exp->nr_contexts; ++i)
    free ((char *) exp->contexts[i].name);
  free (exp->contexts);
  exp->contexts = NULL;
  exp->nr_contexts = 0;
}

uint64_t
meta_all (const struct export *exp)
{
  size_t nr;

  meta_contexts (exp, &nr);
  return nr == MAX_META_CONTEXTS ? UINT64_MAX : (UINT64_C (1) << nr) - 1;
}

/* The length of @name's namespace including its ':', or 0. */
static size_t
namespace_len (const char *name)
{
  const char *colon = strchr (name, ':');

  return colon ? (size_t) (colon - name) + 1 : 0;
}

uint64_t
meta_query (const struct export *exp, const char *q, size_t len, bool list)
{
  size_t nr;
  const struct meta_context *mc = meta_contexts (exp, &nr);
  uint64_t sel = 0;

  for (size_t i = 0; i < nr; ++i) {
    const char *name = mc[i].name;
    bool match = strlen (name) == len && memcmp (name, q, len) == 0;

    /* LIST "ns:" or "ns:group:" is everything in it; SET takes only
     * full names (the spec leaves a SET wildcard to the server, and
     * qemu selects nothing for one).
     */
    if (!match && list && len > 0 && q[len - 1] == ':' &&
        strncmp (name, q, len) == 0)
      match = len == namespace_len (name) || len == mc[i].group_len;
    if (match)
      sel |= UINT64_C (1) << i;
  }
  return sel;
}
