/* qcow2: where the metadata is, so that no write lands on it.
 *
 * A hostile or damaged image can point an L2 entry at its own L1 table,
 * or an L1 entry at the refcount table; writing guest data or an L2
 * table there would destroy the image.  QEMU checks every write against
 * the clusters its metadata occupies (qcow2_pre_write_overlap_check);
 * so do we, with a map from host cluster to what it holds: the header,
 * the active L1 table and the L2 tables it points to, the refcount
 * table and blocks, the snapshot table and the snapshots' L1 tables (not
 * their L2 tables: QEMU's default leaves those out too, as they cost a
 * walk of every snapshot), and the bitmap directory, tables and data
 * clusters (added by qcow2-bitmap.c).  It is built at a read-write open and kept up
 * to date as tables are created and freed, under s->lock.
 *
 * A hit fails the write with EIO and marks the image corrupt on disk,
 * as QEMU does: from then on it opens read-only until repaired.
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

struct qcow2_meta_map {
  uint64_t *keys;               /* cluster index + 1; 0 = empty */
  uint8_t *kinds;
  size_t cap;                   /* power of 2 */
  size_t used;
};

static const char *const kind_names[] = {
  [QCOW2_META_HEADER] = "the header",
  [QCOW2_META_L1] = "the L1 table",
  [QCOW2_META_L2] = "an L2 table",
  [QCOW2_META_REFTABLE] = "the refcount table",
  [QCOW2_META_REFBLOCK] = "a refcount block",
  [QCOW2_META_SNAPSHOTS] = "the snapshot table",
  [QCOW2_META_SNAPSHOT_L1] = "a snapshot's L1 table",
  [QCOW2_META_BITMAP_DIR] = "the bitmap directory",
  [QCOW2_META_BITMAP_TABLE] = "a bitmap table",
  [QCOW2_META_BITMAP_DATA] = "a bitmap data cluster",
};

static size_t
slot_of (const struct qcow2_meta_map *m, uint64_t key)
{
  return (size_t) ((key * UINT64_C (0x9e3779b97f4a7c15)) >> 20) &
    (m->cap - 1);
}

static int
grow (struct qcow2_meta_map *m)
{
  size_t cap = m->cap ? m->cap * 2 : 256;
  uint64_t *keys = calloc (cap, sizeof *keys);
  uint8_t *kinds = calloc (cap, 1);
  struct qcow2_meta_map n = { keys, kinds, cap, 0 };

  if (keys == NULL || kinds == NULL) {
    free (keys);
    free (kinds);
    return -ENOMEM;
  }
  for (size_t i = 0; i < m->cap; ++i)
    if (m->keys[i]) {
      size_t j = slot_of (&n, m->keys[i]);
      while (n.keys[j])
        j = (j + 1) & (cap - 1);
      n.keys[j] = m->keys[i];
      n.kinds[j] = m->kinds[i];
      n.used++;
    }
  free (m->keys);
  free (m->kinds);
  *m = n;
  return 0;
}

/* The kind of metadata in host cluster @cluster, or 0. */
static int
lookup (const struct qcow2_meta_map *m, uint64_t cluster)
{
  uint64_t key = cluster + 1;

  if (m->cap == 0)
    return 0;
  for (size_t j = slot_of (m, key); m->keys[j]; j = (j + 1) & (m->cap - 1))
    if (m->keys[j] == key)
      return m->kinds[j];
  return 0;
}

int
qcow2_meta_kind (struct qcow2_state *s, uint64_t off)
{
  return s->meta ? lookup (s->meta, off >> s->info.cluster_bits) : 0;
}

/* Record [off, off + len) as @kind.  A cluster already recorded as
 * another kind is left as it was: 1 (the image is inconsistent, and
 * writes through the newcomer will be refused), else 0 or -ENOMEM.
 */
int
qcow2_meta_add (struct qcow2_state *s, uint64_t off, uint64_t len, int kind)
{
  struct qcow2_meta_map *m = s->meta;
  uint64_t first = off >> s->info.cluster_bits;
  uint64_t last = (off + len - 1) >> s->info.cluster_bits;
  int clash = 0;

  if (m == NULL || len == 0)
    return 0;
  for (uint64_t c = first; c <= last; ++c) {
    uint64_t key = c + 1;
    size_t j;

    if ((m->used + 1) * 2 > m->cap && grow (m) < 0)
      return -ENOMEM;
    for (j = slot_of (m, key); m->keys[j] && m->keys[j] != key;
         j = (j + 1) & (m->cap - 1))
      ;
    if (m->keys[j] == key) {
      /* The header shares cluster 0 with nothing; an L2 table may be
       * shared by a snapshot (same kind).
       */
      if (m->kinds[j] != kind)
        clash = 1;
      continue;
    }
    m->keys[j] = key;
    m->kinds[j] = kind;
    m->used++;
  }
  return clash;
}

void
qcow2_meta_remove (struct qcow2_state *s, uint64_t off, uint64_t len)
{
  struct qcow2_meta_map *m = s->meta;
  uint64_t first = off >> s->info.cluster_bits;
  uint64_t last = (off + len - 1) >> s->info.cluster_bits;

  if (m == NULL || m->cap == 0 || len == 0)
    return;
  for (uint64_t c = first; c <= last; ++c) {
    uint64_t key = c + 1;
    size_t j;
    for (j = slot_of (m, key); m->keys[j] && m->keys[j] != key;
         j = (j + 1) & (m->cap - 1))
      ;
    if (m->keys[j] != key)
      continue;
    /* Backward-shift deletion keeps every probe chain whole. */
    m->keys[j] = 0;
    m->used--;
    for (size_t k = (j + 1) & (m->cap - 1); m->keys[k];
         k = (k + 1) & (m->cap - 1)) {
      uint64_t kk = m->keys[k];
      uint8_t kind = m->kinds[k];
      m->keys[k] = 0;
      m->used--;
      for (j = slot_of (m, kk); m->keys[j]; j = (j + 1) & (m->cap - 1))
        ;
      m->keys[j] = kk;
      m->kinds[j] = kind;
      m->used++;
    }
  }
}

