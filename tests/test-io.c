/* Unit tests for graph/io.c, the request path: bounds, splitting at
 * max_transfer, read-modify-write for unaligned requests, emulated
 * zeroing, block status and write hooks.  The node under test is a
 * memory-backed driver that checks every request it receives is
 * aligned and within its limits, so a fault in the request path fails
 * loudly here.
 */
#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#undef NDEBUG
#include <assert.h>

#include "graph.h"
#include "utils.h"

#define MEM_SIZE (1 << 20)
#define ALIGN 512
#define MAX_XFER 65536

struct mem {
  unsigned char data[MEM_SIZE];
  unsigned requests;
  unsigned fua_writes;          /* pwrite calls that carried FUA */
  unsigned flushes;
};

static int
mem_open (struct node *node, struct json_object *opts, struct error **errp)
{
  node->size = MEM_SIZE;
  node->can_flush = true;
  return 0;
}

static void
mem_limits (struct node *node, struct node_limits *l)
{
  l->request_alignment = ALIGN;
  l->max_transfer = MAX_XFER;
}

static void
check (struct node *node, const void *buf, uint64_t count, uint64_t offset)
{
  struct mem *m = node->opaque;

  assert (IS_ALIGNED (offset, ALIGN));
  assert (IS_ALIGNED (count, ALIGN));
  assert (buf == NULL || IS_ALIGNED ((uintptr_t) buf, ALIGN));
  assert (count <= MAX_XFER || buf == NULL);
  assert (offset + count <= MEM_SIZE);
  m->requests++;
}

static int
mem_pread (struct node *node, void *buf, uint32_t count, uint64_t offset,
           unsigned flags)
{
  struct mem *m = node->opaque;

  check (node, buf, count, offset);
  memcpy (buf, m->data + offset, count);
  return 0;
}

static int
mem_pwrite (struct node *node, const void *buf, uint32_t count,
            uint64_t offset, unsigned flags)
{
  struct mem *m = node->opaque;

  check (node, buf, count, offset);
  memcpy (m->data + offset, buf, count);
  if (flags & NODE_FUA)
    m->fua_writes++;
  return 0;
}

static int
mem_flush (struct node *node)
{
  struct mem *m = node->opaque;

  m->flushes++;
  return 0;
}

static int
mem_block_status (struct node *node, uint64_t count, uint64_t offset,
                  struct extent_list *el)
{
  struct mem *m = node->opaque;

  /* One extent per 64K: zero blocks are holes. */
  while (count > 0) {
    uint64_t n = MIN (count, 65536 - offset % 65536);
    int r = extents_add (el, n, is_zero (m->data + offset, n)
                         ? EXTENT_HOLE | EXTENT_ZERO : 0);
    if (r)
      return r < 0 ? r : 0;
    count -= n;
    offset += n;
  }
  return 0;
}

static const struct node_driver mem_driver = {
  .name = "test-mem",
  .instance_size = sizeof (struct mem),
  .open = mem_open,
  .refresh_limits = mem_limits,
  .pread = mem_pread,
  .pwrite = mem_pwrite,
  .block_status = mem_block_status,
  .flush = mem_flush,
  /* no .zero: the core must emulate it by writing */
};

static void
test_rmw (struct node *node)
{
  struct mem *m = node->opaque;
  unsigned char buf[3000], out[3000];

  for (size_t i = 0; i < sizeof buf; ++i)
    buf[i] = i * 7 + 1;
  memset (m->data, 0xee, 8192);
  /* Unaligned offset, length and buffer. */
  assert (node_pwrite (node, buf + 1, 1000, 700, 0) == 0);
  assert (memcmp (m->data + 700, buf + 1, 1000) == 0);
  assert (m->data[699] == 0xee && m->data[1700] == 0xee);
  assert (node_pread (node, out + 3, 1000, 700, 0) == 0);
  assert (memcmp (out + 3, buf + 1, 1000) == 0);
  /* Within one block. */
  assert (node_pwrite (node, "xy", 2, 5000, 0) == 0);
  assert (memcmp (m->data + 5000, "xy", 2) == 0);
  assert (m->data[4999] == 0xee && m->data[5002] == 0xee);
}

static void
test_split (struct node *node)
{
  struct mem *m = node->opaque;
  void *big;
  unsigned before = m->requests;

  assert (posix_memalign (&big, 4096, 4 * MAX_XFER) == 0);
  memset (big, 0x5a, 4 * MAX_XFER);
  assert (node_pwrite (node, big, 4 * MAX_XFER, 65536, 0) == 0);
  assert (m->requests - before == 4);
  assert (m->data[65536] == 0x5a && m->data[5 * 65536 - 1] == 0x5a);
  free (big);
}

static void
test_bounds (struct node *node)
{
  char buf[512];

  assert (node_pread (node, buf, 512, MEM_SIZE, 0) == -EINVAL);
  assert (node_pread (node, buf, 1, MEM_SIZE, 0) == -EINVAL);
  assert (node_pread (node, buf, 0, MEM_SIZE, 0) == 0);
  assert (node_pwrite (node, buf, 512, UINT64_MAX - 100, 0) == -ENOSPC);
  assert (node_zero (node, 2, MEM_SIZE - 1, 0) == -ENOSPC);
  assert (node_pread (node, buf, 512, MEM_SIZE - 512, 0) == 0);
}

