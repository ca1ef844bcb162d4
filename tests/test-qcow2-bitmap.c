/* Tests for formats/qcow2-bitmap.c: the qcow2 bitmaps extension.
 *
 * Without arguments (as 'make check' runs it), with qemu-img and
 * qemu-io as the oracle (they must be installed):
 *   - bitmaps made by 'qemu-img bitmap' and dirtied by 'qemu-io' writes
 *     are listed with their granularity and flags, and read back with
 *     exactly the bits QEMU recorded, from any granule;
 *   - a read-write open marks every bitmap IN_USE on disk (QEMU sees
 *     them as in use), and clearing it restores them;
 *   - stored bitmaps are listed by 'qemu-img info', pass 'qemu-img
 *     check', read back bit for bit, can be replaced and removed (by
 *     us and by 'qemu-img bitmap --remove');
 *   - hostile images (every field of the extension, the directory and
 *     the tables broken in turn): the read-only open succeeds and the
 *     list fails with a message, the read-write open fails, no crash.
 *
 * With arguments it is the helper of tests/test_qcow2_bitmap.py:
 *   test-qcow2-bitmap list FILE           name granularity in_use auto
 *   test-qcow2-bitmap read FILE NAME      dirty ranges: "offset length"
 *   test-qcow2-bitmap store FILE SPEC...  SPEC: NAME:GRAN:FLAGS:RANGES,
 *        FLAGS a subset of "au" (auto, in_use) or "-", RANGES
 *        "off+len,..." in bytes or "-"; no SPEC removes them all
 *   test-qcow2-bitmap open-rw FILE        open read-write, close
 *   test-qcow2-bitmap clear-in-use FILE   open read-write, clear IN_USE
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#undef NDEBUG
#include <assert.h>

#include <json-c/json.h>

#include "graph.h"
#include "options.h"
#include "qcow2.h"
#include "utils.h"

#define MiB (UINT64_C (1) << 20)
#define KiB (UINT64_C (1) << 10)

static char dir[] = "/tmp/test-qcow2-bitmap.XXXXXX";

static void
sh (const char *fs, ...) __attribute__ ((format (printf, 1, 2)));

static void
sh (const char *fs, ...)
{
  char cmd[8192];
  va_list args;

  va_start (args, fs);
  vsnprintf (cmd, sizeof cmd, fs, args);
  va_end (args);
  if (system (cmd) != 0) {
    fprintf (stderr, "command failed: %s\n", cmd);
    abort ();
  }
}

/* The exit status of a shell command. */
static int
sh_rc (const char *fs, ...) __attribute__ ((format (printf, 1, 2)));

static int
sh_rc (const char *fs, ...)
{
  char cmd[8192];
  va_list args;
  int r;

  va_start (args, fs);
  vsnprintf (cmd, sizeof cmd, fs, args);
  va_end (args);
  r = system (cmd);
  return WIFEXITED (r) ? WEXITSTATUS (r) : -1;
}

/* Open @path; NULL (with *errp) on failure. */
static struct node *
try_open (const char *path, bool ro, struct error **errp)
{
  char spec[4096];
  struct json_object *o;
  struct node *n;

  snprintf (spec, sizeof spec, "driver=qcow2,node-name=img,file.driver=file,"
            "file.filename=%s%s", path,
            ro ? ",read-only=on,file.read-only=on" : "");
  o = spec_parse (spec, errp);
  assert (o);
  n = node_open_spec (o, errp);
  json_object_put (o);
  return n;
}

static struct node *
open_img (const char *path, bool ro)
{
  struct error *err = NULL;
  struct node *n = try_open (path, ro, &err);

  if (n == NULL) {
    fprintf (stderr, "open %s: %s\n", path, err->msg);
    abort ();
  }
  return n;
}

static void
close_img (void)
{
  node_close_all ();
}

/* ------------------------------------------------------------------ */
/* Bits as guest ranges */

struct range {
  uint64_t off, len;
};

/* Granule k is set iff it meets one of @r. */
struct ranges {
  const struct range *r;
  size_t n;
  uint32_t gran;
};

static int
fill_ranges (void *opaque, uint64_t offset, uint64_t count, void *buf)
{
  const struct ranges *rs = opaque;
  uint8_t *p = buf;
  uint64_t nbits = (count + rs->gran - 1) / rs->gran;

  assert (offset % rs->gran == 0);
  for (uint64_t k = 0; k < nbits; ++k) {
    uint64_t a = offset + k * rs->gran, b = a + rs->gran;
    for (size_t i = 0; i < rs->n; ++i)
      if (rs->r[i].off < b && a < rs->r[i].off + rs->r[i].len) {
        p[k / 8] |= 1u << (k % 8);
        break;
      }
  }
  return 0;
}

static bool
bit (const uint8_t *b, uint64_t k)
{
  return (b[k / 8] >> (k % 8)) & 1;
}

