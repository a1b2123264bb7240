/* See fl_blockio.h. */
#define _GNU_SOURCE
#include "fl_blockio.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

int fl_open_image(const char *path, int writable, int direct) {
    int flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | (direct ? O_DIRECT : 0);
    return open(path, flags);
}

int fl_lock_image(int fd, int exclusive) {
    return flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB);
}

int fl_punch_hole(int fd, uint64_t offset, uint64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int fl_zero_range(int fd, uint64_t offset, uint64_t length) {
    return fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int64_t fl_image_size(int fd, int *is_block_device) {
    struct stat st;
    if (fstat(fd, &st) != 0)
        return -1;
    if (S_ISBLK(st.st_mode)) {
        uint64_t size = 0;
        if (ioctl(fd, BLKGETSIZE64, &size) != 0)
            return -1;
        if (is_block_device)
            *is_block_device = 1;
        return (int64_t)size;
    }
    if (is_block_device)
        *is_block_device = 0;
    if (!S_ISREG(st.st_mode)) {
        errno = EINVAL;
        return -1;
    }
    return (int64_t)st.st_size;
}

void *fl_aligned_alloc(uint64_t alignment, uint64_t size) {
    void *p = NULL;
    if (posix_memalign(&p, (size_t)alignment, (size_t)size) != 0)
        return NULL;
    return p;
}

unsigned long fl_blkgetsize64_request(void) { return BLKGETSIZE64; }
