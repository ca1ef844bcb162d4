/* The mirror job (mirror.c). */
#ifndef NBDD_MIRROR_H
#define NBDD_MIRROR_H

#include <stdbool.h>
#include <stdint.h>

#include "error.h"
#include "job.h"

enum mirror_sync {
  MIRROR_SYNC_FULL,             /* everything */
  MIRROR_SYNC_TOP,              /* what the top layer holds */
  MIRROR_SYNC_NONE,             /* only what is written from now on */
};

/* QEMU's MirrorCopyMode: what becomes of a guest write to the source. */
enum mirror_copy_mode {
  MIRROR_COPY_BACKGROUND,       /* marked, for the copiers to copy again */
  MIRROR_COPY_WRITE_BLOCKING,   /* also written to the target, at once */
};

/* A mirror job of @source to @target (same size), not started: copy
 * lists of @granularity, copies of up to @buf_size bytes (0: 1 MiB),
 * @speed bytes/s (0: no limit).  NULL with errp set.
 */
struct job *mirror_create (const char *id, struct node *source,
                           struct node *target, enum mirror_sync sync,
                           enum mirror_copy_mode copy_mode, uint64_t speed,
                           uint32_t granularity, uint64_t buf_size,
                           bool auto_dismiss, struct error **errp);

/* block-job-change of a mirror (main thread): @job copies in @mode from
 * now on (the mode it has already: no change).  0, or -1 with errp.
 */
int mirror_change_copy_mode (struct job *job, enum mirror_copy_mode mode,
                             struct error **errp);
/* A mirror's copy mode now (main thread; a job of type "mirror"). */
enum mirror_copy_mode mirror_copy_mode (struct job *job);

/* block-commit of the active layer @top into @base, a node below it
 * in its chain (same size): a mirror of type "commit" whose copy list
 * starts as what the layers above @base hold.  Ready once caught up;
 * block-job-complete moves the users of @top onto @base.  @base, if
 * read-only, is reopened (@ops) once the rest checks out.  Not
 * started; NULL with errp set.
 */
struct job *commit_active_create (const char *id, struct node *top,
                                  struct node *base, uint64_t speed,
                                  bool auto_dismiss,
                                  const struct job_graph_ops *ops,
                                  struct error **errp);

#endif /* NBDD_MIRROR_H */
