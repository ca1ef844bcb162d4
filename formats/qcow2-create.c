/* Creating a qcow2 image on a protocol node.
 *
 * The whole layout is computed before the first byte is written, and
 * every allocated cluster sits in one contiguous run from cluster 0:
 *
 *   cluster 0       header, header extensions, backing file name
 *   reftable        rt_clusters
 *   refblocks       rb_clusters, refblock i at rb_offset + i * cs
 *   L1 table        l1_clusters, holding l1_size entries
 *   L2 tables       l1_size tables        (preallocation only)
 *   data            guest cluster j at data_offset + j * cs
 *                                         (preallocation only)
 *
 * Header, reftable, refblock, L1 is the order QEMU's qcow2_co_create
 * produces, so a small image without preallocation matches qemu-img's
 * cluster for cluster.  Because the allocated clusters are exactly
 * [0, nb_clusters), every refcount is 1 and the refblocks are
 * "nb_clusters ones, then zeroes".  The refcount structures count
 * themselves too, so their size is a fixed point (layout_refcounts).
 *
 * Tables can be large (a 32 MiB L1, gigabytes of preallocated L2), so
 * they are generated and written in CHUNK-sized pieces from one buffer:
 * memory use is bounded whatever the options.  On a freshly truncated
 * file, all-zero pieces are not written at all and stay holes.
 *
 * Ordering: the old contents are invalidated first (the file truncated
 * to nothing, or cluster 0 zeroed on a device) and flushed; then the
 * tables and data are written and flushed; only then the header, and a
 * last flush.  Until that header write there is no qcow2 magic in the
 * file, so a crash or an error part way never leaves a file that looks
 * like a valid image.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "driver.h"
#include "options.h"
#include "qcow2-create.h"
#include "qcow2-format.h"
#include "utils.h"

#define DEFAULT_CLUSTER_SIZE    65536
#define DEFAULT_REFCOUNT_BITS   16

/* Tables are generated and written this many bytes at a time.  A
 * multiple of every entry size (8 and 16 bytes).
 */
#define CHUNK                   (UINT32_C (1) << 20)

#define DIV_ROUND_UP(n, d)      (((n) + (d) - 1) / (d))

struct layout {
  uint32_t cs;                  /* cluster size */
  unsigned cluster_bits;
  unsigned refcount_order;
  uint64_t refcounts_per_block;
  size_t l2e_size;              /* 8, or 16 with extended L2 */
  uint64_t l2_entries;          /* per L2 table */

  uint64_t l1_size;             /* L1 entries, for the virtual size */
  uint64_t l2_tables;           /* preallocated L2 tables (0 or l1_size) */
  uint64_t data_clusters;       /* preallocated data clusters */

  uint64_t rt_offset, rt_clusters;
  uint64_t rb_offset, rb_clusters;
  uint64_t l1_offset, l1_clusters;
  uint64_t l2_offset;
  uint64_t data_offset;
  uint64_t nb_clusters;         /* all allocated, each with refcount 1 */
  uint64_t file_end;            /* nb_clusters * cs */
};

static const char *
prealloc_name (enum qcow2_prealloc p)
{
  switch (p) {
  case QCOW2_PREALLOC_OFF:      return "off";
  case QCOW2_PREALLOC_METADATA: return "metadata";
  case QCOW2_PREALLOC_FALLOC:   return "falloc";
  case QCOW2_PREALLOC_FULL:     return "full";
  }
  return "?";
}

static bool
is_zstd (const struct qcow2_create_opts *o)
{
  return o->compression_type && strcmp (o->compression_type, "zstd") == 0;
}

/* Defaults filled in, as QEMU's qcow2_co_create does first. */
static struct qcow2_create_opts
apply_defaults (const struct qcow2_create_opts *o)
{
  struct qcow2_create_opts d = *o;

  if (d.cluster_size == 0)
    d.cluster_size = DEFAULT_CLUSTER_SIZE;
  if (d.refcount_bits == 0)
    d.refcount_bits = DEFAULT_REFCOUNT_BITS;
  if (d.version == 0)
    d.version = 3;
  return d;
}

/* QEMU's block/qcow2.c validates in this order and with these
 * messages; "qcow2: " and the offending value are added so the error
 * stands on its own in an admin reply.
 */
