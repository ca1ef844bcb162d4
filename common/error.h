/* Control-path errors: a message that travels up to the one caller
 * that reports it (main, later the admin socket).
 *
 * Rules (as QEMU's error.h): set *errp once on failure, never touch it
 * on success, never both log and return an error.  errp may be NULL
 * when the caller does not care about the message.
 */
#ifndef NBDD_ERROR_H
#define NBDD_ERROR_H

struct error {
  int errnum;                   /* errno value, or 0 */
  char *msg;                    /* complete message, caller frees */
};

void error_setg (struct error **errp, const char *fs, ...)
  __attribute__ ((format (printf, 2, 3)));
/* Appends ": strerror (errnum)" to the message. */
void error_setg_errno (struct error **errp, int errnum, const char *fs, ...)
  __attribute__ ((format (printf, 3, 4)));
/* Prefix an existing error's message with "prefix: ". */
void error_prepend (struct error **errp, const char *fs, ...)
  __attribute__ ((format (printf, 2, 3)));
void error_free (struct error *err);

static inline void
cleanup_error (struct error **errp)
{
  error_free (*errp);
}
#define CLEANUP_ERROR __attribute__ ((cleanup (cleanup_error)))

#endif /* NBDD_ERROR_H */
