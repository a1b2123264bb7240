/*
 * Flotilla test guest: a virtio-console driver (virtio 1.2 §5.3) over the
 * modern virtio-mmio transport (§4.2), polling its two split virtqueues.
 *
 * One port, no feature bits but VERSION_1 (no SIZE, no MULTIPORT, §5.3.3):
 * receiveq 0 carries host→guest bytes, transmitq 1 guest→host (§5.3.2).
 * At probe it posts CONS_RX buffers on receiveq, writes
 *   "flotilla-guest console hello <flotilla.nonce or 0>\n"
 * on transmitq and reports
 *   fact device virtio-console base=<hex> irq=<n> tx=<bytes>
 *   check virtio-console ok|fail
 * While the guest holds (flotilla.hold=1) it polls receiveq: each line that
 * arrives (up to CONS_LINE bytes, ended by \n or \r) is reported as
 *   fact console-rx text=<line>
 * and echoed back on transmitq as "flotilla-guest console echo <line>\n".
 * Every used buffer goes straight back on receiveq.
 */
#include "virtio.h"

#define F_VERSION_1 (1UL << 32)

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER      2
#define STATUS_DRIVER_OK   4
#define STATUS_FEATURES_OK 8

#define DESC_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1

#define QSIZE     4
#define CONS_RX   4           /* receive buffers, one per descriptor */
#define CONS_RXLEN 64
#define CONS_LINE 120

struct vq_desc { u64 addr; u32 len; u16 flags; u16 next; };

struct cons_queue {
	struct vq_desc desc[QSIZE];                     /* 0x000 */
	u16 avail_flags, avail_idx, avail_ring[QSIZE];  /* 0x040 */
	u8 pad0[0x100 - 0x40 - 2 * (2 + QSIZE)];
	u16 used_flags, used_idx;                       /* 0x100 */
	struct { u32 id, len; } used_ring[QSIZE];
} __attribute__((aligned(4096)));

static struct cons_queue cons_rxq, cons_txq;
static u8 cons_rxbuf[CONS_RX][CONS_RXLEN] __attribute__((aligned(64)));
static char cons_txbuf[CONS_LINE + 64] __attribute__((aligned(64)));
static struct virtio_mmio_dev *cons_dev;
static u16 cons_rx_seen;                    /* used entries of receiveq consumed */
static char cons_line[CONS_LINE + 1];
static u32 cons_line_len;

static inline u16 rd_u16(volatile u16 *p) { barrier(); u16 v = *p; barrier(); return v; }
static inline void wr_u16(volatile u16 *p, u16 v) { barrier(); *p = v; barrier(); }

static void cons_param(const char *key, size_t keylen, const char *val, size_t vallen, void *ctx)
{
	const char **nonce = ctx;
	if (param_is(key, keylen, "flotilla.nonce") && val && vallen > 0 && vallen < 40) {
		static char copy[40];
		memcpy(copy, val, vallen);
		copy[vallen] = 0;
		*nonce = copy;
	}
}

static void queue_setup(struct virtio_mmio_dev *d, u32 index, struct cons_queue *q)
{
	memset(q, 0, sizeof(*q));
	q->avail_flags = AVAIL_F_NO_INTERRUPT;    /* this driver polls */
	vm_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
	vm_write(d, VIRTIO_MMIO_QUEUE_NUM, QSIZE);
	vm_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)q->desc);
	vm_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
	vm_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)&q->avail_flags);
	vm_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)((u64)&q->avail_flags >> 32));
	vm_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)&q->used_flags);
	vm_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)((u64)&q->used_flags >> 32));
	vm_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
}

