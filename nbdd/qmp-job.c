/* Block jobs on the admin socket: blockdev-mirror, block-stream,
 * block-commit, query-block-jobs, block-job-pause/-resume/-cancel/
 * -complete/-set-speed and job-dismiss, with QEMU's names, arguments
 * and events (jobs/job.h).
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <ev.h>

#include "backup.h"
#include "catalog.h"
#include "cbw.h"
#include "chain.h"
#include "commit.h"
#include "internal.h"
#include "job.h"
#include "log.h"
#include "mirror.h"
#include "options.h"
#include "qmp.h"
#include "stream.h"

#define DEFAULT_GRANULARITY 65536

static struct ev_loop *job_loop;
static ev_async job_async;

/* The catalogue keeps the command that made each running job; a job
 * that concludes goes from it.
 */
static int
record (const char *execute, const char *id, struct json_object *args,
        struct error **errp)
{
  struct json_object *o;
  int r;

  if (catalog == NULL)
    return 0;
  o = json_object_new_object ();
  json_object_object_add (o, "execute", json_object_new_string (execute));
  json_object_object_add (o, "arguments", json_object_get (args));
  r = catalog_job_put (catalog, id, json_text (o), errp);
  json_object_put (o);
  return r;
}

static void
forget (const char *id)
{
  struct error *err = NULL;

  if (catalog_job_del (catalog, id, &err) == -1) {
    nbdd_warn ("job '%s': %s", id, err->msg);
    error_free (err);
  }
}

/* Jobs that ended inside an admin command (a completion that failed,
 * say): their records go once the command's transaction is over, since
 * a command that fails rolls it back, and would bring a job it ended
 * back at the next start.
 */
static char **ended;
static size_t nr_ended;

static void
concluded (struct job *job)
{
  char **more, *id;

  if (catalog == NULL)
    return;
  if (!catalog_in_transaction (catalog)) {
    forget (job->id);
    return;
  }
  if ((id = strdup (job->id)) == NULL ||
      (more = realloc (ended, (nr_ended + 1) * sizeof *ended)) == NULL) {
    free (id);
    forget (job->id);           /* the best we can do */
    return;
  }
  ended = more;
  ended[nr_ended++] = id;
}

void
qmp_jobs_forget_ended (void)
{
  for (size_t i = 0; i < nr_ended; ++i) {
    forget (ended[i]);
    free (ended[i]);
  }
  free (ended);
  ended = NULL;
  nr_ended = 0;
}

static void
wake (void)
{
  ev_async_send (job_loop, &job_async);
}

static void
job_async_cb (struct ev_loop *loop, ev_async *w, int revents)
{
  jobs_poll ();
}

/* A job's graph changes go in a transaction: a command's
 * (block-job-complete), or one of their own when the job ends by
 * itself (block-stream, block-commit).
 */
static int
ops_drain (void *ctx, struct node *const *nodes, size_t n,
           struct error **errp)
{
  struct qmp_txn *t = ctx;

  return txn_reserve (t, 1, errp) == -1 ? -1
    : txn_drain (t, nodes, n, errp);
}

static int
ops_replace (void *ctx, struct node *from, struct node *to,
             struct error **errp)
{
  return txn_replace_users (ctx, from, to, NULL, true, errp);
}

static int
ops_set_backing (void *ctx, struct node *node, struct node *backing,
                 const char *backing_file, struct error **errp)
{
  return txn_set_backing (ctx, node, backing, backing_file, errp);
}

/* Drop "read-only": true from a spec and the children specs inline in
 * it, but for a backing file's: those layers were not reopened.
 */
static void
spec_clear_read_only (struct json_object *spec)
{
  struct json_object *v;

  if (!json_object_is_type (spec, json_type_object))
    return;
  if (json_object_object_get_ex (spec, "read-only", &v) &&
      json_object_get_boolean (v))
    json_object_object_add (spec, "read-only",
                            json_object_new_boolean (false));
  json_object_object_foreach (spec, key, child) {
    if (strcmp (key, "backing") != 0)
      spec_clear_read_only (child);
  }
}

/* @node and the nodes under it but for backing files, reopened: the
 * recorded ones are read-write in the catalogue too, so that a restart
 * opens them as they are now (an export may write through them).
 */
static int
record_read_write (struct node *node, struct error **errp)
{
  if (node_lookup (node->name) == node && node->recorded && catalog) {
    spec_clear_read_only (node->spec);
    if (catalog_node_put (catalog, node->name, json_text (node->spec),
                          errp) == -1)
      return -1;
  }
  for (size_t i = 0; i < node->nr_children; ++i)
    if (!(node->children[i]->role & CHILD_COW) &&
        record_read_write (node->children[i]->node, errp) == -1)
      return -1;
  return 0;
}

