#ifndef FLOTILLA_FL_FDPASS_H
#define FLOTILLA_FL_FDPASS_H
/* File descriptors passed over Unix stream sockets with SCM_RIGHTS (unix(7)): the CMSG_*
 * macros are function-like, and MSG_CMSG_CLOEXEC needs _GNU_SOURCE, so Swift reaches
 * neither. QMP's getfd/add_client use these (QMP reference, "getfd"). */
#include <stddef.h>
#include <sys/types.h>

/* The most descriptors one message may carry that fl_recv_with_fds keeps; any beyond are
 * closed by the kernel (MSG_CTRUNC). QEMU's monitor uses one per getfd. */
#define FL_FDPASS_MAX 16

/* recvmsg(2) of up to `length` bytes into `buffer` with MSG_CMSG_CLOEXEC | `flags`. The
 * descriptors that arrived (close-on-exec) are stored in `fds` (room for FL_FDPASS_MAX)
 * and counted in `*fd_count`; they are the caller's to close. Returns the byte count (0 at
 * end of stream), or -1 with errno, in which case no descriptor is left open. */
ssize_t fl_recv_with_fds(int socket_fd, void *buffer, size_t length, int flags, int *fds, int *fd_count);

/* sendmsg(2) of `length` bytes with one descriptor attached (SCM_RIGHTS) and MSG_NOSIGNAL |
 * `flags`. The kernel attaches it to the first byte sent; the caller keeps its own copy. */
ssize_t fl_send_with_fd(int socket_fd, const void *buffer, size_t length, int flags, int fd);
#endif
