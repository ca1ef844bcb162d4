/* QMP commands: what the admin socket can do.
 *
 * A command is validated, applied to the running graph, and recorded
 * in the catalogue, all inside one catalogue transaction.  Each step
 * that changed the runtime registers how to undo it; if anything fails
 * (a later action of a 'transaction', or the catalogue commit itself)
 * the undo steps run in reverse and the catalogue rolls back, so the
 * daemon and its catalogue never disagree.  Steps that cannot be undone
 * (closing a node, dropping an export's clients) are deferred until
 * the commit has succeeded.  Room for each step is reserved before the
 * change it undoes, so recording a step never fails.
 *
 * Nodes whose users move are drained from the change until the end of
 * the command: a request must not run on the new graph, and have its
 * write acknowledged there, before the change is committed (it would
 * be lost if the change were undone).
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "catalog.h"
#include "cbw.h"
#include "cleanup.h"
#include "internal.h"
#include "log.h"
#include "options.h"
#include "qcow2-create.h"
#include "qmp.h"
#include "throttle.h"

/* Room for @n more steps (and a drain), before making a change. */
int
txn_reserve (struct qmp_txn *t, size_t n, struct error **errp)
{
  if (t->nr_steps + n > t->cap_steps) {
    size_t ncap = MAX (t->cap_steps * 2, t->nr_steps + n + 8);
    struct step *v = realloc (t->steps, ncap * sizeof *v);
    if (v == NULL)
      goto nomem;
    t->steps = v;
    t->cap_steps = ncap;
  }
  if (t->nr_drains + 1 > t->cap_drains) {
    size_t ncap = t->cap_drains * 2 + 4;
    struct graph_drain **v = realloc (t->drains, ncap * sizeof *v);
    if (v == NULL)
      goto nomem;
    t->drains = v;
    t->cap_drains = ncap;
  }
  return 0;

 nomem:
  error_setg (errp, "out of memory");
  return -1;
}

/* Record a step; room was reserved. */
void
txn_step (struct qmp_txn *t, void (*undo) (void *), void (*commit) (void *),
          void (*release) (void *), void *data)
{
  assert (t->nr_steps < t->cap_steps);
  t->steps[t->nr_steps++] = (struct step) { undo, commit, release, data };
}

/* Drain @nodes until the end of the command (room was reserved). */
int
txn_drain (struct qmp_txn *t, struct node *const *nodes, size_t n,
           struct error **errp)
{
  struct graph_drain *d = graph_drain_begin (nodes, n, errp);

  if (d == NULL)
    return -1;
  assert (t->nr_drains < t->cap_drains);
  t->drains[t->nr_drains++] = d;
  return 0;
}

int
not_found (struct qmp_txn *t, struct error **errp, const char *what,
           const char *name)
{
  t->error_class = "DeviceNotFound";
  error_setg (errp, "%s '%.80s' does not exist", what, name);
  return -1;
}

int
arg_node (struct qmp_txn *t, struct json_object *args, const char *what,
          const char *key, struct node **nodep, struct error **errp)
{
  const char *name;

  if (opt_get_string (args, what, key, true, &name, errp) == -1)
    return -1;
  if ((*nodep = node_lookup (name)) == NULL)
    return not_found (t, errp, "node", name);
  return 0;
}

const char *
json_text (struct json_object *o)
{
  return json_object_to_json_string_ext (o, JSON_C_TO_STRING_PLAIN);
}

/* ---- nodes ---- */

static void
undo_node_add (void *data)
{
  char *name = data;
  struct error *err = NULL;

  if (node_delete (name, &err) == -1) {
    nbdd_warn ("undoing blockdev-add: %s", err->msg);
    error_free (err);
  }
}

static int
cmd_blockdev_add (struct qmp_txn *t, struct json_object *args,
                  struct json_object **ret, struct error **errp)
{
  struct json_object *spec = NULL;
  const char *name;
  struct node *node;
  char *undo_name;

  if (opt_get_string (args, "blockdev-add", "node-name", true, &name,
                      errp) == -1 ||
      txn_reserve (t, 1, errp) == -1)
    return -1;
  /* The node keeps its spec and may add to it (read-only inherited by
   * inline children): a copy of its own, not the message's.
   */
  undo_name = strdup (name);
  if (undo_name == NULL || json_object_deep_copy (args, &spec, NULL) != 0) {
    free (undo_name);
    error_setg (errp, "out of memory");
    return -1;
  }
  node = node_open_spec (spec, errp);
  json_object_put (spec);
  if (node == NULL) {
    free (undo_name);
    return -1;
  }
  node->recorded = catalog != NULL;
  txn_step (t, undo_node_add, NULL, free, undo_name);
  if (catalog && catalog_node_put (catalog, name, json_text (node->spec),
                                   errp) == -1)
    return -1;
  return 0;
}

/* blockdev-del takes the node off the registry at once, so that later
 * actions of a transaction no longer find it; it is closed at commit.
 */
static void
undo_node_del (void *data)
{
  struct error *err = NULL;

  if (node_register (data, &err) == -1) {
    nbdd_warn ("undoing blockdev-del: %s", err->msg);
    error_free (err);
  }
}

static void
release_node (void *data)
{
  node_unref (data);
}

static const char *const node_del_keys[] = { "node-name", NULL };

static int
cmd_blockdev_del (struct qmp_txn *t, struct json_object *args,
                  struct json_object **ret, struct error **errp)
{
  const char *name;
  struct node *node;

  if (opt_check_keys (args, "blockdev-del", node_del_keys, errp) == -1 ||
      arg_node (t, args, "blockdev-del", "node-name", &node, errp) == -1)
    return -1;
  name = node->name;
  if (node_check_unused (node, "node", errp) == -1)
    return -1;
  if (txn_reserve (t, 1, errp) == -1)
    return -1;
  /* The registry's reference is now the step's. */
  node_unregister (node);
  txn_step (t, undo_node_del, NULL, release_node, node);
  if (catalog && catalog_node_del (catalog, name, errp) == -1)
    return -1;
  return 0;
}

static struct json_object *
node_info (struct node *n)
{
  struct json_object *o = json_object_new_object ();
  struct json_object *img = json_object_new_object ();
  struct json_object *children = json_object_new_array ();
  struct json_object *users = json_object_new_array ();
  const char *fn = node_filename (n);

  json_object_object_add (o, "node-name", json_object_new_string (n->name));
  json_object_object_add (o, "drv", json_object_new_string (n->drv->name));
  json_object_object_add (o, "ro", json_object_new_boolean (n->read_only));
  json_object_object_add (o, "file", json_object_new_string (fn ? fn : ""));
  json_object_object_add (img, "filename",
                          json_object_new_string (fn ? fn : ""));
  json_object_object_add (img, "format",
                          json_object_new_string (n->drv->name));
  json_object_object_add (img, "virtual-size",
                          json_object_new_int64 ((int64_t) node_size (n)));
  json_object_object_add (o, "image", img);
  for (size_t i = 0; i < n->nr_children; ++i) {
    struct json_object *c = json_object_new_object ();
    json_object_object_add (c, "child",
                            json_object_new_string (n->children[i]->name));
    json_object_object_add (c, "node-name",
                            json_object_new_string (n->children[i]->node->name));
    json_object_array_add (children, c);
  }
  json_object_object_add (o, "children", children);
  for (size_t i = 0; i < n->nr_parents; ++i) {
    const struct node_child *e = n->parents[i];
    struct json_object *u = json_object_new_object ();
    if (e->parent) {
      json_object_object_add (u, "kind", json_object_new_string ("node"));
      json_object_object_add (u, "name",
                              json_object_new_string (e->parent->name));
      json_object_object_add (u, "child", json_object_new_string (e->name));
    }
    else {
      const struct node_root *r = container_of (e, struct node_root, edge);
      json_object_object_add (u, "kind",
                              json_object_new_string (r->kind ? r->kind
                                                      : "root"));
      json_object_object_add (u, "name",
                              json_object_new_string (r->owner_name ?
                                                      r->owner_name : ""));
    }
    json_object_object_add (u, "perm", perm_to_json (e->perm));
    json_object_object_add (u, "shared", perm_to_json (e->shared));
    json_object_array_add (users, u);
  }
  json_object_object_add (o, "users", users);
  json_object_object_add (o, "dirty-bitmaps", dirty_bitmaps_info (n));
  if (strcmp (n->drv->name, "throttle") == 0)
    json_object_object_add (o, "throttle-group",
                            json_object_new_string (throttle_node_group (n)));
  return o;
}

static int
cmd_query_named_block_nodes (struct qmp_txn *t, struct json_object *args,
                             struct json_object **ret, struct error **errp)
{
  struct json_object *a = json_object_new_array ();
  struct node *n;
  size_t count = 0;

  /* Newest first on the list: reverse it for creation order. */
  for (n = node_first (); n; n = n->all_next)
    count++;
  for (size_t i = 0; i < count; ++i)
    json_object_array_add (a, NULL);
  for (n = node_first (); n; n = n->all_next)
    json_object_array_put_idx (a, --count, node_info (n));
  *ret = a;
  return 0;
}

/* ---- blockdev-create ---- */

/* Create @filename empty (or keep it if it exists and is empty): never
 * overwrite data.
 */
static int
create_file (const char *filename, uint64_t size, struct error **errp)
{
  struct stat st;
  int fd = open (filename, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);

  if (fd == -1) {
    error_setg_errno (errp, errno, "%s", filename);
    return -1;
  }
  if (fstat (fd, &st) == -1) {
    error_setg_errno (errp, errno, "%s", filename);
    close (fd);
    return -1;
  }
  if (S_ISREG (st.st_mode) && st.st_size > 0) {
    error_setg (errp, "'%s' exists and is not empty: "
                "remove it first", filename);
    close (fd);
    return -1;
  }
  if (S_ISREG (st.st_mode) && ftruncate (fd, size) == -1) {
    error_setg_errno (errp, errno, "%s", filename);
    close (fd);
    return -1;
  }
  if (fsync (fd) == -1 || close (fd) == -1) {
    error_setg_errno (errp, errno, "%s", filename);
    return -1;
  }
  return 0;
}

/* The protocol node to create an image on: a node-name (not in use)
 * or an inline spec, whose file is created if it does not exist.
 */
static struct node *
create_target (struct json_object *opts, struct error **errp)
{
  struct json_object *ref, *copy = NULL;
  struct node *node;

  if (!json_object_object_get_ex (opts, "file", &ref)) {
    error_setg (errp, "parameter 'file' is missing");
    return NULL;
  }
  if (json_object_is_type (ref, json_type_string)) {
    node = node_lookup (json_object_get_string (ref));
    if (node == NULL) {
      error_setg (errp, "node '%.80s' does not exist",
                  json_object_get_string (ref));
      return NULL;
    }
    if (node_check_unused (node, "node", errp) == -1)
      return NULL;
    node_ref (node);
    return node;
  }
  if (json_object_is_type (ref, json_type_object)) {
    const char *driver, *fn;
    if (opt_get_string (ref, "blockdev-create", "driver", true, &driver,
                        errp) == -1)
      return NULL;
    if (strcmp (driver, "file") != 0) {
      error_setg (errp, "an inline 'file' must have "
                  "driver 'file'");
      return NULL;
    }
    if (opt_get_string (ref, "blockdev-create", "filename", true, &fn,
                        errp) == -1 ||
        create_file (fn, 0, errp) == -1)
      return NULL;
    if (json_object_deep_copy (ref, &copy, NULL) != 0) {
      error_setg (errp, "out of memory");
      return NULL;
    }
    node = node_new (format_find_driver ("file"), NULL, copy, errp);
    json_object_put (copy);
    return node;
  }
  error_setg (errp, "'file' must be a node-name or a "
              "blockdev spec");
  return NULL;
}

static const char *const create_keys[] = { "job-id", "options", NULL };

static int
cmd_blockdev_create (struct qmp_txn *t, struct json_object *args,
                     struct json_object **ret, struct error **errp)
{
  struct json_object *opts;
  const char *driver;
  uint64_t size;

  if (opt_check_keys (args, "blockdev-create", create_keys, errp) == -1)
    return -1;
  if (!json_object_object_get_ex (args, "options", &opts) ||
      !json_object_is_type (opts, json_type_object)) {
    error_setg (errp, "'options' (an object) is missing");
    return -1;
  }
  if (opt_get_string (opts, "blockdev-create", "driver", true, &driver,
                      errp) == -1 ||
      opt_get_size (opts, "blockdev-create", "size", true, &size,
                    errp) == -1)
    return -1;

  if (strcmp (driver, "file") == 0) {
    static const char *const keys[] = {
      "driver", "filename", "size", "preallocation", "nocow", NULL
    };
    const char *fn;
    if (opt_check_keys (opts, "blockdev-create", keys, errp) == -1 ||
        opt_get_string (opts, "blockdev-create", "filename", true, &fn,
                        errp) == -1)
      return -1;
    return create_file (fn, size, errp);
  }
  if (strcmp (driver, "qcow2") == 0) {
    struct qcow2_create_opts o;
    struct node *file;
    int r;
    if (qcow2_create_opts_from_json (opts, &o, errp) == -1 ||
        (file = create_target (opts, errp)) == NULL)
      return -1;
    r = qcow2_create (file, &o, errp);
    node_unref (file);
    return r;
  }
  if (strcmp (driver, "raw") == 0) {
    static const char *const keys[] = {
      "driver", "file", "size", "preallocation", NULL
    };
    struct node *file;
    int r;
    if (opt_check_keys (opts, "blockdev-create", keys, errp) == -1 ||
        (file = create_target (opts, errp)) == NULL)
      return -1;
    r = node_truncate (file, size);
    if (r == 0)
      r = node_flush (file);
    node_unref (file);
    if (r < 0) {
      error_setg_errno (errp, -r, "sizing the raw image");
      return -1;
    }
    return 0;
  }
  error_setg (errp, "driver '%.80s' is not supported "
              "(file, raw, qcow2)", driver);
  return -1;
}

/* ---- moving users between nodes ---- */

/* A spec value rewritten in place, and how to put it back. */
struct spec_change {
  struct json_object *obj;
  char *key;
  struct json_object *old;      /* a reference, or NULL */
  bool absent;                  /* the key was not there */
};

static void
undo_spec_change (void *data)
{
  struct spec_change *sc = data;

  if (sc->absent)
    json_object_object_del (sc->obj, sc->key);
  else
    json_object_object_add (sc->obj, sc->key, json_object_get (sc->old));
}

static void
release_spec_change (void *data)
{
  struct spec_change *sc = data;

  json_object_put (sc->obj);
  json_object_put (sc->old);
  free (sc->key);
  free (sc);
}

/* @obj's @key becomes @value (the step takes it; NULL: JSON null).
 * Needs one reserved step.
 */
static int
set_spec_value (struct qmp_txn *t, struct json_object *obj, const char *key,
                struct json_object *value, struct error **errp)
{
  struct json_object *v = NULL;
  struct spec_change *sc = calloc (1, sizeof *sc);

