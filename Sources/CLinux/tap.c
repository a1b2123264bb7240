#include "fl_tap.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <string.h>
#include <sys/ioctl.h>
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
