#ifndef FLOTILLA_FL_TAP_H
#define FLOTILLA_FL_TAP_H
/* Host tap devices for virtio-net: /dev/net/tun and its ioctls (function-like macros). */

/* linux/if_tun.h's interface flags (TUNSETIFF / TUNGETIFF ifr_flags) and linux/if.h's
 * IFNAMSIZ, checked against the kernel headers in tap.c. */
enum {
    FL_IFF_TUN = 0x0001,
    FL_IFF_TAP = 0x0002,
    FL_IFF_NO_PI = 0x1000,
    FL_IFF_VNET_HDR = 0x4000,
    FL_IFNAMSIZ = 16,
};

/* Attaches to the existing tap interface `name` as IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
 * non-blocking and close-on-exec (TUNSETIFF only: fl_tap_configure does the rest, for this
 * descriptor and for one passed in). Returns the descriptor, or -1 with errno set and *step
 * naming the call that failed ("open /dev/net/tun", "TUNSETIFF", ...). */
int fl_tap_open(const char *name, const char **step);

/* TUNGETIFF on `fd`: the interface's name (NUL-terminated, FL_IFNAMSIZ bytes of room) and its
 * flags (FL_IFF_*). 0, or -1 with errno (ENOTTY or EBADFD: not an attached tun/tap). */
int fl_tap_get_flags(int fd, char name[FL_IFNAMSIZ], unsigned int *flags);

/* Sets an attached tap up for virtio-net: non-blocking and close-on-exec (fcntl), a
 * `vnet_header_size`-byte virtio-net header before every frame (TUNSETVNETHDRSZ) and the
 * offloads `offloads` (TUNSETOFFLOAD, TUN_F_* bits; 0 for none). 0, or -1 with errno set and
 * *step naming the call that failed. */
int fl_tap_configure(int fd, int vnet_header_size, unsigned int offloads, const char **step);

/* TUNGETVNETHDRSZ on `fd`: the vnet header size, or -1 with errno. */
int fl_tap_get_vnet_header_size(int fd);

/* TUNSETOFFLOAD on tap `fd`: which offloads (TUN_F_CSUM 0x01, TUN_F_TSO4 0x02, TUN_F_TSO6 0x04,
 * TUN_F_TSO_ECN 0x08; the kernel refuses TSO bits without CSUM) the tap may hand to its
 * reader in the virtio-net header: partial checksums and GSO frames. 0, or -1 with errno. */
int fl_tap_set_offload(int fd, unsigned int offloads);

/* The TUNSETOFFLOAD request number, for the seccomp filter (offloads follow the driver's
 * feature negotiation, which happens after the filter is on). */
unsigned long fl_tap_set_offload_request(void);

/* A datagram socket for interface look-ups (SIOCGIFINDEX), in the caller's network namespace,
 * close-on-exec; -1 with errno set on failure. Created before the seccomp filter goes on, so
 * that QMP netdev_add can look a tap up afterwards without socket(2). */
int fl_if_query_socket(void);

/* The index of interface `name` (SIOCGIFINDEX on `sock`), or 0 when there is none (errno set). */
unsigned int fl_if_index(int sock, const char *name);

/* How many requests fl_tap_hotplug_requests stores. */
enum { FL_TAP_HOTPLUG_REQUESTS = 5 };

/* The ioctl requests QMP NIC hot-plug makes after start-up, for the seccomp filter:
 * [SIOCGIFINDEX, TUNSETIFF, TUNSETVNETHDRSZ, TUNSETOFFLOAD, TUNGETIFF]. */
void fl_tap_hotplug_requests(unsigned long out[FL_TAP_HOTPLUG_REQUESTS]);
#endif
