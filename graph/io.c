/* The request path.  Every I/O on a node, from an export or from a
 * parent driver, passes through here, so drivers only ever see
 * requests that are in bounds, aligned to their request_alignment and
 * no longer than their max_transfer.
 *
 * Unaligned requests on nodes that need alignment (O_DIRECT files) are
 * served by read-modify-write through an aligned bounce buffer.  An
 * RMW write must not interleave with another write to the same blocks,
 * so on such nodes RMW takes node->rmw_lock exclusively and every
 * aligned write takes it shared.  Nodes with alignment 1 (the common
 * case) never touch the lock.  Unaligned writes are rare (old clients,
 * partial sectors), so serialising them is an acceptable cost.
 *
 * Write guards: a job that checks a range, reads it and writes it back
 * (block-stream copies into the top only what the top does not hold
 * yet) must not let a guest write to that range slip in between, or it
 * would overwrite the guest's data with older data.  While such a job
 * runs, its node has a 'struct node_guards': every write, zero and
 * discard on the node is listed there while it runs, and a guard on a
 * range waits until the writes that overlap it have left, while new
 * ones wait until it is released (QEMU's serialising requests, with a
 * lock and a list: a job's node, one guard at a time).  A guard that
 * waits holds new writes back already, so that a stream of guest
 * writes cannot starve it.  Nodes without guards (all others) pay one
 * pointer load per write.
 *
 * Write hooks: a job may need each write to a node as it happens, data
 * included (an active mirror writes it to its target before the guest
 * hears back).  Its hook is called by node_pwrite, node_zero and
 * node_discard, the entry points every write passes once, around the
 * rest of the request: emulations inside one (a zero written as
 * zeroes) do not call it again.  Like the guards, the hook is set and
 * cleared only while the node is drained, so the request path reads
 * the pointer without a lock, and nodes without one pay that load.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>

#include "graph.h"
#include "utils.h"

/* Drivers take uint32_t counts: split at this when max_transfer is 0. */
#define DEFAULT_MAX_TRANSFER (UINT32_C (1) << 30)

/* Zeroes for emulated write-zeroes, allocated once, never written. */
#define ZERO_BUF_SIZE (UINT32_C (1) << 20)
static void *zero_buf;
static pthread_once_t zero_buf_once = PTHREAD_ONCE_INIT;

static void
zero_buf_alloc (void)
{
  if (posix_memalign (&zero_buf, 4096, ZERO_BUF_SIZE) == 0)
    memset (zero_buf, 0, ZERO_BUF_SIZE);
  else
    zero_buf = NULL;
}

/* See the design comment at the top.  Writes are on 'writes' while
 * they run; guards, held or waiting, on 'guards'.  The ranges live on
 * the stacks of the threads that own them.
 */
struct node_guards {
  pthread_mutex_t lock;         /* the lists */
  pthread_cond_t cond;          /* a write or a guard left */
  unsigned users;               /* node_guards_enable calls */
  struct node_io_range *writes;
  struct node_io_range *guards;
};

static bool
overlaps_any (const struct node_io_range *list, uint64_t start,
              uint64_t end)
{
  for (; list; list = list->next)
    if (list->start < end && start < list->end)
      return true;
  return false;
}

static void
range_unlink (struct node_io_range **list, struct node_io_range *r)
{
  for (; *list; list = &(*list)->next)
    if (*list == r) {
      *list = r->next;
      return;
    }
  assert (!"range not listed");
}

int
node_guards_enable (struct node *node)
{
  struct node_guards *g = node->guards;

  if (g == NULL) {
    g = calloc (1, sizeof *g);
    if (g == NULL)
      return -ENOMEM;
    pthread_mutex_init (&g->lock, NULL);
    pthread_cond_init (&g->cond, NULL);
    __atomic_store_n ((struct node_guards **) &node->guards, g,
                      __ATOMIC_RELEASE);
  }
  g->users++;
  return 0;
}

void
node_guards_disable (struct node *node)
{
  struct node_guards *g = node->guards;

  assert (g && g->users > 0);
  if (--g->users > 0)
    return;
  /* Drained: nothing is listed. */
  assert (g->writes == NULL && g->guards == NULL);
  __atomic_store_n ((struct node_guards **) &node->guards, NULL,
                    __ATOMIC_RELEASE);
  pthread_cond_destroy (&g->cond);
  pthread_mutex_destroy (&g->lock);
  free (g);
}

