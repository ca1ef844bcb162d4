/* The admin socket: QMP sessions on a unix socket.
 *
 * Framing only: the greeting, capability negotiation, reading one JSON
 * object after another from a stream, writing replies and events.  The
 * commands are in qmp.c.  Everything runs on the main thread, and a
 * command runs to completion before the next is read, so sessions see
 * the graph change one command at a time.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"
#include "log.h"

/* One message may be at most this long; a longer one ends the session
 * (only that session), as it cannot be resynchronised cheaply.  A
 * message is collected as bytes and parsed once whole, so a session
 * holds at most this much, not the objects a parser would build.
 */
#define MAX_MESSAGE     (1u << 20)
/* Output a client does not read (events pile up): beyond this, the
 * session is dropped.  Replies cannot pile up: a session is not read
 * while its last reply is still going out.
 */
#define MAX_OUTPUT      (16u << 20)
#define MAX_SESSIONS    64
#define MAX_JSON_DEPTH  64
/* A client that never negotiates capabilities is dropped. */
#define NEGOTIATE_TIMEOUT 30.

struct session {
  struct session *next;
  ev_io rio, wio;
  ev_timer timer;               /* until qmp_capabilities */
  int fd;
  struct admin_peer peer;
  bool negotiated;              /* qmp_capabilities done */
  bool dead;                    /* freed by the reaper, not in use */
  /* The message being collected, and where the scanner is in it. */
  char *in;
  size_t in_len, in_cap;
  unsigned depth;               /* open objects and arrays */
  bool in_string, escape;
  bool skipping;                /* after bad input: drop to the newline */
  char *out;                    /* pending output: [out_start, out_len) */
  size_t out_start, out_len, out_cap;
};

static ev_io listen_io;
static ev_check reaper;         /* frees dead sessions after callbacks */
static int listen_fd = -1;
static char *socket_path;
static gid_t admin_gid;
static bool have_admin_gid;
static struct session *sessions;
static unsigned nr_sessions;
static struct ev_loop *admin_loop;

static void
session_free (struct session *s)
{
  close (s->fd);
  free (s->in);
  free (s->out);
  debug ("admin: session of uid %u pid %d closed", (unsigned) s->peer.uid,
         (int) s->peer.pid);
  free (s);
}

/* End a session.  It may be in use further up the stack (a command
 * that failed to send its reply, an event sent from a command of
 * another session), so it is only marked, and freed by the reaper
 * once the current callback has returned.
 */
static void
session_kill (struct session *s)
{
  if (s->dead)
    return;
  s->dead = true;
  ev_io_stop (admin_loop, &s->rio);
  ev_io_stop (admin_loop, &s->wio);
  ev_timer_stop (admin_loop, &s->timer);
  if (!ev_is_active (&reaper)) {
    ev_check_start (admin_loop, &reaper);
    ev_unref (admin_loop);
  }
}

static void
reap_cb (struct ev_loop *loop, ev_check *w, int revents)
{
  struct session **pp = &sessions;

  while (*pp) {
    struct session *s = *pp;
    if (s->dead) {
      *pp = s->next;
      nr_sessions--;
      session_free (s);
    }
    else
      pp = &s->next;
  }
  ev_ref (loop);
  ev_check_stop (loop, w);
}

static void
session_write (struct session *s)
{
  while (s->out_start < s->out_len) {
    ssize_t n = send (s->fd, s->out + s->out_start, s->out_len - s->out_start,
                      MSG_NOSIGNAL);
    if (n == -1) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        ev_io_start (admin_loop, &s->wio);
        return;
      }
      session_kill (s);
      return;
    }
    s->out_start += n;
  }
  s->out_start = s->out_len = 0;
  ev_io_stop (admin_loop, &s->wio);
  /* Its replies are out: listen to it again. */
  if (!s->dead)
    ev_io_start (admin_loop, &s->rio);
}

