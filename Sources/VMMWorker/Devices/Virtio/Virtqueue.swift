import Synchronization

/// Where the driver put one split virtqueue and how large it is (virtio 1.2 §2.7, §4.2.3.2).
public struct VirtqueueLayout: Sendable, Equatable {
    public var size: UInt16
    public var descriptorTable: UInt64
    public var availableRing: UInt64
    public var usedRing: UInt64

    public init(size: UInt16, descriptorTable: UInt64, availableRing: UInt64, usedRing: UInt64) {
        self.size = size
        self.descriptorTable = descriptorTable
        self.availableRing = availableRing
        self.usedRing = usedRing
    }

    /// Bytes of each part (§2.7 "Virtqueue Part Sizes"): 16·size, 6 + 2·size, 6 + 8·size
    /// (the trailing used_event/avail_event included).
    var descriptorTableBytes: UInt64 { 16 * UInt64(size) }
    var availableRingBytes: UInt64 { 6 + 2 * UInt64(size) }
    var usedRingBytes: UInt64 { 6 + 8 * UInt64(size) }

    /// Checks what §2.7 requires before the driver may set QueueReady: a non-zero power-of-two
    /// size no larger than `maxSize`, the alignments of §2.7 Table "Virtqueue Part Alignment"
    /// (16, 2, 4), and every part inside guest RAM. Returns why it is unusable, or nil.
    func problem(maxSize: UInt16, memory: GuestMemory) -> String? {
        guard size != 0, size & (size &- 1) == 0 else { return "queue size \(size) is not a power of 2" }
        guard size <= maxSize else { return "queue size \(size) exceeds QueueNumMax \(maxSize)" }
        guard descriptorTable % 16 == 0, availableRing % 2 == 0, usedRing % 4 == 0 else {
            return "misaligned rings (descriptors \(hex(descriptorTable)), driver \(hex(availableRing)), device \(hex(usedRing)))"
        }
        guard memory.contains(descriptorTable, length: descriptorTableBytes),
            memory.contains(availableRing, length: availableRingBytes),
            memory.contains(usedRing, length: usedRingBytes)
        else { return "a ring lies outside guest RAM" }
        return nil
    }
}

/// One guest buffer of a descriptor chain, checked to lie inside one region of guest RAM when
/// it was made; `hostOffset` is where that check put it in the host mapping, so the device
/// uses the bytes without translating (or checking) the address a second time.
public struct GuestSegment: Sendable, Equatable {
    public let address: UInt64
    public let length: UInt32
    /// Offset of `address` in the host mapping of guest RAM (``GuestMemory/hostOffset(_:length:)``).
    let hostOffset: Int

    /// A checked segment: `[address, address + length)` must lie inside one region of `memory`.
    init(address: UInt64, length: UInt32, in memory: GuestMemory) throws(MemoryError) {
        self.address = address
        self.length = length
        hostOffset = try memory.hostOffset(address, length: UInt64(length))
    }

    /// For the walker, which has just done the check.
    @inline(__always)
    init(address: UInt64, length: UInt32, hostOffset: Int) {
        self.address = address
        self.length = length
        self.hostOffset = hostOffset
    }

    static let empty = GuestSegment(address: 0, length: 0, hostOffset: 0)
}

/// A descriptor chain taken from the available ring: its head (what goes back on the used
/// ring) and its buffers, device-readable ones first (§2.7.4.2: "A driver MUST place any
/// device-writable descriptor elements after any device-readable descriptor elements").
///
/// A device keeps one per queue and refills it with ``SplitVirtqueue/next(into:)``: the
/// segment storage is sized to the queue once (a chain has at most Queue Size buffers,
/// §2.7.4.2), and a walk stores into it, so taking a chain allocates nothing.
public struct DescriptorChain: Sendable, Equatable {
    public internal(set) var head: UInt16
    /// The buffers, readable then writable; only the first `readableCount + writableCount`
    /// entries belong to this chain.
    var storage: [GuestSegment] = []
    public internal(set) var readableCount = 0
    public internal(set) var writableCount = 0
    public internal(set) var readableLength: UInt64 = 0
    public internal(set) var writableLength: UInt64 = 0

