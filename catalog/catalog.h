/* The SQLite catalogue in the state dir (see catalog.c).
 *
 * One thread uses a catalogue at a time (the admin path): struct
 * catalog has no lock of its own.  Open it after any fork: the state
 * dir lock belongs to the open file description, and SQLite handles
 * must not cross a fork.
 */
#ifndef NBDD_CATALOG_H
#define NBDD_CATALOG_H

#include <stdbool.h>
#include <stdint.h>

#include "error.h"

struct catalog;

/* The schema version this build writes (PRAGMA user_version). */
#define CATALOG_SCHEMA_VERSION 2

/* Open (creating if absent) STATE_DIR/catalog.db, mode 0600.
 *
 * Locks STATE_DIR first (STATE_DIR/nbdd.lock, an OFD lock holding
 * our pid), so a second nbdd on the same state dir is refused.  Then
 * checks the file (quick_check), refuses a newer schema, switches to
 * WAL and applies the migrations this build knows, one transaction
 * each.  The errors say which of these went wrong: "in use by another
 * nbdd", "is corrupt", "is locked by another program", "newer than
 * this nbdd's".  On error nothing is left open or locked.
 *
 * The state dir must exist.  Caller frees with catalog_close.
 */
struct catalog *catalog_open (const char *state_dir, struct error **errp);
/* The same in two steps: lock STATE_DIR (a descriptor holding the
 * lock, or -1), for instance before forking, and open the catalogue
 * later with that lock (taken over, closed on error).
 */
int catalog_lock (const char *state_dir, struct error **errp);
struct catalog *catalog_open_locked (const char *state_dir, int lock_fd,
                                     struct error **errp);

/* Roll back any open transaction, close the database and release the
 * state dir.  NULL is allowed.
 */
void catalog_close (struct catalog *cat);

/* STATE_DIR/catalog.db.  Borrowed: valid until catalog_close. */
const char *catalog_path (const struct catalog *cat);

/* One transaction per admin command: begin, changes, then commit or
 * rollback.  Begin takes the write lock at once (BEGIN IMMEDIATE), so
 * another program writing the file fails the begin, not the commit.
 * A nested begin, or a commit without a begin, is an error.  A failed
 * commit rolls back: nothing of the transaction remains.  Rollback
 * without a transaction does nothing.
 *
 * Changes outside a transaction commit one by one.
 */
int catalog_begin (struct catalog *cat, struct error **errp);
int catalog_commit (struct catalog *cat, struct error **errp);
void catalog_rollback (struct catalog *cat);
/* Whether a transaction is open. */
bool catalog_in_transaction (const struct catalog *cat);

/* The callback of the foreach calls.  Both strings are borrowed:
 * valid only during the call.  Return 0 to go on, -1 to stop; the
 * foreach then returns -1 and leaves errp untouched, so fn reports
 * its own error (through opaque).  fn must not call the catalogue.
 */
typedef int (*catalog_foreach_fn) (const char *key, const char *json,
                                   void *opaque);

/* Node specs: top-level nodes added at run time, keyed by node-name,
 * spec a JSON text (QEMU's blockdev JSON).  Put inserts, or replaces
 * the spec and keeps the node's original place in creation order.
 * Deleting a name that is not there is not an error (nodes from the
 * command line are not recorded).  Foreach walks in creation order.
 */
int catalog_node_put (struct catalog *cat, const char *name,
                      const char *spec_json, struct error **errp);
int catalog_node_del (struct catalog *cat, const char *name,
                      struct error **errp);
int catalog_node_foreach (struct catalog *cat, catalog_foreach_fn fn,
                          void *opaque, struct error **errp);

/* The same for exports, keyed by export id, spec the
 * block-export-add arguments as JSON.
 */
int catalog_export_put (struct catalog *cat, const char *id,
                        const char *spec_json, struct error **errp);
int catalog_export_del (struct catalog *cat, const char *id,
                        struct error **errp);
int catalog_export_foreach (struct catalog *cat, catalog_foreach_fn fn,
                            void *opaque, struct error **errp);

/* The same for throttle groups, keyed by group name, limits as JSON. */
int catalog_throttle_group_put (struct catalog *cat, const char *name,
                                const char *limits_json,
                                struct error **errp);
