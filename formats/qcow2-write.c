/* qcow2: writes, zeroing, discard and flush.
 *
 * A write into a cluster this image owns alone (COPIED, not compressed,
 * and with extended L2 every subcluster written already allocated) is
 * a plain write to the host file, with the metadata lock held only for
 * the lookup.  Anything else allocates, in QEMU's order
 * (qcow2-cluster.c there):
 *
 *   1. under the lock, mark the guest cluster in flight (other writers
 *      of it wait), and allocate a new host cluster (qcow2-alloc.c);
 *   2. without the lock, write the guest data with the old contents
 *      around it (copy-on-write: from the backing node, the old shared
 *      or compressed cluster, or zeroes, read through qcow2_pread);
 *      zeroes need no writing into a new cluster, which is fresh;
 *   3. under the lock, point the L2 entry at the new cluster (COPIED),
 *      and only then drop the old cluster's reference.
 *
 * Metadata is write-back (qcow2-cache.c): the L2 change is durable at
 * the next flush (an NBD FLUSH, a FUA write, or close), with refcounts
 * before the L2 entries that use them, copied data before the L2 entry
 * that points at it, and an L2 entry gone before the refcount that says
 * its cluster is free.  A new or copied L2 table is written and synced
 * before the L1 entry that points at it, which is written at once.
 *
 * Lazy refcounts (QEMU's lazy_refcounts): the image is marked DIRTY on
 * disk before the first allocation of the session (qcow2-alloc.c), the
 * refcounts no longer go before the L2 entries that use them, and a
 * clean close clears DIRTY once everything is written.  An image found
 * DIRTY at a read-write open is repaired first (qcow2-repair.c).
 *
 * Zeroing and discard of whole clusters change only metadata (the zero
 * flag, or the zero bits of extended L2) and free what they drop;
 * partial clusters are written with zeroes (zeroing) or left alone
 * (discard, which is advisory).
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "log.h"
#include "qcow2.h"
#include "utils.h"

#define MAX_PENDING_PUNCHES 1024
/* Whole clusters allocated at once by one write (a 32 MiB request of
 * 512-byte clusters is 65536 of them).
 */
#define MAX_WHOLE_CLUSTERS 4096

/* ------------------------------------------------------------------ */
/* Guest clusters in flight */

static bool
inflight_has (struct qcow2_state *s, uint64_t gc)
{
  for (struct qcow2_inflight *f = s->inflight; f; f = f->next)
    if (f->cluster == gc)
      return true;
  return false;
}

/* Wait until no other writer is changing guest cluster @gc's entry. */
static void
inflight_wait (struct qcow2_state *s, uint64_t gc)
{
  while (inflight_has (s, gc))
    pthread_cond_wait (&s->inflight_done, &s->lock);
}

static void
inflight_remove (struct qcow2_state *s, struct qcow2_inflight *me)
{
  for (struct qcow2_inflight **pp = &s->inflight; *pp; pp = &(*pp)->next)
    if (*pp == me) {
      *pp = me->next;
      break;
    }
  pthread_cond_broadcast (&s->inflight_done);
}

/* ------------------------------------------------------------------ */
/* L1 and L2 tables */

static int
write_l1_entry (struct qcow2_state *s, uint64_t index)
{
  uint64_t v = htobe64 (s->l1[index]);

  return node_pwrite (s->file->node, &v, 8, s->info.l1_offset + index * 8, 0);
}

/* Give L1 entry @index a table of its own: a new one (zeroed) if it
 * has none, a copy if it shares one with a snapshot (no COPIED flag).
 * The table is on disk before the L1 entry points at it.
 */
