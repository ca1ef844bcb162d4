/* Node lifecycle: open from a spec, children, registry, refcounts.
 *
 * Main thread only.  Each owning edge (registry, parent, export) holds
 * one reference; a node is closed when the last one goes.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/linkhash.h>

#include "cleanup.h"
#include "graph.h"
#include "log.h"
#include "options.h"
#include "cbw.h"
#include "throttle.h"
#include "utils.h"


/* Registered nodes, in creation order.  The registry owns one ref. */
static struct node **registry;
static size_t nr_registry, cap_registry;
static unsigned anon_counter;
/* Every live node, registered or not (graph-wide passes). */
static struct node *all_nodes;

struct node *
node_first (void)
{
  return all_nodes;
}

/* node-name -> registered node; keys are the nodes' own names. */
static struct lh_table *by_name;

/* The file a node reads, found down its primary children. */
const char *
node_filename (const struct node *n)
{
  struct json_object *v;

  while (n) {
    const struct node *next = NULL;
    if (json_object_object_get_ex (n->spec, "filename", &v) &&
        json_object_is_type (v, json_type_string))
      return json_object_get_string (v);
    for (size_t i = 0; i < n->nr_children; ++i)
      if (n->children[i]->role & CHILD_PRIMARY) {
        next = n->children[i]->node;
        break;
      }
    n = next;
  }
  return NULL;
}

struct node *
node_lookup (const char *name)
{
  void *v;

  return by_name && lh_table_lookup_ex (by_name, name, &v) ? v : NULL;
}

void
node_foreach (void (*fn) (struct node *node, void *opaque), void *opaque)
{
  for (size_t i = 0; i < nr_registry; ++i)
    fn (registry[i], opaque);
}

void
node_ref (struct node *node)
{
  node->refcnt++;
}

/* Add/remove @c in its node's list of edges into it. */
void
node_link_parent (struct node_child *c)
{
  struct node *n = c->node;

  /* Callers reserve room first (node_reserve_parent): cannot fail. */
  assert (n->nr_parents < n->cap_parents);
  n->parents[n->nr_parents++] = c;
}

int
node_reserve_parent (struct node *n, size_t count)
{
  struct node_child **v;
  size_t want = n->nr_parents + count;

  if (want <= n->cap_parents)
    return 0;
  want = MAX (want, 2 * n->cap_parents);
  v = realloc (n->parents, want * sizeof *v);
  if (v == NULL)
    return -1;
  n->parents = v;
  n->cap_parents = want;
  return 0;
}

void
node_unlink_parent (struct node_child *c)
{
  struct node *n = c->node;

  for (size_t i = 0; i < n->nr_parents; ++i)
    if (n->parents[i] == c) {
      memmove (&n->parents[i], &n->parents[i + 1],
               (n->nr_parents - i - 1) * sizeof *n->parents);
      n->nr_parents--;
      return;
    }
  assert (!"edge not linked");
}

static void
child_free (struct node_child *c)
{
  node_unlink_parent (c);
  node_unref (c->node);
  free (c->name);
  free (c);
}

static void
node_free (struct node *node)
{
  struct error *err = NULL;

  /* Persistent bitmaps go back into the image, with their final bits,
   * before it closes.
   */
  if ((node->dirty || node->bitmaps_on_disk) &&
      dirty_bitmaps_store (node, DIRTY_STORE_FINAL, &err) == -1) {
    nbdd_error ("node '%s': bitmaps not stored: %s", node->name, err->msg);
    error_free (err);
  }
  dirty_bitmaps_free_all (node);
  if (node->drv && node->drv->close)
    node->drv->close (node);
  for (size_t i = 0; i < node->nr_children; ++i)
    child_free (node->children[i]);
  free (node->children);
  assert (node->nr_parents == 0);
  free (node->parents);
  if (node->all_prev)
    node->all_prev->all_next = node->all_next;
  else if (all_nodes == node)
    all_nodes = node->all_next;
  if (node->all_next)
    node->all_next->all_prev = node->all_prev;
  pthread_rwlock_destroy (&node->rmw_lock);
  json_object_put (node->spec);
  free (node->opaque);
  free (node->name);
  free (node);
}

