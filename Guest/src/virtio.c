/*
 * Flotilla test guest: virtio-mmio discovery from "virtio_mmio.device=" kernel
 * parameters (Linux's <size>@<baseaddr>:<irq>[:<id>] syntax) and dispatch to
 * per-device-type drivers.
 */
#include "virtio.h"

#define MAX_VIRTIO_DEVICES 32

bool virtio_blk_probe(struct virtio_mmio_dev *dev);
bool virtio_rng_probe(struct virtio_mmio_dev *dev);
bool virtio_console_probe(struct virtio_mmio_dev *dev);
bool virtio_balloon_probe(struct virtio_mmio_dev *dev);
bool virtio_vsock_probe(struct virtio_mmio_dev *dev);
void virtio_blk_remove(struct virtio_mmio_dev *dev);
bool virtio_net_probe(struct virtio_mmio_dev *dev);
bool virtio_net_probe_hotplug(struct virtio_mmio_dev *dev);

/* The kernel command line, for drivers' own parameters. */
const char *virtio_cmdline = "";

/* Add drivers here. */
static const struct virtio_driver drivers[] = {
	{ VIRTIO_ID_NET, "virtio-net", virtio_net_probe },
	{ VIRTIO_ID_BLOCK, "virtio-blk", virtio_blk_probe },
	{ VIRTIO_ID_RNG, "virtio-rng", virtio_rng_probe },
	{ VIRTIO_ID_CONSOLE, "virtio-console", virtio_console_probe },
	{ VIRTIO_ID_BALLOON, "virtio-balloon", virtio_balloon_probe },
	{ VIRTIO_ID_VSOCK, "virtio-vsock", virtio_vsock_probe },
};

#define MAX_HOLD_POLLERS 8
static void (*hold_pollers[MAX_HOLD_POLLERS])(void);
static u32 hold_poller_count;

void virtio_hold_register(void (*poll)(void))
{
	if (hold_poller_count < MAX_HOLD_POLLERS)
		hold_pollers[hold_poller_count++] = poll;
}

bool virtio_hold_poll(void)
{
	for (u32 i = 0; i < hold_poller_count; i++)
		hold_pollers[i]();
	return hold_poller_count != 0;
}

bool virtio_negotiate(struct virtio_mmio_dev *d, u64 wanted, u64 *features, const char **why)
{
	vm_write(d, VIRTIO_MMIO_STATUS, 0);
	vm_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
	vm_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
	vm_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	u64 offered = vm_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
	vm_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)vm_read(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	if (!(offered & VIRTIO_F_VERSION_1)) {
		*why = "no-version-1";
		return false;
	}
	u64 accepted = offered & wanted;
	*features = accepted;
	vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)accepted);
	vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(accepted >> 32));
	vm_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
	if (!(vm_read(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
		*why = "features-refused";
		return false;
	}
	return true;
}

bool virtio_queue_setup(struct virtio_mmio_dev *d, u32 index, u32 size, void *desc, void *avail, void *used,
			const char **why)
{
	vm_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
	if (vm_read(d, VIRTIO_MMIO_QUEUE_READY)) {
		*why = "queue-already-ready";
		return false;
	}
	if (vm_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX) < size) {
		*why = "queue-too-small";
		return false;
	}
	vm_write(d, VIRTIO_MMIO_QUEUE_NUM, size);
	vm_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)desc);
	vm_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)desc >> 32));
	vm_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)avail);
	vm_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)((u64)avail >> 32));
	vm_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)used);
	vm_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)((u64)used >> 32));
	vm_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
	return true;
}

bool vq_small_setup(struct virtio_mmio_dev *d, u32 index, struct vq_small *q, const char **why)
{
	memset(q, 0, sizeof(*q));
	q->avail_flags = VIRTQ_AVAIL_F_NO_INTERRUPT;    /* these drivers poll */
	return virtio_queue_setup(d, index, VQ_SMALL, q->desc, &q->avail_flags, &q->used_flags, why);
}

void virtio_driver_ok(struct virtio_mmio_dev *d)
{
	vm_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK |
		 VIRTIO_STATUS_DRIVER_OK);
}

void vq_small_fill(struct vq_small *q, u8 *bufs, u32 len)
{
	for (u16 i = 0; i < VQ_SMALL; i++) {
		q->desc[i] = (struct vq_desc){ (u64)bufs + (u64)i * len, len, VIRTQ_DESC_F_WRITE, 0 };
		q->avail_ring[i] = i;
	}
	wr_u16(&q->avail_idx, VQ_SMALL);
}

