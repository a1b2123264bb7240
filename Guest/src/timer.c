/* Flotilla test guest: delays measured on PIT channel 2 (8254 datasheet: counter latch
 * command, mode 2 rate generator), gated through port 0x61 bit 0. */
#include "guest.h"

#define PIT_HZ 1193182u

/* Latches channel 2 (control word 0x80: channel 2, counter latch) and reads its count. */
static u16 pit_read_count2(void)
{
	outb(0x43, 0x80);
	u8 lo = inb(0x42);
	u8 hi = inb(0x42);
	return (u16)(lo | (u16)hi << 8);
}

/*
 * Waits at least `us` microseconds of PIT time. Channel 2 runs free in mode 2 from 0xffff and
 * the elapsed ticks are summed from successive read-backs; each read-back costs a few port
 * exits (tens of microseconds here), far less than the counter's 55 ms period, so a
 * difference never hides a whole wrap. Polling OUT2 (port 0x61 bit 5) instead ended mode-0
 * waits early on this host's KVM. Bounded: without a PIT the count never moves and the wait
 * ends after a fixed number of reads.
 */
void delay_us(u32 us)
{
	u64 ticks = ((u64)us * PIT_HZ + 999999) / 1000000;
	u8 v = inb(0x61);
	outb(0x61, (v & ~0x02) | 0x01);       /* gate on, speaker off */
	outb(0x43, 0xb4);                     /* channel 2, lo/hi byte, mode 2, binary */
	outb(0x42, 0xff);
	outb(0x42, 0xff);
	u16 last = pit_read_count2();
	u64 elapsed = 0;
	u64 reads = 0;
	u64 max_reads = ticks + 100000;
	while (elapsed < ticks && reads++ < max_reads) {
		u16 now = pit_read_count2();
		/* Counting down; in mode 2 the count runs 0xffff .. 1 and reloads. */
		u16 step = now <= last ? (u16)(last - now) : (u16)(last + (0xffff - now));
		elapsed += step;
		last = now;
	}
}
