/* nbdctl: control a running nbdd through its admin socket.
 *
 * nbdctl [--socket PATH | --state-dir DIR] [--json] COMMAND [ARGS]
 *
 * Global options stop at the command; each command parses its own
 * arguments (nbdctl-cmds.c) before anything is sent, so a usage error
 * never reaches the daemon.  The connection is opened on the first
 * call, and each call is one QMP command (nbdctl-qmp.c).
 */
#include <config.h>

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>

#include "cleanup.h"
#include "nbdctl.h"
#include "utils.h"

/* Where the packaged nbdd.conf puts it: the state dir is 0700, so a
 * socket in it would serve root and nbdd only.
 */
#define DEFAULT_SOCKET "/run/nbdd/admin.sock"

void
out_of_memory (void)
{
  fprintf (stderr, "nbdctl: out of memory\n");
  exit (EXIT_LOCAL);
}

void *
check_alloc (void *p)
{
  if (p == NULL)
    out_of_memory ();
  return p;
}

void
print_json (struct json_object *v)
{
  const char *s = json_object_to_json_string_ext (v,
                                                  JSON_C_TO_STRING_PRETTY |
                                                  JSON_C_TO_STRING_SPACED |
                                                  JSON_C_TO_STRING_NOSLASHESCAPE);

  if (s == NULL)
    out_of_memory ();
  printf ("%s\n", s);
}

void
ctl_error (const char *fs, ...)
{
  CLEANUP_FREE char *msg = NULL, *escaped = NULL;
  va_list args;
  int r;

  va_start (args, fs);
  r = vasprintf (&msg, fs, args);
  va_end (args);
  if (r == -1)
    out_of_memory ();
  escaped = escape_text (msg);
  fprintf (stderr, "nbdctl: %s\n", escaped);
}

/* Is @c in group @group ("node" for "node add")?  NULL: every group. */
static bool
in_group (const struct command *c, const char *group)
{
  size_t len;

  if (group == NULL)
    return true;
  len = strlen (group);
  return strncmp (c->name, group, len) == 0 && c->name[len] == ' ';
}

/* The commands of @group (NULL: all), one or more lines each. */
static void
print_commands (FILE *fp, const char *group)
{
  for (const struct command *c = commands; c->name; ++c) {
    int len;

    if (!in_group (c, group))
      continue;
    len = fprintf (fp, "  %s%s%s", c->name, *c->brief ? " " : "", c->brief);
    if (len > 30) {
      fputc ('\n', fp);
      len = 0;
    }
    fprintf (fp, "%*s", 31 - len, "");
    print_wrapped (fp, c->help, 31, 31);
  }
}

static void
usage (FILE *fp)
{
  fprintf (fp,
"Usage: nbdctl [--socket PATH | --state-dir DIR] [--json] COMMAND [ARGS]\n"
"Control a running nbdd through its admin socket (QMP).\n"
"\n"
"Options:\n"
"  --socket PATH      the admin socket (default $NBDD_ADMIN_SOCKET, else\n"
"                     " DEFAULT_SOCKET ")\n"
"  --state-dir DIR    use DIR/admin.sock, the socket of nbdd --state-dir DIR\n"
"  --json             print the daemon's return value as JSON, not a table\n"
"  --timeout SECONDS  give up waiting for the daemon (default: wait)\n"
"  --help, --version\n"
"\n"
"Commands (COMMAND --help for its options):\n");
  print_commands (fp, NULL);
  fprintf (fp,
"\n"
"Sizes take K, M, G and T suffixes (powers of 1024).  The daemon opens\n"
"the files named in node specs: give absolute paths there.\n"
"\n"
"Scripts should use --json.  Tables are for people: control characters,\n"
"backslashes and invalid UTF-8 in them, and in the daemon's messages,\n"
"are escaped (\\n, \\t, \\\\, \\xNN).\n"
"\n"
"Exit status:\n"
"  0  success\n"
"  1  the daemon refused the command (its reason is printed on stderr\n"
"     as 'nbdctl: REASON'); for job wait, the job failed, was cancelled\n"
"     or ended before it was ready\n"
"  2  usage error\n"
"  3  cannot reach the daemon: no socket, nobody listening, access\n"
"     denied, connection lost or --timeout passed\n"
"  4  nbdctl itself failed: out of memory, no working directory, or\n"
"     cannot write its output\n");
}

void
print_wrapped (FILE *fp, const char *text, size_t col, size_t indent)
{
  bool first = true;

  text += strspn (text, " ");
  while (*text) {
    size_t word = strcspn (text, " ");

    if (!first && col + 1 + word > 79) {
      fprintf (fp, "\n%*s", (int) indent, "");
      col = indent;
    }
    else if (!first) {
      fputc (' ', fp);
      col++;
    }
    fprintf (fp, "%.*s", (int) word, text);
    col += word;
    first = false;
    text += word;
    text += strspn (text, " ");
  }
  fputc ('\n', fp);
}

