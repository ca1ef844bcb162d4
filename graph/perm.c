/* Permissions on edges, as in QEMU's block layer.
 *
 * Every edge into a node says what its user needs (perm) and what it
 * lets the node's other users do (shared).  A root (an export, a job)
 * states its own; an edge from a parent node is derived from what the
 * parent's users need, by role (or by the driver's child_perm).  After
 * a graph change the permissions of the changed nodes and everything
 * below them are recomputed into new_perm/new_shared and checked; only
 * if no node has two users in conflict are they committed.  So a change
 * is checked before it takes effect, and undone if it does not pass.
 *
 * Main thread only.
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "graph.h"
#include "log.h"
#include "utils.h"

static const char *const perm_names[] = {
  "consistent-read", "write", "write-unchanged", "resize", "graph-mod",
};

const char *
perm_name (unsigned bit)
{
  for (size_t i = 0; i < ARRAY_SIZE (perm_names); ++i)
    if (bit == 1u << i)
      return perm_names[i];
  return "?";
}

struct json_object *
perm_to_json (unsigned perm)
{
  struct json_object *a = json_object_new_array ();

  for (size_t i = 0; i < ARRAY_SIZE (perm_names); ++i)
    if (perm & (1u << i))
      json_object_array_add (a, json_object_new_string (perm_names[i]));
  return a;
}

void
edge_describe (const struct node_child *c, char *buf, size_t len)
{
  if (c->parent == NULL)
    snprintf (buf, len, "%s", c->user ? c->user : "a root");
  else
    snprintf (buf, len, "node '%s' (child '%s')", c->parent->name, c->name);
}

/* QEMU's defaults: a filter passes its users' needs through; a backing
 * file is only read, and may change under us only if our users allow
 * writes; a format's storage child is read for metadata, written when
 * the format is writable, and nobody else may write or resize it.
 */
static void
default_child_perm (struct node *node, const struct node_child *c,
                    unsigned perm, unsigned shared,
                    unsigned *cperm, unsigned *cshared)
{
  const unsigned passthrough = PERM_CONSISTENT_READ | PERM_WRITE |
    PERM_WRITE_UNCHANGED | PERM_RESIZE;

  if (c->role & CHILD_FILTERED) {
    *cperm = perm & passthrough;
    *cshared = (shared & passthrough) | (PERM_ALL & ~passthrough);
  }
  else if (c->role & CHILD_COW) {
    *cperm = perm & PERM_CONSISTENT_READ;
    *cshared = (shared & PERM_WRITE ? PERM_WRITE | PERM_RESIZE : 0) |
      PERM_CONSISTENT_READ | PERM_GRAPH_MOD | PERM_WRITE_UNCHANGED;
  }
  else {
    *cperm = perm | PERM_CONSISTENT_READ;
    if (!node->read_only)
      *cperm |= PERM_WRITE | PERM_RESIZE;
    *cshared = shared & ~(PERM_WRITE | PERM_RESIZE);
  }
}

/* What all users of @n need and share, from the tentative values. */
static void
cumulative (const struct node *n, unsigned *perm, unsigned *shared)
{
  *perm = 0;
  *shared = PERM_ALL;
  for (size_t i = 0; i < n->nr_parents; ++i) {
    *perm |= n->parents[i]->new_perm;
    *shared &= n->parents[i]->new_shared;
  }
}

static int
check_node (const struct node *n, struct error **errp)
{
  for (size_t i = 0; i < n->nr_parents; ++i)
    for (size_t j = 0; j < n->nr_parents; ++j) {
      const struct node_child *a = n->parents[i], *b = n->parents[j];
      unsigned clash = a->new_perm & ~b->new_shared;
      char ua[160], ub[160];

      if (i == j || clash == 0)
        continue;
      edge_describe (a, ua, sizeof ua);
      edge_describe (b, ub, sizeof ub);
      error_setg (errp, "conflicting permissions on node '%s': %s needs "
                  "'%s', which %s does not allow", n->name, ua,
                  perm_name (clash & -clash), ub);
      return -1;
    }
  return 0;
}

