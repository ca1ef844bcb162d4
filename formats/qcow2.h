/* qcow2: the internal header of the qcow2 format driver.
 *
 * On-disk layout and QEMU's limits: qcow2-format.h, so that every image
 * QEMU opens, we open, and every image QEMU refuses for being absurd,
 * we refuse too.
 *
 * Files:
 *   qcow2-header.c    parse and validate cluster 0 (pure: no I/O)
 *   qcow2-cache.c     bounded, thread-safe cache of metadata slices
 *   qcow2-map.c       guest offset -> host mapping (L1, L2, subclusters)
 *   qcow2-refcount.c  refcount lookup
 *   qcow2-alloc.c     cluster allocation and refcount updates
 *   qcow2-repair.c    rebuilding the refcounts of a dirty image
 *   qcow2-write.c     writes, zeroing, discard, flush
 *   qcow2-compress.c  deflate and zstd decompression
 *   qcow2-bitmap.c    persistent dirty bitmaps (the bitmaps extension)
 *   qcow2-create.c    new images (qcow2-create.h)
 *   qcow2.c           the driver: open/close, backing, pread, status
 */
#ifndef NBDD_FORMATS_QCOW2_H
#define NBDD_FORMATS_QCOW2_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "driver.h"
#include "error.h"
#include "qcow2-format.h"

/* The incompatible features this driver understands; the rest are
 * refused by name.
 */
#define QCOW2_INCOMPAT_SUPPORTED                                  \
  (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT |                \
   QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2)

/* The fixed header as it is on disk (big endian). */
struct qcow2_disk_header {
  uint32_t magic;
  uint32_t version;
  uint64_t backing_file_offset;
  uint32_t backing_file_size;
  uint32_t cluster_bits;
  uint64_t size;
  uint32_t crypt_method;
  uint32_t l1_size;
  uint64_t l1_table_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  /* v3 */
  uint64_t incompatible_features;
  uint64_t compatible_features;
  uint64_t autoclear_features;
  uint32_t refcount_order;
  uint32_t header_length;
  /* optional additional fields */
  uint8_t compression_type;
  uint8_t padding[7];
} __attribute__ ((__packed__));
_Static_assert (sizeof (struct qcow2_disk_header) == QCOW2_HDR_V3_LENGTH,
                "qcow2 header with compression_type is 112 bytes");

/* One header extension, kept verbatim so that a header rewrite (the
 * write side) can preserve the ones we do not understand.
 */
struct qcow2_ext {
  uint32_t type;
  uint32_t len;
  uint8_t *data;                /* len bytes */
};

/* One entry of the feature name table. */
struct qcow2_feature {
  uint8_t type;                 /* 0 incompat, 1 compat, 2 autoclear */
  uint8_t bit;
  char name[47];                /* 46 bytes on disk, NUL added */
};

/* Everything cluster 0 says, validated, in host byte order. */
struct qcow2_info {
  uint32_t version;
  uint32_t cluster_bits;
  uint64_t cluster_size;
  uint64_t size;                /* virtual size */
  uint32_t crypt_method;
  uint32_t l1_size;             /* entries */
  uint64_t l1_offset;
  uint64_t reftable_offset;
  uint32_t reftable_clusters;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  uint64_t incompat, compat, autoclear;
  uint32_t refcount_order;
  uint32_t header_length;
  uint8_t compression_type;

  /* Derived. */
  bool extended_l2;
  uint32_t l2_entry_size;       /* 8 or 16 bytes */
  uint32_t l2_bits;             /* log2 (entries per L2 table) */
  uint32_t subclusters;         /* 1 or QCOW2_EXTL2_SUBCLUSTERS */
  uint32_t subcluster_bits;     /* log2 (subcluster size) */
  uint32_t csize_shift;         /* compressed descriptor layout */
  uint64_t csize_mask;
  uint64_t coffset_mask;

  char *backing_file;           /* NUL-terminated, or NULL */
  char *backing_format;         /* from the extension, or NULL */

