/* Logging to stderr or syslog.  Each line is written with one call so
 * that lines from different threads do not interleave.
 */
#include <config.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>

#include "log.h"

int log_verbose;
bool log_to_syslog;
bool log_quiet;
static const char *log_progname = "nbdd";

void
log_init (const char *progname, bool use_syslog)
{
  log_progname = progname;
  log_to_syslog = use_syslog;
  if (use_syslog)
    openlog (progname, LOG_PID, LOG_DAEMON);
}

static void
log_verror (int prio, const char *level, const char *fs, va_list args)
{
  char msg[8192];
  int saved_errno = errno;      /* so %m in fs still works */

  errno = saved_errno;
  vsnprintf (msg, sizeof msg, fs, args);
  if (log_to_syslog)
    syslog (prio, "%s", msg);
  else
    fprintf (stderr, "%s: %s%s\n", log_progname, level, msg);
  errno = saved_errno;
}

void
nbdd_error (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  log_verror (LOG_ERR, "error: ", fs, args);
  va_end (args);
}

void
nbdd_warn (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  log_verror (LOG_WARNING, "warning: ", fs, args);
  va_end (args);
}

void
nbdd_info (const char *fs, ...)
{
  va_list args;

  if (log_quiet)
    return;
  va_start (args, fs);
  log_verror (LOG_INFO, "", fs, args);
  va_end (args);
}

void
nbdd_debug (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  log_verror (LOG_DEBUG, "debug: ", fs, args);
  va_end (args);
}
