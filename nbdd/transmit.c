/* The transmission phase: request headers are parsed and validated
 * once, here at the edge; valid requests go to the workers, invalid
 * ones are answered at once (after their payload, if any, has been
 * consumed so the stream stays in sync).
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "log.h"

/* Flags each command accepts; FUA is valid on all of them once
 * SEND_FUA is advertised (it always is).
 */
static uint16_t
allowed_flags (const struct conn *c, uint16_t type)
{
  uint16_t f = NBD_CMD_FLAG_FUA;

  switch (type) {
  case NBD_CMD_READ:
    if (c->eflags & NBD_FLAG_SEND_DF)
      f |= NBD_CMD_FLAG_DF;
    break;
  case NBD_CMD_WRITE:
    if (c->mode == MODE_EXTENDED)
      f |= NBD_CMD_FLAG_PAYLOAD_LEN;
    break;
  case NBD_CMD_WRITE_ZEROES:
    f |= NBD_CMD_FLAG_NO_HOLE;
    if (c->eflags & NBD_FLAG_SEND_FAST_ZERO)
      f |= NBD_CMD_FLAG_FAST_ZERO;
    break;
  case NBD_CMD_BLOCK_STATUS:
    f |= NBD_CMD_FLAG_REQ_ONE;
    break;
  default:
    break;
  }
  return f;
}

/* The fields of a request header that validation looks at. */
struct cmd {
  uint16_t type;
  uint16_t flags;
  uint64_t offset;
  uint64_t count;
};

static bool
in_range (const struct conn *c, uint64_t offset, uint64_t count)
{
  uint64_t size = root_node (&c->exp->root)->size;

  return offset <= size && count <= size - offset;
}

/* Validate a request.  Returns NBD_SUCCESS or the error to reply with,
 * and sets *msg.
 */
static uint32_t
validate (const struct conn *c, const struct cmd *cmd, const char **msg)
{
  bool writable = !(c->eflags & NBD_FLAG_READ_ONLY);

  if (cmd->flags & ~allowed_flags (c, cmd->type)) {
    *msg = "invalid flags for this command";
    return NBD_EINVAL;
  }
  switch (cmd->type) {
  case NBD_CMD_READ:
  case NBD_CMD_WRITE:
    if (cmd->count > MAX_PAYLOAD) {
      *msg = "request larger than the maximum payload";
      return NBD_EINVAL;
    }
    if (cmd->type == NBD_CMD_WRITE && !writable) {
      *msg = "export is read-only";
      return NBD_EPERM;
    }
    if (!in_range (c, cmd->offset, cmd->count)) {
      *msg = "request past the end of the export";
      return cmd->type == NBD_CMD_WRITE ? NBD_ENOSPC : NBD_EINVAL;
    }
    return NBD_SUCCESS;
  case NBD_CMD_FLUSH:
    if (cmd->offset != 0 || cmd->count != 0) {
      *msg = "flush offset and length must be 0";
      return NBD_EINVAL;
    }
    return NBD_SUCCESS;
  case NBD_CMD_TRIM:
  case NBD_CMD_WRITE_ZEROES:
    if (!writable) {
      *msg = "export is read-only";
      return NBD_EPERM;
    }
    if (!in_range (c, cmd->offset, cmd->count)) {
      *msg = "request past the end of the export";
      return cmd->type == NBD_CMD_TRIM ? NBD_EINVAL : NBD_ENOSPC;
    }
    return NBD_SUCCESS;
  case NBD_CMD_CACHE:
    if (!in_range (c, cmd->offset, cmd->count)) {
      *msg = "request past the end of the export";
      return NBD_EINVAL;
    }
    return NBD_SUCCESS;
  case NBD_CMD_BLOCK_STATUS:
    if (c->mode == MODE_SIMPLE || c->meta_selected == 0) {
      *msg = "no meta context negotiated";
      return NBD_EINVAL;
    }
    if (cmd->count == 0) {
      *msg = "block status of length 0";
      return NBD_EINVAL;
    }
    if (!in_range (c, cmd->offset, cmd->count)) {
      *msg = "request past the end of the export";
      return NBD_EINVAL;
    }
    return NBD_SUCCESS;
  default:
    *msg = "unknown command";
    return NBD_EINVAL;
  }
}

