/* QEMU's image locking, so that QEMU and nbdd each refuse to write an
 * image the other has open (see file-lock.c).
 */
#ifndef NBDD_FILE_LOCK_H
#define NBDD_FILE_LOCK_H

#include "error.h"

/* QEMU's permission bits (BLK_PERM_*), in its order. */
#define FILE_PERM_CONSISTENT_READ (1u << 0)
#define FILE_PERM_WRITE           (1u << 1)
#define FILE_PERM_WRITE_UNCHANGED (1u << 2)
#define FILE_PERM_RESIZE          (1u << 3)
#define FILE_PERM_ALL             0xfu

/* Take QEMU's locks on @fd for holding @perm and sharing only @shared,
 * then check no other user of the file conflicts.  0, or -1 with an
 * error naming the permission (QEMU's wording, so users recognise it).
 */
int file_lock (int fd, const char *filename, unsigned perm, unsigned shared,
               struct error **errp);

/* Drop every one of those locks @fd holds (before another descriptor
 * of the same file takes others).
 */
void file_unlock (int fd);

#endif /* NBDD_FILE_LOCK_H */
