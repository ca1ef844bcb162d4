/* nbdd: serve block graphs over NBD.
 *
 * Start-up order matters: the command line's nodes are opened first
 * (so a bad --blockdev fails before anything listens), then the
 * listeners, then the daemon forks (threads and SQLite would not
 * survive the fork), then the catalogue is read and the exports made,
 * then the workers start and the pidfile announces that clients may
 * connect.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef HAVE_SYS_PRCTL_H
#include <sys/prctl.h>
#endif

#include "internal.h"
#include "job.h"
#include "log.h"
#include "options.h"

static void
die (struct error *err)
{
  nbdd_error ("%s", err->msg);
  error_free (err);
  exit (EXIT_FAILURE);
}

/* The command line's nodes: after the fork (an nbd node's threads
 * would not cross it), before the parent hears that we are ready, so
 * that a bad --blockdev is on the terminal and in its exit status.
 */
static void
open_cli_nodes (void)
{
  struct error *err = NULL;

  for (size_t i = 0; i < config.nr_blockdevs; ++i) {
    struct json_object *spec = spec_parse (config.blockdevs[i], &err);
    struct node *node;

    if (spec == NULL) {
      error_prepend (&err, "--blockdev");
      die (err);
    }
    node = node_open_spec (spec, &err);
    json_object_put (spec);
    if (node == NULL) {
      error_prepend (&err, "--blockdev");
      die (err);
    }
  }
}

/* The catalogue (after the fork: SQLite must not cross one) with its
 * nodes, which may use the command line's, and its exports; then the
 * command line's exports, which may use any node.  Command-line
 * definitions are applied, never recorded.
 */
static void
open_recorded_and_exports (void)
{
  struct error *err = NULL;

  state_open ();
  state_open_exports ();
  for (size_t i = 0; i < config.nr_exports; ++i)
    if (export_add_spec (config.exports[i], &err) == -1) {
      error_prepend (&err, "--export");
      die (err);
    }
}

/* Every node holds a descriptor, and a catalogue may hold thousands of
 * them: take all the descriptors we are allowed.
 */
static void
raise_fd_limit (void)
{
  struct rlimit rl;

  if (getrlimit (RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit (RLIMIT_NOFILE, &rl) == -1)
      nbdd_warn ("cannot raise the descriptor limit: %m");
  }
}

static void
make_state_dir (void)
{
  if (config.state_dir == NULL)
    return;
  if (mkdir (config.state_dir, 0700) == -1 && errno != EEXIST) {
    nbdd_error ("--state-dir: cannot create '%s': %m", config.state_dir);
    exit (EXIT_FAILURE);
  }
}

static void
write_pidfile (void)
{
  char tmp[4096], buf[32];
  int fd, len;

  if (config.pidfile == NULL)
    return;
  /* Written whole under a temporary name, then renamed: a reader never
   * sees a partial pid.
   */
  snprintf (tmp, sizeof tmp, "%s.tmp", config.pidfile);
  len = snprintf (buf, sizeof buf, "%d\n", (int) getpid ());
  fd = open (tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd == -1 || full_write (fd, buf, len) < 0 || close (fd) == -1 ||
      rename (tmp, config.pidfile) == -1) {
    nbdd_error ("--pidfile: cannot write '%s': %m", config.pidfile);
    exit (EXIT_FAILURE);
  }
}

/* Fork into the background.  The parent waits until the child says it
 * is ready (or dies), so that "nbdd --pidfile P; cat P" works and a
 * start-up failure is the parent's exit status.  Returns the pipe the
 * child writes its readiness to.
 */
static int
daemonize (void)
{
  int ready[2], fd;
  pid_t pid;
  char c;

  if (pipe2 (ready, O_CLOEXEC) == -1) {
    nbdd_error ("pipe: %m");
    exit (EXIT_FAILURE);
  }
  pid = fork ();
  if (pid == -1) {
    nbdd_error ("fork: %m");
    exit (EXIT_FAILURE);
  }
  if (pid > 0) {
    close (ready[1]);
    _exit (read (ready[0], &c, 1) == 1 ? EXIT_SUCCESS : EXIT_FAILURE);
  }
  close (ready[0]);
  setsid ();
  fd = open ("/dev/null", O_RDWR);
  if (fd >= 0) {
    dup2 (fd, 0);
    dup2 (fd, 1);
    if (fd > 2)
      close (fd);
  }
  return ready[1];
}