/* Marks: a generation number per walk, so no per-walk clearing. */
static unsigned mark_gen;

unsigned
graph_new_mark (void)
{
  return ++mark_gen;
}

static int
collect (struct node *n, struct node ***v, size_t *len, size_t *cap)
{
  if (n->mark == mark_gen)
    return 0;
  n->mark = mark_gen;
  if (*len == *cap) {
    size_t ncap = *cap ? *cap * 2 : 16;
    struct node **nv = realloc (*v, ncap * sizeof *nv);
    if (nv == NULL)
      return -1;
    *v = nv;
    *cap = ncap;
  }
  (*v)[(*len)++] = n;
  for (size_t i = 0; i < n->nr_children; ++i)
    if (collect (n->children[i]->node, v, len, cap) == -1)
      return -1;
  return 0;
}

/* Number of parents of @n inside the pass (marked). */
static size_t
parents_in_pass (const struct node *n)
{
  size_t k = 0;

  for (size_t i = 0; i < n->nr_parents; ++i)
    if (n->parents[i]->parent &&
        n->parents[i]->parent->mark == mark_gen)
      k++;
  return k;
}

static void
reset_tentative (struct node **v, size_t len)
{
  for (size_t i = 0; i < len; ++i)
    for (size_t j = 0; j < v[i]->nr_children; ++j) {
      struct node_child *c = v[i]->children[j];
      c->new_perm = c->perm;
      c->new_shared = c->shared;
    }
}

int
graph_perm_update (struct node *const *changed, size_t nr_changed,
                   struct error **errp)
{
  CLEANUP_FREE struct node **v = NULL;
  CLEANUP_FREE size_t *pending = NULL;
  CLEANUP_FREE struct node **order = NULL;
  size_t len = 0, cap = 0, nr_order = 0;

  graph_new_mark ();
  for (size_t i = 0; i < nr_changed; ++i)
    if (changed[i] && collect (changed[i], &v, &len, &cap) == -1)
      goto nomem;
  if (len == 0)
    return 0;

  /* Kahn's order over the affected subgraph: a node after all of its
   * parents, so its users' needs are known before its children's are
   * derived.  A node left over is on a cycle.
   */
  pending = malloc (len * sizeof *pending);
  order = malloc (len * sizeof *order);
  if (pending == NULL || order == NULL)
    goto nomem;
  for (size_t i = 0; i < len; ++i) {
    pending[i] = parents_in_pass (v[i]);
    v[i]->perm_index = i;
    if (pending[i] == 0)
      order[nr_order++] = v[i];
  }
  for (size_t k = 0; k < nr_order; ++k) {
    struct node *n = order[k];
    unsigned perm, shared;

    cumulative (n, &perm, &shared);
    for (size_t j = 0; j < n->nr_children; ++j) {
      struct node_child *c = n->children[j];
      if (n->drv->child_perm)
        n->drv->child_perm (n, c, perm, shared, &c->new_perm,
                            &c->new_shared);
      else
        default_child_perm (n, c, perm, shared, &c->new_perm,
                            &c->new_shared);
      c->new_shared |= c->extra_shared;
      if (--pending[c->node->perm_index] == 0)
        order[nr_order++] = c->node;
    }
  }
  if (nr_order < len) {
    reset_tentative (v, len);
    error_setg (errp, "the change would make a loop in the graph");
    return -1;
  }
  for (size_t i = 0; i < len; ++i)
    if (check_node (v[i], errp) == -1) {
      reset_tentative (v, len);
      return -1;
    }
  for (size_t i = 0; i < len; ++i)
    for (size_t j = 0; j < v[i]->nr_children; ++j) {
      struct node_child *c = v[i]->children[j];
      c->perm = c->new_perm;
      c->shared = c->new_shared;
    }
  return 0;

 nomem:
  error_setg (errp, "out of memory checking permissions");
  return -1;
}
