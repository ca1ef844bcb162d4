/* qcow2: host cluster allocation and refcount updates (the write side).
 *
 * Clusters are allocated at the end of the image, one after the other
 * (s->next_free): a new cluster has never held anything, so it reads as
 * zeroes without being written, and a reader that mapped a cluster just
 * before it was freed can never see it reused for other data.  Freed
 * clusters get refcount 0 and their space is punched out of the file
 * once the metadata that dropped them is on disk; they are reused only
 * after the image is reopened (QEMU scans for free clusters instead;
 * the cost here is address space, not disk space).
 *
 * Refcounts go through the refcount cache, write-back, in the order
 * QEMU keeps (qcow2-cache.c): an increment reaches the disk before any
 * L2 entry that relies on it, a decrement only after the L2 entry that
 * dropped the cluster.  A missing refcount block is created covering
 * itself (its first cluster is the block), written and synced before
 * the refcount table points at it.  A full refcount table is replaced
 * by a bigger one, built and synced before the header switches to it.
 *
 * With lazy refcounts the first of those rules is dropped: the image
 * is marked DIRTY on disk before the first allocation of the session,
 * and a crash is repaired at the next read-write open (qcow2-repair.c).
 *
 * Everything here runs under s->lock.
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "qcow2.h"
#include "utils.h"

static uint64_t
per_block (const struct qcow2_info *info)
{
  return (info->cluster_size * 8) >> info->refcount_order;
}

static uint64_t
reftable_entries (const struct qcow2_info *info)
{
  return (uint64_t) info->reftable_clusters * info->cluster_size / 8;
}

/* Pin the refcount-cache slice holding host byte @off. */
static int
rc_slice (struct qcow2_state *s, uint64_t off, bool fresh,
          struct qcow2_cache_entry **e, uint8_t **data, size_t *in_slice)
{
  uint64_t base = ROUND_DOWN (off, (uint64_t) s->rc_slice_size);
  const void *d;
  int r;

  if (fresh) {
    void *w;
    r = qcow2_cache_get_new (s->refcount_cache, base, e, &w);
    d = w;
  }
  else
    r = qcow2_cache_get (s->refcount_cache, base, e, &d);
  if (r < 0)
    return r;
  *data = (uint8_t *) d;
  *in_slice = off - base;
  return 0;
}

/* The refcount table entry @index (0 if past the table). */
static int
reftable_get (struct qcow2_state *s, uint64_t index, uint64_t *block)
{
  struct qcow2_cache_entry *e;
  uint8_t *d;
  size_t at;
  uint64_t v;
  int r;

  if (index >= reftable_entries (&s->info)) {
    *block = 0;
    return 0;
  }
  r = rc_slice (s, s->info.reftable_offset + index * 8, false, &e, &d, &at);
  if (r < 0)
    return r;
  memcpy (&v, d + at, 8);
  qcow2_cache_put (s->refcount_cache, e);
  *block = be64toh (v) & QCOW2_REFT_OFFSET_MASK;
  if (*block && (!IS_ALIGNED (*block, s->info.cluster_size) ||
                 *block < s->info.cluster_size))
    return qcow2_corrupt (s, "refcount block offset 0x%" PRIx64 " (refcount "
                          "table index %" PRIu64 ") is invalid", *block,
                          index);
  return 0;
}

static int
reftable_set (struct qcow2_state *s, uint64_t index, uint64_t block)
{
  struct qcow2_cache_entry *e;
  uint8_t *d;
  size_t at;
  uint64_t v = htobe64 (block);
  int r = rc_slice (s, s->info.reftable_offset + index * 8, false, &e, &d,
                    &at);

  if (r < 0)
    return r;
  d = qcow2_cache_dirty (s->refcount_cache, e);
  memcpy (d + at, &v, 8);
  qcow2_cache_put (s->refcount_cache, e);
  return 0;
}

