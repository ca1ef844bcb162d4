/* What a filter node passes through unchanged to the node it filters
 * (copy-before-write's reads, throttle's flush and status): one set of
 * functions for every filter driver's table, instead of a copy each.
 *
 * The convention that makes them shared: a filter's state (node->opaque)
 * starts with the edge to its filtered child.
 */
#include <config.h>

#include "filter.h"

static struct node *
filtered (const struct node *node)
{
  const struct node_child *const *file = node->opaque;

  return (*file)->node;
}

int
filter_pread (struct node *node, void *buf, uint32_t count, uint64_t offset,
              unsigned flags)
{
  return node_pread (filtered (node), buf, count, offset, flags);
}

int
filter_pread_nowait (struct node *node, void *buf, uint32_t count,
                     uint64_t offset)
{
  return node_pread_nowait (filtered (node), buf, count, offset);
}

int
filter_read_splice (struct node *node, int pipe_fd, size_t pipe_size,
                    uint32_t count, uint64_t offset)
{
  return node_read_splice (filtered (node), pipe_fd, pipe_size, count,
                           offset);
}

int
filter_flush (struct node *node)
{
  return node_flush (filtered (node));
}

int
filter_cache (struct node *node, uint64_t count, uint64_t offset)
{
  return node_cache (filtered (node), count, offset);
}

int
filter_block_status (struct node *node, uint64_t count, uint64_t offset,
                     struct extent_list *el)
{
  return node_block_status (filtered (node), count, el);
}

int
filter_allocation_depth (struct node *node, uint64_t count, uint64_t offset,
                         uint64_t *pnum, unsigned *depth)
{
  return node_allocation_depth (filtered (node), count, offset, pnum, depth);
}
