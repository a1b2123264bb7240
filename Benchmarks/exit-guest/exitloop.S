/*
 * Exit-handling benchmark guest: N port-I/O exits, then an i8042 reset.
 *
 * Entered in 64-bit long mode (identity paging, interrupts off) at its physical
 * address, like an ELF vmlinux.  Port 0x80 (the POST/delay port) has no device in
 * flotilla-vmm, so every `outb` is a KVM_EXIT_IO that the VMM dispatches and ignores:
 * the bare exit-dispatch path.  N is given at assembly time: as --defsym N=...
 */
	.code64
	.text
	.globl	_start
_start:
	mov	$N, %ecx
	xor	%eax, %eax
1:	outb	%al, $0x80
	dec	%ecx
	jnz	1b

	/* Reset through the i8042: wait until the input buffer is empty (status bit 1). */
2:	inb	$0x64, %al
	test	$2, %al
	jnz	2b
	mov	$0xfe, %al
	outb	%al, $0x64
3:	hlt
	jmp	3b
