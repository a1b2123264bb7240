/*
 * Real-mode trampoline for application processors.  The BSP copies the bytes
 * between trampoline_start and trampoline_end to a free 4 KiB page below 1 MiB
 * and sends that page number as the SIPI vector, so this runs with CS = page >> 4
 * and IP = 0.  It only loads our GDT (whose address is absolute) and enters
 * flat 32-bit protected mode at ap_startup32; paging comes on in long mode.
 */
#include "layout.h"

	.section .trampoline, "a"
	.code16
	.globl	trampoline_start, trampoline_end
trampoline_start:
	cli
	cld
	movw	%cs, %ax
	movw	%ax, %ds
	lgdtl	(tramp_gdtr - trampoline_start)
	movl	$(CR0_ET | CR0_PE), %eax
	movl	%eax, %cr0
	ljmpl	$GDT_CS32, $ap_startup32
	.p2align 2
tramp_gdtr:
	.word	GDT_ENTRIES * 8 - 1
	.long	gdt
trampoline_end:
