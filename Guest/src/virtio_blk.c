/*
 * Flotilla test guest: a virtio-blk driver (virtio 1.2 §5.2) over the modern
 * virtio-mmio transport (§4.2), with split virtqueues (§2.7).
 *
 * Per disk: negotiate features (VERSION_1, and RO/BLK_SIZE/FLUSH/SEG_MAX,
 * INDIRECT_DESC, EVENT_IDX when offered), set up one queue, learn whether the
 * device's interrupts arrive (else poll the used ring), read the serial
 * (GET_ID) and the first 64 KiB (four requests in flight at once, through
 * indirect tables when negotiated), read sector 0 into unaligned, oddly split
 * buffers, and with flotilla.nonce= write, flush and read back the last sector
 * (or check that a read-only disk refuses the write), then on a writable disk
 * WRITE_ZEROES sectors 8..15 and DISCARD sectors 16..31, each over a pattern
 * written first (read-back must be zeroes after WRITE_ZEROES).
 */
#include "virtio.h"

#define F_BLK_SEG_MAX      (1UL << 2)
#define F_BLK_RO           (1UL << 5)
#define F_BLK_BLK_SIZE     (1UL << 6)
#define F_BLK_FLUSH        (1UL << 9)
#define F_BLK_DISCARD      (1UL << 13)
#define F_BLK_WRITE_ZEROES (1UL << 14)
#define F_INDIRECT_DESC    (1UL << 28)
#define F_EVENT_IDX        (1UL << 29)

#define T_IN     0
#define T_OUT    1
#define T_FLUSH  4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13

/* The ranges the nonce run zeroes and discards (4 KiB-aligned: discard_sector_alignment). */
#define WZ_SECTOR      8
#define WZ_SECTORS     8
#define DISCARD_SECTOR 16
#define DISCARD_SECTORS 16

#define QSIZE       16
#define MAX_DISKS   4
#define CRC_BYTES   65536
#define IRQ_VECTOR_BASE 0x30
#define WATCHDOG_VECTOR 0xef

/* One 4 KiB page per disk: descriptors, rings, indirect tables, request headers. */
struct queue_page {
	struct vq_desc desc[QSIZE];                     /* 0x000: 256 bytes, 16-aligned */
	u16 avail_flags, avail_idx, avail_ring[QSIZE];  /* 0x100 */
	u16 used_event;
	u8 pad0[0x200 - 0x100 - 2 * (3 + QSIZE)];
	u16 used_flags, used_idx;                       /* 0x200, 4-aligned */
	struct { u32 id, len; } used_ring[QSIZE];
	u16 avail_event;
	u8 pad1[0x400 - 0x200 - 4 - 8 * QSIZE - 2];
	struct vq_desc indirect[4][4];                  /* 0x400: one table per request slot */
	struct { u32 type, reserved; u64 sector; } hdr[4];
	u8 status[4];
} __attribute__((aligned(4096)));

struct blkdev {
	struct virtio_mmio_dev *dev;
	struct queue_page *q;
	u32 index;
	u64 features;
	u64 capacity;
	bool use_irq;
	u16 last_used;
};

static struct queue_page queue_pages[MAX_DISKS] __attribute__((aligned(4096)));
static u8 data_buf[CRC_BYTES] __attribute__((aligned(4096)));
static u8 sector_buf[2][1024] __attribute__((aligned(512)));
static struct blkdev disks[MAX_DISKS];
static u32 ndisks;

/* vring_need_event (§2.7.10): notify when the new index passed the other side's event index. */
static bool need_event(u16 event, u16 new_idx, u16 old_idx) { return (u16)(new_idx - event - 1) < (u16)(new_idx - old_idx); }

static void blk_irq(u32 vector)
{
	for (u32 i = 0; i < ndisks; i++) {
		if (!disks[i].dev || IRQ_VECTOR_BASE + disks[i].dev->irq != vector)
			continue;
		/* §4.2.3.4: read InterruptStatus and acknowledge what was read. */
		u32 st = vm_read(disks[i].dev, VIRTIO_MMIO_INTERRUPT_STATUS);
		vm_write(disks[i].dev, VIRTIO_MMIO_INTERRUPT_ACK, st);
	}
}

struct seg { void *buf; u32 len; bool write; };

