/* Dirty bitmap: see bitmap.h for the API and the threading rules.
 *
 * Layout.  Granule k is bit k % 64 of words[k / 64], so that on a
 * little-endian host the array is QEMU's serialized stream.  Bits at
 * or past nr_bits are always 0.  Two summaries hold one bit per word:
 *   any[i / 64] bit i % 64   words[i] may be non-zero
 *   full[i / 64] bit i % 64  words[i] has all its valid bits set
 * so next_dirty skips 64 clean words (4096 granules) per summary word
 * and next_clean as many dirty ones.  Memory: size / g / 8 bytes plus
 * 2/64 (3.2 %) for the summaries.  'dirty' counts the set bits.
 *
 * Setting is lock-free.  A setter loads the word first and stops there
 * if the bits are set already, the common case of rewriting dirty
 * data, so a dirty range costs one load per word and no store.
 * Otherwise it fetch-ors the word: the bits it changed (~old & mask)
 * are its own, which makes the "newly dirtied" results of all setters
 * add up exactly, and their popcount goes to 'dirty'.
 *
 * The summaries are kept right against one concurrent clearer with
 * sequentially consistent operations, in a Dekker pattern where each
 * side writes its own location and then reads the other's:
 *
 *   any:  the setter fetch-ors the word, then loads the summary bit and
 *         sets it if clear.  The clearer that makes a word 0 clears the
 *         summary bit, then reloads the word and sets the bit again if
 *         a setter got in between.  Either the setter sees the cleared
 *         summary or the clearer sees the setter's bits: never a
 *         non-zero word with a clear 'any' bit once both are done.  A
 *         stale 'any' on a zero word costs one wasted look, and the
 *         next clear over it drops it.
 *   full: the setter that completes a word sets the summary bit, then
 *         reloads the word and clears the bit if it is no longer full.
 *         The clearer clears the word first, then the summary bit.  A
 *         set 'full' bit is trusted (next_clean skips the word), so it
 *         must never outlive the word's fullness; a missing one only
 *         makes next_clean look at the word.
 *
 * 'dirty' may lag the words for a moment (a setter between its
 * fetch-or and its add) and even go below 0 when a clearer subtracts
 * first; readers clamp it.  It is exact whenever nobody is setting.
 */
#include <config.h>

#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <stdalign.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "utils.h"

#define ALL_ONES UINT64_MAX
#define NONE UINT64_MAX

struct bitmap {
  /* Written only by bitmap_new and bitmap_resize. */
  uint64_t size;                /* bytes covered, <= INT64_MAX */
  uint64_t nr_bits;             /* granules: DIV_ROUND_UP (size, g) */
  uint64_t nr_words;            /* DIV_ROUND_UP (nr_bits, 64) */
  uint64_t last_mask;           /* the valid bits of words[nr_words - 1] */
  uint32_t granularity;
  unsigned shift;               /* log2 (granularity) */
  uint64_t *words;              /* atomic */
  uint64_t *any;                /* atomic: see above */
  uint64_t *full;               /* atomic: see above */

  /* Dirty granules, atomic.  On its own cache line so that setters
   * adding to it do not keep stealing the line of the fields above,
   * which every set reads.
   */
  alignas (64) int64_t dirty;
};

static uint64_t
load (const uint64_t *p)
{
  return __atomic_load_n (p, __ATOMIC_RELAXED);
}

/* The loads and stores of the summary protocol, see the top. */
static uint64_t
load_sc (const uint64_t *p)
{
  return __atomic_load_n (p, __ATOMIC_SEQ_CST);
}

static uint64_t
fetch_or_sc (uint64_t *p, uint64_t m)
{
  return __atomic_fetch_or (p, m, __ATOMIC_SEQ_CST);
}

static uint64_t
fetch_and_sc (uint64_t *p, uint64_t m)
{
  return __atomic_fetch_and (p, m, __ATOMIC_SEQ_CST);
}

static unsigned
popcount (uint64_t v)
{
  return __builtin_popcountll (v);
}

/* Bits lo..hi (inclusive, 0..63) of a word. */
static uint64_t
range_mask (unsigned lo, unsigned hi)
{
  return (ALL_ONES << lo) & (ALL_ONES >> (63 - hi));
}