void
node_guard_begin (struct node *node, uint64_t offset, uint64_t count,
                  struct node_io_range *r)
{
  struct node_guards *g = __atomic_load_n ((struct node_guards **)
                                           &node->guards, __ATOMIC_ACQUIRE);

  assert (g);
  r->start = offset;
  r->end = offset + count;
  pthread_mutex_lock (&g->lock);
  r->next = g->guards;
  g->guards = r;
  while (overlaps_any (g->writes, r->start, r->end))
    pthread_cond_wait (&g->cond, &g->lock);
  pthread_mutex_unlock (&g->lock);
}

void
node_guard_end (struct node *node, struct node_io_range *r)
{
  struct node_guards *g = __atomic_load_n ((struct node_guards **)
                                           &node->guards, __ATOMIC_ACQUIRE);

  pthread_mutex_lock (&g->lock);
  range_unlink (&g->guards, r);
  pthread_cond_broadcast (&g->cond);
  pthread_mutex_unlock (&g->lock);
}

/* A write to [offset, offset + count) begins: on a node with guards,
 * wait for those on the range and list it.  Returns the guards to pass
 * to write_end (NULL: nothing to do).  NODE_GUARDED: the caller holds
 * the range already (its own guard, or an outer write being emulated).
 */
static struct node_guards *
write_begin (struct node *node, uint64_t offset, uint64_t count,
             unsigned flags, struct node_io_range *w)
{
  struct node_guards *g = __atomic_load_n ((struct node_guards **)
                                           &node->guards, __ATOMIC_ACQUIRE);

  if (g == NULL || (flags & NODE_GUARDED))
    return NULL;
  w->start = offset;
  w->end = offset + count;
  pthread_mutex_lock (&g->lock);
  while (overlaps_any (g->guards, w->start, w->end))
    pthread_cond_wait (&g->cond, &g->lock);
  w->next = g->writes;
  g->writes = w;
  pthread_mutex_unlock (&g->lock);
  return g;
}

static void
write_end (struct node_guards *g, struct node_io_range *w)
{
  if (g == NULL)
    return;
  pthread_mutex_lock (&g->lock);
  range_unlink (&g->writes, w);
  pthread_cond_broadcast (&g->cond);
  pthread_mutex_unlock (&g->lock);
}

int
node_write_hook_set (struct node *node, const struct node_write_hook *h)
{
  if (node->write_hook != NULL)
    return -EBUSY;
  __atomic_store_n (&node->write_hook, (void *) h, __ATOMIC_RELEASE);
  return 0;
}

void
node_write_hook_clear (struct node *node, const struct node_write_hook *h)
{
  if (node->write_hook == h)
    __atomic_store_n (&node->write_hook, NULL, __ATOMIC_RELEASE);
}

/* A write of @kind begins: tell the node's hook, if any.  Returns the
 * hook to pass to hook_after (NULL: nothing to do).
 */
static const struct node_write_hook *
hook_before (struct node *node, enum node_write_kind kind, const void *buf,
             uint64_t count, uint64_t offset, unsigned flags,
             struct node_write *w)
{
  const struct node_write_hook *h = __atomic_load_n
    ((const struct node_write_hook **) &node->write_hook, __ATOMIC_ACQUIRE);

  if (h == NULL)
    return NULL;
  w->kind = kind;
  w->offset = offset;
  w->count = count;
  w->buf = buf;
  w->flags = flags;
  h->before (h->opaque, w);
  return h;
}

static void
hook_after (const struct node_write_hook *h, struct node_write *w, int r)
{
  if (h)
    h->after (h->opaque, w, r);
}

static int
check_range (const struct node *node, uint64_t count, uint64_t offset)
{
  uint64_t size = node_size (node);

  if (offset > size || count > size - offset)
    return -EINVAL;
  return 0;
}

/* A write of [offset, offset + count): on a growable node it may go
 * past the end (which it then moves), elsewhere it must fit.
 */
static int
check_write_range (const struct node *node, uint64_t count, uint64_t offset)
{
  uint64_t end;

  if (!node->growable)
    return check_range (node, count, offset);
  if (ADD_OVERFLOW (offset, count, &end) || end > (UINT64_C (1) << 62))
    return -EINVAL;
  return 0;
}

