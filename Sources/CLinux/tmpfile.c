/* See fl_tmpfile.h. */
#define _GNU_SOURCE
#include "fl_tmpfile.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int fl_open_unlinked_file(const char *directory) {
    int fd = open(directory, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd >= 0) return fd;
    if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) return -1;
    char path[4096];
    int n = snprintf(path, sizeof path, "%s/flotilla-mem-XXXXXX", directory);
    if (n < 0 || (size_t)n >= sizeof path) { errno = ENAMETOOLONG; return -1; }
    fd = mkostemp(path, O_CLOEXEC);
    if (fd < 0) return -1;
    if (unlink(path) != 0) { int saved = errno; close(fd); errno = saved; return -1; }
    return fd;
}
