/* The SQLite catalogue: STATE_DIR/catalog.db.
 *
 * What the daemon must remember across restarts (node specs, throttle
 * groups, exports, bitmap lineage, fleece sessions) and the audit log
 * of admin commands.  Each admin command is one transaction, taken
 * with BEGIN IMMEDIATE so the write lock is ours before the graph
 * changes; the admin path commits only once the graph change worked.
 *
 * Durability: WAL with synchronous=FULL, so a commit that returned is
 * on disk.  Other programs may read the file at any time (sqlite3
 * catalog.db .dump); one that writes makes us fail with "locked"
 * rather than wait, because the admin path must not stall.
 *
 * Schema: PRAGMA user_version is the version; migrations[i] takes the
 * file from version i to i + 1 and sets user_version itself, all in
 * one transaction.  Version 2 is one more entry.  Never edit a
 * migration that has shipped.
 *
 * Order: nodes, exports and throttle groups have an INTEGER PRIMARY
 * KEY 'seq' (the rowid), which a put's upsert keeps and VACUUM does
 * not renumber, so walking by seq is creation order.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sqlite3.h>

#include "catalog.h"
#include "cleanup.h"
#include "utils.h"

/* Long enough to ride out a reader's checkpoint, short enough that
 * the admin path never stalls on another program.
 */
#define CAT_BUSY_TIMEOUT_MS 50

#define CAT_DB_NAME   "catalog.db"
#define CAT_LOCK_NAME "nbdd.lock"

/* Seconds since the epoch, as a column default. */
#define NOW "(CAST (strftime ('%s', 'now') AS INTEGER))"

static const char *const migrations[] = {
  /* 0 -> 1 */
  "CREATE TABLE nodes (\n"
  "  seq     INTEGER PRIMARY KEY,   -- creation order\n"
  "  name    TEXT NOT NULL UNIQUE,  -- node-name\n"
  "  spec    TEXT NOT NULL,         -- blockdev JSON\n"
  "  created INTEGER NOT NULL DEFAULT " NOW "\n"
  ");\n"
  "CREATE TABLE exports (\n"
  "  seq     INTEGER PRIMARY KEY,\n"
  "  id      TEXT NOT NULL UNIQUE,\n"
  "  spec    TEXT NOT NULL,         -- block-export-add arguments\n"
  "  created INTEGER NOT NULL DEFAULT " NOW "\n"
  ");\n"
  "CREATE TABLE throttle_groups (\n"
  "  seq     INTEGER PRIMARY KEY,\n"
  "  name    TEXT NOT NULL UNIQUE,\n"
  "  limits  TEXT NOT NULL,         -- QEMU's throttle limits, JSON\n"
  "  created INTEGER NOT NULL DEFAULT " NOW "\n"
  ");\n"
  /* The bitmaps as they are now; how they got there is the lineage. */
  "CREATE TABLE bitmaps (\n"
  "  node        TEXT NOT NULL,\n"
  "  name        TEXT NOT NULL,\n"
  "  granularity INTEGER NOT NULL\n"
  "    CHECK (granularity >= 512 AND (granularity & (granularity - 1)) = 0),\n"
  "  persistent  INTEGER NOT NULL CHECK (persistent IN (0, 1)),\n"
  "  enabled     INTEGER NOT NULL CHECK (enabled IN (0, 1)),\n"
  "  created     INTEGER NOT NULL DEFAULT " NOW ",\n"
  "  PRIMARY KEY (node, name)\n"
  ");\n"
  /* Append-only history, one row per event, kept after the bitmap is
   * removed.  event is one of (QEMU's names for the fleece steps):
   *   add, remove, clear, enable, disable
   *   merge     parent_bitmap's bits were OR'ed into bitmap
   *   fork      bitmap froze (its bits are exported by session) and
   *             an anonymous successor records new writes
   *   abdicate  session succeeded: the frozen bits were dropped and
   *             the successor took the name
   *   reclaim   session failed: the unconsumed frozen bits were
   *             merged into the successor, which took the name
   * No CHECK on event, so that a new event is not a table rebuild.
   */
  "CREATE TABLE bitmap_lineage (\n"
  "  id            INTEGER PRIMARY KEY,  -- event order\n"
  "  node          TEXT NOT NULL,\n"
  "  bitmap        TEXT NOT NULL,\n"
  "  parent_bitmap TEXT,                 -- merge source\n"
  "  event         TEXT NOT NULL,\n"
  "  session       TEXT,                 -- fleece id of fork etc.\n"
  "  time          INTEGER NOT NULL DEFAULT " NOW "\n"
  ");\n"
  "CREATE INDEX bitmap_lineage_by_bitmap\n"
  "  ON bitmap_lineage (node, bitmap, id);\n"
  /* A session still here at start-up was cut short: end it as failure. */
  "CREATE TABLE fleece_sessions (\n"
  "  id      TEXT NOT NULL PRIMARY KEY,\n"
  "  node    TEXT NOT NULL,\n"
  "  state   TEXT NOT NULL,         -- starting, running, stopping\n"
  "  scratch TEXT,                  -- scratch overlay in the state dir\n"
  "  started INTEGER NOT NULL DEFAULT " NOW "\n"
  ");\n"
  "CREATE TABLE audit (\n"
  "  id        INTEGER PRIMARY KEY,\n"
  "  time_us   INTEGER NOT NULL,    -- microseconds since the epoch\n"
  "  uid       INTEGER,\n"
  "  pid       INTEGER,\n"
  "  command   TEXT NOT NULL,\n"
  "  arguments TEXT,                -- JSON\n"
  "  result    TEXT                 -- NULL: success, else the error\n"
  ");\n"
  "PRAGMA user_version = 1;\n",
  /* 1 -> 2: block jobs that run, to pick up again after a restart. */
  "CREATE TABLE jobs (\n"
  "  seq     INTEGER PRIMARY KEY,\n"
  "  id      TEXT NOT NULL UNIQUE,\n"
  "  spec    TEXT NOT NULL,         -- {execute, arguments} that made it\n"
  "  created INTEGER NOT NULL DEFAULT " NOW "\n"
  ");\n"
  "PRAGMA user_version = 2;\n",
};