/* After a successful write to a growable node: its end moves to @end
 * if that is further.
 */
static void
grown_to (struct node *node, uint64_t end)
{
  uint64_t size = node_size (node);

  while (node->growable && end > size &&
         !__atomic_compare_exchange_n (&node->size, &size, end, true,
                                       __ATOMIC_RELEASE, __ATOMIC_ACQUIRE))
    ;
}

static uint32_t
max_chunk (const struct node *node)
{
  uint32_t m = node->limits.max_transfer;

  if (m == 0)
    m = ROUND_DOWN (DEFAULT_MAX_TRANSFER, node->limits.request_alignment);
  return m;
}

static bool
needs_bounce (const struct node *node, const void *buf, uint64_t count,
              uint64_t offset)
{
  uint32_t align = node->limits.request_alignment;

  return align > 1 &&
    (!IS_ALIGNED (offset, align) || !IS_ALIGNED (count, align) ||
     !IS_ALIGNED ((uintptr_t) buf, align));
}

/* Aligned, in-range: split at max_transfer. */
static int
pread_aligned (struct node *node, void *buf, uint64_t count,
               uint64_t offset, unsigned flags)
{
  uint32_t chunk = max_chunk (node);

  while (count > 0) {
    uint32_t n = MIN (count, (uint64_t) chunk);
    int r = node->drv->pread (node, buf, n, offset, flags);
    if (r < 0)
      return r;
    buf = (char *) buf + n;
    count -= n;
    offset += n;
  }
  return 0;
}

/* FUA covers a whole request.  A driver's FUA may cover only the
 * range of that one call (pwritev2 RWF_DSYNC does), so a request that
 * goes down in several pieces sends them without FUA and ends with one
 * flush.
 */
static int
fua_flush (struct node *node, unsigned flags)
{
  return (flags & NODE_FUA) ? node_flush (node) : 0;
}

static int
pwrite_aligned (struct node *node, const void *buf, uint64_t count,
                uint64_t offset, unsigned flags)
{
  uint32_t chunk = max_chunk (node);

  if (count <= chunk)
    return node->drv->pwrite (node, buf, count, offset, flags);
  while (count > 0) {
    uint32_t n = MIN (count, (uint64_t) chunk);
    int r = node->drv->pwrite (node, buf, n, offset, flags & ~NODE_FUA);
    if (r < 0)
      return r;
    buf = (const char *) buf + n;
    count -= n;
    offset += n;
  }
  return fua_flush (node, flags);
}

/* The aligned window around [offset, offset + count). */
static void
align_window (const struct node *node, uint64_t count, uint64_t offset,
              uint64_t *start, uint64_t *len)
{
  uint32_t align = node->limits.request_alignment;
  uint64_t end = ROUND_UP (offset + count, (uint64_t) align);

  *start = ROUND_DOWN (offset, (uint64_t) align);
  *len = end - *start;
}

static int
pread_bounce (struct node *node, void *buf, uint64_t count,
              uint64_t offset, unsigned flags)
{
  uint64_t start, len;
  void *bounce;
  int r;

  align_window (node, count, offset, &start, &len);
  if (posix_memalign (&bounce, node->limits.request_alignment, len) != 0)
    return -ENOMEM;
  r = pread_aligned (node, bounce, len, start, flags);
  if (r == 0)
    memcpy (buf, (char *) bounce + (offset - start), count);
  free (bounce);
  return r;
}

/* Read-modify-write: read the partial blocks at both ends, patch in the
 * new data (or zeroes when @buf is NULL), write the window.
 */
static int
pwrite_rmw (struct node *node, const void *buf, uint64_t count,
            uint64_t offset, unsigned flags)
{
  uint32_t align = node->limits.request_alignment;
  uint64_t start, len;
  char *bounce;
  int r;

  align_window (node, count, offset, &start, &len);
  if (posix_memalign ((void **) &bounce, align, len) != 0)
    return -ENOMEM;

  pthread_rwlock_wrlock (&node->rmw_lock);
  r = pread_aligned (node, bounce, align, start, 0);
  if (r == 0 && len > align)
    r = pread_aligned (node, bounce + len - align, align,
                       start + len - align, 0);
  if (r == 0) {
    if (buf)
      memcpy (bounce + (offset - start), buf, count);
    else
      memset (bounce + (offset - start), 0, count);
    r = pwrite_aligned (node, bounce, len, start, flags);
  }
  pthread_rwlock_unlock (&node->rmw_lock);
  free (bounce);
  return r;
}