static int
l2_table_own (struct qcow2_state *s, uint64_t index)
{
  const struct qcow2_info *info = &s->info;
  uint64_t old = s->l1[index] & QCOW2_L1E_OFFSET_MASK;
  uint64_t cs = info->cluster_size;
  uint64_t table;
  int r;

  if (old && !IS_ALIGNED (old, cs))
    return qcow2_corrupt (s, "L2 table offset 0x%" PRIx64 " (L1 index %"
                          PRIu64 ") is not cluster aligned", old, index);
  if ((r = qcow2_alloc_clusters (s, 1, &table)) < 0)
    return r;
  if ((r = qcow2_meta_add (s, table, cs, QCOW2_META_L2)) < 0)
    return r;
  r = 0;
  for (uint64_t at = 0; at < cs; at += s->l2_slice_size) {
    struct qcow2_cache_entry *e;
    const void *src = NULL;
    void *dst;
    uint8_t *copy = NULL;

    if (old) {
      struct qcow2_cache_entry *oe;
      if ((r = qcow2_cache_get (s->l2_cache, old + at, &oe, &src)) < 0)
        return r;
      copy = malloc (s->l2_slice_size);
      if (copy)
        memcpy (copy, src, s->l2_slice_size);
      qcow2_cache_put (s->l2_cache, oe);
      if (copy == NULL)
        return -ENOMEM;
    }
    else if (at > 0)
      break;                    /* a fresh cluster reads as zeroes */
    r = qcow2_cache_get_new (s->l2_cache, table + at, &e, &dst);
    if (r == 0 && copy)
      memcpy (dst, copy, s->l2_slice_size);
    free (copy);
    if (r < 0)
      return r;
    qcow2_cache_put (s->l2_cache, e);
  }
  /* Table (after the refcounts it relies on), sync, then L1. */
  if ((r = qcow2_cache_flush (s->l2_cache)) < 0 ||
      (r = node_flush (s->file->node)) < 0)
    return r;
  s->l1[index] = table | QCOW2_OFLAG_COPIED;
  if ((r = write_l1_entry (s, index)) < 0)
    return r;
  if (old) {
    /* The snapshot keeps the old table; we drop our reference once the
     * L1 entry that made it is on disk.
     */
    for (uint64_t at = 0; at < cs; at += s->l2_slice_size)
      qcow2_cache_discard (s->l2_cache, old + at);
    qcow2_cache_depends_on_flush (s->refcount_cache);
    if ((r = qcow2_free_clusters (s, old, 1)) < 0)
      return r;
  }
  return 0;
}

/* How l2_get treats the L2 table of a guest cluster. */
enum l2_mode {
  L2_LOOKUP,                    /* as it is; none: 1 */
  L2_CHANGE,                    /* made ours to change; none: 1 */
  L2_CREATE,                    /* made ours, created if there is none */
};

/* The L2 entry of guest cluster @gc, pinned.  To change it, the table
 * must be ours alone: one shared with a snapshot (no COPIED flag in
 * its L1 entry) is copied first.
 */
struct l2_ref {
  struct qcow2_cache_entry *e;
  uint8_t *p;                   /* the entry in the slice */
  uint64_t l2e, bitmap;
};

static int
l2_get (struct qcow2_state *s, uint64_t gc, enum l2_mode mode,
        struct l2_ref *ref)
{
  const struct qcow2_info *info = &s->info;
  uint64_t index = gc >> info->l2_bits;
  uint64_t eps = s->l2_slice_size / info->l2_entry_size;
  uint64_t l2_index = gc & ((UINT64_C (1) << info->l2_bits) - 1);
  uint64_t table, first;
  const void *slice;
  int r;

  if (index >= info->l1_size)
    return qcow2_corrupt (s, "guest cluster %" PRIu64 " is beyond the L1 "
                          "table", gc);
  if (s->corrupt && mode != L2_LOOKUP)
    return -EIO;                /* no more writes to a corrupt image */
  if ((s->l1[index] & QCOW2_L1E_OFFSET_MASK) == 0) {
    if (mode != L2_CREATE)
      return 1;
    if ((r = l2_table_own (s, index)) < 0)
      return r;
  }
  else if (mode != L2_LOOKUP && !(s->l1[index] & QCOW2_OFLAG_COPIED) &&
           (r = l2_table_own (s, index)) < 0)
    return r;
  table = s->l1[index] & QCOW2_L1E_OFFSET_MASK;
  if (!IS_ALIGNED (table, info->cluster_size))
    return qcow2_corrupt (s, "L2 table offset 0x%" PRIx64 " (L1 index %"
                          PRIu64 ") is not cluster aligned", table, index);
  /* A table to be changed must be where an L2 table is known to be:
   * an L1 entry pointing at other metadata would have it overwritten.
   */
  if (mode != L2_LOOKUP && s->meta &&
      qcow2_meta_kind (s, table) != QCOW2_META_L2) {
    qcow2_corrupt (s, "L1 index %" PRIu64 " points at 0x%" PRIx64 ", which "
                   "is not an L2 table", index, table);
    qcow2_mark_corrupt (s);
    return -EIO;
  }
  first = ROUND_DOWN (l2_index, eps);
  r = qcow2_cache_get (s->l2_cache, table + first * info->l2_entry_size,
                       &ref->e, &slice);
  if (r < 0)
    return r;
  ref->p = (uint8_t *) slice + (l2_index - first) * info->l2_entry_size;
  memcpy (&ref->l2e, ref->p, 8);
  ref->l2e = be64toh (ref->l2e);
  ref->bitmap = 0;
  if (info->extended_l2) {
    memcpy (&ref->bitmap, ref->p + 8, 8);
    ref->bitmap = be64toh (ref->bitmap);
  }
  return 0;
}

