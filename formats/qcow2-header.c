/* qcow2: parse and validate cluster 0 (header, extensions, backing name).
 *
 * Pure: works on a buffer, does no I/O, so that the unit test and the
 * fuzzer can drive it directly.  Every field is hostile: offsets and
 * sizes are overflow-checked and held to QEMU's limits before anything
 * is allocated from them, and allocations are bounded by the cluster
 * size (at most 2 MiB).
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "qcow2.h"
#include "utils.h"

void
qcow2_info_free (struct qcow2_info *info)
{
  free (info->backing_file);
  free (info->backing_format);
  free (info->features);
  for (size_t i = 0; i < info->nr_exts; ++i)
    free (info->exts[i].data);
  free (info->exts);
  free (info->unknown_fields);
  memset (info, 0, sizeof *info);
}

char *
qcow2_feature_names (const struct qcow2_info *info, uint8_t type,
                     uint64_t bits)
{
  char *s = NULL;
  size_t len = 0;
  bool first = true;
  FILE *fp = open_memstream (&s, &len);

  if (fp == NULL)
    return NULL;
  for (unsigned bit = 0; bit < 64; ++bit) {
    const char *name = NULL;

    if (!(bits & (UINT64_C (1) << bit)))
      continue;
    for (size_t i = 0; i < info->nr_features; ++i)
      if (info->features[i].type == type && info->features[i].bit == bit)
        name = info->features[i].name;
    fprintf (fp, "%sbit %u (%s)", first ? "" : ", ", bit,
             name && *name ? name : "unknown");
    first = false;
  }
  if (fclose (fp) != 0) {
    free (s);
    return NULL;
  }
  return s;
}

/* Sanity of a table: aligned, no overflow, below INT64_MAX, and (if
 * @whole) entirely inside the file, else at least starting inside it.
 */
static int
check_table (const struct qcow2_info *info, uint64_t offset,
             uint64_t entries, uint64_t entry_len, uint64_t file_size,
             bool whole, const char *what, struct error **errp)
{
  uint64_t size, end;

  if (MUL_OVERFLOW (entries, entry_len, &size) ||
      ADD_OVERFLOW (offset, size, &end) || end > INT64_MAX) {
    error_setg (errp, "qcow2: %s at 0x%" PRIx64 " with %" PRIu64
                " entries is too large", what, offset, entries);
    return -1;
  }
  if (!IS_ALIGNED (offset, info->cluster_size)) {
    error_setg (errp, "qcow2: %s offset 0x%" PRIx64 " is not cluster "
                "aligned", what, offset);
    return -1;
  }
  if (offset == 0) {
    error_setg (errp, "qcow2: %s offset is 0 (it would overlap the "
                "header)", what);
    return -1;
  }
  if (whole ? end > file_size : offset >= file_size) {
    error_setg (errp, "qcow2: %s at 0x%" PRIx64 "..0x%" PRIx64 " is past "
                "the end of the file (%" PRIu64 " bytes)", what, offset,
                end, file_size);
    return -1;
  }
  return 0;
}

static int
parse_fixed (const struct qcow2_disk_header *h, size_t avail,
             uint64_t file_size, struct qcow2_info *info,
             struct error **errp)
{
  uint64_t l2_entries, guest_clusters, l1_needed, bytes;

  if (be32toh (h->magic) != QCOW2_MAGIC) {
    error_setg (errp, "qcow2: not a qcow2 image (bad magic 0x%08" PRIx32 ")",
                be32toh (h->magic));
    return -1;
  }
  info->version = be32toh (h->version);
  if (info->version != 2 && info->version != 3) {
    error_setg (errp, "qcow2: unsupported qcow2 version %" PRIu32,
                info->version);
    return -1;
  }
  info->cluster_bits = be32toh (h->cluster_bits);
  if (info->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
      info->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
    error_setg (errp, "qcow2: unsupported cluster size 2^%" PRIu32
                " (must be 512 bytes to 2 MiB)", info->cluster_bits);
    return -1;
  }
  info->cluster_size = UINT64_C (1) << info->cluster_bits;

