/* Flotilla test guest: virtio-mmio transport (virtio 1.x, "modern" register layout). */
#ifndef FLOTILLA_VIRTIO_H
#define FLOTILLA_VIRTIO_H

#include "guest.h"

#define VIRTIO_MMIO_MAGIC_VALUE        0x000
#define VIRTIO_MMIO_VERSION            0x004
#define VIRTIO_MMIO_DEVICE_ID          0x008
#define VIRTIO_MMIO_VENDOR_ID          0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES    0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES    0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL          0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX      0x034
#define VIRTIO_MMIO_QUEUE_NUM          0x038
#define VIRTIO_MMIO_QUEUE_READY        0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY       0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS   0x060
#define VIRTIO_MMIO_INTERRUPT_ACK      0x064
#define VIRTIO_MMIO_STATUS             0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW     0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH    0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW   0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH  0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW   0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH  0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION  0x0fc
#define VIRTIO_MMIO_CONFIG             0x100

#define VIRTIO_MMIO_MAGIC              0x74726976u    /* "virt" */

/* Device IDs (virtio 1.x spec, 5 "Device Types"). */
#define VIRTIO_ID_NET      1
#define VIRTIO_ID_BLOCK    2
#define VIRTIO_ID_CONSOLE  3
#define VIRTIO_ID_RNG      4
#define VIRTIO_ID_BALLOON  5
#define VIRTIO_ID_VSOCK    19

struct virtio_mmio_dev {
	u64 base, size;
	u32 irq;
	u32 device_id, vendor_id, version;
	u32 index;                  /* order on the command line */
};

static inline u32 vm_read(const struct virtio_mmio_dev *d, u32 reg) { return mmio_read32(d->base + reg); }
static inline void vm_write(const struct virtio_mmio_dev *d, u32 reg, u32 v) { mmio_write32(d->base + reg, v); }

/*
 * A driver per device type: probe() runs for each present device whose
 * device_id matches, after the "fact device" line.  It reports its own
 * "check"/"fact" lines and returns false on failure.
 */
struct virtio_driver {
	u32 device_id;
	const char *name;
	bool (*probe)(struct virtio_mmio_dev *dev);
};

/* The kernel command line, set by virtio_probe_all, for drivers' own parameters. */
extern const char *virtio_cmdline;

/*
 * Work a driver keeps doing after "done" while the guest holds (flotilla.hold=1):
 * main.c's hold loop calls every registered poller, then sleeps ~HOLD_POLL_US
 * in hlt (LAPIC one-shot timer), instead of halting with nothing to do.
 */
#define HOLD_POLL_US 20000
void virtio_hold_register(void (*poll)(void));
/* Runs the registered pollers; false when there are none. */
bool virtio_hold_poll(void);

#endif
