/* The 'file' protocol driver: a host file or block device.
 *
 * Reads and writes are pread/pwrite on one descriptor shared by all
 * worker threads.  Zeroing and discard use fallocate (or the block
 * device ioctls), latching the absence of each primitive so it is
 * tried only once; allocation comes from SEEK_DATA/SEEK_HOLE.
 * cache.direct=on opens with O_DIRECT, and the request path then
 * aligns every request to the device's logical block size.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/uio.h>
#include <unistd.h>

#ifdef HAVE_LINUX_FS_H
#include <linux/fs.h>
#endif

#include "driver.h"
#include "file-lock.h"
#include "log.h"
#include "options.h"
#include "utils.h"

struct file_state {
  int fd;
  bool is_block;
  bool direct;
  bool locking;                 /* QEMU's image locks taken */
  uint32_t alignment;           /* O_DIRECT alignment, else 1 */
  /* Overwriting written data needs no metadata (a block device, ext4,
   * XFS): file_writeback may stand in for a sync of a range.
   */
  bool in_place;
  /* Latched absences of fast primitives (set once, read racily: a
   * stale 'true' costs one failed syscall).
   */
  atomic_bool can_punch_hole;
  atomic_bool can_zero_range;
  atomic_bool can_fallocate;
  atomic_bool can_seek_data;
  atomic_bool can_dsync_write;
  atomic_bool can_splice;
  uint32_t page_size;
  atomic_bool can_nowait;
  /* A failed fdatasync (or RWF_DSYNC write) may have dropped dirty
   * pages, and the kernel reports that only once per descriptor: once
   * anything fails, every later flush fails too, so no client is told
   * "ok" after data was lost.  flush_lock makes check, sync and latch
   * one step, so two connections flushing at once cannot split the
   * one error report between them.
   */
  pthread_mutex_t flush_lock;
  int flush_error;              /* protected by flush_lock */
};

static const char *const file_keys[] = {
  "driver", "node-name", "filename", "cache.direct", "cache.no-flush",
  "read-only", "auto-read-only", "discard", "detect-zeroes", "aio",
  "locking", NULL
};

/* As QEMU does: a writer keeps others from writing or resizing; a
 * reader keeps them from writing under it.  Both still let others
 * read, so 'qemu-img info' works on an image nbdd only reads.
 */
static int
lock_image (int fd, const char *filename, bool ro, struct error **errp)
{
  return file_lock (fd, filename,
                    ro ? FILE_PERM_CONSISTENT_READ
                    : FILE_PERM_CONSISTENT_READ | FILE_PERM_WRITE |
                      FILE_PERM_RESIZE,
                    FILE_PERM_CONSISTENT_READ | FILE_PERM_WRITE_UNCHANGED,
                    errp);
}

