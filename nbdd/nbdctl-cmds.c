/* nbdctl's commands: each a friendly front end to one admin-socket
 * command (docs/admin.md), except snapshot, which is three.
 *
 * Every command parses all its arguments before it connects, so a
 * usage error exits 2 without the daemon seeing anything.  Human
 * output is a table; with --json the daemon's return value is printed
 * as it came.
 */
#include <config.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "nbdctl.h"
#include "options.h"
#include "utils.h"

/* Longest node-name nbdd takes (graph/node.c), and the longest overlay
 * name we make up, which QEMU would take too (its node_name[32]).
 */
#define MAX_MADE_UP_NODE_NAME 31

enum { OPT_JSON = 256, OPT_FIRST_COMMAND_OPTION };

/* ---- argument parsing ---- */

static int __attribute__ ((format (printf, 2, 3)))
usage_error (const struct command *self, const char *fs, ...)
{
  va_list args;

  fprintf (stderr, "nbdctl %s: ", self->name);
  va_start (args, fs);
  vfprintf (stderr, fs, args);
  va_end (args);
  fprintf (stderr, "\nUsage: nbdctl %s%s%s\n", self->name,
           *self->args ? " " : "", self->args);
  return EXIT_USAGE;
}

/* getopt_long over a command's arguments, taking care of the options
 * every command has (--help, --json).  Returns the next option of the
 * command's own, 0 at the end of the options, or -1 when the command
 * must stop and return *rc (after --help, or a bad option).
 */
static int
next_option (struct nbdctl *ctl, const struct command *self, int argc,
             char **argv, const struct option *opts, int *rc)
{
  for (;;) {
    int c = getopt_long (argc, argv, "h", opts, NULL);

    switch (c) {
    case -1:
      return 0;
    case 'h':
      printf ("Usage: nbdctl %s%s", self->name, *self->args ? " " : "");
      print_wrapped (stdout, self->args, 15 + strlen (self->name),
                     15 + strlen (self->name));
      print_wrapped (stdout, self->help, 0, 0);
      *rc = EXIT_OK;
      return -1;
    case OPT_JSON:
      ctl->json = true;
      continue;
    case '?': case ':':         /* getopt printed why */
      fprintf (stderr, "Usage: nbdctl %s%s%s\n", self->name,
               *self->args ? " " : "", self->args);
      *rc = EXIT_USAGE;
      return -1;
    default:
      return c;
    }
  }
}

#define COMMON_OPTIONS \
  { "help", no_argument, NULL, 'h' }, \
  { "json", no_argument, NULL, OPT_JSON }

static const struct option common_options[] = {
  COMMON_OPTIONS,
  { NULL, 0, NULL, 0 },
};

/* For commands with no options of their own: 0 if there are between
 * @min and @max positional arguments, else the exit code.
 */
static int
parse_plain (struct nbdctl *ctl, const struct command *self, int argc,
             char **argv, int min, int max, int *rc)
{
  int c = next_option (ctl, self, argc, argv, common_options, rc);

  if (c == -1)
    return -1;
  if (argc - optind < min || argc - optind > max) {
    *rc = usage_error (self, "expected %s", self->args[0] ? self->args
                       : "no arguments");
    return -1;
  }
  return 0;
}

/* The value @s of option --@opt as a size: 0, or the exit code. */
static int
parse_size_arg (const struct command *self, const char *opt, const char *s,
                uint64_t *r)
{
  if (parse_size (s, r) == -1 || *r > INT64_MAX)
    return usage_error (self, "--%s: expected a size (a number, optionally "
                        "with K, M, G or T), got '%s'", opt, s);
  return 0;
}

/* The daemon has its own working directory: make @path absolute. */
static char *
absolute_path (const char *path)
{
  CLEANUP_FREE char *cwd = NULL;
  char *r;

  if (path[0] == '/')
    return check_alloc (strdup (path));
  cwd = getcwd (NULL, 0);
  if (cwd == NULL) {
    int err = errno;
    ctl_error ("cannot find the current directory to make '%s' absolute: "
               "%s", path, strerror (err));
    return NULL;
  }
  if (asprintf (&r, "%s/%s", cwd, path) == -1)
    out_of_memory ();
  return r;
}

/* ---- JSON helpers ---- */

static struct json_object *
jobj (void)
{
  return check_alloc (json_object_new_object ());
}

static void
jadd (struct json_object *o, const char *key, struct json_object *v)
{
  if (json_object_object_add (o, key, v) != 0)
    out_of_memory ();
}

static void
jadd_str (struct json_object *o, const char *key, const char *s)
{
  jadd (o, key, check_alloc (json_object_new_string (s)));
}

static void
jadd_int (struct json_object *o, const char *key, int64_t v)
{
  jadd (o, key, check_alloc (json_object_new_int64 (v)));
}

static void
jadd_bool (struct json_object *o, const char *key, bool v)
{
  jadd (o, key, check_alloc (json_object_new_boolean (v)));
}

static struct json_object *
jget (struct json_object *o, const char *key)
{
  struct json_object *v;

  return json_object_object_get_ex (o, key, &v) ? v : NULL;
}

/* A string member, or NULL. */
static const char *
jstr (struct json_object *o, const char *key)
{
  struct json_object *v = jget (o, key);

  return json_object_is_type (v, json_type_string)
    ? json_object_get_string (v) : NULL;
}

/* An integer member; a fractional number (uptime) is truncated. */
static bool
jint (struct json_object *o, const char *key, int64_t *r)
{
  struct json_object *v = jget (o, key);

  if (json_object_is_type (v, json_type_int))
    *r = json_object_get_int64 (v);
  else if (json_object_is_type (v, json_type_double))
    *r = json_object_get_double (v);
  else
    return false;
  return true;
}

/* A string or a number member as text, or NULL. */
static const char *
jtext (struct json_object *o, const char *key, char *buf, size_t len)
{
  struct json_object *v = jget (o, key);
  int64_t i;

  if (jint (o, key, &i)) {
    snprintf (buf, len, "%" PRId64, i);
    return buf;
  }
  return json_object_is_type (v, json_type_string)
    ? json_object_get_string (v) : NULL;
}

/* "yes", "no", or NULL when absent. */
static const char *
jyesno (struct json_object *o, const char *key)
{
  struct json_object *v = jget (o, key);

  if (!json_object_is_type (v, json_type_boolean))
    return NULL;
  return json_object_get_boolean (v) ? "yes" : "no";
}

/* A number member as text (@size: human-readable), "-" if absent. */
static const char *
jnum (struct json_object *o, const char *key, bool size, char *buf,
      size_t len)
{
  int64_t v;

  if (!jint (o, key, &v) || v < 0)
    return "-";
  if (size)
    human_size (v, buf, len);
  else
    snprintf (buf, len, "%" PRId64, v);
  return buf;
}

/* A bitmap argument, NAME (on the node the command is about) or
 * NODE:NAME, as QMP wants it: "NAME" or {"node", "name"}.  A node name
 * cannot hold ':', so the first colon splits; a bitmap whose own name
 * holds one is named NODE:NAME.  Returns NULL after a usage error
 * about @what.
 */
static struct json_object *
bitmap_ref (const struct command *self, const char *what, const char *s)
{
  const char *colon = strchr (s, ':');
  CLEANUP_FREE char *node = NULL;
  struct json_object *o;

  if (colon == NULL) {
    if (*s == '\0') {
      usage_error (self, "%s: expected a bitmap name, got an empty string",
                   what);
      return NULL;
    }
    return check_alloc (json_object_new_string (s));
  }
  node = check_alloc (strndup (s, colon - s));
  if (!node_name_is_valid (node)) {
    usage_error (self, "%s: '%s': expected NAME or NODE:NAME, and '%s' is "
                 "not a valid node name", what, s, node);
    return NULL;
  }
  if (colon[1] == '\0') {
    usage_error (self, "%s: '%s': expected a bitmap name after the colon",
                 what, s);
    return NULL;
  }
  o = jobj ();
  jadd_str (o, "node", node);
  jadd_str (o, "name", colon + 1);
  return o;
}

/* Print a list the daemon returned, as a table or as JSON: @row adds
 * one element's row to the table.
 */
typedef void row_fn (struct table *t, struct json_object *elem);

/* table_add with the row's cells as arguments (NULL prints as "-"). */
#define t_add(t, ...) \
  table_add ((t), (const char *const[]) { __VA_ARGS__ }, \
             sizeof ((const char *const[]) { __VA_ARGS__ }) / \
             sizeof (const char *))

static int
print_list (struct nbdctl *ctl, struct json_object *list,
            const char *const *headers, const char *align, row_fn *row)
{
  struct table t;

  if (ctl->json || !json_object_is_type (list, json_type_array)) {
    print_json (list);
    return EXIT_OK;
  }
  table_init (&t, headers, align);
  for (size_t i = 0; i < json_object_array_length (list); ++i)
    row (&t, json_object_array_get_idx (list, i));
  table_print (&t, stdout);
  table_free (&t);
  return EXIT_OK;
}

/* Print the return value of a command that changes something: nothing
 * for people, the value ({}) with --json.
 */
static int
done (struct nbdctl *ctl, struct json_object *ret)
{
  if (ctl->json)
    print_json (ret);
  json_object_put (ret);
  return EXIT_OK;
}

/* ---- node ---- */

static int
cmd_node_add (struct nbdctl *ctl, const struct command *self, int argc,
              char **argv)
{
  CLEANUP_ERROR struct error *err = NULL;
  struct json_object *spec, *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 1, 1, &rc) == -1)
    return rc;
  spec = spec_parse (argv[optind], &err);
  if (spec == NULL)
    return usage_error (self, "SPEC: %s", err->msg);
  rc = ctl_call (ctl, "blockdev-add", spec, &ret);
  return rc ? rc : done (ctl, ret);
}

static int
cmd_node_remove (struct nbdctl *ctl, const struct command *self, int argc,
                 char **argv)
{
  struct json_object *args, *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 1, 1, &rc) == -1)
    return rc;
  args = jobj ();
  jadd_str (args, "node-name", argv[optind]);
  rc = ctl_call (ctl, "blockdev-del", args, &ret);
  return rc ? rc : done (ctl, ret);
}

/* USERS column: "export:e0,node:top". */
static char *
format_users (struct json_object *users)
{
  char *s = NULL;
  size_t len = 0;
  FILE *fp;

  if (!json_object_is_type (users, json_type_array) ||
      json_object_array_length (users) == 0)
    return check_alloc (strdup ("-"));
  fp = check_alloc (open_memstream (&s, &len));
  for (size_t i = 0; i < json_object_array_length (users); ++i) {
    struct json_object *u = json_object_array_get_idx (users, i);
    const char *kind = jstr (u, "kind"), *name = jstr (u, "name");
    fprintf (fp, "%s%s:%s", i ? "," : "", kind ? kind : "?",
             name ? name : "?");
  }
  if (fclose (fp) != 0)
    out_of_memory ();
  return s;
}

static void
node_row (struct table *t, struct json_object *n)
{
  struct json_object *image = jget (n, "image");
  CLEANUP_FREE char *users = format_users (jget (n, "users"));
  char size[32];
  const char *file = jstr (n, "file");

  t_add (t, jstr (n, "node-name"), jstr (n, "drv"), jyesno (n, "ro"),
         jnum (image, "virtual-size", true, size, sizeof size),
         file ? file : jstr (image, "filename"), users);
}

static int
cmd_node_list (struct nbdctl *ctl, const struct command *self, int argc,
               char **argv)
{
  static const char *const headers[] = {
    "NAME", "DRIVER", "RO", "SIZE", "FILE", "USERS", NULL
  };
  struct json_object *args, *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 0, 0, &rc) == -1)
    return rc;
  args = jobj ();
  jadd_bool (args, "flat", true);
  rc = ctl_call (ctl, "query-named-block-nodes", args, &ret);
  if (rc)
    return rc;
  rc = print_list (ctl, ret, headers, "lllrll", node_row);
  json_object_put (ret);
  return rc;
}

/* ---- export ---- */

