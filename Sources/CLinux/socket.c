/* See fl_socket.h. */
#define _GNU_SOURCE
#include "fl_socket.h"
#include <stddef.h>
#include <sys/socket.h>

int fl_accept_nonblocking(int listen_fd) {
    return accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
}