static int
check_opts (const struct qcow2_create_opts *o, struct error **errp)
{
  if (!IS_ALIGNED (o->size, 512)) {
    error_setg (errp, "qcow2: size %" PRIu64 ": image size must be a "
                "multiple of 512 bytes", o->size);
    return -1;
  }
  if (o->size > INT64_MAX) {
    error_setg (errp, "qcow2: size %" PRIu64 ": must be at most %" PRIi64,
                o->size, INT64_MAX);
    return -1;
  }
  if (o->version != 2 && o->version != 3) {
    error_setg (errp, "qcow2: version %u: must be 2 (compat 0.10) or 3 "
                "(compat 1.1)", o->version);
    return -1;
  }
  if (o->extended_l2 && o->version < 3) {
    error_setg (errp, "qcow2: extended L2 entries are only supported with "
                "compatibility level 1.1 and above (use version=v3)");
    return -1;
  }
  if (!IS_POWER_OF_2 (o->cluster_size) ||
      o->cluster_size < (UINT32_C (1) << QCOW2_MIN_CLUSTER_BITS) ||
      o->cluster_size > (UINT32_C (1) << QCOW2_MAX_CLUSTER_BITS)) {
    error_setg (errp, "qcow2: cluster size %" PRIu32 ": must be a power of "
                "two between %u and %uk", o->cluster_size,
                1u << QCOW2_MIN_CLUSTER_BITS,
                1u << (QCOW2_MAX_CLUSTER_BITS - 10));
    return -1;
  }
  if (o->extended_l2 &&
      o->cluster_size < (UINT32_C (1) << QCOW2_EXTL2_MIN_CLUSTER_BITS)) {
    error_setg (errp, "qcow2: cluster size %" PRIu32 ": extended L2 entries "
                "are only supported with cluster sizes of at least %u bytes",
                o->cluster_size, 1u << QCOW2_EXTL2_MIN_CLUSTER_BITS);
    return -1;
  }
  if ((unsigned) o->prealloc > QCOW2_PREALLOC_FULL) {
    error_setg (errp, "qcow2: invalid preallocation mode %u",
                (unsigned) o->prealloc);
    return -1;
  }
  /* Preallocated clusters would hide the backing file's data; with
   * extended L2 they are mapped but their subclusters stay unallocated,
   * so reads still go to the backing file.
   */
  if (o->backing_file && o->prealloc != QCOW2_PREALLOC_OFF &&
      !o->extended_l2) {
    error_setg (errp, "qcow2: backing file and preallocation=%s can only be "
                "used at the same time if extended L2 entries are on",
                prealloc_name (o->prealloc));
    return -1;
  }
  if (o->backing_fmt && !o->backing_file) {
    error_setg (errp, "qcow2: backing format '%.80s' cannot be used without "
                "a backing file", o->backing_fmt);
    return -1;
  }
  if (o->lazy_refcounts && o->version < 3) {
    error_setg (errp, "qcow2: lazy refcounts are only supported with "
                "compatibility level 1.1 and above (use version=v3)");
    return -1;
  }
  if (o->refcount_bits > 64 || !IS_POWER_OF_2 (o->refcount_bits)) {
    error_setg (errp, "qcow2: refcount bits %u: refcount width must be a "
                "power of two and may not exceed 64 bits", o->refcount_bits);
    return -1;
  }
  if (o->version < 3 && o->refcount_bits != 16) {
    error_setg (errp, "qcow2: refcount bits %u: different refcount widths "
                "than 16 bits require compatibility level 1.1 or above "
                "(use version=v3)", o->refcount_bits);
    return -1;
  }
  if (o->compression_type && strcmp (o->compression_type, "zlib") != 0) {
    if (strcmp (o->compression_type, "zstd") != 0) {
      error_setg (errp, "qcow2: unknown compression type '%.80s' (zlib or "
                  "zstd)", o->compression_type);
      return -1;
    }
    if (o->version < 3) {
      error_setg (errp, "qcow2: non-zlib compression type is only supported "
                  "with compatibility level 1.1 and above (use version=v3)");
      return -1;
    }
  }
  if (o->backing_file) {
    size_t len = strlen (o->backing_file);
    if (len == 0) {
      error_setg (errp, "qcow2: the backing file name is empty");
      return -1;
    }
    if (len > QCOW2_MAX_BACKING_FILE_NAME) {
      error_setg (errp, "qcow2: backing file name of %zu bytes is too long "
                  "(at most %d)", len, QCOW2_MAX_BACKING_FILE_NAME);
      return -1;
    }
  }
  if (o->backing_fmt) {
    /* A QEMU driver name: QEMU keeps it in a 16-byte buffer
     * (BlockDriverState.backing_format), so longer names would be cut.
     */
    size_t len = strlen (o->backing_fmt);
    if (len == 0 || len > 15 ||
        strspn (o->backing_fmt, "abcdefghijklmnopqrstuvwxyz"
                "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_") != len) {
      error_setg (errp, "qcow2: backing format '%.80s' is not a block driver "
                  "name (1 to 15 letters, digits, '-' or '_')",
                  o->backing_fmt);
      return -1;
    }
  }
  return 0;
}