/* Say what to do about a socket we cannot reach. */
static void
connect_hint (const struct nbdctl *ctl, int errnum)
{
  switch (errnum) {
  case ENOENT: case ECONNREFUSED: case ENOTDIR:
    ctl_error ("is nbdd running with --admin-socket or --state-dir?  Name "
               "its socket with --socket PATH or --state-dir DIR, or set "
               "NBDD_ADMIN_SOCKET");
    break;
  case EACCES: case EPERM:
    /* connect needs search permission on every directory above the
     * socket and write permission on the socket itself.
     */
    ctl_error ("%s serves root, the daemon's user and the group given to "
               "nbdd --admin-group: run nbdctl as one of them.  Each "
               "directory above the socket must also let them through (x "
               "permission): nbdd makes its --state-dir 0700, so for the "
               "group put the socket elsewhere with nbdd --admin-socket",
               ctl->socket);
    break;
  }
}

int
ctl_call_msg (struct nbdctl *ctl, struct json_object *msg,
              struct json_object **ret)
{
  CLEANUP_ERROR struct error *err = NULL;
  struct json_object *v = NULL;
  int r;

  if (ctl->qmp == NULL) {
    ctl->qmp = qmp_open (ctl->socket, ctl->timeout_ms, &err);
    if (ctl->qmp == NULL) {
      json_object_put (msg);
      ctl_error ("%s", err->msg);
      connect_hint (ctl, err->errnum);
      return EXIT_UNREACHABLE;
    }
  }
  r = qmp_execute_msg (ctl->qmp, msg, &v, &err);
  if (r != EXIT_OK) {
    ctl_error ("%s", err->msg);
    return r;
  }
  if (ret)
    *ret = v;
  else
    json_object_put (v);
  return EXIT_OK;
}

int
ctl_call (struct nbdctl *ctl, const char *cmd, struct json_object *args,
          struct json_object **ret)
{
  struct json_object *msg = check_alloc (json_object_new_object ());

  json_object_object_add (msg, "execute",
                          check_alloc (json_object_new_string (cmd)));
  if (args)
    json_object_object_add (msg, "arguments", args);
  return ctl_call_msg (ctl, msg, ret);
}

/* How many of argv's words @name ("node add") matches, or 0. */
static int
match_command (const char *name, int argc, char **argv)
{
  int n = 0;

  while (*name) {
    size_t len = strcspn (name, " ");
    if (n >= argc || strlen (argv[n]) != len ||
        strncmp (argv[n], name, len) != 0)
      return 0;
    n++;
    name += len + strspn (name + len, " ");
  }
  return n;
}

/* A first word that only starts commands ("node"): list them, on
 * stdout for "nbdctl node --help", else as a usage error.
 */
static int
unknown_command (int argc, char **argv)
{
  bool group = false;

  if (argc == 2 && (strcmp (argv[1], "--help") == 0 ||
                    strcmp (argv[1], "-h") == 0)) {
    for (const struct command *c = commands; c->name && !group; ++c)
      group = in_group (c, argv[0]);
    if (group) {
      printf ("Usage: nbdctl [OPTIONS] %s SUBCOMMAND [ARGS]\n"
              "Subcommands (SUBCOMMAND --help for its options):\n",
              argv[0]);
      print_commands (stdout, argv[0]);
      return EXIT_OK;
    }
  }
  for (const struct command *c = commands; c->name; ++c)
    if (in_group (c, argv[0])) {
      if (!group)
        fprintf (stderr, "nbdctl: %s: %s; one of:\n", argv[0],
                 argc > 1 ? "unknown subcommand" : "expected a subcommand");
      group = true;
      fprintf (stderr, "  nbdctl %s %s\n", c->name, c->args);
    }
  if (!group)
    fprintf (stderr, "nbdctl: unknown command '%s'\n"
             "Try 'nbdctl --help' for the list of commands.\n", argv[0]);
  return EXIT_USAGE;
}

enum { OPT_SOCKET = 256, OPT_STATE_DIR, OPT_JSON, OPT_TIMEOUT, OPT_HELP,
       OPT_VERSION };

static const struct option long_options[] = {
  { "socket", required_argument, NULL, OPT_SOCKET },
  { "state-dir", required_argument, NULL, OPT_STATE_DIR },
  { "json", no_argument, NULL, OPT_JSON },
  { "timeout", required_argument, NULL, OPT_TIMEOUT },
  { "help", no_argument, NULL, OPT_HELP },
  { "version", no_argument, NULL, OPT_VERSION },
  { NULL, 0, NULL, 0 },
};

/* Check that what we printed reached stdout: 'nbdctl --json node list
 * >/dev/full' must not exit 0 (gnulib's close_stdout).  Returns @r, or
 * EXIT_LOCAL if the output was lost and @r was success.
 */
