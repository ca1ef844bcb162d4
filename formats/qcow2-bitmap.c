/* qcow2: persistent dirty bitmaps (the bitmaps extension).
 *
 * On disk (QEMU's docs/interop/qcow2.txt, "Bitmaps"): header extension
 * 0x23852875 (24 bytes, qcow2-format.h) points at the bitmap directory,
 * a contiguous run of variable-length entries; each entry points at its
 * bitmap table, a contiguous array of u64 entries, one per cluster of
 * serialized bits: a data cluster offset, or 0 for a cluster of zeroes
 * (bit 0 set: of ones).  The extension is valid only while the header's
 * autoclear bit 0 is set: a writer that does not know bitmaps clears
 * it, and QEMU then ignores (and drops) the extension.
 *
 * Load: at open (qcow2_bitmaps_open), once.  Everything is checked with
 * QEMU's rules (qemu/qemu block/qcow2.c, block/qcow2-bitmap.c), since
 * an image past one of them does not open in QEMU at all, plus what a
 * hostile image needs: every structure inside the file, clear of the
 * header, L1 table and refcount table (and, on a writable node, of all
 * the metadata qcow2-overlap.c maps), and no cluster used twice by the
 * bitmaps themselves.  Names are unique and hold no NUL.  The tables
 * are kept in memory: all of them together fit in the file (checked
 * before anything is read), so memory is bounded by the file size.
 * Padding bytes are not checked: QEMU does not either.
 *
 * The rule for writers (QEMU's): an image opened read-write by a writer
 * that does not update a bitmap must not leave that bitmap looking
 * valid.  So a read-write open sets IN_USE on every bitmap, in the
 * directory, before the first write (qcow2_bitmaps_write_open); QEMU
 * then treats them as inconsistent until someone stores them again
 * with IN_USE clear, which is qcow2_bitmaps_store's job, done for the
 * daemon by the bitmap layer at a clean close.  A read-write open of
 * an image whose extension is broken is refused: IN_USE cannot be set
 * in a directory that cannot be parsed, and QEMU might still trust
 * what we do not.  A stale extension (autoclear bit clear) is dropped
 * from the header at a read-write open, as QEMU does.
 *
 * Each bitmap carries 'trusted': its data on disk is its contents (it
 * was not IN_USE when loaded, or this node stored it clean).  IN_USE
 * set by this node's own open does not change it; IN_USE found at open
 * (a crash) does.  Only trusted bitmaps can be read, and clearing
 * IN_USE never touches an untrusted one.
 *
 * Store (qcow2_bitmaps_store) writes a complete new set, QEMU's way
 * (qcow2_store_persistent_dirty_bitmaps): new data clusters (an all-zero
 * cluster is a 0 table entry, not a cluster), new tables, a new
 * directory, the refcounts, sync; then one header write switches the
 * extension and the autoclear bit, sync; then the old clusters are
 * freed.  A crash at any point leaves the old or the new set, and at
 * worst leaked clusters (refcount 1, unreferenced: 'qemu-img check'
 * reports leaks, not corruption).
 *
 * Locking: everything here runs under s->lock (the allocator's lock),
 * on the control path.
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "log.h"
#include "qcow2.h"
#include "utils.h"

#define DIV_ROUND_UP(n, d)      (((n) + (d) - 1) / (d))

/* One directory entry, checked, with its table. */
struct bm_entry {
  char *name;
  uint32_t flags;               /* as on disk */
  uint8_t gran_bits;
  uint64_t table_offset;
  uint32_t table_size;          /* entries */
  uint64_t *table;              /* host order, table_size entries */
  bool trusted;                 /* the data on disk is the bitmap's */
};

enum bm_state {
  BM_NONE,                      /* no extension */
  BM_STALE,                     /* an extension, autoclear bit clear */
  BM_VALID,
  BM_BROKEN,                    /* an extension QEMU would refuse */
};

struct qcow2_bitmaps {
  enum bm_state state;
  char *error;                  /* BM_BROKEN: why */
  uint64_t dir_offset, dir_size;
  size_t n;
  struct bm_entry *e;
};

static uint16_t
get_be16 (const uint8_t *p)
{
  uint16_t v;

  memcpy (&v, p, 2);
  return be16toh (v);
}

static uint32_t
get_be32 (const uint8_t *p)
{
  uint32_t v;

  memcpy (&v, p, 4);
  return be32toh (v);
}

static uint64_t
get_be64 (const uint8_t *p)
{
  uint64_t v;

  memcpy (&v, p, 8);
  return be64toh (v);
}

static void
put_be16 (uint8_t *p, uint16_t v)
{
  v = htobe16 (v);
  memcpy (p, &v, 2);
}

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

static void
entries_free (struct bm_entry *e, size_t n)
{
  for (size_t i = 0; i < n && e; ++i) {
    free (e[i].name);
    free (e[i].table);
  }
  free (e);
}

static void
bitmaps_reset (struct qcow2_bitmaps *b)
{
  entries_free (b->e, b->n);
  free (b->error);
  memset (b, 0, sizeof *b);
}

/* Table entries for a bitmap of @size guest bytes: one per cluster of
 * serialized bits.
 */
static uint64_t
table_entries_for (const struct qcow2_info *info, uint64_t size,
                   unsigned gran_bits)
{
  uint64_t bits = DIV_ROUND_UP (size, UINT64_C (1) << gran_bits);

  return DIV_ROUND_UP (bits, info->cluster_size * 8);
}

static const struct qcow2_ext *
find_ext (const struct qcow2_info *info)
{
  for (size_t i = 0; i < info->nr_exts; ++i)
    if (info->exts[i].type == QCOW2_EXT_BITMAPS)
      return &info->exts[i];
  return NULL;
}

static bool
clusters_meet (uint64_t cs, uint64_t a, uint64_t alen, uint64_t b,
               uint64_t blen)
{
  if (alen == 0 || blen == 0)
    return false;
  return ROUND_DOWN (a, cs) < ROUND_UP (b + blen, cs) &&
    ROUND_DOWN (b, cs) < ROUND_UP (a + alen, cs);
}

/* What other metadata shares a cluster with [off, off + len) (inside
 * the file, so no overflow), or NULL.
 */
static const char *
overlaps (struct qcow2_state *s, uint64_t off, uint64_t len)
{
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;

  if (off < cs)
    return "the header";
  if (clusters_meet (cs, off, len, info->l1_offset,
                     (uint64_t) info->l1_size * QCOW2_L1E_SIZE))
    return "the L1 table";
  if (clusters_meet (cs, off, len, info->reftable_offset,
                     (uint64_t) info->reftable_clusters * cs))
    return "the refcount table";
  if (s->meta) {
    for (uint64_t c = ROUND_DOWN (off, cs); c < off + len; c += cs) {
      int k = qcow2_meta_kind (s, c);
      if (k && k != QCOW2_META_BITMAP_DIR && k != QCOW2_META_BITMAP_TABLE &&
          k != QCOW2_META_BITMAP_DATA)
        return "other metadata";
    }
  }
  return NULL;
}

static int
cmp_u64 (const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;

  return x < y ? -1 : x > y;
}

static int
cmp_name (const void *a, const void *b)
{
  return strcmp (*(const char *const *) a, *(const char *const *) b);
}

/* The first name of @names (@n of them) that appears twice, or NULL.
 * Sorts a copy: directories hold up to 65535 names.
 */
static const char *
duplicate_name (const char *const *names, size_t n, bool *nomem)
{
  CLEANUP_FREE const char **v = malloc ((n ?: 1) * sizeof *v);

  *nomem = v == NULL;
  if (v == NULL)
    return NULL;
  memcpy (v, names, n * sizeof *v);
  qsort (v, n, sizeof *v, cmp_name);
  for (size_t i = 1; i < n; ++i)
    if (strcmp (v[i - 1], v[i]) == 0)
      return v[i];
  return NULL;
}