static void
l2_set (struct qcow2_state *s, struct l2_ref *ref, uint64_t l2e,
        uint64_t bitmap)
{
  uint64_t v = htobe64 (l2e);

  qcow2_cache_dirty (s->l2_cache, ref->e);
  memcpy (ref->p, &v, 8);
  if (s->info.extended_l2) {
    v = htobe64 (bitmap);
    memcpy (ref->p + 8, &v, 8);
  }
  ref->l2e = l2e;
  ref->bitmap = bitmap;
}

static void
l2_put (struct qcow2_state *s, struct l2_ref *ref)
{
  qcow2_cache_put (s->l2_cache, ref->e);
}

/* Drop the reference an old L2 entry held, after it was replaced. */
static int
release_old (struct qcow2_state *s, uint64_t l2e)
{
  uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;

  if (l2e & QCOW2_OFLAG_COMPRESSED) {
    struct qcow2_cdesc d;
    qcow2_decode_compressed (&s->info, l2e, &d);
    return qcow2_free_bytes (s, d.offset, d.size);
  }
  if (host == 0)
    return 0;
  if (!IS_ALIGNED (host, s->info.cluster_size))
    return qcow2_corrupt (s, "data cluster offset 0x%" PRIx64 " is not "
                          "cluster aligned", host);
  return qcow2_free_clusters (s, host, 1);
}

/* Subcluster bits covering [a, b) of a cluster. */
static uint32_t
sc_mask (const struct qcow2_info *info, uint64_t a, uint64_t b)
{
  unsigned first = a >> info->subcluster_bits;
  unsigned last = (b - 1) >> info->subcluster_bits;
  uint64_t m = ((UINT64_C (1) << (last + 1)) - 1) &
    ~((UINT64_C (1) << first) - 1);

  return (uint32_t) m;
}

/* ------------------------------------------------------------------ */
/* Writes */

/* Can [a, b) of the cluster be written in place, at its host offset? */
static bool
in_place (const struct qcow2_info *info, const struct l2_ref *ref,
          uint64_t a, uint64_t b)
{
  uint64_t host = ref->l2e & QCOW2_L2E_OFFSET_MASK;

  if (host == 0 || !(ref->l2e & QCOW2_OFLAG_COPIED) ||
      (ref->l2e & QCOW2_OFLAG_COMPRESSED))
    return false;
  if (!info->extended_l2)
    return !(ref->l2e & QCOW2_OFLAG_ZERO);
  {
    uint32_t m = sc_mask (info, a, b);
    return ((uint32_t) ref->bitmap & m) == m;
  }
}

