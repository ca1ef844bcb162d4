/* The fixed newstyle handshake: greeting, client flags and options.
 *
 * Each option is handled strictly in sequence.  An option whose payload
 * matters (names, info requests, meta context queries) is read whole
 * into c->optbuf, bounded by MAX_OPTION_LEN; any other option's payload
 * is dropped unread, so a lying length costs only the bytes the client
 * really sends.  Every error echoes at most 80 bytes of a client's
 * string (CVE-2020-10761).
 */
#include <config.h>

#include <assert.h>
#include <endian.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "log.h"

#define ALLOWED_CFLAGS (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)

void
hs_start (struct conn *c)
{
  struct nbd_new_handshake hs = {
    .nbdmagic = htobe64 (NBD_MAGIC),
    .version = htobe64 (NBD_NEW_VERSION),
    .gflags = htobe16 (NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES),
  };

  conn_queue_copy (c, &hs, sizeof hs);
}

/* A printable copy of a client string for messages, cut at 80 bytes. */
static void
sanitize (char *dst, size_t dstlen, const char *src, size_t len)
{
  size_t n = MIN (len, (size_t) 80), i;

  for (i = 0; i < n && i + 4 < dstlen; ++i)
    dst[i] = (src[i] >= 0x20 && src[i] < 0x7f) ? src[i] : '?';
  if (len > n && i + 4 <= dstlen) {
    memcpy (dst + i, "...", 3);
    i += 3;
  }
  dst[i] = '\0';
}

/* Queue one option reply: header plus @len bytes of @data. */
static int
send_rep (struct conn *c, uint32_t reply, const void *data, size_t len)
{
  unsigned char buf[sizeof (struct nbd_fixed_new_option_reply) + 512];
  struct nbd_fixed_new_option_reply *h = (void *) buf;
  unsigned char *big = NULL, *p = buf;
  int r;

  if (len > sizeof buf - sizeof *h) {
    big = malloc (sizeof *h + len);
    if (big == NULL) {
      conn_close (c, "out of memory");
      return -1;
    }
    p = big;
    h = (void *) big;
  }
  h->magic = htobe64 (NBD_REP_MAGIC);
  h->option = htobe32 (c->opt);
  h->reply = htobe32 (reply);
  h->replylen = htobe32 (len);
  if (len)
    memcpy (p + sizeof *h, data, len);
  r = conn_queue_copy (c, p, sizeof *h + len);
  free (big);
  return r;
}

static int send_err (struct conn *c, uint32_t reply, const char *fs, ...)
  __attribute__ ((format (printf, 3, 4)));

static int
send_err (struct conn *c, uint32_t reply, const char *fs, ...)
{
  char msg[512];
  va_list args;
  int len;

  va_start (args, fs);
  len = vsnprintf (msg, sizeof msg, fs, args);
  va_end (args);
  if (len < 0)
    len = 0;
  len = MIN (len, (int) sizeof msg - 1);
  debug ("%s: %s: %s: %s", c->peer, nbd_opt_name (c->opt),
         nbd_rep_name (reply), msg);
  return send_rep (c, reply, msg, len);
}

static int
send_ack (struct conn *c)
{
  return send_rep (c, NBD_REP_ACK, NULL, 0);
}

static void
option_done (struct conn *c)
{
  if (c->state == CS_OPTION_DATA || c->state == CS_OPTION_SKIP)
    c->state = CS_OPTION;
}

int
hs_on_cflags (struct conn *c, const unsigned char *buf)
{
  uint32_t cflags;

  memcpy (&cflags, buf, 4);
  cflags = be32toh (cflags);
  if (cflags & ~ALLOWED_CFLAGS) {
    nbdd_info ("%s: client sent unknown flags 0x%" PRIx32 ": closing",
               c->peer, cflags);
    conn_close (c, NULL);
    return -1;
  }
  c->cflags = cflags;
  c->fixed_newstyle = cflags & NBD_FLAG_C_FIXED_NEWSTYLE;
  c->no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;
  c->state = CS_OPTION;
  return 0;
}

