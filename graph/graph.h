/* graph/: nodes, their lifecycle and the request path.
 *
 * The node structure and driver contract are in formats/driver.h (the
 * drivers need them); this header adds what only the daemon uses.
 */
#ifndef NBDD_GRAPH_H
#define NBDD_GRAPH_H

#include <json-c/json.h>

#include "driver.h"
#include "error.h"

/* node.c */

/* Open a node from a blockdev spec (takes a reference to @spec) and
 * register it under its node-name.  The new node has one reference,
 * owned by the registry; node_ref it to keep it.
 */
struct node *node_open_spec (struct json_object *spec, struct error **errp);
/* Open a node with a given driver, unregistered (for nodes the daemon
 * builds itself, and for tests).  @name NULL generates one.  The node
 * has one reference, the caller's.
 */
struct node *node_new (const struct node_driver *drv, const char *name,
                       struct json_object *spec, struct error **errp);
/* Borrowed: valid while the registry holds the node. */
struct node *node_lookup (const char *name);
void node_ref (struct node *node);
void node_unref (struct node *node);
/* Drop the registry's references to every node (at exit). */
void node_close_all (void);
/* Iterate over registered nodes: call @fn for each, in creation order. */
void node_foreach (void (*fn) (struct node *node, void *opaque),
                   void *opaque);

/* Every live node, registered or not: follow node->all_next. */
struct node *node_first (void);
/* Edges into a node: reserve room (0, or -1 out of memory), then link
 * (cannot fail); unlink when the edge goes or moves.
 */
int node_reserve_parent (struct node *node);
void node_link_parent (struct node_child *c);
void node_unlink_parent (struct node_child *c);

#endif /* NBDD_GRAPH_H */
