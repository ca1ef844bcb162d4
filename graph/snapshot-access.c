/* The 'snapshot-access' node: the point-in-time view kept by a
 * copy-before-write filter (its "file"), as QEMU's
 * block/snapshot-access.c.  Reads give the data as it was; a discard
 * tells the filter a range is done with (backed up), which frees what
 * it saved there and stops it saving more.  Writes are refused: the
 * node is exported writable only so that clients may send TRIM.
 */
#include <config.h>

#include <errno.h>

#include "cbw.h"
#include "options.h"

struct snapshot_state {
  struct node_child *file;      /* the copy-before-write filter */
};

bool
snapshot_access_is (const struct node *node)
{
  return node->drv == &snapshot_access_driver;
}

static const char *const snapshot_keys[] = {
  "driver", "node-name", "file", NULL
};

static int
snapshot_open (struct node *node, struct json_object *opts,
               struct error **errp)
{
  struct snapshot_state *s = node->opaque;

  if (opt_check_keys (opts, "snapshot-access", snapshot_keys, errp) == -1)
    return -1;
  s->file = node_open_child (node, opts, "file", CHILD_DATA | CHILD_PRIMARY,
                             errp);
  if (s->file == NULL)
    return -1;
  if (!cbw_is (s->file->node)) {
    error_setg (errp, "snapshot-access: '%s' is not a copy-before-write "
                "node", s->file->node->name);
    return -1;
  }
  node->size = s->file->node->size;
  node->read_only = false;
  node->can_trim = true;
  node->has_block_status = true;
  return 0;
}

static void
snapshot_refresh_limits (struct node *node, struct node_limits *limits)
{
  limits->request_alignment = 1;
  limits->max_transfer = 0;
  limits->opt_transfer = 0;
}

static int
snapshot_pread (struct node *node, void *buf, uint32_t count,
                uint64_t offset, unsigned flags)
{
  struct snapshot_state *s = node->opaque;

  return cbw_snapshot_read (s->file->node, buf, count, offset);
}

static int
snapshot_pwrite (struct node *node, const void *buf, uint32_t count,
                 uint64_t offset, unsigned flags)
{
  return -EPERM;
}

static int
snapshot_zero (struct node *node, uint64_t count, uint64_t offset,
               unsigned flags)
{
  return -EPERM;
}

static int
snapshot_discard (struct node *node, uint64_t count, uint64_t offset,
                  unsigned flags)
{
  struct snapshot_state *s = node->opaque;

  return cbw_snapshot_discard (s->file->node, count, offset);
}

/* Nothing is written, so nothing waits to be flushed. */
static int
snapshot_flush (struct node *node)
{
  return 0;
}

static int
snapshot_block_status (struct node *node, uint64_t count, uint64_t offset,
                       struct extent_list *el)
{
  struct snapshot_state *s = node->opaque;

  return cbw_snapshot_block_status (s->file->node, count, offset, el);
}

/* It reads, and lets the filter's other users do anything. */
static void
snapshot_child_perm (struct node *node, const struct node_child *c,
                     unsigned perm, unsigned shared,
                     unsigned *child_perm, unsigned *child_shared)
{
  *child_perm = PERM_CONSISTENT_READ;
  *child_shared = PERM_ALL;
}

const struct node_driver snapshot_access_driver = {
  .name             = "snapshot-access",
  .instance_size    = sizeof (struct snapshot_state),
  .open             = snapshot_open,
  .refresh_limits   = snapshot_refresh_limits,
  .pread            = snapshot_pread,
  .pwrite           = snapshot_pwrite,
  .zero             = snapshot_zero,
  .discard          = snapshot_discard,
  .flush            = snapshot_flush,
  .block_status     = snapshot_block_status,
  .child_perm       = snapshot_child_perm,
};
