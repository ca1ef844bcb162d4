/* The 'qcow2' format driver.
 *
 * Open reads cluster 0 (qcow2-header.c), refuses what it cannot serve
 * correctly (unknown incompatible features, encryption, external data
 * files), loads the L1 table and sets up two bounded metadata caches
 * (qcow2-cache.c).  Reads map guest ranges to runs (qcow2-map.c) and
 * serve each run from the file, the backing node, zeroes or a
 * decompressed cluster.  Writes, zeroing, discard and flush are in
 * qcow2-write.c, cluster allocation and refcounts in qcow2-alloc.c.
 * The node is read-write unless read-only=on (as in QEMU); a dirty
 * image has its refcounts rebuilt first (qcow2-repair.c); persistent
 * bitmaps are loaded and checked (qcow2-bitmap.c) and, read-write,
 * marked in use before the first write.
 *
 * Backing, with QEMU's blockdev semantics for the 'backing' option:
 *   absent   open the file the header names, read-only, under a node of
 *            the header's backing format (or the probed one: qcow2 magic
 *            means qcow2, anything else raw);
 *   null     no backing: unallocated ranges read as zeroes;
 *   "name"   an existing node; {spec} a new node from an inline spec.
 * Chains opened from headers are opened recursively on the main thread;
 * 'chain' below holds the images being opened, to refuse loops and
 * chains deeper than QCOW2_MAX_CHAIN with a clear message.
 *
 * Threads: metadata (L1, the caches' contents, the allocator) changes
 * only under s->lock, and is read under it; data I/O runs without it,
 * on any number of workers.
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
#include "log.h"
#include "options.h"
#include "qcow2.h"
#include "utils.h"

/* QEMU's defaults: an L2 cache big enough for the whole image up to
 * 32 MiB, a refcount cache of 4 clusters.  Slices (cache entries) are
 * at most 64 KiB, so that a random read in an image with 2 MiB
 * clusters does not pull in a whole 2 MiB L2 table.
 */
#define DEFAULT_L2_CACHE_MAX (UINT64_C (32) << 20)
#define DEFAULT_RC_CACHE_CLUSTERS 4
#define DEFAULT_SLICE_MAX (UINT32_C (64) << 10)
#define MIN_CACHE_ENTRIES 4

#define QCOW2_MAX_CHAIN 64

struct chain_link {
  bool valid;                   /* false: not a local file */
  dev_t dev;
  ino_t ino;
};

/* Images whose open is in progress, outermost first.  Main thread only
 * (driver.h: open runs there).
 */
static struct chain_link chain[QCOW2_MAX_CHAIN];
static size_t chain_len;

static const char *const qcow2_keys[] = {
  "driver", "node-name", "file", "backing", "read-only", "auto-read-only",
  "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
  "cache-clean-interval", "discard", "detect-zeroes", "lazy-refcounts",
  "pass-discard-request", "pass-discard-snapshot", "pass-discard-other",
  "overlap-check", NULL
};

/* The file name of the image, if its file child is a 'file' node. */
static const char *
file_child_filename (struct node *file)
{
  struct json_object *v;

  if (strcmp (file->drv->name, "file") == 0 && file->spec &&
      json_object_object_get_ex (file->spec, "filename", &v) &&
      json_object_is_type (v, json_type_string))
    return json_object_get_string (v);
  return NULL;
}

static int
read_header (struct node *node, struct qcow2_state *s, struct error **errp)
{
  uint64_t n = MIN (s->file->node->size,
                    UINT64_C (1) << QCOW2_MAX_CLUSTER_BITS);
  CLEANUP_FREE uint8_t *buf = malloc (n ?: 1);
  int r;

  if (buf == NULL) {
    error_setg_errno (errp, errno, "qcow2: %s: reading the header",
                      s->filename);
    return -1;
  }
  if (n > 0 && (r = node_pread (s->file->node, buf, n, 0, 0)) < 0) {
    error_setg_errno (errp, -r, "qcow2: %s: reading the header",
                      s->filename);
    return -1;
  }
  if (qcow2_header_parse (buf, n, s->file->node->size, &s->info, errp) == -1) {
    error_prepend (errp, "%s", s->filename);
    return -1;
  }
  return 0;
}

