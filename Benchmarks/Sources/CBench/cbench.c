#define _GNU_SOURCE
#include "cbench.h"
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

uint64_t cb_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

pid_t cb_spawn(const char *path, char *const argv[], int out_fd, int err_fd)
{
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t at;
	sigset_t empty, all;
	pid_t pid = -1;
	int r;
	posix_spawn_file_actions_init(&fa);
	posix_spawnattr_init(&at);
	posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	if (out_fd >= 0) posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
	else posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	if (err_fd >= 0) posix_spawn_file_actions_adddup2(&fa, err_fd, 2);
	else posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	posix_spawn_file_actions_addclosefrom_np(&fa, 3);
	sigemptyset(&empty);
	sigfillset(&all);
	posix_spawnattr_setsigmask(&at, &empty);
	posix_spawnattr_setsigdefault(&at, &all);
	posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
	r = posix_spawn(&pid, path, &fa, &at, argv, environ);
	posix_spawnattr_destroy(&at);
	posix_spawn_file_actions_destroy(&fa);
	return r ? -r : pid;
}

int cb_wait(pid_t pid, int nohang, uint64_t *cpu_ns)
{
	int status;
	struct rusage ru;
	pid_t r;
	do r = wait4(pid, &status, nohang ? WNOHANG : 0, &ru);
	while (r < 0 && errno == EINTR);
	if (r < 0) return -errno;
	if (r == 0) return -1000;
	if (cpu_ns)
		*cpu_ns = (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000u +
			  (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000u;
	if (WIFEXITED(status)) return WEXITSTATUS(status);
	if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
	return 255;
}

int cb_connect_unix(const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof a.sun_path) return -ENAMETOOLONG;
	strcpy(a.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) return -errno;
	if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
		int e = errno;
		close(fd);
		return -e;
	}
	return fd;
}

long cb_read_line(struct cb_reader *r, char *out, size_t cap, int timeout_ms)
{
	uint64_t deadline = cb_now_ns() + (uint64_t)timeout_ms * 1000000u;
	for (;;) {
		char *nl = memchr(r->buf, '\n', r->len);
		if (nl) {
			size_t n = (size_t)(nl - r->buf);
			size_t c = n < cap - 1 ? n : cap - 1;
			memcpy(out, r->buf, c);
			if (c && out[c - 1] == '\r') c--;
			out[c] = 0;
			memmove(r->buf, nl + 1, r->len - n - 1);
			r->len -= n + 1;
			return (long)c;
		}
		if (r->len == sizeof r->buf) r->len = 0; /* overlong line: drop it */
		uint64_t now = cb_now_ns();
		if (now >= deadline) return -ETIMEDOUT;
		struct pollfd p = { .fd = r->fd, .events = POLLIN };
		int pr = poll(&p, 1, (int)((deadline - now) / 1000000u) + 1);
		if (pr < 0 && errno == EINTR) continue;
		if (pr < 0) return -errno;
		if (pr == 0) return -ETIMEDOUT;
		ssize_t got = read(r->fd, r->buf + r->len, sizeof r->buf - r->len);
		if (got < 0 && errno == EINTR) continue;
		if (got < 0) return -errno;
		if (got == 0) return -EPIPE;
		r->len += (size_t)got;
	}
}

int cb_write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len) {
		ssize_t n = write(fd, p, len);
		if (n < 0 && errno == EINTR) continue;
		if (n < 0) return -errno;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

void cb_sleep_us(unsigned us)
{
	struct timespec ts = { us / 1000000u, (long)(us % 1000000u) * 1000 };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

#include <stdio.h>
void cb_line_buffered_stdout(void) { setvbuf(stdout, NULL, _IOLBF, 0); }

#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/if.h>

int cb_packet_socket(const char *ifname, int vnet_header)
{
	unsigned int index = if_nametoindex(ifname);
	if (index == 0) return -errno;
	int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
	if (fd < 0) return -errno;
	int on = 1;
	if (vnet_header && setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &on, sizeof on) < 0) goto fail;
	if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &on, sizeof on) < 0) goto fail;
	struct sockaddr_ll address;
	memset(&address, 0, sizeof address);
	address.sll_family = AF_PACKET;
	address.sll_ifindex = (int)index;
	address.sll_protocol = 0;
	if (bind(fd, (struct sockaddr *)&address, sizeof address) < 0) goto fail;
	return fd;
fail:;
	int saved = errno;
	close(fd);
	return -saved;
}
