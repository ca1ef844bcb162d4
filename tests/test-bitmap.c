/* Unit tests for bitmaps/bitmap.c.
 *
 * Most checks compare the bitmap with a naive model, one bool per
 * granule, written from the definitions in bitmap.h (a granule is set
 * if it overlaps the range, cleared if it lies wholly inside it) and
 * driven by a fixed-seed PRNG, so every run is the same.
 *
 * The concurrency checks are exact once the threads have stopped,
 * whatever the interleaving: the bits, the count and the sum of
 * "newly dirtied" must match, and the summaries must agree with the
 * bits (a walk with next_dirty/next_clean finds every run).  Whether
 * a given race is hit depends on the scheduler: a broken fetch-or or
 * 'full' summary protocol fails most runs, a broken 'any' re-check
 * only some.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#undef NDEBUG
#include <assert.h>

#include "bitmap.h"
#include "utils.h"

#define KiB UINT64_C (1024)
#define MiB (KiB * 1024)
#define GiB (MiB * 1024)
#define NONE UINT64_MAX

/* What the test is doing, printed when a check fails. */
static char context[256];

static void __attribute__ ((format (printf, 1, 2)))
set_context (const char *fs, ...)
{
  va_list ap;

  va_start (ap, fs);
  vsnprintf (context, sizeof context, fs, ap);
  va_end (ap);
}

static void
check_u64 (const char *what, uint64_t got, uint64_t expected)
{
  if (got != expected) {
    fprintf (stderr, "test-bitmap: %s: %s: got %" PRIu64
             " (0x%" PRIx64 "), expected %" PRIu64 " (0x%" PRIx64 ")\n",
             context, what, got, got, expected, expected);
    abort ();
  }
}

/* splitmix64: small, fast, and the same everywhere. */
static uint64_t
rnd (uint64_t *s)
{
  uint64_t z = (*s += UINT64_C (0x9e3779b97f4a7c15));

  z = (z ^ (z >> 30)) * UINT64_C (0xbf58476d1ce4e5b9);
  z = (z ^ (z >> 27)) * UINT64_C (0x94d049bb133111eb);
  return z ^ (z >> 31);
}

static uint64_t
rnd_below (uint64_t *s, uint64_t n)
{
  return n == 0 ? 0 : rnd (s) % n;
}

/* The naive model. */
struct model {
  uint64_t size;
  uint64_t g;
  uint64_t n;                   /* granules */
  bool *bit;
};

static void
model_init (struct model *m, uint64_t size, uint64_t g)
{
  m->size = size;
  m->g = g;
  m->n = (size + g - 1) / g;
  m->bit = calloc (m->n + 1, sizeof *m->bit);
  assert (m->bit);
}

static void
model_free (struct model *m)
{
  free (m->bit);
}

/* The bytes of granule k: [k * g, model_gend (k)). */
static uint64_t
model_gend (const struct model *m, uint64_t k)
{
  return MIN ((k + 1) * m->g, m->size);
}

static uint64_t
model_end (const struct model *m, uint64_t offset, uint64_t count)
{
  uint64_t end = offset + count;

  return end < offset || end > m->size ? m->size : end;
}

static uint64_t
model_set (struct model *m, uint64_t offset, uint64_t count)
{
  uint64_t end = model_end (m, offset, count);
  uint64_t fresh = 0;

  if (count == 0)
    return 0;
  for (uint64_t k = offset / m->g; k < m->n && k * m->g < end; ++k)
    if (model_gend (m, k) > offset && !m->bit[k]) {
      m->bit[k] = true;
      fresh++;
    }
  return fresh;
}

static void
model_clear (struct model *m, uint64_t offset, uint64_t count)
{
  uint64_t end = model_end (m, offset, count);

  if (count == 0)
    return;
  for (uint64_t k = offset / m->g; k < m->n && k * m->g < end; ++k)
    if (k * m->g >= offset && model_gend (m, k) <= end)
      m->bit[k] = false;
}

static uint64_t
model_next (const struct model *m, uint64_t offset, uint64_t end, bool dirty)
{
  end = MIN (end, m->size);
  if (offset >= end)
    return NONE;
  for (uint64_t k = offset / m->g; k < m->n && k * m->g < end; ++k)
    if (m->bit[k] == dirty)
      return MAX (k * m->g, offset);
  return NONE;
}

static uint64_t
model_granules (const struct model *m)
{
  uint64_t n = 0;

  for (uint64_t k = 0; k < m->n; ++k)
    n += m->bit[k];
  return n;
}

static uint64_t
model_bytes (const struct model *m)
{
  uint64_t n = 0;

  for (uint64_t k = 0; k < m->n; ++k)
    if (m->bit[k])
      n += model_gend (m, k) - k * m->g;
  return n;
}

/* Every bit, the counts, and a walk over all dirty runs. */
static void
check_model (const struct bitmap *b, const struct model *m)
{
  uint64_t o = 0;

  check_u64 ("size", bitmap_size (b), m->size);
  check_u64 ("granularity", bitmap_granularity (b), m->g);
  for (uint64_t k = 0; k < m->n; ++k) {
    check_u64 ("get first byte", bitmap_get (b, k * m->g), m->bit[k]);
    check_u64 ("get last byte", bitmap_get (b, model_gend (m, k) - 1),
               m->bit[k]);
  }
  check_u64 ("get past end", bitmap_get (b, m->size), false);
  check_u64 ("count_granules", bitmap_count_granules (b), model_granules (m));
  check_u64 ("count", bitmap_count (b), model_bytes (m));
  for (;;) {
    uint64_t d = bitmap_next_dirty (b, o, m->size);
    uint64_t c;

    check_u64 ("walk next_dirty", d, model_next (m, o, m->size, true));
    if (d == NONE)
      break;
    c = bitmap_next_clean (b, d, UINT64_MAX);
    check_u64 ("walk next_clean", c, model_next (m, d, m->size, false));
    if (c == NONE)
      break;
    o = c;
  }
}

