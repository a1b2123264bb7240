/*
 * Flotilla test guest: a virtio-rng driver (virtio 1.2 §5.4) over the modern
 * virtio-mmio transport (§4.2), polling its one split virtqueue (§2.7).
 *
 * Negotiates VERSION_1 only (§5.4.3: no device features), asks for no
 * interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT) and reads flotilla.rngbytes=<n>
 * bytes (default 64, at most RNG_MAX) in requests of at most RNG_CHUNK bytes,
 * one at a time, then reports
 *   fact device virtio-rng base=<hex> irq=<n> bytes=<got> requests=<n> crc32=<hex>
 * (CRC-32/IEEE of every byte received, in order) and checks that every request
 * was answered and the bytes are not all zero.
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
#define RNG_CHUNK 256
#define RNG_MAX   8192

struct vq_desc { u64 addr; u32 len; u16 flags; u16 next; };

struct rng_queue {
	struct vq_desc desc[QSIZE];                     /* 0x000 */
	u16 avail_flags, avail_idx, avail_ring[QSIZE];  /* 0x040 */
	u8 pad0[0x100 - 0x40 - 2 * (2 + QSIZE)];
	u16 used_flags, used_idx;                       /* 0x100 */
	struct { u32 id, len; } used_ring[QSIZE];
} __attribute__((aligned(4096)));

static struct rng_queue rng_q;
static u8 rng_buf[RNG_MAX] __attribute__((aligned(64)));

static inline u16 rd_u16(volatile u16 *p) { barrier(); u16 v = *p; barrier(); return v; }
static inline void wr_u16(volatile u16 *p, u16 v) { barrier(); *p = v; barrier(); }

static void rng_param(const char *key, size_t keylen, const char *val, size_t vallen, void *ctx)
{
	u64 *want = ctx, n;
	size_t used;
	if (param_is(key, keylen, "flotilla.rngbytes") && val && parse_uint(val, vallen, &n, &used))
		*want = n < RNG_MAX ? n : RNG_MAX;
}

static bool rng_init(struct virtio_mmio_dev *d, const char **why)
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
	vm_write(d, VIRTIO_MMIO_QUEUE_SEL, 0);
	if (vm_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX) < QSIZE) {
		*why = "queue-too-small";
		return false;
	}
	struct rng_queue *q = &rng_q;
	memset(q, 0, sizeof(*q));
	q->avail_flags = AVAIL_F_NO_INTERRUPT;    /* this driver polls */
	vm_write(d, VIRTIO_MMIO_QUEUE_NUM, QSIZE);
	vm_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)q->desc);
	vm_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
	vm_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)&q->avail_flags);
	vm_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)((u64)&q->avail_flags >> 32));
	vm_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)&q->used_flags);
	vm_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)((u64)&q->used_flags >> 32));
	vm_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
	vm_write(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	return true;
}

/* One device-writable buffer; returns the length the device reports, or -1 after ~8 s. */
static long rng_request(struct virtio_mmio_dev *d, u8 *buf, u32 len)
{
	struct rng_queue *q = &rng_q;
	u16 idx = rd_u16(&q->avail_idx);
	q->desc[0] = (struct vq_desc){ (u64)buf, len, DESC_WRITE, 0 };
	q->avail_ring[idx % QSIZE] = 0;
	wr_u16(&q->avail_idx, (u16)(idx + 1));
	__asm__ __volatile__("mfence" ::: "memory");
	vm_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
	for (u32 n = 0; n < 40000; n++) {
		if (rd_u16(&q->used_idx) == (u16)(idx + 1)) {
			u32 got = q->used_ring[idx % QSIZE].len;
			return got <= len ? (long)got : -1;
		}
		delay_us(200);
	}
	return -1;
}

bool virtio_rng_probe(struct virtio_mmio_dev *d)
{
	const char *why = "";
	if (!rng_init(d, &why)) {
		check("virtio-rng", false, "base=0x%lx reason=%s", d->base, why);
		return false;
	}
	u64 want = 64;
	parse_params(virtio_cmdline, rng_param, &want);
	kprintf("flotilla-guest: fact rng-read start bytes=%lu\n", want);
	u64 got = 0;
	u32 requests = 0, unanswered = 0;
	while (got < want) {
		u32 len = want - got < RNG_CHUNK ? (u32)(want - got) : RNG_CHUNK;
		long n = rng_request(d, rng_buf + got, len);
		requests++;
		if (n < 0) {
			unanswered++;
			break;
		}
		got += (u64)n;
	}
	u32 nonzero = 0;
	for (u64 i = 0; i < got; i++)
		nonzero += rng_buf[i] != 0;
	kprintf("flotilla-guest: fact device virtio-rng base=0x%lx irq=%u bytes=%lu requests=%u crc32=%08x\n",
		d->base, d->irq, got, requests, crc32(0, rng_buf, got));
	bool ok = unanswered == 0 && got == want && (want < 8 || nonzero > 0);
	check("virtio-rng", ok, "bytes=%lu wanted=%lu unanswered=%u nonzero=%u", got, want, unanswered, nonzero);
	vm_write(d, VIRTIO_MMIO_STATUS, 0);     /* reset: the device stops using the queue */
	return ok;
}