/* Write [a, b) of guest cluster @gc from @data. */
static int
write_cluster (struct node *node, uint64_t gc, uint64_t a, uint64_t b,
               const uint8_t *data)
{
  struct qcow2_state *s = node->opaque;
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  uint64_t gstart = gc << info->cluster_bits;
  struct qcow2_inflight me = { .cluster = gc };
  struct l2_ref ref;
  uint64_t old_l2e, old_bitmap, host, new_host, span_a, span_b;
  bool fresh, copied = false;
  uint8_t *buf = NULL;
  int r;

  pthread_mutex_lock (&s->lock);
  inflight_wait (s, gc);
  if ((r = l2_get (s, gc, L2_CREATE, &ref)) < 0)
    goto out_unlock;
  host = ref.l2e & QCOW2_L2E_OFFSET_MASK;
  if (in_place (info, &ref, a, b)) {
    l2_put (s, &ref);
    if (!IS_ALIGNED (host, cs))
      r = qcow2_corrupt (s, "data cluster offset 0x%" PRIx64 " for guest "
                         "offset 0x%" PRIx64 " is not cluster aligned",
                         host, gstart);
    else
      r = qcow2_meta_check_write (s, host + a, b - a, "guest data");
    pthread_mutex_unlock (&s->lock);
    return r < 0 ? r : node_pwrite (s->file->node, data, b - a, host + a, 0);
  }

  /* Allocating: this cluster is ours until its entry is updated. */
  old_l2e = ref.l2e;
  old_bitmap = ref.bitmap;
  me.next = s->inflight;
  s->inflight = &me;
  l2_put (s, &ref);
  if (host && (old_l2e & QCOW2_OFLAG_COPIED) &&
      !(old_l2e & QCOW2_OFLAG_COMPRESSED)) {
    /* Our own cluster, reading as zeroes (the zero flag) or with some
     * subclusters not allocated yet: written in place, around too.
     */
    if (!IS_ALIGNED (host, cs)) {
      r = qcow2_corrupt (s, "data cluster offset 0x%" PRIx64 " for guest "
                         "offset 0x%" PRIx64 " is not cluster aligned",
                         host, gstart);
      goto out_inflight;
    }
    if ((r = qcow2_meta_check_write (s, host, cs, "guest data")) < 0)
      goto out_inflight;
    new_host = host;
    fresh = false;
  }
  else {
    if ((r = qcow2_alloc_clusters (s, 1, &new_host)) < 0)
      goto out_inflight;
    r = 0;
    fresh = true;
  }
  pthread_mutex_unlock (&s->lock);

  /* What to write: the whole cluster (standard L2), or the subclusters
   * touched (extended L2), the guest data inside the old contents.
   */
  if (info->extended_l2) {
    uint64_t scs = UINT64_C (1) << info->subcluster_bits;
    span_a = ROUND_DOWN (a, scs);
    span_b = ROUND_UP (b, scs);
  }
  else {
    span_a = 0;
    span_b = cs;
  }
  /* A shared (not COPIED) cluster under extended L2 is copied whole:
   * its other allocated subclusters move with it.
   */
  if (info->extended_l2 && fresh && host) {
    span_a = 0;
    span_b = cs;
  }
  if (span_a < a || b < span_b) {
    buf = malloc (span_b - span_a);
    if (buf == NULL) {
      r = -ENOMEM;
      goto out_relock;
    }
    if ((a > span_a &&
         (r = qcow2_pread (node, buf, a - span_a, gstart + span_a, 0)) < 0) ||
        (b < span_b &&
         (r = qcow2_pread (node, buf + (b - span_a), span_b - b,
                           gstart + b, 0)) < 0))
      goto out_relock;
    memcpy (buf + (a - span_a), data, b - a);
    copied = !(is_zero (buf, a - span_a) &&
               is_zero (buf + (b - span_a), span_b - b));
  }
  if (buf && (copied || !fresh))
    r = node_pwrite (s->file->node, buf, span_b - span_a, new_host + span_a, 0);
  else                          /* a fresh cluster is zero around it */
    r = node_pwrite (s->file->node, data, b - a, new_host + a, 0);

 out_relock:
  free (buf);
  pthread_mutex_lock (&s->lock);
  if (r < 0) {
    /* The new cluster was never pointed at: give it back. */
    if (fresh)
      qcow2_free_clusters (s, new_host, 1);
    goto out_inflight;
  }
  if (copied)
    qcow2_cache_depends_on_flush (s->l2_cache);
  if ((r = l2_get (s, gc, L2_CREATE, &ref)) < 0)
    goto out_inflight;
  if (info->extended_l2) {
    uint32_t span = sc_mask (info, span_a, span_b);
    uint32_t alloc = (uint32_t) old_bitmap;
    uint32_t zero = old_bitmap >> 32;
    /* The span now holds real data (copied or written). */
    alloc |= span;
    zero &= ~span;
    l2_set (s, &ref, new_host | QCOW2_OFLAG_COPIED,
            ((uint64_t) zero << 32) | alloc);
  }
  else
    l2_set (s, &ref, new_host | QCOW2_OFLAG_COPIED, 0);
  l2_put (s, &ref);
  if (new_host != host || (old_l2e & QCOW2_OFLAG_COMPRESSED))
    r = release_old (s, old_l2e);

 out_inflight:
  inflight_remove (s, &me);
 out_unlock:
  pthread_mutex_unlock (&s->lock);
  return r;
}

/* The longest run from @offset (at most @count bytes) that can be
 * written in place, at contiguous host offsets, and write it with one
 * write.  Returns the bytes written, 0 if the first cluster cannot be
 * written in place, or -errno.
 */
static int64_t
write_in_place (struct qcow2_state *s, uint64_t offset, uint64_t count,
                const uint8_t *data)
{
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  uint64_t first_host = 0, len = 0;
  int r;

  pthread_mutex_lock (&s->lock);
  while (len < count) {
    uint64_t gc = (offset + len) >> info->cluster_bits;
    uint64_t a = (offset + len) & (cs - 1);
    uint64_t b = MIN (cs, a + (count - len));
    struct l2_ref ref;
    uint64_t host;
    bool ok;

    if (inflight_has (s, gc) || (r = l2_get (s, gc, L2_LOOKUP, &ref)) != 0)
      break;
    host = ref.l2e & QCOW2_L2E_OFFSET_MASK;
    ok = in_place (info, &ref, a, b) && IS_ALIGNED (host, cs) &&
      (len == 0 || host + a == first_host + len);
    l2_put (s, &ref);
    if (!ok)
      break;
    if (len == 0)
      first_host = host + a;
    len += b - a;
  }
  if (len > 0 && s->corrupt)
    r = -EIO;
  else if (len > 0)
    r = qcow2_meta_check_write (s, first_host, len, "guest data");
  pthread_mutex_unlock (&s->lock);
  if (len == 0)
    return 0;
  if (r < 0)
    return r;
  r = node_pwrite (s->file->node, data, len, first_host, 0);
  return r < 0 ? r : (int64_t) len;
}

