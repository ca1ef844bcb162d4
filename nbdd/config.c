/* Command line and config file parsing.
 *
 * Both go through one handler, handle_option: a config file line
 * "key = value" is the long option --key with that argument, so every
 * option is checked in one place and a file cannot drift from the
 * command line.  Precedence: the file named by --config is read first,
 * wherever --config stands on the command line; command-line options
 * are applied after it, so they replace the file's single-valued
 * settings and add to its lists (listen, blockdev, export), whose
 * entries come first.  Messages about a file line say FILE:LINE.
 *
 * Flags take an optional yes/no argument on the command line too
 * (--tls-verify-peer=no), so that the command line can turn off what
 * the file turned on.
 */
#include <config.h>

#include <errno.h>
#include <getopt.h>
#include <grp.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "cleanup.h"
#include "internal.h"
#include "log.h"

struct config config = {
  .threads = 16,
  .max_connections = 100,
  .handshake_timeout = 10,
  .poll_max_ns = 64000,
};

static void
usage (FILE *fp)
{
  fprintf (fp,
"Usage: nbdd [OPTIONS] --blockdev SPEC... --export SPEC...\n"
"       nbdd --config FILE [OPTIONS]\n"
"Serve block graphs over the NBD protocol.\n"
"\n"
"Listening:\n"
"  --listen unix:PATH          listen on a unix domain socket\n"
"  --listen tcp:HOST:PORT      listen on TCP (tcp:[::1]:PORT for IPv6)\n"
"  --stdio                     serve one connection on stdin/stdout\n"
"  (with LISTEN_PID/LISTEN_FDS set, sockets come from systemd)\n"
"\n"
"Graph and exports (qemu-storage-daemon syntax, JSON or key=value):\n"
"  --blockdev SPEC             e.g. driver=raw,node-name=disk0,\n"
"                                   file.driver=file,file.filename=x.img\n"
"  --export SPEC               type=nbd,id=ID,node-name=NODE[,name=NAME]\n"
"                                   [,writable=on][,description=TEXT]\n"
"                                   [,tls-required=on][,tls-allow=IDENTITY]\n"
"\n"
"TLS (reload credentials with SIGHUP):\n"
"  --tls off|on|require        offer STARTTLS (on) or insist on it (require)\n"
"  --tls-certificates DIR      ca-cert.pem, server-cert.pem, server-key.pem\n"
"                              [, ca-crl.pem]\n"
"  --tls-verify-peer[=no]      require a client certificate signed by the CA\n"
"  --tls-psk FILE              PSK keys in psktool's format (user:hexkey)\n"
"\n"
"Admin socket (QMP; see nbdctl):\n"
"  --admin-socket PATH         default STATE_DIR/admin.sock with --state-dir,\n"
"                              else none\n"
"  --admin-group GROUP         members of GROUP may use it too (mode 0660;\n"
"                              they cannot reach it in the 0700 state dir:\n"
"                              give --admin-socket too)\n"
"\n"
"Daemon:\n"
"  --config FILE               read options from FILE first (see below)\n"
"  -f, --foreground[=no]       do not fork into the background\n"
"  --state-dir DIR             directory for the daemon's state\n"
"  --pidfile FILE              write the pid once ready to serve\n"
"  --threads N                 I/O worker threads (default %u)\n"
"  --max-connections N         0 = unlimited (default %u)\n"
"  --handshake-timeout SECONDS 0 = none (default %g)\n"
"  --poll-max-ns N             poll this long at most before sleeping,\n"
"                              adapting to the clients; 0 = never\n"
"                              (default %" PRIu64 ")\n"
"  --exit-with-parent[=no]     exit when the parent process exits\n"
"  -v, --verbose[=N]           more messages (repeat, or N=2, for\n"
"                              per-request ones; =0 or =no for none)\n"
"  --version                   print the version and exit\n"
"  --help                      print this help and exit\n"
"\n"
"Flags (--foreground, --stdio, --exit-with-parent, --tls-verify-peer)\n"
"take an optional =yes/no, =on/off or =true/false (--stdio=no).\n"
"\n"
"Config file: one option per line, 'key = value' or 'key value', the key\n"
"being the long option without '--' (listen, state-dir, blockdev, ...).\n"
"The value is the rest of the line, as written (no quoting).  A '#' at\n"
"the start of a line or after a blank starts a comment; blank lines are\n"
"ignored.  Flags take yes/no ('tls-verify-peer = yes'; a bare key means\n"
"yes).  Paths (state-dir, pidfile, admin-socket, tls-certificates,\n"
"tls-psk, listen unix:) must be absolute.  listen, blockdev and export\n"
"may be repeated; other keys may appear once.  The file is read before\n"
"the command line wherever --config stands: options given on the\n"
"command line replace the file's settings, and add to its listen,\n"
"blockdev and export lines.\n",
           config.threads, config.max_connections,
           config.handshake_timeout, config.poll_max_ns);
}

