/* The state dir's catalogue, and rebuilding the graph it records.
 *
 * At start the daemon opens the catalogue and rebuilds, in order: the
 * nodes (each after the nodes its spec refers to, whatever order they
 * were added in, since a filter inserted later sits below an older
 * node), the throttle groups' limits, and the exports.  Anything that
 * fails stops the start-up with a message naming it: a daemon serving
 * half of what it was told would be worse than one that says why it
 * cannot start.
 */
#include <config.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "catalog.h"
#include "cleanup.h"
#include "internal.h"
#include "log.h"
#include "throttle.h"

struct catalog *catalog;
static int lock_fd = -1;

static void __attribute__ ((noreturn))
die (struct error *err, const char *what)
{
  nbdd_error ("%s: %s", what, err->msg);
  error_free (err);
  exit (EXIT_FAILURE);
}

struct pending {
  char *name;
  struct json_object *spec;
  bool done;
};

struct pendings {
  struct pending *v;
  size_t len, cap;
};

static int
collect_node (const char *name, const char *spec_json, void *opaque)
{
  struct pendings *p = opaque;
  struct json_object *spec = json_tokener_parse (spec_json);

  if (spec == NULL || !json_object_is_type (spec, json_type_object)) {
    nbdd_error ("catalogue: the spec of node '%s' is not a JSON object",
                name);
    json_object_put (spec);
    return -1;
  }
  if (p->len == p->cap) {
    size_t ncap = p->cap ? 2 * p->cap : 64;
    struct pending *nv = realloc (p->v, ncap * sizeof *nv);
    if (nv == NULL) {
      json_object_put (spec);
      return -1;
    }
    p->v = nv;
    p->cap = ncap;
  }
  p->v[p->len++] = (struct pending) { strdup (name), spec, false };
  return 0;
}

static int
by_name (const void *a, const void *b)
{
  return strcmp (((const struct pending *) a)->name,
                 ((const struct pending *) b)->name);
}

/* The options that name a child node (the others are the drivers'
 * own, whatever their values look like).
 */
static bool
is_child_key (const char *key)
{
  return strcmp (key, "file") == 0 || strcmp (key, "backing") == 0 ||
    strcmp (key, "data-file") == 0;
}

/* Whether @o (the spec of @self, or an inline child of it) names a
 * recorded node, other than @self, that is not open yet.
 */
static bool
waits_for (struct json_object *o, const char *self,
           const struct pendings *sorted)
{
  json_object_object_foreach (o, key, val) {
    if (!is_child_key (key))
      continue;
    if (json_object_is_type (val, json_type_object)) {
      if (waits_for (val, self, sorted))
        return true;
    }
    else if (json_object_is_type (val, json_type_string) &&
             strcmp (json_object_get_string (val), self) != 0) {
      struct pending k = { .name = (char *) json_object_get_string (val) };
      struct pending *hit = bsearch (&k, sorted->v, sorted->len,
                                     sizeof k, by_name);
      if (hit && !hit->done && node_lookup (hit->name) == NULL)
        return true;
    }
  }
  return false;
}

