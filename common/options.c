/* Node and export specs in JSON or QEMU's dotted keyval syntax. */
#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "options.h"
#include "utils.h"

#define MAX_SPEC_DEPTH 16

/* Find or create the object at a dotted path prefix, inside @root. */
static struct json_object *
keyval_descend (struct json_object *root, char *key, char **leaf,
                struct error **errp)
{
  struct json_object *o = root;
  char *dot;
  int depth = 0;

  while ((dot = strchr (key, '.')) != NULL) {
    struct json_object *child;

    *dot = '\0';
    if (*key == '\0' || ++depth > MAX_SPEC_DEPTH) {
      error_setg (errp, "invalid key in spec");
      return NULL;
    }
    if (json_object_object_get_ex (o, key, &child)) {
      if (!json_object_is_type (child, json_type_object)) {
        error_setg (errp, "'%s' is both a value and an object in spec",
                    key);
        return NULL;
      }
    }
    else {
      child = json_object_new_object ();
      if (child == NULL || json_object_object_add (o, key, child) != 0) {
        json_object_put (child);
        error_setg (errp, "out of memory parsing spec");
        return NULL;
      }
    }
    o = child;
    key = dot + 1;
  }
  if (*key == '\0') {
    error_setg (errp, "empty key in spec");
    return NULL;
  }
  *leaf = key;
  return o;
}

/* Parse "k1=v1,k2.sub=v2" into nested objects of strings. */
static struct json_object *
keyval_parse (const char *s, struct error **errp)
{
  struct json_object *root = json_object_new_object ();
  CLEANUP_FREE char *key = NULL, *val = NULL;
  size_t len = strlen (s);
  const char *p = s;

  if (root == NULL) {
    error_setg (errp, "out of memory parsing spec");
    return NULL;
  }
  key = malloc (len + 1);
  val = malloc (len + 1);
  if (key == NULL || val == NULL) {
    error_setg (errp, "out of memory parsing spec");
    goto err;
  }

  while (*p) {
    size_t kn = 0, vn = 0;
    struct json_object *parent, *existing;
    char *leaf;

    while (*p && *p != '=' && *p != ',')
      key[kn++] = *p++;
    key[kn] = '\0';
    if (*p != '=') {
      error_setg (errp, "spec: expected '=' after '%s'", key);
      goto err;
    }
    p++;
    /* A value runs to the next single comma; ",," is a literal comma. */
    for (;;) {
      if (*p == '\0')
        break;
      if (*p == ',') {
        if (p[1] == ',') {
          val[vn++] = ',';
          p += 2;
          continue;
        }
        p++;
        break;
      }
      val[vn++] = *p++;
    }
    val[vn] = '\0';

    parent = keyval_descend (root, key, &leaf, errp);
    if (parent == NULL)
      goto err;
    if (json_object_object_get_ex (parent, leaf, &existing)) {
      error_setg (errp, "spec: key '%s' given twice", leaf);
      goto err;
    }
    if (json_object_object_add (parent, leaf,
                                json_object_new_string (val)) != 0) {
      error_setg (errp, "out of memory parsing spec");
      goto err;
    }
  }
  return root;

 err:
  json_object_put (root);
  return NULL;
}

struct json_object *
spec_parse (const char *s, struct error **errp)
{
  struct json_tokener *tok;
  struct json_object *o;
  enum json_tokener_error jerr;

  while (*s == ' ' || *s == '\t' || *s == '\n')
    s++;
  if (*s != '{')
    return keyval_parse (s, errp);

  tok = json_tokener_new_ex (MAX_SPEC_DEPTH);
  if (tok == NULL) {
    error_setg (errp, "out of memory parsing spec");
    return NULL;
  }
  o = json_tokener_parse_ex (tok, s, strlen (s));
  jerr = json_tokener_get_error (tok);
  if (o == NULL || jerr != json_tokener_success ||
      json_tokener_get_parse_end (tok) != strlen (s)) {
    error_setg (errp, "spec: invalid JSON: %s",
                jerr == json_tokener_success ? "trailing characters"
                : json_tokener_error_desc (jerr));
    json_object_put (o);
    json_tokener_free (tok);
    return NULL;
  }
  json_tokener_free (tok);
  if (!json_object_is_type (o, json_type_object)) {
    error_setg (errp, "spec: expected a JSON object");
    json_object_put (o);
    return NULL;
  }
  return o;
}

int
opt_get_string (struct json_object *o, const char *what, const char *key,
                bool required, const char **r, struct error **errp)
{
  struct json_object *v;

  if (!json_object_object_get_ex (o, key, &v) || v == NULL) {
    if (!required)
      return 1;
    error_setg (errp, "%s: parameter '%s' is missing", what, key);
    return -1;
  }
  if (!json_object_is_type (v, json_type_string)) {
    error_setg (errp, "%s: parameter '%s' must be a string", what, key);
    return -1;
  }
  *r = json_object_get_string (v);
  return 0;
}

void
opt_free_strings (char **v)
{
  if (v == NULL)
    return;
  for (char **p = v; *p; ++p)
    free (*p);
  free (v);
}