/* Queue one JSON message and a newline (QMP messages end in CRLF). */
static void
session_send (struct session *s, struct json_object *o)
{
  const char *text = json_object_to_json_string_ext (o, JSON_C_TO_STRING_PLAIN);
  size_t len = strlen (text);

  if (s->dead)
    return;
  if (s->out_len - s->out_start + len + 2 > MAX_OUTPUT) {
    nbdd_info ("admin: uid %u does not read its replies: closing",
               (unsigned) s->peer.uid);
    session_kill (s);
    return;
  }
  if (s->out_start > 0 && s->out_len + len + 2 > s->out_cap) {
    memmove (s->out, s->out + s->out_start, s->out_len - s->out_start);
    s->out_len -= s->out_start;
    s->out_start = 0;
  }
  if (s->out_len + len + 2 > s->out_cap) {
    size_t ncap = MAX (s->out_cap * 2, s->out_len + len + 2);
    char *n = realloc (s->out, ncap);
    if (n == NULL) {
      session_kill (s);
      return;
    }
    s->out = n;
    s->out_cap = ncap;
  }
  memcpy (s->out + s->out_len, text, len);
  memcpy (s->out + s->out_len + len, "\r\n", 2);
  s->out_len += len + 2;
  session_write (s);
}

static struct json_object *
error_reply (const char *class, const char *desc, struct json_object *id)
{
  struct json_object *r = json_object_new_object ();
  struct json_object *e = json_object_new_object ();

  json_object_object_add (e, "class", json_object_new_string (class));
  json_object_object_add (e, "desc", json_object_new_string (desc));
  json_object_object_add (r, "error", e);
  if (id)
    json_object_object_add (r, "id", json_object_get (id));
  return r;
}

static void
send_error (struct session *s, const char *class, const char *desc,
            struct json_object *id)
{
  struct json_object *r = error_reply (class, desc, id);

  session_send (s, r);
  json_object_put (r);
}

struct json_object *
admin_version (void)
{
  struct json_object *v = json_object_new_object ();
  struct json_object *q = json_object_new_object ();
  char pkg[64];
  unsigned major = 0, minor = 0, micro = 0;

  sscanf (PACKAGE_VERSION, "%u.%u.%u", &major, &minor, &micro);
  json_object_object_add (q, "major", json_object_new_int (major));
  json_object_object_add (q, "minor", json_object_new_int (minor));
  json_object_object_add (q, "micro", json_object_new_int (micro));
  json_object_object_add (v, "qemu", q);
  snprintf (pkg, sizeof pkg, "nbdd %s", PACKAGE_VERSION);
  json_object_object_add (v, "package", json_object_new_string (pkg));
  return v;
}

static void
send_greeting (struct session *s)
{
  struct json_object *g = json_object_new_object ();
  struct json_object *qmp = json_object_new_object ();

  json_object_object_add (qmp, "version", admin_version ());
  json_object_object_add (qmp, "capabilities", json_object_new_array ());
  json_object_object_add (g, "QMP", qmp);
  session_send (s, g);
  json_object_put (g);
}

/* One message from a session. */
static void
session_message (struct session *s, struct json_object *msg)
{
  struct json_object *id = NULL, *exec, *args = NULL, *reply;
  const char *name;

  if (!json_object_is_type (msg, json_type_object)) {
    send_error (s, "GenericError", "QMP input must be a JSON object", NULL);
    return;
  }
  json_object_object_get_ex (msg, "id", &id);
  if (!json_object_object_get_ex (msg, "execute", &exec) ||
      !json_object_is_type (exec, json_type_string)) {
    send_error (s, "GenericError",
                "QMP input lacks member 'execute' (a string)", id);
    return;
  }
  json_object_object_foreach (msg, key, val) {
    (void) val;
    if (strcmp (key, "execute") && strcmp (key, "arguments") &&
        strcmp (key, "id")) {
      char desc[160];
      snprintf (desc, sizeof desc, "QMP input member '%.60s' is unexpected",
                key);
      send_error (s, "GenericError", desc, id);
      return;
    }
  }
  if (json_object_object_get_ex (msg, "arguments", &args) &&
      !json_object_is_type (args, json_type_object)) {
    send_error (s, "GenericError",
                "QMP input member 'arguments' must be an object", id);
    return;
  }
  name = json_object_get_string (exec);

  if (strcmp (name, "qmp_capabilities") == 0) {
    if (s->negotiated) {
      send_error (s, "CommandNotFound",
                  "Capabilities negotiation is already complete, command "
                  "ignored", id);
      return;
    }
    s->negotiated = true;
    ev_timer_stop (admin_loop, &s->timer);
    reply = json_object_new_object ();
    json_object_object_add (reply, "return", json_object_new_object ());
  }
  else if (!s->negotiated) {
    send_error (s, "CommandNotFound", "Expecting capabilities negotiation "
                "with 'qmp_capabilities'", id);
    return;
  }
  else
    reply = qmp_execute (name, args, &s->peer);
  if (id)
    json_object_object_add (reply, "id", json_object_get (id));
  session_send (s, reply);
  json_object_put (reply);
}