  struct qcow2_feature *features;
  size_t nr_features;
  struct qcow2_ext *exts;       /* all extensions, in order */
  size_t nr_exts;
  /* Header bytes past the fields we know, up to header_length. */
  uint8_t *unknown_fields;
  size_t unknown_fields_len;
};

/* qcow2-header.c */

/* Parse cluster 0 from @buf (the first @len bytes of the file, which
 * is @file_size bytes long).  Bytes of cluster 0 past @len read as
 * zero.  Validates everything that does not need I/O, with QEMU's
 * limits.  0, or -1 with errp set; on failure @info holds nothing to
 * free.
 */
int qcow2_header_parse (const void *buf, size_t len, uint64_t file_size,
                        struct qcow2_info *info, struct error **errp);
void qcow2_info_free (struct qcow2_info *info);
/* "bit 5 (name)" list of the incompatible bits in @bits, for errors.
 * Returns a malloc'd string or NULL.
 */
char *qcow2_feature_names (const struct qcow2_info *info, uint8_t type,
                           uint64_t bits);

/* qcow2-cache.c */

struct qcow2_cache;
struct qcow2_cache_entry;

/* A cache of at most @nr_entries slices of @entry_size bytes each,
 * read from @file.  Slices are loaded on demand and evicted least
 * recently used first.  @what names it in messages ("L2", ...).
 */
struct qcow2_cache *qcow2_cache_new (struct node_child *file, uint32_t entry_size,
                                     size_t nr_entries, const char *what);
void qcow2_cache_free (struct qcow2_cache *c);
/* Pin the slice at host @offset (aligned to entry_size), loading it if
 * needed.  *data is valid until qcow2_cache_put.  A thread may hold at
 * most one pin per cache at a time (a get may wait for a put when all
 * slices are pinned).  0 or -errno.
 */
int qcow2_cache_get (struct qcow2_cache *c, uint64_t offset,
                     struct qcow2_cache_entry **e, const void **data);
void qcow2_cache_put (struct qcow2_cache *c, struct qcow2_cache_entry *e);
/* Like qcow2_cache_get, but only if the slice is cached: -EAGAIN
 * otherwise, without reading anything.
 */
int qcow2_cache_peek (struct qcow2_cache *c, uint64_t offset,
                      struct qcow2_cache_entry **e, const void **data);
/* The write side, always under the image's metadata lock (s->lock).
 *
 * Pin the slice at @offset as a new, zero-filled table, without reading
 * the file; it is dirty.
 */
int qcow2_cache_get_new (struct qcow2_cache *c, uint64_t offset,
                         struct qcow2_cache_entry **e, void **data);
/* Mark a pinned slice changed; returns its data, now writable. */
void *qcow2_cache_dirty (struct qcow2_cache *c, struct qcow2_cache_entry *e);
/* Before any slice of @c is written, @dep's dirty slices are written
 * and the file synced.  0 or -errno (settling an older dependency).
 */
int qcow2_cache_set_dependency (struct qcow2_cache *c,
                                struct qcow2_cache *dep);
/* Before any slice of @c is written, the file is synced. */
void qcow2_cache_depends_on_flush (struct qcow2_cache *c);
/* Write every dirty slice back (after what it depends on).  It does
 * not sync the file: the caller does, when it needs durability.
 */
int qcow2_cache_flush (struct qcow2_cache *c);
/* Forget the unpinned slice at @offset, dirty or not (its cluster was
 * freed, or is about to be rewritten whole).
 */
void qcow2_cache_discard (struct qcow2_cache *c, uint64_t offset);
/* Forget every unpinned slice (the structure they held was replaced). */
void qcow2_cache_discard_all (struct qcow2_cache *c);
/* Statistics, for tests. */
void qcow2_cache_stats (struct qcow2_cache *c, uint64_t *hits,
                        uint64_t *misses, size_t *nr_entries);

/* A guest cluster whose L2 entry a writer is about to change. */
struct qcow2_inflight {
  uint64_t cluster;             /* guest cluster index */
  struct qcow2_inflight *next;
};

/* A freed host range, punched once the metadata dropping it is synced. */
struct qcow2_punch {
  uint64_t offset, len;
};

