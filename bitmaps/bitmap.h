/* Dirty bitmap: which granules of a node have been written.
 *
 * A bitmap covers a node of 'size' bytes (at most INT64_MAX) with one
 * bit per granule of 'granularity' bytes (a power of 2 from 512 to
 * 2^31, as QEMU allows).  The last granule may be partial: it covers
 * [k * g, size).  Granule k covers bytes [k * g, (k + 1) * g), and
 * that is also bit k of the serialized stream (QEMU's on-disk order).
 *
 * Threads: the calls that only set bits (bitmap_set, bitmap_set_all,
 * bitmap_merge into the bitmap) may be made by any number of threads
 * at once, and at the same time as any other call except
 * bitmap_resize and bitmap_free.  The calls that clear bits
 * (bitmap_clear, bitmap_clear_all, bitmap_deserialize) are for one
 * thread at a time, normally the main thread, while setters run.
 * Readers (get, count, next_dirty, next_clean, copy, equal, serialize,
 * range_is_zero) see a consistent-enough snapshot: a bit set
 * concurrently may or may not be seen, a bit that was set before the
 * call began and not cleared since always is.
 */
#ifndef NBDD_BITMAP_H
#define NBDD_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BITMAP_MIN_GRANULARITY UINT32_C (512)
#define BITMAP_MAX_GRANULARITY (UINT32_C (1) << 31)

struct bitmap;

/* A clean bitmap.  NULL with errno set: EINVAL if the granularity is
 * not a power of 2 in [512, 2^31] or size > INT64_MAX, ENOMEM.  The
 * caller frees it with bitmap_free.
 */
struct bitmap *bitmap_new (uint64_t size, uint32_t granularity);
void bitmap_free (struct bitmap *b);

uint64_t bitmap_size (const struct bitmap *b);
uint32_t bitmap_granularity (const struct bitmap *b);

/* Change the size to @new_size.  Granules that did not exist are
 * clean; a granule that was the partial last one keeps its bit.
 * Returns 0, -EINVAL (new_size > INT64_MAX) or -ENOMEM, and on error
 * the bitmap is unchanged.  No other thread may use the bitmap.
 */
int bitmap_resize (struct bitmap *b, uint64_t new_size);

/* Mark every granule that overlaps [offset, offset + count), clipped
 * to the size.  Any thread.  Returns how many of those granules were
 * clean before this call, i.e. the bits this call changed: summed over
 * all callers it is exactly the number of granules made dirty.  0 does
 * not mean that whoever set the bits has finished with them (made
 * them durable, say): a concurrent caller may have set them a moment
 * ago, and the persistence layer must order that itself.
 */
uint64_t bitmap_set (struct bitmap *b, uint64_t offset, uint64_t count);

/* Clear the granules wholly inside [offset, offset + count), clipped
 * to the size; the partial last granule of the node counts as whole.
 * A granule only partly covered keeps its bit: its other bytes may be
 * dirty.
 */
void bitmap_clear (struct bitmap *b, uint64_t offset, uint64_t count);
void bitmap_set_all (struct bitmap *b);
void bitmap_clear_all (struct bitmap *b);

/* Whether the granule holding byte @offset is dirty; false past the
 * end.
 */
bool bitmap_get (const struct bitmap *b, uint64_t offset);

/* Dirty bytes: dirty granules times the granularity, the last granule
 * counted up to the size only (QEMU's "count").
 */
uint64_t bitmap_count (const struct bitmap *b);
/* Dirty granules. */
uint64_t bitmap_count_granules (const struct bitmap *b);

/* The first dirty (clean) byte in [offset, end), end clipped to the
 * size: the start of the first dirty (clean) granule there, or
 * @offset itself if its own granule is.  UINT64_MAX if there is none.
 */
uint64_t bitmap_next_dirty (const struct bitmap *b,
                            uint64_t offset, uint64_t end);
uint64_t bitmap_next_clean (const struct bitmap *b,
                            uint64_t offset, uint64_t end);

/* Whether no granule overlapping [offset, offset + count) is dirty. */
bool bitmap_range_is_zero (const struct bitmap *b,
                           uint64_t offset, uint64_t count);

/* dst |= src, whatever their granularities and sizes: every granule of
 * @dst that overlaps a dirty granule of @src (the bytes it covers,
 * clipped to src's size) becomes dirty.  Returns how many were clean.
 * Both may be set concurrently.
 */
uint64_t bitmap_merge (struct bitmap *dst, const struct bitmap *src);

/* A new bitmap with the same size, granularity and bits.  NULL with
 * errno ENOMEM.  The caller frees it.
 */
struct bitmap *bitmap_copy (const struct bitmap *b);
/* Same size, granularity and bits. */
bool bitmap_equal (const struct bitmap *a, const struct bitmap *b);

/* Serialization in QEMU's order (the qcow2 bitmap data clusters): bit
 * k of the stream, bit k % 8 of byte k / 8 (least significant first),
 * is the k-th granule of the range.  The range must start on a
 * granule and cover whole granules or end at the size; bits of the
 * last byte past the range are written as 0 and ignored when read.
 */
size_t bitmap_serialization_size (const struct bitmap *b,
                                  uint64_t offset, uint64_t count);
void bitmap_serialize (const struct bitmap *b,
                       uint64_t offset, uint64_t count, void *buf);
/* Replace the bits of the range with those in @buf.  This clears
 * bits: one thread at a time.
 */
void bitmap_deserialize (struct bitmap *b,
                         uint64_t offset, uint64_t count, const void *buf);

#endif /* NBDD_BITMAP_H */