/* The valid bits of words[wi]. */
static uint64_t
word_mask (const struct bitmap *b, uint64_t wi)
{
  return wi == b->nr_words - 1 ? b->last_mask : ALL_ONES;
}

struct geometry {
  uint64_t nr_bits;
  uint64_t nr_words;
  uint64_t nr_sum;              /* words of each summary */
  uint64_t last_mask;
};

/* -1 if the arrays could not be addressed (32-bit hosts). */
static int
geometry (uint64_t size, unsigned shift, struct geometry *geo)
{
  uint64_t r;

  geo->nr_bits = size == 0 ? 0 : ((size - 1) >> shift) + 1;
  geo->nr_words = (geo->nr_bits + 63) / 64;
  geo->nr_sum = (geo->nr_words + 63) / 64;
  geo->last_mask = geo->nr_bits % 64 ? ALL_ONES >> (64 - geo->nr_bits % 64)
                                     : ALL_ONES;
  if (MUL_OVERFLOW (geo->nr_words, sizeof (uint64_t), &r) || r > SIZE_MAX)
    return -1;
  return 0;
}

/* Resize an array of @old elements to @new, the new ones 0.  A block
 * that fails to shrink is kept as it is.  0 or -1 (grow failed, *p
 * unchanged).
 */
static int
resize_array (uint64_t **p, uint64_t old, uint64_t new)
{
  uint64_t *q = realloc (*p, MAX (new, UINT64_C (1)) * sizeof **p);

  if (q == NULL)
    return new > old ? -1 : 0;
  if (new > old)
    memset (q + old, 0, (new - old) * sizeof *q);
  *p = q;
  return 0;
}

/* The first word in [from, last] that may hold a dirty bit (@dirty)
 * or a clean one, by the summary; NONE if there is none.
 */
static uint64_t
summary_next (const struct bitmap *b, uint64_t from, uint64_t last,
              bool dirty)
{
  const uint64_t *sum = dirty ? b->any : b->full;
  uint64_t flip = dirty ? 0 : ALL_ONES;
  uint64_t si = from / 64;
  uint64_t v, wi;

  if (from > last)
    return NONE;
  v = (load (&sum[si]) ^ flip) & (ALL_ONES << (from % 64));
  while (v == 0) {
    if (++si > last / 64)
      return NONE;
    v = load (&sum[si]) ^ flip;
  }
  wi = si * 64 + __builtin_ctzll (v);
  return wi <= last ? wi : NONE;
}

/* The first dirty (@dirty) or clean granule in [first, limit), with
 * first < limit <= nr_bits; NONE if there is none.
 */
static uint64_t
find_bit (const struct bitmap *b, uint64_t first, uint64_t limit, bool dirty)
{
  uint64_t flip = dirty ? 0 : ALL_ONES;
  uint64_t wi = first / 64;
  uint64_t v = (load (&b->words[wi]) ^ flip) & (ALL_ONES << (first % 64));

  for (;;) {
    /* For clean bits the last word's tail reads as clean, but it lies
     * past limit: nothing clean below limit was missed before it.
     */
    if (v) {
      uint64_t k = wi * 64 + __builtin_ctzll (v);
      return k < limit ? k : NONE;
    }
    wi = summary_next (b, wi + 1, (limit - 1) / 64, dirty);
    if (wi == NONE)
      return NONE;
    v = load (&b->words[wi]) ^ flip;
  }
}

/* Set the bits @m of words[wi].  Returns how many were clean; the
 * caller adds them to 'dirty'.  Any thread.
 */
static uint64_t
word_set (struct bitmap *b, uint64_t wi, uint64_t m)
{
  uint64_t sbit = UINT64_C (1) << (wi % 64);
  uint64_t old, fresh;

  old = __atomic_load_n (&b->words[wi], __ATOMIC_ACQUIRE);
  if (likely ((old & m) == m))
    return 0;
  old = fetch_or_sc (&b->words[wi], m);
  fresh = m & ~old;
  if (fresh == 0)
    return 0;                   /* another setter was first */

  if ((load_sc (&b->any[wi / 64]) & sbit) == 0)
    fetch_or_sc (&b->any[wi / 64], sbit);
  if ((old | m) == word_mask (b, wi)) {
    fetch_or_sc (&b->full[wi / 64], sbit);
    if (load_sc (&b->words[wi]) != word_mask (b, wi))
      fetch_and_sc (&b->full[wi / 64], ~sbit);
  }
  return popcount (fresh);
}

