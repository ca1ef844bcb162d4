/* Unit tests for formats/qcow2-create.c.
 *
 * Without arguments (as 'make check' runs it): option parsing and
 * validation; images created on real 'file' nodes in a temporary
 * directory, read back and checked by an independent walker (every
 * cluster referenced exactly as often as its refcount says); the
 * device path (a node that cannot shrink, full of old data); and crash
 * ordering (every write may fail, and the header must be the last
 * write, after a flush, followed by one).
 *
 * With arguments it is the helper of tests/test_qcow2_create.py, which
 * checks the images against qemu-img and qemu-io:
 *   test-qcow2-create create FILE JSON   create FILE (must exist)
 *   test-qcow2-create check FILE         run the walker on FILE
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#undef NDEBUG
#include <assert.h>

#include "graph.h"
#include "qcow2-create.h"
#include "qcow2-format.h"
#include "utils.h"

#define DIV_ROUND_UP_U64(n, d) (((uint64_t) (n) + (d) - 1) / (d))

static char tmpdir[] = "/tmp/test-qcow2-create.XXXXXX";

static uint32_t
get_be32 (const unsigned char *p)
{
  return (uint32_t) p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3];
}

static uint64_t
get_be64 (const unsigned char *p)
{
  return (uint64_t) get_be32 (p) << 32 | get_be32 (p + 4);
}

/* The walker: an independent reading of the spec, not of the layout
 * code.  Reads the image at @path, counts the references to every host
 * cluster (header, reftable, refblocks, L1, L2, data) and compares them
 * with the refcounts on disk.  Returns the number of problems, printed.
 */
struct image {
  int fd;
  uint64_t file_size;
  uint32_t cs;
  unsigned version, refcount_order;
  uint64_t size;
  uint32_t l1_size;
  uint64_t l1_offset, rt_offset;
  uint32_t rt_clusters;
  uint64_t incompat;
  uint64_t nb_clusters;
  uint32_t *refs;               /* references found, per cluster */
  unsigned problems;
};

static void
problem (struct image *im, const char *fs, ...)
  __attribute__ ((format (printf, 2, 3)));

static void
problem (struct image *im, const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  fprintf (stderr, "walker: ");
  vfprintf (stderr, fs, args);
  fprintf (stderr, "\n");
  va_end (args);
  im->problems++;
}

static void
read_at (struct image *im, void *buf, size_t len, uint64_t offset)
{
  /* Past the end of the file reads as zeroes, as QEMU's reader does. */
  memset (buf, 0, len);
  if (offset < im->file_size) {
    size_t n = MIN ((uint64_t) len, im->file_size - offset);
    assert (full_pread (im->fd, buf, n, offset) == 0);
  }
}

static void
ref (struct image *im, uint64_t offset, const char *what)
{
  if (offset % im->cs) {
    problem (im, "%s at 0x%" PRIx64 " is not cluster aligned", what, offset);
    return;
  }
  if (offset / im->cs >= im->nb_clusters) {
    problem (im, "%s at 0x%" PRIx64 " is past the end of the file", what,
             offset);
    return;
  }
  im->refs[offset / im->cs]++;
}

/* @rb caches the refblock at *rb_cached. */
static uint64_t
refcount (struct image *im, uint64_t cluster, unsigned char *rb,
          uint64_t *rb_cached)
{
  unsigned bits = 1u << im->refcount_order;
  uint64_t per_block = (uint64_t) im->cs * 8 / bits;
  uint64_t idx = cluster / per_block, e = cluster % per_block;
  unsigned char rte[8];
  uint64_t rb_off, v = 0;

  if (idx >= (uint64_t) im->rt_clusters * im->cs / 8)
    return 0;
  read_at (im, rte, 8, im->rt_offset + idx * 8);
  rb_off = get_be64 (rte) & QCOW2_REFT_OFFSET_MASK;
  if (rb_off == 0)
    return 0;
  if (rb_off != *rb_cached) {
    read_at (im, rb, im->cs, rb_off);
    *rb_cached = rb_off;
  }
  if (bits >= 8) {
    for (unsigned i = 0; i < bits / 8; ++i)
      v = v << 8 | rb[e * (bits / 8) + i];
  }
  else
    v = (rb[e * bits / 8] >> (e * bits % 8)) & ((1u << bits) - 1);
  return v;
}