static bool
changes_data (uint16_t type)
{
  return type == NBD_CMD_WRITE || type == NBD_CMD_WRITE_ZEROES ||
    type == NBD_CMD_TRIM;
}

static void
submit (struct conn *c, struct request *req)
{
  if (changes_data (req->type))
    c->writes_in_flight++;
  workers_submit (req);
}

void
tx_request_completed (struct conn *c, struct request *req)
{
  if (req->nbd_err == NBD_SUCCESS && changes_data (req->type))
    c->writes_in_flight--;
  if (req->nbd_err == NBD_SUCCESS && req->err < 0)
    c->exp->stats.failed_ops++;
}

/* Statistics for query-stats and query-connections (main thread). */
static void
account (struct conn *c, const struct request *req)
{
  struct export_stats *st = &c->exp->stats;

  if (req->nbd_err != NBD_SUCCESS) {
    st->failed_ops++;
    return;
  }
  switch (req->type) {
  case NBD_CMD_READ:
    st->rd_ops++;
    st->rd_bytes += req->count;
    c->bytes_read += req->count;
    break;
  case NBD_CMD_WRITE:
    st->wr_ops++;
    st->wr_bytes += req->count;
    c->bytes_written += req->count;
    break;
  case NBD_CMD_FLUSH:
    st->flush_ops++;
    break;
  case NBD_CMD_WRITE_ZEROES:
    st->zero_ops++;
    break;
  case NBD_CMD_TRIM:
    st->discard_ops++;
    break;
  }
}

/* Bytes of payload that follow this header on the wire. */
static uint64_t
payload_length (const struct conn *c, const struct cmd *cmd)
{
  if (c->mode == MODE_EXTENDED)
    return (cmd->flags & NBD_CMD_FLAG_PAYLOAD_LEN) ||
      cmd->type == NBD_CMD_WRITE ? cmd->count : 0;
  return cmd->type == NBD_CMD_WRITE ? cmd->count : 0;
}

/* A read on the loop thread: only if it cannot block, which includes
 * waiting for a drain.
 */
static bool
read_inline (struct conn *c, void *buf, uint64_t count, uint64_t offset)
{
  struct node *node = root_io_try_begin (&c->exp->root);
  int r;

  if (node == NULL)
    return false;
  r = node_pread_nowait (node, buf, count, offset);
  root_io_end (&c->exp->root);
  return r == 0;
}