/* A range of every kind the callers make, and some they should not. */
static void
random_range (uint64_t *s, const struct model *m,
              uint64_t *offset, uint64_t *count)
{
  uint64_t g = m->g;

  switch (rnd_below (s, 9)) {
  case 0:                       /* whole granules */
    *offset = rnd_below (s, m->n + 2) * g;
    *count = (1 + rnd_below (s, 3)) * g;
    break;
  case 1:                       /* unaligned, may be empty */
    *offset = rnd_below (s, m->size + g);
    *count = rnd_below (s, 3 * g);
    break;
  case 2:
    *offset = rnd_below (s, m->size);
    *count = rnd_below (s, 200 * g);
    break;
  case 3:
    *offset = rnd_below (s, m->size);
    *count = rnd_below (s, m->size);
    break;
  case 4:                       /* offset + count overflows */
    *offset = rnd_below (s, m->size);
    *count = UINT64_MAX - rnd_below (s, 10);
    break;
  case 5:                       /* around the end */
    *offset = m->size - MIN (m->size, rnd_below (s, 2 * g));
    *count = rnd_below (s, 3 * g);
    break;
  case 6:
    *offset = rnd_below (s, m->size);
    *count = 1 + rnd_below (s, 3);
    break;
  case 7:
    *offset = rnd_below (s, m->n) * g;
    *count = rnd_below (s, 130) * g;
    break;
  default:                      /* past the end */
    *offset = m->size + rnd_below (s, 3 * g);
    *count = rnd_below (s, 3 * g);
    break;
  }
}

/* A bitmap and its model with random contents. */
static struct bitmap *
random_bitmap (uint64_t *s, struct model *m, uint64_t size, uint32_t g,
               unsigned ops)
{
  struct bitmap *b = bitmap_new (size, g);

  assert (b);
  model_init (m, size, g);
  for (unsigned i = 0; i < ops; ++i) {
    uint64_t offset, count;

    random_range (s, m, &offset, &count);
    if (rnd_below (s, 2)) {
      bitmap_set (b, offset, count);
      model_set (m, offset, count);
    }
    else {
      bitmap_clear (b, offset, count);
      model_clear (m, offset, count);
    }
  }
  return b;
}

static void
test_new (void)
{
  struct bitmap *b;

  set_context ("new");
  errno = 0;
  assert (bitmap_new (1 * MiB, 0) == NULL && errno == EINVAL);
  assert (bitmap_new (1 * MiB, 256) == NULL && errno == EINVAL);
  assert (bitmap_new (1 * MiB, 4097) == NULL && errno == EINVAL);
  assert (bitmap_new (1 * MiB, 3u << 29) == NULL && errno == EINVAL);
  assert (bitmap_new (UINT64_C (1) << 63, 65536) == NULL && errno == EINVAL);

  b = bitmap_new (0, 512);
  assert (b);
  assert (bitmap_size (b) == 0 && bitmap_granularity (b) == 512);
  assert (bitmap_set (b, 0, 100) == 0);
  bitmap_set_all (b);
  assert (bitmap_count (b) == 0);
  assert (!bitmap_get (b, 0));
  assert (bitmap_next_dirty (b, 0, UINT64_MAX) == NONE);
  assert (bitmap_next_clean (b, 0, UINT64_MAX) == NONE);
  assert (bitmap_serialization_size (b, 0, 0) == 0);
  assert (bitmap_range_is_zero (b, 0, UINT64_MAX));
  bitmap_clear_all (b);
  bitmap_free (b);
  bitmap_free (NULL);
}