int
node_pread (struct node *node, void *buf, uint64_t count, uint64_t offset,
            unsigned flags)
{
  int r = check_range (node, count, offset);

  if (r < 0 || count == 0)
    return r;
  if (needs_bounce (node, buf, count, offset))
    return pread_bounce (node, buf, count, offset, flags);
  return pread_aligned (node, buf, count, offset, flags);
}

int
node_pread_nowait (struct node *node, void *buf, uint64_t count,
                   uint64_t offset)
{
  int r = check_range (node, count, offset);

  if (r < 0 || count == 0)
    return r;
  if (node->drv->pread_nowait == NULL || count > max_chunk (node) ||
      needs_bounce (node, buf, count, offset))
    return -EAGAIN;
  return node->drv->pread_nowait (node, buf, count, offset);
}

int
node_read_splice (struct node *node, int pipe_fd, size_t pipe_size,
                  uint64_t count, uint64_t offset)
{
  int r = check_range (node, count, offset);

  if (r < 0)
    return r;
  /* Only what the driver takes in one piece, and never where the
   * request path would have to bounce through a buffer.
   */
  if (node->drv->read_splice == NULL || count == 0 ||
      count > max_chunk (node) || node->limits.request_alignment > 1)
    return -ENOTSUP;
  return node->drv->read_splice (node, pipe_fd, pipe_size, count, offset);
}

static int pwrite_listed (struct node *node, const void *buf,
                          uint64_t count, uint64_t offset, unsigned flags);

int
node_pwrite (struct node *node, const void *buf, uint64_t count,
             uint64_t offset, unsigned flags)
{
  int r = check_write_range (node, count, offset);
  const struct node_write_hook *h;
  struct node_write hw;
  struct node_io_range w;
  struct node_guards *g;

  if (r < 0)
    return r == -EINVAL ? -ENOSPC : r;
  if (node->read_only)
    return -EROFS;
  if (count == 0)
    return 0;
  g = write_begin (node, offset, count, flags, &w);
  flags &= ~NODE_GUARDED;
  h = hook_before (node, NODE_WRITE_DATA, buf, count, offset, flags, &hw);
  r = pwrite_listed (node, buf, count, offset, flags);
  hook_after (h, &hw, r);
  write_end (g, &w);
  return r;
}

/* node_pwrite once the write is listed with the node's guards. */
static int
pwrite_listed (struct node *node, const void *buf, uint64_t count,
               uint64_t offset, unsigned flags)
{
  int r;

  if (node->dirty && (r = dirty_mark (node, offset, count)) < 0)
    return r;
  if (needs_bounce (node, buf, count, offset))
    r = pwrite_rmw (node, buf, count, offset, flags);
  else if (node->limits.request_alignment > 1) {
    pthread_rwlock_rdlock (&node->rmw_lock);
    r = pwrite_aligned (node, buf, count, offset, flags);
    pthread_rwlock_unlock (&node->rmw_lock);
  }
  else
    r = pwrite_aligned (node, buf, count, offset, flags);
  if (node->dirty)
    dirty_remark (node, offset, count);
  if (r == 0)
    grown_to (node, offset + count);
  return r;
}

/* Write zeroes from the shared zero buffer, for drivers that cannot. */
static int
zero_by_writing (struct node *node, uint64_t count, uint64_t offset,
                 unsigned flags)
{
  pthread_once (&zero_buf_once, zero_buf_alloc);
  if (zero_buf == NULL)
    return -ENOMEM;
  while (count > 0) {
    uint64_t n = MIN (count, (uint64_t) ZERO_BUF_SIZE);
    /* Inside the zeroing request, which is listed and hooked
     * already.
     */
    int r = pwrite_listed (node, zero_buf, n, offset, 0);
    if (r < 0)
      return r;
    count -= n;
    offset += n;
  }
  return fua_flush (node, flags);
}