static void
rebuild_nodes (void)
{
  struct pendings p = { 0 }, sorted = { 0 };
  struct error *err = NULL;
  size_t left;

  if (catalog_node_foreach (catalog, collect_node, &p, &err) == -1) {
    if (err)
      die (err, "catalogue");
    exit (EXIT_FAILURE);
  }
  if (p.len == 0)
    return;
  /* A sorted copy to look names up in; 'done' is kept in both. */
  sorted.v = malloc ((p.len + 1) * sizeof *sorted.v);
  if (sorted.v == NULL) {
    nbdd_error ("catalogue: out of memory");
    exit (EXIT_FAILURE);
  }
  memcpy (sorted.v, p.v, p.len * sizeof *p.v);
  sorted.len = p.len;
  qsort (sorted.v, sorted.len, sizeof *sorted.v, by_name);

  /* In creation order, each node once what it refers to is open: a
   * pass that opens nothing means a loop or a missing node.
   */
  for (left = p.len; left > 0;) {
    size_t opened = 0;
    for (size_t i = 0; i < p.len; ++i) {
      struct node *n;
      if (p.v[i].done || waits_for (p.v[i].spec, p.v[i].name, &sorted))
        continue;
      n = node_open_spec (p.v[i].spec, &err);
      if (n == NULL)
        die (err, "catalogue");
      n->recorded = true;
      p.v[i].done = true;
      {
        struct pending k = { .name = p.v[i].name };
        struct pending *hit = bsearch (&k, sorted.v, sorted.len, sizeof k,
                                       by_name);
        hit->done = true;
      }
      opened++;
      left--;
    }
    if (opened == 0) {
      for (size_t i = 0; i < p.len; ++i)
        if (!p.v[i].done) {
          nbdd_error ("catalogue: node '%s' refers to nodes that cannot "
                      "be opened (a loop?)", p.v[i].name);
          break;
        }
      exit (EXIT_FAILURE);
    }
  }
  for (size_t i = 0; i < p.len; ++i) {
    free (p.v[i].name);
    json_object_put (p.v[i].spec);
  }
  free (p.v);
  free (sorted.v);
}

static int
restore_group (const char *name, const char *limits_json, void *opaque)
{
  struct json_object *limits = json_tokener_parse (limits_json);
  struct error *err = NULL;
  int r = 0;

  /* A group whose nodes are all gone has nothing to restore. */
  if (!throttle_group_exists (name)) {
    json_object_put (limits);
    return 0;
  }
  if (limits == NULL ||
      throttle_group_set_limits (name, limits, &err) == -1) {
    nbdd_error ("catalogue: throttle group '%s': %s", name,
                err ? err->msg : "limits are not valid JSON");
    error_free (err);
    r = -1;
  }
  json_object_put (limits);
  return r;
}

static int
restore_export (const char *id, const char *spec_json, void *opaque)
{
  struct json_object *spec = json_tokener_parse (spec_json);
  struct error *err = NULL;
  int r;

  if (spec == NULL) {
    nbdd_error ("catalogue: the spec of export '%s' is not valid JSON", id);
    return -1;
  }
  r = export_add (spec, &err);
  json_object_put (spec);
  if (r == -1) {
    nbdd_error ("catalogue: export '%s': %s", id, err->msg);
    error_free (err);
    return -1;
  }
  export_nth (export_count () - 1)->recorded = true;
  return 0;
}

void
state_lock (void)
{
  struct error *err = NULL;

  if (config.state_dir == NULL)
    return;
  lock_fd = catalog_lock (config.state_dir, &err);
  if (lock_fd == -1)
    die (err, "--state-dir");
}

void
state_open (void)
{
  struct error *err = NULL;

  if (config.state_dir == NULL)
    return;
  catalog = catalog_open_locked (config.state_dir, lock_fd, &err);
  lock_fd = -1;
  if (catalog == NULL)
    die (err, "--state-dir");
  rebuild_nodes ();
}

/* ---- persistent bitmaps: the catalogue against the images ---- */

struct known {
  char *node, *name;
  uint32_t granularity;
  bool seen;
};

struct knowns {
  struct known *v;
  size_t len, cap;
};

static int
collect_bitmap (const char *node, const char *name, uint32_t granularity,
                bool enabled, void *opaque)
{
  struct knowns *k = opaque;

  if (k->len == k->cap) {
    size_t ncap = k->cap ? 2 * k->cap : 16;
    struct known *nv = realloc (k->v, ncap * sizeof *nv);
    if (nv == NULL)
      return -1;
    k->v = nv;
    k->cap = ncap;
  }
  k->v[k->len++] = (struct known) { strdup (node), strdup (name),
                                    granularity, false };
  return 0;
}

/* Best effort: a drift is reported in the log and the lineage even if
 * the catalogue cannot be updated.
 */
static void
drift (const char *node, const char *name, const char *event)
{
  struct error *err = NULL;

  if (catalog_lineage_add (catalog, node, name, NULL, event, NULL,
                           &err) == -1) {
    nbdd_warn ("catalogue: %s", err->msg);
    error_free (err);
  }
}