    public init(head: UInt16) {
        self.head = head
    }

    /// A chain made of already checked segments (unit tests of request handlers).
    init(head: UInt16, readable: [GuestSegment], writable: [GuestSegment]) {
        self.head = head
        storage = readable + writable
        readableCount = readable.count
        writableCount = writable.count
        readableLength = readable.reduce(0) { $0 + UInt64($1.length) }
        writableLength = writable.reduce(0) { $0 + UInt64($1.length) }
    }

    /// Index of the first writable segment in `storage`; the end is `segmentCount`.
    var segmentCount: Int { readableCount + writableCount }

    /// The segments of one direction: readable ones, or writable ones.
    func segments(readable: Bool) -> Range<Int> { readable ? 0..<readableCount : readableCount..<segmentCount }

    /// Calls `body(hostOffset, length)` for each piece of guest memory, in order, that makes up
    /// at most `count` bytes starting `skip` bytes into the segments `range` (fewer if they
    /// hold fewer). Pieces are never empty.
    @inline(__always)
    func forEachPiece(in range: Range<Int>, skip: UInt64, count: UInt64, _ body: (_ hostOffset: Int, _ length: Int) -> Void) {
        var toSkip = skip
        var left = count
        for i in range where left > 0 {
            let segment = storage[i]
            let length = UInt64(segment.length)
            if toSkip >= length {
                toSkip -= length
                continue
            }
            let take = min(length - toSkip, left)
            body(segment.hostOffset + Int(toSkip), Int(take))
            left -= take
            toSkip = 0
        }
    }
    public var readable: ArraySlice<GuestSegment> { storage[0..<readableCount] }
    public var writable: ArraySlice<GuestSegment> { storage[readableCount..<segmentCount] }

    public static func == (a: DescriptorChain, b: DescriptorChain) -> Bool {
        a.head == b.head && a.readable == b.readable && a.writable == b.writable
    }
}

/// Why a chain or a queue is unusable. Every guest-controlled value is checked; none of these
/// stops the VMM: a bad chain fails its request, a bad ring marks the device broken.
public struct VirtqueueError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// The ring itself is unusable (bad avail index, head out of range, ring not in RAM):
        /// the device must be reset (DEVICE_NEEDS_RESET, §2.1.2).
        case queue
        /// One chain is malformed; its head is known, so the request can fail on its own.
        case chain(head: UInt16)
    }
    public let kind: Kind
    public let reason: String

    public var description: String {
        switch kind {
        case .queue: "virtqueue broken: \(reason)"
        case .chain(let head): "descriptor chain \(head) malformed: \(reason)"
        }
    }
}

/// The device side of one split virtqueue (§2.7), driven from one thread at a time (the
/// thread of the device's event loop). Every guest-controlled value is checked: the rings
/// were placed inside guest RAM once (their host offsets are kept, and the layout and RAM
/// never change), descriptor and avail indices are checked against the table and queue
/// sizes before they are used, every buffer address and length is translated with
/// overflow-safe bounds checks, and chain walks are bounded by the queue size, so a
/// malicious driver can neither escape guest RAM nor make this loop forever.
public struct SplitVirtqueue: Sendable {
    static let descriptorNext: UInt16 = 1
    static let descriptorWrite: UInt16 = 2
    static let descriptorIndirect: UInt16 = 4
    /// §2.7.7: VIRTQ_AVAIL_F_NO_INTERRUPT.
    static let availNoInterrupt: UInt16 = 1

    public let layout: VirtqueueLayout
    public let memory: GuestMemory
    public let eventIndex: Bool
    public let indirect: Bool
    /// The next available-ring slot to take (free-running, §2.7.6 "last_avail_idx").
    public private(set) var lastAvailable: UInt16 = 0
    /// The used ring's idx as this device last published it.
    public private(set) var usedIndex: UInt16 = 0
    /// The used idx at the last interrupt decision (for VIRTIO_F_EVENT_IDX, §2.7.10).
    private var signalledUsed: UInt16 = 0

