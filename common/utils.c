/* Small helpers shared by every folder. */
#include <config.h>

#include <errno.h>
#include <signal.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "utils.h"

int
full_pread (int fd, void *buf, size_t count, off_t offset)
{
  char *p = buf;

  while (count > 0) {
    ssize_t r = pread (fd, p, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    if (r == 0)
      return -EIO;              /* unexpected end of file */
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

int
full_pwrite (int fd, const void *buf, size_t count, off_t offset)
{
  const char *p = buf;

  while (count > 0) {
    ssize_t r = pwrite (fd, p, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

int
full_read (int fd, void *buf, size_t count)
{
  char *p = buf;

  while (count > 0) {
    ssize_t r = read (fd, p, count);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    if (r == 0)
      return -ECONNRESET;
    p += r;
    count -= r;
  }
  return 0;
}

int
full_write (int fd, const void *buf, size_t count)
{
  const char *p = buf;

  while (count > 0) {
    ssize_t r = write (fd, p, count);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    p += r;
    count -= r;
  }
  return 0;
}

bool
is_zero (const void *buf, size_t len)
{
  const unsigned char *p = buf;
  size_t i;

  /* Check the first 16 bytes by hand, then compare the buffer with
   * itself shifted by 16: if the head is zero and every byte equals
   * the one 16 before it, all are zero.  memcmp is vectorised.
   */
  for (i = 0; i < 16; ++i) {
    if (i == len)
      return true;
    if (p[i])
      return false;
  }
  return memcmp (p, p + 16, len - 16) == 0;
}

int
parse_uint64 (const char *s, uint64_t *r)
{
  char *end;
  unsigned long long v;

  if (s == NULL || *s == '\0' || *s == '-' || *s == '+' ||
      *s == ' ' || *s == '\t') {
    errno = EINVAL;
    return -1;
  }
  errno = 0;
  v = strtoull (s, &end, 0);
  if (errno != 0)
    return -1;
  if (*end != '\0') {
    errno = EINVAL;
    return -1;
  }
  *r = v;
  return 0;
}

int
parse_uint32 (const char *s, uint32_t *r)
{
  uint64_t v;

  if (parse_uint64 (s, &v) == -1)
    return -1;
  if (v > UINT32_MAX) {
    errno = ERANGE;
    return -1;
  }
  *r = v;
  return 0;
}

int
parse_size (const char *s, uint64_t *r)
{
  char *end;
  unsigned long long v;
  unsigned shift = 0;

  if (s == NULL || *s < '0' || *s > '9') {
    errno = EINVAL;
    return -1;
  }
  errno = 0;
  v = strtoull (s, &end, 10);
  if (errno != 0)
    return -1;
  switch (*end) {
  case '\0': break;
  case 'b': case 'B': if (end[1] != '\0') goto bad; break;
  case 'k': case 'K': shift = 10; break;
  case 'm': case 'M': shift = 20; break;
  case 'g': case 'G': shift = 30; break;
  case 't': case 'T': shift = 40; break;
  case 'p': case 'P': shift = 50; break;
  case 'e': case 'E': shift = 60; break;
  default: goto bad;
  }
  if (shift) {
    const char *sfx = end + 1;
    if (*sfx != '\0' && strcmp (sfx, "iB") != 0 && strcmp (sfx, "B") != 0)
      goto bad;
    if (v > (UINT64_MAX >> shift)) {
      errno = ERANGE;
      return -1;
    }
    v <<= shift;
  }
  if (v > INT64_MAX) {          /* off_t must hold it */
    errno = ERANGE;
    return -1;
  }
  *r = v;
  return 0;

 bad:
  errno = EINVAL;
  return -1;
}

int
parse_bool (const char *s, bool *r)
{
  if (!strcasecmp (s, "on") || !strcasecmp (s, "true") ||
      !strcasecmp (s, "yes") || !strcmp (s, "1")) {
    *r = true;
    return 0;
  }
  if (!strcasecmp (s, "off") || !strcasecmp (s, "false") ||
      !strcasecmp (s, "no") || !strcmp (s, "0")) {
    *r = false;
    return 0;
  }
  errno = EINVAL;
  return -1;
}

uint64_t
monotonic_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

bool
node_name_is_valid (const char *name)
{
  size_t len = strlen (name);

  if (len == 0 || len > MAX_NODE_NAME)
    return false;
  if (!((name[0] >= 'a' && name[0] <= 'z') ||
        (name[0] >= 'A' && name[0] <= 'Z')))
    return false;
  for (size_t i = 1; i < len; ++i) {
    char c = name[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_'))
      return false;
  }
  return true;
}

int
thread_create_quiet (pthread_t *thread, const pthread_attr_t *attr,
                     void *(*fn) (void *), void *arg)
{
  sigset_t all, old;
  int r;

  sigfillset (&all);
  pthread_sigmask (SIG_BLOCK, &all, &old);
  r = pthread_create (thread, attr, fn, arg);
  pthread_sigmask (SIG_SETMASK, &old, NULL);
  return r;
}
