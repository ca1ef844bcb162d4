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
 * Today every export offers the same two contexts, so the table is
 * static; qemu:dirty-bitmap:NAME contexts, which depend on the export,
 * will come from a table the export builds when it is created (ids
 * from META_ID_DIRTY_BITMAP up, after the fixed ones).
 */
#include <config.h>

#include <stdint.h>
#include <string.h>

#include "internal.h"

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

static const struct meta_context fixed_contexts[] = {
  { .name = "base:allocation", .group_len = 5,
    .id = META_ID_BASE_ALLOCATION, .extents = base_allocation_extents },
  { .name = "qemu:allocation-depth", .group_len = 5,
    .id = META_ID_ALLOCATION_DEPTH, .extents = allocation_depth_extents },
};

const struct meta_context *
meta_contexts (const struct export *exp, size_t *nr)
{
  *nr = sizeof fixed_contexts / sizeof fixed_contexts[0];
  return fixed_contexts;
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