/* Edges on a node of 10 whole granules and 100 bytes. */
static void
test_edges (void)
{
  const uint64_t g = 4096, size = 10 * 4096 + 100;
  struct bitmap *b = bitmap_new (size, g);

  set_context ("edges");
  assert (b);
  assert (bitmap_set (b, 0, 0) == 0);
  assert (bitmap_set (b, size, 10) == 0);
  assert (bitmap_set (b, UINT64_MAX, UINT64_MAX) == 0);
  assert (bitmap_count (b) == 0);

  /* The first granule, then one straddling into the second. */
  assert (bitmap_set (b, 0, 1) == 1);
  assert (bitmap_get (b, 0) && bitmap_get (b, g - 1) && !bitmap_get (b, g));
  assert (bitmap_set (b, 0, 1) == 0);
  assert (bitmap_set (b, g - 1, 2) == 1);
  assert (bitmap_count (b) == 2 * g);

  /* The partial last granule: its bytes count up to size only. */
  assert (bitmap_set (b, size - 1, 1000) == 1);
  assert (bitmap_get (b, 10 * g) && bitmap_get (b, size - 1));
  assert (!bitmap_get (b, size));
  assert (bitmap_count (b) == 2 * g + 100);
  assert (bitmap_count_granules (b) == 3);

  /* Iteration is clipped to offset and end. */
  assert (bitmap_next_dirty (b, 0, UINT64_MAX) == 0);
  assert (bitmap_next_dirty (b, 100, size) == 100);
  assert (bitmap_next_dirty (b, g + 5, size) == g + 5);
  assert (bitmap_next_dirty (b, 2 * g, size) == 10 * g);
  assert (bitmap_next_dirty (b, 2 * g, 10 * g) == NONE);
  assert (bitmap_next_dirty (b, 2 * g, 10 * g + 1) == 10 * g);
  assert (bitmap_next_dirty (b, size - 1, UINT64_MAX) == size - 1);
  assert (bitmap_next_dirty (b, size, UINT64_MAX) == NONE);
  assert (bitmap_next_dirty (b, 5, 5) == NONE);
  assert (bitmap_next_clean (b, 0, size) == 2 * g);
  assert (bitmap_next_clean (b, 2 * g + 1, size) == 2 * g + 1);
  assert (bitmap_next_clean (b, 10 * g, UINT64_MAX) == NONE);
  assert (bitmap_next_clean (b, 0, 2 * g) == NONE);
  assert (!bitmap_range_is_zero (b, 0, 1));
  assert (bitmap_range_is_zero (b, 2 * g, 8 * g));
  assert (!bitmap_range_is_zero (b, 2 * g, 8 * g + 1));
  assert (!bitmap_range_is_zero (b, 2 * g, UINT64_MAX));
  assert (bitmap_range_is_zero (b, 0, 0));

  /* Clear only whole granules; partial ones keep their bit. */
  bitmap_clear (b, 1, 2 * g - 1);     /* [1, 2g): granule 1 only */
  assert (bitmap_get (b, 0) && !bitmap_get (b, g));
  bitmap_clear (b, 0, g - 1);
  assert (bitmap_get (b, 0));
  bitmap_clear (b, 0, 0);
  assert (bitmap_get (b, 0));
  bitmap_clear (b, 0, g);
  assert (!bitmap_get (b, 0));
  bitmap_clear (b, 10 * g, 99);       /* not up to size: stays */
  assert (bitmap_get (b, 10 * g));
  bitmap_clear (b, 10 * g + 1, UINT64_MAX);
  assert (bitmap_get (b, 10 * g));
  bitmap_clear (b, 10 * g, 100);      /* to size: the whole granule */
  assert (!bitmap_get (b, 10 * g));
  assert (bitmap_count (b) == 0);

  /* Ranges that overflow are clipped to the size. */
  assert (bitmap_set (b, 5, UINT64_MAX) == 11);
  assert (bitmap_count (b) == size);
  assert (bitmap_next_clean (b, 0, UINT64_MAX) == NONE);
  bitmap_clear (b, g, UINT64_MAX);
  assert (bitmap_count (b) == g);
  bitmap_clear (b, UINT64_MAX, 1);
  bitmap_set_all (b);
  assert (bitmap_count (b) == size && bitmap_count_granules (b) == 11);
  bitmap_clear_all (b);
  assert (bitmap_count (b) == 0);
  assert (bitmap_next_dirty (b, 0, UINT64_MAX) == NONE);
  bitmap_free (b);
}

/* The extremes of the arithmetic: a 2 GiB granule on a 1 byte node,
 * and the largest node.
 */
static void
test_extremes (void)
{
  const uint32_t g = UINT32_C (1) << 31;
  const uint64_t last = (UINT64_C (1) << 63) - g;   /* its last granule */
  struct bitmap *b = bitmap_new (1, g);
  unsigned char byte = 0xff;

  set_context ("extremes");
  assert (b);
  assert (bitmap_set (b, 0, UINT64_MAX) == 1);
  assert (bitmap_count (b) == 1 && bitmap_count_granules (b) == 1);
  assert (bitmap_next_dirty (b, 0, UINT64_MAX) == 0);
  assert (bitmap_next_clean (b, 0, UINT64_MAX) == NONE);
  assert (bitmap_serialization_size (b, 0, 1) == 1);
  bitmap_serialize (b, 0, 1, &byte);
  assert (byte == 0x01);
  bitmap_clear (b, 0, 1);
  assert (bitmap_count (b) == 0);
  assert (bitmap_resize (b, 3 * (uint64_t) g) == 0);
  assert (bitmap_set (b, 2 * (uint64_t) g + 7, 1) == 1);
  assert (bitmap_count (b) == g);
  bitmap_free (b);

  /* INT64_MAX bytes: 2^32 granules, the last one a byte short.  The
   * bits are calloc'd, so this costs address space, not memory.
   */
  b = bitmap_new (INT64_MAX, g);
  assert (b);
  assert (bitmap_set (b, INT64_MAX - 1, UINT64_MAX) == 1);
  assert (bitmap_get (b, last) && bitmap_get (b, INT64_MAX - 1));
  assert (!bitmap_get (b, last - 1) && !bitmap_get (b, INT64_MAX));
  assert (bitmap_count (b) == g - 1);
  assert (bitmap_next_dirty (b, 0, UINT64_MAX) == last);
  assert (bitmap_next_clean (b, last, UINT64_MAX) == NONE);
  assert (bitmap_next_clean (b, 0, UINT64_MAX) == 0);
  assert (bitmap_set (b, 0, 1) == 1);
  assert (bitmap_count (b) == (uint64_t) g + g - 1);
  bitmap_clear (b, 1, UINT64_MAX);      /* granule 0 is partly outside */
  assert (bitmap_count (b) == g);
  bitmap_clear (b, 0, UINT64_MAX);
  assert (bitmap_count (b) == 0);
  assert (bitmap_resize (b, UINT64_C (1) << 63) == -EINVAL);
  assert (bitmap_size (b) == INT64_MAX);
  bitmap_free (b);
}