/* Aligned zeroing through the driver, falling back to writing. */
static int
zero_aligned (struct node *node, uint64_t count, uint64_t offset,
              unsigned flags)
{
  int r = -ENOTSUP;

  if (count == 0)
    return 0;
  if (node->drv->zero) {
    if (node->limits.request_alignment > 1)
      pthread_rwlock_rdlock (&node->rmw_lock);
    r = node->drv->zero (node, count, offset, flags);
    if (node->limits.request_alignment > 1)
      pthread_rwlock_unlock (&node->rmw_lock);
  }
  if (r != -ENOTSUP && r != -EOPNOTSUPP)
    return r;
  if (flags & NODE_FAST_ZERO)
    return -ENOTSUP;
  return zero_by_writing (node, count, offset, flags);
}

static int zero_marked (struct node *node, uint64_t count, uint64_t offset,
                        unsigned flags);

int
node_zero (struct node *node, uint64_t count, uint64_t offset,
           unsigned flags)
{
  int r = check_range (node, count, offset);
  const struct node_write_hook *h;
  struct node_write hw;
  struct node_io_range w;
  struct node_guards *g;

  if (r < 0)
    return r == -EINVAL ? -ENOSPC : r;
  if (node->read_only)
    return -EROFS;
  if (count == 0)
    return 0;
  if ((flags & NODE_FAST_ZERO) && !node->can_fast_zero)
    return -ENOTSUP;
  g = write_begin (node, offset, count, flags, &w);
  flags &= ~NODE_GUARDED;
  h = hook_before (node, NODE_WRITE_ZERO, NULL, count, offset, flags, &hw);
  if (node->dirty && (r = dirty_mark (node, offset, count)) < 0)
    goto out;
  r = zero_marked (node, count, offset, flags);
  if (node->dirty)
    dirty_remark (node, offset, count);
 out:
  hook_after (h, &hw, r);
  write_end (g, &w);
  return r;
}

/* node_zero once the bitmaps are marked. */
static int
zero_marked (struct node *node, uint64_t count, uint64_t offset,
             unsigned flags)
{
  uint32_t align = node->limits.request_alignment;
  uint64_t head_end, tail_start, end;
  int r;

  if (align == 1)
    return zero_aligned (node, count, offset, flags);

  /* Unaligned ends are zeroed by RMW, the aligned middle natively. */
  end = offset + count;
  head_end = MIN (ROUND_UP (offset, (uint64_t) align), end);
  tail_start = MAX (ROUND_DOWN (end, (uint64_t) align), head_end);
  if ((head_end > offset || tail_start < end) && (flags & NODE_FAST_ZERO))
    return -ENOTSUP;
  if (head_end > offset &&
      (r = pwrite_rmw (node, NULL, head_end - offset, offset, 0)) < 0)
    return r;
  if ((r = zero_aligned (node, tail_start - head_end, head_end,
                         flags & ~NODE_FUA)) < 0)
    return r;
  if (tail_start < end &&
      (r = pwrite_rmw (node, NULL, end - tail_start, tail_start, 0)) < 0)
    return r;
  return fua_flush (node, flags);
}

int
node_discard (struct node *node, uint64_t count, uint64_t offset,
              unsigned flags)
{
  uint32_t align = node->limits.request_alignment;
  uint64_t start, end;
  int r = check_range (node, count, offset);
  const struct node_write_hook *h;
  struct node_write hw;
  struct node_io_range w;
  struct node_guards *g;

  if (r < 0)
    return r;
  if (node->read_only)
    return -EROFS;
  flags &= ~NODE_GUARDED;       /* a job never discards under a guard */
  /* Discard is advisory: only the aligned interior is passed down. */
  start = ROUND_UP (offset, (uint64_t) align);
  end = ROUND_DOWN (offset + count, (uint64_t) align);
  if (node->drv->discard == NULL || start >= end)
    return (flags & NODE_FUA) ? node_flush (node) : 0;
  g = write_begin (node, start, end - start, 0, &w);
  h = hook_before (node, NODE_WRITE_DISCARD, NULL, end - start, start, flags,
                   &hw);
  if (node->dirty && (r = dirty_mark (node, start, end - start)) < 0)
    goto out;
  if (align > 1)
    pthread_rwlock_rdlock (&node->rmw_lock);
  r = node->drv->discard (node, end - start, start, flags);
  if (align > 1)
    pthread_rwlock_unlock (&node->rmw_lock);
  if (node->dirty)
    dirty_remark (node, start, end - start);
 out:
  hook_after (h, &hw, r);
  write_end (g, &w);
  return r;
}