  if (info->version == 2) {
    info->header_length = QCOW2_HDR_V2_LENGTH;
    info->refcount_order = 4;
  }
  else {
    if (avail < QCOW2_HDR_V3_MIN_LENGTH) {
      error_setg (errp, "qcow2: file too short for a version 3 header "
                  "(%zu bytes)", avail);
      return -1;
    }
    info->header_length = be32toh (h->header_length);
    if (info->header_length < QCOW2_HDR_V3_MIN_LENGTH) {
      error_setg (errp, "qcow2: header length %" PRIu32 " is too short "
                  "(version 3 needs at least %d)", info->header_length,
                  QCOW2_HDR_V3_MIN_LENGTH);
      return -1;
    }
    if (info->header_length > info->cluster_size) {
      error_setg (errp, "qcow2: header length %" PRIu32 " exceeds the "
                  "cluster size %" PRIu64, info->header_length,
                  info->cluster_size);
      return -1;
    }
    if (!IS_ALIGNED (info->header_length, 8)) {
      error_setg (errp, "qcow2: header length %" PRIu32 " is not a "
                  "multiple of 8", info->header_length);
      return -1;
    }
    info->incompat = be64toh (h->incompatible_features);
    info->compat = be64toh (h->compatible_features);
    info->autoclear = be64toh (h->autoclear_features);
    info->refcount_order = be32toh (h->refcount_order);
    if (info->header_length > offsetof (struct qcow2_disk_header,
                                        compression_type))
      info->compression_type = h->compression_type;
  }

  if (info->refcount_order > QCOW2_MAX_REFCOUNT_ORDER) {
    error_setg (errp, "qcow2: refcount order %" PRIu32 " is too large "
                "(at most %d)", info->refcount_order,
                QCOW2_MAX_REFCOUNT_ORDER);
    return -1;
  }

  /* Compression type and its feature bit go together. */
  switch (info->compression_type) {
  case QCOW2_COMPRESSION_ZLIB:
    if (info->incompat & QCOW2_INCOMPAT_COMPRESSION) {
      error_setg (errp, "qcow2: compression type is zlib but the "
                  "compression type feature bit is set");
      return -1;
    }
    break;
  case QCOW2_COMPRESSION_ZSTD:
    if (!(info->incompat & QCOW2_INCOMPAT_COMPRESSION)) {
      error_setg (errp, "qcow2: compression type is zstd but the "
                  "compression type feature bit is not set");
      return -1;
    }
    break;
  default:
    error_setg (errp, "qcow2: unknown compression type %u",
                info->compression_type);
    return -1;
  }

  info->extended_l2 = (info->incompat & QCOW2_INCOMPAT_EXTL2) != 0;
  if (info->extended_l2 &&
      info->cluster_bits < QCOW2_EXTL2_MIN_CLUSTER_BITS) {
    error_setg (errp, "qcow2: extended L2 entries need a cluster size of "
                "at least 16 KiB (this image has %" PRIu64 " bytes)",
                info->cluster_size);
    return -1;
  }
  info->l2_entry_size = info->extended_l2 ? 16 : 8;
  info->l2_bits = info->cluster_bits - (info->extended_l2 ? 4 : 3);
  info->subclusters = info->extended_l2 ? QCOW2_EXTL2_SUBCLUSTERS : 1;
  info->subcluster_bits = info->cluster_bits - (info->extended_l2 ? 5 : 0);
  info->csize_shift = 62 - (info->cluster_bits - 8);
  info->csize_mask = (UINT64_C (1) << (info->cluster_bits - 8)) - 1;
  info->coffset_mask = (UINT64_C (1) << info->csize_shift) - 1;

  info->crypt_method = be32toh (h->crypt_method);
  info->size = be64toh (h->size);
  info->l1_size = be32toh (h->l1_size);
  info->l1_offset = be64toh (h->l1_table_offset);
  info->reftable_offset = be64toh (h->refcount_table_offset);
  info->reftable_clusters = be32toh (h->refcount_table_clusters);
  info->nb_snapshots = be32toh (h->nb_snapshots);
  info->snapshots_offset = be64toh (h->snapshots_offset);

  if (info->size > INT64_MAX) {
    error_setg (errp, "qcow2: virtual size %" PRIu64 " is too large",
                info->size);
    return -1;
  }
  if ((uint64_t) info->l1_size * 8 > QCOW2_MAX_L1_SIZE) {
    error_setg (errp, "qcow2: L1 table of %" PRIu32 " entries is too "
                "large (at most %" PRIu64 " bytes)", info->l1_size,
                QCOW2_MAX_L1_SIZE);
    return -1;
  }
  /* Each L1 entry covers one L2 table's worth of guest clusters. */
  l2_entries = UINT64_C (1) << info->l2_bits;
  guest_clusters = info->size / info->cluster_size +
    (info->size % info->cluster_size != 0);
  l1_needed = guest_clusters / l2_entries + (guest_clusters % l2_entries != 0);
  if (l1_needed > info->l1_size) {
    error_setg (errp, "qcow2: L1 table of %" PRIu32 " entries is too small "
                "for the virtual size %" PRIu64 " (needs %" PRIu64 ")",
                info->l1_size, info->size, l1_needed);
    return -1;
  }
  if (info->l1_size > 0 &&
      check_table (info, info->l1_offset, info->l1_size, 8, file_size,
                   true, "L1 table", errp) == -1)
    return -1;

