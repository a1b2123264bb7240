#ifndef FLOTILLA_FL_EVENTFD_H
#define FLOTILLA_FL_EVENTFD_H
/* eventfd(2), which the Glibc module does not export to Swift. */

/* eventfd(initval, EFD_CLOEXEC | (nonblocking ? EFD_NONBLOCK : 0)); -1 with errno on error. */
int fl_eventfd(unsigned int initval, int nonblocking);
#endif
