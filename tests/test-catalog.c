/* Unit tests for catalog/catalog.c: the SQLite catalogue. */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#undef NDEBUG
#include <assert.h>

#include "catalog.h"
#include "cleanup.h"

/* ---- helpers ------------------------------------------------------ */

static char *
make_dir (void)
{
  const char *tmp = getenv ("TMPDIR");
  char *dir;

  if (asprintf (&dir, "%s/test-catalog.XXXXXX", tmp && *tmp ? tmp : "/tmp")
      == -1)
    abort ();
  if (mkdtemp (dir) == NULL) {
    perror ("mkdtemp");
    abort ();
  }
  return dir;
}

static int
rm_one (const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
  return remove (path);
}

static void
remove_dir (char *dir)
{
  if (nftw (dir, rm_one, 16, FTW_DEPTH | FTW_PHYS) == -1) {
    perror (dir);
    abort ();
  }
  free (dir);
}

static char *
path_in (const char *dir, const char *name)
{
  char *p;

  if (asprintf (&p, "%s/%s", dir, name) == -1)
    abort ();
  return p;
}

static struct catalog *
open_ok (const char *dir)
{
  struct error *err = NULL;
  struct catalog *cat = catalog_open (dir, &err);

  if (cat == NULL) {
    fprintf (stderr, "catalog_open '%s': unexpected error: %s\n",
             dir, err->msg);
    abort ();
  }
  assert (err == NULL);
  return cat;
}

/* catalog_open must fail with a message containing @needle. */
static void
open_fails (const char *dir, const char *needle)
{
  struct error *err = NULL;
  struct catalog *cat = catalog_open (dir, &err);

  if (cat != NULL) {
    fprintf (stderr, "catalog_open '%s': succeeded, expected '%s'\n",
             dir, needle);
    abort ();
  }
  assert (err != NULL);
  assert (strchr (err->msg, '\n') == NULL);      /* one line for the log */
  if (strstr (err->msg, needle) == NULL) {
    fprintf (stderr, "catalog_open '%s': message '%s' lacks '%s'\n",
             dir, err->msg, needle);
    abort ();
  }
  error_free (err);
}

/* Abort with the message if @r is -1.  Takes &err: the arguments of
 * ok (f (&err), &err, ...) are evaluated in no fixed order.
 */
static void
ok (int r, struct error **errp, const char *what)
{
  if (r == -1) {
    fprintf (stderr, "%s: unexpected error: %s\n", what,
             *errp ? (*errp)->msg : "(no message)");
    abort ();
  }
  assert (r == 0 && *errp == NULL);
}

/* Is the state dir lock free (no open catalogue holds it)? */
static bool
lock_is_free (const char *dir)
{
  CLEANUP_FREE char *p = path_in (dir, "nbdd.lock");
  struct flock fl = {
    .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0,
  };
  int fd = open (p, O_RDWR | O_CLOEXEC);

  if (fd == -1) {
    assert (errno == ENOENT);
    return true;
  }
  assert (fcntl (fd, F_OFD_GETLK, &fl) == 0);
  close (fd);
  return fl.l_type == F_UNLCK;
}

/* What a foreach saw, in order. */
struct seen {
  size_t n, cap;
  char **keys;
  char **vals;
  size_t stop_after;            /* return -1 after this many; 0: never */
};

static int
collect (const char *key, const char *json, void *opaque)
{
  struct seen *s = opaque;

  if (s->n == s->cap) {
    s->cap = s->cap ? s->cap * 2 : 16;
    s->keys = realloc (s->keys, s->cap * sizeof *s->keys);
    s->vals = realloc (s->vals, s->cap * sizeof *s->vals);
    assert (s->keys && s->vals);
  }
  s->keys[s->n] = strdup (key);
  s->vals[s->n] = strdup (json);
  assert (s->keys[s->n] && s->vals[s->n]);
  s->n++;
  return s->stop_after && s->n == s->stop_after ? -1 : 0;
}

static void
seen_free (struct seen *s)
{
  for (size_t i = 0; i < s->n; ++i) {
    free (s->keys[i]);
    free (s->vals[i]);
  }
  free (s->keys);
  free (s->vals);
  memset (s, 0, sizeof *s);
}

typedef int (*foreach_fn) (struct catalog *, catalog_foreach_fn, void *,
                           struct error **);

