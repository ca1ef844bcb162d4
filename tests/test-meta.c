/* Unit tests for nbdd/meta.c: matching meta context queries. */
#include <config.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#undef NDEBUG
#include <assert.h>

#include "internal.h"

#define BASE  (UINT64_C (1) << 0)
#define DEPTH (UINT64_C (1) << 1)

static uint64_t
q (const char *s, bool list)
{
  return meta_query (NULL, s, strlen (s), list);
}

int
main (void)
{
  const struct meta_context *mc;
  size_t nr;

  /* The table: ids ascending from 1, in the order of the bits. */
  mc = meta_contexts (NULL, &nr);
  assert (nr == 2 && nr <= MAX_META_CONTEXTS);
  assert (strcmp (mc[0].name, "base:allocation") == 0);
  assert (mc[0].id == META_ID_BASE_ALLOCATION);
  assert (strcmp (mc[1].name, "qemu:allocation-depth") == 0);
  assert (mc[1].id == META_ID_ALLOCATION_DEPTH);
  assert (mc[0].id > 0 && mc[0].id < mc[1].id);
  assert (meta_all (NULL) == (BASE | DEPTH));

  /* Full names, for LIST and SET alike. */
  for (int list = 0; list <= 1; ++list) {
    assert (q ("base:allocation", list) == BASE);
    assert (q ("qemu:allocation-depth", list) == DEPTH);
    assert (q ("qemu:allocation-depth:", list) == 0);
    assert (q ("qemu:allocation", list) == 0);
    assert (q ("base:allocationX", list) == 0);
    assert (q ("QEMU:allocation-depth", list) == 0);
    assert (q ("qemu:dirty-bitmap:", list) == 0);
    assert (q ("qemu:dirty-bitmap:b0", list) == 0);
    assert (q ("qemu", list) == 0);
    assert (q ("", list) == 0);
    assert (q (":", list) == 0);
    /* Not NUL-terminated: only @len bytes count. */
    assert (meta_query (NULL, "base:allocation-depth", 15, list) == BASE);
    assert (meta_query (NULL, "qemu:allocation-depth", 20, list) == 0);
  }

  /* Namespaces list everything in them, and select nothing. */
  assert (q ("base:", true) == BASE);
  assert (q ("qemu:", true) == DEPTH);
  assert (q ("base:", false) == 0);
  assert (q ("qemu:", false) == 0);
  assert (meta_query (NULL, "qemu:x", 5, true) == DEPTH);

  exit (EXIT_SUCCESS);
}