/* A whole message has been collected: parse and run it. */
static void
session_parse (struct session *s)
{
  struct json_tokener *tok = json_tokener_new_ex (MAX_JSON_DEPTH);
  struct json_object *o;
  enum json_tokener_error jerr;

  if (tok == NULL) {
    session_kill (s);
    return;
  }
  o = json_tokener_parse_ex (tok, s->in, (int) s->in_len);
  jerr = json_tokener_get_error (tok);
  json_tokener_free (tok);
  s->in_len = 0;
  if (jerr != json_tokener_success) {
    char desc[200];
    snprintf (desc, sizeof desc, "JSON parse error: %s",
              json_tokener_error_desc (jerr));
    send_error (s, "GenericError", desc, NULL);
    json_object_put (o);
    return;
  }
  session_message (s, o);
  json_object_put (o);
}

static void
bad_input (struct session *s, const char *desc)
{
  send_error (s, "GenericError", desc, NULL);
  s->in_len = 0;
  s->depth = 0;
  s->in_string = s->escape = false;
  s->skipping = true;
}

/* Split the stream into messages: a message is one JSON object (or
 * array, refused later), found by counting brackets outside strings.
 * After bad input the rest of that line is dropped, so a client that
 * sends one message per line is back in step at once.
 */
static void
session_input (struct session *s, const char *buf, size_t len)
{
  for (size_t i = 0; i < len && !s->dead; ++i) {
    char c = buf[i];

    if (s->skipping) {
      if (c == '\n')
        s->skipping = false;
      continue;
    }
    if (s->in_len == 0) {
      if (c == ' ' || c == '\t' || c == '\r' || c == '\n')
        continue;
      if (c != '{' && c != '[') {
        bad_input (s, "JSON parse error: QMP input must be a JSON object");
        if (c == '\n')
          s->skipping = false;
        continue;
      }
    }
    if (s->in_len == s->in_cap) {
      size_t ncap = s->in_cap ? 2 * s->in_cap : 4096;
      char *n;
      if (ncap > MAX_MESSAGE) {
        nbdd_info ("admin: uid %u sent a message over %u bytes: closing",
                   (unsigned) s->peer.uid, MAX_MESSAGE);
        session_kill (s);
        return;
      }
      n = realloc (s->in, ncap);
      if (n == NULL) {
        session_kill (s);
        return;
      }
      s->in = n;
      s->in_cap = ncap;
    }
    s->in[s->in_len++] = c;
    if (s->in_string) {
      if (s->escape)
        s->escape = false;
      else if (c == '\\')
        s->escape = true;
      else if (c == '"')
        s->in_string = false;
    }
    else if (c == '"')
      s->in_string = true;
    else if (c == '{' || c == '[') {
      if (++s->depth > MAX_JSON_DEPTH) {
        bad_input (s, "JSON parse error: nesting too deep");
        if (c == '\n')
          s->skipping = false;
      }
    }
    else if (c == '}' || c == ']') {
      if (--s->depth == 0)
        session_parse (s);
    }
  }
  /* Replies go out before more is read (QEMU's monitor does the same):
   * a client that does not read cannot make us queue without bound.
   */
  if (!s->dead && s->out_len > s->out_start)
    ev_io_stop (admin_loop, &s->rio);
}

