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

#define RNG_CHUNK 256
#define RNG_MAX   8192

static struct vq_small rng_q;
static u8 rng_buf[RNG_MAX] __attribute__((aligned(64)));

static void rng_param(const char *key, size_t keylen, const char *val, size_t vallen, void *ctx)
{
	u64 *want = ctx, n;
	size_t used;
	if (param_is(key, keylen, "flotilla.rngbytes") && val && parse_uint(val, vallen, &n, &used))
		*want = n < RNG_MAX ? n : RNG_MAX;
}

static bool rng_init(struct virtio_mmio_dev *d, const char **why)
{
	u64 features;
	if (!virtio_negotiate(d, VIRTIO_F_VERSION_1, &features, why) || !vq_small_setup(d, 0, &rng_q, why))
		return false;
	virtio_driver_ok(d);
	return true;
}

/* One device-writable buffer; returns the length the device reports, or -1 after ~8 s. */
static long rng_request(struct virtio_mmio_dev *d, u8 *buf, u32 len)
{
	long got = vq_small_send(d, 0, &rng_q, buf, len, VIRTQ_DESC_F_WRITE, 40000);
	return got <= (long)len ? got : -1;
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
