#ifndef FLOTILLA_FL_PIDFD_H
#define FLOTILLA_FL_PIDFD_H
/* Process handles for the supervisor: pidfd_open/pidfd_send_signal have no glibc wrappers
 * Swift can see, waitid(P_PIDFD) needs _GNU_SOURCE, and prctl is variadic. */
#include <sys/types.h>

/* pidfd_open(pid, 0), close-on-exec by definition. Returns the fd or -1 with errno set. */
int fl_pidfd_open(pid_t pid);

/* pidfd_send_signal(pidfd, signo, NULL, 0). Returns 0 or -1 with errno set. */
int fl_pidfd_send_signal(int pidfd, int signo);

/* waitid(P_PIDFD, pidfd, WEXITED | WNOHANG). Returns 1 when the process was reaped, with
 * *code = CLD_EXITED/CLD_KILLED/CLD_DUMPED and *status = exit status or signal number;
 * 0 when it has not exited yet; -1 with errno set (ECHILD: not our child). */
int fl_pidfd_reap(int pidfd, int *code, int *status);

/* prctl(PR_SET_CHILD_SUBREAPER, 1): orphaned descendants (daemonized workers) become our
 * children, so their exit statuses reach us. Returns 0 or -1 with errno set. */
int fl_become_child_subreaper(void);
#endif
