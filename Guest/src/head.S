/*
 * Flotilla test guest: entry points.
 *
 * 0x100000 (code32_start)  startup_32: flat 32-bit protected mode, paging off, ESI = boot_params
 * 0x100200                 startup_64: long mode, identity paging, RSI = boot_params
 *
 * Both paths load our own GDT, zero .bss, build identity page tables for
 * 0-4 GiB out of 2 MiB pages and call boot_main(boot_params, entry_bits).
 * ap_startup32 is where the real-mode trampoline of an application processor
 * lands after it enabled protected mode.
 */
#include "layout.h"

/* Switch a 32-bit CPU (paging off) into long mode with our page tables. */
.macro ENABLE_LONG_MODE
	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	movl	$(CR0_PG | CR0_ET | CR0_PE), %eax
	movl	%eax, %cr0
.endm

	.section .head32, "ax"
	.code32
	.globl	startup_32
startup_32:
	cli
	cld
	lgdt	gdt_desc
	ljmp	$GDT_CS32, $1f
1:	movl	$GDT_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movl	%esi, %ebp			/* boot_params survives in EBP */

	/* Zero .bss (a plain loop: no long rep stos here). */
	movl	$__bss_start, %edi
	movl	$__bss_end, %ecx
	xorl	%eax, %eax
2:	cmpl	%ecx, %edi
	jae	3f
	movl	%eax, (%edi)
	addl	$4, %edi
	jmp	2b
3:
	/* PML4[0] -> PDPT, PDPT[0..3] -> four page directories. */
	movl	$(pdpt + PT_PRESENT_RW), %eax
	movl	%eax, pml4
	movl	$(pd + PT_PRESENT_RW), %eax
	movl	%eax, pdpt
	addl	$0x1000, %eax
	movl	%eax, pdpt + 8
	addl	$0x1000, %eax
	movl	%eax, pdpt + 16
	addl	$0x1000, %eax
	movl	%eax, pdpt + 24
	/* 2048 PDEs of 2 MiB, identity; the top GiB (MMIO hole) uncached. */
	xorl	%ecx, %ecx
4:	movl	%ecx, %eax
	shll	$21, %eax
	orl	$PDE_LARGE, %eax
	cmpl	$1536, %ecx
	jb	5f
	orl	$PDE_UNCACHED, %eax
5:	movl	%eax, pd(, %ecx, 8)
	incl	%ecx
	cmpl	$2048, %ecx
	jb	4b

	ENABLE_LONG_MODE
	ljmp	$GDT_CS64, $startup_64_from32

/* Application processors arrive here from the trampoline (CS = GDT_CS32). */
	.globl	ap_startup32
ap_startup32:
	movl	$GDT_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	ENABLE_LONG_MODE
	ljmp	$GDT_CS64, $ap_startup64

	.section .head64, "ax"
	.code64
	.globl	startup_64
startup_64:
	cli
	cld
	movq	%rsi, %r15			/* boot_params */
	leaq	boot_stack_top(%rip), %rsp
	lgdt	gdt_desc(%rip)
	movl	$GDT_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	pushq	$GDT_CS64
	leaq	1f(%rip), %rax
	pushq	%rax
	lretq
1:
	/* Zero .bss. */
	leaq	__bss_start(%rip), %rdi
	leaq	__bss_end(%rip), %rcx
	xorl	%eax, %eax
2:	cmpq	%rcx, %rdi
	jae	3f
	movq	%rax, (%rdi)
	addq	$8, %rdi
	jmp	2b
3:
	leaq	pml4(%rip), %rdi
	leaq	pdpt(%rip), %rsi
	leaq	pd(%rip), %rdx
	leaq	PT_PRESENT_RW(%rsi), %rax
	movq	%rax, (%rdi)
	leaq	PT_PRESENT_RW(%rdx), %rax
	movq	%rax, (%rsi)
	addq	$0x1000, %rax
	movq	%rax, 8(%rsi)
	addq	$0x1000, %rax
	movq	%rax, 16(%rsi)
	addq	$0x1000, %rax
	movq	%rax, 24(%rsi)
	xorl	%ecx, %ecx