static int
cmd_export_add (struct nbdctl *ctl, const struct command *self, int argc,
                char **argv)
{
  enum { O_ID = OPT_FIRST_COMMAND_OPTION, O_NAME, O_WRITABLE, O_DESC,
         O_TLS_REQUIRED, O_TLS_ALLOW, O_BITMAP };
  static const struct option opts[] = {
    COMMON_OPTIONS,
    { "id", required_argument, NULL, O_ID },
    { "name", required_argument, NULL, O_NAME },
    { "writable", no_argument, NULL, O_WRITABLE },
    { "description", required_argument, NULL, O_DESC },
    { "tls-required", no_argument, NULL, O_TLS_REQUIRED },
    { "tls-allow", required_argument, NULL, O_TLS_ALLOW },
    { "bitmap", required_argument, NULL, O_BITMAP },
    { NULL, 0, NULL, 0 },
  };
  CLEANUP_JSON_PUT struct json_object *args = jobj ();
  struct json_object *allow = NULL, *bitmaps = NULL, *bm, *ret = NULL;
  const char *id = NULL, *name = NULL;
  int c, rc;

  while ((c = next_option (ctl, self, argc, argv, opts, &rc)) > 0) {
    switch (c) {
    case O_ID: id = optarg; break;
    case O_NAME: name = optarg; break;
    case O_WRITABLE: jadd_bool (args, "writable", true); break;
    case O_DESC: jadd_str (args, "description", optarg); break;
    case O_TLS_REQUIRED: jadd_bool (args, "tls-required", true); break;
    case O_TLS_ALLOW:
      if (allow == NULL) {
        allow = check_alloc (json_object_new_array ());
        jadd (args, "tls-allow", allow);
      }
      json_object_array_add (allow,
                             check_alloc (json_object_new_string (optarg)));
      break;
    case O_BITMAP:
      bm = bitmap_ref (self, "--bitmap", optarg);
      if (bm == NULL)
        return EXIT_USAGE;
      if (bitmaps == NULL) {
        bitmaps = check_alloc (json_object_new_array ());
        jadd (args, "bitmaps", bitmaps);
      }
      if (json_object_array_add (bitmaps, bm) != 0)
        out_of_memory ();
      break;
    }
  }
  if (c == -1)
    return rc;
  if (argc - optind != 1)
    return usage_error (self, "expected one NODE");
  /* QEMU needs an id: the export's name, which defaults to the node's. */
  jadd_str (args, "type", "nbd");
  jadd_str (args, "node-name", argv[optind]);
  jadd_str (args, "id", id ? id : name ? name : argv[optind]);
  if (name)
    jadd_str (args, "name", name);
  rc = ctl_call (ctl, "block-export-add", steal_pointer (&args), &ret);
  return rc ? rc : done (ctl, ret);
}

static int
cmd_export_remove (struct nbdctl *ctl, const struct command *self, int argc,
                   char **argv)
{
  enum { O_FORCE = OPT_FIRST_COMMAND_OPTION };
  static const struct option opts[] = {
    COMMON_OPTIONS,
    { "force", no_argument, NULL, O_FORCE },
    { NULL, 0, NULL, 0 },
  };
  struct json_object *args, *ret = NULL;
  bool force = false;
  int c, rc;

  while ((c = next_option (ctl, self, argc, argv, opts, &rc)) > 0)
    force = true;
  if (c == -1)
    return rc;
  if (argc - optind != 1)
    return usage_error (self, "expected one export ID");
  args = jobj ();
  jadd_str (args, "id", argv[optind]);
  jadd_str (args, "mode", force ? "hard" : "safe");
  rc = ctl_call (ctl, "block-export-del", args, &ret);
  return rc ? rc : done (ctl, ret);
}

static void
export_row (struct table *t, struct json_object *e)
{
  char conns[32];

  t_add (t, jstr (e, "id"), jstr (e, "name"), jstr (e, "node-name"),
         jyesno (e, "writable"),
         jnum (e, "connections", false, conns, sizeof conns));
}

static int
cmd_export_list (struct nbdctl *ctl, const struct command *self, int argc,
                 char **argv)
{
  static const char *const headers[] = {
    "ID", "NAME", "NODE", "WRITABLE", "CONNECTIONS", NULL
  };
  struct json_object *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 0, 0, &rc) == -1)
    return rc;
  rc = ctl_call (ctl, "query-block-exports", NULL, &ret);
  if (rc)
    return rc;
  rc = print_list (ctl, ret, headers, "llllr", export_row);
  json_object_put (ret);
  return rc;
}

/* ---- image create ---- */

/* blockdev-create options for a new image @filename (absolute). */
static struct json_object *
image_options (const char *format, const char *filename, uint64_t size)
{
  struct json_object *o = jobj ();

  if (strcmp (format, "raw") == 0) {
    jadd_str (o, "driver", "file");
    jadd_str (o, "filename", filename);
  }
  else {
    struct json_object *file = jobj ();
    jadd_str (file, "driver", "file");
    jadd_str (file, "filename", filename);
    jadd_str (o, "driver", format);
    jadd (o, "file", file);
  }
  jadd_int (o, "size", size);
  return o;
}

/* Run blockdev-create with @options (owned); *ret as for ctl_call. */
static int
image_create (struct nbdctl *ctl, struct json_object *options,
              struct json_object **ret)
{
  struct json_object *args = jobj ();

  jadd (args, "options", options);
  return ctl_call (ctl, "blockdev-create", args, ret);
}

static int
cmd_image_create (struct nbdctl *ctl, const struct command *self, int argc,
                  char **argv)
{
  enum { O_FORMAT = OPT_FIRST_COMMAND_OPTION, O_SIZE, O_BACKING,
         O_BACKING_FORMAT, O_CLUSTER_SIZE };
  static const struct option opts[] = {
    COMMON_OPTIONS,
    { "format", required_argument, NULL, O_FORMAT },
    { "size", required_argument, NULL, O_SIZE },
    { "backing", required_argument, NULL, O_BACKING },
    { "backing-format", required_argument, NULL, O_BACKING_FORMAT },
    { "cluster-size", required_argument, NULL, O_CLUSTER_SIZE },
    { NULL, 0, NULL, 0 },
  };
  const char *format = "qcow2", *backing = NULL, *backing_fmt = NULL;
  uint64_t size = 0, cluster_size = 0;
  bool have_size = false;
  CLEANUP_FREE char *filename = NULL;
  struct json_object *o, *ret = NULL;
  int c, rc;

  while ((c = next_option (ctl, self, argc, argv, opts, &rc)) > 0) {
    switch (c) {
    case O_FORMAT:
      if (strcmp (optarg, "qcow2") != 0 && strcmp (optarg, "raw") != 0)
        return usage_error (self, "--format: expected qcow2 or raw, got "
                            "'%s'", optarg);
      format = optarg;
      break;
    case O_SIZE:
      if (parse_size_arg (self, "size", optarg, &size))
        return EXIT_USAGE;
      have_size = true;
      break;
    case O_BACKING: backing = optarg; break;
    case O_BACKING_FORMAT: backing_fmt = optarg; break;
    case O_CLUSTER_SIZE:
      if (parse_size_arg (self, "cluster-size", optarg, &cluster_size))
        return EXIT_USAGE;
      break;
    }
  }
  if (c == -1)
    return rc;
  if (argc - optind != 1)
    return usage_error (self, "expected one FILENAME");
  if (!have_size)
    return usage_error (self, "--size is required");
  if (strcmp (format, "raw") == 0 && (backing || backing_fmt || cluster_size))
    return usage_error (self, "--backing, --backing-format and "
                        "--cluster-size are for qcow2 images");
  if (backing_fmt && !backing)
    return usage_error (self, "--backing-format needs --backing");

  filename = absolute_path (argv[optind]);
  if (filename == NULL)
    return EXIT_LOCAL;
  o = image_options (format, filename, size);
  /* The backing name is written into the image as given: qemu reads a
   * relative one relative to the image's folder.
   */
  if (backing)
    jadd_str (o, "backing-file", backing);
  if (backing_fmt)
    jadd_str (o, "backing-fmt", backing_fmt);
  if (cluster_size)
    jadd_int (o, "cluster-size", cluster_size);
  rc = image_create (ctl, o, &ret);
  return rc ? rc : done (ctl, ret);
}

/* ---- snapshot ---- */

/* A node-name from the overlay's file name: "vm1-snap.qcow2" gives
 * "vm1-snap".  It follows node_name_is_valid's rule, and is at most 31
 * bytes long.
 */
static char *
overlay_node_name (const char *file)
{
  const char *base = strrchr (file, '/') ? strrchr (file, '/') + 1 : file;
  const char *dot = strrchr (base, '.');
  size_t len = dot && dot != base ? (size_t) (dot - base) : strlen (base);
  char *r = check_alloc (malloc (MAX_MADE_UP_NODE_NAME + 1));
  size_t n = 0;

  if (len == 0 || !((base[0] >= 'a' && base[0] <= 'z') ||
                    (base[0] >= 'A' && base[0] <= 'Z')))
    r[n++] = 'n';
  for (size_t i = 0; i < len && n < MAX_MADE_UP_NODE_NAME; ++i)
    r[n++] = strchr ("-._", base[i]) ||
      (base[i] >= 'a' && base[i] <= 'z') ||
      (base[i] >= 'A' && base[i] <= 'Z') ||
      (base[i] >= '0' && base[i] <= '9') ? base[i] : '_';
  r[n] = '\0';
  return r;
}

/* The node @name in query-named-block-nodes' list, or NULL. */
static struct json_object *
find_node (struct json_object *list, const char *name)
{
  for (size_t i = 0; i < json_object_array_length (list); ++i) {
    struct json_object *n = json_object_array_get_idx (list, i);
    const char *nn = jstr (n, "node-name");
    if (nn && strcmp (nn, name) == 0)
      return n;
  }
  return NULL;
}

/* Snapshot is three commands, not one transaction: blockdev-create
 * cannot be part of one.  Each step undoes the earlier ones if it
 * fails, except that a created file stays (nbdd does not delete
 * files): we say so.  So everything that can be checked beforehand
 * (the overlay's node name, the backing file's name) is checked before
 * the file is created.
 */
