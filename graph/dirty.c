/* A node's dirty bitmaps, and the hook that records writes in them.
 *
 * Every write, write-zeroes and discard on a node passes node_pwrite,
 * node_zero or node_discard (graph/io.c), which mark the node's enabled
 * bitmaps before the request goes to the driver: a bit is set before
 * the data it stands for can reach the disk, and a failed request
 * leaves at most a bit too many, never one too few.  No driver or
 * filter can write around it.
 *
 * The list of a node's bitmaps changes only while the node is drained
 * (no request inside), so the hook reads it without a lock; a bitmap's
 * bits are set with atomics (bitmaps/bitmap.c), and 'enabled' is read
 * and written atomically.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "graph.h"
#include "log.h"

/* Write intent marks the image's bitmap a region at a time: 64 MiB, or
 * on a node over 64 GiB a 1024th of it (a power of 2), so that the
 * flushes a fresh bitmap costs stay in the hundreds whatever the size.
 */
#define WI_REGION_MIN (UINT64_C (64) << 20)
#define WI_REGIONS_MAX 1024

static uint64_t
wi_region (const struct bitmap *b)
{
  uint64_t r = WI_REGION_MIN, size = bitmap_size (b);

  while (r < size / WI_REGIONS_MAX)
    r <<= 1;
  return MAX (r, (uint64_t) bitmap_granularity (b));
}

/* Bits read from an image per call: 1M granules. */
#define LOAD_CHUNK_GRANULES (UINT64_C (1) << 20)

#define MAX_BITMAP_NAME 1023    /* QEMU's limit (qcow2 stores it) */

/* ---- where a node's persistent bitmaps are kept ---- */

/* In the image (the driver's ops: qcow2), or in a sidecar file in the
 * state dir for nodes whose image has no room (sidecar.c).
 */
struct keeper {
  int (*list) (struct node *node, struct node_bitmap_info **list,
               size_t *n, struct error **errp);
  int (*read) (struct node *node, const char *name, uint64_t offset,
               uint64_t count, void *buf, struct error **errp);
  int (*store) (struct node *node, const struct node_bitmap_store *bitmaps,
                size_t n, struct error **errp);
  int (*sync) (struct node *node, const char *name, uint64_t offset,
               uint64_t count,
               int (*fill) (void *opaque, uint64_t offset, uint64_t count,
                            void *buf),
               void *opaque, struct error **errp);
};

static const struct keeper sidecar_keeper = {
  sidecar_list, sidecar_read, sidecar_store, sidecar_sync,
};

static struct keeper
keeper_of (const struct node *node)
{
  if (node->drv->bitmaps_list)
    return (struct keeper) {
      node->drv->bitmaps_list, node->drv->bitmap_read,
      node->drv->bitmaps_store, node->drv->bitmap_sync,
    };
  if (sidecar_usable (node))
    return sidecar_keeper;
  return (struct keeper) { NULL, NULL, NULL, NULL };
}

/* ---- write intent ---- */

/* Whether the image holds every bit of [offset, offset + count). */
static bool
range_durable (const struct dirty_bitmap *d, uint64_t offset, uint64_t count)
{
  uint64_t size = bitmap_size (d->durable);
  uint64_t end = count > size - MIN (offset, size) ? size : offset + count;

  return offset >= size ||
    bitmap_next_clean (d->durable, offset, end) == UINT64_MAX;
}

/* The bits written in one flush, kept until the flush is done: only
 * then does 'durable' say the image holds them.
 */
struct written {
  uint64_t offset, count;
  void *bits;
};

struct wi_fill {
  struct dirty_bitmap *d;
  const struct bitmap *intent;  /* whole regions to mark on disk */
  struct written *v;
  size_t len, cap;
};

/* The bits the image must hold: the bitmap's, and while forked its
 * successor's too (their union is what a crash must leave).
 */