static unsigned
walk (const char *path)
{
  struct image im = { .fd = open (path, O_RDONLY | O_CLOEXEC) };
  unsigned char h[QCOW2_HDR_V3_LENGTH];
  unsigned char *buf, *l1;
  struct stat st;
  uint32_t l2_entries, l2e_size;
  uint64_t rb_cached = 0;

  assert (im.fd >= 0);
  assert (fstat (im.fd, &st) == 0);
  im.file_size = st.st_size;
  read_at (&im, h, sizeof h, 0);
  if (get_be32 (h) != QCOW2_MAGIC) {
    problem (&im, "%s: no qcow2 magic", path);
    goto out_close;
  }
  im.version = get_be32 (h + QCOW2_HDR_VERSION);
  im.cs = UINT32_C (1) << get_be32 (h + QCOW2_HDR_CLUSTER_BITS);
  im.size = get_be64 (h + QCOW2_HDR_SIZE);
  im.l1_size = get_be32 (h + QCOW2_HDR_L1_SIZE);
  im.l1_offset = get_be64 (h + QCOW2_HDR_L1_TABLE_OFFSET);
  im.rt_offset = get_be64 (h + QCOW2_HDR_REFCOUNT_TABLE_OFFSET);
  im.rt_clusters = get_be32 (h + QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS);
  im.refcount_order = 4;
  if (im.version >= 3) {
    im.incompat = get_be64 (h + QCOW2_HDR_INCOMPAT_FEATURES);
    im.refcount_order = get_be32 (h + QCOW2_HDR_REFCOUNT_ORDER);
  }
  l2e_size = (im.incompat & QCOW2_INCOMPAT_EXTL2) ? 16 : 8;
  l2_entries = im.cs / l2e_size;
  im.nb_clusters = DIV_ROUND_UP_U64 (im.file_size, im.cs);
  im.refs = calloc (im.nb_clusters ? im.nb_clusters : 1, sizeof *im.refs);
  buf = malloc (im.cs);
  l1 = malloc (im.l1_size * 8ull + 1);
  assert (im.refs && buf && l1);
  read_at (&im, l1, im.l1_size * 8ull, im.l1_offset);

  if (DIV_ROUND_UP_U64 (im.size, im.cs) > (uint64_t) im.l1_size * l2_entries)
    problem (&im, "L1 table too small for the virtual size");

  ref (&im, 0, "header");
  for (uint32_t i = 0; i < im.rt_clusters; ++i)
    ref (&im, im.rt_offset + (uint64_t) i * im.cs, "refcount table");
  for (uint64_t i = 0; i < (uint64_t) im.rt_clusters * im.cs / 8; ++i) {
    unsigned char e[8];
    read_at (&im, e, 8, im.rt_offset + i * 8);
    if (get_be64 (e) & QCOW2_REFT_RESERVED_MASK)
      problem (&im, "reftable entry %" PRIu64 ": reserved bits", i);
    if (get_be64 (e))
      ref (&im, get_be64 (e) & QCOW2_REFT_OFFSET_MASK, "refcount block");
  }
  for (uint64_t i = 0; i < DIV_ROUND_UP_U64 (im.l1_size * 8ull, im.cs); ++i)
    ref (&im, im.l1_offset + i * im.cs, "L1 table");
  for (uint32_t i = 0; i < im.l1_size; ++i) {
    uint64_t l1e = get_be64 (l1 + (size_t) i * 8), l2_off;

    if (l1e == 0)
      continue;
    if (l1e & QCOW2_L1E_RESERVED_MASK)
      problem (&im, "L1 entry %" PRIu32 ": reserved bits", i);
    if (!(l1e & QCOW2_OFLAG_COPIED))
      problem (&im, "L1 entry %" PRIu32 ": COPIED not set", i);
    l2_off = l1e & QCOW2_L1E_OFFSET_MASK;
    ref (&im, l2_off, "L2 table");
    read_at (&im, buf, im.cs, l2_off);
    for (uint32_t j = 0; j < l2_entries; ++j) {
      uint64_t l2e = get_be64 (buf + (size_t) j * l2e_size);
      uint64_t guest = ((uint64_t) i * l2_entries + j) * im.cs;
      if (l2e == 0)
        continue;
      if (guest >= im.size)
        problem (&im, "L2 entry for guest 0x%" PRIx64 " past the end",
                 guest);
      if (l2e & (QCOW2_L2E_STD_RESERVED_MASK | QCOW2_OFLAG_COMPRESSED))
        problem (&im, "L2 entry for guest 0x%" PRIx64 ": reserved bits",
                 guest);
      if (!(l2e & QCOW2_OFLAG_COPIED))
        problem (&im, "L2 entry for guest 0x%" PRIx64 ": COPIED not set",
                 guest);
      if (l2e & QCOW2_L2E_OFFSET_MASK)
        ref (&im, l2e & QCOW2_L2E_OFFSET_MASK, "data cluster");
    }
  }

  /* Every cluster's refcount equals its references, and nothing past
   * the end of the file is counted.
   */
  for (uint64_t c = 0; c < im.nb_clusters; ++c) {
    uint64_t rc = refcount (&im, c, buf, &rb_cached);
    if (rc != im.refs[c])
      problem (&im, "cluster %" PRIu64 ": refcount %" PRIu64 ", %" PRIu32
               " references", c, rc, im.refs[c]);
    if (im.problems > 20)
      break;
  }
  if (refcount (&im, im.nb_clusters, buf, &rb_cached) != 0)
    problem (&im, "cluster past the end of the file has a refcount");

  free (l1);
  free (buf);
  free (im.refs);
 out_close:
  close (im.fd);
  return im.problems;
}

