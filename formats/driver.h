/* The contract between graph/ and the format and protocol drivers.
 *
 * A node is one vertex of a block graph: a driver, its options, its
 * children with roles, and its limits.  graph/ owns node lifecycle and
 * the request path (graph/io.c); drivers implement the vtable below and
 * reach their children only through the node_* request functions
 * declared at the end, so that bounds, alignment, splitting and
 * (later) write notifiers are applied at every level of the graph.
 *
 * Threads: a node's I/O callbacks run on worker threads, many at once;
 * drivers must be thread-safe for concurrent requests.  open/close and
 * everything else run on the main thread with no I/O in flight.
 */
#ifndef NBDD_FORMATS_DRIVER_H
#define NBDD_FORMATS_DRIVER_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <json-c/json.h>

#include "error.h"

/* Request flags passed down the graph. */
#define NODE_FUA        (1u << 0)  /* data durable before returning */
#define NODE_MAY_TRIM   (1u << 1)  /* zero: a hole is acceptable */
#define NODE_FAST_ZERO  (1u << 2)  /* zero: fail with -ENOTSUP if slow */

/* Extent flags, the same bits as NBD base:allocation. */
#define EXTENT_HOLE     (1u << 0)  /* not allocated at this level */
#define EXTENT_ZERO     (1u << 1)  /* reads as zeroes */

struct node_limits {
  uint32_t request_alignment;   /* power of 2; 1 = byte granular */
  uint32_t max_transfer;        /* 0 = no limit; multiple of alignment */
  uint32_t opt_transfer;        /* preferred I/O size; 0 = no opinion */
};

struct extent {
  uint64_t length;
  uint32_t flags;               /* EXTENT_* */
};

/* A list of extents starting at 'offset', filled by block_status.
 * Drivers append with extents_add until it returns 1 (full) or the
 * requested range is covered.  Adjacent extents with equal flags are
 * merged.
 */
struct extent_list {
  uint64_t offset;              /* where the first extent starts */
  uint64_t end;                 /* offset + total length so far */
  struct extent *v;
  size_t len, cap;
  size_t max;                   /* stop after this many extents */
};

/* 0 on success, 1 when the list is full (the extent was not added),
 * -ENOMEM.
 */
int extents_add (struct extent_list *el, uint64_t length, uint32_t flags);
void extents_init (struct extent_list *el, uint64_t offset, size_t max);
void extents_reset (struct extent_list *el, uint64_t offset);
void extents_free (struct extent_list *el);

/* Child roles, as QEMU's BdrvChildRole. */
#define CHILD_DATA      (1u << 0)  /* guest data lives here */
#define CHILD_METADATA  (1u << 1)  /* format metadata lives here */
#define CHILD_FILTERED  (1u << 2)  /* the node a filter passes through to */
#define CHILD_COW       (1u << 3)  /* backing file */
#define CHILD_PRIMARY   (1u << 4)

/* Permissions on an edge, as QEMU's BLK_PERM_*: what the user of a node
 * needs (perm) and what it lets every other user do (shared).
 */
#define PERM_CONSISTENT_READ  (1u << 0)
#define PERM_WRITE            (1u << 1)
#define PERM_WRITE_UNCHANGED  (1u << 2)
#define PERM_RESIZE           (1u << 3)
#define PERM_GRAPH_MOD        (1u << 4)
#define PERM_ALL              0x1fu

struct node;

/* An edge into a node: from a parent node (a child with a role) or
 * from a root (an export or a job, parent NULL).  Edges are allocated
 * one by one and never move, so a driver may keep a pointer to its
 * child's edge; the node at its end may be replaced by a graph change
 * (with the parent drained), so a driver reads edge->node at each use.
 */
struct node_child {
  char *name;                   /* role name: "file", "backing", ... */
  struct node *node;            /* holds one reference */
  struct node *parent;          /* NULL for a root's edge */
  unsigned role;                /* CHILD_* */
  unsigned perm, shared;        /* PERM_* */
  /* Graph bookkeeping (graph/): the tentative permissions of a change
   * being checked, and who the edge belongs to, for messages.
   */
  unsigned new_perm, new_shared;
  const char *user;             /* roots: "export 'e0'"; NULL for nodes */
  /* A job relies on this edge staying where it is (a link of the
   * backing chain it streams or commits, or its own root): graph
   * changes that would move it are refused, naming the job.  The
   * job's "job 'ID'", or NULL.  Main thread.
   */
  const char *frozen_by;
  /* What a job lets this edge share beyond what its parent's users
   * allow (graph/perm.c adds it): block-commit writes into the base
   * under the backing edge of the node above it, in ranges that node
   * shadows with data of its own.  Main thread.
   */
  unsigned extra_shared;
};