static void
serialize_union (const struct dirty_bitmap *d, uint64_t offset,
                 uint64_t count, void *buf)
{
  size_t bytes = bitmap_serialization_size (d->bm, offset, count);
  uint8_t *b = buf, *tmp;

  bitmap_serialize (d->bm, offset, count, buf);
  if (d->successor == NULL)
    return;
  tmp = malloc (bytes);
  if (tmp == NULL) {
    /* No memory for the successor's bits: all ones is a superset. */
    memset (buf, 0xff, bytes);
    return;
  }
  bitmap_serialize (d->successor, offset, count, tmp);
  for (size_t i = 0; i < bytes; ++i)
    b[i] |= tmp[i];
  free (tmp);
}

static int
fill_intent (void *opaque, uint64_t offset, uint64_t count, void *buf)
{
  struct wi_fill *f = opaque;
  size_t bytes = bitmap_serialization_size (f->d->bm, offset, count);
  uint8_t *b = buf, *whole;

  /* A unit with no region to mark is not rewritten: what the image
   * holds there is what 'durable' says.
   */
  if (bitmap_next_dirty (f->intent, offset, offset + count) == UINT64_MAX)
    return 1;
  whole = malloc (bytes);
  serialize_union (f->d, offset, count, buf);
  /* The regions flushed for are marked whole, and what the image holds
   * already stays: a superset, which the next writes into those
   * regions need not flush again.
   */
  if (whole == NULL)
    return -ENOMEM;
  bitmap_serialize (f->intent, offset, count, whole);
  for (size_t i = 0; i < bytes; ++i)
    b[i] |= whole[i];
  bitmap_serialize (f->d->durable, offset, count, whole);
  for (size_t i = 0; i < bytes; ++i)
    b[i] |= whole[i];
  free (whole);
  if (f->len == f->cap) {
    size_t ncap = f->cap ? 2 * f->cap : 8;
    struct written *nv = realloc (f->v, ncap * sizeof *nv);
    if (nv == NULL)
      return -ENOMEM;
    f->v = nv;
    f->cap = ncap;
  }
  f->v[f->len].bits = malloc (bytes);
  if (f->v[f->len].bits == NULL)
    return -ENOMEM;
  memcpy (f->v[f->len].bits, buf, bytes);
  f->v[f->len].offset = offset;
  f->v[f->len].count = count;
  f->len++;
  return 0;
}

/* One flush: the stored units holding the bits of @p go durably to
 * the keeper (only they are flushed, not the guest's data), and
 * 'durable' learns what it now holds.
 */
static int
wi_write (struct node *node, struct dirty_bitmap *d, const struct bitmap *p)
{
  uint64_t size = bitmap_size (p), off = 0;
  struct wi_fill f = { .d = d, .intent = p };
  struct error *err = NULL;
  int r = 0;

  /* One call from the first region to the last: the keeper skips the
   * units between them that have nothing new, and may write the others
   * that follow each other in one go (one device flush, not one each).
   */
  if ((off = bitmap_next_dirty (p, 0, size)) != UINT64_MAX) {
    uint64_t end = off, next;
    while (end < size &&
           (next = bitmap_next_dirty (p, end, size)) != UINT64_MAX) {
      end = bitmap_next_clean (p, next, size);
      if (end == UINT64_MAX)
        end = size;
    }
    if (keeper_of (node).sync (node, d->name, off, end - off, fill_intent,
                               &f, &err) == -1)
      r = -EIO;
  }
  if (r == 0)
    for (size_t i = 0; i < f.len; ++i)
      bitmap_deserialize (d->durable, f.v[i].offset, f.v[i].count,
                          f.v[i].bits);
  for (size_t i = 0; i < f.len; ++i)
    free (f.v[i].bits);
  free (f.v);
  if (err) {
    nbdd_error ("node '%s': bitmap '%s': %s: writes into new granules "
                "fail from now on", node->name, d->name, err->msg);
    error_free (err);
  }
  return r;
}

/* Make [offset, offset + count) of @d durable: join the next flush, or
 * run it.  The writers that meet here while a flush runs are all
 * served by the one after it.
 */