/* A layer the job writes into (the base of a commit, the image whose
 * header changes) that was opened read-only, as backing files are, is
 * reopened read-write first, as QEMU does, and stays so while open.
 */
static int
ops_reopen_rw (void *ctx, struct node *node, struct error **errp)
{
  struct qmp_txn *t = ctx;

  if (!node->read_only)
    return 0;
  if (txn_reserve (t, 1, errp) == -1 || txn_drain (t, &node, 1, errp) == -1 ||
      node_reopen_rw (node, errp) == -1)
    return -1;
  nbdd_info ("node '%s' reopened read-write for a block job", node->name);
  return graph_perm_update (&node, 1, errp) == -1 ? -1
    : record_read_write (node, errp);
}

struct job_txn {
  struct job *job;
  job_txn_fn *fn;
};

static int
job_txn_step (struct qmp_txn *t, void *opaque, struct error **errp)
{
  struct job_txn *jt = opaque;
  struct job_graph_ops ops = { ops_drain, ops_replace, ops_set_backing,
                               ops_reopen_rw, t };

  return jt->fn (jt->job, &ops, errp);
}

static int
job_txn (struct job *job, job_txn_fn *fn, struct error **errp)
{
  struct job_txn jt = { job, fn };
  char what[160];

  snprintf (what, sizeof what, "job '%s' (%s): the graph change at its "
            "end", job->id, job->drv->type);
  return txn_run_internal (what, job_txn_step, &jt, errp);
}

void
qmp_jobs_init (struct ev_loop *loop)
{
  job_loop = loop;
  ev_async_init (&job_async, job_async_cb);
  ev_async_start (loop, &job_async);
  ev_unref (loop);
  jobs_set_hooks (wake, admin_event, concluded, job_txn);
}

/* The job named by argument @key (QEMU's "device" or "id"). */
static int
arg_job (struct qmp_txn *t, struct json_object *args, const char *what,
         const char *key, struct job **jobp, struct error **errp)
{
  const char *id;

  if (opt_get_string (args, what, key, true, &id, errp) == -1)
    return -1;
  if ((*jobp = job_find (id)) == NULL)
    return not_found (t, errp, "job", id);
  return 0;
}

/* A job created by command @execute starts (and the catalogue keeps
 * the command, to start it again after a restart), or goes without a
 * trace.
 */
static int
start_job (struct job *job, const char *execute, struct json_object *args,
           enum job_on_error on_source_error,
           enum job_on_error on_target_error, struct error **errp)
{
  job_set_on_error (job, on_source_error, on_target_error);
  if (record (execute, job->id, args, errp) == -1 ||
      job_start (job, errp) == -1) {
    job->drv->finish (job, false, NULL);
    job_discard (job);
    return -1;
  }
  return 0;
}

static const char *const mirror_keys[] = {
  "job-id", "device", "target", "sync", "speed", "granularity", "buf-size",
  "auto-dismiss", "auto-finalize", "replaces", "copy-mode",
  "on-source-error", "on-target-error", NULL
};

/* QEMU's BlockdevOnError argument @key (default report). */
static int
arg_on_error (struct json_object *args, const char *what, const char *key,
              enum job_on_error *r, struct error **errp)
{
  const char *s = "report";

  if (opt_get_string (args, what, key, false, &s, errp) == -1)
    return -1;
  if (job_on_error_parse (s, r) == -1) {
    error_setg (errp, "%s: '%s' must be 'report', 'ignore', 'stop' or "
                "'enospc'", what, key);
    return -1;
  }
  return 0;
}

/* QEMU's MirrorCopyMode.  0, or -1 with errp. */
static int
parse_copy_mode (const char *what, const char *s,
                 enum mirror_copy_mode *mode, struct error **errp)
{
  if (strcmp (s, "background") == 0)
    *mode = MIRROR_COPY_BACKGROUND;
  else if (strcmp (s, "write-blocking") == 0)
    *mode = MIRROR_COPY_WRITE_BLOCKING;
  else {
    error_setg (errp, "%s: copy-mode must be 'background' or "
                "'write-blocking', not '%.80s'", what, s);
    return -1;
  }
  return 0;
}

int
cmd_blockdev_mirror (struct qmp_txn *t, struct json_object *args,
                     struct json_object **ret, struct error **errp)
{
  const char *id, *sync_s, *mode_s = "background";
  struct node *source, *target;
  uint64_t speed = 0, granularity = DEFAULT_GRANULARITY, buf_size = 0;
  bool auto_dismiss = true, auto_finalize = true;
  enum mirror_sync sync;
  enum mirror_copy_mode mode;
  enum job_on_error on_source, on_target;
  struct job *job;

