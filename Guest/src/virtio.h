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

/* Device status bits (§2.1) and the one transport feature every driver needs (§6). */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER      2
#define VIRTIO_STATUS_DRIVER_OK   4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_F_VERSION_1        (1UL << 32)

/* Split virtqueues (§2.7). */
#define VIRTQ_DESC_F_NEXT          1
#define VIRTQ_DESC_F_WRITE         2
#define VIRTQ_DESC_F_INDIRECT      4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

struct vq_desc { u64 addr; u32 len; u16 flags; u16 next; };

/* A 4-entry split virtqueue in one page, polled (NO_INTERRUPT): rng, console, balloon, net. */
#define VQ_SMALL 4
struct vq_small {
	struct vq_desc desc[VQ_SMALL];                     /* 0x000 */
	u16 avail_flags, avail_idx, avail_ring[VQ_SMALL];  /* 0x040 */
	u8 pad0[0x100 - 0x40 - 2 * (2 + VQ_SMALL)];
	u16 used_flags, used_idx;                          /* 0x100 */
	struct { u32 id, len; } used_ring[VQ_SMALL];
} __attribute__((aligned(4096)));

/* Ring indices the device reads or writes: the barriers keep gcc from caching or reordering them. */
static inline u16 rd_u16(volatile u16 *p) { barrier(); u16 v = *p; barrier(); return v; }
static inline void wr_u16(volatile u16 *p, u16 v) { barrier(); *p = v; barrier(); }

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

/*
 * Device initialisation (§3.1.1): reset, ACKNOWLEDGE, DRIVER, then accept
 * offered & wanted (wanted includes VIRTIO_F_VERSION_1, which the device must
 * offer) and set FEATURES_OK, which the device must keep. False with `why`
 * set ("no-version-1", "features-refused") otherwise.
 */
bool virtio_negotiate(struct virtio_mmio_dev *d, u64 wanted, u64 *features, const char **why);
/*
 * Queue `index` (§4.2.3.2): selects it, checks it is not in use and holds at
 * least `size` entries ("queue-already-ready", "queue-too-small"), then sets
 * its size and ring addresses and makes it ready.
 */
bool virtio_queue_setup(struct virtio_mmio_dev *d, u32 index, u32 size, void *desc, void *avail, void *used,
			const char **why);
/* The same for a zeroed vq_small that asks for no interrupts. */
bool vq_small_setup(struct virtio_mmio_dev *d, u32 index, struct vq_small *q, const char **why);
/* Last step of initialisation: DRIVER_OK. */
void virtio_driver_ok(struct virtio_mmio_dev *d);
/* Makes VQ_SMALL device-writable buffers of `len` bytes, back to back from `bufs`, available on q. */
void vq_small_fill(struct vq_small *q, u8 *bufs, u32 len);
/* Makes descriptor `id` available on q (no notification). */
void vq_small_post(struct vq_small *q, u16 id);
/* Tells the device that queue `index` has new buffers (after a full barrier). */
void virtio_notify(struct virtio_mmio_dev *d, u32 index);
/*
 * One buffer as descriptor 0 of queue `index`, notified, then polled every
 * 200 us up to `polls` times: the length the device reports used, or -1.
 */
long vq_small_send(struct virtio_mmio_dev *d, u32 index, struct vq_small *q, void *buf, u32 len, u16 flags, u32 polls);

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
