/* QMP: the dirty bitmap lifecycle, with QEMU's command names and
 * arguments (block-dirty-bitmap-add, -remove, -clear, -enable,
 * -disable, -merge).  Each runs inside the command's transaction, with
 * its node drained, and registers how to undo itself, so all of them
 * may be actions of a 'transaction'.
 *
 * Fork and unfork are nbdd's own: a fork freezes a bitmap's bits (for a
 * backup to read, exported) while a successor records new writes; the
 * unfork's outcome says whether the backup took the frozen bits
 * (success: they are dropped, the successor carries on under the
 * name) or not (failure: the successor is merged back, nothing lost).
 * Every change is a row of the bitmap's lineage in the catalogue.
 *
 * A bitmap an export uses is busy: QEMU refuses to change such a
 * bitmap, and so do we (a backup reading it would see it change).  An
 * inconsistent one (loaded from an image not closed cleanly) can only
 * be removed.
 *
 * Persistent bitmaps live in the node's image (qcow2) or a sidecar:
 * adding or removing one, or turning it on or off, stores the node's
 * set at once, so the change is durable when the command returns.
 * While the node is open the stored bits are a superset of the writes
 * (write intent, graph/dirty.c); a clear or an unfork shrinks what
 * the image is taken to hold; the exact bits are stored at close.
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "catalog.h"
#include "internal.h"
#include "log.h"
#include "options.h"
#include "qmp.h"

#define DEFAULT_GRANULARITY 65536

/* The node and bitmap an argument names; with @bitmap NULL, just the
 * node.
 */
static int
lookup (struct qmp_txn *t, struct json_object *args, const char *what,
        const char *bitmap_key, struct node **nodep, struct dirty_bitmap **dp,
        struct error **errp)
{
  const char *name;

  if (arg_node (t, args, what, "node", nodep, errp) == -1)
    return -1;
  if (bitmap_key == NULL)
    return 0;
  if (opt_get_string (args, what, bitmap_key, true, &name, errp) == -1)
    return -1;
  if ((*dp = dirty_bitmap_find (*nodep, name)) == NULL) {
    t->error_class = "DeviceNotFound";
    error_setg (errp, "node '%s' has no bitmap '%.80s'", (*nodep)->name,
                name);
    return -1;
  }
  return 0;
}

/* One row of the bitmap's history, in the command's transaction. */
static int
lineage (const struct dirty_bitmap *d, const char *parent, const char *event,
         const char *session, struct error **errp)
{
  if (catalog == NULL)
    return 0;
  return catalog_lineage_add (catalog, d->node->name, d->name, parent, event,
                              session, errp);
}

/* A persistent bitmap as the catalogue knows it (to find at start what
 * changed in the image behind our back).
 */
static int
record (const struct dirty_bitmap *d, struct error **errp)
{
  if (catalog == NULL || !d->persistent)
    return 0;
  return catalog_bitmap_put (catalog, d->node->name, d->name,
                             bitmap_granularity (d->bm), d->enabled, errp);
}

static int
not_forked (const struct dirty_bitmap *d, struct error **errp)
{
  if (d->successor == NULL)
    return 0;
  error_setg (errp, "bitmap '%s' is forked: end the fork first "
              "(block-dirty-bitmap-unfork)", d->name);
  return -1;
}

static int
not_busy (const struct dirty_bitmap *d, struct error **errp)
{
  if (not_forked (d, errp) == -1)
    return -1;
  if (d->inconsistent) {
    error_setg (errp, "bitmap '%s' is inconsistent (its image was not "
                "closed cleanly): it can only be removed", d->name);
    return -1;
  }
  if (d->busy == 0)
    return 0;
  error_setg (errp, "bitmap '%s' is in use by %u export%s and cannot be "
              "changed", d->name, d->busy, d->busy == 1 ? "" : "s");
  return -1;
}

/* ---- add, remove ---- */

/* A persistent bitmap's change goes to the image now. */
static void
store_or_warn (struct node *node, const char *why)
{
  struct error *err = NULL;

  if (dirty_bitmaps_store (node, DIRTY_STORE_INTENT, &err) == -1) {
    nbdd_warn ("node '%s': %s: bitmaps not stored: %s", node->name, why,
               err->msg);
    error_free (err);
  }
}

static void
undo_add (void *data)
{
  struct dirty_bitmap *d = data;
  struct node *node = d->node;
  bool persistent = d->persistent;

  dirty_bitmap_unlink (d);
  dirty_bitmap_free (d);
  if (persistent)
    store_or_warn (node, "undoing block-dirty-bitmap-add");
}

static const char *const add_keys[] = {
  "node", "name", "granularity", "persistent", "disabled", NULL
};

int
cmd_block_dirty_bitmap_add (struct qmp_txn *t, struct json_object *args,
                            struct json_object **ret, struct error **errp)
{
  struct node *node;
  struct dirty_bitmap *d;
  const char *name;
  uint64_t granularity = DEFAULT_GRANULARITY;
  bool persistent = false, disabled = false;

  if (opt_check_keys (args, "block-dirty-bitmap-add", add_keys,
                      errp) == -1 ||
      lookup (t, args, "block-dirty-bitmap-add", NULL, &node, NULL,
              errp) == -1 ||
      opt_get_string (args, "block-dirty-bitmap-add", "name", true, &name,
                      errp) == -1 ||
      opt_get_uint64 (args, "block-dirty-bitmap-add", "granularity", false,
                      &granularity, errp) == -1 ||
      opt_get_bool (args, "block-dirty-bitmap-add", "persistent", false,
                    &persistent, errp) == -1 ||
      opt_get_bool (args, "block-dirty-bitmap-add", "disabled", false,
                    &disabled, errp) == -1)
    return -1;
  if (persistent && !dirty_bitmaps_can_store (node)) {
    error_setg (errp, "node '%s' (driver %s%s) cannot store bitmaps: "
                "read-write qcow2 nodes can, and other named, writable "
                "nodes of a daemon with a state dir; add '%.80s' with "
                "persistent false (it lasts until the daemon stops)",
                node->name, node->drv->name,
                node->read_only ? ", read-only" : "", name);
    return -1;
  }
  if (granularity > UINT32_MAX) {
    error_setg (errp, "granularity must be a power of 2 from 512 bytes to "
                "2 GiB");
    return -1;
  }
  d = dirty_bitmap_create (node, name, granularity, persistent, !disabled,
                           errp);
  if (d == NULL)
    return -1;
  if (txn_reserve (t, 1, errp) == -1 || txn_drain (t, &node, 1, errp) == -1) {
    dirty_bitmap_free (d);
    return -1;
  }
  dirty_bitmap_link (d);
  txn_step (t, undo_add, NULL, NULL, d);
  if (persistent && dirty_bitmaps_store (node, DIRTY_STORE_INTENT, errp) == -1)
    return -1;
  if (record (d, errp) == -1)
    return -1;
  return lineage (d, NULL, "add", NULL, errp);
}

struct removed {
  struct dirty_bitmap *d;
  bool committed;
};

static void
undo_remove (void *data)
{
  struct removed *r = data;

  dirty_bitmap_link (r->d);
  if (r->d->persistent)
    store_or_warn (r->d->node, "undoing block-dirty-bitmap-remove");
}

static void
commit_remove (void *data)
{
  struct removed *r = data;

  r->committed = true;
}

static void
release_remove (void *data)
{
  struct removed *r = data;

  if (r->committed)
    dirty_bitmap_free (r->d);
  free (r);
}

static const char *const name_keys[] = { "node", "name", NULL };

int
cmd_block_dirty_bitmap_remove (struct qmp_txn *t, struct json_object *args,
                               struct json_object **ret, struct error **errp)
{
  struct node *node;
  struct dirty_bitmap *d;
  struct removed *r;