/* The whole bitmap @name of @n, malloc'd; *nbits set. */
static uint8_t *
read_all (struct node *n, const char *name, uint32_t gran, uint64_t *nbits)
{
  struct error *err = NULL;
  uint8_t *b;

  *nbits = (n->size + gran - 1) / gran;
  b = malloc (*nbits / 8 + 1);
  assert (b);
  if (qcow2_bitmap_read (n, name, 0, n->size, b, &err) == -1) {
    fprintf (stderr, "read %s: %s\n", name, err->msg);
    abort ();
  }
  return b;
}

static const struct qcow2_bitmap_info *
find (const struct qcow2_bitmap_info *l, size_t n, const char *name)
{
  for (size_t i = 0; i < n; ++i)
    if (strcmp (l[i].name, name) == 0)
      return &l[i];
  return NULL;
}

/* ------------------------------------------------------------------ */
/* qemu-img info */

/* The bitmaps 'qemu-img info' lists: count, and of @name the
 * granularity and flags ("in-use", "auto").
 */
static int
qemu_info (const char *path, const char *name, uint32_t *gran, bool *in_use,
           bool *autof)
{
  char cmd[4096], out[65536];
  size_t len;
  FILE *fp;
  struct json_object *doc, *v, *bms;
  int n = 0;

  snprintf (cmd, sizeof cmd, "qemu-img info -U --output=json %s", path);
  fp = popen (cmd, "r");
  assert (fp);
  len = fread (out, 1, sizeof out - 1, fp);
  assert (pclose (fp) == 0);
  out[len] = '\0';
  doc = json_tokener_parse (out);
  assert (doc);
  if (json_object_object_get_ex (doc, "format-specific", &v) &&
      json_object_object_get_ex (v, "data", &v) &&
      json_object_object_get_ex (v, "bitmaps", &bms)) {
    n = json_object_array_length (bms);
    for (int i = 0; i < n; ++i) {
      struct json_object *b = json_object_array_get_idx (bms, i), *f;
      if (!name || !json_object_object_get_ex (b, "name", &v) ||
          strcmp (json_object_get_string (v), name) != 0)
        continue;
      json_object_object_get_ex (b, "granularity", &v);
      *gran = json_object_get_int64 (v);
      *in_use = *autof = false;
      json_object_object_get_ex (b, "flags", &f);
      for (size_t j = 0; j < json_object_array_length (f); ++j) {
        const char *s = json_object_get_string
          (json_object_array_get_idx (f, j));
        *in_use |= strcmp (s, "in-use") == 0;
        *autof |= strcmp (s, "auto") == 0;
      }
    }
  }
  json_object_put (doc);
  return n;
}

/* ------------------------------------------------------------------ */
/* Reading what QEMU wrote */

