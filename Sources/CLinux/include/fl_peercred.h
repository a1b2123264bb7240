#ifndef FLOTILLA_FL_PEERCRED_H
#define FLOTILLA_FL_PEERCRED_H
/* SO_PEERCRED: struct ucred is only declared with _GNU_SOURCE. */
#include <sys/types.h>

/* The credentials of the process at the other end of a connected Unix socket.
 * Returns 0 or -1 with errno set. */
int fl_peer_credentials(int fd, pid_t *pid, uid_t *uid, gid_t *gid);
#endif