static int
cmd_snapshot (struct nbdctl *ctl, const struct command *self, int argc,
              char **argv)
{
  enum { O_FILE = OPT_FIRST_COMMAND_OPTION, O_NODE };
  static const struct option opts[] = {
    COMMON_OPTIONS,
    { "overlay-file", required_argument, NULL, O_FILE },
    { "overlay-node", required_argument, NULL, O_NODE },
    { NULL, 0, NULL, 0 },
  };
  const char *node, *file_arg = NULL, *backing, *fmt;
  CLEANUP_FREE char *file = NULL, *overlay = NULL;
  struct json_object *nodes = NULL, *n, *image, *o, *file_spec, *args;
  struct json_object *ret = NULL;
  int64_t size;
  int c, rc;

  while ((c = next_option (ctl, self, argc, argv, opts, &rc)) > 0) {
    switch (c) {
    case O_FILE: file_arg = optarg; break;
    case O_NODE:
      if (!node_name_is_valid (optarg))
        return usage_error (self, "--overlay-node: '%s' is not a valid "
                            "node name (a letter, then letters, digits, "
                            "'-', '.' and '_'; at most %d bytes)", optarg,
                            MAX_NODE_NAME);
      free (overlay);
      overlay = check_alloc (strdup (optarg));
      break;
    }
  }
  if (c == -1)
    return rc;
  if (argc - optind != 1)
    return usage_error (self, "expected one NODE");
  if (file_arg == NULL)
    return usage_error (self, "--overlay-file is required");
  if (*file_arg == '\0')
    return usage_error (self, "--overlay-file: expected a file name, got "
                        "an empty string");
  node = argv[optind];
  file = absolute_path (file_arg);
  if (file == NULL)
    return EXIT_LOCAL;
  if (overlay == NULL)
    overlay = overlay_node_name (file);

  /* 1. What the overlay sits on: NODE's image, its format and size. */
  rc = ctl_call (ctl, "query-named-block-nodes", NULL, &nodes);
  if (rc)
    return rc;
  if (!json_object_is_type (nodes, json_type_array)) {
    ctl_error ("snapshot: the daemon's query-named-block-nodes did not "
               "return a list");
    rc = EXIT_REFUSED;
    goto out;
  }
  n = find_node (nodes, node);
  if (n == NULL) {
    ctl_error ("snapshot: no node named '%s' (see nbdctl node list)", node);
    rc = EXIT_REFUSED;
    goto out;
  }
  if (find_node (nodes, overlay)) {
    ctl_error ("snapshot: the overlay's node name '%s' is in use: choose "
               "another with --overlay-node NAME", overlay);
    rc = EXIT_REFUSED;
    goto out;
  }
  image = jget (n, "image");
  backing = jstr (image, "filename");
  if (backing == NULL || *backing == '\0')
    backing = jstr (n, "file");
  fmt = jstr (image, "format") ? jstr (image, "format") : jstr (n, "drv");
  if (fmt && strcmp (fmt, "file") == 0)
    fmt = "raw";                /* a file node is raw data */
  if (backing == NULL || *backing == '\0' || fmt == NULL ||
      !jint (image, "virtual-size", &size)) {
    ctl_error ("snapshot: the daemon does not say which image file node "
               "'%s' reads, or its format or size", node);
    rc = EXIT_REFUSED;
    goto out;
  }
  /* The overlay's backing is read as an image of this format: a
   * filter's name (throttle) would make an image nothing can open.
   */
  if (strcmp (fmt, "qcow2") != 0 && strcmp (fmt, "raw") != 0) {
    ctl_error ("snapshot: node '%s' is a %s node, not an image: snapshot "
               "the qcow2 or raw node under it, and move the filter with "
               "blockdev-insert-node", node, fmt);
    rc = EXIT_REFUSED;
    goto out;
  }
  /* Written into the overlay as it is, a relative name would be read
   * relative to the overlay's folder, not the daemon's working
   * directory where the node found it; a json: name is no file at all.
   */
  if (backing[0] != '/') {
    ctl_error ("snapshot: node '%s' reads '%s', which is not an absolute "
               "file name: the overlay could not find its backing file "
               "(add the node again with an absolute file name)", node,
               backing);
    rc = EXIT_REFUSED;
    goto out;
  }

  /* 2. The overlay image, backed by NODE's file. */
  o = image_options ("qcow2", file, size);
  jadd_str (o, "backing-file", backing);
  jadd_str (o, "backing-fmt", fmt);
  rc = image_create (ctl, o, &ret);
  json_object_put (ret);
  ret = NULL;
  if (rc) {
    ctl_error ("snapshot: creating the overlay %s failed; the graph was "
               "not changed", file);
    goto out;
  }

  /* 3. Open it with no backing: blockdev-snapshot attaches NODE. */
  args = jobj ();
  file_spec = jobj ();
  jadd_str (file_spec, "driver", "file");
  jadd_str (file_spec, "filename", file);
  jadd_str (args, "driver", "qcow2");
  jadd_str (args, "node-name", overlay);
  jadd (args, "file", file_spec);
  jadd (args, "backing", NULL);
  rc = ctl_call (ctl, "blockdev-add", args, &ret);
  json_object_put (ret);
  ret = NULL;
  if (rc) {
    ctl_error ("snapshot: %s was created and is left in place; remove it "
               "with rm", file);
    goto out;
  }

  /* 4. Writes to NODE's users go to the overlay from now on. */
  args = jobj ();
  jadd_str (args, "node", node);
  jadd_str (args, "overlay", overlay);
  rc = ctl_call (ctl, "blockdev-snapshot", args, &ret);
  json_object_put (ret);
  ret = NULL;
  if (rc) {
    int undo;
    args = jobj ();
    jadd_str (args, "node-name", overlay);
    undo = ctl_call (ctl, "blockdev-del", args, &ret);
    json_object_put (ret);
    if (undo)
      ctl_error ("snapshot: could not remove the overlay node '%s' again: "
                 "remove it with nbdctl node remove %s", overlay, overlay);
    ctl_error ("snapshot: %s was created and is left in place; remove it "
               "with rm", file);
    goto out;
  }

  if (ctl->json) {
    o = jobj ();
    jadd_str (o, "node", node);
    jadd_str (o, "overlay-node", overlay);
    jadd_str (o, "overlay-file", file);
    print_json (o);
    json_object_put (o);
  }
  else {
    CLEANUP_FREE char *enode = escape_text (node);
    CLEANUP_FREE char *efile = escape_text (file);
    printf ("%s: new writes go to overlay node %s (%s)\n", enode, overlay,
            efile);
  }
 out:
  json_object_put (nodes);
  return rc;
}

/* ---- throttle ---- */

/* nbdctl's option, QEMU's argument, and whether it is a size. */
static const struct {
  const char *opt, *arg;
  bool size;
} throttle_args[] = {
  { "bps", "bps", true },
  { "bps-read", "bps_rd", true },
  { "bps-write", "bps_wr", true },
  { "iops", "iops", false },
  { "iops-read", "iops_rd", false },
  { "iops-write", "iops_wr", false },
  { "bps-max", "bps_max", true },
  { "bps-read-max", "bps_rd_max", true },
  { "bps-write-max", "bps_wr_max", true },
  { "iops-max", "iops_max", false },
  { "iops-read-max", "iops_rd_max", false },
  { "iops-write-max", "iops_wr_max", false },
  { "bps-max-length", "bps_max_length", false },
  { "bps-read-max-length", "bps_rd_max_length", false },
  { "bps-write-max-length", "bps_wr_max_length", false },
  { "iops-max-length", "iops_max_length", false },
  { "iops-read-max-length", "iops_rd_max_length", false },
  { "iops-write-max-length", "iops_wr_max_length", false },
  { "iops-size", "iops_size", true },
};

static int
cmd_throttle (struct nbdctl *ctl, const struct command *self, int argc,
              char **argv)
{
  enum { O_NODE = OPT_FIRST_COMMAND_OPTION, O_GROUP, O_LIMIT };
  struct option opts[4 + ARRAY_SIZE (throttle_args) + 1] = {
    COMMON_OPTIONS,
    { "node", required_argument, NULL, O_NODE },
    { "group", required_argument, NULL, O_GROUP },
  };
  CLEANUP_JSON_PUT struct json_object *args = jobj ();
  struct json_object *ret = NULL;
  const char *node = NULL, *group = NULL;
  size_t nlimits = 0;
  int c, rc;

  for (size_t i = 0; i < ARRAY_SIZE (throttle_args); ++i)
    opts[4 + i] = (struct option) { throttle_args[i].opt, required_argument,
                                    NULL, O_LIMIT + i };
  while ((c = next_option (ctl, self, argc, argv, opts, &rc)) > 0) {
    switch (c) {
    case O_NODE: node = optarg; break;
    case O_GROUP: group = optarg; break;
    default: {
      size_t i = c - O_LIMIT;
      uint64_t v;
      if (throttle_args[i].size) {
        if (parse_size_arg (self, throttle_args[i].opt, optarg, &v))
          return EXIT_USAGE;
      }
      else if (parse_uint64 (optarg, &v) == -1 || v > INT64_MAX)
        return usage_error (self, "--%s: expected a number, got '%s'",
                            throttle_args[i].opt, optarg);
      jadd_int (args, throttle_args[i].arg, v);
      nlimits++;
    }
    }
  }
  if (c == -1)
    return rc;
  if (argc - optind != 0)
    return usage_error (self, "unexpected argument '%s'", argv[optind]);
  if (!node == !group)
    return usage_error (self, "give --node NAME or --group NAME");
  if (nlimits == 0)
    return usage_error (self, "expected at least one limit (0 removes "
                        "one)");
  jadd_str (args, node ? "node-name" : "group", node ? node : group);
  rc = ctl_call (ctl, "block-set-io-throttle", steal_pointer (&args), &ret);
  return rc ? rc : done (ctl, ret);
}

/* ---- bitmap ---- */

static int
cmd_bitmap_add (struct nbdctl *ctl, const struct command *self, int argc,
                char **argv)
{
  enum { O_GRANULARITY = OPT_FIRST_COMMAND_OPTION, O_PERSISTENT,
         O_DISABLED };
  static const struct option opts[] = {
    COMMON_OPTIONS,
    { "granularity", required_argument, NULL, O_GRANULARITY },
    { "persistent", no_argument, NULL, O_PERSISTENT },
    { "disabled", no_argument, NULL, O_DISABLED },
    { NULL, 0, NULL, 0 },
  };
  CLEANUP_JSON_PUT struct json_object *args = jobj ();
  struct json_object *ret = NULL;
  uint64_t granularity;
  int c, rc;

  /* The daemon checks the granularity's range (a power of 2 from 512
   * bytes to 2 GiB) and says so: we only parse the size.
   */
  while ((c = next_option (ctl, self, argc, argv, opts, &rc)) > 0) {
    switch (c) {
    case O_GRANULARITY:
      if (parse_size_arg (self, "granularity", optarg, &granularity))
        return EXIT_USAGE;
      jadd_int (args, "granularity", granularity);
      break;
    case O_PERSISTENT: jadd_bool (args, "persistent", true); break;
    case O_DISABLED: jadd_bool (args, "disabled", true); break;
    }
  }
  if (c == -1)
    return rc;
  if (argc - optind != 2)
    return usage_error (self, "expected NODE NAME");
  jadd_str (args, "node", argv[optind]);
  jadd_str (args, "name", argv[optind + 1]);
  rc = ctl_call (ctl, "block-dirty-bitmap-add", steal_pointer (&args), &ret);
  return rc ? rc : done (ctl, ret);
}

/* bitmap remove, clear, enable and disable: NODE NAME, and the QMP
 * command is block-dirty-bitmap- followed by the subcommand.
 */
static int
cmd_bitmap_node_name (struct nbdctl *ctl, const struct command *self,
                      int argc, char **argv)
{
  const char *sub = strchr (self->name, ' ') + 1;
  CLEANUP_FREE char *cmd = NULL;
  struct json_object *args, *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 2, 2, &rc) == -1)
    return rc;
  if (asprintf (&cmd, "block-dirty-bitmap-%s", sub) == -1)
    out_of_memory ();
  args = jobj ();
  jadd_str (args, "node", argv[optind]);
  jadd_str (args, "name", argv[optind + 1]);
  rc = ctl_call (ctl, cmd, args, &ret);
  return rc ? rc : done (ctl, ret);
}

static int
cmd_bitmap_merge (struct nbdctl *ctl, const struct command *self, int argc,
                  char **argv)
{
  CLEANUP_JSON_PUT struct json_object *args = NULL;
  struct json_object *sources, *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 3, INT_MAX, &rc) == -1)
    return rc;
  args = jobj ();
  sources = check_alloc (json_object_new_array ());
  jadd_str (args, "node", argv[optind]);
  jadd_str (args, "target", argv[optind + 1]);
  jadd (args, "bitmaps", sources);
  for (int i = optind + 2; i < argc; ++i) {
    struct json_object *src = bitmap_ref (self, "SOURCE", argv[i]);
    if (src == NULL)
      return EXIT_USAGE;
    if (json_object_array_add (sources, src) != 0)
      out_of_memory ();
  }
  rc = ctl_call (ctl, "block-dirty-bitmap-merge", steal_pointer (&args),
                 &ret);
  return rc ? rc : done (ctl, ret);
}

static int
cmd_bitmap_fork (struct nbdctl *ctl, const struct command *self, int argc,
                 char **argv)
{
  enum { O_SESSION = OPT_FIRST_COMMAND_OPTION };
  static const struct option opts[] = {
    COMMON_OPTIONS,
    { "session", required_argument, NULL, O_SESSION },
    { NULL, 0, NULL, 0 },
  };
  struct json_object *args, *ret = NULL;
  const char *session = NULL;
  int c, rc;

  while ((c = next_option (ctl, self, argc, argv, opts, &rc)) > 0)
    session = optarg;           /* O_SESSION, the only one */
  if (c == -1)
    return rc;
  if (argc - optind != 2)
    return usage_error (self, "expected NODE NAME");
  args = jobj ();
  jadd_str (args, "node", argv[optind]);
  jadd_str (args, "name", argv[optind + 1]);
  if (session)
    jadd_str (args, "session", session);
  rc = ctl_call (ctl, "block-dirty-bitmap-fork", args, &ret);
  return rc ? rc : done (ctl, ret);
}