enum {
  OPT_LISTEN = 256, OPT_STDIO, OPT_STATE_DIR, OPT_PIDFILE, OPT_THREADS,
  OPT_MAX_CONNECTIONS, OPT_HANDSHAKE_TIMEOUT, OPT_EXIT_WITH_PARENT,
  OPT_BLOCKDEV, OPT_EXPORT, OPT_VERSION, OPT_HELP, OPT_TLS,
  OPT_TLS_CERTIFICATES, OPT_TLS_VERIFY_PEER, OPT_TLS_PSK, OPT_POLL_MAX_NS,
  OPT_CONFIG, OPT_ADMIN_SOCKET, OPT_ADMIN_GROUP,
};

static const struct option long_options[] = {
  { "listen", required_argument, NULL, OPT_LISTEN },
  { "stdio", optional_argument, NULL, OPT_STDIO },
  { "foreground", optional_argument, NULL, 'f' },
  { "state-dir", required_argument, NULL, OPT_STATE_DIR },
  { "pidfile", required_argument, NULL, OPT_PIDFILE },
  { "threads", required_argument, NULL, OPT_THREADS },
  { "max-connections", required_argument, NULL, OPT_MAX_CONNECTIONS },
  { "handshake-timeout", required_argument, NULL, OPT_HANDSHAKE_TIMEOUT },
  { "exit-with-parent", optional_argument, NULL, OPT_EXIT_WITH_PARENT },
  { "poll-max-ns", required_argument, NULL, OPT_POLL_MAX_NS },
  { "blockdev", required_argument, NULL, OPT_BLOCKDEV },
  { "export", required_argument, NULL, OPT_EXPORT },
  { "tls", required_argument, NULL, OPT_TLS },
  { "tls-certificates", required_argument, NULL, OPT_TLS_CERTIFICATES },
  { "tls-verify-peer", optional_argument, NULL, OPT_TLS_VERIFY_PEER },
  { "tls-psk", required_argument, NULL, OPT_TLS_PSK },
  { "admin-socket", required_argument, NULL, OPT_ADMIN_SOCKET },
  { "admin-group", required_argument, NULL, OPT_ADMIN_GROUP },
  { "config", required_argument, NULL, OPT_CONFIG },
  { "verbose", optional_argument, NULL, 'v' },
  { "version", no_argument, NULL, OPT_VERSION },
  { "help", no_argument, NULL, OPT_HELP },
  { NULL, 0, NULL, 0 },
};

/* Where the option being handled comes from, for messages: the command
 * line (src_file NULL) or a config file line.  src_name is the long
 * option's name, or NULL for messages about no option in particular.
 */
static const char *src_file;
static unsigned src_line;
static const char *src_name;

static void __attribute__ ((noreturn, format (printf, 1, 2)))
bad_option (const char *fs, ...)
{
  va_list args;
  int saved_errno = errno;      /* for %m */

  fprintf (stderr, "nbdd: ");
  if (src_file)
    fprintf (stderr, "%s:%u: ", src_file, src_line);
  if (src_name)
    fprintf (stderr, "%s%s: ", src_file ? "" : "--", src_name);
  va_start (args, fs);
  errno = saved_errno;
  vfprintf (stderr, fs, args);
  va_end (args);
  fprintf (stderr, "\nTry 'nbdd --help' for more information.\n");
  exit (EXIT_FAILURE);
}

static char *
xstrdup (const char *s)
{
  char *r = strdup (s);

  if (r == NULL)
    bad_option ("out of memory");
  return r;
}

/* Replace a single-valued string setting. */
static void
set_string (char **field, const char *arg)
{
  if (*arg == '\0')
    bad_option ("expected a value, got an empty string");
  free (*field);
  *field = xstrdup (arg);
}

/* A path from a config file must be absolute: nbdd would resolve a
 * relative one against its working directory, which is / under
 * systemd, not the file's folder.  The command line's are the user's
 * business (they know their cwd).
 */
static void
check_file_path (const char *path)
{
  if (src_file && path[0] != '/')
    bad_option ("'%s' is a relative path: give an absolute one (nbdd "
                "would look for it in its working directory, not next to "
                "this file)", path);
}

/* Replace a single-valued path setting. */
static void
set_path (char **field, const char *arg)
{
  if (*arg != '\0')
    check_file_path (arg);
  set_string (field, arg);
}

