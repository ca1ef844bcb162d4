/* Fleecing: a point-in-time snapshot of a live node, exported for a
 * backup client, in one command (QEMU needs a transaction of four and
 * two extra nodes: ../docs/admin.md, "Fleecing").
 *
 * fleece-start, with the node drained from the first step to the
 * last, so that no write falls between them:
 *
 *   1. a scratch qcow2 in STATE_DIR/fleece/ID.qcow2, node ID-scratch;
 *   2. the named bitmaps forked: the frozen bits are those of the
 *      snapshot, a successor records the writes from now on;
 *   3. a copy-before-write filter ID-cbw above the node, saving old
 *      data to the scratch, and every user of the node moved onto it;
 *   4. a snapshot-access node ID-snap reading the snapshot;
 *   5. an export of it, with the frozen bitmaps as
 *      qemu:dirty-bitmap:NAME contexts;
 *   6. a row in the catalogue's fleece_sessions.
 *
 * None of it is recorded as the daemon's configuration: the specs of
 * the moved users still name the node, so a restart rebuilds the graph
 * without the fleece, and the session row left in the catalogue ends it
 * there as a failure (fleece_recover): the image holds the union of
 * frozen and successor bits (graph/dirty.c), which is what a failure
 * leaves, and the scratch file is deleted.
 *
 * fleece-stop undoes it, in the same transaction as the unforks.  A
 * TRIM on the snapshot export means "backed up": the filter frees the
 * scratch clusters and the frozen bits wholly inside go (consumed), so
 * that a failure merges back only what was not consumed.
 */
#include <config.h>

#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <ev.h>

#include "bitmap.h"
#include "catalog.h"
#include "cbw.h"
#include "cleanup.h"
#include "internal.h"
#include "log.h"
#include "options.h"
#include "qcow2-create.h"
#include "qmp.h"
#include "utils.h"

#define MAX_FLEECE_ID 64        /* ID-scratch etc. stay node names */

struct fleece {
  struct fleece *next;
  char *id, *export_id;
  char *scratch_path;
  struct node *source, *cbw, *snap, *scratch;   /* references */
  struct export *exp;           /* its snapshot export (a reference) */
  bool stopping;                /* a fleece-stop is in the command */
  char **bitmaps;               /* names on source, NULL-terminated */
  size_t nr_bitmaps;
  uint64_t limit;
  bool incremental;             /* the snapshot only where bitmaps mark */
  time_t started;
  pthread_mutex_t consume_lock; /* clears of the frozen bits */
  atomic_bool break_pending;    /* FLEECE_BROKEN to send */
};

static struct fleece *fleeces;  /* main thread */
static struct ev_loop *fleece_loop;
static ev_async break_async;

static struct fleece *
fleece_find (const char *id)
{
  for (struct fleece *f = fleeces; f; f = f->next)
    if (strcmp (f->id, id) == 0)
      return f;
  return NULL;
}

static void
fleece_free (struct fleece *f)
{
  if (f == NULL)
    return;
  if (f->source)
    node_unref (f->source);
  if (f->cbw)
    node_unref (f->cbw);
  if (f->snap)
    node_unref (f->snap);
  if (f->scratch)
    node_unref (f->scratch);
  if (f->exp)
    export_unref (f->exp);
  opt_free_strings (f->bitmaps);
  pthread_mutex_destroy (&f->consume_lock);
  free (f->id);
  free (f->export_id);
  free (f->scratch_path);
  free (f);
}

/* ---- the filter's callbacks (worker threads) ---- */

static void
consumed (void *opaque, uint64_t offset, uint64_t count)
{
  struct fleece *f = opaque;

  /* The node is not drained (a request is running): its bitmap list
   * holds still.  Frozen bits have no setters; one clearer at a time.
   */
  pthread_mutex_lock (&f->consume_lock);
  for (size_t i = 0; i < f->nr_bitmaps; ++i) {
    struct dirty_bitmap *d = dirty_bitmap_find (f->source, f->bitmaps[i]);
    if (d && d->successor)
      bitmap_clear (d->bm, offset, count);
  }
  pthread_mutex_unlock (&f->consume_lock);
}

