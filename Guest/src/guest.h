/* Flotilla test guest: common declarations. */
#ifndef FLOTILLA_GUEST_H
#define FLOTILLA_GUEST_H

#include "layout.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;
typedef unsigned long size_t;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

typedef __builtin_va_list va_list;
#define va_start(ap, last) __builtin_va_start(ap, last)
#define va_arg(ap, type) __builtin_va_arg(ap, type)
#define va_end(ap) __builtin_va_end(ap)

#define barrier() __asm__ __volatile__("" ::: "memory")
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* ---- port and memory-mapped I/O ---- */
static inline void outb(u16 port, u8 v) { __asm__ __volatile__("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline void cpu_relax(void) { __asm__ __volatile__("pause" ::: "memory"); }
static inline void cli(void) { __asm__ __volatile__("cli" ::: "memory"); }
static inline u64 read_cr2(void) { u64 v; __asm__ __volatile__("mov %%cr2, %0" : "=r"(v)); return v; }
static inline u32 atomic_add_return(volatile u32 *p, u32 v)
{
	u32 old = v;
	__asm__ __volatile__("lock xaddl %0, %1" : "+r"(old), "+m"(*p) :: "memory");
	return old + v;
}
static inline u32 atomic_read(volatile u32 *p) { return *p; }
__attribute__((noreturn)) void halt_forever(void);

/* Little-endian unaligned reads from a byte buffer. */
static inline u8 rd8(const void *b, size_t off) { return ((const u8 *)b)[off]; }
static inline u16 rd16(const void *b, size_t off) { return (u16)(rd8(b, off) | rd8(b, off + 1) << 8); }
static inline u32 rd32(const void *b, size_t off) { return (u32)rd16(b, off) | (u32)rd16(b, off + 2) << 16; }
static inline u64 rd64(const void *b, size_t off) { return (u64)rd32(b, off) | (u64)rd32(b, off + 4) << 32; }

/* ---- lib.c ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);
u32 crc32(u32 crc, const void *data, size_t len);   /* zlib crc32; start with crc = 0 */

/* ---- console.c: 8250 UART at 0x3f8, polled ---- */
void serial_init(void);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "flotilla-guest: check <name> ok|fail <detail>", counted for the "done" line. */
void check(const char *name, bool ok, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
extern u32 checks_passed, checks_failed;
int ksnprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ---- timer.c: PIT channel 2 delays ---- */
void delay_us(u32 us);

/* ---- bootinfo.c: the copied zero page and command line ---- */
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE  0x0c4
#define BP_EXT_CMD_LINE_PTR  0x0c8
#define BP_E820_ENTRIES      0x1e8
#define BP_SETUP_SECTS       0x1f1
#define BP_BOOT_FLAG         0x1fe
#define BP_HEADER            0x202
#define BP_VERSION           0x206
#define BP_LOADFLAGS         0x211
#define BP_RAMDISK_IMAGE     0x218
#define BP_RAMDISK_SIZE      0x21c
#define BP_CMD_LINE_PTR      0x228
#define BP_INITRD_ADDR_MAX   0x22c
#define BP_CMDLINE_SIZE      0x238
#define BP_E820_TABLE        0x2d0
#define E820_MAX_ENTRIES     128
#define E820_RAM             1

#define CMDLINE_MAX          4096
/* What our setup header promises; the loader may pass it back in boot_params. */
#define HDR_CMDLINE_SIZE     2047
#define HDR_INITRD_ADDR_MAX  0x7fffffffUL
#define DEFAULT_CMDLINE_SIZE 2048   /* ELF boots: what docs/guest-abi.md promises */

struct e820_entry { u64 addr, size; u32 type; };

struct bootinfo {
	u64 bp_phys;            /* where the loader put boot_params */
	u32 entry_bits;         /* 64 or 32 */
	u64 cmdline_phys;
	size_t cmdline_len;
	bool cmdline_terminated; /* NUL found within CMDLINE_MAX */
	u32 e820_count;
	struct e820_entry e820[E820_MAX_ENTRIES];
	u64 initrd_addr, initrd_size;
};
extern u8 boot_params[4096];
extern char boot_cmdline[CMDLINE_MAX + 1];
extern struct bootinfo bootinfo;
void bootinfo_copy(u64 bp_phys, u32 entry_bits);
/* Is [addr, addr+len) covered by type-1 e820 ranges? */
bool e820_is_ram(u64 addr, u64 len);
extern char __kernel_start[], __kernel_end[];

/* ---- params.c: Linux-style kernel parameters ---- */
typedef void (*param_fn)(const char *key, size_t keylen, const char *val, size_t vallen, void *ctx);
void parse_params(const char *cmdline, param_fn fn, void *ctx);
bool parse_memsize(const char *s, size_t len, u64 *out, size_t *used);  /* Linux memparse */
bool parse_uint(const char *s, size_t len, u64 *out, size_t *used);     /* base 0 like simple_strtoull */
bool param_is(const char *key, size_t keylen, const char *name);

/* ---- mptable.c ---- */
struct mp_info {
	bool found;
	u64 fp_addr, cfg_addr;
	u32 cfg_len;            /* base + extended table */
	bool fp_checksum_ok, cfg_checksum_ok, ext_checksum_ok;
	u32 lapic_addr, ioapic_addr;
	u32 ncpus;              /* enabled processor entries */
	u8 apic_id[MAX_CPUS];
	bool is_bsp[MAX_CPUS];
	u32 nbsp;
	bool ids_unique;
};
extern struct mp_info mp;
void mptable_scan(void);

/* ---- smp.c ---- */
#define LAPIC_DEFAULT 0xfee00000UL
#define IOAPIC_DEFAULT 0xfec00000UL
u32 lapic_id(void);
void interrupts_mask_all(void);
void smp_boot(void);

/* ---- trap.c ---- */
void idt_init(void);
void idt_load(void);
extern volatile u32 irq_counts[256];
extern void (*irq_handlers[256])(u32 vector);

/* ---- smp.c: interrupt routing ---- */
/* Routes IOAPIC pin `pin` (= ISA IRQ) to `vector` on this CPU: fixed, edge, active high, unmasked. */
void ioapic_route(u32 pin, u32 vector);
void lapic_eoi(void);
/* One-shot LAPIC timer raising `vector` after about `us` microseconds (a watchdog for hlt). */
void lapic_oneshot(u32 vector, u32 us);

/* ---- main.c: options other parts use ---- */
extern const char *opt_nonce;        /* flotilla.nonce= text, NULL when absent */
extern size_t opt_nonce_len;
extern u64 opt_blkloop;             /* flotilla.blkloop=<n>: n timed single-sector reads on disk 0 */

/* ---- virtio.c ---- */
void virtio_probe_all(const char *cmdline);

#endif