  if (sc == NULL || (sc->key = strdup (key)) == NULL) {
    free (sc);
    json_object_put (value);
    error_setg (errp, "out of memory");
    return -1;
  }
  sc->obj = json_object_get (obj);
  sc->absent = !json_object_object_get_ex (obj, key, &v);
  sc->old = json_object_get (v);
  json_object_object_add (obj, key, value);
  txn_step (t, undo_spec_change, NULL, release_spec_change, sc);
  return 0;
}

/* Needs one reserved step. */
static int
set_spec_string (struct qmp_txn *t, struct json_object *obj, const char *key,
                 const char *value, struct error **errp)
{
  return set_spec_value (t, obj, key, json_object_new_string (value), errp);
}

/* The registered node whose spec holds @n's (itself, or the parent it
 * is an inline child of), or NULL.
 */
static struct node *
spec_owner (struct node *n)
{
  while (n) {
    if (node_lookup (n->name) == n)
      return n;
    n = n->nr_parents == 1 ? n->parents[0]->parent : NULL;
  }
  return NULL;
}

/* Edges that moved to @to: make the specs that describe them say so,
 * in memory and in the catalogue.
 */
static int
record_moved_users (struct qmp_txn *t, struct node_child *const *moved,
                    size_t n, struct node *to, struct error **errp)
{
  if (txn_reserve (t, n, errp) == -1)
    return -1;
  for (size_t i = 0; i < n; ++i) {
    struct node_child *e = moved[i];

    if (e->parent == NULL) {
      struct node_root *r = container_of (e, struct node_root, edge);
      struct export *exp = r->owner;
      /* Only an export's spec names its node (a job's does not). */
      if (exp == NULL || r->kind == NULL || strcmp (r->kind, "export") != 0)
        continue;
      if (set_spec_string (t, exp->spec, "node-name", to->name, errp) == -1)
        return -1;
      if (catalog && exp->recorded &&
          catalog_export_put (catalog, exp->id, json_text (exp->spec),
                              errp) == -1)
        return -1;
    }
    else {
      struct node *owner = spec_owner (e->parent);
      if (set_spec_string (t, e->parent->spec, e->name, to->name,
                           errp) == -1)
        return -1;
      if (catalog && owner && owner->recorded &&
          catalog_node_put (catalog, owner->name, json_text (owner->spec),
                            errp) == -1)
        return -1;
    }
  }
  return 0;
}

struct replace_undo {
  struct node *from, *to;
  struct node_child **moved;    /* the edges that went to 'to' */
  size_t nr_moved;
};

static void
undo_replace (void *data)
{
  struct replace_undo *u = data;
  struct error *err = NULL;

  /* Still drained (the command's drain ends after the undo steps). */
  if (graph_move_edges (u->moved, u->nr_moved, u->from, &err) == -1) {
    nbdd_warn ("undoing a graph change: %s", err->msg);
    error_free (err);
  }
}

static void
release_replace (void *data)
{
  struct replace_undo *u = data;

  node_unref (u->from);
  node_unref (u->to);
  free (u->moved);
  free (u);
}

int
txn_replace_users (struct qmp_txn *t, struct node *from, struct node *to,
                   struct node *except, bool record, struct error **errp)
{
  struct node *nodes[] = { from, to };
  struct replace_undo *u = calloc (1, sizeof *u);

  if (u == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  if (txn_reserve (t, 1, errp) == -1 || txn_drain (t, nodes, 2, errp) == -1 ||
      graph_replace_node (from, to, except, &u->moved, &u->nr_moved,
                          errp) == -1) {
    free (u);
    return -1;
  }
  node_ref (from);
  node_ref (to);
  u->from = from;
  u->to = to;
  txn_step (t, undo_replace, NULL, release_replace, u);
  return record ? record_moved_users (t, u->moved, u->nr_moved, to, errp)
    : 0;
}

/* Graph changes leave a fleece's nodes alone: they would change what
 * its snapshot shows, or cut its filter out of the live node's path.
 */
int
not_fleeced (const struct node *n, struct error **errp)
{
  const char *id = fleece_owning (n);

  if (id == NULL)
    return not_in_job (n, errp);
  error_setg (errp, "node '%s' is part of fleece '%s': stop the fleece "
              "first", n->name, id);
  return -1;
}

int
not_in_job (const struct node *n, struct error **errp)
{
  for (size_t i = 0; i < n->nr_parents; ++i) {
    const struct node_child *e = n->parents[i];
    const struct node_root *r;
    if (e->parent && cbw_is (e->parent)) {
      error_setg (errp, "node '%s' is being backed up (filter '%s'): end "
                  "the job first", n->name, e->parent->name);
      return -1;
    }
    if (e->parent)
      continue;
    r = container_of (e, struct node_root, edge);
    if (r->kind && strcmp (r->kind, "job") == 0) {
      error_setg (errp, "node '%s' is in use by %s: end the job first",
                  n->name, r->user ? r->user : "a job");
      return -1;
    }
  }
  return 0;
}

/* The child a filter passes requests to. */
static struct node_child *
filtered_child (struct node *f)
{
  for (size_t i = 0; i < f->nr_children; ++i)
    if (f->children[i]->role & CHILD_FILTERED)
      return f->children[i];
  return NULL;
}

static const char *const insert_keys[] = { "node", "filter", NULL };

static int
cmd_blockdev_insert_node (struct qmp_txn *t, struct json_object *args,
                          struct json_object **ret, struct error **errp)
{
  const char *name, *fname;
  struct node *node, *filter;
  struct node_child *fc;

  if (opt_check_keys (args, "blockdev-insert-node", insert_keys,
                      errp) == -1 ||
      arg_node (t, args, "blockdev-insert-node", "node", &node, errp) == -1 ||
      arg_node (t, args, "blockdev-insert-node", "filter", &filter,
                errp) == -1)
    return -1;
  name = node->name;
  fname = filter->name;
  if (not_fleeced (node, errp) == -1 || not_fleeced (filter, errp) == -1)
    return -1;
  fc = filtered_child (filter);
  if (!filter->drv->is_filter || fc == NULL) {
    error_setg (errp, "node '%s' (driver %s) is not a filter", fname,
                filter->drv->name);
    return -1;
  }
  if (fc->node != node) {
    error_setg (errp, "filter '%s' must have 'file' set to '%s' (it "
                "filters '%s')", fname, name, fc->node->name);
    return -1;
  }
  if (node_check_unused (filter, "filter", errp) == -1)
    return -1;
  return txn_replace_users (t, node, filter, filter, true, errp);
}

/* blockdev-replace (as proposed for QEMU): point one edge, an
 * export's or a node's child, at another node.
 */
static const char *const replace_keys[] = {
  "parent-type", "export-id", "node-name", "child", "new-child", NULL
};

static int
cmd_blockdev_replace (struct qmp_txn *t, struct json_object *args,
                      struct json_object **ret, struct error **errp)
{
  const char *type, *new_name, *id = NULL, *pname = NULL, *child = NULL;
  struct node_child *edge = NULL;
  struct node *to, *nodes[2];
  struct replace_undo *u;

