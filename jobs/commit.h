/* The block-commit job below the active layer (commit.c); the active
 * layer's is a mirror (mirror.h, commit_active_create).
 */
#ifndef NBDD_COMMIT_H
#define NBDD_COMMIT_H

#include <stdint.h>

#include "error.h"
#include "job.h"

/* block-commit of a layer that is not the active one: copy what @top
 * and the layers down to @base (not included) hold into @base, then
 * make @base the backing node of @overlay (the node above @top), whose
 * header names @backing_file (NULL: @base's file).  @base and
 * @overlay, if read-only, are reopened (@ops) once the rest checks
 * out.  Not started; NULL with errp set.
 */
struct job *commit_create (const char *id, struct node *overlay,
                           struct node *top, struct node *base,
                           const char *backing_file, uint64_t speed,
                           bool auto_dismiss,
                           const struct job_graph_ops *ops,
                           struct error **errp);

#endif /* NBDD_COMMIT_H */
