/* qcow2: rebuilding the refcounts of a dirty image.
 *
 * The incompatible DIRTY bit says the refcounts on disk may be stale: a
 * writer with lazy refcounts updates L2 tables without waiting for the
 * refcounts they rely on, and a crash leaves clusters in use that no
 * refcount counts.  Before anything is allocated, a read-write open
 * rebuilds the whole refcount structure from the metadata that
 * references clusters, as QEMU does ("Rebuilding refcount structure"):
 *
 *   1. Count, in memory, the references to every host cluster of the
 *      file: cluster 0 (the header; its extensions and the backing file
 *      name are inside it), the active L1 table, and for the active L1
 *      and each snapshot's L1 every L2 table it points to and every
 *      cluster those point to (a compressed cluster counts once in each
 *      host cluster its bytes touch), the snapshot table, and the bitmap
 *      directory, tables and data when the bitmaps extension is valid
 *      (its autoclear bit set).  The old refcount table and blocks are
 *      not counted: they are what is being replaced.  Every offset is
 *      checked on the way: unaligned, past the end of the file, or with
 *      reserved bits set fails the open before anything is written.
 *   2. Lay out a new refcount table and blocks at the end of the file,
 *      counting themselves: more clusters may need more blocks, and
 *      more blocks a bigger table, so the sizes are a fixed point (as
 *      in qcow2-create.c).  Blocks are dense: one per table entry up to
 *      the end of the new structure.
 *   3. Fix OFLAG_COPIED in the active L1 and L2 tables (set iff the
 *      refcount is exactly 1, never on compressed clusters), writing
 *      back the tables that change.
 *   4. Write the blocks and the table, sync; switch the header to the
 *      table (offset and size in one write), sync; clear DIRTY, sync.
 *
 * A crash before the last write leaves the image dirty, with COPIED
 * flags that agree with what the next repair computes, and the next
 * read-write open repairs it again.  The old refcount clusters become
 * unreferenced space with refcount 0.
 *
 * Memory: a 32-bit counter per host cluster of the file, at most
 * REPAIR_MAX_CLUSTERS of them; one cluster of buffer for L2 and bitmap
 * tables; a snapshot's L1 table whole (at most QCOW2_MAX_L1_SIZE, the
 * limit of the active one); the new refcount table whole (at most
 * QCOW2_MAX_REFTABLE_SIZE).
 *
 * Runs from qcow2_write_open, on the main thread, before the node is
 * visible to anyone: no lock, no other I/O in flight.
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "log.h"
#include "qcow2.h"
#include "utils.h"

/* 256 MiB of counters: 4 TiB of file with 64 KiB clusters. */
#define REPAIR_MAX_CLUSTERS     (UINT64_C (1) << 26)

/* QEMU's limits on what it reads (block/qcow2.h, qcow2-bitmap.c). */
#define MAX_SNAPSHOT_EXTRA      1024
#define SNAPSHOT_L1_OFFSET      0   /* u64 */
#define SNAPSHOT_L1_SIZE        8   /* u32 */
#define SNAPSHOT_ID_SIZE        12  /* u16 */
#define SNAPSHOT_NAME_SIZE      14  /* u16 */
#define SNAPSHOT_EXTRA_SIZE     36  /* u32 */

#define BITMAPS_EXT_SIZE        24  /* u32 nb, u32 reserved, u64 size, offset */
#define MAX_BITMAP_DIR_SIZE     (UINT64_C (64) << 20)
#define BITMAP_ENTRY_SIZE       24  /* fixed part of a directory entry */
#define MAX_BITMAP_TABLE_SIZE   UINT64_C (0x8000000)     /* entries */
#define BME_OFFSET_MASK         UINT64_C (0x00fffffffffffe00)
#define BME_RESERVED_MASK       UINT64_C (0xff000000000001fe)

#define DIV_ROUND_UP(n, d)      (((n) + (d) - 1) / (d))

struct repair {
  struct qcow2_state *s;
  const struct qcow2_info *info;
  uint64_t cs;                  /* cluster size */
  uint64_t file_size;           /* bytes, before the repair writes */
  uint64_t nr_clusters;         /* clusters starting below file_size */
  uint32_t *counts;             /* references to each of them */
  uint8_t *buf;                 /* one cluster: an L2 or bitmap table */
};