  if (opt_check_keys (args, "blockdev-mirror", mirror_keys, errp) == -1 ||
      opt_get_string (args, "blockdev-mirror", "job-id", true, &id,
                      errp) == -1 ||
      arg_node (t, args, "blockdev-mirror", "device", &source, errp) == -1 ||
      arg_node (t, args, "blockdev-mirror", "target", &target, errp) == -1 ||
      opt_get_string (args, "blockdev-mirror", "sync", true, &sync_s,
                      errp) == -1 ||
      opt_get_uint64 (args, "blockdev-mirror", "speed", false, &speed,
                      errp) == -1 ||
      opt_get_size (args, "blockdev-mirror", "granularity", false,
                    &granularity, errp) == -1 ||
      opt_get_size (args, "blockdev-mirror", "buf-size", false, &buf_size,
                    errp) == -1 ||
      opt_get_bool (args, "blockdev-mirror", "auto-dismiss", false,
                    &auto_dismiss, errp) == -1 ||
      opt_get_bool (args, "blockdev-mirror", "auto-finalize", false,
                    &auto_finalize, errp) == -1 ||
      opt_get_string (args, "blockdev-mirror", "copy-mode", false, &mode_s,
                      errp) == -1 ||
      parse_copy_mode ("blockdev-mirror", mode_s, &mode, errp) == -1 ||
      arg_on_error (args, "blockdev-mirror", "on-source-error", &on_source,
                    errp) == -1 ||
      arg_on_error (args, "blockdev-mirror", "on-target-error", &on_target,
                    errp) == -1)
    return -1;
  if (not_fleeced (source, errp) == -1 || not_fleeced (target, errp) == -1)
    return -1;
  if (json_object_object_get_ex (args, "replaces", NULL)) {
    error_setg (errp, "blockdev-mirror: 'replaces' is not supported: the "
                "users of 'device' move to 'target'");
    return -1;
  }
  if (!auto_finalize) {
    error_setg (errp, "blockdev-mirror: 'auto-finalize' false is not "
                "supported");
    return -1;
  }
  if (strcmp (sync_s, "full") == 0)
    sync = MIRROR_SYNC_FULL;
  else if (strcmp (sync_s, "top") == 0)
    sync = MIRROR_SYNC_TOP;
  else if (strcmp (sync_s, "none") == 0)
    sync = MIRROR_SYNC_NONE;
  else {
    error_setg (errp, "blockdev-mirror: sync must be 'full', 'top' or "
                "'none'");
    return -1;
  }
  if (granularity < 512 || granularity > (UINT64_C (64) << 20) ||
      (granularity & (granularity - 1))) {
    error_setg (errp, "blockdev-mirror: granularity must be a power of 2 "
                "from 512 bytes to 64 MiB");
    return -1;
  }
  job = mirror_create (id, source, target, sync, mode, speed,
                       (uint32_t) granularity, buf_size, auto_dismiss, errp);
  return job ? start_job (job, "blockdev-mirror", args, on_source,
                         on_target, errp) : -1;
}

/* The node named by @key, looked up in @top's chain (nodes inside
 * other nodes' specs have names too), then among all nodes (to say
 * that it is not in the chain).
 */
static int
arg_chain_node (struct qmp_txn *t, struct json_object *args,
                const char *what, const char *key, struct node *top,
                struct node **nodep, struct error **errp)
{
  const char *name;
  int r = opt_get_string (args, what, key, false, &name, errp);

  *nodep = NULL;
  if (r != 0)
    return r;
  if ((*nodep = chain_find (top, name)) != NULL)
    return 0;
  if (node_lookup (name) == NULL)
    return not_found (t, errp, "node", name);
  error_setg (errp, "%s: node '%s' is not in the backing chain of '%s'",
              what, name, top->name);
  return -1;
}

/* What QEMU's jobs take and nbdd does one way only. */
static int
check_job_options (struct json_object *args, const char *what,
                   enum job_on_error *on_error, struct error **errp)
{
  bool auto_finalize = true;

  if (opt_get_bool (args, what, "auto-finalize", false, &auto_finalize,
                    errp) == -1 ||
      arg_on_error (args, what, "on-error", on_error, errp) == -1)
    return -1;
  if (!auto_finalize) {
    error_setg (errp, "%s: 'auto-finalize' false is not supported", what);
    return -1;
  }
  if (json_object_object_get_ex (args, "filter-node-name", NULL)) {
    error_setg (errp, "%s: 'filter-node-name' is not supported: nbdd's "
                "jobs insert no filter node", what);
    return -1;
  }
  return 0;
}

/* ---- blockdev-backup ---- */

