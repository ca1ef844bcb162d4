/* Roots, drain, and moving edges between nodes.
 *
 * A root is where requests enter the graph: an export (later, a job).
 * Each request is bracketed by root_io_begin/root_io_end, which count
 * it in flight.  Draining a node quiesces every root above it: new
 * requests wait at the root, and the drain returns once those already
 * inside have left.  The graph below can then be changed (a filter
 * inserted, a node replaced) while clients stay connected; requests
 * that waited continue on the new graph when the drain ends, since
 * they read the root's node only after they are admitted.
 *
 * in_flight and quiesced are atomics so that the request path takes no
 * lock; the mutex and condition variable are only for sleeping.  The
 * order (a request counts itself, then looks at quiesced; the drain
 * sets quiesced, then waits for the count) closes the race between
 * them.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cleanup.h"
#include "graph.h"
#include "log.h"
#include "utils.h"

/* A drain waits this long for the requests inside to leave: a stuck
 * backend makes the graph change fail, not the daemon hang.
 */
#define DRAIN_TIMEOUT_S 30

void
root_init (struct node_root *r)
{
  pthread_condattr_t attr;

  memset (r, 0, sizeof *r);
  pthread_mutex_init (&r->lock, NULL);
  pthread_condattr_init (&attr);
  pthread_condattr_setclock (&attr, CLOCK_MONOTONIC);
  pthread_cond_init (&r->cond, &attr);
  pthread_condattr_destroy (&attr);
}

void
root_destroy (struct node_root *r)
{
  assert (r->edge.node == NULL);
  pthread_mutex_destroy (&r->lock);
  pthread_cond_destroy (&r->cond);
  free (r->user);
}

int
root_attach (struct node_root *r, struct node *node, unsigned perm,
             unsigned shared, const char *user, struct error **errp)
{
  struct node *changed[] = { node };

  assert (r->edge.node == NULL);
  free (r->user);
  r->user = strdup (user);
  if (r->user == NULL || node_reserve_parent (node, 1) == -1) {
    error_setg (errp, "out of memory");
    return -1;
  }
  r->edge.user = r->user;
  r->edge.name = NULL;
  r->edge.parent = NULL;
  r->edge.perm = r->edge.new_perm = perm;
  r->edge.shared = r->edge.new_shared = shared;
  r->edge.node = node;
  node_link_parent (&r->edge);
  if (graph_perm_update (changed, 1, errp) == -1) {
    node_unlink_parent (&r->edge);
    r->edge.node = NULL;
    return -1;
  }
  node_ref (node);
  return 0;
}

void
root_detach (struct node_root *r)
{
  struct node *node = r->edge.node;
  struct error *err = NULL;

  if (node == NULL)
    return;
  node_unlink_parent (&r->edge);
  r->edge.node = NULL;
  /* Fewer users can only mean fewer needs: this cannot conflict. */
  if (graph_perm_update (&node, 1, &err) == -1) {
    debug ("%s", err->msg);
    error_free (err);
  }
  node_unref (node);
}

static void
root_wake (struct node_root *r)
{
  pthread_mutex_lock (&r->lock);
  pthread_cond_broadcast (&r->cond);
  pthread_mutex_unlock (&r->lock);
}

void
root_io_end (struct node_root *r)
{
  if (__atomic_sub_fetch (&r->in_flight, 1, __ATOMIC_SEQ_CST) == 0 &&
      __atomic_load_n (&r->quiesced, __ATOMIC_SEQ_CST) > 0)
    root_wake (r);
}

struct node *
root_io_try_begin (struct node_root *r)
{
  __atomic_add_fetch (&r->in_flight, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n (&r->quiesced, __ATOMIC_SEQ_CST) == 0)
    return __atomic_load_n (&r->edge.node, __ATOMIC_ACQUIRE);
  root_io_end (r);
  return NULL;
}

struct node *
root_io_begin (struct node_root *r)
{
  struct node *node;

  while ((node = root_io_try_begin (r)) == NULL) {
    pthread_mutex_lock (&r->lock);
    while (__atomic_load_n (&r->quiesced, __ATOMIC_SEQ_CST) > 0)
      pthread_cond_wait (&r->cond, &r->lock);
    pthread_mutex_unlock (&r->lock);
  }
  return node;
}

void
root_quiesce (struct node_root *r)
{
  pthread_mutex_lock (&r->lock);
  __atomic_add_fetch (&r->quiesced, 1, __ATOMIC_SEQ_CST);
  pthread_mutex_unlock (&r->lock);
}

