#ifndef FLOTILLA_FL_SECCOMP_H
#define FLOTILLA_FL_SECCOMP_H
/* The worker's seccomp filter, built with libseccomp. */
#include <stdint.h>

/* Action for a system call outside the allow-list. */
enum fl_seccomp_violation {
    FL_SECCOMP_KILL_PROCESS = 0, /* the default: the whole worker dies with SIGSYS */
    FL_SECCOMP_LOG = 1,          /* allowed but logged by the kernel, for finding missing entries */
};

/* Installs a filter on every thread of the process (SCMP_FLTATR_CTL_TSYNC) that allows the
 * system calls named in `names` (libseccomp names, e.g. "read"), ioctl only with one of the
 * `ioctls` request numbers, with `unix_connect` socket(AF_UNIX, ...) and connect, and treats everything else per `violation`. Returns 0, or a
 * negative errno value; `failed_name` then points at the name libseccomp did not know, if any. */
int fl_seccomp_install(const char *const *names, int name_count, const uint64_t *ioctls, int ioctl_count,
                       int unix_connect, int violation, const char **failed_name);
#endif
