/*
 * Flotilla test guest: a virtio-net driver (virtio 1.2 §5.1) over the modern
 * virtio-mmio transport (§4.2), polling one receive and one transmit split
 * virtqueue (§2.7) with VIRTQ_AVAIL_F_NO_INTERRUPT.
 *
 * Every NIC: negotiate VERSION_1, MAC and STATUS, read the MAC and link status
 * from the config space, post RX buffers, report
 *   fact device virtio-net base=<hex> irq=<n> nic=<i> mac=<mac> link=<0|1>
 *   check net<i> ok|fail ...
 * With flotilla.net=<guest-ip>,<host-ip> the first NIC (and every hot-plugged
 * one, flotilla.rescan=1) also sends an ARP
 * request for host-ip (check net_arp, with the peer's MAC from the reply) and
 * then an ICMP echo request carrying a fixed pattern (check net_ping: the reply
 * must carry it back). Frames that are not the expected reply are recycled.
 */
#include "virtio.h"

#define F_MAC       (1UL << 5)
#define F_STATUS    (1UL << 16)

#define HDR      12            /* virtio_net_hdr_v1 (§5.1.6): VERSION_1 always has num_buffers */
#define RXBUF    1536          /* header + a 1514-byte frame (§5.1.6.3.1 without MRG_RXBUF) */
#define PING_LEN 32

/* One NIC at a time: each is reset when its probe ends. */
static struct vq_small rxq, txq;
static u8 rxbuf[VQ_SMALL][RXBUF] __attribute__((aligned(64)));
static u8 txbuf[HDR + 128] __attribute__((aligned(64)));
static u16 rx_seen;
static u32 nics;
static bool hotplugged;    /* the probe in progress is for a NIC plugged after boot */

struct net_opts { bool set; u8 guest[4], host[4]; };

static inline void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }     /* network order */
static inline u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }

/* "a.b.c.d" at s[0..len); returns the characters used, 0 if malformed. */
static size_t parse_ip(const char *s, size_t len, u8 out[4])
{
	size_t pos = 0, used;
	for (int i = 0; i < 4; i++) {
		u64 v;
		if (i > 0) {
			if (pos >= len || s[pos] != '.')
				return 0;
			pos++;
		}
		if (!parse_uint(s + pos, len - pos, &v, &used) || v > 255)
			return 0;
		out[i] = (u8)v;
		pos += used;
	}
	return pos;
}

static void net_param(const char *key, size_t keylen, const char *val, size_t vallen, void *ctx)
{
	struct net_opts *o = ctx;
	if (!param_is(key, keylen, "flotilla.net") || !val)
		return;
	size_t n = parse_ip(val, vallen, o->guest);
	if (!n || n >= vallen || val[n] != ',')
		return;
	size_t m = parse_ip(val + n + 1, vallen - n - 1, o->host);
	o->set = m && n + 1 + m == vallen;
}

static bool net_init(struct virtio_mmio_dev *d, u64 *features, const char **why)
{
	if (!virtio_negotiate(d, VIRTIO_F_VERSION_1 | F_MAC | F_STATUS, features, why) ||
	    !vq_small_setup(d, 0, &rxq, why) || !vq_small_setup(d, 1, &txq, why))
		return false;
	/* Every RX buffer posted before DRIVER_OK (§5.1.6.3: device-writable, one per frame). */
	vq_small_fill(&rxq, rxbuf[0], RXBUF);
	rx_seen = 0;
	virtio_driver_ok(d);
	return true;
}

/* Sends txbuf (header + len frame bytes); true once the device used it. */
static bool net_send(struct virtio_mmio_dev *d, u32 len)
{
	memset(txbuf, 0, HDR);
	return vq_small_send(d, 1, &txq, txbuf, HDR + len, 0, 10000) >= 0;
}

/* Waits (up to ~2 s) for a received frame that `match` accepts; every frame is
 * given back to the device. Returns the matching frame's buffer, or NULL. */
typedef bool (*frame_match)(const u8 *frame, u32 len, void *ctx);
static const u8 *net_wait(struct virtio_mmio_dev *d, frame_match match, void *ctx, u32 *other)
{
	for (u32 n = 0; n < 10000; n++) {
		while (rx_seen != rd_u16(&rxq.used_idx)) {
			u32 id = rxq.used_ring[rx_seen % VQ_SMALL].id, len = rxq.used_ring[rx_seen % VQ_SMALL].len;
			rx_seen++;
			bool hit = id < VQ_SMALL && len > HDR && len <= RXBUF && match(rxbuf[id] + HDR, len - HDR, ctx);
			if (hit)
				return rxbuf[id] + HDR;    /* the caller reads it before the next wait */
			(*other)++;
			/* Give the buffer back and tell the device (it stops reading the tap when it has none). */
			vq_small_post(&rxq, (u16)(id < VQ_SMALL ? id : 0));
			virtio_notify(d, 0);
		}
		delay_us(200);
	}
	return NULL;
}

struct arp_ctx { const struct net_opts *o; };

static bool is_arp_reply(const u8 *f, u32 len, void *ctx)
{
	const struct net_opts *o = ((struct arp_ctx *)ctx)->o;
	return len >= 42 && get16(f + 12) == 0x0806 && get16(f + 20) == 2 &&
	       memcmp(f + 28, o->host, 4) == 0 && memcmp(f + 38, o->guest, 4) == 0;
}

static bool is_echo_reply(const u8 *f, u32 len, void *ctx)
{
	const struct net_opts *o = ctx;
	return len >= 14 + 20 + 8 + PING_LEN && get16(f + 12) == 0x0800 && f[14 + 9] == 1 &&
	       memcmp(f + 14 + 12, o->host, 4) == 0 && f[34] == 0 && get16(f + 38) == 0x464c;
}

