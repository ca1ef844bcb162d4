/* nbdd/: the QMP commands' shared machinery (qmp.c), for the files
 * that define commands (qmp.c, qmp-bitmap.c).
 */
#ifndef NBDD_QMP_H
#define NBDD_QMP_H

#include <stdbool.h>
#include <stddef.h>

#include <json-c/json.h>

#include "error.h"
#include "graph.h"

struct step {
  void (*undo) (void *data);    /* the command failed: put it back */
  void (*commit) (void *data);  /* it succeeded: finish it */
  void (*release) (void *data); /* either way, afterwards */
  void *data;
};

struct qmp_txn {
  struct step *steps;
  size_t nr_steps, cap_steps;
  struct graph_drain **drains;  /* held until the end */
  size_t nr_drains, cap_drains;
  const char *error_class;      /* for the error reply; default generic */
};

/* Room for @n more steps (and a drain), before making a change. */
int txn_reserve (struct qmp_txn *t, size_t n, struct error **errp);
/* Record a step; room was reserved. */
void txn_step (struct qmp_txn *t, void (*undo) (void *),
               void (*commit) (void *), void (*release) (void *),
               void *data);
/* Drain @nodes until the end of the command (room was reserved). */
int txn_drain (struct qmp_txn *t, struct node *const *nodes, size_t n,
               struct error **errp);
/* DeviceNotFound: "@what '@name' does not exist". */
int not_found (struct qmp_txn *t, struct error **errp, const char *what,
               const char *name);
/* The existing node named by the string argument @key of @args;
 * errors say what is wrong (DeviceNotFound for no such node).
 */
int arg_node (struct qmp_txn *t, struct json_object *args, const char *what,
              const char *key, struct node **nodep, struct error **errp);
/* Move every user of @from except the node @except to @to, both
 * drained until the end of the command; with @record, the specs (and
 * the catalogue) say so too.
 */
int txn_replace_users (struct qmp_txn *t, struct node *from, struct node *to,
                       struct node *except, bool record,
                       struct error **errp);
/* @node (drained by the caller) takes @backing as its backing node
 * (NULL: none) instead of the one it has: its backing edge moves (or
 * goes), its image's header names @backing_file and @backing's
 * driver, and its spec and the catalogue say so.
 */
int txn_set_backing (struct qmp_txn *t, struct node *node,
                     struct node *backing, const char *backing_file,
                     struct error **errp);
/* A transaction not started by a command (a job's end): @fn's changes
 * are recorded in the catalogue, or undone if anything fails.  0, or
 * -1 with errp.
 */
int txn_run_internal (const char *what,
                      int (*fn) (struct qmp_txn *t, void *opaque,
                                 struct error **errp),
                      void *opaque, struct error **errp);
/* 0, or -1 with errp naming the fleece @n is part of, or the job that
 * uses it: graph changes there are refused.
 */
int not_fleeced (const struct node *n, struct error **errp);
int not_in_job (const struct node *n, struct error **errp);
/* Compact JSON text (owned by @o). */
const char *json_text (struct json_object *o);

/* A command: 0, or -1 with errp set; *ret is the return value (NULL:
 * an empty object).
 */
typedef int qmp_command_fn (struct qmp_txn *t, struct json_object *args,
                            struct json_object **ret, struct error **errp);

/* qmp-bitmap.c */
qmp_command_fn cmd_block_dirty_bitmap_add, cmd_block_dirty_bitmap_remove,
  cmd_block_dirty_bitmap_clear, cmd_block_dirty_bitmap_enable,
  cmd_block_dirty_bitmap_disable, cmd_block_dirty_bitmap_merge,
  cmd_block_dirty_bitmap_fork, cmd_block_dirty_bitmap_unfork,
  cmd_query_bitmap_lineage;
/* Fork or end the fork of bitmap @d of @node for fleece @session (the
 * commands' work, without their checks that the bitmap is not
 * exported).
 */
int txn_bitmap_fork (struct qmp_txn *t, struct node *node,
                     struct dirty_bitmap *d, const char *session,
                     struct error **errp);
int txn_bitmap_unfork (struct qmp_txn *t, struct node *node,
                       struct dirty_bitmap *d, bool success,
                       const char *session, struct error **errp);
/* fleece.c */
qmp_command_fn cmd_fleece_start, cmd_fleece_stop, cmd_query_fleeces;
/* qmp-job.c */
qmp_command_fn cmd_blockdev_mirror, cmd_blockdev_backup, cmd_block_stream,
  cmd_block_commit, cmd_query_block_jobs,
  cmd_block_job_pause, cmd_block_job_resume, cmd_block_job_cancel,
  cmd_block_job_complete, cmd_block_job_set_speed, cmd_block_job_change,
  cmd_job_dismiss;
/* The "dirty-bitmaps" of a node in query-named-block-nodes. */
struct json_object *dirty_bitmaps_info (const struct node *node);

#endif /* NBDD_QMP_H */
