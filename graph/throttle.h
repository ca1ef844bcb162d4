/* The 'throttle' filter driver and its groups: I/O limits in QEMU's
 * terms (throttle groups, ThrottleLimits, block_set_io_throttle).
 *
 * A throttle node passes every request through to its 'file' child,
 * delaying reads, writes, write-zeroes and discards so that the group
 * it belongs to stays within its limits.  Node options:
 *   "file"            the child (a node-name or an inline spec)
 *   "throttle-group"  the group's name; absent: a private group named
 *                     after the node
 *   "limits"          optional, ThrottleLimits names ("iops-total",
 *                     "bps-read-max", ...): a new group gets them; an
 *                     existing group must already have exactly them
 *   "read-only"       as for raw
 * Nodes naming the same group share its budget.  A group lives while a
 * node uses it; throttle_group_set_limits can also create one ahead of
 * its nodes (restart from the catalogue).
 *
 * Everything here is control path: main thread only.
 */
#ifndef NBDD_THROTTLE_H
#define NBDD_THROTTLE_H

#include <stdbool.h>

#include <json-c/json.h>

#include "driver.h"
#include "error.h"

extern const struct node_driver throttle_driver;   /* name "throttle" */

/* block-set-io-throttle: replace the limits of group @group with those
 * in @args, named as QEMU's command names them (bps, bps_rd, bps_wr,
 * iops, iops_rd, iops_wr, the same with _max and _max_length, and
 * iops_size).  Absent names are 0 (no limit), as in QEMU; other keys
 * are the caller's and ignored.  Validated as QEMU does, all or
 * nothing: on error the old limits stay.  The group must exist.  The
 * new limits apply at once, also to requests already waiting.
 * 0, or -1 with errp set.
 */
int throttle_group_set (const char *group, struct json_object *args,
                        struct error **errp);
/* Set limits from QEMU ThrottleLimits names ("iops-total",
 * "iops-total-max", "iops-total-max-length", "iops-read", ...,
 * "bps-write-max-length", "iops-size"), creating the group if absent.
 * As QEMU's throttle-group 'limits' property, names not in @limits
 * keep their value; unknown names are an error.  0, or -1 with errp.
 */
int throttle_group_set_limits (const char *group,
                               struct json_object *limits,
                               struct error **errp);
/* The group's limits as a new ThrottleLimits object with every name
 * (caller puts it), or NULL if there is no such group.
 */
struct json_object *throttle_group_limits (const char *group);
/* The group of a throttle node, or NULL if @node is not one.
 * Borrowed: valid while the node is open.
 */
const char *throttle_node_group (const struct node *node);
bool throttle_group_exists (const char *group);

#endif /* NBDD_THROTTLE_H */
