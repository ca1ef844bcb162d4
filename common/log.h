/* Logging.  Messages go to stderr (foreground) or syslog (daemon). */
#ifndef NBDD_LOG_H
#define NBDD_LOG_H

#include <stdbool.h>

#include "utils.h"

extern int log_verbose;         /* -v count */
extern bool log_to_syslog;
extern bool log_quiet;           /* errors and warnings only */

void log_init (const char *progname, bool use_syslog);
void nbdd_error (const char *fs, ...) __attribute__ ((format (printf, 1, 2)));
void nbdd_warn (const char *fs, ...) __attribute__ ((format (printf, 1, 2)));
void nbdd_info (const char *fs, ...) __attribute__ ((format (printf, 1, 2)));
void nbdd_debug (const char *fs, ...) __attribute__ ((format (printf, 1, 2)));

/* Debug output costs one predictable branch when it is off. */
#define debug(fs, ...)                                  \
  do {                                                  \
    if (unlikely (log_verbose > 0))                     \
      nbdd_debug ((fs), ##__VA_ARGS__);                 \
  } while (0)

/* Per-request tracing: only at -vv. */
#define datapath_debug(fs, ...)                         \
  do {                                                  \
    if (unlikely (log_verbose > 1))                     \
      nbdd_debug ((fs), ##__VA_ARGS__);                 \
  } while (0)

#endif /* NBDD_LOG_H */
