/* The 'copy-before-write' filter and the 'snapshot-access' node: a
 * point-in-time view of a live node (QEMU's fleecing pair).
 */
#ifndef NBDD_CBW_H
#define NBDD_CBW_H

#include <stdbool.h>
#include <stdint.h>

#include "driver.h"

/* "copy-before-write": options "file" (the live node, filtered),
 * "target" (where old data goes: a node of the same size), optional
 * "scratch-limit" (bytes of target it may fill; 0: no limit).
 */
extern const struct node_driver cbw_driver;
/* "snapshot-access": option "file", a copy-before-write node.  Reads
 * give the data as it was when the filter was opened; discard means
 * "done with this range".  Writes fail with EPERM.
 */
extern const struct node_driver snapshot_access_driver;

/* Callbacks of a filter's owner (the daemon's fleece), any thread.
 * consumed: a discard on the snapshot gave up whole clusters
 * [offset, offset + count).  broken: the snapshot broke (its reads
 * fail from now on), once, with why.
 */
struct cbw_hooks {
  void (*consumed) (void *opaque, uint64_t offset, uint64_t count);
  void (*broken) (void *opaque, const char *reason);
  void *opaque;
};

/* Main thread, on a copy-before-write node. */
void cbw_set_hooks (struct node *cbw, const struct cbw_hooks *hooks);
/* Its users are about to move back to the node it filters (it stops
 * keeping others from writing there), or not after all.
 */
void cbw_set_detaching (struct node *cbw, bool detaching);
/* Break the snapshot on purpose (its owner is ending it): reads fail,
 * writes stop copying.  No 'broken' hook call.
 */
void cbw_stop (struct node *cbw);
/* Bytes of target holding saved data, and whether (and why) the
 * snapshot broke; the reason stays valid while the node is open.
 */
uint64_t cbw_scratch_bytes (struct node *cbw);
const char *cbw_broken_reason (struct node *cbw);
bool cbw_is (const struct node *node);
bool snapshot_access_is (const struct node *node);

/* Before any I/O: only the clusters @sets mark (bitmaps of the node's
 * size) are to be saved, the others never; if @rest_unreadable, the
 * snapshot reads fail there too (as if discarded), since the live
 * node no longer holds the point in time: a fleece for an incremental
 * backup.
 * For a backup job, then any thread: save what of [offset, offset +
 * count) is not yet (as a write there would); and whether all of it is.
 * cbw_copy_only: 0, or -ENOMEM.
 */
struct bitmap;
int cbw_copy_only (struct node *cbw, const struct bitmap *const *sets,
                   size_t nr_sets, bool rest_unreadable);
void cbw_copy (struct node *cbw, uint64_t offset, uint64_t count);
bool cbw_all_done (struct node *cbw, uint64_t offset, uint64_t count);

/* For snapshot-access: the snapshot's data, its discard and status. */
int cbw_snapshot_read (struct node *cbw, void *buf, uint32_t count,
                       uint64_t offset);
int cbw_snapshot_discard (struct node *cbw, uint64_t count,
                          uint64_t offset);
int cbw_snapshot_block_status (struct node *cbw, uint64_t count,
                               uint64_t offset, struct extent_list *el);

#endif /* NBDD_CBW_H */