    /// Host offsets of the three rings, each checked to lie wholly inside one RAM region
    /// (including used_event/avail_event). nil when they do not, or when the size is not a
    /// power of 2 (§2.7: "Queue Size value is always a power of 2"; ring slots are then
    /// `index & (size - 1)`): such a queue is broken at its first use. The transport never activates one
    /// (``VirtqueueLayout/problem(maxSize:memory:)``).
    struct Rings {
        let descriptors: Int
        let available: Int
        let used: Int
    }
    let rings: Rings?

    public init(layout: VirtqueueLayout, memory: GuestMemory, eventIndex: Bool, indirect: Bool) {
        self.layout = layout
        self.memory = memory
        self.eventIndex = eventIndex
        self.indirect = indirect
        if layout.size != 0, layout.size & (layout.size &- 1) == 0,
            let descriptors = try? memory.hostOffset(layout.descriptorTable, length: layout.descriptorTableBytes),
            let available = try? memory.hostOffset(layout.availableRing, length: layout.availableRingBytes),
            let used = try? memory.hostOffset(layout.usedRing, length: layout.usedRingBytes)
        {
            rings = Rings(descriptors: descriptors, available: available, used: used)
        } else {
            rings = nil
        }
    }

    var size: UInt16 { layout.size }
    /// `index % size` for the free-running ring indices (size is a power of 2 once `rings`
    /// is set, which every use of a slot checks first).
    @inline(__always)
    func slot(_ index: UInt16) -> Int { Int(index & (layout.size &- 1)) }

    /// The checked ring offsets, or the error that breaks the queue.
    @inline(__always)
    func checkedRings() throws(VirtqueueError) -> Rings {
        guard let rings else { throw VirtqueueError(kind: .queue, reason: "a ring lies outside guest RAM") }
        return rings
    }

    /// A little-endian integer at byte `offset` of the host mapping (inside a checked ring).
    @inline(__always)
    func load<T: FixedWidthInteger>(_: T.Type, _ offset: Int) -> T {
        T(littleEndian: (memory.base + offset).loadUnaligned(as: T.self))
    }

    @inline(__always)
    func store<T: FixedWidthInteger>(_ value: T, _ offset: Int) {
        (memory.base + offset).storeBytes(of: value.littleEndian, as: T.self)
    }

    /// The driver's avail->idx.
    @inline(__always)
    func availableIndex(_ rings: Rings) -> UInt16 {
        let index = load(UInt16.self, rings.available + 2)
        // Acquire: ring entries written before idx must be seen after it (§2.7.13.2).
        atomicMemoryFence(ordering: .acquiring)
        return index
    }

    /// Whether the driver has made buffers available that this device has not taken.
    public func hasPending() throws(VirtqueueError) -> Bool {
        availableIndex(try checkedRings()) != lastAvailable
    }

    /// Takes the next available chain, or nil when there is none. A `.queue` error means the
    /// queue can no longer be trusted; a `.chain` error consumed the chain, which must be
    /// completed (failed) by the caller with ``complete(head:written:)``.
    public mutating func next() throws(VirtqueueError) -> DescriptorChain? {
        var chain = DescriptorChain(head: 0)
        return try next(into: &chain) ? chain : nil
    }

    /// ``next()`` into a chain the caller keeps: refills `chain` (reusing its storage) and
    /// returns true, or returns false when the driver has made nothing new available.
    public mutating func next(into chain: inout DescriptorChain) throws(VirtqueueError) -> Bool {
        let rings = try checkedRings()
        let available = availableIndex(rings)
        if available == lastAvailable { return false }
        // §2.7.13.3: the driver may not have more than size buffers outstanding; an idx that
        // jumps further is a driver bug we must not follow.
        guard available &- lastAvailable <= size else {
            throw VirtqueueError(kind: .queue, reason: "avail idx \(available) is more than \(size) ahead of \(lastAvailable)")
        }
        // slot < size: inside the checked ring.
        let slot = slot(lastAvailable)
        let head = load(UInt16.self, rings.available + 4 + 2 * slot)
        guard head < size else {
            throw VirtqueueError(kind: .queue, reason: "avail ring entry \(slot) names descriptor \(head), beyond queue size \(size)")
        }
        lastAvailable &+= 1
        try walk(head: head, rings: rings, into: &chain)
        return true
    }

