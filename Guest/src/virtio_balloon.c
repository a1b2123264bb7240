/*
 * Flotilla test guest: a virtio-balloon driver (virtio 1.2 §5.5) over the
 * modern virtio-mmio transport (§4.2), polling inflateq 0 and deflateq 1.
 *
 * The guest has no allocator, so the balloon takes its pages from a fixed
 * region that nothing else uses: BALLOON_BASE (64 MiB) up to BALLOON_MAX pages
 * (16 MiB), checked to be e820 RAM clear of the kernel and the initrd. At probe
 * the driver writes a non-zero word into every page of it (so the host has
 * them resident) and reports
 *   fact device virtio-balloon base=<hex> irq=<n> max_pages=<n> deflate_on_oom=<0|1>
 *   check virtio-balloon ok|fail
 * While the guest holds (flotilla.hold=1) it polls InterruptStatus; on a
 * configuration change (bit 1, §4.2.2) it reads num_pages (§5.5.4), inflates
 * (PFNs of the region's first pages, in order) or deflates (the last ones)
 * until it holds min(num_pages, BALLOON_MAX) pages, writes actual and reports
 *   fact balloon pages=<actual> target=<num_pages> zeroed=<n>
 * where zeroed counts deflated pages whose word reads 0 again (the host dropped
 * them); deflated pages get their non-zero word back.
 */
#include "virtio.h"

#define F_VERSION_1        (1UL << 32)
#define F_DEFLATE_ON_OOM   (1UL << 2)

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER      2
#define STATUS_DRIVER_OK   4
#define STATUS_FEATURES_OK 8

#define AVAIL_F_NO_INTERRUPT 1
#define INT_CONFIG_CHANGE    2

#define QSIZE         4
#define BALLOON_BASE  0x4000000UL     /* 64 MiB */
#define BALLOON_MAX   4096            /* pages of 4 KiB: 16 MiB */
#define BALLOON_BATCH 256             /* PFNs per request */
#define PAGE_MARK     0x62616c6c6f6f6e21UL

struct vq_desc { u64 addr; u32 len; u16 flags; u16 next; };

struct bal_queue {
	struct vq_desc desc[QSIZE];                     /* 0x000 */
	u16 avail_flags, avail_idx, avail_ring[QSIZE];  /* 0x040 */
	u8 pad0[0x100 - 0x40 - 2 * (2 + QSIZE)];
	u16 used_flags, used_idx;                       /* 0x100 */
	struct { u32 id, len; } used_ring[QSIZE];
} __attribute__((aligned(4096)));

static struct bal_queue bal_q[2];                   /* inflateq, deflateq */
static u32 bal_pfns[BALLOON_BATCH];
static struct virtio_mmio_dev *bal_dev;
static u32 bal_pages;                               /* region pages now in the balloon */
static u32 bal_max;
static bool bal_first = true;

static inline u16 rd_u16(volatile u16 *p) { barrier(); u16 v = *p; barrier(); return v; }
static inline void wr_u16(volatile u16 *p, u16 v) { barrier(); *p = v; barrier(); }

static volatile u64 *page_word(u32 page) { return (volatile u64 *)(BALLOON_BASE + (u64)page * 4096); }

static bool bal_init(struct virtio_mmio_dev *d, u64 *features, const char **why)
{
	vm_write(d, VIRTIO_MMIO_STATUS, 0);
	vm_write(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
	vm_write(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
	vm_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	u64 offered = vm_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
	vm_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)vm_read(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	if (!(offered & F_VERSION_1)) {
		*why = "no-version-1";
		return false;
	}
	*features = offered & (F_VERSION_1 | F_DEFLATE_ON_OOM);
	vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)*features);
	vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(*features >> 32));
	vm_write(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(vm_read(d, VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK)) {
		*why = "features-refused";
		return false;
	}
	for (u32 i = 0; i < 2; i++) {
		struct bal_queue *q = &bal_q[i];
		vm_write(d, VIRTIO_MMIO_QUEUE_SEL, i);
		if (vm_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX) < QSIZE) {
			*why = "queue-too-small";
			return false;
		}
		memset(q, 0, sizeof(*q));
		q->avail_flags = AVAIL_F_NO_INTERRUPT;    /* this driver polls */
		vm_write(d, VIRTIO_MMIO_QUEUE_NUM, QSIZE);
		vm_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)q->desc);
		vm_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
		vm_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)&q->avail_flags);
		vm_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)((u64)&q->avail_flags >> 32));
		vm_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)&q->used_flags);
		vm_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)((u64)&q->used_flags >> 32));
		vm_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
	}
	vm_write(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	return true;
}

