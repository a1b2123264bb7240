/* See fl_userfaultfd.h. */
#include "fl_userfaultfd.h"
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int fl_userfaultfd_open(void) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
    if (fd < 0) return -1;
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    if (ioctl(fd, UFFDIO_API, &api) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

int fl_userfaultfd_register(int fd, void *address, unsigned long length) {
    struct uffdio_register reg = {
        .range = {.start = (unsigned long)address, .len = length},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    return ioctl(fd, UFFDIO_REGISTER, &reg) == 0 ? 0 : -1;
}

int fl_userfaultfd_zeropage(int fd, void *address, unsigned long length) {
    struct uffdio_zeropage zero = {.range = {.start = (unsigned long)address, .len = length}, .mode = 0};
    return ioctl(fd, UFFDIO_ZEROPAGE, &zero) == 0 ? 0 : -1;
}