static void
test_read_qemu (void)
{
  char path[256];
  struct node *n;
  struct qcow2_bitmap_info *l;
  const struct qcow2_bitmap_info *b;
  struct error *err = NULL;
  size_t nr;
  uint64_t nbits;
  uint8_t *bits, part[8];

  snprintf (path, sizeof path, "%s/q.qcow2", dir);
  sh ("qemu-img create -q -f qcow2 %s 64M && "
      "qemu-img bitmap --add %s b0 && "
      "qemu-img bitmap --add -g 128K %s b1 && "
      "qemu-img bitmap --add --disable %s b2 && "
      "qemu-img bitmap --add -g 512 %s b3 && "
      "qemu-io -f qcow2 -c 'write 1M 64K' -c 'write 10M 200K' "
      "-c 'write 63M 1K' %s >/dev/null", path, path, path, path, path, path);

  n = open_img (path, true);
  assert (qcow2_bitmaps_list (n, &l, &nr, &err) == 0);
  assert (nr == 4);
  assert (strcmp (l[0].name, "b0") == 0 && strcmp (l[3].name, "b3") == 0);
  b = find (l, nr, "b0");
  assert (b->granularity == 65536 && b->auto_ && !b->in_use);
  b = find (l, nr, "b1");
  assert (b->granularity == 131072 && b->auto_ && !b->in_use);
  b = find (l, nr, "b2");
  assert (b->granularity == 65536 && !b->auto_ && !b->in_use);
  b = find (l, nr, "b3");
  assert (b->granularity == 512 && b->auto_);
  qcow2_bitmaps_free (l, nr);

  /* The bits QEMU recorded: 1M, [10M, 10M+200K), [63M, 63M+1K). */
  bits = read_all (n, "b0", 65536, &nbits);
  assert (nbits == 1024);
  for (uint64_t k = 0; k < nbits; ++k)
    assert (bit (bits, k) == (k == 16 || (k >= 160 && k <= 163) ||
                              k == 1008));
  free (bits);
  bits = read_all (n, "b1", 131072, &nbits);
  for (uint64_t k = 0; k < nbits; ++k)
    assert (bit (bits, k) == (k == 8 || k == 80 || k == 81 || k == 504));
  free (bits);
  bits = read_all (n, "b2", 65536, &nbits);
  for (uint64_t k = 0; k < nbits; ++k)
    assert (!bit (bits, k));    /* disabled: recorded nothing */
  free (bits);
  /* 512-byte granularity: 131072 bits, in one 64K data cluster. */
  bits = read_all (n, "b3", 512, &nbits);
  assert (nbits == 131072);
  for (uint64_t k = 0; k < nbits; ++k)
    assert (bit (bits, k) == ((k >= 2048 && k < 2176) ||
                              (k >= 20480 && k < 20880) ||
                              (k >= 129024 && k < 129026)));
  free (bits);

  /* From a granule that is not a byte boundary: bits 157..164. */
  memset (part, 0xaa, sizeof part);
  assert (qcow2_bitmap_read (n, "b0", 157 * 65536, 8 * 65536, part,
                             &err) == 0);
  assert (part[0] == 0x78);      /* bits 3..6 = granules 160..163 */
  /* The last, partial range: up to the end. */
  assert (qcow2_bitmap_read (n, "b0", 1000 * 65536, 24 * 65536, part,
                             &err) == 0);
  assert (part[0] == 0 && part[1] == 1 && part[2] == 0);
  /* Unaligned, out of range, unknown: refused with a message. */
  assert (qcow2_bitmap_read (n, "b0", 512, 65536, part, &err) == -1);
  assert (strstr (err->msg, "granularity"));
  error_free (err);
  err = NULL;
  assert (qcow2_bitmap_read (n, "b0", 0, 65 * MiB, part, &err) == -1);
  error_free (err);
  err = NULL;
  assert (qcow2_bitmap_read (n, "nope", 0, 65536, part, &err) == -1);
  assert (strstr (err->msg, "no persistent bitmap 'nope'"));
  error_free (err);
  err = NULL;
  close_img ();

  /* A read-write open marks every bitmap IN_USE before any write; the
   * node still trusts them (it marked them), QEMU does not.
   */
  n = open_img (path, false);
  assert (qcow2_bitmaps_list (n, &l, &nr, &err) == 0 && nr == 4);
  for (size_t i = 0; i < nr; ++i)
    assert (!l[i].in_use && (l[i].flags & 1));
  qcow2_bitmaps_free (l, nr);
  bits = read_all (n, "b0", 65536, &nbits);
  assert (bit (bits, 16) && !bit (bits, 15));
  free (bits);
  close_img ();
  {
    uint32_t g;
    bool iu, au;
    assert (qemu_info (path, "b1", &g, &iu, &au) == 4);
    assert (g == 131072 && iu && au);
  }
  assert (sh_rc ("qemu-img check -q %s", path) == 0);

  /* Reopened: now they are in use for us too (as after a crash). */
  n = open_img (path, true);
  assert (qcow2_bitmaps_list (n, &l, &nr, &err) == 0 && nr == 4);
  for (size_t i = 0; i < nr; ++i)
    assert (l[i].in_use);
  qcow2_bitmaps_free (l, nr);
  assert (qcow2_bitmap_read (n, "b0", 0, 65536, part, &err) == -1);
  assert (strstr (err->msg, "in use"));
  error_free (err);
  err = NULL;
  close_img ();
  /* And clearing IN_USE never makes those valid again. */
  n = open_img (path, false);
  assert (qcow2_bitmaps_set_in_use (n, false, &err) == 0);
  close_img ();
  {
    uint32_t g;
    bool iu, au;
    assert (qemu_info (path, "b0", &g, &iu, &au) == 4 && iu);
  }
  /* QEMU can still remove them. */
  sh ("qemu-img bitmap --remove %s b0 && qemu-img check -q %s", path, path);
  {
    uint32_t g;
    bool iu, au;
    assert (qemu_info (path, NULL, &g, &iu, &au) == 3);
  }
  sh ("rm -f %s", path);
}

/* A clean session: marked at open, cleared at close, QEMU sees them as
 * valid and the contents unchanged.
 */
static void
test_in_use_roundtrip (void)
{
  char path[256];
  struct node *n;
  struct error *err = NULL;
  uint32_t g;
  bool iu, au;

  snprintf (path, sizeof path, "%s/r.qcow2", dir);
  sh ("qemu-img create -q -f qcow2 %s 8M && qemu-img bitmap --add %s c0 && "
      "qemu-io -f qcow2 -c 'write 0 4K' %s >/dev/null", path, path, path);
  n = open_img (path, false);
  assert (qcow2_bitmaps_set_in_use (n, false, &err) == 0);
  close_img ();
  assert (qemu_info (path, "c0", &g, &iu, &au) == 1 && !iu && au);
  sh ("qemu-img check -q %s && qemu-img bitmap --add --merge c0 %s c1",
      path, path);

  /* After a resize, a bitmap whose table no longer fits stays IN_USE
   * (not IN_USE with a wrong table, QEMU would not open the image);
   * one whose table still fits is valid (the new bits are zero).
   */
  sh ("qemu-img bitmap --add -g 512 %s c2", path);
  n = open_img (path, false);
  assert (node_truncate (n, 300 * MiB) == 0);
  assert (qcow2_bitmaps_set_in_use (n, false, &err) == 0);
  close_img ();
  assert (qemu_info (path, "c2", &g, &iu, &au) == 3 && iu);
  assert (qemu_info (path, "c1", &g, &iu, &au) == 3 && !iu);
  assert (sh_rc ("qemu-img check -q %s", path) == 0);
  sh ("rm -f %s", path);
}