int
root_wait_idle (struct node_root *r, const struct timespec *deadline)
{
  int r_ = 0;

  pthread_mutex_lock (&r->lock);
  while (__atomic_load_n (&r->in_flight, __ATOMIC_SEQ_CST) > 0)
    if (pthread_cond_timedwait (&r->cond, &r->lock, deadline) == ETIMEDOUT &&
        __atomic_load_n (&r->in_flight, __ATOMIC_SEQ_CST) > 0) {
      r_ = -1;
      break;
    }
  pthread_mutex_unlock (&r->lock);
  return r_;
}

void
root_resume (struct node_root *r)
{
  pthread_mutex_lock (&r->lock);
  assert (r->quiesced > 0);
  if (__atomic_sub_fetch (&r->quiesced, 1, __ATOMIC_SEQ_CST) == 0)
    pthread_cond_broadcast (&r->cond);
  pthread_mutex_unlock (&r->lock);
}

/* A drain in progress: the roots it quiesced and the nodes told. */
struct graph_drain {
  struct node_root **roots;
  size_t nr_roots;
  struct node **nodes;
  size_t nr_nodes;
};

static int
push (void ***v, size_t *len, void *p)
{
  void **nv = realloc (*v, (*len + 1) * sizeof *nv);

  if (nv == NULL)
    return -1;
  *v = nv;
  nv[(*len)++] = p;
  return 0;
}

/* Every root above @n (marked with @gen as visited). */
static int
roots_above (struct node *n, unsigned gen, struct graph_drain *d)
{
  if (n->mark == gen)
    return 0;
  n->mark = gen;
  for (size_t i = 0; i < n->nr_parents; ++i) {
    struct node_child *c = n->parents[i];
    if (c->parent == NULL) {
      struct node_root *r = container_of (c, struct node_root, edge);
      if (push ((void ***) &d->roots, &d->nr_roots, r) == -1)
        return -1;
    }
    else if (roots_above (c->parent, gen, d) == -1)
      return -1;
  }
  return 0;
}

/* Every node below @n, @n included. */
static int
nodes_below (struct node *n, unsigned gen, struct graph_drain *d)
{
  if (n->mark == gen)
    return 0;
  n->mark = gen;
  if (push ((void ***) &d->nodes, &d->nr_nodes, n) == -1)
    return -1;
  for (size_t i = 0; i < n->nr_children; ++i)
    if (nodes_below (n->children[i]->node, gen, d) == -1)
      return -1;
  return 0;
}

struct graph_drain *
graph_drain_begin (struct node *const *nodes, size_t nr,
                   struct error **errp)
{
  struct graph_drain *d = calloc (1, sizeof *d);
  unsigned gen;

  if (d == NULL)
    goto nomem;
  gen = graph_new_mark ();
  for (size_t i = 0; i < nr; ++i)
    if (nodes[i] && roots_above (nodes[i], gen, d) == -1)
      goto nomem;
  gen = graph_new_mark ();
  for (size_t i = 0; i < d->nr_roots; ++i)
    if (nodes_below (d->roots[i]->edge.node, gen, d) == -1)
      goto nomem;
  for (size_t i = 0; i < nr; ++i)
    if (nodes[i] && nodes_below (nodes[i], gen, d) == -1)
      goto nomem;

