#ifndef FLOTILLA_FL_SPAWN_H
#define FLOTILLA_FL_SPAWN_H
/* Process creation without fork(): posix_spawn with the GNU extensions Swift's Glibc module
 * hides (POSIX_SPAWN_SETSID, posix_spawn_file_actions_addclosefrom_np). */
#include <sys/types.h>

/* Spawns `path` with `argv` and `envp`. The child's descriptors 0..count-1 are the parent's
 * `fds[i]` (-1 opens /dev/null); every other descriptor is closed. The child starts with an
 * empty signal mask and every signal at its default disposition; with `new_session` it
 * leads a new session (no controlling terminal). Returns 0 or an errno value. */
int fl_spawn(pid_t *pid, const char *path, char *const argv[], char *const envp[],
             const int *fds, int count, int new_session);
#endif