/* ------------------------------------------------------------------ */
/* Storing */

static void
test_store (void)
{
  char path[256];
  struct node *n;
  struct error *err = NULL;
  struct qcow2_bitmap_info *l;
  size_t nr;
  uint64_t nbits;
  uint8_t *bits;
  uint32_t g;
  bool iu, au;
  static const struct range r0[] = {
    { 0, 1 }, { 3 * MiB + 5, 200 * KiB }, { 60 * MiB, 4 * MiB + 123 },
  };
  static const struct range r1[] = { { 7 * MiB, 512 }, { 33 * MiB, 1 } };
  struct ranges rs0 = { r0, 3, 65536 }, rs1 = { r1, 2, 512 };
  struct ranges rs2 = { NULL, 0, 1 << 20 }, rs3 = { r0, 3, 1u << 31 };
  struct qcow2_bitmap_store st[] = {
    { "s0", 65536, false, true, fill_ranges, &rs0 },
    { "s1", 512, false, false, fill_ranges, &rs1 },
    { "empty", 1 << 20, false, true, fill_ranges, &rs2 },
    { "huge-granularity", 1u << 31, false, true, fill_ranges, &rs3 },
  };

  snprintf (path, sizeof path, "%s/s.qcow2", dir);
  /* 64M + 1 byte: the last granule is partial.  An old bitmap to be
   * replaced.
   */
  sh ("qemu-img create -q -f qcow2 %s 67108865 && "
      "qemu-img bitmap --add %s old", path, path);
  n = open_img (path, false);
  assert (qcow2_bitmaps_store (n, st, 4, &err) == 0);
  /* Listed and read back at once. */
  assert (qcow2_bitmaps_list (n, &l, &nr, &err) == 0 && nr == 4);
  assert (!find (l, nr, "old"));
  assert (find (l, nr, "s1")->granularity == 512);
  assert (!find (l, nr, "s1")->auto_ && find (l, nr, "s0")->auto_);
  qcow2_bitmaps_free (l, nr);
  close_img ();

  assert (sh_rc ("qemu-img check -q %s", path) == 0);
  assert (qemu_info (path, "s0", &g, &iu, &au) == 4);
  assert (g == 65536 && !iu && au);
  assert (qemu_info (path, "s1", &g, &iu, &au) == 4 && g == 512 && !iu &&
          !au);
  assert (qemu_info (path, "huge-granularity", &g, &iu, &au) == 4 &&
          g == 1u << 31);

  n = open_img (path, true);
  bits = read_all (n, "s0", 65536, &nbits);
  assert (nbits == 1025);
  for (uint64_t k = 0; k < nbits; ++k)
    assert (bit (bits, k) == (k == 0 || k == 48 || k == 49 || k == 50 ||
                              k == 51 || k >= 960));
  free (bits);
  bits = read_all (n, "s1", 512, &nbits);
  for (uint64_t k = 0; k < nbits; ++k)
    assert (bit (bits, k) == (k == 7 * 2048 || k == 33 * 2048));
  free (bits);
  bits = read_all (n, "empty", 1 << 20, &nbits);
  for (uint64_t k = 0; k < nbits; ++k)
    assert (!bit (bits, k));
  free (bits);
  bits = read_all (n, "huge-granularity", 1u << 31, &nbits);
  assert (nbits == 1 && bits[0] == 1);
  free (bits);
  close_img ();

  /* QEMU reads them as we wrote them: merged into a new bitmap by
   * qemu-img, which we read back.
   */
  sh ("qemu-img bitmap --add --merge s0 %s m", path);
  n = open_img (path, true);
  {
    uint64_t nb2;
    uint8_t *a = read_all (n, "s0", 65536, &nbits);
    uint8_t *b = read_all (n, "m", 65536, &nb2);
    assert (nbits == nb2 && memcmp (a, b, (nbits + 7) / 8) == 0);
    free (a);
    free (b);
  }
  close_img ();

  /* Invalid stores are refused before anything is written. */
  n = open_img (path, false);
  {
    char longname[1100];
    struct qcow2_bitmap_store bad = st[0];

    memset (longname, 'x', 1024);
    longname[1024] = '\0';
    bad.name = longname;
    assert (qcow2_bitmaps_store (n, &bad, 1, &err) == -1);
    assert (strstr (err->msg, "name"));
    error_free (err);
    err = NULL;
    bad = st[0];
    bad.granularity = 256;
    assert (qcow2_bitmaps_store (n, &bad, 1, &err) == -1);
    error_free (err);
    err = NULL;
    bad.granularity = 3 << 16;
    assert (qcow2_bitmaps_store (n, &bad, 1, &err) == -1);
    error_free (err);
    err = NULL;
    {
      struct qcow2_bitmap_store two[] = { st[0], st[0] };
      assert (qcow2_bitmaps_store (n, two, 2, &err) == -1);
      assert (strstr (err->msg, "twice"));
      error_free (err);
      err = NULL;
    }
  }
  /* n == 0: the extension and the autoclear bit go. */
  assert (qcow2_bitmaps_store (n, NULL, 0, &err) == 0);
  assert (qcow2_bitmaps_list (n, &l, &nr, &err) == 0 && nr == 0);
  close_img ();
  assert (sh_rc ("qemu-img check -q %s", path) == 0);
  assert (qemu_info (path, NULL, &g, &iu, &au) == 0);
  {
    int fd = open (path, O_RDONLY);
    uint64_t ac;
    assert (fd >= 0 && pread (fd, &ac, 8, 88) == 8);
    assert ((be64toh (ac) & 1) == 0);
    close (fd);
  }

  /* A store on a read-only node is refused. */
  n = open_img (path, true);
  assert (qcow2_bitmaps_store (n, st, 1, &err) == -1);
  assert (strstr (err->msg, "read-only"));
  error_free (err);
  err = NULL;
  close_img ();
  sh ("rm -f %s", path);
}