int catalog_throttle_group_del (struct catalog *cat, const char *name,
                                struct error **errp);
int catalog_throttle_group_foreach (struct catalog *cat,
                                    catalog_foreach_fn fn, void *opaque,
                                    struct error **errp);

/* Audit: one row per admin command.  time_us is microseconds since
 * the epoch; uid and pid are the peer's (SO_PEERCRED).
 * arguments_json may be NULL.  result is NULL for success or the
 * error text.  Inside a transaction the row shares its fate, so
 * record a failed command after its rollback.
 */
int catalog_audit (struct catalog *cat, int64_t time_us, int64_t uid,
                   int64_t pid, const char *command,
                   const char *arguments_json, const char *result,
                   struct error **errp);

/* For tests and inspection: the number of audit rows, or -1. */
int64_t catalog_audit_count (struct catalog *cat, struct error **errp);

/* Bitmap lineage: one row per event in a bitmap's life (add, remove,
 * clear, merge (parent: the source), fork, unfork-success,
 * unfork-failure), appended in the command's transaction.
 */
int catalog_lineage_add (struct catalog *cat, const char *node,
                         const char *bitmap, const char *parent,
                         const char *event, const char *session,
                         struct error **errp);
struct catalog_lineage {
  int64_t id;                   /* event order */
  const char *node, *bitmap;
  const char *parent, *session; /* NULL if none */
  const char *event;
  int64_t time;                 /* seconds since the epoch */
};
typedef int (*catalog_lineage_fn) (const struct catalog_lineage *row,
                                   void *opaque);
/* In event order; @node or @bitmap NULL: all.  fn returns 0 to go on,
 * -1 to stop (the foreach then returns -1).
 */
/* An 'unfork-failure' row for every fork of @session (a fleece or a
 * job id) that has not ended.
 */
int catalog_lineage_reclaim (struct catalog *cat, const char *session,
                             struct error **errp);
int catalog_lineage_foreach (struct catalog *cat, const char *node,
                             const char *bitmap, catalog_lineage_fn fn,
                             void *opaque, struct error **errp);

/* The persistent bitmaps the daemon knows of, to find at start those
 * that changed in the images behind its back.
 */
int catalog_bitmap_put (struct catalog *cat, const char *node,
                        const char *name, uint32_t granularity, bool enabled,
                        struct error **errp);
int catalog_bitmap_del (struct catalog *cat, const char *node,
                        const char *name, struct error **errp);
typedef int (*catalog_bitmap_fn) (const char *node, const char *name,
                                  uint32_t granularity, bool enabled,
                                  void *opaque);
int catalog_bitmap_foreach (struct catalog *cat, catalog_bitmap_fn fn,
                            void *opaque, struct error **errp);

/* Fleece sessions (nbdd/fleece.c): recorded while they run, so that
 * one cut short by a crash is ended at the next start.
 */
int catalog_fleece_put (struct catalog *cat, const char *id,
                        const char *node, const char *state,
                        const char *scratch, struct error **errp);
/* Remove it; with @failed, add an 'unfork-failure' lineage row for
 * every bitmap it forked.
 */
int catalog_fleece_end (struct catalog *cat, const char *id, bool failed,
                        struct error **errp);
struct catalog_fleece {
  const char *id, *node, *state, *scratch;  /* scratch may be NULL */
  int64_t started;              /* unix seconds */
};
typedef int (*catalog_fleece_fn) (const struct catalog_fleece *row,
                                  void *opaque);
int catalog_fleece_foreach (struct catalog *cat, catalog_fleece_fn fn,
                            void *opaque, struct error **errp);

/* Block jobs while they run: the command that made each, as
 * {"execute": NAME, "arguments": {...}}.
 */
int catalog_job_put (struct catalog *cat, const char *id,
                     const char *spec_json, struct error **errp);
int catalog_job_del (struct catalog *cat, const char *id,
                     struct error **errp);
int catalog_job_foreach (struct catalog *cat, catalog_foreach_fn fn,
                         void *opaque, struct error **errp);

#endif /* NBDD_CATALOG_H */