/* Read or write one refcount inside a pinned refcount block slice. */
static uint64_t
rc_load (const struct qcow2_info *info, const uint8_t *d, uint64_t idx)
{
  uint32_t bits = UINT32_C (1) << info->refcount_order;
  uint64_t bitoff = idx * bits;
  uint64_t v = 0;

  if (bits < 8)
    return (d[bitoff / 8] >> (bitoff % 8)) & ((1u << bits) - 1);
  for (size_t i = 0; i < bits / 8; ++i)
    v = (v << 8) | d[bitoff / 8 + i];
  return v;
}

void
qcow2_refcount_store (const struct qcow2_info *info, uint8_t *d,
                      uint64_t idx, uint64_t v)
{
  uint32_t bits = UINT32_C (1) << info->refcount_order;
  uint64_t bitoff = idx * bits;

  if (bits < 8) {
    uint8_t mask = ((1u << bits) - 1) << (bitoff % 8);
    d[bitoff / 8] = (d[bitoff / 8] & ~mask) | ((v << (bitoff % 8)) & mask);
    return;
  }
  for (size_t i = bits / 8; i-- > 0; v >>= 8)
    d[bitoff / 8 + i] = v & 0xff;
}

static uint64_t
rc_max (const struct qcow2_info *info)
{
  uint32_t bits = UINT32_C (1) << info->refcount_order;

  return bits == 64 ? UINT64_MAX : (UINT64_C (1) << bits) - 1;
}

static int grow_reftable (struct qcow2_state *s, uint64_t need_index);
static int update_one (struct qcow2_state *s, uint64_t off, int delta,
                       uint64_t *result);

/* Create the refcount block for table @index.  No block counted its
 * range, so every cluster there is free: the block takes the first one
 * and counts itself.  It is on disk before the table entry pointing at
 * it.  Moves next_free past it if it lands there.
 */
static int
new_refblock (struct qcow2_state *s, uint64_t index, uint64_t *block)
{
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  uint64_t off = (index * per_block (info)) << info->cluster_bits;
  uint64_t slices = cs / s->rc_slice_size;
  int r;

  if (index >= reftable_entries (info)) {
    if ((r = grow_reftable (s, index)) < 0)
      return r;
    /* The new table may have brought a block for this index. */
    if ((r = reftable_get (s, index, block)) < 0 || *block != 0)
      return r;
  }
  for (uint64_t i = 0; i < slices; ++i) {
    struct qcow2_cache_entry *e;
    uint8_t *d;
    size_t at;
    if ((r = rc_slice (s, off + i * s->rc_slice_size, true, &e, &d,
                       &at)) < 0)
      return r;
    if (i == 0)
      qcow2_refcount_store (info, d, 0, 1);   /* the block counts itself */
    qcow2_cache_put (s->refcount_cache, e);
  }
  if (s->next_free <= off)
    s->next_free = off + cs;
  if ((r = qcow2_meta_add (s, off, cs, QCOW2_META_REFBLOCK)) < 0)
    return r;
  /* Block on disk, then the table entry. */
  if ((r = qcow2_cache_flush (s->refcount_cache)) < 0 ||
      (r = node_flush (s->file->node)) < 0 ||
      (r = reftable_set (s, index, off)) < 0)
    return r;
  *block = off;
  debug ("qcow2: %s: new refcount block at 0x%" PRIx64 " (table index %"
         PRIu64 ")", s->filename, off, index);
  return 0;
}

/* Make sure a refcount block counts every cluster of [off, off + len). */
static int
ensure_refblocks (struct qcow2_state *s, uint64_t off, uint64_t len)
{
  const struct qcow2_info *info = &s->info;
  uint64_t first = (off >> info->cluster_bits) / per_block (info);
  uint64_t last = ((off + len - 1) >> info->cluster_bits) / per_block (info);
  int r;

  for (uint64_t t = first; t <= last; ++t) {
    uint64_t block;
    if ((r = reftable_get (s, t, &block)) < 0)
      return r;
    if (block == 0 && (r = new_refblock (s, t, &block)) < 0)
      return r;
  }
  return 0;
}

