#ifndef FLOTILLA_FL_BLOCKIO_H
#define FLOTILLA_FL_BLOCKIO_H
/* Disk-image I/O for virtio-blk: O_DIRECT, fallocate(2) and its FALLOC_FL_* modes, and
 * flock(2) are _GNU_SOURCE-only or macro constants the Glibc module does not export. */
#include <stdint.h>

/* open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | (direct ? O_DIRECT : 0));
 * -1 with errno on error. */
int fl_open_image(const char *path, int writable, int direct);

/* flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB); -1 with errno (EWOULDBLOCK when
 * another open file description holds a conflicting lock). */
int fl_lock_image(int fd, int exclusive);

/* fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length). */
int fl_punch_hole(int fd, uint64_t offset, uint64_t length);

/* fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length). */
int fl_zero_range(int fd, uint64_t offset, uint64_t length);

/* The size in bytes of a regular file or a block device (BLKGETSIZE64); -1 with errno. */
int64_t fl_image_size(int fd, int *is_block_device);

/* The BLKGETSIZE64 ioctl request (for the seccomp filter: QMP blockdev-add sizes block
 * devices after start-up). */
unsigned long fl_blkgetsize64_request(void);

/* posix_memalign wrapper: NULL on failure. Free with free(). */
void *fl_aligned_alloc(uint64_t alignment, uint64_t size);
#endif
