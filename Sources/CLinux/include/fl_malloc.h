#ifndef FLOTILLA_FL_MALLOC_H
#define FLOTILLA_FL_MALLOC_H
/* glibc malloc tuning (<malloc.h> is not in Swift's Glibc module). */

/* mallopt(M_ARENA_MAX, 1): every thread allocates from the main (brk) arena. Per-thread
 * arenas would reserve 64 MiB of address space each, and when one shrinks glibc opens
 * /proc/sys/vm/overcommit_memory — a system call the worker's seccomp filter forbids.
 * Returns 1 on success, 0 on error. */
int fl_malloc_single_arena(void);
#endif