/* Random operations against the model, on several geometries. */
static void
test_random (void)
{
  static const struct {
    uint64_t size;
    uint32_t g;
  } configs[] = {
    { 9000 * 512 + 77, 512 },                   /* 141 words */
    { 5000 * 64 * KiB - 3, 64 * 1024 },
    { 8192 * 4 * KiB, 4096 },                   /* exactly 128 words */
    { 200 * 2 * GiB + 12345, UINT32_C (1) << 31 },
    { 70 * 1 * MiB, 1024 * 1024 },              /* 1 word and a bit */
  };
  uint64_t s = 1;

  for (size_t c = 0; c < ARRAY_SIZE (configs); ++c) {
    struct model m;
    struct bitmap *b = bitmap_new (configs[c].size, configs[c].g);

    assert (b);
    model_init (&m, configs[c].size, configs[c].g);
    for (unsigned i = 0; i < 3000; ++i) {
      uint64_t offset, count, end;
      unsigned op = rnd_below (&s, 100);

      random_range (&s, &m, &offset, &count);
      set_context ("random: g=%" PRIu32 " size=%" PRIu64 " op %u: "
                   "[%" PRIu64 ", +%" PRIu64 ")", configs[c].g,
                   configs[c].size, i, offset, count);
      if (op < 50)
        check_u64 ("set returns", bitmap_set (b, offset, count),
                   model_set (&m, offset, count));
      else if (op < 98) {
        bitmap_clear (b, offset, count);
        model_clear (&m, offset, count);
      }
      else if (op < 99) {
        bitmap_set_all (b);
        model_set (&m, 0, m.size);
      }
      else {
        bitmap_clear_all (b);
        model_clear (&m, 0, m.size);
      }

      /* Some queries over random windows. */
      for (unsigned q = 0; q < 2; ++q) {
        random_range (&s, &m, &offset, &count);
        end = rnd_below (&s, 4) ? model_end (&m, offset, count) : UINT64_MAX;
        check_u64 ("next_dirty", bitmap_next_dirty (b, offset, end),
                   model_next (&m, offset, end, true));
        check_u64 ("next_clean", bitmap_next_clean (b, offset, end),
                   model_next (&m, offset, end, false));
        check_u64 ("range_is_zero", bitmap_range_is_zero (b, offset, count),
                   count == 0 ||
                   model_next (&m, offset, model_end (&m, offset, count),
                               true) == NONE);
        check_u64 ("get", bitmap_get (b, offset),
                   offset < m.size && m.bit[offset / m.g]);
      }
      if (i % 250 == 0)
        check_model (b, &m);
    }
    check_model (b, &m);
    bitmap_free (b);
    model_free (&m);
  }
}

/* dst |= src on the model: each dirty granule of src marks the
 * granules of dst that share a byte with it.
 */
static uint64_t
model_merge (struct model *dst, const struct model *src)
{
  uint64_t fresh = 0;

  for (uint64_t j = 0; j < src->n; ++j)
    if (src->bit[j])
      fresh += model_set (dst, j * src->g, model_gend (src, j) - j * src->g);
  return fresh;
}

static void
test_merge (void)
{
  static const struct {
    uint64_t src_size, dst_size;
    uint32_t src_g, dst_g;
  } configs[] = {
    { 4 * MiB + 1000, 4 * MiB + 1000, 512, 65536 },     /* fine → coarse */
    { 4 * MiB + 1000, 4 * MiB + 1000, 65536, 512 },     /* coarse → fine */
    { 3 * MiB + 512, 5 * MiB, 512, 4096 },              /* src smaller */
    { 5 * MiB + 3, 3 * MiB + 700, 8192, 1024 },         /* src larger */
    { 5 * MiB + 3, 3 * MiB + 700, 4096, 4096 },         /* same g */
    { 3 * MiB + 700, 5 * MiB + 3, 4096, 4096 },
    { 40 * GiB + 5, 40 * GiB + 5, UINT32_C (1) << 31, 1u << 29 },
  };
  uint64_t s = 2;

  for (size_t c = 0; c < ARRAY_SIZE (configs); ++c) {
    for (unsigned round = 0; round < 4; ++round) {
      struct model ms, md;
      struct bitmap *src, *dst;

      set_context ("merge: %" PRIu64 "/%" PRIu32 " into %" PRIu64 "/%"
                   PRIu32 " round %u", configs[c].src_size, configs[c].src_g,
                   configs[c].dst_size, configs[c].dst_g, round);
      src = random_bitmap (&s, &ms, configs[c].src_size, configs[c].src_g,
                           round * 20);
      dst = random_bitmap (&s, &md, configs[c].dst_size, configs[c].dst_g,
                           round * 10);
      check_u64 ("merge returns", bitmap_merge (dst, src),
                 model_merge (&md, &ms));
      check_model (dst, &md);
      check_model (src, &ms);                   /* untouched */
      check_u64 ("merge again", bitmap_merge (dst, src), 0);
      bitmap_free (src);
      bitmap_free (dst);
      model_free (&ms);
      model_free (&md);
    }
  }
}

