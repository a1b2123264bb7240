/*
 * Flotilla test guest: a virtio socket driver (virtio 1.2 §5.10) over the
 * modern virtio-mmio transport (§4.2), polling its three split virtqueues:
 * receiveq 0, transmitq 1, eventq 2 (§5.10.2). Stream sockets only, and
 * VERSION_1 the only feature accepted (a driver that negotiates no type
 * feature gets stream sockets, §5.10.3, as Linux 6.1's does).
 *
 * At probe it reads guest_cid (§5.10.4) and reports
 *   fact device virtio-vsock base=<hex> irq=<n> cid=<n>
 * With flotilla.vsock=<PORT> it then
 *   - connects to the host (CID 2) port PORT: OP_REQUEST, OP_RESPONSE
 *     (check vsock_connect), sends "flotilla-vsock <flotilla.nonce>\n" as
 *     OP_RW, reads the same bytes back (check vsock_echo), and closes with
 *     OP_SHUTDOWN(RCV|SEND), waiting for the host's OP_RST (check vsock_close);
 *   - listens on its own port PORT: prints "fact vsock-listen port=<PORT>"
 *     and, while the guest holds (flotilla.hold=1), accepts one host-initiated
 *     connection (OP_REQUEST -> OP_RESPONSE), echoes every OP_RW back, and on
 *     the host's OP_SHUTDOWN answers OP_RST (as Linux does once the peer has
 *     shut down) and reports "check vsock_accept ok|fail bytes=<n>".
 * Its receive buffers are VS_DATA bytes after the header; it advertises
 * VS_BUF bytes of buffer and forwards (consumes) everything at once, so
 * fwd_cnt is simply every byte received (§5.10.6.3).
 */
#include "virtio.h"

#define VS_HDR  44
#define VS_DATA 128
#define VS_BUF  4096
#define VS_LOCAL_PORT 40000
#define VS_MSG  VS_DATA   /* an OP_RW received is echoed whole */

#define OP_REQUEST  1
#define OP_RESPONSE 2
#define OP_RST      3
#define OP_SHUTDOWN 4
#define OP_RW       5
#define OP_CREDIT_UPDATE  6
#define OP_CREDIT_REQUEST 7
#define TYPE_STREAM 1
#define HOST_CID    2

struct vs_hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static struct vq_small vs_rxq, vs_txq, vs_evq;
static u8 vs_rxbuf[VQ_SMALL][VS_HDR + VS_DATA] __attribute__((aligned(64)));
static u8 vs_evbuf[VQ_SMALL][8] __attribute__((aligned(64)));
static u8 vs_txbuf[VS_HDR + VS_MSG] __attribute__((aligned(64)));
static struct virtio_mmio_dev *vs_dev;
static u64 vs_cid;
static u16 vs_rx_seen;
static u32 vs_port;

/* The one host-initiated connection the hold poller serves. */
static struct {
	bool open, done;
	u32 peer_port;
	u32 fwd_cnt;         /* bytes received on it */
	u32 echoed;
} vs_accept;

static void vs_param(const char *key, size_t keylen, const char *val, size_t vallen, void *ctx)
{
	struct { u64 port; const char *nonce; } *p = ctx;
	u64 n;
	size_t used;
	if (param_is(key, keylen, "flotilla.vsock") && val && parse_uint(val, vallen, &n, &used) && n <= 0xffffffffUL)
		p->port = n;
	if (param_is(key, keylen, "flotilla.nonce") && val && vallen > 0 && vallen < 40) {
		static char copy[40];
		memcpy(copy, val, vallen);
		copy[vallen] = 0;
		p->nonce = copy;
	}
}

/* Sends one packet (header + len payload bytes) from guest port `sport` to host port `dport`. */
static bool vs_send(u32 sport, u32 dport, u16 op, u32 flags, u32 fwd_cnt, const void *data, u32 len)
{
	struct vs_hdr h = { vs_cid, HOST_CID, sport, dport, len, TYPE_STREAM, op, flags, VS_BUF, fwd_cnt };
	if (len > VS_MSG)
		return false;
	memcpy(vs_txbuf, &h, VS_HDR);
	if (len)
		memcpy(vs_txbuf + VS_HDR, data, len);
	return vq_small_send(vs_dev, 1, &vs_txq, vs_txbuf, VS_HDR + len, 0, 10000) >= 0;
}

/* The next packet on receiveq, if one is there: header and up to VS_DATA payload bytes. */
static bool vs_next(struct vs_hdr *h, u8 *data, u32 *len)
{
	struct vq_small *q = &vs_rxq;
	if (rd_u16(&q->used_idx) == vs_rx_seen)
		return false;
	u32 id = q->used_ring[vs_rx_seen % VQ_SMALL].id;
	u32 used = q->used_ring[vs_rx_seen % VQ_SMALL].len;
	vs_rx_seen++;
	bool ok = id < VQ_SMALL && used >= VS_HDR && used <= VS_HDR + VS_DATA;
	if (ok) {
		memcpy(h, vs_rxbuf[id], VS_HDR);
		*len = used - VS_HDR;
		if (h->len != *len)
			ok = false;
		else if (*len)
			memcpy(data, vs_rxbuf[id] + VS_HDR, *len);
	}
	if (id < VQ_SMALL) {
		vq_small_post(q, (u16)id);
		virtio_notify(vs_dev, 0);
	}
	return ok;
}

/* Waits (200 us polls, ~`polls` of them) for a packet on the connection local:peer. */
static bool vs_wait(u32 local, u32 peer, struct vs_hdr *h, u8 *data, u32 *len, u32 polls)
{
	for (u32 n = 0; n < polls; n++) {
		while (vs_next(h, data, len))
			if (h->src_cid == HOST_CID && h->dst_cid == vs_cid && h->dst_port == local && h->src_port == peer)
				return true;
		delay_us(200);
	}
	return false;
}