static int
close_stdout (int r)
{
  bool lost = false;
  int err = 0;

  if (fflush (stdout) != 0) {
    lost = true;
    err = errno;
  }
  else if (ferror (stdout))
    lost = true;                /* an earlier write; its errno is gone */
  if (fclose (stdout) != 0 && !lost) {
    lost = true;
    err = errno;
  }
  if (!lost)
    return r;
  if (err)
    fprintf (stderr, "nbdctl: cannot write to standard output: %s\n",
             strerror (err));
  else
    fprintf (stderr, "nbdctl: cannot write to standard output\n");
  return r == EXIT_OK ? EXIT_LOCAL : r;
}

/* A usable socket path from @what, or the exit code. */
static int
check_socket_path (const char *what, const char *path)
{
  struct sockaddr_un sun;

  if (*path == '\0') {
    fprintf (stderr, "nbdctl: %s: expected a path, got an empty string\n",
             what);
    return EXIT_USAGE;
  }
  if (strlen (path) >= sizeof sun.sun_path) {
    ctl_error ("%s: '%s' is too long for a unix socket path (at most %zu "
               "bytes)", what, path, sizeof sun.sun_path - 1);
    return EXIT_USAGE;
  }
  return EXIT_OK;
}

static int
nbdctl_main (int argc, char **argv)
{
  struct nbdctl ctl = { .timeout_ms = -1 };
  const char *state_dir = NULL, *socket_from = "--socket";
  CLEANUP_FREE char *socket_buf = NULL, *prog = NULL;
  const struct command *cmd = NULL;
  int c, words = 0, first, r;
  uint32_t secs;

  /* '+': stop at the command, whose options are its own. */
  while ((c = getopt_long (argc, argv, "+h", long_options, NULL)) != -1) {
    switch (c) {
    case OPT_SOCKET:
      ctl.socket = optarg;
      break;
    case OPT_STATE_DIR:
      state_dir = optarg;
      break;
    case OPT_JSON:
      ctl.json = true;
      break;
    case OPT_TIMEOUT:
      if (parse_uint32 (optarg, &secs) == -1 || secs == 0 || secs > 86400) {
        fprintf (stderr, "nbdctl: --timeout: expected seconds from 1 to "
                 "86400, got '%s'\n", optarg);
        return EXIT_USAGE;
      }
      ctl.timeout_ms = secs * 1000;
      break;
    case 'h': case OPT_HELP:
      usage (stdout);
      return EXIT_OK;
    case OPT_VERSION:
      printf ("nbdctl %s\n", PACKAGE_VERSION);
      return EXIT_OK;
    default:
      fprintf (stderr, "Try 'nbdctl --help' for more information.\n");
      return EXIT_USAGE;
    }
  }
  if (ctl.socket && state_dir) {
    fprintf (stderr, "nbdctl: give --socket or --state-dir, not both\n");
    return EXIT_USAGE;
  }
  if (state_dir) {
    if (*state_dir == '\0') {
      fprintf (stderr, "nbdctl: --state-dir: expected a directory, got an "
               "empty string\n");
      return EXIT_USAGE;
    }
    if (asprintf (&socket_buf, "%s/admin.sock", state_dir) == -1)
      out_of_memory ();
    ctl.socket = socket_buf;
    socket_from = "--state-dir";
  }
  if (ctl.socket == NULL) {
    /* An empty variable is an unset one, as for most programs. */
    ctl.socket = getenv ("NBDD_ADMIN_SOCKET");
    socket_from = "NBDD_ADMIN_SOCKET";
    if (ctl.socket && *ctl.socket == '\0')
      ctl.socket = NULL;
  }
  if (ctl.socket == NULL)
    ctl.socket = DEFAULT_SOCKET;
  r = check_socket_path (socket_from, ctl.socket);
  if (r != EXIT_OK)
    return r;

  if (optind >= argc) {
    fprintf (stderr, "nbdctl: expected a command\n"
             "Try 'nbdctl --help' for the list of commands.\n");
    return EXIT_USAGE;
  }
  if (strcmp (argv[optind], "help") == 0) {
    usage (stdout);
    return EXIT_OK;
  }
  for (const struct command *k = commands; k->name; ++k) {
    words = match_command (k->name, argc - optind, argv + optind);
    if (words > 0) {
      cmd = k;
      break;
    }
  }
  if (cmd == NULL)
    return unknown_command (argc - optind, argv + optind);

  /* The command sees argv[0] = "nbdctl node add", then its arguments. */
  if (asprintf (&prog, "nbdctl %s", cmd->name) == -1)
    out_of_memory ();
  first = optind + words - 1;
  argv[first] = prog;
  optind = 0;                   /* glibc: start getopt over */
  r = cmd->run (&ctl, cmd, argc - first, argv + first);
  qmp_close (ctl.qmp);
  return r;
}

int
main (int argc, char **argv)
{
  signal (SIGPIPE, SIG_IGN);    /* a vanished daemon is EPIPE, not death */
  return close_stdout (nbdctl_main (argc, argv));
}