/* The foreach must give exactly the NULL-terminated key, value pairs
 * in @kv, in that order.
 */
static void
expect (struct catalog *cat, foreach_fn fe, const char *what, ...)
{
  struct seen s = { 0 };
  struct error *err = NULL;
  va_list args;
  size_t i = 0;
  const char *k;

  ok (fe (cat, collect, &s, &err), &err, what);
  va_start (args, what);
  while ((k = va_arg (args, const char *)) != NULL) {
    const char *v = va_arg (args, const char *);
    if (i >= s.n || strcmp (s.keys[i], k) != 0 || strcmp (s.vals[i], v) != 0) {
      fprintf (stderr, "%s: row %zu: got '%s' = '%s', expected '%s' = '%s'\n",
               what, i, i < s.n ? s.keys[i] : "(none)",
               i < s.n ? s.vals[i] : "", k, v);
      abort ();
    }
    i++;
  }
  va_end (args);
  if (i != s.n) {
    fprintf (stderr, "%s: %zu rows, expected %zu\n", what, s.n, i);
    abort ();
  }
  seen_free (&s);
}

/* Open @dir/catalog.db with SQLite directly, as another program. */
static sqlite3 *
other_program (const char *dir)
{
  CLEANUP_FREE char *p = path_in (dir, "catalog.db");
  sqlite3 *db = NULL;

  assert (sqlite3_open (p, &db) == SQLITE_OK);
  return db;
}

static void
other_exec (sqlite3 *db, const char *sql)
{
  char *msg = NULL;

  if (sqlite3_exec (db, sql, NULL, NULL, &msg) != SQLITE_OK) {
    fprintf (stderr, "sqlite3_exec '%s': %s\n", sql, msg);
    abort ();
  }
}

/* The first column of the first row of @sql, as an integer. */
static int64_t
other_int (sqlite3 *db, const char *sql)
{
  sqlite3_stmt *st = NULL;
  int64_t v;

  assert (sqlite3_prepare_v2 (db, sql, -1, &st, NULL) == SQLITE_OK);
  assert (sqlite3_step (st) == SQLITE_ROW);
  v = sqlite3_column_int64 (st, 0);
  sqlite3_finalize (st);
  return v;
}

