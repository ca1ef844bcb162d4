/* The 'raw' format driver: the guest sees its child's bytes, or the
 * window [offset, offset + size) of them.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>

#include "driver.h"
#include "options.h"
#include "utils.h"

struct raw_state {
  struct node_child *file;      /* an edge in node->children */
  uint64_t offset;
  bool window;                  /* offset or size given: a fixed window */
};

static const char *const raw_keys[] = {
  "driver", "node-name", "file", "offset", "size", "read-only",
  "auto-read-only", "cache.direct", "cache.no-flush", "discard",
  "detect-zeroes", NULL
};

static int
raw_open (struct node *node, struct json_object *opts, struct error **errp)
{
  struct raw_state *s = node->opaque;
  uint64_t offset = 0, size = 0, end;
  bool ro = false;
  int has_size;

  if (opt_check_keys (opts, "raw", raw_keys, errp) == -1 ||
      opt_get_size (opts, "raw", "offset", false, &offset, errp) == -1 ||
      (has_size = opt_get_size (opts, "raw", "size", false, &size,
                                errp)) == -1 ||
      opt_get_bool (opts, "raw", "read-only", false, &ro, errp) == -1)
    return -1;

  s->file = node_open_child (node, opts, "file",
                             CHILD_DATA | CHILD_FILTERED | CHILD_PRIMARY,
                             errp);
  if (s->file == NULL)
    return -1;

  if (offset > s->file->node->size) {
    error_setg (errp, "raw: offset %" PRIu64 " is past the end of '%s' "
                "(%" PRIu64 " bytes)", offset, s->file->node->name,
                s->file->node->size);
    return -1;
  }
  if (has_size == 1)
    size = s->file->node->size - offset;
  if (ADD_OVERFLOW (offset, size, &end) || end > s->file->node->size) {
    error_setg (errp, "raw: offset %" PRIu64 " + size %" PRIu64
                " is past the end of '%s' (%" PRIu64 " bytes)",
                offset, size, s->file->node->name, s->file->node->size);
    return -1;
  }

  s->offset = offset;
  s->window = offset > 0 || has_size == 0;
  node->size = size;
  node->read_only = ro || s->file->node->read_only;
  node->can_flush = s->file->node->can_flush;
  node->can_trim = s->file->node->can_trim;
  node->can_zero = s->file->node->can_zero;
  node->can_fast_zero = s->file->node->can_fast_zero;
  node->can_cache = s->file->node->can_cache;
  node->is_rotational = s->file->node->is_rotational;
  node->has_block_status = s->file->node->has_block_status;
  return 0;
}

/* The whole file: resize it.  A window of it stays as it was told. */
static int
raw_truncate (struct node *node, uint64_t size)
{
  struct raw_state *s = node->opaque;
  int r;

  if (s->window)
    return -ENOTSUP;
  if (node->read_only)
    return -EROFS;
  r = node_truncate (s->file->node, size);
  if (r == 0)
    __atomic_store_n (&node->size, node_size (s->file->node),
                      __ATOMIC_RELEASE);
  return r;
}

static int
raw_reopen_rw (struct node *node, struct error **errp)
{
  struct raw_state *s = node->opaque;

  return node_reopen_rw (s->file->node, errp);
}

static void
raw_refresh_limits (struct node *node, struct node_limits *limits)
{
  struct raw_state *s = node->opaque;

  /* The child aligns for itself, under its own lock: read-modify-write
   * must happen in the node that needs it, or a write through another
   * parent of the same child could be lost in between.
   */
  limits->request_alignment = 1;
  limits->max_transfer = 0;
  limits->opt_transfer = s->file->node->limits.opt_transfer;
}

static int
raw_pread (struct node *node, void *buf, uint32_t count, uint64_t offset,
           unsigned flags)
{
  struct raw_state *s = node->opaque;

  return node_pread (s->file->node, buf, count, s->offset + offset, flags);
}

static int
raw_pread_nowait (struct node *node, void *buf, uint32_t count,
                  uint64_t offset)
{
  struct raw_state *s = node->opaque;

  return node_pread_nowait (s->file->node, buf, count, s->offset + offset);
}

static int
raw_read_splice (struct node *node, int pipe_fd, size_t pipe_size,
                 uint32_t count, uint64_t offset)
{
  struct raw_state *s = node->opaque;

  return node_read_splice (s->file->node, pipe_fd, pipe_size, count,
                           s->offset + offset);
}

static int
raw_pwrite (struct node *node, const void *buf, uint32_t count,
            uint64_t offset, unsigned flags)
{
  struct raw_state *s = node->opaque;

  return node_pwrite (s->file->node, buf, count, s->offset + offset, flags);
}

static int
raw_zero (struct node *node, uint64_t count, uint64_t offset,
          unsigned flags)
{
  struct raw_state *s = node->opaque;

  return node_zero (s->file->node, count, s->offset + offset, flags);
}

static int
raw_discard (struct node *node, uint64_t count, uint64_t offset,
             unsigned flags)
{
  struct raw_state *s = node->opaque;

  return node_discard (s->file->node, count, s->offset + offset, flags);
}

static int
raw_flush (struct node *node)
{
  struct raw_state *s = node->opaque;

  return node_flush (s->file->node);
}

static int
raw_cache (struct node *node, uint64_t count, uint64_t offset)
{
  struct raw_state *s = node->opaque;

  return node_cache (s->file->node, count, s->offset + offset);
}

static int
raw_block_status (struct node *node, uint64_t count, uint64_t offset,
                  struct extent_list *el)
{
  struct raw_state *s = node->opaque;
  int r;

  /* Extents are lengths, so the list only needs its origin shifted
   * into the child's coordinates and back.
   */
  el->offset += s->offset;
  el->end += s->offset;
  r = node_block_status (s->file->node, count, el);
  el->offset -= s->offset;
  el->end -= s->offset;
  return r;
}

const struct node_driver raw_driver = {
  .name           = "raw",
  .instance_size  = sizeof (struct raw_state),
  .is_filter      = true,
  .open           = raw_open,
  .refresh_limits = raw_refresh_limits,
  .pread          = raw_pread,
  .pwrite         = raw_pwrite,
  .pread_nowait   = raw_pread_nowait,
  .read_splice    = raw_read_splice,
  .zero           = raw_zero,
  .discard        = raw_discard,
  .flush          = raw_flush,
  .cache          = raw_cache,
  .block_status   = raw_block_status,
  .truncate       = raw_truncate,
  .reopen_rw      = raw_reopen_rw,
};