static int
file_open (struct node *node, struct json_object *opts, struct error **errp)
{
  struct file_state *s = node->opaque;
  const char *filename, *locking = NULL;
  bool direct = false, ro = false;
  struct json_object *cache;
  struct stat st;
  int flags;

  s->fd = -1;
  pthread_mutex_init (&s->flush_lock, NULL);
  if (opt_check_keys (opts, "file", file_keys, errp) == -1 ||
      opt_get_string (opts, "file", "filename", true, &filename, errp) == -1 ||
      opt_get_bool (opts, "file", "read-only", false, &ro, errp) == -1)
    return -1;
  if (json_object_object_get_ex (opts, "cache", &cache) &&
      opt_get_bool (cache, "file", "direct", false, &direct, errp) == -1)
    return -1;

  if (opt_get_string (opts, "file", "locking", false, &locking, errp) == -1)
    return -1;
  if (locking && strcmp (locking, "on") != 0 && strcmp (locking, "off") != 0 &&
      strcmp (locking, "auto") != 0) {
    error_setg (errp, "file: locking: expected on, off or auto, got '%s'",
                locking);
    return -1;
  }

  flags = (ro ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  if (direct)
    flags |= O_DIRECT;
  s->fd = open (filename, flags);
  if (s->fd == -1) {
    error_setg_errno (errp, errno, "file: cannot open '%s'%s", filename,
                      direct ? " with cache.direct=on" : "");
    return -1;
  }
  if (fstat (s->fd, &st) == -1) {
    error_setg_errno (errp, errno, "file: stat '%s'", filename);
    return -1;
  }
  if (S_ISREG (st.st_mode)) {
    struct statfs fs;
    node->size = st.st_size;
    s->in_place = fstatfs (s->fd, &fs) == 0 &&
      (fs.f_type == 0xEF53 /* ext2/3/4 */ ||
       fs.f_type == 0x58465342 /* XFS */ ||
       fs.f_type == 0x01021994 /* tmpfs */);
  }
#ifdef BLKGETSIZE64
  else if (S_ISBLK (st.st_mode)) {
    uint64_t size;
    if (ioctl (s->fd, BLKGETSIZE64, &size) == -1) {
      error_setg_errno (errp, errno, "file: %s: BLKGETSIZE64", filename);
      return -1;
    }
    node->size = size;
    s->is_block = true;
    s->in_place = true;
  }
#endif
  else {
    error_setg (errp, "file: '%s' is not a regular file or block device",
                filename);
    return -1;
  }

  s->locking = !(locking && strcmp (locking, "off") == 0);
  if (s->locking && lock_image (s->fd, filename, ro, errp) == -1)
    return -1;

  s->direct = direct;
  s->alignment = 1;
  if (direct) {
    int ssz = 0;
    s->alignment = 4096;        /* safe for every device we know */
#ifdef BLKSSZGET
    if (s->is_block && ioctl (s->fd, BLKSSZGET, &ssz) == 0 &&
        ssz >= 512 && IS_POWER_OF_2 (ssz))
      s->alignment = ssz;
#endif
    /* An aligned write of the last partial block would grow the file. */
    if (!IS_ALIGNED (node->size, s->alignment)) {
      error_setg (errp, "file: '%s': size %" PRIu64 " is not a multiple "
                  "of %" PRIu32 ", required with cache.direct=on",
                  filename, node->size, s->alignment);
      return -1;
    }
  }

  atomic_init (&s->can_punch_hole, true);
  atomic_init (&s->can_zero_range, true);
  atomic_init (&s->can_fallocate, true);
  atomic_init (&s->can_seek_data, !s->is_block);
  atomic_init (&s->can_dsync_write, true);
  atomic_init (&s->can_nowait, !direct);
  atomic_init (&s->can_splice, !direct);
  s->page_size = sysconf (_SC_PAGESIZE) > 0 ? sysconf (_SC_PAGESIZE) : 4096;

  node->read_only = ro;
  node->can_flush = true;
  node->can_trim = true;
  node->can_zero = true;
  node->can_fast_zero = !s->is_block;  /* BLKZEROOUT may be slow */
  node->can_cache = true;
  node->has_block_status = !s->is_block;
  node->is_rotational = false;
#ifdef BLKROTATIONAL
  if (s->is_block) {
    unsigned short rot = 0;
    if (ioctl (s->fd, BLKROTATIONAL, &rot) == 0)
      node->is_rotational = rot != 0;
  }
#endif
  return 0;
}

/* A second descriptor takes the first one's place under the same
 * number (so no request can see a closed one), read-write or read-only
 * as @ro says.  The locks go with the descriptions: the old one's are
 * dropped first, since ours would conflict with the new one's, and put
 * back if that fails.  The same file, or nothing: a path now naming
 * another file is refused.
 */
static int
file_reopen (struct node *node, bool ro, struct error **errp)
{
  struct file_state *s = node->opaque;
  struct json_object *v;
  const char *filename;
  struct stat was, now;
  int fd;

  if (node->spec == NULL ||
      !json_object_object_get_ex (node->spec, "filename", &v) ||
      (filename = json_object_get_string (v)) == NULL) {
    error_setg (errp, "file: node '%s' has no file name to reopen",
                node->name);
    return -1;
  }
  fd = open (filename, (ro ? O_RDONLY : O_RDWR) | O_CLOEXEC |
             (s->direct ? O_DIRECT : 0));
  if (fd == -1) {
    error_setg_errno (errp, errno, "file: cannot reopen '%s' %s", filename,
                      ro ? "read-only" : "read-write");
    return -1;
  }
  if (fstat (s->fd, &was) == -1 || fstat (fd, &now) == -1 ||
      was.st_dev != now.st_dev || was.st_ino != now.st_ino) {
    error_setg (errp, "file: '%s' is no longer the file node '%s' opened "
                "(renamed or replaced?): not reopened", filename,
                node->name);
    close (fd);
    return -1;
  }
  if (s->locking) {
    file_unlock (s->fd);
    if (lock_image (fd, filename, ro, errp) == -1) {
      struct error *err = NULL;
      close (fd);
      if (lock_image (s->fd, filename, !ro, &err) == -1) {
        nbdd_warn ("%s: its image locks could not be taken back: %s",
                   node->name, err->msg);
        error_free (err);
      }
      return -1;
    }
  }
  if (dup3 (fd, s->fd, O_CLOEXEC) == -1) {
    error_setg_errno (errp, errno, "file: reopening '%s'", filename);
    close (fd);
    if (s->locking)
      lock_image (s->fd, filename, !ro, NULL);
    return -1;
  }
  close (fd);
  return 0;
}

static int
file_reopen_rw (struct node *node, struct error **errp)
{
  return file_reopen (node, false, errp);
}

static int
file_reopen_ro (struct node *node, struct error **errp)
{
  return file_reopen (node, true, errp);
}

static void
file_close (struct node *node)
{
  struct file_state *s = node->opaque;

  if (s->fd >= 0)
    close (s->fd);
  s->fd = -1;
  pthread_mutex_destroy (&s->flush_lock);
}

static void
file_refresh_limits (struct node *node, struct node_limits *limits)
{
  struct file_state *s = node->opaque;

  limits->request_alignment = s->alignment;
  limits->max_transfer = 0;
  limits->opt_transfer = MAX (s->alignment, 4096u);
}

static int
file_pread (struct node *node, void *buf, uint32_t count, uint64_t offset,
            unsigned flags)
{
  struct file_state *s = node->opaque;
  int r = full_pread (s->fd, buf, count, offset);

  /* The file may have been truncated under us: past its end reads as
   * zeroes, like a sparse region, rather than failing.
   */
  if (r == -EIO && !s->is_block) {
    struct stat st;
    if (fstat (s->fd, &st) == 0 && (uint64_t) st.st_size < offset + count) {
      uint64_t have = st.st_size > (off_t) offset ? st.st_size - offset : 0;
      if (have > 0 && (r = full_pread (s->fd, buf, have, offset)) < 0)
        return r;
      memset ((char *) buf + have, 0, count - have);
      return 0;
    }
  }
  return r;
}

/* Buffered reads of cached data: preadv2 with RWF_NOWAIT returns what
 * the page cache holds without waiting for the disk.  Anything short
 * of the whole request is left to a worker.
 */
static int
file_pread_nowait (struct node *node, void *buf, uint32_t count,
                   uint64_t offset)
{
#ifdef RWF_NOWAIT
  struct file_state *s = node->opaque;
  struct iovec iov = { .iov_base = buf, .iov_len = count };
  ssize_t r;

  if (!atomic_load (&s->can_nowait))
    return -EAGAIN;
  r = preadv2 (s->fd, &iov, 1, offset, RWF_NOWAIT);
  if (r == (ssize_t) count)
    return 0;
  if (r == -1 && (errno == EOPNOTSUPP || errno == ENOSYS ||
                  errno == EINVAL))
    atomic_store (&s->can_nowait, false);
#endif
  return -EAGAIN;
}

/* Page-cache pages go into the pipe by reference; the reply then moves
 * them into the socket, so read data is never copied by the server.
 * Short of the whole range (a file truncated under us, a signal) the
 * caller falls back to file_pread, which knows what to do.
 */
static int
file_read_splice (struct node *node, int pipe_fd, size_t pipe_size,
                  uint32_t count, uint64_t offset)
{
  struct file_state *s = node->opaque;
  uint64_t page = s->page_size;
  loff_t off = offset;

  if (s->direct || !atomic_load (&s->can_splice))
    return -ENOTSUP;
  /* The pipe takes a slot per page the range touches. */
  if (((offset & (page - 1)) + count + page - 1) / page > pipe_size / page)
    return -ENOTSUP;
  while (count > 0) {
    /* NONBLOCK is for the pipe: it must never wait for room. */
    ssize_t r = splice (s->fd, &off, pipe_fd, NULL, count,
                        SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1 && errno == EAGAIN)
      return -ENOTSUP;
    if (r == -1 && (errno == EINVAL || errno == ENOSYS)) {
      atomic_store (&s->can_splice, false);
      return -ENOTSUP;
    }
    if (r == -1)
      return -errno;
    if (r == 0)
      return -ENOTSUP;          /* end of file: truncated */
    count -= r;
  }
  return 0;
}

static void
latch_flush_error (struct file_state *s, int err)
{
  pthread_mutex_lock (&s->flush_lock);
  if (s->flush_error == 0)
    s->flush_error = err;
  pthread_mutex_unlock (&s->flush_lock);
}

static int
file_flush_now (struct file_state *s)
{
  int err;

  pthread_mutex_lock (&s->flush_lock);
  err = s->flush_error;
  if (err == 0 && fdatasync (s->fd) == -1)
    err = s->flush_error = (errno == EINTR ? EIO : errno);
  pthread_mutex_unlock (&s->flush_lock);
  return -err;
}

static int
file_pwrite (struct node *node, const void *buf, uint32_t count,
             uint64_t offset, unsigned flags)
{
  struct file_state *s = node->opaque;

#ifdef RWF_DSYNC
  /* FUA in one syscall where the kernel can do it. */
  if ((flags & NODE_FUA) && atomic_load (&s->can_dsync_write)) {
    const char *p = buf;
    while (count > 0) {
      struct iovec iov = { .iov_base = (void *) p, .iov_len = count };
      ssize_t r = pwritev2 (s->fd, &iov, 1, offset, RWF_DSYNC);
      if (r == -1) {
        if (errno == EINTR)
          continue;
        if (errno == EOPNOTSUPP || errno == ENOSYS) {
          atomic_store (&s->can_dsync_write, false);
          break;
        }
        /* The failed sync consumed the kernel's error report. */
        int err = errno;
        latch_flush_error (s, err);
        return -err;
      }
      p += r;
      offset += r;
      count -= r;
    }
    if (count == 0)
      return 0;
    buf = p;
  }
#endif
  int r = full_pwrite (s->fd, buf, count, offset);
  if (r == 0 && (flags & NODE_FUA))
    r = file_flush_now (s);
  return r;
}

/* Written data of the range to the device, without a device flush:
 * the next FUA write or flush makes it durable (sync_file_range, which
 * is only that where overwrites need no metadata).
 */
static int
file_writeback (struct node *node, uint64_t count, uint64_t offset)
{
  struct file_state *s = node->opaque;

  /* With O_DIRECT a FUA write may reach the device as a plain FUA, no
   * cache flush: it would not cover the runs written before it.
   */
  if (!s->in_place || s->direct)
    return -ENOTSUP;
  if (count == 0)
    return 0;
  if (sync_file_range (s->fd, offset, count,
                       SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                       SYNC_FILE_RANGE_WAIT_AFTER) == -1) {
    int err = errno == EINTR ? EIO : errno;
    latch_flush_error (s, err);
    return -err;
  }
  return 0;
}

/* Try one fallocate mode; latch EOPNOTSUPP.  1 = not supported. */
static int
try_fallocate (struct file_state *s, atomic_bool *can, int mode,
               uint64_t offset, uint64_t count)
{
  if (!atomic_load (can))
    return 1;
  if (fallocate (s->fd, mode, offset, count) == 0)
    return 0;
  if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) {
    atomic_store (can, false);
    return 1;
  }
  return -errno;
}

