/* libFuzzer target: the NBD handshake and request parser.
 *
 * Each input is the byte stream of one client.  It is written into a
 * socketpair by a thread (which also drains the replies, so the daemon
 * never blocks on a full socket), and the daemon's own connection code
 * serves it through handshake and transmission, against a writable
 * 1 MiB file node, until the client's end closes.  The sanitizers turn
 * any memory error, leak or undefined behaviour into a crash.
 */
#include <config.h>

#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"
#include "log.h"
#include "options.h"

static struct ev_loop *loop;

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

  /* Write everything, then read until the daemon closes. */
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
  /* The image lives in memory; the file node opens it through /proc. */
  int fd = memfd_create ("nbdd-fuzz-image", 0);

  if (fd == -1 || ftruncate (fd, 1 << 20) == -1) {
    perror ("fuzz: image");
    exit (EXIT_FAILURE);
  }
  log_quiet = true;
  config.handshake_timeout = 0;
  snprintf (spec, sizeof spec, "driver=raw,node-name=disk0,"
            "file.driver=file,file.filename=/proc/self/fd/%d", fd);
  o = spec_parse (spec, &err);
  if (o == NULL || node_open_spec (o, &err) == NULL ||
      export_add_spec ("type=nbd,id=e0,node-name=disk0,writable=on,"
                       "description=fuzz", &err) == -1 ||
      export_add_spec ("type=nbd,id=e1,node-name=disk0,name=ro", &err) == -1) {
    fprintf (stderr, "fuzz: %s\n", err->msg);
    exit (EXIT_FAILURE);
  }
  json_object_put (o);
  close (fd);                   /* the node has its own descriptor */

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
  struct conn *c;
  struct error *err = NULL;

  if (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == -1 ||
      fcntl (sv[0], F_SETFL, O_NONBLOCK) == -1)
    abort ();
  cl.fd = sv[1];
  cl.data = data;
  cl.size = size;
  if (pthread_create (&t, NULL, client_thread, &cl) != 0)
    abort ();

  c = conn_new (loop, sv[0], sv[0], "fuzz", &err);
  if (c == NULL)
    abort ();
  c->exit_loop_on_close = true;
  conns_flush_dirty ();
  ev_run (loop, 0);
  /* The connection is gone only when the loop was broken by its reap. */
  if (conn_count () != 0)
    abort ();

  pthread_join (t, NULL);
  close (sv[1]);
  return 0;
}