int
tx_on_request_header (struct conn *c, const unsigned char *buf)
{
  uint16_t flags, type;
  uint64_t cookie, offset, count, payload;
  uint32_t magic;
  struct request *req;
  const char *msg = NULL;
  uint32_t err;

  if (c->mode == MODE_EXTENDED) {
    struct nbd_extended_request h;
    memcpy (&h, buf, sizeof h);
    magic = be32toh (h.magic);
    flags = be16toh (h.flags);
    type = be16toh (h.type);
    cookie = h.cookie;          /* opaque: echoed as received */
    offset = be64toh (h.offset);
    count = be64toh (h.count);
    if (magic != NBD_EXTENDED_REQUEST_MAGIC)
      goto bad_magic;
  }
  else {
    struct nbd_request h;
    memcpy (&h, buf, sizeof h);
    magic = be32toh (h.magic);
    flags = be16toh (h.flags);
    type = be16toh (h.type);
    cookie = h.cookie;
    offset = be64toh (h.offset);
    count = be32toh (h.count);
    if (magic != NBD_REQUEST_MAGIC)
      goto bad_magic;
  }

  c->nr_requests++;
  datapath_debug ("%s: %s flags 0x%x offset %" PRIu64 " count %" PRIu64,
                  c->peer, nbd_cmd_name (type), flags, offset, count);

  if (type == NBD_CMD_DISC) {
    debug ("%s: client sent NBD_CMD_DISC", c->peer);
    conn_drain (c);
    return 0;
  }

  /* Payload bytes must be consumed whatever happens to the request. */
  payload = 0;
  {
    struct cmd cmd = { .type = type, .flags = flags, .offset = offset,
                       .count = count };
    payload = payload_length (c, &cmd);
    err = validate (c, &cmd, &msg);
    if (err == NBD_SUCCESS && payload > 0 && type != NBD_CMD_WRITE) {
      err = NBD_EINVAL;
      msg = "unexpected payload";
    }
  }
  if (payload > MAX_SKIP_PAYLOAD) {
    nbdd_info ("%s: %s: payload of %" PRIu64 " bytes is too large: closing",
               c->peer, nbd_cmd_name (type), payload);
    conn_close (c, NULL);
    return -1;
  }

  /* READ needs room for the data, WRITE for its payload. */
  req = conn_request_get (c, err != NBD_SUCCESS ? 0
                          : type == NBD_CMD_READ ? count : payload);
  if (req == NULL) {
    conn_close (c, "out of memory");
    return -1;
  }
  /* Block status builds its reply on the worker: count the worst case
   * (extents, and descriptors for every selected context) against the
   * in-flight budget now.
   */
  if (type == NBD_CMD_BLOCK_STATUS && err == NBD_SUCCESS) {
    uint64_t nctx = __builtin_popcountll (c->meta_selected);
    conn_request_charge (c, req, (flags & NBD_CMD_FLAG_REQ_ONE) ? 64 * nctx
                         : MAX_EXTENTS * (sizeof (struct extent) + nctx *
                                          sizeof (struct nbd_block_descriptor_ext)));
  }
  req->type = type;
  req->flags = flags;
  req->cookie = cookie;
  req->offset = offset;
  req->count = count;
  if (type == NBD_CMD_READ && err == NBD_SUCCESS && c->tls_up)
    conn_read_ahead (c, req);
  req->nbd_err = err;
  req->errmsg = msg;
  account (c, req);

  if (err != NBD_SUCCESS) {
    datapath_debug ("%s: %s: %s", c->peer, nbd_cmd_name (type), msg);
    if (payload > 0) {
      c->cur = req;
      c->skip = payload;
      c->state = CS_PAYLOAD_SKIP;
      return 0;
    }
    request_reply_now (c, req);
    conn_update_reading (c);
    return 0;
  }
  if (type == NBD_CMD_WRITE && count > 0) {
    c->cur = req;
    c->state = CS_PAYLOAD;
    return 0;
  }
  /* A small read whose data is in the page cache is served right here:
   * two thread hand-offs cost more than the copy.  It cannot block.
   * Not while this client has writes queued: a read must not overtake
   * them, which the workers' FIFO would not do either.
   */
  if (type == NBD_CMD_READ && count <= MAX_INLINE_READ &&
      c->writes_in_flight == 0 && c->inline_bytes < MAX_INLINE_PER_EVENT &&
      read_inline (c, req->buf, count, offset)) {
    c->inline_bytes += count;
    request_reply_now (c, req);
    conn_update_reading (c);
    return 0;
  }
  submit (c, req);
  conn_update_reading (c);
  return 0;

 bad_magic:
  nbdd_info ("%s: bad request magic 0x%08" PRIx32 ": closing", c->peer,
             magic);
  conn_close (c, NULL);
  return -1;
}

void
tx_on_payload_done (struct conn *c)
{
  struct request *req = c->cur;

  c->cur = NULL;
  c->state = CS_REQUEST;
  submit (c, req);
  conn_update_reading (c);
}

void
tx_on_payload_skipped (struct conn *c)
{
  struct request *req = c->cur;

  c->cur = NULL;
  c->state = CS_REQUEST;
  request_reply_now (c, req);
  conn_update_reading (c);
}

/* In structured mode a READ answers zeroes with hole chunks, found by
 * looking at the data.  Spliced data cannot be looked at, so it is
 * spliced only where the node says the whole range is data.
 */
