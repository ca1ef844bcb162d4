/* Command line parsing. */
#include <config.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
"  --tls-verify-peer           require a client certificate signed by the CA\n"
"  --tls-psk FILE              PSK keys in psktool's format (user:hexkey)\n"
"\n"
"Daemon:\n"
"  -f, --foreground            do not fork into the background\n"
"  --state-dir DIR             directory for the daemon's state\n"
"  --pidfile FILE              write the pid once ready to serve\n"
"  --threads N                 I/O worker threads (default %u)\n"
"  --max-connections N         0 = unlimited (default %u)\n"
"  --handshake-timeout SECONDS 0 = none (default %g)\n"
"  --poll-max-ns N             poll this long at most before sleeping,\n"
"                              adapting to the clients; 0 = never\n"
"                              (default %" PRIu64 ")\n"
"  --exit-with-parent          exit when the parent process exits\n"
"  -v, --verbose               more messages (repeat for per-request)\n"
"  --version                   print the version and exit\n"
"  --help                      print this help and exit\n",
           config.threads, config.max_connections,
           config.handshake_timeout, config.poll_max_ns);
}

static void __attribute__ ((noreturn, format (printf, 1, 2)))
bad_option (const char *fs, ...)
{
  va_list args;

  fprintf (stderr, "nbdd: ");
  va_start (args, fs);
  vfprintf (stderr, fs, args);
  va_end (args);
  fprintf (stderr, "\nTry 'nbdd --help' for more information.\n");
  exit (EXIT_FAILURE);
}

static char **
append (char **v, size_t *n, const char *s)
{
  char **nv = realloc (v, (*n + 1) * sizeof *nv);

  if (nv == NULL || (nv[*n] = strdup (s)) == NULL) {
    perror ("nbdd");
    exit (EXIT_FAILURE);
  }
  (*n)++;
  return nv;
}

enum {
  OPT_LISTEN = 256, OPT_STDIO, OPT_STATE_DIR, OPT_PIDFILE, OPT_THREADS,
  OPT_MAX_CONNECTIONS, OPT_HANDSHAKE_TIMEOUT, OPT_EXIT_WITH_PARENT,
  OPT_BLOCKDEV, OPT_EXPORT, OPT_VERSION, OPT_HELP, OPT_TLS,
  OPT_TLS_CERTIFICATES, OPT_TLS_VERIFY_PEER, OPT_TLS_PSK, OPT_POLL_MAX_NS,
};

static const struct option long_options[] = {
  { "listen", required_argument, NULL, OPT_LISTEN },
  { "stdio", no_argument, NULL, OPT_STDIO },
  { "foreground", no_argument, NULL, 'f' },
  { "state-dir", required_argument, NULL, OPT_STATE_DIR },
  { "pidfile", required_argument, NULL, OPT_PIDFILE },
  { "threads", required_argument, NULL, OPT_THREADS },
  { "max-connections", required_argument, NULL, OPT_MAX_CONNECTIONS },
  { "handshake-timeout", required_argument, NULL, OPT_HANDSHAKE_TIMEOUT },
  { "exit-with-parent", no_argument, NULL, OPT_EXIT_WITH_PARENT },
  { "poll-max-ns", required_argument, NULL, OPT_POLL_MAX_NS },
  { "blockdev", required_argument, NULL, OPT_BLOCKDEV },
  { "export", required_argument, NULL, OPT_EXPORT },
  { "tls", required_argument, NULL, OPT_TLS },
  { "tls-certificates", required_argument, NULL, OPT_TLS_CERTIFICATES },
  { "tls-verify-peer", no_argument, NULL, OPT_TLS_VERIFY_PEER },
  { "tls-psk", required_argument, NULL, OPT_TLS_PSK },
  { "verbose", no_argument, NULL, 'v' },
  { "version", no_argument, NULL, OPT_VERSION },
  { "help", no_argument, NULL, OPT_HELP },
  { NULL, 0, NULL, 0 },
};

void
config_parse (int argc, char **argv)
{
  int c;
  uint32_t u;

  while ((c = getopt_long (argc, argv, "fv", long_options, NULL)) != -1) {
    switch (c) {
    case OPT_LISTEN: {
      struct listen_spec *nl = realloc (config.listen,
                                        (config.nr_listen + 1) * sizeof *nl);
      if (nl == NULL || (nl[config.nr_listen].spec = strdup (optarg)) == NULL)
        bad_option ("out of memory");
      if (strncmp (optarg, "unix:", 5) != 0 &&
          strncmp (optarg, "tcp:", 4) != 0) {
        config.listen = nl;
        config.nr_listen++;
        bad_option ("--listen: expected unix:PATH or tcp:HOST:PORT, "
                    "got '%s'", optarg);
      }
      config.listen = nl;
      config.nr_listen++;
      break;
    }
    case OPT_STDIO:
      config.stdio = true;
      break;
    case 'f':
      config.foreground = true;
      break;
    case OPT_STATE_DIR:
      free (config.state_dir);
      config.state_dir = strdup (optarg);
      break;
    case OPT_PIDFILE:
      free (config.pidfile);
      config.pidfile = strdup (optarg);
      break;
    case OPT_THREADS:
      if (parse_uint32 (optarg, &u) == -1 || u == 0 || u > 1024)
        bad_option ("--threads: expected a number from 1 to 1024, got '%s'",
                    optarg);
      config.threads = u;
      break;
    case OPT_MAX_CONNECTIONS:
      if (parse_uint32 (optarg, &u) == -1 || u > 1000000)
        bad_option ("--max-connections: expected a number from 0 to "
                    "1000000, got '%s'", optarg);
      config.max_connections = u;
      break;
    case OPT_HANDSHAKE_TIMEOUT: {
      char *end;
      double d;
      errno = 0;
      d = strtod (optarg, &end);
      if (errno || end == optarg || *end != '\0' || !(d >= 0) || d > 86400)
        bad_option ("--handshake-timeout: expected seconds from 0 to "
                    "86400, got '%s'", optarg);
      config.handshake_timeout = d;
      break;
    }
    case OPT_POLL_MAX_NS:
      if (parse_uint32 (optarg, &u) == -1 || u > 10000000)
        bad_option ("--poll-max-ns: expected nanoseconds from 0 to "
                    "10000000, got '%s'", optarg);
      config.poll_max_ns = u;
      break;
    case OPT_EXIT_WITH_PARENT:
      config.exit_with_parent = true;
      break;
    case OPT_BLOCKDEV:
      config.blockdevs = append (config.blockdevs, &config.nr_blockdevs,
                                 optarg);
      break;
    case OPT_EXPORT:
      config.exports = append (config.exports, &config.nr_exports, optarg);
      break;
    case OPT_TLS:
      if (strcmp (optarg, "off") == 0)
        config.tls = TLS_OFF;
      else if (strcmp (optarg, "on") == 0)
        config.tls = TLS_ON;
      else if (strcmp (optarg, "require") == 0)
        config.tls = TLS_REQUIRE;
      else
        bad_option ("--tls: expected off, on or require, got '%s'", optarg);
      break;
    case OPT_TLS_CERTIFICATES:
      free (config.tls_certificates);
      config.tls_certificates = strdup (optarg);
      break;
    case OPT_TLS_VERIFY_PEER:
      config.tls_verify_peer = true;
      break;
    case OPT_TLS_PSK:
      free (config.tls_psk);
      config.tls_psk = strdup (optarg);
      break;
    case 'v':
      log_verbose++;
      break;
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
  free (config.tls_certificates);
  free (config.tls_psk);
}