/* ------------------------------------------------------------------ */
/* Loading and checking */

/* The tables of the entries in @b, read and checked; then no cluster
 * used twice among the directory, the tables and the data.
 */
static int
load_tables (struct qcow2_state *s, struct qcow2_bitmaps *b,
             struct error **errp)
{
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  uint64_t fsize = node_size (s->file->node);
  uint64_t max_clusters = DIV_ROUND_UP (fsize, cs);
  uint64_t total = 0, nc = 0;
  CLEANUP_FREE uint64_t *used = NULL;
  int r;

  /* Tables that do not overlap all fit in the file: this bounds what
   * is read and kept, whatever the directory says.
   */
  for (size_t i = 0; i < b->n; ++i) {
    total += (uint64_t) b->e[i].table_size * 8;
    if (total > fsize) {
      error_setg (errp, "the bitmap tables (%" PRIu64 " bytes so far) do "
                  "not fit in the file (%" PRIu64 " bytes): they overlap",
                  total, fsize);
      return -1;
    }
  }

  for (size_t i = 0; i < b->n; ++i) {
    struct bm_entry *e = &b->e[i];
    uint64_t bytes = (uint64_t) e->table_size * 8, end;
    const char *what;

    if (ADD_OVERFLOW (e->table_offset, bytes, &end) || end > fsize) {
      error_setg (errp, "bitmap '%s': table at 0x%" PRIx64 " (%" PRIu64
                  " bytes) is past the end of the file (%" PRIu64 " bytes)",
                  e->name, e->table_offset, bytes, fsize);
      return -1;
    }
    if ((what = overlaps (s, e->table_offset, bytes)) != NULL) {
      error_setg (errp, "bitmap '%s': table at 0x%" PRIx64 " overlaps %s",
                  e->name, e->table_offset, what);
      return -1;
    }
    e->table = malloc (bytes);
    if (e->table == NULL) {
      error_setg_errno (errp, errno, "bitmap '%s': allocating its table",
                        e->name);
      return -1;
    }
    if ((r = node_pread (s->file->node, e->table, bytes, e->table_offset,
                         0)) < 0) {
      error_setg_errno (errp, -r, "bitmap '%s': reading its table at 0x%"
                        PRIx64, e->name, e->table_offset);
      return -1;
    }
    nc += DIV_ROUND_UP (bytes, cs);
    for (uint32_t j = 0; j < e->table_size; ++j) {
      uint64_t v = be64toh (e->table[j]);
      uint64_t data = v & QCOW2_BMT_OFFSET_MASK;

      e->table[j] = v;
      if (v & QCOW2_BMT_RESERVED_MASK) {
        error_setg (errp, "bitmap '%s': table entry %" PRIu32 " (0x%" PRIx64
                    ") has reserved bits set", e->name, j, v);
        return -1;
      }
      if (data == 0)
        continue;
      if (v & QCOW2_BMT_ALL_ONES) {
        error_setg (errp, "bitmap '%s': table entry %" PRIu32 " (0x%" PRIx64
                    ") has both a data offset and the all-ones bit",
                    e->name, j, v);
        return -1;
      }
      if (!IS_ALIGNED (data, cs) || data >= fsize) {
        error_setg (errp, "bitmap '%s': data cluster 0x%" PRIx64 " (table "
                    "entry %" PRIu32 ") is not cluster aligned or past the "
                    "end of the file (%" PRIu64 " bytes)", e->name, data, j,
                    fsize);
        return -1;
      }
      if ((what = overlaps (s, data, cs)) != NULL) {
        error_setg (errp, "bitmap '%s': data cluster 0x%" PRIx64 " (table "
                    "entry %" PRIu32 ") overlaps %s", e->name, data, j, what);
        return -1;
      }
      nc++;
    }
  }

  /* Every cluster once: more than the file holds cannot be. */
  nc += DIV_ROUND_UP (b->dir_size, cs);
  if (nc > max_clusters) {
    error_setg (errp, "the bitmaps use %" PRIu64 " clusters, more than the "
                "file has (%" PRIu64 "): they overlap", nc, max_clusters);
    return -1;
  }
  used = malloc ((nc ?: 1) * sizeof *used);
  if (used == NULL) {
    error_setg_errno (errp, errno, "checking the bitmap clusters");
    return -1;
  }
  nc = 0;
  for (uint64_t c = 0; c < DIV_ROUND_UP (b->dir_size, cs); ++c)
    used[nc++] = b->dir_offset / cs + c;
  for (size_t i = 0; i < b->n; ++i) {
    const struct bm_entry *e = &b->e[i];
    for (uint64_t c = 0; c < DIV_ROUND_UP ((uint64_t) e->table_size * 8, cs);
         ++c)
      used[nc++] = e->table_offset / cs + c;
    for (uint32_t j = 0; j < e->table_size; ++j)
      if (e->table[j] & QCOW2_BMT_OFFSET_MASK)
        used[nc++] = (e->table[j] & QCOW2_BMT_OFFSET_MASK) / cs;
  }
  qsort (used, nc, sizeof *used, cmp_u64);
  for (uint64_t k = 1; k < nc; ++k)
    if (used[k] == used[k - 1]) {
      error_setg (errp, "the bitmaps use the cluster at 0x%" PRIx64 " more "
                  "than once", used[k] * cs);
      return -1;
    }
  return 0;
}

/* One directory entry at @p (@left bytes to the directory's end): its
 * size in *esize.  On failure the entry may hold a name to free.
 */
static int
parse_entry (struct qcow2_state *s, const uint8_t *p, uint64_t left,
             size_t index, struct bm_entry *e, uint64_t *esize,
             struct error **errp)
{
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  uint16_t name_size;
  uint32_t extra;
  uint8_t type;
  uint64_t want;
  const char *name;