static bool cons_init(struct virtio_mmio_dev *d, const char **why)
{
	vm_write(d, VIRTIO_MMIO_STATUS, 0);
	vm_write(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
	vm_write(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
	vm_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	u64 offered = (u64)vm_read(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	if (!(offered & F_VERSION_1)) {
		*why = "no-version-1";
		return false;
	}
	vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES, 0);
	vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(F_VERSION_1 >> 32));
	vm_write(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(vm_read(d, VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK)) {
		*why = "features-refused";
		return false;
	}
	for (u32 i = 0; i < 2; i++) {
		vm_write(d, VIRTIO_MMIO_QUEUE_SEL, i);
		if (vm_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX) < QSIZE) {
			*why = "queue-too-small";
			return false;
		}
	}
	queue_setup(d, 0, &cons_rxq);
	queue_setup(d, 1, &cons_txq);
	/* §5.3.6.1: receive buffers before DRIVER_OK is allowed; post them all. */
	for (u16 i = 0; i < CONS_RX; i++) {
		cons_rxq.desc[i] = (struct vq_desc){ (u64)cons_rxbuf[i], CONS_RXLEN, DESC_WRITE, 0 };
		cons_rxq.avail_ring[i] = i;
	}
	wr_u16(&cons_rxq.avail_idx, CONS_RX);
	vm_write(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	__asm__ __volatile__("mfence" ::: "memory");
	vm_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
	return true;
}

/* Sends `len` bytes of cons_txbuf; true once the device has used the buffer (~2 s at most). */
static bool cons_send(u32 len)
{
	struct cons_queue *q = &cons_txq;
	u16 idx = rd_u16(&q->avail_idx);
	q->desc[0] = (struct vq_desc){ (u64)cons_txbuf, len, 0, 0 };
	q->avail_ring[idx % QSIZE] = 0;
	wr_u16(&q->avail_idx, (u16)(idx + 1));
	__asm__ __volatile__("mfence" ::: "memory");
	vm_write(cons_dev, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
	for (u32 n = 0; n < 10000; n++) {
		if (rd_u16(&q->used_idx) == (u16)(idx + 1))
			return true;
		delay_us(200);
	}
	return false;
}

static void cons_line_done(void)
{
	cons_line[cons_line_len] = 0;
	kprintf("flotilla-guest: fact console-rx text=%s\n", cons_line);
	int n = ksnprintf(cons_txbuf, sizeof(cons_txbuf), "flotilla-guest console echo %s\n", cons_line);
	if (n > 0)
		cons_send((u32)n < sizeof(cons_txbuf) ? (u32)n : sizeof(cons_txbuf) - 1);
	cons_line_len = 0;
}

/* Hold poller: takes what arrived on receiveq and gives the buffers back. */
static void cons_poll(void)
{
	struct cons_queue *q = &cons_rxq;
	bool reposted = false;
	while (rd_u16(&q->used_idx) != cons_rx_seen) {
		u32 id = q->used_ring[cons_rx_seen % QSIZE].id;
		u32 len = q->used_ring[cons_rx_seen % QSIZE].len;
		cons_rx_seen++;
		if (id >= CONS_RX)
			continue;
		if (len > CONS_RXLEN)
			len = CONS_RXLEN;
		for (u32 i = 0; i < len; i++) {
			char c = (char)cons_rxbuf[id][i];
			if (c == '\n' || c == '\r') {
				if (cons_line_len)
					cons_line_done();
			} else if (cons_line_len < CONS_LINE) {
				cons_line[cons_line_len++] = c;
			}
		}
		u16 idx = rd_u16(&q->avail_idx);
		q->avail_ring[idx % QSIZE] = (u16)id;
		wr_u16(&q->avail_idx, (u16)(idx + 1));
		reposted = true;
	}
	if (reposted) {
		__asm__ __volatile__("mfence" ::: "memory");
		vm_write(cons_dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
	}
}

bool virtio_console_probe(struct virtio_mmio_dev *d)
{
	const char *why = "";
	if (cons_dev) {
		/* One console is driven (static state); further ones are only listed. */
		kprintf("flotilla-guest: fact device virtio-console base=0x%lx irq=%u tx=0 driver=none\n", d->base, d->irq);
		return true;
	}
	cons_dev = d;
	if (!cons_init(d, &why)) {
		check("virtio-console", false, "base=0x%lx reason=%s", d->base, why);
		return false;
	}
	const char *nonce = "0";
	parse_params(virtio_cmdline, cons_param, &nonce);
	int n = ksnprintf(cons_txbuf, sizeof(cons_txbuf), "flotilla-guest console hello %s\n", nonce);
	bool sent = n > 0 && cons_send((u32)n);
	kprintf("flotilla-guest: fact device virtio-console base=0x%lx irq=%u tx=%d\n", d->base, d->irq, sent ? n : 0);
	check("virtio-console", sent, "tx=%s", sent ? "used" : "unanswered");
	if (sent)
		virtio_hold_register(cons_poll);
	return sent;
}