int
qcow2_create_check_opts (const struct qcow2_create_opts *o,
                         struct error **errp)
{
  struct qcow2_create_opts d = apply_defaults (o);

  return check_opts (&d, errp);
}

/* The refcount structures must cover every allocated cluster,
 * themselves included: grow refblocks and reftable until they do.
 * Both only grow, so this ends after a few rounds.
 */
static int
layout_refcounts (struct layout *l, uint64_t other_clusters,
                  struct error **errp)
{
  uint64_t rb = 0, rt = 1;      /* QEMU always has a reftable */

  for (;;) {
    uint64_t n, new_rb, new_rt;

    if (ADD_OVERFLOW (other_clusters, rb, &n) || ADD_OVERFLOW (n, rt, &n))
      goto too_large;
    new_rb = DIV_ROUND_UP (n, l->refcounts_per_block);
    new_rt = DIV_ROUND_UP (new_rb, l->cs / QCOW2_REFTE_SIZE);
    if (new_rt == 0)
      new_rt = 1;
    if (new_rb == rb && new_rt == rt)
      break;
    rb = new_rb;
    rt = new_rt;
  }
  if (rt > QCOW2_MAX_REFTABLE_SIZE / l->cs) {
    error_setg (errp, "qcow2: the refcount table would need %" PRIu64
                " clusters of %" PRIu32 " bytes, more than QEMU's limit of "
                "%" PRIu64 " bytes (use a larger cluster size, fewer "
                "refcount bits or less preallocation)",
                rt, l->cs, QCOW2_MAX_REFTABLE_SIZE);
    return -1;
  }
  l->rb_clusters = rb;
  l->rt_clusters = rt;
  return 0;

 too_large:
  error_setg (errp, "qcow2: image too large for its refcount structures");
  return -1;
}

/* Place @count clusters at *next: their offset goes to *offset and
 * *next moves past them.  -1 on overflow.
 */
static int
place (struct layout *l, uint64_t *next, uint64_t count, uint64_t *offset)
{
  uint64_t bytes;

  *offset = *next;
  if (MUL_OVERFLOW (count, (uint64_t) l->cs, &bytes) ||
      ADD_OVERFLOW (*next, bytes, next))
    return -1;
  return 0;
}

static int
compute_layout (const struct qcow2_create_opts *o, struct layout *l,
                struct error **errp)
{
  uint64_t guest_clusters, l1_bytes, other, next;
  bool prealloc = o->prealloc != QCOW2_PREALLOC_OFF;

  memset (l, 0, sizeof *l);
  l->cs = o->cluster_size;
  l->cluster_bits = __builtin_ctz (o->cluster_size);
  l->refcount_order = __builtin_ctz (o->refcount_bits);
  l->refcounts_per_block = (uint64_t) l->cs * 8 >> l->refcount_order;
  l->l2e_size = o->extended_l2 ? QCOW2_L2E_SIZE_EXTENDED
    : QCOW2_L2E_SIZE_NORMAL;
  l->l2_entries = l->cs / l->l2e_size;

  /* size <= INT64_MAX, so none of this overflows. */
  guest_clusters = DIV_ROUND_UP (o->size, (uint64_t) l->cs);
  l->l1_size = DIV_ROUND_UP (guest_clusters, l->l2_entries);
  if (l->l1_size > QCOW2_MAX_L1_SIZE / QCOW2_L1E_SIZE) {
    error_setg (errp, "qcow2: the image size is too large for file format "
                "'qcow2' (try using a larger cluster size): %" PRIu64
                " bytes with %" PRIu32 "-byte clusters needs an L1 table of "
                "%" PRIu64 " entries, QEMU's limit is %" PRIu64
                " (at most %" PRIu64 " bytes)",
                o->size, l->cs, l->l1_size,
                QCOW2_MAX_L1_SIZE / QCOW2_L1E_SIZE,
                QCOW2_MAX_L1_SIZE / QCOW2_L1E_SIZE * l->l2_entries * l->cs);
    return -1;
  }
  l1_bytes = l->l1_size * QCOW2_L1E_SIZE;
  l->l1_clusters = DIV_ROUND_UP (l1_bytes, (uint64_t) l->cs);
  if (prealloc) {
    l->l2_tables = l->l1_size;
    l->data_clusters = guest_clusters;
  }