/* A store into an image with a backing file and small clusters keeps
 * the header (backing name, extensions) intact.
 */
static void
test_store_header (void)
{
  char path[256], base[256];
  struct node *n;
  struct error *err = NULL;
  static const struct range r[] = { { 0, 1 } };
  struct ranges rs = { r, 1, 512 };
  struct qcow2_bitmap_store st = { "b", 512, true, true, fill_ranges, &rs };
  uint32_t g;
  bool iu, au;

  snprintf (base, sizeof base, "%s/base.qcow2", dir);
  snprintf (path, sizeof path, "%s/top.qcow2", dir);
  sh ("qemu-img create -q -f qcow2 %s 1M && qemu-img create -q -f qcow2 "
      "-o cluster_size=512 -b %s -F qcow2 %s 1M", base, base, path);
  n = open_img (path, false);
  assert (qcow2_bitmaps_store (n, &st, 1, &err) == 0);
  close_img ();
  assert (sh_rc ("qemu-img check -q %s", path) == 0);
  assert (qemu_info (path, "b", &g, &iu, &au) == 1 && iu && au);
  assert (sh_rc ("qemu-img info %s | grep -q 'backing file: %s'", path,
                 base) == 0);
  sh ("qemu-img bitmap --remove %s b && qemu-img check -q %s", path, path);
  sh ("rm -f %s %s", path, base);
}

/* ------------------------------------------------------------------ */
/* Hostile images */

struct layout {
  uint64_t cs;
  uint64_t ext;                 /* file offset of the extension's data */
  uint64_t dir, dir_size;
  uint64_t l1, reftable;
  uint64_t e0, e1;              /* directory entries */
  uint64_t table0;
  uint64_t data0;
};

static uint64_t
rd64 (int fd, uint64_t off)
{
  uint64_t v;
  assert (pread (fd, &v, 8, off) == 8);
  return be64toh (v);
}

static uint32_t
rd32 (int fd, uint64_t off)
{
  uint32_t v;
  assert (pread (fd, &v, 4, off) == 4);
  return be32toh (v);
}

static void
wr (const char *path, uint64_t off, const void *p, size_t len)
{
  int fd = open (path, O_WRONLY);
  assert (fd >= 0 && pwrite (fd, p, len, off) == (ssize_t) len);
  close (fd);
}

static void
wr64 (const char *path, uint64_t off, uint64_t v)
{
  v = htobe64 (v);
  wr (path, off, &v, 8);
}

static void
wr32 (const char *path, uint64_t off, uint32_t v)
{
  v = htobe32 (v);
  wr (path, off, &v, 4);
}

static void
wr16 (const char *path, uint64_t off, uint16_t v)
{
  v = htobe16 (v);
  wr (path, off, &v, 2);
}

static void
wr8 (const char *path, uint64_t off, uint8_t v)
{
  wr (path, off, &v, 1);
}

static void
find_layout (const char *path, struct layout *L)
{
  int fd = open (path, O_RDONLY);
  uint64_t pos;

  assert (fd >= 0);
  L->cs = UINT64_C (1) << rd32 (fd, 20);
  L->l1 = rd64 (fd, 40);
  L->reftable = rd64 (fd, 48);
  pos = rd32 (fd, 100);
  for (;;) {
    uint32_t type = rd32 (fd, pos), len = rd32 (fd, pos + 4);
    assert (type != 0);
    if (type == 0x23852875) {
      L->ext = pos + 8;
      break;
    }
    pos += 8 + ((len + 7) & ~7u);
  }
  L->dir_size = rd64 (fd, L->ext + 8);
  L->dir = rd64 (fd, L->ext + 16);
  L->e0 = L->dir;
  L->e1 = L->dir + ((24 + 2 + 7) & ~7u);     /* names of 2 bytes */
  L->table0 = rd64 (fd, L->e0);
  L->data0 = rd64 (fd, L->table0);
  close (fd);
  assert (L->data0 != 0);
}