/* Clear the 'any' bit of a zero word, unless a setter refills it. */
static void
summary_drop_any (struct bitmap *b, uint64_t wi)
{
  uint64_t sbit = UINT64_C (1) << (wi % 64);

  if ((load_sc (&b->any[wi / 64]) & sbit) == 0)
    return;
  fetch_and_sc (&b->any[wi / 64], ~sbit);
  if (load_sc (&b->words[wi]) != 0)
    fetch_or_sc (&b->any[wi / 64], sbit);
}

/* Clear the bits @m of words[wi].  Returns how many were dirty; the
 * caller subtracts them from 'dirty'.  One clearer at a time.
 */
static uint64_t
word_clear (struct bitmap *b, uint64_t wi, uint64_t m)
{
  uint64_t sbit = UINT64_C (1) << (wi % 64);
  uint64_t old = load_sc (&b->words[wi]);

  if ((old & m) == 0) {
    if (old == 0)
      summary_drop_any (b, wi);
    return 0;
  }
  old = fetch_and_sc (&b->words[wi], ~m);
  if (load_sc (&b->full[wi / 64]) & sbit)
    fetch_and_sc (&b->full[wi / 64], ~sbit);
  if ((old & ~m) == 0)
    summary_drop_any (b, wi);
  return popcount (old & m);
}

/* Set granules first..last (inclusive, last < nr_bits). */
static uint64_t
set_bits (struct bitmap *b, uint64_t first, uint64_t last)
{
  uint64_t fw = first / 64, lw = last / 64;
  uint64_t fresh;

  if (fw == lw)
    fresh = word_set (b, fw, range_mask (first % 64, last % 64));
  else {
    fresh = word_set (b, fw, ALL_ONES << (first % 64));
    for (uint64_t wi = fw + 1; wi < lw; ++wi)
      fresh += word_set (b, wi, ALL_ONES);
    fresh += word_set (b, lw, ALL_ONES >> (63 - last % 64));
  }
  if (fresh)
    __atomic_fetch_add (&b->dirty, (int64_t) fresh, __ATOMIC_RELAXED);
  return fresh;
}

/* Clear granules first..last (inclusive, last < nr_bits), visiting
 * only the words the summary says may be dirty.
 */
static void
clear_bits (struct bitmap *b, uint64_t first, uint64_t last)
{
  uint64_t fw = first / 64, lw = last / 64;
  uint64_t gone = 0;

  for (uint64_t wi = fw; (wi = summary_next (b, wi, lw, true)) != NONE;
       ++wi) {
    uint64_t m = ALL_ONES;

    if (wi == fw)
      m &= ALL_ONES << (first % 64);
    if (wi == lw)
      m &= ALL_ONES >> (63 - last % 64);
    gone += word_clear (b, wi, m);
  }
  if (gone)
    __atomic_fetch_sub (&b->dirty, (int64_t) gone, __ATOMIC_RELAXED);
}

/* Make the summary bits of words[wi] exact.  No other thread. */
static void
summary_fix_word (struct bitmap *b, uint64_t wi)
{
  uint64_t sbit = UINT64_C (1) << (wi % 64);
  uint64_t v = b->words[wi];

  b->any[wi / 64] &= ~sbit;
  b->full[wi / 64] &= ~sbit;
  if (v != 0)
    b->any[wi / 64] |= sbit;
  if (v == word_mask (b, wi))
    b->full[wi / 64] |= sbit;
}

