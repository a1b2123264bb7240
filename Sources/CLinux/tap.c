#include "fl_tap.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

_Static_assert(FL_IFF_TUN == IFF_TUN && FL_IFF_TAP == IFF_TAP && FL_IFF_NO_PI == IFF_NO_PI && FL_IFF_VNET_HDR == IFF_VNET_HDR,
               "fl_tap.h's IFF_* values are linux/if_tun.h's");
_Static_assert(FL_IFNAMSIZ == IFNAMSIZ, "fl_tap.h's IFNAMSIZ is linux/if.h's");

int fl_tap_open(const char *name, const char **step) {
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
    if (ioctl(fd, TUNSETIFF, &request) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int fl_tap_get_flags(int fd, char name[FL_IFNAMSIZ], unsigned int *flags) {
    struct ifreq request;
    memset(&request, 0, sizeof request);
    if (ioctl(fd, TUNGETIFF, &request) < 0) return -1;
    memcpy(name, request.ifr_name, IFNAMSIZ);
    name[IFNAMSIZ - 1] = 0;
    *flags = (unsigned short)request.ifr_flags;
    return 0;
}

int fl_tap_configure(int fd, int vnet_header_size, unsigned int offloads, const char **step) {
    *step = "fcntl O_NONBLOCK";
    int status = fcntl(fd, F_GETFL);
    if (status < 0 || fcntl(fd, F_SETFL, status | O_NONBLOCK) < 0) return -1;
    *step = "fcntl FD_CLOEXEC";
    int descriptor = fcntl(fd, F_GETFD);
    if (descriptor < 0 || fcntl(fd, F_SETFD, descriptor | FD_CLOEXEC) < 0) return -1;
    *step = "TUNSETVNETHDRSZ";
    if (ioctl(fd, TUNSETVNETHDRSZ, &vnet_header_size) < 0) return -1;
    *step = "TUNSETOFFLOAD";
    if (ioctl(fd, TUNSETOFFLOAD, (unsigned long)offloads) < 0) return -1;
    return 0;
}

int fl_tap_get_vnet_header_size(int fd) {
    int size = 0;
    if (ioctl(fd, TUNGETVNETHDRSZ, &size) < 0) return -1;
    return size;
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

void fl_tap_hotplug_requests(unsigned long out[FL_TAP_HOTPLUG_REQUESTS]) {
    out[0] = SIOCGIFINDEX;
    out[1] = TUNSETIFF;
    out[2] = TUNSETVNETHDRSZ;
    out[3] = TUNSETOFFLOAD;
    out[4] = TUNGETIFF;
}
