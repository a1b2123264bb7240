/* Flotilla test guest: delays from PIT channel 2 (gate and OUT2 through port 0x61). */
#include "guest.h"

#define PIT_HZ 1193182u

static void pit_wait_ticks(u32 ticks)
{
	u8 v = inb(0x61);
	outb(0x61, (v & ~0x02) | 0x01);       /* gate on, speaker off */
	outb(0x43, 0xb0);                     /* channel 2, lo/hi byte, mode 0, binary */
	outb(0x42, ticks & 0xff);
	outb(0x42, (ticks >> 8) & 0xff);
	/* Bounded: without a PIT this still ends. */
	for (u32 n = 0; n < 200000 && !(inb(0x61) & 0x20); n++)
		;
}

void delay_us(u32 us)
{
	u64 ticks = ((u64)us * PIT_HZ + 999999) / 1000000;
	while (ticks) {
		u32 t = ticks > 0xffff ? 0xffff : (u32)ticks;
		if (t < 2)
			t = 2;
		pit_wait_ticks(t);
		ticks = ticks > t ? ticks - t : 0;
	}
}
