/* See fl_eventfd.h. */
#include "fl_eventfd.h"
#include <sys/eventfd.h>

int fl_eventfd(unsigned int initval, int nonblocking) {
    return eventfd(initval, EFD_CLOEXEC | (nonblocking ? EFD_NONBLOCK : 0));
}