/* Up to @n whole guest clusters from @gc, each needing a new cluster,
 * written from @data: allocated together (contiguous, so one write
 * takes them all), then their entries updated.  Nothing around them is
 * copied: they are overwritten whole.  Returns the clusters written, 0
 * if the first is not such a cluster, or -errno.
 */
static int64_t
write_new_clusters (struct qcow2_state *s, uint64_t gc, uint64_t n,
                    const uint8_t *data)
{
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  struct qcow2_inflight *me;
  uint64_t *old, k = 0, host = 0;
  int r = 0;

  n = MIN (n, (uint64_t) MAX_WHOLE_CLUSTERS);
  me = calloc (n, sizeof *me);
  old = calloc (n, sizeof *old);
  if (me == NULL || old == NULL) {
    free (me);
    free (old);
    return 0;                   /* cluster by cluster, then */
  }
  pthread_mutex_lock (&s->lock);
  for (; k < n; ++k) {
    struct l2_ref ref;
    if (inflight_has (s, gc + k) || (r = l2_get (s, gc + k, L2_CREATE, &ref)) < 0)
      break;
    if (in_place (info, &ref, 0, cs)) {
      l2_put (s, &ref);
      break;
    }
    old[k] = ref.l2e;
    l2_put (s, &ref);
  }
  if (k > 0) {
    /* Fewer may come back, contiguous: those are the ones we write. */
    int64_t got = qcow2_alloc_clusters (s, k, &host);
    if (got < 0)
      r = got;
    else {
      r = 0;
      k = got;
      for (uint64_t i = 0; i < k; ++i) {
        me[i].cluster = gc + i;
        me[i].next = s->inflight;
        s->inflight = &me[i];
      }
    }
  }
  pthread_mutex_unlock (&s->lock);
  if (k == 0 || r < 0) {
    free (me);
    free (old);
    return r < 0 ? r : 0;
  }

  if (r == 0)
    r = node_pwrite (s->file->node, data, k * cs, host, 0);

  pthread_mutex_lock (&s->lock);
  if (r < 0)
    qcow2_free_clusters (s, host, k);
  for (uint64_t i = 0; i < k && r == 0; ++i) {
    struct l2_ref ref;
    if ((r = l2_get (s, gc + i, L2_CREATE, &ref)) < 0)
      break;
    l2_set (s, &ref, (host + i * cs) | QCOW2_OFLAG_COPIED,
            info->extended_l2 ? QCOW2_L2_BITMAP_ALL_ALLOC : 0);
    l2_put (s, &ref);
    r = release_old (s, old[i]);
  }
  for (uint64_t i = 0; i < k; ++i)
    inflight_remove (s, &me[i]);
  pthread_mutex_unlock (&s->lock);
  free (me);
  free (old);
  return r < 0 ? r : (int64_t) k;
}

int
qcow2_pwrite (struct node *node, const void *buf, uint32_t count,
              uint64_t offset, unsigned flags)
{
  struct qcow2_state *s = node->opaque;
  uint64_t cs = s->info.cluster_size;
  const uint8_t *p = buf;
  int64_t done;
  int r;

  while (count > 0) {
    uint64_t gc = offset >> s->info.cluster_bits;
    uint64_t a = offset & (cs - 1);
    uint64_t b = MIN (cs, a + count);

    /* Clusters already ours: one write for the whole run. */
    done = write_in_place (s, offset, count, p);
    if (done == 0 && a == 0 && count >= cs) {
      /* Whole new clusters: allocated and written together. */
      done = write_new_clusters (s, gc, count / cs, p);
      if (done > 0)
        done *= cs;
    }
    if (done == 0) {
      /* One cluster, with whatever must be copied around the data. */
      if ((r = write_cluster (node, gc, a, b, p)) < 0)
        return r;
      done = b - a;
    }
    if (done < 0)
      return done;
    p += done;
    offset += done;
    count -= done;
  }
  return (flags & NODE_FUA) ? qcow2_flush (node) : 0;
}

/* ------------------------------------------------------------------ */
/* Zeroing and discard */

/* Make whole guest cluster @gc read as zeroes (or, for discard on a v2
 * image, as the backing), by metadata alone.  @keep: leave an owned
 * cluster allocated (zeroing without permission to unmap).
 */
