/* See fl_thread.h. */
#define _GNU_SOURCE
#include "fl_thread.h"
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int fl_set_current_thread_name(const char *name) {
    char truncated[16];
    strncpy(truncated, name, sizeof truncated - 1);
    truncated[sizeof truncated - 1] = '\0';
    return pthread_setname_np(pthread_self(), truncated);
}

int fl_kick_signal(void) { return SIGRTMIN; }

static void noop_handler(int signo) { (void)signo; }

int fl_install_noop_handler(int signo) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = noop_handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0; /* deliberately no SA_RESTART */
    return sigaction(signo, &action, NULL);
}

int fl_unblock_signal(int signo) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signo);
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

int fl_current_thread_id(void) { return (int)syscall(SYS_gettid); }