/* Refuse what this driver cannot serve correctly, naming it. */
static int
check_features (struct qcow2_state *s, bool ro, struct error **errp)
{
  const struct qcow2_info *info = &s->info;
  uint64_t unknown = info->incompat & ~QCOW2_INCOMPAT_SUPPORTED;

  if (info->incompat & QCOW2_INCOMPAT_DATA_FILE) {
    error_setg (errp, "qcow2: %s: images with an external data file "
                "(incompatible feature bit 2) are not supported",
                s->filename);
    return -1;
  }
  if (unknown) {
    CLEANUP_FREE char *names = qcow2_feature_names (info, 0, unknown);
    error_setg (errp, "qcow2: %s: unsupported incompatible feature(s): %s",
                s->filename, names ? names : "?");
    return -1;
  }
  if (info->crypt_method != QCOW2_CRYPT_NONE) {
    error_setg (errp, "qcow2: %s: encrypted images (crypt_method %" PRIu32
                ", %s) are not supported", s->filename, info->crypt_method,
                info->crypt_method == QCOW2_CRYPT_AES ? "AES-CBC" :
                info->crypt_method == QCOW2_CRYPT_LUKS ? "LUKS" : "unknown");
    return -1;
  }
  s->corrupt = (info->incompat & QCOW2_INCOMPAT_CORRUPT) != 0;
  s->dirty = (info->incompat & QCOW2_INCOMPAT_DIRTY) != 0;
  if (s->corrupt && !ro) {
    error_setg (errp, "qcow2: %s: image is marked corrupt; it can only be "
                "opened read-only (repair it with 'qemu-img check -r all')",
                s->filename);
    return -1;
  }
  if (s->corrupt)
    nbdd_warn ("qcow2: %s: image is marked corrupt; serving it read-only",
               s->filename);
  /* A dirty image has stale refcounts; reads don't use them.  The
   * write side rebuilds them before its first allocation.
   */
  return 0;
}

static int
load_l1 (struct qcow2_state *s, struct error **errp)
{
  uint32_t n = s->info.l1_size;
  int r;

  s->l1 = calloc (n ?: 1, sizeof *s->l1);
  if (s->l1 == NULL) {
    error_setg_errno (errp, errno, "qcow2: %s: allocating the L1 table",
                      s->filename);
    return -1;
  }
  if (n == 0)
    return 0;
  /* Bounded: at most 32 MiB, and inside the file (checked by parse). */
  r = node_pread (s->file->node, s->l1, (uint64_t) n * 8, s->info.l1_offset, 0);
  if (r < 0) {
    error_setg_errno (errp, -r, "qcow2: %s: cannot read the L1 table at "
                      "0x%" PRIx64, s->filename, s->info.l1_offset);
    return -1;
  }
  for (uint32_t i = 0; i < n; ++i)
    s->l1[i] = be64toh (s->l1[i]);
  return 0;
}

static int
setup_caches (struct json_object *opts, struct qcow2_state *s,
              struct error **errp)
{
  const struct qcow2_info *info = &s->info;
  uint64_t l2_size, rc_size, entry, l2_need, rc_need;
  uint64_t clusters = info->size / info->cluster_size + 1;
  int has_l2, has_rc, has_entry;

  has_entry = opt_get_size (opts, "qcow2", "l2-cache-entry-size", false,
                            &entry, errp);
  if (has_entry == -1)
    return -1;
  if (has_entry == 1)
    entry = MIN (info->cluster_size, (uint64_t) DEFAULT_SLICE_MAX);
  else if (!IS_POWER_OF_2 (entry) || entry < 512 ||
           entry > info->cluster_size) {
    error_setg (errp, "qcow2: l2-cache-entry-size must be a power of two "
                "between 512 and the cluster size (%" PRIu64 ")",
                info->cluster_size);
    return -1;
  }
  s->l2_slice_size = entry;
  s->rc_slice_size = MIN (info->cluster_size, (uint64_t) DEFAULT_SLICE_MAX);

  /* What covers every L2 table of the image, and every refcount block
   * plus the refcount table: more would never be used.
   */
  l2_need = ROUND_UP (clusters * info->l2_entry_size, (uint64_t) entry) +
    entry;
  rc_need = ((uint64_t) info->reftable_clusters * info->cluster_size / 8 + 1)
    * info->cluster_size;

