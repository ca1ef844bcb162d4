/* The backup job (backup.c). */
#ifndef NBDD_BACKUP_H
#define NBDD_BACKUP_H

#include <stdbool.h>
#include <stdint.h>

#include "error.h"
#include "job.h"

/* How the bitmap's fork ends (QEMU's BitmapSyncMode). */
enum backup_bitmap_mode {
  BACKUP_BITMAP_ON_SUCCESS,     /* dropped if the job succeeds */
  BACKUP_BITMAP_NEVER,          /* merged back whatever happens */
  BACKUP_BITMAP_ALWAYS,         /* dropped whatever happens */
};

/* A backup job of @source to @target, not started: the clusters @bm
 * marks (forked already; NULL: everything).  *cbwp is the filter to put
 * above @source (the caller moves the source's users onto it).
 * @unforked (may be NULL) hears how the fork ended.  NULL with errp.
 */
struct job *backup_create (const char *id, struct node *source,
                           struct node *target, struct dirty_bitmap *bm,
                           enum backup_bitmap_mode mode, uint64_t speed,
                           bool auto_dismiss,
                           void (*unforked) (struct dirty_bitmap *d,
                                             bool success, const char *job),
                           struct node **cbwp, struct error **errp);

#endif /* NBDD_BACKUP_H */
