/* qcow2: map guest offsets to where their data is.
 *
 * Guest cluster n is described by entry n % l2_entries of the L2 table
 * that L1 entry n / l2_entries points to.  L2 tables are read through
 * the L2 cache one slice at a time; a lookup returns the longest run
 * that maps the same way and ends inside one slice, so a large request
 * costs one cache lookup per slice, not per cluster.
 *
 * Every entry is checked before use: alignment, reserved combinations
 * of the extended L2 bitmap, compressed descriptors inside the file.
 * A bad entry fails the request with EIO and a log line naming the
 * entry and the guest offset; it never stops the daemon.
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "log.h"
#include "qcow2.h"
#include "utils.h"

/* Log the first few corruptions loudly; after that only at -v. */
#define MAX_CORRUPT_REPORTS 8

int
qcow2_corrupt (struct qcow2_state *s, const char *fs, ...)
{
  char msg[512];
  va_list args;

  va_start (args, fs);
  vsnprintf (msg, sizeof msg, fs, args);
  va_end (args);
  if (atomic_fetch_add (&s->corrupt_reports, 1) < MAX_CORRUPT_REPORTS)
    nbdd_error ("qcow2: %s: image is corrupt: %s", s->filename, msg);
  else
    debug ("qcow2: %s: image is corrupt: %s", s->filename, msg);
  return -EIO;
}

void
qcow2_decode_compressed (const struct qcow2_info *info, uint64_t l2e,
                         struct qcow2_cdesc *d)
{
  uint64_t nsec = ((l2e >> info->csize_shift) & info->csize_mask) + 1;

  d->offset = l2e & info->coffset_mask;
  /* The data ends with the last sector the descriptor counts. */
  d->size = nsec * QCOW2_COMPRESSED_SECTOR -
    (d->offset & (QCOW2_COMPRESSED_SECTOR - 1));
}

int
qcow2_classify (const struct qcow2_info *info, uint64_t l2e,
                uint64_t bitmap, unsigned sc)
{
  uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
  uint32_t alloc, zero;

  if (l2e & QCOW2_OFLAG_COMPRESSED)
    return QCOW2_COMPRESSED;
  if (!info->extended_l2) {
    if (l2e & QCOW2_OFLAG_ZERO)
      return QCOW2_ZERO;
    return host ? QCOW2_DATA : QCOW2_UNALLOCATED;
  }
  /* Extended L2: the ZERO flag is unused; the bitmap decides. */
  alloc = bitmap & QCOW2_L2_BITMAP_ALL_ALLOC;
  zero = bitmap >> 32;
  if (host) {
    if (alloc & zero)
      return -1;
    if (zero & (UINT32_C (1) << sc))
      return QCOW2_ZERO;
    if (alloc & (UINT32_C (1) << sc))
      return QCOW2_DATA;
    return QCOW2_UNALLOCATED;
  }
  if (alloc)
    return -1;                  /* allocated subclusters need a cluster */
  return (zero & (UINT32_C (1) << sc)) ? QCOW2_ZERO : QCOW2_UNALLOCATED;
}

/* Walk one pinned L2 slice from guest offset @offset to @end. */
static int
map_slice (struct qcow2_state *s, const uint8_t *slice, uint64_t l2_offset,
           uint64_t index, uint64_t offset, uint64_t end,
           struct qcow2_run *run)
{
  const struct qcow2_info *info = &s->info;
  uint64_t cs = info->cluster_size;
  uint64_t pos = offset;
  bool first = true;

  run->len = 0;
  for (; pos < end; ++index) {
    const uint8_t *p = slice + index * info->l2_entry_size;
    uint64_t l2e, bitmap = 0, host, cstart = ROUND_DOWN (pos, cs);

    memcpy (&l2e, p, 8);
    l2e = be64toh (l2e);
    if (info->extended_l2) {
      memcpy (&bitmap, p + 8, 8);
      bitmap = be64toh (bitmap);
    }

    if (l2e & QCOW2_OFLAG_COMPRESSED) {
      struct qcow2_cdesc d;

      if (!first)
        break;
      qcow2_decode_compressed (info, l2e, &d);
      if (d.offset < cs || d.offset >= node_size (s->file->node))
        return qcow2_corrupt (s, "compressed cluster for guest offset 0x%"
                              PRIx64 " is at host offset 0x%" PRIx64
                              ", outside the data area (L2 entry 0x%"
                              PRIx64 " in the L2 table at 0x%" PRIx64 ")",
                              cstart, d.offset, l2e, l2_offset);
      run->kind = QCOW2_COMPRESSED;
      run->host = d.offset;
      run->csize = d.size;
      run->cluster_start = cstart;
      run->len = MIN (end, cstart + cs) - pos;
      return 0;
    }

    host = l2e & QCOW2_L2E_OFFSET_MASK;
    if (!IS_ALIGNED (host, cs))
      return qcow2_corrupt (s, "data cluster offset 0x%" PRIx64 " for guest "
                            "offset 0x%" PRIx64 " is not cluster aligned "
                            "(L2 table at 0x%" PRIx64 ")", host, cstart,
                            l2_offset);

    for (unsigned sc = (pos - cstart) >> info->subcluster_bits;
         pos < end && sc < info->subclusters; ++sc) {
      uint64_t piece_end = MIN (end, cstart +
                                ((uint64_t) (sc + 1) << info->subcluster_bits));
      uint64_t h = host + (pos - cstart);
      int kind = qcow2_classify (info, l2e, bitmap, sc);

      if (kind < 0)
        return qcow2_corrupt (s, "invalid extended L2 entry 0x%016" PRIx64
                              " bitmap 0x%016" PRIx64 " for guest offset 0x%"
                              PRIx64 " (L2 table at 0x%" PRIx64 ")", l2e,
                              bitmap, cstart, l2_offset);
      if (first) {
        run->kind = kind;
        run->host = h;
        first = false;
      }
      else if ((enum qcow2_kind) kind != run->kind ||
               (kind == QCOW2_DATA && h != run->host + run->len))
        return 0;
      run->len += piece_end - pos;
      pos = piece_end;
    }
  }
  return 0;
}