static void vs_connect_echo(const char *nonce)
{
	struct vs_hdr h;
	static u8 data[VS_DATA];
	static char msg[VS_MSG];
	static u8 back[VS_MSG];
	u32 len;
	bool connected = vs_send(VS_LOCAL_PORT, vs_port, OP_REQUEST, 0, 0, 0, 0) &&
			 vs_wait(VS_LOCAL_PORT, vs_port, &h, data, &len, 25000) && h.op == OP_RESPONSE;
	check("vsock_connect", connected, "port=%u op=%u", vs_port, connected ? OP_RESPONSE : 0);
	if (!connected)
		return;
	int n = ksnprintf(msg, sizeof(msg), "flotilla-vsock %s\n", nonce);
	u32 want = n > 0 ? (u32)n : 0, got = 0;
	bool sent = vs_send(VS_LOCAL_PORT, vs_port, OP_RW, 0, 0, msg, want);
	bool reset = false;
	while (sent && got < want && vs_wait(VS_LOCAL_PORT, vs_port, &h, data, &len, 25000)) {
		if (h.op == OP_RST || h.op == OP_SHUTDOWN) {
			reset = true;
			break;
		}
		if (h.op != OP_RW)
			continue;
		for (u32 i = 0; i < len && got < want; i++)
			back[got++] = data[i];
	}
	bool echoed = sent && !reset && got == want && memcmp(back, msg, want) == 0;
	check("vsock_echo", echoed, "bytes=%u sent=%u", got, want);
	/* §5.10.6.6: shut down both ways; the peer answers with OP_RST. */
	bool closed = vs_send(VS_LOCAL_PORT, vs_port, OP_SHUTDOWN, 3, got, 0, 0);
	bool rst = false;
	while (closed && vs_wait(VS_LOCAL_PORT, vs_port, &h, data, &len, 25000))
		if (h.op == OP_RST) {
			rst = true;
			break;
		}
	check("vsock_close", closed && rst, "rst=%s", rst ? "yes" : "no");
}

/* Hold poller: the host-initiated connection to our port. */
static void vs_poll(void)
{
	struct vs_hdr h;
	static u8 data[VS_DATA];
	u32 len;
	while (!vs_accept.done && vs_next(&h, data, &len)) {
		if (h.src_cid != HOST_CID || h.dst_cid != vs_cid || h.dst_port != vs_port)
			continue;
		if (!vs_accept.open) {
			if (h.op == OP_REQUEST) {
				vs_accept.open = true;
				vs_accept.peer_port = h.src_port;
				vs_send(vs_port, h.src_port, OP_RESPONSE, 0, 0, 0, 0);
			}
			continue;
		}
		if (h.src_port != vs_accept.peer_port)
			continue;
		if (h.op == OP_RW) {
			vs_accept.fwd_cnt += len;
			if (vs_send(vs_port, h.src_port, OP_RW, 0, vs_accept.fwd_cnt, data, len))
				vs_accept.echoed += len;
		} else if (h.op == OP_CREDIT_REQUEST) {
			vs_send(vs_port, h.src_port, OP_CREDIT_UPDATE, 0, vs_accept.fwd_cnt, 0, 0);
		} else if (h.op == OP_SHUTDOWN || h.op == OP_RST) {
			if (h.op == OP_SHUTDOWN)
				vs_send(vs_port, h.src_port, OP_RST, 0, vs_accept.fwd_cnt, 0, 0);
			vs_accept.done = true;
			check("vsock_accept", vs_accept.echoed > 0 && vs_accept.echoed == vs_accept.fwd_cnt,
			      "bytes=%u end=%s", vs_accept.echoed, h.op == OP_RST ? "rst" : "shutdown");
		}
	}
}

bool virtio_vsock_probe(struct virtio_mmio_dev *d)
{
	const char *why = "";
	u64 features;
	if (vs_dev) {
		kprintf("flotilla-guest: fact device virtio-vsock base=0x%lx irq=%u driver=none\n", d->base, d->irq);
		return true;
	}
	vs_dev = d;
	if (!virtio_negotiate(d, VIRTIO_F_VERSION_1, &features, &why) || !vq_small_setup(d, 0, &vs_rxq, &why) ||
	    !vq_small_setup(d, 1, &vs_txq, &why) || !vq_small_setup(d, 2, &vs_evq, &why)) {
		check("vsock_init", false, "base=0x%lx reason=%s", d->base, why);
		return false;
	}
	vq_small_fill(&vs_rxq, vs_rxbuf[0], VS_HDR + VS_DATA);
	vq_small_fill(&vs_evq, vs_evbuf[0], 8);
	virtio_driver_ok(d);
	virtio_notify(d, 0);
	virtio_notify(d, 2);
	vs_cid = vm_read(d, VIRTIO_MMIO_CONFIG) | (u64)vm_read(d, VIRTIO_MMIO_CONFIG + 4) << 32;
	kprintf("flotilla-guest: fact device virtio-vsock base=0x%lx irq=%u cid=%lu\n", d->base, d->irq, vs_cid);
	bool ok = vs_cid >= 3 && vs_cid <= 0xfffffffeUL;
	check("vsock_init", ok, "cid=%lu", vs_cid);
	struct { u64 port; const char *nonce; } p = { 0, "0" };
	parse_params(virtio_cmdline, vs_param, &p);
	if (!ok || !p.port)
		return ok;
	vs_port = (u32)p.port;
	vs_connect_echo(p.nonce);
	kprintf("flotilla-guest: fact vsock-listen port=%u\n", vs_port);
	virtio_hold_register(vs_poll);
	return true;
}