    /// Gives back the chain the last successful ``next(into:)`` took, unused: the next call
    /// takes the same available-ring slot again (walking it afresh). The device has published
    /// nothing for it, so the driver cannot tell (§2.7.13: buffers stay the device's until
    /// used).
    mutating func untake() {
        lastAvailable &-= 1
    }

    /// Follows the chain from `head` (§2.7.5), through at most one indirect table (§2.7.5.3).
    func walk(head: UInt16) throws(VirtqueueError) -> DescriptorChain {
        var chain = DescriptorChain(head: head)
        try walk(head: head, rings: try checkedRings(), into: &chain)
        return chain
    }

    /// ``walk(head:)`` into `chain` (its storage is reused).
    func walk(head: UInt16, rings: Rings, into chain: inout DescriptorChain) throws(VirtqueueError) {
        func fail(_ reason: String) -> VirtqueueError { VirtqueueError(kind: .chain(head: head), reason: reason) }
        // §2.7.4.2 / §2.7.5.3.1: the whole chain, indirect descriptors included, is at most
        // Queue Size long; counting every step bounds the loop even when `next` cycles, and
        // bounds the segments stored.
        let limit = Int(size)
        if chain.storage.count < limit { chain.storage = Array(repeating: .empty, count: limit) }
        chain.head = head
        chain.readableCount = 0
        chain.writableCount = 0
        chain.readableLength = 0
        chain.writableLength = 0

        let memory = memory
        let base = memory.base
        let indirectAllowed = indirect
        var readableLength: UInt64 = 0
        var writableLength: UInt64 = 0
        var readable = 0
        var writable = 0
        // Stores straight into the storage: one uniqueness check per walk, not per segment.
        let result: VirtqueueError? = chain.storage.withUnsafeMutableBufferPointer { segments -> VirtqueueError? in
            // The table being walked: its host offset and entry count (the whole table was
            // checked to lie in guest RAM, so entry `index < tableSize` is inside it).
            var table = rings.descriptors
            var tableSize = UInt32(size)
            var index = UInt32(head)
            var seen = 0
            var inIndirect = false
            while true {
                guard index < tableSize else { return fail("next index \(index) beyond table size \(tableSize)") }
                seen += 1
                guard seen <= limit else { return fail("longer than the queue size \(limit) (a loop?)") }
                // One read of the guest's descriptor (it may change it at any time; every
                // field is used from this copy only).
                let at = base + table + 16 * Int(index)
                let address = UInt64(littleEndian: at.loadUnaligned(as: UInt64.self))
                let length = UInt32(littleEndian: at.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
                let flags = UInt16(littleEndian: at.loadUnaligned(fromByteOffset: 12, as: UInt16.self))
                let next = UInt16(littleEndian: at.loadUnaligned(fromByteOffset: 14, as: UInt16.self))
                if flags & Self.descriptorIndirect != 0 {
                    // §2.7.5.3.1: only with VIRTIO_F_INDIRECT_DESC, never nested, never with NEXT.
                    guard indirectAllowed else { return fail("indirect descriptor without VIRTIO_F_INDIRECT_DESC") }
                    guard !inIndirect else { return fail("nested indirect table") }
                    guard flags & Self.descriptorNext == 0 else { return fail("indirect descriptor with NEXT set") }
                    guard length != 0, length % 16 == 0 else {
                        return fail("indirect table length \(length) is not a non-zero multiple of 16")
                    }
                    guard let offset = try? memory.hostOffset(address, length: UInt64(length)) else {
                        return fail("indirect table [\(hex(address)), +\(length)) is not in guest RAM")
                    }
                    guard length / 16 <= UInt32(UInt16.max) else { return fail("indirect table of \(length / 16) entries") }
                    table = offset
                    tableSize = length / 16
                    index = 0
                    inIndirect = true
                    // The indirect descriptor itself does not count as a buffer.
                    seen -= 1
                    continue
                }
                guard length != 0 else { return fail("zero-length descriptor \(index)") }
                guard let offset = try? memory.hostOffset(address, length: UInt64(length)) else {
                    return fail("buffer [\(hex(address)), +\(length)) is not in guest RAM")
                }
                // seen <= limit == storage count: the store is in bounds.
                segments[readable + writable] = GuestSegment(address: address, length: length, hostOffset: offset)
                // At most `size` (≤ 32768) segments of < 2^32 bytes each: the sums cannot overflow.
                if flags & Self.descriptorWrite != 0 {
                    writable += 1
                    writableLength += UInt64(length)
                } else {
                    guard writable == 0 else { return fail("device-readable descriptor \(index) after a device-writable one") }
                    readable += 1
                    readableLength += UInt64(length)
                }
                guard flags & Self.descriptorNext != 0 else { return nil }
                index = UInt32(next)
            }
        }
        if let result { throw result }
        chain.readableCount = readable
        chain.writableCount = writable
        chain.readableLength = readableLength
        chain.writableLength = writableLength
    }

    /// Puts `head` on the used ring with `written` bytes written to its device-writable
    /// buffers (§2.7.8) and publishes the new used idx; with `publish` false the idx stays
    /// unpublished until ``publishUsed()``, so several elements appear to the driver at once
    /// (virtio-net MRG_RXBUF: the buffers of one packet, §5.1.6.4).
    public mutating func complete(head: UInt16, written: UInt32, publish: Bool = true) throws(VirtqueueError) {
        guard let rings else { throw VirtqueueError(kind: .queue, reason: "used ring unwritable") }
        // slot < size: inside the checked ring.
        let element = rings.used + 4 + 8 * slot(usedIndex)
        store(UInt32(head), element)
        store(written, element + 4)
        usedIndex &+= 1
        if publish { publishUsed() }
    }

    /// Publishes the used elements completed so far (the used idx).
    public mutating func publishUsed() {
        guard let rings else { return }
        // Release: the elements must be visible before the idx that publishes them.
        atomicMemoryFence(ordering: .releasing)
        store(usedIndex, rings.used + 2)
    }

    /// With VIRTIO_F_EVENT_IDX, tells the driver to notify once it makes the next buffer
    /// available (avail_event = last_avail_idx, §2.7.10), then reports whether buffers
    /// arrived meanwhile (the caller processes them instead of waiting for a kick).
    public mutating func rearmNotification() throws(VirtqueueError) -> Bool {
        let rings = try checkedRings()
        if eventIndex {
            store(lastAvailable, rings.used + 4 + 8 * Int(size))
            // Full fence: the avail_event store must be visible before idx is re-read, else a
            // driver check in between misses it and neither side acts (§2.7.10).
            atomicMemoryFence(ordering: .sequentiallyConsistent)
        }
        return availableIndex(rings) != lastAvailable
    }

    /// Whether the driver wants an interrupt for the buffers used since the last call
    /// (§2.7.10 with EVENT_IDX: vring_need_event(used_event, new, old); without it, unless
    /// VIRTQ_AVAIL_F_NO_INTERRUPT is set).
    public mutating func needsInterrupt() -> Bool {
        // Full fence: the used idx store must be visible before the driver's flags or
        // used_event are read (the driver does the mirror image, §2.7.10).
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        let old = signalledUsed
        let new = usedIndex
        signalledUsed = new
        guard old != new else { return false }
        guard let rings else { return true }
        if eventIndex {
            let usedEvent = load(UInt16.self, rings.available + 4 + 2 * Int(size))
            return new &- usedEvent &- 1 < new &- old
        }
        return load(UInt16.self, rings.available) & Self.availNoInterrupt == 0
    }
}
