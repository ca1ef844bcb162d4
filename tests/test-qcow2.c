/* Unit tests for the qcow2 driver's pure parts (header validation,
 * compressed descriptors, L2 entry classification) and, when qemu-img
 * and qemu-io are installed, for what only the C API shows: allocation
 * depth through a backing chain and refcount lookup.
 */
#include <config.h>

#include <endian.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#undef NDEBUG
#include <assert.h>

#include "graph.h"
#include "options.h"
#include "qcow2.h"
#include "utils.h"

#define CS 65536
#define FILE_SIZE (4 * CS)

static uint8_t img[2 * CS];

static void
put32 (size_t off, uint32_t v)
{
  v = htobe32 (v);
  memcpy (img + off, &v, 4);
}

static void
put64 (size_t off, uint64_t v)
{
  v = htobe64 (v);
  memcpy (img + off, &v, 8);
}

/* What qemu-img create -f qcow2 x 64M makes, plus room to corrupt. */
static void
good_header (void)
{
  memset (img, 0, sizeof img);
  put32 (0, QCOW2_MAGIC);
  put32 (4, 3);
  put32 (20, 16);               /* cluster_bits */
  put64 (24, 64 << 20);         /* size */
  put32 (36, 1);                /* l1_size */
  put64 (40, 3 * CS);           /* l1_table_offset */
  put64 (48, CS);               /* refcount_table_offset */
  put32 (56, 1);                /* refcount_table_clusters */
  put32 (96, 4);                /* refcount_order */
  put32 (100, 112);             /* header_length */
  /* feature name table with one entry, then the end */
  put32 (112, QCOW2_EXT_FEATURE_TABLE);
  put32 (116, 48);
  img[120] = 0;
  img[121] = 9;
  memcpy (img + 122, "fancy new thing", 15);
}

/* Parse img; expect failure whose message contains @want, or success
 * when @want is NULL.
 */
static void
expect (const char *want, uint64_t file_size)
{
  struct qcow2_info info;
  struct error *err = NULL;
  int r = qcow2_header_parse (img, sizeof img, file_size, &info, &err);

  if (want == NULL) {
    if (r != 0)
      fprintf (stderr, "unexpected error: %s\n", err->msg);
    assert (r == 0);
    qcow2_info_free (&info);
    return;
  }
  if (r == 0) {
    fprintf (stderr, "expected an error containing '%s'\n", want);
    abort ();
  }
  if (strstr (err->msg, want) == NULL) {
    fprintf (stderr, "error '%s' does not contain '%s'\n", err->msg, want);
    abort ();
  }
  error_free (err);
}