/* Tell the waiting parent we are serving; errors go to syslog now. */
static void
daemon_ready (int ready_fd)
{
  int fd;

  if (ready_fd < 0)
    return;
  if (write (ready_fd, "", 1) != 1)
    nbdd_warn ("cannot signal readiness to the parent: %m");
  close (ready_fd);
  log_init ("nbdd", true);
  fd = open ("/dev/null", O_RDWR);
  if (fd >= 0) {
    dup2 (fd, 2);
    if (fd > 2)
      close (fd);
  }
}

static void
sighup_cb (struct ev_loop *loop, ev_signal *w, int revents)
{
  tls_reload ();
}

static void
signal_cb (struct ev_loop *loop, ev_signal *w, int revents)
{
  nbdd_info ("received signal %d: shutting down", w->signum);
  daemon_quit ();
}

int
main (int argc, char **argv)
{
  struct ev_loop *loop;
  ev_signal sigterm, sigint, sighup;
  struct error *err = NULL;
  int ready_fd = -1;

  signal (SIGPIPE, SIG_IGN);
  config_parse (argc, argv);
  log_init ("nbdd", false);

#if defined (HAVE_SYS_PRCTL_H) && defined (PR_SET_PDEATHSIG)
  if (config.exit_with_parent) {
    prctl (PR_SET_PDEATHSIG, SIGTERM);
    if (getppid () == 1)        /* the parent is already gone */
      exit (EXIT_SUCCESS);
  }
#endif

  raise_fd_limit ();
  make_state_dir ();
  state_lock ();
  /* Raw nodes keep their persistent bitmaps here. */
  if (config.state_dir) {
    char *dir;
    if (asprintf (&dir, "%s/bitmaps", config.state_dir) == -1)
      exit (EXIT_FAILURE);
    dirty_bitmaps_sidecar_dir (dir);
    free (dir);
  }
  if (tls_init (&err) == -1)
    die (err);

  loop = ev_default_loop (EVFLAG_AUTO | EVFLAG_NOSIGMASK);
  if (loop == NULL) {
    nbdd_error ("cannot initialise the event loop");
    exit (EXIT_FAILURE);
  }

  qmp_init ();
  fleece_init (loop);
  qmp_jobs_init (loop);

  if (!config.stdio && listeners_open (loop, &err) == -1)
    die (err);
  if (config.admin_socket &&
      admin_open (loop, config.admin_socket, config.admin_group, &err) == -1)
    die (err);
  if (!config.foreground)
    ready_fd = daemonize ();
  open_cli_nodes ();
  open_recorded_and_exports ();
  if (workers_start (loop, config.threads, &err) == -1)
    die (err);

  ev_signal_init (&sigterm, signal_cb, SIGTERM);
  ev_signal_start (loop, &sigterm);
  ev_unref (loop);
  ev_signal_init (&sigint, signal_cb, SIGINT);
  ev_signal_start (loop, &sigint);
  ev_unref (loop);
  ev_signal_init (&sighup, sighup_cb, SIGHUP);
  ev_signal_start (loop, &sighup);
  ev_unref (loop);

  if (config.stdio) {
    int fl0 = fcntl (0, F_GETFL), fl1 = fcntl (1, F_GETFL);
    struct conn *c;
    if (fl0 != -1)
      fcntl (0, F_SETFL, fl0 | O_NONBLOCK);
    if (fl1 != -1)
      fcntl (1, F_SETFL, fl1 | O_NONBLOCK);
    c = conn_new (loop, 0, 1, "stdio", &err);
    if (c == NULL)
      die (err);
    c->exit_loop_on_close = true;
    conns_flush_dirty ();
  }
  write_pidfile ();
  daemon_ready (ready_fd);
  debug ("ready: %zu node specs, %zu exports", config.nr_blockdevs,
         export_count ());

  loop_run (loop);

  /* Orderly shutdown: stop accepting, drop clients, let the workers
   * finish what they hold, then close exports and nodes.
   */
  shutting_down = true;
  admin_close ();
  listeners_close (loop);
  conns_close_all ("shutting down");
  /* After the clients are gone: none of them is told EIO for it. */
  graph_begin_shutdown ();      /* no waiting for remote servers */
  jobs_cancel_all ();
  workers_stop ();
  conns_flush_dirty ();
  pipes_free_all ();
  export_close_all ();
  node_close_all ();
  state_close ();
  dirty_bitmaps_sidecar_dir (NULL);
  ev_ref (loop);
  ev_signal_stop (loop, &sigterm);
  ev_ref (loop);
  ev_signal_stop (loop, &sigint);
  ev_ref (loop);
  ev_signal_stop (loop, &sighup);
  ev_loop_destroy (loop);
  tls_deinit ();
  if (config.pidfile)
    unlink (config.pidfile);
  config_free ();
  return EXIT_SUCCESS;
}