static bool
option_needs_payload (uint32_t opt)
{
  switch (opt) {
  case NBD_OPT_EXPORT_NAME:
  case NBD_OPT_INFO:
  case NBD_OPT_GO:
  case NBD_OPT_LIST_META_CONTEXT:
  case NBD_OPT_SET_META_CONTEXT:
    return true;
  default:
    return false;
  }
}

int
hs_on_option_header (struct conn *c, const unsigned char *buf)
{
  struct nbd_new_option h;
  size_t max_options = MAX_OPTIONS_BASE +
    MAX_OPTIONS_PER_EXPORT * export_count ();

  memcpy (&h, buf, sizeof h);
  c->opt = be32toh (h.option);
  c->optlen = be32toh (h.optlen);
  if (be64toh (h.version) != NBD_NEW_VERSION) {
    nbdd_info ("%s: bad option magic: closing", c->peer);
    conn_close (c, NULL);
    return -1;
  }
  if (++c->nr_options > max_options) {
    nbdd_info ("%s: more than %zu options: closing", c->peer, max_options);
    conn_close (c, NULL);
    return -1;
  }
  if (c->optlen > MAX_OPTION_LEN) {
    nbdd_info ("%s: %s: option length %" PRIu32 " is too large: closing",
               c->peer, nbd_opt_name (c->opt), c->optlen);
    conn_close (c, NULL);
    return -1;
  }
  /* Without fixed newstyle only EXPORT_NAME exists, and there is no way
   * to answer anything else with an error.
   */
  if (!c->fixed_newstyle && c->opt != NBD_OPT_EXPORT_NAME) {
    nbdd_info ("%s: %s from a client without fixed newstyle: closing",
               c->peer, nbd_opt_name (c->opt));
    conn_close (c, NULL);
    return -1;
  }
  datapath_debug ("%s: option %s length %" PRIu32, c->peer,
                  nbd_opt_name (c->opt), c->optlen);

  /* --tls=require: before TLS only STARTTLS and ABORT; everything else
   * is refused with its payload dropped, so the stream stays in sync.
   */
  c->refuse_tls_reqd = false;
  if (config.tls == TLS_REQUIRE && !c->tls_up &&
      c->opt != NBD_OPT_STARTTLS && c->opt != NBD_OPT_ABORT) {
    if (c->opt == NBD_OPT_EXPORT_NAME) {
      nbdd_info ("%s: NBD_OPT_EXPORT_NAME without TLS: closing", c->peer);
      conn_close (c, NULL);
      return -1;
    }
    c->refuse_tls_reqd = true;
  }

  if (option_needs_payload (c->opt) && !c->refuse_tls_reqd) {
    unsigned char *nb = realloc (c->optbuf, c->optlen + 1);
    if (nb == NULL) {
      conn_close (c, "out of memory");
      return -1;
    }
    c->optbuf = nb;
    c->opt_got = 0;
    c->state = CS_OPTION_DATA;
    if (c->optlen == 0)
      return hs_on_option_data (c);
    return 0;
  }
  c->skip = c->optlen;
  c->state = CS_OPTION_SKIP;
  if (c->optlen == 0)
    hs_option_skipped (c);
  return c->dead ? -1 : 0;
}

static void
enter_transmission (struct conn *c, struct export *exp)
{
  c->exp = exp;
  export_ref (exp);
  exp->nr_clients++;
  c->mode = c->extended ? MODE_EXTENDED
    : c->structured ? MODE_STRUCTURED : MODE_SIMPLE;
  c->eflags = export_tx_flags (exp, c->structured || c->extended);
  c->state = CS_REQUEST;
  ev_timer_stop (c->loop, &c->handshake_timer);
  free (c->optbuf);
  c->optbuf = NULL;
  debug ("%s: export '%s': transmission (%s replies, flags 0x%x)",
         c->peer, exp->name,
         c->mode == MODE_EXTENDED ? "extended"
         : c->mode == MODE_STRUCTURED ? "structured" : "simple",
         c->eflags);
}

