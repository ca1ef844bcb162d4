/* Small helpers shared by every folder: I/O loops, arithmetic, parsing. */
#ifndef NBDD_UTILS_H
#define NBDD_UTILS_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define MIN(a, b) ({ __auto_type _a = (a); __auto_type _b = (b); \
                     _a < _b ? _a : _b; })
#define MAX(a, b) ({ __auto_type _a = (a); __auto_type _b = (b); \
                     _a > _b ? _a : _b; })

#define ARRAY_SIZE(a) (sizeof (a) / sizeof ((a)[0]))

#define container_of(ptr, type, member) \
  ((type *) ((char *) (ptr) - offsetof (type, member)))

#define ADD_OVERFLOW(a, b, r) __builtin_add_overflow ((a), (b), (r))
#define MUL_OVERFLOW(a, b, r) __builtin_mul_overflow ((a), (b), (r))

#define IS_POWER_OF_2(x) ((x) != 0 && ((x) & ((x) - 1)) == 0)
#define IS_ALIGNED(x, a) (((x) & ((__typeof__ (x)) (a) - 1)) == 0)
#define ROUND_DOWN(x, a) ((x) & ~((__typeof__ (x)) (a) - 1))
#define ROUND_UP(x, a)   ROUND_DOWN ((x) + (__typeof__ (x)) (a) - 1, (a))

#define likely(x)   __builtin_expect (!!(x), 1)
#define unlikely(x) __builtin_expect (!!(x), 0)

/* Loop until all bytes are transferred.  Return 0 or -errno.  A short
 * pread at end of file returns -EIO (callers check bounds first).
 */
int full_pread (int fd, void *buf, size_t count, off_t offset);
int full_pwrite (int fd, const void *buf, size_t count, off_t offset);

/* Blocking whole-buffer read/write on a socket or pipe: 0 or -errno;
 * full_read returns -ECONNRESET on early EOF.
 */
int full_read (int fd, void *buf, size_t count);
int full_write (int fd, const void *buf, size_t count);

/* True if every byte of buf is zero.  Fast for long buffers. */
bool is_zero (const void *buf, size_t len);

/* Strict parsers: the whole string must be consumed.  Return 0 or -1
 * with errno set (EINVAL for syntax, ERANGE for range).
 */
int parse_uint64 (const char *s, uint64_t *r);
int parse_uint32 (const char *s, uint32_t *r);
/* A size with an optional suffix: k/K, M, G, T, P, E (powers of 1024),
 * optionally followed by "iB" or "B".
 */
int parse_size (const char *s, uint64_t *r);
/* on/off/true/false/yes/no/1/0 */
int parse_bool (const char *s, bool *r);

/* QEMU's rule for node-names, which the daemon and nbdctl share: a
 * letter, then letters, digits, '-', '.' and '_', at most
 * MAX_NODE_NAME bytes.  Generated names start with '#', so they can
 * never collide with a user's.
 */
#define MAX_NODE_NAME 128
bool node_name_is_valid (const char *name);

/* Monotonic time in nanoseconds. */
uint64_t monotonic_ns (void);

/* pthread_create, the new thread with every signal blocked: signals
 * are the event loop's business.  0, or an errno.
 */
int thread_create_quiet (pthread_t *thread, const pthread_attr_t *attr,
                         void *(*fn) (void *), void *arg);

#endif /* NBDD_UTILS_H */