4:	movq	%rcx, %rax
	shlq	$21, %rax
	orq	$PDE_LARGE, %rax
	cmpl	$1536, %ecx
	jb	5f
	orq	$PDE_UNCACHED, %rax
5:	movq	%rax, (%rdx, %rcx, 8)
	incl	%ecx
	cmpl	$2048, %ecx
	jb	4b
	movq	%rdi, %cr3
	movl	$64, %r14d
	jmp	startup_64_common

startup_64_from32:
	movl	%ebp, %r15d			/* zero-extends: upper halves are undefined */
	movl	$32, %r14d
	/* fall through */

startup_64_common:
	movl	$GDT_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	leaq	boot_stack_top(%rip), %rsp
	xorl	%ebp, %ebp
	movq	%r15, %rdi
	movl	%r14d, %esi
	call	boot_main
6:	cli
	hlt
	jmp	6b

	.text
ap_startup64:
	movl	$GDT_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movl	$1, %eax
	lock xaddl %eax, ap_ticket(%rip)	/* our slot: 0, 1, 2, ... */
	cmpl	$MAX_CPUS, %eax
	jae	2f
	movl	%eax, %edi
	leal	1(%rax), %eax
	shlq	$AP_STACK_SHIFT, %rax
	leaq	ap_stacks(%rip), %rsp
	addq	%rax, %rsp
	xorl	%ebp, %ebp
	call	ap_main
2:	cli
	hlt
	jmp	2b

/*
 * Interrupt and exception stubs: 256 of them, 16 bytes apart.  Vectors
 * without a CPU error code push a zero so that every frame looks alike.
 */
	.p2align 4
	.globl	isr_stubs
isr_stubs:
	vec = 0
	.rept	256
	.p2align 4
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq	$0
	.endif
	pushq	$vec
	jmp	isr_common
	vec = vec + 1
	.endr

isr_common:
	pushq	%rax
	pushq	%rbx
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%rbp
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	cld
	movq	%rsp, %rdi
	call	trap_handler
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rbp
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rbx
	popq	%rax
	addq	$16, %rsp
	iretq

	.data
	.p2align 4
	.globl	gdt, gdt_end, gdt_desc
gdt:
	.quad	0
	.quad	0x00af9a000000ffff		/* 0x08: 64-bit code */
	.quad	0x00cf92000000ffff		/* 0x10: flat data */
	.quad	0x00cf9a000000ffff		/* 0x18: flat 32-bit code */
gdt_end:
	.if (gdt_end - gdt) != GDT_ENTRIES * 8
	.error "GDT_ENTRIES is wrong"
	.endif
	.p2align 3
	.word	0
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt

	.globl	ap_ticket
	.p2align 2
ap_ticket:
	.long	0

/* Page tables, zeroed with .bss and filled by the entry code. */
	.section .bss.pagetables, "aw", @nobits
	.p2align 12
	.globl	pml4, pdpt, pd
pml4:	.skip	4096
pdpt:	.skip	4096
pd:	.skip	4 * 4096

/* Stacks are not zeroed (they live past __bss_end). */
	.section .stack, "aw", @nobits
	.p2align 12
boot_stack:
	.skip	BOOT_STACK_SIZE
boot_stack_top:
	.globl	ap_stacks
ap_stacks:
	.skip	AP_STACK_SIZE * MAX_CPUS

/* Linux boot protocol 2.15 kernel_info; its offset goes into the setup header. */
	.section .rodata.kernel_info, "a"
	.p2align 2
	.globl	kernel_info
kernel_info:
	.ascii	"LToP"
	.long	kernel_info_var - kernel_info	/* size */
	.long	kernel_info_end - kernel_info	/* size_total */
	.long	0				/* setup_type_max: we take no setup_data */
kernel_info_var:
kernel_info_end:
