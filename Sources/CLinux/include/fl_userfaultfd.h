#ifndef FLOTILLA_FL_USERFAULTFD_H
#define FLOTILLA_FL_USERFAULTFD_H
/* userfaultfd(2) in MISSING mode, for tests that must hold a thread inside a memory access
 * (a worker copying into guest memory) until the test lets it go. */

/* A userfaultfd (close-on-exec) with the API handshake done; -1 with errno on error. */
int fl_userfaultfd_open(void);
/* Registers [address, address + length) (page-aligned, in an anonymous or shared mapping)
 * for missing-page faults: a first touch blocks until fl_userfaultfd_zeropage. 0 or -1. */
int fl_userfaultfd_register(int fd, void *address, unsigned long length);
/* Maps zero pages at [address, address + length), waking the threads blocked there. 0 or -1. */
int fl_userfaultfd_zeropage(int fd, void *address, unsigned long length);
#endif
