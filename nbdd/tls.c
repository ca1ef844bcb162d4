/* TLS with gnutls: credentials, their reload, and each connection's
 * session.
 *
 * A session encrypts into the connection's output path through a push
 * function: records go straight to the socket when nothing is queued
 * there, and into the connection's queue otherwise, so replies keep
 * their order and a slow client never blocks a thread.  Decryption
 * reads the socket through a small read-ahead buffer, only after
 * STARTTLS has been acknowledged with nothing else buffered (no
 * plaintext is ever taken for TLS data).
 *
 * Every call into a session is made with the connection's send_lock
 * held, from whichever thread: gnutls then never sees two threads at
 * once on one session.
 *
 * Credentials are reference counted: a reload (SIGHUP) builds a new
 * set for new connections while sessions in progress keep theirs.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "internal.h"
#include "log.h"

struct psk_key {
  char *user;
  unsigned char *key;
  size_t len;
};

struct tls_creds {
  unsigned refs;                        /* main thread only */
  gnutls_certificate_credentials_t x509;
  gnutls_psk_server_credentials_t psk;
  /* The PSK file as it was when loaded: gnutls would re-read it at
   * every handshake, so a broken edit would lock everyone out before
   * any reload, and a reload could not keep the old keys.
   */
  struct psk_key *keys;
  size_t nr_keys;
};

#define MAX_PSK_FILE (1u << 20)
#define MIN_PSK_BYTES 16u               /* psktool makes 32 */

/* Ciphertext read ahead from the socket: gnutls asks for a record's
 * header and then its body, two reads where one will do.
 */
#define READ_AHEAD (32u << 10)

struct tls_session {
  gnutls_session_t s;
  struct tls_creds *creds;
  char *identity;                       /* NULL: anonymous */
  unsigned char *rbuf;                  /* READ_AHEAD bytes */
  size_t rstart, rend;
  bool socket_empty;                    /* the last recv came back short */
};

static struct tls_creds *current;
static gnutls_priority_t priority;

/* Only a certificate made for TLS clients names a client (not, say,
 * another server's, from the same CA).
 */
static gnutls_typed_vdata_st client_purpose = {
  .type = GNUTLS_DT_KEY_PURPOSE_OID,
  .data = (unsigned char *) GNUTLS_KP_TLS_WWW_CLIENT,
};


static void
creds_unref (struct tls_creds *cr)
{
  if (cr == NULL || --cr->refs > 0)
    return;
  if (cr->x509)
    gnutls_certificate_free_credentials (cr->x509);
  if (cr->psk)
    gnutls_psk_free_server_credentials (cr->psk);
  for (size_t i = 0; i < cr->nr_keys; ++i) {
    free (cr->keys[i].user);
    if (cr->keys[i].key)
      gnutls_memset (cr->keys[i].key, 0, cr->keys[i].len);
    free (cr->keys[i].key);
  }
  free (cr->keys);
  free (cr);
}

static bool
file_exists (const char *path)
{
  struct stat st;

  return stat (path, &st) == 0;
}