static void
broken (void *opaque, const char *reason)
{
  struct fleece *f = opaque;

  nbdd_warn ("fleece '%s': the snapshot broke: %s; the live node goes on",
             f->id, reason);
  atomic_store (&f->break_pending, true);
  ev_async_send (fleece_loop, &break_async);
}

static void
break_cb (struct ev_loop *loop, ev_async *w, int revents)
{
  for (struct fleece *f = fleeces; f; f = f->next) {
    const char *reason;
    struct json_object *data;

    if (!atomic_exchange (&f->break_pending, false) ||
        (reason = cbw_broken_reason (f->cbw)) == NULL)
      continue;
    data = json_object_new_object ();
    json_object_object_add (data, "id", json_object_new_string (f->id));
    json_object_object_add (data, "reason", json_object_new_string (reason));
    admin_event ("FLEECE_BROKEN", data);
  }
}

void
fleece_init (struct ev_loop *loop)
{
  fleece_loop = loop;
  ev_async_init (&break_async, break_cb);
  ev_async_start (loop, &break_async);
  ev_unref (loop);
}

/* ---- transaction steps ---- */

static void
undo_unlink (void *data)
{
  unlink (data);
}

/* A node the command opened (registered): off the registry again. */
static void
undo_node_open (void *data)
{
  struct node *node = node_lookup (data);

  if (node) {
    node_unregister (node);
    node_unref (node);
  }
}

static void
undo_fleece_add (void *data)
{
  struct fleece *f = data;

  for (struct fleece **p = &fleeces; *p; p = &(*p)->next)
    if (*p == f) {
      *p = f->next;
      break;
    }
  fleece_free (f);
}

/* The filter's users are back: it keeps others from writing under it
 * again.
 */
static void
undo_detaching (void *data)
{
  struct node *cbw = data;
  struct error *err = NULL;

  cbw_set_detaching (cbw, false);
  if (graph_perm_update (&cbw, 1, &err) == -1) {
    nbdd_warn ("undoing fleece-stop: %s", err->msg);
    error_free (err);
  }
}

static void
undo_stopping (void *data)
{
  struct fleece *f = data;

  f->stopping = false;
}

static void
undo_attach (void *data)
{
  cbw_set_detaching (data, true);
}

static void
release_export (void *data)
{
  export_unref (data);
}

static void
undo_export_add (void *data)
{
  export_discard (data);
}

/* ---- fleece-start ---- */

static int
open_node (struct qmp_txn *t, struct json_object *spec, struct node **np,
           struct error **errp)
{
  const char *name = json_object_get_string
    (json_object_object_get (spec, "node-name"));
  char *undo_name = strdup (name);
  struct node *node;

  if (undo_name == NULL) {
    json_object_put (spec);
    error_setg (errp, "out of memory");
    return -1;
  }
  node = node_open_spec (spec, errp);   /* takes its own reference */
  json_object_put (spec);
  if (node == NULL) {
    free (undo_name);
    return -1;
  }
  txn_step (t, undo_node_open, NULL, free, undo_name);
  node_ref (node);
  *np = node;
  return 0;
}

/* STATE_DIR/fleece/ID.qcow2, created empty (never an old file). */
static char *
scratch_create (struct qmp_txn *t, const char *id, struct error **errp)
{
  char *dir = NULL, *path = NULL;
  int fd;

  if (asprintf (&dir, "%s/fleece", config.state_dir) == -1 ||
      asprintf (&path, "%s/%s.qcow2", dir, id) == -1) {
    free (dir);
    error_setg (errp, "out of memory");
    return NULL;
  }
  if (mkdir (dir, 0700) == -1 && errno != EEXIST) {
    error_setg_errno (errp, errno, "creating %s", dir);
    goto fail;
  }
  fd = open (path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd == -1) {
    error_setg_errno (errp, errno, "creating the scratch image %s", path);
    goto fail;
  }
  close (fd);
  free (dir);
  txn_step (t, undo_unlink, NULL, NULL, path);
  return path;

 fail:
  free (dir);
  free (path);
  return NULL;
}