static int
cmd_bitmap_unfork (struct nbdctl *ctl, const struct command *self, int argc,
                   char **argv)
{
  enum { O_SUCCESS = OPT_FIRST_COMMAND_OPTION, O_FAILURE };
  static const struct option opts[] = {
    COMMON_OPTIONS,
    { "success", no_argument, NULL, O_SUCCESS },
    { "failure", no_argument, NULL, O_FAILURE },
    { NULL, 0, NULL, 0 },
  };
  struct json_object *args, *ret = NULL;
  bool success = false, failure = false;
  int c, rc;

  while ((c = next_option (ctl, self, argc, argv, opts, &rc)) > 0) {
    if (c == O_SUCCESS)
      success = true;
    else
      failure = true;
  }
  if (c == -1)
    return rc;
  /* No default: guessing the backup's outcome would lose bits or keep
   * stale ones.
   */
  if (success && failure)
    return usage_error (self, "give --success or --failure, not both");
  if (!success && !failure)
    return usage_error (self, "expected --success or --failure");
  if (argc - optind != 2)
    return usage_error (self, "expected NODE NAME");
  args = jobj ();
  jadd_str (args, "node", argv[optind]);
  jadd_str (args, "name", argv[optind + 1]);
  jadd_str (args, "outcome", success ? "success" : "failure");
  rc = ctl_call (ctl, "block-dirty-bitmap-unfork", args, &ret);
  return rc ? rc : done (ctl, ret);
}

/* Seconds since the epoch as ISO 8601 UTC, "-" if absent or out of
 * range.
 */
static const char *
jtime (struct json_object *o, const char *key, char *buf, size_t len)
{
  struct tm tm;
  int64_t v;
  time_t t;

  if (!jint (o, key, &v) || v < 0 || (time_t) v != v)
    return "-";
  t = v;
  if (gmtime_r (&t, &tm) == NULL ||
      strftime (buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
    return "-";
  return buf;
}

static void
lineage_row (struct table *t, struct json_object *e)
{
  char id[32], when[64];

  t_add (t, jtext (e, "id", id, sizeof id),
         jtime (e, "time", when, sizeof when),
         jstr (e, "node"), jstr (e, "name"), jstr (e, "event"),
         jstr (e, "parent"), jstr (e, "session"));
}

static int
cmd_bitmap_lineage (struct nbdctl *ctl, const struct command *self, int argc,
                    char **argv)
{
  static const char *const headers[] = {
    "ID", "TIME", "NODE", "NAME", "EVENT", "PARENT", "SESSION", NULL
  };
  struct json_object *args, *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 0, 2, &rc) == -1)
    return rc;
  args = jobj ();
  if (argc - optind >= 1)
    jadd_str (args, "node", argv[optind]);
  if (argc - optind == 2)
    jadd_str (args, "name", argv[optind + 1]);
  rc = ctl_call (ctl, "query-bitmap-lineage", args, &ret);
  if (rc)
    return rc;
  rc = print_list (ctl, ret, headers, "rllllll", lineage_row);
  json_object_put (ret);
  return rc;
}

static void
bitmap_row (struct table *t, struct json_object *b)
{
  char granularity[32], count[32];

  t_add (t, jstr (b, "node"), jstr (b, "name"),
         jnum (b, "granularity", true, granularity, sizeof granularity),
         jnum (b, "count", true, count, sizeof count),
         jyesno (b, "recording"), jyesno (b, "busy"), jyesno (b, "frozen"),
         jyesno (b, "persistent"), jyesno (b, "inconsistent"));
}

/* The bitmaps of the nodes in @nodes (query-named-block-nodes), or of
 * node @only, each as {"node", then the daemon's fields}.  Caller puts
 * the list.
 */
static struct json_object *
bitmaps_of_nodes (struct json_object *nodes, const char *only)
{
  struct json_object *list = check_alloc (json_object_new_array ());

  for (size_t i = 0; i < json_object_array_length (nodes); ++i) {
    struct json_object *n = json_object_array_get_idx (nodes, i);
    struct json_object *bitmaps = jget (n, "dirty-bitmaps");
    const char *node = jstr (n, "node-name");

    if (node == NULL || !json_object_is_type (bitmaps, json_type_array) ||
        (only && strcmp (node, only) != 0))
      continue;
    for (size_t j = 0; j < json_object_array_length (bitmaps); ++j) {
      struct json_object *b = json_object_array_get_idx (bitmaps, j);
      struct json_object *o;

      if (!json_object_is_type (b, json_type_object))
        continue;
      o = jobj ();
      jadd_str (o, "node", node);
      json_object_object_foreach (b, key, v) {
        if (strcmp (key, "node") != 0)
          jadd (o, key, json_object_get (v));
      }
      if (json_object_array_add (list, o) != 0)
        out_of_memory ();
    }
  }
  return list;
}

static int
cmd_bitmap_list (struct nbdctl *ctl, const struct command *self, int argc,
                 char **argv)
{
  static const char *const headers[] = {
    "NODE", "NAME", "GRANULARITY", "COUNT", "RECORDING", "BUSY", "FROZEN",
    "PERSISTENT", "INCONSISTENT", NULL
  };
  CLEANUP_JSON_PUT struct json_object *nodes = NULL, *list = NULL;
  const char *only;
  struct json_object *args;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 0, 1, &rc) == -1)
    return rc;
  only = argc - optind == 1 ? argv[optind] : NULL;
  args = jobj ();
  jadd_bool (args, "flat", true);
  rc = ctl_call (ctl, "query-named-block-nodes", args, &nodes);
  if (rc)
    return rc;
  if (!json_object_is_type (nodes, json_type_array)) {
    ctl_error ("bitmap list: the daemon's query-named-block-nodes did not "
               "return a list");
    return EXIT_REFUSED;
  }
  if (only && find_node (nodes, only) == NULL) {
    ctl_error ("bitmap list: no node named '%s' (see nbdctl node list)",
               only);
    return EXIT_REFUSED;
  }
  list = bitmaps_of_nodes (nodes, only);
  return print_list (ctl, list, headers, "llrrlllll", bitmap_row);
}

/* ---- fleece ---- */

static int
cmd_fleece_start (struct nbdctl *ctl, const struct command *self, int argc,
                  char **argv)
{
  enum { O_ID = OPT_FIRST_COMMAND_OPTION, O_BITMAP, O_EXPORT,
         O_SCRATCH_LIMIT, O_INCREMENTAL };
  static const struct option opts[] = {
    COMMON_OPTIONS,
    { "id", required_argument, NULL, O_ID },
    { "bitmap", required_argument, NULL, O_BITMAP },
    { "export", required_argument, NULL, O_EXPORT },
    { "scratch-limit", required_argument, NULL, O_SCRATCH_LIMIT },
    { "incremental", no_argument, NULL, O_INCREMENTAL },
    { NULL, 0, NULL, 0 },
  };
  CLEANUP_JSON_PUT struct json_object *args = jobj ();
  struct json_object *bitmaps = NULL, *ret = NULL;
  const char *id, *export;
  uint64_t limit;
  int c, rc;

  while ((c = next_option (ctl, self, argc, argv, opts, &rc)) > 0) {
    switch (c) {
    case O_ID:
      /* It names the fleece's nodes (ID-scratch, ID-cbw, ID-snap). */
      if (!node_name_is_valid (optarg))
        return usage_error (self, "--id: '%s' is not a valid fleece id (a "
                            "letter, then letters, digits, '-', '.' and "
                            "'_')", optarg);
      jadd_str (args, "id", optarg);
      break;
    case O_BITMAP:
      /* A name on NODE: a fleece forks only the fleeced node's. */
      if (*optarg == '\0')
        return usage_error (self, "--bitmap: expected a bitmap name, got "
                            "an empty string");
      if (bitmaps == NULL) {
        bitmaps = check_alloc (json_object_new_array ());
        jadd (args, "bitmaps", bitmaps);
      }
      /* The daemon would fork it twice, and say the second time that
       * it is forked already.
       */
      for (size_t i = 0; i < json_object_array_length (bitmaps); ++i)
        if (strcmp (json_object_get_string
                    (json_object_array_get_idx (bitmaps, i)), optarg) == 0)
          return usage_error (self, "--bitmap: '%s' is given twice",
                              optarg);
      if (json_object_array_add (bitmaps, check_alloc
                                 (json_object_new_string (optarg))) != 0)
        out_of_memory ();
      break;
    case O_EXPORT:
      if (*optarg == '\0')
        return usage_error (self, "--export: expected an export name, got "
                            "an empty string");
      jadd_str (args, "export", optarg);
      break;
    case O_SCRATCH_LIMIT:
      if (parse_size_arg (self, "scratch-limit", optarg, &limit))
        return EXIT_USAGE;
      jadd_int (args, "scratch-limit", limit);
      break;
    case O_INCREMENTAL:
      jadd_bool (args, "incremental", true);
      break;
    }
  }
  if (c == -1)
    return rc;
  if (argc - optind != 1)
    return usage_error (self, "expected one NODE");
  if (json_object_object_get_ex (args, "incremental", NULL) &&
      bitmaps == NULL)
    return usage_error (self, "--incremental needs a --bitmap: the "
                        "snapshot holds only what the bitmaps mark");
  jadd_str (args, "node", argv[optind]);
  rc = ctl_call (ctl, "fleece-start", steal_pointer (&args), &ret);
  if (rc)
    return rc;
  id = jstr (ret, "id");
  export = jstr (ret, "export");
  if (ctl->json || id == NULL || export == NULL)
    print_json (ret);
  else {
    CLEANUP_FREE char *eid = escape_text (id);
    CLEANUP_FREE char *enode = escape_text (argv[optind]);
    CLEANUP_FREE char *eexport = escape_text (export);
    printf ("fleece %s: %s as it is now, exported as %s\n", eid, enode,
            eexport);
  }
  json_object_put (ret);
  return EXIT_OK;
}

static int
cmd_fleece_stop (struct nbdctl *ctl, const struct command *self, int argc,
                 char **argv)
{
  enum { O_SUCCESS = OPT_FIRST_COMMAND_OPTION, O_FAILURE };
  static const struct option opts[] = {
    COMMON_OPTIONS,
    { "success", no_argument, NULL, O_SUCCESS },
    { "failure", no_argument, NULL, O_FAILURE },
    { NULL, 0, NULL, 0 },
  };
  struct json_object *args, *ret = NULL;
  bool success = false, failure = false;
  int c, rc;

  while ((c = next_option (ctl, self, argc, argv, opts, &rc)) > 0) {
    if (c == O_SUCCESS)
      success = true;
    else
      failure = true;
  }
  if (c == -1)
    return rc;
  /* No default, as for bitmap unfork: the backup's outcome decides
   * what the bitmaps keep.
   */
  if (success && failure)
    return usage_error (self, "give --success or --failure, not both");
  if (!success && !failure)
    return usage_error (self, "expected --success or --failure");
  if (argc - optind != 1)
    return usage_error (self, "expected one fleece ID");
  args = jobj ();
  jadd_str (args, "id", argv[optind]);
  jadd_str (args, "outcome", success ? "success" : "failure");
  rc = ctl_call (ctl, "fleece-stop", args, &ret);
  return rc ? rc : done (ctl, ret);
}

/* A list of strings, comma-joined ("b0,b1"), or NULL if empty. */
static char *
join_strings (struct json_object *list)
{
  char *s = NULL;
  size_t len = 0, n = 0;
  FILE *fp;

  if (!json_object_is_type (list, json_type_array) ||
      json_object_array_length (list) == 0)
    return NULL;
  fp = check_alloc (open_memstream (&s, &len));
  for (size_t i = 0; i < json_object_array_length (list); ++i) {
    struct json_object *v = json_object_array_get_idx (list, i);
    if (json_object_is_type (v, json_type_string))
      fprintf (fp, "%s%s", n++ ? "," : "", json_object_get_string (v));
  }
  if (fclose (fp) != 0)
    out_of_memory ();
  return s;
}

