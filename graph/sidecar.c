/* Persistent bitmaps of nodes whose image has no room for them (raw,
 * file): a sidecar file per node in the state dir,
 * STATE_DIR/bitmaps/NODE-NAME.bitmaps.
 *
 * Layout (big-endian): a header, then each bitmap's bits in QEMU's
 * serialization order in a region of its own, 4 KiB aligned, sized for
 * the whole node, so that write intent (graph/dirty.c) can update bits
 * in place, a 4 KiB block at a time.
 *
 *   "NBDDBM1\n"  u32 count  u32 header bytes  u64 node size
 *   u16 image name length, image name  (the file the node reads)
 *   per bitmap: u16 name length, name, u32 granularity,
 *               u32 flags (1 enabled, 2 in use), u64 bits offset,
 *               u64 bits length
 *
 * A whole new set is written to a temporary file, synced and renamed
 * over the old one, so a crash leaves one or the other.  A sidecar that
 * names another image, or another size, is not this node's: it is set
 * aside (renamed *.stale) and reported, never loaded.
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cleanup.h"
#include "graph.h"
#include "log.h"
#include "utils.h"

#define MAGIC           "NBDDBM1\n"
#define DIV_ROUND_UP(n, d) (((n) + (d) - 1) / (d))
#define BLOCK           4096u
#define MAX_HEADER      (1u << 20)
#define FLAG_ENABLED    1u
#define FLAG_IN_USE     2u

static char *sidecar_dir;

void
dirty_bitmaps_sidecar_dir (const char *dir)
{
  free (sidecar_dir);
  sidecar_dir = dir ? strdup (dir) : NULL;
}

/* A node whose bitmaps mean something of its own: not a filter that
 * only passes requests on (throttle), though raw, which holds the
 * data of its child as a format would, counts.
 */
static bool
owns_data (const struct node *node)
{
  if (!node->drv->is_filter)
    return true;
  for (size_t i = 0; i < node->nr_children; ++i)
    if (node->children[i]->role & CHILD_DATA)
      return true;
  return false;
}

bool
sidecar_usable (const struct node *node)
{
  return sidecar_dir && node->name[0] != '#' && owns_data (node);
}

static char *
sidecar_path (const struct node *node, const char *suffix)
{
  char *p;

  if (asprintf (&p, "%s/%s.bitmaps%s", sidecar_dir, node->name, suffix) == -1)
    return NULL;
  return p;
}

struct entry {
  char *name;
  uint32_t granularity, flags;
  uint64_t bits_offset, bits_len;
};

static void
entries_free (struct entry *e, size_t n)
{
  for (size_t i = 0; i < n; ++i)
    free (e[i].name);
  free (e);
}

static uint16_t get16 (const uint8_t *p) { uint16_t v; memcpy (&v, p, 2); return be16toh (v); }
static uint32_t get32 (const uint8_t *p) { uint32_t v; memcpy (&v, p, 4); return be32toh (v); }
static uint64_t get64 (const uint8_t *p) { uint64_t v; memcpy (&v, p, 8); return be64toh (v); }

/* Read and check the header of @fd for @node: 0 with the entries, 1 if
 * it is not this node's (reason in *why), -1 with errp.
 */