_Static_assert (ARRAY_SIZE (migrations) == CATALOG_SCHEMA_VERSION,
                "one migration per schema version");

/* The statements kept prepared for the life of the catalogue. */
enum cat_stmt {
  ST_BEGIN, ST_COMMIT, ST_ROLLBACK,
  ST_NODE_PUT, ST_NODE_DEL, ST_NODE_LIST,
  ST_EXPORT_PUT, ST_EXPORT_DEL, ST_EXPORT_LIST,
  ST_GROUP_PUT, ST_GROUP_DEL, ST_GROUP_LIST,
  ST_AUDIT, ST_AUDIT_COUNT, ST_LINEAGE_ADD, ST_LINEAGE_LIST,
  ST_BITMAP_PUT, ST_BITMAP_DEL, ST_BITMAP_LIST,
  ST_FLEECE_PUT, ST_FLEECE_DEL, ST_FLEECE_LIST, ST_FLEECE_RECLAIM,
  ST_JOB_PUT, ST_JOB_DEL, ST_JOB_LIST,
  NR_STMTS
};

/* Upserts keep seq (see the top of the file): INSERT OR REPLACE would
 * delete the row and give the node a new place.
 */
static const char *const stmt_sql[NR_STMTS] = {
  [ST_BEGIN]       = "BEGIN IMMEDIATE",
  [ST_COMMIT]      = "COMMIT",
  [ST_ROLLBACK]    = "ROLLBACK",
  [ST_NODE_PUT]    = "INSERT INTO nodes (name, spec) VALUES (?1, ?2) "
                     "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
  [ST_NODE_DEL]    = "DELETE FROM nodes WHERE name = ?1",
  [ST_NODE_LIST]   = "SELECT name, spec FROM nodes ORDER BY seq",
  [ST_EXPORT_PUT]  = "INSERT INTO exports (id, spec) VALUES (?1, ?2) "
                     "ON CONFLICT (id) DO UPDATE SET spec = excluded.spec",
  [ST_EXPORT_DEL]  = "DELETE FROM exports WHERE id = ?1",
  [ST_EXPORT_LIST] = "SELECT id, spec FROM exports ORDER BY seq",
  [ST_GROUP_PUT]   = "INSERT INTO throttle_groups (name, limits) "
                     "VALUES (?1, ?2) "
                     "ON CONFLICT (name) DO UPDATE "
                     "SET limits = excluded.limits",
  [ST_GROUP_DEL]   = "DELETE FROM throttle_groups WHERE name = ?1",
  [ST_GROUP_LIST]  = "SELECT name, limits FROM throttle_groups ORDER BY seq",
  [ST_AUDIT]       = "INSERT INTO audit "
                     "(time_us, uid, pid, command, arguments, result) "
                     "VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
  [ST_AUDIT_COUNT] = "SELECT count(*) FROM audit",
  [ST_LINEAGE_ADD] = "INSERT INTO bitmap_lineage "
                     "(node, bitmap, parent_bitmap, event, session) "
                     "VALUES (?1, ?2, ?3, ?4, ?5)",
  [ST_BITMAP_PUT] = "INSERT INTO bitmaps "
                    "(node, name, granularity, persistent, enabled) "
                    "VALUES (?1, ?2, ?3, 1, ?4) "
                    "ON CONFLICT (node, name) DO UPDATE SET "
                    "granularity = excluded.granularity, "
                    "enabled = excluded.enabled",
  [ST_BITMAP_DEL] = "DELETE FROM bitmaps WHERE node = ?1 AND name = ?2",
  [ST_BITMAP_LIST] = "SELECT node, name, granularity, enabled FROM bitmaps "
                     "WHERE persistent = 1 ORDER BY node, name",
  [ST_FLEECE_PUT] = "INSERT INTO fleece_sessions (id, node, state, scratch) "
                    "VALUES (?1, ?2, ?3, ?4) "
                    "ON CONFLICT (id) DO UPDATE SET state = excluded.state",
  [ST_FLEECE_DEL] = "DELETE FROM fleece_sessions WHERE id = ?1",
  [ST_JOB_PUT]    = "INSERT INTO jobs (id, spec) VALUES (?1, ?2) "
                    "ON CONFLICT (id) DO UPDATE SET spec = excluded.spec",
  [ST_JOB_DEL]    = "DELETE FROM jobs WHERE id = ?1",
  [ST_JOB_LIST]   = "SELECT id, spec FROM jobs ORDER BY seq",
  [ST_FLEECE_LIST] = "SELECT id, node, state, scratch, started "
                     "FROM fleece_sessions ORDER BY started, id",
  /* The forks of a session that did not end, each ended as a failure
   * (ids are reused: forks of an earlier session of the name ended).
   */
  [ST_FLEECE_RECLAIM] = "INSERT INTO bitmap_lineage "
                        "(node, bitmap, event, session) "
                        "SELECT f.node, f.bitmap, 'unfork-failure', "
                        "f.session FROM bitmap_lineage f "
                        "WHERE f.session = ?1 AND f.event = 'fork' "
                        "AND NOT EXISTS (SELECT 1 FROM bitmap_lineage u "
                        "WHERE u.session = f.session AND u.node = f.node "
                        "AND u.bitmap = f.bitmap AND u.id > f.id "
                        "AND u.event IN ('unfork-success', "
                        "'unfork-failure'))",
  /* ?1/?2 NULL: every node/bitmap. */
  [ST_LINEAGE_LIST] = "SELECT id, node, bitmap, parent_bitmap, event, "
                      "session, time FROM bitmap_lineage "
                      "WHERE (?1 IS NULL OR node = ?1) "
                      "AND (?2 IS NULL OR bitmap = ?2) ORDER BY id",
};

