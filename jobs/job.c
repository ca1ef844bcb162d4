/* Block jobs: the lifecycle shared by every kind (see job.h). */
#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cleanup.h"
#include "job.h"
#include "log.h"
#include "utils.h"

#define SLICE_NS 100000000ULL   /* the longest wait between checks */

static struct job *jobs;        /* main thread */
static void (*wake_hook) (void);
static void (*event_hook) (const char *name, struct json_object *data);
static void (*concluded_hook) (struct job *job);
static int (*txn_hook) (struct job *job, job_txn_fn *fn,
                        struct error **errp);

void
jobs_set_hooks (void (*wake) (void),
                void (*event) (const char *name, struct json_object *data),
                void (*concluded) (struct job *job),
                int (*txn) (struct job *job, job_txn_fn *fn,
                            struct error **errp))
{
  wake_hook = wake;
  event_hook = event;
  concluded_hook = concluded;
  txn_hook = txn;
}

static const char *const status_names[] = {
  [JOB_CREATED] = "created", [JOB_RUNNING] = "running",
  [JOB_PAUSED] = "paused", [JOB_READY] = "ready",
  [JOB_ABORTING] = "aborting", [JOB_CONCLUDED] = "concluded",
  [JOB_NULL] = "null",
};

const char *
job_status_name (enum job_status s)
{
  return status_names[s];
}

static void
event (const char *name, struct json_object *data)
{
  if (event_hook)
    event_hook (name, data);
  else
    json_object_put (data);
}

static void
set_status (struct job *job, enum job_status s)
{
  struct json_object *d;

  if (job->status == s)
    return;
  job->status = s;
  d = json_object_new_object ();
  json_object_object_add (d, "id", json_object_new_string (job->id));
  json_object_object_add (d, "status",
                          json_object_new_string (job_status_name (s)));
  event ("JOB_STATUS_CHANGE", d);
}

/* BLOCK_JOB_READY, _COMPLETED and _CANCELLED carry the same fields. */
static void
block_event (struct job *job, const char *name, const char *error)
{
  struct json_object *d = json_object_new_object ();

  json_object_object_add (d, "type", json_object_new_string (job->drv->type));
  json_object_object_add (d, "device", json_object_new_string (job->id));
  json_object_object_add (d, "len", json_object_new_int64
                          ((int64_t) atomic_load (&job->len)));
  json_object_object_add (d, "offset", json_object_new_int64
                          ((int64_t) atomic_load (&job->offset)));
  json_object_object_add (d, "speed",
                          json_object_new_int64 ((int64_t) job->speed));
  if (error)
    json_object_object_add (d, "error", json_object_new_string (error));
  event (name, d);
}

struct job *
job_find (const char *id)
{
  for (struct job *j = jobs; j; j = j->next)
    if (strcmp (j->id, id) == 0)
      return j;
  return NULL;
}

struct job *
jobs_first (void)
{
  return jobs;
}

int
job_id_check (const char *id, struct error **errp)
{
  if (!node_name_is_valid (id)) {
    error_setg (errp, "job id '%.80s' is not valid (a letter, then "
                "letters, digits, '-', '.' or '_')", id);
    return -1;
  }
  if (job_find (id)) {
    error_setg (errp, "a job with id '%s' exists", id);
    return -1;
  }
  return 0;
}

struct job *
job_new (const char *id, const struct job_driver *drv, void *opaque,
         uint64_t speed, bool auto_dismiss, struct error **errp)
{
  struct job *job, **p;

  if (job_id_check (id, errp) == -1)
    return NULL;
  job = calloc (1, sizeof *job);
  if (job == NULL || (job->id = strdup (id)) == NULL) {
    free (job);
    error_setg (errp, "out of memory");
    return NULL;
  }
  job->drv = drv;
  job->opaque = opaque;
  job->speed = speed;
  job->auto_dismiss = auto_dismiss;
  job->status = JOB_CREATED;
  pthread_mutex_init (&job->lock, NULL);
  pthread_cond_init (&job->cond, NULL);
  root_init (&job->root);
  job->root.kind = "job";
  job->root.owner_name = job->id;
  job->root.owner = job;
  for (p = &jobs; *p; p = &(*p)->next)
    ;
  *p = job;
  return job;
}

