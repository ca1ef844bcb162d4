/* nbd-randio: random 4 KiB I/O at a fixed queue depth over libnbd.
 *
 * bench/run uses it for the TLS random-I/O rows, because fio's nbd
 * engine refuses URIs that name local files (tls-certificates=,
 * tls-psk-file=).  It does what fio --ioengine=nbd --rw=randread|
 * randwrite --bs=4k --iodepth=QD --time_based does: each connection
 * keeps QD requests in flight (a completed one is replaced by a new
 * one at a random 4 KiB-aligned offset over the whole export) for the
 * given time, then waits for the last replies.  It prints one line of
 * JSON with the IOPS.
 *
 *   cc -O2 -o nbd-randio nbd-randio.c $(pkg-config --cflags --libs libnbd) -lpthread
 *   nbd-randio --uri URI --rw randread|randwrite --qd N --runtime S
 *              [--connections C] [--bs BYTES]
 *
 * With --connections C, C threads each open their own connection and
 * keep QD requests in flight on it (like fio's --numjobs).
 *
 * Completion callbacks only mark their slot done: libnbd holds the
 * handle's lock while it runs them, so new requests are issued after
 * nbd_poll returns, for every slot that completed in that round.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libnbd.h>

struct slot {
  struct worker *w;
  unsigned idx;
  bool busy;
  char *buf;
  double t_issue;
};

struct worker {
  pthread_t thread;
  unsigned id;
  struct nbd_handle *h;
  int64_t size;
  uint64_t nblocks;
  uint64_t rng;
  struct slot *slots;
  unsigned *done;               /* indices of slots completed this round */
  unsigned ndone;
  uint64_t ios;
  double lat_sum;               /* seconds, over completed requests */
  double t_end;
  int err;                      /* errno of a failed request */
  char errmsg[512];
};

static const char *uri;
static bool write_mode;
static unsigned qd = 1;
static unsigned nconn = 1;
static double runtime = 5;
static unsigned bs = 4096;
static double t_start, t_deadline;