/* The three keyed tables share put, del and foreach. */
struct cat_table {
  const char *what;             /* for messages */
  enum cat_stmt put, del, list;
};

static const struct cat_table nodes_table = {
  "node", ST_NODE_PUT, ST_NODE_DEL, ST_NODE_LIST,
};
static const struct cat_table exports_table = {
  "export", ST_EXPORT_PUT, ST_EXPORT_DEL, ST_EXPORT_LIST,
};
static const struct cat_table groups_table = {
  "throttle group", ST_GROUP_PUT, ST_GROUP_DEL, ST_GROUP_LIST,
};
static const struct cat_table jobs_table = {
  "job", ST_JOB_PUT, ST_JOB_DEL, ST_JOB_LIST,
};

struct catalog {
  sqlite3 *db;
  char *path;                   /* STATE_DIR/catalog.db */
  char *state_dir;
  int lock_fd;                  /* holds the OFD lock on nbdd.lock */
  bool in_txn;                  /* between catalog_begin and commit/rollback */
  bool in_foreach;              /* fn must not call us back */
  sqlite3_stmt *st[NR_STMTS];   /* all prepared once lock and schema are ok */
};

static inline void
cleanup_finalize (sqlite3_stmt **st)
{
  sqlite3_finalize (*st);       /* NULL is a no-op */
}
#define CLEANUP_FINALIZE __attribute__ ((cleanup (cleanup_finalize)))

/* Set *errp for SQLite result code @rc met while doing @fs.  Corrupt
 * and locked files get messages of their own: the operator's remedy
 * differs.  Call before resetting the statement, which may change
 * sqlite3_errmsg.
 */
static void cat_error (const struct catalog *cat, int rc, struct error **errp,
                       const char *fs, ...)
  __attribute__ ((format (printf, 4, 5)));

static void
cat_error (const struct catalog *cat, int rc, struct error **errp,
           const char *fs, ...)
{
  va_list args;
  CLEANUP_FREE char *op = NULL;
  const char *msg = cat->db ? sqlite3_errmsg (cat->db) : sqlite3_errstr (rc);

  va_start (args, fs);
  if (vasprintf (&op, fs, args) == -1)
    op = NULL;
  va_end (args);

  switch (rc & 0xff) {
  case SQLITE_CORRUPT:
  case SQLITE_NOTADB:
    error_setg (errp, "catalogue '%s' is corrupt: %s: %s; move it away "
                "to start afresh", cat->path, op ? op : "", msg);
    break;
  case SQLITE_BUSY:
  case SQLITE_LOCKED:
    error_setg (errp, "catalogue '%s' is locked by another program (%s)",
                cat->path, op ? op : "");
    break;
  default:
    error_setg (errp, "catalogue '%s': %s: %s", cat->path, op ? op : "",
                msg);
  }
}

/* Run a statement that returns no rows: SQLITE_OK or the error. */
static int
cat_step_done (sqlite3_stmt *st)
{
  int r = sqlite3_step (st);

  return r == SQLITE_DONE ? SQLITE_OK : r;
}

/* Ready a cached statement for its next use. */
static void
cat_reset (sqlite3_stmt *st)
{
  sqlite3_reset (st);
  sqlite3_clear_bindings (st);  /* drop the borrowed strings */
}

/* Run constant SQL (pragmas, migrations) with no parameters. */
static int
cat_exec (struct catalog *cat, const char *sql)
{
  return sqlite3_exec (cat->db, sql, NULL, NULL, NULL);
}

/* Prepare a one-off statement and step it to its first row.  Returns
 * SQLITE_ROW, SQLITE_DONE, or the error.
 */
static int
cat_query (struct catalog *cat, const char *sql, sqlite3_stmt **stp)
{
  int r = sqlite3_prepare_v2 (cat->db, sql, -1, stp, NULL);

  if (r != SQLITE_OK)
    return r;
  return sqlite3_step (*stp);
}

/* PRAGMA user_version into *version: SQLITE_OK or the error. */
static int
cat_user_version (struct catalog *cat, int64_t *version)
{
  CLEANUP_FINALIZE sqlite3_stmt *st = NULL;
  int r = cat_query (cat, "PRAGMA user_version", &st);

  if (r != SQLITE_ROW)
    return r;
  *version = sqlite3_column_int64 (st, 0);
  return SQLITE_OK;
}

/* ---- the state dir lock ------------------------------------------- */

/* The pid written by the holder of @fd's lock, or -1 if unreadable
 * (it may be between taking the lock and writing its pid).
 */
static long
cat_lock_owner (int fd)
{
  char buf[32];
  ssize_t n = pread (fd, buf, sizeof buf - 1, 0);
  char *end;
  long pid;

  if (n <= 0)
    return -1;
  buf[n] = '\0';
  errno = 0;
  pid = strtol (buf, &end, 10);
  if (errno || end == buf || pid <= 0)
    return -1;
  return pid;
}

/* An OFD lock (not flock, not a classic POSIX lock): it belongs to
 * this open file description, so a second catalog_open in the same
 * process is refused too, and it goes away with a crash.
 */
