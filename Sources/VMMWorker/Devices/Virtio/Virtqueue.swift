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

/// One guest buffer of a descriptor chain, already checked to lie inside guest RAM.
public struct GuestSegment: Sendable, Equatable {
    public let address: UInt64
    public let length: UInt32
}

/// A descriptor chain taken from the available ring: its head (what goes back on the used
/// ring) and its buffers, device-readable ones first (§2.7.4.2: "A driver MUST place any
/// device-writable descriptor elements after any device-readable descriptor elements").
///
/// A device keeps one per queue and refills it with ``SplitVirtqueue/next(into:)``: the arrays
/// keep their capacity, so taking a chain allocates nothing once the queue has warmed up.
public struct DescriptorChain: Sendable, Equatable {
    public internal(set) var head: UInt16
    public var readable: [GuestSegment] = []
    public var writable: [GuestSegment] = []
    public var readableLength: UInt64 = 0
    public var writableLength: UInt64 = 0

    public init(head: UInt16) {
        self.head = head
    }

    /// Empties the chain for reuse, keeping the arrays' storage.
    mutating func reset(head: UInt16) {
        self.head = head
        readable.removeAll(keepingCapacity: true)
        writable.removeAll(keepingCapacity: true)
        readableLength = 0
        writableLength = 0
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
/// thread of the device's event loop). Every read of guest memory is bounds-checked through
/// ``GuestMemory``; indices are reduced modulo the queue size; chain walks are bounded by the
/// queue size, so a malicious driver can neither escape guest RAM nor make this loop forever.
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

    public init(layout: VirtqueueLayout, memory: GuestMemory, eventIndex: Bool, indirect: Bool) {
        self.layout = layout
        self.memory = memory
        self.eventIndex = eventIndex
        self.indirect = indirect
    }

    var size: UInt16 { layout.size }

    /// The driver's avail->idx.
    func availableIndex() throws(VirtqueueError) -> UInt16 {
        do {
            let index = try memory.read(UInt16.self, at: layout.availableRing + 2)
            // Acquire: ring entries written before idx must be seen after it (§2.7.13.2).
            atomicMemoryFence(ordering: .acquiring)
            return index
        } catch {
            throw VirtqueueError(kind: .queue, reason: "available ring unreadable")
        }
    }

    /// Whether the driver has made buffers available that this device has not taken.
    public func hasPending() throws(VirtqueueError) -> Bool {
        try availableIndex() != lastAvailable
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
        let available = try availableIndex()
        if available == lastAvailable { return false }
        // §2.7.13.3: the driver may not have more than size buffers outstanding; an idx that
        // jumps further is a driver bug we must not follow.
        guard available &- lastAvailable <= size else {
            throw VirtqueueError(kind: .queue, reason: "avail idx \(available) is more than \(size) ahead of \(lastAvailable)")
        }
        let slot = UInt64(lastAvailable % size)
        let head: UInt16
        do {
            head = try memory.read(UInt16.self, at: layout.availableRing &+ 4 &+ 2 &* slot)
        } catch {
            throw VirtqueueError(kind: .queue, reason: "available ring unreadable")
        }
        guard head < size else {
            throw VirtqueueError(kind: .queue, reason: "avail ring entry \(slot) names descriptor \(head), beyond queue size \(size)")
        }
        lastAvailable &+= 1
        try walk(head: head, into: &chain)
        return true
    }

    struct RawDescriptor {
        let address: UInt64
        let length: UInt32
        let flags: UInt16
        let next: UInt16
    }

    /// Descriptor `index` of the table at `table`: one bounds-checked translation of its 16
    /// bytes (the table was checked as a whole, but the guest may change anything at any
    /// time, so each read is checked again; it costs one range comparison).
    @inline(__always)
    func descriptor(table: UInt64, index: UInt16, head: UInt16) throws(VirtqueueError) -> RawDescriptor {
        let at = table &+ 16 &* UInt64(index)
        let bytes: UnsafeMutableRawPointer
        do {
            bytes = try memory.hostPointer(at, length: 16)
        } catch {
            throw VirtqueueError(kind: .chain(head: head), reason: "descriptor \(index) at \(hex(at)) is not in guest RAM")
        }
        return RawDescriptor(
            address: UInt64(littleEndian: bytes.loadUnaligned(as: UInt64.self)),
            length: UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self)),
            flags: UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 12, as: UInt16.self)),
            next: UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 14, as: UInt16.self)))
    }

    /// Follows the chain from `head` (§2.7.5), through at most one indirect table (§2.7.5.3).
    func walk(head: UInt16) throws(VirtqueueError) -> DescriptorChain {
        var chain = DescriptorChain(head: head)
        try walk(head: head, into: &chain)
        return chain
    }

    /// ``walk(head:)`` into `chain`, which is reset first (its storage is reused).
    func walk(head: UInt16, into chain: inout DescriptorChain) throws(VirtqueueError) {
        chain.reset(head: head)
        func fail(_ reason: String) -> VirtqueueError { VirtqueueError(kind: .chain(head: head), reason: reason) }

        var table = layout.descriptorTable
        var tableSize = size
        var index = head
        var seen = 0
        var inIndirect = false
        // §2.7.4.2 / §2.7.5.3.1: the whole chain, indirect descriptors included, is at most
        // Queue Size long; counting every step bounds the loop even when `next` cycles.
        let limit = Int(size)
        while true {
            guard index < tableSize else { throw fail("next index \(index) beyond table size \(tableSize)") }
            seen += 1
            guard seen <= limit else { throw fail("longer than the queue size \(size) (a loop?)") }
            let d = try descriptor(table: table, index: index, head: head)
            if d.flags & Self.descriptorIndirect != 0 {
                // §2.7.5.3.1: only with VIRTIO_F_INDIRECT_DESC, never nested, never with NEXT.
                guard indirect else { throw fail("indirect descriptor without VIRTIO_F_INDIRECT_DESC") }
                guard !inIndirect else { throw fail("nested indirect table") }
                guard d.flags & Self.descriptorNext == 0 else { throw fail("indirect descriptor with NEXT set") }
                guard d.length != 0, d.length % 16 == 0 else {
                    throw fail("indirect table length \(d.length) is not a non-zero multiple of 16")
                }
                guard memory.contains(d.address, length: UInt64(d.length)) else {
                    throw fail("indirect table [\(hex(d.address)), +\(d.length)) is not in guest RAM")
                }
                let entries = d.length / 16
                guard entries <= UInt32(UInt16.max) else { throw fail("indirect table of \(entries) entries") }
                table = d.address
                tableSize = UInt16(entries)
                index = 0
                inIndirect = true
                // The indirect descriptor itself does not count as a buffer.
                seen -= 1
                continue
            }
            guard d.length != 0 else { throw fail("zero-length descriptor \(index)") }
            guard memory.contains(d.address, length: UInt64(d.length)) else {
                throw fail("buffer [\(hex(d.address)), +\(d.length)) is not in guest RAM")
            }
            let segment = GuestSegment(address: d.address, length: d.length)
            // At most `size` (≤ 32768) segments of < 2^32 bytes each: the sums cannot overflow.
            if d.flags & Self.descriptorWrite != 0 {
                chain.writable.append(segment)
                chain.writableLength += UInt64(d.length)
            } else {
                guard chain.writable.isEmpty else { throw fail("device-readable descriptor \(index) after a device-writable one") }
                chain.readable.append(segment)
                chain.readableLength += UInt64(d.length)
            }
            guard d.flags & Self.descriptorNext != 0 else { return }
            index = d.next
        }
    }

    /// Puts `head` on the used ring with `written` bytes written to its device-writable
    /// buffers (§2.7.8) and publishes the new used idx.
    public mutating func complete(head: UInt16, written: UInt32) throws(VirtqueueError) {
        let slot = UInt64(usedIndex % size)
        let element = layout.usedRing &+ 4 &+ 8 &* slot
        do {
            let bytes = try memory.hostPointer(element, length: 8)
            bytes.storeBytes(of: UInt32(head).littleEndian, as: UInt32.self)
            bytes.storeBytes(of: written.littleEndian, toByteOffset: 4, as: UInt32.self)
            // Release: the element must be visible before the idx that publishes it.
            atomicMemoryFence(ordering: .releasing)
            usedIndex &+= 1
            try memory.write(usedIndex, at: layout.usedRing &+ 2)
        } catch {
            throw VirtqueueError(kind: .queue, reason: "used ring unwritable")
        }
    }

    /// With VIRTIO_F_EVENT_IDX, tells the driver to notify once it makes the next buffer
    /// available (avail_event = last_avail_idx, §2.7.10), then reports whether buffers
    /// arrived meanwhile (the caller processes them instead of waiting for a kick).
    public mutating func rearmNotification() throws(VirtqueueError) -> Bool {
        if eventIndex {
            do {
                try memory.write(lastAvailable, at: layout.usedRing + 4 + 8 * UInt64(size))
            } catch {
                throw VirtqueueError(kind: .queue, reason: "used ring unwritable")
            }
            // Full fence: the avail_event store must be visible before idx is re-read, else a
            // driver check in between misses it and neither side acts (§2.7.10).
            atomicMemoryFence(ordering: .sequentiallyConsistent)
        }
        return try hasPending()
    }

    /// Whether the driver wants an interrupt for the buffers used since the last call
    /// (§2.7.10 with EVENT_IDX: vring_need_event(used_event, new, old); without it, unless
    /// VIRTQ_AVAIL_F_NO_INTERRUPT is set).
    public mutating func needsInterrupt() -> Bool {
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        let old = signalledUsed
        let new = usedIndex
        signalledUsed = new
        guard old != new else { return false }
        if eventIndex {
            guard let usedEvent = try? memory.read(UInt16.self, at: layout.availableRing + 4 + 2 * UInt64(size)) else { return true }
            return new &- usedEvent &- 1 < new &- old
        }
        guard let flags = try? memory.read(UInt16.self, at: layout.availableRing) else { return true }
        return flags & Self.availNoInterrupt == 0
    }
}