static char **
append (char **v, size_t *n, const char *s)
{
  char **nv = realloc (v, (*n + 1) * sizeof *nv);

  if (nv == NULL)
    bad_option ("out of memory");
  nv[*n] = xstrdup (s);
  (*n)++;
  return nv;
}

/* A flag's value: NULL when the flag stands alone (--stdio, or a bare
 * key in the file), else its yes/no.
 */
static bool
flag_value (const char *arg)
{
  bool b;

  if (arg == NULL)
    return true;
  if (parse_bool (arg, &b) == -1)
    bad_option ("expected yes or no (or on/off, true/false), got '%s'", arg);
  return b;
}

static void
check_group (const char *name)
{
  struct group *gr;

  errno = 0;
  gr = getgrnam (name);
  if (gr != NULL)
    return;
  if (errno != 0 && errno != ENOENT && errno != ESRCH)
    bad_option ("cannot look up group '%s': %m", name);
  bad_option ("no such group '%s' (create it with 'groupadd %s', or name "
              "an existing group)", name, name);
}

/* Apply one option: @c is its long_options value, @arg its argument
 * (NULL for a flag given on the command line).  Exits on a bad value.
 */
static void
handle_option (int c, const char *arg)
{
  uint32_t u;

  switch (c) {
  case OPT_LISTEN: {
    struct listen_spec *nl;
    if (strncmp (arg, "unix:", 5) != 0 && strncmp (arg, "tcp:", 4) != 0)
      bad_option ("expected unix:PATH or tcp:HOST:PORT, got '%s'", arg);
    if (strncmp (arg, "unix:", 5) == 0)
      check_file_path (arg + 5);
    nl = realloc (config.listen, (config.nr_listen + 1) * sizeof *nl);
    if (nl == NULL)
      bad_option ("out of memory");
    config.listen = nl;
    nl[config.nr_listen].spec = xstrdup (arg);
    config.nr_listen++;
    break;
  }
  case OPT_STDIO:
    config.stdio = flag_value (arg);
    break;
  case 'f':
    config.foreground = flag_value (arg);
    break;
  case OPT_STATE_DIR:
    set_path (&config.state_dir, arg);
    break;
  case OPT_PIDFILE:
    set_path (&config.pidfile, arg);
    break;
  case OPT_THREADS:
    if (parse_uint32 (arg, &u) == -1 || u == 0 || u > 1024)
      bad_option ("expected a number from 1 to 1024, got '%s'", arg);
    config.threads = u;
    break;
  case OPT_MAX_CONNECTIONS:
    if (parse_uint32 (arg, &u) == -1 || u > 1000000)
      bad_option ("expected a number from 0 to 1000000, got '%s'", arg);
    config.max_connections = u;
    break;
  case OPT_HANDSHAKE_TIMEOUT: {
    char *end;
    double d;
    errno = 0;
    d = strtod (arg, &end);
    if (errno || end == arg || *end != '\0' || !(d >= 0) || d > 86400)
      bad_option ("expected seconds from 0 to 86400, got '%s'", arg);
    config.handshake_timeout = d;
    break;
  }
  case OPT_POLL_MAX_NS:
    if (parse_uint32 (arg, &u) == -1 || u > 10000000)
      bad_option ("expected nanoseconds from 0 to 10000000, got '%s'", arg);
    config.poll_max_ns = u;
    break;
  case OPT_EXIT_WITH_PARENT:
    config.exit_with_parent = flag_value (arg);
    break;
  case OPT_BLOCKDEV:
    config.blockdevs = append (config.blockdevs, &config.nr_blockdevs, arg);
    break;
  case OPT_EXPORT:
    config.exports = append (config.exports, &config.nr_exports, arg);
    break;
  case OPT_TLS:
    if (strcmp (arg, "off") == 0)
      config.tls = TLS_OFF;
    else if (strcmp (arg, "on") == 0)
      config.tls = TLS_ON;
    else if (strcmp (arg, "require") == 0)
      config.tls = TLS_REQUIRE;
    else
      bad_option ("expected off, on or require, got '%s'", arg);
    break;
  case OPT_TLS_CERTIFICATES:
    set_path (&config.tls_certificates, arg);
    break;
  case OPT_TLS_VERIFY_PEER:
    config.tls_verify_peer = flag_value (arg);
    break;
  case OPT_TLS_PSK:
    set_path (&config.tls_psk, arg);
    break;
  case OPT_ADMIN_SOCKET:
    set_path (&config.admin_socket, arg);
    break;
  case OPT_ADMIN_GROUP:
    set_string (&config.admin_group, arg);
    check_group (arg);
    break;
  case OPT_CONFIG:
    /* Read before the rest of the command line: see config_parse. */
    break;
  case 'v': {
    /* How verbose: yes/no or a count, or one more for each bare -v. */
    bool b;
    if (arg == NULL)
      log_verbose++;
    else if (parse_uint32 (arg, &u) == 0 && u <= 2)
      log_verbose = u;
    else if (parse_bool (arg, &b) == 0)
      log_verbose = b;
    else
      bad_option ("expected yes, no or a count from 0 to 2, got '%s'", arg);
    break;
  }
  case OPT_VERSION:
    printf ("nbdd %s\n", PACKAGE_VERSION);
    exit (EXIT_SUCCESS);
  case OPT_HELP:
    usage (stdout);
    exit (EXIT_SUCCESS);
  default:
    fprintf (stderr, "Try 'nbdd --help' for more information.\n");
    exit (EXIT_FAILURE);
  }
}

