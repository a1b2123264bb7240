/*
 * Flotilla test guest: checks what Linux relies on at boot and reports it on
 * the serial port, one "flotilla-guest: ..." line per fact or check.
 */
#include "guest.h"
#include "virtio.h"

/* The LAPIC timer vector that wakes the hold loop to run its pollers. */
#define HOLD_TIMER_VECTOR 0xee

struct options {
	bool hold;
	bool tick;
	u64 nonce;
	bool have_nonce;
};
static struct options opts;
const char *opt_nonce;
size_t opt_nonce_len;
u64 opt_blkloop;

static bool parse_bool(const char *v, size_t n)
{
	if (!v || !n)
		return true;        /* a bare "flag" means on, as Linux's param_set_bool does */
	return v[0] == '1' || v[0] == 'y' || v[0] == 'Y' || (n >= 2 && (v[1] == 'n' || v[1] == 'N'));
}

static void option_param(const char *key, size_t keylen, const char *val, size_t vallen, void *ctx)
{
	struct options *o = ctx;
	if (param_is(key, keylen, "flotilla.hold")) {
		o->hold = parse_bool(val, vallen);
	} else if (param_is(key, keylen, "flotilla.tick")) {
		o->tick = parse_bool(val, vallen);
	} else if (param_is(key, keylen, "flotilla.blkloop") && val) {
		u64 n;
		size_t used;
		if (parse_uint(val, vallen, &n, &used))
			opt_blkloop = n;
	} else if (param_is(key, keylen, "flotilla.nonce") && val) {
		/* The virtio-blk driver writes it to every writable disk's last sector. */
		opt_nonce = val;
		opt_nonce_len = vallen;
		u64 v = 0;
		size_t i = 0;
		if (vallen > 2 && val[0] == '0' && (val[1] == 'x' || val[1] == 'X'))
			i = 2;
		for (; i < vallen && i < 18; i++) {
			char c = val[i];
			u32 d = c >= '0' && c <= '9' ? (u32)(c - '0') : c >= 'a' && c <= 'f' ? (u32)(c - 'a' + 10) :
				c >= 'A' && c <= 'F' ? (u32)(c - 'A' + 10) : 16;
			if (d == 16)
				break;
			v = v << 4 | d;
		}
		o->nonce = v;
		o->have_nonce = true;
	}
}

static void report_boot_protocol(void)
{
	u16 ver = rd16(boot_params, BP_VERSION);
	kprintf("flotilla-guest: fact boot protocol=%u.%u entry=%u\n", ver >> 8, ver & 0xff, bootinfo.entry_bits);
	bool flag = rd16(boot_params, BP_BOOT_FLAG) == 0xaa55;
	bool magic = memcmp(boot_params + BP_HEADER, "HdrS", 4) == 0;
	check("boot-params", flag && magic && ver >= 0x020c,
	      "boot_flag=0x%x header=%s version=0x%x zero_page=0x%lx",
	      rd16(boot_params, BP_BOOT_FLAG), magic ? "HdrS" : "missing", ver, bootinfo.bp_phys);
}

static void report_cmdline(void)
{
	const struct bootinfo *bi = &bootinfo;
	u32 crc = crc32(0, boot_cmdline, bi->cmdline_len);
	kprintf("flotilla-guest: fact cmdline crc32=%08x text=%s\n", crc, boot_cmdline);
	u32 limit = rd32(boot_params, BP_CMDLINE_SIZE);
	if (!limit)
		limit = DEFAULT_CMDLINE_SIZE;
	bool ok = bi->cmdline_phys && bi->cmdline_terminated && bi->cmdline_len <= limit;
	check("cmdline", ok, "ptr=0x%lx len=%lu cmdline_size=%u%s", bi->cmdline_phys, bi->cmdline_len, limit,
	      !bi->cmdline_phys ? " missing" : !bi->cmdline_terminated ? " unterminated" : "");
}

static void report_e820(void)
{
	const struct bootinfo *bi = &bootinfo;
	u64 ram = 0;
	bool sorted = true;
	for (u32 i = 0; i < bi->e820_count; i++) {
		const struct e820_entry *e = &bi->e820[i];
		if (e->type == E820_RAM)
			ram += e->size;
		if (e->addr + e->size < e->addr)
			sorted = false;
		if (i && e->addr < bi->e820[i - 1].addr + bi->e820[i - 1].size)
			sorted = false;
	}
	kprintf("flotilla-guest: fact memory e820_ram_bytes=%lu\n", ram);
	u64 kstart = (u64)__kernel_start, kend = (u64)__kernel_end;
	bool kernel_ok = e820_is_ram(kstart, kend - kstart);
	bool bp_ok = e820_is_ram(bi->bp_phys, 4096);
	bool cmd_ok = !bi->cmdline_phys || e820_is_ram(bi->cmdline_phys, bi->cmdline_len + 1);
	u32 raw = rd8(boot_params, BP_E820_ENTRIES);
	bool ok = raw > 0 && raw <= E820_MAX_ENTRIES && ram > 0 && sorted && kernel_ok && bp_ok && cmd_ok;
	check("e820", ok, "entries=%u sorted=%s kernel=0x%lx-0x%lx:%s zero_page:%s cmdline:%s",
	      raw, sorted ? "yes" : "no", kstart, kend, kernel_ok ? "ram" : "NOT-RAM",
	      bp_ok ? "ram" : "NOT-RAM", cmd_ok ? "ram" : "NOT-RAM");
}

