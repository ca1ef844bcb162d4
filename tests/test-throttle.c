/* Unit tests for the throttle filter: graph/throttle-bucket.c (the
 * leaky bucket arithmetic, with an explicit clock, so exact) and
 * graph/throttle.c (groups, the gate, drain, the control API) on real
 * 'file' nodes in a temporary directory.
 *
 * Timed checks assert lower bounds only: a loaded machine makes
 * everything slower, never faster.  The whole run takes about 4 s.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#undef NDEBUG
#include <assert.h>

#include "graph.h"
#include "throttle-bucket.h"
#include "throttle.h"
#include "utils.h"

#define FILE_SIZE (1 << 20)
#define MS UINT64_C (1000000)
#define SEC UINT64_C (1000000000)

static char tmpdir[] = "/tmp/test-throttle.XXXXXX";

/* A computed wait equals @expected, give or take rounding. */
static void
assert_wait (uint64_t got, uint64_t expected)
{
  uint64_t diff = got > expected ? got - expected : expected - got;

  if (diff > 1000) {
    fprintf (stderr, "wait %" PRIu64 " ns, expected %" PRIu64 " ns\n",
             got, expected);
    abort ();
  }
}

static void
test_bucket_avg (void)
{
  struct tb_limits lim;
  struct tb_state tb;

  /* 10 ops/s; the burst rate is a tenth of it: 1 op of slack. */
  tb_limits_init (&lim);
  lim.avg[TB_IOPS_TOTAL] = 10;
  tb_reset (&tb, &lim, 1000 * SEC);
  assert (tb_wait (&tb, false, 1000 * SEC) == 0);
  tb_account (&tb, false, 4096);
  assert (tb_wait (&tb, false, 1000 * SEC) == 0);   /* level 1 = slack */
  tb_account (&tb, false, 4096);
  /* Level 2: one op over, drained at 10/s. */
  assert_wait (tb_wait (&tb, false, 1000 * SEC), 100 * MS);
  /* The total limit holds writes back just the same. */
  assert_wait (tb_wait (&tb, true, 1000 * SEC), 100 * MS);
  /* Half way: half an op left over. */
  assert_wait (tb_wait (&tb, false, 1000 * SEC + 50 * MS), 50 * MS);
  /* A clock going back leaks nothing and changes nothing. */
  assert_wait (tb_wait (&tb, false, 1000 * SEC), 50 * MS);
  assert (tb_wait (&tb, false, 1000 * SEC + 100 * MS) == 0);
  tb_account (&tb, false, 4096);
  assert_wait (tb_wait (&tb, false, 1000 * SEC + 100 * MS), 100 * MS);
  /* Long idle empties the bucket, it never goes negative. */
  tb_account (&tb, false, 4096);
  assert (tb_wait (&tb, false, 1010 * SEC) == 0);
  tb_account (&tb, false, 4096);
  tb_account (&tb, false, 4096);
  assert_wait (tb_wait (&tb, false, 1010 * SEC), 100 * MS);

  /* Bytes: 1000 B/s, slack 100 B.  A large request goes at once (only
   * the ones after it wait), then the excess drains at the average.
   */
  tb_limits_init (&lim);
  lim.avg[TB_BPS_TOTAL] = 1000;
  tb_reset (&tb, &lim, 0);
  assert (tb_wait (&tb, true, 0) == 0);
  tb_account (&tb, true, 4096);
  assert_wait (tb_wait (&tb, true, 0), 3996 * MS);
  assert_wait (tb_wait (&tb, false, 1 * SEC), 2996 * MS);
}

