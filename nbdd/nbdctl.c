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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "nbdctl.h"
#include "utils.h"

#define DEFAULT_SOCKET "/var/lib/nbdd/admin.sock"

void
out_of_memory (void)
{
  fprintf (stderr, "nbdctl: out of memory\n");
  exit (EXIT_REFUSED);
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
  for (const struct command *c = commands; c->name; ++c) {
    int len = fprintf (fp, "  %s%s%s", c->name, *c->brief ? " " : "",
                       c->brief);
    if (len > 30) {
      fputc ('\n', fp);
      len = 0;
    }
    fprintf (fp, "%*s", 31 - len, "");
    print_wrapped (fp, c->help, 31, 31);
  }
  fprintf (fp,
"\n"
"Sizes take K, M, G and T suffixes (powers of 1024).  The daemon opens\n"
"the files named in node specs: give absolute paths there.\n"
"\n"
"Exit status:\n"
"  0  success\n"
"  1  the daemon refused the command (its reason is printed on stderr\n"
"     as 'nbdctl: REASON')\n"
"  2  usage error\n"
"  3  cannot reach the daemon: no socket, nobody listening, access\n"
"     denied, connection lost or --timeout passed\n");
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
    fprintf (stderr, "nbdctl: is nbdd running with --state-dir or "
             "--admin-socket?  Name its socket with --socket PATH or "
             "--state-dir DIR, or set NBDD_ADMIN_SOCKET\n");
    break;
  case EACCES: case EPERM:
    fprintf (stderr, "nbdctl: %s serves root, the daemon's user and the "
             "group given to nbdd --admin-group: run nbdctl as one of "
             "them\n", ctl->socket);
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
      fprintf (stderr, "nbdctl: %s\n", err->msg);
      connect_hint (ctl, err->errnum);
      return EXIT_UNREACHABLE;
    }
  }
  r = qmp_execute_msg (ctl->qmp, msg, &v, &err);
  if (r != EXIT_OK) {
    fprintf (stderr, "nbdctl: %s\n", err->msg);
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

/* A first word that only starts commands ("node"): list them. */
static int
unknown_command (int argc, char **argv)
{
  size_t len = strlen (argv[0]);
  bool group = false;

  for (const struct command *c = commands; c->name; ++c)
    if (strncmp (c->name, argv[0], len) == 0 && c->name[len] == ' ') {
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

int
main (int argc, char **argv)
{
  struct nbdctl ctl = { .timeout_ms = -1 };
  const char *state_dir = NULL;
  CLEANUP_FREE char *socket_buf = NULL, *prog = NULL;
  const struct command *cmd = NULL;
  int c, words = 0, first, r;
  uint32_t secs;

  signal (SIGPIPE, SIG_IGN);    /* a vanished daemon is EPIPE, not death */

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
    if (asprintf (&socket_buf, "%s/admin.sock", state_dir) == -1)
      out_of_memory ();
    ctl.socket = socket_buf;
  }
  if (ctl.socket == NULL)
    ctl.socket = getenv ("NBDD_ADMIN_SOCKET");
  if (ctl.socket == NULL || *ctl.socket == '\0')
    ctl.socket = DEFAULT_SOCKET;

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
