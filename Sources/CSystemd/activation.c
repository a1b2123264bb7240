/* See fl_systemd.h: socket activation. */
#include "fl_systemd.h"
#include <sys/socket.h>
#include <systemd/sd-daemon.h>

int fl_sd_listen_fds(void) { return sd_listen_fds(1); }

int fl_sd_is_listening_unix_socket(int fd, const char *path) { return sd_is_socket_unix(fd, SOCK_STREAM, 1, path, 0); }