  has_l2 = opt_get_size (opts, "qcow2", "l2-cache-size", false, &l2_size,
                         errp);
  if (has_l2 == -1)
    return -1;
  if (has_l2 == 1)
    l2_size = DEFAULT_L2_CACHE_MAX;
  has_rc = opt_get_size (opts, "qcow2", "refcount-cache-size", false,
                         &rc_size, errp);
  if (has_rc == -1)
    return -1;
  if (has_rc == 1)
    rc_size = DEFAULT_RC_CACHE_CLUSTERS * info->cluster_size;

  l2_size = MIN (l2_size, l2_need);
  rc_size = MIN (rc_size, rc_need);
  s->l2_cache = qcow2_cache_new (s->file, s->l2_slice_size,
                                 MAX (l2_size / s->l2_slice_size,
                                      (uint64_t) MIN_CACHE_ENTRIES), "L2");
  s->refcount_cache = qcow2_cache_new (s->file, s->rc_slice_size,
                                       MAX (rc_size / s->rc_slice_size,
                                            (uint64_t) MIN_CACHE_ENTRIES),
                                       "refcount");
  if (s->l2_cache == NULL || s->refcount_cache == NULL) {
    error_setg_errno (errp, ENOMEM, "qcow2: %s: allocating the metadata "
                      "caches", s->filename);
    return -1;
  }
  return 0;
}

/* Refuse an image already being opened further up the chain, and
 * chains too deep to be anything but a mistake.
 */
static int
chain_check (struct qcow2_state *s, struct chain_link *me,
             struct error **errp)
{
  const char *fn = file_child_filename (s->file->node);
  struct stat st;

  me->valid = fn != NULL && stat (fn, &st) == 0;
  if (me->valid) {
    me->dev = st.st_dev;
    me->ino = st.st_ino;
    for (size_t i = 0; i < chain_len; ++i)
      if (chain[i].valid && chain[i].dev == me->dev &&
          chain[i].ino == me->ino) {
        error_setg (errp, "qcow2: %s: backing chain loop: this image is "
                    "already in its own backing chain", s->filename);
        return -1;
      }
  }
  if (chain_len >= QCOW2_MAX_CHAIN) {
    error_setg (errp, "qcow2: %s: backing chain is too deep (more than %d "
                "images)", s->filename, QCOW2_MAX_CHAIN);
    return -1;
  }
  return 0;
}

/* The format of a backing file the header names without one. */
static const char *
probe_format (const char *path)
{
  uint32_t magic = 0;
  int fd = open (path, O_RDONLY | O_CLOEXEC);

  if (fd == -1)
    return "raw";               /* the file node reports the error */
  if (pread (fd, &magic, 4, 0) != 4)
    magic = 0;
  close (fd);
  return be32toh (magic) == QCOW2_MAGIC ? "qcow2" : "raw";
}

/* The backing file named in the header: a relative name is relative to
 * the directory of the image.
 */
static char *
backing_path (struct qcow2_state *s, struct error **errp)
{
  const char *name = s->info.backing_file;
  const char *image = file_child_filename (s->file->node);
  const char *slash;
  char *path;

  if (strstr (name, "://") || strncmp (name, "json:", 5) == 0) {
    error_setg (errp, "qcow2: %s: backing file '%s' is not a local file "
                "(not supported yet)", s->filename, name);
    return NULL;
  }
  if (name[0] == '/')
    return strdup (name);
  if (image == NULL) {
    error_setg (errp, "qcow2: %s: cannot resolve the relative backing file "
                "name '%s': the image is not a local file", s->filename,
                name);
    return NULL;
  }
  slash = strrchr (image, '/');
  if (slash == NULL)
    return strdup (name);
  if (asprintf (&path, "%.*s/%s", (int) (slash - image), image, name) == -1)
    return NULL;
  return path;
}