/* Persistent dirty bitmaps a driver stores in its image (qcow2's
 * bitmaps extension).  Bits travel as bytes in QEMU's serialization
 * order: bit k is granule k of the range, least significant first.
 */
struct node_bitmap_info {
  char *name;
  uint32_t granularity;
  bool in_use;                  /* contents not to be trusted (a crash) */
  bool enabled;                 /* recording (QEMU's 'auto' flag) */
};

struct node_bitmap_store {
  const char *name;
  uint32_t granularity;
  bool in_use, enabled;
  bool preallocate;             /* room for every bit: bitmap_sync works */
  /* Fill @buf (zeroed) with the bits of the granule-aligned range
   * [offset, offset + count), which ends at the node's size or on a
   * granule.  0 or -errno.
   */
  int (*fill) (void *opaque, uint64_t offset, uint64_t count, void *buf);
  void *opaque;
};

void node_bitmap_infos_free (struct node_bitmap_info *list, size_t n);

struct node_driver;

struct node {
  char *name;                   /* node-name, unique in the daemon */
  const struct node_driver *drv;
  void *opaque;                 /* driver state, drv->instance_size */
  unsigned refcnt;              /* main thread only */
  struct json_object *spec;     /* the options it was opened with */

  struct node_child **children; /* edges to children, in open order */
  size_t nr_children;
  struct node_child **parents;  /* edges into this node */
  size_t nr_parents, cap_parents;
  struct node *all_next, *all_prev; /* every live node (graph/) */
  unsigned mark;                /* graph/: visited in a graph walk */
  size_t perm_index;

  /* Set by the driver's open; constant while the node is open, except
   * on a growable node (below), where node_size reads it.
   */
  uint64_t size;                /* bytes */
  /* Writes past the end extend the node: set by a format driver on
   * its file child, whose metadata and clusters it appends.
   */
  bool growable;
  /* The daemon's: this node's spec is in the catalogue. */
  bool recorded;
  /* graph/dirty.c: the node's dirty bitmaps (struct dirty_bitmap),
   * and whether its image holds some.
   */
  void *dirty;
  /* graph/io.c: write guards (struct node_guards), while a job uses
   * them; NULL (the common case) costs writes nothing.  Set and
   * cleared only while the node is drained.
   */
  void *guards;
  /* graph/io.c: a job's write hook (struct node_write_hook), called
   * around every write, zero and discard; NULL (the common case) costs
   * writes nothing.  Set and cleared only while the node is drained.
   */
  void *write_hook;
  bool bitmaps_on_disk;
  bool read_only;
  bool can_flush;
  bool can_trim;                /* discard does something */
  bool can_zero;                /* zero is native (else emulated) */
  bool can_fast_zero;           /* zero can be fast for some requests */
  bool can_cache;
  bool is_rotational;
  bool has_block_status;        /* reports holes (else all data) */

  struct node_limits limits;    /* from refresh_limits */

  /* Serialises read-modify-write against other writes, only on nodes
   * with request_alignment > 1 (see graph/io.c).
   */
  pthread_rwlock_t rmw_lock;
};

struct node_driver {
  const char *name;
  size_t instance_size;
  bool is_filter;               /* passes data through to one child */

  /* Parse options (node->spec), open children with node_open_child,
   * set node->size, the can_* flags and read_only.  On failure the
   * core closes any children that were opened.
   */
  int (*open) (struct node *node, struct json_object *options,
               struct error **errp);
  void (*close) (struct node *node);
  void (*refresh_limits) (struct node *node, struct node_limits *limits);