/* A BLOCK_JOB_ERROR on its way from a job's thread to the main one. */
struct job_error_event {
  struct job_error_event *next;
  bool is_read;
  const char *action;
};

#define MAX_QUEUED_ERRORS 64    /* a target failing every write */
#define ERROR_RETRY_NS 100000000

int
job_on_error_parse (const char *s, enum job_on_error *r)
{
  if (strcmp (s, "report") == 0)
    *r = JOB_ON_ERROR_REPORT;
  else if (strcmp (s, "ignore") == 0)
    *r = JOB_ON_ERROR_IGNORE;
  else if (strcmp (s, "stop") == 0)
    *r = JOB_ON_ERROR_STOP;
  else if (strcmp (s, "enospc") == 0 || strcmp (s, "auto") == 0)
    *r = JOB_ON_ERROR_ENOSPC;
  else
    return -1;
  return 0;
}

void
job_set_on_error (struct job *job, enum job_on_error source,
                  enum job_on_error target)
{
  pthread_mutex_lock (&job->lock);
  job->on_source_error = source;
  job->on_target_error = target;
  pthread_mutex_unlock (&job->lock);
}

static void
job_free (struct job *job)
{
  for (struct job **p = &jobs; *p; p = &(*p)->next)
    if (*p == job) {
      *p = job->next;
      break;
    }
  if (root_node (&job->root))
    root_detach (&job->root);
  root_destroy (&job->root);
  if (job->drv->free)
    job->drv->free (job);
  if (job->keep_memory)
    return;
  while (job->errors) {
    struct job_error_event *e = job->errors;
    job->errors = e->next;
    free (e);
  }
  pthread_cond_destroy (&job->cond);
  pthread_mutex_destroy (&job->lock);
  free (job->error);
  free (job->id);
  free (job);
}

void
job_discard (struct job *job)
{
  job_free (job);
}

static void *
job_thread (void *arg)
{
  struct job *job = arg;
  int r = job->drv->run (job);

  pthread_mutex_lock (&job->lock);
  job->ret = r;
  job->finished = true;
  pthread_mutex_unlock (&job->lock);
  if (wake_hook)
    wake_hook ();
  return NULL;
}

static int
start_thread (struct job *job, struct error **errp)
{
  int r = thread_create_quiet (&job->thread, NULL, job_thread, job);

  if (r != 0) {
    error_setg_errno (errp, r, "job '%s': starting its thread", job->id);
    return -1;
  }
  job->thread_started = true;
  return 0;
}

int
job_start (struct job *job, struct error **errp)
{
  if (start_thread (job, errp) == -1)
    return -1;
  set_status (job, JOB_RUNNING);
  return 0;
}

void
job_stop_thread (struct job *job)
{
  if (!job->thread_started)
    return;
  pthread_mutex_lock (&job->lock);
  job->stop_requested = true;
  pthread_cond_broadcast (&job->cond);
  pthread_mutex_unlock (&job->lock);
  pthread_join (job->thread, NULL);
  job->thread_started = false;
}

/* Auto-dismissed on the next jobs_poll, not now: the command that
 * concluded it may still hold its edges in a drain.
 */
static void
conclude (struct job *job)
{
  set_status (job, JOB_CONCLUDED);
  if (concluded_hook)
    concluded_hook (job);
  if (job->auto_dismiss) {
    job->dismiss_pending = true;
    if (wake_hook)
      wake_hook ();
  }
}

/* Main thread: the errors the job's threads met, as events, and the
 * pause that a 'stop' asked for, as the job's status.
 */