  /* Header, L1 (<= 2^16 clusters), L2 (<= 2^22), data (<= 2^54): no
   * overflow.
   */
  other = 1 + l->l1_clusters + l->l2_tables + l->data_clusters;
  if (layout_refcounts (l, other, errp) == -1)
    return -1;

  next = l->cs;
  if (place (l, &next, l->rt_clusters, &l->rt_offset) == -1 ||
      place (l, &next, l->rb_clusters, &l->rb_offset) == -1 ||
      place (l, &next, l->l1_clusters, &l->l1_offset) == -1 ||
      place (l, &next, l->l2_tables, &l->l2_offset) == -1 ||
      place (l, &next, l->data_clusters, &l->data_offset) == -1 ||
      next > INT64_MAX)
    goto too_large;
  l->file_end = next;
  l->nb_clusters = next >> l->cluster_bits;
  /* L1 and L2 entries hold offsets in bits 9-55. */
  if (prealloc && l->file_end > QCOW2_MAX_HOST_OFFSET)
    goto too_large;
  return 0;

 too_large:
  error_setg (errp, "qcow2: preallocation=%s of %" PRIu64 " bytes would "
              "make a file larger than qcow2 can address",
              prealloc_name (o->prealloc), o->size);
  return -1;
}

static void
put_be32 (unsigned char *p, uint32_t v)
{
  p[0] = v >> 24;
  p[1] = v >> 16;
  p[2] = v >> 8;
  p[3] = v;
}

static void
put_be64 (unsigned char *p, uint64_t v)
{
  put_be32 (p, v >> 32);
  put_be32 (p + 4, v);
}

/* QEMU 7.2's feature name table, in its order. */
static const struct {
  uint8_t type, bit;
  const char *name;
} feature_names[] = {
  { QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_DIRTY_BITNR, "dirty bit" },
  { QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_CORRUPT_BITNR,
    "corrupt bit" },
  { QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_DATA_FILE_BITNR,
    "external data file" },
  { QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_COMPRESSION_BITNR,
    "compression type" },
  { QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_EXTL2_BITNR,
    "extended L2 entries" },
  { QCOW2_FEAT_TYPE_COMPATIBLE, QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR,
    "lazy refcounts" },
  { QCOW2_FEAT_TYPE_AUTOCLEAR, QCOW2_AUTOCLEAR_BITMAPS_BITNR, "bitmaps" },
  { QCOW2_FEAT_TYPE_AUTOCLEAR, QCOW2_AUTOCLEAR_DATA_FILE_RAW_BITNR,
    "raw external data" },
};

/* Append one header extension at *pos in @hdr (@len bytes, zeroed):
 * false if it does not fit.  @data NULL leaves the payload zero.
 */
static bool
add_ext (unsigned char *hdr, size_t len, size_t *pos, uint32_t type,
         const void *data, size_t data_len)
{
  size_t need = QCOW2_EXT_HEADER_SIZE + ROUND_UP (data_len, (size_t) 8);

  if (need > len - *pos)
    return false;
  put_be32 (hdr + *pos, type);
  put_be32 (hdr + *pos + 4, data_len);
  if (data)
    memcpy (hdr + *pos + QCOW2_EXT_HEADER_SIZE, data, data_len);
  *pos += need;
  return true;
}

/* Cluster 0 as QEMU's qcow2_update_header writes it: the header, the
 * backing format extension, the feature name table (v3 with clusters
 * over 4 KiB: QEMU leaves it out of smaller ones to keep room for the
 * backing file name), the end marker, then the backing file name.
 * @hdr is one zeroed cluster.  Returns the bytes used, or 0 with errp
 * set if they do not fit in the cluster.
 */