static bool
splice_allowed (struct request *req, struct node *node)
{
  struct extent_list *el = &req->extents;

  if (req->conn->mode == MODE_SIMPLE || (req->flags & NBD_CMD_FLAG_DF) ||
      !node->has_block_status)
    return true;
  extents_reset (el, req->offset);
  el->max = 1;
  return node_block_status (node, req->count, el) == 0 && el->len > 0 &&
    el->v[0].length >= req->count && !(el->v[0].flags & EXTENT_ZERO);
}

/* Worker thread: a large READ straight from the page cache into the
 * socket, the data never copied by us.  False if the request was left
 * untouched for node_pread.
 */
static bool
read_spliced (struct request *req, struct node *node)
{
  struct splice_pipe *p;
  int r;

  if (req->count < MIN_SPLICE_READ || req->count > SPLICE_PIPE_SIZE ||
      req->conn->is_stdio || req->conn->tls_up || !splice_allowed (req, node) ||
      (p = pipe_get ()) == NULL)
    return false;
  r = node_read_splice (node, p->wr, SPLICE_PIPE_SIZE, req->count,
                        req->offset);
  if (r < 0) {
    /* node_pread reads it again, and reports any error; a pipe left
     * holding part of the data is closed, not pooled.
     */
    pipe_put (p);
    return false;
  }
  req->err = 0;
  req->spliced = true;
  req->out.pipe = p;
  reply_encode (req);
  conn_send_spliced (req);
  return true;
}

/* Worker thread: one status chunk per selected context, in id order
 * (the order of the export's table).  Any context failing fails the
 * whole request, with one error chunk and none of the others: a reply
 * cannot go on after an error chunk, which ends it.
 */
static int
block_status (struct request *req, struct node *node)
{
  struct conn *c = req->conn;
  size_t nr;
  const struct meta_context *mc = meta_contexts (c->exp, &nr);

  reply_status_reset (req);
  for (size_t i = 0; i < nr; ++i) {
    int r;

    if (!(c->meta_selected & (UINT64_C (1) << i)))
      continue;
    extents_reset (&req->extents, req->offset);
    req->extents.max = (req->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : MAX_EXTENTS;
    r = mc[i].extents (&mc[i], node, req->count, &req->extents);
    if (r == 0)
      r = reply_status_add (req, mc[i].id, &req->extents);
    if (r < 0)
      return r;
  }
  return 0;
}

/* Worker thread: the I/O of one request, then its reply encoding. */
static void
request_io (struct request *req, struct node *node)
{
  unsigned fua = (req->flags & NBD_CMD_FLAG_FUA) ? NODE_FUA : 0;
  int r = 0;

  switch (req->type) {
  case NBD_CMD_READ:
    if (read_spliced (req, node))
      return;
    r = node_pread (node, req->buf, req->count, req->offset, 0);
    /* FUA on a read asks nothing of us once the read is done. */
    break;
  case NBD_CMD_WRITE:
    r = node_pwrite (node, req->buf, req->count, req->offset, fua);
    break;
  case NBD_CMD_FLUSH:
    r = node_flush (node);
    break;
  case NBD_CMD_TRIM:
    r = node_discard (node, req->count, req->offset, fua);
    break;
  case NBD_CMD_WRITE_ZEROES: {
    unsigned f = fua;
    if (!(req->flags & NBD_CMD_FLAG_NO_HOLE))
      f |= NODE_MAY_TRIM;
    if (req->flags & NBD_CMD_FLAG_FAST_ZERO)
      f |= NODE_FAST_ZERO;
    r = node_zero (node, req->count, req->offset, f);
    break;
  }
  case NBD_CMD_CACHE:
    r = node_cache (node, req->count, req->offset);
    break;
  case NBD_CMD_BLOCK_STATUS:
    r = block_status (req, node);
    break;
  default:
    r = -EINVAL;
    break;
  }
  req->err = r;
  reply_encode (req);
}

void
request_run (struct request *req)
{
  struct node_root *root = &req->conn->exp->root;

  request_io (req, root_io_begin (root));
  root_io_end (root);
}