static bool
is_repeatable (int c)
{
  return c == OPT_LISTEN || c == OPT_BLOCKDEV || c == OPT_EXPORT;
}

static void
cleanup_fclose (FILE **fpp)
{
  if (*fpp)
    fclose (*fpp);
}
#define CLEANUP_FCLOSE __attribute__ ((cleanup (cleanup_fclose)))

/* Cut a comment off @line: a '#' at the start of the line (after
 * blanks) or after a blank.  A '#' inside a word stays ("dir#1"), so
 * file names and specs keep theirs.
 */
static void
strip_comment (char *line)
{
  for (char *p = line; *p; ++p)
    if (*p == '#' && (p == line || p[-1] == ' ' || p[-1] == '\t')) {
      *p = '\0';
      return;
    }
}

/* Read a config file: each line becomes one call of handle_option. */
static void
read_config_file (const char *path)
{
  CLEANUP_FCLOSE FILE *fp = NULL;
  CLEANUP_FREE char *line = NULL;
  struct stat st;
  size_t cap = 0;
  ssize_t len;
  /* Line of each single-valued option's first setting, to refuse a
   * second one: in a file, a repeated key is a mistake, not an
   * override.
   */
  unsigned seen[ARRAY_SIZE (long_options)] = { 0 };

  fp = fopen (path, "re");
  if (fp == NULL) {
    src_name = "config";
    bad_option ("cannot open '%s': %m", path);
  }
  /* fopen opens a directory for reading; getline would then fail with
   * a bare EISDIR.
   */
  if (fstat (fileno (fp), &st) == 0 && S_ISDIR (st.st_mode)) {
    src_name = "config";
    bad_option ("'%s' is a directory, not a config file", path);
  }
  src_file = path;
  src_line = 0;
  while (errno = 0, (len = getline (&line, &cap, fp)) != -1) {
    char *key, *val, *end;
    size_t i;

    src_line++;
    src_name = NULL;
    if ((size_t) len != strlen (line))
      bad_option ("unexpected NUL byte");
    /* Editors on Windows start UTF-8 files with a byte order mark
     * (and end lines with CR LF, which the blanks below take care of).
     */
    if (src_line == 1 && strncmp (line, "\xef\xbb\xbf", 3) == 0)
      memmove (line, line + 3, len - 2);
    strip_comment (line);
    len = strlen (line);
    while (len > 0 && strchr (" \t\r\n", line[len - 1]))
      line[--len] = '\0';
    key = line + strspn (line, " \t");
    if (*key == '\0')
      continue;

    /* key [=] value: the key ends at a blank or '='. */
    end = key + strcspn (key, " \t=");
    val = end + strspn (end, " \t");
    if (*val == '=')
      val += 1 + strspn (val + 1, " \t");
    *end = '\0';
    if (*val == '\0')
      val = NULL;

    if (strncmp (key, "--", 2) == 0)
      bad_option ("write the key without '--': '%s', not '%s'",
                  key + 2, key);
    for (i = 0; long_options[i].name; ++i)
      if (strcmp (long_options[i].name, key) == 0)
        break;
    if (long_options[i].name == NULL)
      bad_option ("unknown key '%s' (keys are nbdd's long options without "
                  "'--'; see nbdd --help)", key);
    src_name = long_options[i].name;
    switch (long_options[i].val) {
    case OPT_CONFIG: case OPT_HELP: case OPT_VERSION:
      bad_option ("not allowed in a config file");
    }
    if (long_options[i].has_arg == required_argument && val == NULL)
      bad_option ("expected a value");
    if (!is_repeatable (long_options[i].val)) {
      if (seen[i])
        bad_option ("already set on line %u (only listen, blockdev and "
                    "export may be repeated)", seen[i]);
      seen[i] = src_line;
    }
    handle_option (long_options[i].val, val);
  }
  if (errno != 0) {
    src_name = NULL;
    bad_option ("read error: %m");
  }
  src_file = NULL;
  src_name = NULL;
}

