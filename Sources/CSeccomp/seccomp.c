/* See fl_seccomp.h. */
#include "fl_seccomp.h"
#include <errno.h>
#include <seccomp.h>
#include <stddef.h>
#include <sys/socket.h>

int fl_seccomp_install(const char *const *names, int name_count, const uint64_t *ioctls, int ioctl_count,
                       int unix_connect, int violation, const char **failed_name) {
    if (failed_name) *failed_name = NULL;
    scmp_filter_ctx ctx = seccomp_init(violation == FL_SECCOMP_LOG ? SCMP_ACT_LOG : SCMP_ACT_KILL_PROCESS);
    if (ctx == NULL) return -ENOMEM;
    int rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1);
    for (int i = 0; rc == 0 && i < name_count; i++) {
        int nr = seccomp_syscall_resolve_name(names[i]);
        if (nr == __NR_SCMP_ERROR) {
            if (failed_name) *failed_name = names[i];
            rc = -EINVAL;
            break;
        }
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
    }
    /* ioctl(fd, request, ...): only the listed requests. The request is an unsigned long,
     * compared in full (SCMP_CMP_EQ on argument 1). */
    for (int i = 0; rc == 0 && i < ioctl_count; i++) {
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(ioctl), 1, SCMP_A1(SCMP_CMP_EQ, ioctls[i]));
    }
    /* socket(AF_UNIX, ...) only, and connect: a vsock device's guest-initiated connections. */
    if (rc == 0 && unix_connect) {
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(socket), 1, SCMP_A0(SCMP_CMP_EQ, AF_UNIX));
        if (rc == 0) rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(connect), 0);
    }
    if (rc == 0) rc = seccomp_load(ctx);
    seccomp_release(ctx);
    return rc;
}