/* qcow2.c: the state of one open image. */
struct qcow2_state {
  /* The metadata lock: the L1 table, the contents of both caches, the
   * allocator and everything below marked 'lock'.  Data I/O is done
   * without it.
   */
  pthread_mutex_t lock;
  pthread_cond_t inflight_done; /* an entry left 'inflight' */
  struct qcow2_inflight *inflight;  /* lock */
  bool writable;
  uint64_t next_free;           /* lock: where clusters are allocated */
  struct qcow2_punch *punches;  /* lock */
  size_t nr_punches, punches_cap;
  uint8_t *zero_cluster;        /* cluster_size zeroes, for zero writes */

  struct node_child *file;      /* an edge in node->children */
  struct node_child *backing;   /* an edge, or NULL */
  char *filename;               /* for messages */
  struct qcow2_info info;
  uint64_t *l1;                 /* host order, l1_size entries */
  struct qcow2_cache *l2_cache;
  struct qcow2_cache *refcount_cache;
  uint32_t l2_slice_size;       /* bytes per L2 cache entry */
  uint32_t rc_slice_size;       /* bytes per refcount cache entry */
  bool dirty;                   /* incompat DIRTY: refcounts may be stale;
                                   lock, once writable */
  /* Lazy refcounts (compat bit 0, or the lazy-refcounts option): L2
   * updates need not wait for the refcounts they rely on, because the
   * image is marked DIRTY on disk first and cleaned at a clean close.
   */
  bool lazy_refcounts;
  bool corrupt;                 /* incompat CORRUPT (lock, once open) */
  struct qcow2_meta_map *meta;  /* lock: where metadata is (writable) */
  /* The bitmap directory, loaded and checked at open (qcow2-bitmap.c).
   * Replaced under both bitmaps_lock (write) and lock; read under
   * either, so the write-intent path (qcow2_bitmap_sync) rewrites bits
   * without holding up the allocator.
   */
  struct qcow2_bitmaps *bitmaps;
  pthread_rwlock_t bitmaps_lock;
  atomic_uint corrupt_reports;  /* messages logged, to log only a few */
};

/* qcow2-map.c */

enum qcow2_kind {
  QCOW2_UNALLOCATED,            /* read from the backing node, or zeroes */
  QCOW2_ZERO,                   /* reads as zeroes, allocated here */
  QCOW2_DATA,                   /* at host offset in the file */
  QCOW2_COMPRESSED,             /* one compressed cluster */
};

/* A run of guest bytes from one offset that map the same way. */
struct qcow2_run {
  enum qcow2_kind kind;
  uint64_t len;                 /* bytes from the guest offset */
  uint64_t host;                /* DATA: host offset of the first byte;
                                   COMPRESSED: of the compressed data */
  uint64_t csize;               /* COMPRESSED: compressed bytes */
  uint64_t cluster_start;       /* COMPRESSED: guest offset of cluster */
};

/* Map [offset, offset + max) (max > 0, inside the image) to the first
 * run; run->len is at least 1 byte and at most @max.  0 or -EIO (the
 * image is corrupt, which is logged) or -errno.
 */
int qcow2_map (struct qcow2_state *s, uint64_t offset, uint64_t max,
               struct qcow2_run *run);
/* The same without ever blocking (for the event loop): -EAGAIN if the
 * lock is taken or the L2 slice is not cached.
 */
int qcow2_map_nowait (struct qcow2_state *s, uint64_t offset, uint64_t max,
                      struct qcow2_run *run);

/* Pure helpers, exported for the unit test. */
struct qcow2_cdesc {
  uint64_t offset;              /* host byte offset */
  uint64_t size;                /* bytes to read, up to the sector end */
};
void qcow2_decode_compressed (const struct qcow2_info *info, uint64_t l2e,
                              struct qcow2_cdesc *d);
/* Classify subcluster @sc of an L2 entry (@bitmap is 0 for standard
 * L2): returns the kind, or -1 if the entry is invalid.
 */
int qcow2_classify (const struct qcow2_info *info, uint64_t l2e,
                    uint64_t bitmap, unsigned sc);

