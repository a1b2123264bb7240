#ifndef FLOTILLA_FL_SOCKET_H
#define FLOTILLA_FL_SOCKET_H
/* accept4(2) needs _GNU_SOURCE, which Swift's Glibc module is not built with. */

/* Accepts one connection as a non-blocking, close-on-exec socket; -1 with errno on error. */
int fl_accept_nonblocking(int listen_fd);
#endif
