/* Leaky buckets for I/O throttling: the arithmetic only, a pure
 * function of the limits and an explicit clock, so that it can be
 * tested without sleeping.  graph/throttle.c adds the locking, the
 * queues and the real clock.
 *
 * The model is QEMU's (util/throttle.c).  Each limited quantity (bytes
 * or operations; all, reads or writes) is a bucket: every admitted
 * request pours its size into the bucket's 'level', which leaks at
 * 'avg' units per second.  A request may start while the level is at
 * most max * burst_length: 'max' is the burst rate (avg / 10 when not
 * set, a tenth of a second of slack), 'burst_length' how many seconds
 * a burst at that rate may last.  Bursts longer than a second keep a
 * second level that leaks at 'max' per second, so that even inside a
 * burst the rate never exceeds 'max'.
 *
 * The check is made before a request is counted, as in QEMU: a large
 * request is never delayed for its own size, only the requests after
 * it are.
 */
#ifndef NBDD_THROTTLE_BUCKET_H
#define NBDD_THROTTLE_BUCKET_H

#include <stdbool.h>
#include <stdint.h>

#include "error.h"

/* The buckets, in QEMU's ThrottleLimits order. */
enum {
  TB_IOPS_TOTAL,
  TB_IOPS_READ,
  TB_IOPS_WRITE,
  TB_BPS_TOTAL,
  TB_BPS_READ,
  TB_BPS_WRITE,
  TB_COUNT
};

/* Values are bounded as in QEMU (THROTTLE_VALUE_MAX). */
#define TB_VALUE_MAX UINT64_C (1000000000000000)
#define TB_LENGTH_MAX UINT32_MAX

/* What the user set.  0 means unset, except burst_length (1 when not
 * set: the burst lasts one second).
 */
struct tb_limits {
  uint64_t avg[TB_COUNT];       /* units per second, 0 = unlimited */
  uint64_t max[TB_COUNT];       /* burst rate, 0 = avg / 10 */
  uint64_t burst_length[TB_COUNT]; /* seconds, >= 1 */
  uint64_t iops_size;           /* 0, or bytes of one operation */
};

/* A group's buckets at one instant. */
struct tb_state {
  struct tb_limits lim;
  double level[TB_COUNT];
  double burst_level[TB_COUNT]; /* only when burst_length > 1 */
  uint64_t last_leak;           /* ns, the clock of 'now' below */
};

/* The option names of the limits, for parsing and messages: QEMU's
 * ThrottleLimits ("iops-total-max") and block_set_io_throttle's
 * ("iops_max").
 */
struct tb_names {
  const char *avg[TB_COUNT];
  const char *max[TB_COUNT];
  const char *length[TB_COUNT];
  const char *iops_size;
};
extern const struct tb_names tb_names_limits;
extern const struct tb_names tb_names_qmp;

/* No limits at all: every burst_length 1, everything else 0. */
void tb_limits_init (struct tb_limits *lim);
bool tb_limits_equal (const struct tb_limits *a, const struct tb_limits *b);
/* Some limit is set: requests may have to wait. */
bool tb_limits_enabled (const struct tb_limits *lim);
/* QEMU's rules: 0 or -1 with errp set.  The message names the options
 * in @names; the caller prepends the operation and the object.
 */
int tb_limits_check (const struct tb_limits *lim,
                     const struct tb_names *names, struct error **errp);

/* Set the limits and empty the buckets at @now. */
void tb_reset (struct tb_state *tb, const struct tb_limits *lim,
               uint64_t now);
/* Leak the buckets up to @now, then return the time in ns a request
 * in direction @is_write must still wait before it may start (0: it
 * may start now).  @now earlier than an earlier call leaks nothing.
 */
uint64_t tb_wait (struct tb_state *tb, bool is_write, uint64_t now);
/* Count an admitted request of @bytes (reads: data read; writes, zero
 * and discard: bytes covered).
 */
void tb_account (struct tb_state *tb, bool is_write, uint64_t bytes);

#endif /* NBDD_THROTTLE_BUCKET_H */