/* Log a corruption (a few times per image, then only at debug level)
 * and return -EIO.
 */
int qcow2_corrupt (struct qcow2_state *s, const char *fs, ...)
  __attribute__ ((format (printf, 2, 3)));

/* qcow2-refcount.c */

/* The refcount of the host cluster holding @host_offset. */
int qcow2_refcount_get (struct qcow2_state *s, uint64_t host_offset,
                        uint64_t *refcount);

/* qcow2-alloc.c: host clusters and refcounts, under s->lock. */

/* Allocate up to @n contiguous clusters (refcount 1, never used
 * before, so reading as zeroes).  Returns how many (at least 1), or
 * -errno.
 */
int64_t qcow2_alloc_clusters (struct qcow2_state *s, uint64_t n,
                              uint64_t *offset);
/* Drop one reference to each of @n clusters from @offset; those that
 * reach 0 are punched after the next metadata sync.
 */
int qcow2_free_clusters (struct qcow2_state *s, uint64_t offset, uint64_t n);
/* The same for the clusters a compressed range touches. */
int qcow2_free_bytes (struct qcow2_state *s, uint64_t offset, uint64_t len);
/* Where allocation starts: past the file and every counted cluster. */
int qcow2_find_next_free (struct qcow2_state *s, uint64_t *next);
/* Store refcount @v as entry @idx of the refcount block data @d. */
void qcow2_refcount_store (const struct qcow2_info *info, uint8_t *d,
                           uint64_t idx, uint64_t v);

/* qcow2-repair.c */

/* Rebuild the refcount structure of a dirty image from its metadata,
 * and clear the dirty bit: 0, or -1 with errp set (the image is left
 * as it was, except after an I/O error part way, which leaves it
 * dirty and consistent for the next repair).  Open time only.
 */
int qcow2_repair_refcounts (struct qcow2_state *s, struct error **errp);

/* qcow2-overlap.c: where the metadata is, under s->lock. */
enum {
  QCOW2_META_HEADER = 1, QCOW2_META_L1, QCOW2_META_L2, QCOW2_META_REFTABLE,
  QCOW2_META_REFBLOCK, QCOW2_META_SNAPSHOTS, QCOW2_META_SNAPSHOT_L1,
  QCOW2_META_BITMAP_DIR, QCOW2_META_BITMAP_TABLE, QCOW2_META_BITMAP_DATA,
};
struct qcow2_meta_map;
int qcow2_meta_init (struct qcow2_state *s, struct error **errp);
void qcow2_meta_free (struct qcow2_state *s);
/* 0 (added), 1 (some cluster already holds another kind), -ENOMEM. */
int qcow2_meta_add (struct qcow2_state *s, uint64_t off, uint64_t len,
                    int kind);
void qcow2_meta_remove (struct qcow2_state *s, uint64_t off, uint64_t len);
/* What host offset @off holds (QCOW2_META_*), or 0 for data/free. */
int qcow2_meta_kind (struct qcow2_state *s, uint64_t off);
/* 0, or -EIO (logged, image marked corrupt) if @what, to be written at
 * [off, off + len), would land on metadata.
 */
int qcow2_meta_check_write (struct qcow2_state *s, uint64_t off,
                            uint64_t len, const char *what);
/* Set the corrupt bit on disk, as QEMU does; writes fail from then on. */
int qcow2_mark_corrupt (struct qcow2_state *s);

/* qcow2-write.c: the write side. */

/* At a read-write open: refuse what cannot be written safely yet, clear
 * unknown autoclear bits, find where allocation starts.
 */
int qcow2_write_open (struct qcow2_state *s, struct error **errp);
/* At close: write everything back. */
int qcow2_write_close (struct qcow2_state *s);
int qcow2_punch_later (struct qcow2_state *s, uint64_t offset, uint64_t len);
/* Cluster 0 rewritten, as QEMU's qcow2_update_header writes it: the
 * fixed header as it is on disk (with @autoclear, v3), the extensions
 * in their order with the one of type @ext_type (if not 0) replaced by
 * @ext (@ext_len bytes; NULL drops it, and a new one goes last), the
 * end marker, and the backing file name (@backing_file if @backing,
 * else the current one).  One write of the cluster, then a sync; the
 * in-memory info follows.  0 or -errno.
 */