static double
now_s (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- tests -------------------------------------------------------- */

/* A new catalogue persists nodes, exports and groups, in order. */
static void
test_create_reopen (void)
{
  char *dir = make_dir ();
  CLEANUP_FREE char *db = path_in (dir, "catalog.db");
  CLEANUP_FREE char *lock = path_in (dir, "nbdd.lock");
  struct catalog *cat;
  struct error *err = NULL;
  struct stat st;

  cat = open_ok (dir);
  assert (strcmp (catalog_path (cat), db) == 0);
  assert (stat (db, &st) == 0 && (st.st_mode & 0777) == 0600);
  assert (stat (lock, &st) == 0 && (st.st_mode & 0777) == 0600);
  assert (!lock_is_free (dir));

  ok (catalog_node_put (cat, "zeta", "{\"driver\":\"file\"}", &err), &err,
      "node put");
  ok (catalog_node_put (cat, "alpha", "{\"driver\":\"raw\"}", &err), &err,
      "node put");
  ok (catalog_node_put (cat, "mid", "{}", &err), &err, "node put");
  ok (catalog_export_put (cat, "e1", "{\"id\":\"e1\"}", &err), &err,
      "export put");
  ok (catalog_export_put (cat, "e0", "{\"id\":\"e0\"}", &err), &err,
      "export put");
  ok (catalog_throttle_group_put (cat, "g1", "{\"bps\":1}", &err), &err,
      "group put");
  ok (catalog_throttle_group_put (cat, "g0", "{\"iops\":2}", &err), &err,
      "group put");
  catalog_close (cat);
  assert (lock_is_free (dir));

  cat = open_ok (dir);
  /* Creation order, not name order. */
  expect (cat, catalog_node_foreach, "nodes after reopen",
          "zeta", "{\"driver\":\"file\"}", "alpha", "{\"driver\":\"raw\"}",
          "mid", "{}", NULL);
  expect (cat, catalog_export_foreach, "exports after reopen",
          "e1", "{\"id\":\"e1\"}", "e0", "{\"id\":\"e0\"}", NULL);
  expect (cat, catalog_throttle_group_foreach, "groups after reopen",
          "g1", "{\"bps\":1}", "g0", "{\"iops\":2}", NULL);
  catalog_close (cat);

  /* The file is a version-1 catalogue in WAL mode. */
  {
    sqlite3 *o = other_program (dir);
    assert (other_int (o, "PRAGMA user_version") == CATALOG_SCHEMA_VERSION);
    assert (other_int (o, "SELECT count(*) FROM sqlite_master WHERE name IN "
                       "('nodes', 'exports', 'throttle_groups', 'bitmaps', "
                       "'bitmap_lineage', 'fleece_sessions', 'audit')") == 7);
    sqlite3_close (o);
  }
  remove_dir (dir);
}

/* Put replaces the value and keeps the place; del removes; a name
 * put again after a del goes to the end.
 */
static void
test_put_del (void)
{
  char *dir = make_dir ();
  struct catalog *cat = open_ok (dir);
  struct error *err = NULL;

  ok (catalog_node_put (cat, "a", "1", &err), &err, "put a");
  ok (catalog_node_put (cat, "b", "2", &err), &err, "put b");
  ok (catalog_node_put (cat, "c", "3", &err), &err, "put c");
  ok (catalog_node_put (cat, "a", "1'", &err), &err, "put a again");
  expect (cat, catalog_node_foreach, "replace keeps order",
          "a", "1'", "b", "2", "c", "3", NULL);

  ok (catalog_node_del (cat, "b", &err), &err, "del b");
  ok (catalog_node_del (cat, "nosuch", &err), &err, "del absent");
  expect (cat, catalog_node_foreach, "after del", "a", "1'", "c", "3", NULL);
  ok (catalog_node_put (cat, "b", "2'", &err), &err, "put b again");
  expect (cat, catalog_node_foreach, "re-added goes last",
          "a", "1'", "c", "3", "b", "2'", NULL);

  /* The same for the other two tables: each is its own namespace. */
  ok (catalog_export_put (cat, "a", "x", &err), &err, "export put");
  ok (catalog_export_put (cat, "b", "y", &err), &err, "export put");
  ok (catalog_export_put (cat, "a", "x'", &err), &err, "export put again");
  ok (catalog_export_del (cat, "b", &err), &err, "export del");
  expect (cat, catalog_export_foreach, "exports", "a", "x'", NULL);
  ok (catalog_throttle_group_put (cat, "g", "{}", &err), &err, "group put");
  ok (catalog_throttle_group_put (cat, "h", "{}", &err), &err, "group put");
  ok (catalog_throttle_group_put (cat, "g", "{\"bps\":9}", &err), &err,
      "group put again");
  expect (cat, catalog_throttle_group_foreach, "groups",
          "g", "{\"bps\":9}", "h", "{}", NULL);
  ok (catalog_throttle_group_del (cat, "g", &err), &err, "group del");
  expect (cat, catalog_throttle_group_foreach, "groups after del",
          "h", "{}", NULL);
  expect (cat, catalog_node_foreach, "nodes untouched",
          "a", "1'", "c", "3", "b", "2'", NULL);

  catalog_close (cat);
  cat = open_ok (dir);
  expect (cat, catalog_node_foreach, "after reopen",
          "a", "1'", "c", "3", "b", "2'", NULL);
  catalog_close (cat);
  remove_dir (dir);
}

/* A foreach stopped by its callback returns -1, leaves errp alone,
 * and the next foreach starts from the top.
 */
static void
test_foreach_stop (void)
{
  char *dir = make_dir ();
  struct catalog *cat = open_ok (dir);
  struct error *err = NULL;
  struct seen s = { .stop_after = 2 };

  ok (catalog_node_put (cat, "a", "1", &err), &err, "put");
  ok (catalog_node_put (cat, "b", "2", &err), &err, "put");
  ok (catalog_node_put (cat, "c", "3", &err), &err, "put");
  assert (catalog_node_foreach (cat, collect, &s, &err) == -1);
  assert (err == NULL);
  assert (s.n == 2);
  seen_free (&s);
  expect (cat, catalog_node_foreach, "after a stop",
          "a", "1", "b", "2", "c", "3", NULL);
  catalog_close (cat);
  remove_dir (dir);
}

static void
test_transactions (void)
{
  char *dir = make_dir ();
  struct catalog *cat = open_ok (dir);
  struct error *err = NULL;

  /* Rollback discards every change since begin. */
  ok (catalog_node_put (cat, "kept", "1", &err), &err, "put");
  ok (catalog_begin (cat, &err), &err, "begin");
  ok (catalog_node_put (cat, "gone", "2", &err), &err, "put");
  ok (catalog_node_put (cat, "kept", "changed", &err), &err, "put");
  ok (catalog_export_put (cat, "e", "3", &err), &err, "put");
  expect (cat, catalog_node_foreach, "inside the transaction",
          "kept", "changed", "gone", "2", NULL);
  catalog_rollback (cat);
  expect (cat, catalog_node_foreach, "after rollback", "kept", "1", NULL);
  expect (cat, catalog_export_foreach, "exports after rollback", NULL);
  catalog_rollback (cat);       /* none open: a no-op */

  /* Nested begin and a lone commit are errors. */
  ok (catalog_begin (cat, &err), &err, "begin");
  assert (catalog_begin (cat, &err) == -1);
  assert (strstr (err->msg, "already open"));
  error_free (err);
  err = NULL;
  ok (catalog_node_del (cat, "kept", &err), &err, "del");
  ok (catalog_node_put (cat, "new", "4", &err), &err, "put");
  ok (catalog_commit (cat, &err), &err, "commit");
  assert (catalog_commit (cat, &err) == -1);
  assert (strstr (err->msg, "no transaction"));
  error_free (err);
  err = NULL;

  /* A transaction open at close is rolled back. */
  ok (catalog_begin (cat, &err), &err, "begin");
  ok (catalog_node_put (cat, "uncommitted", "5", &err), &err, "put");
  catalog_close (cat);

  cat = open_ok (dir);
  expect (cat, catalog_node_foreach, "committed, seen by a reopen",
          "new", "4", NULL);
  catalog_close (cat);
  remove_dir (dir);
}

/* A second daemon on the same state dir is refused, naming the pid. */
static void
test_in_use (void)
{
  char *dir = make_dir ();
  struct catalog *cat = open_ok (dir);
  CLEANUP_FREE char *msg = NULL;

  if (asprintf (&msg, "state dir '%s' is in use by another nbdd (pid %ld)",
                dir, (long) getpid ()) == -1)
    abort ();
  open_fails (dir, msg);
  open_fails (dir, msg);
  /* The refused open did not take or drop the first one's lock. */
  assert (!lock_is_free (dir));
  catalog_close (cat);
  assert (lock_is_free (dir));
  cat = open_ok (dir);
  catalog_close (cat);
  remove_dir (dir);
}

/* A file that is not a database, and a database with a damaged page. */
static void
test_corrupt (void)
{
  char *dir = make_dir ();
  CLEANUP_FREE char *db = path_in (dir, "catalog.db");
  char garbage[8192];
  struct catalog *cat;
  struct error *err = NULL;
  int fd;

  for (size_t i = 0; i < sizeof garbage; ++i)
    garbage[i] = "not a database\n"[i % 15];
  fd = open (db, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  assert (fd >= 0);
  assert (write (fd, garbage, sizeof garbage) == sizeof garbage);
  close (fd);
  open_fails (dir, "catalogue '");
  open_fails (dir, "' is corrupt: ");
  open_fails (dir, "; move it away to start afresh");
  assert (lock_is_free (dir));
  assert (unlink (db) == 0);

  /* A sound catalogue, then scribble over one of its table pages. */
  cat = open_ok (dir);
  ok (catalog_begin (cat, &err), &err, "begin");
  for (int i = 0; i < 2000; ++i) {
    char name[32];
    snprintf (name, sizeof name, "node%d", i);
    ok (catalog_node_put (cat, name, "{\"driver\":\"null-co\"}", &err), &err,
        "put");
  }
  ok (catalog_commit (cat, &err), &err, "commit");
  catalog_close (cat);
  {
    struct stat st;
    assert (stat (db, &st) == 0 && st.st_size > 16 * 4096);
    fd = open (db, O_WRONLY | O_CLOEXEC);
    assert (fd >= 0);
    /* Past the header page and the schema, into the nodes' b-tree. */
    assert (pwrite (fd, garbage, 4096, 12 * 4096) == 4096);
    close (fd);
  }
  open_fails (dir, "' is corrupt: ");
  assert (lock_is_free (dir));
  remove_dir (dir);
}

/* A catalogue from a newer nbdd is refused and left untouched. */
static void
test_newer (void)
{
  char *dir = make_dir ();
  CLEANUP_FREE char *msg = NULL;
  sqlite3 *o;

  o = other_program (dir);
  other_exec (o, "CREATE TABLE future (x); PRAGMA user_version = 999");
  sqlite3_close (o);

  if (asprintf (&msg, "catalogue '%s/catalog.db' has schema version 999, "
                "newer than this nbdd's %d: upgrade nbdd",
                dir, CATALOG_SCHEMA_VERSION) == -1)
    abort ();
  open_fails (dir, msg);
  assert (lock_is_free (dir));

  /* Not switched to WAL, no tables of ours added. */
  o = other_program (dir);
  assert (other_int (o, "SELECT count(*) FROM sqlite_master") == 1);
  assert (other_int (o, "PRAGMA user_version") == 999);
  {
    sqlite3_stmt *st = NULL;
    assert (sqlite3_prepare_v2 (o, "PRAGMA journal_mode", -1, &st, NULL)
            == SQLITE_OK);
    assert (sqlite3_step (st) == SQLITE_ROW);
    assert (strcmp ((const char *) sqlite3_column_text (st, 0), "wal") != 0);
    sqlite3_finalize (st);
  }
  sqlite3_close (o);
  remove_dir (dir);
}

/* Another program holding the write lock: the open fails with
 * "locked", releases the state dir, and works once the lock is gone.
 */
static void
test_locked (void)
{
  char *dir = make_dir ();
  struct catalog *cat;
  struct error *err = NULL;
  sqlite3 *o;

  /* A fresh file in rollback-journal mode: EXCLUSIVE keeps out readers. */
  o = other_program (dir);
  other_exec (o, "CREATE TABLE t (x)");
  other_exec (o, "BEGIN EXCLUSIVE; INSERT INTO t VALUES (1)");
  open_fails (dir, "is locked by another program");
  assert (lock_is_free (dir));
  other_exec (o, "ROLLBACK");
  sqlite3_close (o);
  cat = open_ok (dir);
  catalog_close (cat);

  /* Our catalogue, in WAL mode: readers get in, the writer does not. */
  o = other_program (dir);
  other_exec (o, "BEGIN EXCLUSIVE; INSERT INTO audit (time_us, command) "
              "VALUES (0, 'other')");
  open_fails (dir, "is locked by another program");
  assert (lock_is_free (dir));
  other_exec (o, "ROLLBACK");
  cat = open_ok (dir);

  /* Locked while open: the admin command's begin fails, quickly. */
  other_exec (o, "BEGIN EXCLUSIVE");
  assert (catalog_begin (cat, &err) == -1);
  assert (strstr (err->msg, "is locked by another program"));
  error_free (err);
  err = NULL;
  other_exec (o, "ROLLBACK");
  ok (catalog_begin (cat, &err), &err, "begin once unlocked");
  ok (catalog_node_put (cat, "n", "{}", &err), &err, "put");
  ok (catalog_commit (cat, &err), &err, "commit");
  sqlite3_close (o);
  catalog_close (cat);
  remove_dir (dir);
}

static void
test_audit (void)
{
  char *dir = make_dir ();
  struct catalog *cat = open_ok (dir);
  struct error *err = NULL;
  sqlite3 *o;

  assert (catalog_audit_count (cat, &err) == 0);
  ok (catalog_audit (cat, 1000001, 0, 42, "qmp_capabilities", NULL, NULL,
                     &err), &err, "audit");
  ok (catalog_audit (cat, 1000002, 1000, 43, "blockdev-add",
                     "{\"driver\":\"file\",\"node-name\":\"f\"}", NULL, &err),
      &err, "audit");
  ok (catalog_audit (cat, 1000003, 1000, 43, "blockdev-del",
                     "{\"node-name\":\"x\"}", "node 'x' not found", &err),
      &err, "audit");
  assert (catalog_audit_count (cat, &err) == 3);

  /* Inside a transaction the row goes with it. */
  ok (catalog_begin (cat, &err), &err, "begin");
  ok (catalog_audit (cat, 1000004, 0, 1, "quit", NULL, NULL, &err), &err,
      "audit");
  catalog_rollback (cat);
  assert (catalog_audit_count (cat, &err) == 3);
  catalog_close (cat);

  cat = open_ok (dir);
  assert (catalog_audit_count (cat, &err) == 3);
  catalog_close (cat);

  o = other_program (dir);
  assert (other_int (o, "SELECT count(*) FROM audit WHERE id = 3 AND "
                     "time_us = 1000003 AND uid = 1000 AND pid = 43 AND "
                     "command = 'blockdev-del' AND "
                     "arguments = '{\"node-name\":\"x\"}' AND "
                     "result = 'node ''x'' not found'") == 1);
  assert (other_int (o, "SELECT count(*) FROM audit WHERE "
                     "arguments IS NULL AND result IS NULL") == 1);
  assert (other_int (o, "SELECT count(*) FROM audit WHERE "
                     "result IS NULL") == 2);
  sqlite3_close (o);
  remove_dir (dir);
}

/* 10,000 exports and 20,000 nodes, each table in one transaction. */
static void
test_scale (void)
{
  enum { NR_EXPORTS = 10000, NR_NODES = 20000 };
  char *dir = make_dir ();
  struct catalog *cat = open_ok (dir);
  struct error *err = NULL;
  struct seen s = { 0 };
  char key[32], spec[96];
  double t0, t_insert, t_read;

  t0 = now_s ();
  ok (catalog_begin (cat, &err), &err, "begin");
  for (int i = 0; i < NR_EXPORTS; ++i) {
    /* Keys out of name order, so order by name would show. */
    snprintf (key, sizeof key, "e%05d", NR_EXPORTS - i);
    snprintf (spec, sizeof spec, "{\"type\":\"nbd\",\"id\":\"%s\","
              "\"node-name\":\"n%d\"}", key, i);
    ok (catalog_export_put (cat, key, spec, &err), &err, "export put");
  }
  ok (catalog_commit (cat, &err), &err, "commit");
  ok (catalog_begin (cat, &err), &err, "begin");
  for (int i = 0; i < NR_NODES; ++i) {
    snprintf (key, sizeof key, "n%d", i);
    ok (catalog_node_put (cat, key, "{\"driver\":\"null-co\"}", &err), &err,
        "node put");
  }
  ok (catalog_commit (cat, &err), &err, "commit");
  t_insert = now_s () - t0;
  catalog_close (cat);

  cat = open_ok (dir);
  t0 = now_s ();
  ok (catalog_export_foreach (cat, collect, &s, &err), &err, "export foreach");
  assert (s.n == NR_EXPORTS);
  for (int i = 0; i < NR_EXPORTS; ++i) {
    snprintf (key, sizeof key, "e%05d", NR_EXPORTS - i);
    assert (strcmp (s.keys[i], key) == 0);
    assert (strstr (s.vals[i], key) != NULL);
  }
  seen_free (&s);
  ok (catalog_node_foreach (cat, collect, &s, &err), &err, "node foreach");
  t_read = now_s () - t0;
  assert (s.n == NR_NODES);
  for (int i = 0; i < NR_NODES; i += 997) {
    snprintf (key, sizeof key, "n%d", i);
    assert (strcmp (s.keys[i], key) == 0);
  }
  seen_free (&s);
  catalog_close (cat);
  /* Times for the log only: the checks are counts and order. */
  printf ("test-catalog: scale: %d rows inserted in %.3f s, read in %.3f s\n",
          NR_EXPORTS + NR_NODES, t_insert, t_read);
  remove_dir (dir);
}

static void
test_no_state_dir (void)
{
  char *dir = make_dir ();
  CLEANUP_FREE char *missing = path_in (dir, "missing");

  open_fails (missing, "state dir '");
  remove_dir (dir);
}

int
main (void)
{
  test_create_reopen ();
  test_put_del ();
  test_foreach_stop ();
  test_transactions ();
  test_in_use ();
  test_corrupt ();
  test_newer ();
  test_locked ();
  test_audit ();
  test_scale ();
  test_no_state_dir ();
  printf ("test-catalog: ok\n");
  return EXIT_SUCCESS;
}
