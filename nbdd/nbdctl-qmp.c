/* nbdctl: one QMP session over the admin socket (docs/admin.md).
 *
 * Messages are JSON objects.  Whether the daemon ends each with a
 * newline does not matter: they are split by json-c's incremental
 * tokener, not by lines.  Bytes are read into rbuf and fed to the
 * tokener; what follows a complete object stays in rbuf, unparsed, for
 * the next message.
 *
 * Only one command is in flight at a time, so an answer is the first
 * message that is not an event (and carries our id, when it has one).
 * Events that arrive meanwhile go to the session's event handler, if
 * a command wants them (job wait), and are dropped otherwise.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <json-c/json.h>

#include "cleanup.h"
#include "nbdctl.h"
#include "utils.h"

/* A message larger than this ends the session.  The daemon is
 * trusted, but a broken one must not eat all our memory.
 */
#define MAX_MESSAGE     (64u << 20)
/* Nesting the tokener accepts (json-c's default is 32). */
#define MAX_JSON_DEPTH  64

struct qmp {
  int fd;
  char *path;                   /* for messages */
  int timeout_ms;               /* each wait for the daemon; -1 = forever */
  struct json_tokener *tok;
  size_t msg_bytes;             /* bytes fed to tok for this message */
  int64_t next_id;
  qmp_event_fn *on_event;       /* NULL: events are dropped */
  void *event_opaque;
  size_t rpos, rlen;            /* unparsed input: rbuf[rpos, rlen) */
  char rbuf[65536];
};

/* json_tokener_get_parse_end appeared in json-c 0.15; before it the
 * field was public.
 */
#if JSON_C_VERSION_NUM >= ((0 << 16) | (15 << 8))
static size_t
tokener_parse_end (struct json_tokener *tok)
{
  return json_tokener_get_parse_end (tok);
}
#else
static size_t
tokener_parse_end (struct json_tokener *tok)
{
  return tok->char_offset;
}
#endif

/* Wait until the socket is readable: 0, or -1 with errp set. */
static int
qmp_wait (struct qmp *q, struct error **errp)
{
  struct pollfd pfd = { .fd = q->fd, .events = POLLIN };
  int r;

  do
    r = poll (&pfd, 1, q->timeout_ms);
  while (r == -1 && errno == EINTR);
  if (r == -1) {
    error_setg_errno (errp, errno, "%s: poll", q->path);
    return -1;
  }
  if (r == 0) {
    int secs = q->timeout_ms / 1000;
    error_setg (errp, "%s: no answer from the daemon within %d second%s "
                "(raise --timeout if it is just busy)", q->path, secs,
                secs == 1 ? "" : "s");
    return -1;
  }
  return 0;
}

/* Read the next message, whatever it is: 0 with *msg set (caller puts
 * it), or -1 with errp set.
 */
static int
qmp_read (struct qmp *q, struct json_object **msg, struct error **errp)
{
  for (;;) {
    ssize_t r;

    if (q->rpos < q->rlen) {
      size_t n = q->rlen - q->rpos;
      struct json_object *o;
      enum json_tokener_error jerr;

      o = json_tokener_parse_ex (q->tok, q->rbuf + q->rpos, n);
      jerr = json_tokener_get_error (q->tok);
      if (o != NULL) {
        q->rpos += tokener_parse_end (q->tok);
        json_tokener_reset (q->tok);
        q->msg_bytes = 0;
        *msg = o;
        return 0;
      }
      if (jerr != json_tokener_continue) {
        error_setg (errp, "%s: the daemon sent malformed JSON (%s): is "
                    "this an nbdd admin socket?", q->path,
                    json_tokener_error_desc (jerr));
        return -1;
      }
      /* The tokener keeps what it has seen; the buffer is free again. */
      q->msg_bytes += n;
      if (q->msg_bytes > MAX_MESSAGE) {
        error_setg (errp, "%s: a message from the daemon is larger than "
                    "%u MiB", q->path, MAX_MESSAGE >> 20);
        return -1;
      }
    }
    q->rpos = q->rlen = 0;
    if (qmp_wait (q, errp) == -1)
      return -1;
    r = read (q->fd, q->rbuf, sizeof q->rbuf);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1) {
      error_setg_errno (errp, errno, "%s: read", q->path);
      return -1;
    }
    if (r == 0) {
      error_setg (errp, "%s: the daemon closed the connection", q->path);
      return -1;
    }
    q->rlen = r;
  }
}

