/*
 * Flotilla test guest: copies of the zero page and command line, taken
 * before anything else touches low memory, and the e820 map decoded from them.
 */
#include "guest.h"

u8 boot_params[4096] __attribute__((aligned(16)));
char boot_cmdline[CMDLINE_MAX + 1];
struct bootinfo bootinfo;

void bootinfo_copy(u64 bp_phys, u32 entry_bits)
{
	struct bootinfo *bi = &bootinfo;
	bi->bp_phys = bp_phys;
	bi->entry_bits = entry_bits;
	if (bp_phys && bp_phys + sizeof(boot_params) <= 0x100000000UL)
		memcpy(boot_params, (const void *)bp_phys, sizeof(boot_params));

	bi->cmdline_phys = rd32(boot_params, BP_CMD_LINE_PTR) |
			   (u64)rd32(boot_params, BP_EXT_CMD_LINE_PTR) << 32;
	bi->cmdline_len = 0;
	bi->cmdline_terminated = true;
	if (bi->cmdline_phys && bi->cmdline_phys < 0x100000000UL) {
		const char *src = (const char *)bi->cmdline_phys;
		size_t n = 0;
		while (n < CMDLINE_MAX && bi->cmdline_phys + n < 0x100000000UL && src[n]) {
			boot_cmdline[n] = src[n];
			n++;
		}
		bi->cmdline_len = n;
		bi->cmdline_terminated = n < CMDLINE_MAX && bi->cmdline_phys + n < 0x100000000UL;
	}
	boot_cmdline[bi->cmdline_len] = 0;

	u32 count = rd8(boot_params, BP_E820_ENTRIES);
	bi->e820_count = count > E820_MAX_ENTRIES ? E820_MAX_ENTRIES : count;
	for (u32 i = 0; i < bi->e820_count; i++) {
		size_t off = BP_E820_TABLE + 20 * i;
		bi->e820[i].addr = rd64(boot_params, off);
		bi->e820[i].size = rd64(boot_params, off + 8);
		bi->e820[i].type = rd32(boot_params, off + 16);
	}

	bi->initrd_addr = rd32(boot_params, BP_RAMDISK_IMAGE) |
			  (u64)rd32(boot_params, BP_EXT_RAMDISK_IMAGE) << 32;
	bi->initrd_size = rd32(boot_params, BP_RAMDISK_SIZE) |
			  (u64)rd32(boot_params, BP_EXT_RAMDISK_SIZE) << 32;
}

bool e820_is_ram(u64 addr, u64 len)
{
	u64 end = addr + len;
	if (end < addr)
		return false;
	/* Walk forward: adjacent RAM entries count as one range. */
	for (;;) {
		if (addr >= end)
			return true;
		bool advanced = false;
		for (u32 i = 0; i < bootinfo.e820_count; i++) {
			const struct e820_entry *e = &bootinfo.e820[i];
			if (e->type == E820_RAM && e->addr <= addr && addr < e->addr + e->size) {
				addr = e->addr + e->size;
				advanced = true;
				break;
			}
		}
		if (!advanced)
			return false;
	}
}
