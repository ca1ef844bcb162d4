/* Pass-through driver functions for filter nodes (see filter.c): a
 * filter whose state struct starts with its filtered child's edge
 * (struct node_child *file) may put these in its driver table.
 */
#ifndef NBDD_FILTER_H
#define NBDD_FILTER_H

#include "driver.h"

int filter_pread (struct node *node, void *buf, uint32_t count,
                  uint64_t offset, unsigned flags);
int filter_pread_nowait (struct node *node, void *buf, uint32_t count,
                         uint64_t offset);
int filter_read_splice (struct node *node, int pipe_fd, size_t pipe_size,
                        uint32_t count, uint64_t offset);
int filter_flush (struct node *node);
int filter_cache (struct node *node, uint64_t count, uint64_t offset);
int filter_block_status (struct node *node, uint64_t count, uint64_t offset,
                         struct extent_list *el);
int filter_allocation_depth (struct node *node, uint64_t count,
                             uint64_t offset, uint64_t *pnum,
                             unsigned *depth);

#endif /* NBDD_FILTER_H */