/*
 * Puts request `slot` (0..3) on the ring without notifying: header, the data
 * segments, the status byte. Through an indirect table when negotiated and
 * `indirect` is set. Returns the head descriptor index.
 */
static void post(struct blkdev *b, u32 slot, u32 type, u64 sector, const struct seg *segs, u32 nsegs, bool indirect)
{
	struct queue_page *q = b->q;
	q->hdr[slot].type = type;
	q->hdr[slot].reserved = 0;
	q->hdr[slot].sector = sector;
	q->status[slot] = 0xff;

	struct vq_desc chain[4 + 2];
	u32 n = 0;
	chain[n++] = (struct vq_desc){ (u64)&q->hdr[slot], 16, 0, 0 };
	for (u32 i = 0; i < nsegs; i++)
		chain[n++] = (struct vq_desc){ (u64)segs[i].buf, segs[i].len, segs[i].write ? VIRTQ_DESC_F_WRITE : 0, 0 };
	chain[n++] = (struct vq_desc){ (u64)&q->status[slot], 1, VIRTQ_DESC_F_WRITE, 0 };

	u16 head = (u16)(slot * 4);      /* each slot owns descriptors [4*slot, 4*slot+4) */
	if (indirect && (b->features & F_INDIRECT_DESC) && n <= 4) {
		for (u32 i = 0; i < n; i++) {
			q->indirect[slot][i] = chain[i];
			q->indirect[slot][i].flags |= i + 1 < n ? VIRTQ_DESC_F_NEXT : 0;
			q->indirect[slot][i].next = (u16)(i + 1);
		}
		q->desc[head] = (struct vq_desc){ (u64)q->indirect[slot], n * 16, VIRTQ_DESC_F_INDIRECT, 0 };
	} else {
		for (u32 i = 0; i < n && i < 4; i++) {
			q->desc[head + i] = chain[i];
			q->desc[head + i].flags |= i + 1 < n ? VIRTQ_DESC_F_NEXT : 0;
			q->desc[head + i].next = (u16)(head + i + 1);
		}
	}
	u16 idx = rd_u16(&q->avail_idx);
	q->avail_ring[idx % QSIZE] = head;
	wr_u16(&q->avail_idx, (u16)(idx + 1));   /* x86 keeps stores in order; the barrier keeps gcc honest */
}