static int
qmp_write (struct qmp *q, struct json_object *msg, struct error **errp)
{
  size_t len;
  const char *s = json_object_to_json_string_length (msg,
                                                     JSON_C_TO_STRING_PLAIN |
                                                     JSON_C_TO_STRING_NOSLASHESCAPE,
                                                     &len);
  int r;

  if (s == NULL)
    out_of_memory ();
  r = full_write (q->fd, s, len);
  if (r == 0)
    r = full_write (q->fd, "\n", 1);
  if (r == -EPIPE || r == -ECONNRESET) {
    error_setg (errp, "%s: the daemon closed the connection", q->path);
    return -1;
  }
  if (r < 0) {
    error_setg_errno (errp, -r, "%s: write", q->path);
    return -1;
  }
  return 0;
}

static const char *
error_desc (struct json_object *msg)
{
  struct json_object *e, *desc;

  if (json_object_object_get_ex (msg, "error", &e) &&
      json_object_object_get_ex (e, "desc", &desc) &&
      json_object_is_type (desc, json_type_string))
    return json_object_get_string (desc);
  return "the daemon refused the command without saying why";
}

int
qmp_execute_msg (struct qmp *q, struct json_object *msg,
                 struct json_object **ret, struct error **errp)
{
  struct json_object *id = NULL;
  int r;

  if (!json_object_object_get_ex (msg, "id", &id)) {
    id = check_alloc (json_object_new_int64 (q->next_id++));
    json_object_object_add (msg, "id", id);
  }
  json_object_get (id);         /* outlives msg */
  r = qmp_write (q, msg, errp);
  json_object_put (msg);
  if (r == -1)
    goto out_lost;

  for (;;) {
    struct json_object *reply, *v, *rid;

    if (qmp_read (q, &reply, errp) == -1)
      goto out_lost;
    if (!json_object_is_type (reply, json_type_object)) {
      json_object_put (reply);
      error_setg (errp, "%s: the daemon sent something other than a JSON "
                  "object", q->path);
      goto out_lost;
    }
    if (json_object_object_get_ex (reply, "event", NULL)) {
      if (q->on_event)
        q->on_event (reply, q->event_opaque);
      json_object_put (reply);
      continue;
    }
    if (json_object_object_get_ex (reply, "id", &rid) &&
        !json_object_equal (rid, id)) {
      json_object_put (reply);  /* not our answer */
      continue;
    }
    if (json_object_object_get_ex (reply, "return", &v)) {
      *ret = json_object_get (v);
      json_object_put (reply);
      json_object_put (id);
      return EXIT_OK;
    }
    if (json_object_object_get_ex (reply, "error", NULL)) {
      error_setg (errp, "%s", error_desc (reply));
      json_object_put (reply);
      json_object_put (id);
      return EXIT_REFUSED;
    }
    json_object_put (reply);
    error_setg (errp, "%s: the daemon's answer has neither 'return' nor "
                "'error'", q->path);
    goto out_lost;
  }

 out_lost:
  json_object_put (id);
  return EXIT_UNREACHABLE;
}

int
qmp_execute (struct qmp *q, const char *cmd, struct json_object *args,
             struct json_object **ret, struct error **errp)
{
  struct json_object *msg = check_alloc (json_object_new_object ());