static size_t
build_header (const struct qcow2_create_opts *o, const struct layout *l,
              unsigned char *hdr, struct error **errp)
{
  size_t len = l->cs, pos;
  uint64_t incompat = 0, compat = 0;

  put_be32 (hdr + QCOW2_HDR_MAGIC, QCOW2_MAGIC);
  put_be32 (hdr + QCOW2_HDR_VERSION, o->version);
  put_be32 (hdr + QCOW2_HDR_CLUSTER_BITS, l->cluster_bits);
  put_be64 (hdr + QCOW2_HDR_SIZE, o->size);
  put_be32 (hdr + QCOW2_HDR_CRYPT_METHOD, QCOW2_CRYPT_NONE);
  put_be32 (hdr + QCOW2_HDR_L1_SIZE, l->l1_size);
  /* Like QEMU, no L1 table at all for a zero-sized image. */
  put_be64 (hdr + QCOW2_HDR_L1_TABLE_OFFSET,
            l->l1_size ? l->l1_offset : 0);
  put_be64 (hdr + QCOW2_HDR_REFCOUNT_TABLE_OFFSET, l->rt_offset);
  put_be32 (hdr + QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS, l->rt_clusters);
  /* nb_snapshots, snapshots_offset: 0 */

  if (o->version >= 3) {
    if (is_zstd (o))
      incompat |= QCOW2_INCOMPAT_COMPRESSION;
    if (o->extended_l2)
      incompat |= QCOW2_INCOMPAT_EXTL2;
    if (o->lazy_refcounts)
      compat |= QCOW2_COMPAT_LAZY_REFCOUNTS;
    put_be64 (hdr + QCOW2_HDR_INCOMPAT_FEATURES, incompat);
    put_be64 (hdr + QCOW2_HDR_COMPAT_FEATURES, compat);
    put_be64 (hdr + QCOW2_HDR_AUTOCLEAR_FEATURES, 0);
    put_be32 (hdr + QCOW2_HDR_REFCOUNT_ORDER, l->refcount_order);
    put_be32 (hdr + QCOW2_HDR_HEADER_LENGTH, QCOW2_HDR_V3_LENGTH);
    hdr[QCOW2_HDR_COMPRESSION_TYPE] =
      is_zstd (o) ? QCOW2_COMPRESSION_ZSTD : QCOW2_COMPRESSION_ZLIB;
    pos = QCOW2_HDR_V3_LENGTH;
  }
  else
    pos = QCOW2_HDR_V2_LENGTH;

  if (o->backing_fmt &&
      !add_ext (hdr, len, &pos, QCOW2_EXT_BACKING_FORMAT, o->backing_fmt,
                strlen (o->backing_fmt)))
    goto no_space;

  if (o->version >= 3 && l->cs > 4096) {
    size_t n = ARRAY_SIZE (feature_names);
    size_t start = pos + QCOW2_EXT_HEADER_SIZE;

    if (!add_ext (hdr, len, &pos, QCOW2_EXT_FEATURE_TABLE, NULL,
                  n * QCOW2_FEAT_ENTRY_SIZE))
      goto no_space;
    for (size_t i = 0; i < n; ++i) {
      unsigned char *e = hdr + start + i * QCOW2_FEAT_ENTRY_SIZE;
      e[0] = feature_names[i].type;
      e[1] = feature_names[i].bit;
      memcpy (e + 2, feature_names[i].name, strlen (feature_names[i].name));
    }
  }

  if (!add_ext (hdr, len, &pos, QCOW2_EXT_END, NULL, 0))
    goto no_space;

  if (o->backing_file) {
    size_t n = strlen (o->backing_file);
    if (n > len - pos)
      goto no_space;
    memcpy (hdr + pos, o->backing_file, n);     /* not NUL-terminated */
    put_be64 (hdr + QCOW2_HDR_BACKING_FILE_OFFSET, pos);
    put_be32 (hdr + QCOW2_HDR_BACKING_FILE_SIZE, n);
    pos += n;
  }
  return pos;

 no_space:
  error_setg (errp, "qcow2: the header, its extensions and the backing file "
              "name do not fit in one %" PRIu32 "-byte cluster (use a larger "
              "cluster size or a shorter backing file name)", l->cs);
  return 0;
}

/* Region generators: fill @buf with bytes [pos, pos + len) of a table,
 * where pos and len are multiples of the table's entry size.
 */
typedef void fill_fn (const struct layout *l, unsigned char *buf,
                      uint64_t pos, size_t len);

/* Reftable entry i points to refblock i. */
static void
fill_reftable (const struct layout *l, unsigned char *buf, uint64_t pos,
               size_t len)
{
  for (size_t k = 0; k < len; k += QCOW2_REFTE_SIZE) {
    uint64_t i = (pos + k) / QCOW2_REFTE_SIZE;
    put_be64 (buf + k, i < l->rb_clusters ? l->rb_offset + i * l->cs : 0);
  }
}

/* The refblocks, taken together, are one array of refcount entries
 * indexed by host cluster: the first nb_clusters are 1, the rest 0.
 * Entries of 8 bits and more are big-endian; narrower ones are packed
 * from the least significant bit of each byte.
 */