static uint64_t
get_be64 (const uint8_t *p)
{
  uint64_t v;

  memcpy (&v, p, 8);
  return be64toh (v);
}

static uint32_t
get_be32 (const uint8_t *p)
{
  uint32_t v;

  memcpy (&v, p, 4);
  return be32toh (v);
}

static uint16_t
get_be16 (const uint8_t *p)
{
  uint16_t v;

  memcpy (&v, p, 2);
  return be16toh (v);
}

/* Read [off, off + len) of the file; bytes past its end read as zero
 * (the last cluster of a file need not be whole).
 */
static int
read_meta (struct repair *r, void *buf, uint64_t len, uint64_t off,
           struct error **errp)
{
  uint64_t n = off < r->file_size ? MIN (len, r->file_size - off) : 0;
  int ret;

  memset ((char *) buf + n, 0, len - n);
  if (n == 0)
    return 0;
  ret = node_pread (r->s->file->node, buf, n, off, 0);
  if (ret < 0) {
    error_setg_errno (errp, -ret, "reading metadata at 0x%" PRIx64, off);
    return -1;
  }
  return 0;
}

/* Add one reference to each host cluster [off, off + len) touches.
 * They must all start inside the file.  On failure the message names
 * the range as @fs... describes it.
 */
static int count_range (struct repair *r, uint64_t off, uint64_t len,
                        struct error **errp, const char *fs, ...)
  __attribute__ ((format (printf, 5, 6)));

static int
count_range (struct repair *r, uint64_t off, uint64_t len,
             struct error **errp, const char *fs, ...)
{
  uint64_t end, first, last;
  bool past_eof, overflow = false;

  if (len == 0)
    return 0;
  first = off / r->cs;
  past_eof = ADD_OVERFLOW (off, len - 1, &end) ||
    (last = end / r->cs) >= r->nr_clusters;
  for (uint64_t c = first; !past_eof && c <= last && !overflow; ++c)
    overflow = r->counts[c] == UINT32_MAX;
  if (past_eof || overflow) {
    CLEANUP_FREE char *what = NULL;
    va_list ap;

    va_start (ap, fs);
    if (vasprintf (&what, fs, ap) == -1)
      what = NULL;
    va_end (ap);
    if (past_eof)
      error_setg (errp, "%s at 0x%" PRIx64 " (%" PRIu64 " bytes) is past "
                  "the end of the file (%" PRIu64 " bytes)",
                  what ? what : "metadata", off, len, r->file_size);
    else
      error_setg (errp, "%s at 0x%" PRIx64 " (%" PRIu64 " bytes) has too "
                  "many references", what ? what : "metadata", off, len);
    return -1;
  }
  for (uint64_t c = first; c <= last; ++c)
    r->counts[c]++;
  return 0;
}

/* ------------------------------------------------------------------ */
/* Counting */

/* Count what the L2 table at @l2 points to. */
static int
walk_l2 (struct repair *r, uint64_t l2, struct error **errp)
{
  const struct qcow2_info *info = r->info;
  uint64_t esize = info->l2_entry_size;

  if (read_meta (r, r->buf, r->cs, l2, errp) == -1)
    return -1;
  for (uint64_t i = 0; i < r->cs / esize; ++i) {
    uint64_t at = l2 + i * esize;
    uint64_t e = get_be64 (r->buf + i * esize);
    uint64_t bitmap = info->extended_l2 ? get_be64 (r->buf + i * esize + 8)
      : 0;
    uint64_t host = e & QCOW2_L2E_OFFSET_MASK;

    if (e & QCOW2_OFLAG_COMPRESSED) {
      struct qcow2_cdesc d;

      if (bitmap) {
        error_setg (errp, "compressed L2 entry at 0x%" PRIx64 " has a "
                    "subcluster bitmap (0x%" PRIx64 ")", at, bitmap);
        return -1;
      }
      qcow2_decode_compressed (info, e, &d);
      if (d.offset < r->cs) {
        error_setg (errp, "compressed cluster of L2 entry at 0x%" PRIx64
                    " is at 0x%" PRIx64 ", inside the header", at,
                    d.offset);
        return -1;
      }
      if (count_range (r, d.offset, d.size, errp, "compressed cluster of "
                       "L2 entry at 0x%" PRIx64, at) == -1)
        return -1;
      continue;
    }
    if (e & QCOW2_L2E_STD_RESERVED_MASK) {
      error_setg (errp, "L2 entry at 0x%" PRIx64 " (0x%" PRIx64 ") has "
                  "reserved bits set", at, e);
      return -1;
    }
    if (host == 0)
      continue;
    if (!IS_ALIGNED (host, r->cs)) {
      error_setg (errp, "data cluster 0x%" PRIx64 " of L2 entry at 0x%"
                  PRIx64 " is not cluster aligned", host, at);
      return -1;
    }
    if (count_range (r, host, r->cs, errp, "data cluster of L2 entry at 0x%"
                     PRIx64, at) == -1)
      return -1;
  }
  return 0;
}

