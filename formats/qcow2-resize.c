/* Growing a qcow2 image (block_resize): the L1 table grows when the
 * new size needs more L2 tables, then the header takes the new size.
 *
 * Ordering, as for the refcount table: the new L1 table (and the
 * refcounts of its clusters) is written and synced, the header points
 * at it in one write (size and offset are neighbours), synced, and only
 * then is the old table freed.  A crash before the switch leaves the
 * old table in use and a leaked cluster; after it, the new one.  The
 * virtual size is written last: an image never claims a size its L1
 * table cannot map.
 *
 * Shrinking is refused, as QEMU does unless told it may lose data.
 * Control path: the node is drained (driver.h's truncate).
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "qcow2.h"

/* Header fields (QEMU's qcow2.txt): size at 24, then crypt_method,
 * l1_size at 36 and l1_table_offset at 40.
 */
#define HDR_SIZE        24
#define HDR_L1_SIZE     36

static uint64_t
l1_entries_for (const struct qcow2_info *info, uint64_t size)
{
  uint64_t l2_entries = UINT64_C (1) << info->l2_bits;
  uint64_t clusters = size / info->cluster_size +
    (size % info->cluster_size != 0);

  return clusters / l2_entries + (clusters % l2_entries != 0);
}

static int
grow_l1 (struct qcow2_state *s, uint64_t entries)
{
  struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  uint64_t bytes = entries * 8;
  uint64_t nclusters = (bytes + cs - 1) / cs;
  uint64_t old_offset = info->l1_offset;
  uint64_t old_clusters = ((uint64_t) info->l1_size * 8 + cs - 1) / cs;
  uint64_t offset, *table, *l1;
  uint8_t hdr[12];
  int64_t got;
  int r;

  if (bytes > QCOW2_MAX_L1_SIZE)
    return -EFBIG;
  /* The table must be contiguous: an allocation stops where a refcount
   * block's range does, and the next one starts in a fresh range.
   */
  got = qcow2_alloc_clusters (s, nclusters, &offset);
  if (got >= 0 && (uint64_t) got < nclusters) {
    if ((r = qcow2_free_clusters (s, offset, got)) < 0)
      return r;
    got = qcow2_alloc_clusters (s, nclusters, &offset);
    if (got >= 0 && (uint64_t) got < nclusters) {
      qcow2_free_clusters (s, offset, got);
      return -EFBIG;
    }
  }
  if (got < 0)
    return got;

  table = calloc (nclusters * cs / 8, 8);
  if (table == NULL) {
    qcow2_free_clusters (s, offset, nclusters);
    return -ENOMEM;
  }
  for (uint32_t i = 0; i < info->l1_size; ++i)
    table[i] = htobe64 (s->l1[i]);
  if ((r = qcow2_cache_flush (s->refcount_cache)) < 0 ||
      (r = node_pwrite (s->file->node, table, nclusters * cs, offset,
                        0)) < 0 ||
      (r = node_flush (s->file->node)) < 0) {
    free (table);
    qcow2_free_clusters (s, offset, nclusters);
    return r;
  }
  free (table);

  {
    uint32_t n = htobe32 ((uint32_t) entries);
    uint64_t o = htobe64 (offset);
    memcpy (hdr, &n, 4);
    memcpy (hdr + 4, &o, 8);
  }
  if ((r = node_pwrite (s->file->node, hdr, sizeof hdr, HDR_L1_SIZE,
                        0)) < 0 ||
      (r = node_flush (s->file->node)) < 0)
    return r;                   /* which table is in use is unknown now */

  l1 = realloc (s->l1, entries * sizeof *l1);
  if (l1 == NULL)
    return qcow2_corrupt (s, "out of memory growing the L1 table");
  memset (l1 + info->l1_size, 0, (entries - info->l1_size) * sizeof *l1);
  s->l1 = l1;
  qcow2_meta_remove (s, old_offset, old_clusters * cs);
  info->l1_offset = offset;
  info->l1_size = entries;
  if ((r = qcow2_meta_add (s, offset, nclusters * cs, QCOW2_META_L1)) < 0)
    return r;
  debug ("qcow2: %s: L1 table grown to %" PRIu64 " entries at 0x%" PRIx64,
         s->filename, entries, offset);
  return old_clusters ? qcow2_free_clusters (s, old_offset, old_clusters) : 0;
}

int
qcow2_truncate (struct node *node, uint64_t size)
{
  struct qcow2_state *s = node->opaque;
  struct qcow2_info *info = &s->info;
  uint64_t entries, be;
  int r = 0;

  if (node->read_only)
    return -EROFS;
  if (size == info->size)
    return 0;
  if (size < info->size)
    return -ENOTSUP;
  if (size % 512 != 0 || size > INT64_MAX)
    return -EINVAL;
  entries = l1_entries_for (info, size);
  if (entries > UINT32_MAX)
    return -EFBIG;

  pthread_mutex_lock (&s->lock);
  if (entries > info->l1_size)
    r = grow_l1 (s, entries);
  if (r == 0) {
    be = htobe64 (size);
    if ((r = node_pwrite (s->file->node, &be, 8, HDR_SIZE, 0)) == 0)
      r = node_flush (s->file->node);
  }
  if (r == 0) {
    info->size = size;
    __atomic_store_n (&node->size, size, __ATOMIC_RELEASE);
  }
  pthread_mutex_unlock (&s->lock);
  return r;
}