static double
now (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* xorshift64*: fast, and good enough to pick offsets. */
static uint64_t
rnd (uint64_t *s)
{
  uint64_t x = *s;

  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * UINT64_C (2685821657736338717);
}

static int
completed (void *user_data, int *error)
{
  struct slot *s = user_data;
  struct worker *w = s->w;

  if (*error && !w->err) {
    w->err = *error;
    snprintf (w->errmsg, sizeof w->errmsg, "%s at request completion: %s",
              write_mode ? "pwrite" : "pread", strerror (*error));
  }
  w->lat_sum += now () - s->t_issue;
  w->ios++;
  s->busy = false;
  w->done[w->ndone++] = s->idx;
  return 1;                     /* retire the command */
}

static int
issue (struct worker *w, struct slot *s)
{
  uint64_t off = (rnd (&w->rng) % w->nblocks) * bs;
  nbd_completion_callback cb = { .callback = completed, .user_data = s };
  int64_t cookie;

  s->busy = true;
  s->t_issue = now ();
  if (write_mode)
    cookie = nbd_aio_pwrite (w->h, s->buf, bs, off, cb, 0);
  else
    cookie = nbd_aio_pread (w->h, s->buf, bs, off, cb, 0);
  if (cookie == -1) {
    s->busy = false;
    snprintf (w->errmsg, sizeof w->errmsg, "%s", nbd_get_error ());
    w->err = nbd_get_errno () ? nbd_get_errno () : EIO;
    return -1;
  }
  return 0;
}

static void *
run_worker (void *arg)
{
  struct worker *w = arg;
  unsigned inflight;

  for (unsigned i = 0; i < qd; ++i) {
    if (issue (w, &w->slots[i]) == -1)
      goto out;
  }
  for (;;) {
    w->ndone = 0;
    if (nbd_poll (w->h, -1) == -1) {
      snprintf (w->errmsg, sizeof w->errmsg, "nbd_poll: %s",
                nbd_get_error ());
      w->err = EIO;
      goto out;
    }
    if (w->err)
      goto out;
    if (now () >= t_deadline)
      break;
    for (unsigned i = 0; i < w->ndone; ++i) {
      if (issue (w, &w->slots[w->done[i]]) == -1)
        goto out;
    }
  }
  /* Time is up: issue nothing more, collect the replies in flight. */
  for (;;) {
    inflight = 0;
    for (unsigned i = 0; i < qd; ++i)
      inflight += w->slots[i].busy;
    if (inflight == 0)
      break;
    w->ndone = 0;
    if (nbd_poll (w->h, -1) == -1) {
      snprintf (w->errmsg, sizeof w->errmsg, "nbd_poll: %s",
                nbd_get_error ());
      w->err = EIO;
      break;
    }
    if (w->err)
      break;
  }
 out:
  w->t_end = now ();
  return NULL;
}

static void __attribute__ ((noreturn))
usage (FILE *fp, int status)
{
  fprintf (fp,
           "usage: nbd-randio --uri URI --rw randread|randwrite --qd N "
           "--runtime SECONDS\n"
           "                  [--connections C] [--bs BYTES]\n");
  exit (status);
}

static struct nbd_handle *
open_handle (char *errbuf, size_t len)
{
  struct nbd_handle *h = nbd_create ();

  if (h == NULL) {
    snprintf (errbuf, len, "nbd_create: %s", nbd_get_error ());
    return NULL;
  }
  /* The URI names the certificates directory or the PSK file. */
  if (nbd_set_uri_allow_local_file (h, true) == -1 ||
      nbd_connect_uri (h, uri) == -1) {
    snprintf (errbuf, len, "%s: %s", uri, nbd_get_error ());
    nbd_close (h);
    return NULL;
  }
  return h;
}

int
main (int argc, char **argv)
{
  enum { OPT_URI = 256, OPT_RW, OPT_QD, OPT_RUNTIME, OPT_CONN, OPT_BS };
  static const struct option longopts[] = {
    { "uri", required_argument, NULL, OPT_URI },
    { "rw", required_argument, NULL, OPT_RW },
    { "qd", required_argument, NULL, OPT_QD },
    { "iodepth", required_argument, NULL, OPT_QD },
    { "runtime", required_argument, NULL, OPT_RUNTIME },
    { "connections", required_argument, NULL, OPT_CONN },
    { "bs", required_argument, NULL, OPT_BS },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  const char *rw = NULL;
  struct worker *ws;
  char errbuf[1024];
  uint64_t ios = 0;
  double lat = 0, t_end = 0, elapsed;
  bool tls = true;
  int c, status = 0;
  char *end;

  while ((c = getopt_long (argc, argv, "h", longopts, NULL)) != -1) {
    switch (c) {
    case OPT_URI: uri = optarg; break;
    case OPT_RW: rw = optarg; break;
    case OPT_QD:
      qd = strtoul (optarg, &end, 10);
      if (*end || qd < 1 || qd > 4096)
        usage (stderr, 2);
      break;
    case OPT_RUNTIME:
      runtime = strtod (optarg, &end);
      if (*end || !(runtime > 0))
        usage (stderr, 2);
      break;
    case OPT_CONN:
      nconn = strtoul (optarg, &end, 10);
      if (*end || nconn < 1 || nconn > 64)
        usage (stderr, 2);
      break;
    case OPT_BS:
      bs = strtoul (optarg, &end, 10);
      if (*end || bs < 512 || bs > (32 << 20) || (bs & (bs - 1)))
        usage (stderr, 2);
      break;
    case 'h': usage (stdout, 0);
    default: usage (stderr, 2);
    }
  }
  if (optind != argc || uri == NULL || rw == NULL)
    usage (stderr, 2);
  if (strcmp (rw, "randread") == 0)
    write_mode = false;
  else if (strcmp (rw, "randwrite") == 0)
    write_mode = true;
  else
    usage (stderr, 2);

  ws = calloc (nconn, sizeof *ws);
  if (ws == NULL) {
    perror ("calloc");
    return 1;
  }
  /* Connect everything first, so that handshakes are not timed. */
  for (unsigned i = 0; i < nconn; ++i) {
    struct worker *w = &ws[i];

    w->id = i;
    w->h = open_handle (errbuf, sizeof errbuf);
    if (w->h == NULL) {
      fprintf (stderr, "nbd-randio: %s\n", errbuf);
      return 1;
    }
    w->size = nbd_get_size (w->h);
    if (w->size < (int64_t) bs) {
      fprintf (stderr, "nbd-randio: export too small (%" PRIi64 " bytes)\n",
               w->size);
      return 1;
    }
    if (write_mode && nbd_is_read_only (w->h) == 1) {
      fprintf (stderr, "nbd-randio: export is read-only\n");
      return 1;
    }
    if (nbd_get_tls_negotiated (w->h) != 1)
      tls = false;
    w->nblocks = w->size / bs;
    w->rng = UINT64_C (0x9e3779b97f4a7c15) * (i + 1) ^ (uint64_t) time (NULL);
    if (w->rng == 0)
      w->rng = 1;
    w->slots = calloc (qd, sizeof *w->slots);
    w->done = calloc (qd, sizeof *w->done);
    if (w->slots == NULL || w->done == NULL) {
      perror ("calloc");
      return 1;
    }
    for (unsigned j = 0; j < qd; ++j) {
      struct slot *s = &w->slots[j];

      s->w = w;
      s->idx = j;
      if (posix_memalign ((void **) &s->buf, 4096, bs) != 0) {
        perror ("posix_memalign");
        return 1;
      }
      /* Data that no one can compress or skip as zeroes. */
      for (unsigned k = 0; k < bs; k += 8) {
        uint64_t x = rnd (&w->rng) | 1;
        memcpy (s->buf + k, &x, 8);
      }
    }
  }

  t_start = now ();
  t_deadline = t_start + runtime;
  for (unsigned i = 0; i < nconn; ++i) {
    if (pthread_create (&ws[i].thread, NULL, run_worker, &ws[i]) != 0) {
      perror ("pthread_create");
      return 1;
    }
  }
  for (unsigned i = 0; i < nconn; ++i) {
    struct worker *w = &ws[i];

    pthread_join (w->thread, NULL);
    if (w->err) {
      fprintf (stderr, "nbd-randio: connection %u: %s\n", i, w->errmsg);
      status = 1;
    }
    ios += w->ios;
    lat += w->lat_sum;
    if (w->t_end > t_end)
      t_end = w->t_end;
  }
  elapsed = t_end - t_start;
  for (unsigned i = 0; i < nconn; ++i) {
    /* Errors here are not the benchmark's business. */
    nbd_shutdown (ws[i].h, 0);
    nbd_close (ws[i].h);
  }
  if (status)
    return status;
  if (ios == 0) {
    fprintf (stderr, "nbd-randio: no I/O completed\n");
    return 1;
  }

  printf ("{\"rw\": \"%s\", \"bs\": %u, \"qd\": %u, \"connections\": %u, "
          "\"tls\": %s, \"export_size\": %" PRIi64 ", \"runtime_s\": %.3f, "
          "\"ios\": %" PRIu64 ", \"iops\": %.1f, \"mb_s\": %.2f, "
          "\"lat_mean_us\": %.1f}\n",
          rw, bs, qd, nconn, tls ? "true" : "false", ws[0].size, elapsed,
          ios, ios / elapsed, ios * (double) bs / elapsed / 1e6,
          lat / ios * 1e6);
  return 0;
}