struct qcow2_header_update {
  uint64_t autoclear;
  uint32_t ext_type;
  const uint8_t *ext;
  uint32_t ext_len;
  bool backing;
  const char *backing_file;     /* NULL: none */
};
int qcow2_write_header (struct qcow2_state *s,
                        const struct qcow2_header_update *u);
/* Write the incompatible feature bits to the header, and sync.
 * 0 or -errno.
 */
int qcow2_write_incompat (struct qcow2_state *s, uint64_t incompat);
/* Lazy refcounts: set DIRTY on disk (once), before the first L2 update
 * that may rely on a refcount not on disk yet.  Under s->lock.
 */
int qcow2_mark_dirty (struct qcow2_state *s);
int qcow2_pwrite (struct node *node, const void *buf, uint32_t count,
                  uint64_t offset, unsigned flags);
int qcow2_zero (struct node *node, uint64_t count, uint64_t offset,
                unsigned flags);
int qcow2_discard (struct node *node, uint64_t count, uint64_t offset,
                   unsigned flags);
int qcow2_flush (struct node *node);
/* qcow2-resize.c: grow the virtual size (shrinking: -ENOTSUP). */
int qcow2_truncate (struct node *node, uint64_t size);
int qcow2_flush_state (struct qcow2_state *s);
/* qcow2.c: read guest bytes (the copy-on-write source). */
int qcow2_pread (struct node *node, void *buf, uint32_t count,
                 uint64_t offset, unsigned flags);

/* qcow2-compress.c */

/* Decompress @src into exactly @dst_size bytes of @dst.  The input
 * may run on past the end of the stream (the last sector is shared).
 * 0 or -EIO.
 */
int qcow2_decompress (uint8_t type, void *dst, size_t dst_size,
                      const void *src, size_t src_size);

/* qcow2-bitmap.c: persistent dirty bitmaps, byte-compatible with QEMU.
 *
 * The API knows no in-memory bitmap type: bits travel as byte buffers
 * in QEMU's serialization order (bit k of a buffer is granule k of its
 * range, least significant bit first in each byte).  Every function
 * takes the node's metadata lock (s->lock): this is the control path.
 */

/* One persistent bitmap as stored in the image. */
struct qcow2_bitmap_info {
  char *name;
  uint32_t granularity;         /* bytes, power of two */
  /* The contents on disk cannot be trusted: the flag IN_USE was set
   * when this node opened (the image was not closed cleanly with the
   * bitmap loaded), or a store said so.  A bitmap this node itself
   * marked IN_USE at its read-write open (qcow2_bitmaps_set_in_use)
   * reports false: its contents are those of the last clean close.
   */
  bool in_use;
  bool auto_;                   /* flag AUTO: enabled (recording) */
  /* private */
  uint64_t table_offset;
  uint32_t table_size;          /* entries */
  uint32_t flags;               /* as on disk */
};

/* The bitmaps of an open qcow2 node, as loaded and validated at open.
 * An image whose extension breaks one of QEMU's rules still opens
 * read-only (one warning is logged) and this returns that error.  A
 * stale extension (autoclear bit clear) lists nothing.  On success
 * *list (caller frees with qcow2_bitmaps_free) holds *n entries, in
 * directory order; 0, or -1 with errp set.
 */
int qcow2_bitmaps_list (struct node *node, struct qcow2_bitmap_info **list,
                        size_t *n, struct error **errp);
void qcow2_bitmaps_free (struct qcow2_bitmap_info *list, size_t n);
/* Read bitmap @name's bits for the guest range [offset, offset+count)
 * into @buf, in serialization order: ceil (count / granularity) bits,
 * unused bits of the last byte zero.  @offset is granule aligned,
 * @count too unless the range ends at the virtual size.  A bitmap whose
 * contents cannot be trusted (in_use) is refused.  0, or -1 with errp.
 */
