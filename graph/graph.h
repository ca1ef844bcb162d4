/* graph/: nodes, their lifecycle and the request path.
 *
 * The node structure and driver contract are in formats/driver.h (the
 * drivers need them); this header adds what only the daemon uses.
 */
#ifndef NBDD_GRAPH_H
#define NBDD_GRAPH_H

#include <time.h>

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
/* Control path: a new edge from @parent to the existing @child, named
 * @name with @role, if the permissions allow it; and its removal.
 */
struct node_child *node_attach_child (struct node *parent,
                                      struct node *child, const char *name,
                                      unsigned role, struct error **errp);
void node_detach_child (struct node_child *c);
/* Take @node off the registry, which gives its reference to the
 * caller; and put it (back) on, taking a new one.
 */
void node_unregister (struct node *node);
int node_register (struct node *node, struct error **errp);
/* blockdev-del: unregister and drop the registry's reference, unless
 * the node has users (then errp names them).
 */
int node_delete (const char *name, struct error **errp);
/* Drop the registry's references to every node (at exit). */
void node_close_all (void);
/* Iterate over registered nodes: call @fn for each, in creation order. */
void node_foreach (void (*fn) (struct node *node, void *opaque),
                   void *opaque);

/* The file @n's data comes from, down its primary children, or NULL. */
const char *node_filename (const struct node *n);
/* Every live node, registered or not: follow node->all_next. */
struct node *node_first (void);
/* Edges into a node: reserve room (0, or -1 out of memory), then link
 * (cannot fail); unlink when the edge goes or moves.
 */
int node_reserve_parent (struct node *node, size_t count);
void node_link_parent (struct node_child *c);
void node_unlink_parent (struct node_child *c);

/* dirty.c: a node's dirty bitmaps.  The list (node->dirty) changes
 * only while the node is drained; bits are set by any thread.
 */
struct bitmap;
struct dirty_bitmap {
  struct dirty_bitmap *next;
  struct node *node;            /* whose writes it records */
  char *name;
  struct bitmap *bm;            /* frozen while forked */
  /* Forked: new writes go here; bm keeps the bits of the fork, for a
   * backup to read.  The image holds their union (a crash ends the
   * fork as a failure: nothing is lost).
   */
  struct bitmap *successor;
  bool enabled;                 /* recording (atomic) */
  bool persistent;              /* stored in the node's image */
  /* Loaded from an image that was not closed cleanly with it in use:
   * its bits are unknown.  It can only be removed, as in QEMU.
   */
  bool inconsistent;
  /* Write intent (persistent bitmaps of a read-write node whose driver
   * updates stored bits in place): 'durable' is what the image holds.
   * A write that sets a bit the image does not hold yet waits until it
   * does; the writers that meet at one time share one flush.  NULL for
   * the others.
   */
  struct bitmap *durable;
  struct bitmap *pending, *spare; /* bits to write, under wi_lock */
  pthread_mutex_t wi_lock;
  pthread_cond_t wi_cond;
  bool wi_flushing;
  uint64_t wi_want, wi_done;    /* flush generations */
  int wi_error;                 /* a failed flush: writes fail with it */
  unsigned busy;                /* exports using it: read-only for QMP */
  /* A job's (a mirror's copy list, named '#...'): not listed, not for
   * QMP, transient.  Its bits are set again once a write is done, so
   * that a job clearing one while the write runs copies it again.
   * 'marks' counts the granules those writes covered (atomic): how
   * fast the guest writes, for the job's pacing.
   */
  bool internal;
  uint64_t marks;
};

/* The request path's hook: mark [offset, offset + count) in every
 * enabled bitmap of @node, and, for bitmaps with write intent, wait
 * until the image holds the new bits.  Any thread.  0, or -errno if
 * the bits could not be made durable (the write must then fail).
 */
int dirty_mark (struct node *node, uint64_t offset, uint64_t count);
/* After the write: internal bitmaps are marked again. */
void dirty_remark (struct node *node, uint64_t offset, uint64_t count);
struct dirty_bitmap *dirty_bitmap_find (const struct node *node,
                                        const char *name);
/* A new bitmap for @node, not yet on its list (link it drained). */
struct dirty_bitmap *dirty_bitmap_create (struct node *node,
                                          const char *name,
                                          uint32_t granularity,
                                          bool persistent, bool enabled,
                                          struct error **errp);
/* A job's (see 'internal'), named '#...'. */
struct dirty_bitmap *dirty_bitmap_create_internal (struct node *node,
                                                   const char *name,
                                                   uint32_t granularity,
                                                   struct error **errp);
/* On or off the node's list: with the node drained. */
void dirty_bitmap_link (struct dirty_bitmap *d);
void dirty_bitmap_unlink (struct dirty_bitmap *d);
void dirty_bitmap_free (struct dirty_bitmap *d);
void dirty_bitmaps_free_all (struct node *node);
/* Fork (drained): freeze @d's bits, a successor records from now on.
 * Unfork (drained): success drops the frozen bits (the successor's
 * become @d's), failure merges the successor back.  0 or -ENOMEM.
 */