void vq_small_post(struct vq_small *q, u16 id)
{
	u16 idx = rd_u16(&q->avail_idx);
	q->avail_ring[idx % VQ_SMALL] = id;
	wr_u16(&q->avail_idx, (u16)(idx + 1));
}

void virtio_notify(struct virtio_mmio_dev *d, u32 index)
{
	__asm__ __volatile__("mfence" ::: "memory");
	vm_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, index);
}

long vq_small_send(struct virtio_mmio_dev *d, u32 index, struct vq_small *q, void *buf, u32 len, u16 flags, u32 polls)
{
	u16 idx = rd_u16(&q->avail_idx);
	q->desc[0] = (struct vq_desc){ (u64)buf, len, flags, 0 };
	vq_small_post(q, 0);
	virtio_notify(d, index);
	for (u32 n = 0; n < polls; n++) {
		if (rd_u16(&q->used_idx) == (u16)(idx + 1))
			return q->used_ring[idx % VQ_SMALL].len;
		delay_us(200);
	}
	return -1;
}

struct virtio_scan {
	struct virtio_mmio_dev dev[MAX_VIRTIO_DEVICES];
	u32 count;
	u32 bad_syntax;
};
static struct virtio_scan vscan;

static void virtio_param(const char *key, size_t keylen, const char *val, size_t vallen, void *ctx)
{
	struct virtio_scan *sc = ctx;
	if (!param_is(key, keylen, "virtio_mmio.device"))
		return;
	u64 size, base, irq;
	size_t n, pos = 0;
	if (!val || !parse_memsize(val, vallen, &size, &n) || !size) {
		sc->bad_syntax++;
		return;
	}
	pos = n;
	if (pos >= vallen || val[pos] != '@' ||
	    !parse_memsize(val + pos + 1, vallen - pos - 1, &base, &n)) {
		sc->bad_syntax++;
		return;
	}
	pos += 1 + n;
	if (pos >= vallen || val[pos] != ':' ||
	    !parse_uint(val + pos + 1, vallen - pos - 1, &irq, &n) || irq > 0xffffffffu) {
		sc->bad_syntax++;
		return;
	}
	pos += 1 + n;
	/* An optional ":<platform device id>" may follow; anything else is an error. */
	if (pos < vallen) {
		u64 id;
		if (val[pos] != ':' || !parse_uint(val + pos + 1, vallen - pos - 1, &id, &n) ||
		    pos + 1 + n != vallen) {
			sc->bad_syntax++;
			return;
		}
	}
	if (sc->count >= MAX_VIRTIO_DEVICES) {
		sc->bad_syntax++;
		return;
	}
	struct virtio_mmio_dev *d = &sc->dev[sc->count];
	d->base = base;
	d->size = size;
	d->irq = (u32)irq;
	d->index = sc->count++;
}

static const struct virtio_driver *find_driver(u32 device_id)
{
	for (u32 i = 0; i < ARRAY_SIZE(drivers); i++)
		if (drivers[i].probe && drivers[i].device_id == device_id)
			return &drivers[i];
	return NULL;
}

/*
 * flotilla.rescan=1 (with flotilla.hold=1): the hold loop re-reads DeviceID of every slot
 * that was empty, a disk or a NIC at boot, every RESCAN_POLLS polls (~100 ms). A slot that
 * turns into a virtio-blk or virtio-net device gets that driver (its usual fact and check
 * lines; a NIC also its ARP/ping checks with flotilla.net=); a device whose DeviceID changes
 * (back to 0) was unplugged ("fact device-removed"). Linux does the same only when told to
 * re-probe (docs/guest-abi.md "Hot-plug").
 */
#define RESCAN_POLLS 5
static bool opt_rescan;
static u32 watched_id[MAX_VIRTIO_DEVICES];
static bool watched[MAX_VIRTIO_DEVICES];

static void rescan_param(const char *key, size_t keylen, const char *val, size_t vallen, void *ctx)
{
	if (param_is(key, keylen, "flotilla.rescan"))
		opt_rescan = !val || !vallen || val[0] == '1' || val[0] == 'y' || val[0] == 'Y';
}

