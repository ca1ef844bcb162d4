/* NBD exports: a name clients ask for, bound to a node. */
#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/linkhash.h>

#include "cleanup.h"
#include "internal.h"
#include "options.h"

static struct export **exports;
static size_t nr_exports, cap_exports;
/* name -> export and id -> export, for catalogues of thousands;
 * the keys are the exports' own strings.
 */
static struct lh_table *by_name, *by_id;
/* Deleted exports that clients still hold: listed as shutting down,
 * and their name and id not yet free.
 */
static struct export *dying;

static void
index_remove (struct export *exp)
{
  lh_table_delete (by_name, exp->name);
  lh_table_delete (by_id, exp->id);
}

size_t
export_count (void)
{
  return nr_exports;
}

struct export *
export_nth (size_t i)
{
  return i < nr_exports ? exports[i] : NULL;
}

static struct export *
export_find_exact (const char *name)
{
  void *v;

  return by_name && lh_table_lookup_ex (by_name, name, &v) ? v : NULL;
}

struct export *
export_find (const char *name)
{
  struct export *exp = export_find_exact (name);

  if (exp)
    return exp;
  /* The default export: with one export, "" means it. */
  if (name[0] == '\0' && nr_exports == 1)
    return exports[0];
  return NULL;
}

static void
export_free (struct export *exp)
{
  if (exp == NULL)
    return;
  meta_export_free (exp);
  for (size_t i = 0; i < exp->nr_bitmaps; ++i) {
    exp->bitmaps[i]->busy--;
    node_unref (exp->bitmaps[i]->node);
  }
  free (exp->bitmaps);
  root_detach (&exp->root);
  root_destroy (&exp->root);
  json_object_put (exp->spec);
  free (exp->id);
  free (exp->name);
  free (exp->description);
  opt_free_strings (exp->tls_allow);
  free (exp);
}

void
export_ref (struct export *exp)
{
  exp->refcnt++;
}

void
export_unref (struct export *exp)
{
  if (--exp->refcnt > 0)
    return;
  if (exp->deleted) {
    struct export **pp;
    for (pp = &dying; *pp && *pp != exp; pp = &(*pp)->dying_next)
      ;
    if (*pp)
      *pp = exp->dying_next;
    admin_event_export_deleted (exp->id);
  }
  export_free (exp);
}

unsigned
export_clients (const struct export *exp)
{
  return exp->nr_clients;
}

struct export *
export_first_dying (void)
{
  return dying;
}

static struct export *
dying_find (const char *name, const char *id)
{
  for (struct export *e = dying; e; e = e->dying_next)
    if (strcmp (e->name, name) == 0 || strcmp (e->id, id) == 0)
      return e;
  return NULL;
}

static const char *const export_keys[] = {
  "type", "id", "node-name", "name", "writable", "description",
  "writethrough", "tls-required", "tls-allow", "bitmaps", NULL
};

/* A bitmap named by itself: on the exported node, or down its chain
 * (a filter's child, a backing node), as QEMU looks for it.
 */
static struct dirty_bitmap *
find_bitmap_below (struct node *n, const char *name)
{
  while (n) {
    struct dirty_bitmap *d = dirty_bitmap_find (n, name);
    struct node *next = NULL;
    if (d)
      return d;
    for (size_t i = 0; i < n->nr_children; ++i)
      if (n->children[i]->role & (CHILD_FILTERED | CHILD_COW |
                                  CHILD_PRIMARY)) {
        next = n->children[i]->node;
        if (n->children[i]->role & (CHILD_FILTERED | CHILD_COW))
          break;
      }
    n = next;
  }
  return NULL;
}

/* "bitmaps": [NAME | {"node": NODE, "name": NAME}, ...]. */
static int
resolve_bitmaps (struct export *exp, struct json_object *o, struct node *node,
                 struct error **errp)
{
  struct json_object *a;
  size_t n;