/* Count the L2 tables of an L1 table (@l1: @n entries in host order,
 * @whose names it) and everything they point to.
 */
static int
walk_l1 (struct repair *r, const uint64_t *l1, uint64_t n, const char *whose,
         struct error **errp)
{
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t l2 = l1[i] & QCOW2_L1E_OFFSET_MASK;

    if (l1[i] & QCOW2_L1E_RESERVED_MASK) {
      error_setg (errp, "entry %" PRIu64 " of %s (0x%" PRIx64 ") has "
                  "reserved bits set", i, whose, l1[i]);
      return -1;
    }
    if (l2 == 0)
      continue;
    if (!IS_ALIGNED (l2, r->cs)) {
      error_setg (errp, "L2 table offset 0x%" PRIx64 " (entry %" PRIu64
                  " of %s) is not cluster aligned", l2, i, whose);
      return -1;
    }
    if (count_range (r, l2, r->cs, errp, "L2 table (entry %" PRIu64
                     " of %s)", i, whose) == -1 ||
        walk_l2 (r, l2, errp) == -1)
      return -1;
  }
  return 0;
}

/* The snapshot table, each snapshot's L1 table, and what they reach. */
static int
walk_snapshots (struct repair *r, struct error **errp)
{
  const struct qcow2_info *info = r->info;
  uint64_t pos = info->snapshots_offset;
  char whose[64];

  for (uint32_t i = 0; i < info->nb_snapshots; ++i) {
    uint8_t h[QCOW2_SNAPSHOT_HEADER_MIN];
    uint64_t l1_off, l1_bytes, len;
    uint32_t l1_size, extra;
    CLEANUP_FREE uint64_t *l1 = NULL;

    if (pos + sizeof h > r->file_size) {
      error_setg (errp, "snapshot %" PRIu32 " at 0x%" PRIx64 " is past the "
                  "end of the file", i, pos);
      return -1;
    }
    if (read_meta (r, h, sizeof h, pos, errp) == -1)
      return -1;
    l1_off = get_be64 (h + SNAPSHOT_L1_OFFSET);
    l1_size = get_be32 (h + SNAPSHOT_L1_SIZE);
    extra = get_be32 (h + SNAPSHOT_EXTRA_SIZE);
    if (extra > MAX_SNAPSHOT_EXTRA) {
      error_setg (errp, "snapshot %" PRIu32 " at 0x%" PRIx64 " has %" PRIu32
                  " bytes of extra data (at most %d)", i, pos, extra,
                  MAX_SNAPSHOT_EXTRA);
      return -1;
    }
    len = sizeof h + extra + get_be16 (h + SNAPSHOT_ID_SIZE) +
      get_be16 (h + SNAPSHOT_NAME_SIZE);
    pos += ROUND_UP (len, 8);
    if (pos > r->file_size) {
      error_setg (errp, "snapshot %" PRIu32 " ends at 0x%" PRIx64 ", past "
                  "the end of the file", i, pos);
      return -1;
    }
    if (l1_size == 0)
      continue;
    snprintf (whose, sizeof whose, "the L1 table of snapshot %" PRIu32, i);
    l1_bytes = (uint64_t) l1_size * QCOW2_L1E_SIZE;
    if (l1_bytes > QCOW2_MAX_L1_SIZE || !IS_ALIGNED (l1_off, r->cs) ||
        l1_off == 0) {
      error_setg (errp, "%s at 0x%" PRIx64 " with %" PRIu32 " entries is "
                  "too large, not cluster aligned or inside the header",
                  whose, l1_off, l1_size);
      return -1;
    }
    if (count_range (r, l1_off, l1_bytes, errp, "%s", whose) == -1)
      return -1;
    l1 = malloc (l1_bytes);
    if (l1 == NULL) {
      error_setg_errno (errp, errno, "allocating %s", whose);
      return -1;
    }
    if (read_meta (r, l1, l1_bytes, l1_off, errp) == -1)
      return -1;
    for (uint32_t j = 0; j < l1_size; ++j)
      l1[j] = be64toh (l1[j]);
    if (walk_l1 (r, l1, l1_size, whose, errp) == -1)
      return -1;
  }
  return count_range (r, info->snapshots_offset,
                      pos - info->snapshots_offset, errp, "snapshot table");
}