static void
fill_refblocks (const struct layout *l, unsigned char *buf, uint64_t pos,
                size_t len)
{
  unsigned bits = 1u << l->refcount_order;
  uint64_t n = l->nb_clusters;

  memset (buf, 0, len);
  if (bits >= 8) {
    size_t esize = bits / 8;
    uint64_t first = pos / esize;

    for (size_t k = 0; k < len / esize && first + k < n; ++k)
      buf[k * esize + esize - 1] = 1;
  }
  else {
    unsigned per_byte = 8 / bits;
    /* 1 in every entry of a byte: 0xff, 0x55 or 0x11. */
    unsigned char full = bits == 1 ? 0xff : bits == 2 ? 0x55 : 0x11;

    for (size_t k = 0; k < len; ++k) {
      uint64_t e = (pos + k) * per_byte;
      if (e + per_byte <= n)
        buf[k] = full;
      else {
        for (unsigned j = 0; j < per_byte && e + j < n; ++j)
          buf[k] |= 1u << (j * bits);
        break;
      }
    }
  }
}

/* L1 entry i points to L2 table i, which only this L1 uses. */
static void
fill_l1 (const struct layout *l, unsigned char *buf, uint64_t pos,
         size_t len)
{
  for (size_t k = 0; k < len; k += QCOW2_L1E_SIZE) {
    uint64_t i = (pos + k) / QCOW2_L1E_SIZE;
    put_be64 (buf + k, i < l->l2_tables
              ? (l->l2_offset + i * l->cs) | QCOW2_OFLAG_COPIED : 0);
  }
}

/* The L2 tables, taken together, map guest cluster j to data cluster j.
 * As QEMU's preallocation: a normal cluster with COPIED and without the
 * ZERO flag (the data area reads as zeroes); with extended L2 the
 * subcluster bitmap stays 0, so reads still go to the backing file or
 * return zeroes.
 */
static void
fill_l2 (const struct layout *l, unsigned char *buf, uint64_t pos,
         size_t len)
{
  memset (buf, 0, len);
  for (size_t k = 0; k < len; k += l->l2e_size) {
    uint64_t j = (pos + k) / l->l2e_size;
    if (j >= l->data_clusters)
      break;
    put_be64 (buf + k, (l->data_offset + j * l->cs) | QCOW2_OFLAG_COPIED);
  }
}

struct writer {
  struct node *file;
  const struct layout *l;
  bool zero_init;               /* unwritten ranges read as zeroes */
  unsigned char *buf;           /* CHUNK bytes */
};

static int
write_region (struct writer *w, uint64_t offset, uint64_t clusters,
              fill_fn *fill, const char *what, struct error **errp)
{
  uint64_t len = clusters * w->l->cs;   /* within file_end: no overflow */

  for (uint64_t pos = 0; pos < len; ) {
    size_t n = MIN (len - pos, (uint64_t) CHUNK);
    int r;

    fill (w->l, w->buf, pos, n);
    if (!w->zero_init || !is_zero (w->buf, n)) {
      r = node_pwrite (w->file, w->buf, n, offset + pos, 0);
      if (r < 0) {
        error_setg_errno (errp, -r, "qcow2: writing the %s at offset "
                          "0x%" PRIx64, what, offset + pos);
        return -1;
      }
    }
    pos += n;
  }
  return 0;
}

static int
write_data_area (struct writer *w, enum qcow2_prealloc mode,
                 struct error **errp)
{
  const struct layout *l = w->l;
  uint64_t offset = l->data_offset;
  uint64_t len = l->data_clusters * l->cs;
  int r = 0;

  if (len == 0)
    return 0;
  switch (mode) {
  case QCOW2_PREALLOC_OFF:
    return 0;
  case QCOW2_PREALLOC_METADATA:
    /* The clusters are mapped without the ZERO flag: whatever the file
     * holds there is guest data, so it must read as zeroes.
     */
    if (w->zero_init)
      return 0;
    r = node_zero (w->file, len, offset, NODE_MAY_TRIM);
    break;
  case QCOW2_PREALLOC_FALLOC:
    /* Zeroing without MAY_TRIM allocates (fallocate ZERO_RANGE). */
    r = node_zero (w->file, len, offset, 0);
    break;
  case QCOW2_PREALLOC_FULL:
    memset (w->buf, 0, CHUNK);
    while (len > 0) {
      size_t n = MIN (len, (uint64_t) CHUNK);
      r = node_pwrite (w->file, w->buf, n, offset, 0);
      if (r < 0)
        break;
      offset += n;
      len -= n;
    }
    break;
  }
  if (r < 0) {
    error_setg_errno (errp, -r, "qcow2: preallocation=%s of the data area "
                      "at offset 0x%" PRIx64, prealloc_name (mode), offset);
    return -1;
  }
  return 0;
}