/* Seconds as ps shows elapsed time, [[DD-]hh:]mm:ss; "-" if absent. */
static const char *
jage (struct json_object *o, const char *key, char *buf, size_t len)
{
  int64_t v;

  if (!jint (o, key, &v) || v < 0)
    return "-";
  if (v >= 86400)
    snprintf (buf, len, "%" PRId64 "-%02" PRId64 ":%02" PRId64 ":%02"
              PRId64, v / 86400, v / 3600 % 24, v / 60 % 60, v % 60);
  else if (v >= 3600)
    snprintf (buf, len, "%02" PRId64 ":%02" PRId64 ":%02" PRId64,
              v / 3600, v / 60 % 60, v % 60);
  else
    snprintf (buf, len, "%02" PRId64 ":%02" PRId64, v / 60, v % 60);
  return buf;
}

static void
fleece_row (struct table *t, struct json_object *f)
{
  CLEANUP_FREE char *bitmaps = join_strings (jget (f, "bitmaps"));
  char scratch[32], limit_buf[32], age[32], clients[32];
  const char *limit = jnum (f, "scratch-limit", true, limit_buf,
                            sizeof limit_buf);
  const char *incremental = jyesno (f, "incremental");
  int64_t l;

  if (jint (f, "scratch-limit", &l) && l == 0)
    limit = "-";                /* none but the filesystem's */
  t_add (t, jstr (f, "id"), jstr (f, "node"), jstr (f, "export"), bitmaps,
         incremental && strcmp (incremental, "yes") == 0 ? "incremental"
         : "full",
         jnum (f, "scratch-bytes", true, scratch, sizeof scratch), limit,
         jage (f, "age", age, sizeof age),
         jnum (f, "clients", false, clients, sizeof clients),
         jstr (f, "state"), jstr (f, "error"));
}

static int
cmd_fleece_list (struct nbdctl *ctl, const struct command *self, int argc,
                 char **argv)
{
  static const char *const headers[] = {
    "ID", "NODE", "EXPORT", "BITMAPS", "SNAPSHOT", "SCRATCH", "LIMIT", "AGE",
    "CLIENTS", "STATE", "ERROR", NULL
  };
  struct json_object *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 0, 0, &rc) == -1)
    return rc;
  rc = ctl_call (ctl, "query-fleeces", NULL, &ret);
  if (rc)
    return rc;
  rc = print_list (ctl, ret, headers, "lllllrrrrll", fleece_row);
  json_object_put (ret);
  return rc;
}

/* ---- block jobs ---- */

/* The options every job command takes; each command's own ones are
 * numbered from O_EXTRA.
 */
enum { O_JOB_ID = OPT_FIRST_COMMAND_OPTION, O_JOB_SPEED,
       O_JOB_NO_AUTO_DISMISS, O_EXTRA };

/* Parse the common options into @args (and *@id), calling @extra_opt
 * for the others (0, or an exit code).  -1 when all are parsed and the
 * command goes on, else the exit code to return now (--help: 0).
 */
static int
parse_job_options (struct nbdctl *ctl, const struct command *self,
                   int argc, char **argv, const struct option *opts,
                   struct json_object *args, char **id,
                   int (*extra_opt) (const struct command *, int,
                                     struct json_object *))
{
  uint64_t v;
  int c, r, rc;

  while ((c = next_option (ctl, self, argc, argv, opts, &rc)) > 0) {
    switch (c) {
    case O_JOB_ID:
      if (!node_name_is_valid (optarg))
        return usage_error (self, "--id: '%s' is not a valid job id (a "
                            "letter, then letters, digits, '-', '.' and "
                            "'_')", optarg);
      free (*id);
      *id = check_alloc (strdup (optarg));
      break;
    case O_JOB_SPEED:
      if (parse_size_arg (self, "speed", optarg, &v))
        return EXIT_USAGE;
      jadd_int (args, "speed", v);
      break;
    case O_JOB_NO_AUTO_DISMISS:
      jadd_bool (args, "auto-dismiss", false);
      break;
    default:
      if ((r = extra_opt (self, c, args)) != 0)
        return r;
    }
  }
  return c == -1 ? rc : -1;
}

#define JOB_OPTIONS                                                     \
  COMMON_OPTIONS,                                                       \
  { "id", required_argument, NULL, O_JOB_ID },                          \
  { "speed", required_argument, NULL, O_JOB_SPEED },                    \
  { "no-auto-dismiss", no_argument, NULL, O_JOB_NO_AUTO_DISMISS }

/* Send @command with @args (taken over), the job id in it (the
 * default: PREFIX-NODE), and say which job started: "job ID: @what".
 */
static int
start_job_command (struct nbdctl *ctl, const struct command *self,
                   const char *command, const char *prefix,
                   const char *node, char *id, struct json_object *args,
                   const char *what)
{
  CLEANUP_FREE char *own = NULL;
  struct json_object *ret = NULL;
  int rc;

  if (id == NULL) {
    if (asprintf (&own, "%s-%s", prefix, node) == -1)
      out_of_memory ();
    if (!node_name_is_valid (own)) {
      json_object_put (args);
      return usage_error (self, "'%s' is not a valid job id: give one with "
                          "--id", own);
    }
    id = own;
  }
  jadd_str (args, "job-id", id);
  rc = ctl_call (ctl, command, args, &ret);
  if (rc)
    return rc;
  json_object_put (ret);
  if (ctl->json) {
    struct json_object *o = jobj ();
    jadd_str (o, "id", id);
    print_json (o);
    json_object_put (o);
  }
  else {
    CLEANUP_FREE char *eid = escape_text (id);
    CLEANUP_FREE char *ewhat = escape_text (what);
    printf ("job %s: %s\n", eid, ewhat);
  }
  return EXIT_OK;
}

/* --on-error and friends: QEMU's BlockdevOnError, into @key. */
static int
on_error_opt (const struct command *self, const char *opt, const char *key,
              struct json_object *args)
{
  if (strcmp (optarg, "report") != 0 && strcmp (optarg, "ignore") != 0 &&
      strcmp (optarg, "stop") != 0 && strcmp (optarg, "enospc") != 0)
    return usage_error (self, "--%s: expected report, ignore, stop or "
                        "enospc, got '%s'", opt, optarg);
  jadd_str (args, key, optarg);
  return 0;
}

enum { O_MIRROR_SYNC = O_EXTRA, O_MIRROR_GRANULARITY, O_MIRROR_BUF_SIZE,
       O_MIRROR_COPY_MODE, O_MIRROR_ON_SOURCE_ERROR,
       O_MIRROR_ON_TARGET_ERROR };

/* The daemon checks the granularity and buf-size ranges (they depend
 * on each other) and says so: we only parse the sizes.
 */
static int
mirror_opt (const struct command *self, int c, struct json_object *args)
{
  uint64_t v;

  switch (c) {
  case O_MIRROR_SYNC:
    if (strcmp (optarg, "full") != 0 && strcmp (optarg, "top") != 0 &&
        strcmp (optarg, "none") != 0)
      return usage_error (self, "--sync: expected full, top or none, "
                          "got '%s'", optarg);
    jadd_str (args, "sync", optarg);
    break;
  case O_MIRROR_GRANULARITY:
    if (parse_size_arg (self, "granularity", optarg, &v))
      return EXIT_USAGE;
    jadd_int (args, "granularity", v);
    break;
  case O_MIRROR_BUF_SIZE:
    if (parse_size_arg (self, "buf-size", optarg, &v))
      return EXIT_USAGE;
    jadd_int (args, "buf-size", v);
    break;
  case O_MIRROR_COPY_MODE:
    if (strcmp (optarg, "background") != 0 &&
        strcmp (optarg, "write-blocking") != 0)
      return usage_error (self, "--copy-mode: expected background or "
                          "write-blocking, got '%s'", optarg);
    jadd_str (args, "copy-mode", optarg);
    break;
  case O_MIRROR_ON_SOURCE_ERROR:
    return on_error_opt (self, "on-source-error", "on-source-error", args);
  case O_MIRROR_ON_TARGET_ERROR:
    return on_error_opt (self, "on-target-error", "on-target-error", args);
  }
  return 0;
}

static int
cmd_mirror (struct nbdctl *ctl, const struct command *self, int argc,
            char **argv)
{
  static const struct option opts[] = {
    JOB_OPTIONS,
    { "sync", required_argument, NULL, O_MIRROR_SYNC },
    { "granularity", required_argument, NULL, O_MIRROR_GRANULARITY },
    { "buf-size", required_argument, NULL, O_MIRROR_BUF_SIZE },
    { "copy-mode", required_argument, NULL, O_MIRROR_COPY_MODE },
    { "on-source-error", required_argument, NULL, O_MIRROR_ON_SOURCE_ERROR },
    { "on-target-error", required_argument, NULL, O_MIRROR_ON_TARGET_ERROR },
    { NULL, 0, NULL, 0 },
  };
  CLEANUP_JSON_PUT struct json_object *args = jobj ();
  CLEANUP_FREE char *id = NULL, *what = NULL;
  const char *sync, *copy_mode;
  int rc;

  if ((rc = parse_job_options (ctl, self, argc, argv, opts, args, &id,
                               mirror_opt)) != -1)
    return rc;
  if (argc - optind != 2)
    return usage_error (self, "expected NODE TARGET");
  /* No default, as in QEMU: copying everything or only new writes is
   * the caller's choice.
   */
  if ((sync = jstr (args, "sync")) == NULL)
    return usage_error (self, "--sync full|top|none is required");
  copy_mode = jstr (args, "copy-mode");
  jadd_str (args, "device", argv[optind]);
  jadd_str (args, "target", argv[optind + 1]);
  if (asprintf (&what, "mirroring %s to %s (sync %s%s%s)", argv[optind],
                argv[optind + 1], sync, copy_mode ? ", copy-mode " : "",
                copy_mode ? copy_mode : "") == -1)
    out_of_memory ();
  return start_job_command (ctl, self, "blockdev-mirror", "mirror",
                            argv[optind], id, steal_pointer (&args), what);
}

/* ---- backup, stream and commit ---- */

enum { O_BACKUP_SYNC = O_EXTRA, O_BACKUP_BITMAP, O_BACKUP_BITMAP_MODE };

static int
backup_opt (const struct command *self, int c, struct json_object *args)
{
  switch (c) {
  case O_BACKUP_SYNC:
    if (strcmp (optarg, "full") != 0 && strcmp (optarg, "incremental") != 0 &&
        strcmp (optarg, "bitmap") != 0)
      return usage_error (self, "--sync: expected full, incremental or "
                          "bitmap, got '%s'", optarg);
    jadd_str (args, "sync", optarg);
    break;
  case O_BACKUP_BITMAP:
    if (*optarg == '\0')
      return usage_error (self, "--bitmap: expected a bitmap name, got an "
                          "empty string");
    jadd_str (args, "bitmap", optarg);
    break;
  case O_BACKUP_BITMAP_MODE:
    if (strcmp (optarg, "on-success") != 0 && strcmp (optarg, "never") != 0 &&
        strcmp (optarg, "always") != 0)
      return usage_error (self, "--bitmap-mode: expected on-success, never "
                          "or always, got '%s'", optarg);
    jadd_str (args, "bitmap-mode", optarg);
    break;
  }
  return 0;
}