/* How a backup's fork ended, in the bitmap's lineage. */
static void
backup_unforked (struct dirty_bitmap *d, bool success, const char *job)
{
  struct error *err = NULL;

  /* Its own statement, or part of the command that ended the job. */
  if (catalog == NULL)
    return;
  if (catalog_lineage_add (catalog, d->node->name, d->name, NULL,
                           success ? "unfork-success" : "unfork-failure",
                           job, &err) == -1) {
    nbdd_warn ("backup '%s': bitmap '%s': lineage not recorded: %s", job,
               d->name, err ? err->msg : "?");
    error_free (err);
  }
}

static void
undo_backup (void *data)
{
  struct job *job = data;

  job_stop_thread (job);
  job_discard (job);
}

static void
undo_backup_attach (void *data)
{
  cbw_set_detaching (data, true);
}

static const char *const backup_keys[] = {
  "job-id", "device", "target", "sync", "bitmap", "bitmap-mode", "speed",
  "auto-dismiss", "auto-finalize", "on-source-error", "on-target-error",
  NULL
};

int
cmd_blockdev_backup (struct qmp_txn *t, struct json_object *args,
                     struct json_object **ret, struct error **errp)
{
  const char *id, *sync, *bname = NULL, *mode_s = NULL;
  struct node *source, *target, *cbw;
  struct dirty_bitmap *d = NULL;
  enum backup_bitmap_mode mode = BACKUP_BITMAP_ON_SUCCESS;
  uint64_t speed = 0;
  bool auto_dismiss = true, auto_finalize = true;
  struct job *job;

  if (opt_check_keys (args, "blockdev-backup", backup_keys, errp) == -1 ||
      opt_get_string (args, "blockdev-backup", "job-id", true, &id,
                      errp) == -1 ||
      arg_node (t, args, "blockdev-backup", "device", &source, errp) == -1 ||
      arg_node (t, args, "blockdev-backup", "target", &target, errp) == -1 ||
      opt_get_string (args, "blockdev-backup", "sync", true, &sync,
                      errp) == -1 ||
      opt_get_string (args, "blockdev-backup", "bitmap", false, &bname,
                      errp) == -1 ||
      opt_get_string (args, "blockdev-backup", "bitmap-mode", false, &mode_s,
                      errp) == -1 ||
      opt_get_uint64 (args, "blockdev-backup", "speed", false, &speed,
                      errp) == -1 ||
      opt_get_bool (args, "blockdev-backup", "auto-dismiss", false,
                    &auto_dismiss, errp) == -1 ||
      opt_get_bool (args, "blockdev-backup", "auto-finalize", false,
                    &auto_finalize, errp) == -1)
    return -1;
  /* A failed copy breaks the copy-before-write filter's point in time
   * for good: there is nothing to copy again.
   */
  for (const char *const *k = (const char *const[]) {
         "on-source-error", "on-target-error", NULL }; *k; ++k) {
    enum job_on_error on;
    if (arg_on_error (args, "blockdev-backup", *k, &on, errp) == -1)
      return -1;
    if (on != JOB_ON_ERROR_REPORT) {
      error_setg (errp, "blockdev-backup: '%s' must be 'report': a copy "
                  "that fails breaks the backup's point in time", *k);
      return -1;
    }
  }
  if (!auto_finalize) {
    error_setg (errp, "blockdev-backup: 'auto-finalize' false is not "
                "supported");
    return -1;
  }
  if (strcmp (sync, "full") != 0 && strcmp (sync, "incremental") != 0 &&
      strcmp (sync, "bitmap") != 0) {
    error_setg (errp, "blockdev-backup: sync must be 'full', "
                "'incremental' or 'bitmap'");
    return -1;
  }
  if ((strcmp (sync, "full") == 0) != (bname == NULL)) {
    error_setg (errp, "blockdev-backup: sync '%s' %s", sync,
                bname ? "takes no 'bitmap'" : "needs a 'bitmap'");
    return -1;
  }
  if (mode_s) {
    if (strcmp (sync, "bitmap") != 0 &&
        strcmp (mode_s, "on-success") != 0) {
      error_setg (errp, "blockdev-backup: 'bitmap-mode' other than "
                  "'on-success' is for sync 'bitmap'");
      return -1;
    }
    if (strcmp (mode_s, "on-success") == 0)
      mode = BACKUP_BITMAP_ON_SUCCESS;
    else if (strcmp (mode_s, "never") == 0)
      mode = BACKUP_BITMAP_NEVER;
    else if (strcmp (mode_s, "always") == 0)
      mode = BACKUP_BITMAP_ALWAYS;
    else {
      error_setg (errp, "blockdev-backup: bitmap-mode must be "
                  "'on-success', 'never' or 'always'");
      return -1;
    }
  }
  if (not_fleeced (source, errp) == -1 || not_fleeced (target, errp) == -1)
    return -1;
  for (size_t i = 0; i < source->nr_parents; ++i)
    if (source->parents[i]->parent && cbw_is (source->parents[i]->parent)) {
      error_setg (errp, "blockdev-backup: node '%s' is being backed up "
                  "already", source->name);
      return -1;
    }
  if (target->read_only) {
    error_setg (errp, "blockdev-backup: target '%s' is read-only",
                target->name);
    return -1;
  }
  if (bname && (d = dirty_bitmap_find (source, bname)) == NULL) {
    t->error_class = "DeviceNotFound";
    error_setg (errp, "node '%s' has no bitmap '%.80s'", source->name,
                bname);
    return -1;
  }
  if (txn_reserve (t, 4, errp) == -1 ||
      txn_drain (t, &source, 1, errp) == -1 ||
      (d && txn_bitmap_fork (t, source, d, id, errp) == -1))
    return -1;
  job = backup_create (id, source, target, d, mode, speed, auto_dismiss,
                       backup_unforked, &cbw, errp);
  if (job == NULL)
    return -1;
  txn_step (t, undo_backup, NULL, NULL, job);
  if (txn_replace_users (t, source, cbw, cbw, false, errp) == -1)
    return -1;
  /* Now nobody else may write under the filter. */
  cbw_set_detaching (cbw, false);
  txn_step (t, undo_backup_attach, NULL, NULL, cbw);
  if (graph_perm_update (&cbw, 1, errp) == -1 ||
      record ("blockdev-backup", id, args, errp) == -1)
    return -1;
  job_set_on_error (job, JOB_ON_ERROR_REPORT, JOB_ON_ERROR_REPORT);
  return job_start (job, errp);
}