int
qcow2_mark_corrupt (struct qcow2_state *s)
{
  if (s->corrupt)
    return 0;
  s->corrupt = true;
  nbdd_error ("qcow2: %s: marking the image corrupt: it opens read-only "
              "until repaired ('qemu-img check -r all')", s->filename);
  return qcow2_write_incompat (s, s->info.incompat | QCOW2_INCOMPAT_CORRUPT);
}

int
qcow2_meta_check_write (struct qcow2_state *s, uint64_t off, uint64_t len,
                        const char *what)
{
  uint64_t first, last;

  if (s->meta == NULL || len == 0)
    return 0;
  first = off >> s->info.cluster_bits;
  last = (off + len - 1) >> s->info.cluster_bits;
  for (uint64_t c = first; c <= last; ++c) {
    int kind = lookup (s->meta, c);
    if (kind) {
      qcow2_corrupt (s, "refusing to write %s at host offset 0x%" PRIx64
                     ": it holds %s", what, c << s->info.cluster_bits,
                     kind_names[kind]);
      qcow2_mark_corrupt (s);
      return -EIO;
    }
  }
  return 0;
}

/* The snapshot table and the snapshots' L1 tables. */
static int
add_snapshots (struct qcow2_state *s)
{
  const struct qcow2_info *info = &s->info;
  uint64_t pos = info->snapshots_offset;
  uint64_t fsize = node_size (s->file->node);
  uint8_t h[QCOW2_SNAPSHOT_HEADER_MIN];
  int r;

  for (uint32_t i = 0; i < info->nb_snapshots; ++i) {
    uint64_t l1, len;
    uint32_t l1_size, extra;
    uint16_t id_len, name_len;

    if (pos + sizeof h > fsize)
      return 0;                 /* a broken table: reads will say so */
    if ((r = node_pread (s->file->node, h, sizeof h, pos, 0)) < 0)
      return r;
    memcpy (&l1, h, 8);
    memcpy (&l1_size, h + 8, 4);
    memcpy (&id_len, h + 12, 2);
    memcpy (&name_len, h + 14, 2);
    memcpy (&extra, h + 36, 4);
    l1 = be64toh (l1);
    l1_size = be32toh (l1_size);
    if (l1 && l1_size && (uint64_t) l1_size * 8 <= QCOW2_MAX_L1_SIZE &&
        (r = qcow2_meta_add (s, l1, (uint64_t) l1_size * 8,
                             QCOW2_META_SNAPSHOT_L1)) < 0)
      return r;
    len = sizeof h + be32toh (extra) + be16toh (id_len) + be16toh (name_len);
    pos += ROUND_UP (len, (uint64_t) 8);
  }
  if (pos > info->snapshots_offset &&
      (r = qcow2_meta_add (s, info->snapshots_offset,
                           pos - info->snapshots_offset,
                           QCOW2_META_SNAPSHOTS)) < 0)
    return r;
  return 0;
}

int
qcow2_meta_init (struct qcow2_state *s, struct error **errp)
{
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  uint64_t entries = (uint64_t) info->reftable_clusters * cs / 8;
  int r;

  s->meta = calloc (1, sizeof *s->meta);
  if (s->meta == NULL)
    goto nomem;
  /* Clashes between kinds are not errors here: the image may still
   * be read, and writes through the newcomer are refused later.
   */
  if (qcow2_meta_add (s, 0, cs, QCOW2_META_HEADER) < 0 ||
      qcow2_meta_add (s, info->l1_offset, (uint64_t) info->l1_size * 8,
                      QCOW2_META_L1) < 0 ||
      qcow2_meta_add (s, info->reftable_offset,
                      (uint64_t) info->reftable_clusters * cs,
                      QCOW2_META_REFTABLE) < 0)
    goto nomem;
  for (uint64_t t = 0; t < entries; ++t) {
    uint64_t v;
    if ((r = node_pread (s->file->node, &v, 8, info->reftable_offset + t * 8,
                         0)) < 0)
      goto io;
    v = be64toh (v) & QCOW2_REFT_OFFSET_MASK;
    if (v && qcow2_meta_add (s, v, cs, QCOW2_META_REFBLOCK) < 0)
      goto nomem;
  }
  for (uint32_t i = 0; i < info->l1_size; ++i) {
    uint64_t l2 = s->l1[i] & QCOW2_L1E_OFFSET_MASK;
    if (l2 && qcow2_meta_add (s, l2, cs, QCOW2_META_L2) < 0)
      goto nomem;
  }
  if ((r = add_snapshots (s)) < 0)
    goto io;
  return 0;

 nomem:
  error_setg_errno (errp, ENOMEM, "qcow2: %s: mapping the metadata",
                    s->filename);
  return -1;
 io:
  error_setg_errno (errp, -r, "qcow2: %s: mapping the metadata",
                    s->filename);
  return -1;
}

void
qcow2_meta_free (struct qcow2_state *s)
{
  if (s->meta) {
    free (s->meta->keys);
    free (s->meta->kinds);
    free (s->meta);
    s->meta = NULL;
  }
}
