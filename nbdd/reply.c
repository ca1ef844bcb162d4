/* Reply encoding: simple replies, structured chunks and extended
 * chunks.  Runs on the worker thread that did the request's I/O (or on
 * the main thread for requests refused at validation), and only fills
 * the request's own iovec and header storage: no locks, no copies of
 * read data, which is sent from the request buffer or, for a spliced
 * READ, from its pipe.
 *
 * READ replies in structured and extended mode are sparse: runs of
 * zeroes become OFFSET_HOLE chunks, so a client copying a sparse disk
 * neither receives nor writes them.  With DF they are one OFFSET_DATA,
 * and so is a spliced READ, which is only done for ranges the node
 * reports as data.
 */
#include <config.h>

#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* The only errno → NBD error conversion in the program. */
static uint32_t
nbd_errno (int err, uint16_t flags)
{
  switch (err) {
  case 0:                   return NBD_SUCCESS;
  case EROFS: case EPERM:   return NBD_EPERM;
  case EIO:                 return NBD_EIO;
  case ENOMEM:              return NBD_ENOMEM;
  case EDQUOT: case EFBIG:
  case ENOSPC:              return NBD_ENOSPC;
  case ESHUTDOWN:           return NBD_ESHUTDOWN;
  case ENOTSUP:
#if ENOTSUP != EOPNOTSUPP
  case EOPNOTSUPP:
#endif
    return (flags & NBD_CMD_FLAG_FAST_ZERO) ? NBD_ENOTSUP : NBD_EINVAL;
  default:                  return NBD_EINVAL;
  }
}

struct enc {
  struct request *req;
  size_t hpos;                  /* bytes used in req->hdr */
};

static void
add_iov (struct request *req, void *base, size_t len)
{
  req->iov[req->out.niov].iov_base = base;
  req->iov[req->out.niov].iov_len = len;
  req->out.niov++;
}

/* READ data: from the request buffer, or spliced from its pipe after
 * the header iovecs.
 */
static void
add_data (struct request *req, uint64_t off, size_t len)
{
  if (req->spliced)
    req->out.pipe_left += len;
  else if (len > 0)             /* a 0-byte READ may have no buffer */
    add_iov (req, (char *) req->buf + off, len);
}

static void *
hdr_alloc (struct enc *e, size_t len)
{
  void *p = e->req->hdr + e->hpos;

  e->hpos += len;
  return p;
}

static void
simple_reply (struct enc *e, uint32_t error)
{
  struct nbd_simple_reply *h = hdr_alloc (e, sizeof *h);

  h->magic = htobe32 (NBD_SIMPLE_REPLY_MAGIC);
  h->error = htobe32 (error);
  h->cookie = e->req->cookie;
}

/* Write a chunk header in structured or extended form at @dst; the
 * caller adds the payload.  Returns the header's size.
 */
static size_t
put_chunk_header (const struct request *req, void *dst, uint16_t flags,
                  uint16_t type, uint64_t length)
{
  if (req->conn->mode == MODE_EXTENDED) {
    struct nbd_extended_reply h = {
      .magic = htobe32 (NBD_EXTENDED_REPLY_MAGIC),
      .flags = htobe16 (flags),
      .type = htobe16 (type),
      .cookie = req->cookie,
      .offset = htobe64 (req->offset),
      .length = htobe64 (length),
    };
    memcpy (dst, &h, sizeof h);
    return sizeof h;
  }
  else {
    struct nbd_structured_reply h = {
      .magic = htobe32 (NBD_STRUCTURED_REPLY_MAGIC),
      .flags = htobe16 (flags),
      .type = htobe16 (type),
      .cookie = req->cookie,
      .length = htobe32 (length),
    };
    memcpy (dst, &h, sizeof h);
    return sizeof h;
  }
}

/* A chunk header in req->hdr. */
static void
chunk_header (struct enc *e, uint16_t flags, uint16_t type,
              uint64_t length)
{
  e->hpos += put_chunk_header (e->req, e->req->hdr + e->hpos, flags, type,
                               length);
}