  if (opt_check_keys (args, "block-dirty-bitmap-remove", name_keys,
                      errp) == -1 ||
      lookup (t, args, "block-dirty-bitmap-remove", "name", &node, &d,
              errp) == -1)
    return -1;
  if (d->busy) {
    error_setg (errp, "bitmap '%s' is in use by %u export%s and cannot be "
                "removed", d->name, d->busy, d->busy == 1 ? "" : "s");
    return -1;
  }
  if (not_forked (d, errp) == -1 ||
      lineage (d, NULL, "remove", NULL, errp) == -1 ||
      (catalog && d->persistent &&
       catalog_bitmap_del (catalog, node->name, d->name, errp) == -1))
    return -1;
  r = calloc (1, sizeof *r);
  if (r == NULL || txn_reserve (t, 1, errp) == -1 ||
      txn_drain (t, &node, 1, errp) == -1) {
    free (r);
    return -1;
  }
  r->d = d;
  dirty_bitmap_unlink (d);
  txn_step (t, undo_remove, commit_remove, release_remove, r);
  if (d->persistent && dirty_bitmaps_store (node, DIRTY_STORE_INTENT, errp) == -1)
    return -1;
  return 0;
}

/* ---- clear, merge: the old bits kept for the undo ---- */

struct saved_bits {
  struct dirty_bitmap *d;
  struct bitmap *old;
};

static void
undo_bits (void *data)
{
  struct saved_bits *s = data;

  bitmap_clear_all (s->d->bm);
  bitmap_merge (s->d->bm, s->old);
  if (dirty_bitmap_persist (s->d) < 0)
    nbdd_warn ("bitmap '%s': restored bits not stored", s->d->name);
}

static void
release_bits (void *data)
{
  struct saved_bits *s = data;

  bitmap_free (s->old);
  free (s);
}

/* Drained, keep a copy of @d's bits to put back if the command fails. */
static int
save_bits (struct qmp_txn *t, struct node *node, struct dirty_bitmap *d,
           struct error **errp)
{
  struct saved_bits *s = calloc (1, sizeof *s);

  if (s == NULL || txn_reserve (t, 1, errp) == -1 ||
      txn_drain (t, &node, 1, errp) == -1 ||
      (s->old = bitmap_copy (d->bm)) == NULL) {
    if (s && s->old == NULL && errp && *errp == NULL)
      error_setg (errp, "out of memory");
    free (s);
    return -1;
  }
  s->d = d;
  txn_step (t, undo_bits, NULL, release_bits, s);
  return 0;
}

int
cmd_block_dirty_bitmap_clear (struct qmp_txn *t, struct json_object *args,
                              struct json_object **ret, struct error **errp)
{
  struct node *node;
  struct dirty_bitmap *d;

  if (opt_check_keys (args, "block-dirty-bitmap-clear", name_keys,
                      errp) == -1 ||
      lookup (t, args, "block-dirty-bitmap-clear", "name", &node, &d,
              errp) == -1 ||
      not_busy (d, errp) == -1 ||
      save_bits (t, node, d, errp) == -1 ||
      lineage (d, NULL, "clear", NULL, errp) == -1)
    return -1;
  bitmap_clear_all (d->bm);
  /* The image still holds the old bits, but writes from now on must
   * not count on them: the next flush of a unit rewrites it.
   */
  dirty_bitmap_rebase (d);
  return 0;
}

/* The bitmaps a merge reads: names on @node, or {node, name}. */
static int
merge_sources (struct qmp_txn *t, struct json_object *list, struct node *node,
               struct dirty_bitmap ***srcs, size_t *n, struct error **errp)
{
  size_t len;