static struct json_object *
backing_spec (const char *fmt, const char *path)
{
  struct json_object *spec = json_object_new_object ();
  struct json_object *file = json_object_new_object ();

  if (spec == NULL || file == NULL) {
    json_object_put (spec);
    json_object_put (file);
    return NULL;
  }
  json_object_object_add (file, "driver", json_object_new_string ("file"));
  json_object_object_add (file, "filename", json_object_new_string (path));
  json_object_object_add (file, "read-only", json_object_new_boolean (1));
  if (strcmp (fmt, "file") == 0) {
    json_object_put (spec);
    return file;
  }
  json_object_object_add (spec, "driver", json_object_new_string (fmt));
  json_object_object_add (spec, "read-only", json_object_new_boolean (1));
  json_object_object_add (spec, "file", file);
  return spec;
}

static int
open_backing_from_header (struct node *node, struct qcow2_state *s,
                          struct error **errp)
{
  CLEANUP_FREE char *path = NULL;
  const char *fmt = s->info.backing_format;
  struct json_object *wrap, *spec;

  path = backing_path (s, errp);
  if (path == NULL) {
    if (errp && *errp == NULL)
      error_setg_errno (errp, ENOMEM, "qcow2: %s: backing file name",
                        s->filename);
    return -1;
  }
  if (fmt == NULL)
    fmt = probe_format (path);
  if (format_find_driver (fmt) == NULL) {
    error_setg (errp, "qcow2: %s: backing file '%s' has format '%s', "
                "which is not supported (known: %s)", s->filename, path,
                fmt, format_driver_names ());
    return -1;
  }
  spec = backing_spec (fmt, path);
  wrap = json_object_new_object ();
  if (spec == NULL || wrap == NULL) {
    json_object_put (spec);
    json_object_put (wrap);
    error_setg_errno (errp, ENOMEM, "qcow2: %s: backing file", s->filename);
    return -1;
  }
  json_object_object_add (wrap, "backing", spec);
  s->backing = node_open_child (node, wrap, "backing", CHILD_COW, errp);
  json_object_put (wrap);
  if (s->backing == NULL) {
    /* Only the top of the chain says where the chain starts: every
     * error below already names its own file, and prefixes from every
     * layer would bury it.
     */
    if (chain_len == 1)
      error_prepend (errp, "qcow2: %s: backing file '%s'", s->filename,
                     path);
    return -1;
  }
  return 0;
}

static int
open_backing (struct node *node, struct json_object *opts,
              struct qcow2_state *s, struct error **errp)
{
  struct json_object *v;
  struct chain_link me;
  int r;

  if (json_object_object_get_ex (opts, "backing", &v)) {
    if (v == NULL)
      return 0;                 /* "backing": null */
    s->backing = node_open_child (node, opts, "backing", CHILD_COW, errp);
    return s->backing ? 0 : -1;
  }
  if (s->info.backing_file == NULL)
    return 0;

  if (chain_check (s, &me, errp) == -1)
    return -1;
  chain[chain_len++] = me;
  r = open_backing_from_header (node, s, errp);
  chain_len--;
  return r;
}

static int
qcow2_open (struct node *node, struct json_object *opts,
            struct error **errp)
{
  struct qcow2_state *s = node->opaque;
  bool ro = true, lazy = false;
  int has_ro, has_lazy;
  const char *fn;

  atomic_init (&s->corrupt_reports, 0);
  if (opt_check_keys (opts, "qcow2", qcow2_keys, errp) == -1 ||
      (has_ro = opt_get_bool (opts, "qcow2", "read-only", false, &ro,
                              errp)) == -1 ||
      (has_lazy = opt_get_bool (opts, "qcow2", "lazy-refcounts", false,
                                &lazy, errp)) == -1)
    return -1;
  if (has_ro == 1)
    ro = false;
  pthread_mutex_init (&s->lock, NULL);
  pthread_rwlock_init (&s->bitmaps_lock, NULL);
  pthread_cond_init (&s->inflight_done, NULL);

  s->file = node_open_child (node, opts, "file",
                             CHILD_DATA | CHILD_METADATA | CHILD_PRIMARY,
                             errp);
  if (s->file == NULL)
    return -1;
  fn = file_child_filename (s->file->node);
  s->filename = strdup (fn ? fn : s->file->node->name);
  if (s->filename == NULL) {
    error_setg_errno (errp, errno, "qcow2: opening");
    return -1;
  }

