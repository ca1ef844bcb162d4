/* QEMU's image locking (block/file-posix.c), byte for byte.
 *
 * Each user of an image holds a shared open file description (OFD)
 * lock on byte 100 + i for every permission i it holds, and on byte
 * 200 + i for every permission it does not let others have.  A new
 * user takes its own locks, then asks, byte by byte, whether someone
 * else holds a lock it conflicts with: wanting i while someone
 * unshares it (200 + i), or unsharing i while someone holds it
 * (100 + i).  OFD locks belong to the descriptor and go with its last
 * close, so a crash releases them, and threads do not matter.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "file-lock.h"

#define LOCK_PERM_BASE   100
#define LOCK_SHARED_BASE 200
#define NR_PERMS 4

static const char *const perm_names[NR_PERMS] = {
  "consistent read", "write", "write unchanged", "resize",
};

static int
lock_byte (int fd, off_t byte, short type)
{
  struct flock fl = {
    .l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1,
  };

  return fcntl (fd, F_OFD_SETLK, &fl);
}

/* Does another descriptor hold a lock on @byte?  1, 0, or -1. */
static int
byte_taken (int fd, off_t byte)
{
  struct flock fl = {
    .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1,
  };

  if (fcntl (fd, F_OFD_GETLK, &fl) == -1)
    return -1;
  return fl.l_type != F_UNLCK;
}

int
file_lock (int fd, const char *filename, unsigned perm, unsigned shared,
           struct error **errp)
{
  for (int i = 0; i < NR_PERMS; ++i) {
    unsigned bit = 1u << i;
    if (lock_byte (fd, LOCK_PERM_BASE + i,
                   (perm & bit) ? F_RDLCK : F_UNLCK) == -1 ||
        lock_byte (fd, LOCK_SHARED_BASE + i,
                   (shared & bit) ? F_UNLCK : F_RDLCK) == -1) {
      if (errno == EAGAIN || errno == EACCES)
        goto conflict_any;
      error_setg_errno (errp, errno, "file: '%s': cannot take QEMU's image "
                        "locks (locking=off skips them)", filename);
      return -1;
    }
  }
  for (int i = 0; i < NR_PERMS; ++i) {
    unsigned bit = 1u << i;
    int r;
    if ((perm & bit) &&
        (r = byte_taken (fd, LOCK_SHARED_BASE + i)) != 0) {
      if (r == -1)
        goto getlk_failed;
      error_setg (errp, "file: '%s': Failed to get \"%s\" lock: is another "
                  "process using the image?", filename, perm_names[i]);
      return -1;
    }
    if (!(shared & bit) &&
        (r = byte_taken (fd, LOCK_PERM_BASE + i)) != 0) {
      if (r == -1)
        goto getlk_failed;
      error_setg (errp, "file: '%s': Failed to get shared \"%s\" lock: is "
                  "another process using the image?", filename,
                  perm_names[i]);
      return -1;
    }
  }
  return 0;

 conflict_any:
  /* A shared lock is only refused next to someone's exclusive one,
   * which QEMU never takes; say so plainly.
   */
  error_setg (errp, "file: '%s': the image is locked by another process",
              filename);
  return -1;
 getlk_failed:
  error_setg_errno (errp, errno, "file: '%s': cannot test QEMU's image "
                    "locks (locking=off skips them)", filename);
  return -1;
}

void
file_unlock (int fd)
{
  for (int i = 0; i < NR_PERMS; ++i) {
    lock_byte (fd, LOCK_PERM_BASE + i, F_UNLCK);
    lock_byte (fd, LOCK_SHARED_BASE + i, F_UNLCK);
  }
}
