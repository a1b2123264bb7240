/* Flotilla test guest: IDT; exceptions are reported on the console and halt the CPU. */
#include "guest.h"

struct trap_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error, rip, cs, rflags, rsp, ss;
};

extern char isr_stubs[];
static u64 idt[256 * 2] __attribute__((aligned(16)));
static volatile u32 unexpected_interrupts;
void lapic_eoi(void);

/* Interrupts per vector, and optional handlers (virtio devices install theirs). */
volatile u32 irq_counts[256];
void (*irq_handlers[256])(u32 vector);

void idt_init(void)
{
	for (u32 v = 0; v < 256; v++) {
		u64 h = (u64)isr_stubs + 16 * v;
		/* 64-bit interrupt gate, present, DPL 0, selector GDT_CS64, IST 0. */
		idt[2 * v] = (h & 0xffff) | ((u64)GDT_CS64 << 16) | (0x8eUL << 40) | ((h >> 16) & 0xffff) << 48;
		idt[2 * v + 1] = h >> 32;
	}
	idt_load();
}

void idt_load(void)
{
	struct __attribute__((packed)) { u16 limit; u64 base; } d = { sizeof(idt) - 1, (u64)idt };
	__asm__ __volatile__("lidt %0" :: "m"(d));
}

void trap_handler(struct trap_frame *f)
{
	if (f->vector >= 32) {
		irq_counts[f->vector]++;
		if (irq_handlers[f->vector])
			irq_handlers[f->vector](f->vector);
		else
			unexpected_interrupts++;     /* a stray: count and acknowledge it */
		if (f->vector != 0xff)
			lapic_eoi();
		return;
	}
	kprintf("flotilla-guest: check exception fail vector=%lu error=0x%lx rip=0x%lx cr2=0x%lx rsp=0x%lx apic=%u\n",
		f->vector, f->error, f->rip, read_cr2(), f->rsp, lapic_id());
	halt_forever();
}