  if (read_header (node, s, errp) == -1 ||
      check_features (s, ro, errp) == -1 ||
      load_l1 (s, errp) == -1 ||
      setup_caches (opts, s, errp) == -1 ||
      open_backing (node, opts, s, errp) == -1)
    return -1;

  /* Lazy refcounts: as the image says, unless the option says. */
  s->lazy_refcounts = has_lazy == 1 ?
    (s->info.compat & QCOW2_COMPAT_LAZY_REFCOUNTS) != 0 : lazy;
  /* A file opened read-only (by its own spec) makes the image so. */
  ro = ro || s->file->node->read_only;
  if (qcow2_bitmaps_open (s, ro, errp) == -1 ||
      (!ro && qcow2_write_open (s, errp) == -1))
    return -1;
  node->size = s->info.size;
  node->read_only = ro;
  node->can_flush = true;
  node->can_trim = !ro;
  node->can_zero = !ro;
  node->can_fast_zero = !ro;
  node->has_block_status = true;
  debug ("qcow2: %s: v%" PRIu32 ", %" PRIu64 " bytes, cluster %" PRIu64
         "%s%s, backing %s", s->filename, s->info.version, s->info.size,
         s->info.cluster_size, s->info.extended_l2 ? ", extended L2" : "",
         s->dirty ? ", dirty" : "", s->backing ? s->backing->node->name : "none");
  return 0;
}

/* What a read-write open does that a read-only one did not: the file
 * first, then the image's writable state (qcow2_write_open: a repair
 * of a dirty image, the allocator, the bitmaps marked in use).
 */
static int
qcow2_reopen_rw (struct node *node, struct error **errp)
{
  struct qcow2_state *s = node->opaque;

  if (s->corrupt) {
    error_setg (errp, "qcow2: %s: the image is marked corrupt: it stays "
                "read-only (repair it with 'qemu-img check -r all')",
                s->filename);
    return -1;
  }
  if (check_features (s, false, errp) == -1 ||
      qcow2_bitmaps_check_writable (s, errp) == -1 ||
      node_reopen_rw (s->file->node, errp) == -1)
    return -1;
  if (qcow2_write_open (s, errp) == -1) {
    struct error *err = NULL;
    /* What it set up goes, so that a later attempt starts afresh, and
     * the file is read-only again, its write lock given back.
     */
    qcow2_meta_free (s);
    free (s->zero_cluster);
    s->zero_cluster = NULL;
    s->file->node->growable = false;
    if (node_reopen_ro (s->file->node, &err) == -1) {
      nbdd_warn ("qcow2: %s: %s", s->filename, err->msg);
      error_free (err);
    }
    return -1;
  }
  node->can_trim = true;
  node->can_zero = true;
  node->can_fast_zero = true;
  return 0;
}

/* blockdev-snapshot: the overlay (opened with "backing": null) gets
 * the old top as its backing node.  The header is left alone, as QEMU
 * does: the overlay was created naming its backing file.
 */
static int
qcow2_set_backing (struct node *node, struct node_child *c,
                   struct error **errp)
{
  struct qcow2_state *s = node->opaque;

  if (c && s->backing) {
    error_setg (errp, "qcow2: node '%s' already has a backing node ('%s')",
                node->name, s->backing->node->name);
    return -1;
  }
  s->backing = c;
  return 0;
}

/* block-stream and block-commit: the header names another backing
 * file (or none), in one rewrite of cluster 0 with the backing format
 * extension to match.  Drained, so no write races with the rewrite.
 */