  /* Stop admitting first, then let held requests go (a throttle
   * releases its waiters), then wait for what is inside to leave.
   */
  for (size_t i = 0; i < d->nr_roots; ++i)
    root_quiesce (d->roots[i]);
  for (size_t i = 0; i < d->nr_nodes; ++i) {
    node_ref (d->nodes[i]);
    if (d->nodes[i]->drv->drain_begin)
      d->nodes[i]->drv->drain_begin (d->nodes[i]);
  }
  {
    struct timespec deadline;
    clock_gettime (CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += DRAIN_TIMEOUT_S;
    for (size_t i = 0; i < d->nr_roots; ++i)
      if (root_wait_idle (d->roots[i], &deadline) == -1) {
        error_setg (errp, "%s still has requests in flight after %d s: "
                    "the graph was not changed", d->roots[i]->user,
                    DRAIN_TIMEOUT_S);
        graph_drain_end (d);
        return NULL;
      }
  }
  return d;

 nomem:
  if (d) {
    free (d->roots);
    free (d->nodes);
    free (d);
  }
  error_setg (errp, "out of memory draining the graph");
  return NULL;
}

void
graph_drain_end (struct graph_drain *d)
{
  if (d == NULL)
    return;
  for (size_t i = 0; i < d->nr_nodes; ++i) {
    if (d->nodes[i]->drv->drain_end)
      d->nodes[i]->drv->drain_end (d->nodes[i]);
    node_unref (d->nodes[i]);
  }
  for (size_t i = 0; i < d->nr_roots; ++i)
    root_resume (d->roots[i]);
  free (d->roots);
  free (d->nodes);
  free (d);
}

/* Move edge @c to point at @to (room already reserved there). */
static void
edge_move (struct node_child *c, struct node *to)
{
  struct node *from = c->node;

  node_unlink_parent (c);
  node_ref (to);
  __atomic_store_n (&c->node, to, __ATOMIC_RELEASE);
  node_link_parent (c);
  node_unref (from);
}

int
edge_freeze (struct node_child *c, const char *by, struct error **errp)
{
  if (c->frozen_by) {
    char who[160];
    edge_describe (c, who, sizeof who);
    error_setg (errp, "%s cannot rely on the link from %s to node '%s': "
                "%s already does", by, who, c->node->name, c->frozen_by);
    return -1;
  }
  c->frozen_by = by;
  return 0;
}

void
edge_unfreeze (struct node_child *c)
{
  c->frozen_by = NULL;
}

/* 0, or -1 with errp naming the job that relies on one of @edges. */
static int
check_not_frozen (struct node_child *const *edges, size_t n,
                  struct node *to, struct error **errp)
{
  for (size_t i = 0; i < n; ++i) {
    const struct node_child *c = edges[i];
    char who[160];

    if (c->frozen_by == NULL)
      continue;
    edge_describe (c, who, sizeof who);
    if (c->parent == NULL && strcmp (who, c->frozen_by) == 0)
      error_setg (errp, "node '%s' is used by %s until it ends: it cannot "
                  "be replaced by node '%s'", c->node->name, c->frozen_by,
                  to->name);
    else
      error_setg (errp, "%s cannot move from node '%s' to node '%s': %s "
                  "relies on it until it ends", who, c->node->name,
                  to->name, c->frozen_by);
    return -1;
  }
  return 0;
}

int
graph_move_edges (struct node_child *const *edges, size_t n, struct node *to,
                  struct error **errp)
{
  struct node *from;
  struct node *changed[2];

  if (n == 0)
    return 0;
  if (check_not_frozen (edges, n, to, errp) == -1)
    return -1;
  from = edges[0]->node;
  if (node_reserve_parent (to, n) == -1) {
    error_setg (errp, "out of memory changing the graph");
    return -1;
  }
  /* Keep @from alive while it loses its users: the caller's reference
   * may be the last one otherwise.
   */
  node_ref (from);
  for (size_t i = 0; i < n; ++i)
    edge_move (edges[i], to);
  changed[0] = from;
  changed[1] = to;
  if (graph_perm_update (changed, 2, errp) == -1) {
    struct error *err = NULL;
    /* Back where they were: room there was theirs a moment ago. */
    node_reserve_parent (from, n);
    for (size_t i = 0; i < n; ++i)
      edge_move (edges[i], from);
    if (graph_perm_update (changed, 2, &err) == -1) {
      debug ("%s", err->msg);
      error_free (err);
    }
    node_unref (from);
    return -1;
  }
  node_unref (from);
  return 0;
}

int
graph_replace_node (struct node *from, struct node *to,
                    const struct node *except, struct node_child ***movedp,
                    size_t *nr_movedp, struct error **errp)
{
  struct node_child **moved;
  size_t nr_moved = 0;

  *movedp = NULL;
  *nr_movedp = 0;
  if (from == to)
    return 0;
  moved = malloc ((from->nr_parents + 1) * sizeof *moved);
  if (moved == NULL) {
    error_setg (errp, "out of memory changing the graph");
    return -1;
  }
  for (size_t i = 0; i < from->nr_parents; ++i)
    if (from->parents[i]->parent == NULL ||
        from->parents[i]->parent != except)
      moved[nr_moved++] = from->parents[i];
  if (graph_move_edges (moved, nr_moved, to, errp) == -1) {
    free (moved);
    return -1;
  }
  *movedp = moved;
  *nr_movedp = nr_moved;
  return 0;
}

/* "export 'e0', node 'q' (child 'file')" for @n's users, in @buf. */
static void
node_describe_users (const struct node *n, char *buf, size_t len)
{
  size_t used = 0;

  if (len)
    buf[0] = '\0';
  for (size_t i = 0; i < n->nr_parents && used + 1 < len; ++i) {
    char u[160];
    int k;

    edge_describe (n->parents[i], u, sizeof u);
    k = snprintf (buf + used, len - used, "%s%s", i ? ", " : "", u);
    if (k < 0)
      break;
    used += MIN ((size_t) k, len - used - 1);
  }
}

int
node_check_unused (const struct node *n, const char *what,
                   struct error **errp)
{
  char users[512];

  if (n->nr_parents == 0)
    return 0;
  node_describe_users (n, users, sizeof users);
  error_setg (errp, "%s '%s' is in use by %s", what, n->name, users);
  return -1;
}