static int
flush_file (struct node *file, const char *when, struct error **errp)
{
  int r = node_flush (file);

  if (r < 0) {
    error_setg_errno (errp, -r, "qcow2: flushing %s", when);
    return -1;
  }
  return 0;
}

/* Empty the file (so everything reads as zeroes) and give it @size
 * bytes.  A node that cannot shrink (a device) keeps its data: then
 * *zero_init is false and cluster 0 is zeroed, so the old header is
 * gone before anything else changes.
 */
static int
prepare_file (struct node *file, uint64_t size, uint32_t cs,
              bool *zero_init, struct error **errp)
{
  int r = node_truncate (file, 0);

  if (r < 0 && r != -ENOTSUP) {
    error_setg_errno (errp, -r, "qcow2: truncating node '%s'", file->name);
    return -1;
  }
  *zero_init = r == 0 && file->size == 0;

  size = ROUND_UP (size, (uint64_t) file->limits.request_alignment);
  r = node_truncate (file, size);
  if (r < 0 && r != -ENOTSUP) {
    error_setg_errno (errp, -r, "qcow2: resizing node '%s' to %" PRIu64
                      " bytes", file->name, size);
    return -1;
  }
  if (file->size < size) {
    error_setg (errp, "qcow2: node '%s' has %" PRIu64 " bytes and cannot "
                "grow to the %" PRIu64 " bytes the image needs",
                file->name, file->size, size);
    return -1;
  }
  if (!*zero_init && (r = node_zero (file, cs, 0, NODE_MAY_TRIM)) < 0) {
    error_setg_errno (errp, -r, "qcow2: erasing the old header of node '%s'",
                      file->name);
    return -1;
  }
  return flush_file (file, "the emptied file", errp);
}

int
qcow2_create (struct node *file, const struct qcow2_create_opts *opts,
              struct error **errp)
{
  struct qcow2_create_opts o = apply_defaults (opts);
  CLEANUP_FREE unsigned char *hdr = NULL;
  CLEANUP_FREE unsigned char *buf = NULL;
  struct layout l;
  struct writer w;
  size_t hdr_len;
  int r;

  if (check_opts (&o, errp) == -1 || compute_layout (&o, &l, errp) == -1)
    return -1;

  /* Bounded: one cluster (at most 2 MiB) and one chunk. */
  if (posix_memalign ((void **) &hdr, 4096, l.cs) != 0 ||
      posix_memalign ((void **) &buf, 4096, CHUNK) != 0) {
    error_setg_errno (errp, ENOMEM, "qcow2: allocating buffers");
    return -1;
  }
  memset (hdr, 0, l.cs);
  /* Built before touching the file, so that a header that cannot fit
   * fails with the old contents intact.
   */
  hdr_len = build_header (&o, &l, hdr, errp);
  if (hdr_len == 0)
    return -1;

  if (file->read_only) {
    error_setg (errp, "qcow2: node '%s' is read-only", file->name);
    return -1;
  }

  w = (struct writer) { .file = file, .l = &l, .buf = buf };
  if (prepare_file (file, l.file_end, l.cs, &w.zero_init, errp) == -1)
    return -1;

  if (write_region (&w, l.rt_offset, l.rt_clusters, fill_reftable,
                    "refcount table", errp) == -1 ||
      write_region (&w, l.rb_offset, l.rb_clusters, fill_refblocks,
                    "refcount blocks", errp) == -1 ||
      write_region (&w, l.l1_offset, l.l1_clusters, fill_l1,
                    "L1 table", errp) == -1 ||
      write_region (&w, l.l2_offset, l.l2_tables, fill_l2,
                    "L2 tables", errp) == -1 ||
      write_data_area (&w, o.prealloc, errp) == -1 ||
      flush_file (file, "the image metadata", errp) == -1)
    return -1;

  /* Last: the header makes it an image. */
  r = node_pwrite (file, hdr, ROUND_UP (hdr_len, (size_t) 512), 0, 0);
  if (r < 0) {
    error_setg_errno (errp, -r, "qcow2: writing the header");
    return -1;
  }
  return flush_file (file, "the image header", errp);
}