static void
make_empty (const char *path)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

  assert (fd >= 0);
  close (fd);
}

static struct node *
open_file_node (const char *path)
{
  struct json_object *spec = json_object_new_object ();
  struct error *err = NULL;
  struct node *node;

  json_object_object_add (spec, "driver", json_object_new_string ("file"));
  json_object_object_add (spec, "filename", json_object_new_string (path));
  node = node_new (format_find_driver ("file"), NULL, spec, &err);
  json_object_put (spec);
  if (node == NULL) {
    fprintf (stderr, "%s\n", err->msg);
    exit (EXIT_FAILURE);
  }
  return node;
}

/* Create @path from JSON options; NULL on success or the message. */
static char *
create_from_json (const char *path, const char *json)
{
  struct json_object *o = json_tokener_parse (json);
  struct qcow2_create_opts opts;
  struct error *err = NULL;
  struct node *file;
  char *msg = NULL;

  assert (o != NULL);
  if (qcow2_create_opts_from_json (o, &opts, &err) == 0) {
    file = open_file_node (path);
    qcow2_create (file, &opts, &err);
    node_unref (file);
  }
  if (err) {
    msg = strdup (err->msg);
    error_free (err);
  }
  json_object_put (o);
  return msg;
}

static char *
parse_error (const char *json)
{
  struct json_object *o = json_tokener_parse (json);
  struct qcow2_create_opts opts;
  struct error *err = NULL;
  char *msg = NULL;

  assert (o != NULL);
  if (qcow2_create_opts_from_json (o, &opts, &err) == -1) {
    msg = strdup (err->msg);
    error_free (err);
  }
  json_object_put (o);
  return msg;
}