static int
file_zero (struct node *node, uint64_t count, uint64_t offset,
           unsigned flags)
{
  struct file_state *s = node->opaque;
  int r;

#ifdef BLKZEROOUT
  if (s->is_block) {
    uint64_t range[2] = { offset, count };
    if (flags & NODE_FAST_ZERO)
      return -ENOTSUP;          /* BLKZEROOUT may write zeroes slowly */
    if (ioctl (s->fd, BLKZEROOUT, range) == 0)
      goto done;
    return -ENOTSUP;            /* the core writes zeroes */
  }
#endif

  if (flags & NODE_MAY_TRIM) {
    r = try_fallocate (s, &s->can_punch_hole,
                       FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       offset, count);
    if (r <= 0) {
      if (r < 0)
        return r;
      goto done;
    }
  }
  r = try_fallocate (s, &s->can_zero_range, FALLOC_FL_ZERO_RANGE,
                     offset, count);
  if (r < 0)
    return r;
  if (r == 0)
    goto done;
  /* No ZERO_RANGE: punch a hole and allocate it again, which leaves an
   * allocated, zeroed range (what NO_HOLE asks for).  Only when both
   * are known to work; if allocating turns out unsupported after the
   * punch, the range reads as zeroes and the core writes them to
   * allocate it.
   */
  if (!atomic_load (&s->can_fallocate) || !atomic_load (&s->can_punch_hole))
    return -ENOTSUP;            /* nothing fast: the core writes zeroes */
  r = try_fallocate (s, &s->can_punch_hole,
                     FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                     offset, count);
  if (r != 0)
    return r < 0 ? r : -ENOTSUP;
  r = try_fallocate (s, &s->can_fallocate, 0, offset, count);
  if (r != 0)
    return r < 0 ? r : -ENOTSUP;
  goto done;

 done:
  if (flags & NODE_FUA)
    return file_flush_now (s);
  return 0;
}

