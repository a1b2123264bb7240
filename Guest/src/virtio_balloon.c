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

#define F_DEFLATE_ON_OOM   (1UL << 2)

#define INT_CONFIG_CHANGE    2

#define BALLOON_BASE  0x4000000UL     /* 64 MiB */
#define BALLOON_MAX   4096            /* pages of 4 KiB: 16 MiB */
#define BALLOON_BATCH 256             /* PFNs per request */
#define PAGE_MARK     0x62616c6c6f6f6e21UL

static struct vq_small bal_q[2];                   /* inflateq, deflateq */
static u32 bal_pfns[BALLOON_BATCH];
static struct virtio_mmio_dev *bal_dev;
static u32 bal_pages;                               /* region pages now in the balloon */
static u32 bal_max;
static bool bal_first = true;

static volatile u64 *page_word(u32 page) { return (volatile u64 *)(BALLOON_BASE + (u64)page * 4096); }

static bool bal_init(struct virtio_mmio_dev *d, u64 *features, const char **why)
{
	if (!virtio_negotiate(d, VIRTIO_F_VERSION_1 | F_DEFLATE_ON_OOM, features, why) ||
	    !vq_small_setup(d, 0, &bal_q[0], why) || !vq_small_setup(d, 1, &bal_q[1], why))
		return false;
	virtio_driver_ok(d);
	return true;
}

/* Gives the device `count` PFNs from bal_pfns on queue `index`; true once used (~2 s at most). */
static bool bal_send(u32 index, u32 count)
{
	return vq_small_send(bal_dev, index, &bal_q[index], bal_pfns, count * 4, 0, 10000) >= 0;
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