static int
parse (const struct node *node, int fd, struct entry **ep, size_t *np,
       const char **why, struct error **errp)
{
  uint8_t head[26];
  CLEANUP_FREE uint8_t *h = NULL;
  uint32_t count, hlen;
  uint64_t file_size, pos;
  const char *img = node_filename (node) ?: "";
  struct stat st;
  struct entry *e;
  uint16_t len;

  *ep = NULL;
  *np = 0;
  if (fstat (fd, &st) == -1 || full_pread (fd, head, sizeof head, 0) < 0) {
    *why = "it is too short";
    return 1;
  }
  file_size = st.st_size;
  count = get32 (head + 8);
  hlen = get32 (head + 12);
  if (memcmp (head, MAGIC, 8) != 0 || hlen < 26 || hlen > MAX_HEADER ||
      hlen > file_size || count > 65535) {
    *why = "its header is not valid";
    return 1;
  }
  if (get64 (head + 16) != node_size (node)) {
    *why = "it is for a node of another size";
    return 1;
  }
  h = malloc (hlen);
  if (h == NULL || full_pread (fd, h, hlen, 0) < 0) {
    error_setg (errp, "reading the bitmap sidecar of node '%s'", node->name);
    return -1;
  }
  len = get16 (h + 24);
  if (26 + (uint64_t) len > hlen || len != strlen (img) ||
      memcmp (h + 26, img, len) != 0) {
    *why = "it names another image";
    return 1;
  }
  pos = 26 + len;
  e = calloc (count ? count : 1, sizeof *e);
  if (e == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  for (uint32_t i = 0; i < count; ++i) {
    uint64_t need;
    if (pos + 2 > hlen || (len = get16 (h + pos), pos + 2 + len + 24 > hlen) ||
        len == 0) {
      entries_free (e, i);
      *why = "its bitmap list is not valid";
      return 1;
    }
    e[i].name = malloc (len + 1);
    if (e[i].name)
      memcpy (e[i].name, h + pos + 2, len), e[i].name[len] = '\0';
    pos += 2 + len;
    e[i].granularity = get32 (h + pos);
    e[i].flags = get32 (h + pos + 4);
    e[i].bits_offset = get64 (h + pos + 8);
    e[i].bits_len = get64 (h + pos + 16);
    pos += 24;
    need = DIV_ROUND_UP (DIV_ROUND_UP (node_size (node),
                                       (uint64_t) e[i].granularity ?: 1), 8);
    if (e[i].name == NULL || memchr (e[i].name, 0, len) ||
        e[i].granularity < 512 || (e[i].granularity & (e[i].granularity - 1)) ||
        e[i].bits_len < need || e[i].bits_offset % BLOCK ||
        e[i].bits_offset < hlen || e[i].bits_offset > file_size ||
        e[i].bits_len > file_size - e[i].bits_offset) {
      entries_free (e, i + 1);
      *why = "a bitmap in it is not valid";
      return 1;
    }
  }
  for (uint32_t i = 0; i < count; ++i)
    for (uint32_t j = i + 1; j < count; ++j)
      if (strcmp (e[i].name, e[j].name) == 0) {
        entries_free (e, count);
        *why = "it names a bitmap twice";
        return 1;
      }
  *ep = e;
  *np = count;
  return 0;
}

/* Open and parse; a file that is not this node's is set aside. */
static int
open_parsed (struct node *node, int flags, bool set_aside, int *fdp,
             struct entry **ep, size_t *np, struct error **errp)
{
  CLEANUP_FREE char *path = sidecar_path (node, "");
  const char *why = NULL;
  int fd, r;

  *fdp = -1;
  *ep = NULL;
  *np = 0;
  if (path == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  fd = open (path, flags | O_CLOEXEC);
  if (fd == -1) {
    if (errno == ENOENT)
      return 0;
    error_setg_errno (errp, errno, "bitmap sidecar %s", path);
    return -1;
  }
  r = parse (node, fd, ep, np, &why, errp);
  if (r == 1 && !set_aside) {
    /* On the write path the file is ours: a mismatch is an error, not
     * a stranger's file.
     */
    error_setg (errp, "bitmap sidecar %s: %s", path, why);
    close (fd);
    return -1;
  }
  if (r == 1) {
    CLEANUP_FREE char *stale = sidecar_path (node, ".stale");
    nbdd_warn ("node '%s': bitmap sidecar %s is not this node's (%s): set "
               "aside as %s", node->name, path, why, stale ? stale : "?");
    if (stale && rename (path, stale) == -1)
      unlink (path);
    close (fd);
    return 0;
  }
  if (r == -1) {
    close (fd);
    return -1;
  }
  *fdp = fd;
  return 0;
}

int
sidecar_list (struct node *node, struct node_bitmap_info **list, size_t *n,
              struct error **errp)
{
  struct entry *e;
  size_t ne;
  int fd;

  *list = NULL;
  *n = 0;
  if (open_parsed (node, O_RDONLY, true, &fd, &e, &ne, errp) == -1)
    return -1;
  if (fd == -1)
    return 0;
  close (fd);
  *list = calloc (ne ? ne : 1, sizeof **list);
  if (*list == NULL) {
    entries_free (e, ne);
    error_setg (errp, "out of memory");
    return -1;
  }
  for (size_t i = 0; i < ne; ++i) {
    (*list)[i].name = e[i].name;
    e[i].name = NULL;
    (*list)[i].granularity = e[i].granularity;
    (*list)[i].enabled = e[i].flags & FLAG_ENABLED;
    (*list)[i].in_use = e[i].flags & FLAG_IN_USE;
  }
  *n = ne;
  entries_free (e, ne);
  return 0;
}

static struct entry *
find (struct entry *e, size_t n, const char *name)
{
  for (size_t i = 0; i < n; ++i)
    if (strcmp (e[i].name, name) == 0)
      return &e[i];
  return NULL;
}

int
sidecar_read (struct node *node, const char *name, uint64_t offset,
              uint64_t count, void *buf, struct error **errp)
{
  struct entry *e, *x;
  size_t ne;
  uint64_t first, bytes;
  int fd, r = -1;

  if (open_parsed (node, O_RDONLY, false, &fd, &e, &ne, errp) == -1)
    return -1;
  x = fd == -1 ? NULL : find (e, ne, name);
  if (x == NULL) {
    error_setg (errp, "node '%s': no bitmap '%s' in its sidecar", node->name,
                name);
    goto out;
  }
  /* Callers read whole bytes of bits: offsets on 8 granules. */
  first = offset / x->granularity;
  bytes = DIV_ROUND_UP (DIV_ROUND_UP (count, (uint64_t) x->granularity), 8);
  if (first % 8 || first / 8 + bytes > x->bits_len) {
    error_setg (errp, "node '%s': bitmap '%s': a read outside its bits",
                node->name, name);
    goto out;
  }
  if (full_pread (fd, buf, bytes, x->bits_offset + first / 8) < 0) {
    error_setg_errno (errp, errno, "node '%s': reading bitmap '%s'",
                      node->name, name);
    goto out;
  }
  r = 0;
 out:
  if (fd != -1)
    close (fd);
  entries_free (e, ne);
  return r;
}

static void
put16 (uint8_t *p, uint16_t v) { v = htobe16 (v); memcpy (p, &v, 2); }
static void
put32 (uint8_t *p, uint32_t v) { v = htobe32 (v); memcpy (p, &v, 4); }
static void
put64 (uint8_t *p, uint64_t v) { v = htobe64 (v); memcpy (p, &v, 8); }

/* A rename or an unlink in the directory must survive a crash too. */
static void
sync_dir (void)
{
  int dfd = open (sidecar_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

  if (dfd >= 0) {
    if (fsync (dfd) == -1)
      nbdd_warn ("bitmap sidecars: syncing %s: %m", sidecar_dir);
    close (dfd);
  }
}

int
sidecar_store (struct node *node, const struct node_bitmap_store *v, size_t n,
               struct error **errp)
{
  CLEANUP_FREE char *path = sidecar_path (node, "");
  CLEANUP_FREE char *tmp = sidecar_path (node, ".tmp");
  CLEANUP_FREE uint8_t *h = NULL;
  CLEANUP_FREE uint8_t *bits = NULL;
  const char *img = node_filename (node) ?: "";
  uint64_t size = node_size (node), hlen, pos, at;
  int fd;

  if (path == NULL || tmp == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  if (n == 0) {
    if (unlink (path) == -1 && errno != ENOENT) {
      error_setg_errno (errp, errno, "removing %s", path);
      return -1;
    }
    sync_dir ();
    return 0;
  }
  if (mkdir (sidecar_dir, 0700) == -1 && errno != EEXIST) {
    error_setg_errno (errp, errno, "bitmap sidecars: %s", sidecar_dir);
    return -1;
  }
  hlen = 26 + strlen (img);
  for (size_t i = 0; i < n; ++i)
    hlen += 2 + strlen (v[i].name) + 24;
  if (hlen > MAX_HEADER || strlen (img) > UINT16_MAX) {
    error_setg (errp, "node '%s': too many bitmaps for a sidecar",
                node->name);
    return -1;
  }
  h = calloc (1, hlen);
  if (h == NULL) {
    error_setg (errp, "out of memory");
    return -1;
  }
  memcpy (h, MAGIC, 8);
  put32 (h + 8, n);
  put32 (h + 12, hlen);
  put64 (h + 16, size);
  put16 (h + 24, strlen (img));
  memcpy (h + 26, img, strlen (img));
  pos = 26 + strlen (img);
  at = ROUND_UP (hlen, (uint64_t) BLOCK);

  fd = open (tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd == -1) {
    error_setg_errno (errp, errno, "bitmap sidecar %s", tmp);
    return -1;
  }
  for (size_t i = 0; i < n; ++i) {
    uint64_t len = DIV_ROUND_UP (DIV_ROUND_UP (size, (uint64_t)
                                               v[i].granularity), 8);
    uint64_t room = ROUND_UP (len ? len : 1, (uint64_t) BLOCK);
    int r;

    put16 (h + pos, strlen (v[i].name));
    memcpy (h + pos + 2, v[i].name, strlen (v[i].name));
    pos += 2 + strlen (v[i].name);
    put32 (h + pos, v[i].granularity);
    put32 (h + pos + 4, (v[i].enabled ? FLAG_ENABLED : 0) |
           (v[i].in_use ? FLAG_IN_USE : 0));
    put64 (h + pos + 8, at);
    put64 (h + pos + 16, room);
    pos += 24;
    bits = realloc (bits, room);
    if (bits == NULL) {
      close (fd);
      unlink (tmp);
      error_setg (errp, "out of memory");
      return -1;
    }
    memset (bits, 0, room);
    if (size > 0 && (r = v[i].fill (v[i].opaque, 0, size, bits)) < 0) {
      close (fd);
      unlink (tmp);
      error_setg_errno (errp, -r, "bitmap '%s'", v[i].name);
      return -1;
    }
    if (full_pwrite (fd, bits, room, at) < 0) {
      error_setg_errno (errp, errno, "writing %s", tmp);
      close (fd);
      unlink (tmp);
      return -1;
    }
    at += room;
  }
  if (full_pwrite (fd, h, hlen, 0) < 0 || fsync (fd) == -1) {
    error_setg_errno (errp, errno, "writing %s", tmp);
    close (fd);
    unlink (tmp);
    return -1;
  }
  close (fd);
  if (rename (tmp, path) == -1) {
    error_setg_errno (errp, errno, "renaming %s", tmp);
    unlink (tmp);
    return -1;
  }
  sync_dir ();
  return 0;
}

/* Write intent: the 4 KiB blocks of bits that cover the range, filled
 * and written in place, then flushed (a file of bits alone: its flush
 * costs no guest data).
 */
int
sidecar_sync (struct node *node, const char *name, uint64_t offset,
              uint64_t count,
              int (*fill) (void *opaque, uint64_t offset, uint64_t count,
                           void *buf),
              void *opaque, struct error **errp)
{
  struct entry *e, *x;
  size_t ne;
  uint64_t size = node_size (node), cover;
  uint8_t buf[BLOCK];
  int fd, r = 0;

  if (open_parsed (node, O_RDWR, false, &fd, &e, &ne, errp) == -1)
    return -1;
  x = fd == -1 ? NULL : find (e, ne, name);
  if (x == NULL) {
    if (fd != -1)
      close (fd);
    entries_free (e, ne);
    error_setg (errp, "node '%s': no bitmap '%s' in its sidecar", node->name,
                name);
    return -1;
  }
  cover = (uint64_t) BLOCK * 8 * x->granularity;
  if (count > 0 && offset < size) {
    uint64_t end = MIN (offset + count, size);
    for (uint64_t b = offset / cover; b * cover < end && r == 0; ++b) {
      uint64_t off = b * cover, cnt = MIN (cover, size - off);
      memset (buf, 0, sizeof buf);
      if ((r = fill (opaque, off, cnt, buf)) < 0)
        break;
      if (r == 1) {             /* unchanged */
        r = 0;
        continue;
      }
      if (full_pwrite (fd, buf,
                       DIV_ROUND_UP (DIV_ROUND_UP (cnt, (uint64_t)
                                                   x->granularity), 8),
                       x->bits_offset + b * BLOCK) < 0)
        r = -errno;
    }
  }
  if (r == 0 && fdatasync (fd) == -1)
    r = -errno;
  close (fd);
  entries_free (e, ne);
  if (r < 0) {
    error_setg_errno (errp, -r, "node '%s': bitmap '%s': writing its bits",
                      node->name, name);
    return -1;
  }
  return 0;
}