static int
handle_export_name (struct conn *c)
{
  struct nbd_export_name_reply r = { 0 };
  char name[NBD_MAX_STRING + 1], safe[100];
  struct export *exp;

  if (c->extended) {
    nbdd_info ("%s: NBD_OPT_EXPORT_NAME after extended headers: closing",
               c->peer);
    conn_close (c, NULL);
    return -1;
  }
  if (c->optlen > NBD_MAX_STRING ||
      memchr (c->optbuf, '\0', c->optlen) != NULL) {
    nbdd_info ("%s: NBD_OPT_EXPORT_NAME: invalid name: closing", c->peer);
    conn_close (c, NULL);
    return -1;
  }
  memcpy (name, c->optbuf, c->optlen);
  name[c->optlen] = '\0';
  exp = export_find (name);
  if (exp == NULL || export_access (exp, c) != EXPORT_OK) {
    /* No way to say why: an error here ends the session. */
    sanitize (safe, sizeof safe, name, c->optlen);
    nbdd_info ("%s: NBD_OPT_EXPORT_NAME: %s '%s': closing", c->peer,
               exp == NULL ? "unknown export"
               : export_access (exp, c) == EXPORT_TLS_REQUIRED
               ? "TLS required for export" : "export not allowed", safe);
    conn_close (c, NULL);
    return -1;
  }
  /* Meta contexts can't be used without structured replies, and those
   * only by name here: keep the contexts only for the same export.
   */
  if (c->meta_export && strcmp (c->meta_export, exp->name) != 0)
    c->meta_selected = 0;
  enter_transmission (c, exp);
  r.exportsize = htobe64 (root_node (&exp->root)->size);
  r.eflags = htobe16 (c->eflags);
  conn_queue_copy (c, &r, c->no_zeroes ? 10 : sizeof r);
  return 0;
}

/* Parse the name at the start of an INFO/GO/meta payload.  Returns the
 * offset after the name, or 0 with an error sent.  @min_after is the
 * least payload that must follow the name.
 */
static size_t
parse_name (struct conn *c, char *name, size_t min_after)
{
  uint32_t namelen;

  if (c->optlen < 4 + min_after) {
    send_err (c, NBD_REP_ERR_INVALID, "option too short");
    return 0;
  }
  memcpy (&namelen, c->optbuf, 4);
  namelen = be32toh (namelen);
  if (namelen > NBD_MAX_STRING) {
    send_err (c, NBD_REP_ERR_INVALID, "export name too long");
    return 0;
  }
  if ((uint64_t) 4 + namelen + min_after > c->optlen) {
    send_err (c, NBD_REP_ERR_INVALID, "export name length %" PRIu32
              " runs past the option", namelen);
    return 0;
  }
  memcpy (name, c->optbuf + 4, namelen);
  name[namelen] = '\0';
  if (strlen (name) != namelen) {
    send_err (c, NBD_REP_ERR_INVALID, "export name contains NUL");
    return 0;
  }
  return 4 + namelen;
}

static int
send_info_export (struct conn *c, struct export *exp)
{
  struct nbd_info_export ie = {
    .info = htobe16 (NBD_INFO_EXPORT),
    .exportsize = htobe64 (root_node (&exp->root)->size),
    .eflags = htobe16 (export_tx_flags (exp, c->structured || c->extended)),
  };

  return send_rep (c, NBD_REP_INFO, &ie, sizeof ie);
}

static int
send_info_string (struct conn *c, uint16_t type, const char *s)
{
  size_t len = strlen (s);
  unsigned char buf[2 + NBD_MAX_STRING];
  uint16_t t = htobe16 (type);

  len = MIN (len, (size_t) NBD_MAX_STRING);
  memcpy (buf, &t, 2);
  memcpy (buf + 2, s, len);
  return send_rep (c, NBD_REP_INFO, buf, 2 + len);
}