  /* Data path: 0 or -errno.  Requests arrive inside [0, size) and
   * aligned to limits.request_alignment, no longer than max_transfer.
   */
  int (*pread) (struct node *node, void *buf, uint32_t count,
                uint64_t offset, unsigned flags);
  int (*pwrite) (struct node *node, const void *buf, uint32_t count,
                 uint64_t offset, unsigned flags);
  /* Optional: read only if it cannot block (data in the page cache),
   * else -EAGAIN.  Called on the event loop thread.
   */
  int (*pread_nowait) (struct node *node, void *buf, uint32_t count,
                       uint64_t offset);
  /* Optional: move @count bytes into the empty pipe @pipe_fd, of
   * @pipe_size bytes (a page per slot), without copying them through
   * user memory.  0, -ENOTSUP if this node or range cannot, or -errno.
   * On failure the pipe may hold part of the data; the caller empties
   * it.
   */
  int (*read_splice) (struct node *node, int pipe_fd, size_t pipe_size,
                      uint32_t count, uint64_t offset);
  /* NULL or -ENOTSUP without NODE_FAST_ZERO: the core writes zeroes. */
  int (*zero) (struct node *node, uint64_t count, uint64_t offset,
               unsigned flags);
  /* NULL: discard is ignored (it is advisory). */
  int (*discard) (struct node *node, uint64_t count, uint64_t offset,
                  unsigned flags);
  int (*flush) (struct node *node);
  int (*cache) (struct node *node, uint64_t count, uint64_t offset);
  /* Optional: the range's written data is at the device (its cache)
   * when this returns, unflushed: a later FUA write or flush on the
   * node makes it durable too.  Only where overwriting data written
   * before needs no metadata; -ENOTSUP (or NULL) elsewhere, which a
   * call with @count 0 asks without writing anything.
   */
  int (*writeback) (struct node *node, uint64_t count, uint64_t offset);
  /* NULL: everything is data. */
  int (*block_status) (struct node *node, uint64_t count, uint64_t offset,
                       struct extent_list *el);
  /* Optional: which layer of the backing chain holds the data at
   * @offset, for NBD's qemu:allocation-depth.  Sets *depth to 1 if this
   * node allocates it, 2 if its backing node does, and so on, or 0 if
   * no layer does (it reads as zeroes from nowhere).  Past the end of
   * a shorter backing node counts as allocated there, as in QEMU.  Sets
   * *pnum to the length (> 0, <= @count) of the prefix of the range
   * with that depth.
   * NULL: every byte is allocated here (depth 1), as for protocol
   * nodes and raw.
   */
  int (*allocation_depth) (struct node *node, uint64_t count,
                           uint64_t offset, uint64_t *pnum,
                           unsigned *depth);


  /* Optional, control path (main thread, no I/O in flight on the node,
   * like open): resize to @size bytes and update node->size.  Growing
   * adds a hole that reads as zeroes.  A node that cannot change size
   * (a block device) succeeds if @size fits and leaves node->size
   * alone, so callers must not assume node->size == @size afterwards.
   * NULL: node_truncate fails with -ENOTSUP.
   */
  int (*truncate) (struct node *node, uint64_t size);

  /* Optional: the permissions this node takes on child @c, given what
   * its own users need (@perm) and share (@shared) in all.  NULL: by
   * role, as QEMU does (see graph/perm.c).
   */
  void (*child_perm) (struct node *node, const struct node_child *c,
                      unsigned perm, unsigned shared,
                      unsigned *child_perm, unsigned *child_shared);
  /* Optional, main thread: the node is being drained (no new requests
   * will arrive until drain_end).  A driver that holds requests back
   * (throttle) lets them go now, so that the drain ends quickly.
   */
  void (*drain_begin) (struct node *node);
  void (*drain_end) (struct node *node);
  /* Optional, control path, the node without users: @c (already in
   * node->children) is its backing node from now on; NULL: it has none
   * again.  For blockdev-snapshot.  0, or -1 with errp set.
   */
  int (*set_backing) (struct node *node, struct node_child *c,
                      struct error **errp);
  /* Optional, control path, no I/O in flight on the node: the image's
   * header names @file (format @fmt, NULL: none given) as its backing
   * file from now on; @file NULL: none.  Durable when it returns.  On
   * success, if @old_file is not NULL, *old_file and *old_fmt receive
   * what the header said before (malloc'd, NULL: none), so that the
   * caller can put it back.  For block-stream and block-commit, which
   * drop layers from a chain (QEMU's bdrv_change_backing_file).  0, or
   * -1 with errp set (the header is unchanged, or its state unknown
   * after an I/O error).
   */
  int (*change_backing_file) (struct node *node, const char *file,
                              const char *fmt, char **old_file,
                              char **old_fmt, struct error **errp);
  /* Optional, main thread, the node drained: a read-only node becomes
   * read-write, children first (node_reopen_rw), for a job that writes
   * into an image opened read-only, such as the base of a block-commit
   * opened as a backing file (QEMU reopens it the same way).  It stays
   * read-write while open.  0, or -1 with errp set and the node still
   * read-only.
   */
  int (*reopen_rw) (struct node *node, struct error **errp);
  /* Optional, the same conditions: back to read-only, for a driver
   * whose reopen_rw fails after its child's succeeded.
   */
  int (*reopen_ro) (struct node *node, struct error **errp);