static u16 csum(const u8 *p, u32 len)
{
	u32 sum = 0;
	for (u32 i = 0; i + 1 < len; i += 2)
		sum += get16(p + i);
	if (len & 1)
		sum += (u32)p[len - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

static void fmt_mac(char *out, const u8 *m)
{
	static const char hexd[] = "0123456789abcdef";
	for (int i = 0; i < 6; i++) {
		out[3 * i] = hexd[m[i] >> 4];
		out[3 * i + 1] = hexd[m[i] & 15];
		out[3 * i + 2] = i < 5 ? ':' : 0;
	}
}

static void net_traffic(struct virtio_mmio_dev *d, const u8 mac[6], const struct net_opts *o)
{
	u8 *f = txbuf + HDR;
	u32 other = 0;
	/* ARP request (RFC 826), padded to the 60-byte Ethernet minimum. */
	memset(f, 0, 60);
	memset(f, 0xff, 6);
	memcpy(f + 6, mac, 6);
	put16(f + 12, 0x0806);
	put16(f + 14, 1);                 /* Ethernet */
	put16(f + 16, 0x0800);            /* IPv4 */
	f[18] = 6;
	f[19] = 4;
	put16(f + 20, 1);                 /* request */
	memcpy(f + 22, mac, 6);
	memcpy(f + 28, o->guest, 4);
	memcpy(f + 38, o->host, 4);
	bool sent = net_send(d, 60);
	struct arp_ctx actx = { o };
	const u8 *reply = sent ? net_wait(d, is_arp_reply, &actx, &other) : NULL;
	u8 peer[6] = { 0 };
	char peer_text[18];
	if (reply)
		memcpy(peer, reply + 22, 6);
	fmt_mac(peer_text, peer);
	check("net_arp", reply != NULL, "sent=%d peer=%s other_frames=%u", sent, peer_text, other);
	if (!reply) {
		check("net_ping", false, "reason=no-arp-reply");
		return;
	}

	/* ICMP echo request (RFC 792) with id 0x464c ("FL"), seq 1 and a fixed pattern. */
	u32 ip_len = 20 + 8 + PING_LEN;
	memset(f, 0, 14 + ip_len);
	memcpy(f, peer, 6);
	memcpy(f + 6, mac, 6);
	put16(f + 12, 0x0800);
	u8 *ip = f + 14;
	ip[0] = 0x45;
	put16(ip + 2, (u16)ip_len);
	put16(ip + 4, 1);
	put16(ip + 6, 0x4000);            /* DF */
	ip[8] = 64;
	ip[9] = 1;                        /* ICMP */
	memcpy(ip + 12, o->guest, 4);
	memcpy(ip + 16, o->host, 4);
	put16(ip + 10, csum(ip, 20));
	u8 *icmp = ip + 20;
	icmp[0] = 8;
	put16(icmp + 4, 0x464c);
	put16(icmp + 6, 1);
	for (u32 i = 0; i < PING_LEN; i++)
		icmp[8 + i] = (u8)(0xa5 ^ i);
	put16(icmp + 2, csum(icmp, 8 + PING_LEN));
	other = 0;
	sent = net_send(d, 14 + ip_len);
	reply = sent ? net_wait(d, is_echo_reply, (void *)o, &other) : NULL;
	bool payload = false;
	if (reply) {
		payload = true;
		for (u32 i = 0; i < PING_LEN; i++)
			payload = payload && reply[42 + i] == (u8)(0xa5 ^ i);
	}
	check("net_ping", reply && payload, "sent=%d reply=%d payload=%d bytes=%u other_frames=%u",
	      sent, reply != NULL, payload, PING_LEN, other);
}

bool virtio_net_probe(struct virtio_mmio_dev *d)
{
	u32 nic = nics++;
	char name[8] = "net0";
	name[3] = (char)('0' + nic % 10);
	const char *why = "";
	u64 features = 0;
	if (!net_init(d, &features, &why)) {
		check(name, false, "base=0x%lx reason=%s", d->base, why);
		return false;
	}
	u8 mac[6];
	for (u32 i = 0; i < 6; i++)
		mac[i] = mmio_read8(d->base + VIRTIO_MMIO_CONFIG + i);
	u16 status = (u16)(mmio_read8(d->base + VIRTIO_MMIO_CONFIG + 6) | mmio_read8(d->base + VIRTIO_MMIO_CONFIG + 7) << 8);
	char mac_text[18];
	fmt_mac(mac_text, mac);
	kprintf("flotilla-guest: fact device virtio-net base=0x%lx irq=%u nic=%u mac=%s link=%u\n",
		d->base, d->irq, nic, mac_text, status & 1);
	bool ok = (features & F_MAC) && (features & F_STATUS) && (status & 1);
	check(name, ok, "mac=%s features=0x%lx link=%u", mac_text, features, status & 1);
	struct net_opts o = { 0 };
	parse_params(virtio_cmdline, net_param, &o);
	if ((nic == 0 || hotplugged) && o.set && ok)
		net_traffic(d, mac, &o);
	vm_write(d, VIRTIO_MMIO_STATUS, 0);     /* reset: the device stops using the queues */
	return ok;
}

/* A NIC that appeared after boot (flotilla.rescan=1): probed like the others, and it also runs
 * the ARP/ping checks when flotilla.net= is given. */
bool virtio_net_probe_hotplug(struct virtio_mmio_dev *d)
{
	hotplugged = true;
	bool ok = virtio_net_probe(d);
	hotplugged = false;
	return ok;
}