  if (left < QCOW2_BME_HEADER_SIZE) {
    error_setg (errp, "bitmap directory entry %zu is truncated", index);
    return -1;
  }
  name_size = get_be16 (p + QCOW2_BME_NAME_SIZE);
  extra = get_be32 (p + QCOW2_BME_EXTRA_DATA_SIZE);
  *esize = ROUND_UP (QCOW2_BME_HEADER_SIZE + (uint64_t) extra + name_size,
                     (uint64_t) 8);
  if (*esize > left) {
    error_setg (errp, "bitmap directory entry %zu runs past the end of the "
                "directory", index);
    return -1;
  }
  if (extra != 0) {
    error_setg (errp, "bitmap directory entry %zu has %" PRIu32 " bytes of "
                "extra data (not supported, as in QEMU)", index, extra);
    return -1;
  }
  if (name_size == 0 || name_size > QCOW2_BME_MAX_NAME_SIZE) {
    error_setg (errp, "bitmap directory entry %zu has a name of %" PRIu16
                " bytes (must be 1 to %d)", index, name_size,
                QCOW2_BME_MAX_NAME_SIZE);
    return -1;
  }
  name = (const char *) p + QCOW2_BME_HEADER_SIZE;
  if (memchr (name, 0, name_size)) {
    error_setg (errp, "bitmap directory entry %zu has a name with a NUL "
                "byte", index);
    return -1;
  }
  /* Not strndup: the name may end the directory, with no byte after
   * it to read.
   */
  e->name = malloc (name_size + 1);
  if (e->name)
    memcpy (e->name, name, name_size), e->name[name_size] = '\0';
  if (e->name == NULL) {
    error_setg_errno (errp, errno, "reading the bitmap directory");
    return -1;
  }
  /* From here on the bitmap has a name to report. */
  e->table_offset = get_be64 (p + QCOW2_BME_TABLE_OFFSET);
  e->table_size = get_be32 (p + QCOW2_BME_TABLE_SIZE);
  e->flags = get_be32 (p + QCOW2_BME_FLAGS);
  type = p[QCOW2_BME_TYPE];
  e->gran_bits = p[QCOW2_BME_GRANULARITY_BITS];
  if (type != QCOW2_BME_TYPE_DIRTY_TRACKING) {
    error_setg (errp, "bitmap '%s' has type %u (only 1, dirty tracking, is "
                "defined)", e->name, type);
    return -1;
  }
  if (e->flags & QCOW2_BME_RESERVED_FLAGS) {
    error_setg (errp, "bitmap '%s' has reserved flags set (0x%08" PRIx32 ")",
                e->name, e->flags);
    return -1;
  }
  if (e->gran_bits < QCOW2_BME_MIN_GRANULARITY_BITS ||
      e->gran_bits > QCOW2_BME_MAX_GRANULARITY_BITS) {
    error_setg (errp, "bitmap '%s' has granularity 2^%u (must be 2^%d to "
                "2^%d)", e->name, e->gran_bits,
                QCOW2_BME_MIN_GRANULARITY_BITS,
                QCOW2_BME_MAX_GRANULARITY_BITS);
    return -1;
  }
  if (e->table_size == 0 || e->table_size > QCOW2_BME_MAX_TABLE_SIZE ||
      (uint64_t) e->table_size * cs > QCOW2_BME_MAX_PHYS_SIZE) {
    error_setg (errp, "bitmap '%s' has a table of %" PRIu32 " entries (must "
                "be 1 to %" PRIu64 ", at most %" PRIu64 " bytes of data)",
                e->name, e->table_size, QCOW2_BME_MAX_TABLE_SIZE,
                QCOW2_BME_MAX_PHYS_SIZE);
    return -1;
  }
  if (e->table_offset == 0 || !IS_ALIGNED (e->table_offset, cs)) {
    error_setg (errp, "bitmap '%s' has its table at 0x%" PRIx64 " (0, or not "
                "cluster aligned)", e->name, e->table_offset);
    return -1;
  }
  /* A bitmap not IN_USE has exactly the table the virtual size needs
   * (QEMU: check_dir_entry, load_bitmap_data).  One IN_USE may have
   * any: it was not stored after a resize.
   */
  want = table_entries_for (info, info->size, e->gran_bits);
  if (!(e->flags & QCOW2_BME_FLAG_IN_USE) && e->table_size != want) {
    error_setg (errp, "bitmap '%s' has a table of %" PRIu32 " entries, but "
                "the virtual size (%" PRIu64 " bytes) needs %" PRIu64,
                e->name, e->table_size, info->size, want);
    return -1;
  }
  e->trusted = !(e->flags & QCOW2_BME_FLAG_IN_USE);
  return 0;
}

static int
load (struct qcow2_state *s, struct qcow2_bitmaps *b, struct error **errp)
{
  const struct qcow2_info *info = &s->info;
  const struct qcow2_ext *ext = find_ext (info);
  uint64_t cs = info->cluster_size;
  uint64_t fsize = node_size (s->file->node);
  CLEANUP_FREE uint8_t *dir = NULL;
  CLEANUP_FREE const char **names = NULL;
  const char *what;
  uint64_t end, pos;
  uint32_t nb;
  bool nomem;
  int r;

  if (ext == NULL) {
    b->state = BM_NONE;
    return 0;
  }
  /* Version 2 has no autoclear field: always stale there. */
  if (!(info->autoclear & QCOW2_AUTOCLEAR_BITMAPS)) {
    b->state = BM_STALE;
    return 0;
  }
  if (ext->len != QCOW2_BITMAPS_EXT_SIZE) {
    error_setg (errp, "the bitmaps extension has %" PRIu32 " bytes (must be "
                "%d)", ext->len, QCOW2_BITMAPS_EXT_SIZE);
    return -1;
  }
  nb = get_be32 (ext->data);
  b->dir_size = get_be64 (ext->data + 8);
  b->dir_offset = get_be64 (ext->data + 16);
  if (get_be32 (ext->data + 4) != 0) {
    error_setg (errp, "the reserved field of the bitmaps extension is not "
                "zero");
    return -1;
  }
  if (nb == 0 || nb > QCOW2_MAX_BITMAPS) {
    error_setg (errp, "the bitmaps extension says %" PRIu32 " bitmaps (must "
                "be 1 to %d)", nb, QCOW2_MAX_BITMAPS);
    return -1;
  }
  if (b->dir_size < (uint64_t) nb * QCOW2_BME_HEADER_SIZE ||
      b->dir_size > QCOW2_MAX_BITMAP_DIR_SIZE) {
    error_setg (errp, "the bitmap directory size %" PRIu64 " is invalid for "
                "%" PRIu32 " bitmaps (at most %" PRIu64 " bytes)",
                b->dir_size, nb, QCOW2_MAX_BITMAP_DIR_SIZE);
    return -1;
  }
  if (b->dir_offset == 0 || !IS_ALIGNED (b->dir_offset, cs)) {
    error_setg (errp, "the bitmap directory offset 0x%" PRIx64 " is 0 or not "
                "cluster aligned", b->dir_offset);
    return -1;
  }
  if (ADD_OVERFLOW (b->dir_offset, b->dir_size, &end) || end > fsize) {
    error_setg (errp, "the bitmap directory at 0x%" PRIx64 " (%" PRIu64
                " bytes) is past the end of the file (%" PRIu64 " bytes)",
                b->dir_offset, b->dir_size, fsize);
    return -1;
  }
  if ((what = overlaps (s, b->dir_offset, b->dir_size)) != NULL) {
    error_setg (errp, "the bitmap directory at 0x%" PRIx64 " overlaps %s",
                b->dir_offset, what);
    return -1;
  }

  dir = malloc (b->dir_size);
  b->e = calloc (nb, sizeof *b->e);
  names = calloc (nb, sizeof *names);
  if (dir == NULL || b->e == NULL || names == NULL) {
    error_setg_errno (errp, ENOMEM, "reading the bitmap directory");
    return -1;
  }
  if ((r = node_pread (s->file->node, dir, b->dir_size, b->dir_offset,
                       0)) < 0) {
    error_setg_errno (errp, -r, "reading the bitmap directory at 0x%" PRIx64,
                      b->dir_offset);
    return -1;
  }
  for (pos = 0; pos < b->dir_size; ) {
    struct bm_entry *e;
    uint64_t esize;

    if (b->n == nb) {
      error_setg (errp, "the bitmap directory holds more than the %" PRIu32
                  " bitmaps the extension says", nb);
      return -1;
    }
    /* b->n counts the entry first, so that its name is freed. */
    e = &b->e[b->n++];
    if (parse_entry (s, dir + pos, b->dir_size - pos, b->n - 1, e, &esize,
                     errp) == -1)
      return -1;
    names[b->n - 1] = e->name;
    pos += esize;
  }
  if (b->n != nb) {
    error_setg (errp, "the bitmap directory holds %zu bitmaps, the extension "
                "says %" PRIu32, b->n, nb);
    return -1;
  }
  if ((what = duplicate_name (names, b->n, &nomem)) != NULL || nomem) {
    if (nomem)
      error_setg_errno (errp, ENOMEM, "reading the bitmap directory");
    else
      error_setg (errp, "the bitmap name '%s' appears twice", what);
    return -1;
  }
  if (load_tables (s, b, errp) == -1)
    return -1;
  b->state = BM_VALID;
  return 0;
}

/* ------------------------------------------------------------------ */
/* Writing the header and the directory */

/* The header with the bitmaps extension replaced by @ext (24 bytes;
 * NULL drops it, and a new one goes last) and @autoclear
 * (qcow2_write_header).  0 or -errno.
 */
static int
write_header (struct qcow2_state *s, const uint8_t *ext, uint64_t autoclear)
{
  const struct qcow2_header_update u = {
    .autoclear = autoclear,
    .ext_type = QCOW2_EXT_BITMAPS,
    .ext = ext,
    .ext_len = QCOW2_BITMAPS_EXT_SIZE,
  };

  if (s->info.version < 3)
    return -ENOTSUP;            /* no autoclear field: never called */
  return qcow2_write_header (s, &u);
}