static void
test_copy_equal (void)
{
  uint64_t s = 3;
  struct model m;
  struct bitmap *b = random_bitmap (&s, &m, 7 * MiB + 512, 1024, 200);
  struct bitmap *c = bitmap_copy (b), *d;

  set_context ("copy/equal");
  assert (c);
  assert (bitmap_equal (b, c) && bitmap_equal (c, b));
  check_model (c, &m);                  /* counts and summaries too */
  bitmap_clear (b, 4096, 1024);        /* granule 4, in both */
  bitmap_clear (c, 4096, 1024);
  model_clear (&m, 4096, 1024);
  assert (bitmap_equal (b, c));
  assert (bitmap_set (c, 5000, 1) == 1);
  model_set (&m, 5000, 1);
  assert (!bitmap_equal (b, c) && !bitmap_equal (c, b));
  assert (bitmap_set (b, 5000, 1) == 1);
  assert (bitmap_equal (b, c));
  bitmap_set (b, 7 * MiB, 1);                 /* the partial last granule */
  bitmap_set (c, 7 * MiB, 1);
  assert (bitmap_equal (b, c));
  model_clear (&m, 7 * MiB, UINT64_MAX);
  bitmap_clear (c, 7 * MiB, UINT64_MAX);
  assert (!bitmap_equal (b, c));
  bitmap_clear (b, 7 * MiB, UINT64_MAX);
  assert (bitmap_equal (b, c));
  check_model (c, &m);

  /* Equal bits, but not the same size or granularity. */
  d = bitmap_new (7 * MiB + 512, 1024);
  assert (d);
  bitmap_clear_all (b);
  assert (bitmap_equal (b, d));
  assert (bitmap_resize (d, 7 * MiB + 513) == 0);
  assert (!bitmap_equal (b, d));
  bitmap_free (d);
  d = bitmap_new (7 * MiB + 512, 2048);
  assert (d);
  assert (!bitmap_equal (b, d));

  bitmap_free (d);
  bitmap_free (b);
  bitmap_free (c);
  model_free (&m);
}

/* Resize the model: new granules clean, the old last one kept. */
static void
model_resize (struct model *m, uint64_t size)
{
  struct model n;

  model_init (&n, size, m->g);
  memcpy (n.bit, m->bit, MIN (m->n, n.n) * sizeof *m->bit);
  model_free (m);
  *m = n;
}

static void
test_resize (void)
{
  static const uint64_t sizes[] = {
    100 * 4096, 200 * 4096, 150 * 4096 - 1, 150 * 4096, 64 * 4096,
    64 * 4096 + 1, 0, 3, 5000 * 4096 + 17, 129 * 4096, 4096 * 4096,
  };
  const uint64_t g = 4096;
  uint64_t s = 4;
  struct model m;
  struct bitmap *b = random_bitmap (&s, &m, 100 * g, g, 50);

  /* A full partial last word stops being full when the node grows:
   * next_clean must find the new granules.
   */
  set_context ("resize: grow a full bitmap");
  bitmap_set_all (b);
  model_set (&m, 0, UINT64_MAX);
  assert (bitmap_next_clean (b, 0, UINT64_MAX) == NONE);
  assert (bitmap_resize (b, 200 * g) == 0);
  model_resize (&m, 200 * g);
  check_u64 ("next_clean after grow", bitmap_next_clean (b, 0, UINT64_MAX),
             100 * g);
  check_model (b, &m);

  /* Bits past a shrink do not come back on the next grow. */
  set_context ("resize: shrink then grow");
  assert (bitmap_set (b, 150 * g, 50 * g) == 50);
  model_set (&m, 150 * g, 50 * g);
  assert (bitmap_resize (b, 140 * g) == 0);
  model_resize (&m, 140 * g);
  check_model (b, &m);
  assert (bitmap_resize (b, 200 * g) == 0);
  model_resize (&m, 200 * g);
  check_u64 ("next_dirty in regrown", bitmap_next_dirty (b, 140 * g, 200 * g),
             NONE);
  check_model (b, &m);

  /* The partial last granule keeps its bit when the node grows. */
  set_context ("resize: partial last granule");
  bitmap_clear_all (b);
  model_clear (&m, 0, UINT64_MAX);
  assert (bitmap_resize (b, 10 * g + 1) == 0);
  model_resize (&m, 10 * g + 1);
  assert (bitmap_set (b, 10 * g, 1) == 1);
  model_set (&m, 10 * g, 1);
  assert (bitmap_count (b) == model_bytes (&m));
  assert (bitmap_resize (b, 11 * g) == 0);
  model_resize (&m, 11 * g);
  assert (bitmap_get (b, 11 * g - 1));
  check_model (b, &m);

  for (size_t i = 0; i < ARRAY_SIZE (sizes); ++i) {
    uint64_t offset, count;

    set_context ("resize: to %" PRIu64, sizes[i]);
    assert (bitmap_resize (b, sizes[i]) == 0);
    model_resize (&m, sizes[i]);
    check_model (b, &m);
    for (unsigned j = 0; j < 30; ++j) {
      random_range (&s, &m, &offset, &count);
      check_u64 ("set after resize", bitmap_set (b, offset, count),
                 model_set (&m, offset, count));
    }
    check_model (b, &m);
  }
  assert (bitmap_resize (b, UINT64_MAX) == -EINVAL);
  check_model (b, &m);
  bitmap_free (b);
  model_free (&m);
}

/* The granules of a range as the stream bitmap.h promises. */
static void
model_serialize (const struct model *m, uint64_t first, uint64_t n,
                 unsigned char *buf)
{
  memset (buf, 0, (n + 7) / 8);
  for (uint64_t k = 0; k < n; ++k)
    if (m->bit[first + k])
      buf[k / 8] |= 1 << (k % 8);
}