  if (opt_check_keys (args, "blockdev-replace", replace_keys, errp) == -1 ||
      opt_get_string (args, "blockdev-replace", "parent-type", true, &type,
                      errp) == -1 ||
      opt_get_string (args, "blockdev-replace", "new-child", true,
                      &new_name, errp) == -1 ||
      opt_get_string (args, "blockdev-replace", "export-id", false, &id,
                      errp) == -1 ||
      opt_get_string (args, "blockdev-replace", "node-name", false, &pname,
                      errp) == -1 ||
      opt_get_string (args, "blockdev-replace", "child", false, &child,
                      errp) == -1)
    return -1;
  if ((to = node_lookup (new_name)) == NULL)
    return not_found (t, errp, "node", new_name);
  if (strcmp (type, "export") == 0) {
    struct export *exp;
    if (id == NULL || pname || child) {
      error_setg (errp, "parent-type 'export' takes 'export-id' (and not "
                  "'node-name' or 'child')");
      return -1;
    }
    if ((exp = export_by_id (id)) == NULL)
      return not_found (t, errp, "export", id);
    if (exp->writable && to->read_only) {
      error_setg (errp, "export '%s' is writable and node '%s' is "
                  "read-only", id, new_name);
      return -1;
    }
    edge = &exp->root.edge;
  }
  else if (strcmp (type, "driver") == 0) {
    struct node *parent;
    if (pname == NULL || child == NULL || id) {
      error_setg (errp, "parent-type 'driver' takes 'node-name' and "
                  "'child' (and not 'export-id')");
      return -1;
    }
    if ((parent = node_lookup (pname)) == NULL)
      return not_found (t, errp, "node", pname);
    for (size_t i = 0; i < parent->nr_children; ++i)
      if (strcmp (parent->children[i]->name, child) == 0)
        edge = parent->children[i];
    if (edge == NULL) {
      error_setg (errp, "node '%s' has no child '%.80s'", pname, child);
      return -1;
    }
    if (to == parent) {
      error_setg (errp, "node '%s' cannot be its own child", pname);
      return -1;
    }
  }
  else {
    error_setg (errp, "parent-type must be 'export' or 'driver'");
    return -1;
  }
  if (edge->node == to)
    return 0;
  if (not_fleeced (edge->node, errp) == -1 || not_fleeced (to, errp) == -1 ||
      (edge->parent && not_fleeced (edge->parent, errp) == -1))
    return -1;
  if (node_size (to) != node_size (edge->node)) {
    error_setg (errp, "node '%s' has %" PRIu64 " bytes and '%s' %" PRIu64
                ": a replacement must have the same size", new_name,
                node_size (to), edge->node->name, node_size (edge->node));
    return -1;
  }
  u = calloc (1, sizeof *u);
  if (u == NULL || (u->moved = malloc (sizeof *u->moved)) == NULL) {
    free (u);
    error_setg (errp, "out of memory");
    return -1;
  }
  u->moved[0] = edge;
  u->nr_moved = 1;
  nodes[0] = edge->node;
  nodes[1] = to;
  u->from = edge->node;
  u->to = to;
  if (txn_reserve (t, 1, errp) == -1 || txn_drain (t, nodes, 2, errp) == -1 ||
      graph_move_edges (u->moved, 1, to, errp) == -1) {
    free (u->moved);
    free (u);
    return -1;
  }
  node_ref (u->from);
  node_ref (u->to);
  txn_step (t, undo_replace, NULL, release_replace, u);
  return record_moved_users (t, u->moved, 1, to, errp);
}

static const char *const remove_keys[] = { "filter", NULL };

static int
cmd_blockdev_remove_node (struct qmp_txn *t, struct json_object *args,
                          struct json_object **ret, struct error **errp)
{
  const char *fname;
  struct node *filter;
  struct node_child *fc;

  if (opt_check_keys (args, "blockdev-remove-node", remove_keys,
                      errp) == -1 ||
      arg_node (t, args, "blockdev-remove-node", "filter", &filter,
                errp) == -1)
    return -1;
  fname = filter->name;
  if (not_fleeced (filter, errp) == -1)
    return -1;
  fc = filtered_child (filter);
  if (!filter->drv->is_filter || fc == NULL) {
    error_setg (errp, "node '%s' (driver %s) is not a filter", fname,
                filter->drv->name);
    return -1;
  }
  if (node_lookup (fc->node->name) != fc->node) {
    error_setg (errp, "filter '%s' filters an unnamed node: its users "
                "cannot be recorded as using it", fname);
    return -1;
  }
  return txn_replace_users (t, filter, fc->node, NULL, true, errp);
}

struct snapshot_undo {
  struct node *overlay;
  struct node_child *edge;
};

static void
undo_snapshot (void *data)
{
  struct snapshot_undo *u = data;

  u->overlay->drv->set_backing (u->overlay, NULL, NULL);
  node_detach_child (u->edge);
}

static void
release_snapshot (void *data)
{
  struct snapshot_undo *u = data;

  node_unref (u->overlay);
  free (u);
}

static const char *const snapshot_keys[] = { "node", "overlay", NULL };

/* QEMU's blockdev-snapshot: @overlay, added with "backing": null and
 * created naming @node's image as its backing file, takes @node as its
 * backing node and every user of @node.
 */
static int
cmd_blockdev_snapshot (struct qmp_txn *t, struct json_object *args,
                       struct json_object **ret, struct error **errp)
{
  const char *name, *oname;
  struct node *node, *overlay;
  struct snapshot_undo *u;
  struct node_child *edge;