/* The directory of @e (@n entries, flags from @flags) in *dir, *size
 * bytes.  0 or -errno.
 */
static int
build_dir (const struct bm_entry *e, size_t n, const uint32_t *flags,
           uint8_t **dir, uint64_t *size)
{
  uint64_t len = 0, pos = 0;
  uint8_t *d;

  for (size_t i = 0; i < n; ++i)
    len += ROUND_UP (QCOW2_BME_HEADER_SIZE + strlen (e[i].name), (size_t) 8);
  if (len == 0 || len > QCOW2_MAX_BITMAP_DIR_SIZE)
    return -EINVAL;
  d = calloc (1, len);
  if (d == NULL)
    return -ENOMEM;
  for (size_t i = 0; i < n; ++i) {
    size_t nl = strlen (e[i].name);
    uint8_t *p = d + pos;

    put_be64 (p + QCOW2_BME_TABLE_OFFSET, e[i].table_offset);
    put_be32 (p + QCOW2_BME_TABLE_SIZE, e[i].table_size);
    put_be32 (p + QCOW2_BME_FLAGS, flags ? flags[i] : e[i].flags);
    p[QCOW2_BME_TYPE] = QCOW2_BME_TYPE_DIRTY_TRACKING;
    p[QCOW2_BME_GRANULARITY_BITS] = e[i].gran_bits;
    put_be16 (p + QCOW2_BME_NAME_SIZE, nl);
    memcpy (p + QCOW2_BME_HEADER_SIZE, e[i].name, nl);
    pos += ROUND_UP (QCOW2_BME_HEADER_SIZE + nl, (size_t) 8);
  }
  *dir = d;
  *size = len;
  return 0;
}

static int
write_autoclear (struct qcow2_state *s, uint64_t autoclear)
{
  uint64_t v = htobe64 (autoclear);
  int r;

  if ((r = node_pwrite (s->file->node, &v, 8, QCOW2_HDR_AUTOCLEAR_FEATURES,
                        0)) < 0 ||
      (r = node_flush (s->file->node)) < 0)
    return r;
  s->info.autoclear = autoclear;
  return 0;
}

/* IN_USE on every bitmap (@in_use), or off every trusted one, in place,
 * as QEMU's update_ext_header_and_dir_in_place: while the directory is
 * rewritten the autoclear bit is clear, so that a torn directory is
 * never taken as valid (a crash there costs the bitmaps, as in QEMU).
 */
static int
set_in_use_locked (struct qcow2_state *s, bool in_use)
{
  struct qcow2_bitmaps *b = s->bitmaps;
  CLEANUP_FREE uint32_t *flags = NULL;
  CLEANUP_FREE uint8_t *dir = NULL;
  uint64_t size, ac = s->info.autoclear;
  bool change = false;
  int r;

  if (b == NULL || b->state != BM_VALID)
    return 0;
  flags = malloc (b->n * sizeof *flags);
  if (flags == NULL)
    return -ENOMEM;
  for (size_t i = 0; i < b->n; ++i) {
    flags[i] = b->e[i].flags;
    if (in_use)
      flags[i] |= QCOW2_BME_FLAG_IN_USE;
    /* Only a bitmap whose data is its contents, and whose table still
     * fits the virtual size (not after a resize): QEMU refuses to open
     * an image with a bitmap not IN_USE and a table of the wrong size.
     */
    else if (b->e[i].trusted &&
             b->e[i].table_size == table_entries_for (&s->info, s->info.size,
                                                      b->e[i].gran_bits))
      flags[i] &= ~QCOW2_BME_FLAG_IN_USE;
    change |= flags[i] != b->e[i].flags;
  }
  if (!change)
    return 0;
  if ((r = build_dir (b->e, b->n, flags, &dir, &size)) < 0)
    return r;
  if (size != b->dir_size)
    return -EIO;                /* loaded entries have no extra data */
  if ((r = write_autoclear (s, ac & ~QCOW2_AUTOCLEAR_BITMAPS)) < 0 ||
      (r = node_pwrite (s->file->node, dir, size, b->dir_offset, 0)) < 0 ||
      (r = node_flush (s->file->node)) < 0 ||
      (r = write_autoclear (s, ac | QCOW2_AUTOCLEAR_BITMAPS)) < 0)
    return r;
  for (size_t i = 0; i < b->n; ++i)
    b->e[i].flags = flags[i];
  return 0;
}

/* ------------------------------------------------------------------ */
/* The driver's hooks */

int
qcow2_bitmaps_open (struct qcow2_state *s, bool ro, struct error **errp)
{
  CLEANUP_ERROR struct error *err = NULL;
  struct qcow2_bitmaps *b = calloc (1, sizeof *b);

  if (b == NULL) {
    error_setg_errno (errp, errno, "qcow2: %s: loading the bitmaps",
                      s->filename);
    return -1;
  }
  s->bitmaps = b;
  if (load (s, b, &err) == -1) {
    bitmaps_reset (b);
    b->state = BM_BROKEN;
    b->error = strdup (err->msg);
    if (!ro) {
      error_setg (errp, "qcow2: %s: the persistent bitmaps are invalid (%s); "
                  "the image can only be opened read-only", s->filename,
                  err->msg);
      return -1;
    }
    nbdd_warn ("qcow2: %s: ignoring the persistent bitmaps: %s",
               s->filename, err->msg);
    return 0;
  }
  if (b->state == BM_STALE)
    nbdd_warn ("qcow2: %s: a program without bitmap support modified the "
               "image: its bitmaps are ignored%s; 'qemu-img check -r leaks' "
               "reclaims their clusters", s->filename,
               ro ? "" : " and dropped");
  return 0;
}

int
qcow2_bitmaps_check_writable (struct qcow2_state *s, struct error **errp)
{
  if (s->bitmaps && s->bitmaps->state == BM_BROKEN) {
    error_setg (errp, "qcow2: %s: the persistent bitmaps are invalid (%s); "
                "the image can only be opened read-only", s->filename,
                s->bitmaps->error ? s->bitmaps->error : "unknown");
    return -1;
  }
  return 0;
}

uint64_t
qcow2_bitmaps_autoclear (struct qcow2_state *s)
{
  return s->bitmaps && s->bitmaps->state == BM_VALID ?
    QCOW2_AUTOCLEAR_BITMAPS : 0;
}

static int
map_clusters (struct qcow2_state *s, const struct qcow2_bitmaps *b,
              const char **what)
{
  uint64_t cs = s->info.cluster_size;
  int r;

  *what = "the bitmap directory";
  if ((r = qcow2_meta_add (s, b->dir_offset, b->dir_size,
                           QCOW2_META_BITMAP_DIR)) != 0)
    return r;
  for (size_t i = 0; i < b->n; ++i) {
    const struct bm_entry *e = &b->e[i];
    *what = e->name;
    if ((r = qcow2_meta_add (s, e->table_offset,
                             (uint64_t) e->table_size * 8,
                             QCOW2_META_BITMAP_TABLE)) != 0)
      return r;
    for (uint32_t j = 0; j < e->table_size; ++j)
      if ((e->table[j] & QCOW2_BMT_OFFSET_MASK) &&
          (r = qcow2_meta_add (s, e->table[j] & QCOW2_BMT_OFFSET_MASK, cs,
                               QCOW2_META_BITMAP_DATA)) != 0)
        return r;
  }
  return 0;
}

