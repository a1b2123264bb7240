/*
 * Flotilla test guest: the real-mode part of the bzImage — a boot sector, the
 * Linux setup header at 0x1f1 and a stub at the 0x200 real-mode entry.
 * tools/mkbzimage.py fills setup_sects, syssize, init_size and
 * kernel_info_offset and appends the protected-mode kernel.
 *
 * The guest is meant to be started through the 32-bit or 64-bit boot
 * protocol entry.  If a BIOS boots the sector, or a loader jumps to the
 * real-mode setup entry, it says so on COM1 and halts.
 */
	.code16
	.section .setup, "ax"
	.globl	_start
_start:
	ljmp	$0x07c0, $bootsect_go       /* BIOS loads us at 0x7c00 */
bootsect_go:
	movw	%cs, %ax
	movw	%ax, %ds
	movw	$msg_bootsect, %si
	jmp	say_and_halt

/* Print the NUL-terminated string at DS:SI on COM1 (polled), then halt. */
say_and_halt:
	cld
1:	lodsb
	testb	%al, %al
	jz	3f
	movb	%al, %bl
	movw	$0x3fd, %dx
2:	inb	%dx, %al
	testb	$0x20, %al
	jz	2b
	movw	$0x3f8, %dx
	movb	%bl, %al
	outb	%al, %dx
	jmp	1b
3:	cli
	hlt
	jmp	3b

msg_bootsect:
	.ascii	"flotilla-guest: not a boot sector; load this bzImage with a Linux boot loader\n\0"

	.org	0x1f1
hdr:
setup_sects:		.byte	0		/* filled by mkbzimage.py */
root_flags:		.word	1
syssize:		.long	0		/* filled: 16-byte paragraphs of the protected-mode part */
ram_size:		.word	0
vid_mode:		.word	0xffff
root_dev:		.word	0
boot_flag:		.word	0xaa55

	/* 0x200: real-mode entry (CS = setup segment + 0x20, IP = 0) */
	.byte	0xeb
	.byte	start_of_setup - 1f
1:
header:			.ascii	"HdrS"
version:		.word	0x020f
realmode_swtch:		.long	0
start_sys_seg:		.word	0x1000
kernel_version:		.word	version_string - 0x200
type_of_loader:		.byte	0
loadflags:		.byte	0x01		/* LOADED_HIGH */
setup_move_size:	.word	0x8000
code32_start:		.long	0x100000
ramdisk_image:		.long	0
ramdisk_size:		.long	0
bootsect_kludge:	.long	0
heap_end_ptr:		.word	0
ext_loader_ver:		.byte	0
ext_loader_type:	.byte	0
cmd_line_ptr:		.long	0
initrd_addr_max:	.long	0x7fffffff
kernel_alignment:	.long	0x200000
relocatable_kernel:	.byte	0
min_alignment:		.byte	21
xloadflags:		.word	0x0001		/* XLF_KERNEL_64 */
cmdline_size:		.long	2047
hardware_subarch:	.long	0
hardware_subarch_data:	.quad	0
payload_offset:		.long	0
payload_length:		.long	0
setup_data:		.quad	0
pref_address:		.quad	0x100000
init_size:		.long	0		/* filled: memory needed from the load address */
handover_offset:	.long	0
kernel_info_offset:	.long	0		/* filled: offset of kernel_info in the kernel */

start_of_setup:
	/* Normalise CS so that labels are offsets from the start of the setup. */
	movw	%cs, %ax
	subw	$0x20, %ax
	movw	%ax, %ds
	pushw	%ax
	pushw	$2f
	lretw
2:	movw	$msg_realmode, %si
	jmp	say_and_halt

msg_realmode:
	.ascii	"flotilla-guest: the real-mode setup entry is not supported; use the 32-bit or 64-bit boot protocol entry\n\0"
version_string:
	.ascii	"flotilla-guest 0.1\0"