int
opt_get_strings (struct json_object *o, const char *what, const char *key,
                 char ***r, size_t *n, struct error **errp)
{
  struct json_object *v, *item;
  size_t len, i;
  char **out;

  *r = NULL;
  *n = 0;
  if (!json_object_object_get_ex (o, key, &v) || v == NULL)
    return 1;
  if (json_object_is_type (v, json_type_string))
    len = 1;
  else if (json_object_is_type (v, json_type_array))
    len = json_object_array_length (v);
  else if (json_object_is_type (v, json_type_object))
    len = json_object_object_length (v);
  else
    goto bad;
  out = calloc (len + 1, sizeof *out);
  if (out == NULL) {
    error_setg_errno (errp, ENOMEM, "%s", what);
    return -1;
  }
  for (i = 0; i < len; ++i) {
    if (json_object_is_type (v, json_type_string))
      item = v;
    else if (json_object_is_type (v, json_type_array))
      item = json_object_array_get_idx (v, i);
    else {
      /* keyval lists are numbered from 0, with no gaps */
      char idx[24];
      snprintf (idx, sizeof idx, "%zu", i);
      if (!json_object_object_get_ex (v, idx, &item))
        item = NULL;
    }
    if (item == NULL || !json_object_is_type (item, json_type_string)) {
      opt_free_strings (out);
      goto bad;
    }
    out[i] = strdup (json_object_get_string (item));
    if (out[i] == NULL) {
      opt_free_strings (out);
      error_setg_errno (errp, ENOMEM, "%s", what);
      return -1;
    }
  }
  *r = out;
  *n = len;
  return 0;

 bad:
  error_setg (errp, "%s: parameter '%s' must be a string or a list of "
              "strings (%s.0=..., %s.1=...)", what, key, key, key);
  return -1;
}

static int
opt_get_number (struct json_object *o, const char *what, const char *key,
                bool required, bool sizes, uint64_t *r, struct error **errp)
{
  struct json_object *v;

  if (!json_object_object_get_ex (o, key, &v) || v == NULL) {
    if (!required)
      return 1;
    error_setg (errp, "%s: parameter '%s' is missing", what, key);
    return -1;
  }
  if (json_object_is_type (v, json_type_int)) {
    int64_t i;

    errno = 0;
    i = json_object_get_int64 (v);
    if (i < 0 || errno != 0) {
      error_setg (errp, "%s: parameter '%s' must be a non-negative "
                  "integer", what, key);
      return -1;
    }
    *r = i;
    return 0;
  }
  if (json_object_is_type (v, json_type_string)) {
    const char *s = json_object_get_string (v);
    int ret = sizes ? parse_size (s, r) : parse_uint64 (s, r);

    if (ret == -1) {
      error_setg (errp, "%s: parameter '%s': cannot parse '%.80s' as %s",
                  what, key, s, sizes ? "a size" : "a number");
      return -1;
    }
    return 0;
  }
  error_setg (errp, "%s: parameter '%s' must be a number", what, key);
  return -1;
}

int
opt_get_uint64 (struct json_object *o, const char *what, const char *key,
                bool required, uint64_t *r, struct error **errp)
{
  return opt_get_number (o, what, key, required, false, r, errp);
}

int
opt_get_size (struct json_object *o, const char *what, const char *key,
              bool required, uint64_t *r, struct error **errp)
{
  return opt_get_number (o, what, key, required, true, r, errp);
}

int
opt_get_bool (struct json_object *o, const char *what, const char *key,
              bool required, bool *r, struct error **errp)
{
  struct json_object *v;

  if (!json_object_object_get_ex (o, key, &v) || v == NULL) {
    if (!required)
      return 1;
    error_setg (errp, "%s: parameter '%s' is missing", what, key);
    return -1;
  }
  if (json_object_is_type (v, json_type_boolean)) {
    *r = json_object_get_boolean (v);
    return 0;
  }
  if (json_object_is_type (v, json_type_string) &&
      parse_bool (json_object_get_string (v), r) == 0)
    return 0;
  error_setg (errp, "%s: parameter '%s' must be on or off", what, key);
  return -1;
}

static bool
key_allowed (const char *prefix, const char *key,
             const char *const *allowed)
{
  size_t plen = prefix ? strlen (prefix) : 0;

  for (size_t i = 0; allowed[i]; ++i) {
    const char *a = allowed[i];
    if (plen) {
      if (strncmp (a, prefix, plen) != 0 || a[plen] != '.')
        continue;
      a += plen + 1;
    }
    if (strcmp (a, key) == 0)
      return true;
  }
  return false;
}

static bool
is_prefix_allowed (const char *key, const char *const *allowed)
{
  size_t klen = strlen (key);

  for (size_t i = 0; allowed[i]; ++i)
    if (strncmp (allowed[i], key, klen) == 0 && allowed[i][klen] == '.')
      return true;
  return false;
}

int
opt_check_keys (struct json_object *o, const char *what,
                const char *const *allowed, struct error **errp)
{
  json_object_object_foreach (o, key, val) {
    if (key_allowed (NULL, key, allowed))
      continue;
    if (json_object_is_type (val, json_type_object) &&
        is_prefix_allowed (key, allowed)) {
      json_object_object_foreach (val, sub, subval) {
        (void) subval;
        if (!key_allowed (key, sub, allowed)) {
          error_setg (errp, "%s: unknown parameter '%s.%s'", what, key, sub);
          return -1;
        }
      }
      continue;
    }
    error_setg (errp, "%s: unknown parameter '%.80s'", what, key);
    return -1;
  }
  return 0;
}