/* Add @delta to the refcount of the cluster at host @off. */
static int
update_one (struct qcow2_state *s, uint64_t off, int delta,
            uint64_t *result)
{
  const struct qcow2_info *info = &s->info;
  uint64_t cluster = off >> info->cluster_bits;
  uint64_t index = cluster / per_block (info);
  uint64_t idx = cluster % per_block (info);
  uint32_t bits = UINT32_C (1) << info->refcount_order;
  uint64_t block, byte, old;
  struct qcow2_cache_entry *e;
  uint8_t *d;
  size_t at;
  int r;

  if ((r = reftable_get (s, index, &block)) < 0)
    return r;
  if (block && s->meta && qcow2_meta_kind (s, block) != QCOW2_META_REFBLOCK) {
    qcow2_corrupt (s, "refcount table index %" PRIu64 " points at 0x%"
                   PRIx64 ", which is not a refcount block", index, block);
    qcow2_mark_corrupt (s);
    return -EIO;
  }
  if (block == 0)               /* allocation makes the blocks first */
    return qcow2_corrupt (s, "%s cluster 0x%" PRIx64 ", which no refcount "
                          "block counts", delta < 0 ? "freeing" : "counting",
                          off);
  byte = block + idx * bits / 8;
  if ((r = rc_slice (s, byte, false, &e, &d, &at)) < 0)
    return r;
  {
    /* The refcount's index within the pinned slice. */
    uint64_t rel = idx - (byte - at - block) * 8 / bits;
    old = rc_load (info, d, rel);
    if ((delta < 0 && old == 0) || (delta > 0 && old == rc_max (info))) {
      qcow2_cache_put (s->refcount_cache, e);
      return qcow2_corrupt (s, "refcount of cluster 0x%" PRIx64 " would %s "
                            "(it is %" PRIu64 ")", off,
                            delta < 0 ? "go below 0" : "overflow", old);
    }
    d = qcow2_cache_dirty (s->refcount_cache, e);
    qcow2_refcount_store (info, d, rel, old + delta);
  }
  qcow2_cache_put (s->refcount_cache, e);
  if (result)
    *result = old + delta;
  return 0;
}

int64_t
qcow2_alloc_clusters (struct qcow2_state *s, uint64_t n, uint64_t *offset)
{
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  uint64_t pb = per_block (info);
  uint64_t start, range_end;
  int r;

  /* Lazy refcounts: the image says its refcounts may be stale before
   * any L2 entry can rely on these (qcow2-write.c).
   */
  if (s->lazy_refcounts && (r = qcow2_mark_dirty (s)) < 0)
    return r;
  /* The block counting the first cluster first; it may land on it, and
   * then the range starts after it.  The range stops where that block's
   * coverage does: a block for the next one would land inside it.
   */
  do {
    start = s->next_free;
    if (start >= QCOW2_MAX_HOST_OFFSET - cs)
      return -ENOSPC;
    if ((r = ensure_refblocks (s, start, cs)) < 0)
      return r;
  } while (s->next_free != start);
  range_end = ((start >> info->cluster_bits) / pb + 1) * pb;
  n = MIN (n, range_end - (start >> info->cluster_bits));
  n = MIN (n, (QCOW2_MAX_HOST_OFFSET - start) / cs);
  for (uint64_t i = 0; i < n; ++i)
    if ((r = update_one (s, start + i * cs, 1, NULL)) < 0)
      return r;
  s->next_free = start + n * cs;
  /* L2 entries pointing here must not reach the disk before these
   * refcounts do, unless the refcounts are lazy (DIRTY is set: a crash
   * means a repair at the next read-write open).
   */
  if (!s->lazy_refcounts &&
      (r = qcow2_cache_set_dependency (s->l2_cache, s->refcount_cache)) < 0)
    return r;
  *offset = start;
  return n;
}

