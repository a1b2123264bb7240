import Glibc

/// Builds inputs in the byte layout FuzzCase decodes (all little-endian):
///
///     0      size: 1 << (byte % 9), so 1...256
///     1      flags: 1 EVENT_IDX, 2 INDIRECT_DESC, 4 raw layout (no transport check, no
///            alignment), 8 a second batch after the driver sets avail idx again
///     2..9   u16 offsets from the window base (RAM end - 64 KiB) of the descriptor table,
///            the avail ring, the used ring and the blob
///     10..17 u16 avail flags, avail idx, used_event, avail idx for the second batch
///     then   16·size bytes of descriptor table, 2·size bytes of avail ring entries,
///            up to 4 KiB of blob (indirect tables), each cut short where the input ends
struct Seed {
    static let blobAddress = windowBase + 0x3000
    static let buffers: UInt64 = 0x1000

    var name: String
    var size: UInt16 = 8
    var flags: UInt8 = 2
    var offsets: (desc: UInt16, avail: UInt16, used: UInt16, blob: UInt16) = (0, 0x1000, 0x2000, 0x3000)
    var availFlags: UInt16 = 0
    var availIndex: UInt16 = 0
    var usedEvent: UInt16 = 0
    var availIndex2: UInt16 = 0
    var table: [UInt8]
    var ring: [UInt16] = []
    var blob: [UInt8] = []

    init(_ name: String, size: UInt16 = 8, flags: UInt8 = 2) {
        self.name = name
        self.size = size
        self.flags = flags
        table = [UInt8](repeating: 0, count: 16 * Int(size))
    }

    static func descriptor(address: UInt64, length: UInt32, flags: UInt16, next: UInt16) -> [UInt8] {
        withUnsafeBytes(of: address.littleEndian, Array.init) + withUnsafeBytes(of: length.littleEndian, Array.init)
            + withUnsafeBytes(of: flags.littleEndian, Array.init) + withUnsafeBytes(of: next.littleEndian, Array.init)
    }

    /// Descriptor `i` of the queue's table.
    mutating func d(_ i: UInt16, _ address: UInt64, _ length: UInt32, flags: UInt16 = 0, next: UInt16 = 0) {
        table.replaceSubrange(
            16 * Int(i)..<16 * Int(i) + 16, with: Self.descriptor(address: address, length: length, flags: flags, next: next))
    }

    /// Descriptor `i` of an indirect table at the start of the blob.
    mutating func indirect(_ i: Int, _ address: UInt64, _ length: UInt32, flags: UInt16 = 0, next: UInt16 = 0) {
        if blob.count < 16 * i + 16 { blob += [UInt8](repeating: 0, count: 16 * i + 16 - blob.count) }
        blob.replaceSubrange(16 * i..<16 * i + 16, with: Self.descriptor(address: address, length: length, flags: flags, next: next))
    }

    /// Makes `heads` available (avail idx = their count).
    mutating func publish(_ heads: UInt16...) {
        ring += heads
        availIndex = UInt16(ring.count)
    }

    var bytes: [UInt8] {
        var out: [UInt8] = [UInt8(size.trailingZeroBitCount), flags]
        for v in [offsets.desc, offsets.avail, offsets.used, offsets.blob, availFlags, availIndex, usedEvent, availIndex2] {
            out += [UInt8(truncatingIfNeeded: v), UInt8(v >> 8)]
        }
        out += table
        var entries = ring.flatMap { [UInt8(truncatingIfNeeded: $0), UInt8($0 >> 8)] }
        entries += [UInt8](repeating: 0, count: max(0, 2 * Int(size) - entries.count))
        out += entries.prefix(2 * Int(size))
        return out + blob
    }
}