static void rescan_poll(void)
{
	static u32 tick;
	if (++tick % RESCAN_POLLS)
		return;
	for (u32 i = 0; i < vscan.count; i++) {
		if (!watched[i])
			continue;
		struct virtio_mmio_dev *d = &vscan.dev[i];
		u32 id = vm_read(d, VIRTIO_MMIO_DEVICE_ID);
		if (id == watched_id[i])
			continue;
		if (watched_id[i] == VIRTIO_ID_BLOCK || watched_id[i] == VIRTIO_ID_NET) {
			if (watched_id[i] == VIRTIO_ID_BLOCK)
				virtio_blk_remove(d);    /* the net driver holds nothing after its probe */
			kprintf("flotilla-guest: fact device-removed base=0x%lx irq=%u device_id=%u\n", d->base, d->irq, watched_id[i]);
		}
		watched_id[i] = id;
		d->device_id = id;
		if (id != VIRTIO_ID_BLOCK && id != VIRTIO_ID_NET)
			continue;
		d->version = vm_read(d, VIRTIO_MMIO_VERSION);
		d->vendor_id = vm_read(d, VIRTIO_MMIO_VENDOR_ID);
		kprintf("flotilla-guest: fact device-added virtio-mmio base=0x%lx irq=%u device_id=%u vendor=0x%x version=%u\n",
			d->base, d->irq, id, d->vendor_id, d->version);
		if (d->version == 2) {
			if (id == VIRTIO_ID_BLOCK)
				virtio_blk_probe(d);
			else
				virtio_net_probe_hotplug(d);
		}
	}
}

void virtio_probe_all(const char *cmdline)
{
	struct virtio_scan *sc = &vscan;
	memset(sc, 0, sizeof(*sc));
	virtio_cmdline = cmdline;
	parse_params(cmdline, virtio_param, sc);

	u32 empty = 0, bad = 0, legacy = 0, driver_fail = 0;
	for (u32 i = 0; i < sc->count; i++) {
		struct virtio_mmio_dev *d = &sc->dev[i];
		/* Only the identical-mapped 4 GiB is reachable; the registers need 0x100 bytes. */
		if (d->base + 0x100 > 0x100000000UL || d->size < 0x100 || (d->base & 3)) {
			kprintf("flotilla-guest: fact device-bad virtio-mmio base=0x%lx irq=%u reason=unreachable\n", d->base, d->irq);
			bad++;
			continue;
		}
		u32 magic = vm_read(d, VIRTIO_MMIO_MAGIC_VALUE);
		if (magic != VIRTIO_MMIO_MAGIC) {
			kprintf("flotilla-guest: fact device-bad virtio-mmio base=0x%lx irq=%u reason=bad-magic magic=0x%x\n",
				d->base, d->irq, magic);
			bad++;
			continue;
		}
		d->version = vm_read(d, VIRTIO_MMIO_VERSION);
		d->device_id = vm_read(d, VIRTIO_MMIO_DEVICE_ID);
		d->vendor_id = vm_read(d, VIRTIO_MMIO_VENDOR_ID);
		if (d->device_id == 0) {
			empty++;          /* an empty hot-plug slot; Linux ignores it too */
			continue;
		}
		kprintf("flotilla-guest: fact device virtio-mmio base=0x%lx irq=%u device_id=%u vendor=0x%x version=%u\n",
			d->base, d->irq, d->device_id, d->vendor_id, d->version);
		if (d->version != 2) {
			legacy++;
			continue;
		}
		const struct virtio_driver *drv = find_driver(d->device_id);
		if (drv && !drv->probe(d))
			driver_fail++;
	}
	kprintf("flotilla-guest: fact device-slots total=%u empty=%u\n", sc->count, empty);
	parse_params(cmdline, rescan_param, NULL);
	if (opt_rescan) {
		for (u32 i = 0; i < sc->count; i++) {
			struct virtio_mmio_dev *d = &sc->dev[i];
			if (d->size >= 0x100 && d->base + 0x100 <= 0x100000000UL && !(d->base & 3) && (d->device_id == 0 || d->device_id == VIRTIO_ID_BLOCK || d->device_id == VIRTIO_ID_NET) &&
			    vm_read(d, VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC) {
				watched[i] = true;
				watched_id[i] = d->device_id;
			}
		}
		virtio_hold_register(rescan_poll);
	}
	check("virtio-mmio", bad == 0 && legacy == 0 && sc->bad_syntax == 0 && driver_fail == 0,
	      "slots=%u empty=%u bad=%u not-modern=%u bad-syntax=%u driver-fail=%u",
	      sc->count, empty, bad, legacy, sc->bad_syntax, driver_fail);
}