int
qcow2_free_clusters (struct qcow2_state *s, uint64_t offset, uint64_t n)
{
  uint64_t cs = s->info.cluster_size;
  int r;

  /* The refcount saying "free" must not reach the disk before the L2
   * entry that dropped the cluster.
   */
  if ((r = qcow2_cache_set_dependency (s->refcount_cache, s->l2_cache)) < 0)
    return r;
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t rc;
    if ((r = update_one (s, offset + i * cs, -1, &rc)) < 0)
      return r;
    if (rc == 0) {
      qcow2_meta_remove (s, offset + i * cs, cs);
      if ((r = qcow2_punch_later (s, offset + i * cs, cs)) < 0)
        return r;
    }
  }
  return 0;
}

int
qcow2_free_bytes (struct qcow2_state *s, uint64_t offset, uint64_t len)
{
  uint64_t cs = s->info.cluster_size;
  uint64_t first = ROUND_DOWN (offset, cs);
  uint64_t last = ROUND_DOWN (offset + len - 1, cs);

  /* A compressed cluster counts once in every host cluster it
   * touches (spec: "Compressed Clusters Descriptor").
   */
  return qcow2_free_clusters (s, first, (last - first) / cs + 1);
}

/* Replace the refcount table with one big enough for table index
 * @need_index, QEMU's way: the new table, and blocks for whatever of
 * it no block counts yet, go at the end; they are written and synced,
 * the header switches to them in one write, synced, and only then is
 * the old table freed.
 */
