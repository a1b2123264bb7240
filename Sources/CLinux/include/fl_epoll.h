#ifndef FLOTILLA_FL_EPOLL_H
#define FLOTILLA_FL_EPOLL_H
// epoll, signalfd and timerfd: the Linux event primitives the VMM's event loops are built on.
// Glibc's Swift module map does not cover these headers.
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <signal.h>

#endif