  if (opt_check_keys (args, "blockdev-snapshot", snapshot_keys,
                      errp) == -1 ||
      arg_node (t, args, "blockdev-snapshot", "node", &node, errp) == -1 ||
      arg_node (t, args, "blockdev-snapshot", "overlay", &overlay,
                errp) == -1)
    return -1;
  name = node->name;
  oname = overlay->name;
  if (not_fleeced (node, errp) == -1 || not_fleeced (overlay, errp) == -1)
    return -1;
  if (node == overlay) {
    error_setg (errp, "a node cannot be its own "
                "overlay");
    return -1;
  }
  if (overlay->drv->set_backing == NULL) {
    error_setg (errp, "node '%s' (driver %s) cannot "
                "have a backing node: use a qcow2 overlay", oname,
                overlay->drv->name);
    return -1;
  }
  if (overlay->read_only) {
    error_setg (errp, "overlay '%s' is read-only",
                oname);
    return -1;
  }
  if (node_check_unused (overlay, "overlay", errp) == -1)
    return -1;
  if (node_size (overlay) < node_size (node)) {
    error_setg (errp, "overlay '%s' (%" PRIu64 " bytes) "
                "is smaller than node '%s' (%" PRIu64 " bytes)", oname,
                node_size (overlay), name, node_size (node));
    return -1;
  }
  u = malloc (sizeof *u);
  if (u == NULL || txn_reserve (t, 2, errp) == -1) {
    free (u);
    error_setg (errp, "out of memory");
    return -1;
  }
  edge = node_attach_child (overlay, node, "backing", CHILD_COW, errp);
  if (edge == NULL) {
    free (u);
    return -1;
  }
  if (overlay->drv->set_backing (overlay, edge, errp) == -1) {
    node_detach_child (edge);
    free (u);
    return -1;
  }
  node_ref (overlay);
  *u = (struct snapshot_undo) { overlay, edge };
  txn_step (t, undo_snapshot, NULL, release_snapshot, u);
  if (set_spec_string (t, overlay->spec, "backing", name, errp) == -1)
    return -1;
  if (catalog && overlay->recorded &&
      catalog_node_put (catalog, oname, json_text (overlay->spec),
                        errp) == -1)
    return -1;
  return txn_replace_users (t, node, overlay, overlay, true, errp);
}

static void txn_finish (struct qmp_txn *t, bool ok);

/* ---- a node's backing node changes (block-stream, block-commit) ---- */

struct backing_undo {
  struct node *node;            /* a reference */
  struct node_child *edge;      /* its backing edge */
  struct node *old;             /* a reference: where the edge was */
  bool dropped;                 /* the edge goes at commit */
};

static void
undo_backing (void *data)
{
  struct backing_undo *u = data;
  struct error *err = NULL;

  /* Still drained (the command's drain ends after the undo steps). */
  if (u->dropped)
    u->node->drv->set_backing (u->node, u->edge, NULL);
  else if (graph_move_edges (&u->edge, 1, u->old, &err) == -1) {
    nbdd_warn ("undoing a change of backing node: %s", err->msg);
    error_free (err);
  }
}

static void
commit_backing (void *data)
{
  struct backing_undo *u = data;

  if (u->dropped)
    node_detach_child (u->edge);
}

static void
release_backing (void *data)
{
  struct backing_undo *u = data;

  node_unref (u->node);
  node_unref (u->old);
  free (u);
}

struct header_undo {
  struct node *node;            /* a reference */
  char *file, *fmt;             /* what the header said */
};

static void
undo_header (void *data)
{
  struct header_undo *u = data;
  struct error *err = NULL;

  if (u->node->drv->change_backing_file (u->node, u->file, u->fmt, NULL,
                                         NULL, &err) == -1) {
    nbdd_warn ("undoing a change of backing file: %s", err->msg);
    error_free (err);
  }
}

static void
release_header (void *data)
{
  struct header_undo *u = data;

  node_unref (u->node);
  free (u->file);
  free (u->fmt);
  free (u);
}

int
txn_set_backing (struct qmp_txn *t, struct node *node, struct node *backing,
                 const char *backing_file, struct error **errp)
{
  struct node_child *edge = NULL;
  struct backing_undo *bu;
  struct header_undo *hu;
  struct json_object *v;

  for (size_t i = 0; i < node->nr_children; ++i)
    if (node->children[i]->role & CHILD_COW)
      edge = node->children[i];
  if (edge == NULL || node->drv->set_backing == NULL ||
      node->drv->change_backing_file == NULL) {
    error_setg (errp, "node '%s' (driver %s) has no backing node to "
                "change", node->name, node->drv->name);
    return -1;
  }
  if (edge->node == backing)
    return 0;
  if (backing && backing_file == NULL) {
    error_setg (errp, "node '%s': no backing file name for '%s'",
                node->name, backing->name);
    return -1;
  }
  if (txn_reserve (t, 3, errp) == -1)
    return -1;
  bu = calloc (1, sizeof *bu);
  hu = calloc (1, sizeof *hu);
  if (bu == NULL || hu == NULL) {
    free (bu);
    free (hu);
    error_setg (errp, "out of memory");
    return -1;
  }

  /* The graph.  The old backing node stays alive (the step's
   * reference) until the command is over: an undo puts it back.
   */
  node_ref (node);
  node_ref (edge->node);
  *bu = (struct backing_undo) { node, edge, edge->node, backing == NULL };
  if (backing == NULL)
    node->drv->set_backing (node, NULL, NULL);
  else if (graph_move_edges (&edge, 1, backing, errp) == -1) {
    release_backing (bu);
    free (hu);
    return -1;
  }
  txn_step (t, undo_backing, commit_backing, release_backing, bu);

  /* The image's header. */
  if (node->drv->change_backing_file (node, backing ? backing_file : NULL,
                                      backing ? backing->drv->name : NULL,
                                      &hu->file, &hu->fmt, errp) == -1) {
    free (hu);
    return -1;
  }
  node_ref (node);
  hu->node = node;
  txn_step (t, undo_header, NULL, release_header, hu);

  /* The spec: a chain opened from the header needs nothing more (the
   * header says it now); else "backing" names the node, or holds its
   * spec if it has no name of its own, or is null.
   */
  if (!json_object_object_get_ex (node->spec, "backing", &v))
    return 0;
  v = NULL;                     /* json_object_deep_copy wants NULL */
  if (backing == NULL)
    ;
  else if (node_lookup (backing->name) == backing)
    v = json_object_new_string (backing->name);
  else if (json_object_deep_copy (backing->spec, &v, NULL) != 0) {
    error_setg (errp, "out of memory");
    return -1;
  }
  if (set_spec_value (t, node->spec, "backing", v, errp) == -1)
    return -1;
  {
    struct node *owner = spec_owner (node);
    if (catalog && owner && owner->recorded &&
        catalog_node_put (catalog, owner->name, json_text (owner->spec),
                          errp) == -1)
      return -1;
  }
  return 0;
}

int
txn_run_internal (const char *what,
                  int (*fn) (struct qmp_txn *t, void *opaque,
                             struct error **errp),
                  void *opaque, struct error **errp)
{
  struct qmp_txn t = { .error_class = "GenericError" };
  bool began = false;
  int r = 0;

  if (catalog) {
    r = catalog_begin (catalog, errp);
    began = r == 0;
  }
  if (r == 0)
    r = fn (&t, opaque, errp);
  if (began) {
    if (r == 0)
      r = catalog_commit (catalog, errp);
    else
      catalog_rollback (catalog);
    qmp_jobs_forget_ended ();
  }
  txn_finish (&t, r == 0);
  if (r == 0)
    nbdd_info ("%s: done", what);
  return r;
}

/* QEMU's block_resize: grow a node that only exports use (a parent
 * node would not see its child's new size).  Clients see the new size
 * when they reconnect, as with QEMU.
 */
static const char *const resize_keys[] = { "node-name", "size", NULL };

static int
cmd_block_resize (struct qmp_txn *t, struct json_object *args,
                  struct json_object **ret, struct error **errp)
{
  const char *name;
  uint64_t size;
  struct node *node;
  int r;

  if (opt_check_keys (args, "block_resize", resize_keys, errp) == -1 ||
      arg_node (t, args, "block_resize", "node-name", &node, errp) == -1 ||
      opt_get_uint64 (args, "block_resize", "size", true, &size,
                      errp) == -1)
    return -1;
  name = node->name;
  for (size_t i = 0; i < node->nr_parents; ++i)
    if (node->parents[i]->parent) {
      error_setg (errp, "node '%s' is used by node '%s': resize the node "
                  "its exports use", name, node->parents[i]->parent->name);
      return -1;
    }
  /* A job copying the node takes it as it is. */
  for (size_t i = 0; i < node->nr_parents; ++i)
    if (!(node->parents[i]->shared & PERM_RESIZE)) {
      char who[200];
      edge_describe (node->parents[i], who, sizeof who);
      error_setg (errp, "node '%s' cannot be resized: %s does not allow "
                  "it", name, who);
      return -1;
    }
  if (node->limits.request_alignment > 1 &&
      size % node->limits.request_alignment) {
    error_setg (errp, "size %" PRIu64 " is not a multiple of node '%s''s "
                "alignment (%" PRIu32 ")", size, name,
                node->limits.request_alignment);
    return -1;
  }
  for (struct dirty_bitmap *d = node->dirty; d; d = d->next)
    if (d->busy) {
      error_setg (errp, "node '%s': bitmap '%s' is exported: delete the "
                  "export before resizing", name, d->name);
      return -1;
    }
  if (txn_reserve (t, 0, errp) == -1 ||
      txn_drain (t, &node, 1, errp) == -1)
    return -1;
  /* Stored bitmaps are sized for the image: until they are stored again
   * at the new size, they must not look valid.
   */
  if (dirty_bitmaps_store (node, DIRTY_STORE_IN_USE, errp) == -1)
    return -1;
  r = node_truncate (node, size);
  if (r == -ENOTSUP && size < node_size (node)) {
    error_setg (errp, "node '%s' cannot shrink (%" PRIu64 " bytes now)",
                name, node_size (node));
    return -1;
  }
  if (r < 0) {
    error_setg_errno (errp, -r, "resizing node '%s' (driver %s) to %" PRIu64
                      " bytes", name, node->drv->name, size);
    return -1;
  }
  if (dirty_bitmaps_resize (node, node_size (node)) < 0) {
    error_setg (errp, "node '%s' was resized, but not its bitmaps (out of "
                "memory)", name);
    return -1;
  }
  /* Stored bitmaps follow the image's size. */
  if (dirty_bitmaps_store (node, DIRTY_STORE_INTENT, errp) == -1)
    return -1;
  nbdd_info ("node '%s' is now %" PRIu64 " bytes", name, node_size (node));
  return 0;
}

/* ---- throttling ---- */

struct throttle_undo {
  char *group;
  struct json_object *limits;   /* before the change */
};

static void
undo_throttle (void *data)
{
  struct throttle_undo *u = data;
  struct error *err = NULL;

  if (throttle_group_set_limits (u->group, u->limits, &err) == -1) {
    nbdd_warn ("undoing block-set-io-throttle: %s", err->msg);
    error_free (err);
  }
}

static void
release_throttle (void *data)
{
  struct throttle_undo *u = data;

  free (u->group);
  json_object_put (u->limits);
  free (u);
}

static int
cmd_block_set_io_throttle (struct qmp_txn *t, struct json_object *args,
                           struct json_object **ret, struct error **errp)
{
  const char *group = NULL, *nname = NULL;
  struct throttle_undo *u;
  struct json_object *limits;
  CLEANUP_FREE char *g = NULL;

