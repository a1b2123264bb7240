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

#define CONS_RX   VQ_SMALL    /* receive buffers, one per descriptor */
#define CONS_RXLEN 64
#define CONS_LINE 120

static struct vq_small cons_rxq, cons_txq;
static u8 cons_rxbuf[CONS_RX][CONS_RXLEN] __attribute__((aligned(64)));
static char cons_txbuf[CONS_LINE + 64] __attribute__((aligned(64)));
static struct virtio_mmio_dev *cons_dev;
static u16 cons_rx_seen;                    /* used entries of receiveq consumed */
static char cons_line[CONS_LINE + 1];
static u32 cons_line_len;

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

static bool cons_init(struct virtio_mmio_dev *d, const char **why)
{
	u64 features;
	if (!virtio_negotiate(d, VIRTIO_F_VERSION_1, &features, why) || !vq_small_setup(d, 0, &cons_rxq, why) ||
	    !vq_small_setup(d, 1, &cons_txq, why))
		return false;
	/* §5.3.6.1: receive buffers before DRIVER_OK is allowed; post them all. */
	vq_small_fill(&cons_rxq, cons_rxbuf[0], CONS_RXLEN);
	virtio_driver_ok(d);
	virtio_notify(d, 0);
	return true;
}

/* Sends `len` bytes of cons_txbuf; true once the device has used the buffer (~2 s at most). */
static bool cons_send(u32 len)
{
	return vq_small_send(cons_dev, 1, &cons_txq, cons_txbuf, len, 0, 10000) >= 0;
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
	struct vq_small *q = &cons_rxq;
	bool reposted = false;
	while (rd_u16(&q->used_idx) != cons_rx_seen) {
		u32 id = q->used_ring[cons_rx_seen % VQ_SMALL].id;
		u32 len = q->used_ring[cons_rx_seen % VQ_SMALL].len;
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
		vq_small_post(q, (u16)id);
		reposted = true;
	}
	if (reposted)
		virtio_notify(cons_dev, 0);
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
