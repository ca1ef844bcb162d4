/* Reading a file mapping safely: see bus-guard.h. */
#include <config.h>

#include <errno.h>
#include <signal.h>
#include <stddef.h>

#include "bus-guard.h"

static __thread sigjmp_buf *volatile armed;

static void
bus_handler (int sig, siginfo_t *info, void *uctx)
{
  sigjmp_buf *jb = armed;

  if (jb == NULL) {
    /* Not ours: the fault happens again on return, and kills us as it
     * would have without a handler.
     */
    signal (SIGBUS, SIG_DFL);
    return;
  }
  armed = NULL;
  siglongjmp (*jb, 1);
}

int
bus_guard_install (void)
{
  struct sigaction sa = {
    .sa_sigaction = bus_handler,
    .sa_flags = SA_SIGINFO | SA_NODEFER,
  };

  sigemptyset (&sa.sa_mask);
  return sigaction (SIGBUS, &sa, NULL) == -1 ? -errno : 0;
}

void
bus_guard_arm (sigjmp_buf *jb)
{
  armed = jb;
}

void
bus_guard_disarm (void)
{
  armed = NULL;
}