  if (!json_object_object_get_ex (o, "bitmaps", &a) || a == NULL)
    return 0;
  if (!json_object_is_type (a, json_type_array)) {
    /* keyval: bitmaps=NAME, or bitmaps.0=A,bitmaps.1=B */
    char **names = NULL;
    size_t nr = 0;
    struct json_object *list;
    if (opt_get_strings (o, "export", "bitmaps", &names, &nr, errp) == -1)
      return -1;
    list = json_object_new_array ();
    for (size_t i = 0; i < nr; ++i)
      json_object_array_add (list, json_object_new_string (names[i]));
    opt_free_strings (names);
    json_object_object_add (o, "bitmaps", list);
    a = list;
  }
  if (!json_object_is_type (a, json_type_array)) {
    error_setg (errp, "export: 'bitmaps' must be a list of bitmap names or "
                "{\"node\": ..., \"name\": ...} objects");
    return -1;
  }
  n = json_object_array_length (a);
  exp->bitmaps = calloc (n ? n : 1, sizeof *exp->bitmaps);
  if (exp->bitmaps == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  for (size_t i = 0; i < n; ++i) {
    struct json_object *e = json_object_array_get_idx (a, i), *v;
    const char *name = NULL, *nname = NULL;
    struct dirty_bitmap *d;

    if (json_object_is_type (e, json_type_string)) {
      name = json_object_get_string (e);
      d = find_bitmap_below (node, name);
      if (d == NULL) {
        error_setg (errp, "export: node '%s' and the nodes below it have "
                    "no bitmap '%.80s'", node->name, name);
        return -1;
      }
    }
    else if (json_object_is_type (e, json_type_object) &&
             json_object_object_get_ex (e, "node", &v) &&
             json_object_is_type (v, json_type_string) &&
             (nname = json_object_get_string (v)) &&
             json_object_object_get_ex (e, "name", &v) &&
             json_object_is_type (v, json_type_string)) {
      struct node *bn = node_lookup (nname);
      name = json_object_get_string (v);
      if (bn == NULL) {
        error_setg (errp, "export: node '%.80s' does not exist", nname);
        return -1;
      }
      d = dirty_bitmap_find (bn, name);
      if (d == NULL) {
        error_setg (errp, "export: node '%s' has no bitmap '%.80s'",
                    nname, name);
        return -1;
      }
    }
    else {
      error_setg (errp, "export: bitmaps[%zu] must be a name or "
                  "{\"node\": ..., \"name\": ...}", i);
      return -1;
    }
    if (d->inconsistent) {
      error_setg (errp, "export: bitmap '%s' is inconsistent (its image was "
                  "not closed cleanly) and cannot be exported", d->name);
      return -1;
    }
    for (size_t j = 0; j < exp->nr_bitmaps; ++j)
      if (strcmp (exp->bitmaps[j]->name, d->name) == 0) {
        error_setg (errp, "export: two bitmaps named '%.80s': their "
                    "contexts would have one name", d->name);
        return -1;
      }
    d->busy++;
    node_ref (d->node);
    exp->bitmaps[exp->nr_bitmaps++] = d;
  }
  return 0;
}

static bool
export_string_ok (const char *s)
{
  return strlen (s) <= NBD_MAX_STRING;
}

int
export_add_spec (const char *spec, struct error **errp)
{
  struct json_object *o = spec_parse (spec, errp);
  int r;

  if (o == NULL) {
    error_prepend (errp, "export");
    return -1;
  }
  r = export_add (o, errp);
  json_object_put (o);
  return r;
}

int
export_add (struct json_object *o, struct error **errp)
{
  const char *type, *id = NULL, *node_name, *name = NULL, *desc = NULL;
  struct export *exp = NULL, **ne;
  struct node *node;
  bool writable = false, tls_required = false;
  char **allow = NULL;
  size_t nr_allow = 0;
  char user[160];

  if (!json_object_is_type (o, json_type_object)) {
    error_setg (errp, "export: expected an object");
    return -1;
  }
  if (opt_check_keys (o, "export", export_keys, errp) == -1 ||
      opt_get_string (o, "export", "type", true, &type, errp) == -1 ||
      opt_get_string (o, "export", "id", false, &id, errp) == -1 ||
      opt_get_string (o, "export", "node-name", true, &node_name,
                      errp) == -1 ||
      opt_get_string (o, "export", "name", false, &name, errp) == -1 ||
      opt_get_string (o, "export", "description", false, &desc,
                      errp) == -1 ||
      opt_get_bool (o, "export", "writable", false, &writable, errp) == -1 ||
      opt_get_bool (o, "export", "tls-required", false, &tls_required,
                    errp) == -1 ||
      opt_get_strings (o, "export", "tls-allow", &allow, &nr_allow,
                       errp) == -1)
    goto err;
  if ((tls_required || allow) && config.tls == TLS_OFF) {
    error_setg (errp, "export: tls-required and tls-allow need --tls=on "
                "or --tls=require");
    goto err;
  }
  if (strcmp (type, "nbd") != 0) {
    error_setg (errp, "export: type '%.80s' is not supported (only 'nbd')",
                type);
    goto err;
  }
  if (name == NULL)
    name = node_name;           /* as qemu-storage-daemon does */
  if (!export_string_ok (name) || (desc && !export_string_ok (desc))) {
    error_setg (errp, "export: name and description are limited to %d "
                "bytes", NBD_MAX_STRING);
    goto err;
  }
  if (id == NULL)
    id = name;
  if (strlen (id) > 128) {
    error_setg (errp, "export: id is limited to 128 bytes");
    goto err;
  }
  if (export_find_exact (name)) {
    error_setg (errp, "export: name '%.80s' is already exported", name);
    goto err;
  }
  if (export_by_id (id)) {
    error_setg (errp, "export: id '%.80s' is already in use", id);
    goto err;
  }
  if (dying_find (name, id)) {
    error_setg (errp, "export: an export named '%.80s' or with id '%.80s' "
                "is still shutting down: try again once its clients are "
                "gone", name, id);
    goto err;
  }
  node = node_lookup (node_name);
  if (node == NULL) {
    error_setg (errp, "export: node '%.80s' does not exist", node_name);
    goto err;
  }
  if (writable && node->read_only) {
    error_setg (errp, "export: node '%s' is read-only, cannot export it "
                "writable", node_name);
    goto err;
  }

  if (nr_exports == cap_exports) {
    size_t ncap = cap_exports ? 2 * cap_exports : 64;
    ne = realloc (exports, ncap * sizeof *ne);
    if (ne == NULL) {
      error_setg_errno (errp, ENOMEM, "export");
      goto err;
    }
    exports = ne;
    cap_exports = ncap;
  }
  if ((by_name == NULL && (by_name = lh_kchar_table_new (64, NULL)) == NULL) ||
      (by_id == NULL && (by_id = lh_kchar_table_new (64, NULL)) == NULL)) {
    error_setg_errno (errp, ENOMEM, "export");
    goto err;
  }
  exp = calloc (1, sizeof *exp);
  if (exp == NULL) {
    error_setg_errno (errp, ENOMEM, "export");
    goto err;
  }
  root_init (&exp->root);
  exp->refcnt = 1;
  exp->id = strdup (id);
  exp->name = strdup (name);
  exp->description = desc ? strdup (desc) : NULL;
  if (exp->id == NULL || exp->name == NULL || (desc && !exp->description)) {
    error_setg_errno (errp, ENOMEM, "export");
    goto err;
  }
  exp->writable = writable;
  exp->tls_required = tls_required || allow != NULL;
  exp->tls_allow = allow;
  exp->nr_tls_allow = nr_allow;
  allow = NULL;
  if (resolve_bitmaps (exp, o, node, errp) == -1 ||
      meta_export_init (exp, errp) == -1)
    goto err;
  /* As QEMU's NBD export: it needs to read (and write), and lets
   * anyone else do anything.
   */
  snprintf (user, sizeof user, "export '%s'", id);
  exp->root.kind = "export";
  exp->root.owner_name = exp->id;
  exp->root.owner = exp;
  if (root_attach (&exp->root, node,
                   PERM_CONSISTENT_READ | (writable ? PERM_WRITE : 0),
                   PERM_ALL, user, errp) == -1)
    goto err;
  /* Recorded with its name and id spelt out: they must not change
   * when a graph change points the export at another node.
   */
  exp->spec = json_object_get (o);
  json_object_object_add (o, "name", json_object_new_string (exp->name));
  json_object_object_add (o, "id", json_object_new_string (exp->id));
  if (lh_table_insert (by_name, exp->name, exp) != 0 ||
      lh_table_insert (by_id, exp->id, exp) != 0) {
    index_remove (exp);
    error_setg_errno (errp, ENOMEM, "export");
    goto err;
  }
  exports[nr_exports++] = exp;
  return 0;

 err:
  opt_free_strings (allow);
  export_free (exp);
  return -1;
}

void
export_discard (struct export *exp)
{
  for (size_t i = 0; i < nr_exports; ++i)
    if (exports[i] == exp) {
      memmove (&exports[i], &exports[i + 1],
               (nr_exports - i - 1) * sizeof *exports);
      nr_exports--;
      index_remove (exp);
      break;
    }
  /* Its nodes are free at once, even while a command still holds the
   * export itself (until its drains end).
   */
  for (size_t i = 0; i < exp->nr_bitmaps; ++i) {
    exp->bitmaps[i]->busy--;
    node_unref (exp->bitmaps[i]->node);
  }
  exp->nr_bitmaps = 0;
  root_detach (&exp->root);
  export_unref (exp);
}

struct export *
export_by_id (const char *id)
{
  void *v;

  return by_id && lh_table_lookup_ex (by_id, id, &v) ? v : NULL;
}

int
export_delete (struct export *exp, bool hard, struct error **errp)
{
  size_t i;

  if (!hard && exp->nr_clients > 0) {
    error_setg (errp, "export '%s' has %u client%s connected: disconnect "
                "them first, or use mode 'hard'", exp->id, exp->nr_clients,
                exp->nr_clients == 1 ? "" : "s");
    return -1;
  }
  for (i = 0; i < nr_exports; ++i)
    if (exports[i] == exp)
      break;
  if (i == nr_exports) {
    error_setg (errp, "export '%s' is already being deleted", exp->id);
    return -1;
  }
  memmove (&exports[i], &exports[i + 1],
           (nr_exports - i - 1) * sizeof *exports);
  nr_exports--;
  index_remove (exp);
  exp->deleted = true;
  exp->dying_next = dying;
  dying = exp;
  /* Its clients go; it is freed (and BLOCK_EXPORT_DELETED sent) once
   * the last of them has finished its requests.
   */
  if (hard)
    conns_close_export (exp);
  export_unref (exp);
  return 0;
}

bool
export_any_tls_only (void)
{
  for (size_t i = 0; i < nr_exports; ++i)
    if (exports[i]->tls_required)
      return true;
  return config.tls == TLS_REQUIRE;
}

enum export_access
export_access (const struct export *exp, const struct conn *c)
{
  const char *id;

  /* Before TLS the spec wants TLS_REQD for a TLS-only export, whoever
   * the client turns out to be.
   */
  if ((exp->tls_required || config.tls == TLS_REQUIRE) && !c->tls_up)
    return EXPORT_TLS_REQUIRED;
  if (exp->tls_allow == NULL)
    return EXPORT_OK;
  id = tls_identity (c);
  if (id)
    for (size_t i = 0; i < exp->nr_tls_allow; ++i)
      if (strcmp (exp->tls_allow[i], id) == 0)
        return EXPORT_OK;
  return EXPORT_HIDDEN;
}

void
export_close_all (void)
{
  /* Connections are gone by now: these are the last references. */
  if (by_name)
    lh_table_free (by_name);
  if (by_id)
    lh_table_free (by_id);
  by_name = by_id = NULL;
  while (nr_exports > 0)
    export_unref (exports[--nr_exports]);
  cap_exports = 0;
  free (exports);
  exports = NULL;
}

uint16_t
export_tx_flags (const struct export *exp, bool structured)
{
  const struct node *node = root_node (&exp->root);
  /* Every connection shares the node and its one descriptor, so a
   * flush on any connection covers writes acknowledged on all of them:
   * multi-conn is honest.
   */
  uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
    NBD_FLAG_SEND_CACHE | NBD_FLAG_CAN_MULTI_CONN;

  if (!exp->writable)
    f |= NBD_FLAG_READ_ONLY;
  else {
    f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
    if (node->can_fast_zero)
      f |= NBD_FLAG_SEND_FAST_ZERO;
  }
  if (node->is_rotational)
    f |= NBD_FLAG_ROTATIONAL;
  if (structured)
    f |= NBD_FLAG_SEND_DF;
  return f;
}
