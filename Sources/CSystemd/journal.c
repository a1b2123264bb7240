/* See fl_systemd.h: structured journal entries. */
#include "fl_systemd.h"
#include <errno.h>
#include <sys/uio.h>
#include <systemd/sd-journal.h>

int fl_sd_journal_send_fields(const char *const *fields, const size_t *lengths, int count) {
    if (count <= 0 || count > 64) return -EINVAL;
    struct iovec vectors[64];
    for (int i = 0; i < count; i++) {
        vectors[i].iov_base = (void *)fields[i];
        vectors[i].iov_len = lengths[i];
    }
    return sd_journal_sendv(vectors, count);
}