static int
cmd_backup (struct nbdctl *ctl, const struct command *self, int argc,
            char **argv)
{
  static const struct option opts[] = {
    JOB_OPTIONS,
    { "sync", required_argument, NULL, O_BACKUP_SYNC },
    { "bitmap", required_argument, NULL, O_BACKUP_BITMAP },
    { "bitmap-mode", required_argument, NULL, O_BACKUP_BITMAP_MODE },
    { NULL, 0, NULL, 0 },
  };
  CLEANUP_JSON_PUT struct json_object *args = jobj ();
  CLEANUP_FREE char *id = NULL, *what = NULL;
  const char *sync;
  int rc;

  if ((rc = parse_job_options (ctl, self, argc, argv, opts, args, &id,
                               backup_opt)) != -1)
    return rc;
  if (argc - optind != 2)
    return usage_error (self, "expected NODE TARGET");
  if ((sync = jstr (args, "sync")) == NULL)
    return usage_error (self, "--sync full|incremental|bitmap is required");
  if ((strcmp (sync, "full") == 0) != (jstr (args, "bitmap") == NULL))
    return usage_error (self, "--sync %s %s", sync,
                        strcmp (sync, "full") == 0 ? "takes no --bitmap"
                        : "needs a --bitmap");
  jadd_str (args, "device", argv[optind]);
  jadd_str (args, "target", argv[optind + 1]);
  if (asprintf (&what, "backing up %s to %s (sync %s)", argv[optind],
                argv[optind + 1], sync) == -1)
    out_of_memory ();
  return start_job_command (ctl, self, "blockdev-backup", "backup",
                            argv[optind], id, steal_pointer (&args), what);
}

enum { O_CHAIN_BASE = O_EXTRA, O_CHAIN_TOP, O_CHAIN_BACKING_FILE,
       O_CHAIN_ON_ERROR };

static int
chain_opt (const struct command *self, int c, struct json_object *args)
{
  const char *key = c == O_CHAIN_BASE ? "base-node"
    : c == O_CHAIN_TOP ? "top-node" : "backing-file";

  if (c == O_CHAIN_ON_ERROR)
    return on_error_opt (self, "on-error", "on-error", args);

  if (*optarg == '\0')
    return usage_error (self, "--%s: expected a name, got an empty string",
                        c == O_CHAIN_BASE ? "base" : c == O_CHAIN_TOP ? "top"
                        : "backing-file");
  jadd_str (args, key, optarg);
  return 0;
}

static int
cmd_stream (struct nbdctl *ctl, const struct command *self, int argc,
            char **argv)
{
  static const struct option opts[] = {
    JOB_OPTIONS,
    { "base", required_argument, NULL, O_CHAIN_BASE },
    { "backing-file", required_argument, NULL, O_CHAIN_BACKING_FILE },
    { "on-error", required_argument, NULL, O_CHAIN_ON_ERROR },
    { NULL, 0, NULL, 0 },
  };
  CLEANUP_JSON_PUT struct json_object *args = jobj ();
  CLEANUP_FREE char *id = NULL, *what = NULL;
  const char *base;
  int rc;

  if ((rc = parse_job_options (ctl, self, argc, argv, opts, args, &id,
                               chain_opt)) != -1)
    return rc;
  if (argc - optind != 1)
    return usage_error (self, "expected one NODE");
  base = jstr (args, "base-node");
  jadd_str (args, "device", argv[optind]);
  if (asprintf (&what, "streaming into %s %s%s", argv[optind],
                base ? "the layers above " : "its whole backing chain",
                base ? base : "") == -1)
    out_of_memory ();
  /* block-stream's id defaults to the device in QEMU: so here. */
  return start_job_command (ctl, self, "block-stream", "stream",
                            argv[optind], id ? id : argv[optind],
                            steal_pointer (&args), what);
}

static int
cmd_commit (struct nbdctl *ctl, const struct command *self, int argc,
            char **argv)
{
  static const struct option opts[] = {
    JOB_OPTIONS,
    { "top", required_argument, NULL, O_CHAIN_TOP },
    { "base", required_argument, NULL, O_CHAIN_BASE },
    { "backing-file", required_argument, NULL, O_CHAIN_BACKING_FILE },
    { "on-error", required_argument, NULL, O_CHAIN_ON_ERROR },
    { NULL, 0, NULL, 0 },
  };
  CLEANUP_JSON_PUT struct json_object *args = jobj ();
  CLEANUP_FREE char *id = NULL, *what = NULL;
  const char *top, *base;
  int rc;

  if ((rc = parse_job_options (ctl, self, argc, argv, opts, args, &id,
                               chain_opt)) != -1)
    return rc;
  if (argc - optind != 1)
    return usage_error (self, "expected one NODE");
  top = jstr (args, "top-node");
  base = jstr (args, "base-node");
  jadd_str (args, "device", argv[optind]);
  if (asprintf (&what, "committing %s into %s", top ? top : argv[optind],
                base ? base : "the layer below it") == -1)
    out_of_memory ();
  return start_job_command (ctl, self, "block-commit", "commit",
                            argv[optind], id ? id : argv[optind],
                            steal_pointer (&args), what);
}

/* A job's progress, offset of len, as "[#####.....]  52%": ten steps of
 * 10%, rounded down, so that 100% means all of it.  Nothing to copy
 * (len 0) is all of it.
 */
static const char *
progress_bar (struct json_object *job, char *buf, size_t len)
{
  int64_t offset, total;
  unsigned pct;

  if (!jint (job, "offset", &offset) || !jint (job, "len", &total) ||
      offset < 0 || total < 0)
    return "-";
  if (offset >= total)
    pct = 100;
  else {
    /* In floating point: offset * 100 could overflow. */
    pct = (unsigned) ((double) offset * 100 / (double) total);
    if (pct > 99)
      pct = 99;
  }
  snprintf (buf, len, "[%.*s%.*s] %3u%%", (int) (pct / 10), "##########",
            (int) (10 - pct / 10), "..........", pct);
  return buf;
}

/* A speed limit in bytes/s, "4M/s"; "-" for none. */
static const char *
jspeed (struct json_object *o, char *buf, size_t len)
{
  char size[32];
  int64_t v;

  if (!jint (o, "speed", &v) || v <= 0)
    return "-";
  human_size (v, size, sizeof size);
  snprintf (buf, len, "%s/s", size);
  return buf;
}

static void
job_row (struct table *t, struct json_object *j)
{
  char progress[32], speed[40], stopped[64];
  const char *io = jstr (j, "io-status"), *error = jstr (j, "error");

  /* Paused by an error (on-*-error stop): say so until it resumes. */
  if (error == NULL && io && strcmp (io, "ok") != 0) {
    snprintf (stopped, sizeof stopped, "stopped: io-status %s", io);
    error = stopped;
  }
  t_add (t, jstr (j, "id") ? jstr (j, "id") : jstr (j, "device"),
         jstr (j, "type"), jstr (j, "status"),
         progress_bar (j, progress, sizeof progress),
         jspeed (j, speed, sizeof speed), jyesno (j, "ready"), error);
}

static int
cmd_job_list (struct nbdctl *ctl, const struct command *self, int argc,
              char **argv)
{
  static const char *const headers[] = {
    "ID", "TYPE", "STATUS", "PROGRESS", "SPEED", "READY", "ERROR", NULL
  };
  struct json_object *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 0, 0, &rc) == -1)
    return rc;
  rc = ctl_call (ctl, "query-block-jobs", NULL, &ret);
  if (rc)
    return rc;
  rc = print_list (ctl, ret, headers, "lllllll", job_row);
  json_object_put (ret);
  return rc;
}

/* job pause, resume, complete: ID, and the QMP command is
 * block-job- followed by the subcommand.
 */
static int
cmd_job_device (struct nbdctl *ctl, const struct command *self, int argc,
                char **argv)
{
  const char *sub = strchr (self->name, ' ') + 1;
  CLEANUP_FREE char *cmd = NULL;
  struct json_object *args, *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 1, 1, &rc) == -1)
    return rc;
  if (asprintf (&cmd, "block-job-%s", sub) == -1)
    out_of_memory ();
  args = jobj ();
  jadd_str (args, "device", argv[optind]);
  rc = ctl_call (ctl, cmd, args, &ret);
  return rc ? rc : done (ctl, ret);
}

static int
cmd_job_cancel (struct nbdctl *ctl, const struct command *self, int argc,
                char **argv)
{
  enum { O_FORCE = OPT_FIRST_COMMAND_OPTION };
  static const struct option opts[] = {
    COMMON_OPTIONS,
    { "force", no_argument, NULL, O_FORCE },
    { NULL, 0, NULL, 0 },
  };
  struct json_object *args, *ret = NULL;
  bool force = false;
  int c, rc;

  while ((c = next_option (ctl, self, argc, argv, opts, &rc)) > 0)
    force = true;               /* O_FORCE, the only one */
  if (c == -1)
    return rc;
  if (argc - optind != 1)
    return usage_error (self, "expected one job ID");
  args = jobj ();
  jadd_str (args, "device", argv[optind]);
  if (force)
    jadd_bool (args, "force", true);
  rc = ctl_call (ctl, "block-job-cancel", args, &ret);
  return rc ? rc : done (ctl, ret);
}

static int
cmd_job_dismiss (struct nbdctl *ctl, const struct command *self, int argc,
                 char **argv)
{
  struct json_object *args, *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 1, 1, &rc) == -1)
    return rc;
  args = jobj ();
  jadd_str (args, "id", argv[optind]);
  rc = ctl_call (ctl, "job-dismiss", args, &ret);
  return rc ? rc : done (ctl, ret);
}

static int
cmd_job_speed (struct nbdctl *ctl, const struct command *self, int argc,
               char **argv)
{
  struct json_object *args, *ret = NULL;
  uint64_t speed;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 2, 2, &rc) == -1)
    return rc;
  if (parse_size (argv[optind + 1], &speed) == -1 || speed > INT64_MAX)
    return usage_error (self, "SPEED: expected bytes per second (a number, "
                        "optionally with K, M, G or T; 0 for no limit), "
                        "got '%s'", argv[optind + 1]);
  args = jobj ();
  jadd_str (args, "device", argv[optind]);
  jadd_int (args, "speed", speed);
  rc = ctl_call (ctl, "block-job-set-speed", args, &ret);
  return rc ? rc : done (ctl, ret);
}

/* job wait follows a job by polling query-block-jobs.  A job that is
 * auto-dismissed is gone from the list soon after it ends, so how it
 * ended comes from its event, BLOCK_JOB_COMPLETED (with "error" if it
 * failed) or BLOCK_JOB_CANCELLED, which the session sees while it
 * waits for a query's answer.
 */
#define WAIT_POLL_NS 200000000  /* between queries: 200 ms */
/* --ready, and the job ended (completed by hand or by itself). */
#define ENDED_NOT_READY "job '%s' has ended: it is not ready to complete"

struct job_wait {
  const char *id;
  struct json_object *end;      /* the job's last end event, or NULL */
  /* --progress */
  bool tty;                     /* redraw one line on stderr */
  size_t drawn;                 /* length of the line drawn */
  int last_tens;                /* not a tty: last tens of % printed */
  char last_status[32];
};

static void
job_wait_event (struct json_object *ev, void *opaque)
{
  struct job_wait *w = opaque;
  const char *name = jstr (ev, "event");
  const char *dev = jstr (jget (ev, "data"), "device");

  if (name && dev && strcmp (dev, w->id) == 0 &&
      (strcmp (name, "BLOCK_JOB_COMPLETED") == 0 ||
       strcmp (name, "BLOCK_JOB_CANCELLED") == 0)) {
    json_object_put (w->end);
    w->end = json_object_get (ev);
  }
}

/* The job @id in query-block-jobs' list, or NULL. */
static struct json_object *
find_job (struct json_object *list, const char *id)
{
  if (!json_object_is_type (list, json_type_array))
    return NULL;
  for (size_t i = 0; i < json_object_array_length (list); ++i) {
    struct json_object *j = json_object_array_get_idx (list, i);
    const char *jid = jstr (j, "id") ? jstr (j, "id") : jstr (j, "device");
    if (jid && strcmp (jid, id) == 0)
      return j;
  }
  return NULL;
}

/* --progress: on a terminal one line redrawn in place, else a line
 * each time the status or the tens of the percentage change (a log).
 */