static void
test_header (void)
{
  struct qcow2_info info;
  struct error *err = NULL;
  char *names;

  good_header ();
  assert (qcow2_header_parse (img, sizeof img, FILE_SIZE, &info, &err) == 0);
  assert (info.version == 3 && info.cluster_size == CS);
  assert (info.l2_bits == 13 && info.l2_entry_size == 8);
  assert (info.nr_features == 1 && info.nr_exts == 1);
  names = qcow2_feature_names (&info, 0, (UINT64_C (1) << 9) | 32);
  assert (strcmp (names, "bit 5 (unknown), bit 9 (fancy new thing)") == 0);
  free (names);
  qcow2_info_free (&info);

  /* Too short, bad magic, bad version. */
  assert (qcow2_header_parse (img, 40, 40, &info, &err) == -1);
  assert (strstr (err->msg, "too short"));
  error_free (err);
  err = NULL;
  good_header (); put32 (0, 0x12345678); expect ("bad magic", FILE_SIZE);
  good_header (); put32 (4, 4); expect ("version 4", FILE_SIZE);
  good_header (); put32 (20, 8); expect ("cluster size", FILE_SIZE);
  good_header (); put32 (20, 22); expect ("cluster size", FILE_SIZE);
  /* Header length. */
  good_header (); put32 (100, 96); expect ("too short", FILE_SIZE);
  good_header (); put32 (100, 108); expect ("multiple of 8", FILE_SIZE);
  good_header (); put32 (20, 9); put32 (100, 1024);
  expect ("exceeds the cluster size", FILE_SIZE);
  /* L1. */
  good_header (); put64 (24, UINT64_C (1) << 40);
  expect ("too small for the virtual size", FILE_SIZE);
  good_header (); put64 (40, 3 * CS + 512); expect ("not cluster aligned",
                                                    FILE_SIZE);
  good_header (); put64 (40, 100 * CS); expect ("past the end of the file",
                                                FILE_SIZE);
  good_header (); put32 (36, 0x10000000); expect ("too large", FILE_SIZE);
  good_header (); put64 (24, UINT64_C (1) << 63); expect ("too large",
                                                          FILE_SIZE);
  /* Refcounts, snapshots. */
  good_header (); put32 (56, 0); expect ("no refcount table", FILE_SIZE);
  good_header (); put32 (56, 1000); expect ("too large", FILE_SIZE);
  good_header (); put64 (48, 0); expect ("overlap the header", FILE_SIZE);
  good_header (); put32 (96, 7); expect ("refcount order 7", FILE_SIZE);
  good_header (); put32 (60, 100000); expect ("too many snapshots",
                                              FILE_SIZE);
  /* Compression type and its bit. */
  good_header (); img[104] = 1; expect ("bit is not set", FILE_SIZE);
  good_header (); put64 (72, QCOW2_INCOMPAT_COMPRESSION);
  expect ("bit is set", FILE_SIZE);
  good_header (); img[104] = 7; put64 (72, QCOW2_INCOMPAT_COMPRESSION);
  expect ("unknown compression type 7", FILE_SIZE);
  /* Extended L2 needs 16K clusters. */
  good_header (); put32 (20, 12); put64 (24, 1 << 20);
  put64 (40, 3 * 4096); put64 (48, 4096);
  put64 (72, QCOW2_INCOMPAT_EXTL2);
  expect ("at least 16 KiB", FILE_SIZE);
  /* Backing name. */
  good_header (); put64 (8, 0x200); put32 (16, 1024);
  expect ("too long", FILE_SIZE);
  good_header (); put64 (8, CS + 8); put32 (16, 4);
  expect ("invalid backing file offset", FILE_SIZE);
  good_header (); put64 (8, CS - 2); put32 (16, 4);
  expect ("runs past the header cluster", FILE_SIZE);
  good_header (); put64 (8, 0x200); put32 (16, 4);
  memcpy (img + 0x200, "a\0bc", 4);
  expect ("NUL", FILE_SIZE);
  good_header (); put64 (8, 0x200); put32 (16, 6);
  memcpy (img + 0x200, "base.x", 6);
  assert (qcow2_header_parse (img, sizeof img, FILE_SIZE, &info, &err) == 0);
  assert (strcmp (info.backing_file, "base.x") == 0);
  qcow2_info_free (&info);
  /* Extensions. */
  good_header (); put32 (116, CS); expect ("too large", FILE_SIZE);
  good_header (); put32 (116, 47); expect ("multiple of 48", FILE_SIZE);
  good_header (); put32 (112, QCOW2_EXT_BACKING_FORMAT); put32 (116, 100);
  expect ("invalid backing format", FILE_SIZE);
  /* Unknown extensions are kept verbatim. */
  good_header (); put32 (168, 0x12345678); put32 (172, 3);
  memcpy (img + 176, "xyz", 3);
  assert (qcow2_header_parse (img, sizeof img, FILE_SIZE, &info, &err) == 0);
  assert (info.nr_exts == 2 && info.exts[1].type == 0x12345678 &&
          info.exts[1].len == 3 && memcmp (info.exts[1].data, "xyz", 3) == 0);
  qcow2_info_free (&info);
  /* A version 2 header is 72 bytes: the rest is not looked at. */
  good_header (); put32 (4, 2); put32 (96, 9); put32 (100, 3);
  memset (img + 112, 0, 64);
  expect (NULL, FILE_SIZE);
}

static void
test_descriptors (void)
{
  struct qcow2_info info;
  struct error *err = NULL;
  struct qcow2_cdesc d;
  uint64_t x;

  good_header ();
  assert (qcow2_header_parse (img, sizeof img, FILE_SIZE, &info, &err) == 0);
  x = info.csize_shift;
  assert (x == 62 - (16 - 8));
  /* What qemu-img convert -c writes: byte offsets, 0 extra sectors. */
  qcow2_decode_compressed (&info, QCOW2_OFLAG_COMPRESSED | 0x5004f, &d);
  assert (d.offset == 0x5004f && d.size == 512 - 0x4f);
  qcow2_decode_compressed (&info, QCOW2_OFLAG_COMPRESSED |
                           (UINT64_C (3) << x) | 0x50200, &d);
  assert (d.offset == 0x50200 && d.size == 4 * 512);
  /* The largest count: 2^(cluster_bits - 8) sectors, two clusters. */
  qcow2_decode_compressed (&info, UINT64_MAX, &d);
  assert (d.offset == (UINT64_C (1) << x) - 1);
  assert (d.size == 2 * CS - 511);

  /* Standard entries. */
  assert (qcow2_classify (&info, 0, 0, 0) == QCOW2_UNALLOCATED);
  assert (qcow2_classify (&info, 1, 0, 0) == QCOW2_ZERO);
  assert (qcow2_classify (&info, 0x8000000000060001, 0, 0) == QCOW2_ZERO);
  assert (qcow2_classify (&info, 0x8000000000060000, 0, 0) == QCOW2_DATA);
  qcow2_info_free (&info);

  /* Extended L2. */
  good_header ();
  put64 (72, QCOW2_INCOMPAT_EXTL2);
  assert (qcow2_header_parse (img, sizeof img, FILE_SIZE, &info, &err) == 0);
  assert (info.l2_entry_size == 16 && info.subcluster_bits == 11);
  assert (qcow2_classify (&info, 0x60000, 0x0000000100000002, 1)
          == QCOW2_DATA);
  assert (qcow2_classify (&info, 0x60000, 0x0000000100000002, 0)
          == QCOW2_ZERO);
  assert (qcow2_classify (&info, 0x60000, 0x0000000100000002, 2)
          == QCOW2_UNALLOCATED);
  /* alloc and zero for one subcluster; alloc without a cluster. */
  assert (qcow2_classify (&info, 0x60000, 0x0000000100000001, 5) == -1);
  assert (qcow2_classify (&info, 0, 0x4, 0) == -1);
  assert (qcow2_classify (&info, 0, UINT64_C (1) << 40, 8) == QCOW2_ZERO);
  /* The ZERO flag means nothing with extended L2. */
  assert (qcow2_classify (&info, 1, 0, 0) == QCOW2_UNALLOCATED);
  qcow2_info_free (&info);
}