static int
send_info_block_size (struct conn *c, struct export *exp)
{
  uint32_t pref = MAX (root_node (&exp->root)->limits.opt_transfer, 4096u);
  struct nbd_info_block_size bs = {
    .info = htobe16 (NBD_INFO_BLOCK_SIZE),
    /* The request path does read-modify-write, so any byte is fine. */
    .minimum = htobe32 (1),
    .preferred = htobe32 (MIN (pref, MAX_PAYLOAD)),
    .maximum = htobe32 (MAX_PAYLOAD),
  };

  return send_rep (c, NBD_REP_INFO, &bs, sizeof bs);
}

static int
handle_info_go (struct conn *c)
{
  char name[NBD_MAX_STRING + 1], safe[100];
  bool want_name = false;
  struct export *exp;
  size_t pos;
  uint16_t nr;

  pos = parse_name (c, name, 2);
  if (pos == 0)
    return 0;
  memcpy (&nr, c->optbuf + pos, 2);
  nr = be16toh (nr);
  pos += 2;
  if (pos + 2 * (size_t) nr != c->optlen) {
    return send_err (c, NBD_REP_ERR_INVALID,
                     "%" PRIu16 " info requests do not match the option "
                     "length", nr);
  }
  for (uint16_t i = 0; i < nr; ++i) {
    uint16_t t;
    memcpy (&t, c->optbuf + pos + 2 * i, 2);
    switch (be16toh (t)) {
    case NBD_INFO_NAME:        want_name = true; break;
    default: break;             /* the others always go */
    }
  }

  exp = export_find (name);
  sanitize (safe, sizeof safe, name, strlen (name));
  /* Before TLS, an unknown name gets the same answer as a TLS-only
   * export, so that those cannot be found by trying names.
   */
  if ((exp && export_access (exp, c) == EXPORT_TLS_REQUIRED) ||
      (!exp && !c->tls_up && export_any_tls_only ()))
    return send_err (c, NBD_REP_ERR_TLS_REQD,
                     "export '%s' requires TLS", safe);
  if (exp == NULL || export_access (exp, c) == EXPORT_HIDDEN) {
    if (exp && tls_identity (c))
      nbdd_info ("%s: client '%s' is not allowed export '%s'", c->peer,
                 tls_identity (c), safe);
    else if (exp)
      nbdd_info ("%s: an anonymous client is not allowed export '%s'",
                 c->peer, safe);
    return send_err (c, NBD_REP_ERR_UNKNOWN, "export '%s' not found", safe);
  }

  if (send_info_export (c, exp) == -1 ||
      send_info_block_size (c, exp) == -1 ||
      (want_name && send_info_string (c, NBD_INFO_NAME, exp->name) == -1) ||
      /* Sent whether asked or not, as qemu does: it is cheap. */
      (exp->description &&
       send_info_string (c, NBD_INFO_DESCRIPTION, exp->description) == -1) ||
      send_ack (c) == -1)
    return -1;

  if (c->opt == NBD_OPT_GO) {
    /* Contexts chosen for another export do not carry over. */
    if (c->meta_export == NULL || strcmp (c->meta_export, exp->name) != 0)
      c->meta_selected = 0;
    enter_transmission (c, exp);
  }
  return 0;
}

/* One NBD_REP_META_CONTEXT: the id (0 for LIST), then the name. */
static int
send_meta_context (struct conn *c, uint32_t id, const char *name)
{
  size_t len = strlen (name);
  unsigned char buf[4 + NBD_MAX_STRING];
  uint32_t be = htobe32 (id);

  assert (len <= NBD_MAX_STRING);
  memcpy (buf, &be, 4);
  memcpy (buf + 4, name, len);
  return send_rep (c, NBD_REP_META_CONTEXT, buf, 4 + len);
}

/* LIST_META_CONTEXT and SET_META_CONTEXT share one parser.  The
 * queries are matched against the export's contexts (meta.c); what
 * matched is answered once per context, in id order, however many
 * queries named it.
 */