/* One bitmap's table and data clusters. */
static int
walk_bitmap_table (struct repair *r, uint32_t index, uint64_t table,
                   uint64_t entries, struct error **errp)
{
  uint64_t per = r->cs / 8;

  if (entries > MAX_BITMAP_TABLE_SIZE || !IS_ALIGNED (table, r->cs) ||
      table == 0) {
    error_setg (errp, "table of bitmap %" PRIu32 " at 0x%" PRIx64 " with %"
                PRIu64 " entries is too large, not cluster aligned or "
                "inside the header", index, table, entries);
    return -1;
  }
  if (count_range (r, table, entries * 8, errp, "table of bitmap %" PRIu32,
                   index) == -1)
    return -1;
  for (uint64_t j = 0; j < entries; j += per) {
    uint64_t n = MIN (per, entries - j);

    if (read_meta (r, r->buf, n * 8, table + j * 8, errp) == -1)
      return -1;
    for (uint64_t k = 0; k < n; ++k) {
      uint64_t e = get_be64 (r->buf + k * 8);
      uint64_t data = e & BME_OFFSET_MASK;

      if (e & BME_RESERVED_MASK) {
        error_setg (errp, "entry %" PRIu64 " of the table of bitmap %"
                    PRIu32 " (0x%" PRIx64 ") has reserved bits set",
                    j + k, index, e);
        return -1;
      }
      if (data == 0)
        continue;
      if (!IS_ALIGNED (data, r->cs)) {
        error_setg (errp, "data cluster 0x%" PRIx64 " of bitmap %" PRIu32
                    " is not cluster aligned", data, index);
        return -1;
      }
      if (count_range (r, data, r->cs, errp, "data cluster of bitmap %"
                       PRIu32, index) == -1)
        return -1;
    }
  }
  return 0;
}

/* The bitmap directory, tables and data, if the bitmaps extension is
 * valid (QEMU ignores it, and so counts nothing, when a program without
 * bitmap support cleared the autoclear bit).
 */
static int
walk_bitmaps (struct repair *r, struct error **errp)
{
  const struct qcow2_info *info = r->info;
  const struct qcow2_ext *ext = NULL;
  CLEANUP_FREE uint8_t *dir = NULL;
  uint64_t dir_size, dir_off, pos = 0;
  uint32_t nb;

  if (!(info->autoclear & QCOW2_AUTOCLEAR_BITMAPS))
    return 0;
  for (size_t i = 0; i < info->nr_exts; ++i)
    if (info->exts[i].type == QCOW2_EXT_BITMAPS)
      ext = &info->exts[i];
  if (ext == NULL)
    return 0;
  if (ext->len < BITMAPS_EXT_SIZE) {
    error_setg (errp, "bitmaps extension is too short (%" PRIu32 " bytes)",
                ext->len);
    return -1;
  }
  nb = get_be32 (ext->data);
  dir_size = get_be64 (ext->data + 8);
  dir_off = get_be64 (ext->data + 16);
  if (nb == 0)
    return 0;
  if (dir_size > MAX_BITMAP_DIR_SIZE || !IS_ALIGNED (dir_off, r->cs) ||
      dir_off == 0) {
    error_setg (errp, "bitmap directory at 0x%" PRIx64 " (%" PRIu64
                " bytes) is too large, not cluster aligned or inside the "
                "header", dir_off, dir_size);
    return -1;
  }
  if (count_range (r, dir_off, dir_size, errp, "bitmap directory") == -1)
    return -1;
  dir = malloc (dir_size ?: 1);
  if (dir == NULL) {
    error_setg_errno (errp, errno, "allocating the bitmap directory");
    return -1;
  }
  if (read_meta (r, dir, dir_size, dir_off, errp) == -1)
    return -1;
  for (uint32_t i = 0; i < nb; ++i) {
    uint64_t table, len;
    uint32_t entries;

    if (dir_size - pos < BITMAP_ENTRY_SIZE) {
      error_setg (errp, "bitmap %" PRIu32 " runs past the end of the bitmap "
                  "directory at 0x%" PRIx64, i, dir_off);
      return -1;
    }
    table = get_be64 (dir + pos);
    entries = get_be32 (dir + pos + 8);
    len = BITMAP_ENTRY_SIZE + (uint64_t) get_be32 (dir + pos + 20) +
      get_be16 (dir + pos + 18);
    if (ROUND_UP (len, 8) > dir_size - pos) {
      error_setg (errp, "bitmap %" PRIu32 " runs past the end of the bitmap "
                  "directory at 0x%" PRIx64, i, dir_off);
      return -1;
    }
    pos += ROUND_UP (len, 8);
    if (entries > 0 &&
        walk_bitmap_table (r, i, table, entries, errp) == -1)
      return -1;
  }
  return 0;
}

