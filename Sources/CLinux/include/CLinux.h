#ifndef FLOTILLA_CLINUX_H
#define FLOTILLA_CLINUX_H
/* Umbrella header of the CLinux shim: libc and Linux functions Swift cannot reach (they need
 * _GNU_SOURCE, are function-like macros, or are missing from the Glibc module), one concern
 * per header. Every header of this target must be listed here: with an explicit umbrella
 * header a new entry invalidates cached module builds, which an umbrella directory does not. */
#include "fl_blockio.h"
#include "fl_epoll.h"
#include "fl_eventfd.h"
#include "fl_fdpass.h"
#include "fl_malloc.h"
#include "fl_peercred.h"
#include "fl_pidfd.h"
#include "fl_socket.h"
#include "fl_spawn.h"
#include "fl_tap.h"
#include "fl_thread.h"
#include "fl_tmpfile.h"
#include "fl_userfaultfd.h"
#endif