static const char *const stream_keys[] = {
  "job-id", "device", "base-node", "backing-file", "speed", "on-error",
  "auto-finalize", "auto-dismiss", "filter-node-name", NULL
};

/* QEMU's block-stream: @device, the top of a chain, takes in what the
 * layers above base-node (all of them, without) hold, and then has
 * base-node (none) as its backing node.
 */
int
cmd_block_stream (struct qmp_txn *t, struct json_object *args,
                  struct json_object **ret, struct error **errp)
{
  struct job_graph_ops ops = { ops_drain, ops_replace, ops_set_backing,
                               ops_reopen_rw, t };
  const char *id = NULL, *backing_file = NULL;
  struct node *top, *base;
  uint64_t speed = 0;
  bool auto_dismiss = true;
  enum job_on_error on_error;
  struct job *job;

  if (opt_check_keys (args, "block-stream", stream_keys, errp) == -1 ||
      arg_node (t, args, "block-stream", "device", &top, errp) == -1 ||
      opt_get_string (args, "block-stream", "job-id", false, &id,
                      errp) == -1 ||
      arg_chain_node (t, args, "block-stream", "base-node", top, &base,
                      errp) == -1 ||
      opt_get_string (args, "block-stream", "backing-file", false,
                      &backing_file, errp) == -1 ||
      opt_get_uint64 (args, "block-stream", "speed", false, &speed,
                      errp) == -1 ||
      opt_get_bool (args, "block-stream", "auto-dismiss", false,
                    &auto_dismiss, errp) == -1 ||
      check_job_options (args, "block-stream", &on_error, errp) == -1)
    return -1;
  if (not_fleeced (top, errp) == -1)
    return -1;
  if (base == top) {
    error_setg (errp, "block-stream: base node '%s' is the device itself",
                top->name);
    return -1;
  }
  job = stream_create (id ? id : top->name, top, base, backing_file, speed,
                       auto_dismiss, &ops, errp);
  return job ? start_job (job, "block-stream", args, on_error, on_error,
                         errp) : -1;
}

/* @n, or the first layer below it if it is a filter (NULL: none). */
static struct node *
skip_filters (struct node *n)
{
  return n->drv->is_filter ? chain_next_layer (n) : n;
}

static const char *const commit_keys[] = {
  "job-id", "device", "top-node", "base-node", "backing-file", "speed",
  "on-error", "auto-finalize", "auto-dismiss", "filter-node-name", NULL
};

/* QEMU's block-commit: what top-node (default: @device, the active
 * layer) and the layers down to base-node (default: the node below
 * top-node) hold goes into base-node.  Below the active layer the job
 * ends by itself, dropping the layers from the chain; of the active
 * layer it is a mirror, completed with block-job-complete.
 */
int
cmd_block_commit (struct qmp_txn *t, struct json_object *args,
                  struct json_object **ret, struct error **errp)
{
  struct job_graph_ops ops = { ops_drain, ops_replace, ops_set_backing,
                               ops_reopen_rw, t };
  const char *id = NULL, *backing_file = NULL;
  struct node *device, *top, *base, *overlay = NULL;
  uint64_t speed = 0;
  bool auto_dismiss = true;
  enum job_on_error on_error;
  struct job *job;