static void
test_serialize (void)
{
  unsigned char buf[4096], want[4096];
  struct bitmap *b, *c;
  struct model m;
  uint64_t s = 5;

  /* What QEMU wrote for writes at 1M and at 10M + 200K (qemu-block.md
   * §2.1): bits {16, 160-163} at 64K, {8, 80, 81} at 128K.
   */
  set_context ("serialize: known pattern");
  b = bitmap_new (16 * MiB, 64 * KiB);
  assert (b);
  bitmap_set (b, 1 * MiB, 1);
  bitmap_set (b, 10 * MiB, 200 * KiB);
  assert (bitmap_serialization_size (b, 0, 16 * MiB) == 32);
  memset (buf, 0xaa, sizeof buf);
  bitmap_serialize (b, 0, 16 * MiB, buf);
  memset (want, 0, 32);
  want[2] = 0x01;
  want[20] = 0x0f;
  assert (memcmp (buf, want, 32) == 0 && buf[32] == 0xaa);
  bitmap_free (b);

  b = bitmap_new (16 * MiB, 128 * KiB);
  assert (b);
  bitmap_set (b, 1 * MiB, 1);
  bitmap_set (b, 10 * MiB, 200 * KiB);
  assert (bitmap_serialization_size (b, 0, 16 * MiB) == 16);
  bitmap_serialize (b, 0, 16 * MiB, buf);
  memset (want, 0, 16);
  want[1] = 0x01;
  want[10] = 0x03;
  assert (memcmp (buf, want, 16) == 0);
  /* A range that starts off a byte: granule 8 is bit 0. */
  assert (bitmap_serialization_size (b, 8 * 128 * KiB, 3 * 128 * KiB) == 1);
  bitmap_serialize (b, 8 * 128 * KiB, 3 * 128 * KiB, buf);
  assert (buf[0] == 0x01);
  bitmap_free (b);

  /* Random contents, ranges at any granule, partial last granule.
   * c, a copy made through the stream, then follows the model.
   */
  b = random_bitmap (&s, &m, 20000 * 512 + 300, 512, 300);
  set_context ("serialize: round trip");
  c = bitmap_new (m.size, 512);
  assert (c);
  assert (bitmap_serialization_size (b, 0, m.size) == (m.n + 7) / 8);
  /* In chunks of 1000 granules: most start inside a word. */
  for (uint64_t off = 0; off < m.size; off += 1000 * 512) {
    uint64_t count = MIN (m.size - off, UINT64_C (1000) * 512);

    bitmap_serialize (b, off, count, buf);
    bitmap_deserialize (c, off, count, buf);
  }
  assert (bitmap_equal (b, c));
  check_model (c, &m);

  for (unsigned i = 0; i < 300; ++i) {
    uint64_t first = rnd_below (&s, m.n);
    uint64_t n = rnd_below (&s, MIN (m.n - first, UINT64_C (3000)) + 1);
    uint64_t offset = first * 512;
    uint64_t count = first + n == m.n ? m.size - offset : n * 512;
    size_t len = (n + 7) / 8;

    set_context ("serialize: granules %" PRIu64 "+%" PRIu64, first, n);
    check_u64 ("serialization_size",
               bitmap_serialization_size (c, offset, count), len);
    memset (buf, 0xff, sizeof buf);
    bitmap_serialize (c, offset, count, buf);
    model_serialize (&m, first, n, want);
    check_u64 ("serialized bytes", memcmp (buf, want, len), 0);
    check_u64 ("byte after", buf[len], 0xff);

    /* Deserialize random bytes into c; the tail bits of the last byte
     * are set and must be ignored.
     */
    for (size_t j = 0; j < len; ++j)
      buf[j] = rnd (&s);
    if (n % 8)
      buf[len - 1] |= 0xff << (n % 8);
    bitmap_deserialize (c, offset, count, buf);
    for (uint64_t k = 0; k < n; ++k)
      m.bit[first + k] = (buf[k / 8] >> (k % 8)) & 1;
    check_u64 ("count after deserialize", bitmap_count (c), model_bytes (&m));
    if (i % 16 == 0)
      check_model (c, &m);
    assert (bitmap_range_is_zero (c, offset, count) ==
            (model_next (&m, offset, offset + count, true) == NONE));
  }
  check_model (c, &m);
  bitmap_free (b);
  bitmap_free (c);
  model_free (&m);

  /* An all-zero range serializes to zeros and is "zero". */
  set_context ("serialize: zero range");
  b = bitmap_new (1 * GiB, 64 * KiB);
  assert (b);
  bitmap_set (b, 512 * MiB, 1);
  assert (bitmap_range_is_zero (b, 0, 512 * MiB));
  assert (!bitmap_range_is_zero (b, 256 * MiB, 512 * MiB));
  bitmap_serialize (b, 0, 256 * MiB, buf);
  assert (is_zero (buf, 512));
  bitmap_free (b);
}

/* Concurrency.  Workers run random sets (each from its own seed, so
 * the main thread can replay them) and add up what set returned.
 */
#define NR_WORKERS 4

struct worker {
  pthread_t thread;
  struct bitmap *b;
  struct model *m;              /* geometry only */
  uint64_t seed;
  unsigned ops;
  uint64_t fresh;               /* sum of bitmap_set's results */
  pthread_barrier_t *barrier;   /* for the contention rounds */
  unsigned rounds;
};

/* Workers that have finished, atomic. */
static unsigned workers_done;

static bool
workers_running (void)
{
  return __atomic_load_n (&workers_done, __ATOMIC_ACQUIRE) < NR_WORKERS;
}

/* A short range, and now and then one of the last few again. */
static void
worker_range (uint64_t *s, const struct model *m, uint64_t recent[8][2],
              uint64_t *offset, uint64_t *count)
{
  unsigned r = rnd_below (s, 8);

  if (rnd_below (s, 3) == 0) {
    *offset = recent[r][0];
    *count = recent[r][1];
    return;
  }
  *offset = rnd_below (s, m->size);
  *count = 1 + rnd_below (s, 6 * m->g);
  recent[r][0] = *offset;
  recent[r][1] = *count;
}

