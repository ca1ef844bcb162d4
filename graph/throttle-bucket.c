/* Leaky buckets for I/O throttling: see throttle-bucket.h. */
#include <config.h>

#include <inttypes.h>
#include <string.h>

#include "throttle-bucket.h"
#include "utils.h"

#define NS_PER_SEC 1e9
/* Waits are capped (about 31 years) so they always fit a timespec. */
#define TB_WAIT_MAX (UINT64_C (1) << 60)

const struct tb_names tb_names_limits = {
  .avg = { "iops-total", "iops-read", "iops-write",
           "bps-total", "bps-read", "bps-write" },
  .max = { "iops-total-max", "iops-read-max", "iops-write-max",
           "bps-total-max", "bps-read-max", "bps-write-max" },
  .length = { "iops-total-max-length", "iops-read-max-length",
              "iops-write-max-length", "bps-total-max-length",
              "bps-read-max-length", "bps-write-max-length" },
  .iops_size = "iops-size",
};

const struct tb_names tb_names_qmp = {
  .avg = { "iops", "iops_rd", "iops_wr", "bps", "bps_rd", "bps_wr" },
  .max = { "iops_max", "iops_rd_max", "iops_wr_max",
           "bps_max", "bps_rd_max", "bps_wr_max" },
  .length = { "iops_max_length", "iops_rd_max_length",
              "iops_wr_max_length", "bps_max_length",
              "bps_rd_max_length", "bps_wr_max_length" },
  .iops_size = "iops_size",
};

void
tb_limits_init (struct tb_limits *lim)
{
  memset (lim, 0, sizeof *lim);
  for (int i = 0; i < TB_COUNT; ++i)
    lim->burst_length[i] = 1;
}

bool
tb_limits_equal (const struct tb_limits *a, const struct tb_limits *b)
{
  for (int i = 0; i < TB_COUNT; ++i)
    if (a->avg[i] != b->avg[i] || a->max[i] != b->max[i] ||
        a->burst_length[i] != b->burst_length[i])
      return false;
  return a->iops_size == b->iops_size;
}

bool
tb_limits_enabled (const struct tb_limits *lim)
{
  for (int i = 0; i < TB_COUNT; ++i)
    if (lim->avg[i] > 0)
      return true;
  return false;
}

/* A total limit excludes the read and write ones of the same kind. */
static int
check_total (const struct tb_limits *lim, const struct tb_names *names,
             int total, struct error **errp)
{
  for (int i = total + 1; i <= total + 2; ++i) {
    if (lim->avg[total] && lim->avg[i]) {
      error_setg (errp, "'%s' and '%s' cannot be used at the same time",
                  names->avg[total], names->avg[i]);
      return -1;
    }
    if (lim->max[total] && lim->max[i]) {
      error_setg (errp, "'%s' and '%s' cannot be used at the same time",
                  names->max[total], names->max[i]);
      return -1;
    }
  }
  return 0;
}

int
tb_limits_check (const struct tb_limits *lim, const struct tb_names *names,
                 struct error **errp)
{
  if (check_total (lim, names, TB_IOPS_TOTAL, errp) == -1 ||
      check_total (lim, names, TB_BPS_TOTAL, errp) == -1)
    return -1;
  if (lim->iops_size && !lim->avg[TB_IOPS_TOTAL] &&
      !lim->avg[TB_IOPS_READ] && !lim->avg[TB_IOPS_WRITE]) {
    error_setg (errp, "'%s' requires an iops limit", names->iops_size);
    return -1;
  }
  if (lim->iops_size > TB_VALUE_MAX) {
    error_setg (errp, "'%s' must be within [0, %" PRIu64 "]",
                names->iops_size, TB_VALUE_MAX);
    return -1;
  }
  for (int i = 0; i < TB_COUNT; ++i) {
    if (lim->avg[i] > TB_VALUE_MAX) {
      error_setg (errp, "'%s' must be within [0, %" PRIu64 "]",
                  names->avg[i], TB_VALUE_MAX);
      return -1;
    }
    if (lim->max[i] > TB_VALUE_MAX) {
      error_setg (errp, "'%s' must be within [0, %" PRIu64 "]",
                  names->max[i], TB_VALUE_MAX);
      return -1;
    }
    if (lim->burst_length[i] == 0 || lim->burst_length[i] > TB_LENGTH_MAX) {
      error_setg (errp, "'%s' must be within [1, %" PRIu32 "]",
                  names->length[i], TB_LENGTH_MAX);
      return -1;
    }
    if (lim->burst_length[i] > 1 && !lim->max[i]) {
      error_setg (errp, "'%s' requires '%s'", names->length[i],
                  names->max[i]);
      return -1;
    }
    if (lim->max[i] && !lim->avg[i]) {
      error_setg (errp, "'%s' requires '%s'", names->max[i],
                  names->avg[i]);
      return -1;
    }
    if (lim->max[i] && lim->max[i] < lim->avg[i]) {
      error_setg (errp, "'%s' (%" PRIu64 ") cannot be lower than '%s' (%"
                  PRIu64 ")", names->max[i], lim->max[i], names->avg[i],
                  lim->avg[i]);
      return -1;
    }
  }
  return 0;
}