  if (opt_check_keys (args, "block-commit", commit_keys, errp) == -1 ||
      arg_node (t, args, "block-commit", "device", &device, errp) == -1 ||
      opt_get_string (args, "block-commit", "job-id", false, &id,
                      errp) == -1 ||
      arg_chain_node (t, args, "block-commit", "top-node", device, &top,
                      errp) == -1)
    return -1;
  /* Filters above a layer stand for it, as in QEMU. */
  if (top == NULL)
    top = device;
  if ((top = skip_filters (top)) == NULL) {
    error_setg (errp, "block-commit: node '%s' filters nothing to commit",
                device->name);
    return -1;
  }
  if (arg_chain_node (t, args, "block-commit", "base-node", top, &base,
                      errp) == -1 ||
      opt_get_string (args, "block-commit", "backing-file", false,
                      &backing_file, errp) == -1 ||
      opt_get_uint64 (args, "block-commit", "speed", false, &speed,
                      errp) == -1 ||
      opt_get_bool (args, "block-commit", "auto-dismiss", false,
                    &auto_dismiss, errp) == -1 ||
      check_job_options (args, "block-commit", &on_error, errp) == -1)
    return -1;
  if (not_fleeced (device, errp) == -1)
    return -1;
  if (base == NULL && (base = chain_next_layer (top)) == NULL) {
    error_setg (errp, "block-commit: node '%s' has no backing node to "
                "commit into", top->name);
    return -1;
  }
  if (base == top) {
    error_setg (errp, "block-commit: top and base are the same node "
                "('%s')", top->name);
    return -1;
  }
  if (top == skip_filters (device)) {
    if (backing_file) {
      error_setg (errp, "block-commit: 'backing-file' is for a commit "
                  "below the active layer: committing '%s' leaves no "
                  "header to change", top->name);
      return -1;
    }
    /* Its users move onto the base at the end, and the catalogue must
     * be able to name it then: a node of its own, not one opened from
     * the name in a header (which goes with the layer above).
     */
    if (node_lookup (base->name) != base) {
      error_setg (errp, "block-commit: base node '%s' was opened from the "
                  "backing file name in an image header: add it with "
                  "blockdev-add and name it as the backing node of the "
                  "layer above, so that the active layer's users can move "
                  "onto it", base->name);
      return -1;
    }
    job = commit_active_create (id ? id : device->name, top, base, speed,
                                auto_dismiss, &ops, errp);
  }
  else {
    /* The node right above the top. */
    for (overlay = device; chain_next_edge (overlay)->node != top;
         overlay = chain_next_edge (overlay)->node)
      ;
    job = commit_create (id ? id : device->name, overlay, top, base,
                         backing_file, speed, auto_dismiss, &ops, errp);
  }
  return job ? start_job (job, "block-commit", args, on_error, on_error,
                         errp) : -1;
}

int
cmd_query_block_jobs (struct qmp_txn *t, struct json_object *args,
                      struct json_object **ret, struct error **errp)
{
  struct json_object *list = json_object_new_array ();

  for (struct job *j = jobs_first (); j; j = j->next)
    if (!j->dismiss_pending)
      json_object_array_add (list, job_info (j));
  *ret = list;
  return 0;
}

struct job_record {
  const char *id;
  struct json_object *cmd;      /* the command that made the job */
};

static int
find_record (const char *key, const char *json, void *opaque)
{
  struct job_record *jr = opaque;

  if (strcmp (key, jr->id) == 0 && jr->cmd == NULL)
    jr->cmd = json_tokener_parse (json);
  return 0;
}

/* The job's record in the catalogue, changed by @edit (on the record,
 * and its command's arguments), so that a restart starts it again as
 * it runs now.
 */
static int
record_edit (struct job *job,
             void (*edit) (struct json_object *rec, struct json_object *args,
                           const void *opaque),
             const void *opaque, struct error **errp)
{
  struct job_record jr = { job->id, NULL };
  struct json_object *args;
  int r;

  if (catalog == NULL)
    return 0;
  if (catalog_job_foreach (catalog, find_record, &jr, errp) == -1)
    return -1;
  if (jr.cmd == NULL)
    return 0;                   /* ended: nothing to start again */
  if (!json_object_object_get_ex (jr.cmd, "arguments", &args) ||
      !json_object_is_type (args, json_type_object)) {
    json_object_put (jr.cmd);
    error_setg (errp, "job '%s': its record in the catalogue is not "
                "a command", job->id);
    return -1;
  }
  edit (jr.cmd, args, opaque);
  r = catalog_job_put (catalog, job->id, json_text (jr.cmd), errp);
  json_object_put (jr.cmd);
  return r;
}