static int
wi_persist (struct node *node, struct dirty_bitmap *d, uint64_t offset,
            uint64_t count)
{
  uint64_t mine;
  int r;

  pthread_mutex_lock (&d->wi_lock);
  if (d->wi_error) {
    r = d->wi_error;
    pthread_mutex_unlock (&d->wi_lock);
    return r;
  }
  /* Whole regions, as md's write-intent bitmap does with its chunks:
   * a burst of writes over a region costs one flush, not one per new
   * granule.  After a crash the bitmap holds those regions whole (more
   * to copy, nothing missed); a clean close stores the exact bits.
   */
  {
    uint64_t size = bitmap_size (d->pending);
    uint64_t unit = wi_region (d->pending);
    uint64_t start = ROUND_DOWN (MIN (offset, size), unit);
    uint64_t end = MIN (size, offset + count > size ? size :
                        ROUND_UP (offset + count, unit));
    bitmap_set (d->pending, start, end - start);
  }
  mine = ++d->wi_want;
  /* The wait holds a worker: say so, so that another one serves the
   * requests queued meanwhile, and they join the next flush rather
   * than queue behind this one.
   */
  node_io_sleep_begin ();
  while (d->wi_done < mine && d->wi_error == 0) {
    struct bitmap *p;
    uint64_t gen;

    if (d->wi_flushing) {
      pthread_cond_wait (&d->wi_cond, &d->wi_lock);
      continue;
    }
    d->wi_flushing = true;
    gen = d->wi_want;
    p = d->pending;
    d->pending = d->spare;
    d->spare = NULL;
    pthread_mutex_unlock (&d->wi_lock);
    r = wi_write (node, d, p);
    bitmap_clear_all (p);
    pthread_mutex_lock (&d->wi_lock);
    d->spare = p;
    if (r < 0)
      d->wi_error = r;
    else
      d->wi_done = gen;
    d->wi_flushing = false;
    pthread_cond_broadcast (&d->wi_cond);
  }
  r = d->wi_done >= mine ? 0 : d->wi_error;
  pthread_mutex_unlock (&d->wi_lock);
  node_io_sleep_end ();
  return r;
}

/* After a store with preallocation the image holds exactly the bits in
 * memory: write intent starts (or restarts) from there.  On failure
 * the bitmap's writes fail (wi_error) rather than go unrecorded.
 */
static int
wi_start (struct dirty_bitmap *d)
{
  if (d->durable == NULL) {
    pthread_mutex_init (&d->wi_lock, NULL);
    pthread_cond_init (&d->wi_cond, NULL);
    d->pending = bitmap_new (bitmap_size (d->bm), bitmap_granularity (d->bm));
    d->spare = bitmap_new (bitmap_size (d->bm), bitmap_granularity (d->bm));
    d->durable = bitmap_new (bitmap_size (d->bm), bitmap_granularity (d->bm));
    if (d->pending == NULL || d->spare == NULL || d->durable == NULL) {
      d->wi_error = -ENOMEM;
      return -ENOMEM;
    }
  }
  /* Drained: nothing waits or flushes now. */
  else if (bitmap_resize (d->durable, bitmap_size (d->bm)) < 0 ||
           bitmap_resize (d->pending, bitmap_size (d->bm)) < 0 ||
           bitmap_resize (d->spare, bitmap_size (d->bm)) < 0) {
    d->wi_error = -ENOMEM;
    return -ENOMEM;
  }
  d->wi_error = 0;
  dirty_bitmap_rebase (d);
  bitmap_clear_all (d->pending);
  return 0;
}

void
dirty_bitmap_rebase (struct dirty_bitmap *d)
{
  if (d->durable == NULL)
    return;
  bitmap_clear_all (d->durable);
  bitmap_merge (d->durable, d->bm);
  if (d->successor)
    bitmap_merge (d->durable, d->successor);
}

static void
wi_free (struct dirty_bitmap *d)
{
  if (d->durable == NULL && d->pending == NULL && d->spare == NULL)
    return;
  bitmap_free (d->durable);
  bitmap_free (d->pending);
  bitmap_free (d->spare);
  d->durable = d->pending = d->spare = NULL;
  pthread_mutex_destroy (&d->wi_lock);
  pthread_cond_destroy (&d->wi_cond);
}

