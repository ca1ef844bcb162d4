/* Automatic release of function-local resources. */
#ifndef NBDD_CLEANUP_H
#define NBDD_CLEANUP_H

#include <stdlib.h>
#include <unistd.h>

static inline void
cleanup_free (void *ptr)
{
  free (*(void **) ptr);
}
#define CLEANUP_FREE __attribute__ ((cleanup (cleanup_free)))

static inline void
cleanup_close (int *fd)
{
  if (*fd >= 0)
    close (*fd);
}
#define CLEANUP_CLOSE __attribute__ ((cleanup (cleanup_close)))

/* Move ownership out of an auto-released variable. */
#define steal_pointer(pp) \
  ({ __auto_type _p = *(pp); *(pp) = NULL; _p; })

#define steal_fd(fdp) \
  ({ int _fd = *(fdp); *(fdp) = -1; _fd; })

#endif /* NBDD_CLEANUP_H */