void
node_unref (struct node *node)
{
  if (node == NULL)
    return;
  assert (node->refcnt > 0);
  if (--node->refcnt == 0)
    node_free (node);
}

static int
registry_add (struct node *node, struct error **errp)
{
  if (by_name == NULL && (by_name = lh_kchar_table_new (64, NULL)) == NULL)
    goto nomem;
  if (nr_registry == cap_registry) {
    size_t ncap = cap_registry ? cap_registry * 2 : 64;
    struct node **n = realloc (registry, ncap * sizeof *n);
    if (n == NULL)
      goto nomem;
    registry = n;
    cap_registry = ncap;
  }
  if (lh_table_insert (by_name, node->name, node) != 0)
    goto nomem;
  registry[nr_registry++] = node;
  return 0;

 nomem:
  error_setg_errno (errp, ENOMEM, "node registry");
  return -1;
}

static void
sanitize_limits (struct node *node)
{
  struct node_limits *l = &node->limits;

  if (l->request_alignment == 0 || !IS_POWER_OF_2 (l->request_alignment))
    l->request_alignment = 1;
  if (l->max_transfer)
    l->max_transfer = MAX (ROUND_DOWN (l->max_transfer,
                                       l->request_alignment),
                           l->request_alignment);
}

struct node *
node_new (const struct node_driver *drv, const char *name,
          struct json_object *spec, struct error **errp)
{
  CLEANUP_FREE struct node *node = calloc (1, sizeof *node);

  if (node == NULL) {
    error_setg_errno (errp, errno, "blockdev: allocating node");
    return NULL;
  }
  node->drv = drv;
  if (name)
    node->name = strdup (name);
  else if (asprintf (&node->name, "#%s%u", drv->name, anon_counter++) == -1)
    node->name = NULL;
  node->opaque = calloc (1, drv->instance_size ?: 1);
  if (node->name == NULL || node->opaque == NULL) {
    error_setg_errno (errp, ENOMEM, "blockdev: allocating node");
    free (node->name);
    free (node->opaque);
    return NULL;
  }
  node->refcnt = 1;
  node->spec = json_object_get (spec);
  pthread_rwlock_init (&node->rmw_lock, NULL);
  node->all_next = all_nodes;
  if (all_nodes)
    all_nodes->all_prev = node;
  all_nodes = node;

  if (drv->open (node, spec, errp) == -1) {
    if (node->name[0] != '#')     /* generated names mean nothing */
      error_prepend (errp, "node '%s'", node->name);
    node->refcnt = 0;
    node_free (steal_pointer (&node));
    return NULL;
  }
  node->limits.request_alignment = 1;
  if (drv->refresh_limits)
    drv->refresh_limits (node, &node->limits);
  sanitize_limits (node);
  /* Its edges to its children are new: a child shared with other
   * users may not allow what this node needs of it.
   */
  if (graph_perm_update ((struct node *const *) &node, 1, errp) == -1 ||
      dirty_bitmaps_load (node, errp) == -1) {
    if (node->name[0] != '#')
      error_prepend (errp, "node '%s'", node->name);
    node_unref (steal_pointer (&node));
    return NULL;
  }
  return steal_pointer (&node);
}

/* Filters live in graph/, formats and protocols in formats/. */
static const struct node_driver *const filter_drivers[] = {
  &throttle_driver, &cbw_driver, &snapshot_access_driver,
};

static const struct node_driver *
find_driver (const char *name)
{
  for (size_t i = 0; i < ARRAY_SIZE (filter_drivers); ++i)
    if (strcmp (filter_drivers[i]->name, name) == 0)
      return filter_drivers[i];
  return format_find_driver (name);
}