static void *
worker_set (void *arg)
{
  struct worker *w = arg;
  uint64_t s = w->seed;
  uint64_t recent[8][2] = { { 0 } };

  for (unsigned i = 0; i < w->ops; ++i) {
    uint64_t offset, count;

    worker_range (&s, w->m, recent, &offset, &count);
    w->fresh += bitmap_set (w->b, offset, count);
  }
  __atomic_fetch_add (&workers_done, 1, __ATOMIC_RELEASE);
  return NULL;
}

static void
test_concurrent_set (void)
{
  const uint64_t g = 4096, size = (UINT64_C (1) << 18) * g - 1000;
  struct bitmap *b = bitmap_new (size, g);
  struct worker w[NR_WORKERS];
  struct model m;
  uint64_t fresh = 0, last_count = 0;

  set_context ("concurrent set");
  assert (b);
  model_init (&m, size, g);
  workers_done = 0;
  for (unsigned i = 0; i < NR_WORKERS; ++i) {
    w[i] = (struct worker) { .b = b, .m = &m, .seed = 100 + i,
                             .ops = 100000 };
    assert (pthread_create (&w[i].thread, NULL, worker_set, &w[i]) == 0);
  }

  /* Meanwhile the count only grows and stays in range, and iteration
   * works on the moving bitmap.
   */
  do {
    uint64_t n = bitmap_count_granules (b), o = 0, runs = 0;

    assert (n >= last_count && n <= m.n);
    assert (bitmap_count (b) <= size);
    last_count = n;
    while (runs++ < 1000 &&
           (o = bitmap_next_dirty (b, o, size)) != NONE &&
           (o = bitmap_next_clean (b, o, size)) != NONE)
      ;
  } while (workers_running ());
  for (unsigned i = 0; i < NR_WORKERS; ++i)
    pthread_join (w[i].thread, NULL);

  /* Replay every worker's ranges into the model. */
  for (unsigned i = 0; i < NR_WORKERS; ++i) {
    uint64_t s = w[i].seed;
    uint64_t recent[8][2] = { { 0 } };

    for (unsigned j = 0; j < w[i].ops; ++j) {
      uint64_t offset, count;

      worker_range (&s, &m, recent, &offset, &count);
      model_set (&m, offset, count);
    }
    fresh += w[i].fresh;
  }
  check_model (b, &m);
  check_u64 ("sum of newly dirtied", fresh, model_granules (&m));
  assert (model_granules (&m) < m.n);   /* some stayed clean */
  bitmap_free (b);
  model_free (&m);
}

/* Rounds where all workers race for the same 4 words, one granule per
 * call, each in its own order: every granule is won exactly once.
 */
static void *
worker_race (void *arg)
{
  struct worker *w = arg;
  uint64_t s = w->seed;
  unsigned order[256];

  for (unsigned r = 0; r < w->rounds; ++r) {
    for (unsigned k = 0; k < 256; ++k)
      order[k] = k;
    for (unsigned k = 255; k > 0; --k) {
      unsigned j = rnd_below (&s, k + 1), t = order[k];

      order[k] = order[j];
      order[j] = t;
    }
    pthread_barrier_wait (w->barrier);          /* go */
    for (unsigned k = 0; k < 256; ++k)
      w->fresh += bitmap_set (w->b, order[k] * w->m->g, 1);
    pthread_barrier_wait (w->barrier);          /* done */
    pthread_barrier_wait (w->barrier);          /* main has checked */
  }
  return NULL;
}

static void
test_concurrent_race (void)
{
  const uint64_t g = 512;
  struct bitmap *b = bitmap_new (300 * g, g);
  struct worker w[NR_WORKERS];
  pthread_barrier_t barrier;
  struct model m;

  assert (b);
  model_init (&m, 300 * g, g);
  assert (pthread_barrier_init (&barrier, NULL, NR_WORKERS + 1) == 0);
  for (unsigned i = 0; i < NR_WORKERS; ++i) {
    w[i] = (struct worker) { .b = b, .m = &m, .seed = 200 + i,
                             .barrier = &barrier, .rounds = 1000 };
    assert (pthread_create (&w[i].thread, NULL, worker_race, &w[i]) == 0);
  }
  for (unsigned r = 0; r < 1000; ++r) {
    uint64_t fresh = 0;

    set_context ("concurrent race: round %u", r);
    pthread_barrier_wait (&barrier);
    pthread_barrier_wait (&barrier);
    for (unsigned i = 0; i < NR_WORKERS; ++i) {
      fresh += w[i].fresh;
      w[i].fresh = 0;
    }
    check_u64 ("granules won", fresh, 256);
    check_u64 ("count", bitmap_count_granules (b), 256);
    check_u64 ("next_clean", bitmap_next_clean (b, 0, UINT64_MAX), 256 * g);
    bitmap_clear_all (b);
    check_u64 ("count after clear", bitmap_count (b), 0);
    pthread_barrier_wait (&barrier);
  }
  for (unsigned i = 0; i < NR_WORKERS; ++i)
    pthread_join (w[i].thread, NULL);
  pthread_barrier_destroy (&barrier);
  bitmap_free (b);
  model_free (&m);
}

/* Rounds that race a clear against the setter that completes (or
 * starts) the same word, to catch a summary bit left wrong: 'full' on
 * a word that is not, 'any' missing on one that is not zero.  Even
 * rounds start each word full but for one granule, which the workers
 * set while the main thread clears another; odd rounds start each word
 * with one granule, which the main thread clears while the workers set
 * others.  A pthread barrier wakes threads microseconds apart, far
 * more than a word takes, so the rounds start on a spun flag instead
 * and all threads then go up the words in step.
 */