static int
scratch_format (const char *path, uint64_t size, struct error **errp)
{
  struct json_object *spec = json_object_new_object ();
  struct qcow2_create_opts o = {
    .size = ROUND_UP (size, 512), .lazy_refcounts = true,
  };
  struct node *file;
  int r;

  json_object_object_add (spec, "driver", json_object_new_string ("file"));
  json_object_object_add (spec, "filename", json_object_new_string (path));
  file = node_new (format_find_driver ("file"), NULL, spec, errp);
  json_object_put (spec);
  if (file == NULL)
    return -1;
  r = qcow2_create (file, &o, errp);
  node_unref (file);
  return r;
}

static struct json_object *
spec_new (const char *driver, const char *name)
{
  struct json_object *o = json_object_new_object ();

  json_object_object_add (o, "driver", json_object_new_string (driver));
  json_object_object_add (o, "node-name", json_object_new_string (name));
  return o;
}

static int
check_id (const char *what, const char *id, struct error **errp)
{
  if (strlen (id) > MAX_FLEECE_ID || !node_name_is_valid (id)) {
    error_setg (errp, "fleece-start: %s '%.80s' is not valid (a letter, "
                "then letters, digits, '-', '.' or '_'; at most %d)", what,
                id, MAX_FLEECE_ID);
    return -1;
  }
  return 0;
}

static const char *const start_keys[] = {
  "node", "id", "bitmaps", "export", "scratch-limit", "incremental", NULL
};

int
cmd_fleece_start (struct qmp_txn *t, struct json_object *args,
                  struct json_object **ret, struct error **errp)
{
  const char *id = NULL, *export_id = NULL;
  char gen[32], name[MAX_FLEECE_ID + 16];
  struct fleece *f;
  struct node *src;
  struct json_object *spec, *list;
  struct export *exp;

  if (opt_check_keys (args, "fleece-start", start_keys, errp) == -1 ||
      arg_node (t, args, "fleece-start", "node", &src, errp) == -1 ||
      opt_get_string (args, "fleece-start", "id", false, &id, errp) == -1 ||
      opt_get_string (args, "fleece-start", "export", false, &export_id,
                      errp) == -1)
    return -1;
  if (config.state_dir == NULL) {
    error_setg (errp, "fleece-start: fleecing needs a state dir "
                "(--state-dir) for its scratch image");
    return -1;
  }
  if (id == NULL) {
    for (unsigned i = 0; ; ++i) {
      snprintf (gen, sizeof gen, "fleece%u", i);
      if (fleece_find (gen) == NULL && export_by_id (gen) == NULL)
        break;
    }
    id = gen;
  }
  if (export_id == NULL)
    export_id = id;
  if (check_id ("id", id, errp) == -1 ||
      check_id ("export", export_id, errp) == -1)
    return -1;
  if (fleece_find (id)) {
    error_setg (errp, "fleece '%s' exists", id);
    return -1;
  }
  for (struct fleece *g = fleeces; g; g = g->next)
    if (g->source == src) {
      error_setg (errp, "node '%s' is already fleeced by '%s': stop that "
                  "fleece first", src->name, g->id);
      return -1;
    }
  if (not_in_job (src, errp) == -1)
    return -1;
  if (cbw_is (src) || snapshot_access_is (src)) {
    error_setg (errp, "node '%s' is a %s node: fleece the node it "
                "reads", src->name, src->drv->name);
    return -1;
  }
  if (export_by_id (export_id)) {
    error_setg (errp, "export '%s' exists", export_id);
    return -1;
  }