/* Create and open a node from a spec, without registering it. */
static struct node *
node_create (struct json_object *spec, struct error **errp)
{
  const struct node_driver *drv;
  const char *driver, *name = NULL;
  int has_name;

  if (opt_get_string (spec, "blockdev", "driver", true, &driver,
                      errp) == -1)
    return NULL;
  has_name = opt_get_string (spec, "blockdev", "node-name", false, &name,
                             errp);
  if (has_name == -1)
    return NULL;
  if (has_name == 0) {
    if (!node_name_is_valid (name)) {
      error_setg (errp, "blockdev: invalid node-name '%.80s': use letters, "
                  "digits, '-', '.' and '_', starting with a letter", name);
      return NULL;
    }
    if (node_lookup (name)) {
      error_setg (errp, "blockdev: node-name '%s' is already in use", name);
      return NULL;
    }
  }
  drv = find_driver (driver);
  if (drv == NULL) {
    error_setg (errp, "blockdev: unknown driver '%.80s' (known: %s, "
                "throttle)", driver, format_driver_names ());
    return NULL;
  }
  return node_new (drv, has_name == 0 ? name : NULL, spec, errp);
}

struct node *
node_open_spec (struct json_object *spec, struct error **errp)
{
  struct node *node = node_create (spec, errp);

  if (node == NULL)
    return NULL;
  if (registry_add (node, errp) == -1) {
    node_unref (node);
    return NULL;
  }
  return node;
}

struct node_child *
node_open_child (struct node *parent, struct json_object *options,
                 const char *key, unsigned role, struct error **errp)
{
  struct json_object *v;
  struct node *child;
  struct node_child *c, **nc;

  if (!json_object_object_get_ex (options, key, &v) || v == NULL) {
    error_setg (errp, "%s: parameter '%s' is missing", parent->drv->name,
                key);
    return NULL;
  }
  if (json_object_is_type (v, json_type_string)) {
    const char *ref = json_object_get_string (v);
    child = node_lookup (ref);
    if (child == NULL) {
      error_setg (errp, "%s: '%s' refers to node '%.80s', which does not "
                  "exist", parent->drv->name, key, ref);
      return NULL;
    }
    node_ref (child);
  }
  else if (json_object_is_type (v, json_type_object)) {
    bool ro = false;
    struct json_object *ignored;
    /* As in QEMU, an inline child inherits read-only=on from its
     * parent unless its spec says otherwise: a read-only qcow2 or raw
     * node opens its file read-only, and so takes no write lock.
     */
    if (opt_get_bool (options, parent->drv->name, "read-only", false, &ro,
                      NULL) == 0 && ro &&
        !json_object_object_get_ex (v, "read-only", &ignored))
      json_object_object_add (v, "read-only", json_object_new_boolean (1));
    child = node_create (v, errp);
    if (child == NULL)
      return NULL;
  }
  else {
    error_setg (errp, "%s: '%s' must be a node-name or a blockdev spec",
                parent->drv->name, key);
    return NULL;
  }

  c = calloc (1, sizeof *c);
  nc = realloc (parent->children, (parent->nr_children + 1) * sizeof *nc);
  if (nc)
    parent->children = nc;
  if (c == NULL || nc == NULL || (c->name = strdup (key)) == NULL ||
      node_reserve_parent (child, 1) == -1) {
    error_setg_errno (errp, ENOMEM, "%s: attaching child", parent->name);
    if (c)
      free (c->name);
    free (c);
    node_unref (child);
    return NULL;
  }
  c->node = child;
  c->parent = parent;
  c->role = role;
  node_link_parent (c);
  parent->children[parent->nr_children++] = c;
  return c;
}