static void
send_errors (struct job *job, bool pause)
{
  struct job_error_event *e;
  unsigned dropped;

  pthread_mutex_lock (&job->lock);
  e = job->errors;
  job->errors = NULL;
  dropped = job->errors_dropped;
  job->errors_dropped = 0;
  pthread_mutex_unlock (&job->lock);
  if (dropped > 0)
    nbdd_warn ("job '%s': %u more errors were not sent as events",
               job->id, dropped);
  while (e) {
    struct job_error_event *next = e->next;
    struct json_object *d = json_object_new_object ();

    json_object_object_add (d, "device", json_object_new_string (job->id));
    json_object_object_add (d, "operation", json_object_new_string
                            (e->is_read ? "read" : "write"));
    json_object_object_add (d, "action", json_object_new_string (e->action));
    event ("BLOCK_JOB_ERROR", d);
    free (e);
    e = next;
  }
  if (pause && atomic_load (&job->io_stopped) &&
      job->status != JOB_PAUSED &&
      job->status != JOB_CONCLUDED && job->status != JOB_ABORTING)
    set_status (job, JOB_PAUSED);
}

/* The thread is done: finish the job, one way or the other. */
static void
job_end (struct job *job)
{
  struct error *err = NULL, *ferr = NULL;
  bool cancelled = job->cancel_requested;
  bool ok = job->ret == 0 && !cancelled;

  job_stop_thread (job);
  if (job->ret < 0 && !cancelled)
    error_setg_errno (&err, -job->ret, "job '%s'", job->id);
  if (ok && job->drv->prepare) {
    if (txn_hook == NULL) {
      error_setg (&err, "job '%s': no way to change the graph", job->id);
      ok = false;
    }
    else if (txn_hook (job, job->drv->prepare, &err) == -1)
      ok = false;
  }
  if (job->drv->finish (job, ok, &ferr) == -1) {
    ok = false;
    if (err == NULL)
      err = steal_pointer (&ferr);
  }
  error_free (ferr);
  if (!ok && !cancelled) {
    set_status (job, JOB_ABORTING);
    job->error = strdup (err ? err->msg : "failed");
    nbdd_warn ("job '%s' failed: %s", job->id, job->error);
  }
  send_errors (job, false);
  if (cancelled) {
    job->error = strdup ("cancelled");
    block_event (job, "BLOCK_JOB_CANCELLED", NULL);
  }
  else
    block_event (job, "BLOCK_JOB_COMPLETED", ok ? NULL : job->error);
  error_free (err);
  conclude (job);
}

void
jobs_poll (void)
{
  struct job *j, *next;

  for (j = jobs; j; j = next) {
    bool ready, finished;

    next = j->next;
    pthread_mutex_lock (&j->lock);
    ready = j->ready;
    finished = j->finished;
    pthread_mutex_unlock (&j->lock);
    send_errors (j, true);
    if (j->status == JOB_CONCLUDED) {
      if (j->dismiss_pending) {
        set_status (j, JOB_NULL);
        job_free (j);
      }
      continue;
    }
    if (ready && !j->ready_seen && !finished) {
      j->ready_seen = true;
      if (j->status == JOB_RUNNING)
        set_status (j, JOB_READY);
      block_event (j, "BLOCK_JOB_READY", NULL);
    }
    if (finished)
      job_end (j);
  }
}

static int
not_concluded (struct job *job, const char *what, struct error **errp)
{
  if (job->status == JOB_CONCLUDED || job->status == JOB_ABORTING) {
    error_setg (errp, "job '%s' has ended: it cannot be %s", job->id, what);
    return -1;
  }
  return 0;
}

int
job_pause (struct job *job, struct error **errp)
{
  if (not_concluded (job, "paused", errp) == -1)
    return -1;
  pthread_mutex_lock (&job->lock);
  job->pause_requested = true;
  pthread_cond_broadcast (&job->cond);
  pthread_mutex_unlock (&job->lock);
  set_status (job, JOB_PAUSED);
  return 0;
}