static void
adopt_found (struct node *node, void *opaque)
{
  struct knowns *k = opaque;
  struct error *err = NULL;

  for (struct dirty_bitmap *d = node->dirty; d; d = d->next) {
    bool known = false;
    if (!d->persistent)
      continue;
    for (size_t i = 0; i < k->len; ++i)
      if (strcmp (k->v[i].node, node->name) == 0 &&
          strcmp (k->v[i].name, d->name) == 0)
        known = true;
    if (known)
      continue;
    nbdd_warn ("node '%s': bitmap '%s' is in the image but was not known "
               "(added by another program?): now it is", node->name,
               d->name);
    drift (node->name, d->name, "found");
    if (catalog_bitmap_put (catalog, node->name, d->name,
                            bitmap_granularity (d->bm), d->enabled,
                            &err) == -1) {
      nbdd_warn ("catalogue: %s", err->msg);
      error_free (err);
      err = NULL;
    }
  }
}

/* The persistent bitmaps the catalogue knows against those the images
 * hold: whatever changed while nbdd was not looking (qemu-img removed
 * one, or added one, or an image was replaced) is reported, in the log
 * and as a row of the bitmap's lineage, and never trusted silently: a
 * bitmap whose granularity changed is marked inconsistent.
 */
static void
reconcile_bitmaps (void)
{
  struct knowns k = { 0 };
  struct error *err = NULL;

  if (catalog_bitmap_foreach (catalog, collect_bitmap, &k, &err) == -1) {
    nbdd_warn ("catalogue: bitmaps not reconciled: %s",
               err ? err->msg : "out of memory");
    error_free (err);
    goto out;
  }
  for (size_t i = 0; i < k.len; ++i) {
    struct known *r = &k.v[i];
    struct node *node = r->node ? node_lookup (r->node) : NULL;
    struct dirty_bitmap *d = node ? dirty_bitmap_find (node, r->name) : NULL;

    if (r->node == NULL || r->name == NULL)
      continue;
    if (d == NULL) {
      nbdd_warn ("node '%s': bitmap '%s' is gone from %s (removed by "
                 "another program?)", r->node, r->name,
                 node ? "the image" : "the daemon: no such node");
      drift (r->node, r->name, "lost");
      if (catalog_bitmap_del (catalog, r->node, r->name, &err) == -1) {
        nbdd_warn ("catalogue: %s", err->msg);
        error_free (err);
        err = NULL;
      }
      continue;
    }
    if (bitmap_granularity (d->bm) != r->granularity && !d->inconsistent) {
      nbdd_warn ("node '%s': bitmap '%s' has a granularity of %" PRIu32
                 " in the image, %" PRIu32 " when nbdd last saw it: not "
                 "trusted (inconsistent)", r->node, r->name,
                 bitmap_granularity (d->bm), r->granularity);
      d->inconsistent = true;
      d->enabled = false;
      drift (r->node, r->name, "changed");
      /* In the image too, so that no one else trusts it. */
      if (dirty_bitmaps_store (node, DIRTY_STORE_INTENT, &err) == -1) {
        nbdd_warn ("node '%s': %s", r->node, err->msg);
        error_free (err);
        err = NULL;
      }
    }
  }
  node_foreach (adopt_found, &k);
 out:
  for (size_t i = 0; i < k.len; ++i) {
    free (k.v[i].node);
    free (k.v[i].name);
  }
  free (k.v);
}

void
state_open_exports (void)
{
  struct error *err = NULL;

  if (catalog == NULL)
    return;
  reconcile_bitmaps ();
  if (fleece_recover (&err) == -1)
    die (err, "catalogue");
  if (catalog_throttle_group_foreach (catalog, restore_group, NULL,
                                      &err) == -1 ||
      catalog_export_foreach (catalog, restore_export, NULL, &err) == -1) {
    if (err)
      die (err, "catalogue");
    exit (EXIT_FAILURE);
  }
  qmp_jobs_recover ();
}

void
state_close (void)
{
  if (catalog)
    catalog_close (catalog);
  catalog = NULL;
}