struct node_child *
node_attach_child (struct node *parent, struct node *child, const char *name,
                   unsigned role, struct error **errp)
{
  struct node_child *c = calloc (1, sizeof *c), **nc;
  /* From the parent down: the new edge's permissions derive from it. */
  struct node *changed[] = { parent };

  nc = realloc (parent->children, (parent->nr_children + 1) * sizeof *nc);
  if (nc)
    parent->children = nc;
  if (c == NULL || nc == NULL || (c->name = strdup (name)) == NULL ||
      node_reserve_parent (child, 1) == -1) {
    error_setg_errno (errp, ENOMEM, "%s: attaching child", parent->name);
    if (c)
      free (c->name);
    free (c);
    return NULL;
  }
  node_ref (child);
  c->node = child;
  c->parent = parent;
  c->role = role;
  node_link_parent (c);
  parent->children[parent->nr_children++] = c;
  if (graph_perm_update (changed, 1, errp) == -1) {
    node_detach_child (c);
    return NULL;
  }
  return c;
}

void
node_detach_child (struct node_child *c)
{
  struct node *parent = c->parent, *child = c->node;
  struct error *err = NULL;

  for (size_t i = 0; i < parent->nr_children; ++i)
    if (parent->children[i] == c) {
      memmove (&parent->children[i], &parent->children[i + 1],
               (parent->nr_children - i - 1) * sizeof *parent->children);
      parent->nr_children--;
      break;
    }
  node_ref (child);
  child_free (c);
  /* One user fewer cannot conflict. */
  if (graph_perm_update (&child, 1, &err) == -1) {
    debug ("%s", err->msg);
    error_free (err);
  }
  node_unref (child);
}

void
node_unregister (struct node *node)
{
  size_t i;

  for (i = 0; i < nr_registry && registry[i] != node; ++i)
    ;
  assert (i < nr_registry);
  memmove (&registry[i], &registry[i + 1],
           (nr_registry - i - 1) * sizeof *registry);
  nr_registry--;
  lh_table_delete (by_name, node->name);
}

int
node_register (struct node *node, struct error **errp)
{
  if (node_lookup (node->name)) {
    error_setg (errp, "node-name '%s' is already in use", node->name);
    return -1;
  }
  if (registry_add (node, errp) == -1)
    return -1;
  node_ref (node);
  return 0;
}

int
node_delete (const char *name, struct error **errp)
{
  struct node *node = node_lookup (name);

  if (node == NULL) {
    error_setg (errp, "node '%.80s' does not exist", name);
    return -1;
  }
  if (node_check_unused (node, "node", errp) == -1)
    return -1;
  node_unregister (node);
  node_unref (node);
  return 0;
}

void
node_close_all (void)
{
  /* Newest first: parents were registered after their children. */
  if (by_name)
    lh_table_free (by_name);
  by_name = NULL;
  while (nr_registry > 0)
    node_unref (registry[--nr_registry]);
  free (registry);
  registry = NULL;
  cap_registry = 0;
}

int
node_reopen_rw (struct node *node, struct error **errp)
{
  if (!node->read_only)
    return 0;
  if (node->drv->reopen_rw == NULL) {
    error_setg (errp, "node '%s' (driver %s) is read-only and cannot be "
                "reopened read-write", node->name, node->drv->name);
    return -1;
  }
  if (node->drv->reopen_rw (node, errp) == -1)
    return -1;
  node->read_only = false;
  /* Its persistent bitmaps, loaded read-only, get write intent now, as
   * at a read-write open: else a crash would lose the writes to come.
   */
  if (node->bitmaps_on_disk &&
      dirty_bitmaps_store (node, DIRTY_STORE_INTENT, errp) == -1)
    return -1;
  return 0;
}

int
node_reopen_ro (struct node *node, struct error **errp)
{
  if (node->read_only)
    return 0;
  if (node->drv->reopen_ro == NULL) {
    error_setg (errp, "node '%s' (driver %s) cannot be reopened read-only",
                node->name, node->drv->name);
    return -1;
  }
  if (node->drv->reopen_ro (node, errp) == -1)
    return -1;
  node->read_only = true;
  return 0;
}
