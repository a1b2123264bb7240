/* Flotilla test guest: Intel MP specification 1.4 floating pointer and configuration table. */
#include "guest.h"

struct mp_info mp;

static u8 checksum(const u8 *p, size_t n)
{
	u8 s = 0;
	while (n--)
		s = (u8)(s + *p++);
	return s;
}

static u64 scan(u64 base, u64 len)
{
	for (u64 a = base; a + 16 <= base + len; a += 16) {
		const u8 *p = (const u8 *)a;
		if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_')
			return a;
	}
	return 0;
}

/*
 * Where the spec says to look: the first KiB of the EBDA (segment in the BDA at
 * 0x40e), the last KiB of base memory (KiB count in the BDA at 0x413, 640 KiB
 * when the BDA is empty, as it is under loaders that skip the BIOS), then the
 * BIOS ROM 0xf0000-0xfffff.
 */
static u64 find_floating_pointer(void)
{
	u64 ebda = (u64)(*(volatile u16 *)0x40e) << 4;
	u64 basemem = (u64)(*(volatile u16 *)0x413) * 1024;
	u64 fp = 0;
	if (ebda >= 0x80000 && ebda < 0xa0000)
		fp = scan(ebda, 1024);
	if (!fp && basemem >= 0x80000 && basemem <= 0xa0000)
		fp = scan(basemem - 1024, 1024);
	if (!fp)
		fp = scan(0x9fc00, 1024);
	if (!fp)
		fp = scan(0xf0000, 0x10000);
	return fp;
}

void mptable_scan(void)
{
	memset(&mp, 0, sizeof(mp));
	mp.lapic_addr = LAPIC_DEFAULT;
	mp.ioapic_addr = IOAPIC_DEFAULT;
	mp.ids_unique = true;
	u64 fp = find_floating_pointer();
	if (!fp)
		return;
	const u8 *f = (const u8 *)fp;
	mp.found = true;
	mp.fp_addr = fp;
	u32 flen = f[8] ? f[8] * 16u : 16u;
	mp.fp_checksum_ok = checksum(f, flen) == 0;
	mp.cfg_addr = rd32(f, 4);
	if (!mp.cfg_addr || f[11] != 0)
		return;                 /* default configurations (feature byte 1) are not used by VMMs */

	const u8 *c = (const u8 *)mp.cfg_addr;
	if (memcmp(c, "PCMP", 4) != 0)
		return;
	u32 base_len = rd16(c, 4);
	u32 ext_len = rd16(c, 40);
	mp.cfg_len = base_len + ext_len;
	mp.cfg_checksum_ok = base_len >= 44 && checksum(c, base_len) == 0;
	mp.ext_checksum_ok = ext_len == 0 || (u8)(checksum(c + base_len, ext_len) + c[42]) == 0;
	if (rd32(c, 36))
		mp.lapic_addr = rd32(c, 36);
	if (!mp.cfg_checksum_ok)
		return;

	u32 count = rd16(c, 34);
	u32 off = 44;
	bool seen[MAX_CPUS];
	memset(seen, 0, sizeof(seen));
	bool have_ioapic = false;
	for (u32 i = 0; i < count && off < base_len; i++) {
		const u8 *e = c + off;
		switch (e[0]) {
		case 0:                 /* processor */
			if (off + 20 > base_len)
				return;
			if (e[3] & 1) {
				if (mp.ncpus < MAX_CPUS) {
					if (seen[e[1]])
						mp.ids_unique = false;
					seen[e[1]] = true;
					mp.apic_id[mp.ncpus] = e[1];
					mp.is_bsp[mp.ncpus] = (e[3] & 2) != 0;
					mp.ncpus++;
				}
				if (e[3] & 2)
					mp.nbsp++;
			}
			off += 20;
			break;
		case 2:                 /* I/O APIC */
			if ((e[3] & 1) && !have_ioapic) {
				mp.ioapic_addr = rd32(e, 4);
				have_ioapic = true;
			}
			off += 8;
			break;
		default:                /* bus, I/O interrupt, local interrupt: 8 bytes */
			off += 8;
			break;
		}
	}
}