static void
set_copy_mode (struct json_object *rec, struct json_object *args,
               const void *mode)
{
  json_object_object_add (args, "copy-mode", json_object_new_string (mode));
}

/* A pause the user asked for outlives a restart: the job comes back
 * paused.  (Not a QMP argument: a key of the record.)
 */
static void
set_paused (struct json_object *rec, struct json_object *args,
            const void *paused)
{
  if (*(const bool *) paused)
    json_object_object_add (rec, "paused", json_object_new_boolean (1));
  else
    json_object_object_del (rec, "paused");
}

static const char *const device_keys[] = { "device", NULL };

int
cmd_block_job_pause (struct qmp_txn *t, struct json_object *args,
                     struct json_object **ret, struct error **errp)
{
  struct job *job;

  /* The record first: the catalogue's change is undone with the
   * command if the pause fails.
   */
  if (opt_check_keys (args, "block-job-pause", device_keys, errp) == -1 ||
      arg_job (t, args, "block-job-pause", "device", &job, errp) == -1 ||
      record_edit (job, set_paused, &(bool) { true }, errp) == -1)
    return -1;
  return job_pause (job, errp);
}

int
cmd_block_job_resume (struct qmp_txn *t, struct json_object *args,
                      struct json_object **ret, struct error **errp)
{
  struct job *job;

  if (opt_check_keys (args, "block-job-resume", device_keys, errp) == -1 ||
      arg_job (t, args, "block-job-resume", "device", &job, errp) == -1 ||
      record_edit (job, set_paused, &(bool) { false }, errp) == -1)
    return -1;
  return job_resume (job, errp);
}

static const char *const cancel_keys[] = { "device", "force", NULL };

int
cmd_block_job_cancel (struct qmp_txn *t, struct json_object *args,
                      struct json_object **ret, struct error **errp)
{
  struct job_graph_ops ops = { ops_drain, ops_replace, ops_set_backing,
                               ops_reopen_rw, t };
  struct job *job;
  bool force = false;

  if (opt_check_keys (args, "block-job-cancel", cancel_keys, errp) == -1 ||
      arg_job (t, args, "block-job-cancel", "device", &job, errp) == -1 ||
      opt_get_bool (args, "block-job-cancel", "force", false, &force,
                    errp) == -1)
    return -1;
  return job_cancel (job, force, &ops, errp);
}

int
cmd_block_job_complete (struct qmp_txn *t, struct json_object *args,
                        struct json_object **ret, struct error **errp)
{
  struct job_graph_ops ops = { ops_drain, ops_replace, ops_set_backing,
                               ops_reopen_rw, t };
  struct job *job;

  if (opt_check_keys (args, "block-job-complete", device_keys,
                      errp) == -1 ||
      arg_job (t, args, "block-job-complete", "device", &job, errp) == -1)
    return -1;
  return job_complete (job, &ops, errp);
}

static const char *const speed_keys[] = { "device", "speed", NULL };

int
cmd_block_job_set_speed (struct qmp_txn *t, struct json_object *args,
                         struct json_object **ret, struct error **errp)
{
  struct job *job;
  uint64_t speed;

  if (opt_check_keys (args, "block-job-set-speed", speed_keys, errp) == -1 ||
      arg_job (t, args, "block-job-set-speed", "device", &job, errp) == -1 ||
      opt_get_uint64 (args, "block-job-set-speed", "speed", true, &speed,
                      errp) == -1)
    return -1;
  return job_set_speed (job, speed, errp);
}

static void
undo_to_background (void *data)
{
  struct error *err = NULL;

  if (mirror_change_copy_mode (data, MIRROR_COPY_BACKGROUND, &err) == -1) {
    nbdd_warn ("%s", err->msg);
    error_free (err);
  }
}

static void
undo_to_write_blocking (void *data)
{
  struct error *err = NULL;

  if (mirror_change_copy_mode (data, MIRROR_COPY_WRITE_BLOCKING,
                               &err) == -1) {
    nbdd_warn ("%s", err->msg);
    error_free (err);
  }
}

static const char *const change_keys[] = { "id", "type", "copy-mode", NULL };

/* QEMU's block-job-change: a mirror's copy-mode. */
int
cmd_block_job_change (struct qmp_txn *t, struct json_object *args,
                      struct json_object **ret, struct error **errp)
{
  const char *type, *mode_s;
  enum mirror_copy_mode mode;
  struct job *job;

