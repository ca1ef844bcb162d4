/* Node and export specs: QEMU's blockdev JSON, or its dotted keyval
 * form ("driver=file,node-name=f0,filename=x.img", nested with dots,
 * a literal comma written ",,").  Both parse to a json-c object, and
 * typed getters accept a JSON value or the string the keyval form
 * produces ("on", "4096", "1M").
 */
#ifndef NBDD_OPTIONS_H
#define NBDD_OPTIONS_H

#include <stdbool.h>
#include <stdint.h>

#include <json-c/json.h>

#include "error.h"

/* Parse a spec: JSON if it starts with '{', keyval otherwise.  Returns
 * a new object (caller puts it) or NULL.
 */
struct json_object *spec_parse (const char *s, struct error **errp);

/* Getters: 0 when found and valid, 1 when absent (and !required),
 * -1 with errp set otherwise.  @what names the object in messages.
 * Strings are borrowed from @o.
 */
int opt_get_string (struct json_object *o, const char *what,
                    const char *key, bool required, const char **r,
                    struct error **errp);
int opt_get_uint64 (struct json_object *o, const char *what,
                    const char *key, bool required, uint64_t *r,
                    struct error **errp);
/* Like uint64, but accepts size suffixes (512, 64K, 1M, ...). */
int opt_get_size (struct json_object *o, const char *what,
                  const char *key, bool required, uint64_t *r,
                  struct error **errp);
int opt_get_bool (struct json_object *o, const char *what,
                  const char *key, bool required, bool *r,
                  struct error **errp);
/* A list of strings: a JSON array, its keyval form (key.0=a,key.1=b),
 * or a single string.  *r is a NULL-terminated array the caller frees
 * with opt_free_strings (NULL if the key is absent: returns 1).
 */
int opt_get_strings (struct json_object *o, const char *what,
                     const char *key, char ***r, size_t *n,
                     struct error **errp);
void opt_free_strings (char **v);

/* Fail if @o has a key not in the NULL-terminated @allowed list.  A
 * key "a.b" in @allowed permits key "a" holding an object with "b",
 * as in "cache.direct".
 */
int opt_check_keys (struct json_object *o, const char *what,
                    const char *const *allowed, struct error **errp);

#endif /* NBDD_OPTIONS_H */