static int
parse_enum (struct json_object *o, const char *key,
            const char *const *names, int *r, struct error **errp)
{
  const char *s;
  int ret = opt_get_string (o, "qcow2", key, false, &s, errp);

  if (ret != 0)
    return ret;
  for (int i = 0; names[i]; ++i)
    if (strcmp (s, names[i]) == 0) {
      *r = i;
      return 0;
    }
  error_setg (errp, "qcow2: parameter '%s': invalid value '%.80s'", key, s);
  return -1;
}

int
qcow2_create_opts_from_json (struct json_object *o,
                             struct qcow2_create_opts *out,
                             struct error **errp)
{
  static const char *const keys[] = {
    "driver", "file", "size", "cluster-size", "refcount-bits", "version",
    "lazy-refcounts", "extended-l2", "compression-type", "backing-file",
    "backing-fmt", "preallocation", NULL
  };
  static const char *const unsupported[] = {
    "data-file", "data-file-raw", "encrypt", NULL
  };
  static const char *const versions[] = { "v2", "v3", NULL };
  static const char *const preallocs[] = {
    [QCOW2_PREALLOC_OFF] = "off",
    [QCOW2_PREALLOC_METADATA] = "metadata",
    [QCOW2_PREALLOC_FALLOC] = "falloc",
    [QCOW2_PREALLOC_FULL] = "full",
    NULL
  };
  static const char *const compressions[] = { "zlib", "zstd", NULL };
  struct qcow2_create_opts opts = { 0 };
  const char *driver;
  uint64_t v;
  int r, i;

  if (!json_object_is_type (o, json_type_object)) {
    error_setg (errp, "qcow2: create options must be a JSON object");
    return -1;
  }
  for (i = 0; unsupported[i]; ++i)
    if (json_object_object_get_ex (o, unsupported[i], NULL)) {
      error_setg (errp, "qcow2: parameter '%s' is not supported",
                  unsupported[i]);
      return -1;
    }
  if (opt_check_keys (o, "qcow2", keys, errp) == -1)
    return -1;

  r = opt_get_string (o, "qcow2", "driver", false, &driver, errp);
  if (r == -1)
    return -1;
  if (r == 0 && strcmp (driver, "qcow2") != 0) {
    error_setg (errp, "qcow2: driver '%.80s' is not qcow2", driver);
    return -1;
  }

  if (opt_get_size (o, "qcow2", "size", true, &opts.size, errp) == -1)
    return -1;
  r = opt_get_size (o, "qcow2", "cluster-size", false, &v, errp);
  if (r == -1)
    return -1;
  if (r == 0) {
    /* 0 would mean "default" in opts: QEMU rejects it. */
    if (v == 0 || v > UINT32_MAX) {
      error_setg (errp, "qcow2: cluster size %" PRIu64 ": must be a power "
                  "of two between %u and %uk", v,
                  1u << QCOW2_MIN_CLUSTER_BITS,
                  1u << (QCOW2_MAX_CLUSTER_BITS - 10));
      return -1;
    }
    opts.cluster_size = v;
  }
  r = opt_get_uint64 (o, "qcow2", "refcount-bits", false, &v, errp);
  if (r == -1)
    return -1;
  if (r == 0) {
    if (v == 0 || v > 64) {
      error_setg (errp, "qcow2: refcount bits %" PRIu64 ": refcount width "
                  "must be a power of two and may not exceed 64 bits", v);
      return -1;
    }
    opts.refcount_bits = v;
  }
  r = parse_enum (o, "version", versions, &i, errp);
  if (r == -1)
    return -1;
  if (r == 0)
    opts.version = i + 2;
  if (opt_get_bool (o, "qcow2", "lazy-refcounts", false,
                    &opts.lazy_refcounts, errp) == -1 ||
      opt_get_bool (o, "qcow2", "extended-l2", false,
                    &opts.extended_l2, errp) == -1)
    return -1;
  r = parse_enum (o, "compression-type", compressions, &i, errp);
  if (r == -1)
    return -1;
  if (r == 0)
    opts.compression_type = compressions[i];
  if (opt_get_string (o, "qcow2", "backing-file", false,
                      &opts.backing_file, errp) == -1 ||
      opt_get_string (o, "qcow2", "backing-fmt", false,
                      &opts.backing_fmt, errp) == -1)
    return -1;
  r = parse_enum (o, "preallocation", preallocs, &i, errp);
  if (r == -1)
    return -1;
  if (r == 0)
    opts.prealloc = i;

  if (qcow2_create_check_opts (&opts, errp) == -1)
    return -1;
  *out = opts;
  return 0;
}
