/* Flotilla test guest: polled 8250 UART console and a small printf. */
#include "guest.h"

#define COM1      0x3f8
#define UART_TX   0
#define UART_DLL  0
#define UART_IER  1
#define UART_DLH  1
#define UART_FCR  2
#define UART_LCR  3
#define UART_MCR  4
#define UART_LSR  5
#define LCR_DLAB  0x80
#define LSR_THRE  0x20

u32 checks_passed, checks_failed;
static volatile u32 console_lock;

/* Programmed the way Linux's early serial console does it: 8n1, 115200. */
void serial_init(void)
{
	const u32 divisor = 115200 / 115200;
	outb(COM1 + UART_LCR, 0x03);
	outb(COM1 + UART_IER, 0);
	outb(COM1 + UART_FCR, 0);
	outb(COM1 + UART_MCR, 0x03);
	u8 lcr = inb(COM1 + UART_LCR);
	outb(COM1 + UART_LCR, lcr | LCR_DLAB);
	outb(COM1 + UART_DLL, divisor & 0xff);
	outb(COM1 + UART_DLH, (divisor >> 8) & 0xff);
	outb(COM1 + UART_LCR, lcr & ~LCR_DLAB);
}

static void serial_putc(char c)
{
	for (u32 n = 0; n < 100000 && !(inb(COM1 + UART_LSR) & LSR_THRE); n++)
		;
	outb(COM1 + UART_TX, (u8)c);
}

static void serial_write(const char *s, size_t n)
{
	u32 one = 1;
	for (;;) {
		__asm__ __volatile__("xchgl %0, %1" : "+r"(one), "+m"(console_lock) :: "memory");
		if (!one)
			break;
		one = 1;
		cpu_relax();
	}
	while (n--)
		serial_putc(*s++);
	__asm__ __volatile__("" ::: "memory");
	console_lock = 0;
}

struct outbuf { char *p; size_t len, cap; };

static void out_c(struct outbuf *o, char c)
{
	if (o->len + 1 < o->cap)
		o->p[o->len] = c;
	o->len++;
}

static void out_num(struct outbuf *o, u64 v, u32 base, int width, char pad, bool neg)
{
	char tmp[24];
	int n = 0;
	do {
		u32 d = (u32)(v % base);
		tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	if (neg)
		tmp[n++] = '-';
	while (width-- > n)
		out_c(o, pad);
	while (n)
		out_c(o, tmp[--n]);
}

/* %s %c %d %u %x (with l/ll/z, width and zero pad) and %%. */
static void vformat(struct outbuf *o, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			out_c(o, *fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, lng = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			lng = 1;
			fmt++;
		}
		switch (*fmt) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			while (*s)
				out_c(o, *s++);
			break;
		}
		case 'c':
			out_c(o, (char)va_arg(ap, int));
			break;
		case 'd': {
			s64 v = lng ? va_arg(ap, s64) : va_arg(ap, int);
			out_num(o, v < 0 ? (u64)-v : (u64)v, 10, width, pad, v < 0);
			break;
		}
		case 'u':
			out_num(o, lng ? va_arg(ap, u64) : va_arg(ap, u32), 10, width, pad, false);
			break;
		case 'x':
			out_num(o, lng ? va_arg(ap, u64) : va_arg(ap, u32), 16, width, pad, false);
			break;
		case '%':
			out_c(o, '%');
			break;
		case 0:
			return;
		default:
			out_c(o, '%');
			out_c(o, *fmt);
		}
	}
}

int ksnprintf(char *buf, size_t size, const char *fmt, ...)
{
	struct outbuf o = { buf, 0, size };
	va_list ap;
	va_start(ap, fmt);
	vformat(&o, fmt, ap);
	va_end(ap);
	if (size)
		buf[o.len < size ? o.len : size - 1] = 0;
	return (int)o.len;
}

/* Lines can carry a whole command line, so the buffer is generous. */
static char line[CMDLINE_MAX + 512];

void kprintf(const char *fmt, ...)
{
	/* Only one CPU prints in normal operation; the lock covers exception reports. */
	static char aline[512];
	char *buf = line;
	size_t cap = sizeof(line);
	if (console_lock) {
		buf = aline;
		cap = sizeof(aline);
	}
	struct outbuf o = { buf, 0, cap };
	va_list ap;
	va_start(ap, fmt);
	vformat(&o, fmt, ap);
	va_end(ap);
	serial_write(buf, o.len < cap ? o.len : cap - 1);
}

void check(const char *name, bool ok, const char *fmt, ...)
{
	static char detail[1024];
	struct outbuf o = { detail, 0, sizeof(detail) };
	va_list ap;
	va_start(ap, fmt);
	vformat(&o, fmt, ap);
	va_end(ap);
	detail[o.len < sizeof(detail) ? o.len : sizeof(detail) - 1] = 0;
	if (ok)
		checks_passed++;
	else
		checks_failed++;
	kprintf("flotilla-guest: check %s %s%s%s\n", name, ok ? "ok" : "fail", detail[0] ? " " : "", detail);
}
