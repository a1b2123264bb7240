#ifndef FLOTILLA_FL_TMPFILE_H
#define FLOTILLA_FL_TMPFILE_H
/* An unnamed file in a directory: O_TMPFILE needs _GNU_SOURCE. */

/* Opens an unlinked regular file in directory (O_TMPFILE | O_RDWR | O_CLOEXEC, mode 0600);
 * falls back to mkostemp + unlink where the file system lacks O_TMPFILE (hugetlbfs before
 * Linux 6.x). Returns the fd or -1 with errno set. */
int fl_open_unlinked_file(const char *directory);
#endif