static void
test_parse (void)
{
  struct json_object *o = json_tokener_parse (
    "{\"driver\": \"qcow2\", \"file\": \"f0\", \"size\": \"1G\","
    " \"cluster-size\": 4096, \"refcount-bits\": 1, \"version\": \"v3\","
    " \"lazy-refcounts\": true, \"extended-l2\": \"off\","
    " \"compression-type\": \"zstd\", \"backing-file\": \"base.img\","
    " \"backing-fmt\": \"raw\", \"preallocation\": \"off\"}");
  struct qcow2_create_opts opts;
  struct error *err = NULL;

  assert (qcow2_create_opts_from_json (o, &opts, &err) == 0);
  assert (opts.size == UINT64_C (1) << 30);
  assert (opts.cluster_size == 4096);
  assert (opts.refcount_bits == 1);
  assert (opts.version == 3);
  assert (opts.lazy_refcounts && !opts.extended_l2);
  assert (strcmp (opts.compression_type, "zstd") == 0);
  assert (strcmp (opts.backing_file, "base.img") == 0);
  assert (strcmp (opts.backing_fmt, "raw") == 0);
  assert (opts.prealloc == QCOW2_PREALLOC_OFF);
  json_object_put (o);

  o = json_tokener_parse ("{\"size\": 65536}");
  assert (qcow2_create_opts_from_json (o, &opts, &err) == 0);
  assert (opts.size == 65536 && opts.cluster_size == 0 &&
          opts.version == 0 && opts.backing_file == NULL &&
          opts.compression_type == NULL);
  json_object_put (o);

  static const struct {
    const char *json, *msg;
  } bad[] = {
    { "{}", "parameter 'size' is missing" },
    { "{\"size\": -1}", "non-negative" },
    { "{\"size\": 1000}", "multiple of 512" },
    { "{\"size\": 512, \"frobnicate\": 1}", "unknown parameter 'frobnicate'" },
    { "{\"size\": 512, \"driver\": \"raw\"}", "is not qcow2" },
    { "{\"size\": 512, \"encrypt\": {}}", "'encrypt' is not supported" },
    { "{\"size\": 512, \"data-file\": \"x\"}", "'data-file' is not supported" },
    { "{\"size\": 512, \"cluster-size\": 0}", "power of two between 512" },
    { "{\"size\": 512, \"cluster-size\": 1000}", "power of two between 512" },
    { "{\"size\": 512, \"cluster-size\": 256}", "power of two between 512" },
    { "{\"size\": 512, \"cluster-size\": \"4M\"}", "cluster size 4194304" },
    { "{\"size\": 512, \"cluster-size\": 8589934592}", "power of two" },
    { "{\"size\": 512, \"refcount-bits\": 3}", "power of two" },
    { "{\"size\": 512, \"refcount-bits\": 128}", "may not exceed 64" },
    { "{\"size\": 512, \"refcount-bits\": 0}", "refcount bits 0" },
    { "{\"size\": 512, \"version\": \"v4\"}", "'version': invalid value 'v4'" },
    { "{\"size\": 512, \"version\": 3}", "'version' must be a string" },
    { "{\"size\": 512, \"version\": \"v2\", \"refcount-bits\": 64}",
      "require compatibility level 1.1" },
    { "{\"size\": 512, \"version\": \"v2\", \"lazy-refcounts\": true}",
      "lazy refcounts are only supported" },
    { "{\"size\": 512, \"version\": \"v2\", \"extended-l2\": true}",
      "extended L2 entries are only supported with compat" },
    { "{\"size\": 512, \"extended-l2\": true, \"cluster-size\": 8192}",
      "at least 16384 bytes" },
    { "{\"size\": 512, \"version\": \"v2\", \"compression-type\": \"zstd\"}",
      "non-zlib compression type" },
    { "{\"size\": 512, \"compression-type\": \"lz4\"}", "invalid value 'lz4'" },
    { "{\"size\": 512, \"preallocation\": \"sparse\"}",
      "'preallocation': invalid value 'sparse'" },
    { "{\"size\": 512, \"backing-fmt\": \"raw\"}",
      "cannot be used without a backing file" },
    { "{\"size\": 512, \"backing-file\": \"b\", \"preallocation\": \"full\"}",
      "preallocation=full can only be used" },
    { "{\"size\": 512, \"backing-file\": \"\"}", "name is empty" },
    { "{\"size\": 512, \"backing-file\": \"b\", \"backing-fmt\": \"no/pe\"}",
      "not a block driver name" },
    { "{\"size\": 512, \"lazy-refcounts\": \"maybe\"}", "must be on or off" },
  };
  for (size_t i = 0; i < ARRAY_SIZE (bad); ++i) {
    char *msg = parse_error (bad[i].json);
    if (msg == NULL || strstr (msg, bad[i].msg) == NULL) {
      fprintf (stderr, "%s: expected error '%s', got '%s'\n",
               bad[i].json, bad[i].msg, msg ? msg : "(none)");
      exit (EXIT_FAILURE);
    }
    free (msg);
  }

  /* A backing name of 1024 bytes is one too many. */
  {
    char name[1025];
    struct qcow2_create_opts bo = { .size = 512, .backing_file = name };
    memset (name, 'a', 1024);
    name[1024] = '\0';
    assert (qcow2_create_check_opts (&bo, &err) == -1);
    assert (strstr (err->msg, "too long"));
    error_free (err);
    err = NULL;
    name[1023] = '\0';
    assert (qcow2_create_check_opts (&bo, NULL) == 0);
  }
}