int
job_resume (struct job *job, struct error **errp)
{
  if (not_concluded (job, "resumed", errp) == -1)
    return -1;
  if (job->status != JOB_PAUSED) {
    error_setg (errp, "job '%s' is not paused", job->id);
    return -1;
  }
  pthread_mutex_lock (&job->lock);
  job->pause_requested = false;
  job->io_status = JOB_IO_OK;
  atomic_store (&job->io_stopped, false);
  pthread_cond_broadcast (&job->cond);
  pthread_mutex_unlock (&job->lock);
  set_status (job, job->ready_seen ? JOB_READY : JOB_RUNNING);
  return 0;
}

/* The driver's complete, and the end: 0; -1 with errp, the job failed
 * and ended; -2 with errp, the job goes on.
 */
static int
complete (struct job *job, const struct job_graph_ops *ops, bool pivot,
          struct error **errp)
{
  int r;

  job_stop_thread (job);
  r = job->drv->complete (job, ops, pivot, errp);
  if (r == -2) {
    /* An error the job goes on from: it copies again (or pauses). */
    struct error *err = NULL;
    pthread_mutex_lock (&job->lock);
    job->stop_requested = false;
    job->finished = false;
    pthread_mutex_unlock (&job->lock);
    if (start_thread (job, &err) == 0) {
      send_errors (job, true);
      return -2;
    }
    /* No thread to go on with: the job fails, and lets go. */
    nbdd_warn ("%s", err->msg);
    error_free (err);
    job->drv->finish (job, false, NULL);
  }
  send_errors (job, false);
  if (r < 0) {
    job->error = strdup (*errp ? (*errp)->msg : "failed");
    set_status (job, JOB_ABORTING);
    block_event (job, "BLOCK_JOB_COMPLETED", job->error);
    conclude (job);
    return -1;
  }
  block_event (job, "BLOCK_JOB_COMPLETED", NULL);
  conclude (job);
  return 0;
}

int
job_cancel (struct job *job, bool force, const struct job_graph_ops *ops,
            struct error **errp)
{
  bool settled;

  if (not_concluded (job, "cancelled", errp) == -1)
    return -1;
  pthread_mutex_lock (&job->lock);
  settled = job->cancel_requested || job->finished;
  pthread_mutex_unlock (&job->lock);
  /* Ready: the target was in sync; it is again at the end, as
   * block-job-complete leaves it, but nothing moves.  A failure there
   * ends the job as a failure, which its event says, as in QEMU: the
   * cancel itself succeeded.  A force given once stays.
   */
  if (!force && job->drv->complete != NULL && job->status == JOB_READY &&
      !settled) {
    struct error *err = NULL;
    int r = complete (job, ops, false, &err);

    if (r == -1) {
      nbdd_warn ("%s", err->msg);
      error_free (err);
      return 0;
    }
    if (errp)
      *errp = err;
    else
      error_free (err);
    return r < 0 ? -1 : 0;
  }
  if (!force && job->drv->complete != NULL && job->status == JOB_PAUSED &&
      job->ready_seen) {
    error_setg (errp, "job '%s' is paused: resume it to cancel it with its "
                "target in sync, or cancel it with force", job->id);
    return -1;
  }
  pthread_mutex_lock (&job->lock);
  job->cancel_requested = true;
  job->pause_requested = false;
  pthread_cond_broadcast (&job->cond);
  pthread_mutex_unlock (&job->lock);
  return 0;
}

int
job_complete (struct job *job, const struct job_graph_ops *ops,
              struct error **errp)
{
  if (job->drv->complete == NULL) {
    error_setg (errp, "job '%s' (%s) cannot be completed: it ends by "
                "itself", job->id, job->drv->type);
    return -1;
  }
  if (job->status != JOB_READY) {
    error_setg (errp, "job '%s' is not ready (it is %s): wait for "
                "BLOCK_JOB_READY", job->id, job_status_name (job->status));
    return -1;
  }
  return complete (job, ops, true, errp) < 0 ? -1 : 0;
}

int
job_set_speed (struct job *job, uint64_t speed, struct error **errp)
{
  if (not_concluded (job, "changed", errp) == -1)
    return -1;
  pthread_mutex_lock (&job->lock);
  job->speed = speed;
  job->next_ns = 0;             /* a new schedule from now */
  pthread_cond_broadcast (&job->cond);
  pthread_mutex_unlock (&job->lock);
  return 0;
}