void
config_parse (int argc, char **argv)
{
  const char *config_file = NULL;
  struct sockaddr_un sun;
  int c, idx;

  /* Pass 1: find --config, so the file is read before the other
   * options whatever their order.  Unknown options are reported in
   * pass 2; --help and --version skip the file.
   */
  opterr = 0;
  while ((c = getopt_long (argc, argv, "fv", long_options, NULL)) != -1) {
    if (c == OPT_HELP || c == OPT_VERSION) {
      config_file = NULL;
      break;
    }
    if (c == OPT_CONFIG) {
      src_name = "config";
      if (config_file)
        bad_option ("given twice ('%s' and '%s'): use one config file",
                    config_file, optarg);
      config_file = optarg;
    }
  }
  src_name = NULL;
  if (config_file) {
    set_string (&config.config_file, config_file);
    read_config_file (config.config_file);
  }

  /* Pass 2: the command line proper.  optind = 0 makes glibc's getopt
   * start over.
   */
  opterr = 1;
  optind = 0;
  idx = -1;
  while ((c = getopt_long (argc, argv, "fv", long_options, &idx)) != -1) {
    const char *arg = NULL;

    if (c == '?')
      ;                         /* getopt said why; handle_option exits */
    else if (idx >= 0) {
      src_name = long_options[idx].name;
      if (long_options[idx].has_arg)
        arg = optarg;
    }
    else
      src_name = c == 'f' ? "foreground" : "verbose";
    handle_option (c, arg);
    src_name = NULL;
    idx = -1;                   /* getopt sets it for long options only */
  }
  if (optind < argc)
    bad_option ("unexpected argument '%s'", argv[optind]);
  if (config.stdio && config.nr_listen > 0)
    bad_option ("--stdio cannot be combined with --listen");
  if (config.stdio)
    config.foreground = true;
  if (config.tls != TLS_OFF && !config.tls_certificates && !config.tls_psk)
    bad_option ("--tls=%s needs --tls-certificates or --tls-psk",
                config.tls == TLS_ON ? "on" : "require");
  if (config.tls == TLS_OFF && (config.tls_certificates || config.tls_psk))
    bad_option ("TLS credentials given but --tls is off (use --tls=on or "
                "--tls=require)");
  if (config.tls_verify_peer && !config.tls_certificates)
    bad_option ("--tls-verify-peer needs --tls-certificates");

  /* The admin socket: STATE_DIR/admin.sock unless given. */
  if (config.admin_socket == NULL && config.state_dir) {
    if (asprintf (&config.admin_socket, "%s/admin.sock",
                  config.state_dir) == -1)
      bad_option ("out of memory");
    /* nbdd creates the state dir 0700, and the group's members cannot
     * pass through that.  Not an error: a state dir made beforehand
     * may let them.
     */
    if (config.admin_group)
      fprintf (stderr, "nbdd: warning: --admin-group %s: members of the "
               "group cannot reach the admin socket %s if the state dir "
               "is mode 0700, as nbdd creates it: give --admin-socket "
               "outside it (such as /run/nbdd/admin.sock)\n",
               config.admin_group, config.admin_socket);
  }
  if (config.admin_socket && strlen (config.admin_socket) >= sizeof sun.sun_path)
    bad_option ("--admin-socket: '%s' is too long for a unix socket (at most "
                "%zu bytes): choose a shorter path%s", config.admin_socket,
                sizeof sun.sun_path - 1,
                config.state_dir ? " or state dir" : "");
  if (config.admin_group && config.admin_socket == NULL)
    bad_option ("--admin-group needs an admin socket: give --admin-socket "
                "or --state-dir");
}

void
config_free (void)
{
  for (size_t i = 0; i < config.nr_listen; ++i)
    free (config.listen[i].spec);
  free (config.listen);
  for (size_t i = 0; i < config.nr_blockdevs; ++i)
    free (config.blockdevs[i]);
  free (config.blockdevs);
  for (size_t i = 0; i < config.nr_exports; ++i)
    free (config.exports[i]);
  free (config.exports);
  free (config.state_dir);
  free (config.pidfile);
  free (config.config_file);
  free (config.admin_socket);
  free (config.admin_group);
  free (config.tls_certificates);
  free (config.tls_psk);
}