  if (opt_get_string (args, "block-set-io-throttle", "group", false, &group,
                      errp) == -1 ||
      opt_get_string (args, "block-set-io-throttle", "node-name", false,
                      &nname, errp) == -1)
    return -1;
  if ((group == NULL) == (nname == NULL)) {
    error_setg (errp, "block-set-io-throttle: give either 'group' or "
                "'node-name' (a throttle node)");
    return -1;
  }
  if (nname) {
    struct node *n = node_lookup (nname);
    if (n == NULL)
      return not_found (t, errp, "node", nname);
    if (strcmp (n->drv->name, "throttle") != 0) {
      error_setg (errp, "node '%s' is not a throttle node (driver %s): "
                  "insert one with blockdev-insert-node", nname,
                  n->drv->name);
      return -1;
    }
    group = throttle_node_group (n);
  }
  if (!throttle_group_exists (group))
    return not_found (t, errp, "throttle group", group);
  g = strdup (group);
  u = calloc (1, sizeof *u);
  if (g == NULL || u == NULL || (u->group = strdup (g)) == NULL ||
      txn_reserve (t, 1, errp) == -1) {
    free (u);
    error_setg (errp, "out of memory");
    return -1;
  }
  u->limits = throttle_group_limits (g);
  if (throttle_group_set (g, args, errp) == -1) {
    release_throttle (u);
    return -1;
  }
  txn_step (t, undo_throttle, NULL, release_throttle, u);
  if (catalog) {
    limits = throttle_group_limits (g);
    if (catalog_throttle_group_put (catalog, g, json_text (limits),
                                    errp) == -1) {
      json_object_put (limits);
      return -1;
    }
    json_object_put (limits);
  }
  return 0;
}

/* ---- exports ---- */

static void
undo_export_add (void *data)
{
  export_discard (data);
}

static void
release_export_ref (void *data)
{
  export_unref (data);
}

static int
cmd_block_export_add (struct qmp_txn *t, struct json_object *args,
                      struct json_object **ret, struct error **errp)
{
  struct json_object *spec = NULL;
  struct export *exp;
  int r;

  if (txn_reserve (t, 1, errp) == -1)
    return -1;
  if (json_object_deep_copy (args, &spec, NULL) != 0) {
    error_setg (errp, "out of memory");
    return -1;
  }
  r = export_add (spec, errp);
  json_object_put (spec);
  if (r == -1)
    return -1;
  exp = export_nth (export_count () - 1);
  exp->recorded = catalog != NULL;
  /* Kept until the command's drains end (an undo frees it before). */
  export_ref (exp);
  txn_step (t, undo_export_add, NULL, release_export_ref, exp);
  if (catalog && catalog_export_put (catalog, exp->id, json_text (exp->spec),
                                     errp) == -1)
    return -1;
  return 0;
}

struct export_del {
  struct export *exp;           /* a reference */
  bool hard;
};

static void
undo_export_del (void *data)
{
  struct export_del *d = data;

  d->exp->delete_pending = false;
}

static void
commit_export_del (void *data)
{
  struct export_del *d = data;
  struct error *err = NULL;

  d->exp->delete_pending = false;
  if (export_delete (d->exp, d->hard, &err) == -1) {
    nbdd_warn ("block-export-del: %s", err->msg);
    error_free (err);
  }
}

static void
release_export_del (void *data)
{
  struct export_del *d = data;

  export_unref (d->exp);
  free (d);
}

static const char *const export_del_keys[] = { "id", "mode", NULL };

static int
cmd_block_export_del (struct qmp_txn *t, struct json_object *args,
                      struct json_object **ret, struct error **errp)
{
  const char *id, *mode = "safe";
  struct export *exp;
  struct export_del *d;

  if (opt_check_keys (args, "block-export-del", export_del_keys,
                      errp) == -1 ||
      opt_get_string (args, "block-export-del", "id", true, &id,
                      errp) == -1 ||
      opt_get_string (args, "block-export-del", "mode", false, &mode,
                      errp) == -1)
    return -1;
  if (strcmp (mode, "safe") != 0 && strcmp (mode, "hard") != 0) {
    error_setg (errp, "block-export-del: mode must be 'safe' or 'hard'");
    return -1;
  }
  if ((exp = export_by_id (id)) == NULL)
    return not_found (t, errp, "export", id);
  if (exp->delete_pending) {
    error_setg (errp, "export '%s' is already being deleted", id);
    return -1;
  }
  if (strcmp (mode, "safe") == 0 && export_clients (exp) > 0) {
    unsigned n = export_clients (exp);
    error_setg (errp, "export '%s' has %u client%s connected: disconnect "
                "them first, or use mode 'hard'", exp->id, n,
                n == 1 ? "" : "s");
    return -1;
  }
  d = malloc (sizeof *d);
  if (d == NULL || txn_reserve (t, 1, errp) == -1) {
    free (d);
    error_setg (errp, "out of memory");
    return -1;
  }
  export_ref (exp);
  exp->delete_pending = true;
  *d = (struct export_del) { exp, strcmp (mode, "hard") == 0 };
  txn_step (t, undo_export_del, commit_export_del, release_export_del, d);
  if (catalog && catalog_export_del (catalog, id, errp) == -1)
    return -1;
  return 0;
}

static struct json_object *
export_info (struct export *exp)
{
  struct json_object *o = json_object_new_object ();

  json_object_object_add (o, "id", json_object_new_string (exp->id));
  json_object_object_add (o, "type", json_object_new_string ("nbd"));
  json_object_object_add (o, "node-name",
                          json_object_new_string (root_node (&exp->root)->name));
  json_object_object_add (o, "name", json_object_new_string (exp->name));
  json_object_object_add (o, "writable",
                          json_object_new_boolean (exp->writable));
  if (exp->description)
    json_object_object_add (o, "description",
                            json_object_new_string (exp->description));
  json_object_object_add (o, "tls-required",
                          json_object_new_boolean (exp->tls_required));
  json_object_object_add (o, "connections",
                          json_object_new_int (export_clients (exp)));
  json_object_object_add (o, "shutting-down",
                          json_object_new_boolean (exp->deleted));
  return o;
}

static int
cmd_query_block_exports (struct qmp_txn *t, struct json_object *args,
                         struct json_object **ret, struct error **errp)
{
  struct json_object *a = json_object_new_array ();

