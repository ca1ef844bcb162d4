/* The block-stream job (stream.c). */
#ifndef NBDD_STREAM_H
#define NBDD_STREAM_H

#include <stdint.h>

#include "error.h"
#include "job.h"

/* block-stream: copy into @top what the layers above @base (NULL: all
 * of them) hold and @top does not, then make @base @top's backing
 * node.  Its header names @backing_file (NULL: @base's file).  @top,
 * if read-only, is reopened (@ops) once the rest checks out.  Not
 * started; NULL with errp set.
 */
struct job *stream_create (const char *id, struct node *top,
                           struct node *base, const char *backing_file,
                           uint64_t speed, bool auto_dismiss,
                           const struct job_graph_ops *ops,
                           struct error **errp);

#endif /* NBDD_STREAM_H */