static int
load_x509 (struct tls_creds *cr, const char *dir, struct error **errp)
{
  char ca[PATH_MAX], crl[PATH_MAX], cert[PATH_MAX], key[PATH_MAX];
  int r;

  snprintf (ca, sizeof ca, "%s/ca-cert.pem", dir);
  snprintf (crl, sizeof crl, "%s/ca-crl.pem", dir);
  snprintf (cert, sizeof cert, "%s/server-cert.pem", dir);
  snprintf (key, sizeof key, "%s/server-key.pem", dir);

  r = gnutls_certificate_allocate_credentials (&cr->x509);
  if (r < 0)
    goto gnutls_err;
  /* The CA is needed only to check client certificates. */
  if (file_exists (ca)) {
    r = gnutls_certificate_set_x509_trust_file (cr->x509, ca,
                                                GNUTLS_X509_FMT_PEM);
    if (r < 0) {
      error_setg (errp, "%s: %s", ca, gnutls_strerror (r));
      return -1;
    }
  }
  else if (config.tls_verify_peer) {
    error_setg (errp, "%s: needed by --tls-verify-peer, but missing", ca);
    return -1;
  }
  if (file_exists (crl)) {
    r = gnutls_certificate_set_x509_crl_file (cr->x509, crl,
                                              GNUTLS_X509_FMT_PEM);
    if (r < 0) {
      error_setg (errp, "%s: %s", crl, gnutls_strerror (r));
      return -1;
    }
  }
  r = gnutls_certificate_set_x509_key_file (cr->x509, cert, key,
                                            GNUTLS_X509_FMT_PEM);
  if (r < 0) {
    error_setg (errp, "%s, %s: %s", cert, key, gnutls_strerror (r));
    return -1;
  }
  return 0;

 gnutls_err:
  error_setg (errp, "X.509 credentials: %s", gnutls_strerror (r));
  return -1;
}

static int
hexval (int ch)
{
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
  return -1;
}

/* One "username:hexkey" line into cr->keys. */
static int
add_psk_line (struct tls_creds *cr, const char *line, size_t len,
              const char *file, unsigned lineno, struct error **errp)
{
  const char *colon = memchr (line, ':', len);
  size_t ulen, hlen;
  struct psk_key *nk, *k;

  if (colon == NULL || colon == line) {
    error_setg (errp, "%s:%u: expected username:hexkey", file, lineno);
    return -1;
  }
  ulen = colon - line;
  hlen = len - ulen - 1;
  /* '=' would let a username pass for a certificate subject in
   * tls-allow lists.
   */
  if (memchr (line, '\0', ulen) || memchr (line, '=', ulen)) {
    error_setg (errp, "%s:%u: a username cannot contain '=' or NUL", file,
                lineno);
    return -1;
  }
  if (hlen % 2 != 0 || hlen < 2 * MIN_PSK_BYTES) {
    error_setg (errp, "%s:%u: the key must be at least %u bytes, in hex "
                "digits", file, lineno, MIN_PSK_BYTES);
    return -1;
  }
  for (size_t i = 0; i < cr->nr_keys; ++i)
    if (strlen (cr->keys[i].user) == ulen &&
        memcmp (cr->keys[i].user, line, ulen) == 0) {
      error_setg (errp, "%s:%u: user '%.*s' is there twice", file, lineno,
                  (int) MIN (ulen, (size_t) 80), line);
      return -1;
    }
  nk = realloc (cr->keys, (cr->nr_keys + 1) * sizeof *nk);
  if (nk == NULL)
    goto nomem;
  cr->keys = nk;
  k = &cr->keys[cr->nr_keys];
  k->user = strndup (line, ulen);
  k->key = malloc (hlen / 2);
  k->len = hlen / 2;
  cr->nr_keys++;
  if (k->user == NULL || k->key == NULL)
    goto nomem;
  for (size_t i = 0; i < hlen / 2; ++i) {
    int hi = hexval ((unsigned char) colon[1 + 2 * i]);
    int lo = hexval ((unsigned char) colon[2 + 2 * i]);
    if (hi < 0 || lo < 0) {
      error_setg (errp, "%s:%u: the key must be hex digits", file, lineno);
      return -1;
    }
    k->key[i] = hi << 4 | lo;
  }
  return 0;

 nomem:
  error_setg_errno (errp, ENOMEM, "%s", file);
  return -1;
}

static int
psk_lookup (gnutls_session_t s, const char *user, gnutls_datum_t *key)
{
  struct tls_creds *cr = gnutls_session_get_ptr (s);

  for (size_t i = 0; i < cr->nr_keys; ++i)
    if (strcmp (cr->keys[i].user, user) == 0) {
      key->data = gnutls_malloc (cr->keys[i].len);
      if (key->data == NULL)
        return -1;
      memcpy (key->data, cr->keys[i].key, cr->keys[i].len);
      key->size = cr->keys[i].len;
      return 0;
    }
  /* An unknown user gets a random key, so the handshake fails just as
   * for a wrong key and usernames cannot be probed.
   */
  key->data = gnutls_malloc (32);
  if (key->data == NULL)
    return -1;
  key->size = 32;
  gnutls_rnd (GNUTLS_RND_NONCE, key->data, 32);
  return 0;
}