  /* Optional, control path: the persistent bitmaps of the image.
   * List them (the caller frees with node_bitmap_infos_free), read one's
   * bits for a granule-aligned range, or replace the whole set, in a
   * crash-safe order (read-write nodes).  0, or -1 with errp set.
   */
  int (*bitmaps_list) (struct node *node, struct node_bitmap_info **list,
                       size_t *n, struct error **errp);
  int (*bitmap_read) (struct node *node, const char *name, uint64_t offset,
                      uint64_t count, void *buf, struct error **errp);
  int (*bitmaps_store) (struct node *node,
                        const struct node_bitmap_store *bitmaps, size_t n,
                        struct error **errp);
  /* Optional, any thread: rewrite in place the stored bits of bitmap
   * @name that cover [offset, offset + count), @fill giving them a
   * stored unit at a time (its whole range), and make those units
   * durable before returning -- only them: the write-intent path must
   * not pay for a flush of the guest's data.  @fill returns 0 (the
   * unit filled), 1 (nothing new there: left unfilled, not to be
   * rewritten), or -errno.
   * The set was stored with preallocate.  0, or -1 with errp set.
   */
  int (*bitmap_sync) (struct node *node, const char *name, uint64_t offset,
                      uint64_t count,
                      int (*fill) (void *opaque, uint64_t offset,
                                   uint64_t count, void *buf),
                      void *opaque, struct error **errp);
};

/* The node's size, safe to read while a growable node grows. */
static inline uint64_t
node_size (const struct node *node)
{
  return __atomic_load_n (&node->size, __ATOMIC_ACQUIRE);
}

/* formats/formats.c: the table of drivers.  NULL if unknown. */
const struct node_driver *format_find_driver (const char *name);
/* Comma-separated list of driver names, for messages. */
const char *format_driver_names (void);

/* Implemented by graph/: open the child named @key of @options (an
 * inline spec object, or a string naming an existing node) and attach
 * it to @parent with @role.  Returns the new edge (owned by @parent)
 * or NULL.
 */
struct node_child *node_open_child (struct node *parent,
                              struct json_object *options,
                              const char *key, unsigned role,
                              struct error **errp);

/* The request path (graph/io.c).  Every I/O, from the export or from a
 * parent driver, goes through these: bounds are checked, requests are
 * split at max_transfer, and unaligned requests are handled with
 * read-modify-write.  0 or -errno.
 */
int node_pread (struct node *node, void *buf, uint64_t count,
                uint64_t offset, unsigned flags);
int node_pwrite (struct node *node, const void *buf, uint64_t count,
                 uint64_t offset, unsigned flags);
/* A read that never blocks: 0, -EAGAIN if it would (the caller then
 * uses node_pread on a worker), or another -errno.
 */
int node_pread_nowait (struct node *node, void *buf, uint64_t count,
                       uint64_t offset);
/* Zero-copy read into an empty pipe of @pipe_size bytes: 0, -ENOTSUP
 * if the graph cannot do it for this range (the caller then uses
 * node_pread), or another -errno.
 */
int node_read_splice (struct node *node, int pipe_fd, size_t pipe_size,
                      uint64_t count, uint64_t offset);
int node_zero (struct node *node, uint64_t count, uint64_t offset,
               unsigned flags);
int node_discard (struct node *node, uint64_t count, uint64_t offset,
                  unsigned flags);
int node_flush (struct node *node);
int node_cache (struct node *node, uint64_t count, uint64_t offset);
/* See the driver's writeback: 0, -ENOTSUP, or -errno. */
int node_writeback (struct node *node, uint64_t count, uint64_t offset);
/* See the driver's reopen_rw: 0 (also when the node is read-write
 * already), or -1 with errp set.  Main thread, the node drained.
 */
int node_reopen_rw (struct node *node, struct error **errp);
/* See the driver's reopen_ro: 0, or -1 with errp set. */
int node_reopen_ro (struct node *node, struct error **errp);
/* Fills @el from el->offset; at least one extent on success. */
int node_block_status (struct node *node, uint64_t count,
                       struct extent_list *el);
/* The allocation depth of the start of [offset, offset + count), count
 * > 0: see the driver's allocation_depth.  On success *pnum is in
 * (0, count].  0 or -errno.
 */
int node_allocation_depth (struct node *node, uint64_t count,
                           uint64_t offset, uint64_t *pnum,
                           unsigned *depth);

/* A request is about to sleep for a while on this thread (a throttle
 * holding it back), and is awake again: the daemon may meanwhile start
 * another worker, so that other clients are not held up behind it.
 */
void node_io_sleep_begin (void);
void node_io_sleep_end (void);
/* The daemon is shutting down: do not wait for a server to come back,
 * fail the request.
 */
bool node_io_shutting_down (void);
/* An eventfd that becomes readable (for good) when it does, for a
 * thread that sleeps in poll; -1 if it could not be made.
 */
int node_io_shutdown_fd (void);

/* Resize a node (see the driver's truncate): 0 or -errno.  Control
 * path only, with no I/O in flight.  @size must be a multiple of the
 * node's request_alignment.
 */
int node_truncate (struct node *node, uint64_t size);

#endif /* NBDD_FORMATS_DRIVER_H */