struct bitmap *
bitmap_new (uint64_t size, uint32_t granularity)
{
  struct geometry geo;
  struct bitmap *b;

  if (!IS_POWER_OF_2 (granularity) ||
      granularity < BITMAP_MIN_GRANULARITY ||
      granularity > BITMAP_MAX_GRANULARITY ||
      size > INT64_MAX) {
    errno = EINVAL;
    return NULL;
  }
  if (geometry (size, __builtin_ctz (granularity), &geo) == -1) {
    errno = ENOMEM;
    return NULL;
  }

  /* sizeof is a multiple of the alignment, as aligned_alloc needs. */
  b = aligned_alloc (alignof (struct bitmap), sizeof *b);
  if (b == NULL)
    goto out_err;
  memset (b, 0, sizeof *b);
  b->size = size;
  b->nr_bits = geo.nr_bits;
  b->nr_words = geo.nr_words;
  b->last_mask = geo.last_mask;
  b->granularity = granularity;
  b->shift = __builtin_ctz (granularity);

  /* calloc: the pages of a large clean bitmap stay untouched. */
  b->words = calloc (MAX (geo.nr_words, UINT64_C (1)), sizeof (uint64_t));
  if (b->words == NULL)
    goto out_free_bitmap;
  b->any = calloc (MAX (geo.nr_sum, UINT64_C (1)), sizeof (uint64_t));
  if (b->any == NULL)
    goto out_free_words;
  b->full = calloc (MAX (geo.nr_sum, UINT64_C (1)), sizeof (uint64_t));
  if (b->full == NULL)
    goto out_free_any;
  return b;

 out_free_any:
  free (b->any);
 out_free_words:
  free (b->words);
 out_free_bitmap:
  free (b);
 out_err:
  errno = ENOMEM;
  return NULL;
}

void
bitmap_free (struct bitmap *b)
{
  if (b == NULL)
    return;
  free (b->words);
  free (b->any);
  free (b->full);
  free (b);
}

uint64_t
bitmap_size (const struct bitmap *b)
{
  return b->size;
}

uint32_t
bitmap_granularity (const struct bitmap *b)
{
  return b->granularity;
}

int
bitmap_resize (struct bitmap *b, uint64_t new_size)
{
  struct geometry geo;
  uint64_t old_words = b->nr_words;
  uint64_t old_sum = (old_words + 63) / 64;

  if (new_size > INT64_MAX)
    return -EINVAL;
  if (geometry (new_size, b->shift, &geo) == -1)
    return -ENOMEM;

  /* Shrinking cannot fail: drop the granules past the end first, which
   * keeps 'dirty' and the summaries right.
   */
  if (geo.nr_bits < b->nr_bits)
    clear_bits (b, geo.nr_bits, b->nr_bits - 1);
  if (resize_array (&b->words, old_words, geo.nr_words) == -1 ||
      resize_array (&b->any, old_sum, geo.nr_sum) == -1 ||
      resize_array (&b->full, old_sum, geo.nr_sum) == -1)
    return -ENOMEM;

  b->size = new_size;
  b->nr_bits = geo.nr_bits;
  b->nr_words = geo.nr_words;
  b->last_mask = geo.last_mask;

  /* The summary bits past the last word are 0 (a stale 'any' may be
   * left there by a shrink), and the old and new last words changed
   * their valid bits, hence what "full" means for them.
   */
  if (geo.nr_words % 64) {
    b->any[geo.nr_sum - 1] &= ALL_ONES >> (64 - geo.nr_words % 64);
    b->full[geo.nr_sum - 1] &= ALL_ONES >> (64 - geo.nr_words % 64);
  }
  if (old_words > 0 && old_words < geo.nr_words)
    summary_fix_word (b, old_words - 1);
  if (geo.nr_words > 0)
    summary_fix_word (b, geo.nr_words - 1);
  return 0;
}

uint64_t
bitmap_set (struct bitmap *b, uint64_t offset, uint64_t count)
{
  uint64_t end, first, last;

  if (unlikely (count == 0 || offset >= b->size))
    return 0;
  if (ADD_OVERFLOW (offset, count, &end) || end > b->size)
    end = b->size;
  first = offset >> b->shift;
  last = (end - 1) >> b->shift;

  /* The common case, a rewrite inside one dirty word, is one load and
   * no call.
   */
  if (likely (first / 64 == last / 64)) {
    uint64_t m = range_mask (first % 64, last % 64);

    if ((__atomic_load_n (&b->words[first / 64], __ATOMIC_ACQUIRE) & m) == m)
      return 0;
  }
  return set_bits (b, first, last);
}