  for (size_t i = 0; i < export_count (); ++i)
    json_object_array_add (a, export_info (export_nth (i)));
  for (struct export *e = export_first_dying (); e; e = e->dying_next)
    json_object_array_add (a, export_info (e));
  *ret = a;
  return 0;
}

/* ---- inspection ---- */

static int
cmd_query_connections (struct qmp_txn *t, struct json_object *args,
                       struct json_object **ret, struct error **errp)
{
  struct json_object *a = json_object_new_array ();
  ev_tstamp now = ev_time ();

  for (struct conn *c = conn_first (); c; c = c->next) {
    struct json_object *o;
    const char *id;
    if (c->dead)
      continue;
    o = json_object_new_object ();
    id = c->tls_up ? tls_identity (c) : NULL;
    json_object_object_add (o, "id", json_object_new_int64 (c->id));
    json_object_object_add (o, "peer", json_object_new_string (c->peer));
    json_object_object_add (o, "export", c->exp ?
                            json_object_new_string (c->exp->id) : NULL);
    json_object_object_add (o, "tls", json_object_new_boolean (c->tls_up));
    json_object_object_add (o, "tls-identity",
                            id ? json_object_new_string (id) : NULL);
    json_object_object_add (o, "requests",
                            json_object_new_int64 (c->nr_requests));
    json_object_object_add (o, "bytes-read",
                            json_object_new_int64 (c->bytes_read));
    json_object_object_add (o, "bytes-written",
                            json_object_new_int64 (c->bytes_written));
    json_object_object_add (o, "connected-seconds",
                            json_object_new_double (now - c->started));
    json_object_array_add (a, o);
  }
  *ret = a;
  return 0;
}

static ev_tstamp started_at;

static int
cmd_query_stats (struct qmp_txn *t, struct json_object *args,
                 struct json_object **ret, struct error **errp)
{
  struct json_object *o = json_object_new_object ();
  struct json_object *a = json_object_new_array ();
  size_t nodes = 0;

  for (struct node *n = node_first (); n; n = n->all_next)
    nodes++;
  json_object_object_add (o, "uptime-seconds",
                          json_object_new_double (ev_time () - started_at));
  json_object_object_add (o, "connections",
                          json_object_new_int (conn_count ()));
  json_object_object_add (o, "nodes", json_object_new_int64 (nodes));
  for (size_t i = 0; i < export_count (); ++i) {
    struct export *exp = export_nth (i);
    struct json_object *e = json_object_new_object ();
    const struct export_stats *st = &exp->stats;
    json_object_object_add (e, "id", json_object_new_string (exp->id));
#define STAT(name, field) \
    json_object_object_add (e, name, json_object_new_int64 (st->field))
    STAT ("rd_operations", rd_ops);
    STAT ("wr_operations", wr_ops);
    STAT ("rd_bytes", rd_bytes);
    STAT ("wr_bytes", wr_bytes);
    STAT ("flush_operations", flush_ops);
    STAT ("zero_operations", zero_ops);
    STAT ("discard_operations", discard_ops);
    STAT ("failed_operations", failed_ops);
#undef STAT
    json_object_array_add (a, e);
  }
  json_object_object_add (o, "exports", a);
  *ret = o;
  return 0;
}

static int
cmd_query_version (struct qmp_txn *t, struct json_object *args,
                   struct json_object **ret, struct error **errp)
{
  *ret = admin_version ();
  return 0;
}

static void
commit_quit (void *data)
{
  nbdd_info ("quit requested through the admin socket");
  daemon_quit ();
}

static int
cmd_quit (struct qmp_txn *t, struct json_object *args,
          struct json_object **ret, struct error **errp)
{
  if (txn_reserve (t, 1, errp) == -1)
    return -1;
  txn_step (t, NULL, commit_quit, NULL, NULL);
  return 0;
}

/* ---- the table ---- */

#define CMD_CHANGES     1       /* a catalogue transaction, audited */
#define CMD_IN_TXN      2       /* allowed as a 'transaction' action */

struct command {
  const char *name;
  int (*fn) (struct qmp_txn *t, struct json_object *args,
             struct json_object **ret, struct error **errp);
  unsigned flags;
};

static int cmd_transaction (struct qmp_txn *t, struct json_object *args,
                            struct json_object **ret, struct error **errp);
static int cmd_query_commands (struct qmp_txn *t, struct json_object *args,
                               struct json_object **ret,
                               struct error **errp);

static const struct command commands[] = {
  { "blockdev-add", cmd_blockdev_add, CMD_CHANGES | CMD_IN_TXN },
  { "blockdev-del", cmd_blockdev_del, CMD_CHANGES | CMD_IN_TXN },
  { "blockdev-create", cmd_blockdev_create, CMD_CHANGES },
  { "blockdev-snapshot", cmd_blockdev_snapshot, CMD_CHANGES | CMD_IN_TXN },
  { "blockdev-replace", cmd_blockdev_replace, CMD_CHANGES | CMD_IN_TXN },
  { "blockdev-insert-node", cmd_blockdev_insert_node,
    CMD_CHANGES | CMD_IN_TXN },
  { "blockdev-remove-node", cmd_blockdev_remove_node,
    CMD_CHANGES | CMD_IN_TXN },
  { "block_resize", cmd_block_resize, CMD_CHANGES },
  { "block-set-io-throttle", cmd_block_set_io_throttle,
    CMD_CHANGES | CMD_IN_TXN },
  { "block-export-add", cmd_block_export_add, CMD_CHANGES | CMD_IN_TXN },
  { "block-dirty-bitmap-add", cmd_block_dirty_bitmap_add,
    CMD_CHANGES | CMD_IN_TXN },
  { "block-dirty-bitmap-remove", cmd_block_dirty_bitmap_remove,
    CMD_CHANGES | CMD_IN_TXN },
  { "block-dirty-bitmap-clear", cmd_block_dirty_bitmap_clear,
    CMD_CHANGES | CMD_IN_TXN },
  { "block-dirty-bitmap-enable", cmd_block_dirty_bitmap_enable,
    CMD_CHANGES | CMD_IN_TXN },
  { "block-dirty-bitmap-disable", cmd_block_dirty_bitmap_disable,
    CMD_CHANGES | CMD_IN_TXN },
  { "block-dirty-bitmap-merge", cmd_block_dirty_bitmap_merge,
    CMD_CHANGES | CMD_IN_TXN },
  { "block-dirty-bitmap-fork", cmd_block_dirty_bitmap_fork,
    CMD_CHANGES | CMD_IN_TXN },
  { "block-dirty-bitmap-unfork", cmd_block_dirty_bitmap_unfork,
    CMD_CHANGES | CMD_IN_TXN },
  { "query-bitmap-lineage", cmd_query_bitmap_lineage, 0 },
  { "block-export-del", cmd_block_export_del, CMD_CHANGES | CMD_IN_TXN },
  { "fleece-start", cmd_fleece_start, CMD_CHANGES | CMD_IN_TXN },
  { "fleece-stop", cmd_fleece_stop, CMD_CHANGES | CMD_IN_TXN },
  { "query-fleeces", cmd_query_fleeces, 0 },
  { "blockdev-mirror", cmd_blockdev_mirror, CMD_CHANGES },
  { "blockdev-backup", cmd_blockdev_backup, CMD_CHANGES | CMD_IN_TXN },
  { "block-stream", cmd_block_stream, CMD_CHANGES },
  { "block-commit", cmd_block_commit, CMD_CHANGES },
  { "query-block-jobs", cmd_query_block_jobs, 0 },
  { "block-job-pause", cmd_block_job_pause, CMD_CHANGES },
  { "block-job-resume", cmd_block_job_resume, CMD_CHANGES },
  { "block-job-cancel", cmd_block_job_cancel, CMD_CHANGES },
  { "block-job-complete", cmd_block_job_complete, CMD_CHANGES },
  { "block-job-set-speed", cmd_block_job_set_speed, CMD_CHANGES },
  { "block-job-change", cmd_block_job_change, CMD_CHANGES },
  { "job-dismiss", cmd_job_dismiss, CMD_CHANGES },
  { "transaction", cmd_transaction, CMD_CHANGES },
  { "query-named-block-nodes", cmd_query_named_block_nodes, 0 },
  { "query-block-exports", cmd_query_block_exports, 0 },
  { "query-connections", cmd_query_connections, 0 },
  { "query-stats", cmd_query_stats, 0 },
  { "query-version", cmd_query_version, 0 },
  { "query-commands", cmd_query_commands, 0 },
  { "quit", cmd_quit, CMD_CHANGES },
};

static const struct command *
find_command (const char *name)
{
  for (size_t i = 0; i < ARRAY_SIZE (commands); ++i)
    if (strcmp (commands[i].name, name) == 0)
      return &commands[i];
  return NULL;
}

static int
cmd_query_commands (struct qmp_txn *t, struct json_object *args,
                    struct json_object **ret, struct error **errp)
{
  struct json_object *a = json_object_new_array ();