static void
session_read_cb (struct ev_loop *loop, ev_io *w, int revents)
{
  struct session *s = container_of (w, struct session, rio);
  char buf[16384];
  ssize_t n = recv (s->fd, buf, sizeof buf, 0);

  if (n == -1 && (errno == EAGAIN || errno == EINTR))
    return;
  if (n <= 0) {
    session_kill (s);
    return;
  }
  session_input (s, buf, n);
  conns_flush_dirty ();
}

static void
session_write_cb (struct ev_loop *loop, ev_io *w, int revents)
{
  session_write (container_of (w, struct session, wio));
}

static void
session_timeout_cb (struct ev_loop *loop, ev_timer *w, int revents)
{
  struct session *s = container_of (w, struct session, timer);

  nbdd_info ("admin: uid %u did not negotiate capabilities: closing",
             (unsigned) s->peer.uid);
  session_kill (s);
}

static void admin_init (struct ev_loop *loop);

/* Whether @uid may administer: root, our own uid, or a member of the
 * admin group (primary or supplementary).
 */
static bool
uid_allowed (uid_t uid, gid_t gid)
{
  struct passwd *pw;
  gid_t groups[256];
  int n = ARRAY_SIZE (groups);

  if (uid == 0 || uid == geteuid ())
    return true;
  if (!have_admin_gid)
    return false;
  if (gid == admin_gid)
    return true;
  pw = getpwuid (uid);
  if (pw == NULL || getgrouplist (pw->pw_name, pw->pw_gid, groups, &n) == -1)
    return false;
  for (int i = 0; i < n; ++i)
    if (groups[i] == admin_gid)
      return true;
  return false;
}