int
qcow2_bitmaps_write_open (struct qcow2_state *s, struct error **errp)
{
  struct qcow2_bitmaps *b = s->bitmaps;
  const char *what;
  int r;

  if (b == NULL)
    return 0;
  /* Version 2 has no autoclear bit to clear: QEMU leaves it, so do we. */
  if (b->state == BM_STALE && s->info.version >= 3) {
    if ((r = write_header (s, NULL, s->info.autoclear &
                           ~QCOW2_AUTOCLEAR_BITMAPS)) < 0) {
      error_setg_errno (errp, -r, "qcow2: %s: dropping the stale bitmaps "
                        "extension", s->filename);
      return -1;
    }
    b->state = BM_NONE;
    return 0;
  }
  if (b->state != BM_VALID)
    return 0;
  /* Now that every other structure is mapped: nothing may share. */
  r = map_clusters (s, b, &what);
  if (r != 0) {
    if (r == 1)
      error_setg (errp, "qcow2: %s: the persistent bitmaps are invalid (%s "
                  "overlaps other metadata); the image can only be opened "
                  "read-only", s->filename, what);
    else
      error_setg_errno (errp, -r, "qcow2: %s: mapping the bitmaps",
                        s->filename);
    return -1;
  }
  /* QEMU's rule, before the first write: see the top of this file. */
  if ((r = set_in_use_locked (s, true)) < 0) {
    error_setg_errno (errp, -r, "qcow2: %s: marking the persistent bitmaps "
                      "in use", s->filename);
    return -1;
  }
  debug ("qcow2: %s: %zu persistent bitmap(s) marked in use", s->filename,
         b->n);
  return 0;
}

void
qcow2_bitmaps_close (struct qcow2_state *s)
{
  if (s->bitmaps) {
    bitmaps_reset (s->bitmaps);
    free (s->bitmaps);
    s->bitmaps = NULL;
  }
}

/* ------------------------------------------------------------------ */
/* The API */

static struct qcow2_state *
node_state (struct node *node, const char *op, struct error **errp)
{
  if (strcmp (node->drv->name, "qcow2") != 0) {
    error_setg (errp, "%s: node '%s' is a %s node, not qcow2", op,
                node->name, node->drv->name);
    return NULL;
  }
  return node->opaque;
}

int
qcow2_bitmaps_list (struct node *node, struct qcow2_bitmap_info **list,
                    size_t *n, struct error **errp)
{
  struct qcow2_state *s = node_state (node, "listing bitmaps", errp);
  struct qcow2_bitmaps *b;
  struct qcow2_bitmap_info *v = NULL;
  int ret = -1;

  if (s == NULL)
    return -1;
  pthread_mutex_lock (&s->lock);
  b = s->bitmaps;
  if (b && b->state == BM_BROKEN) {
    error_setg (errp, "qcow2: %s: invalid persistent bitmaps: %s",
                s->filename, b->error ? b->error : "?");
    goto out;
  }
  *list = NULL;
  *n = 0;
  if (b == NULL || b->state != BM_VALID) {
    ret = 0;
    goto out;
  }
  v = calloc (b->n, sizeof *v);
  if (v == NULL)
    goto nomem;
  for (size_t i = 0; i < b->n; ++i) {
    const struct bm_entry *e = &b->e[i];
    v[i].name = strdup (e->name);
    if (v[i].name == NULL) {
      qcow2_bitmaps_free (v, i);
      goto nomem;
    }
    v[i].granularity = UINT32_C (1) << e->gran_bits;
    v[i].in_use = !e->trusted;
    v[i].auto_ = (e->flags & QCOW2_BME_FLAG_AUTO) != 0;
    v[i].table_offset = e->table_offset;
    v[i].table_size = e->table_size;
    v[i].flags = e->flags;
  }
  *list = v;
  *n = b->n;
  ret = 0;
  goto out;

 nomem:
  error_setg_errno (errp, ENOMEM, "qcow2: %s: listing bitmaps", s->filename);
 out:
  pthread_mutex_unlock (&s->lock);
  return ret;
}

void
qcow2_bitmaps_free (struct qcow2_bitmap_info *list, size_t n)
{
  for (size_t i = 0; i < n && list; ++i)
    free (list[i].name);
  free (list);
}

static struct bm_entry *
find_entry (struct qcow2_bitmaps *b, const char *name)
{
  for (size_t i = 0; b && b->state == BM_VALID && i < b->n; ++i)
    if (strcmp (b->e[i].name, name) == 0)
      return &b->e[i];
  return NULL;
}

/* Copy @n bits from bit @sbit of @src to bit @dbit of @dst (LSB first);
 * @dst bits past them are left alone.
 */
static void
copy_bits (uint8_t *dst, uint64_t dbit, const uint8_t *src, uint64_t sbit,
           uint64_t n)
{
  if (dbit % 8 == 0 && sbit % 8 == 0) {
    memcpy (dst + dbit / 8, src + sbit / 8, n / 8);
    dbit += n / 8 * 8;
    sbit += n / 8 * 8;
    n %= 8;
  }
  for (uint64_t k = 0; k < n; ++k)
    if (src[(sbit + k) / 8] & (1u << ((sbit + k) % 8)))
      dst[(dbit + k) / 8] |= 1u << ((dbit + k) % 8);
}

static void
set_bits (uint8_t *dst, uint64_t dbit, uint64_t n)
{
  for (; n > 0 && dbit % 8; --n, ++dbit)
    dst[dbit / 8] |= 1u << (dbit % 8);
  memset (dst + dbit / 8, 0xff, n / 8);
  dbit += n / 8 * 8;
  for (n %= 8; n > 0; --n, ++dbit)
    dst[dbit / 8] |= 1u << (dbit % 8);
}

int
qcow2_bitmap_read (struct node *node, const char *name, uint64_t offset,
                   uint64_t count, void *buf, struct error **errp)
{
  struct qcow2_state *s = node_state (node, "reading a bitmap", errp);
  const struct qcow2_info *info;
  CLEANUP_FREE uint8_t *cbuf = NULL;
  struct bm_entry *e;
  uint64_t gran, first, nbits, per, size, cs;
  int ret = -1, r;

  if (s == NULL)
    return -1;
  info = &s->info;
  cs = info->cluster_size;
  size = info->size;
  pthread_mutex_lock (&s->lock);
  if (s->bitmaps && s->bitmaps->state == BM_BROKEN) {
    error_setg (errp, "qcow2: %s: invalid persistent bitmaps: %s",
                s->filename, s->bitmaps->error ? s->bitmaps->error : "?");
    goto out;
  }
  e = find_entry (s->bitmaps, name);
  if (e == NULL) {
    error_setg (errp, "qcow2: %s: no persistent bitmap '%s'", s->filename,
                name);
    goto out;
  }
  if (!e->trusted) {
    error_setg (errp, "qcow2: %s: bitmap '%s' is in use (it was not stored "
                "after its last use): its contents cannot be trusted",
                s->filename, name);
    goto out;
  }
  gran = UINT64_C (1) << e->gran_bits;
  if (!IS_ALIGNED (offset, gran) || offset > size || count > size - offset ||
      (!IS_ALIGNED (count, gran) && offset + count != size)) {
    error_setg (errp, "qcow2: %s: bitmap '%s': the range 0x%" PRIx64 "+%"
                PRIu64 " is not aligned to the granularity (%" PRIu64
                ") or not inside the image (%" PRIu64 " bytes)",
                s->filename, name, offset, count, gran, size);
    goto out;
  }
  if (e->table_size != table_entries_for (info, size, e->gran_bits)) {
    error_setg (errp, "qcow2: %s: bitmap '%s' does not fit the virtual size "
                "(%" PRIu64 " bytes): it was stored for another size",
                s->filename, name, size);
    goto out;
  }
  first = offset >> e->gran_bits;
  nbits = DIV_ROUND_UP (count, gran);
  per = cs * 8;
  memset (buf, 0, DIV_ROUND_UP (nbits, 8));
  cbuf = malloc (cs);
  if (cbuf == NULL) {
    error_setg_errno (errp, errno, "qcow2: %s: reading bitmap '%s'",
                      s->filename, name);
    goto out;
  }
  for (uint64_t bit = first; bit < first + nbits; ) {
    uint64_t j = bit / per, in = bit % per;
    uint64_t n = MIN (per - in, first + nbits - bit);
    uint64_t v = e->table[j], host = v & QCOW2_BMT_OFFSET_MASK;

    if (host) {
      /* Only the bytes holding these bits. */
      uint64_t lo = in / 8, hi = DIV_ROUND_UP (in + n, 8);
      if ((r = node_pread (s->file->node, cbuf + lo, hi - lo, host + lo,
                           0)) < 0) {
        error_setg_errno (errp, -r, "qcow2: %s: bitmap '%s': reading the "
                          "data cluster at 0x%" PRIx64, s->filename, name,
                          host);
        goto out;
      }
      copy_bits (buf, bit - first, cbuf, in, n);
    }
    else if (v & QCOW2_BMT_ALL_ONES)
      set_bits (buf, bit - first, n);
    bit += n;
  }
  ret = 0;

 out:
  pthread_mutex_unlock (&s->lock);
  return ret;
}