int qcow2_bitmap_read (struct node *node, const char *name, uint64_t offset,
                       uint64_t count, void *buf, struct error **errp);

/* What qcow2_bitmaps_store stores of one bitmap.  @fill writes the
 * serialized bits of the guest range [offset, offset + count) into
 * @buf (zeroed, room for one cluster): @offset is granule aligned,
 * @count a multiple of the granularity except in the last range, which
 * ends at the virtual size.  It returns 0 or -errno, and is called
 * with the metadata lock held: no I/O on this node from it.
 */
struct qcow2_bitmap_store {
  const char *name;
  uint32_t granularity;
  bool in_use, auto_;
  int (*fill) (void *opaque, uint64_t offset, uint64_t count, void *buf);
  void *opaque;
  /* Give every table entry a data cluster, zeroes included, so that
   * qcow2_bitmap_sync can update the bits in place.
   */
  bool preallocate;
};
/* Replace the whole set of persistent bitmaps of a read-write node with
 * @n bitmaps (n == 0 removes the extension and its autoclear bit), in
 * QEMU's crash-safe order: new data clusters, tables and directory,
 * sync; the header (extension and autoclear bit) in one write, sync;
 * then the old clusters are freed.  A crash leaves the old or the new
 * set, and at worst leaked clusters.  0, or -1 with errp set.
 */
int qcow2_bitmaps_store (struct node *node,
                         const struct qcow2_bitmap_store *bitmaps, size_t n,
                         struct error **errp);
/* Set, or clear, IN_USE on the stored bitmaps: one in-place directory
 * rewrite inside QEMU's autoclear dance (clear the bit, sync; rewrite,
 * sync; set the bit, sync).  Clearing leaves IN_USE on the bitmaps
 * whose contents cannot be trusted (see in_use above), and on those
 * whose table no longer fits the virtual size (a resize): those never
 * become valid without being stored.  0, or -1 with errp set.
 */
int qcow2_bitmaps_set_in_use (struct node *node, bool in_use,
                              struct error **errp);

/* The driver's hooks.  At open, before anything is written: load and
 * check the extension.  A read-only open survives a broken one (logged,
 * bitmaps ignored); a read-write open fails, since the writer could not
 * keep QEMU from trusting bitmaps it does not update.
 */
int qcow2_bitmaps_open (struct qcow2_state *s, bool ro, struct error **errp);
/* The autoclear bits the write side keeps (QCOW2_AUTOCLEAR_BITMAPS if
 * the extension is valid).
 */
uint64_t qcow2_bitmaps_autoclear (struct qcow2_state *s);
/* Can an image opened read-only with these bitmaps become read-write?
 * Not with a broken extension, as at open.  0, or -1 with errp set.
 */
int qcow2_bitmaps_check_writable (struct qcow2_state *s,
                                  struct error **errp);
/* At a read-write open, once the metadata map exists: map the bitmap
 * clusters, drop a stale extension, set IN_USE on every bitmap.
 */
int qcow2_bitmaps_write_open (struct qcow2_state *s, struct error **errp);
void qcow2_bitmaps_close (struct qcow2_state *s);
/* Write bitmap @name's bits for the granule-aligned guest range
 * [offset, offset + count) in place: @fill gives the bits of each data
 * cluster's whole guest range (as for a store), and the cluster is
 * rewritten with FUA, durable on return without flushing the rest of
 * the file.  The bitmap must have been stored preallocated by this
 * node.  0, or -1 with errp set.
 */
int qcow2_bitmap_sync (struct node *node, const char *name, uint64_t offset,
                       uint64_t count,
                       int (*fill) (void *opaque, uint64_t offset,
                                    uint64_t count, void *buf),
                       void *opaque, struct error **errp);
/* The driver.h ops, over the functions above. */
int qcow2_drv_bitmaps_list (struct node *node, struct node_bitmap_info **list,
                            size_t *n, struct error **errp);
int qcow2_drv_bitmaps_store (struct node *node,
                             const struct node_bitmap_store *bitmaps,
                             size_t n, struct error **errp);

#endif /* NBDD_FORMATS_QCOW2_H */