void
tb_reset (struct tb_state *tb, const struct tb_limits *lim, uint64_t now)
{
  memset (tb, 0, sizeof *tb);
  tb->lim = *lim;
  tb->last_leak = now;
}

/* The burst rate: a tenth of a second's worth of the average when not
 * set, which smooths bursty guests (see QEMU's throttle_fix_bucket).
 */
static double
burst_rate (const struct tb_limits *lim, int i)
{
  return lim->max[i] ? (double) lim->max[i] : (double) lim->avg[i] / 10;
}

static void
leak (struct tb_state *tb, uint64_t now)
{
  double dt;

  if (now <= tb->last_leak)
    return;
  dt = (double) (now - tb->last_leak) / NS_PER_SEC;
  tb->last_leak = now;
  for (int i = 0; i < TB_COUNT; ++i) {
    double l;

    if (tb->lim.avg[i] == 0)
      continue;
    l = tb->level[i] - (double) tb->lim.avg[i] * dt;
    tb->level[i] = l > 0 ? l : 0;
    if (tb->lim.burst_length[i] > 1) {
      l = tb->burst_level[i] - (double) tb->lim.max[i] * dt;
      tb->burst_level[i] = l > 0 ? l : 0;
    }
  }
}

/* Nanoseconds for @extra units to drain at @rate per second, rounded
 * up so that after the wait the request really may go.
 */
static uint64_t
drain_ns (double extra, double rate)
{
  double w = extra * NS_PER_SEC / rate;
  uint64_t n;

  if (w >= (double) TB_WAIT_MAX)
    return TB_WAIT_MAX;
  n = (uint64_t) w;
  return n < w ? n + 1 : n;
}

/* How far @level is above @limit, 0 if not or only by rounding: after
 * waiting the time a wait computes, the request must really go.
 */
static double
excess (double level, double limit)
{
  double extra = level - limit;

  return extra > level * 1e-12 ? extra : 0;
}

static uint64_t
bucket_wait (const struct tb_state *tb, int i)
{
  const struct tb_limits *lim = &tb->lim;
  double extra;

  if (lim->avg[i] == 0)
    return 0;
  /* Full: wait for the average to drain the excess. */
  extra = excess (tb->level[i], burst_rate (lim, i) * lim->burst_length[i]);
  if (extra > 0)
    return drain_ns (extra, (double) lim->avg[i]);
  /* Inside a long burst: never faster than the burst rate. */
  if (lim->burst_length[i] > 1) {
    extra = excess (tb->burst_level[i], (double) lim->max[i] / 10);
    if (extra > 0)
      return drain_ns (extra, (double) lim->max[i]);
  }
  return 0;
}

uint64_t
tb_wait (struct tb_state *tb, bool is_write, uint64_t now)
{
  const int buckets[] = {
    TB_IOPS_TOTAL, is_write ? TB_IOPS_WRITE : TB_IOPS_READ,
    TB_BPS_TOTAL, is_write ? TB_BPS_WRITE : TB_BPS_READ,
  };
  uint64_t wait = 0;

  leak (tb, now);
  for (size_t i = 0; i < ARRAY_SIZE (buckets); ++i) {
    uint64_t w = bucket_wait (tb, buckets[i]);
    if (w > wait)
      wait = w;
  }
  return wait;
}

static void
pour (struct tb_state *tb, int i, double units)
{
  if (tb->lim.avg[i] == 0)      /* unlimited: nothing to remember */
    return;
  tb->level[i] += units;
  if (tb->lim.burst_length[i] > 1)
    tb->burst_level[i] += units;
}

void
tb_account (struct tb_state *tb, bool is_write, uint64_t bytes)
{
  double ops = 1;

  /* With iops-size, a large request is several operations. */
  if (tb->lim.iops_size && bytes > tb->lim.iops_size)
    ops = (double) bytes / (double) tb->lim.iops_size;
  pour (tb, TB_IOPS_TOTAL, ops);
  pour (tb, is_write ? TB_IOPS_WRITE : TB_IOPS_READ, ops);
  pour (tb, TB_BPS_TOTAL, (double) bytes);
  pour (tb, is_write ? TB_BPS_WRITE : TB_BPS_READ, (double) bytes);
}