static void
draw_progress (struct job_wait *w, struct json_object *job, bool last)
{
  CLEANUP_FREE char *eid = escape_text (w->id);
  CLEANUP_FREE char *estatus = NULL;
  const char *status = jstr (job, "status") ? jstr (job, "status") : "?";
  char bar[32], speed[40], line[256];
  int64_t offset, len;
  int tens = -1, n;

  estatus = escape_text (status);
  if (jint (job, "offset", &offset) && jint (job, "len", &len) &&
      offset >= 0 && len > 0)
    tens = offset >= len ? 10 : (int) ((double) offset * 10 / len);
  n = snprintf (line, sizeof line, "%s: %s  %s  %s", eid,
                progress_bar (job, bar, sizeof bar), estatus,
                jspeed (job, speed, sizeof speed));
  if (n < 0)
    return;
  if ((size_t) n >= sizeof line)
    n = sizeof line - 1;
  if (w->tty) {
    /* Blanks over what is left of a longer line drawn before. */
    fprintf (stderr, "\r%s%*s", line,
             (int) (w->drawn > (size_t) n ? w->drawn - n : 0), "");
    w->drawn = n;
    if (last)
      fputc ('\n', stderr);
  }
  else if (tens != w->last_tens || strcmp (status, w->last_status) != 0) {
    fprintf (stderr, "%s\n", line);
    w->last_tens = tens;
    snprintf (w->last_status, sizeof w->last_status, "%s", status);
  }
  fflush (stderr);
}

/* The job has gone from the list: how it ended, from its event. */
static int
job_gone (struct nbdctl *ctl, struct job_wait *w, bool want_ready)
{
  struct json_object *data = jget (w->end, "data");
  const char *name = jstr (w->end, "event"), *error = jstr (data, "error");

  if (ctl->json && data)
    print_json (data);
  if (name == NULL) {
    ctl_error ("job '%s' has gone, and how it ended is not known", w->id);
    return EXIT_REFUSED;
  }
  if (strcmp (name, "BLOCK_JOB_CANCELLED") == 0) {
    ctl_error ("job '%s' was cancelled", w->id);
    return EXIT_REFUSED;
  }
  if (error) {
    ctl_error ("job '%s' failed: %s", w->id, error);
    return EXIT_REFUSED;
  }
  if (want_ready) {
    ctl_error (ENDED_NOT_READY, w->id);
    return EXIT_REFUSED;
  }
  return EXIT_OK;
}

static int
cmd_job_wait (struct nbdctl *ctl, const struct command *self, int argc,
              char **argv)
{
  enum { O_READY = OPT_FIRST_COMMAND_OPTION, O_DONE, O_PROGRESS };
  static const struct option opts[] = {
    COMMON_OPTIONS,
    { "ready", no_argument, NULL, O_READY },
    { "done", no_argument, NULL, O_DONE },
    { "progress", no_argument, NULL, O_PROGRESS },
    { NULL, 0, NULL, 0 },
  };
  struct job_wait w = { .last_tens = -2 };
  bool want_ready = false, want_done = false, progress = false;
  int c, rc;

  while ((c = next_option (ctl, self, argc, argv, opts, &rc)) > 0) {
    switch (c) {
    case O_READY: want_ready = true; break;
    case O_DONE: want_done = true; break;
    case O_PROGRESS: progress = true; break;
    }
  }
  if (c == -1)
    return rc;
  if (want_ready && want_done)
    return usage_error (self, "give --ready or --done, not both");
  if (argc - optind != 1)
    return usage_error (self, "expected one job ID");
  w.id = argv[optind];
  w.tty = isatty (STDERR_FILENO);

  for (bool first = true; ; first = false) {
    CLEANUP_JSON_PUT struct json_object *list = NULL;
    struct json_object *job;
    const char *status, *error;
    bool is_ready;

    rc = ctl_call (ctl, "query-block-jobs", NULL, &list);
    if (rc)
      goto out;
    /* Events sent after this answer are about what comes next. */
    if (first)
      qmp_set_event_handler (ctl->qmp, job_wait_event, &w);
    job = find_job (list, w.id);
    if (job == NULL && first) {
      ctl_error ("no job '%s' (see nbdctl job list)", w.id);
      rc = EXIT_REFUSED;
      goto out;
    }
    if (job == NULL) {
      if (progress && w.tty && w.drawn)
        fputc ('\n', stderr);
      rc = job_gone (ctl, &w, want_ready);
      goto out;
    }
    status = jstr (job, "status") ? jstr (job, "status") : "";
    error = jstr (job, "error");
    is_ready = json_object_get_boolean (jget (job, "ready"));
    /* Concluded and not dismissed (auto-dismiss off), or on its way. */
    if (strcmp (status, "concluded") == 0 || strcmp (status, "null") == 0) {
      if (progress)
        draw_progress (&w, job, true);
      if (ctl->json)
        print_json (job);
      /* A cancelled job's error says so (as QEMU's does). */
      if ((error && strcmp (error, "cancelled") == 0) ||
          (w.end && strcmp (jstr (w.end, "event"),
                            "BLOCK_JOB_CANCELLED") == 0))
        ctl_error ("job '%s' was cancelled", w.id);
      else if (error)
        ctl_error ("job '%s' failed: %s", w.id, error);
      else if (want_ready)
        ctl_error (ENDED_NOT_READY, w.id);
      else {
        rc = EXIT_OK;
        goto out;
      }
      rc = EXIT_REFUSED;
      goto out;
    }
    /* Stopped by an error: waiting would not end without somebody. */
    if (strcmp (status, "paused") == 0 && jstr (job, "io-status") &&
        strcmp (jstr (job, "io-status"), "ok") != 0) {
      if (progress && w.tty && w.drawn)
        fputc ('\n', stderr);
      ctl_error ("job '%s' stopped on an I/O error (io-status %s): once "
                 "that is fixed, nbdctl job resume %s", w.id,
                 jstr (job, "io-status"), w.id);
      rc = EXIT_REFUSED;
      goto out;
    }
    if (want_ready && is_ready) {
      if (progress)
        draw_progress (&w, job, true);
      if (ctl->json)
        print_json (job);
      rc = EXIT_OK;
      goto out;
    }
    if (progress)
      draw_progress (&w, job, false);
    nanosleep (&(struct timespec) { .tv_nsec = WAIT_POLL_NS }, NULL);
  }

 out:
  if (ctl->qmp)
    qmp_set_event_handler (ctl->qmp, NULL, NULL);
  json_object_put (w.end);
  return rc;
}

/* ---- inspection ---- */

static void
connection_row (struct table *t, struct json_object *c)
{
  char id[32], reqs[32], in[32], out[32];

  /* The client's reads come out of nbdd, its writes go in. */
  t_add (t, jtext (c, "id", id, sizeof id), jstr (c, "peer"),
         jstr (c, "export"), jyesno (c, "tls"), jstr (c, "tls-identity"),
         jnum (c, "requests", false, reqs, sizeof reqs),
         jnum (c, "bytes-written", true, in, sizeof in),
         jnum (c, "bytes-read", true, out, sizeof out));
}

static int
cmd_connections (struct nbdctl *ctl, const struct command *self, int argc,
                 char **argv)
{
  static const char *const headers[] = {
    "ID", "PEER", "EXPORT", "TLS", "IDENTITY", "REQUESTS", "BYTES-IN",
    "BYTES-OUT", NULL
  };
  struct json_object *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 0, 0, &rc) == -1)
    return rc;
  rc = ctl_call (ctl, "query-connections", NULL, &ret);
  if (rc)
    return rc;
  rc = print_list (ctl, ret, headers, "rllllrrr", connection_row);
  json_object_put (ret);
  return rc;
}

static void
export_stats_row (struct table *t, struct json_object *e)
{
  char b[8][32];

  t_add (t, jstr (e, "id"),
         jnum (e, "rd_operations", false, b[0], sizeof b[0]),
         jnum (e, "wr_operations", false, b[1], sizeof b[1]),
         jnum (e, "rd_bytes", true, b[2], sizeof b[2]),
         jnum (e, "wr_bytes", true, b[3], sizeof b[3]),
         jnum (e, "flush_operations", false, b[4], sizeof b[4]),
         jnum (e, "zero_operations", false, b[5], sizeof b[5]),
         jnum (e, "discard_operations", false, b[6], sizeof b[6]),
         jnum (e, "failed_operations", false, b[7], sizeof b[7]));
}

static int
cmd_stats (struct nbdctl *ctl, const struct command *self, int argc,
           char **argv)
{
  static const char *const headers[] = {
    "EXPORT", "READS", "WRITES", "READ", "WRITTEN", "FLUSHES", "ZEROES",
    "DISCARDS", "FAILED", NULL
  };
  struct json_object *ret = NULL;
  char buf[32];
  int64_t up;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 0, 0, &rc) == -1)
    return rc;
  rc = ctl_call (ctl, "query-stats", NULL, &ret);
  if (rc)
    return rc;
  if (ctl->json || !json_object_is_type (ret, json_type_object)) {
    print_json (ret);
    json_object_put (ret);
    return EXIT_OK;
  }
  if (jint (ret, "uptime-seconds", &up))
    printf ("uptime       %" PRId64 "d %02" PRId64 ":%02" PRId64 ":%02"
            PRId64 "\n", up / 86400, up / 3600 % 24, up / 60 % 60, up % 60);
  printf ("connections  %s\n", jnum (ret, "connections", false, buf,
                                     sizeof buf));
  printf ("nodes        %s\n", jnum (ret, "nodes", false, buf, sizeof buf));
  if (json_object_is_type (jget (ret, "exports"), json_type_array) &&
      json_object_array_length (jget (ret, "exports")) > 0) {
    printf ("\n");
    print_list (ctl, jget (ret, "exports"), headers, "lrrrrrrrr",
                export_stats_row);
  }
  json_object_put (ret);
  return EXIT_OK;
}

/* ---- raw QMP ---- */

static struct json_object *
parse_json_arg (const struct command *self, const char *what, const char *s)
{
  CLEANUP_ERROR struct error *err = NULL;
  struct json_object *o = qmp_parse_object (s, &err);

  if (o == NULL)
    usage_error (self, "%s: %s: %s", what, err->msg, s);
  return o;
}

static int
cmd_qmp (struct nbdctl *ctl, const struct command *self, int argc,
         char **argv)
{
  struct json_object *msg, *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 1, 2, &rc) == -1)
    return rc;
  if (argv[optind][0] == '{') {
    if (argc - optind != 1)
      return usage_error (self, "a whole JSON command takes no ARGS");
    msg = parse_json_arg (self, "JSON", argv[optind]);
    if (msg == NULL)
      return EXIT_USAGE;
    if (jstr (msg, "execute") == NULL) {
      json_object_put (msg);
      return usage_error (self, "a JSON command needs \"execute\": "
                          "'{\"execute\": \"query-stats\"}'");
    }
  }
  else {
    msg = jobj ();
    jadd_str (msg, "execute", argv[optind]);
    if (argc - optind == 2) {
      struct json_object *args = parse_json_arg (self, "ARGS",
                                                 argv[optind + 1]);
      if (args == NULL) {
        json_object_put (msg);
        return EXIT_USAGE;
      }
      jadd (msg, "arguments", args);
    }
  }
  rc = ctl_call_msg (ctl, msg, &ret);
  if (rc)
    return rc;
  print_json (ret);
  json_object_put (ret);
  return EXIT_OK;
}

static int
cmd_quit (struct nbdctl *ctl, const struct command *self, int argc,
          char **argv)
{
  struct json_object *ret = NULL;
  int rc;

  if (parse_plain (ctl, self, argc, argv, 0, 0, &rc) == -1)
    return rc;
  rc = ctl_call (ctl, "quit", NULL, &ret);
  return rc ? rc : done (ctl, ret);
}