static void report_initrd(void)
{
	const struct bootinfo *bi = &bootinfo;
	if (!bi->initrd_size)
		return;
	u64 start = bi->initrd_addr, end = start + bi->initrd_size;
	bool mapped = end > start && end <= 0x100000000UL;
	u32 crc = mapped ? crc32(0, (const void *)start, bi->initrd_size) : 0;
	if (mapped)
		kprintf("flotilla-guest: fact initrd size=%lu crc32=%08x\n", bi->initrd_size, crc);
	else
		kprintf("flotilla-guest: fact initrd size=%lu crc32=unmapped\n", bi->initrd_size);
	bool in_ram = e820_is_ram(start, bi->initrd_size);
	bool below_max = end - 1 <= HDR_INITRD_ADDR_MAX;
	u64 kstart = (u64)__kernel_start, kend = (u64)__kernel_end;
	bool clear_of_kernel = end <= kstart || start >= kend;
	check("initrd", mapped && in_ram && below_max && clear_of_kernel,
	      "addr=0x%lx size=%lu ram=%s below_initrd_addr_max=%s clear_of_kernel=%s",
	      start, bi->initrd_size, in_ram ? "yes" : "no", below_max ? "yes" : "no",
	      clear_of_kernel ? "yes" : "no");
}

static void report_mptable(void)
{
	u32 self = lapic_id();
	bool bsp_match = false;
	for (u32 i = 0; i < mp.ncpus; i++)
		if (mp.is_bsp[i] && mp.apic_id[i] == self)
			bsp_match = true;
	bool ok = mp.found && mp.fp_checksum_ok && mp.cfg_checksum_ok && mp.ext_checksum_ok &&
		  mp.nbsp == 1 && bsp_match && mp.ids_unique && mp.ncpus > 0;
	if (!mp.found)
		check("mptable", false, "no _MP_ floating pointer found");
	else
		check("mptable", ok, "fp=0x%lx table=0x%lx cpus=%u bsp=%u/%s fp_checksum=%s table_checksum=%s ids_unique=%s",
		      mp.fp_addr, mp.cfg_addr, mp.ncpus, mp.nbsp, bsp_match ? "self" : "not-self",
		      mp.fp_checksum_ok ? "ok" : "bad", mp.cfg_checksum_ok && mp.ext_checksum_ok ? "ok" : "bad",
		      mp.ids_unique ? "yes" : "no");
}

/* reboot=k: pulse the reset line through the keyboard controller, like Linux. */
static __attribute__((noreturn)) void machine_reset(void)
{
	for (int attempt = 0; attempt < 10; attempt++) {
		for (u32 n = 0; n < 0x10000 && (inb(0x64) & 0x02); n++)
			;
		outb(0x64, 0xfe);
		delay_us(50000);
	}
	/* Still here: triple fault with an empty IDT. */
	struct __attribute__((packed)) { u16 limit; u64 base; } empty = { 0, 0 };
	__asm__ __volatile__("lidt %0; ud2" :: "m"(empty));
	halt_forever();
}

/* flotilla.tick=1: stay busy, printing a numbered line every 50 ms of PIT time, so that a
 * test can see the vCPU run, stop (QMP stop) and run again (cont). */
static __attribute__((noreturn)) void tick_forever(void)
{
	kprintf("flotilla-guest: ticking\n");
	for (u64 n = 0;; n++) {
		delay_us(50000);
		kprintf("flotilla-guest: tick %lu\n", n);
	}
}

static __attribute__((noreturn)) void hold(void)
{
	if (opts.tick)
		tick_forever();
	kprintf("flotilla-guest: holding\n");
	interrupts_mask_all();
	for (;;) {
		/* Drivers that keep working while held (virtio.h) poll between LAPIC-timer naps. */
		if (virtio_hold_poll())
			lapic_oneshot(HOLD_TIMER_VECTOR, HOLD_POLL_US);
		__asm__ __volatile__("sti; hlt; cli" ::: "memory");
	}
}

void boot_main(u64 bp_phys, u32 entry_bits)
{
	idt_init();
	bootinfo_copy(bp_phys, entry_bits);     /* before low memory is used for anything */
	serial_init();

	parse_params(boot_cmdline, option_param, &opts);
	report_boot_protocol();
	report_cmdline();
	report_e820();
	report_initrd();

	mptable_scan();
	interrupts_mask_all();
	report_mptable();
	smp_boot();

	virtio_probe_all(boot_cmdline);

	kprintf("flotilla-guest: done pass=%u fail=%u\n", checks_passed, checks_failed);
	if (opts.hold)
		hold();
	machine_reset();
}