static int
qcow2_change_backing_file (struct node *node, const char *file,
                           const char *fmt, char **old_file, char **old_fmt,
                           struct error **errp)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE char *of = NULL, *ofmt = NULL, *nfmt = NULL;
  struct qcow2_header_update u = {
    .autoclear = s->info.autoclear,
    .ext_type = QCOW2_EXT_BACKING_FORMAT,
    .ext = (const uint8_t *) (file ? fmt : NULL),
    .ext_len = file && fmt ? strlen (fmt) : 0,
    .backing = true,
    .backing_file = file,
  };
  int r;

  if (node->read_only) {
    error_setg (errp, "qcow2: %s: the image is read-only: its backing file "
                "name cannot change", s->filename);
    return -1;
  }
  if (file && (strlen (file) > QCOW2_MAX_BACKING_FILE_NAME ||
               strlen (file) == 0)) {
    error_setg (errp, "qcow2: %s: backing file name '%.80s' is empty or "
                "longer than %d bytes", s->filename, file,
                QCOW2_MAX_BACKING_FILE_NAME);
    return -1;
  }
  if (file && fmt && (strlen (fmt) > QCOW2_MAX_BACKING_FMT ||
                      strlen (fmt) == 0)) {
    error_setg (errp, "qcow2: %s: backing format '%.80s' is empty or "
                "longer than %d bytes", s->filename, fmt,
                QCOW2_MAX_BACKING_FMT);
    return -1;
  }
  if ((s->info.backing_file &&
       (of = strdup (s->info.backing_file)) == NULL) ||
      (s->info.backing_format &&
       (ofmt = strdup (s->info.backing_format)) == NULL) ||
      (file && fmt && (nfmt = strdup (fmt)) == NULL)) {
    error_setg_errno (errp, ENOMEM, "qcow2: %s: backing file name",
                      s->filename);
    return -1;
  }
  pthread_rwlock_wrlock (&s->bitmaps_lock);
  pthread_mutex_lock (&s->lock);
  r = qcow2_write_header (s, &u);
  if (r == 0) {
    free (s->info.backing_format);
    s->info.backing_format = steal_pointer (&nfmt);
  }
  pthread_mutex_unlock (&s->lock);
  pthread_rwlock_unlock (&s->bitmaps_lock);
  if (r < 0) {
    error_setg_errno (errp, -r, "qcow2: %s: writing the backing file name "
                      "'%s' to the header", s->filename, file ? file : "");
    return -1;
  }
  debug ("qcow2: %s: backing file now %s%s%s%s", s->filename,
         file ? file : "none", file && fmt ? " (" : "",
         file && fmt ? fmt : "", file && fmt ? ")" : "");
  if (old_file) {
    *old_file = steal_pointer (&of);
    *old_fmt = steal_pointer (&ofmt);
  }
  return 0;
}

static void
qcow2_close (struct node *node)
{
  struct qcow2_state *s = node->opaque;

  if (s->l2_cache && s->refcount_cache)
    qcow2_write_close (s);
  if (s->file)
    s->file->node->growable = false;
  qcow2_cache_free (s->l2_cache);
  qcow2_cache_free (s->refcount_cache);
  free (s->l1);
  qcow2_meta_free (s);
  qcow2_bitmaps_close (s);
  free (s->punches);
  free (s->zero_cluster);
  free (s->filename);
  pthread_cond_destroy (&s->inflight_done);
  pthread_mutex_destroy (&s->lock);
  pthread_rwlock_destroy (&s->bitmaps_lock);
  qcow2_info_free (&s->info);
}

static void
qcow2_refresh_limits (struct node *node, struct node_limits *limits)
{
  struct qcow2_state *s = node->opaque;

  /* Byte granular: the file node aligns for itself if it must. */
  limits->request_alignment = 1;
  limits->max_transfer = 0;
  limits->opt_transfer = s->info.cluster_size;
}

/* Read host bytes; past the end of the file reads as zeroes. */
static int
read_host (struct qcow2_state *s, void *buf, uint64_t count, uint64_t host)
{
  uint64_t fsize = node_size (s->file->node);
  uint64_t n = host < fsize ? MIN (count, fsize - host) : 0;

  if (n < count)
    memset ((char *) buf + n, 0, count - n);
  return n ? node_pread (s->file->node, buf, n, host, 0) : 0;
}

/* Unallocated here: the backing node's bytes, zeroes past its end. */
static int
read_backing (struct qcow2_state *s, void *buf, uint64_t count,
              uint64_t offset)
{
  uint64_t bsize = s->backing ? s->backing->node->size : 0;
  uint64_t n = offset < bsize ? MIN (count, bsize - offset) : 0;

  if (n < count)
    memset ((char *) buf + n, 0, count - n);
  return n ? node_pread (s->backing->node, buf, n, offset, 0) : 0;
}