/* The image at @path is hostile: the read-only open works and reads
 * data, the list fails naming @what, the read-write open fails.
 */
static void
expect_broken (const char *path, const char *what)
{
  struct node *n;
  struct error *err = NULL;
  struct qcow2_bitmap_info *l = NULL;
  size_t nr = 0;
  char buf[4096];

  n = open_img (path, true);
  assert (node_pread (n, buf, sizeof buf, 0, 0) == 0);
  if (qcow2_bitmaps_list (n, &l, &nr, &err) != -1) {
    fprintf (stderr, "%s: listed %zu bitmaps, expected an error about "
             "'%s'\n", path, nr, what);
    abort ();
  }
  if (strstr (err->msg, what) == NULL) {
    fprintf (stderr, "%s: error '%s' does not say '%s'\n", path, err->msg,
             what);
    abort ();
  }
  error_free (err);
  err = NULL;
  assert (qcow2_bitmap_read (n, "aa", 0, 65536, buf, &err) == -1);
  error_free (err);
  err = NULL;
  close_img ();
  n = try_open (path, false, &err);
  assert (n == NULL && strstr (err->msg, "read-only"));
  error_free (err);
}

static void
test_hostile (void)
{
  char base[256], path[256];
  struct layout L;

  snprintf (base, sizeof base, "%s/hbase.qcow2", dir);
  snprintf (path, sizeof path, "%s/h.qcow2", dir);
  sh ("qemu-img create -q -f qcow2 %s 4M && qemu-img bitmap --add %s aa && "
      "qemu-img bitmap --add %s ab && "
      "qemu-io -f qcow2 -c 'write 0 64K' %s >/dev/null",
      base, base, base, base);
  find_layout (base, &L);
  /* The base is fine. */
  {
    struct node *n = open_img (base, true);
    struct qcow2_bitmap_info *l;
    size_t nr;
    struct error *err = NULL;
    assert (qcow2_bitmaps_list (n, &l, &nr, &err) == 0 && nr == 2);
    qcow2_bitmaps_free (l, nr);
    close_img ();
  }

#define CASE(what, patch)                       \
  do {                                          \
    sh ("cp %s %s", base, path);                \
    patch;                                      \
    expect_broken (path, what);                 \
  } while (0)

  /* The extension. */
  CASE ("1 to 65535", wr32 (path, L.ext, 0));
  CASE ("1 to 65535", wr32 (path, L.ext, 70000));
  CASE ("more than the 1 bitmaps", wr32 (path, L.ext, 1));
  CASE ("directory size", wr32 (path, L.ext, 3));
  CASE ("reserved field", wr32 (path, L.ext + 4, 1));
  CASE ("directory size", wr64 (path, L.ext + 8, UINT64_C (1) << 30));
  CASE ("directory size", wr64 (path, L.ext + 8, 8));
  /* (The directory ends the file: these grow it first.) */
  CASE ("more than the 2 bitmaps", sh ("truncate -s +64K %s", path);
        wr64 (path, L.ext + 8, L.dir_size + 24));
  CASE ("truncated", sh ("truncate -s +64K %s", path);
        wr32 (path, L.ext, 3); wr64 (path, L.ext + 8, L.dir_size + 8));
  CASE ("not cluster aligned", wr64 (path, L.ext + 16, L.dir + 512));
  CASE ("0 or not", wr64 (path, L.ext + 16, 0));
  CASE ("past the end of the file", wr64 (path, L.ext + 16,
                                          UINT64_C (1) << 40));
  CASE ("overlaps the refcount table", wr64 (path, L.ext + 16, L.reftable));
  CASE ("overlaps the L1 table", wr64 (path, L.ext + 16, L.l1));
  /* Directory entries. */
  CASE ("name of 0 bytes", wr16 (path, L.e0 + 18, 0));
  CASE ("runs past the end", wr16 (path, L.e0 + 18, 1024));
  CASE ("runs past the end", wr16 (path, L.e1 + 18, 65535));
  CASE ("NUL byte", wr8 (path, L.e0 + 25, 0));
  CASE ("granularity 2^8", wr8 (path, L.e0 + 17, 8));
  CASE ("granularity 2^32", wr8 (path, L.e0 + 17, 32));
  CASE ("type 2", wr8 (path, L.e0 + 16, 2));
  CASE ("reserved flags", wr32 (path, L.e0 + 12, 4 | 2));
  CASE ("reserved flags", wr32 (path, L.e1 + 12, UINT32_C (1) << 31));
  CASE ("extra data", sh ("truncate -s +64K %s", path);
        wr32 (path, L.e0 + 20, 8);
        wr64 (path, L.ext + 8, L.dir_size + 8));
  CASE ("appears twice", wr8 (path, L.e1 + 25, 'a'));
  CASE ("table of 0 entries", wr32 (path, L.e0 + 8, 0));
  CASE ("table of 134217729", wr32 (path, L.e0 + 8, 0x8000001));
  CASE ("needs 1", wr32 (path, L.e0 + 8, 2));
  CASE ("0, or not cluster aligned", wr64 (path, L.e0, 0));
  CASE ("0, or not cluster aligned", wr64 (path, L.e0, L.table0 + 512));
  CASE ("past the end of the file", wr64 (path, L.e0,
                                          UINT64_C (1) << 50));
  CASE ("overlaps the L1 table", wr64 (path, L.e0, L.l1));
  CASE ("more than once", wr64 (path, L.e1, L.table0));
  CASE ("more than once", wr64 (path, L.e0, L.dir));
  /* Table entries. */
  CASE ("reserved bits", wr64 (path, L.table0, L.data0 | 2));
  CASE ("reserved bits", wr64 (path, L.table0, L.data0 |
                               (UINT64_C (1) << 60)));
  CASE ("all-ones", wr64 (path, L.table0, L.data0 | 1));
  CASE ("not cluster aligned", wr64 (path, L.table0, L.data0 + 512));
  CASE ("past the end", wr64 (path, L.table0, UINT64_C (1) << 50));
  CASE ("overlaps the refcount table", wr64 (path, L.table0, L.reftable));
  CASE ("more than once", wr64 (path, L.table0, L.dir));
  CASE ("more than once", wr64 (path, L.table0, L.table0));
#undef CASE

  /* IN_USE: the table may have any size (not stored after a resize). */
  {
    struct node *n;
    struct error *err = NULL;
    struct qcow2_bitmap_info *l;
    size_t nr;

    sh ("cp %s %s", base, path);
    wr32 (path, L.e0 + 12, 3);
    wr32 (path, L.e0 + 8, 2);
    n = open_img (path, true);
    assert (qcow2_bitmaps_list (n, &l, &nr, &err) == 0 && nr == 2);
    assert (l[0].in_use && l[0].auto_ && !l[1].in_use);
    qcow2_bitmaps_free (l, nr);
    close_img ();
  }

  /* An all-ones entry is valid and reads as ones. */
  {
    struct node *n;
    struct error *err = NULL;
    uint8_t b[8];

    sh ("cp %s %s", base, path);
    wr64 (path, L.table0, 1);
    n = open_img (path, true);
    assert (qcow2_bitmap_read (n, "aa", 0, 4 * MiB, b, &err) == 0);
    assert (b[0] == 0xff && b[7] == 0xff);
    close_img ();
  }

  /* Stale: the autoclear bit clear.  Ignored read-only; dropped from
   * the header by a read-write open, as QEMU does.
   */
  {
    struct node *n;
    struct error *err = NULL;
    struct qcow2_bitmap_info *l;
    size_t nr;
    uint32_t g;
    bool iu, au;
    int rc;

    sh ("cp %s %s", base, path);
    wr64 (path, 88, 0);
    n = open_img (path, true);
    assert (qcow2_bitmaps_list (n, &l, &nr, &err) == 0 && nr == 0);
    close_img ();
    n = open_img (path, false);
    close_img ();
    assert (qemu_info (path, NULL, &g, &iu, &au) == 0);
    /* Their clusters are leaks now, not corruption. */
    rc = sh_rc ("qemu-img check -q %s >/dev/null 2>&1", path);
    assert (rc == 0 || rc == 3);
  }
  sh ("rm -f %s %s", base, path);
}