int
job_dismiss (struct job *job, struct error **errp)
{
  if (job->status != JOB_CONCLUDED || job->dismiss_pending) {
    error_setg (errp, "job '%s' is %s: only a concluded job can be "
                "dismissed", job->id, job->dismiss_pending ? "going"
                : job_status_name (job->status));
    return -1;
  }
  set_status (job, JOB_NULL);
  job_free (job);
  return 0;
}

void
jobs_cancel_all (void)
{
  struct job *j, *next;

  for (j = jobs; j; j = next) {
    next = j->next;
    if (j->thread_started) {
      pthread_mutex_lock (&j->lock);
      j->cancel_requested = true;
      pthread_mutex_unlock (&j->lock);
      job_stop_thread (j);
    }
    if (j->status != JOB_CONCLUDED) {
      struct error *err = NULL;
      j->drv->finish (j, false, &err);
      error_free (err);
    }
    job_free (j);
  }
}

struct json_object *
job_info (struct job *job)
{
  struct json_object *o = json_object_new_object ();
  bool busy;

  pthread_mutex_lock (&job->lock);
  busy = job->thread_started && !job->paused && !job->finished;
  pthread_mutex_unlock (&job->lock);
  json_object_object_add (o, "type", json_object_new_string (job->drv->type));
  json_object_object_add (o, "device", json_object_new_string (job->id));
  json_object_object_add (o, "id", json_object_new_string (job->id));
  json_object_object_add (o, "len", json_object_new_int64
                          ((int64_t) atomic_load (&job->len)));
  json_object_object_add (o, "offset", json_object_new_int64
                          ((int64_t) atomic_load (&job->offset)));
  json_object_object_add (o, "busy", json_object_new_boolean (busy));
  json_object_object_add (o, "paused", json_object_new_boolean
                          (job->status == JOB_PAUSED));
  json_object_object_add (o, "speed",
                          json_object_new_int64 ((int64_t) job->speed));
  pthread_mutex_lock (&job->lock);
  json_object_object_add (o, "io-status", json_object_new_string
                          (job->io_status == JOB_IO_NOSPACE ? "nospace"
                           : job->io_status == JOB_IO_FAILED ? "failed"
                           : "ok"));
  pthread_mutex_unlock (&job->lock);
  json_object_object_add (o, "ready", json_object_new_boolean
                          (job->status == JOB_READY || (job->ready_seen &&
                                                        job->status ==
                                                        JOB_PAUSED)));
  json_object_object_add (o, "status", json_object_new_string
                          (job_status_name (job->status)));
  json_object_object_add (o, "auto-finalize", json_object_new_boolean (true));
  json_object_object_add (o, "auto-dismiss",
                          json_object_new_boolean (job->auto_dismiss));
  if (job->error)
    json_object_object_add (o, "error", json_object_new_string (job->error));
  return o;
}

/* ---- the job's thread ---- */

bool
job_pause_point (struct job *job)
{
  bool stop;

  pthread_mutex_lock (&job->lock);
  if (job->pause_requested && !job->cancel_requested &&
      !job->stop_requested)
    job->pauses++;
  while (job->pause_requested && !job->cancel_requested &&
         !job->stop_requested) {
    job->paused = true;
    pthread_cond_wait (&job->cond, &job->lock);
  }
  job->paused = false;
  stop = job->cancel_requested || job->stop_requested;
  pthread_mutex_unlock (&job->lock);
  return stop;
}

unsigned
job_pauses (struct job *job)
{
  unsigned n;

  pthread_mutex_lock (&job->lock);
  n = job->pauses;
  pthread_mutex_unlock (&job->lock);
  return n;
}