/// A handful of small valid and malformed queues (the shapes of VirtqueueTests' cases).
func seeds() -> [Seed] {
    let b = Seed.buffers
    var all: [Seed] = []
    func add(_ name: String, size: UInt16 = 8, flags: UInt8 = 2, _ build: (inout Seed) -> Void) {
        var s = Seed(name, size: size, flags: flags)
        build(&s)
        all.append(s)
    }
    add("valid-read-write") { s in
        s.d(0, b, 16, flags: 1, next: 3)
        s.d(3, b + 0x100, 512, flags: 1 | 2, next: 5)
        s.d(5, b + 0x400, 1, flags: 2)
        s.publish(0)
    }
    add("valid-indirect") { s in
        s.indirect(0, b, 16, flags: 1, next: 1)
        s.indirect(1, b + 0x100, 1, flags: 2)
        s.d(2, Seed.blobAddress, 32, flags: 4)
        s.publish(2)
    }
    add("valid-many-event-idx-two-rounds", size: 16, flags: 1 | 2 | 8) { s in
        for i in UInt16(0)..<16 { s.d(i, b + 0x200 * UInt64(i), 512, flags: i % 2 == 0 ? 1 : 2, next: i + 1) }
        s.publish(0, 2, 4, 6, 8, 10)
        s.usedEvent = 3
        s.availIndex2 = 16
        s.ring += [12, 14, 0, 2, 4, 6, 8, 10, 12, 14]
    }
    add("valid-size-1", size: 1) { s in
        s.d(0, b, 1, flags: 2)
        s.publish(0)
    }
    add("valid-size-256", size: 256) { s in
        for i in UInt16(0)..<256 { s.d(i, b, 64, flags: i == 255 ? 2 : 1 | 2, next: i + 1) }
        s.publish(0, 128, 255)
    }
    add("loop") { s in
        s.d(0, b, 16, flags: 1, next: 1)
        s.d(1, b, 16, flags: 1, next: 0)
        s.publish(0)
    }
    add("longer-than-queue") { s in
        for i in UInt16(0)..<6 { s.d(i, b, 16, flags: 1, next: i == 5 ? 1 : i + 1) }
        s.publish(0)
    }
    add("next-beyond-size") { s in
        s.d(0, b, 16, flags: 1, next: 9)
        s.publish(0)
    }
    add("zero-length-and-outside-ram") { s in
        s.d(0, b, 0)
        s.d(1, 0xffff_ffff_0000, 16)
        s.d(2, UInt64.max - 7, 16)
        s.d(3, ramSize - 8, 16)
        s.publish(0, 1, 2, 3)
    }
    add("readable-after-writable") { s in
        s.d(0, b, 1, flags: 1 | 2, next: 1)
        s.d(1, b, 16)
        s.publish(0)
    }
    add("indirect-malformed") { s in
        s.indirect(0, Seed.blobAddress, 16, flags: 4)
        s.d(0, Seed.blobAddress, 16, flags: 4)  // nested
        s.d(1, Seed.blobAddress, 16, flags: 4 | 1, next: 2)  // with NEXT
        s.d(2, Seed.blobAddress, 24, flags: 4)  // odd length
        s.d(3, 0xdead_0000_0000, 32, flags: 4)  // outside RAM
        s.d(4, ramSize - 16, 32, flags: 4)  // runs past the end of RAM
        s.publish(0, 1, 2, 3, 4)
    }
    add("indirect-longer-than-queue") { s in
        for i in 0..<16 { s.indirect(i, b, 16, flags: 1, next: UInt16(i + 1)) }
        s.d(0, Seed.blobAddress, 256, flags: 4)
        s.publish(0)
    }
    add("indirect-without-feature", flags: 0) { s in
        s.indirect(0, b, 16)
        s.d(0, Seed.blobAddress, 16, flags: 4)
        s.publish(0)
    }
    add("avail-head-beyond-size") { s in
        s.d(0, b, 16)
        s.publish(0, 200)
    }
    add("avail-idx-jump") { s in
        s.d(0, b, 16)
        s.publish(0)
        s.availIndex = 9
    }
    add("rings-past-end-of-ram", flags: 2 | 4) { s in
        s.d(0, b, 16, flags: 2)
        s.publish(0, 0)
        s.offsets = (0xfff0, 0xffee, 0xffc4, 0x3000)
    }
    add("used-ring-over-avail-ring", flags: 2 | 4) { s in
        s.d(0, b, 16, flags: 2)
        s.publish(0, 0, 0)
        s.offsets = (0, 0x1000, 0x0ffe, 0x3000)
    }
    add("misaligned-rings", flags: 2 | 4) { s in
        s.d(0, b, 16, flags: 1, next: 1)
        s.d(1, b, 16, flags: 2)
        s.publish(0)
        s.offsets = (0x0003, 0x1001, 0x2003, 0x3000)
    }
    return all
}

/// `--write-seeds DIR`: writes the seed corpus, one file per seed.
func writeSeeds(to directory: String) {
    for seed in seeds() {
        let bytes = seed.bytes
        precondition(bytes.count <= FuzzCase.maxLength)
        let path = "\(directory)/\(seed.name)"
        guard let file = fopen(path, "wb") else { fatalError("cannot write \(path)") }
        _ = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, file) }
        fclose(file)
    }
}