/* Everything that references clusters, except the refcount structure. */
static int
count_all (struct repair *r, struct error **errp)
{
  const struct qcow2_info *info = r->info;

  if (count_range (r, 0, r->cs, errp, "header") == -1 ||
      count_range (r, info->l1_offset,
                   (uint64_t) info->l1_size * QCOW2_L1E_SIZE, errp,
                   "active L1 table") == -1 ||
      walk_l1 (r, r->s->l1, info->l1_size, "the active L1 table",
               errp) == -1 ||
      walk_snapshots (r, errp) == -1 ||
      walk_bitmaps (r, errp) == -1)
    return -1;
  return 0;
}

/* What the counts must satisfy before they are written: nothing else
 * in the header or the active L1 table, and every count fits.
 */
static int
check_counts (struct repair *r, uint64_t *in_use, struct error **errp)
{
  const struct qcow2_info *info = r->info;
  uint32_t bits = UINT32_C (1) << info->refcount_order;
  uint64_t max = bits >= 32 ? UINT32_MAX : (UINT64_C (1) << bits) - 1;
  uint64_t l1_first = info->l1_offset / r->cs;
  uint64_t l1_end = DIV_ROUND_UP (info->l1_offset +
                                  (uint64_t) info->l1_size * 8, r->cs);

  *in_use = 0;
  for (uint64_t c = 0; c < r->nr_clusters; ++c) {
    bool exclusive = c == 0 || (info->l1_size > 0 && c >= l1_first &&
                                c < l1_end);

    if (exclusive && r->counts[c] != 1) {
      error_setg (errp, "cluster 0x%" PRIx64 " of the %s is referenced %"
                  PRIu32 " times: it overlaps other metadata or data",
                  c * r->cs, c == 0 ? "header" : "active L1 table",
                  r->counts[c]);
      return -1;
    }
    if (r->counts[c] > max) {
      error_setg (errp, "cluster 0x%" PRIx64 " is referenced %" PRIu32
                  " times, more than %" PRIu32 "-bit refcounts can count",
                  c * r->cs, r->counts[c], bits);
      return -1;
    }
    *in_use += r->counts[c] > 0;
  }
  return 0;
}

/* ------------------------------------------------------------------ */
/* Writing */

/* OFLAG_COPIED in the active L1 and L2 tables: set iff the cluster's
 * refcount is 1.  Tables that change are written back (not synced).
 */