static void
test_bucket_burst (void)
{
  struct tb_limits lim;
  struct tb_state tb;
  uint64_t now = 0;
  unsigned n, in_first_second = 0;

  /* A burst rate with the default length of 1 s: 20 ops of slack. */
  tb_limits_init (&lim);
  lim.avg[TB_IOPS_TOTAL] = 10;
  lim.max[TB_IOPS_TOTAL] = 20;
  tb_reset (&tb, &lim, 0);
  for (n = 0; tb_wait (&tb, false, 0) == 0; ++n)
    tb_account (&tb, false, 512);
  assert (n == 21);             /* levels 0 .. 20 may start */
  assert_wait (tb_wait (&tb, false, 0), 100 * MS);

  /* 10/s, bursts of 100/s for 2 s: the bucket holds 200 ops, and a
   * second level leaking at 100/s keeps the burst at 100/s.
   */
  lim.max[TB_IOPS_TOTAL] = 100;
  lim.burst_length[TB_IOPS_TOTAL] = 2;
  tb_reset (&tb, &lim, 0);
  for (n = 0; tb_wait (&tb, false, 0) == 0; ++n)
    tb_account (&tb, false, 512);
  assert (n == 11);             /* burst levels 0 .. 10 (max / 10) */
  assert_wait (tb_wait (&tb, false, 0), 10 * MS);

  /* Run the clock: admit each request as soon as it may start. */
  for (n = 11; now < 10 * SEC; ++n) {
    now += tb_wait (&tb, false, now);
    assert (tb_wait (&tb, false, now) == 0);
    tb_account (&tb, false, 512);
    if (now < SEC)
      in_first_second = n + 1;
  }
  /* The first second at the burst rate: 11 at once, then one each
   * 10 ms.  In all, 10 s at the average plus the bucket and the slack:
   * 10 * 10 + 200 + 1.
   */
  assert (in_first_second == 11 + 99);
  assert (n >= 300 && n <= 302);
}

static void
test_bucket_iops_size (void)
{
  struct tb_limits lim;
  struct tb_state tb;

  /* 10 ops/s with 4K ops: a 16K read is 4 ops, a small one 1. */
  tb_limits_init (&lim);
  lim.avg[TB_IOPS_TOTAL] = 10;
  lim.iops_size = 4096;
  tb_reset (&tb, &lim, 0);
  tb_account (&tb, false, 16384);
  assert_wait (tb_wait (&tb, false, 0), 300 * MS);
  tb_reset (&tb, &lim, 0);
  tb_account (&tb, false, 1000);
  tb_account (&tb, false, 4096);
  assert_wait (tb_wait (&tb, false, 0), 100 * MS);
  tb_reset (&tb, &lim, 0);
  tb_account (&tb, false, 6144);        /* 1.5 ops */
  assert_wait (tb_wait (&tb, false, 0), 50 * MS);
}

static void
test_bucket_split (void)
{
  struct tb_limits lim;
  struct tb_state tb;

  /* Reads and writes limited apart do not hold each other back. */
  tb_limits_init (&lim);
  lim.avg[TB_IOPS_READ] = 10;
  lim.avg[TB_IOPS_WRITE] = 5;
  lim.avg[TB_BPS_WRITE] = 1000;
  tb_reset (&tb, &lim, 0);
  tb_account (&tb, false, 1 << 20);
  tb_account (&tb, false, 1 << 20);
  assert_wait (tb_wait (&tb, false, 0), 100 * MS);
  assert (tb_wait (&tb, true, 0) == 0);
  tb_account (&tb, true, 50);
  assert_wait (tb_wait (&tb, true, 0), 100 * MS);     /* (1 - 0.5) / 5 */
  tb_account (&tb, true, 50);
  assert_wait (tb_wait (&tb, true, 0), 300 * MS);     /* (2 - 0.5) / 5 */
  tb_account (&tb, true, 1000);
  /* The longest wait of the buckets wins: bytes (1100 - 100) / 1000. */
  assert_wait (tb_wait (&tb, true, 0), 1000 * MS);
  assert_wait (tb_wait (&tb, false, 0), 100 * MS);
}

static void
expect_check_error (const struct tb_limits *lim, const char *msg)
{
  struct error *err = NULL;

  assert (tb_limits_check (lim, &tb_names_limits, &err) == -1);
  if (strstr (err->msg, msg) == NULL) {
    fprintf (stderr, "error '%s', expected '%s'\n", err->msg, msg);
    abort ();
  }
  error_free (err);
}