void
bitmap_clear (struct bitmap *b, uint64_t offset, uint64_t count)
{
  uint64_t end, first, limit;

  if (count == 0 || offset >= b->size)
    return;
  if (ADD_OVERFLOW (offset, count, &end) || end > b->size)
    end = b->size;
  /* offset < size <= INT64_MAX: rounding up cannot overflow. */
  first = (offset + b->granularity - 1) >> b->shift;
  limit = end == b->size ? b->nr_bits : end >> b->shift;
  if (first < limit)
    clear_bits (b, first, limit - 1);
}

void
bitmap_set_all (struct bitmap *b)
{
  if (b->nr_bits > 0)
    set_bits (b, 0, b->nr_bits - 1);
}

void
bitmap_clear_all (struct bitmap *b)
{
  if (b->nr_bits > 0)
    clear_bits (b, 0, b->nr_bits - 1);
}

bool
bitmap_get (const struct bitmap *b, uint64_t offset)
{
  uint64_t k;

  if (offset >= b->size)
    return false;
  k = offset >> b->shift;
  return (load (&b->words[k / 64]) >> (k % 64)) & 1;
}

uint64_t
bitmap_count_granules (const struct bitmap *b)
{
  int64_t n = __atomic_load_n (&b->dirty, __ATOMIC_RELAXED);

  if (n <= 0)
    return 0;
  return MIN ((uint64_t) n, b->nr_bits);
}

uint64_t
bitmap_count (const struct bitmap *b)
{
  uint64_t n = bitmap_count_granules (b);
  uint64_t bytes;

  if (n == 0)
    return 0;
  /* n <= nr_bits, so this is at most ROUND_UP (size, g) < 2^64. */
  bytes = n << b->shift;
  if (bitmap_get (b, b->size - 1))
    bytes -= (b->nr_bits << b->shift) - b->size;
  return bytes;
}

static uint64_t
find_next (const struct bitmap *b, uint64_t offset, uint64_t end, bool dirty)
{
  uint64_t k;

  if (end > b->size)
    end = b->size;
  if (offset >= end)
    return UINT64_MAX;
  k = find_bit (b, offset >> b->shift, ((end - 1) >> b->shift) + 1, dirty);
  if (k == NONE)
    return UINT64_MAX;
  return MAX (k << b->shift, offset);
}

uint64_t
bitmap_next_dirty (const struct bitmap *b, uint64_t offset, uint64_t end)
{
  return find_next (b, offset, end, true);
}

uint64_t
bitmap_next_clean (const struct bitmap *b, uint64_t offset, uint64_t end)
{
  return find_next (b, offset, end, false);
}

bool
bitmap_range_is_zero (const struct bitmap *b, uint64_t offset, uint64_t count)
{
  uint64_t end;

  if (count == 0)
    return true;
  if (ADD_OVERFLOW (offset, count, &end))
    end = UINT64_MAX;
  return find_next (b, offset, end, true) == UINT64_MAX;
}

uint64_t
bitmap_merge (struct bitmap *dst, const struct bitmap *src)
{
  uint64_t fresh = 0;

  if (dst->shift == src->shift) {
    /* Granule k is granule k in both: OR the words. */
    uint64_t nw = MIN (dst->nr_words, src->nr_words);

    if (nw == 0)
      return 0;
    for (uint64_t wi = 0; (wi = summary_next (src, wi, nw - 1, true)) != NONE;
         ++wi) {
      uint64_t v = load (&src->words[wi]) & word_mask (dst, wi);

      if (v)
        fresh += word_set (dst, wi, v);
    }
    if (fresh)
      __atomic_fetch_add (&dst->dirty, (int64_t) fresh, __ATOMIC_RELAXED);
    return fresh;
  }

  /* Different granularities: set each dirty run of src in dst. */
  for (uint64_t o = 0;
       (o = bitmap_next_dirty (src, o, MIN (src->size, dst->size))) !=
         UINT64_MAX; ) {
    uint64_t e = bitmap_next_clean (src, o, src->size);

    if (e == UINT64_MAX)
      e = src->size;
    fresh += bitmap_set (dst, o, e - o);
    o = e;
  }
  return fresh;
}

