/*
 * Flotilla test guest: local APIC, interrupt masking and application processor
 * bring-up by INIT-SIPI-SIPI, the way Linux does it from the MP table.
 */
#include "guest.h"

#define LAPIC_ID       0x020
#define LAPIC_EOI      0x0b0
#define LAPIC_SVR      0x0f0
#define LAPIC_ICR_LO   0x300
#define LAPIC_ICR_HI   0x310
#define ICR_BUSY       (1u << 12)
#define ICR_INIT       0x00000500u
#define ICR_STARTUP    0x00000600u
#define ICR_ASSERT     0x00004000u
#define ICR_LEVEL      0x00008000u

extern char trampoline_start[], trampoline_end[];

/* Written by the APs. */
static volatile u32 aps_online;
static volatile u32 ap_reported_id[MAX_CPUS];

static u64 lapic_base(void) { return mp.lapic_addr ? mp.lapic_addr : LAPIC_DEFAULT; }
static u32 lapic_read(u32 reg) { return mmio_read32(lapic_base() + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(lapic_base() + reg, v); }

u32 lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }

static void ioapic_write(u64 base, u32 reg, u32 v)
{
	mmio_write32(base, reg);
	mmio_write32(base + 0x10, v);
}

static u32 ioapic_read(u64 base, u32 reg)
{
	mmio_write32(base, reg);
	return mmio_read32(base + 0x10);
}

/* Remap the 8259s out of the exception range and mask every PIC and IOAPIC line. */
void interrupts_mask_all(void)
{
	outb(0x20, 0x11); outb(0xa0, 0x11);     /* ICW1: edge, cascade, ICW4 */
	outb(0x21, 0x20); outb(0xa1, 0x28);     /* ICW2: vectors 0x20 and 0x28 */
	outb(0x21, 0x04); outb(0xa1, 0x02);     /* ICW3: slave on IRQ2 */
	outb(0x21, 0x01); outb(0xa1, 0x01);     /* ICW4: 8086 mode */
	outb(0x21, 0xff); outb(0xa1, 0xff);     /* OCW1: mask all */

	u64 io = mp.ioapic_addr ? mp.ioapic_addr : IOAPIC_DEFAULT;
	u32 ver = ioapic_read(io, 1);
	u32 pins = ver == 0xffffffffu ? 0 : ((ver >> 16) & 0xff) + 1;
	for (u32 pin = 0; pin < pins; pin++) {
		ioapic_write(io, 0x10 + 2 * pin, 0x00010000u | (0x30 + pin));   /* masked */
		ioapic_write(io, 0x11 + 2 * pin, 0);
	}
}

void ioapic_route(u32 pin, u32 vector)
{
	u64 io = mp.ioapic_addr ? mp.ioapic_addr : IOAPIC_DEFAULT;
	ioapic_write(io, 0x11 + 2 * pin, lapic_id() << 24);
	ioapic_write(io, 0x10 + 2 * pin, vector);          /* fixed, physical, edge, high, unmasked */
}

#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_ICR 0x380
#define LAPIC_TIMER_DCR 0x3e0

void lapic_oneshot(u32 vector, u32 us)
{
	/* KVM's APIC timer counts at 1 GHz; divide by 16: 62.5 counts per microsecond. */
	lapic_write(LAPIC_TIMER_DCR, 0x3);
	lapic_write(LAPIC_LVT_TIMER, vector);
	u64 count = (u64)us * 125 / 2;
	lapic_write(LAPIC_TIMER_ICR, count > 0xffffffffu ? 0xffffffffu : (u32)count);
}

static bool icr_wait_idle(void)
{
	for (u32 n = 0; n < 100000; n++) {
		if (!(lapic_read(LAPIC_ICR_LO) & ICR_BUSY))
			return true;
		cpu_relax();
	}
	return false;
}

static void send_ipi(u32 apic, u32 low)
{
	lapic_write(LAPIC_ICR_HI, apic << 24);
	lapic_write(LAPIC_ICR_LO, low);
	icr_wait_idle();
}

static bool overlaps(u64 a, u64 alen, u64 b, u64 blen)
{
	return alen && blen && a < b + blen && b < a + alen;
}

/*
 * A 4 KiB page for the real-mode trampoline: RAM per e820, below 0x9f000,
 * and clear of everything still in use (zero page, command line, MP tables,
 * initrd, the BIOS data area in page 0).
 */
static u64 pick_trampoline_page(void)
{
	const struct bootinfo *bi = &bootinfo;
	for (u64 page = 0x1000; page + 0x1000 <= 0x9f000; page += 0x1000) {
		if (!e820_is_ram(page, 0x1000))
			continue;
		if (overlaps(page, 0x1000, bi->bp_phys, 4096) ||
		    overlaps(page, 0x1000, bi->cmdline_phys, bi->cmdline_len + 1) ||
		    overlaps(page, 0x1000, mp.fp_addr, 16) ||
		    overlaps(page, 0x1000, mp.cfg_addr, mp.cfg_len ? mp.cfg_len : 1) ||
		    overlaps(page, 0x1000, bi->initrd_addr, bi->initrd_size))
			continue;
		return page;
	}
	return 0;
}

/* Called on each AP in long mode with its own stack; never returns. */
void ap_main(u32 slot)
{
	idt_load();
	ap_reported_id[slot] = lapic_id();
	atomic_add_return(&aps_online, 1);
	halt_forever();
}

void smp_boot(void)
{
	u32 self = lapic_id();
	u32 listed = 0, started = 0, wrong_id = 0;
	char failed[256];
	size_t flen = 0;
	failed[0] = 0;

	/* Software-enable the local APIC, spurious vector 0xff. */
	lapic_write(LAPIC_SVR, 0x1ff);

	u64 page = 0;
	for (u32 i = 0; i < mp.ncpus; i++)
		if (mp.apic_id[i] != self)
			listed++;
	if (listed) {
		page = pick_trampoline_page();
		if (page) {
			size_t len = (size_t)(trampoline_end - trampoline_start);
			memcpy((void *)page, trampoline_start, len);
		}
	}

	for (u32 i = 0; page && i < mp.ncpus; i++) {
		u32 id = mp.apic_id[i];
		if (id == self)
			continue;
		u32 before = atomic_read(&aps_online);
		send_ipi(id, ICR_INIT | ICR_ASSERT | ICR_LEVEL);
		delay_us(10000);
		send_ipi(id, ICR_INIT | ICR_LEVEL);     /* de-assert */
		for (int k = 0; k < 2; k++) {
			send_ipi(id, ICR_STARTUP | (u32)(page >> 12));
			delay_us(200);
		}
		/* Bounded wait: up to about 2 s per AP. */
		for (u32 t = 0; t < 400 && atomic_read(&aps_online) == before; t++)
			delay_us(5000);
		if (atomic_read(&aps_online) == before) {
			if (flen < sizeof(failed) - 8)
				flen += (size_t)ksnprintf(failed + flen, sizeof(failed) - flen, "%s%u", flen ? "," : "", id);
			continue;
		}
		started++;
		/* APs are started one at a time, so slot = number started before this one. */
		if (ap_reported_id[before] != id)
			wrong_id++;
	}

	u32 online = 1 + atomic_read(&aps_online);
	kprintf("flotilla-guest: fact cpus online=%u\n", online);
	if (listed && !page)
		check("aps", false, "listed=%u no free trampoline page below 0x9f000", listed);
	else
		check("aps", started == listed && wrong_id == 0,
		      "listed=%u started=%u wrong_id=%u trampoline=0x%lx%s%s", listed, started, wrong_id,
		      page, flen ? " missing=" : "", failed);
}