static int
read_compressed (struct qcow2_state *s, void *buf, uint64_t count,
                 uint64_t offset, const struct qcow2_run *run)
{
  uint64_t cs = s->info.cluster_size;
  CLEANUP_FREE uint8_t *in = malloc (run->csize);
  CLEANUP_FREE uint8_t *out = NULL;
  uint8_t *dst = buf;
  int r;

  /* The slow path: buffers per call, bounded by 2 clusters + 1 sector
   * (the descriptor's sector count is cluster_bits - 8 bits wide).
   */
  if (in == NULL)
    return -ENOMEM;
  if (count != cs) {
    out = malloc (cs);
    if (out == NULL)
      return -ENOMEM;
    dst = out;
  }
  r = read_host (s, in, run->csize, run->host);
  if (r < 0)
    return r;
  r = qcow2_decompress (s->info.compression_type, dst, cs, in, run->csize);
  if (r < 0)
    return qcow2_corrupt (s, "cannot decompress the cluster at guest offset "
                          "0x%" PRIx64 " (host offset 0x%" PRIx64 ", %"
                          PRIu64 " bytes, %s)", run->cluster_start,
                          run->host, run->csize,
                          s->info.compression_type ? "zstd" : "deflate");
  if (out)
    memcpy (buf, out + (offset - run->cluster_start), count);
  return 0;
}

int
qcow2_pread (struct node *node, void *buf, uint32_t count, uint64_t offset,
             unsigned flags)
{
  struct qcow2_state *s = node->opaque;
  char *p = buf;

  while (count > 0) {
    struct qcow2_run run;
    int r = qcow2_map (s, offset, count, &run);

    if (r < 0)
      return r;
    switch (run.kind) {
    case QCOW2_UNALLOCATED:
      r = read_backing (s, p, run.len, offset);
      break;
    case QCOW2_ZERO:
      memset (p, 0, run.len);
      break;
    case QCOW2_DATA:
      r = read_host (s, p, run.len, run.host);
      break;
    case QCOW2_COMPRESSED:
      r = read_compressed (s, p, run.len, offset, &run);
      break;
    }
    if (r < 0)
      return r;
    p += run.len;
    offset += run.len;
    count -= run.len;
  }
  return 0;
}


/* The fast read paths (the loop's non-blocking read, zero-copy splice)
 * go straight to the file where the range is data, and decline
 * everything else.
 */
static int
qcow2_pread_nowait (struct node *node, void *buf, uint32_t count,
                    uint64_t offset)
{
  struct qcow2_state *s = node->opaque;
  struct qcow2_run run;
  int r = qcow2_map_nowait (s, offset, count, &run);

  if (r < 0)
    return r;
  if (run.kind == QCOW2_ZERO && run.len == count) {
    memset (buf, 0, count);
    return 0;
  }
  if (run.kind != QCOW2_DATA || run.len < count ||
      run.host + count > node_size (s->file->node))
    return -EAGAIN;
  return node_pread_nowait (s->file->node, buf, count, run.host);
}

static int
qcow2_read_splice (struct node *node, int pipe_fd, size_t pipe_size,
                   uint32_t count, uint64_t offset)
{
  struct qcow2_state *s = node->opaque;
  const uint64_t page = 4096;
  size_t room = pipe_size;

  /* Run after run of data into the same pipe; anything else (a hole,
   * zeroes, a compressed cluster) declines, and the caller empties the
   * pipe and copies instead.
   */
  while (count > 0) {
    struct qcow2_run run;
    uint64_t n, pages;
    int r = qcow2_map (s, offset, count, &run);

    if (r < 0)
      return r;
    n = MIN (run.len, (uint64_t) count);
    if (run.kind != QCOW2_DATA || run.host + n > node_size (s->file->node))
      return -ENOTSUP;
    pages = ((run.host & (page - 1)) + n + page - 1) / page;
    if (pages * page > room)
      return -ENOTSUP;
    if ((r = node_read_splice (s->file->node, pipe_fd, room, n, run.host)) < 0)
      return r;
    room -= pages * page;
    offset += n;
    count -= n;
  }
  return 0;
}

static int
qcow2_block_status (struct node *node, uint64_t count, uint64_t offset,
                    struct extent_list *el)
{
  struct qcow2_state *s = node->opaque;
  uint64_t end = offset + count;