int
qcow2_bitmaps_set_in_use (struct node *node, bool in_use,
                          struct error **errp)
{
  struct qcow2_state *s = node_state (node, "marking bitmaps", errp);
  int r;

  if (s == NULL)
    return -1;
  if (!s->writable) {
    error_setg (errp, "qcow2: %s: marking the bitmaps %s: the node is "
                "read-only", s->filename, in_use ? "in use" : "not in use");
    return -1;
  }
  pthread_mutex_lock (&s->lock);
  r = s->corrupt ? -EIO : set_in_use_locked (s, in_use);
  pthread_mutex_unlock (&s->lock);
  if (r < 0) {
    error_setg_errno (errp, -r, "qcow2: %s: marking the bitmaps %s",
                      s->filename, in_use ? "in use" : "not in use");
    return -1;
  }
  return 0;
}

/* ------------------------------------------------------------------ */
/* Store */

/* @n contiguous new clusters: an allocation stops where a refcount
 * block's range does, and the next one starts in a fresh range (as
 * grow_l1 in qcow2-resize.c).
 */
static int
alloc_contiguous (struct qcow2_state *s, uint64_t n, uint64_t *offset)
{
  int64_t got = qcow2_alloc_clusters (s, n, offset);
  int r;

  if (got >= 0 && (uint64_t) got < n) {
    if ((r = qcow2_free_clusters (s, *offset, got)) < 0)
      return r;
    got = qcow2_alloc_clusters (s, n, offset);
    if (got >= 0 && (uint64_t) got < n) {
      qcow2_free_clusters (s, *offset, got);
      return -EFBIG;
    }
  }
  return got < 0 ? (int) got : 0;
}

/* Drop the clusters of @e (its data and its table). */
static int
free_entry_clusters (struct qcow2_state *s, const struct bm_entry *e)
{
  uint64_t cs = s->info.cluster_size;
  int r, ret = 0;

  for (uint32_t j = 0; e->table && j < e->table_size; ++j)
    if ((e->table[j] & QCOW2_BMT_OFFSET_MASK) &&
        (r = qcow2_free_clusters (s, e->table[j] & QCOW2_BMT_OFFSET_MASK,
                                  1)) < 0)
      ret = r;
  if (e->table_offset &&
      (r = qcow2_free_clusters (s, e->table_offset,
                                DIV_ROUND_UP ((uint64_t) e->table_size * 8,
                                              cs))) < 0)
    ret = r;
  return ret;
}

/* The data clusters and the table of one bitmap, in new clusters;
 * *e describes them (its table_offset is 0 until the table is
 * allocated, so that a failure frees exactly what was allocated).
 */
static int
write_bitmap (struct qcow2_state *s, const struct qcow2_bitmap_store *st,
              struct bm_entry *e, struct error **errp)
{
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size, size = info->size;
  unsigned gran_bits = __builtin_ctz (st->granularity);
  uint64_t per = cs * 8, cover = per << gran_bits;
  uint64_t entries = table_entries_for (info, size, gran_bits);
  uint64_t tclusters = DIV_ROUND_UP (entries * 8, cs), toff;
  CLEANUP_FREE uint8_t *buf = malloc (cs);
  CLEANUP_FREE uint64_t *be = NULL;
  int r;

  e->name = strdup (st->name);
  e->gran_bits = gran_bits;
  e->flags = (st->in_use ? QCOW2_BME_FLAG_IN_USE : 0) |
    (st->auto_ ? QCOW2_BME_FLAG_AUTO : 0);
  e->trusted = !st->in_use;
  e->table_size = entries;
  e->table = calloc (entries, sizeof *e->table);
  if (buf == NULL || e->name == NULL || e->table == NULL) {
    error_setg_errno (errp, ENOMEM, "qcow2: %s: storing bitmap '%s'",
                      s->filename, st->name);
    return -1;
  }

  for (uint64_t j = 0; j < entries; ++j) {
    uint64_t off = j * cover, cnt = MIN (cover, size - off), host;
    uint64_t bits = DIV_ROUND_UP (cnt, UINT64_C (1) << gran_bits);
    uint64_t bytes = DIV_ROUND_UP (bits, 8);

    memset (buf, 0, cs);
    if ((r = st->fill (st->opaque, off, cnt, buf)) < 0) {
      error_setg_errno (errp, -r, "qcow2: %s: bitmap '%s': filling the bits "
                        "of 0x%" PRIx64 "+%" PRIu64, s->filename, st->name,
                        off, cnt);
      return -1;
    }
    /* The unused tail bits of the last cluster must be zero (spec). */
    memset (buf + bytes, 0, cs - bytes);
    if (bits % 8)
      buf[bytes - 1] &= (1u << (bits % 8)) - 1;
    if (!st->preallocate && memcmp (buf, s->zero_cluster, cs) == 0)
      continue;                 /* a 0 entry, as QEMU stores it */
    if ((r = alloc_contiguous (s, 1, &host)) < 0)
      goto io;
    e->table[j] = host;
    if ((r = qcow2_meta_add (s, host, cs, QCOW2_META_BITMAP_DATA)) < 0 ||
        (r = node_pwrite (s->file->node, buf, cs, host, 0)) < 0)
      goto io;
  }

  be = calloc (tclusters * cs / 8, 8);
  if (be == NULL) {
    r = -ENOMEM;
    goto io;
  }
  for (uint64_t j = 0; j < entries; ++j)
    be[j] = htobe64 (e->table[j]);
  if ((r = alloc_contiguous (s, tclusters, &toff)) < 0)
    goto io;
  e->table_offset = toff;
  if ((r = qcow2_meta_add (s, toff, tclusters * cs,
                           QCOW2_META_BITMAP_TABLE)) < 0 ||
      (r = node_pwrite (s->file->node, be, tclusters * cs, toff, 0)) < 0)
    goto io;
  return 0;

 io:
  error_setg_errno (errp, -r, "qcow2: %s: storing bitmap '%s'", s->filename,
                    st->name);
  return -1;
}

/* What QEMU refuses to store (check_constraints_on_bitmap), refused
 * before anything is written.
 */