const struct command commands[] = {
  { "node add", "SPEC", "SPEC",
    "Add a node (blockdev-add).  SPEC is QEMU's blockdev JSON or its "
    "dotted form (driver=raw,node-name=d0,file.driver=file,"
    "file.filename=/srv/d0.img).", cmd_node_add },
  { "node remove", "NAME", "NAME",
    "Remove a node nothing uses (blockdev-del).", cmd_node_remove },
  { "node list", "", "",
    "List the nodes (query-named-block-nodes).", cmd_node_list },
  { "export add", "NODE [--id ID] [--name NAME] [--writable] "
    "[--description TEXT] [--tls-required] [--tls-allow IDENTITY]... "
    "[--bitmap NAME|NODE:NAME]...",
    "NODE [OPTIONS]",
    "Export NODE over NBD (block-export-add), read-only unless "
    "--writable.  The name defaults to NODE, the id to the name.  Each "
    "--bitmap is offered as the meta context qemu:dirty-bitmap:NAME; "
    "NAME is found on NODE or down its chain, NODE:NAME on any node.",
    cmd_export_add },
  { "export remove", "ID [--force]", "ID [--force]",
    "Remove an export (block-export-del): refused while clients are "
    "connected, unless --force, which disconnects them.",
    cmd_export_remove },
  { "export list", "", "",
    "List the exports (query-block-exports).", cmd_export_list },
  { "image create", "[--format qcow2|raw] --size SIZE [--backing FILE] "
    "[--backing-format FMT] [--cluster-size SIZE] FILENAME",
    "[OPTIONS] FILENAME",
    "Create an image file (blockdev-create), qcow2 unless --format raw.",
    cmd_image_create },
  { "snapshot", "NODE --overlay-file FILE [--overlay-node NAME]",
    "NODE --overlay-file FILE",
    "Put a new qcow2 overlay, backed by NODE's image, on top of NODE: "
    "NODE's users write to the overlay from then on (blockdev-create, "
    "blockdev-add, blockdev-snapshot).  The overlay's node name "
    "defaults to FILE's name without its extension.", cmd_snapshot },
  { "throttle", "--node NAME|--group NAME [--iops N] [--iops-read N] "
    "[--iops-write N] [--bps SIZE] [--bps-read SIZE] [--bps-write SIZE] "
    "[--iops-max N] [--bps-max SIZE] ...",
    "--node NAME|--group NAME LIMITS",
    "Set I/O limits (block-set-io-throttle) of a throttle node's group, "
    "or of a group: --iops, --bps and their -read/-write variants, each "
    "also as -max (bursts) and -max-length (burst seconds), and "
    "--iops-size SIZE.  0 removes a limit.", cmd_throttle },
  { "bitmap add", "NODE NAME [--granularity SIZE] [--persistent] "
    "[--disabled]", "NODE NAME [OPTIONS]",
    "Add a dirty bitmap to NODE (block-dirty-bitmap-add): it records "
    "which granules writes touch (--granularity: a power of 2 from 512 "
    "to 2G, 64K by default).  --persistent keeps it in NODE's qcow2 "
    "image; --disabled adds it not recording.", cmd_bitmap_add },
  { "bitmap remove", "NODE NAME", "NODE NAME",
    "Remove a bitmap (block-dirty-bitmap-remove).",
    cmd_bitmap_node_name },
  { "bitmap clear", "NODE NAME", "NODE NAME",
    "Clear all of a bitmap's bits (block-dirty-bitmap-clear).",
    cmd_bitmap_node_name },
  { "bitmap enable", "NODE NAME", "NODE NAME",
    "Start recording writes in a bitmap (block-dirty-bitmap-enable).",
    cmd_bitmap_node_name },
  { "bitmap disable", "NODE NAME", "NODE NAME",
    "Stop recording writes in a bitmap (block-dirty-bitmap-disable).",
    cmd_bitmap_node_name },
  { "bitmap merge", "NODE TARGET SOURCE...", "NODE TARGET SOURCE...",
    "Set in bitmap TARGET of NODE every granule dirty in a SOURCE "
    "(block-dirty-bitmap-merge).  A SOURCE is NAME, on NODE, or "
    "OTHERNODE:NAME; granularities may differ.", cmd_bitmap_merge },
  { "bitmap fork", "NODE NAME [--session LABEL]",
    "NODE NAME [--session LABEL]",
    "Freeze a bitmap's bits for a backup to export, while a successor "
    "records new writes (block-dirty-bitmap-fork).  LABEL names the "
    "backup in the lineage.", cmd_bitmap_fork },
  { "bitmap unfork", "NODE NAME --success|--failure",
    "NODE NAME --success|--failure",
    "End a fork (block-dirty-bitmap-unfork): --success drops the frozen "
    "bits and the successor carries on under the name; --failure merges "
    "the successor back, so nothing is lost.  Refused while the bitmap "
    "is exported.", cmd_bitmap_unfork },
  { "bitmap list", "[NODE]", "[NODE]",
    "List the dirty bitmaps of every node, or of NODE "
    "(query-named-block-nodes).  COUNT is the dirty bytes; a BUSY "
    "bitmap is exported or forked and cannot be changed; a FROZEN one "
    "is forked (see bitmap unfork); an INCONSISTENT one (its image was "
    "not closed cleanly) can only be removed.", cmd_bitmap_list },
  { "bitmap lineage", "[NODE [NAME]]", "[NODE [NAME]]",
    "List, oldest first, every add, remove, clear, merge (PARENT: the "
    "source, NODE:NAME), fork (SESSION: its label) and unfork of the "
    "bitmaps, or of NODE's, or of one, as the daemon's catalogue keeps "
    "them (query-bitmap-lineage).  TIME is UTC.", cmd_bitmap_lineage },
  { "fleece start", "NODE [--id ID] [--bitmap NAME]... [--export NAME] "
    "[--scratch-limit SIZE] [--incremental]", "NODE [OPTIONS]",
    "Export NODE as it is now, for a backup, while its users go on "
    "writing (fleece-start): a write first saves the old data to a "
    "scratch image in the daemon's state dir.  Each --bitmap of NODE is "
    "forked and its frozen bits offered as qemu:dirty-bitmap:NAME.  The "
    "id defaults to fleece0, fleece1, ..., the export's name to the id.  "
    "Past --scratch-limit the snapshot breaks, never NODE.  With "
    "--incremental the snapshot holds only what the bitmaps mark, all an "
    "incremental backup reads: writes elsewhere save nothing, and reads "
    "elsewhere fail.", cmd_fleece_start },
  { "fleece stop", "ID --success|--failure", "ID --success|--failure",
    "End a fleece (fleece-stop): its export goes, disconnecting its "
    "clients, and so does its scratch image.  Give exactly one of "
    "--success, which drops the bitmaps' frozen bits, and --failure, "
    "which merges back those not trimmed, so nothing is lost.",
    cmd_fleece_stop },
  { "fleece list", "", "",
    "List the fleeces (query-fleeces).  SNAPSHOT is full, or incremental "
    "(only what the bitmaps mark).  SCRATCH is the old data saved so far, "
    "LIMIT the scratch limit, AGE the time since the start "
    "([[DD-]hh:]mm:ss).  A broken fleece fails its reads and ERROR says "
    "why: stop it with --failure.",
    cmd_fleece_list },
  { "mirror", "NODE TARGET --sync full|top|none [--id ID] [--speed SIZE] "
    "[--granularity SIZE] [--buf-size SIZE] "
    "[--copy-mode background|write-blocking] [--on-source-error ACTION] "
    "[--on-target-error ACTION] [--no-auto-dismiss]",
    "NODE TARGET --sync MODE",
    "Copy NODE to TARGET, a node of the same size (local, or an nbd node "
    "on another nbdd), while NODE's users go on writing "
    "(blockdev-mirror).  --sync full copies everything, top what NODE's "
    "top layer holds, none only new writes.  The job's id defaults to "
    "mirror-NODE; --speed limits it in bytes/s.  --copy-mode "
    "write-blocking also writes each write to NODE to TARGET before it "
    "is acknowledged, so that the job catches up under any load.  Once "
    "ready, job complete moves NODE's users to TARGET.  When reading "
    "NODE or writing TARGET fails, the ACTION is report (the job fails; "
    "the default), ignore (copy it again later), stop (the job pauses "
    "until job resume) or enospc (stop if the target is full, else "
    "report).", cmd_mirror },
  { "backup", "NODE TARGET --sync full|incremental|bitmap [--bitmap NAME] "
    "[--bitmap-mode on-success|never|always] [--id ID] [--speed SIZE] "
    "[--no-auto-dismiss]", "NODE TARGET --sync MODE",
    "Push NODE as it is now to TARGET, a writable node of the same size "
    "(blockdev-backup), while NODE's users go on writing.  --sync full "
    "copies everything; incremental and bitmap what --bitmap marks (the "
    "bitmap is forked, and its frozen bits dropped as --bitmap-mode says: "
    "on-success, the default, never, or always).  The job's id defaults "
    "to backup-NODE; it ends by itself.", cmd_backup },
  { "stream", "NODE [--base NODE] [--backing-file NAME] [--id ID] "
    "[--speed SIZE] [--on-error ACTION] [--no-auto-dismiss]",
    "NODE [OPTIONS]",
    "Copy into NODE, a qcow2 node, what its backing layers above --base "
    "hold (all of them without), then make --base (or nothing) its "
    "backing file (block-stream), while its users go on writing.  The "
    "job's id defaults to NODE; it ends by itself.  --on-error says what "
    "a failed read or write does, as for mirror.", cmd_stream },
  { "commit", "NODE [--top NODE] [--base NODE] [--backing-file NAME] "
    "[--id ID] [--speed SIZE] [--on-error ACTION] [--no-auto-dismiss]",
    "NODE [OPTIONS]",
    "Push what the layers from --top (default NODE, the active layer) "
    "down to above --base (default the layer below the top) hold into "
    "--base, and drop them from NODE's chain (block-commit).  Below the "
    "active layer it ends by itself; of the active layer it becomes "
    "ready, and job complete moves NODE's users onto the base.  The "
    "job's id defaults to NODE.  --on-error says what a failed read or "
    "write does, as for mirror.", cmd_commit },
  { "job list", "", "",
    "List the block jobs (query-block-jobs).  PROGRESS is how much of "
    "what there is to copy so far is copied (new writes add to a "
    "mirror's), SPEED the limit, READY whether job complete may be "
    "used.", cmd_job_list },
  { "job wait", "ID [--ready|--done] [--progress]",
    "ID [--ready|--done]",
    "Wait until the job is ready (--ready: a mirror has caught up) or "
    "has ended (--done, the default), polling it every 200 ms; "
    "--progress draws its progress on stderr.  Exits 1 if it failed, was "
    "cancelled or, with --ready, ended first, or stopped on an I/O "
    "error (on-*-error stop).", cmd_job_wait },
  { "job pause", "ID", "ID",
    "Pause a job (block-job-pause): it copies nothing until resumed, "
    "though a mirror goes on recording writes.", cmd_job_device },
  { "job resume", "ID", "ID", "Resume a paused job (block-job-resume).",
    cmd_job_device },
  { "job speed", "ID SPEED", "ID SPEED",
    "Change a job's speed limit (block-job-set-speed), in bytes/s; 0 "
    "removes it.", cmd_job_speed },
  { "job complete", "ID", "ID",
    "Complete a ready mirror (block-job-complete): the last writes are "
    "copied with its node drained, the target is flushed and the node's "
    "users (exports, parent nodes) move to the target.",
    cmd_job_device },
  { "job cancel", "ID [--force]", "ID [--force]",
    "Cancel a job (block-job-cancel): it stops, the target keeps what was "
    "copied so far, and nothing moves.  A mirror or active commit that "
    "is ready is brought in sync first, as block-job-complete would, "
    "and ends completed, but nothing moves; with --force it stops where "
    "it is.", cmd_job_cancel },
  { "job dismiss", "ID", "ID",
    "Remove a concluded job from the list (job-dismiss): those started "
    "with --no-auto-dismiss stay there until dismissed, with their "
    "ERROR.", cmd_job_dismiss },
  { "connections", "", "",
    "List the client connections (query-connections).", cmd_connections },
  { "stats", "", "",
    "Uptime, counts and per-export I/O statistics (query-stats).",
    cmd_stats },
  { "qmp", "JSON | COMMAND [ARGS-JSON]", "JSON | COMMAND [ARGS]",
    "Send any QMP command, as a whole message or as a name and "
    "arguments, and print its return value as JSON.", cmd_qmp },
  { "quit", "", "", "Shut the daemon down (quit).", cmd_quit },
  { NULL, NULL, NULL, NULL, NULL },
};