static int
load_psk (struct tls_creds *cr, const char *file, struct error **errp)
{
  char *buf = NULL;
  size_t len = 0, pos = 0;
  unsigned lineno = 0;
  FILE *fp;
  int r = -1;

  fp = fopen (file, "re");
  if (fp == NULL) {
    error_setg_errno (errp, errno, "%s", file);
    return -1;
  }
  buf = malloc (MAX_PSK_FILE + 1);
  if (buf == NULL) {
    error_setg_errno (errp, ENOMEM, "%s", file);
    goto out;
  }
  len = fread (buf, 1, MAX_PSK_FILE + 1, fp);
  if (ferror (fp) || len > MAX_PSK_FILE) {
    error_setg (errp, "%s: %s", file,
                ferror (fp) ? "read error" : "larger than 1 MiB");
    goto out;
  }
  while (pos < len) {
    char *nl = memchr (buf + pos, '\n', len - pos);
    size_t end = nl ? (size_t) (nl - buf) : len;
    size_t l = end - pos;
    lineno++;
    if (l > 0 && buf[pos + l - 1] == '\r')
      l--;
    if (l > 0 && add_psk_line (cr, buf + pos, l, file, lineno, errp) == -1)
      goto out;
    pos = end + 1;
  }
  if (cr->nr_keys == 0) {
    error_setg (errp, "%s: no keys", file);
    goto out;
  }
  if (gnutls_psk_allocate_server_credentials (&cr->psk) < 0) {
    error_setg_errno (errp, ENOMEM, "%s", file);
    goto out;
  }
  gnutls_psk_set_server_credentials_function (cr->psk, psk_lookup);
  r = 0;
 out:
  if (buf) {
    gnutls_memset (buf, 0, MIN (len, (size_t) MAX_PSK_FILE + 1));
    free (buf);
  }
  fclose (fp);
  return r;
}

static struct tls_creds *
creds_load (struct error **errp)
{
  struct tls_creds *cr = calloc (1, sizeof *cr);

  if (cr == NULL) {
    error_setg_errno (errp, ENOMEM, "TLS credentials");
    return NULL;
  }
  cr->refs = 1;
  if ((config.tls_certificates &&
       load_x509 (cr, config.tls_certificates, errp) == -1) ||
      (config.tls_psk && load_psk (cr, config.tls_psk, errp) == -1)) {
    creds_unref (cr);
    return NULL;
  }
  return cr;
}

int
tls_init (struct error **errp)
{
  /* TLS 1.2 and 1.3 only; PSK key exchanges named, and only those
   * with forward secrecy.  The server picks the cipher, AES-GCM first:
   * with AES instructions AES-128-GCM costs a fraction of ChaCha20,
   * which gnutls clients otherwise choose for PSK (TLS 1.3 binds a
   * PSK to SHA-256 suites), and encryption is most of a TLS server's
   * work.
   */
#define TLS_PRIORITY "NORMAL:-VERS-TLS1.0:-VERS-TLS1.1:-CIPHER-ALL:" \
    "+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305:%SERVER_PRECEDENCE"
  const char *prio = config.tls_psk ? TLS_PRIORITY ":+ECDHE-PSK:+DHE-PSK"
    : TLS_PRIORITY;
  int r;

  if (config.tls == TLS_OFF)
    return 0;
  r = gnutls_priority_init (&priority, prio, NULL);
  if (r < 0) {
    error_setg (errp, "TLS priority '%s': %s", prio, gnutls_strerror (r));
    return -1;
  }
  current = creds_load (errp);
  if (current == NULL) {
    error_prepend (errp, "TLS");
    gnutls_priority_deinit (priority);
    return -1;
  }
  return 0;
}