  f = calloc (1, sizeof *f);
  if (f == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  pthread_mutex_init (&f->consume_lock, NULL);
  atomic_init (&f->break_pending, false);
  f->id = strdup (id);
  f->export_id = strdup (export_id);
  f->started = time (NULL);
  node_ref (src);
  f->source = src;
  if (f->id == NULL || f->export_id == NULL) {
    fleece_free (f);
    error_setg (errp, "out of memory");
    return -1;
  }
  if (opt_get_size (args, "fleece-start", "scratch-limit", false, &f->limit,
                    errp) == -1 ||
      (json_object_object_get_ex (args, "bitmaps", NULL) &&
       opt_get_strings (args, "fleece-start", "bitmaps", &f->bitmaps,
                        &f->nr_bitmaps, errp) == -1) ||
      opt_get_bool (args, "fleece-start", "incremental", false,
                    &f->incremental, errp) == -1) {
    fleece_free (f);
    return -1;
  }
  if (f->incremental && f->nr_bitmaps == 0) {
    error_setg (errp, "fleece-start: 'incremental' needs 'bitmaps': the "
                "snapshot holds only what they mark");
    fleece_free (f);
    return -1;
  }
  for (size_t i = 0; i < f->nr_bitmaps; ++i)
    if (dirty_bitmap_find (src, f->bitmaps[i]) == NULL) {
      t->error_class = "DeviceNotFound";
      error_setg (errp, "node '%s' has no bitmap '%.80s'", src->name,
                  f->bitmaps[i]);
      fleece_free (f);
      return -1;
    }
  /* From here the fleece is the transaction's: undone with it. */
  if (txn_reserve (t, 9 + f->nr_bitmaps, errp) == -1 ||
      txn_drain (t, &src, 1, errp) == -1) {
    fleece_free (f);
    return -1;
  }
  {
    struct fleece **p = &fleeces;       /* oldest first */
    while (*p)
      p = &(*p)->next;
    *p = f;
  }
  txn_step (t, undo_fleece_add, NULL, NULL, f);

  /* 1. The scratch image and its node. */
  if ((f->scratch_path = scratch_create (t, id, errp)) == NULL ||
      scratch_format (f->scratch_path, src->size, errp) == -1)
    return -1;
  snprintf (name, sizeof name, "%s-scratch", id);
  spec = spec_new ("qcow2", name);
  json_object_object_add (spec, "lazy-refcounts",
                          json_object_new_boolean (true));
  {
    struct json_object *file = json_object_new_object ();
    json_object_object_add (file, "driver", json_object_new_string ("file"));
    json_object_object_add (file, "filename",
                            json_object_new_string (f->scratch_path));
    json_object_object_add (spec, "file", file);
  }
  if (open_node (t, spec, &f->scratch, errp) == -1)
    return -1;

  /* 2. The bitmaps' forks. */
  for (size_t i = 0; i < f->nr_bitmaps; ++i)
    if (txn_bitmap_fork (t, src, dirty_bitmap_find (src, f->bitmaps[i]), id,
                         errp) == -1)
      return -1;

  /* 3. The filter, and the node's users onto it. */
  snprintf (name, sizeof name, "%s-cbw", id);
  spec = spec_new ("copy-before-write", name);
  json_object_object_add (spec, "file", json_object_new_string (src->name));
  json_object_object_add (spec, "target",
                          json_object_new_string (f->scratch->name));
  json_object_object_add (spec, "scratch-limit",
                          json_object_new_int64 ((int64_t) f->limit));
  if (open_node (t, spec, &f->cbw, errp) == -1)
    return -1;
  /* Incremental: the clusters no frozen bitmap marks are never read by
   * the backup, so writes there save nothing, and the snapshot's reads
   * there fail rather than return data newer than the point in time.
   */
  if (f->incremental) {
    CLEANUP_FREE const struct bitmap **sets =
      calloc (f->nr_bitmaps, sizeof *sets);
    if (sets == NULL) {
      error_setg (errp, "out of memory");
      return -1;
    }
    for (size_t i = 0; i < f->nr_bitmaps; ++i)
      sets[i] = dirty_bitmap_find (src, f->bitmaps[i])->bm;
    if (cbw_copy_only (f->cbw, sets, f->nr_bitmaps, true) < 0) {
      error_setg (errp, "out of memory");
      return -1;
    }
  }
  if (txn_replace_users (t, src, f->cbw, f->cbw, false, errp) == -1)
    return -1;
  /* Undone before the move: the users may go back then. */
  txn_step (t, undo_attach, NULL, NULL, f->cbw);

  /* 4. The snapshot. */
  snprintf (name, sizeof name, "%s-snap", id);
  spec = spec_new ("snapshot-access", name);
  json_object_object_add (spec, "file", json_object_new_string (f->cbw->name));
  if (open_node (t, spec, &f->snap, errp) == -1)
    return -1;

  /* 5. Its export: writable only for TRIM (writes fail with EPERM). */
  spec = json_object_new_object ();
  json_object_object_add (spec, "type", json_object_new_string ("nbd"));
  json_object_object_add (spec, "id", json_object_new_string (export_id));
  json_object_object_add (spec, "node-name",
                          json_object_new_string (f->snap->name));
  json_object_object_add (spec, "name", json_object_new_string (export_id));
  json_object_object_add (spec, "writable", json_object_new_boolean (true));
  list = json_object_new_array ();
  for (size_t i = 0; i < f->nr_bitmaps; ++i) {
    struct json_object *b = json_object_new_object ();
    json_object_object_add (b, "node", json_object_new_string (src->name));
    json_object_object_add (b, "name",
                            json_object_new_string (f->bitmaps[i]));
    json_object_array_add (list, b);
  }
  json_object_object_add (spec, "bitmaps", list);
  if (export_add (spec, errp) == -1) {
    json_object_put (spec);
    return -1;
  }
  json_object_put (spec);
  exp = export_by_id (export_id);
  exp->recorded = false;
  /* Held by the fleece, and by the command until its drains end. */
  export_ref (exp);
  f->exp = exp;
  export_ref (exp);
  txn_step (t, undo_export_add, NULL, release_export, exp);

  /* 6. The record that ends it at the next start if it is cut short. */
  if (catalog &&
      catalog_fleece_put (catalog, id, src->name, "running",
                          f->scratch_path, errp) == -1)
    return -1;

  cbw_set_hooks (f->cbw, &(struct cbw_hooks) {
      .consumed = consumed, .broken = broken, .opaque = f });
  *ret = json_object_new_object ();
  json_object_object_add (*ret, "id", json_object_new_string (id));
  json_object_object_add (*ret, "export", json_object_new_string (export_id));
  return 0;
}

/* ---- fleece-stop ---- */

static void
unregister (struct node *node)
{
  if (node && node_lookup (node->name) == node) {
    node_unregister (node);
    node_unref (node);
  }
}

/* The point of no return: the snapshot's export goes (its clients are
 * cut off, and any request they still send finds the snapshot ended),
 * and so do the nodes, once their last user lets go.
 */
static void
commit_stop (void *data)
{
  struct fleece *f = data;
  struct export *exp = f->exp;
  struct error *err = NULL;

  cbw_stop (f->cbw);
  cbw_set_hooks (f->cbw, &(struct cbw_hooks) { NULL });
  if (!exp->deleted && export_delete (exp, true, &err) == -1) {
    nbdd_warn ("fleece '%s': deleting export '%s': %s", f->id, f->export_id,
               err->msg);
    error_free (err);
  }
  unregister (f->snap);
  unregister (f->cbw);
  unregister (f->scratch);
  if (unlink (f->scratch_path) == -1 && errno != ENOENT)
    nbdd_warn ("fleece '%s': removing %s: %m", f->id, f->scratch_path);
  for (struct fleece **p = &fleeces; *p; p = &(*p)->next)
    if (*p == f) {
      *p = f->next;
      break;
    }
  fleece_free (f);
}

static const char *const stop_keys[] = { "id", "outcome", NULL };

int
cmd_fleece_stop (struct qmp_txn *t, struct json_object *args,
                 struct json_object **ret, struct error **errp)
{
  const char *id, *outcome;
  struct fleece *f;
  struct export *exp;
  struct node *drain[2];
  bool success;