  if (info->reftable_clusters == 0) {
    error_setg (errp, "qcow2: the image has no refcount table");
    return -1;
  }
  if (MUL_OVERFLOW ((uint64_t) info->reftable_clusters, info->cluster_size,
                    &bytes) || bytes > QCOW2_MAX_REFTABLE_SIZE) {
    error_setg (errp, "qcow2: refcount table of %" PRIu32 " clusters is "
                "too large (at most %" PRIu64 " bytes)",
                info->reftable_clusters, QCOW2_MAX_REFTABLE_SIZE);
    return -1;
  }
  if (check_table (info, info->reftable_offset, bytes / 8, 8, file_size,
                   false, "refcount table", errp) == -1)
    return -1;

  if (info->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
    error_setg (errp, "qcow2: too many snapshots (%" PRIu32 ", at most %d)",
                info->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
    return -1;
  }
  if (info->nb_snapshots > 0 &&
      check_table (info, info->snapshots_offset, info->nb_snapshots,
                   QCOW2_SNAPSHOT_HEADER_MIN, file_size, false,
                   "snapshot table", errp) == -1)
    return -1;
  return 0;
}

static int
add_ext (struct qcow2_info *info, uint32_t type, uint32_t len,
         const uint8_t *data, struct error **errp)
{
  struct qcow2_ext *v = realloc (info->exts,
                                 (info->nr_exts + 1) * sizeof *v);

  if (v == NULL) {
    error_setg_errno (errp, errno, "qcow2: header extensions");
    return -1;
  }
  info->exts = v;
  v[info->nr_exts].type = type;
  v[info->nr_exts].len = len;
  v[info->nr_exts].data = malloc (len ?: 1);
  if (v[info->nr_exts].data == NULL) {
    error_setg_errno (errp, errno, "qcow2: header extensions");
    return -1;
  }
  memcpy (v[info->nr_exts].data, data, len);
  info->nr_exts++;
  return 0;
}

static int
parse_feature_table (struct qcow2_info *info, const uint8_t *data,
                     uint32_t len, struct error **errp)
{
  size_t n = len / 48;

  if (len % 48 != 0) {
    error_setg (errp, "qcow2: feature name table length %" PRIu32 " is "
                "not a multiple of 48", len);
    return -1;
  }
  info->features = calloc (n ?: 1, sizeof *info->features);
  if (info->features == NULL) {
    error_setg_errno (errp, errno, "qcow2: feature name table");
    return -1;
  }
  for (size_t i = 0; i < n; ++i) {
    struct qcow2_feature *f = &info->features[i];
    f->type = data[i * 48];
    f->bit = data[i * 48 + 1];
    memcpy (f->name, &data[i * 48 + 2], 46);
    f->name[46] = '\0';
    /* The name is for messages: keep it printable. */
    for (char *p = f->name; *p; ++p)
      if ((unsigned char) *p < 0x20 || (unsigned char) *p >= 0x7f)
        *p = '?';
  }
  info->nr_features = n;
  return 0;
}

/* Extensions run from the end of the header to the backing file name,
 * or to the end of cluster 0.  @c0 holds all of cluster 0.
 */
static int
parse_extensions (struct qcow2_info *info, const uint8_t *c0,
                  uint64_t end, struct error **errp)
{
  uint64_t off = info->header_length;
  bool seen_fmt = false, seen_features = false;

  for (;;) {
    uint32_t type, len;

    if (off == end)
      return 0;                 /* no room for more: no terminator needed */
    if (end - off < 8) {
      error_setg (errp, "qcow2: header extension at 0x%" PRIx64 " is "
                  "truncated", off);
      return -1;
    }
    memcpy (&type, c0 + off, 4);
    memcpy (&len, c0 + off + 4, 4);
    type = be32toh (type);
    len = be32toh (len);
    if (type == QCOW2_EXT_END)
      return 0;
    off += 8;
    if (len > end - off) {
      error_setg (errp, "qcow2: header extension 0x%08" PRIx32 " at 0x%"
                  PRIx64 " is too large (%" PRIu32 " bytes)", type,
                  off - 8, len);
      return -1;
    }

    switch (type) {
    case QCOW2_EXT_BACKING_FORMAT:
      if (seen_fmt) {
        error_setg (errp, "qcow2: duplicate backing format extension");
        return -1;
      }
      seen_fmt = true;
      if (len > QCOW2_MAX_BACKING_FMT || memchr (c0 + off, 0, len)) {
        error_setg (errp, "qcow2: invalid backing format extension "
                    "(%" PRIu32 " bytes)", len);
        return -1;
      }
      info->backing_format = strndup ((const char *) c0 + off, len);
      if (info->backing_format == NULL) {
        error_setg_errno (errp, errno, "qcow2: backing format");
        return -1;
      }
      break;
    case QCOW2_EXT_FEATURE_TABLE:
      if (seen_features) {
        error_setg (errp, "qcow2: duplicate feature name table");
        return -1;
      }
      seen_features = true;
      if (parse_feature_table (info, c0 + off, len, errp) == -1)
        return -1;
      break;
    default:
      break;                    /* kept verbatim below */
    }
    if (add_ext (info, type, len, c0 + off, errp) == -1)
      return -1;
    /* Data is padded to 8 bytes; the padding may end exactly at @end. */
    off += MIN ((uint64_t) ROUND_UP (len, 8), end - off);
  }
}

int
qcow2_header_parse (const void *buf, size_t len, uint64_t file_size,
                    struct qcow2_info *info, struct error **errp)
{
  const struct qcow2_disk_header *h;
  CLEANUP_FREE uint8_t *c0 = NULL;
  uint64_t backing_off, ext_end;
  uint32_t backing_len;