/* A guest write that would land on a bitmap data cluster (an L2 entry
 * points there) fails with EIO, as QEMU's overlap check does, and the
 * bitmap's bits survive.
 */
static void
test_overlap (void)
{
  char path[256];
  struct layout L;
  struct node *n;
  uint8_t before[512], after[512], buf[4096] = { 0 };
  uint64_t l1, l2;
  int fd;

  snprintf (path, sizeof path, "%s/o.qcow2", dir);
  sh ("qemu-img create -q -f qcow2 %s 4M && qemu-img bitmap --add %s bb && "
      "qemu-io -f qcow2 -c 'write 0 64K' %s >/dev/null", path, path, path);
  find_layout (path, &L);
  fd = open (path, O_RDONLY);
  assert (fd >= 0);
  l1 = rd64 (fd, 40);
  l2 = rd64 (fd, l1) & QCOW2_L1E_OFFSET_MASK;
  assert (pread (fd, before, sizeof before, L.data0) == sizeof before);
  close (fd);
  wr64 (path, l2, L.data0 | QCOW2_OFLAG_COPIED);

  n = open_img (path, false);
  assert (node_pwrite (n, buf, sizeof buf, 0, 0) == -EIO);
  close_img ();
  fd = open (path, O_RDONLY);
  assert (pread (fd, after, sizeof after, L.data0) == sizeof after);
  close (fd);
  assert (memcmp (before, after, sizeof before) == 0);
  sh ("rm -f %s", path);
}

/* ------------------------------------------------------------------ */
/* The helper of test_qcow2_bitmap.py */