void
tls_reload (void)
{
  struct error *err = NULL;
  struct tls_creds *cr;

  if (config.tls == TLS_OFF)
    return;
  cr = creds_load (&err);
  if (cr == NULL) {
    nbdd_error ("TLS reload failed, keeping the old credentials: %s",
                err->msg);
    error_free (err);
    return;
  }
  creds_unref (current);
  current = cr;
  nbdd_info ("TLS credentials reloaded");
}

void
tls_deinit (void)
{
  if (config.tls == TLS_OFF)
    return;
  creds_unref (current);
  current = NULL;
  gnutls_priority_deinit (priority);
}

/* Between tls_send_begin and tls_send_end, the records of the replies
 * encrypted gather here and go to the socket together, a write per
 * 256 KiB instead of one per 16 KiB record.  They are sent before
 * send_lock is dropped, so no record encrypted later can overtake
 * them.
 */
#define STAGE_SIZE (256u << 10)
struct stage {
  struct conn *c;                       /* staging for this conn */
  size_t len;
  unsigned char buf[STAGE_SIZE];
};

/* Allocated by the threads that encrypt, when they first do: a static
 * thread-local buffer would cost every thread its size in memory.
 */
static __thread struct stage *stage_p;
static pthread_key_t stage_key;
static pthread_once_t stage_once = PTHREAD_ONCE_INIT;

static void
stage_key_make (void)
{
  pthread_key_create (&stage_key, free);
}

/* This thread's stage, or NULL (out of memory: records go out one by
 * one).
 */
static struct stage *
stage_get (void)
{
  if (stage_p == NULL) {
    pthread_once (&stage_once, stage_key_make);
    stage_p = malloc (sizeof *stage_p);
    if (stage_p == NULL)
      return NULL;
    stage_p->c = NULL;
    stage_p->len = 0;
    pthread_setspecific (stage_key, stage_p);
  }
  return stage_p;
}

static int
stage_flush (struct stage *st)
{
  struct iovec iov = { .iov_base = st->buf, .iov_len = st->len };

  if (st->len == 0)
    return 0;
  st->len = 0;
  return conn_send_locked (st->c, &iov, 1);
}

/* Ciphertext out.  Called inside gnutls with send_lock held. */
static ssize_t
tls_push (gnutls_transport_ptr_t ptr, const giovec_t *iov, int iovcnt)
{
  struct conn *c = ptr;
  size_t total = 0;
  int r = 0;

  struct stage *st = stage_p;
  bool staging = st && st->c == c;

  for (int i = 0; i < iovcnt; ++i)
    total += iov[i].iov_len;
  if (staging && total <= STAGE_SIZE) {
    if (st->len + total > STAGE_SIZE)
      r = stage_flush (st);
    for (int i = 0; i < iovcnt && r == 0; ++i) {
      memcpy (st->buf + st->len, iov[i].iov_base, iov[i].iov_len);
      st->len += iov[i].iov_len;
    }
  }
  else {
    if (staging)
      r = stage_flush (st);
    if (r == 0)
      r = conn_send_locked (c, (const struct iovec *) iov, iovcnt);
  }
  if (r == -1) {
    gnutls_transport_set_errno (c->tls->s, ENOMEM);
    return -1;
  }
  return total;
}

/* Ciphertext in.  Called inside gnutls with send_lock held, on the
 * loop thread.
 */
static ssize_t
tls_pull (gnutls_transport_ptr_t ptr, void *buf, size_t len)
{
  struct conn *c = ptr;
  struct tls_session *t = c->tls;
  ssize_t r;

  if (t->rstart == t->rend) {
    t->rstart = t->rend = 0;
    do
      r = recv (c->in_fd, t->rbuf, READ_AHEAD, 0);
    while (r == -1 && errno == EINTR);
    if (r <= 0) {
      t->socket_empty = r == -1 && (errno == EAGAIN || errno == EWOULDBLOCK);
      gnutls_transport_set_errno (t->s, r == 0 ? 0 : errno);
      return r;
    }
    t->rend = r;
    t->socket_empty = (size_t) r < READ_AHEAD;
  }
  r = MIN (len, t->rend - t->rstart);
  memcpy (buf, t->rbuf + t->rstart, r);
  t->rstart += r;
  return r;
}

