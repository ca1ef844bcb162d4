/* jobs/: long-running block jobs (mirror, backup, ...) with QEMU's
 * lifecycle, on a thread of their own.
 *
 * A job's states are QEMU's JobStatus: created, running, paused,
 * ready, concluded and null (plus aborting, on the way to concluded
 * after an error or a cancel).  The job's thread does the copying
 * (job_driver.run) and checks at each step whether to pause, stop or
 * slow down; everything else (creating, completing, ending, events)
 * runs on the main thread.  The thread tells the main thread that
 * something happened through a hook the daemon sets (an ev_async),
 * and the main thread calls jobs_poll.
 */
#ifndef NBDD_JOB_H
#define NBDD_JOB_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <json-c/json.h>

#include "error.h"
#include "graph.h"

enum job_status {
  JOB_CREATED, JOB_RUNNING, JOB_PAUSED, JOB_READY, JOB_ABORTING,
  JOB_CONCLUDED, JOB_NULL,
};

/* QEMU's BlockdevOnError for jobs: what a job does when a copy fails,
 * reading its source (on-source-error) or writing its target
 * (on-target-error).  report: the job fails; ignore: the range is
 * copied again; stop: the job pauses (io-status failed or nospace)
 * until block-job-resume, then copies it again; enospc: stop on ENOSPC,
 * else report.  Each error is a BLOCK_JOB_ERROR event.
 */
enum job_on_error {
  JOB_ON_ERROR_REPORT, JOB_ON_ERROR_IGNORE, JOB_ON_ERROR_STOP,
  JOB_ON_ERROR_ENOSPC,
};

enum job_io_status { JOB_IO_OK, JOB_IO_FAILED, JOB_IO_NOSPACE };

struct job;

/* What completing a job may do to the graph, given by the caller (the
 * admin command, whose transaction holds the drains and undoes the
 * moves if it fails).
 */
struct job_graph_ops {
  /* Drain @nodes until the end of the command. */
  int (*drain) (void *ctx, struct node *const *nodes, size_t n,
                struct error **errp);
  /* Every user of @from now uses @to, in the specs and the catalogue
   * too.
   */
  int (*replace) (void *ctx, struct node *from, struct node *to,
                  struct error **errp);
  /* @node's backing node is @backing from now on (NULL: none), in the
   * graph (its backing edge moves, or goes), in its image's header
   * (which names @backing_file, or @backing's file if NULL) and in its
   * spec and the catalogue.  @node is drained.
   */
  int (*set_backing) (void *ctx, struct node *node, struct node *backing,
                      const char *backing_file, struct error **errp);
  /* @node, read-only (a backing file, say), becomes read-write for a
   * job that writes into it, as QEMU reopens it, and stays so: see
   * node_reopen_rw.  Called by a job's create function once its own
   * checks pass.
   */
  int (*reopen_rw) (void *ctx, struct node *node, struct error **errp);
  void *ctx;
};

struct job_driver {
  const char *type;             /* QEMU's JobType: "mirror", "backup" */
  /* The job's thread: copy until done (or, after job_set_ready, until
   * job_should_stop).  0, or -errno (the job fails).
   */
  int (*run) (struct job *job);
  /* Optional.  Main thread: run returned 0 and the job was not
   * cancelled: the graph changes that end a job that ends by itself
   * (block-stream, block-commit), done in a transaction of the
   * daemon's through @ops (undone if it fails, and the job fails).
   * finish follows, either way.  0, or -1 with errp.
   */
  int (*prepare) (struct job *job, const struct job_graph_ops *ops,
                  struct error **errp);
  /* Main thread, run returned: finish (ok: pivot, unfork a bitmap...)
   * or undo.  0, or -1 with errp (the job fails).
   */
  int (*finish) (struct job *job, bool ok, struct error **errp);
  /* Main thread: block-job-complete on a ready job, with its thread
   * stopped: bring the target in sync and, if @pivot, move the users
   * onto it (without: block-job-cancel of a ready job, as in QEMU).
   * NULL: the job cannot be completed (it ends by itself).  0; -1
   * with errp: the job fails (the driver let go); -2 with errp: an
   * error the job goes on from (on-*-error), its thread is started
   * again (or, if it cannot be, finish (false) follows).
   */
  int (*complete) (struct job *job, const struct job_graph_ops *ops,
                   bool pivot, struct error **errp);
  void (*free) (struct job *job);
};

struct job {
  struct job *next;
  char *id;
  const struct job_driver *drv;
  void *opaque;                 /* the driver's */
  enum job_status status;       /* main thread */
  bool auto_dismiss;
  struct node_root root;        /* the job's edge into the graph */

  pthread_t thread;
  bool thread_started;
  pthread_mutex_t lock;         /* everything below */
  pthread_cond_t cond;
  bool pause_requested, paused, cancel_requested, stop_requested;
  unsigned pauses;              /* times the thread stopped in a pause */
  bool ready, finished;         /* the thread said so */
  int ret;                      /* run's result, once finished */
  bool ready_seen;              /* main thread: event sent */
  bool dismiss_pending;         /* main thread: concluded, goes soon */
  /* Set by the driver's free: something it could not detach (a hook on
   * a node that would not drain) may still reach the job, so its memory
   * stays.
   */
  bool keep_memory;
  uint64_t speed;               /* bytes/s; 0: no limit */
  uint64_t next_ns;             /* when the next copy may start */

