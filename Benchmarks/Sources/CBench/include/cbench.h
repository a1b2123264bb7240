#ifndef CBENCH_H
#define CBENCH_H
#include <stdint.h>
#include <sys/types.h>

/* Monotonic clock in nanoseconds. */
uint64_t cb_now_ns(void);

/* posix_spawn `path` with `argv` (NULL-terminated), stdin from /dev/null and stdout/stderr
 * on the given fds (-1: /dev/null); signal mask cleared and dispositions defaulted; every
 * other fd closed.  Returns the pid, or -errno. */
pid_t cb_spawn(const char *path, char *const argv[], int out_fd, int err_fd);

/* Waits for `pid`; returns its exit status (128+signal if killed) and its (all threads')
 * user+system CPU time in nanoseconds. -errno on failure.  nohang: 0 means still running
 * (-ECHILD never), returns -1000 when still running. */
int cb_wait(pid_t pid, int nohang, uint64_t *cpu_ns);

/* Connects a SOCK_STREAM socket to the unix socket `path`: fd, or -errno. */
int cb_connect_unix(const char *path);

/* Reads one '\n'-terminated line from `fd` into buf (NUL-terminated, without the newline);
 * waits at most timeout_ms in total.  Returns its length, or -errno (-ETIMEDOUT). Bytes
 * after the newline are kept in a small per-fd buffer for the next call (one fd at a time
 * per `state`). */
struct cb_reader { int fd; size_t len; char buf[65536]; };
long cb_read_line(struct cb_reader *r, char *out, size_t cap, int timeout_ms);

/* Writes all of buf. 0 or -errno. */
int cb_write_all(int fd, const void *buf, size_t len);

void cb_sleep_us(unsigned us);

/* Line-buffers stdout (the run script pipes it through tee). */
void cb_line_buffered_stdout(void);

/* net-bench's frame source: an AF_PACKET raw socket (protocol 0: it receives nothing) bound
 * to interface `ifname`, with PACKET_VNET_HDR on when `vnet_header` is set (every send then
 * starts with a 10-byte struct virtio_net_hdr, so GSO frames go to the interface whole), and
 * PACKET_QDISC_BYPASS (frames go straight to the driver, a tap's queue). fd, or -errno. */
int cb_packet_socket(const char *ifname, int vnet_header);
#endif