int
tls_start (struct conn *c)
{
  struct tls_session *t = calloc (1, sizeof *t);
  int r;

  if (t == NULL || (t->rbuf = malloc (READ_AHEAD)) == NULL) {
    free (t);
    return -1;
  }
  r = gnutls_init (&t->s, GNUTLS_SERVER | GNUTLS_NONBLOCK);
  if (r < 0) {
    nbdd_error ("%s: TLS session: %s", c->peer, gnutls_strerror (r));
    free (t->rbuf);
    free (t);
    return -1;
  }
  t->creds = current;
  current->refs++;
  gnutls_session_set_ptr (t->s, t->creds);     /* for psk_lookup */
  r = gnutls_priority_set (t->s, priority);
  if (r == 0 && t->creds->x509) {
    r = gnutls_credentials_set (t->s, GNUTLS_CRD_CERTIFICATE,
                                t->creds->x509);
    /* Ask for a certificate: with --tls-verify-peer it must be there
     * and valid; otherwise a valid one still names the client.
     */
    gnutls_certificate_server_set_request (t->s, config.tls_verify_peer
                                           ? GNUTLS_CERT_REQUIRE
                                           : GNUTLS_CERT_REQUEST);
    if (config.tls_verify_peer)
      gnutls_session_set_verify_cert2 (t->s, &client_purpose, 1, 0);
  }
  if (r == 0 && t->creds->psk)
    r = gnutls_credentials_set (t->s, GNUTLS_CRD_PSK, t->creds->psk);
  if (r < 0) {
    nbdd_error ("%s: TLS session: %s", c->peer, gnutls_strerror (r));
    c->tls = t;
    tls_free (c);
    return -1;
  }
  gnutls_transport_set_ptr (t->s, c);
  gnutls_transport_set_pull_function (t->s, tls_pull);
  gnutls_transport_set_vec_push_function (t->s, tls_push);
  gnutls_handshake_set_timeout (t->s, 0);  /* ours covers it */
  c->tls = t;
  return 0;
}

/* The client's identity: a PSK username, or the subject of a
 * certificate that verified.
 */
static char *
peer_identity (gnutls_session_t s)
{
  const gnutls_datum_t *certs;
  unsigned n = 0, status = 1;
  gnutls_x509_crt_t crt;
  gnutls_datum_t dn = { NULL, 0 };
  const char *user;
  char *id = NULL;

  user = gnutls_psk_server_get_username (s);
  if (user && *user)
    return strdup (user);
  certs = gnutls_certificate_get_peers (s, &n);
  if (certs == NULL || n == 0 ||
      gnutls_certificate_verify_peers (s, &client_purpose, 1,
                                       &status) < 0 || status != 0)
    return NULL;
  if (gnutls_x509_crt_init (&crt) < 0)
    return NULL;
  if (gnutls_x509_crt_import (crt, &certs[0], GNUTLS_X509_FMT_DER) == 0 &&
      gnutls_x509_crt_get_dn3 (crt, &dn, 0) == 0) {
    id = strndup ((const char *) dn.data, dn.size);
    gnutls_free (dn.data);
  }
  gnutls_x509_crt_deinit (crt);
  return id;
}

int
tls_handshake (struct conn *c)
{
  struct tls_session *t = c->tls;
  char *desc;
  int r;

  r = gnutls_handshake (t->s);
  if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
    return 0;
  if (r < 0) {
    nbdd_info ("%s: TLS handshake failed: %s: closing", c->peer,
               gnutls_strerror (r));
    return -1;
  }
  t->identity = peer_identity (t->s);
  desc = gnutls_session_get_desc (t->s);
  nbdd_info ("%s: TLS %s, client %s%s%s", c->peer, desc ? desc : "up",
             t->identity ? "'" : "anonymous",
             t->identity ? t->identity : "", t->identity ? "'" : "");
  gnutls_free (desc);
  return 1;
}