static int
cat_write_pid (int fd, const char *state_dir, struct error **errp)
{
  char pid[32];
  int len = snprintf (pid, sizeof pid, "%ld\n", (long) getpid ());

  if (ftruncate (fd, 0) == -1 ||
      (errno = -full_pwrite (fd, pid, len, 0)) != 0) {
    error_setg_errno (errp, errno, "state dir '%s': cannot write its lock "
                      "file", state_dir);
    return -1;
  }
  return 0;
}

int
catalog_lock (const char *state_dir, struct error **errp)
{
  CLEANUP_FREE char *lock_path = NULL;
  CLEANUP_CLOSE int fd = -1;
  struct flock fl = {
    .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0,
  };
  struct catalog dummy = { .state_dir = (char *) state_dir };
  struct catalog *cat = &dummy;

  if (asprintf (&lock_path, "%s/" CAT_LOCK_NAME, cat->state_dir) == -1) {
    error_setg_errno (errp, errno, "state dir '%s'", cat->state_dir);
    return -1;
  }
  fd = open (lock_path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd == -1) {
    error_setg_errno (errp, errno, "state dir '%s': cannot open '%s'",
                      cat->state_dir, lock_path);
    return -1;
  }
  if (fcntl (fd, F_OFD_SETLK, &fl) == -1) {
    if (errno == EAGAIN || errno == EACCES) {
      long owner = cat_lock_owner (fd);
      if (owner > 0)
        error_setg (errp, "state dir '%s' is in use by another nbdd "
                    "(pid %ld)", cat->state_dir, owner);
      else
        error_setg (errp, "state dir '%s' is in use by another nbdd",
                    cat->state_dir);
    }
    else
      error_setg_errno (errp, errno, "state dir '%s': cannot lock '%s'",
                        cat->state_dir, lock_path);
    return -1;
  }
  if (cat_write_pid (fd, state_dir, errp) == -1)
    return -1;
  return steal_fd (&fd);
}

static void
cat_unlock_state_dir (struct catalog *cat)
{
  if (cat->lock_fd == -1)
    return;
  /* Still ours until the close: clear the stale pid. */
  if (ftruncate (cat->lock_fd, 0) == -1) {
    /* harmless: the lock, not the pid, is what counts */
  }
  close (cat->lock_fd);
  cat->lock_fd = -1;
}

/* ---- opening ------------------------------------------------------ */

/* SQLite creates a new database 0644 minus umask, and its -wal and
 * -shm files take the database's mode.  Create it 0600 first; an
 * empty file is a valid empty database.  (Closing our fd would drop
 * this process's POSIX locks on the file, but SQLite has not opened
 * it yet.)
 */
static int
cat_create_file (struct catalog *cat, struct error **errp)
{
  int fd = open (cat->path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC |
                 O_NOFOLLOW, 0600);

  if (fd == -1) {
    if (errno == EEXIST)
      return 0;
    error_setg_errno (errp, errno, "catalogue '%s': cannot create",
                      cat->path);
    return -1;
  }
  close (fd);
  return 0;
}

/* Read-only checks, before anything writes to a file that may not be
 * ours to change: is it a sound database, of a schema we know?
 */
static int
cat_check (struct catalog *cat, struct error **errp)
{
  CLEANUP_FINALIZE sqlite3_stmt *st = NULL;
  const char *answer;
  int r;
  int64_t version;

  /* quick_check reads every page but skips index contents: linear
   * time, fine at open.  It answers rows of text: one "ok", or the
   * problems found.
   */
  r = cat_query (cat, "PRAGMA quick_check", &st);
  if (r != SQLITE_ROW) {
    cat_error (cat, r, errp, "integrity check");
    return -1;
  }
  answer = (const char *) sqlite3_column_text (st, 0);
  if (answer == NULL) {
    cat_error (cat, sqlite3_errcode (cat->db), errp, "integrity check");
    return -1;
  }
  if (strcmp (answer, "ok") != 0) {
    CLEANUP_FREE char *line = strdup (answer);

    /* One line: quick_check puts a newline after its heading. */
    for (char *p = line; p && *p; ++p)
      if (*p == '\n')
        *p = ' ';
    error_setg (errp, "catalogue '%s' is corrupt: integrity check: %s; "
                "move it away to start afresh", cat->path,
                line ? line : answer);
    return -1;
  }

  r = cat_user_version (cat, &version);
  if (r != SQLITE_OK) {
    cat_error (cat, r, errp, "reading schema version");
    return -1;
  }
  if (version > CATALOG_SCHEMA_VERSION) {
    error_setg (errp, "catalogue '%s' has schema version %" PRId64 ", "
                "newer than this nbdd's %d: upgrade nbdd",
                cat->path, version, CATALOG_SCHEMA_VERSION);
    return -1;
  }
  if (version < 0) {
    error_setg (errp, "catalogue '%s' is corrupt: schema version %" PRId64
                "; move it away to start afresh", cat->path, version);
    return -1;
  }
  return 0;
}

static int
cat_set_pragmas (struct catalog *cat, struct error **errp)
{
  CLEANUP_FINALIZE sqlite3_stmt *st = NULL;
  const char *mode;
  int r;

  /* Switching from a rollback journal needs the file to ourselves,
   * so another program's lock shows here as "locked".
   */
  r = cat_query (cat, "PRAGMA journal_mode = WAL", &st);
  if (r != SQLITE_ROW) {
    cat_error (cat, r, errp, "switching to WAL");
    return -1;
  }
  mode = (const char *) sqlite3_column_text (st, 0);
  if (mode == NULL || strcmp (mode, "wal") != 0) {
    error_setg (errp, "catalogue '%s': switching to WAL: the journal mode "
                "stays '%s'", cat->path, mode ? mode : "unknown");
    return -1;
  }
  /* Connection settings: no file access, but refused in a transaction. */
  r = cat_exec (cat, "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON");
  if (r != SQLITE_OK) {
    cat_error (cat, r, errp, "setting pragmas");
    return -1;
  }
  return 0;
}