static void
error_reply (struct enc *e, uint32_t error, const char *msg)
{
  struct request *req = e->req;
  unsigned char *start = req->hdr + e->hpos;
  struct nbd_chunk_error *ce;
  size_t len;

  if (req->conn->mode == MODE_SIMPLE) {
    simple_reply (e, error);
    add_iov (req, start, e->hpos - (start - req->hdr));
    return;
  }
  len = MIN (strlen (msg), (size_t) 200);
  chunk_header (e, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
                sizeof *ce + len);
  ce = hdr_alloc (e, sizeof *ce);
  ce->error = htobe32 (error);
  ce->len = htobe16 (len);
  memcpy (hdr_alloc (e, len), msg, len);
  add_iov (req, start, e->hpos - (start - req->hdr));
}

static void
data_chunk (struct enc *e, uint16_t flags, uint64_t off, uint64_t len)
{
  struct request *req = e->req;
  unsigned char *start = req->hdr + e->hpos;
  uint64_t o = htobe64 (req->offset + off);

  chunk_header (e, flags, NBD_REPLY_TYPE_OFFSET_DATA, 8 + len);
  memcpy (hdr_alloc (e, 8), &o, 8);
  add_iov (req, start, e->hpos - (start - req->hdr));
  add_data (req, off, len);
}

static void
hole_chunk (struct enc *e, uint16_t flags, uint64_t off, uint64_t len)
{
  struct request *req = e->req;
  unsigned char *start = req->hdr + e->hpos;
  struct nbd_chunk_offset_hole *h;

  chunk_header (e, flags, NBD_REPLY_TYPE_OFFSET_HOLE, sizeof *h);
  h = hdr_alloc (e, sizeof *h);
  h->offset = htobe64 (req->offset + off);
  h->length = htobe32 (len);
  add_iov (req, start, e->hpos - (start - req->hdr));
}