static int
fix_copied (struct repair *r, uint64_t *fixed, struct error **errp)
{
  struct qcow2_state *s = r->s;
  const struct qcow2_info *info = r->info;
  uint64_t esize = info->l2_entry_size;
  bool l1_changed = false;
  int ret;

  for (uint64_t i = 0; i < info->l1_size; ++i) {
    uint64_t l2 = s->l1[i] & QCOW2_L1E_OFFSET_MASK;
    bool changed = false;

    if (l2 == 0)
      continue;
    if ((r->counts[l2 / r->cs] == 1) != !!(s->l1[i] & QCOW2_OFLAG_COPIED)) {
      s->l1[i] ^= QCOW2_OFLAG_COPIED;
      l1_changed = true;
      ++*fixed;
    }
    if (read_meta (r, r->buf, r->cs, l2, errp) == -1)
      return -1;
    for (uint64_t j = 0; j < r->cs / esize; ++j) {
      uint64_t e = get_be64 (r->buf + j * esize);
      uint64_t host = e & QCOW2_L2E_OFFSET_MASK;
      bool want;

      if (e & QCOW2_OFLAG_COMPRESSED)
        want = false;
      else if (host == 0)
        continue;
      else
        want = r->counts[host / r->cs] == 1;
      if (want != !!(e & QCOW2_OFLAG_COPIED)) {
        e = htobe64 (e ^ QCOW2_OFLAG_COPIED);
        memcpy (r->buf + j * esize, &e, 8);
        changed = true;
        ++*fixed;
      }
    }
    if (changed) {
      if ((ret = node_pwrite (s->file->node, r->buf, r->cs, l2, 0)) < 0) {
        error_setg_errno (errp, -ret, "writing the L2 table at 0x%" PRIx64,
                          l2);
        return -1;
      }
      for (uint64_t at = 0; at < r->cs; at += s->l2_slice_size)
        qcow2_cache_discard (s->l2_cache, l2 + at);
    }
  }
  if (l1_changed) {
    uint64_t bytes = (uint64_t) info->l1_size * QCOW2_L1E_SIZE;
    CLEANUP_FREE uint64_t *be = malloc (bytes);

    if (be == NULL) {
      error_setg_errno (errp, errno, "allocating the L1 table");
      return -1;
    }
    for (uint64_t i = 0; i < info->l1_size; ++i)
      be[i] = htobe64 (s->l1[i]);
    if ((ret = node_pwrite (s->file->node, be, bytes, info->l1_offset, 0)) < 0) {
      error_setg_errno (errp, -ret, "writing the L1 table at 0x%" PRIx64,
                        info->l1_offset);
      return -1;
    }
  }
  return 0;
}

/* The new refcount table (@rt clusters at @base) and blocks (@rb
 * clusters after it): blocks first, then the table, then a sync.
 */
static int
write_refcounts (struct repair *r, uint64_t base, uint64_t rt, uint64_t rb,
                 struct error **errp)
{
  struct qcow2_state *s = r->s;
  const struct qcow2_info *info = r->info;
  uint64_t pb = (r->cs * 8) >> info->refcount_order;
  uint64_t first_new = base / r->cs;
  uint64_t total = first_new + rt + rb;
  CLEANUP_FREE uint64_t *table = calloc (rt * r->cs / 8, 8);
  int ret;

  if (table == NULL) {
    error_setg_errno (errp, errno, "allocating the refcount table");
    return -1;
  }
  for (uint64_t i = 0; i < rb; ++i) {
    uint64_t block = base + (rt + i) * r->cs;

    memset (r->buf, 0, r->cs);
    for (uint64_t c = i * pb; c < MIN ((i + 1) * pb, total); ++c) {
      uint64_t v = c < r->nr_clusters ? r->counts[c] : 1;
      if (v)
        qcow2_refcount_store (info, r->buf, c - i * pb, v);
    }
    if ((ret = node_pwrite (s->file->node, r->buf, r->cs, block, 0)) < 0) {
      error_setg_errno (errp, -ret, "writing a refcount block at 0x%"
                        PRIx64, block);
      return -1;
    }
    table[i] = htobe64 (block);
  }
  if ((ret = node_pwrite (s->file->node, table, rt * r->cs, base, 0)) < 0 ||
      (ret = node_flush (s->file->node)) < 0) {
    error_setg_errno (errp, -ret, "writing the refcount table at 0x%"
                      PRIx64, base);
    return -1;
  }
  return 0;
}

/* Point the header at the new table: offset and size in one write. */
static int
switch_reftable (struct repair *r, uint64_t base, uint64_t rt,
                 struct error **errp)
{
  struct qcow2_state *s = r->s;
  uint8_t hdr[12];
  uint64_t o = htobe64 (base);
  uint32_t c = htobe32 ((uint32_t) rt);
  int ret;