static char *
tmp_path (const char *name)
{
  char *p;

  assert (asprintf (&p, "%s/%s", tmpdir, name) > 0);
  return p;
}

/* Errors that depend on the layout, found before the file is touched. */
static void
test_layout_errors (void)
{
  static const struct {
    const char *json, *msg;
  } bad[] = {
    /* QEMU's L1 limit: 128 GiB with 512-byte clusters. */
    { "{\"size\": \"128G\", \"cluster-size\": 512, \"preallocation\": \"off\"}",
      NULL },
    { "{\"size\": 137438953984, \"cluster-size\": 512}",
      "too large for file format 'qcow2'" },
    { "{\"size\": \"2E\", \"cluster-size\": \"2M\"}", NULL },
    { "{\"size\": 2305843009213694464, \"cluster-size\": \"2M\"}",
      "try using a larger cluster size" },
    /* Preallocation needing more than an 8 MiB reftable. */
    { "{\"size\": \"128G\", \"cluster-size\": 512, \"refcount-bits\": 64,"
      " \"preallocation\": \"metadata\"}", "refcount table would need" },
    /* The backing name must fit in cluster 0 with the header. */
    { "{\"size\": 512, \"cluster-size\": 512, \"backing-fmt\": \"qcow2\","
      " \"backing-file\": \"" /* 400 bytes */
      "0123456789012345678901234567890123456789012345678901234567890123456789"
      "0123456789012345678901234567890123456789012345678901234567890123456789"
      "0123456789012345678901234567890123456789012345678901234567890123456789"
      "0123456789012345678901234567890123456789012345678901234567890123456789"
      "0123456789012345678901234567890123456789012345678901234567890123456789"
      "01234567890123456789012345678901234567890123456789\"}",
      "do not fit in one 512-byte cluster" },
  };
  char *path = tmp_path ("layout.qcow2");

  for (size_t i = 0; i < ARRAY_SIZE (bad); ++i) {
    char *msg;

    make_empty (path);
    msg = create_from_json (path, bad[i].json);
    if (bad[i].msg == NULL ? msg != NULL
        : msg == NULL || strstr (msg, bad[i].msg) == NULL) {
      fprintf (stderr, "%.100s: expected '%s', got '%s'\n", bad[i].json,
               bad[i].msg ? bad[i].msg : "(success)", msg ? msg : "(none)");
      exit (EXIT_FAILURE);
    }
    if (bad[i].msg) {
      struct stat st;
      /* Failed before touching the file. */
      assert (stat (path, &st) == 0 && st.st_size == 0);
    }
    else
      assert (walk (path) == 0);
    free (msg);
  }
  unlink (path);
  free (path);
}