static int
check_store (struct qcow2_state *s, const struct qcow2_bitmap_store *bms,
             size_t n, struct error **errp)
{
  const struct qcow2_info *info = &s->info;
  CLEANUP_FREE const char **names = NULL;
  const char *dup;
  uint64_t dir = 0;
  bool nomem;

  if (n == 0)
    return 0;
  if (info->version < 3) {
    error_setg (errp, "qcow2: %s: persistent bitmaps need a version 3 image "
                "(compat=1.1)", s->filename);
    return -1;
  }
  if (n > QCOW2_MAX_BITMAPS) {
    error_setg (errp, "qcow2: %s: %zu bitmaps are too many (at most %d)",
                s->filename, n, QCOW2_MAX_BITMAPS);
    return -1;
  }
  if (info->size == 0) {
    error_setg (errp, "qcow2: %s: an empty image cannot store bitmaps",
                s->filename);
    return -1;
  }
  names = malloc (n * sizeof *names);
  if (names == NULL) {
    error_setg_errno (errp, errno, "qcow2: %s: storing bitmaps",
                      s->filename);
    return -1;
  }
  for (size_t i = 0; i < n; ++i) {
    const struct qcow2_bitmap_store *b = &bms[i];
    size_t len = b->name ? strlen (b->name) : 0;
    unsigned gb;

    if (len == 0 || len > QCOW2_BME_MAX_NAME_SIZE) {
      error_setg (errp, "qcow2: %s: bitmap name of %zu bytes (must be 1 to "
                  "%d)", s->filename, len, QCOW2_BME_MAX_NAME_SIZE);
      return -1;
    }
    if (!IS_POWER_OF_2 (b->granularity) ||
        b->granularity < (UINT32_C (1) << QCOW2_BME_MIN_GRANULARITY_BITS)) {
      error_setg (errp, "qcow2: %s: bitmap '%s': granularity %" PRIu32
                  " is not a power of two from %u to %" PRIu32, s->filename,
                  b->name, b->granularity,
                  1u << QCOW2_BME_MIN_GRANULARITY_BITS,
                  UINT32_C (1) << QCOW2_BME_MAX_GRANULARITY_BITS);
      return -1;
    }
    gb = __builtin_ctz (b->granularity);
    if (DIV_ROUND_UP (DIV_ROUND_UP (info->size, (uint64_t) b->granularity),
                      8) > QCOW2_BME_MAX_PHYS_SIZE ||
        table_entries_for (info, info->size, gb) > QCOW2_BME_MAX_TABLE_SIZE) {
      error_setg (errp, "qcow2: %s: bitmap '%s' would take too much space "
                  "(use a larger granularity)", s->filename, b->name);
      return -1;
    }
    if (b->fill == NULL) {
      error_setg (errp, "qcow2: %s: bitmap '%s' has no fill function",
                  s->filename, b->name);
      return -1;
    }
    names[i] = b->name;
    dir += ROUND_UP (QCOW2_BME_HEADER_SIZE + len, (size_t) 8);
  }
  if (dir > QCOW2_MAX_BITMAP_DIR_SIZE) {
    error_setg (errp, "qcow2: %s: the bitmap directory would take %" PRIu64
                " bytes (at most %" PRIu64 ")", s->filename, dir,
                QCOW2_MAX_BITMAP_DIR_SIZE);
    return -1;
  }
  if ((dup = duplicate_name (names, n, &nomem)) != NULL || nomem) {
    if (nomem)
      error_setg_errno (errp, ENOMEM, "qcow2: %s: storing bitmaps",
                        s->filename);
    else
      error_setg (errp, "qcow2: %s: the bitmap name '%s' appears twice",
                  s->filename, dup);
    return -1;
  }
  return 0;
}

int
qcow2_bitmaps_store (struct node *node,
                     const struct qcow2_bitmap_store *bms, size_t n,
                     struct error **errp)
{
  struct qcow2_state *s = node_state (node, "storing bitmaps", errp);
  struct qcow2_bitmaps *b;
  struct bm_entry *ne = NULL;
  CLEANUP_FREE uint8_t *dir = NULL;
  uint64_t cs, dir_size = 0, dir_off = 0, autoclear;
  uint8_t ext[QCOW2_BITMAPS_EXT_SIZE];
  size_t done = 0;
  int r;

  if (s == NULL)
    return -1;
  if (!s->writable) {
    error_setg (errp, "qcow2: %s: storing bitmaps: the node is read-only",
                s->filename);
    return -1;
  }
  if (check_store (s, bms, n, errp) == -1)
    return -1;
  cs = s->info.cluster_size;

  pthread_rwlock_wrlock (&s->bitmaps_lock);
  pthread_mutex_lock (&s->lock);
  b = s->bitmaps;
  /* Nothing stored, nothing to store (a stale extension of a version 2
   * image stays, as QEMU leaves it).
   */
  if (n == 0 && b && (b->state == BM_NONE || b->state == BM_STALE)) {
    pthread_mutex_unlock (&s->lock);
    pthread_rwlock_unlock (&s->bitmaps_lock);
    return 0;
  }
  if (s->corrupt) {
    error_setg (errp, "qcow2: %s: storing bitmaps: the image is marked "
                "corrupt", s->filename);
    goto fail;
  }
  if (b == NULL || (b->state != BM_VALID && b->state != BM_NONE)) {
    error_setg (errp, "qcow2: %s: storing bitmaps: the bitmaps extension "
                "is not valid", s->filename);
    goto fail;
  }
  ne = calloc (n ?: 1, sizeof *ne);
  if (ne == NULL) {
    error_setg_errno (errp, errno, "qcow2: %s: storing bitmaps",
                      s->filename);
    goto fail;
  }

  /* 1. The new data, tables and directory, in new clusters. */
  for (; done < n; ++done)
    if (write_bitmap (s, &bms[done], &ne[done], errp) == -1) {
      ++done;                   /* free what it allocated too */
      goto fail;
    }
  if (n > 0) {
    if ((r = build_dir (ne, n, NULL, &dir, &dir_size)) < 0 ||
        (r = alloc_contiguous (s, DIV_ROUND_UP (dir_size, cs),
                               &dir_off)) < 0) {
      error_setg_errno (errp, -r, "qcow2: %s: storing the bitmap directory",
                        s->filename);
      goto fail;
    }
    if ((r = qcow2_meta_add (s, dir_off, dir_size,
                             QCOW2_META_BITMAP_DIR)) < 0 ||
        (r = node_pwrite (s->file->node, dir, dir_size, dir_off, 0)) < 0) {
      error_setg_errno (errp, -r, "qcow2: %s: writing the bitmap directory",
                        s->filename);
      goto fail_dir;
    }
  }
  /* 2. Their refcounts, then everything on disk. */
  if ((r = qcow2_cache_flush (s->refcount_cache)) < 0 ||
      (r = node_flush (s->file->node)) < 0) {
    error_setg_errno (errp, -r, "qcow2: %s: storing bitmaps", s->filename);
    goto fail_dir;
  }

  /* 3. The switch: extension and autoclear bit in one header write. */
  autoclear = s->info.autoclear & ~QCOW2_AUTOCLEAR_BITMAPS;
  if (n > 0) {
    put_be32 (ext, n);
    put_be32 (ext + 4, 0);
    put_be64 (ext + 8, dir_size);
    put_be64 (ext + 16, dir_off);
    autoclear |= QCOW2_AUTOCLEAR_BITMAPS;
  }
  if ((r = write_header (s, n > 0 ? ext : NULL, autoclear)) < 0) {
    /* Whether the header reached the disk is unknown: keep both sets
     * allocated (a leak at worst), and refuse further stores.
     */
    error_setg_errno (errp, -r, "qcow2: %s: switching the header to the new "
                      "bitmaps", s->filename);
    entries_free (ne, n);
    bitmaps_reset (b);
    b->state = BM_BROKEN;
    b->error = strdup ("a bitmap store failed part way");
    pthread_mutex_unlock (&s->lock);
    pthread_rwlock_unlock (&s->bitmaps_lock);
    return -1;
  }

  /* 4. The old set is garbage now. */
  r = 0;
  if (b->state == BM_VALID) {
    for (size_t i = 0; i < b->n; ++i) {
      int r2 = free_entry_clusters (s, &b->e[i]);
      r = r ?: r2;
    }
    if (r == 0)
      r = qcow2_free_clusters (s, b->dir_offset,
                               DIV_ROUND_UP (b->dir_size, cs));
  }
  bitmaps_reset (b);
  b->state = n > 0 ? BM_VALID : BM_NONE;
  b->dir_offset = dir_off;
  b->dir_size = dir_size;
  b->n = n;
  b->e = ne;
  pthread_mutex_unlock (&s->lock);
  pthread_rwlock_unlock (&s->bitmaps_lock);
  if (r < 0)
    nbdd_warn ("qcow2: %s: freeing the old bitmap clusters: %s (they are "
               "leaked)", s->filename, strerror (-r));
  debug ("qcow2: %s: stored %zu bitmap(s), directory at 0x%" PRIx64,
         s->filename, n, dir_off);
  return 0;