  if (list == NULL || !json_object_is_type (list, json_type_array)) {
    error_setg (errp, "'bitmaps' must be a list of names or {\"node\", "
                "\"name\"} objects");
    return -1;
  }
  len = json_object_array_length (list);
  *srcs = calloc (len ? len : 1, sizeof **srcs);
  if (*srcs == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  for (size_t i = 0; i < len; ++i) {
    struct json_object *e = json_object_array_get_idx (list, i), *v;
    struct node *sn = node;
    const char *name;

    if (json_object_is_type (e, json_type_string))
      name = json_object_get_string (e);
    else if (json_object_is_type (e, json_type_object) &&
             json_object_object_get_ex (e, "node", &v) &&
             json_object_is_type (v, json_type_string) &&
             json_object_object_get_ex (e, "name", &v) &&
             json_object_is_type (v, json_type_string)) {
      struct json_object *nn;
      json_object_object_get_ex (e, "node", &nn);
      name = json_object_get_string (v);
      if ((sn = node_lookup (json_object_get_string (nn))) == NULL)
        return not_found (t, errp, "node", json_object_get_string (nn));
    }
    else {
      error_setg (errp, "bitmaps[%zu] must be a name or {\"node\", "
                  "\"name\"}", i);
      return -1;
    }
    if (((*srcs)[i] = dirty_bitmap_find (sn, name)) == NULL) {
      t->error_class = "DeviceNotFound";
      error_setg (errp, "node '%s' has no bitmap '%.80s'", sn->name, name);
      return -1;
    }
    if ((*srcs)[i]->inconsistent) {
      error_setg (errp, "bitmap '%s' is inconsistent and cannot be merged "
                  "from", name);
      return -1;
    }
  }
  *n = len;
  return 0;
}

static const char *const merge_keys[] = {
  "node", "target", "bitmaps", NULL
};

int
cmd_block_dirty_bitmap_merge (struct qmp_txn *t, struct json_object *args,
                              struct json_object **ret, struct error **errp)
{
  struct node *node;
  struct dirty_bitmap *d, **srcs = NULL;
  struct json_object *list = NULL;
  size_t n = 0;
  int r = -1;