  memset (info, 0, sizeof *info);
  if (len < QCOW2_HDR_V2_LENGTH) {
    error_setg (errp, "qcow2: file too short for a qcow2 header "
                "(%zu bytes)", len);
    return -1;
  }
  if (len > file_size)
    len = file_size;

  /* Work on a copy of all of cluster 0, zero past the data we have.
   * The fixed header is parsed first (from at most 112 bytes) to learn
   * the cluster size, which bounds the copy to 2 MiB.
   */
  {
    uint8_t fixed[sizeof *h] = { 0 };
    memcpy (fixed, buf, MIN (len, sizeof fixed));
    h = (const struct qcow2_disk_header *) fixed;
    if (parse_fixed (h, len, file_size, info, errp) == -1)
      goto err;
    backing_off = be64toh (h->backing_file_offset);
    backing_len = be32toh (h->backing_file_size);
  }
  c0 = calloc (1, info->cluster_size);
  if (c0 == NULL) {
    error_setg_errno (errp, errno, "qcow2: reading the header");
    goto err;
  }
  memcpy (c0, buf, MIN ((uint64_t) len, info->cluster_size));

  /* Header fields past what we know are kept for a rewrite. */
  if (info->header_length > QCOW2_HDR_V3_LENGTH) {
    info->unknown_fields_len = info->header_length - QCOW2_HDR_V3_LENGTH;
    info->unknown_fields = malloc (info->unknown_fields_len);
    if (info->unknown_fields == NULL) {
      error_setg_errno (errp, errno, "qcow2: reading the header");
      goto err;
    }
    memcpy (info->unknown_fields, c0 + QCOW2_HDR_V3_LENGTH,
            info->unknown_fields_len);
  }

  ext_end = info->cluster_size;
  if (backing_off != 0) {
    if (backing_off > info->cluster_size ||
        backing_off < info->header_length) {
      error_setg (errp, "qcow2: invalid backing file offset 0x%" PRIx64,
                  backing_off);
      goto err;
    }
    if (backing_len > QCOW2_MAX_BACKING_FILE_NAME) {
      error_setg (errp, "qcow2: backing file name is too long (%" PRIu32
                  " bytes, at most %d)", backing_len, QCOW2_MAX_BACKING_FILE_NAME);
      goto err;
    }
    if (backing_len > info->cluster_size - backing_off) {
      error_setg (errp, "qcow2: backing file name at 0x%" PRIx64 " (%"
                  PRIu32 " bytes) runs past the header cluster",
                  backing_off, backing_len);
      goto err;
    }
    if (backing_len == 0 || memchr (c0 + backing_off, 0, backing_len)) {
      error_setg (errp, "qcow2: backing file name at 0x%" PRIx64 " is "
                  "empty or contains a NUL byte", backing_off);
      goto err;
    }
    info->backing_file = strndup ((const char *) c0 + backing_off,
                                  backing_len);
    if (info->backing_file == NULL) {
      error_setg_errno (errp, errno, "qcow2: backing file name");
      goto err;
    }
    ext_end = backing_off;
  }
  /* Version 2 images have extensions too (after the 72-byte header). */
  if (parse_extensions (info, c0, ext_end, errp) == -1)
    goto err;
  return 0;

 err:
  qcow2_info_free (info);
  return -1;
}
