/* Reading a file mapping safely.
 *
 * A shared mapping of a file raises SIGBUS where the file no longer
 * has pages, for instance after someone truncated it under us.  Code
 * that reads a mapping arms a guard first; a SIGBUS while it is armed
 * jumps back to the guard instead of killing the daemon:
 *
 *   sigjmp_buf jb;
 *   if (sigsetjmp (jb, 0) == 0) {
 *     bus_guard_arm (&jb);
 *     ... read the mapping ...
 *     bus_guard_disarm ();
 *   }
 *   else
 *     ... the mapping faulted: whatever was in progress is abandoned ...
 *
 * sigsetjmp's second argument is 0: the handler runs with SA_NODEFER,
 * so no signal mask needs restoring, and the guard costs no syscall.
 * A SIGBUS with no guard armed keeps its default action.
 */
#ifndef NBDD_BUS_GUARD_H
#define NBDD_BUS_GUARD_H

#include <setjmp.h>

/* Install the handler, once, before any thread reads a mapping.
 * 0 or -errno.
 */
int bus_guard_install (void);

void bus_guard_arm (sigjmp_buf *jb);
void bus_guard_disarm (void);

#endif /* NBDD_BUS_GUARD_H */