static void
test_bucket_check (void)
{
  struct tb_limits lim;

  tb_limits_init (&lim);
  assert (tb_limits_check (&lim, &tb_names_limits, NULL) == 0);
  assert (!tb_limits_enabled (&lim));
  lim.avg[TB_BPS_TOTAL] = 100;
  lim.avg[TB_BPS_WRITE] = 100;
  expect_check_error (&lim, "'bps-total' and 'bps-write' cannot be used");
  tb_limits_init (&lim);
  lim.avg[TB_IOPS_READ] = 100;
  lim.max[TB_IOPS_READ] = 100;
  lim.max[TB_IOPS_TOTAL] = 100;
  expect_check_error (&lim, "'iops-total-max' and 'iops-read-max'");
  tb_limits_init (&lim);
  lim.avg[TB_IOPS_READ] = 100;
  lim.max[TB_IOPS_READ] = 99;
  expect_check_error (&lim, "'iops-read-max' (99) cannot be lower than "
                      "'iops-read' (100)");
  lim.max[TB_IOPS_READ] = 100;
  assert (tb_limits_check (&lim, &tb_names_limits, NULL) == 0);
  lim.max[TB_IOPS_READ] = 0;
  lim.burst_length[TB_IOPS_READ] = 2;
  expect_check_error (&lim, "'iops-read-max-length' requires "
                      "'iops-read-max'");
  tb_limits_init (&lim);
  lim.max[TB_BPS_READ] = 100;
  expect_check_error (&lim, "'bps-read-max' requires 'bps-read'");
  tb_limits_init (&lim);
  lim.avg[TB_BPS_READ] = 100;
  lim.iops_size = 4096;
  expect_check_error (&lim, "'iops-size' requires an iops limit");
  tb_limits_init (&lim);
  lim.avg[TB_BPS_READ] = TB_VALUE_MAX + 1;
  expect_check_error (&lim, "'bps-read' must be within [0, "
                      "1000000000000000]");
  tb_limits_init (&lim);
  lim.avg[TB_BPS_READ] = TB_VALUE_MAX;
  lim.max[TB_BPS_READ] = TB_VALUE_MAX;
  lim.burst_length[TB_BPS_READ] = 0;
  expect_check_error (&lim, "'bps-read-max-length' must be within [1, ");
  lim.burst_length[TB_BPS_READ] = UINT64_C (1) << 32;
  expect_check_error (&lim, "'bps-read-max-length' must be within [1, ");
  lim.burst_length[TB_BPS_READ] = UINT32_MAX;
  assert (tb_limits_check (&lim, &tb_names_limits, NULL) == 0);
  assert (tb_limits_enabled (&lim));
}