/* Bring the schema up to CATALOG_SCHEMA_VERSION, one transaction per
 * step.  Reads the version again under the write lock, so a version
 * written between cat_check and here is still honoured.  Always takes
 * the write lock once, so a catalogue held by another writer fails
 * the open rather than the first admin command.
 */
static int
cat_migrate (struct catalog *cat, struct error **errp)
{
  for (;;) {
    int64_t version, now;
    int r;

    r = cat_exec (cat, "BEGIN IMMEDIATE");
    if (r != SQLITE_OK) {
      cat_error (cat, r, errp, "taking the write lock");
      return -1;
    }
    r = cat_user_version (cat, &version);
    if (r != SQLITE_OK) {
      cat_error (cat, r, errp, "reading schema version");
      goto out_rollback;
    }

    if (version == CATALOG_SCHEMA_VERSION) {
      r = cat_exec (cat, "COMMIT");
      if (r != SQLITE_OK) {
        cat_error (cat, r, errp, "taking the write lock");
        goto out_rollback;
      }
      return 0;
    }
    if (version < 0 || version > CATALOG_SCHEMA_VERSION) {
      error_setg (errp, "catalogue '%s': schema version changed to %" PRId64
                  " while opening", cat->path, version);
      goto out_rollback;
    }
    r = cat_exec (cat, migrations[version]);
    if (r == SQLITE_OK && (r = cat_user_version (cat, &now)) == SQLITE_OK) {
      /* Each migration sets user_version itself; one that forgot
       * would run again and again.
       */
      assert (now == version + 1);
      r = cat_exec (cat, "COMMIT");
    }
    if (r != SQLITE_OK) {
      cat_error (cat, r, errp, "upgrading schema from version %" PRId64
                 " to %" PRId64, version, version + 1);
      goto out_rollback;
    }
  }

 out_rollback:
  if (!sqlite3_get_autocommit (cat->db))
    cat_exec (cat, "ROLLBACK");
  return -1;
}

static int
cat_prepare (struct catalog *cat, struct error **errp)
{
  for (int i = 0; i < NR_STMTS; ++i) {
    int r = sqlite3_prepare_v3 (cat->db, stmt_sql[i], -1,
                                SQLITE_PREPARE_PERSISTENT, &cat->st[i], NULL);
    if (r != SQLITE_OK) {
      cat_error (cat, r, errp, "preparing '%s'", stmt_sql[i]);
      return -1;
    }
  }
  return 0;
}

/* Finalize whatever was prepared and close the handle. */
static void
cat_close_db (struct catalog *cat)
{
  for (int i = 0; i < NR_STMTS; ++i) {
    sqlite3_finalize (cat->st[i]);
    cat->st[i] = NULL;
  }
  /* Every statement is finalized, so this closes for real (and, as
   * the last connection, checkpoints and removes the WAL).
   */
  sqlite3_close (cat->db);
  cat->db = NULL;
}

struct catalog *
catalog_open (const char *state_dir, struct error **errp)
{
  int fd = catalog_lock (state_dir, errp);

  if (fd == -1)
    return NULL;
  return catalog_open_locked (state_dir, fd, errp);
}

