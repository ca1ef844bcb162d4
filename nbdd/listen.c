/* Listening sockets: unix, TCP (IPv4 and IPv6) and systemd socket
 * activation.  Accepting stops while the daemon is at
 * --max-connections, and for a moment after EMFILE so a full fd table
 * does not spin the loop.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"
#include "log.h"

#define FIRST_SOCKET_ACTIVATION_FD 3

struct listener {
  ev_io io;
  int fd;
  bool is_tcp;
  char *unix_path;              /* to unlink at exit; NULL otherwise */
};

bool shutting_down;

static struct listener *listeners;
static size_t nr_listeners;
static ev_timer retry_timer;    /* resume accepting after EMFILE */
static bool paused;
static bool backing_off;        /* retry_timer is pending */
static bool emfile_warned;      /* until the next successful accept */

static void
set_nonblock_cloexec (int fd)
{
  int fl = fcntl (fd, F_GETFL);

  if (fl != -1)
    fcntl (fd, F_SETFL, fl | O_NONBLOCK);
  fl = fcntl (fd, F_GETFD);
  if (fl != -1)
    fcntl (fd, F_SETFD, fl | FD_CLOEXEC);
}

static void
peer_name (int fd, bool is_tcp, char *buf, size_t len)
{
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  char host[NI_MAXHOST], serv[NI_MAXSERV];

  if (!is_tcp || getpeername (fd, (struct sockaddr *) &ss, &sl) == -1 ||
      getnameinfo ((struct sockaddr *) &ss, sl, host, sizeof host,
                   serv, sizeof serv, NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    snprintf (buf, len, "unix:fd%d", fd);
    return;
  }
  snprintf (buf, len, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s",
            host, serv);
}

static void
accept_cb (struct ev_loop *loop, ev_io *w, int revents)
{
  struct listener *l = container_of (w, struct listener, io);

  for (int i = 0; i < 16; ++i) {
    char peer[NI_MAXHOST + NI_MAXSERV + 8];
    CLEANUP_ERROR struct error *err = NULL;
    int fd = accept4 (l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

    if (fd == -1) {
      if (errno == EINTR || errno == ECONNABORTED)
        continue;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
          errno == ENOMEM) {
        if (!backing_off) {
          /* Once per episode, not every 100 ms. */
          if (!emfile_warned)
            nbdd_warn ("accept: %m: pausing for 100 ms at a time");
          emfile_warned = true;
          listeners_pause (loop, true);
          backing_off = true;
          ev_timer_set (&retry_timer, 0.1, 0.);
          ev_timer_start (loop, &retry_timer);
        }
      }
      break;
    }
    emfile_warned = false;
    if (shutting_down) {
      close (fd);
      continue;
    }
    /* At the limit, a client still in the handshake makes room: idle
     * handshakes must not lock real clients out.
     */
    if (config.max_connections && conn_count () >= config.max_connections &&
        !conn_evict_handshake ()) {
      nbdd_info ("refusing a connection: %u connections already "
                 "(--max-connections)", conn_count ());
      close (fd);
      continue;
    }
    if (l->is_tcp) {
      int one = 1;
      setsockopt (fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      /* Vanished peers are noticed and their slot freed. */
      setsockopt (fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    }
    /* Room for a few large replies, so a worker's writev of a 256 KiB
     * read goes out whole instead of in pieces through the loop.  The
     * kernel caps it at net.core.wmem_max.
     */
    {
      int sndbuf = 2 << 20;
      setsockopt (fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    }
    peer_name (fd, l->is_tcp, peer, sizeof peer);
    if (conn_new (loop, fd, fd, peer, &err) == NULL) {
      nbdd_error ("%s", err->msg);
      close (fd);
    }
    else
      debug ("%s: new connection", peer);
  }
  conns_flush_dirty ();
}

static void
retry_cb (struct ev_loop *loop, ev_timer *w, int revents)
{
  backing_off = false;
  listeners_pause (loop, false);
}

void
listeners_pause (struct ev_loop *loop, bool pause)
{
  if (pause == paused)
    return;
  if (!pause && backing_off)
    return;                     /* still backing off after EMFILE */
  paused = pause;
  for (size_t i = 0; i < nr_listeners; ++i) {
    if (pause)
      ev_io_stop (loop, &listeners[i].io);
    else
      ev_io_start (loop, &listeners[i].io);
  }
}

static struct listener *
listener_add (int fd, bool is_tcp, const char *unix_path,
              struct error **errp)
{
  struct listener *nl = realloc (listeners,
                                 (nr_listeners + 1) * sizeof *nl);

  if (nl == NULL) {
    error_setg_errno (errp, errno, "listen");
    return NULL;
  }
  listeners = nl;
  nl = &listeners[nr_listeners++];
  nl->fd = fd;
  nl->is_tcp = is_tcp;
  nl->unix_path = NULL;
  if (unix_path && (nl->unix_path = strdup (unix_path)) == NULL) {
    error_setg_errno (errp, errno, "listen");
    nr_listeners--;
    return NULL;
  }
  return nl;
}

static int
listen_unix (const char *path, struct error **errp)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  struct stat st;
  int fd;

  if (strlen (path) >= sizeof sun.sun_path) {
    error_setg (errp, "listen: unix socket path is too long: %s", path);
    return -1;
  }
  strcpy (sun.sun_path, path);
  /* A stale socket from an earlier run is replaced; anything else at
   * the path is left alone.
   */
  if (lstat (path, &st) == 0 && S_ISSOCK (st.st_mode))
    unlink (path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd == -1) {
    error_setg_errno (errp, errno, "listen: socket");
    return -1;
  }
  if (bind (fd, (struct sockaddr *) &sun, sizeof sun) == -1 ||
      listen (fd, SOMAXCONN) == -1) {
    error_setg_errno (errp, errno, "listen: unix:%s", path);
    close (fd);
    return -1;
  }
  if (listener_add (fd, false, path, errp) == NULL) {
    close (fd);
    unlink (path);
    return -1;
  }
  return 0;
}

static int
listen_tcp (const char *hostport, struct error **errp)
{
  char host[256];
  const char *port, *h = hostport;
  size_t hlen;
  struct addrinfo hints = {
    .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
    .ai_flags = AI_PASSIVE | AI_ADDRCONFIG | AI_NUMERICSERV,
  }, *ai, *a;
  int r, bound = 0;

  /* HOST:PORT, [IPV6]:PORT, or :PORT for every address. */
  if (*h == '[') {
    const char *close_br = strchr (h, ']');
    if (close_br == NULL || close_br[1] != ':')
      goto bad;
    h++;
    hlen = close_br - h;
    port = close_br + 2;
  }
  else {
    port = strrchr (h, ':');
    if (port == NULL)
      goto bad;
    hlen = port - h;
    port++;
  }
  if (hlen >= sizeof host || *port == '\0')
    goto bad;
  memcpy (host, h, hlen);
  host[hlen] = '\0';

  r = getaddrinfo (hlen ? host : NULL, port, &hints, &ai);
  if (r != 0) {
    error_setg (errp, "listen: tcp:%s: %s", hostport, gai_strerror (r));
    return -1;
  }
  for (a = ai; a; a = a->ai_next) {
    int one = 1;
    int fd = socket (a->ai_family,
                     a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                     a->ai_protocol);
    if (fd == -1)
      continue;
    setsockopt (fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (a->ai_family == AF_INET6)
      setsockopt (fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind (fd, a->ai_addr, a->ai_addrlen) == -1 ||
        listen (fd, SOMAXCONN) == -1) {
      error_setg_errno (errp, errno, "listen: tcp:%s", hostport);
      close (fd);
      freeaddrinfo (ai);
      return -1;
    }
    if (listener_add (fd, true, NULL, errp) == NULL) {
      close (fd);
      freeaddrinfo (ai);
      return -1;
    }
    bound++;
  }
  freeaddrinfo (ai);
  if (bound == 0) {
    error_setg (errp, "listen: tcp:%s: no usable address", hostport);
    return -1;
  }
  return 0;

 bad:
  error_setg (errp, "listen: expected tcp:HOST:PORT or tcp:[IPV6]:PORT, "
              "got 'tcp:%.80s'", hostport);
  return -1;
}

/* systemd socket activation: LISTEN_PID is us, LISTEN_FDS counts the
 * sockets from fd 3 on.  Returns the number taken over, or -1.
 */
static int
listen_activation (struct error **errp)
{
  const char *spid = getenv ("LISTEN_PID"), *sfds = getenv ("LISTEN_FDS");
  uint64_t pid, nfds;

  if (spid == NULL || sfds == NULL)
    return 0;
  if (parse_uint64 (spid, &pid) == -1 || pid != (uint64_t) getpid ())
    return 0;
  if (parse_uint64 (sfds, &nfds) == -1 || nfds == 0 || nfds > 64) {
    error_setg (errp, "socket activation: invalid LISTEN_FDS '%.20s'",
                sfds);
    return -1;
  }
  for (uint64_t i = 0; i < nfds; ++i) {
    int fd = FIRST_SOCKET_ACTIVATION_FD + i;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname (fd, (struct sockaddr *) &ss, &sl) == -1) {
      error_setg_errno (errp, errno, "socket activation: fd %d", fd);
      return -1;
    }
    set_nonblock_cloexec (fd);
    if (listener_add (fd, ss.ss_family != AF_UNIX, NULL, errp) == NULL)
      return -1;
  }
  unsetenv ("LISTEN_PID");
  unsetenv ("LISTEN_FDS");
  unsetenv ("LISTEN_FDNAMES");
  return nfds;
}

/* A start-up that fails after the sockets were made (a bad catalogue)
 * must not leave their files behind.  listeners_close empties the list
 * on a normal exit, and the parent of a daemonizing fork uses _exit.
 */
static void
unlink_at_exit (void)
{
  for (size_t i = 0; i < nr_listeners; ++i)
    if (listeners[i].unix_path)
      unlink (listeners[i].unix_path);
}

int
listeners_open (struct ev_loop *loop, struct error **errp)
{
  int r = listen_activation (errp);

  atexit (unlink_at_exit);

  if (r == -1)
    return -1;
  for (size_t i = 0; i < config.nr_listen; ++i) {
    const char *spec = config.listen[i].spec;
    if (strncmp (spec, "unix:", 5) == 0)
      r = listen_unix (spec + 5, errp);
    else if (strncmp (spec, "tcp:", 4) == 0)
      r = listen_tcp (spec + 4, errp);
    else {
      error_setg (errp, "listen: expected unix:PATH or tcp:HOST:PORT, "
                  "got '%.80s'", spec);
      r = -1;
    }
    if (r == -1)
      return -1;
  }
  if (nr_listeners == 0) {
    error_setg (errp, "nothing to listen on: use --listen, --stdio or "
                "socket activation");
    return -1;
  }
  /* One-shot: inactive again by the time its callback runs. */
  ev_timer_init (&retry_timer, retry_cb, 0.1, 0.);
  for (size_t i = 0; i < nr_listeners; ++i) {
    ev_io_init (&listeners[i].io, accept_cb, listeners[i].fd, EV_READ);
    ev_io_start (loop, &listeners[i].io);
  }
  return 0;
}

void
listeners_close (struct ev_loop *loop)
{
  ev_timer_stop (loop, &retry_timer);
  for (size_t i = 0; i < nr_listeners; ++i) {
    ev_io_stop (loop, &listeners[i].io);
    close (listeners[i].fd);
    if (listeners[i].unix_path) {
      unlink (listeners[i].unix_path);
      free (listeners[i].unix_path);
    }
  }
  free (listeners);
  listeners = NULL;
  nr_listeners = 0;
}