int
node_flush (struct node *node)
{
  if (node->drv->flush == NULL)
    return 0;
  return node->drv->flush (node);
}

int
node_cache (struct node *node, uint64_t count, uint64_t offset)
{
  int r = check_range (node, count, offset);

  if (r < 0 || node->drv->cache == NULL)
    return r;
  return node->drv->cache (node, count, offset);
}

int
node_writeback (struct node *node, uint64_t count, uint64_t offset)
{
  int r = check_range (node, count, offset);

  if (r < 0)
    return r;
  if (node->drv->writeback == NULL)
    return -ENOTSUP;
  return node->drv->writeback (node, count, offset);
}

int
node_block_status (struct node *node, uint64_t count,
                   struct extent_list *el)
{
  uint64_t offset = el->end;
  size_t before = el->len;
  uint64_t end_before = el->end;
  int r = check_range (node, count, offset);

  if (r < 0)
    return r;
  if (count == 0)
    return 0;
  if (node->drv->block_status == NULL)
    return extents_add (el, count, 0) < 0 ? -ENOMEM : 0;
  r = node->drv->block_status (node, count, offset, el);
  if (r < 0)
    return r;
  /* A driver that made no progress would make the client loop: call
   * the range data, which is always a safe answer.
   */
  if (el->len == before && el->end == end_before)
    return extents_add (el, count, 0) < 0 ? -ENOMEM : 0;
  return 0;
}

int
node_allocation_depth (struct node *node, uint64_t count, uint64_t offset,
                       uint64_t *pnum, unsigned *depth)
{
  int r = check_range (node, count, offset);

  if (r < 0)
    return r;
  if (count == 0)
    return -EINVAL;
  if (node->drv->allocation_depth == NULL) {
    *pnum = count;
    *depth = 1;
    return 0;
  }
  r = node->drv->allocation_depth (node, count, offset, pnum, depth);
  if (r < 0)
    return r;
  /* Never let a driver stall or overrun its caller's loop. */
  if (*pnum == 0 || *pnum > count)
    *pnum = count;
  return 0;
}

int
node_truncate (struct node *node, uint64_t size)
{
  if (node->read_only)
    return -EROFS;
  if (node->drv->truncate == NULL)
    return -ENOTSUP;
  if (!IS_ALIGNED (size, node->limits.request_alignment) ||
      size > INT64_MAX)
    return -EINVAL;
  return node->drv->truncate (node, size);
}

static void (*sleep_begin_hook) (void);
static void (*sleep_end_hook) (void);
static bool shutting_down;
static int shutdown_fd = -1;    /* readable once shutting_down */
static pthread_once_t shutdown_fd_once = PTHREAD_ONCE_INIT;

static void
shutdown_fd_make (void)
{
  shutdown_fd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK);
}

int
node_io_shutdown_fd (void)
{
  pthread_once (&shutdown_fd_once, shutdown_fd_make);
  return shutdown_fd;
}

void
graph_begin_shutdown (void)
{
  uint64_t one = 1;

  __atomic_store_n (&shutting_down, true, __ATOMIC_RELEASE);
  if (node_io_shutdown_fd () >= 0) {
    ssize_t r = write (shutdown_fd, &one, sizeof one);
    (void) r;                   /* adding 1 to a fresh eventfd cannot fail */
  }
}

bool
node_io_shutting_down (void)
{
  return __atomic_load_n (&shutting_down, __ATOMIC_ACQUIRE);
}

/* Set while job threads may be sleeping too: atomic. */
void
graph_set_sleep_hooks (void (*begin) (void), void (*end) (void))
{
  __atomic_store_n (&sleep_begin_hook, begin, __ATOMIC_RELEASE);
  __atomic_store_n (&sleep_end_hook, end, __ATOMIC_RELEASE);
}

void
node_io_sleep_begin (void)
{
  void (*hook) (void) = __atomic_load_n (&sleep_begin_hook,
                                         __ATOMIC_ACQUIRE);
  if (hook)
    hook ();
}

void
node_io_sleep_end (void)
{
  void (*hook) (void) = __atomic_load_n (&sleep_end_hook, __ATOMIC_ACQUIRE);
  if (hook)
    hook ();
}