struct catalog *
catalog_open_locked (const char *state_dir, int lock_fd, struct error **errp)
{
  struct catalog *cat;
  int r;

  cat = calloc (1, sizeof *cat);
  if (cat == NULL) {
    error_setg_errno (errp, errno, "catalogue in '%s'", state_dir);
    close (lock_fd);
    return NULL;
  }
  /* The lock may have been taken before a fork: the pid is ours now. */
  cat->lock_fd = lock_fd;
  cat->state_dir = strdup (state_dir);
  if (cat->state_dir == NULL ||
      asprintf (&cat->path, "%s/" CAT_DB_NAME, state_dir) == -1) {
    cat->path = NULL;
    error_setg_errno (errp, errno, "catalogue in '%s'", state_dir);
    goto out_free;
  }

  if (cat_write_pid (lock_fd, state_dir, errp) == -1 ||
      cat_create_file (cat, errp) == -1)
    goto out_unlock;

  /* One thread uses a catalogue: no SQLite mutex needed. */
  r = sqlite3_open_v2 (cat->path, &cat->db,
                       SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
  if (r != SQLITE_OK) {
    cat_error (cat, r, errp, "opening");
    goto out_close_db;          /* a handle comes back even on error */
  }
  sqlite3_extended_result_codes (cat->db, 1);
  sqlite3_busy_timeout (cat->db, CAT_BUSY_TIMEOUT_MS);

  if (cat_check (cat, errp) == -1 ||
      cat_set_pragmas (cat, errp) == -1 ||
      cat_migrate (cat, errp) == -1 ||
      cat_prepare (cat, errp) == -1)
    goto out_close_db;
  return cat;

 out_close_db:
  cat_close_db (cat);
 out_unlock:
  cat_unlock_state_dir (cat);
 out_free:
  cat_unlock_state_dir (cat);
  free (cat->path);
  free (cat->state_dir);
  free (cat);
  return NULL;
}

void
catalog_close (struct catalog *cat)
{
  if (cat == NULL)
    return;
  assert (!cat->in_foreach);
  catalog_rollback (cat);
  cat_close_db (cat);
  cat_unlock_state_dir (cat);
  free (cat->path);
  free (cat->state_dir);
  free (cat);
}

const char *
catalog_path (const struct catalog *cat)
{
  return cat->path;
}

/* ---- transactions ------------------------------------------------- */

/* SQLite rolls a transaction back by itself after some errors (full
 * disk, I/O error, out of memory).  Later changes would then commit
 * one by one; refuse them instead.
 */
static int
cat_txn_lost (struct catalog *cat, struct error **errp)
{
  if (cat->in_txn && sqlite3_get_autocommit (cat->db)) {
    error_setg (errp, "catalogue '%s': the transaction was rolled back "
                "after an earlier error", cat->path);
    return -1;
  }
  return 0;
}

bool
catalog_in_transaction (const struct catalog *cat)
{
  return cat->in_txn;
}

int
catalog_begin (struct catalog *cat, struct error **errp)
{
  int r;

  assert (!cat->in_foreach);
  if (cat->in_txn) {
    error_setg (errp, "catalogue '%s': begin: a transaction is already open",
                cat->path);
    return -1;
  }
  r = cat_step_done (cat->st[ST_BEGIN]);
  if (r != SQLITE_OK) {
    cat_error (cat, r, errp, "begin");
    cat_reset (cat->st[ST_BEGIN]);
    return -1;
  }
  cat_reset (cat->st[ST_BEGIN]);
  cat->in_txn = true;
  return 0;
}

int
catalog_commit (struct catalog *cat, struct error **errp)
{
  int r;

  assert (!cat->in_foreach);
  if (!cat->in_txn) {
    error_setg (errp, "catalogue '%s': commit: no transaction is open",
                cat->path);
    return -1;
  }
  if (cat_txn_lost (cat, errp) == -1) {
    cat->in_txn = false;
    return -1;
  }
  r = cat_step_done (cat->st[ST_COMMIT]);
  if (r != SQLITE_OK) {
    cat_error (cat, r, errp, "commit");
    cat_reset (cat->st[ST_COMMIT]);
    catalog_rollback (cat);     /* a failed COMMIT may leave it open */
    return -1;
  }
  cat_reset (cat->st[ST_COMMIT]);
  cat->in_txn = false;
  return 0;
}

void
catalog_rollback (struct catalog *cat)
{
  assert (!cat->in_foreach);
  if (!cat->in_txn)
    return;
  if (!sqlite3_get_autocommit (cat->db)) {
    cat_step_done (cat->st[ST_ROLLBACK]);
    cat_reset (cat->st[ST_ROLLBACK]);
  }
  cat->in_txn = false;
}

/* ---- keyed tables ------------------------------------------------- */

static int
cat_put (struct catalog *cat, const struct cat_table *t, const char *key,
         const char *json, struct error **errp)
{
  sqlite3_stmt *st = cat->st[t->put];
  int r;

  assert (!cat->in_foreach);
  if (cat_txn_lost (cat, errp) == -1)
    return -1;
  if ((r = sqlite3_bind_text (st, 1, key, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 2, json, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = cat_step_done (st)) != SQLITE_OK) {
    cat_error (cat, r, errp, "storing %s '%s'", t->what, key);
    cat_reset (st);
    return -1;
  }
  cat_reset (st);
  return 0;
}

static int
cat_del (struct catalog *cat, const struct cat_table *t, const char *key,
         struct error **errp)
{
  sqlite3_stmt *st = cat->st[t->del];
  int r;

  assert (!cat->in_foreach);
  if (cat_txn_lost (cat, errp) == -1)
    return -1;
  if ((r = sqlite3_bind_text (st, 1, key, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = cat_step_done (st)) != SQLITE_OK) {
    cat_error (cat, r, errp, "deleting %s '%s'", t->what, key);
    cat_reset (st);
    return -1;
  }
  cat_reset (st);
  return 0;
}

static int
cat_foreach (struct catalog *cat, const struct cat_table *t,
             catalog_foreach_fn fn, void *opaque, struct error **errp)
{
  sqlite3_stmt *st = cat->st[t->list];
  int r, ret = 0;

  assert (!cat->in_foreach);
  cat->in_foreach = true;
  while ((r = sqlite3_step (st)) == SQLITE_ROW) {
    const char *key = (const char *) sqlite3_column_text (st, 0);
    const char *json = (const char *) sqlite3_column_text (st, 1);

    if (key == NULL || json == NULL) {  /* NOT NULL columns: no memory */
      r = sqlite3_errcode (cat->db);
      break;
    }
    if (fn (key, json, opaque) == -1) {
      ret = -1;
      r = SQLITE_DONE;
      break;
    }
  }
  if (r != SQLITE_DONE) {
    cat_error (cat, r, errp, "reading %ss", t->what);
    ret = -1;
  }
  sqlite3_reset (st);
  cat->in_foreach = false;
  return ret;
}

int
catalog_node_put (struct catalog *cat, const char *name,
                  const char *spec_json, struct error **errp)
{
  return cat_put (cat, &nodes_table, name, spec_json, errp);
}

int
catalog_node_del (struct catalog *cat, const char *name,
                  struct error **errp)
{
  return cat_del (cat, &nodes_table, name, errp);
}

int
catalog_node_foreach (struct catalog *cat, catalog_foreach_fn fn,
                      void *opaque, struct error **errp)
{
  return cat_foreach (cat, &nodes_table, fn, opaque, errp);
}

int
catalog_export_put (struct catalog *cat, const char *id,
                    const char *spec_json, struct error **errp)
{
  return cat_put (cat, &exports_table, id, spec_json, errp);
}

int
catalog_export_del (struct catalog *cat, const char *id,
                    struct error **errp)
{
  return cat_del (cat, &exports_table, id, errp);
}

int
catalog_export_foreach (struct catalog *cat, catalog_foreach_fn fn,
                        void *opaque, struct error **errp)
{
  return cat_foreach (cat, &exports_table, fn, opaque, errp);
}

int
catalog_throttle_group_put (struct catalog *cat, const char *name,
                            const char *limits_json, struct error **errp)
{
  return cat_put (cat, &groups_table, name, limits_json, errp);
}

int
catalog_throttle_group_del (struct catalog *cat, const char *name,
                            struct error **errp)
{
  return cat_del (cat, &groups_table, name, errp);
}

int
catalog_throttle_group_foreach (struct catalog *cat, catalog_foreach_fn fn,
                                void *opaque, struct error **errp)
{
  return cat_foreach (cat, &groups_table, fn, opaque, errp);
}

/* ---- audit -------------------------------------------------------- */

int
catalog_audit (struct catalog *cat, int64_t time_us, int64_t uid,
               int64_t pid, const char *command, const char *arguments_json,
               const char *result, struct error **errp)
{
  sqlite3_stmt *st = cat->st[ST_AUDIT];
  int r;

  assert (!cat->in_foreach);
  if (cat_txn_lost (cat, errp) == -1)
    return -1;
  /* bind_text of NULL binds SQL NULL. */
  if ((r = sqlite3_bind_int64 (st, 1, time_us)) != SQLITE_OK ||
      (r = sqlite3_bind_int64 (st, 2, uid)) != SQLITE_OK ||
      (r = sqlite3_bind_int64 (st, 3, pid)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 4, command, -1,
                              SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 5, arguments_json, -1,
                              SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 6, result, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = cat_step_done (st)) != SQLITE_OK) {
    cat_error (cat, r, errp, "recording command '%s' in the audit log",
               command);
    cat_reset (st);
    return -1;
  }
  cat_reset (st);
  return 0;
}

int64_t
catalog_audit_count (struct catalog *cat, struct error **errp)
{
  sqlite3_stmt *st = cat->st[ST_AUDIT_COUNT];
  int64_t n;
  int r;

  r = sqlite3_step (st);
  if (r != SQLITE_ROW) {
    cat_error (cat, r, errp, "counting audit rows");
    sqlite3_reset (st);
    return -1;
  }
  n = sqlite3_column_int64 (st, 0);
  sqlite3_reset (st);
  return n;
}

/* ---- bitmap lineage ------------------------------------------------ */

int
catalog_lineage_add (struct catalog *cat, const char *node,
                     const char *bitmap, const char *parent,
                     const char *event, const char *session,
                     struct error **errp)
{
  sqlite3_stmt *st = cat->st[ST_LINEAGE_ADD];
  int r;

  assert (!cat->in_foreach);
  if (cat_txn_lost (cat, errp) == -1)
    return -1;
  if ((r = sqlite3_bind_text (st, 1, node, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 2, bitmap, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 3, parent, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 4, event, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 5, session, -1,
                              SQLITE_STATIC)) != SQLITE_OK ||
      (r = cat_step_done (st)) != SQLITE_OK) {
    cat_error (cat, r, errp, "recording the lineage of bitmap '%s'", bitmap);
    cat_reset (st);
    return -1;
  }
  cat_reset (st);
  return 0;
}

int
catalog_lineage_foreach (struct catalog *cat, const char *node,
                         const char *bitmap, catalog_lineage_fn fn,
                         void *opaque, struct error **errp)
{
  sqlite3_stmt *st = cat->st[ST_LINEAGE_LIST];
  int r, ret = 0;

  assert (!cat->in_foreach);
  if ((r = sqlite3_bind_text (st, 1, node, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 2, bitmap, -1, SQLITE_STATIC)) != SQLITE_OK) {
    cat_error (cat, r, errp, "reading the bitmap lineage");
    cat_reset (st);
    return -1;
  }
  cat->in_foreach = true;
  while ((r = sqlite3_step (st)) == SQLITE_ROW) {
    struct catalog_lineage row = {
      .id = sqlite3_column_int64 (st, 0),
      .node = (const char *) sqlite3_column_text (st, 1),
      .bitmap = (const char *) sqlite3_column_text (st, 2),
      .parent = (const char *) sqlite3_column_text (st, 3),
      .event = (const char *) sqlite3_column_text (st, 4),
      .session = (const char *) sqlite3_column_text (st, 5),
      .time = sqlite3_column_int64 (st, 6),
    };
    if (row.node == NULL || row.bitmap == NULL || row.event == NULL) {
      r = sqlite3_errcode (cat->db);
      break;
    }
    if (fn (&row, opaque) == -1) {
      ret = -1;
      r = SQLITE_DONE;
      break;
    }
  }
  if (r != SQLITE_DONE) {
    cat_error (cat, r, errp, "reading the bitmap lineage");
    ret = -1;
  }
  cat_reset (st);
  cat->in_foreach = false;
  return ret;
}

/* ---- persistent bitmaps, for reconciling with the images --------- */

int
catalog_bitmap_put (struct catalog *cat, const char *node, const char *name,
                    uint32_t granularity, bool enabled, struct error **errp)
{
  sqlite3_stmt *st = cat->st[ST_BITMAP_PUT];
  int r;

  assert (!cat->in_foreach);
  if (cat_txn_lost (cat, errp) == -1)
    return -1;
  if ((r = sqlite3_bind_text (st, 1, node, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 2, name, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_int64 (st, 3, granularity)) != SQLITE_OK ||
      (r = sqlite3_bind_int (st, 4, enabled)) != SQLITE_OK ||
      (r = cat_step_done (st)) != SQLITE_OK) {
    cat_error (cat, r, errp, "recording bitmap '%s'", name);
    cat_reset (st);
    return -1;
  }
  cat_reset (st);
  return 0;
}

int
catalog_bitmap_del (struct catalog *cat, const char *node, const char *name,
                    struct error **errp)
{
  sqlite3_stmt *st = cat->st[ST_BITMAP_DEL];
  int r;

  assert (!cat->in_foreach);
  if (cat_txn_lost (cat, errp) == -1)
    return -1;
  if ((r = sqlite3_bind_text (st, 1, node, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 2, name, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = cat_step_done (st)) != SQLITE_OK) {
    cat_error (cat, r, errp, "forgetting bitmap '%s'", name);
    cat_reset (st);
    return -1;
  }
  cat_reset (st);
  return 0;
}

int
catalog_bitmap_foreach (struct catalog *cat, catalog_bitmap_fn fn,
                        void *opaque, struct error **errp)
{
  sqlite3_stmt *st = cat->st[ST_BITMAP_LIST];
  int r, ret = 0;

  assert (!cat->in_foreach);
  cat->in_foreach = true;
  while ((r = sqlite3_step (st)) == SQLITE_ROW) {
    const char *node = (const char *) sqlite3_column_text (st, 0);
    const char *name = (const char *) sqlite3_column_text (st, 1);
    if (node == NULL || name == NULL) {
      r = sqlite3_errcode (cat->db);
      break;
    }
    if (fn (node, name, (uint32_t) sqlite3_column_int64 (st, 2),
            sqlite3_column_int (st, 3) != 0, opaque) == -1) {
      ret = -1;
      r = SQLITE_DONE;
      break;
    }
  }
  if (r != SQLITE_DONE) {
    cat_error (cat, r, errp, "reading bitmaps");
    ret = -1;
  }
  cat_reset (st);
  cat->in_foreach = false;
  return ret;
}

/* ---- fleece sessions ---------------------------------------------- */

int
catalog_fleece_put (struct catalog *cat, const char *id, const char *node,
                    const char *state, const char *scratch,
                    struct error **errp)
{
  sqlite3_stmt *st = cat->st[ST_FLEECE_PUT];
  int r;

  assert (!cat->in_foreach);
  if (cat_txn_lost (cat, errp) == -1)
    return -1;
  if ((r = sqlite3_bind_text (st, 1, id, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 2, node, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 3, state, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = sqlite3_bind_text (st, 4, scratch, -1,
                              SQLITE_STATIC)) != SQLITE_OK ||
      (r = cat_step_done (st)) != SQLITE_OK) {
    cat_error (cat, r, errp, "recording fleece '%s'", id);
    cat_reset (st);
    return -1;
  }
  cat_reset (st);
  return 0;
}

int
catalog_lineage_reclaim (struct catalog *cat, const char *session,
                         struct error **errp)
{
  sqlite3_stmt *rc = cat->st[ST_FLEECE_RECLAIM];
  int r;

  assert (!cat->in_foreach);
  if (cat_txn_lost (cat, errp) == -1)
    return -1;
  if ((r = sqlite3_bind_text (rc, 1, session, -1,
                              SQLITE_STATIC)) != SQLITE_OK ||
      (r = cat_step_done (rc)) != SQLITE_OK) {
    cat_error (cat, r, errp, "ending the forks of '%s'", session);
    cat_reset (rc);
    return -1;
  }
  cat_reset (rc);
  return 0;
}

/* Gone; with @failed, its forked bitmaps' lineage says so too. */
int
catalog_fleece_end (struct catalog *cat, const char *id, bool failed,
                    struct error **errp)
{
  sqlite3_stmt *st = cat->st[ST_FLEECE_DEL];
  int r;

  assert (!cat->in_foreach);
  if (cat_txn_lost (cat, errp) == -1)
    return -1;
  if (failed && catalog_lineage_reclaim (cat, id, errp) == -1)
    return -1;
  if ((r = sqlite3_bind_text (st, 1, id, -1, SQLITE_STATIC)) != SQLITE_OK ||
      (r = cat_step_done (st)) != SQLITE_OK) {
    cat_error (cat, r, errp, "ending fleece '%s'", id);
    cat_reset (st);
    return -1;
  }
  cat_reset (st);
  return 0;
}

int
catalog_fleece_foreach (struct catalog *cat, catalog_fleece_fn fn,
                        void *opaque, struct error **errp)
{
  sqlite3_stmt *st = cat->st[ST_FLEECE_LIST];
  int r, ret = 0;

  assert (!cat->in_foreach);
  cat->in_foreach = true;
  while ((r = sqlite3_step (st)) == SQLITE_ROW) {
    struct catalog_fleece row = {
      .id = (const char *) sqlite3_column_text (st, 0),
      .node = (const char *) sqlite3_column_text (st, 1),
      .state = (const char *) sqlite3_column_text (st, 2),
      .scratch = (const char *) sqlite3_column_text (st, 3),
      .started = sqlite3_column_int64 (st, 4),
    };
    if (row.id == NULL || row.node == NULL || row.state == NULL) {
      r = sqlite3_errcode (cat->db);
      break;
    }
    if (fn (&row, opaque) == -1) {
      ret = -1;
      r = SQLITE_DONE;
      break;
    }
  }
  if (r != SQLITE_DONE) {
    cat_error (cat, r, errp, "reading fleece sessions");
    ret = -1;
  }
  cat_reset (st);
  cat->in_foreach = false;
  return ret;
}

/* ---- jobs --------------------------------------------------------- */

int
catalog_job_put (struct catalog *cat, const char *id, const char *spec_json,
                 struct error **errp)
{
  return cat_put (cat, &jobs_table, id, spec_json, errp);
}

int
catalog_job_del (struct catalog *cat, const char *id, struct error **errp)
{
  return cat_del (cat, &jobs_table, id, errp);
}

int
catalog_job_foreach (struct catalog *cat, catalog_foreach_fn fn,
                     void *opaque, struct error **errp)
{
  return cat_foreach (cat, &jobs_table, fn, opaque, errp);
}
