#include "fl_tap.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

int fl_tap_open(const char *name, int vnet_header_size, unsigned int offloads, const char **step) {
    if (strlen(name) >= IFNAMSIZ) {
        *step = "interface name";
        errno = ENAMETOOLONG;
        return -1;
    }
    *step = "open /dev/net/tun";
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -1;
    struct ifreq request;
    memset(&request, 0, sizeof request);
    strncpy(request.ifr_name, name, IFNAMSIZ - 1);
    request.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    *step = "TUNSETIFF";
    if (ioctl(fd, TUNSETIFF, &request) < 0) goto fail;
    *step = "TUNSETVNETHDRSZ";
    if (ioctl(fd, TUNSETVNETHDRSZ, &vnet_header_size) < 0) goto fail;
    *step = "TUNSETOFFLOAD";
    if (ioctl(fd, TUNSETOFFLOAD, (unsigned long)offloads) < 0) goto fail;
    return fd;
fail:;
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

int fl_tap_set_offload(int fd, unsigned int offloads) { return ioctl(fd, TUNSETOFFLOAD, (unsigned long)offloads); }

unsigned long fl_tap_set_offload_request(void) { return TUNSETOFFLOAD; }

int fl_if_query_socket(void) { return socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0); }

unsigned int fl_if_index(int sock, const char *name) {
    if (strlen(name) >= IFNAMSIZ) {
        errno = ENAMETOOLONG;
        return 0;
    }
    struct ifreq request;
    memset(&request, 0, sizeof request);
    strncpy(request.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(sock, SIOCGIFINDEX, &request) < 0) return 0;
    return (unsigned int)request.ifr_ifindex;
}

void fl_tap_hotplug_requests(unsigned long out[4]) {
    out[0] = SIOCGIFINDEX;
    out[1] = TUNSETIFF;
    out[2] = TUNSETVNETHDRSZ;
    out[3] = TUNSETOFFLOAD;
}
