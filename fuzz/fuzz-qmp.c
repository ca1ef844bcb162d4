/* libFuzzer target: the admin socket's QMP framing and commands.
 *
 * Each input is the byte stream of one admin client.  A thread writes
 * it into a socketpair (and drains the replies), and the daemon's own
 * session code serves it, with every command it has, against a small
 * graph: a raw node on a memory file, exported.  Sessions run in a
 * scratch directory, so a relative file name a command is given lands
 * there, and no file may grow past 64 MiB.  The sanitizers turn any
 * memory error, leak or undefined behaviour into a crash.
 */
#include <config.h>

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"
#include "log.h"
#include "options.h"

static struct ev_loop *loop;
static char scratch[] = "/tmp/nbdd-fuzz-qmp-XXXXXX";

/* The files commands made (flat: a name with a '/' finds no directory
 * to go in), then the directory.
 */
static void
remove_scratch (void)
{
  DIR *d = opendir (scratch);
  struct dirent *e;

  if (d == NULL)
    return;
  while ((e = readdir (d)) != NULL)
    if (strcmp (e->d_name, ".") && strcmp (e->d_name, ".."))
      unlinkat (dirfd (d), e->d_name, 0);
  closedir (d);
  rmdir (scratch);
}

struct client {
  int fd;
  const uint8_t *data;
  size_t size;
};

static void *
client_thread (void *arg)
{
  struct client *cl = arg;
  char sink[65536];

  full_write (cl->fd, cl->data, cl->size);
  shutdown (cl->fd, SHUT_WR);
  while (read (cl->fd, sink, sizeof sink) > 0)
    ;
  return NULL;
}

int LLVMFuzzerInitialize (int *argc, char ***argv);
int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerInitialize (int *argc, char ***argv)
{
  char spec[256];
  struct error *err = NULL;
  struct json_object *o;
  int fd = memfd_create ("nbdd-fuzz-image", 0);

  if (fd == -1 || ftruncate (fd, 1 << 20) == -1 ||
      mkdtemp (scratch) == NULL || chdir (scratch) == -1) {
    perror ("fuzz: setup");
    exit (EXIT_FAILURE);
  }
  atexit (remove_scratch);
  /* blockdev-create can be asked for a huge preallocated image: cap
   * what any file may grow to (EFBIG, not a signal).
   */
  {
    struct rlimit rl = { 64 << 20, 64 << 20 };
    signal (SIGXFSZ, SIG_IGN);
    if (setrlimit (RLIMIT_FSIZE, &rl) == -1) {
      perror ("fuzz: RLIMIT_FSIZE");
      exit (EXIT_FAILURE);
    }
  }
  log_quiet = true;
  qmp_init ();
  snprintf (spec, sizeof spec, "driver=raw,node-name=disk0,"
            "file.driver=file,file.filename=/proc/self/fd/%d", fd);
  o = spec_parse (spec, &err);
  if (o == NULL || node_open_spec (o, &err) == NULL ||
      export_add_spec ("type=nbd,id=e0,node-name=disk0,writable=on", &err)
      == -1) {
    fprintf (stderr, "fuzz: %s\n", err->msg);
    exit (EXIT_FAILURE);
  }
  json_object_put (o);
  close (fd);

  loop = ev_default_loop (EVFLAG_AUTO);
  if (workers_start (loop, 2, &err) == -1) {
    fprintf (stderr, "fuzz: %s\n", err->msg);
    exit (EXIT_FAILURE);
  }
  return 0;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  int sv[2];
  pthread_t t;
  struct client cl;

  if (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == -1 ||
      fcntl (sv[0], F_SETFL, O_NONBLOCK) == -1)
    abort ();
  cl.fd = sv[1];
  cl.data = data;
  cl.size = size;
  if (pthread_create (&t, NULL, client_thread, &cl) != 0)
    abort ();

  admin_session_start (loop, sv[0], getuid (), getpid ());
  /* Until the client's end closes and the session is freed.  'quit'
   * only marks the daemon as stopping here: nothing else runs.
   */
  while (admin_session_count () > 0)
    ev_run (loop, EVRUN_ONCE);
  shutting_down = false;

  pthread_join (t, NULL);
  close (sv[1]);
  return 0;
}