struct bitmap *
bitmap_copy (const struct bitmap *b)
{
  struct bitmap *c = bitmap_new (b->size, b->granularity);
  uint64_t n = 0;

  if (c == NULL)
    return NULL;
  /* c is not shared yet.  Its summaries and count are made from the
   * words copied, so they agree even if b is being set meanwhile.
   */
  if (b->nr_words == 0)
    return c;
  for (uint64_t wi = 0;
       (wi = summary_next (b, wi, b->nr_words - 1, true)) != NONE; ++wi) {
    uint64_t v = load (&b->words[wi]);

    if (v == 0)
      continue;
    c->words[wi] = v;
    n += popcount (v);
    summary_fix_word (c, wi);
  }
  c->dirty = n;
  return c;
}

bool
bitmap_equal (const struct bitmap *a, const struct bitmap *b)
{
  if (a->size != b->size || a->granularity != b->granularity)
    return false;
  /* Bits past nr_bits are 0 in both: whole words compare. */
  for (uint64_t wi = 0; wi < a->nr_words; ++wi)
    if (load (&a->words[wi]) != load (&b->words[wi]))
      return false;
  return true;
}

/* Check a serialization range; return its first granule and the
 * number of granules in it.  The callers compute ranges from the
 * image geometry, never from a client: a bad one is a bug.
 */
static void
serial_range (const struct bitmap *b, uint64_t offset, uint64_t count,
              uint64_t *first, uint64_t *n)
{
  assert (IS_ALIGNED (offset, b->granularity));
  assert (offset <= b->size && count <= b->size - offset);
  assert (IS_ALIGNED (count, b->granularity) || offset + count == b->size);
  *first = offset >> b->shift;
  *n = count == 0 ? 0 : ((count - 1) >> b->shift) + 1;
}

size_t
bitmap_serialization_size (const struct bitmap *b,
                           uint64_t offset, uint64_t count)
{
  uint64_t first, n;

  serial_range (b, offset, count, &first, &n);
  assert (n / 8 < SIZE_MAX);
  return (n + 7) / 8;
}

/* Granules p..p+63 as one word, those past the end 0. */
static uint64_t
get_bits64 (const struct bitmap *b, uint64_t p)
{
  uint64_t wi = p / 64;
  unsigned sh = p % 64;
  uint64_t v = load (&b->words[wi]) >> sh;

  if (sh && wi + 1 < b->nr_words)
    v |= load (&b->words[wi + 1]) << (64 - sh);
  return v;
}

void
bitmap_serialize (const struct bitmap *b,
                  uint64_t offset, uint64_t count, void *buf)
{
  unsigned char *out = buf;
  uint64_t first, n;

  serial_range (b, offset, count, &first, &n);
  for (uint64_t j = 0; j < n; j += 64) {
    uint64_t nb = MIN (n - j, UINT64_C (64));
    uint64_t v = get_bits64 (b, first + j);
    size_t len = (nb + 7) / 8;

    if (nb < 64)
      v &= (UINT64_C (1) << nb) - 1;
    v = htole64 (v);
    memcpy (out, &v, len);
    out += len;
  }
}

void
bitmap_deserialize (struct bitmap *b,
                    uint64_t offset, uint64_t count, const void *buf)
{
  const unsigned char *in = buf;
  uint64_t first, n;
  uint64_t added = 0, gone = 0;

  serial_range (b, offset, count, &first, &n);
  for (uint64_t j = 0; j < n; j += 64) {
    uint64_t nb = MIN (n - j, UINT64_C (64));
    uint64_t m = nb < 64 ? (UINT64_C (1) << nb) - 1 : ALL_ONES;
    size_t len = (nb + 7) / 8;
    uint64_t wi = (first + j) / 64;
    unsigned sh = (first + j) % 64;
    uint64_t v = 0;

    memcpy (&v, in, len);
    in += len;
    v = le64toh (v) & m;

    /* The 64 bits land in words[wi] from bit sh, and the rest in the
     * next word.  Set before clearing: a granule is never seen clean
     * that is dirty in both the old and the new contents.
     */
    added += word_set (b, wi, v << sh);
    gone += word_clear (b, wi, (m & ~v) << sh);
    if (sh && (m >> (64 - sh)) != 0) {
      added += word_set (b, wi + 1, v >> (64 - sh));
      gone += word_clear (b, wi + 1, (m & ~v) >> (64 - sh));
    }
  }
  __atomic_fetch_add (&b->dirty, (int64_t) added - (int64_t) gone,
                      __ATOMIC_RELAXED);
}
