/* A pool of pipes for zero-copy reads.
 *
 * A large READ of cached data is spliced from the file into a pipe
 * (the pipe takes references to the page-cache pages) and from the
 * pipe into the socket, so the server never copies the data.  The pipe
 * travels with the request until its data has gone out, which may be
 * long after the worker is done if the client reads slowly, so pipes
 * are pooled rather than owned by workers.
 *
 * The pool is bounded: pipes pin page-cache pages and count against
 * the user's pipe quota (fs.pipe-user-pages-soft).  When it is empty
 * the request takes the copying path instead.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "internal.h"
#include "log.h"

/* 32 MiB of pipe capacity in all, half the default soft quota. */
#define MAX_PIPES 128

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct splice_pipe *free_pipes;
static unsigned nr_pipes;               /* open, in the pool or out */
static unsigned nr_free;                /* in the pool */
static bool over_quota;                 /* the kernel refused the size */

/* A new pipe of SPLICE_PIPE_SIZE, or NULL with errno set. */
static struct splice_pipe *
pipe_open (void)
{
  struct splice_pipe *p = malloc (sizeof *p);
  int fds[2], err;

  if (p == NULL)
    return NULL;
  if (pipe2 (fds, O_CLOEXEC) == -1) {
    err = errno;
    free (p);
    errno = err;
    return NULL;
  }
  /* A smaller pipe is of no use: the reads worth splicing would not
   * fit.  EPERM here is the user's pipe quota (fs.pipe-user-pages-*).
   */
  if (fcntl (fds[1], F_SETPIPE_SZ, SPLICE_PIPE_SIZE) == -1 ||
      fcntl (fds[1], F_GETPIPE_SZ) < (int) SPLICE_PIPE_SIZE) {
    err = errno;
    close (fds[0]);
    close (fds[1]);
    free (p);
    errno = err;
    return NULL;
  }
  p->rd = fds[0];
  p->wr = fds[1];
  p->next = NULL;
  return p;
}

static void
pipe_close (struct splice_pipe *p)
{
  close (p->rd);
  close (p->wr);
  free (p);
}

struct splice_pipe *
pipe_get (void)
{
  struct splice_pipe *p;

  pthread_mutex_lock (&lock);
  p = free_pipes;
  if (p) {
    free_pipes = p->next;
    nr_free--;
    pthread_mutex_unlock (&lock);
    return p;
  }
  if (over_quota || nr_pipes >= MAX_PIPES) {
    pthread_mutex_unlock (&lock);
    return NULL;
  }
  nr_pipes++;                           /* reserve the slot */
  pthread_mutex_unlock (&lock);

  p = pipe_open ();
  if (p == NULL) {
    /* Out of descriptors or memory passes; the quota does not. */
    bool quota = errno == EPERM;
    pthread_mutex_lock (&lock);
    nr_pipes--;
    if (quota && !over_quota) {
      over_quota = true;
      nbdd_warn ("pipes of %u KiB refused (fs.pipe-user-pages-soft?): "
                 "large reads are copied from now on",
                 SPLICE_PIPE_SIZE >> 10);
    }
    pthread_mutex_unlock (&lock);
  }
  return p;
}

void
pipe_put (struct splice_pipe *p)
{
  int held;

  /* Pooled pipes must be empty, or the next read would send what is
   * left in them.
   */
  if (ioctl (p->rd, FIONREAD, &held) == -1 || held != 0) {
    pipe_close (p);
    pthread_mutex_lock (&lock);
    nr_pipes--;
    pthread_mutex_unlock (&lock);
    return;
  }
  pthread_mutex_lock (&lock);
  p->next = free_pipes;
  free_pipes = p;
  nr_free++;
  pthread_mutex_unlock (&lock);
}

void
pipes_free_all (void)
{
  pthread_mutex_lock (&lock);
  /* Every request is back by now, and with it every pipe. */
  debug ("zero-copy pipes at exit: %u open, %u in use", nr_pipes,
         nr_pipes - nr_free);
  while (free_pipes) {
    struct splice_pipe *p = free_pipes;
    free_pipes = p->next;
    pipe_close (p);
    nr_pipes--;
    nr_free--;
  }
  pthread_mutex_unlock (&lock);
}
