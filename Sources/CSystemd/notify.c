/* See fl_systemd.h: service notification. */
#include "fl_systemd.h"
#include <systemd/sd-daemon.h>

int fl_sd_notify(const char *state) { return sd_notify(0, state); }

int fl_sd_watchdog_usec(uint64_t *usec) { return sd_watchdog_enabled(0, usec); }
