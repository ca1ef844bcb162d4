/* Backing chains for block-stream and block-commit (see chain.h).
 *
 * What a job holds while it runs, as QEMU's block_job_add_bdrv and
 * bdrv_freeze_backing_chain do: the layers it drops from the chain
 * (or copies out of) cannot be written or resized by anyone else, and
 * the links of the chain cannot move, so that what the job copies and
 * the graph change at its end still match when it ends.  Commands that
 * would break that are refused with the job's name.
 */
#include <config.h>

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chain.h"
#include "utils.h"

struct node_child *
chain_backing_edge (const struct node *n)
{
  for (size_t i = 0; i < n->nr_children; ++i)
    if (n->children[i]->role & CHILD_COW)
      return n->children[i];
  return NULL;
}

struct node_child *
chain_next_edge (const struct node *n)
{
  struct node_child *c = chain_backing_edge (n);

  if (c || !n->drv->is_filter)
    return c;
  for (size_t i = 0; i < n->nr_children; ++i)
    if (n->children[i]->role & CHILD_FILTERED)
      return n->children[i];
  return NULL;
}

/* The next node down, or NULL. */
static struct node *
below (const struct node *n)
{
  struct node_child *c = chain_next_edge (n);

  return c ? c->node : NULL;
}

struct node *
chain_next_layer (const struct node *n)
{
  struct node *l = below (n);

  while (l && l->drv->is_filter)
    l = below (l);
  return l;
}

struct node *
chain_find (struct node *top, const char *name)
{
  for (struct node *n = top; n; n = below (n))
    if (strcmp (n->name, name) == 0)
      return n;
  return NULL;
}

unsigned
chain_depth (const struct node *top, const struct node *n)
{
  unsigned layers_above = 0;

  for (const struct node *i = top; i; i = below (i)) {
    if (i == n)
      return layers_above + 1;
    if (!i->drv->is_filter)
      layers_above++;
  }
  return 0;
}

char *
chain_file_name (struct node *n, struct error **errp)
{
  const char *fn = node_filename (n);
  char *abs;

  if (fn == NULL) {
    error_setg (errp, "node '%s' (driver %s) is not a local file: no "
                "image header can name it as a backing file", n->name,
                n->drv->name);
    return NULL;
  }
  if (fn[0] == '/')
    abs = strdup (fn);
  else
    abs = realpath (fn, NULL);
  if (abs == NULL)
    error_setg_errno (errp, errno, "node '%s': the file name '%s'", n->name,
                      fn);
  return abs;
}

int
chain_hold_init (struct chain_hold *h, const char *id, struct error **errp)
{
  memset (h, 0, sizeof *h);
  if ((h->id = strdup (id)) == NULL ||
      asprintf (&h->user, "job '%s'", id) == -1) {
    free (h->id);
    h->user = h->id = NULL;
    error_setg (errp, "out of memory");
    return -1;
  }
  return 0;
}

int
chain_hold_layers (struct chain_hold *h, struct node *first,
                   struct node *base, unsigned first_perm,
                   struct error **errp)
{
  size_t n = 0, i = 0;

  for (struct node *l = first; l && l != base; l = below (l))
    n++;
  if (n == 0)
    return 0;
  h->roots = calloc (n, sizeof *h->roots);
  if (h->roots == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  for (struct node *l = first; i < n; l = below (l), ++i) {
    struct node_root *r = &h->roots[i];
    root_init (r);
    h->nr_roots++;
    r->kind = "job";
    r->owner_name = h->id;
    if (root_attach (r, l, l == first ? first_perm : 0,
                     PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED, h->user,
                     errp) == -1)
      return -1;
  }
  return 0;
}

struct node_root *
chain_first_root (struct chain_hold *h)
{
  return h->nr_roots ? &h->roots[0] : NULL;
}

int
chain_freeze (struct chain_hold *h, struct node_child *edge,
              struct error **errp)
{
  if (h->nr_frozen == h->cap_frozen) {
    size_t ncap = h->cap_frozen * 2 + 4;
    struct node_child **f = realloc (h->frozen, ncap * sizeof *f);
    struct node **p;
    if (f)
      h->frozen = f;
    p = f ? realloc (h->parents, ncap * sizeof *p) : NULL;
    if (p == NULL) {
      error_setg (errp, "out of memory");
      return -1;
    }
    h->parents = p;
    h->cap_frozen = ncap;
  }
  if (edge_freeze (edge, h->user, errp) == -1)
    return -1;
  if (edge->parent)
    node_ref (edge->parent);
  h->frozen[h->nr_frozen] = edge;
  h->parents[h->nr_frozen++] = edge->parent;
  return 0;
}

int
chain_freeze_links (struct chain_hold *h, struct node *top, struct node *base,
                    struct error **errp)
{
  for (struct node *l = top; l && l != base; l = below (l)) {
    struct node_child *c = chain_next_edge (l);
    if (c && chain_freeze (h, c, errp) == -1)
      return -1;
  }
  return 0;
}

int
chain_share_write (struct chain_hold *h, struct node_child *edge,
                   struct error **errp)
{
  struct node *parent = edge->parent;

  edge->extra_shared |= PERM_WRITE;
  h->shared_edge = edge;
  /* More sharing cannot conflict: this only makes it take effect. */
  return graph_perm_update (&parent, 1, errp);
}

void
chain_release (struct chain_hold *h)
{
  for (size_t i = 0; i < h->nr_roots; ++i)
    if (root_node (&h->roots[i]))
      root_detach (&h->roots[i]);
  for (size_t i = 0; i < h->nr_frozen; ++i) {
    edge_unfreeze (h->frozen[i]);
    if (h->parents[i])
      node_unref (h->parents[i]);
  }
  h->nr_frozen = 0;
  if (h->shared_edge) {
    struct node *parent = h->shared_edge->parent;
    struct error *err = NULL;
    h->shared_edge->extra_shared &= ~PERM_WRITE;
    h->shared_edge = NULL;
    /* The job's write edge into the base is gone: nothing needs the
     * extra sharing any more, so dropping it cannot conflict.
     */
    if (graph_perm_update (&parent, 1, &err) == -1)
      error_free (err);
  }
}

bool
chain_is_held (const struct chain_hold *h)
{
  for (size_t i = 0; i < h->nr_roots; ++i)
    if (root_node (&h->roots[i]))
      return true;
  return h->nr_frozen > 0 || h->shared_edge != NULL;
}

void
chain_hold_free (struct chain_hold *h)
{
  for (size_t i = 0; i < h->nr_roots; ++i)
    root_destroy (&h->roots[i]);
  free (h->roots);
  free (h->frozen);
  free (h->parents);
  free (h->user);
  free (h->id);
  memset (h, 0, sizeof *h);
}