int dirty_bitmap_fork (struct dirty_bitmap *d);
void dirty_bitmap_unfork (struct dirty_bitmap *d, bool success);
/* Bits set other than by writes (a merge) reach the image now, for a
 * bitmap with write intent.  0 or -errno.
 */
int dirty_bitmap_persist (struct dirty_bitmap *d);
/* The node was resized: so are its bitmaps.  0 or -ENOMEM. */
int dirty_bitmaps_resize (struct node *node, uint64_t size);
/* The persistent bitmaps of a node's image, loaded once it is open
 * (nothing to do for drivers without them).  0, or -1 with errp.
 * Unless dirty_bitmaps_autoload is false (the driver's own tests): then
 * nodes neither load nor store bitmaps.
 */
extern bool dirty_bitmaps_autoload;
int dirty_bitmaps_load (struct node *node, struct error **errp);
/* Store the node's persistent bitmaps in its image (or sidecar), as
 * @mode says.  Read-write nodes that can keep bitmaps; 0, or -1 with
 * errp.
 */
enum dirty_store {
  DIRTY_STORE_INTENT,           /* open: preallocated, not in use */
  DIRTY_STORE_IN_USE,           /* open, bits not kept up to date */
  DIRTY_STORE_FINAL,            /* closing: exact, not in use */
};
int dirty_bitmaps_store (struct node *node, enum dirty_store mode,
                         struct error **errp);
/* What the image holds has changed under the bits in memory (a clear,
 * an unfork, drained): say it holds only those.  Safe: a bit the image
 * holds but 'durable' does not is only written again.
 */
void dirty_bitmap_rebase (struct dirty_bitmap *d);
/* Whether @node can keep persistent bitmaps. */
bool dirty_bitmaps_can_store (const struct node *node);

/* sidecar.c: persistent bitmaps of nodes without room in their image,
 * in DIR/NODE-NAME.bitmaps (no DIR: none).  The functions are the
 * driver.h bitmap ops'.
 */
void dirty_bitmaps_sidecar_dir (const char *dir);
bool sidecar_usable (const struct node *node);
int sidecar_list (struct node *node, struct node_bitmap_info **list,
                  size_t *n, struct error **errp);
int sidecar_read (struct node *node, const char *name, uint64_t offset,
                  uint64_t count, void *buf, struct error **errp);
int sidecar_store (struct node *node, const struct node_bitmap_store *v,
                   size_t n, struct error **errp);
int sidecar_sync (struct node *node, const char *name, uint64_t offset,
                  uint64_t count,
                  int (*fill) (void *opaque, uint64_t offset, uint64_t count,
                               void *buf),
                  void *opaque, struct error **errp);

/* io.c: the daemon is shutting down: drivers stop waiting for what
 * may take long to come back (a remote server), and fail instead.
 */
void graph_begin_shutdown (void);

/* io.c: the daemon's answer to node_io_sleep_begin/end (NULL: none). */
void graph_set_sleep_hooks (void (*begin) (void), void (*end) (void));

/* io.c: write guards (see the design comment there).  A job holds a
 * guard on a range while it checks, reads and writes it back; guest
 * writes to the range wait meanwhile.  The job's own write to the
 * range passes NODE_GUARDED (node_pwrite and node_zero take it; it
 * never reaches a driver).
 */
#define NODE_GUARDED    (1u << 31)
struct node_io_range {
  uint64_t start, end;
  struct node_io_range *next;
};
/* With @node drained (writes already running would not be listed):
 * guards on @node may be used until the matching disable.  0 or
 * -ENOMEM.
 */
int node_guards_enable (struct node *node);
void node_guards_disable (struct node *node);
/* Any thread: hold [offset, offset + count) of @node (@r is the
 * caller's, until node_guard_end), once the writes to it have left.
 */
void node_guard_begin (struct node *node, uint64_t offset, uint64_t count,
                       struct node_io_range *r);
void node_guard_end (struct node *node, struct node_io_range *r);

/* io.c: a node's write hook (see the design comment there).  A job
 * that must see what is written to a node, with the data (an active
 * mirror writes it to its target too), sets one: every write, zero and
 * discard on the node calls 'before' once it is listed with the guards
 * and before the node's bitmaps are marked, and 'after' once the
 * driver is done, with its result, on the same thread.  The hook may
 * sleep, but never on a drain (a request inside the graph would hold
 * the drain up).  One hook per node.
 */