ssize_t
tls_recv (struct conn *c, void *buf, size_t len)
{
  ssize_t r = gnutls_record_recv (c->tls->s, buf, len);

  if (r >= 0)
    return r;
  switch (r) {
  case GNUTLS_E_AGAIN:
    errno = EAGAIN;
    return -1;
  case GNUTLS_E_INTERRUPTED:
    errno = EINTR;
    return -1;
  case GNUTLS_E_PREMATURE_TERMINATION:
    return 0;                   /* a hangup without close_notify */
  default:
    nbdd_info ("%s: TLS receive: %s: closing", c->peer, gnutls_strerror (r));
    errno = EIO;
    return -1;
  }
}

bool
tls_drained (struct conn *c)
{
  return c->tls->socket_empty && !tls_pending (c);
}

bool
tls_pending (struct conn *c)
{
  return c->tls->rstart < c->tls->rend ||
    gnutls_record_check_pending (c->tls->s) > 0;
}

/* Encrypt and send one reply: 0, or -1 if the session failed. */
static int
send_records (gnutls_session_t s, const struct iovec *iov, unsigned niov)
{
  unsigned char small[16384];   /* one full record */
  size_t n = 0;
  unsigned i = 0;
  size_t off = 0;

  /* The header and the start of the data make one record (a small
   * reply is a single record), rather than a record of a few bytes.
   */
  for (; i < niov && n < sizeof small; ++i, off = 0) {
    size_t take = MIN (iov[i].iov_len, sizeof small - n);
    memcpy (small + n, iov[i].iov_base, take);
    n += take;
    off = take;
    if (take < iov[i].iov_len)
      break;
  }
  if (n > 0 && gnutls_record_send (s, small, n) != (ssize_t) n)
    return -1;
  /* The rest straight from the caller's buffers. */
  for (; i < niov; ++i, off = 0) {
    const char *p = (const char *) iov[i].iov_base + off;
    size_t left = iov[i].iov_len - off;
    while (left > 0) {
      ssize_t w = gnutls_record_send (s, p, left);
      if (w <= 0)
        return -1;
      p += w;
      left -= w;
    }
  }
  return 0;
}

void
tls_send_begin (struct conn *c)
{
  struct stage *st = stage_get ();

  if (st) {
    assert (st->c == NULL && st->len == 0);     /* every begin has an end */
    st->c = c;
    st->len = 0;
  }
}

int
tls_send_part (struct conn *c, const struct iovec *iov, unsigned niov)
{
  /* A session that failed once may have sent half a record: it is
   * never used again.
   */
  if (c->tls_broken)
    return -1;
  if (send_records (c->tls->s, iov, niov) == -1) {
    c->tls_broken = true;
    return -1;
  }
  return 0;
}

int
tls_send_end (struct conn *c)
{
  struct stage *st = stage_p;
  int r = 0;

  if (st && st->c == c) {
    if (!c->tls_broken)
      r = stage_flush (st);
    st->c = NULL;
    st->len = 0;
  }
  if (r == -1)
    c->tls_broken = true;
  return c->tls_broken ? -1 : 0;
}


void
tls_bye (struct conn *c)
{
  if (c->tls_broken)            /* it may have stopped mid-record */
    return;
  gnutls_bye (c->tls->s, GNUTLS_SHUT_WR);
}

const char *
tls_identity (const struct conn *c)
{
  return c->tls ? c->tls->identity : NULL;
}

void
tls_free (struct conn *c)
{
  struct tls_session *t = c->tls;

  if (t == NULL)
    return;
  gnutls_deinit (t->s);
  creds_unref (t->creds);
  free (t->identity);
  free (t->rbuf);
  free (t);
  c->tls = NULL;
}