  json_object_object_add (msg, "execute",
                          check_alloc (json_object_new_string (cmd)));
  if (args)
    json_object_object_add (msg, "arguments", args);
  return qmp_execute_msg (q, msg, ret, errp);
}

struct json_object *
qmp_parse_object (const char *s, struct error **errp)
{
  struct json_tokener *tok = check_alloc (json_tokener_new_ex
                                          (MAX_JSON_DEPTH));
  size_t len = strlen (s), end;
  struct json_object *o;
  enum json_tokener_error jerr;

  /* An object ends at its '}': the tokener does not need to see what
   * follows, and stops there.
   */
  o = json_tokener_parse_ex (tok, s, len);
  jerr = json_tokener_get_error (tok);
  end = tokener_parse_end (tok);
  json_tokener_free (tok);
  if (o == NULL) {
    error_setg (errp, "not JSON (%s)",
                jerr == json_tokener_continue ? "unexpected end of text"
                : json_tokener_error_desc (jerr));
    return NULL;
  }
  if (!json_object_is_type (o, json_type_object)) {
    json_object_put (o);
    error_setg (errp, "expected a JSON object");
    return NULL;
  }
  end += strspn (s + end, " \t\r\n");
  if (end < len) {
    json_object_put (o);
    error_setg (errp, "unexpected text after the JSON object: '%s'",
                s + end);
    return NULL;
  }
  return o;
}

struct qmp *
qmp_open (const char *path, int timeout_ms, struct error **errp)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  struct json_object *greeting = NULL, *ret = NULL;
  struct qmp *q;

  if (strlen (path) >= sizeof sun.sun_path) {
    error_setg (errp, "%s: too long for a unix socket path (at most %zu "
                "bytes)", path, sizeof sun.sun_path - 1);
    return NULL;
  }
  memcpy (sun.sun_path, path, strlen (path) + 1);

  q = check_alloc (calloc (1, sizeof *q));
  q->timeout_ms = timeout_ms;
  q->next_id = 1;
  q->path = check_alloc (strdup (path));
  q->tok = check_alloc (json_tokener_new_ex (MAX_JSON_DEPTH));
  q->fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (q->fd == -1) {
    error_setg_errno (errp, errno, "socket");
    goto out_close;
  }
  if (connect (q->fd, (struct sockaddr *) &sun, sizeof sun) == -1) {
    error_setg_errno (errp, errno, "cannot connect to the admin socket %s",
                      path);
    goto out_close;
  }

  /* {"QMP": {...}}, or an error if the daemon will not serve us. */
  if (qmp_read (q, &greeting, errp) == -1)
    goto out_close;
  if (json_object_object_get_ex (greeting, "error", NULL)) {
    error_setg (errp, "%s: the daemon refused this client: %s (its admin "
                "socket serves root, the daemon's user and members of its "
                "--admin-group)", path, error_desc (greeting));
    goto out_close;
  }
  if (!json_object_is_type (greeting, json_type_object) ||
      !json_object_object_get_ex (greeting, "QMP", NULL)) {
    error_setg (errp, "%s: no QMP greeting: is this an nbdd admin socket?",
                path);
    goto out_close;
  }
  if (qmp_execute (q, "qmp_capabilities", NULL, &ret, errp) != EXIT_OK) {
    error_prepend (errp, "%s: qmp_capabilities", path);
    goto out_close;
  }
  json_object_put (ret);
  json_object_put (greeting);
  return q;

 out_close:
  json_object_put (greeting);
  qmp_close (q);
  return NULL;
}

void
qmp_set_event_handler (struct qmp *q, qmp_event_fn *fn, void *opaque)
{
  q->on_event = fn;
  q->event_opaque = opaque;
}

void
qmp_close (struct qmp *q)
{
  if (q == NULL)
    return;
  if (q->fd >= 0)
    close (q->fd);
  json_tokener_free (q->tok);
  free (q->path);
  free (q);
}