static int
helper (int argc, char **argv)
{
  struct error *err = NULL;
  struct node *n;
  const char *cmd = argv[1], *path = argv[2];

  if (strcmp (cmd, "list") == 0) {
    struct qcow2_bitmap_info *l;
    size_t nr;
    n = try_open (path, true, &err);
    if (n == NULL || qcow2_bitmaps_list (n, &l, &nr, &err) == -1) {
      fprintf (stderr, "%s\n", err->msg);
      return 1;
    }
    for (size_t i = 0; i < nr; ++i)
      printf ("%s %" PRIu32 " %d %d\n", l[i].name, l[i].granularity,
              l[i].in_use, l[i].auto_);
    qcow2_bitmaps_free (l, nr);
  }
  else if (strcmp (cmd, "read") == 0 && argc == 4) {
    struct qcow2_bitmap_info *l;
    size_t nr;
    const struct qcow2_bitmap_info *b;
    uint64_t nbits, start = 0;
    uint8_t *bits;
    bool in = false;

    n = try_open (path, true, &err);
    if (n == NULL || qcow2_bitmaps_list (n, &l, &nr, &err) == -1) {
      fprintf (stderr, "%s\n", err->msg);
      return 1;
    }
    b = find (l, nr, argv[3]);
    if (b == NULL) {
      fprintf (stderr, "no bitmap %s\n", argv[3]);
      return 1;
    }
    nbits = (n->size + b->granularity - 1) / b->granularity;
    bits = malloc (nbits / 8 + 1);
    if (qcow2_bitmap_read (n, argv[3], 0, n->size, bits, &err) == -1) {
      fprintf (stderr, "%s\n", err->msg);
      return 1;
    }
    for (uint64_t k = 0; k <= nbits; ++k) {
      bool set = k < nbits && bit (bits, k);
      if (set && !in)
        start = k;
      else if (!set && in) {
        uint64_t end = MIN (k * b->granularity, n->size);
        printf ("%" PRIu64 " %" PRIu64 "\n", start * b->granularity,
                end - start * b->granularity);
      }
      in = set;
    }
    free (bits);
    qcow2_bitmaps_free (l, nr);
  }
  else if (strcmp (cmd, "store") == 0) {
    size_t nr = argc - 3;
    struct qcow2_bitmap_store *st = calloc (nr ?: 1, sizeof *st);
    struct ranges *rs = calloc (nr ?: 1, sizeof *rs);

    for (size_t i = 0; i < nr; ++i) {
      char *spec = argv[3 + i];
      char *name = strtok (spec, ":"), *gran = strtok (NULL, ":");
      char *flags = strtok (NULL, ":"), *ranges = strtok (NULL, ":");
      struct range *r = calloc (64, sizeof *r);
      size_t k = 0;

      assert (name && gran && flags && ranges);
      st[i].name = name;
      st[i].granularity = strtoul (gran, NULL, 0);
      st[i].auto_ = strchr (flags, 'a') != NULL;
      st[i].in_use = strchr (flags, 'u') != NULL;
      if (strcmp (ranges, "-") != 0)
        for (char *t = strtok (ranges, ","); t && k < 64;
             t = strtok (NULL, ","), ++k) {
          char *plus = strchr (t, '+');
          assert (plus);
          r[k].off = strtoull (t, NULL, 0);
          r[k].len = strtoull (plus + 1, NULL, 0);
        }
      rs[i] = (struct ranges) { r, k, st[i].granularity };
      st[i].fill = fill_ranges;
      st[i].opaque = &rs[i];
    }
    n = try_open (path, false, &err);
    if (n == NULL || qcow2_bitmaps_store (n, st, nr, &err) == -1) {
      fprintf (stderr, "%s\n", err->msg);
      return 1;
    }
    for (size_t i = 0; i < nr; ++i)
      free ((void *) rs[i].r);
    free (rs);
    free (st);
  }
  else if (strcmp (cmd, "open-rw") == 0 ||
           strcmp (cmd, "clear-in-use") == 0) {
    n = try_open (path, false, &err);
    if (n == NULL ||
        (strcmp (cmd, "clear-in-use") == 0 &&
         qcow2_bitmaps_set_in_use (n, false, &err) == -1)) {
      fprintf (stderr, "%s\n", err->msg);
      return 1;
    }
  }
  else {
    fprintf (stderr, "usage: see tests/test-qcow2-bitmap.c\n");
    return 2;
  }
  close_img ();
  return 0;
}

int
main (int argc, char **argv)
{
  /* The driver's own rules are tested here, without the graph's layer
   * that loads bitmaps at open and stores them with write intent.
   */
  dirty_bitmaps_autoload = false;
  if (argc >= 3)
    exit (helper (argc, argv));
  if (system ("qemu-img --version >/dev/null 2>&1") != 0 ||
      system ("qemu-io --version >/dev/null 2>&1") != 0) {
    fprintf (stderr, "test-qcow2-bitmap: qemu-img and qemu-io are needed "
             "(scripts/install-deps test installs them)\n");
    exit (EXIT_FAILURE);
  }
  assert (mkdtemp (dir));
  test_read_qemu ();
  test_in_use_roundtrip ();
  test_store ();
  test_store_header ();
  test_hostile ();
  test_overlap ();
  sh ("rm -rf %s", dir);
  exit (EXIT_SUCCESS);
}
