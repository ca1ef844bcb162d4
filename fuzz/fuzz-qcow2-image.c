/* libFuzzer target: a whole qcow2 image, read and written.
 *
 * Each input is an image file: header, L1, L2 and refcount tables,
 * snapshots, compressed clusters, whatever the mutator makes of the
 * seeds.  It is opened through the real graph (a qcow2 node over a
 * file node on a memfd), read and mapped, then opened read-write and
 * written, zeroed, discarded and flushed, which runs the repair of
 * dirty images, the allocator and the overlap checks.  Every table
 * parser must turn garbage into an error, never a crash, an
 * out-of-bounds access, a leak or undefined behaviour.
 */
#include <config.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <json-c/json.h>

#include "graph.h"
#include "log.h"
#include "utils.h"

#define MAX_READ (UINT64_C (4) << 20)   /* of the virtual disk */

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

static struct node *
open_image (int fd, bool ro)
{
  char spec[256];
  struct json_object *o;
  struct error *err = NULL;
  struct node *n;

  snprintf (spec, sizeof spec,
            "{\"driver\": \"qcow2\", \"node-name\": \"f%c\", "
            "\"read-only\": %s, \"backing\": null, "
            "\"file\": {\"driver\": \"file\", \"locking\": \"off\", "
            "\"filename\": \"/proc/self/fd/%d\"}}",
            ro ? 'r' : 'w', ro ? "true" : "false", fd);
  o = json_tokener_parse (spec);
  n = node_open_spec (o, &err);
  json_object_put (o);
  if (n == NULL)
    error_free (err);
  return n;
}

static void
exercise_reads (struct node *n)
{
  static uint8_t buf[65536];
  uint64_t end = MIN (n->size, MAX_READ);
  struct extent_list el;

  for (uint64_t off = 0; off < end; off += sizeof buf)
    node_pread (n, buf, MIN ((uint64_t) sizeof buf, end - off), off, 0);
  extents_init (&el, 0, 64);
  if (end > 0)
    node_block_status (n, end, &el);
  extents_free (&el);
  if (end > 0) {
    uint64_t pnum;
    unsigned depth;
    node_allocation_depth (n, end, 0, &pnum, &depth);
  }
}

static void
exercise_writes (struct node *n)
{
  static uint8_t buf[8192];
  uint64_t end = MIN (n->size, MAX_READ);

  if (end < sizeof buf)
    return;
  memset (buf, 0xa5, sizeof buf);
  node_pwrite (n, buf, sizeof buf, 0, 0);
  node_pwrite (n, buf, 4096, end / 2 + 512, 0);
  node_zero (n, end / 2, end / 2, NODE_MAY_TRIM);
  node_discard (n, end / 4, end / 4, 0);
  node_flush (n);
  node_pread (n, buf, sizeof buf, 0, 0);
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  static bool quiet;
  int fd;

  if (!quiet) {
    log_init ("fuzz", false);
    log_quiet = true;           /* errors only: run with -close_fd_mask=2 */
    quiet = true;
  }
  fd = memfd_create ("qcow2", MFD_CLOEXEC);
  if (fd == -1)
    return 0;
  if (write (fd, data, size) == (ssize_t) size) {
    struct node *n = open_image (fd, true);
    if (n) {
      exercise_reads (n);
      node_close_all ();
    }
    n = open_image (fd, false);
    if (n) {
      exercise_writes (n);
      exercise_reads (n);
      node_close_all ();
    }
  }
  close (fd);
  return 0;
}
