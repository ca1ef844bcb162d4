/* Control-path errors. */
#include <config.h>

#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"

static void
error_setv (struct error **errp, int errnum, const char *fs, va_list args)
{
  struct error *err;
  char *msg = NULL;

  if (errp == NULL)
    return;
  assert (*errp == NULL);       /* set once */
  if (vasprintf (&msg, fs, args) == -1)
    msg = NULL;
  if (msg && errnum) {
    char *full = NULL;
    if (asprintf (&full, "%s: %s", msg, strerror (errnum)) == -1)
      full = NULL;
    free (msg);
    msg = full;
  }
  err = calloc (1, sizeof *err);
  if (err == NULL) {
    free (msg);
    abort ();                   /* cannot even report: out of memory */
  }
  err->errnum = errnum;
  err->msg = msg ? msg : strdup ("out of memory while formatting an error");
  *errp = err;
}

void
error_setg (struct error **errp, const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  error_setv (errp, 0, fs, args);
  va_end (args);
}

void
error_setg_errno (struct error **errp, int errnum, const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  error_setv (errp, errnum, fs, args);
  va_end (args);
}

void
error_prepend (struct error **errp, const char *fs, ...)
{
  va_list args;
  char *prefix = NULL, *full = NULL;

  if (errp == NULL || *errp == NULL)
    return;
  va_start (args, fs);
  if (vasprintf (&prefix, fs, args) == -1)
    prefix = NULL;
  va_end (args);
  if (prefix && asprintf (&full, "%s: %s", prefix, (*errp)->msg) != -1) {
    free ((*errp)->msg);
    (*errp)->msg = full;
  }
  free (prefix);
}

void
error_free (struct error *err)
{
  if (err == NULL)
    return;
  free (err->msg);
  free (err);
}