  memcpy (hdr, &o, 8);
  memcpy (hdr + 8, &c, 4);
  if ((ret = node_pwrite (s->file->node, hdr, sizeof hdr,
                          QCOW2_HDR_REFCOUNT_TABLE_OFFSET, 0)) < 0 ||
      (ret = node_flush (s->file->node)) < 0) {
    error_setg_errno (errp, -ret, "switching the header to the new refcount "
                      "table");
    return -1;
  }
  s->info.reftable_offset = base;
  s->info.reftable_clusters = rt;
  return 0;
}

static int
rebuild (struct repair *r, struct error **errp)
{
  struct qcow2_state *s = r->s;
  const struct qcow2_info *info = r->info;
  uint64_t pb = (r->cs * 8) >> info->refcount_order;
  uint64_t per_table_cluster = r->cs / QCOW2_REFTE_SIZE;
  uint64_t rt = 0, rb = 0, in_use, fixed = 0, base;
  int ret;

  if (r->nr_clusters > REPAIR_MAX_CLUSTERS) {
    error_setg (errp, "the file has %" PRIu64 " clusters, more than the %"
                PRIu64 " the repair counts in memory (repair it with "
                "'qemu-img check -r all')", r->nr_clusters,
                REPAIR_MAX_CLUSTERS);
    return -1;
  }
  r->counts = calloc (r->nr_clusters, sizeof *r->counts);
  r->buf = malloc (r->cs);
  if (r->counts == NULL || r->buf == NULL) {
    error_setg_errno (errp, ENOMEM, "allocating %" PRIu64 " counters",
                      r->nr_clusters);
    return -1;
  }
  if (count_all (r, errp) == -1 || check_counts (r, &in_use, errp) == -1)
    return -1;

  /* The new structure's size, counting itself. */
  for (;;) {
    uint64_t total = r->nr_clusters + rt + rb;
    uint64_t new_rb = DIV_ROUND_UP (total, pb);
    uint64_t new_rt = DIV_ROUND_UP (new_rb, per_table_cluster);

    if (new_rb == rb && new_rt == rt)
      break;
    rb = new_rb;
    rt = new_rt;
  }
  if (rt * r->cs > QCOW2_MAX_REFTABLE_SIZE) {
    error_setg (errp, "the refcount table would need %" PRIu64 " clusters, "
                "more than QEMU's limit of %" PRIu64 " bytes", rt,
                QCOW2_MAX_REFTABLE_SIZE);
    return -1;
  }
  base = r->nr_clusters * r->cs;

  /* Nothing was written so far; from here on the image stays dirty
   * until the last step.
   */
  s->file->node->growable = true;
  if (fix_copied (r, &fixed, errp) == -1 ||
      write_refcounts (r, base, rt, rb, errp) == -1 ||
      switch_reftable (r, base, rt, errp) == -1)
    return -1;
  if ((ret = qcow2_write_incompat (s, info->incompat &
                                   ~QCOW2_INCOMPAT_DIRTY)) < 0) {
    error_setg_errno (errp, -ret, "clearing the dirty bit");
    return -1;
  }
  s->dirty = false;

  /* The caches may hold slices of the old structure. */
  qcow2_cache_discard_all (s->refcount_cache);
  qcow2_cache_discard_all (s->l2_cache);
  nbdd_info ("qcow2: %s: rebuilt refcounts (%" PRIu64 " clusters in use) "
             "after an unclean shutdown", s->filename, in_use + rt + rb);
  debug ("qcow2: %s: new refcount table at 0x%" PRIx64 " (%" PRIu64
         " clusters, %" PRIu64 " blocks), %" PRIu64 " COPIED flags fixed",
         s->filename, base, rt, rb, fixed);
  return 0;
}

int
qcow2_repair_refcounts (struct qcow2_state *s, struct error **errp)
{
  struct repair r = {
    .s = s,
    .info = &s->info,
    .cs = s->info.cluster_size,
    .file_size = node_size (s->file->node),
  };
  int ret;

  r.nr_clusters = DIV_ROUND_UP (r.file_size, r.cs);
  ret = rebuild (&r, errp);
  if (ret == -1)
    error_prepend (errp, "qcow2: %s: cannot repair", s->filename);
  free (r.counts);
  free (r.buf);
  return ret;
}
