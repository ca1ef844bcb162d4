/* Unit tests for common/utils.c. */
#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#undef NDEBUG
#include <assert.h>

#include "utils.h"

static void
test_parse_size (void)
{
  uint64_t v;

  assert (parse_size ("0", &v) == 0 && v == 0);
  assert (parse_size ("512", &v) == 0 && v == 512);
  assert (parse_size ("64K", &v) == 0 && v == 65536);
  assert (parse_size ("1M", &v) == 0 && v == 1 << 20);
  assert (parse_size ("1MiB", &v) == 0 && v == 1 << 20);
  assert (parse_size ("2G", &v) == 0 && v == UINT64_C (2) << 30);
  assert (parse_size ("100GB", &v) == 0 && v == UINT64_C (100) << 30);
  assert (parse_size ("8E", &v) == -1 && errno == ERANGE);  /* > INT64_MAX */
  assert (parse_size ("", &v) == -1 && errno == EINVAL);
  assert (parse_size ("-1", &v) == -1);
  assert (parse_size ("12Q", &v) == -1 && errno == EINVAL);
  assert (parse_size ("1Mx", &v) == -1 && errno == EINVAL);
  assert (parse_size (" 1", &v) == -1);
  assert (parse_size ("99999999999999999999", &v) == -1);
}

static void
test_parse_uint (void)
{
  uint32_t u;
  uint64_t v;
  bool b;

  assert (parse_uint32 ("4294967295", &u) == 0 && u == UINT32_MAX);
  assert (parse_uint32 ("4294967296", &u) == -1 && errno == ERANGE);
  assert (parse_uint32 ("0x10", &u) == 0 && u == 16);
  assert (parse_uint32 ("12abc", &u) == -1);
  assert (parse_uint32 ("-5", &u) == -1);
  assert (parse_uint64 ("", &v) == -1);
  assert (parse_bool ("on", &b) == 0 && b);
  assert (parse_bool ("OFF", &b) == 0 && !b);
  assert (parse_bool ("maybe", &b) == -1);
}

static void
test_is_zero (void)
{
  static char buf[70000];

  assert (is_zero (buf, 0));
  assert (is_zero (buf, 1));
  assert (is_zero (buf, 15));
  assert (is_zero (buf, 16));
  assert (is_zero (buf, sizeof buf));
  for (size_t i = 0; i < sizeof buf; i += 4099) {
    buf[i] = 1;
    assert (!is_zero (buf, sizeof buf));
    assert (is_zero (buf, i));
    buf[i] = 0;
  }
  buf[sizeof buf - 1] = 1;
  assert (!is_zero (buf, sizeof buf));
  assert (is_zero (buf, sizeof buf - 1));
}

static void
test_macros (void)
{
  uint64_t r;

  assert (ROUND_UP (UINT64_C (4097), 4096) == 8192);
  assert (ROUND_DOWN (UINT64_C (4097), 4096) == 4096);
  assert (IS_ALIGNED (UINT64_C (8192), 4096));
  assert (!IS_ALIGNED (UINT64_C (8193), 4096));
  assert (IS_POWER_OF_2 (4096u) && !IS_POWER_OF_2 (4097u));
  assert (ADD_OVERFLOW (UINT64_MAX, UINT64_C (1), &r));
  assert (!ADD_OVERFLOW (UINT64_C (1), UINT64_C (1), &r) && r == 2);
}

int
main (void)
{
  test_parse_size ();
  test_parse_uint ();
  test_is_zero ();
  test_macros ();
  printf ("test-utils: ok\n");
  return EXIT_SUCCESS;
}