static int
grow_reftable (struct qcow2_state *s, uint64_t need_index)
{
  struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  uint64_t pb = per_block (info);
  uint64_t old_entries = reftable_entries (info);
  uint64_t old_offset = info->reftable_offset;
  uint64_t old_clusters = info->reftable_clusters;
  uint64_t new_entries, new_clusters, table_off, end, first_t, last_t, nb;
  uint64_t *table = NULL;
  uint8_t *blk = NULL;
  bool *fresh = NULL;
  uint8_t hdr[12];
  int r;

  new_entries = MAX (old_entries * 2, need_index + 1);
  new_clusters = ROUND_UP (new_entries * 8, cs) / cs;
  new_entries = new_clusters * cs / 8;
  if (new_clusters * cs > QCOW2_MAX_REFTABLE_SIZE)
    return qcow2_corrupt (s, "the refcount table would grow past %" PRIu64
                          " bytes", (uint64_t) QCOW2_MAX_REFTABLE_SIZE);

  /* What is counted so far goes out through the old table. */
  if ((r = qcow2_cache_flush (s->refcount_cache)) < 0)
    return r;
  table = calloc (new_entries, 8);
  blk = malloc (cs);
  if (table == NULL || blk == NULL) {
    r = -ENOMEM;
    goto out;
  }
  for (uint64_t t = 0; t < old_entries; ++t)
    if ((r = reftable_get (s, t, &table[t])) < 0)
      goto out;

  /* The new area is the table, then one block for each table index it
   * spans that has none; adding blocks may span more: iterate.
   */
  table_off = s->next_free;
  first_t = (table_off >> info->cluster_bits) / pb;
  nb = 0;
  for (;;) {
    uint64_t want = 0;
    end = table_off + (new_clusters + nb) * cs;
    last_t = ((end - 1) >> info->cluster_bits) / pb;
    if (last_t >= new_entries) {
      r = qcow2_corrupt (s, "cannot lay out a bigger refcount table");
      goto out;
    }
    for (uint64_t t = first_t; t <= last_t; ++t)
      want += table[t] == 0;
    if (want == nb)
      break;
    nb = want;
  }
  fresh = calloc (last_t - first_t + 1, sizeof *fresh);
  if (fresh == NULL) {
    r = -ENOMEM;
    goto out;
  }
  {
    uint64_t at = table_off + new_clusters * cs;
    for (uint64_t t = first_t; t <= last_t; ++t)
      if (table[t] == 0) {
        table[t] = at;
        fresh[t - first_t] = true;
        at += cs;
      }
  }

  /* Count the new area: in the blocks that exist, through the cache;
   * in the new blocks, as they are written.
   */
  for (uint64_t off = table_off; off < end; off += cs) {
    uint64_t t = (off >> info->cluster_bits) / pb;
    if (!fresh[t - first_t] && (r = update_one (s, off, 1, NULL)) < 0)
      goto out;
  }
  for (uint64_t t = first_t; t <= last_t; ++t) {
    if (!fresh[t - first_t])
      continue;
    memset (blk, 0, cs);
    for (uint64_t off = table_off; off < end; off += cs) {
      uint64_t cl = off >> info->cluster_bits;
      if (cl / pb == t)
        qcow2_refcount_store (info, blk, cl % pb, 1);
    }
    if ((r = node_pwrite (s->file->node, blk, cs, table[t], 0)) < 0)
      goto out;
  }
  for (uint64_t t = 0; t < new_entries; ++t)
    table[t] = htobe64 (table[t]);
  if ((r = qcow2_cache_flush (s->refcount_cache)) < 0 ||
      (r = node_pwrite (s->file->node, table, new_clusters * cs, table_off,
                        0)) < 0 ||
      (r = node_flush (s->file->node)) < 0)
    goto out;

  /* Switch: offset and size in one write of the header. */
  {
    uint64_t o = htobe64 (table_off);
    uint32_t c = htobe32 ((uint32_t) new_clusters);
    memcpy (hdr, &o, 8);
    memcpy (hdr + 8, &c, 4);
  }
  if ((r = node_pwrite (s->file->node, hdr, 12, 48, 0)) < 0 ||
      (r = node_flush (s->file->node)) < 0)
    goto out;
  info->reftable_offset = table_off;
  info->reftable_clusters = new_clusters;
  s->next_free = end;
  if ((r = qcow2_meta_add (s, table_off, new_clusters * cs,
                           QCOW2_META_REFTABLE)) < 0)
    goto out;
  for (uint64_t t = first_t; t <= last_t; ++t)
    if (fresh[t - first_t] &&
        (r = qcow2_meta_add (s, be64toh (table[t]), cs,
                             QCOW2_META_REFBLOCK)) < 0)
      goto out;
  debug ("qcow2: %s: refcount table grown to %" PRIu64 " clusters at 0x%"
         PRIx64, s->filename, new_clusters, table_off);

  /* The old table is garbage now: forget its slices, free it. */
  for (uint64_t off = old_offset; off < old_offset + old_clusters * cs;
       off += s->rc_slice_size)
    qcow2_cache_discard (s->refcount_cache, off);
  r = qcow2_free_clusters (s, old_offset, old_clusters);

 out:
  free (table);
  free (blk);
  free (fresh);
  return r;
}

int
qcow2_find_next_free (struct qcow2_state *s, uint64_t *next)
{
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  uint64_t pb = per_block (info);
  uint64_t end = ROUND_UP (node_size (s->file->node), cs);
  uint64_t entries = reftable_entries (info);
  int r;

  /* Past the end of the file, and past the last cluster any refcount
   * block counts (preallocated images may count clusters past EOF).
   */
  for (uint64_t t = entries; t-- > 0; ) {
    uint64_t block;
    if ((r = reftable_get (s, t, &block)) < 0)
      return r;
    if (block == 0)
      continue;
    for (uint64_t i = pb; i-- > 0; ) {
      uint64_t off = (t * pb + i) << info->cluster_bits, rc;
      if (off < end)
        break;
      if ((r = qcow2_refcount_get (s, off, &rc)) < 0)
        return r;
      if (rc) {
        end = off + cs;
        break;
      }
    }
    break;
  }
  *next = MAX (end, cs);
  return 0;
}
