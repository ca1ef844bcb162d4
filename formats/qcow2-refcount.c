/* qcow2: refcount lookup.
 *
 * Two levels: the refcount table (contiguous, 8-byte entries) points
 * to refcount blocks of one cluster each, holding 2^refcount_order-bit
 * counts: sub-byte widths packed from the least significant bit, wider
 * ones big endian.  Both levels go through the refcount cache, slice by
 * slice, so a lookup pins at most one slice at a time.
 *
 * The read path does not need refcounts; the write side and a future
 * check do.  Kept here so that the cache and the layout are exercised
 * by the unit test from the start.
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "qcow2.h"
#include "utils.h"

/* Read @len bytes at host offset @off through the refcount cache
 * (@len divides the slice size, @off is aligned to @len).
 */
static int
rc_read (struct qcow2_state *s, uint64_t off, void *buf, size_t len)
{
  struct qcow2_cache_entry *e;
  const void *slice;
  uint64_t base = ROUND_DOWN (off, (uint64_t) s->rc_slice_size);
  int r = qcow2_cache_get (s->refcount_cache, base, &e, &slice);

  if (r < 0)
    return r;
  memcpy (buf, (const char *) slice + (off - base), len);
  qcow2_cache_put (s->refcount_cache, e);
  return 0;
}

int
qcow2_refcount_get (struct qcow2_state *s, uint64_t host_offset,
                    uint64_t *refcount)
{
  const struct qcow2_info *info = &s->info;
  uint32_t bits = UINT32_C (1) << info->refcount_order;
  uint64_t per_block = (info->cluster_size * 8) >> info->refcount_order;
  uint64_t cluster = host_offset >> info->cluster_bits;
  uint64_t table_index = cluster / per_block;
  uint64_t block_index = cluster % per_block;
  uint64_t entries = (uint64_t) info->reftable_clusters *
    info->cluster_size / 8;
  uint64_t rte, block, bitoff;
  int r;

  if (table_index >= entries) {
    *refcount = 0;              /* beyond the table: free */
    return 0;
  }
  r = rc_read (s, info->reftable_offset + table_index * 8, &rte, 8);
  if (r < 0)
    return r;
  block = be64toh (rte) & QCOW2_REFT_OFFSET_MASK;
  if (block == 0) {
    *refcount = 0;
    return 0;
  }
  if (!IS_ALIGNED (block, info->cluster_size) || block >= node_size (s->file->node))
    return qcow2_corrupt (s, "refcount block offset 0x%" PRIx64 " (refcount "
                          "table index %" PRIu64 ") is not cluster aligned "
                          "or past the end of the file", block, table_index);

  bitoff = block_index * bits;
  if (bits < 8) {
    uint8_t b;
    if ((r = rc_read (s, block + bitoff / 8, &b, 1)) < 0)
      return r;
    *refcount = (b >> (bitoff % 8)) & ((1u << bits) - 1);
  }
  else {
    uint8_t v[8];
    size_t n = bits / 8;
    if ((r = rc_read (s, block + bitoff / 8, v, n)) < 0)
      return r;
    *refcount = 0;
    for (size_t i = 0; i < n; ++i)
      *refcount = (*refcount << 8) | v[i];
  }
  return 0;
}