static int
file_discard (struct node *node, uint64_t count, uint64_t offset,
              unsigned flags)
{
  struct file_state *s = node->opaque;
  int r = 0;

#ifdef BLKDISCARD
  if (s->is_block) {
    uint64_t range[2] = { offset, count };
    ioctl (s->fd, BLKDISCARD, range);   /* advisory: errors ignored */
    goto done;
  }
#endif
  r = try_fallocate (s, &s->can_punch_hole,
                     FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                     offset, count);
  if (r < 0)
    return r;
  goto done;                    /* not supported: discard is advisory */

 done:
  if (flags & NODE_FUA)
    return file_flush_now (s);
  return 0;
}

static int
file_flush (struct node *node)
{
  return file_flush_now (node->opaque);
}

static int
file_cache (struct node *node, uint64_t count, uint64_t offset)
{
  struct file_state *s = node->opaque;

#ifdef HAVE_POSIX_FADVISE
  int r = posix_fadvise (s->fd, offset, count, POSIX_FADV_WILLNEED);
  if (r != 0 && r != ENOSYS)
    return -r;
#endif
  return 0;
}

static int
file_block_status (struct node *node, uint64_t count, uint64_t offset,
                   struct extent_list *el)
{
  struct file_state *s = node->opaque;
  uint64_t end = offset + count;