  if (opt_check_keys (args, "block-dirty-bitmap-merge", merge_keys,
                      errp) == -1 ||
      lookup (t, args, "block-dirty-bitmap-merge", "target", &node, &d,
              errp) == -1 ||
      not_busy (d, errp) == -1)
    return -1;
  json_object_object_get_ex (args, "bitmaps", &list);
  if (merge_sources (t, list, node, &srcs, &n, errp) == -1 ||
      save_bits (t, node, d, errp) == -1)
    goto out;
  for (size_t i = 0; i < n; ++i)
    if (srcs[i] != d) {
      char parent[300];
      bitmap_merge (d->bm, srcs[i]->bm);
      snprintf (parent, sizeof parent, "%s:%s", srcs[i]->node->name,
                srcs[i]->name);
      if (lineage (d, parent, "merge", NULL, errp) == -1)
        goto out;
    }
  /* Merged bits stand for writes the image may already hold: they
   * must be stored before anyone relies on them.
   */
  if (dirty_bitmap_persist (d) < 0) {
    error_setg (errp, "bitmap '%s': the merged bits could not be stored",
                d->name);
    goto out;
  }
  r = 0;
 out:
  free (srcs);
  return r;
}

/* ---- enable, disable ---- */

struct flag_undo {
  struct dirty_bitmap *d;
  bool was;
};

static void
undo_flag (void *data)
{
  struct flag_undo *u = data;

  __atomic_store_n (&u->d->enabled, u->was, __ATOMIC_RELAXED);
}

static int
set_enabled (struct qmp_txn *t, struct json_object *args, const char *what,
             bool enabled, struct error **errp)
{
  struct node *node;
  struct dirty_bitmap *d;
  struct flag_undo *u;

  if (opt_check_keys (args, what, name_keys, errp) == -1 ||
      lookup (t, args, what, "name", &node, &d, errp) == -1 ||
      not_busy (d, errp) == -1)
    return -1;
  u = malloc (sizeof *u);
  /* Drained: a write that passed the hook while the bitmap was off
   * must not land after it is on, unrecorded.
   */
  if (u == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  if (txn_reserve (t, 1, errp) == -1 || txn_drain (t, &node, 1, errp) == -1) {
    free (u);
    return -1;
  }
  u->d = d;
  u->was = d->enabled;
  __atomic_store_n (&d->enabled, enabled, __ATOMIC_RELAXED);
  txn_step (t, undo_flag, NULL, free, u);
  /* The image's 'auto' flag follows at once. */
  if (d->persistent &&
      dirty_bitmaps_store (node, DIRTY_STORE_INTENT, errp) == -1)
    return -1;
  return record (d, errp);
}

int
cmd_block_dirty_bitmap_enable (struct qmp_txn *t, struct json_object *args,
                               struct json_object **ret, struct error **errp)
{
  return set_enabled (t, args, "block-dirty-bitmap-enable", true, errp);
}

int
cmd_block_dirty_bitmap_disable (struct qmp_txn *t, struct json_object *args,
                                struct json_object **ret,
                                struct error **errp)
{
  return set_enabled (t, args, "block-dirty-bitmap-disable", false, errp);
}

struct json_object *
dirty_bitmaps_info (const struct node *node)
{
  struct json_object *a = json_object_new_array ();

  for (const struct dirty_bitmap *d = node->dirty; d; d = d->next) {
    struct json_object *o;

    if (d->internal)
      continue;
    o = json_object_new_object ();
    json_object_object_add (o, "name", json_object_new_string (d->name));
    json_object_object_add (o, "count",
                            json_object_new_int64 ((int64_t)
                                                   bitmap_count (d->bm)));
    json_object_object_add (o, "granularity",
                            json_object_new_int64 (bitmap_granularity
                                                   (d->bm)));
    json_object_object_add (o, "recording",
                            json_object_new_boolean (d->enabled));
    json_object_object_add (o, "busy",
                            json_object_new_boolean (d->busy > 0 ||
                                                     d->successor));
    json_object_object_add (o, "frozen",
                            json_object_new_boolean (d->successor != NULL));
    json_object_object_add (o, "persistent",
                            json_object_new_boolean (d->persistent));
    json_object_object_add (o, "inconsistent",
                            json_object_new_boolean (d->inconsistent));
    json_object_array_add (a, o);
  }
  return a;
}

/* ---- fork, unfork ---- */

static void
undo_fork (void *data)
{
  dirty_bitmap_unfork (data, false);
}

static const char *const fork_keys[] = { "node", "name", "session", NULL };

int
cmd_block_dirty_bitmap_fork (struct qmp_txn *t, struct json_object *args,
                             struct json_object **ret, struct error **errp)
{
  struct node *node;
  struct dirty_bitmap *d;
  const char *session = NULL;

  if (opt_check_keys (args, "block-dirty-bitmap-fork", fork_keys,
                      errp) == -1 ||
      lookup (t, args, "block-dirty-bitmap-fork", "name", &node, &d,
              errp) == -1 ||
      opt_get_string (args, "block-dirty-bitmap-fork", "session", false,
                      &session, errp) == -1)
    return -1;
  return txn_bitmap_fork (t, node, d, session, errp);
}

int
txn_bitmap_fork (struct qmp_txn *t, struct node *node,
                 struct dirty_bitmap *d, const char *session,
                 struct error **errp)
{
  if (not_busy (d, errp) == -1 ||
      txn_reserve (t, 1, errp) == -1 || txn_drain (t, &node, 1, errp) == -1)
    return -1;
  if (dirty_bitmap_fork (d) < 0) {
    error_setg (errp, "out of memory forking bitmap '%s'", d->name);
    return -1;
  }
  txn_step (t, undo_fork, NULL, NULL, d);
  return lineage (d, NULL, "fork", session, errp);
}

/* What an unfork replaced, to put back or free. */
struct unfork {
  struct dirty_bitmap *d;
  struct bitmap *old_bm, *old_successor, *new_bm;
  bool committed;
};

static void
undo_unfork (void *data)
{
  struct unfork *u = data;

  if (u->new_bm != u->old_successor)
    bitmap_free (u->new_bm);
  u->d->bm = u->old_bm;
  u->d->successor = u->old_successor;
  dirty_bitmap_rebase (u->d);
}

static void
commit_unfork (void *data)
{
  struct unfork *u = data;

  u->committed = true;
}

static void
release_unfork (void *data)
{
  struct unfork *u = data;

  if (u->committed) {
    bitmap_free (u->old_bm);
    if (u->new_bm != u->old_successor)
      bitmap_free (u->old_successor);
  }
  free (u);
}

static const char *const unfork_keys[] = { "node", "name", "outcome", NULL };

int
cmd_block_dirty_bitmap_unfork (struct qmp_txn *t, struct json_object *args,
                               struct json_object **ret, struct error **errp)
{
  struct node *node;
  struct dirty_bitmap *d;
  const char *outcome;
  bool success;

  if (opt_check_keys (args, "block-dirty-bitmap-unfork", unfork_keys,
                      errp) == -1 ||
      lookup (t, args, "block-dirty-bitmap-unfork", "name", &node, &d,
              errp) == -1 ||
      opt_get_string (args, "block-dirty-bitmap-unfork", "outcome", true,
                      &outcome, errp) == -1)
    return -1;
  if (strcmp (outcome, "success") != 0 && strcmp (outcome, "failure") != 0) {
    error_setg (errp, "outcome must be 'success' or 'failure'");
    return -1;
  }
  success = strcmp (outcome, "success") == 0;
  if (d->successor == NULL) {
    error_setg (errp, "bitmap '%s' is not forked", d->name);
    return -1;
  }
  if (d->busy) {
    error_setg (errp, "bitmap '%s' is exported: delete the export before "
                "ending the fork", d->name);
    return -1;
  }
  return txn_bitmap_unfork (t, node, d, success, NULL, errp);
}

int
txn_bitmap_unfork (struct qmp_txn *t, struct node *node,
                   struct dirty_bitmap *d, bool success, const char *session,
                   struct error **errp)
{
  struct unfork *u = calloc (1, sizeof *u);

  if (u == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  if (txn_reserve (t, 1, errp) == -1 || txn_drain (t, &node, 1, errp) == -1) {
    free (u);
    return -1;
  }
  u->d = d;
  u->old_bm = d->bm;
  u->old_successor = d->successor;
  if (success)
    u->new_bm = d->successor;
  else {
    u->new_bm = bitmap_copy (d->bm);
    if (u->new_bm == NULL) {
      free (u);
      error_setg (errp, "out of memory");
      return -1;
    }
    bitmap_merge (u->new_bm, d->successor);
  }
  d->bm = u->new_bm;
  d->successor = NULL;
  dirty_bitmap_rebase (d);
  txn_step (t, undo_unfork, commit_unfork, release_unfork, u);
  return lineage (d, NULL, success ? "unfork-success" : "unfork-failure",
                  session, errp);
}

/* ---- lineage ---- */

static int
lineage_row (const struct catalog_lineage *row, void *opaque)
{
  struct json_object *o = json_object_new_object ();

  json_object_object_add (o, "id", json_object_new_int64 (row->id));
  json_object_object_add (o, "node", json_object_new_string (row->node));
  json_object_object_add (o, "name", json_object_new_string (row->bitmap));
  json_object_object_add (o, "event", json_object_new_string (row->event));
  json_object_object_add (o, "parent", row->parent ?
                          json_object_new_string (row->parent) : NULL);
  json_object_object_add (o, "session", row->session ?
                          json_object_new_string (row->session) : NULL);
  json_object_object_add (o, "time", json_object_new_int64 (row->time));
  json_object_array_add (opaque, o);
  return 0;
}

static const char *const lineage_keys[] = { "node", "name", NULL };

int
cmd_query_bitmap_lineage (struct qmp_txn *t, struct json_object *args,
                          struct json_object **ret, struct error **errp)
{
  const char *node = NULL, *name = NULL;
  struct json_object *a;

  if (opt_check_keys (args, "query-bitmap-lineage", lineage_keys,
                      errp) == -1 ||
      opt_get_string (args, "query-bitmap-lineage", "node", false, &node,
                      errp) == -1 ||
      opt_get_string (args, "query-bitmap-lineage", "name", false, &name,
                      errp) == -1)
    return -1;
  if (catalog == NULL) {
    error_setg (errp, "no catalogue keeps the lineage: start nbdd with "
                "--state-dir");
    return -1;
  }
  a = json_object_new_array ();
  if (catalog_lineage_foreach (catalog, node, name, lineage_row, a,
                               errp) == -1) {
    json_object_put (a);
    return -1;
  }
  *ret = a;
  return 0;
}
