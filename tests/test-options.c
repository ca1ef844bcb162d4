/* Unit tests for common/options.c: blockdev specs in both syntaxes. */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#undef NDEBUG
#include <assert.h>

#include "options.h"

static struct json_object *
parse_ok (const char *s)
{
  struct error *err = NULL;
  struct json_object *o = spec_parse (s, &err);

  if (o == NULL) {
    fprintf (stderr, "unexpected error for '%s': %s\n", s, err->msg);
    abort ();
  }
  return o;
}

static void
parse_fails (const char *s, const char *needle)
{
  struct error *err = NULL;
  struct json_object *o = spec_parse (s, &err);

  assert (o == NULL);
  assert (err != NULL);
  if (strstr (err->msg, needle) == NULL) {
    fprintf (stderr, "'%s': message '%s' lacks '%s'\n", s, err->msg, needle);
    abort ();
  }
  error_free (err);
}

static void
test_keyval (void)
{
  struct json_object *o, *file;
  const char *s;
  uint64_t v;
  bool b;
  struct error *err = NULL;

  o = parse_ok ("driver=raw,node-name=d0,file.driver=file,"
                "file.filename=a,,b.img,offset=1M,file.cache.direct=on");
  assert (opt_get_string (o, "t", "driver", true, &s, NULL) == 0);
  assert (strcmp (s, "raw") == 0);
  assert (json_object_object_get_ex (o, "file", &file));
  assert (opt_get_string (file, "t", "filename", true, &s, NULL) == 0);
  assert (strcmp (s, "a,b.img") == 0);
  assert (opt_get_size (o, "t", "offset", true, &v, NULL) == 0);
  assert (v == 1 << 20);
  assert (opt_get_uint64 (o, "t", "missing", false, &v, NULL) == 1);
  assert (opt_get_bool (o, "t", "driver", true, &b, &err) == -1);
  assert (strstr (err->msg, "must be on or off"));
  error_free (err);
  err = NULL;

  {
    static const char *const ok[] = { "driver", "node-name", "file",
                                      "offset", NULL };
    static const char *const bad[] = { "driver", "file", "offset", NULL };
    static const char *const sub[] = { "driver", "filename", "cache.direct",
                                       NULL };
    assert (opt_check_keys (o, "raw", ok, NULL) == 0);
    assert (opt_check_keys (o, "raw", bad, &err) == -1);
    assert (strstr (err->msg, "unknown parameter 'node-name'"));
    error_free (err);
    err = NULL;
    assert (opt_check_keys (file, "file", sub, NULL) == 0);
  }
  json_object_put (o);

  parse_fails ("driver", "expected '='");
  parse_fails ("a=1,a=2", "given twice");
  parse_fails ("a=1,a.b=2", "both a value and an object");
  parse_fails ("=1", "empty key");
  parse_fails ("a..b=1", "invalid key");
}

static void
test_json (void)
{
  struct json_object *o;
  uint64_t v;
  bool b;
  struct error *err = NULL;

  o = parse_ok ("{\"driver\": \"file\", \"size\": 4096, \"ro\": true, "
                "\"neg\": -1}");
  assert (opt_get_uint64 (o, "t", "size", true, &v, NULL) == 0 && v == 4096);
  assert (opt_get_bool (o, "t", "ro", true, &b, NULL) == 0 && b);
  assert (opt_get_uint64 (o, "t", "neg", true, &v, &err) == -1);
  assert (strstr (err->msg, "non-negative"));
  error_free (err);
  json_object_put (o);

  parse_fails ("{\"a\": 1", "invalid JSON");
  parse_fails ("{\"a\": 1} x", "invalid JSON");
  parse_fails ("  {", "invalid JSON");
  /* Deep nesting is refused, not recursed into. */
  {
    char deep[200];
    memset (deep, '{', 100);
    strcpy (deep + 100, "");
    parse_fails (deep, "invalid JSON");
  }
}

/* Identity lists (tls-allow): one string, keyval's numbered form, or
 * a JSON array; anything else is refused with the key named.
 */
static void
strings_are (const char *spec, size_t n, const char *first,
             const char *last)
{
  struct json_object *o = parse_ok (spec);
  char **v;
  size_t len;

  assert (opt_get_strings (o, "t", "k", &v, &len, NULL) == 0);
  assert (len == n && v[n] == NULL);
  assert (strcmp (v[0], first) == 0 && strcmp (v[n - 1], last) == 0);
  opt_free_strings (v);
  json_object_put (o);
}

static void
test_strings (void)
{
  struct json_object *o;
  struct error *err = NULL;
  char **v;
  size_t n;

  strings_are ("k=alice", 1, "alice", "alice");
  strings_are ("k=CN=c1,,O=Example", 1, "CN=c1,O=Example",
               "CN=c1,O=Example");
  strings_are ("k.0=alice,k.1=bob,k.2=carol", 3, "alice", "carol");
  strings_are ("{\"k\": [\"CN=a,O=b\", \"bob\"]}", 2, "CN=a,O=b", "bob");

  o = parse_ok ("x=1");
  assert (opt_get_strings (o, "t", "k", &v, &n, NULL) == 1);
  assert (v == NULL && n == 0);
  json_object_put (o);

  /* A gap in the numbering, a number, a nested list. */
  const char *bad[] = { "k.0=a,k.2=b", "{\"k\": 5}", "{\"k\": [[\"a\"]]}",
                        "k.1=a" };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; ++i) {
    o = parse_ok (bad[i]);
    assert (opt_get_strings (o, "t", "k", &v, &n, &err) == -1);
    assert (strstr (err->msg, "'k'") != NULL);
    error_free (err);
    err = NULL;
    json_object_put (o);
  }
}

int
main (void)
{
  test_keyval ();
  test_json ();
  test_strings ();
  printf ("test-options: ok\n");
  return EXIT_SUCCESS;
}