static int
handle_meta_context (struct conn *c)
{
  bool set = c->opt == NBD_OPT_SET_META_CONTEXT;
  char name[NBD_MAX_STRING + 1], safe[100];
  const struct meta_context *mc;
  struct export *exp;
  uint64_t sel = 0;
  uint32_t nq;
  size_t pos, nr;

  if (set) {
    /* A SET replaces the selection even when it fails. */
    c->meta_selected = 0;
    free (c->meta_export);
    c->meta_export = NULL;
    if (!c->structured && !c->extended)
      return send_err (c, NBD_REP_ERR_INVALID,
                       "structured replies not negotiated");
  }

  pos = parse_name (c, name, 4);
  if (pos == 0)
    return 0;
  memcpy (&nq, c->optbuf + pos, 4);
  nq = be32toh (nq);
  pos += 4;

  /* Check the whole payload's syntax before acting on any of it. */
  for (uint32_t i = 0, p = pos; i < nq; ++i) {
    uint32_t qlen;
    if ((uint64_t) p + 4 > c->optlen)
      return send_err (c, NBD_REP_ERR_INVALID, "query %" PRIu32
                       " runs past the option", i);
    memcpy (&qlen, c->optbuf + p, 4);
    qlen = be32toh (qlen);
    if (qlen > NBD_MAX_STRING)
      return send_err (c, NBD_REP_ERR_INVALID, "query too long");
    if ((uint64_t) p + 4 + qlen > c->optlen)
      return send_err (c, NBD_REP_ERR_INVALID, "query %" PRIu32
                       " runs past the option", i);
    p += 4 + qlen;
    if (i + 1 == nq && p != c->optlen)
      return send_err (c, NBD_REP_ERR_INVALID,
                       "trailing bytes after the queries");
  }
  if (nq == 0 && pos != c->optlen)
    return send_err (c, NBD_REP_ERR_INVALID,
                     "trailing bytes after the queries");

  exp = export_find (name);
  if (exp == NULL || export_access (exp, c) != EXPORT_OK) {
    sanitize (safe, sizeof safe, name, strlen (name));
    return send_err (c, NBD_REP_ERR_UNKNOWN, "export '%s' not found", safe);
  }

  /* LIST with no queries lists everything; SET with none selects
   * nothing.
   */
  if (nq == 0 && !set)
    sel = meta_all (exp);
  for (uint32_t i = 0, p = pos; i < nq; ++i) {
    uint32_t qlen;
    memcpy (&qlen, c->optbuf + p, 4);
    qlen = be32toh (qlen);
    sel |= meta_query (exp, (const char *) c->optbuf + p + 4, qlen, !set);
    p += 4 + qlen;
  }

  mc = meta_contexts (exp, &nr);
  for (size_t i = 0; i < nr; ++i) {
    if ((sel & (UINT64_C (1) << i)) &&
        send_meta_context (c, set ? mc[i].id : 0, mc[i].name) == -1)
      return -1;
  }
  if (set && sel) {
    c->meta_export = strdup (exp->name);
    if (c->meta_export == NULL) {
      conn_close (c, "out of memory");
      return -1;
    }
    c->meta_selected = sel;
  }
  return send_ack (c);
}

int
hs_on_option_data (struct conn *c)
{
  int r;

  switch (c->opt) {
  case NBD_OPT_EXPORT_NAME:
    return handle_export_name (c);
  case NBD_OPT_INFO:
  case NBD_OPT_GO:
    r = handle_info_go (c);
    break;
  case NBD_OPT_LIST_META_CONTEXT:
  case NBD_OPT_SET_META_CONTEXT:
    r = handle_meta_context (c);
    break;
  default:
    abort ();                   /* option_needs_payload said otherwise */
  }
  option_done (c);
  return r;
}