static int
zero_cluster_meta (struct qcow2_state *s, uint64_t gc, bool discard,
                   bool keep)
{
  const struct qcow2_info *info = &s->info;
  struct l2_ref ref;
  uint64_t host, l2e, bitmap = 0;
  bool owned;
  int r;

  inflight_wait (s, gc);
  /* No table: unallocated, and without a backing that reads as zeroes
   * already; a discard on v2 needs nothing either.
   */
  r = l2_get (s, gc, s->backing != NULL && !(discard && info->version < 3)
              ? L2_CREATE : L2_CHANGE, &ref);
  if (r != 0)
    return r < 0 ? r : 0;
  host = ref.l2e & QCOW2_L2E_OFFSET_MASK;
  owned = host && (ref.l2e & QCOW2_OFLAG_COPIED) &&
    !(ref.l2e & QCOW2_OFLAG_COMPRESSED);
  if (!owned)
    keep = false;

  if (info->extended_l2) {
    l2e = keep ? ref.l2e : 0;
    bitmap = UINT64_C (0xffffffff) << 32;       /* all zero, none alloc */
  }
  else if (info->version < 3)
    l2e = 0;                    /* no zero flag: unallocated */
  else
    l2e = (keep ? (ref.l2e & ~QCOW2_OFLAG_COMPRESSED) : 0) | QCOW2_OFLAG_ZERO;
  {
    uint64_t old = ref.l2e;
    l2_set (s, &ref, l2e, bitmap);
    l2_put (s, &ref);
    if (!keep && (r = release_old (s, old)) < 0)
      return r;
  }
  return 0;
}

int
qcow2_zero (struct node *node, uint64_t count, uint64_t offset,
            unsigned flags)
{
  struct qcow2_state *s = node->opaque;
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  int r = 0;

  /* Without a zero flag a v2 image can only unmap, and only where no
   * backing shows through.
   */
  if (info->version < 3 && s->backing)
    return -ENOTSUP;
  while (count > 0 && r == 0) {
    uint64_t gc = offset >> info->cluster_bits;
    uint64_t a = offset & (cs - 1);
    uint64_t b = MIN (cs, a + count);

    if (a == 0 && b == cs) {
      if (info->version < 3 && !(flags & NODE_MAY_TRIM))
        r = -ENOTSUP;
      else {
        pthread_mutex_lock (&s->lock);
        r = zero_cluster_meta (s, gc, false, !(flags & NODE_MAY_TRIM));
        pthread_mutex_unlock (&s->lock);
      }
    }
    else if (flags & NODE_FAST_ZERO)
      r = -ENOTSUP;
    else
      r = write_cluster (node, gc, a, b, s->zero_cluster);
    if (r == -ENOTSUP && !(flags & NODE_FAST_ZERO))
      r = write_cluster (node, gc, a, b, s->zero_cluster);
    offset += b - a;
    count -= b - a;
  }
  if (r == 0 && (flags & NODE_FUA))
    r = qcow2_flush (node);
  return r;
}

int
qcow2_discard (struct node *node, uint64_t count, uint64_t offset,
               unsigned flags)
{
  struct qcow2_state *s = node->opaque;
  uint64_t cs = s->info.cluster_size;
  uint64_t start = ROUND_UP (offset, cs);
  uint64_t end = ROUND_DOWN (offset + count, cs);
  int r = 0;

  /* As QEMU: on a v2 image a discarded cluster would show the backing
   * again, stale data the guest had overwritten, so nothing is done.
   */
  if (s->info.version < 3 && s->backing)
    return (flags & NODE_FUA) ? qcow2_flush (node) : 0;
  /* Advisory: only whole clusters, and the partial one the image ends
   * in when the range reaches the end.
   */
  if (offset + count == node->size && !IS_ALIGNED (node->size, cs))
    end = ROUND_UP (node->size, cs);
  pthread_mutex_lock (&s->lock);
  for (uint64_t off = start; off < end && r == 0; off += cs)
    r = zero_cluster_meta (s, off >> s->info.cluster_bits, true, false);
  pthread_mutex_unlock (&s->lock);
  if (r == 0 && (flags & NODE_FUA))
    r = qcow2_flush (node);
  return r;
}

/* ------------------------------------------------------------------ */
/* Flush */

int
qcow2_punch_later (struct qcow2_state *s, uint64_t offset, uint64_t len)
{
  if (s->nr_punches > 0 &&
      s->punches[s->nr_punches - 1].offset +
      s->punches[s->nr_punches - 1].len == offset) {
    s->punches[s->nr_punches - 1].len += len;
    return 0;
  }
  if (s->nr_punches == s->punches_cap) {
    size_t cap = s->punches_cap ? s->punches_cap * 2 : 64;
    struct qcow2_punch *p = realloc (s->punches, cap * sizeof *p);
    if (p == NULL)
      return 0;                 /* the space stays used: no harm */
    s->punches = p;
    s->punches_cap = cap;
  }
  s->punches[s->nr_punches++] = (struct qcow2_punch) { offset, len };
  return 0;
}