  while (offset < end) {
    struct qcow2_run run;
    uint64_t bsize;
    int r = qcow2_map (s, offset, end - offset, &run);

    if (r < 0)
      return r;
    switch (run.kind) {
    case QCOW2_DATA:
    case QCOW2_COMPRESSED:
      r = extents_add (el, run.len, 0);
      break;
    case QCOW2_ZERO:
      r = extents_add (el, run.len, EXTENT_HOLE | EXTENT_ZERO);
      break;
    case QCOW2_UNALLOCATED:
      /* What the rest of the chain says, zeroes past its end. */
      bsize = s->backing ? s->backing->node->size : 0;
      if (offset < bsize) {
        uint64_t n = MIN (run.len, bsize - offset);
        size_t len_before = el->len;
        r = node_block_status (s->backing->node, n, el);
        if (r < 0)
          return r;
        if (el->end < offset + n) {
          /* The backing node stopped early (its list is full, or it
           * answers in pieces): carry on from where it got to, unless
           * it made no progress at all.
           */
          if (el->end == offset && el->len == len_before)
            return 0;
          offset = el->end;
          continue;
        }
        r = 0;
        if (run.len > n)
          r = extents_add (el, run.len - n, EXTENT_HOLE | EXTENT_ZERO);
      }
      else
        r = extents_add (el, run.len, EXTENT_HOLE | EXTENT_ZERO);
      break;
    }
    if (r < 0)
      return r;
    if (r == 1)
      return 0;                 /* the list is full */
    offset += run.len;
  }
  return 0;
}

static int
qcow2_allocation_depth (struct node *node, uint64_t count, uint64_t offset,
                        uint64_t *pnum, unsigned *depth)
{
  struct qcow2_state *s = node->opaque;
  struct qcow2_run run;
  uint64_t bsize;
  int r = qcow2_map (s, offset, count, &run);

  if (r < 0)
    return r;
  if (run.kind != QCOW2_UNALLOCATED) {
    /* Data, zero and compressed are all allocated here: merge them. */
    *pnum = run.len;
    *depth = 1;
    while (*pnum < count) {
      r = qcow2_map (s, offset + *pnum, count - *pnum, &run);
      if (r < 0)
        return r;
      if (run.kind == QCOW2_UNALLOCATED)
        break;
      *pnum += run.len;
    }
    return 0;
  }
  if (s->backing == NULL) {
    *pnum = run.len;
    *depth = 0;
    return 0;
  }
  /* Past the end of a shorter backing node, the zeroes read there
   * count as allocated in the backing node (depth 2), as in QEMU's
   * bdrv_co_common_block_status_above, which qemu-nbd reports.
   */
  bsize = s->backing->node->size;
  if (offset >= bsize) {
    *pnum = run.len;
    *depth = 2;
    return 0;
  }
  r = node_allocation_depth (s->backing->node, MIN (run.len, bsize - offset),
                             offset, pnum, depth);
  if (r == 0 && *depth > 0)
    ++*depth;
  return r;
}

const struct node_driver qcow2_driver = {
  .name             = "qcow2",
  .instance_size    = sizeof (struct qcow2_state),
  .open             = qcow2_open,
  .close            = qcow2_close,
  .refresh_limits   = qcow2_refresh_limits,
  .pread            = qcow2_pread,
  .pread_nowait     = qcow2_pread_nowait,
  .read_splice      = qcow2_read_splice,
  .pwrite           = qcow2_pwrite,
  .zero             = qcow2_zero,
  .reopen_rw        = qcow2_reopen_rw,
  .discard          = qcow2_discard,
  .flush            = qcow2_flush,
  .block_status     = qcow2_block_status,
  .allocation_depth = qcow2_allocation_depth,
  .set_backing      = qcow2_set_backing,
  .change_backing_file = qcow2_change_backing_file,
  .truncate         = qcow2_truncate,
  .bitmaps_list     = qcow2_drv_bitmaps_list,
  .bitmap_read      = qcow2_bitmap_read,
  .bitmaps_store    = qcow2_drv_bitmaps_store,
  .bitmap_sync      = qcow2_bitmap_sync,
};