static bool
have_qemu (void)
{
  return system ("qemu-img --version >/dev/null 2>&1") == 0 &&
    system ("qemu-io --version >/dev/null 2>&1") == 0;
}

static void
sh (const char *fs, ...)
{
  char cmd[4096];
  va_list args;

  va_start (args, fs);
  vsnprintf (cmd, sizeof cmd, fs, args);
  va_end (args);
  if (system (cmd) != 0) {
    fprintf (stderr, "command failed: %s\n", cmd);
    abort ();
  }
}

static struct node *
open_image (const char *dir, const char *name, const char *extra)
{
  char spec[4096];
  struct json_object *o;
  struct node *n;
  struct error *err = NULL;

  snprintf (spec, sizeof spec, "driver=qcow2,node-name=%s,file.driver=file,"
            "file.filename=%s/%s.qcow2%s", name, dir, name, extra);
  o = spec_parse (spec, &err);
  assert (o);
  n = node_open_spec (o, &err);
  json_object_put (o);
  if (n == NULL) {
    fprintf (stderr, "open %s: %s\n", name, err->msg);
    abort ();
  }
  return n;
}

static unsigned
depth_at (struct node *n, uint64_t offset, uint64_t *pnum)
{
  unsigned depth = 99;

  assert (node_allocation_depth (n, n->size - offset, offset, pnum,
                                 &depth) == 0);
  return depth;
}

static void
test_with_qemu (void)
{
  char dir[] = "/tmp/test-qcow2.XXXXXX";
  struct node *top;
  struct qcow2_state *s;
  uint64_t pnum, rc;

  assert (mkdtemp (dir));
  /* base: data in [0, 64K); top: data [64K, 128K), zero [128K, 192K);
   * top is 1M, base only 512K.
   */
  sh ("cd %s && qemu-img create -q -f qcow2 -o refcount_bits=1 base.qcow2 "
      "512K && qemu-io -f qcow2 -c 'write -P 0x11 0 64K' base.qcow2 "
      ">/dev/null && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "
      "top.qcow2 1M && qemu-io -f qcow2 -c 'write -P 0x22 64K 64K' "
      "-c 'write -z 128K 64K' top.qcow2 >/dev/null", dir);
  top = open_image (dir, "top", "");
  assert (!top->read_only);            /* qcow2 opens read-write */

  assert (depth_at (top, 0, &pnum) == 2 && pnum == 65536);
  assert (depth_at (top, 65536, &pnum) == 1 && pnum == 131072);
  assert (depth_at (top, 196608, &pnum) == 0 && pnum == 524288 - 196608);
  /* Past the shorter base: allocated there, as qemu-nbd reports. */
  assert (depth_at (top, 524288, &pnum) == 2 && pnum == 524288);

  /* Refcounts of the top image (16 bits): header, data cluster. */
  s = top->opaque;
  assert (qcow2_refcount_get (s, 0, &rc) == 0 && rc == 1);
  assert (qcow2_refcount_get (s, UINT64_C (1) << 40, &rc) == 0 && rc == 0);
  /* And of the base (1 bit), through the backing node. */
  s = top->children[1]->node->opaque;
  assert (s->info.refcount_order == 0);
  assert (qcow2_refcount_get (s, 0, &rc) == 0 && rc == 1);
  assert (qcow2_refcount_get (s, 100 * CS, &rc) == 0 && rc == 0);

  node_close_all ();
  sh ("rm -rf %s", dir);
}

int
main (void)
{
  test_header ();
  test_descriptors ();
  if (have_qemu ())
    test_with_qemu ();
  else
    fprintf (stderr, "test-qcow2: qemu-img/qemu-io missing, skipped the "
             "image tests\n");
  exit (EXIT_SUCCESS);
}