/* A file of FILE_SIZE bytes in the temporary directory; caller frees. */
static char *
make_file (const char *name)
{
  char *path;
  int fd;

  assert (asprintf (&path, "%s/%s", tmpdir, name) > 0);
  fd = open (path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  assert (fd >= 0);
  assert (ftruncate (fd, FILE_SIZE) == 0);
  close (fd);
  return path;
}

/* A throttle node over a file node on @path.  @extra is more JSON
 * members for the throttle node ("" for none).  NULL with *errp on
 * failure.
 */
static struct node *
open_throttle (const char *name, const char *path, const char *extra,
               struct error **errp)
{
  char *json;
  struct json_object *spec;
  struct node *node;

  assert (asprintf (&json, "{\"driver\": \"throttle\", "
                    "\"file\": {\"driver\": \"file\", \"filename\": \"%s\"}"
                    "%s%s}", path, *extra ? ", " : "", extra) > 0);
  spec = json_tokener_parse (json);
  assert (spec != NULL);
  node = node_new (&throttle_driver, name, spec, errp);
  json_object_put (spec);
  free (json);
  return node;
}

static struct node *
must_open_throttle (const char *name, const char *path, const char *extra)
{
  struct error *err = NULL;
  struct node *node = open_throttle (name, path, extra, &err);

  if (node == NULL) {
    fprintf (stderr, "%s\n", err->msg);
    abort ();
  }
  return node;
}

static struct node *
file_of (struct node *node)
{
  assert (node->nr_children == 1);
  return node->children[0]->node;
}

static struct json_object *
parse (const char *json)
{
  struct json_object *o = json_tokener_parse (json);

  assert (o != NULL);
  return o;
}

static uint64_t
limit_of (const char *group, const char *key)
{
  struct json_object *l = throttle_group_limits (group), *v;
  uint64_t r;

  assert (l != NULL);
  assert (json_object_object_get_ex (l, key, &v));
  r = json_object_get_int64 (v);
  json_object_put (l);
  return r;
}

struct reader {
  pthread_t thread;
  struct node *node;
  unsigned n;                   /* reads of 4K to do */
  uint64_t offset;
  bool done;                    /* atomic */
  int err;
};

static void *
reader_run (void *arg)
{
  struct reader *r = arg;
  char buf[4096];

  for (unsigned i = 0; i < r->n; ++i) {
    int e = node_pread (r->node, buf, sizeof buf,
                        (r->offset + i * sizeof buf) % FILE_SIZE, 0);
    if (e < 0)
      r->err = e;
  }
  __atomic_store_n (&r->done, true, __ATOMIC_RELEASE);
  return NULL;
}

static void
reader_start (struct reader *r, struct node *node, unsigned n,
              uint64_t offset)
{
  *r = (struct reader) { .node = node, .n = n, .offset = offset };
  assert (pthread_create (&r->thread, NULL, reader_run, r) == 0);
}

/* Wait at most @limit ns for @r to finish: true if it did. */
static bool
reader_done_within (struct reader *r, uint64_t limit)
{
  uint64_t end = monotonic_ns () + limit;

  while (!__atomic_load_n (&r->done, __ATOMIC_ACQUIRE)) {
    if (monotonic_ns () > end)
      return false;
    usleep (1000);
  }
  return true;
}

/* @nthreads threads doing @per_thread 4K reads each on @nodes[i %
 * nr_nodes].  Returns the time taken in ns.
 */
static uint64_t
run_readers (struct node **nodes, size_t nr_nodes, unsigned nthreads,
             unsigned per_thread)
{
  struct reader r[8];
  uint64_t start = monotonic_ns ();

  assert (nthreads <= 8);
  for (unsigned i = 0; i < nthreads; ++i)
    reader_start (&r[i], nodes[i % nr_nodes], per_thread,
                  (uint64_t) i * per_thread * 4096);
  for (unsigned i = 0; i < nthreads; ++i) {
    assert (pthread_join (r[i].thread, NULL) == 0);
    assert (r[i].err == 0);
  }
  return monotonic_ns () - start;
}

static void
test_rate (void)
{
  char *path = make_file ("rate");
  struct node *node;
  uint64_t t;

  /* 100 reads at 50/s: 6 in the slack, then one each 20 ms, 1.9 s. */
  node = must_open_throttle ("t0", path,
                             "\"limits\": {\"iops-total\": 50}");
  t = run_readers (&node, 1, 4, 25);
  fprintf (stderr, "100 reads at 50 iops: %.2f s\n", t / 1e9);
  assert (t >= 1500 * MS);
  node_unref (node);
  assert (!throttle_group_exists ("t0"));

  /* No limits: straight through (no time asserted). */
  node = must_open_throttle ("t0", path, "");
  t = run_readers (&node, 1, 4, 25);
  fprintf (stderr, "100 reads without limits: %.3f s\n", t / 1e9);
  node_unref (node);
  unlink (path);
  free (path);
}

static void
test_shared_group (void)
{
  char *pa = make_file ("a"), *pb = make_file ("b");
  struct node *n[2];
  struct error *err = NULL;
  uint64_t t;

  n[0] = must_open_throttle ("a", pa, "\"throttle-group\": \"g\", "
                             "\"limits\": {\"iops-total\": 100}");
  /* Joining with other limits is refused; with none, or the same, not. */
  assert (open_throttle ("b", pb, "\"throttle-group\": \"g\", "
                         "\"limits\": {\"iops-total\": 99}", &err) == NULL);
  assert (strstr (err->msg, "throttle group 'g': the group exists with "
                  "other limits"));
  error_free (err);
  n[1] = must_open_throttle ("b", pb, "\"throttle-group\": \"g\"");
  assert (strcmp (throttle_node_group (n[0]), "g") == 0);
  assert (strcmp (throttle_node_group (n[1]), "g") == 0);

  /* Each node alone would take 0.45 s for its 50; sharing 100/s they
   * take 0.95 s together.
   */
  t = run_readers (n, 2, 2, 50);
  fprintf (stderr, "2 x 50 reads sharing 100 iops: %.2f s\n", t / 1e9);
  assert (t >= 800 * MS);

  node_unref (n[0]);
  assert (throttle_group_exists ("g"));
  node_unref (n[1]);
  assert (!throttle_group_exists ("g"));
  unlink (pa);
  unlink (pb);
  free (pa);
  free (pb);
}

static void
expect_set_error (const char *group, const char *args, const char *msg)
{
  struct json_object *o = parse (args);
  struct error *err = NULL;

  assert (throttle_group_set (group, o, &err) == -1);
  if (strstr (err->msg, msg) == NULL) {
    fprintf (stderr, "error '%s', expected '%s'\n", err->msg, msg);
    abort ();
  }
  error_free (err);
  json_object_put (o);
}

static void
test_control (void)
{
  char *path = make_file ("control");
  struct node *node, *file;
  struct json_object *o, *l;
  struct error *err = NULL;

  /* Without throttle-group, a private group named after the node. */
  node = must_open_throttle ("t1", path,
                             "\"limits\": {\"iops-total\": 50, "
                             "\"bps-read\": \"1048576\"}");
  assert (strcmp (throttle_node_group (node), "t1") == 0);
  file = file_of (node);
  assert (throttle_node_group (file) == NULL);
  assert (limit_of ("t1", "iops-total") == 50);
  assert (limit_of ("t1", "bps-read") == 1048576);
  assert (limit_of ("t1", "iops-total-max-length") == 1);

  /* Errors leave the old limits. */
  expect_set_error ("t1", "{\"iops\": 10, \"iops_rd\": 5}",
                    "block-set-io-throttle: throttle group 't1': 'iops' "
                    "and 'iops_rd' cannot be used at the same time");
  expect_set_error ("t1", "{\"iops\": 100, \"iops_max\": 50}",
                    "'iops_max' (50) cannot be lower than 'iops' (100)");
  expect_set_error ("t1", "{\"bps\": 100, \"bps_max_length\": 5}",
                    "'bps_max_length' requires 'bps_max'");
  expect_set_error ("t1", "{\"bps\": -1}", "'bps' must be a non-negative");
  expect_set_error ("t1", "{\"bps\": 10000000000000000}",
                    "'bps' must be within [0, 1000000000000000]");
  expect_set_error ("t1", "{\"bps\": \"x\"}", "'bps': cannot parse");
  expect_set_error ("nosuch", "{\"iops\": 10}",
                    "throttle group 'nosuch': no such group");
  assert (limit_of ("t1", "iops-total") == 50);
  assert (limit_of ("t1", "bps-read") == 1048576);

  /* The command replaces everything; the caller's keys are ignored. */
  o = parse ("{\"device\": \"x\", \"group\": \"t1\", \"iops_wr\": 7, "
             "\"iops_wr_max\": 70, \"iops_wr_max_length\": 3, "
             "\"iops_size\": 8192}");
  assert (throttle_group_set ("t1", o, NULL) == 0);
  json_object_put (o);
  assert (limit_of ("t1", "iops-total") == 0);
  assert (limit_of ("t1", "bps-read") == 0);
  assert (limit_of ("t1", "iops-write") == 7);
  assert (limit_of ("t1", "iops-write-max") == 70);
  assert (limit_of ("t1", "iops-write-max-length") == 3);
  assert (limit_of ("t1", "iops-size") == 8192);

  /* ThrottleLimits: merged into the group's, unknown names refused. */
  o = parse ("{\"iops-write\": 8}");
  assert (throttle_group_set_limits ("t1", o, NULL) == 0);
  json_object_put (o);
  assert (limit_of ("t1", "iops-write") == 8);
  assert (limit_of ("t1", "iops-write-max") == 70);
  o = parse ("{\"iops\": 8}");
  assert (throttle_group_set_limits ("t1", o, &err) == -1);
  assert (strstr (err->msg, "throttle group 't1': unknown limit 'iops'"));
  error_free (err);
  err = NULL;
  json_object_put (o);
  o = parse ("{\"iops-write-max\": 1}");
  assert (throttle_group_set_limits ("t1", o, &err) == -1);
  assert (strstr (err->msg, "'iops-write-max' (1) cannot be lower"));
  error_free (err);
  err = NULL;
  json_object_put (o);
  assert (limit_of ("t1", "iops-write-max") == 70);

  /* Creating a group ahead of its node, from its own limits, as at a
   * restart: the node then joins it with the same limits.
   */
  l = throttle_group_limits ("t1");
  assert (throttle_group_limits ("t2") == NULL);
  assert (throttle_group_set_limits ("t2", l, NULL) == 0);
  json_object_put (l);
  assert (throttle_group_exists ("t2"));
  assert (limit_of ("t2", "iops-write-max-length") == 3);
  node_unref (node);
  assert (!throttle_group_exists ("t1"));
  node = must_open_throttle ("t2", path,
                             "\"limits\": {\"iops-write\": 8, "
                             "\"iops-write-max\": 70, "
                             "\"iops-write-max-length\": 3, "
                             "\"iops-size\": 8192}");
  node_unref (node);
  assert (!throttle_group_exists ("t2"));

  /* Bad node options. */
  assert (open_throttle ("t3", path, "\"limits\": {\"iops\": 1}",
                         &err) == NULL);
  assert (strstr (err->msg, "unknown limit 'iops'"));
  error_free (err);
  err = NULL;
  assert (open_throttle ("t3", path, "\"limits\": {\"bps-total\": 1, "
                         "\"bps-read\": 1}", &err) == NULL);
  assert (strstr (err->msg, "cannot be used at the same time"));
  error_free (err);
  err = NULL;
  assert (open_throttle ("t3", path, "\"limits\": 5", &err) == NULL);
  assert (strstr (err->msg, "must be an object"));
  error_free (err);
  err = NULL;
  assert (open_throttle ("t3", path, "\"speed\": 5", &err) == NULL);
  assert (strstr (err->msg, "unknown parameter 'speed'"));
  error_free (err);
  err = NULL;
  assert (!throttle_group_exists ("t3"));

  unlink (path);
  free (path);
}

static void
test_data (void)
{
  char *path = make_file ("data");
  struct node *node, *file;
  unsigned char *buf = malloc (FILE_SIZE), *back = malloc (FILE_SIZE);
  struct error *err = NULL;

  assert (buf && back);
  node = must_open_throttle ("t4", path, "\"limits\": {\"bps-total\": "
                             "1000000000}");
  file = file_of (node);
  assert (node->size == FILE_SIZE);
  assert (!node->read_only);
  assert (node->can_flush == file->can_flush);
  assert (node->can_zero == file->can_zero);
  assert (node->can_trim == file->can_trim);
  assert (node->has_block_status == file->has_block_status);

  for (size_t i = 0; i < FILE_SIZE; ++i)
    buf[i] = (i * 7 + i / 4096) & 0xff;
  assert (node_pwrite (node, buf, FILE_SIZE, 0, NODE_FUA) == 0);
  assert (node_pread (file, back, FILE_SIZE, 0, 0) == 0);
  assert (memcmp (buf, back, FILE_SIZE) == 0);
  /* Unaligned and odd sizes pass untouched too. */
  assert (node_pwrite (node, "hello", 5, 4093, 0) == 0);
  memcpy (buf + 4093, "hello", 5);
  assert (node_zero (node, 65536 + 3, 131072 - 1, 0) == 0);
  memset (buf + 131071, 0, 65539);
  assert (node_flush (node) == 0);
  assert (node_pread (file, back, FILE_SIZE, 0, 0) == 0);
  assert (memcmp (buf, back, FILE_SIZE) == 0);
  memset (back, 0, FILE_SIZE);
  assert (node_pread (node, back + 1, FILE_SIZE - 2, 1, 0) == 0);
  assert (memcmp (buf + 1, back + 1, FILE_SIZE - 2) == 0);
  assert (node_discard (node, 65536, 65536, 0) == 0);
  node_unref (node);

  /* read-only as for raw. */
  node = open_throttle ("t5", path, "\"read-only\": true", &err);
  assert (node != NULL);
  assert (node->read_only && file_of (node)->read_only);
  assert (node_pwrite (node, buf, 512, 0, 0) == -EROFS);
  node_unref (node);

  unlink (path);
  free (path);
  free (buf);
  free (back);
}

/* A reader stuck behind a limit of 1 op/s, with 100 ops counted ahead
 * of it (iops-size: one 51200-byte read is 100 ops of 512): it would
 * wait 100 s.  Returns with the reader started and seen waiting.
 */
static void
start_stuck_reader (struct node *node, struct reader *r)
{
  char *big = malloc (51200);

  assert (big);
  assert (node_pread (node, big, 51200, 0, 0) == 0);   /* goes at once */
  free (big);
  reader_start (r, node, 1, 0);
  assert (!reader_done_within (r, 200 * MS));
}

static void
test_drain (void)
{
  char *path = make_file ("drain");
  struct node *node;
  struct reader r;
  char buf[4096];
  struct json_object *o;

  node = must_open_throttle ("t6", path, "\"limits\": {\"iops-total\": 1, "
                             "\"iops-size\": 512}");
  /* A read that must not block is refused while the gate is shut. */
  start_stuck_reader (node, &r);
  assert (node_pread_nowait (node, buf, 512, 0) == -EAGAIN);
  assert (node_read_splice (node, -1, 65536, 4096, 0) == -ENOTSUP);

  /* drain_begin lets it go, and anything arriving during the drain. */
  node->drv->drain_begin (node);
  assert (reader_done_within (&r, 5 * SEC));
  assert (pthread_join (r.thread, NULL) == 0 && r.err == 0);
  reader_start (&r, node, 4, 0);
  assert (reader_done_within (&r, 5 * SEC));
  assert (pthread_join (r.thread, NULL) == 0 && r.err == 0);

  /* drain_end shuts the gate again: what was admitted meanwhile still
   * counted.
   */
  node->drv->drain_end (node);
  assert (node_pread_nowait (node, buf, 512, 0) == -EAGAIN);

  /* Setting limits empties the buckets; new limits apply to a waiting
   * request at once.
   */
  o = parse ("{\"iops\": 1, \"iops_size\": 512}");
  assert (throttle_group_set ("t6", o, NULL) == 0);
  json_object_put (o);
  start_stuck_reader (node, &r);
  o = parse ("{\"iops\": 1000}");
  assert (throttle_group_set ("t6", o, NULL) == 0);
  json_object_put (o);
  assert (reader_done_within (&r, 5 * SEC));
  assert (pthread_join (r.thread, NULL) == 0 && r.err == 0);

  /* A drain left open when the node goes does not outlive it. */
  node->drv->drain_begin (node);
  node_unref (node);
  assert (!throttle_group_exists ("t6"));

  unlink (path);
  free (path);
}

static void
cleanup_tmpdir (void)
{
  rmdir (tmpdir);
}

static const struct {
  const char *name;
  void (*fn) (void);
} tests[] = {
  { "bucket-avg", test_bucket_avg },
  { "bucket-burst", test_bucket_burst },
  { "bucket-iops-size", test_bucket_iops_size },
  { "bucket-split", test_bucket_split },
  { "bucket-check", test_bucket_check },
  { "control", test_control },
  { "data", test_data },
  { "drain", test_drain },
  { "shared-group", test_shared_group },
  { "rate", test_rate },
};

/* With an argument, run only the tests whose name it is. */
int
main (int argc, char *argv[])
{
  assert (mkdtemp (tmpdir) != NULL);
  atexit (cleanup_tmpdir);
  for (size_t i = 0; i < ARRAY_SIZE (tests); ++i)
    if (argc < 2 || strcmp (argv[1], tests[i].name) == 0)
      tests[i].fn ();
  exit (EXIT_SUCCESS);
}