static void kick(struct blkdev *b, u16 old_idx)
{
	struct queue_page *q = b->q;
	__asm__ __volatile__("mfence" ::: "memory");
	u16 new_idx = rd_u16(&q->avail_idx);
	if (b->features & F_EVENT_IDX) {
		if (!need_event(rd_u16(&q->avail_event), new_idx, old_idx))
			return;
	} else if (rd_u16(&q->used_flags) & 1) {
		return;       /* VIRTQ_USED_F_NO_NOTIFY */
	}
	vm_write(b->dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
}

/* Waits until the used ring reaches `target`; false after about 5 s. */
static bool wait_used(struct blkdev *b, u16 target)
{
	struct queue_page *q = b->q;
	/* §2.7.10: with EVENT_IDX, ask for an interrupt once the device passes what we saw. */
	wr_u16(&q->used_event, (u16)(target - 1));
	__asm__ __volatile__("mfence" ::: "memory");
	for (u32 n = 0; n < 5000; n++) {
		cli();
		if ((u16)(rd_u16(&q->used_idx) - target) < 0x8000) {
			b->last_used = target;
			return true;
		}
		if (b->use_irq) {
			/* Interrupts wake the hlt; the watchdog timer covers a lost one. */
			lapic_oneshot(WATCHDOG_VECTOR, 2000);
			__asm__ __volatile__("sti; hlt; cli" ::: "memory");
		} else {
			__asm__ __volatile__("sti" ::: "memory");
			delay_us(200);
			cli();
		}
	}
	return false;
}

static bool request(struct blkdev *b, u32 type, u64 sector, const struct seg *segs, u32 nsegs, u8 *status)
{
	u16 old = rd_u16(&b->q->avail_idx);
	post(b, 0, type, sector, segs, nsegs, true);
	kick(b, old);
	bool done = wait_used(b, (u16)(old + 1));
	*status = done ? b->q->status[0] : 0xfe;
	return done && *status == 0;
}

/*
 * Feature negotiation and queue set-up (§3.1.1, §4.2.3.1-2). Returns false with
 * `why` set when the device is unusable.
 */
static bool blk_init(struct blkdev *b, const char **why)
{
	struct virtio_mmio_dev *d = b->dev;
	u64 wanted = VIRTIO_F_VERSION_1 | F_BLK_RO | F_BLK_BLK_SIZE | F_BLK_FLUSH | F_BLK_SEG_MAX | F_INDIRECT_DESC |
		     F_EVENT_IDX | F_BLK_DISCARD | F_BLK_WRITE_ZEROES;
	if (!virtio_negotiate(d, wanted, &b->features, why))
		return false;
	struct queue_page *q = b->q;
	memset(q, 0, sizeof(*q));
	if (!virtio_queue_setup(d, 0, QSIZE, q->desc, &q->avail_flags, &q->used_flags, why))
		return false;

	/* capacity (§5.2.4) is 64 bits: read it under an unchanged config generation (§4.2.3.1.1). */
	u32 gen, lo, hi;
	do {
		gen = vm_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
		lo = vm_read(d, VIRTIO_MMIO_CONFIG + 0);
		hi = vm_read(d, VIRTIO_MMIO_CONFIG + 4);
	} while (gen != vm_read(d, VIRTIO_MMIO_CONFIG_GENERATION));
	b->capacity = (u64)hi << 32 | lo;

	irq_handlers[IRQ_VECTOR_BASE + d->irq] = blk_irq;
	ioapic_route(d->irq, IRQ_VECTOR_BASE + d->irq);
	virtio_driver_ok(d);
	return true;
}

/* GET_ID, polling, with interrupts enabled: did the device's interrupt arrive? */
static bool blk_get_id(struct blkdev *b, char serial[21])
{
	u32 before = irq_counts[IRQ_VECTOR_BASE + b->dev->irq];
	u8 id[20];
	memset(id, 0, sizeof(id));
	struct seg s = { id, 20, true };
	u8 status;
	bool ok = request(b, T_GET_ID, 0, &s, 1, &status);
	/* Give a delivered interrupt time to arrive before deciding (interrupts are taken
	 * while the PIT delay's port I/O exits; a bare "sti; pause; cli" window is too short
	 * for this emulator). */
	for (u32 n = 0; n < 2000 && irq_counts[IRQ_VECTOR_BASE + b->dev->irq] == before; n++) {
		__asm__ __volatile__("sti" ::: "memory");
		delay_us(500);
		cli();
	}
	b->use_irq = irq_counts[IRQ_VECTOR_BASE + b->dev->irq] != before;
	u32 n = 0;
	for (; n < 20 && id[n]; n++)
		serial[n] = id[n] > ' ' && id[n] < 0x7f ? (char)id[n] : '?';
	serial[n] = 0;
	return ok;
}

/* The first 64 KiB, as four 16 KiB reads in flight together. */
static bool blk_read_head(struct blkdev *b, u32 *crc)
{
	u64 bytes = b->capacity * 512 < CRC_BYTES ? b->capacity * 512 : CRC_BYTES;
	u32 chunk = 16384;
	u32 nreq = (u32)((bytes + chunk - 1) / chunk);
	memset(data_buf, 0, sizeof(data_buf));
	u16 old = rd_u16(&b->q->avail_idx);
	for (u32 i = 0; i < nreq; i++) {
		u64 len = bytes - (u64)i * chunk < chunk ? bytes - (u64)i * chunk : chunk;
		struct seg s = { data_buf + i * chunk, (u32)len, true };
		post(b, i, T_IN, (u64)i * (chunk / 512), &s, 1, i % 2 == 0);
	}
	bool ok = true;
	if (nreq) {
		kick(b, old);
		ok = wait_used(b, (u16)(old + nreq));
		for (u32 i = 0; i < nreq; i++)
			ok = ok && b->q->status[i] == 0;
	}
	*crc = crc32(0, data_buf, bytes);
	return ok;
}

/* Sector 0 into an odd address, split 100 + 412 bytes: unaligned for O_DIRECT. */
static bool blk_unaligned(struct blkdev *b)
{
	if (!b->capacity)
		return true;
	u8 *odd = sector_buf[0] + 1;
	memset(sector_buf[0], 0x5a, sizeof(sector_buf[0]));
	struct seg s[2] = { { odd, 100, true }, { odd + 300, 412, true } };
	u8 status;
	if (!request(b, T_IN, 0, s, 2, &status))
		return false;
	return memcmp(odd, data_buf, 100) == 0 && memcmp(odd + 300, data_buf + 100, 412) == 0;
}

/* flotilla.nonce: "flotilla <index> <nonce>" into the last sector, flush, read back. */
static const char *blk_nonce(struct blkdev *b)
{
	if (!opt_nonce || !b->capacity)
		return NULL;
	u8 *out = sector_buf[0], *in = sector_buf[1];
	memset(out, 0, 512);
	char line[64];
	size_t nl = opt_nonce_len < 40 ? opt_nonce_len : 40;
	char nonce[41];
	memcpy(nonce, opt_nonce, nl);
	nonce[nl] = 0;
	int len = ksnprintf(line, sizeof(line), "flotilla %u %s", b->index, nonce);
	memcpy(out, line, (size_t)len);
	u64 last = b->capacity - 1;
	struct seg w = { out, 512, false };
	u8 status;
	bool wrote = request(b, T_OUT, last, &w, 1, &status);
	if (b->features & F_BLK_RO)
		return !wrote && status == 1 ? "refused" : "not-refused";
	if (!wrote)
		return "write-failed";
	if ((b->features & F_BLK_FLUSH) && !request(b, T_FLUSH, 0, NULL, 0, &status))
		return "flush-failed";
	memset(in, 0, 512);
	struct seg r = { in, 512, true };
	if (!request(b, T_IN, last, &r, 1, &status))
		return "read-failed";
	return memcmp(in, out, 512) == 0 ? "written" : "mismatch";
}

/* struct virtio_blk_discard_write_zeroes (§5.2.6): one segment per request. */
static struct { u64 sector; u32 num_sectors; u32 flags; } range_seg;

/*
 * Writes a pattern over `count` sectors from `sector`, then sends `type`
 * (DISCARD or WRITE_ZEROES) over them; *zeroed says whether they read back as
 * zeroes afterwards. Returns the result for the check line.
 */
static const char *blk_drop(struct blkdev *b, u32 type, u64 sector, u32 count, bool *zeroed)
{
	u64 feature = type == T_DISCARD ? F_BLK_DISCARD : F_BLK_WRITE_ZEROES;
	/* §5.2.4: max_discard_sectors at 36, max_write_zeroes_sectors at 48. */
	u32 limit = vm_read(b->dev, VIRTIO_MMIO_CONFIG + (type == T_DISCARD ? 36 : 48));
	*zeroed = false;
	if (!(b->features & feature))
		return "not-offered";
	if (limit < count)
		return "limit-too-small";
	u32 bytes = count * 512;
	/* 8-byte stores and loads: the emulated guest runs ~1M instructions/s. */
	u64 *words = (u64 *)data_buf;
	for (u32 i = 0; i < bytes / 8; i++)
		words[i] = 0x0101010101010101UL * (u64)((i & 0x7f) | 1) ^ (u64)i << 8;   /* low byte never 0 */
	struct seg w = { data_buf, bytes, false };
	u8 status;
	if (!request(b, T_OUT, sector, &w, 1, &status))
		return "pattern-write-failed";
	range_seg.sector = sector;
	range_seg.num_sectors = count;
	range_seg.flags = 0;
	struct seg r = { &range_seg, sizeof(range_seg), false };
	if (!request(b, type, 0, &r, 1, &status))
		return "refused";
	for (u32 i = 0; i < bytes / 8; i++)
		words[i] = ~0UL;
	struct seg back = { data_buf, bytes, true };
	if (!request(b, T_IN, sector, &back, 1, &status))
		return "read-failed";
	u64 any = 0;
	for (u32 i = 0; i < bytes / 8; i++)
		any |= words[i];
	*zeroed = any == 0;
	return "done";
}

/* flotilla.nonce on a writable disk: WRITE_ZEROES must zero, DISCARD must succeed. */
static bool blk_discard_checks(struct blkdev *b)
{
	if (!opt_nonce || (b->features & F_BLK_RO) || b->capacity <= DISCARD_SECTOR + DISCARD_SECTORS)
		return true;
	char name[32];
	bool zeroed;
	const char *wz = blk_drop(b, T_WRITE_ZEROES, WZ_SECTOR, WZ_SECTORS, &zeroed);
	bool wz_ok = wz[0] == 'd' && zeroed;
	ksnprintf(name, sizeof(name), "blk%u_write_zeroes", b->index);
	check(name, wz_ok, "sectors=%u+%u result=%s zeroed=%u", WZ_SECTOR, WZ_SECTORS, wz, zeroed ? 1 : 0);
	/* §5.2.6.2: DISCARD is a hint; the data may or may not read back as zeroes. */
	const char *dc = blk_drop(b, T_DISCARD, DISCARD_SECTOR, DISCARD_SECTORS, &zeroed);
	bool dc_ok = dc[0] == 'd';
	ksnprintf(name, sizeof(name), "blk%u_discard", b->index);
	check(name, dc_ok, "sectors=%u+%u result=%s zeroed=%u", DISCARD_SECTOR, DISCARD_SECTORS, dc, zeroed ? 1 : 0);
	return wz_ok && dc_ok;
}

/* flotilla.blkloop=<n>: n single-sector reads back to back, for rate measurements. */
static void blk_loop(struct blkdev *b)
{
	u64 ok = 0;
	kprintf("flotilla-guest: fact blk-loop start n=%lu\n", opt_blkloop);
	for (u64 i = 0; i < opt_blkloop; i++) {
		struct seg s = { sector_buf[1], 512, true };
		u8 status;
		if (request(b, T_IN, 0, &s, 1, &status))
			ok++;
	}
	kprintf("flotilla-guest: fact blk-loop end n=%lu ok=%lu\n", opt_blkloop, ok);
}

/* A hot-unplugged disk (flotilla.rescan): its entry is free for the next one. */
void virtio_blk_remove(struct virtio_mmio_dev *d)
{
	for (u32 i = 0; i < ndisks; i++)
		if (disks[i].dev == d)
			disks[i].dev = NULL;
}

bool virtio_blk_probe(struct virtio_mmio_dev *d)
{
	u32 slot = 0;
	while (slot < ndisks && disks[slot].dev)
		slot++;
	if (slot >= MAX_DISKS) {
		check("virtio-blk", false, "base=0x%lx more than %u disks", d->base, MAX_DISKS);
		return false;
	}
	if (slot == ndisks)
		ndisks++;
	struct blkdev *b = &disks[slot];
	memset(b, 0, sizeof(*b));
	b->dev = d;
	b->q = &queue_pages[slot];
	b->index = slot;
	const char *why = NULL;
	char name[16];
	ksnprintf(name, sizeof(name), "virtio-blk%u", b->index);
	if (!blk_init(b, &why)) {
		check(name, false, "base=0x%lx init=%s", d->base, why);
		return false;
	}
	char serial[21];
	bool id_ok = blk_get_id(b, serial);
	u32 crc = 0;
	bool head_ok = blk_read_head(b, &crc);
	bool unaligned_ok = blk_unaligned(b);
	bool ro = (b->features & F_BLK_RO) != 0;
	kprintf("flotilla-guest: fact device virtio-blk base=0x%lx irq=%u capacity=%lu serial=%s ro=%u crc32=%08x notify=%s indirect=%u event_idx=%u\n",
		d->base, d->irq, b->capacity, serial, ro ? 1 : 0, crc, b->use_irq ? "interrupt" : "poll",
		(b->features & F_INDIRECT_DESC) ? 1 : 0, (b->features & F_EVENT_IDX) ? 1 : 0);
	const char *nonce = blk_nonce(b);
	bool nonce_ok = true;
	if (nonce) {
		kprintf("flotilla-guest: fact virtio-blk-nonce index=%u result=%s\n", b->index, nonce);
		nonce_ok = ro ? nonce[0] == 'r' : nonce[0] == 'w';
	}
	bool drop_ok = blk_discard_checks(b);
	if (b->index == 0 && opt_blkloop)
		blk_loop(b);
	bool ok = id_ok && head_ok && unaligned_ok && nonce_ok && drop_ok;
	check(name, ok, "base=0x%lx get_id=%s read=%s unaligned=%s nonce=%s", d->base, id_ok ? "ok" : "fail",
	      head_ok ? "ok" : "fail", unaligned_ok ? "ok" : "fail", nonce ? nonce : "none");
	return ok;
}