/* Everything to disk, in order; then the freed space goes. */
static int
flush_locked (struct qcow2_state *s)
{
  int r;

  if ((r = qcow2_cache_flush (s->l2_cache)) < 0 ||
      (r = qcow2_cache_flush (s->refcount_cache)) < 0 ||
      (r = qcow2_cache_flush (s->l2_cache)) < 0 ||
      (r = node_flush (s->file->node)) < 0)
    return r;
  for (size_t i = 0; i < s->nr_punches; ++i)
    node_discard (s->file->node, s->punches[i].len, s->punches[i].offset, 0);
  s->nr_punches = 0;
  return 0;
}

int
qcow2_flush (struct node *node)
{
  return qcow2_flush_state (node->opaque);
}

/* ------------------------------------------------------------------ */
/* Open and close */

int
qcow2_write_open (struct qcow2_state *s, struct error **errp)
{
  struct qcow2_info *info = &s->info;
  /* Valid bitmaps are kept consistent (marked IN_USE below, before the
   * first write, and stored by their owner): their bit stays.  A broken
   * extension already failed the open (qcow2_bitmaps_open).
   */
  uint64_t known_autoclear = qcow2_bitmaps_autoclear (s);
  int r;

  if (s->lazy_refcounts && info->version < 3) {
    error_setg (errp, "qcow2: %s: lazy refcounts need a version 3 image "
                "(compat=1.1)", s->filename);
    return -1;
  }
  /* Stale refcounts (an unclean shutdown): rebuilt before the first
   * allocation reads them.
   */
  if (s->dirty && qcow2_repair_refcounts (s, errp) == -1)
    return -1;
  if (info->nb_snapshots > 0)
    nbdd_info ("qcow2: %s: %" PRIu32 " internal snapshot(s): writes copy "
               "the clusters they share", s->filename, info->nb_snapshots);

  s->zero_cluster = calloc (1, info->cluster_size);
  if (s->zero_cluster == NULL) {
    error_setg_errno (errp, errno, "qcow2: %s: allocating", s->filename);
    return -1;
  }
  if ((r = qcow2_find_next_free (s, &s->next_free)) < 0) {
    error_setg_errno (errp, -r, "qcow2: %s: reading the refcounts",
                      s->filename);
    return -1;
  }

  /* Autoclear bits we do not know describe data we will not keep up to
   * date: a writer clears them before its first write (spec).
   */
  if (info->version >= 3 && (info->autoclear & ~known_autoclear)) {
    uint64_t v = htobe64 (info->autoclear & known_autoclear);
    if ((r = node_pwrite (s->file->node, &v, 8, 88, 0)) < 0 ||
        (r = node_flush (s->file->node)) < 0) {
      error_setg_errno (errp, -r, "qcow2: %s: clearing autoclear bits",
                        s->filename);
      return -1;
    }
    info->autoclear &= known_autoclear;
  }
  s->file->node->growable = true;
  if (qcow2_meta_init (s, errp) == -1 ||
      qcow2_bitmaps_write_open (s, errp) == -1)
    return -1;
  s->writable = true;
  debug ("qcow2: %s: writable, allocating from 0x%" PRIx64, s->filename,
         s->next_free);
  return 0;
}

int
qcow2_write_close (struct qcow2_state *s)
{
  int r;

  if (!s->writable)
    return 0;
  r = qcow2_flush_state (s);
  if (r < 0) {
    nbdd_error ("qcow2: %s: writing metadata back at close: %s",
                s->filename, strerror (-r));
    return r;
  }
  /* Lazy refcounts: everything is on disk, refcounts included, so the
   * image is clean again.
   */
  if (s->lazy_refcounts && s->dirty) {
    r = qcow2_write_incompat (s, s->info.incompat & ~QCOW2_INCOMPAT_DIRTY);
    if (r < 0) {
      nbdd_error ("qcow2: %s: clearing the dirty bit at close: %s",
                  s->filename, strerror (-r));
      return r;
    }
    s->dirty = false;
  }
  return 0;
}

/* ------------------------------------------------------------------ */
/* The header */

static void
put_be32 (uint8_t *p, uint32_t v)
{
  v = htobe32 (v);
  memcpy (p, &v, 4);
}

static void
put_be64 (uint8_t *p, uint64_t v)
{
  v = htobe64 (v);
  memcpy (p, &v, 8);
}