/* Gives the device `count` PFNs from bal_pfns on queue `index`; true once used (~2 s at most). */
static bool bal_send(u32 index, u32 count)
{
	struct bal_queue *q = &bal_q[index];
	u16 idx = rd_u16(&q->avail_idx);
	q->desc[0] = (struct vq_desc){ (u64)bal_pfns, count * 4, 0, 0 };
	q->avail_ring[idx % QSIZE] = 0;
	wr_u16(&q->avail_idx, (u16)(idx + 1));
	__asm__ __volatile__("mfence" ::: "memory");
	vm_write(bal_dev, VIRTIO_MMIO_QUEUE_NOTIFY, index);
	for (u32 n = 0; n < 10000; n++) {
		if (rd_u16(&q->used_idx) == (u16)(idx + 1))
			return true;
		delay_us(200);
	}
	return false;
}

/* num_pages, read consistently (§2.5.1: retry while ConfigGeneration moves). */
static u32 bal_target(void)
{
	u32 gen, value;
	do {
		gen = vm_read(bal_dev, VIRTIO_MMIO_CONFIG_GENERATION);
		value = vm_read(bal_dev, VIRTIO_MMIO_CONFIG);
	} while (gen != vm_read(bal_dev, VIRTIO_MMIO_CONFIG_GENERATION));
	return value;
}

/* Hold poller: follows num_pages after each configuration change. */
static void bal_poll(void)
{
	u32 status = vm_read(bal_dev, VIRTIO_MMIO_INTERRUPT_STATUS);
	if (!(status & INT_CONFIG_CHANGE) && !bal_first)
		return;
	if (status)
		vm_write(bal_dev, VIRTIO_MMIO_INTERRUPT_ACK, status);
	bal_first = false;
	u32 target = bal_target();
	u32 want = target < bal_max ? target : bal_max;
	u32 zeroed = 0;
	bool ok = true;
	while (ok && bal_pages < want) {
		u32 n = want - bal_pages < BALLOON_BATCH ? want - bal_pages : BALLOON_BATCH;
		for (u32 i = 0; i < n; i++)
			bal_pfns[i] = (u32)(BALLOON_BASE >> 12) + bal_pages + i;
		ok = bal_send(0, n);
		if (ok)
			bal_pages += n;
	}
	while (ok && bal_pages > want) {
		u32 n = bal_pages - want < BALLOON_BATCH ? bal_pages - want : BALLOON_BATCH;
		u32 first = bal_pages - n;
		for (u32 i = 0; i < n; i++)
			bal_pfns[i] = (u32)(BALLOON_BASE >> 12) + first + i;
		ok = bal_send(1, n);
		if (!ok)
			break;
		bal_pages = first;
		for (u32 i = 0; i < n; i++) {
			zeroed += *page_word(first + i) == 0;
			*page_word(first + i) = PAGE_MARK;
		}
	}
	vm_write(bal_dev, VIRTIO_MMIO_CONFIG + 4, bal_pages);   /* actual (§5.5.4) */
	kprintf("flotilla-guest: fact balloon pages=%u target=%u zeroed=%u%s\n", bal_pages, target, zeroed,
		ok ? "" : " error=unanswered");
}

bool virtio_balloon_probe(struct virtio_mmio_dev *d)
{
	const char *why = "";
	u64 features = 0;
	if (bal_dev) {
		kprintf("flotilla-guest: fact device virtio-balloon base=0x%lx irq=%u driver=none\n", d->base, d->irq);
		return true;
	}
	bal_dev = d;
	if (!bal_init(d, &features, &why)) {
		check("virtio-balloon", false, "base=0x%lx reason=%s", d->base, why);
		return false;
	}
	/* The region must be RAM that holds neither this program nor the initrd. */
	u64 end = BALLOON_BASE + (u64)BALLOON_MAX * 4096;
	bool clear = e820_is_ram(BALLOON_BASE, end - BALLOON_BASE) && (u64)__kernel_end <= BALLOON_BASE &&
		(!bootinfo.initrd_size || bootinfo.initrd_addr >= end ||
		 bootinfo.initrd_addr + bootinfo.initrd_size <= BALLOON_BASE);
	bal_max = clear ? BALLOON_MAX : 0;
	for (u32 i = 0; i < bal_max; i++)
		*page_word(i) = PAGE_MARK;
	kprintf("flotilla-guest: fact device virtio-balloon base=0x%lx irq=%u max_pages=%u deflate_on_oom=%u\n", d->base,
		d->irq, bal_max, (features & F_DEFLATE_ON_OOM) ? 1 : 0);
	check("virtio-balloon", clear, "region=0x%lx+%u pages", BALLOON_BASE, BALLOON_MAX);
	virtio_hold_register(bal_poll);
	return clear;
}