static int map_locked (struct qcow2_state *s, uint64_t offset, uint64_t max,
                       bool nowait, struct qcow2_run *run);

int
qcow2_map (struct qcow2_state *s, uint64_t offset, uint64_t max,
           struct qcow2_run *run)
{
  int r;

  /* Writers change L2 slices under the lock; read them under it too. */
  pthread_mutex_lock (&s->lock);
  r = map_locked (s, offset, max, false, run);
  pthread_mutex_unlock (&s->lock);
  return r;
}

int
qcow2_map_nowait (struct qcow2_state *s, uint64_t offset, uint64_t max,
                  struct qcow2_run *run)
{
  int r;

  /* For the event loop, which must not wait: not for the lock, and not
   * for a slice that is not cached (qcow2_cache_peek).
   */
  if (pthread_mutex_trylock (&s->lock) != 0)
    return -EAGAIN;
  r = map_locked (s, offset, max, true, run);
  pthread_mutex_unlock (&s->lock);
  return r;
}

/* @nowait: only a cached L2 slice will do (qcow2_cache_peek). */
static int
map_locked (struct qcow2_state *s, uint64_t offset, uint64_t max,
            bool nowait, struct qcow2_run *run)
{
  const struct qcow2_info *info = &s->info;
  uint64_t gcn = offset >> info->cluster_bits;
  uint64_t l1_index = gcn >> info->l2_bits;
  uint64_t end = offset + max;  /* no overflow: inside the image */
  uint64_t l2_offset, l2_index, eps, slice_first, slice_end;
  struct qcow2_cache_entry *e;
  const void *slice;
  int r;

  if (l1_index >= info->l1_size)
    return qcow2_corrupt (s, "guest offset 0x%" PRIx64 " is beyond the L1 "
                          "table", offset);
  end = MIN (end, (l1_index + 1) << (info->l2_bits + info->cluster_bits));
  l2_offset = s->l1[l1_index] & QCOW2_L1E_OFFSET_MASK;
  if (l2_offset == 0) {
    run->kind = QCOW2_UNALLOCATED;
    run->len = end - offset;
    return 0;
  }
  if (!IS_ALIGNED (l2_offset, info->cluster_size))
    return qcow2_corrupt (s, "L2 table offset 0x%" PRIx64 " for guest offset "
                          "0x%" PRIx64 " is not cluster aligned", l2_offset,
                          offset);
  if (l2_offset >= node_size (s->file->node))
    return qcow2_corrupt (s, "L2 table offset 0x%" PRIx64 " for guest offset "
                          "0x%" PRIx64 " is past the end of the file",
                          l2_offset, offset);

  /* The slice holding this cluster's entry, and where it ends. */
  eps = s->l2_slice_size / info->l2_entry_size;
  l2_index = gcn & ((UINT64_C (1) << info->l2_bits) - 1);
  slice_first = ROUND_DOWN (l2_index, eps);
  slice_end = (ROUND_DOWN (gcn, eps) + eps) << info->cluster_bits;
  end = MIN (end, slice_end);

  if (nowait)
    r = qcow2_cache_peek (s->l2_cache,
                          l2_offset + slice_first * info->l2_entry_size,
                          &e, &slice);
  else
    r = qcow2_cache_get (s->l2_cache,
                         l2_offset + slice_first * info->l2_entry_size,
                         &e, &slice);
  if (r < 0)
    return r;
  r = map_slice (s, slice, l2_offset, l2_index - slice_first, offset, end,
                 run);
  qcow2_cache_put (s->l2_cache, e);
  return r;
}
