/* Backing chains as block-stream and block-commit see them (chain.c),
 * and what those jobs hold on a chain while they run.
 *
 * A chain runs from a node down its backing edges (role CHILD_COW),
 * and through filters (a throttle between two layers) down the edge to
 * what they filter, as QEMU's bdrv_filter_or_cow_child.  The depth of
 * a node in the chain from @top is what allocation depth reports for
 * the data it holds: 1 for @top, 2 for the next layer down, and so on;
 * filters pass allocation depth through, so they do not count (a
 * filter has the depth of the layer below it).
 */
#ifndef NBDD_CHAIN_H
#define NBDD_CHAIN_H

#include <stdbool.h>
#include <stddef.h>

#include "error.h"
#include "graph.h"

/* @n's backing edge, or NULL. */
struct node_child *chain_backing_edge (const struct node *n);
/* The edge to the next node down the chain: @n's backing edge, or
 * the edge of a filter to what it filters; NULL at the bottom.
 */
struct node_child *chain_next_edge (const struct node *n);
/* The first node below @n that is not a filter, or NULL. */
struct node *chain_next_layer (const struct node *n);
/* The node named @name in the chain from @top (@top included), or
 * NULL.  Nodes inside other nodes' specs have names too.
 */
struct node *chain_find (struct node *top, const char *name);
/* The depth of @n in the chain from @top (1: @top itself, or the
 * first layer below it if @top is a filter), or 0 if @n is not in it.
 */
unsigned chain_depth (const struct node *top, const struct node *n);
/* The name a header should give @n's image as a backing file: its
 * file's name, made absolute.  NULL with errp (not a local file).
 */
char *chain_file_name (struct node *n, struct error **errp);

/* What a job holds on a chain.  Main thread. */
struct chain_hold {
  char *user;                   /* "job 'ID'" */
  char *id;
  /* A root on each layer the job takes out of the chain (or reads):
   * they share only consistent reads and unchanged writes, so nobody
   * else writes or resizes them.
   */
  struct node_root *roots;
  size_t nr_roots;
  /* Edges the job relies on (edge_freeze), each with a reference to
   * its parent node (NULL for a root's edge) so that it lives.
   */
  struct node_child **frozen;
  struct node **parents;
  size_t nr_frozen, cap_frozen;
  /* The edge given extra_shared PERM_WRITE (block-commit's base), or
   * NULL.
   */
  struct node_child *shared_edge;
};

/* Empty, for job @id. */
int chain_hold_init (struct chain_hold *h, const char *id,
                     struct error **errp);
/* Hold the layers from @first down to @base (not included; NULL: to
 * the bottom): a root on each, taking @first_perm on @first and
 * nothing on the others.  @first NULL or equal to @base: none.
 */
int chain_hold_layers (struct chain_hold *h, struct node *first,
                       struct node *base, unsigned first_perm,
                       struct error **errp);
/* The root chain_hold_layers put on @first, or NULL. */
struct node_root *chain_first_root (struct chain_hold *h);
/* Rely on @edge (see edge_freeze). */
int chain_freeze (struct chain_hold *h, struct node_child *edge,
                  struct error **errp);
/* Rely on the edges of the chain from @top down to @base (the one
 * into @base included; NULL: every one down to the bottom).
 */
int chain_freeze_links (struct chain_hold *h, struct node *top,
                        struct node *base, struct error **errp);
/* @edge, the backing edge into block-commit's base, lets the job
 * write there: the node above only reads ranges it does not hold, and
 * the job writes only ranges some layer above the base holds.
 */
int chain_share_write (struct chain_hold *h, struct node_child *edge,
                       struct error **errp);
/* Let go of everything (the job's own edges first: the base's extra
 * sharing is only dropped here).  Main thread, drained (or the job
 * never ran).  The roots stay allocated: a drain may still list them.
 */
void chain_release (struct chain_hold *h);
bool chain_is_held (const struct chain_hold *h);
/* Released first. */
void chain_hold_free (struct chain_hold *h);

#endif /* NBDD_CHAIN_H */