static void
accept_cb (struct ev_loop *loop, ev_io *w, int revents)
{
  struct ucred cred;
  socklen_t len = sizeof cred;
  int fd = accept4 (listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

  if (fd == -1)
    return;
  if (getsockopt (fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == -1) {
    nbdd_info ("admin: SO_PEERCRED: %m: refusing the client");
    close (fd);
    return;
  }
  if (!uid_allowed (cred.uid, cred.gid)) {
    static const char refusal[] =
      "{\"error\": {\"class\": \"GenericError\", \"desc\": \"this user may "
      "not administer nbdd\"}}\r\n";
    nbdd_info ("admin: refused uid %u pid %d", (unsigned) cred.uid,
               (int) cred.pid);
    if (send (fd, refusal, sizeof refusal - 1, MSG_NOSIGNAL | MSG_DONTWAIT)
        == -1)
      debug ("admin: refusal not sent: %m");
    close (fd);
    return;
  }
  if (nr_sessions >= MAX_SESSIONS) {
    nbdd_info ("admin: too many sessions: refusing uid %u",
               (unsigned) cred.uid);
    close (fd);
    return;
  }
  admin_session_start (loop, fd, cred.uid, cred.pid);
}

static void
admin_init (struct ev_loop *loop)
{
  if (admin_loop)
    return;
  admin_loop = loop;
  ev_check_init (&reaper, reap_cb);
}

void
admin_session_start (struct ev_loop *loop, int fd, uid_t uid, pid_t pid)
{
  struct session *s = calloc (1, sizeof *s);

  admin_init (loop);
  if (s == NULL) {
    close (fd);
    return;
  }
  s->fd = fd;
  s->peer.uid = uid;
  s->peer.pid = pid;
  ev_io_init (&s->rio, session_read_cb, fd, EV_READ);
  ev_io_init (&s->wio, session_write_cb, fd, EV_WRITE);
  ev_timer_init (&s->timer, session_timeout_cb, NEGOTIATE_TIMEOUT, 0);
  ev_io_start (loop, &s->rio);
  ev_timer_start (loop, &s->timer);
  s->next = sessions;
  sessions = s;
  nr_sessions++;
  debug ("admin: session of uid %u pid %d", (unsigned) uid, (int) pid);
  send_greeting (s);
}

unsigned
admin_session_count (void)
{
  return nr_sessions;
}

/* As for the NBD sockets (listen.c): no file left by a failed start. */
static void
unlink_at_exit (void)
{
  if (socket_path)
    unlink (socket_path);
}

int
admin_open (struct ev_loop *loop, const char *path, const char *group,
            struct error **errp)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  mode_t old_umask;
  int fd;

  admin_init (loop);
  if (strlen (path) >= sizeof sun.sun_path) {
    error_setg (errp, "admin socket path is too long: %s", path);
    return -1;
  }
  if (group) {
    struct group *gr = getgrnam (group);
    if (gr == NULL) {
      error_setg (errp, "admin group '%s' does not exist", group);
      return -1;
    }
    admin_gid = gr->gr_gid;
    have_admin_gid = true;
  }
  strcpy (sun.sun_path, path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd == -1) {
    error_setg_errno (errp, errno, "admin socket");
    return -1;
  }
  /* A socket left by a daemon that died is replaced; a live daemon's
   * was refused earlier by the state dir lock.
   */
  unlink (path);
  /* Created with the right mode from the start: no window in which
   * another user could connect.
   */
  old_umask = umask (group ? 0117 : 0177);
  if (bind (fd, (struct sockaddr *) &sun, sizeof sun) == -1) {
    umask (old_umask);
    error_setg_errno (errp, errno, "admin socket %s", path);
    close (fd);
    return -1;
  }
  umask (old_umask);
  if (group && chown (path, (uid_t) -1, admin_gid) == -1) {
    error_setg_errno (errp, errno, "admin socket %s: group %s", path, group);
    unlink (path);
    close (fd);
    return -1;
  }
  if (listen (fd, MAX_SESSIONS) == -1) {
    error_setg_errno (errp, errno, "admin socket %s", path);
    unlink (path);
    close (fd);
    return -1;
  }
  socket_path = strdup (path);
  atexit (unlink_at_exit);
  listen_fd = fd;
  ev_io_init (&listen_io, accept_cb, fd, EV_READ);
  ev_io_start (loop, &listen_io);
  /* The admin socket alone does not keep the loop running. */
  ev_unref (loop);
  debug ("admin socket: %s", path);
  return 0;
}

void
admin_close (void)
{
  if (ev_is_active (&reaper)) {
    ev_ref (admin_loop);
    ev_check_stop (admin_loop, &reaper);
  }
  while (sessions) {
    struct session *s = sessions;
    sessions = s->next;
    ev_io_stop (admin_loop, &s->rio);
    ev_io_stop (admin_loop, &s->wio);
    ev_timer_stop (admin_loop, &s->timer);
    session_free (s);
  }
  nr_sessions = 0;
  if (listen_fd >= 0) {
    ev_ref (admin_loop);
    ev_io_stop (admin_loop, &listen_io);
    close (listen_fd);
    listen_fd = -1;
  }
  if (socket_path) {
    unlink (socket_path);
    free (socket_path);
    socket_path = NULL;
  }
}

void
admin_event (const char *name, struct json_object *data)
{
  struct json_object *ev = json_object_new_object ();
  struct json_object *ts = json_object_new_object ();
  struct timeval tv;

  gettimeofday (&tv, NULL);
  json_object_object_add (ev, "event", json_object_new_string (name));
  if (data)
    json_object_object_add (ev, "data", data);
  json_object_object_add (ts, "seconds", json_object_new_int64 (tv.tv_sec));
  json_object_object_add (ts, "microseconds",
                          json_object_new_int64 (tv.tv_usec));
  json_object_object_add (ev, "timestamp", ts);
  for (struct session *s = sessions; s; s = s->next)
    if (s->negotiated && !s->dead)
      session_send (s, ev);
  json_object_put (ev);
}

void
admin_event_export_deleted (const char *id)
{
  struct json_object *data = json_object_new_object ();

  json_object_object_add (data, "id", json_object_new_string (id));
  admin_event ("BLOCK_EXPORT_DELETED", data);
}