  if (!atomic_load (&s->can_seek_data))
    return extents_add (el, count, 0) < 0 ? -ENOMEM : 0;

  while (offset < end) {
    off_t data, hole;
    int r;

    data = lseek (s->fd, offset, SEEK_DATA);
    if (data == -1) {
      if (errno == ENXIO)         /* no data after offset */
        data = node_size (node);
      else if (errno == EINVAL || errno == EOPNOTSUPP) {
        atomic_store (&s->can_seek_data, false);
        return extents_add (el, end - offset, 0) < 0 ? -ENOMEM : 0;
      }
      else
        return -errno;
    }
    if ((uint64_t) data > offset) {
      uint64_t len = MIN ((uint64_t) data, end) - offset;
      r = extents_add (el, len, EXTENT_HOLE | EXTENT_ZERO);
      if (r != 0)
        return r < 0 ? r : 0;
      offset += len;
      if (offset >= end)
        break;
    }
    hole = lseek (s->fd, offset, SEEK_HOLE);
    if (hole == -1) {
      if (errno != ENXIO)
        return -errno;
      hole = node_size (node);         /* file shrank: rest reads as zero */
    }
    if ((uint64_t) hole <= offset)  /* raced with a write: call it data */
      hole = offset + 1;
    {
      uint64_t len = MIN ((uint64_t) hole, end) - offset;
      r = extents_add (el, len, 0);
      if (r != 0)
        return r < 0 ? r : 0;
      offset += len;
    }
  }
  return 0;
}

/* Control path, no I/O in flight. */
static int
file_truncate (struct node *node, uint64_t size)
{
  struct file_state *s = node->opaque;
  struct stat st;
  int r = 0;

  if (s->is_block)              /* a device has the size it has */
    return size <= node->size ? 0 : -ENOSPC;
  if (ftruncate (s->fd, size) == 0)
    node->size = size;
  else {
    r = -errno;
    if (fstat (s->fd, &st) == 0)  /* whatever size it has now */
      node->size = st.st_size;
  }
  return r;
}

const struct node_driver file_driver = {
  .name           = "file",
  .instance_size  = sizeof (struct file_state),
  .open           = file_open,
  .close          = file_close,
  .refresh_limits = file_refresh_limits,
  .pread          = file_pread,
  .pwrite         = file_pwrite,
  .pread_nowait   = file_pread_nowait,
  .read_splice    = file_read_splice,
  .zero           = file_zero,
  .discard        = file_discard,
  .flush          = file_flush,
  .cache          = file_cache,
  .writeback      = file_writeback,
  .block_status   = file_block_status,
  .truncate       = file_truncate,
  .reopen_rw      = file_reopen_rw,
  .reopen_ro      = file_reopen_ro,
};