int
dirty_bitmap_persist (struct dirty_bitmap *d)
{
  if (d->durable == NULL)
    return 0;
  return wi_persist (d->node, d, 0, bitmap_size (d->bm));
}

int
dirty_mark (struct node *node, uint64_t offset, uint64_t count)
{
  int r = 0;

  for (struct dirty_bitmap *d = node->dirty; d; d = d->next) {
    if (!__atomic_load_n (&d->enabled, __ATOMIC_RELAXED))
      continue;
    bitmap_set (d->successor ? d->successor : d->bm, offset, count);
    /* A bit set but not yet durable may be another writer's, still on
     * its way to the image: wait for it as for one's own.
     */
    if (d->durable && !range_durable (d, offset, count)) {
      int r2 = wi_persist (node, d, offset, count);
      if (r2 < 0)
        r = r2;
    }
  }
  return r;
}

void
dirty_remark (struct node *node, uint64_t offset, uint64_t count)
{
  for (struct dirty_bitmap *d = node->dirty; d; d = d->next)
    if (d->internal && __atomic_load_n (&d->enabled, __ATOMIC_RELAXED)) {
      struct bitmap *b = d->successor ? d->successor : d->bm;
      uint32_t g = bitmap_granularity (b);

      bitmap_set (b, offset, count);
      if (count > 0)
        __atomic_fetch_add (&d->marks, (offset + count - 1) / g - offset / g
                            + 1, __ATOMIC_RELAXED);
    }
}

struct dirty_bitmap *
dirty_bitmap_find (const struct node *node, const char *name)
{
  for (struct dirty_bitmap *d = node->dirty; d; d = d->next)
    if (!d->internal && strcmp (d->name, name) == 0)
      return d;
  return NULL;
}

static struct dirty_bitmap *create (struct node *node, const char *name,
                                    uint32_t granularity, bool persistent,
                                    bool enabled, struct error **errp);

struct dirty_bitmap *
dirty_bitmap_create (struct node *node, const char *name,
                     uint32_t granularity, bool persistent, bool enabled,
                     struct error **errp)
{
  if (name[0] == '#') {
    error_setg (errp, "bitmap names starting with '#' are the daemon's "
                "own");
    return NULL;
  }
  return create (node, name, granularity, persistent, enabled, errp);
}

struct dirty_bitmap *
dirty_bitmap_create_internal (struct node *node, const char *name,
                              uint32_t granularity, struct error **errp)
{
  struct dirty_bitmap *d = create (node, name, granularity, false, true,
                                   errp);

  if (d)
    d->internal = true;
  return d;
}

static struct dirty_bitmap *
create (struct node *node, const char *name, uint32_t granularity,
        bool persistent, bool enabled, struct error **errp)
{
  struct dirty_bitmap *d;

  if (name[0] == '\0' || strlen (name) > MAX_BITMAP_NAME) {
    error_setg (errp, "bitmap names are 1 to %d bytes", MAX_BITMAP_NAME);
    return NULL;
  }
  if (dirty_bitmap_find (node, name)) {
    error_setg (errp, "node '%s' already has a bitmap '%.80s'", node->name,
                name);
    return NULL;
  }
  /* A format's file grows with the format's metadata: what a guest
   * wrote is recorded by a bitmap on the format node.
   */
  if (node->growable) {
    error_setg (errp, "node '%s' is the file of a writable format node "
                "and grows with it: put the bitmap on the format node",
                node->name);
    return NULL;
  }
  if (granularity < 512 || granularity > (UINT32_C (1) << 31) ||
      (granularity & (granularity - 1))) {
    error_setg (errp, "granularity must be a power of 2 from 512 bytes "
                "to 2 GiB, not %" PRIu32, granularity);
    return NULL;
  }
  d = calloc (1, sizeof *d);
  if (d == NULL || (d->name = strdup (name)) == NULL ||
      (d->bm = bitmap_new (node_size (node), granularity)) == NULL) {
    if (d)
      free (d->name);
    free (d);
    error_setg (errp, "out of memory for bitmap '%.80s'", name);
    return NULL;
  }
  d->node = node;
  d->persistent = persistent;
  d->enabled = enabled;
  return d;
}