enum job_error_action
job_error (struct job *job, bool is_read, int err)
{
  enum job_on_error on;
  enum job_error_action action;
  struct job_error_event *e, **p;
  unsigned queued = 0;

  pthread_mutex_lock (&job->lock);
  on = is_read ? job->on_source_error : job->on_target_error;
  if (on == JOB_ON_ERROR_ENOSPC)
    on = err == -ENOSPC ? JOB_ON_ERROR_STOP : JOB_ON_ERROR_REPORT;
  action = on == JOB_ON_ERROR_IGNORE ? JOB_ERROR_IGNORE
    : on == JOB_ON_ERROR_STOP ? JOB_ERROR_STOP : JOB_ERROR_REPORT;
  if (job->cancel_requested)
    action = JOB_ERROR_REPORT;  /* nothing to go on for */
  /* Bounded: a dead target fails every write of a write-blocking
   * mirror while the main thread may be busy.
   */
  for (p = &job->errors; *p; p = &(*p)->next)
    queued++;
  if (queued >= MAX_QUEUED_ERRORS || (e = malloc (sizeof *e)) == NULL)
    job->errors_dropped++;
  else {
    e->next = NULL;
    e->is_read = is_read;
    e->action = action == JOB_ERROR_REPORT ? "report"
      : action == JOB_ERROR_IGNORE ? "ignore" : "stop";
    *p = e;
  }
  /* As QEMU: a job paused already (by the user, or by an earlier error)
   * keeps its pause and its first io-status.
   */
  if (action == JOB_ERROR_STOP && !job->pause_requested) {
    job->pause_requested = true;
    job->io_status = err == -ENOSPC ? JOB_IO_NOSPACE : JOB_IO_FAILED;
    atomic_store (&job->io_stopped, true);
  }
  pthread_mutex_unlock (&job->lock);
  if (wake_hook)
    wake_hook ();
  return action;
}

/* With job->lock held: wait on job->cond for @ns at most. */
static void
timedwait_ns (struct job *job, uint64_t ns)
{
  struct timespec until;

  clock_gettime (CLOCK_REALTIME, &until);
  ns += until.tv_nsec;
  until.tv_sec += ns / 1000000000ULL;
  until.tv_nsec = ns % 1000000000ULL;
  pthread_cond_timedwait (&job->cond, &job->lock, &until);
}

void
job_wait (struct job *job, uint64_t ns)
{
  pthread_mutex_lock (&job->lock);
  if (!job->pause_requested && !job->cancel_requested &&
      !job->stop_requested)
    timedwait_ns (job, ns);
  pthread_mutex_unlock (&job->lock);
}

void
job_error_wait (struct job *job)
{
  job_wait (job, ERROR_RETRY_NS);
}

bool
job_io_stopped (struct job *job)
{
  return atomic_load_explicit (&job->io_stopped, memory_order_relaxed);
}

bool
job_is_cancelled (struct job *job)
{
  bool c;

  pthread_mutex_lock (&job->lock);
  c = job->cancel_requested;
  pthread_mutex_unlock (&job->lock);
  return c;
}

/* The speed limit as a schedule: each copy moves the earliest time of
 * the next one on by its size over the speed, and the copier waits
 * for that time (woken early by a cancel or a new speed).
 */
void
job_rate_limit (struct job *job, uint64_t bytes)
{
  pthread_mutex_lock (&job->lock);
  atomic_fetch_add (&job->offset, bytes);
  if (job->speed > 0) {
    uint64_t now = monotonic_ns ();
    if (job->next_ns < now)
      job->next_ns = now;
    job->next_ns += (uint64_t) ((double) bytes * 1e9 / job->speed);
    while (job->speed > 0 && !job->cancel_requested &&
           !job->stop_requested && (now = monotonic_ns ()) < job->next_ns)
      timedwait_ns (job, MIN (job->next_ns - now, SLICE_NS));
  }
  pthread_mutex_unlock (&job->lock);
}

void
job_set_ready (struct job *job)
{
  bool first;

  pthread_mutex_lock (&job->lock);
  first = !job->ready;
  job->ready = true;
  pthread_mutex_unlock (&job->lock);
  if (first && wake_hook)
    wake_hook ();
}