/* Split a successful READ into data and hole chunks. */
static void
read_chunks (struct enc *e)
{
  struct request *req = e->req;
  uint64_t count = req->count;
  uint64_t seg, off, run_start;
  bool run_zero;

  if (count == 0) {
    unsigned char *start = req->hdr + e->hpos;
    chunk_header (e, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
    add_iov (req, start, e->hpos - (start - req->hdr));
    return;
  }
  if ((req->flags & NBD_CMD_FLAG_DF) || req->spliced) {
    data_chunk (e, NBD_REPLY_FLAG_DONE, 0, count);
    return;
  }
  if (count < 8192) {
    if (is_zero (req->buf, count))
      hole_chunk (e, NBD_REPLY_FLAG_DONE, 0, count);
    else
      data_chunk (e, NBD_REPLY_FLAG_DONE, 0, count);
    return;
  }

  /* Segments of at least 4 KiB, at most MAX_READ_CHUNKS of them. */
  seg = MAX ((uint64_t) 4096,
             ROUND_UP ((count + MAX_READ_CHUNKS - 1) / MAX_READ_CHUNKS,
                       (uint64_t) 4096));
  run_start = 0;
  run_zero = is_zero (req->buf, MIN (seg, count));
  for (off = seg; off < count; off += seg) {
    bool z = is_zero ((char *) req->buf + off, MIN (seg, count - off));
    if (z != run_zero) {
      if (run_zero)
        hole_chunk (e, 0, run_start, off - run_start);
      else
        data_chunk (e, 0, run_start, off - run_start);
      run_start = off;
      run_zero = z;
    }
  }
  if (run_zero)
    hole_chunk (e, NBD_REPLY_FLAG_DONE, run_start, count - run_start);
  else
    data_chunk (e, NBD_REPLY_FLAG_DONE, run_start, count - run_start);
}

void
reply_status_reset (struct request *req)
{
  req->status_len = req->status_last = 0;
}

/* Grow req->buf to @need bytes, keeping its first @keep bytes and its
 * alignment (the buffer is reused for O_DIRECT reads).
 */
static int
grow_buf (struct request *req, size_t need, size_t keep)
{
  size_t cap;
  void *nb;

  if (need <= req->buf_cap)
    return 0;
  cap = MAX (ROUND_UP (need, (size_t) 4096), 2 * req->buf_cap);
  if (posix_memalign (&nb, 4096, cap) != 0)
    return -ENOMEM;
  if (keep)
    memcpy (nb, req->buf, keep);
  free (req->buf);
  req->buf = nb;
  req->buf_cap = cap;
  return 0;
}

int
reply_status_add (struct request *req, uint32_t id,
                  const struct extent_list *el)
{
  bool ext = req->conn->mode == MODE_EXTENDED;
  size_t dsize = ext ? 16 : 8, hsize = ext ? 8 : 4;
  size_t chdr = ext ? sizeof (struct nbd_extended_reply)
    : sizeof (struct nbd_structured_reply);
  size_t start = req->status_len, n = 0;
  uint64_t left = req->count;
  unsigned char *p;
  uint32_t be;

  if (grow_buf (req, start + chdr + hsize + el->len * dsize, start) < 0)
    return -ENOMEM;

  /* Descriptors are clipped to the request: none is empty, and the sum
   * never passes the requested length.
   */
  p = (unsigned char *) req->buf + start + chdr + hsize;
  for (size_t i = 0; i < el->len && left > 0; ++i, ++n) {
    uint64_t len = MIN (el->v[i].length, left);
    if (ext) {
      struct nbd_block_descriptor_ext d = {
        .length = htobe64 (len), .status_flags = htobe64 (el->v[i].flags),
      };
      memcpy (p, &d, sizeof d);
    }
    else {
      struct nbd_block_descriptor d = {
        .length = htobe32 (len), .status_flags = htobe32 (el->v[i].flags),
      };
      memcpy (p, &d, sizeof d);
    }
    p += dsize;
    left -= len;
  }
  /* The spec wants at least one descriptor; only a driver that broke
   * its contract (node_block_status never does) gets here without.
   */
  if (n == 0)
    return -EIO;

  p = (unsigned char *) req->buf + start;
  put_chunk_header (req, p, 0,
                    ext ? NBD_REPLY_TYPE_BLOCK_STATUS_EXT
                    : NBD_REPLY_TYPE_BLOCK_STATUS,
                    hsize + n * dsize);
  be = htobe32 (id);
  memcpy (p + chdr, &be, 4);
  if (ext) {
    be = htobe32 (n);
    memcpy (p + chdr + 4, &be, 4);
  }
  req->status_last = start;
  req->status_len = start + chdr + hsize + n * dsize;
  return 0;
}

/* The status chunks built by reply_status_add go out as they are, the
 * last one marked DONE: its flags follow the magic in both header
 * forms.
 */
static void
status_reply (struct enc *e)
{
  struct request *req = e->req;
  unsigned char *last = (unsigned char *) req->buf + req->status_last;
  uint16_t flags = htobe16 (NBD_REPLY_FLAG_DONE);

  assert (req->status_len > 0);
  memcpy (last + 4, &flags, 2);
  add_iov (req, req->buf, req->status_len);
}

void
reply_encode (struct request *req)
{
  struct enc e = { .req = req, .hpos = 0 };
  enum reply_mode mode = req->conn->mode;
  uint32_t error = req->nbd_err;
  const char *msg = req->errmsg;
  char errbuf[128];

  req->out.niov = 0;
  req->out.pos = 0;
  req->out.pipe_left = 0;

  if (error == NBD_SUCCESS && req->err < 0) {
    error = nbd_errno (-req->err, req->flags);
    msg = strerror_r (-req->err, errbuf, sizeof errbuf);
  }
  if (error != NBD_SUCCESS) {
    req->out.niov = 0;
    e.hpos = 0;
    error_reply (&e, error, msg ? msg : "error");
    return;
  }

  switch (req->type) {
  case NBD_CMD_READ:
    if (mode == MODE_SIMPLE) {
      simple_reply (&e, NBD_SUCCESS);
      add_iov (req, req->hdr, e.hpos);
      add_data (req, 0, req->count);
    }
    else
      read_chunks (&e);
    return;
  case NBD_CMD_BLOCK_STATUS:
    status_reply (&e);
    return;
  default:
    if (mode == MODE_EXTENDED)
      chunk_header (&e, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
    else
      simple_reply (&e, NBD_SUCCESS);
    add_iov (req, req->hdr, e.hpos);
    return;
  }
}