enum node_write_kind {
  NODE_WRITE_DATA,              /* buf holds count bytes */
  NODE_WRITE_ZERO,
  NODE_WRITE_DISCARD,
};
struct node_write {
  enum node_write_kind kind;
  uint64_t offset, count;
  const void *buf;              /* NODE_WRITE_DATA: borrowed, the call's */
  unsigned flags;               /* the request's NODE_* flags */
  /* The hook's own, from 'before' to 'after'. */
  struct node_io_range range;
  bool hooked;
};
struct node_write_hook {
  void (*before) (void *opaque, struct node_write *w);
  void (*after) (void *opaque, struct node_write *w, int ret);
  void *opaque;
};
/* With @node drained: @h (the caller's, until cleared) is called from
 * now on.  0, or -EBUSY if the node has a hook already.
 */
int node_write_hook_set (struct node *node, const struct node_write_hook *h);
/* With @node drained: @node's hook, if it is @h, is called no more. */
void node_write_hook_clear (struct node *node,
                            const struct node_write_hook *h);

/* perm.c: permissions on edges. */
/* After edges into @changed (NULLs skipped) came or went: derive the
 * permissions of every edge at and below them, and commit them if no
 * node has users in conflict.  Else nothing changes and errp names
 * both users; the caller undoes its change.
 */
int graph_perm_update (struct node *const *changed, size_t nr,
                       struct error **errp);
/* QEMU's name of one PERM_* bit. */
const char *perm_name (unsigned bit);
/* A JSON array of QEMU's names of the bits in @perm. */
struct json_object *perm_to_json (unsigned perm);
/* "export 'e0'" or "node 'q0' (child 'file')", for messages. */
void edge_describe (const struct node_child *c, char *buf, size_t len);
/* A fresh mark for node->mark in a graph walk. */
unsigned graph_new_mark (void);

/* root.c: where requests enter the graph, and graph changes. */
struct node_root {
  struct node_child edge;       /* parent NULL; edge.user = user */
  char *user;                   /* "export 'e0'", for messages */
  const char *kind;             /* "export", "job" */
  const char *owner_name;       /* the export's id, ... */
  void *owner;                  /* the export, ... */
  unsigned in_flight;           /* requests inside (atomic) */
  unsigned quiesced;            /* drains in progress (atomic) */
  pthread_mutex_t lock;         /* for sleeping on cond only */
  pthread_cond_t cond;
};

void root_init (struct node_root *r);
/* Detached first. */
void root_destroy (struct node_root *r);
/* Attach @r to @node with these permissions, or fail (permissions in
 * conflict) leaving it detached.  Main thread.
 */
int root_attach (struct node_root *r, struct node *node, unsigned perm,
                 unsigned shared, const char *user, struct error **errp);
void root_detach (struct node_root *r);
/* The node a root is attached to (main thread; NULL if detached). */
static inline struct node *
root_node (const struct node_root *r)
{
  return r->edge.node;
}
/* Any thread: enter the graph, waiting while the root is drained;
 * returns the node to use for this request.  Pair with root_io_end.
 */
struct node *root_io_begin (struct node_root *r);
/* As root_io_begin, but NULL instead of waiting (the loop thread). */
struct node *root_io_try_begin (struct node_root *r);
void root_io_end (struct node_root *r);
/* Main thread: stop admitting, wait for what is inside, resume. */
void root_quiesce (struct node_root *r);
/* 0 once no request is inside, -1 if some still are at @deadline
 * (CLOCK_MONOTONIC).
 */
int root_wait_idle (struct node_root *r, const struct timespec *deadline);
void root_resume (struct node_root *r);

/* Drain every root above any of @nodes (and tell the drivers of every
 * node below those roots), waiting until no request is inside.  NULL
 * (nothing drained) when out of memory, or when requests do not leave
 * within 30 seconds.
 */
struct graph_drain;
struct graph_drain *graph_drain_begin (struct node *const *nodes,
                                       size_t nr, struct error **errp);
void graph_drain_end (struct graph_drain *d);
/* With @from drained: every edge into @from, except those from the
 * node @except, now points at @to; refused (and undone) if the
 * permissions conflict or the graph would loop.  *moved (the caller
 * frees it) lists the edges that moved, so that graph_move_edges can
 * put exactly those back.
 */
int graph_replace_node (struct node *from, struct node *to,
                        const struct node *except, struct node_child ***moved,
                        size_t *nr_moved, struct error **errp);
/* Drained: move @edges, which all point at one node, to @to; refused
 * (and undone) as graph_replace_node.
 */
int graph_move_edges (struct node_child *const *edges, size_t n,
                      struct node *to, struct error **errp);
/* A job relies on edge @c staying where it is until it lets go
 * (edge_unfreeze): graph_move_edges and graph_replace_node refuse to
 * move it, naming @by ("job 'ID'", kept by the caller).  -1 with errp
 * if another job already relies on it.  Main thread.
 */
int edge_freeze (struct node_child *c, const char *by, struct error **errp);
void edge_unfreeze (struct node_child *c);
/* 0 if @n has no users, else -1 with "@what 'NAME' is in use by ...". */
int node_check_unused (const struct node *n, const char *what,
                       struct error **errp);

#endif /* NBDD_GRAPH_H */