void
dirty_bitmap_link (struct dirty_bitmap *d)
{
  struct dirty_bitmap **pp = (struct dirty_bitmap **) &d->node->dirty;

  /* At the end: query-named-block-nodes lists them in creation order. */
  while (*pp)
    pp = &(*pp)->next;
  d->next = NULL;
  *pp = d;
}

void
dirty_bitmap_unlink (struct dirty_bitmap *d)
{
  struct dirty_bitmap **pp = (struct dirty_bitmap **) &d->node->dirty;

  while (*pp && *pp != d)
    pp = &(*pp)->next;
  if (*pp)
    *pp = d->next;
  d->next = NULL;
}

int
dirty_bitmap_fork (struct dirty_bitmap *d)
{
  d->successor = bitmap_new (bitmap_size (d->bm), bitmap_granularity (d->bm));
  return d->successor ? 0 : -ENOMEM;
}

void
dirty_bitmap_unfork (struct dirty_bitmap *d, bool success)
{
  if (success) {
    bitmap_free (d->bm);
    d->bm = d->successor;
  }
  else {
    bitmap_merge (d->bm, d->successor);
    bitmap_free (d->successor);
  }
  d->successor = NULL;
}

void
dirty_bitmap_free (struct dirty_bitmap *d)
{
  if (d == NULL)
    return;
  wi_free (d);
  bitmap_free (d->successor);
  bitmap_free (d->bm);
  free (d->name);
  free (d);
}

void
dirty_bitmaps_free_all (struct node *node)
{
  struct dirty_bitmap *d = node->dirty, *next;

  for (; d; d = next) {
    next = d->next;
    dirty_bitmap_free (d);
  }
  node->dirty = NULL;
}

int
dirty_bitmaps_resize (struct node *node, uint64_t size)
{
  for (struct dirty_bitmap *d = node->dirty; d; d = d->next)
    if (bitmap_resize (d->bm, size) < 0 ||
        (d->successor && bitmap_resize (d->successor, size) < 0))
      return -ENOMEM;
  return 0;
}

bool
dirty_bitmaps_can_store (const struct node *node)
{
  return keeper_of (node).store != NULL && !node->read_only;
}

/* One stored bitmap into memory: a chunk of bits at a time. */
static int
load_bits (struct node *node, struct dirty_bitmap *d, struct error **errp)
{
  uint64_t size = bitmap_size (d->bm);
  uint64_t g = bitmap_granularity (d->bm);
  uint64_t step = LOAD_CHUNK_GRANULES * g;
  void *buf = malloc (LOAD_CHUNK_GRANULES / 8);

  if (buf == NULL) {
    error_setg (errp, "out of memory loading bitmap '%s'", d->name);
    return -1;
  }
  for (uint64_t off = 0; off < size; off += step) {
    uint64_t count = MIN (step, size - off);
    if (keeper_of (node).read (node, d->name, off, count, buf,
                               errp) == -1) {
      free (buf);
      return -1;
    }
    bitmap_deserialize (d->bm, off, count, buf);
  }
  free (buf);
  return 0;
}

bool dirty_bitmaps_autoload = true;

