#ifndef FLOTILLA_FL_THREAD_H
#define FLOTILLA_FL_THREAD_H
/* Thread naming and the vCPU kick signal: pthread_setname_np needs _GNU_SOURCE, and
 * SIGRTMIN is a function-like macro; sigaction's handler union is awkward from Swift. */
#include <pthread.h>

/* Names the calling thread (at most 15 bytes plus NUL; longer names are truncated here).
 * Returns 0 or an errno value. */
int fl_set_current_thread_name(const char *name);

/* The real-time signal used to kick vCPU threads out of KVM_RUN (SIGRTMIN). */
int fl_kick_signal(void);

/* Installs a do-nothing handler for signo without SA_RESTART, so that a blocking call
 * (KVM_RUN) in the receiving thread returns EINTR. Returns 0 or -1 with errno set. */
int fl_install_noop_handler(int signo);

/* The calling thread's kernel thread id (gettid(2)), as /proc/PID/task lists it. */
int fl_current_thread_id(void);

/* Unblocks signo in the calling thread's signal mask. Returns 0 or an errno value. */
int fl_unblock_signal(int signo);
#endif