  if (opt_check_keys (args, "fleece-stop", stop_keys, errp) == -1 ||
      opt_get_string (args, "fleece-stop", "id", true, &id, errp) == -1 ||
      opt_get_string (args, "fleece-stop", "outcome", true, &outcome,
                      errp) == -1)
    return -1;
  if (strcmp (outcome, "success") != 0 && strcmp (outcome, "failure") != 0) {
    error_setg (errp, "fleece-stop: outcome must be 'success' or "
                "'failure'");
    return -1;
  }
  success = strcmp (outcome, "success") == 0;
  if ((f = fleece_find (id)) == NULL)
    return not_found (t, errp, "fleece", id);
  if (f->stopping) {
    error_setg (errp, "fleece '%s' is being stopped already", id);
    return -1;
  }
  drain[0] = f->source;
  drain[1] = f->snap;
  if (txn_reserve (t, 5, errp) == -1 || txn_drain (t, drain, 2, errp) == -1)
    return -1;
  f->stopping = true;
  txn_step (t, undo_stopping, NULL, NULL, f);
  /* The drain holds the export's root until the end of the command,
   * after commit_stop deleted it.
   */
  exp = f->exp;
  export_ref (exp);
  txn_step (t, NULL, NULL, release_export, exp);
  for (size_t i = 0; i < f->nr_bitmaps; ++i) {
    struct dirty_bitmap *d = dirty_bitmap_find (f->source, f->bitmaps[i]);
    if (d && d->successor &&
        txn_bitmap_unfork (t, f->source, d, success, id, errp) == -1)
      return -1;
  }
  cbw_set_detaching (f->cbw, true);
  txn_step (t, undo_detaching, NULL, NULL, f->cbw);
  if (txn_replace_users (t, f->cbw, f->source, f->snap, false, errp) == -1 ||
      (catalog && catalog_fleece_end (catalog, id, false, errp) == -1))
    return -1;
  txn_step (t, NULL, commit_stop, NULL, f);
  return 0;
}

/* ---- what graph changes must leave alone ---- */

const char *
fleece_owning (const struct node *n)
{
  for (struct fleece *f = fleeces; f; f = f->next)
    if (n == f->source || n == f->cbw || n == f->snap || n == f->scratch)
      return f->id;
  return NULL;
}

/* ---- query-fleeces ---- */

int
cmd_query_fleeces (struct qmp_txn *t, struct json_object *args,
                   struct json_object **ret, struct error **errp)
{
  struct json_object *list = json_object_new_array ();
  time_t now = time (NULL);

