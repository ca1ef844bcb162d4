/* nbdctl: the admin CLI.  Declarations shared between its files,
 * grouped by the file that defines them.
 *
 * nbdctl is a client of the admin socket (docs/admin.md): it links
 * only common/ (libcommon.a) and json-c, never the daemon's code, and
 * is single-threaded with blocking I/O.
 */
#ifndef NBDD_NBDCTL_H
#define NBDD_NBDCTL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include <json-c/json.h>

#include "error.h"

/* Exit codes: documented in usage and README.md, scripts rely on them. */
enum {
  EXIT_OK = 0,
  EXIT_REFUSED = 1,             /* the daemon refused the command */
  EXIT_USAGE = 2,               /* bad command line */
  EXIT_UNREACHABLE = 3,         /* no daemon, no access, connection lost */
  EXIT_LOCAL = 4,               /* nbdctl itself failed: out of memory,
                                 * no cwd, cannot write its output */
};

/* nbdctl-qmp.c: one QMP session over the admin socket. */
struct qmp;

/* Connect to @path, read the greeting and negotiate capabilities.
 * @timeout_ms bounds every wait for the daemon (-1: forever).  Returns
 * a session (free with qmp_close) or NULL with errp set.
 */
struct qmp *qmp_open (const char *path, int timeout_ms, struct error **errp);
void qmp_close (struct qmp *q);

/* Called with each event ({"event", "data", "timestamp"}; borrowed:
 * take a reference to keep it) that arrives while a command waits for
 * its answer.
 */
typedef void qmp_event_fn (struct json_object *event, void *opaque);
/* Send the session's events to @fn from now on (NULL: drop them). */
void qmp_set_event_handler (struct qmp *q, qmp_event_fn *fn, void *opaque);

/* Send a whole command message {"execute": ..., ...}, taking ownership
 * of @msg, and wait for its answer, skipping events.  Returns
 * EXIT_OK with *ret set (caller puts it), EXIT_REFUSED with errp
 * holding the daemon's error desc, or EXIT_UNREACHABLE with errp
 * saying what went wrong with the connection.
 */
int qmp_execute_msg (struct qmp *q, struct json_object *msg,
                     struct json_object **ret, struct error **errp);
/* The same for command @cmd with @args (owned; NULL for none). */
int qmp_execute (struct qmp *q, const char *cmd, struct json_object *args,
                 struct json_object **ret, struct error **errp);
/* Parse @s as one JSON object, with nothing but blanks after it.
 * Returns the object (caller puts it) or NULL with errp set.
 */
struct json_object *qmp_parse_object (const char *s, struct error **errp);

/* nbdctl-table.c: aligned tables and human-readable sizes. */
struct table {
  size_t ncols;
  const char *const *headers;   /* borrowed: ncols column titles */
  const char *align;            /* borrowed: 'l' or 'r' per column */
  char **cells;                 /* nrows * ncols, owned */
  size_t nrows;
};

void table_init (struct table *t, const char *const *headers,
                 const char *align);
/* Append a row of @n == t->ncols strings (copied, and escaped as
 * escape_text does; NULL and "" print as "-").
 */
void table_add (struct table *t, const char *const *row, size_t n);
void table_print (const struct table *t, FILE *fp);
void table_free (struct table *t);

/* @s made safe for a terminal: control bytes and backslashes become
 * \n, \t, \r, \\ or \xNN, and so does each byte of invalid UTF-8,
 * of a C1 control and of a bidirectional override.  Valid UTF-8
 * stays.  Caller frees.
 */
char *escape_text (const char *s);

/* "512", "64K", "1.5G", "10T": powers of 1024, as ls -h and lsblk. */
void human_size (uint64_t v, char *buf, size_t len);

/* nbdctl.c: the session nbdctl's commands run in. */
struct nbdctl {
  const char *socket;           /* the admin socket's path */
  bool json;                    /* --json: print raw return values */
  int timeout_ms;               /* -1: wait forever */
  struct qmp *qmp;              /* connected on the first call */
};

/* Run @cmd with @args (owned) and set *ret (caller puts it; may be
 * NULL if the caller does not want it).  On failure the reason has
 * been printed; returns the exit code (EXIT_REFUSED or
 * EXIT_UNREACHABLE).
 */
int ctl_call (struct nbdctl *ctl, const char *cmd, struct json_object *args,
              struct json_object **ret);
/* The same for a whole message (nbdctl qmp '{"execute": ...}'). */
int ctl_call_msg (struct nbdctl *ctl, struct json_object *msg,
                  struct json_object **ret);
/* Print @v as pretty JSON on stdout. */
void print_json (struct json_object *v);
/* Print "nbdctl: MESSAGE" on stderr, the message escaped as
 * escape_text does: it may hold the daemon's text or file names.
 */
void ctl_error (const char *fs, ...) __attribute__ ((format (printf, 1, 2)));
static inline void
cleanup_json_put (struct json_object **op)
{
  json_object_put (*op);
}
#define CLEANUP_JSON_PUT __attribute__ ((cleanup (cleanup_json_put)))

/* Exit with a message on allocation failure: nbdctl has nothing to
 * unwind.
 */
void *check_alloc (void *p);
void __attribute__ ((noreturn)) out_of_memory (void);

/* nbdctl-cmds.c: the commands.  Each parses its own arguments
 * (argv[0] is "nbdctl export add", so getopt's messages name the
 * command) before it talks to the daemon, and returns the exit code.
 */
struct command {
  const char *name;             /* "node add" */
  const char *args;             /* synopsis after the name */
  const char *brief;            /* short synopsis, for nbdctl --help */
  const char *help;             /* what it does, a sentence or two */
  int (*run) (struct nbdctl *ctl, const struct command *self,
              int argc, char **argv);
};

/* Terminated by an entry with a NULL name. */
extern const struct command commands[];

/* Print @text to @fp, wrapped at 79 columns, each line but the first
 * indented by @indent; the cursor is at column @col.
 */
void print_wrapped (FILE *fp, const char *text, size_t col, size_t indent);

#endif /* NBDD_NBDCTL_H */