#define SUMMARY_WORDS 64
/* Spinning threads are slow under TSan, whose checks are not needed
 * for that many rounds.
 */
#ifdef __SANITIZE_THREAD__
#define SUMMARY_ROUNDS 400
#else
#define SUMMARY_ROUNDS 4000
#endif

static unsigned summary_go;     /* atomic: round the workers may run */
static unsigned summary_done;   /* atomic: (round, worker) pairs done */

static void
spin_until (const unsigned *p, unsigned value)
{
  while (__atomic_load_n (p, __ATOMIC_ACQUIRE) < value)
    sched_yield ();
}

static void *
worker_summary (void *arg)
{
  struct worker *w = arg;
  unsigned t = w->seed;

  for (unsigned r = 0; r < w->rounds; ++r) {
    spin_until (&summary_go, r + 1);
    for (unsigned i = 0; i < SUMMARY_WORDS; ++i) {
      unsigned a = (i + r) % 64;
      unsigned k = r % 2 == 0 ? a : (a + 1 + t) % 64;

      bitmap_set (w->b, (i * 64 + k) * w->m->g, 1);
    }
    __atomic_fetch_add (&summary_done, 1, __ATOMIC_RELEASE);
  }
  return NULL;
}

static void
test_concurrent_summary (void)
{
  const uint64_t g = 512, size = SUMMARY_WORDS * 64 * g;
  const unsigned rounds = SUMMARY_ROUNDS;
  struct bitmap *b = bitmap_new (size, g);
  struct worker w[NR_WORKERS];
  struct model m;

  assert (b);
  model_init (&m, size, g);
  summary_go = summary_done = 0;
  for (unsigned i = 0; i < NR_WORKERS; ++i) {
    w[i] = (struct worker) { .b = b, .m = &m, .seed = i, .rounds = rounds };
    assert (pthread_create (&w[i].thread, NULL, worker_summary, &w[i]) == 0);
  }
  for (unsigned r = 0; r < rounds; ++r) {
    set_context ("concurrent summary: round %u", r);
    for (unsigned i = 0; i < SUMMARY_WORDS; ++i) {
      uint64_t a = i * 64 + (i + r) % 64;

      if (r % 2 == 0) {
        bitmap_set (b, i * 64 * g, 64 * g);
        bitmap_clear (b, a * g, g);
      }
      else {
        bitmap_clear (b, i * 64 * g, 64 * g);
        bitmap_set (b, a * g, 1);
      }
    }
    __atomic_store_n (&summary_go, r + 1, __ATOMIC_RELEASE);
    for (unsigned i = 0; i < SUMMARY_WORDS; ++i) {
      uint64_t a = i * 64 + (i + r) % 64;

      if (r % 2 == 0)
        bitmap_clear (b, (a / 64 * 64 + (a + 7) % 64) * g, g);
      else
        bitmap_clear (b, a * g, g);
    }
    spin_until (&summary_done, (r + 1) * NR_WORKERS);
    for (uint64_t k = 0; k < m.n; ++k)
      m.bit[k] = bitmap_get (b, k * g);
    check_model (b, &m);
  }
  for (unsigned i = 0; i < NR_WORKERS; ++i)
    pthread_join (w[i].thread, NULL);
  bitmap_free (b);
  model_free (&m);
}

/* Workers set while the main thread clears: nothing can be predicted
 * about the final bits, but the count and both summaries must agree
 * with the bits once everyone has stopped.
 */
static void
test_concurrent_clear (void)
{
  const uint64_t g = 1024, size = 20000 * g + 5;
  struct bitmap *b = bitmap_new (size, g);
  struct worker w[NR_WORKERS];
  struct model m;
  uint64_t s = 6;

  set_context ("concurrent set and clear");
  assert (b);
  model_init (&m, size, g);
  workers_done = 0;
  for (unsigned i = 0; i < NR_WORKERS; ++i) {
    w[i] = (struct worker) { .b = b, .m = &m, .seed = 300 + i,
                             .ops = 100000 };
    assert (pthread_create (&w[i].thread, NULL, worker_set, &w[i]) == 0);
  }
  do {
    uint64_t offset, count;

    random_range (&s, &m, &offset, &count);
    if (rnd_below (&s, 50) == 0)
      bitmap_clear_all (b);
    else
      bitmap_clear (b, offset, 1 + rnd_below (&s, 64 * g));
  } while (workers_running ());
  for (unsigned i = 0; i < NR_WORKERS; ++i)
    pthread_join (w[i].thread, NULL);

  /* The model is whatever the bits are; check_model then tests the
   * count and, through the walk, the summaries.
   */
  for (uint64_t k = 0; k < m.n; ++k)
    m.bit[k] = bitmap_get (b, k * g);
  check_model (b, &m);
  bitmap_set_all (b);
  model_set (&m, 0, UINT64_MAX);
  check_model (b, &m);
  bitmap_clear_all (b);
  model_clear (&m, 0, UINT64_MAX);
  check_model (b, &m);
  bitmap_free (b);
  model_free (&m);
}

int
main (void)
{
  test_new ();
  test_edges ();
  test_extremes ();
  test_random ();
  test_merge ();
  test_copy_equal ();
  test_resize ();
  test_serialize ();
  test_concurrent_set ();
  test_concurrent_race ();
  test_concurrent_clear ();
  test_concurrent_summary ();
  printf ("test-bitmap: ok\n");
  return EXIT_SUCCESS;
}