  enum job_on_error on_source_error, on_target_error;  /* set at start */
  enum job_io_status io_status;       /* under lock */
  atomic_bool io_stopped;             /* stopped by an error until resumed */
  struct job_error_event *errors;     /* under lock: for the main thread */
  unsigned errors_dropped;            /* under lock: too many queued */

  atomic_uint_fast64_t offset, len;   /* progress */
  char *error;                  /* why it failed, once concluded */
};

/* The daemon's: the job thread wakes the main thread, which calls
 * jobs_poll; events (QMP's, on the main thread); a job concluded
 * (main thread; it stops being one to pick up after a restart); and a
 * transaction for a driver's prepare: @txn runs @fn with graph ops
 * whose changes are recorded in the catalogue, or undone if @fn fails
 * (0, or -1 with errp).  Without @txn, jobs with a prepare fail.
 */
typedef int job_txn_fn (struct job *job, const struct job_graph_ops *ops,
                        struct error **errp);
void jobs_set_hooks (void (*wake) (void),
                     void (*event) (const char *name,
                                    struct json_object *data),
                     void (*concluded) (struct job *job),
                     int (*txn) (struct job *job, job_txn_fn *fn,
                                 struct error **errp));

/* Main thread. */
struct job *job_new (const char *id, const struct job_driver *drv,
                     void *opaque, uint64_t speed, bool auto_dismiss,
                     struct error **errp);
/* "report", "ignore", "stop", "enospc" (and QEMU's "auto", which is
 * enospc for a job): 0, or -1.
 */
int job_on_error_parse (const char *s, enum job_on_error *r);
/* Before job_start. */
void job_set_on_error (struct job *job, enum job_on_error source,
                       enum job_on_error target);
/* Start the thread (the job was set up). */
int job_start (struct job *job, struct error **errp);
/* A job that never started goes without a trace. */
void job_discard (struct job *job);
struct job *job_find (const char *id);
/* Is @id a valid id no job has?  0, or -1 with errp set. */
int job_id_check (const char *id, struct error **errp);
struct job *jobs_first (void);
/* Main thread: react to what job threads said (ready, finished). */
void jobs_poll (void);
int job_pause (struct job *job, struct error **errp);
int job_resume (struct job *job, struct error **errp);
/* Without @force, a job that was ready and can be completed ends as
 * QEMU's does: its target is brought in sync, nothing moves, and it
 * ends as completed (through @ops).  Else it stops where it is.
 */
int job_cancel (struct job *job, bool force, const struct job_graph_ops *ops,
                struct error **errp);
int job_complete (struct job *job, const struct job_graph_ops *ops,
                  struct error **errp);
int job_set_speed (struct job *job, uint64_t speed, struct error **errp);
int job_dismiss (struct job *job, struct error **errp);
/* Stop the thread of a job, waiting for it (before a graph change
 * that completes it).  Main thread.
 */
void job_stop_thread (struct job *job);
/* At exit: cancel every job and wait for their threads. */
void jobs_cancel_all (void);
const char *job_status_name (enum job_status s);
struct json_object *job_info (struct job *job);

/* The job's thread. */
/* Wait while paused; true if the job must stop (cancelled, or its
 * completion asked).
 */
bool job_pause_point (struct job *job);
/* How many times the job's thread (or threads) have stopped in a
 * pause: a time measured across a change of it includes one.
 */
unsigned job_pauses (struct job *job);
/* Account @bytes copied and sleep as the speed limit says. */
void job_rate_limit (struct job *job, uint64_t bytes);
/* Caught up (mirror): event BLOCK_JOB_READY; job_complete allowed. */
void job_set_ready (struct job *job);
bool job_is_cancelled (struct job *job);
/* What to do about a failed copy. */
enum job_error_action {
  JOB_ERROR_REPORT,             /* the job fails with the error */
  JOB_ERROR_IGNORE,             /* go on (copy it again later) */
  JOB_ERROR_STOP,               /* the job is pausing: copy it again
                                 * after the resume */
};
/* A copy failed with -errno @err, reading the source (@is_read) or
 * writing the target: a BLOCK_JOB_ERROR, and what on-*-error says.  A
 * stop pauses the job, unless it is paused already (the first error's
 * io-status stays).  Any thread.
 */
enum job_error_action job_error (struct job *job, bool is_read, int err);
/* The job's thread, after an error it goes on from: wait a moment
 * before trying again (an error that stays must not spin), or less if
 * the job is told to pause, stop or end.
 */
void job_error_wait (struct job *job);
/* Sleep up to @ns, or less if the job is told to pause, stop or end,
 * or its speed changes.
 */
void job_wait (struct job *job, uint64_t ns);
/* Stopped by an error and not resumed yet (cheap: for a write hook). */
bool job_io_stopped (struct job *job);

#endif /* NBDD_JOB_H */