/* Create, then walk, a matrix of images on real file nodes. */
static void
test_create_files (void)
{
  static const char *const cases[] = {
    "{\"size\": 0}",
    "{\"size\": 512}",
    "{\"size\": \"64M\"}",
    "{\"size\": \"64M\", \"version\": \"v2\"}",
    "{\"size\": \"1G\", \"cluster-size\": 512, \"refcount-bits\": 1}",
    "{\"size\": \"1G\", \"cluster-size\": 512, \"refcount-bits\": 2}",
    "{\"size\": \"1G\", \"cluster-size\": 512, \"refcount-bits\": 4}",
    "{\"size\": \"1G\", \"cluster-size\": 512, \"refcount-bits\": 8}",
    "{\"size\": \"1G\", \"cluster-size\": 512, \"refcount-bits\": 32}",
    "{\"size\": \"1G\", \"cluster-size\": 512, \"refcount-bits\": 64}",
    /* 4 MiB of L1 in 512-byte clusters: many refblocks, reftable > 1. */
    "{\"size\": \"16G\", \"cluster-size\": 512, \"refcount-bits\": 64}",
    "{\"size\": \"8M\", \"cluster-size\": 512, \"refcount-bits\": 64,"
    " \"preallocation\": \"metadata\"}",
    "{\"size\": \"8M\", \"cluster-size\": 512, \"refcount-bits\": 1,"
    " \"preallocation\": \"full\"}",
    "{\"size\": \"3M\", \"cluster-size\": 4096, \"preallocation\": \"falloc\"}",
    "{\"size\": \"100M\", \"cluster-size\": \"2M\", \"extended-l2\": true,"
    " \"preallocation\": \"metadata\"}",
    "{\"size\": \"64M\", \"extended-l2\": true, \"backing-file\": \"b\","
    " \"preallocation\": \"metadata\"}",
    "{\"size\": 1536, \"cluster-size\": 1024, \"preallocation\": \"full\"}",
  };
  char *path = tmp_path ("matrix.qcow2");

  for (size_t i = 0; i < ARRAY_SIZE (cases); ++i) {
    char *msg;

    make_empty (path);
    msg = create_from_json (path, cases[i]);
    if (msg) {
      fprintf (stderr, "%s: %s\n", cases[i], msg);
      exit (EXIT_FAILURE);
    }
    if (walk (path) != 0) {
      fprintf (stderr, "%s: the walker found problems\n", cases[i]);
      exit (EXIT_FAILURE);
    }
  }

  /* Creating over an existing image replaces it entirely. */
  make_empty (path);
  assert (create_from_json (path, "{\"size\": \"64M\", \"preallocation\":"
                            " \"full\", \"cluster-size\": 4096}") == NULL);
  assert (create_from_json (path, "{\"size\": \"1M\"}") == NULL);
  assert (walk (path) == 0);
  {
    struct stat st;
    assert (stat (path, &st) == 0 && st.st_size < (1 << 20));
  }
  unlink (path);
  free (path);
}

/* A memory node that cannot be resized (like a block device), full of
 * old data, which records the order of writes and flushes and can fail
 * the Nth write.
 */
#define MEM_SIZE (8 << 20)

struct mem {
  unsigned char *data;
  unsigned writes;              /* writes so far */
  unsigned fail_at;             /* fail this write (1-based); 0 = never */
  bool dirty;                   /* written since the last flush */
  bool header_written;          /* the magic reached offset 0 */
  bool header_flushed;          /* ... and was flushed after */
};

static struct mem mem;

static int
mem_open (struct node *node, struct json_object *opts, struct error **errp)
{
  node->size = MEM_SIZE;
  node->can_flush = true;
  return 0;
}

static int
mem_pread (struct node *node, void *buf, uint32_t count, uint64_t offset,
           unsigned flags)
{
  memcpy (buf, mem.data + offset, count);
  return 0;
}

static int
mem_pwrite (struct node *node, const void *buf, uint32_t count,
            uint64_t offset, unsigned flags)
{
  if (++mem.writes == mem.fail_at)
    return -EIO;
  /* Nothing may be written once the header is there, and the header
   * only once everything before it is flushed.
   */
  assert (!mem.header_written);
  if (offset == 0 && count >= 4 && get_be32 (buf) == QCOW2_MAGIC) {
    assert (!mem.dirty);
    mem.header_written = true;
  }
  memcpy (mem.data + offset, buf, count);
  mem.dirty = true;
  return 0;
}