 fail_dir:
  qcow2_free_clusters (s, dir_off, DIV_ROUND_UP (dir_size, cs));
 fail:
  for (size_t i = 0; i < done; ++i)
    free_entry_clusters (s, &ne[i]);
  entries_free (ne, n);
  pthread_mutex_unlock (&s->lock);
  pthread_rwlock_unlock (&s->bitmaps_lock);
  return -1;
}

/* The driver's generic face of the functions above (driver.h). */
int
qcow2_drv_bitmaps_list (struct node *node, struct node_bitmap_info **list,
                        size_t *n, struct error **errp)
{
  struct qcow2_bitmap_info *q;
  size_t nq;

  *list = NULL;
  *n = 0;
  if (qcow2_bitmaps_list (node, &q, &nq, errp) == -1)
    return -1;
  if (nq > 0) {
    *list = calloc (nq, sizeof **list);
    if (*list == NULL) {
      qcow2_bitmaps_free (q, nq);
      error_setg (errp, "out of memory");
      return -1;
    }
  }
  for (size_t i = 0; i < nq; ++i) {
    (*list)[i].name = q[i].name;
    q[i].name = NULL;
    (*list)[i].granularity = q[i].granularity;
    (*list)[i].in_use = q[i].in_use;
    (*list)[i].enabled = q[i].auto_;
  }
  *n = nq;
  qcow2_bitmaps_free (q, nq);
  return 0;
}

int
qcow2_drv_bitmaps_store (struct node *node,
                         const struct node_bitmap_store *bitmaps, size_t n,
                         struct error **errp)
{
  struct qcow2_bitmap_store *q = n ? calloc (n, sizeof *q) : NULL;
  int r;

  if (n && q == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  for (size_t i = 0; i < n; ++i)
    q[i] = (struct qcow2_bitmap_store) {
      .name = bitmaps[i].name, .granularity = bitmaps[i].granularity,
      .in_use = bitmaps[i].in_use, .auto_ = bitmaps[i].enabled,
      .preallocate = bitmaps[i].preallocate,
      .fill = bitmaps[i].fill, .opaque = bitmaps[i].opaque,
    };
  r = qcow2_bitmaps_store (node, q, n, errp);
  free (q);
  return r;
}

/* The write-intent path rewrites bits a page at a time: a 64 KiB
 * cluster holds the bits of 32 GiB at the default granularity, and a
 * burst of new regions rarely needs more than a page of them.
 */
#define SYNC_UNIT 4096
/* Most bytes one write-intent write carries: its pages go in one FUA
 * write, so one device flush, however many there are.
 */
#define SYNC_RUN_MAX (UINT64_C (64) << 10)

/* The write-intent path (graph/dirty.c): a bitmap stored preallocated
 * has a data cluster for every table entry, so newly set bits can be
 * made durable by rewriting just their pages, with FUA.  A flush of the
 * file instead would push out every dirty guest page with them and
 * cost a writeback per new region.  Changed pages that follow each
 * other in the file (alloc_contiguous makes clusters so) go in one
 * write.  Worker threads call this holding only bitmaps_lock (read),
 * which keeps the clusters the bitmap's.
 */
/* Where the file can write back a range unflushed (ext4, XFS, block
 * devices), the pages go without FUA, are written back together, and
 * one FUA write (the last run again) makes them all durable: a device
 * flush covers every write completed before it.  One device flush per
 * call, however many pages.  Elsewhere each run is a FUA write.
 */
int
qcow2_bitmap_sync (struct node *node, const char *name, uint64_t offset,
                   uint64_t count,
                   int (*fill) (void *opaque, uint64_t offset, uint64_t count,
                                void *buf),
                   void *opaque, struct error **errp)
{
  struct qcow2_state *s = node->opaque;
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size, unit = MIN (cs, (uint64_t) SYNC_UNIT);
  uint64_t size, cover, first, last, per_cluster = cs / unit;
  uint64_t run_host = 0, run_len = 0;
  uint64_t lo = UINT64_MAX, hi = 0, done_host = 0, done_len = 0;
  CLEANUP_FREE uint8_t *bufs = NULL;
  uint8_t *buf, *done = NULL;     /* the run filling, the last written */
  struct node *file;
  unsigned flags;
  struct bm_entry *e;
  int r = 0;

  pthread_rwlock_rdlock (&s->bitmaps_lock);
  pthread_mutex_lock (&s->lock);
  size = info->size;
  pthread_mutex_unlock (&s->lock);
  e = find_entry (s->bitmaps, name);
  if (e == NULL || !s->writable) {
    pthread_rwlock_unlock (&s->bitmaps_lock);
    error_setg (errp, "qcow2: %s: no stored bitmap '%s' to update",
                s->filename, name);
    return -1;
  }
  if (count == 0 || offset >= size) {
    pthread_rwlock_unlock (&s->bitmaps_lock);
    return 0;
  }
  file = s->file->node;
  flags = node_writeback (file, 0, 0) == 0 ? 0 : NODE_FUA;
  cover = (unit * 8) << e->gran_bits;
  first = offset / cover;
  last = (MIN (offset + count, size) - 1) / cover;
  /* Two buffers, each with room for the page that ends a full run. */
  if ((bufs = malloc (2 * (SYNC_RUN_MAX + unit))) == NULL)
    r = -ENOMEM;
  buf = bufs;
  for (uint64_t u = first; u <= last + 1 && r == 0; ++u) {
    bool end = u > last;
    uint64_t off = u * cover, cnt = end ? 0 : MIN (cover, size - off);
    uint64_t bits = DIV_ROUND_UP (cnt, UINT64_C (1) << e->gran_bits);
    uint64_t bytes = DIV_ROUND_UP (bits, 8);
    uint64_t j = u / per_cluster;
    uint64_t host = !end && j < e->table_size ? e->table[j] : 0;
    uint8_t *c = buf + run_len;
    int filled = 1;

    if (!end) {
      if (host == 0 || (host & 1) || !IS_ALIGNED (host, cs)) {
        r = -ENOTSUP;           /* not stored preallocated */
        break;
      }
      host += (u % per_cluster) * unit;
      memset (c, 0, unit);
      if ((filled = fill (opaque, off, cnt, c)) < 0) {
        r = filled;
        break;
      }
    }
    /* The end, a page with nothing new, one not next to the run in the
     * file, or a full buffer: the run goes.
     */
    if (run_len > 0 &&
        (filled == 1 || host != run_host + run_len ||
         run_len + unit > SYNC_RUN_MAX)) {
      if ((r = node_pwrite (file, buf, run_len, run_host, flags)) < 0)
        break;
      done = buf;
      done_host = run_host;
      done_len = run_len;
      lo = MIN (lo, run_host);
      hi = MAX (hi, run_host + run_len);
      buf = done == bufs ? bufs + SYNC_RUN_MAX + unit : bufs;
      if (filled == 0)
        memcpy (buf, c, unit);  /* this page starts the next run */
      c = buf;
      run_len = 0;
    }
    if (filled == 1)            /* nothing new */
      continue;
    if (run_len == 0)
      run_host = host;
    /* The unused tail bits of the last cluster must be zero (spec). */
    memset (c + bytes, 0, unit - bytes);
    if (bits % 8)
      c[bytes - 1] &= (1u << (bits % 8)) - 1;
    run_len += unit;
  }
  if (r == 0 && done && flags == 0 &&
      (r = node_writeback (file, hi - lo, lo)) == 0)
    r = node_pwrite (file, done, done_len, done_host, NODE_FUA);
  pthread_rwlock_unlock (&s->bitmaps_lock);
  if (r < 0) {
    error_setg_errno (errp, -r, "qcow2: %s: bitmap '%s': writing its bits",
                      s->filename, name);
    return -1;
  }
  return 0;
}