  for (size_t i = 0; i < ARRAY_SIZE (commands) + 1; ++i) {
    struct json_object *o = json_object_new_object ();
    json_object_object_add (o, "name", json_object_new_string
                            (i < ARRAY_SIZE (commands) ? commands[i].name
                             : "qmp_capabilities"));
    json_object_array_add (a, o);
  }
  *ret = a;
  return 0;
}

static const char *const transaction_keys[] = { "actions", NULL };

static int
cmd_transaction (struct qmp_txn *t, struct json_object *args,
                 struct json_object **ret, struct error **errp)
{
  struct json_object *actions, *result = NULL;
  size_t n;
  int r;

  if (opt_check_keys (args, "transaction", transaction_keys, errp) == -1)
    return -1;
  if (!json_object_object_get_ex (args, "actions", &actions) ||
      !json_object_is_type (actions, json_type_array)) {
    error_setg (errp, "transaction: 'actions' (an array) is missing");
    return -1;
  }
  n = json_object_array_length (actions);
  for (size_t i = 0; i < n; ++i) {
    struct json_object *a = json_object_array_get_idx (actions, i);
    struct json_object *type, *data, *ignored = NULL;
    const struct command *cmd;

    if (!json_object_is_type (a, json_type_object) ||
        !json_object_object_get_ex (a, "type", &type) ||
        !json_object_is_type (type, json_type_string)) {
      error_setg (errp, "transaction: action %zu needs a 'type'", i);
      return -1;
    }
    cmd = find_command (json_object_get_string (type));
    if (cmd == NULL || !(cmd->flags & CMD_IN_TXN)) {
      error_setg (errp, "transaction: action %zu: '%.80s' cannot be part "
                  "of a transaction", i, json_object_get_string (type));
      return -1;
    }
    if (!json_object_object_get_ex (a, "data", &data))
      data = NULL;
    if (data && !json_object_is_type (data, json_type_object)) {
      error_setg (errp, "transaction: action %zu: 'data' must be an "
                  "object", i);
      return -1;
    }
    if (data == NULL)
      data = ignored = json_object_new_object ();
    r = cmd->fn (t, data, &result, errp);
    json_object_put (result);
    json_object_put (ignored);
    result = NULL;
    if (r == -1) {
      error_prepend (errp, "transaction: action %zu (%s)", i, cmd->name);
      return -1;
    }
  }
  return 0;
}

static void
txn_finish (struct qmp_txn *t, bool ok)
{
  if (ok) {
    for (size_t i = 0; i < t->nr_steps; ++i)
      if (t->steps[i].commit)
        t->steps[i].commit (t->steps[i].data);
  }
  else {
    for (size_t i = t->nr_steps; i-- > 0;)
      if (t->steps[i].undo)
        t->steps[i].undo (t->steps[i].data);
  }
  /* Requests that waited go on into the graph as it now is. */
  for (size_t i = t->nr_drains; i-- > 0;)
    graph_drain_end (t->drains[i]);
  for (size_t i = t->nr_steps; i-- > 0;)
    if (t->steps[i].release)
      t->steps[i].release (t->steps[i].data);
  free (t->steps);
  free (t->drains);
}

static void
audit (const char *name, struct json_object *args,
       const struct admin_peer *peer, const char *result)
{
  struct error *err = NULL;
  struct timeval tv;

  if (catalog == NULL)
    return;
  gettimeofday (&tv, NULL);
  if (catalog_audit (catalog, (int64_t) tv.tv_sec * 1000000 + tv.tv_usec,
                     peer->uid, peer->pid, name, json_text (args), result,
                     &err) == -1) {
    nbdd_warn ("audit log: %s", err->msg);
    error_free (err);
  }
}

struct json_object *
qmp_execute (const char *name, struct json_object *args,
             const struct admin_peer *peer)
{
  const struct command *cmd = find_command (name);
  struct qmp_txn t = { .error_class = "GenericError" };
  struct json_object *ret = NULL, *reply, *empty = NULL;
  struct error *err = NULL;
  bool changes;
  int r;

  if (cmd == NULL) {
    char desc[200];
    snprintf (desc, sizeof desc, "The command %.80s has not been found",
              name);
    reply = json_object_new_object ();
    json_object_object_add (reply, "error", json_object_new_object ());
    json_object_object_add (json_object_object_get (reply, "error"),
                            "class", json_object_new_string ("CommandNotFound"));
    json_object_object_add (json_object_object_get (reply, "error"),
                            "desc", json_object_new_string (desc));
    return reply;
  }
  if (args == NULL)
    args = empty = json_object_new_object ();
  changes = (cmd->flags & CMD_CHANGES) != 0;

  r = changes && catalog ? catalog_begin (catalog, &err) : 0;
  if (r == 0)
    r = cmd->fn (&t, args, &ret, &err);
  if (changes && catalog) {
    if (r == 0)
      r = catalog_commit (catalog, &err);
    else
      catalog_rollback (catalog);
    qmp_jobs_forget_ended ();
  }
  txn_finish (&t, r == 0);
  if (changes)
    audit (name, args, peer, r == 0 ? NULL : err->msg);

  reply = json_object_new_object ();
  if (r == 0)
    json_object_object_add (reply, "return",
                            ret ? ret : json_object_new_object ());
  else {
    struct json_object *e = json_object_new_object ();
    json_object_object_add (e, "class",
                            json_object_new_string (t.error_class));
    json_object_object_add (e, "desc", json_object_new_string (err->msg));
    json_object_object_add (reply, "error", e);
    json_object_put (ret);
    if (changes)
      nbdd_info ("admin: %s failed: %s", name, err->msg);
  }
  if (r == 0 && changes)
    nbdd_info ("admin: uid %u: %s", (unsigned) peer->uid, name);
  error_free (err);
  json_object_put (empty);
  return reply;
}

void
qmp_init (void)
{
  started_at = ev_time ();
}
