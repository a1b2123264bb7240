/* Flotilla test guest: constants shared by assembly and C. */
#ifndef FLOTILLA_LAYOUT_H
#define FLOTILLA_LAYOUT_H

#define KERNEL_PHYS        0x100000      /* code32_start, pref_address, ELF p_paddr */
#define STARTUP64_OFFSET   0x200         /* 64-bit entry = load address + 0x200 */

/* Our own GDT selectors. */
#define GDT_CS64           0x08
#define GDT_DS             0x10
#define GDT_CS32           0x18
#define GDT_ENTRIES        4

#define BOOT_STACK_SIZE    16384
#define AP_STACK_SHIFT     11            /* 2 KiB per application processor */
#define AP_STACK_SIZE      (1 << AP_STACK_SHIFT)
#define MAX_CPUS           256           /* xAPIC ids are 8 bits */

#define CR0_PE             0x00000001
#define CR0_ET             0x00000010
#define CR0_PG             0x80000000
#define CR4_PAE            0x00000020
#define MSR_EFER           0xc0000080
#define EFER_LME           0x00000100

/* 2 MiB page directory entry flags: present, writable, page size. */
#define PDE_LARGE          0x83
#define PDE_UNCACHED       0x18          /* PWT | PCD, used for the 3-4 GiB MMIO hole */
#define PT_PRESENT_RW      0x03

#endif