int
dirty_bitmaps_load (struct node *node, struct error **errp)
{
  struct node_bitmap_info *list;
  struct error *err = NULL;
  size_t n;

  if (keeper_of (node).list == NULL || !dirty_bitmaps_autoload)
    return 0;
  if (keeper_of (node).list (node, &list, &n, &err) == -1) {
    /* Broken bitmaps do not stop a read-only node (the driver said
     * so in the log): its data is still good, and it never stores.
     */
    if (node->read_only) {
      error_free (err);
      return 0;
    }
    if (errp)
      *errp = err;
    else
      error_free (err);
    return -1;
  }
  node->bitmaps_on_disk = n > 0;
  for (size_t i = 0; i < n; ++i) {
    struct dirty_bitmap *d;

    d = dirty_bitmap_create (node, list[i].name, list[i].granularity, true,
                             list[i].enabled && !list[i].in_use, errp);
    if (d == NULL)
      goto fail;
    if (list[i].in_use) {
      d->inconsistent = true;
      nbdd_warn ("node '%s': bitmap '%s' is inconsistent (the image was not "
                 "closed cleanly): remove it and start a full backup",
                 node->name, d->name);
    }
    else if (load_bits (node, d, errp) == -1) {
      dirty_bitmap_free (d);
      goto fail;
    }
    dirty_bitmap_link (d);
    debug ("node '%s': bitmap '%s' loaded, %" PRIu64 " bytes dirty",
           node->name, d->name, bitmap_count (d->bm));
  }
  node_bitmap_infos_free (list, n);
  /* Writable: stored again at once, ready for write intent, so that
   * from the first write on a crash leaves them usable.
   */
  if (n > 0 && dirty_bitmaps_store (node, DIRTY_STORE_INTENT, errp) == -1) {
    dirty_bitmaps_free_all (node);
    node->bitmaps_on_disk = false;
    return -1;
  }
  return 0;

 fail:
  /* Half a set must never be stored back over the whole one. */
  dirty_bitmaps_free_all (node);
  node->bitmaps_on_disk = false;
  node_bitmap_infos_free (list, n);
  return -1;
}

static int
fill_bits (void *opaque, uint64_t offset, uint64_t count, void *buf)
{
  serialize_union (opaque, offset, count, buf);
  return 0;
}

int
dirty_bitmaps_store (struct node *node, enum dirty_store mode,
                     struct error **errp)
{
  struct node_bitmap_store *v;
  /* With write intent the stored bits are always a superset of the
   * writes on disk, so they are never in use; they are stored with
   * room for every bit, to be updated in place.  Without a way to
   * update them in place, or asked to, they are stored in use.
   */
  bool closing = mode == DIRTY_STORE_FINAL;
  bool intent = mode == DIRTY_STORE_INTENT && keeper_of (node).sync != NULL;
  size_t n = 0, i = 0;
  int r;

  if (!dirty_bitmaps_can_store (node))
    return 0;
  for (struct dirty_bitmap *d = node->dirty; d; d = d->next)
    n += d->persistent;
  if (n == 0 && !node->bitmaps_on_disk)
    return 0;
  v = calloc (n ? n : 1, sizeof *v);
  if (v == NULL) {
    error_setg (errp, "out of memory storing bitmaps");
    return -1;
  }
  for (struct dirty_bitmap *d = node->dirty; d; d = d->next)
    if (d->persistent)
      v[i++] = (struct node_bitmap_store) {
        .name = d->name, .granularity = bitmap_granularity (d->bm),
        .in_use = d->inconsistent || !(closing || intent),
        .enabled = d->enabled, .preallocate = intent && !d->inconsistent,
        .fill = fill_bits, .opaque = d,
      };
  r = keeper_of (node).store (node, v, n, errp);
  free (v);
  if (r == 0)
    node->bitmaps_on_disk = n > 0;
  /* Stored in use: nothing to keep up to date on disk any more. */
  if (r == 0 && mode == DIRTY_STORE_IN_USE)
    for (struct dirty_bitmap *d = node->dirty; d; d = d->next)
      wi_free (d);
  if (r == 0 && intent)
    for (struct dirty_bitmap *d = node->dirty; d; d = d->next)
      if (d->persistent && !d->inconsistent && wi_start (d) < 0) {
        struct error *err = NULL;
        /* The image says it holds every write: it must not, now. */
        if (dirty_bitmaps_store (node, DIRTY_STORE_IN_USE, &err) == -1)
          error_free (err);
        error_setg (errp, "out of memory for bitmap '%s'", d->name);
        return -1;
      }
  return r;
}