static void
handle_list (struct conn *c)
{
  for (size_t i = 0; i < export_count (); ++i) {
    struct export *exp = export_nth (i);
    size_t nlen, dlen;
    unsigned char *buf;
    uint32_t len;
    int r;

    if (export_access (exp, c) != EXPORT_OK)
      continue;                 /* what a client may not use, it does not see */
    nlen = strlen (exp->name);
    dlen = exp->description ? strlen (exp->description) : 0;
    buf = malloc (4 + nlen + dlen);
    len = htobe32 (nlen);

    if (buf == NULL) {
      conn_close (c, "out of memory");
      return;
    }
    memcpy (buf, &len, 4);
    memcpy (buf + 4, exp->name, nlen);
    if (dlen)
      memcpy (buf + 4 + nlen, exp->description, dlen);
    r = send_rep (c, NBD_REP_SERVER, buf, 4 + nlen + dlen);
    free (buf);
    if (r == -1)
      return;
  }
  send_ack (c);
}

/* STARTTLS: acknowledge, forget everything negotiated in plaintext,
 * and hand the socket to gnutls.
 */
static void
start_tls (struct conn *c)
{
  /* Anything after the option arrived before our ACK, in plaintext:
   * a client that waits for the ACK cannot have sent it.  Taking it
   * as TLS data, or as options, would let it be injected.
   */
  if (conn_input_buffered (c) > 0) {
    nbdd_info ("%s: data after NBD_OPT_STARTTLS, before the TLS "
               "handshake: closing", c->peer);
    conn_close (c, NULL);
    return;
  }
  if (send_ack (c) == -1)
    return;
  c->structured = c->extended = false;
  c->meta_selected = 0;
  free (c->meta_export);
  c->meta_export = NULL;
  if (tls_start (c) == -1) {
    conn_close (c, NULL);
    return;
  }
  c->state = CS_TLS_HANDSHAKE;
}

/* Options whose payload was dropped unread. */
void
hs_option_skipped (struct conn *c)
{
  bool has_data = c->optlen > 0;

  option_done (c);
  if (c->refuse_tls_reqd) {
    c->refuse_tls_reqd = false;
    send_err (c, NBD_REP_ERR_TLS_REQD, "TLS is required (STARTTLS)");
    return;
  }
  switch (c->opt) {
  case NBD_OPT_ABORT:
    /* Any payload is ignored; the client may already be gone. */
    if (send_ack (c) == 0)
      conn_drain (c);
    return;
  case NBD_OPT_LIST:
    if (has_data)
      send_err (c, NBD_REP_ERR_INVALID, "NBD_OPT_LIST with a payload");
    else
      handle_list (c);
    return;
  case NBD_OPT_STARTTLS:
    if (has_data)
      send_err (c, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS with a payload");
    else if (config.tls == TLS_OFF || c->is_stdio)
      send_err (c, NBD_REP_ERR_POLICY, "TLS is not configured");
    else if (c->tls)
      send_err (c, NBD_REP_ERR_INVALID, "TLS is already negotiated");
    else
      start_tls (c);
    return;
  case NBD_OPT_STRUCTURED_REPLY:
    if (has_data)
      send_err (c, NBD_REP_ERR_INVALID,
                "NBD_OPT_STRUCTURED_REPLY with a payload");
    else if (c->extended)
      send_err (c, NBD_REP_ERR_EXT_HEADER_REQD,
                "extended headers already negotiated");
    else if (c->structured)
      send_err (c, NBD_REP_ERR_INVALID,
                "structured replies already negotiated");
    else if (send_ack (c) == 0)
      c->structured = true;
    return;
  case NBD_OPT_EXTENDED_HEADERS:
    if (has_data)
      send_err (c, NBD_REP_ERR_INVALID,
                "NBD_OPT_EXTENDED_HEADERS with a payload");
    else if (c->extended)
      send_err (c, NBD_REP_ERR_INVALID,
                "extended headers already negotiated");
    else if (send_ack (c) == 0)
      c->extended = true;
    return;
  default:
    send_err (c, NBD_REP_ERR_UNSUP, "option %" PRIu32 " not supported",
              c->opt);
    return;
  }
}