  if (opt_check_keys (args, "query-fleeces", (const char *const[]) { NULL },
                      errp) == -1) {
    json_object_put (list);
    return -1;
  }
  for (struct fleece *f = fleeces; f; f = f->next) {
    struct json_object *o = json_object_new_object (), *b;
    struct export *exp = f->exp->deleted ? NULL : f->exp;
    const char *reason = cbw_broken_reason (f->cbw);

    json_object_object_add (o, "id", json_object_new_string (f->id));
    json_object_object_add (o, "node",
                            json_object_new_string (f->source->name));
    json_object_object_add (o, "export",
                            json_object_new_string (f->export_id));
    b = json_object_new_array ();
    for (size_t i = 0; i < f->nr_bitmaps; ++i)
      json_object_array_add (b, json_object_new_string (f->bitmaps[i]));
    json_object_object_add (o, "bitmaps", b);
    json_object_object_add (o, "incremental",
                            json_object_new_boolean (f->incremental));
    json_object_object_add (o, "scratch-bytes", json_object_new_int64
                            ((int64_t) cbw_scratch_bytes (f->cbw)));
    json_object_object_add (o, "scratch-limit",
                            json_object_new_int64 ((int64_t) f->limit));
    json_object_object_add (o, "scratch-file",
                            json_object_new_string (f->scratch_path));
    json_object_object_add (o, "started", json_object_new_int64 (f->started));
    json_object_object_add (o, "age", json_object_new_int64
                            (now > f->started ? now - f->started : 0));
    json_object_object_add (o, "clients", json_object_new_int
                            (exp ? (int) export_clients (exp) : 0));
    json_object_object_add (o, "state", json_object_new_string
                            (reason ? "broken" : "running"));
    if (reason)
      json_object_object_add (o, "error", json_object_new_string (reason));
    json_object_array_add (list, o);
  }
  *ret = list;
  return 0;
}

/* ---- a fleece cut short ---- */

struct leftover {
  char *id;
};

struct leftovers {
  struct leftover *v;
  size_t len, cap;
};

static int
collect (const struct catalog_fleece *row, void *opaque)
{
  struct leftovers *l = opaque;

  if (l->len == l->cap) {
    size_t ncap = l->cap ? 2 * l->cap : 4;
    struct leftover *nv = realloc (l->v, ncap * sizeof *nv);
    if (nv == NULL)
      return -1;
    l->v = nv;
    l->cap = ncap;
  }
  if ((l->v[l->len].id = strdup (row->id)) == NULL)
    return -1;
  l->len++;
  return 0;
}

/* No fleece runs at start: a scratch image is a leftover, whether its
 * session was recorded or the daemon died before it was.
 */
static void
remove_scratch_leftovers (void)
{
  CLEANUP_FREE char *dir = NULL;
  struct dirent *ent;
  DIR *d;

  if (asprintf (&dir, "%s/fleece", config.state_dir) == -1 ||
      (d = opendir (dir)) == NULL)
    return;
  while ((ent = readdir (d)) != NULL) {
    size_t n = strlen (ent->d_name);
    if (n > 6 && strcmp (ent->d_name + n - 6, ".qcow2") == 0 &&
        unlinkat (dirfd (d), ent->d_name, 0) == -1)
      nbdd_warn ("removing %s/%s: %m", dir, ent->d_name);
  }
  closedir (d);
}

int
fleece_recover (struct error **errp)
{
  struct leftovers l = { 0 };
  int r = 0;

  if (catalog == NULL)
    return 0;
  remove_scratch_leftovers ();
  if (catalog_fleece_foreach (catalog, collect, &l, errp) == -1) {
    if (errp && *errp == NULL)
      error_setg (errp, "out of memory reading fleece sessions");
    r = -1;
  }
  if (r == 0 && l.len > 0 && catalog_begin (catalog, errp) == -1)
    r = -1;
  for (size_t i = 0; i < l.len && r == 0; ++i) {
    nbdd_warn ("fleece '%s' was cut short (the daemon stopped): ended as "
               "a failure, its bitmaps keep every bit", l.v[i].id);
    if (catalog_fleece_end (catalog, l.v[i].id, true, errp) == -1)
      r = -1;
  }
  if (l.len > 0) {
    if (r == 0)
      r = catalog_commit (catalog, errp);
    else
      catalog_rollback (catalog);
  }
  for (size_t i = 0; i < l.len; ++i)
    free (l.v[i].id);
  free (l.v);
  return r;
}