static int
mem_flush (struct node *node)
{
  mem.dirty = false;
  if (mem.header_written)
    mem.header_flushed = true;
  return 0;
}

static const struct node_driver mem_driver = {
  .name = "mem",
  .open = mem_open,
  .pread = mem_pread,
  .pwrite = mem_pwrite,
  .flush = mem_flush,
  /* no zero: the core writes zeroes; no truncate: a fixed size */
};

static void
mem_dump (const char *path)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

  assert (fd >= 0);
  assert (full_pwrite (fd, mem.data, MEM_SIZE, 0) == 0);
  close (fd);
}

static void
test_device (void)
{
  struct json_object *spec = json_object_new_object ();
  struct qcow2_create_opts o = {
    .size = 2 << 20, .cluster_size = 4096,
    .prealloc = QCOW2_PREALLOC_METADATA,
  };
  struct error *err = NULL;
  struct node *node = node_new (&mem_driver, "mem0", spec, &err);
  char *path = tmp_path ("device.qcow2");
  unsigned total;

  assert (node != NULL);
  mem.data = malloc (MEM_SIZE);
  assert (mem.data);

  /* Old data everywhere: the tables and the preallocated data area must
   * still come out right.
   */
  memset (mem.data, 0xa5, MEM_SIZE);
  assert (qcow2_create (node, &o, &err) == 0);
  assert (mem.header_written && mem.header_flushed);
  total = mem.writes;
  mem_dump (path);
  assert (walk (path) == 0);
  /* The data area (after header, reftable, refblock, L1, L2) is zero. */
  assert (is_zero (mem.data + 5 * 4096, o.size));

  /* Too big for the device. */
  o.size = MEM_SIZE;
  assert (qcow2_create (node, &o, &err) == -1);
  assert (strstr (err->msg, "cannot grow"));
  error_free (err);
  err = NULL;
  o.size = 2 << 20;

  /* Crash ordering: fail each write in turn.  The failure is reported
   * and no qcow2 header is left behind, even over an old image.
   */
  for (unsigned n = 1; n <= total; ++n) {
    struct qcow2_create_opts ok = { .size = 1 << 20 };

    mem = (struct mem) { .data = mem.data };
    assert (qcow2_create (node, &ok, NULL) == 0);
    assert (get_be32 (mem.data) == QCOW2_MAGIC);
    mem = (struct mem) { .data = mem.data, .fail_at = n };
    assert (qcow2_create (node, &o, &err) == -1);
    assert (strstr (err->msg, "Input/output error"));
    error_free (err);
    err = NULL;
    /* The first write erases the old header: if that fails, nothing
     * changed and the old image is still whole.
     */
    if (n == 1) {
      mem_dump (path);
      assert (walk (path) == 0);
    }
    else
      assert (get_be32 (mem.data) != QCOW2_MAGIC);
  }

  node_unref (node);
  json_object_put (spec);
  free (mem.data);
  unlink (path);
  free (path);
}

static void
cleanup_tmpdir (void)
{
  rmdir (tmpdir);
}

int
main (int argc, char *argv[])
{
  if (argc == 4 && strcmp (argv[1], "create") == 0) {
    char *msg = create_from_json (argv[2], argv[3]);
    if (msg) {
      fprintf (stderr, "%s\n", msg);
      exit (EXIT_FAILURE);
    }
    exit (EXIT_SUCCESS);
  }
  if (argc == 3 && strcmp (argv[1], "check") == 0)
    exit (walk (argv[2]) == 0 ? EXIT_SUCCESS : EXIT_FAILURE);
  if (argc != 1) {
    fprintf (stderr, "usage: %s [create FILE JSON | check FILE]\n", argv[0]);
    exit (EXIT_FAILURE);
  }

  assert (mkdtemp (tmpdir) != NULL);
  atexit (cleanup_tmpdir);
  test_parse ();
  test_layout_errors ();
  test_create_files ();
  test_device ();
  exit (EXIT_SUCCESS);
}