static void
test_zero (struct node *node)
{
  struct mem *m = node->opaque;
  struct extent_list el;

  memset (m->data, 0x11, MEM_SIZE);
  /* No native zero: FAST_ZERO must refuse, plain zero must work. */
  assert (node_zero (node, 100000, 1000, NODE_FAST_ZERO) == -ENOTSUP);
  assert (m->data[1000] == 0x11);
  assert (node_zero (node, 200000, 1000, NODE_MAY_TRIM) == 0);
  assert (m->data[999] == 0x11 && m->data[1000] == 0);
  assert (m->data[200999] == 0 && m->data[201000] == 0x11);
  assert (is_zero (m->data + 1000, 200000));

  /* Block status: 64K..192K is now all zero. */
  extents_init (&el, 0, 100);
  assert (node_block_status (node, MEM_SIZE, &el) == 0);
  assert (el.len == 3);
  assert (el.v[0].length == 65536 && el.v[0].flags == 0);
  assert (el.v[1].length == 131072 && el.v[1].flags == 3);
  assert (el.end == MEM_SIZE);
  extents_free (&el);

  extents_init (&el, 100, 1);
  assert (node_block_status (node, 1000, &el) == 0);
  assert (el.len == 1 && el.v[0].length == 1000);
  extents_free (&el);
}

/* FUA covers the whole request: one driver call may carry it, but a
 * request split into pieces must end with a flush instead (a driver's
 * FUA may cover only its own range).
 */
static void
test_fua (struct node *node)
{
  struct mem *m = node->opaque;
  void *big;

  assert (posix_memalign (&big, 4096, 4 * MAX_XFER) == 0);
  memset (big, 1, 4 * MAX_XFER);

  m->fua_writes = m->flushes = 0;
  assert (node_pwrite (node, big, 4096, 0, NODE_FUA) == 0);
  assert (m->fua_writes == 1 && m->flushes == 0);

  m->fua_writes = m->flushes = 0;
  assert (node_pwrite (node, big, 4 * MAX_XFER, 0, NODE_FUA) == 0);
  assert (m->fua_writes == 0 && m->flushes == 1);

  /* Emulated zeroes (several pieces) and unaligned zeroes (RMW ends). */
  m->fua_writes = m->flushes = 0;
  assert (node_zero (node, 3 * MAX_XFER, 0, NODE_FUA) == 0);
  assert (m->fua_writes == 0 && m->flushes == 1);
  m->fua_writes = m->flushes = 0;
  assert (node_zero (node, 200, 100, NODE_FUA) == 0);
  assert (m->fua_writes == 0 && m->flushes == 1);
  free (big);
}

/* The write hook: called once around each write and zero (an emulated
 * zero too, whose pieces are written inside it), with the data, before
 * the driver sees the request and after, with its result.
 */
struct hook_log {
  struct node *node;
  unsigned before, after;
  enum node_write_kind kind;
  uint64_t offset, count;
  bool saw_old_data, saw_new_data;
  int ret;
};

static void
log_before (void *opaque, struct node_write *w)
{
  struct hook_log *l = opaque;
  struct mem *m = l->node->opaque;

  l->before++;
  l->kind = w->kind;
  l->offset = w->offset;
  l->count = w->count;
  w->hooked = true;
  l->saw_old_data = w->kind != NODE_WRITE_DATA ||
    memcmp (m->data + w->offset, w->buf, w->count) != 0;
}

static void
log_after (void *opaque, struct node_write *w, int ret)
{
  struct hook_log *l = opaque;
  struct mem *m = l->node->opaque;

  assert (w->hooked);
  l->after++;
  l->ret = ret;
  l->saw_new_data = w->kind != NODE_WRITE_DATA ||
    memcmp (m->data + w->offset, w->buf, w->count) == 0;
}

static void
test_write_hook (struct node *node)
{
  struct mem *m = node->opaque;
  struct hook_log l = { .node = node };
  const struct node_write_hook h = { log_before, log_after, &l };
  const struct node_write_hook other = { log_before, log_after, NULL };
  char buf[3000];

  memset (m->data, 0, 8192);
  memset (buf, 0x77, sizeof buf);
  assert (node_write_hook_set (node, &h) == 0);
  assert (node_write_hook_set (node, &other) == -EBUSY);

  assert (node_pwrite (node, buf, 3000, 100, 0) == 0);
  assert (l.before == 1 && l.after == 1 && l.ret == 0);
  assert (l.kind == NODE_WRITE_DATA && l.offset == 100 && l.count == 3000);
  assert (l.saw_old_data && l.saw_new_data);

  /* Emulated by writing zeroes: one call, of the whole request. */
  assert (node_zero (node, 3 * MAX_XFER, 4096, 0) == 0);
  assert (l.before == 2 && l.after == 2);
  assert (l.kind == NODE_WRITE_ZERO && l.offset == 4096 &&
          l.count == 3 * MAX_XFER);

  /* Refused at the edge: the hook never hears of it.  No discard in
   * the driver: nothing changes, nothing to tell.
   */
  assert (node_pwrite (node, buf, 512, MEM_SIZE, 0) == -ENOSPC);
  assert (node_discard (node, 65536, 0, 0) == 0);
  assert (l.before == 2 && l.after == 2);

  node_write_hook_clear (node, &other);         /* not its hook */
  assert (node_pwrite (node, buf, 512, 0, 0) == 0);
  assert (l.before == 3);
  node_write_hook_clear (node, &h);
  assert (node_pwrite (node, buf, 512, 0, 0) == 0);
  assert (l.before == 3 && l.after == 3);
}

int
main (void)
{
  struct error *err = NULL;
  struct json_object *spec = json_object_new_object ();
  struct node *node = node_new (&mem_driver, "mem0", spec, &err);

  assert (node != NULL);
  assert (node->limits.request_alignment == ALIGN);
  test_rmw (node);
  test_split (node);
  test_bounds (node);
  test_zero (node);
  test_fua (node);
  test_write_hook (node);
  node_unref (node);
  json_object_put (spec);
  printf ("test-io: ok\n");
  return EXIT_SUCCESS;
}
