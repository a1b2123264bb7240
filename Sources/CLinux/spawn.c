/* See fl_spawn.h. */
#define _GNU_SOURCE
#include "fl_spawn.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <unistd.h>

int fl_spawn(pid_t *pid, const char *path, char *const argv[], char *const envp[],
             const int *fds, int count, int new_session) {
    if (count < 0 || count > 64) return EINVAL;
    /* Copy every source above the target range first, so that dup2 onto a low target
     * cannot clobber a source still to be copied. */
    int staged[64];
    int result = 0;
    for (int i = 0; i < count; i++) staged[i] = -1;
    for (int i = 0; i < count; i++) {
        if (fds[i] < 0) continue;
        staged[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, count > 3 ? count : 3);
        if (staged[i] < 0) { result = errno; goto out_close; }
    }
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    if ((result = posix_spawn_file_actions_init(&actions)) != 0) goto out_close;
    if ((result = posix_spawnattr_init(&attributes)) != 0) goto out_actions;
    for (int i = 0; i < count && result == 0; i++) {
        result = staged[i] < 0 ? posix_spawn_file_actions_addopen(&actions, i, "/dev/null", O_RDWR, 0)
                               : posix_spawn_file_actions_adddup2(&actions, staged[i], i);
    }
    if (result == 0) result = posix_spawn_file_actions_addclosefrom_np(&actions, count);
    sigset_t empty, all;
    sigemptyset(&empty);
    sigfillset(&all);
    short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | (new_session ? POSIX_SPAWN_SETSID : 0);
    if (result == 0) result = posix_spawnattr_setsigmask(&attributes, &empty);
    if (result == 0) result = posix_spawnattr_setsigdefault(&attributes, &all);
    if (result == 0) result = posix_spawnattr_setflags(&attributes, flags);
    if (result == 0) result = posix_spawn(pid, path, &actions, &attributes, argv, envp);
    posix_spawnattr_destroy(&attributes);
out_actions:
    posix_spawn_file_actions_destroy(&actions);
out_close:
    for (int i = 0; i < count; i++) {
        if (staged[i] >= 0) close(staged[i]);
    }
    return result;
}