  if (opt_check_keys (args, "block-job-change", change_keys, errp) == -1 ||
      arg_job (t, args, "block-job-change", "id", &job, errp) == -1 ||
      opt_get_string (args, "block-job-change", "type", true, &type,
                      errp) == -1 ||
      opt_get_string (args, "block-job-change", "copy-mode", true, &mode_s,
                      errp) == -1 ||
      parse_copy_mode ("block-job-change", mode_s, &mode, errp) == -1)
    return -1;
  /* QEMU's BlockJobChangeOptions: only a mirror's can change. */
  if (strcmp (type, "mirror") != 0) {
    error_setg (errp, "block-job-change: type must be 'mirror', not "
                "'%.80s'", type);
    return -1;
  }
  if (strcmp (type, job->drv->type) != 0) {
    error_setg (errp, "block-job-change: job '%s' is a %s job, not "
                "'%.80s'", job->id, job->drv->type, type);
    return -1;
  }
  if (mirror_copy_mode (job) == mode)
    return 0;
  if (txn_reserve (t, 1, errp) == -1 ||
      mirror_change_copy_mode (job, mode, errp) == -1)
    return -1;
  txn_step (t, mode == MIRROR_COPY_WRITE_BLOCKING ? undo_to_background
            : undo_to_write_blocking, NULL, NULL, job);
  return record_edit (job, set_copy_mode, mode_s, errp);
}

static const char *const id_keys[] = { "id", NULL };

int
cmd_job_dismiss (struct qmp_txn *t, struct json_object *args,
                 struct json_object **ret, struct error **errp)
{
  struct job *job;

  if (opt_check_keys (args, "job-dismiss", id_keys, errp) == -1 ||
      arg_job (t, args, "job-dismiss", "id", &job, errp) == -1)
    return -1;
  return job_dismiss (job, errp);
}

/* ---- after a restart ---- */

static int
collect_job (const char *key, const char *json, void *opaque)
{
  struct json_object *list = opaque, *o = json_object_new_object ();

  json_object_object_add (o, "id", json_object_new_string (key));
  json_object_object_add (o, "spec", json_tokener_parse (json));
  json_object_array_add (list, o);
  return 0;
}

/* The jobs a stop cut short: a backup's point in time is gone, so it
 * ends as a failure (its bitmap holds frozen and successor bits, as
 * the image keeps them); the others start again with the same
 * arguments, and if they cannot, say why and end.
 */
void
qmp_jobs_recover (void)
{
  struct json_object *list = json_object_new_array ();
  struct admin_peer self = { getuid (), getpid () };
  struct error *err = NULL;

  if (catalog == NULL)
    return;
  if (catalog_job_foreach (catalog, collect_job, list, &err) == -1) {
    nbdd_warn ("reading the jobs to pick up: %s", err->msg);
    error_free (err);
  }
  for (size_t i = 0; i < json_object_array_length (list); ++i) {
    struct json_object *o = json_object_array_get_idx (list, i);
    const char *id = json_object_get_string (json_object_object_get (o,
                                                                     "id"));
    struct json_object *spec = json_object_object_get (o, "spec");
    const char *execute = json_object_get_string
      (json_object_object_get (spec, "execute"));
    struct json_object *args = json_object_object_get (spec, "arguments");
    struct json_object *reply;
    bool again = execute && strcmp (execute, "blockdev-backup") != 0;

    if (again) {
      struct json_object *paused;
      reply = qmp_execute (execute, args, &self);
      if (json_object_object_get_ex (reply, "return", NULL) &&
          json_object_object_get_ex (spec, "paused", &paused) &&
          json_object_get_boolean (paused)) {
        struct json_object *pa = json_object_new_object (), *r2;
        json_object_object_add (pa, "device", json_object_new_string (id));
        r2 = qmp_execute ("block-job-pause", pa, &self);
        nbdd_info ("job '%s' (%s) was cut short by the stop: started "
                   "again, paused as it was%s", id, execute,
                   json_object_object_get_ex (r2, "return", NULL) ? ""
                   : " (but the pause failed)");
        json_object_put (r2);
        json_object_put (pa);
      }
      else if (json_object_object_get_ex (reply, "return", NULL))
        nbdd_info ("job '%s' (%s) was cut short by the stop: started "
                   "again", id, execute);
      else {
        nbdd_warn ("job '%s' (%s) was cut short by the stop and cannot "
                   "start again: %s", id, execute, json_object_get_string
                   (json_object_object_get (json_object_object_get
                                            (reply, "error"), "desc")));
        again = false;
      }
      json_object_put (reply);
    }
    else
      nbdd_warn ("job '%s' (%s) was cut short by the stop: ended as a "
                 "failure, its bitmap keeps every bit", id,
                 execute ? execute : "?");
    if (!again &&
        (catalog_lineage_reclaim (catalog, id, &err) == -1 ||
         catalog_job_del (catalog, id, &err) == -1)) {
      nbdd_warn ("job '%s': %s", id, err->msg);
      error_free (err);
      err = NULL;
    }
  }
  json_object_put (list);
}
