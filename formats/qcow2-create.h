/* Creating qcow2 images: what blockdev-create (driver qcow2) and
 * blockdev-snapshot (a new overlay) call.
 */
#ifndef NBDD_QCOW2_CREATE_H
#define NBDD_QCOW2_CREATE_H

#include <stdbool.h>
#include <stdint.h>

#include <json-c/json.h>

#include "driver.h"
#include "error.h"

/* QEMU's PreallocMode, as blockdev-create's "preallocation". */
enum qcow2_prealloc {
  QCOW2_PREALLOC_OFF,           /* only the metadata structures */
  QCOW2_PREALLOC_METADATA,      /* + every L2 table and data cluster mapped */
  QCOW2_PREALLOC_FALLOC,        /* + the data area fallocated */
  QCOW2_PREALLOC_FULL,          /* + the data area written with zeroes */
};

/* Zero (or NULL) fields take QEMU's defaults. */
struct qcow2_create_opts {
  uint64_t size;                /* virtual size in bytes, multiple of 512 */
  uint32_t cluster_size;        /* 0 = 64 KiB; power of 2, 512 B..2 MiB */
  unsigned refcount_bits;       /* 0 = 16; 1, 2, 4, ..., 64 */
  unsigned version;             /* 0 = 3; 2 ("compat=0.10") or 3 ("1.1") */
  bool lazy_refcounts;          /* v3 only */
  bool extended_l2;             /* v3 and clusters >= 16 KiB only */
  const char *compression_type; /* NULL or "zlib", or "zstd" (v3 only) */
  const char *backing_file;     /* NULL = none; stored as given */
  const char *backing_fmt;      /* NULL = none; needs backing_file */
  enum qcow2_prealloc prealloc;
};

/* Check @o with QEMU's rules (qcow2_co_create): 0, or -1 with an error
 * naming the bad option.
 */
int qcow2_create_check_opts (const struct qcow2_create_opts *o,
                             struct error **errp);

/* Write a new qcow2 image onto @file (a protocol node, usually 'file'),
 * replacing whatever it held; flushed before returning.  The header is
 * written last, after everything it points to is on disk, so a crash
 * or an error part way leaves a file without a qcow2 header, never an
 * image that looks valid.  Control path: main thread, no I/O in flight
 * on @file.  0, or -1 with errp set.
 */
int qcow2_create (struct node *file, const struct qcow2_create_opts *o,
                  struct error **errp);

/* Parse QEMU's blockdev-create options for driver qcow2 ("size",
 * "cluster-size", "refcount-bits", "version" "v2"/"v3",
 * "lazy-refcounts", "extended-l2", "compression-type",
 * "backing-file", "backing-fmt", "preallocation") into @out, and check
 * them.  "driver" must be "qcow2" if present; "file" (the protocol
 * node) is the caller's to open and is ignored here.  Strings in @out
 * are borrowed from @o.  0, or -1 with errp set.
 */
int qcow2_create_opts_from_json (struct json_object *o,
                                 struct qcow2_create_opts *out,
                                 struct error **errp);

#endif /* NBDD_QCOW2_CREATE_H */