int
qcow2_write_header (struct qcow2_state *s,
                    const struct qcow2_header_update *u)
{
  struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  CLEANUP_FREE uint8_t *buf = calloc (1, cs);
  CLEANUP_FREE uint8_t *data = NULL;
  CLEANUP_FREE char *name = NULL;
  struct qcow2_ext *exts;
  const char *backing = u->backing ? u->backing_file : info->backing_file;
  size_t pos = info->header_length, nr = 0;
  bool placed = false;
  int r;

  if (buf == NULL)
    return -ENOMEM;
  if (backing && strlen (backing) > QCOW2_MAX_BACKING_FILE_NAME)
    return -ENAMETOOLONG;
  if ((r = node_pread (s->file->node, buf, info->header_length, 0, 0)) < 0)
    return r;
  if (info->version >= 3)
    put_be64 (buf + QCOW2_HDR_AUTOCLEAR_FEATURES, u->autoclear);

  /* The new list of extensions and the new name, made before the
   * write so that the in-memory copy cannot fail after it.
   */
  exts = calloc (info->nr_exts + 1, sizeof *exts);
  if (exts == NULL)
    return -ENOMEM;
  if ((u->ext_type && u->ext && (data = malloc (u->ext_len ?: 1)) == NULL) ||
      (u->backing && u->backing_file &&
       (name = strdup (u->backing_file)) == NULL)) {
    free (exts);
    return -ENOMEM;
  }
  for (size_t i = 0; i <= info->nr_exts; ++i) {
    const struct qcow2_ext *e;
    struct qcow2_ext mine;

    if (i < info->nr_exts && (u->ext_type == 0 ||
                              info->exts[i].type != u->ext_type))
      e = &info->exts[i];
    else if (u->ext_type && u->ext && !placed) {
      mine = (struct qcow2_ext) { u->ext_type, u->ext_len,
                                  (uint8_t *) u->ext };
      e = &mine;
      placed = true;
    }
    else
      continue;
    if (QCOW2_EXT_HEADER_SIZE + ROUND_UP ((uint64_t) e->len, 8) > cs - pos) {
      free (exts);
      return -ENOSPC;
    }
    put_be32 (buf + pos, e->type);
    put_be32 (buf + pos + 4, e->len);
    memcpy (buf + pos + QCOW2_EXT_HEADER_SIZE, e->data, e->len);
    pos += QCOW2_EXT_HEADER_SIZE + ROUND_UP ((size_t) e->len, 8);
    exts[nr++] = *e;
  }
  /* The end marker: eight zero bytes, already there. */
  if (cs - pos < QCOW2_EXT_HEADER_SIZE) {
    free (exts);
    return -ENOSPC;
  }
  pos += QCOW2_EXT_HEADER_SIZE;
  if (backing) {
    size_t len = strlen (backing);
    if (len > cs - pos) {
      free (exts);
      return -ENOSPC;
    }
    memcpy (buf + pos, backing, len);
    put_be64 (buf + QCOW2_HDR_BACKING_FILE_OFFSET, pos);
    put_be32 (buf + QCOW2_HDR_BACKING_FILE_SIZE, len);
  }
  else {
    put_be64 (buf + QCOW2_HDR_BACKING_FILE_OFFSET, 0);
    put_be32 (buf + QCOW2_HDR_BACKING_FILE_SIZE, 0);
  }
  if ((r = node_pwrite (s->file->node, buf, cs, 0, 0)) < 0 ||
      (r = node_flush (s->file->node)) < 0) {
    free (exts);
    return r;
  }

  /* Commit the in-memory copy. */
  for (size_t i = 0; i < nr; ++i)
    if (u->ext_type && exts[i].type == u->ext_type) {
      memcpy (data, u->ext, u->ext_len);
      exts[i].data = steal_pointer (&data);
    }
  for (size_t i = 0; i < info->nr_exts; ++i)
    if (u->ext_type && info->exts[i].type == u->ext_type)
      free (info->exts[i].data);
  free (info->exts);
  info->exts = exts;
  info->nr_exts = nr;
  if (info->version >= 3)
    info->autoclear = u->autoclear;
  if (u->backing) {
    free (info->backing_file);
    info->backing_file = steal_pointer (&name);
  }
  return 0;
}

int
qcow2_write_incompat (struct qcow2_state *s, uint64_t incompat)
{
  uint64_t v = htobe64 (incompat);
  int r;

  if ((r = node_pwrite (s->file->node, &v, 8, QCOW2_HDR_INCOMPAT_FEATURES,
                        0)) < 0 ||
      (r = node_flush (s->file->node)) < 0)
    return r;
  s->info.incompat = incompat;
  return 0;
}

int
qcow2_mark_dirty (struct qcow2_state *s)
{
  int r;

  if (s->dirty)
    return 0;
  if ((r = qcow2_write_incompat (s, s->info.incompat |
                                 QCOW2_INCOMPAT_DIRTY)) < 0)
    return r;
  s->dirty = true;
  debug ("qcow2: %s: marked dirty (lazy refcounts)", s->filename);
  return 0;
}

int
qcow2_flush_state (struct qcow2_state *s)
{
  int r;

  pthread_mutex_lock (&s->lock);
  r = flush_locked (s);
  pthread_mutex_unlock (&s->lock);
  return r;
}
