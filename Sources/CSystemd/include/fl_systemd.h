#ifndef FLOTILLA_FL_SYSTEMD_H
#define FLOTILLA_FL_SYSTEMD_H
/* libsystemd for flotillad: service notification (sd_notify, the watchdog) and structured
 * journal entries. sd_journal_send is variadic, which Swift cannot call. */
#include <stddef.h>
#include <stdint.h>

/* sd_notify(0, state): > 0 sent, 0 when NOTIFY_SOCKET is unset, negative errno on failure. */
int fl_sd_notify(const char *state);

/* sd_watchdog_enabled(0, usec): > 0 with *usec set when the service manager expects
 * WATCHDOG=1 pings (WATCHDOG_USEC set and WATCHDOG_PID, if set, is this process), 0 when
 * not, negative errno on failure. */
int fl_sd_watchdog_usec(uint64_t *usec);

/* sd_journal_sendv over `count` "FIELD=value" strings of the given byte lengths (values may
 * hold any bytes). Returns 0 or a negative errno. */
int fl_sd_journal_send_fields(const char *const *fields, const size_t *lengths, int count);
/* Socket activation: sd_listen_fds(1) (the number of descriptors passed from
 * SD_LISTEN_FDS_START = 3 on, when LISTEN_PID names this process; the LISTEN_* variables
 * are unset), or a negative errno. */
int fl_sd_listen_fds(void);

/* sd_is_socket_unix(fd, SOCK_STREAM, listening = 1, path, 0): > 0 when fd is a listening
 * Unix stream socket bound to path, 0 when not, negative errno on failure. */
int fl_sd_is_listening_unix_socket(int fd, const char *path);
#endif
