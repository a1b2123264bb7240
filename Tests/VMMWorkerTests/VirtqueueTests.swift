import Glibc
import Protocol
import Testing

@testable import VMMWorker

/// A driver's view of one split virtqueue in crafted guest memory (virtio 1.2 §2.7).
struct CraftedQueue {
    let memory: GuestMemory
    let layout: VirtqueueLayout
    var availIndex: UInt16 = 0

    static let descriptors: UInt64 = 0x10000
    static let avail: UInt64 = 0x11000
    static let used: UInt64 = 0x12000
    static let buffers: UInt64 = 0x20000

    init(memory: GuestMemory, size: UInt16 = 8) {
        self.memory = memory
        layout = VirtqueueLayout(size: size, descriptorTable: Self.descriptors, availableRing: Self.avail, usedRing: Self.used)
    }

    func descriptor(_ index: UInt16, address: UInt64, length: UInt32, flags: UInt16 = 0, next: UInt16 = 0, table: UInt64 = descriptors)
        throws
    {
        let at = table + 16 * UInt64(index)
        try memory.write(address, at: at)
        try memory.write(length, at: at + 8)
        try memory.write(flags, at: at + 12)
        try memory.write(next, at: at + 14)
    }

    mutating func publish(_ head: UInt16) throws {
        try memory.write(head, at: Self.avail + 4 + 2 * UInt64(availIndex % layout.size))
        availIndex &+= 1
        try memory.write(availIndex, at: Self.avail + 2)
    }

    func usedIndex() throws -> UInt16 { try memory.read(UInt16.self, at: Self.used + 2) }
    func usedElement(_ slot: UInt16) throws -> (id: UInt32, length: UInt32) {
        let at = Self.used + 4 + 8 * UInt64(slot % layout.size)
        return (try memory.read(UInt32.self, at: at), try memory.read(UInt32.self, at: at + 4))
    }

    func queue(eventIndex: Bool = false, indirect: Bool = true) -> SplitVirtqueue {
        SplitVirtqueue(layout: layout, memory: memory, eventIndex: eventIndex, indirect: indirect)
    }
}

func guestMemory() throws -> GuestMemory { try GuestMemory(size: 4 << 20) }

@Suite("split virtqueue against crafted guest memory")
struct VirtqueueTests {
    @Test("a well-formed chain: readable then writable buffers, completed on the used ring")
    func wellFormed() throws {
        var q = CraftedQueue(memory: try guestMemory())
        try q.descriptor(0, address: CraftedQueue.buffers, length: 16, flags: 1, next: 3)
        try q.descriptor(3, address: CraftedQueue.buffers + 0x100, length: 512, flags: 1 | 2, next: 5)
        try q.descriptor(5, address: CraftedQueue.buffers + 0x400, length: 1, flags: 2)
        try q.publish(0)
        var queue = q.queue()
        let chain = try #require(try queue.next())
        #expect(chain.head == 0)
        #expect(chain.readable == [try GuestSegment(address: CraftedQueue.buffers, length: 16, in: q.memory)])
        #expect(chain.writable.count == 2 && chain.writableLength == 513)
        #expect(try queue.next() == nil)
        try queue.complete(head: 0, written: 513)
        #expect(try q.usedIndex() == 1)
        #expect(try q.usedElement(0) == (0, 513))
        let first = queue.needsInterrupt()
        let second = queue.needsInterrupt()
        #expect(first)
        #expect(!second, "nothing new was used")
    }

    @Test("an indirect table is followed, once")
    func indirect() throws {
        var q = CraftedQueue(memory: try guestMemory())
        let table: UInt64 = 0x30000
        try q.descriptor(0, address: CraftedQueue.buffers, length: 16, flags: 1, next: 1, table: table)
        try q.descriptor(1, address: CraftedQueue.buffers + 0x100, length: 1, flags: 2, table: table)
        try q.descriptor(2, address: table, length: 32, flags: 4)
        try q.publish(2)
        var queue = q.queue()
        let chain = try #require(try queue.next())
        #expect(chain.head == 2 && chain.readableLength == 16 && chain.writableLength == 1)
        // Without VIRTIO_F_INDIRECT_DESC the same chain is malformed.
        var plain = q.queue(indirect: false)
        do {
            _ = try plain.next()
            Issue.record("an indirect descriptor was accepted without VIRTIO_F_INDIRECT_DESC")
        } catch {
            #expect(error.kind == .chain(head: 2))
        }
    }

    /// The kinds of malformed chains the issue lists; each fails its own request (the chain
    /// error names the head) without touching anything outside guest RAM.
    static let malformed: [(String, @Sendable (inout CraftedQueue) throws -> Void)] = [
        ("address outside guest memory", { q in try q.descriptor(0, address: 0xffff_ffff_0000, length: 16) }),
        ("address + length wraps", { q in try q.descriptor(0, address: UInt64.max - 7, length: 16) }),
        ("buffer runs past the end of RAM", { q in try q.descriptor(0, address: (4 << 20) - 8, length: 16) }),
        ("zero length", { q in try q.descriptor(0, address: CraftedQueue.buffers, length: 0) }),
        (
            "a loop",
            { q in
                try q.descriptor(0, address: CraftedQueue.buffers, length: 16, flags: 1, next: 1)
                try q.descriptor(1, address: CraftedQueue.buffers, length: 16, flags: 1, next: 0)
            }
        ),
        (
            "longer than the queue (six descriptors, then around again)",
            { q in
                for i in UInt16(0)..<6 {
                    try q.descriptor(i, address: CraftedQueue.buffers, length: 16, flags: 1, next: i == 5 ? 1 : i + 1)
                }
            }
        ),
        ("next beyond the queue size", { q in try q.descriptor(0, address: CraftedQueue.buffers, length: 16, flags: 1, next: 9) }),
        (
            "readable after writable (wrong direction)",
            { q in
                try q.descriptor(0, address: CraftedQueue.buffers, length: 1, flags: 1 | 2, next: 1)
                try q.descriptor(1, address: CraftedQueue.buffers, length: 16)
            }
        ),
        (
            "nested indirect table",
            { q in
                try q.descriptor(0, address: 0x30000, length: 16, flags: 4, table: 0x30000)
                try q.descriptor(0, address: 0x30000, length: 16, flags: 4)
            }
        ),
        ("indirect with NEXT", { q in try q.descriptor(0, address: 0x30000, length: 16, flags: 4 | 1, next: 1) }),
        ("indirect table of odd length", { q in try q.descriptor(0, address: 0x30000, length: 24, flags: 4) }),
        ("indirect table outside RAM", { q in try q.descriptor(0, address: 0xdead_0000_0000, length: 32, flags: 4) }),
        (
            "indirect table longer than the queue",
            { q in
                for i in UInt16(0)..<16 {
                    try q.descriptor(i, address: CraftedQueue.buffers, length: 16, flags: 1, next: i + 1, table: 0x30000)
                }
                try q.descriptor(0, address: 0x30000, length: 256, flags: 4)
            }
        ),
    ]

    @Test("malformed chains fail their request and the queue goes on", arguments: 0..<malformed.count)
    func malformedChain(index: Int) throws {
        let (name, craft) = Self.malformed[index]
        var q = CraftedQueue(memory: try guestMemory())
        try craft(&q)
        try q.publish(0)
        // A good chain after the bad one still works.
        try q.descriptor(6, address: CraftedQueue.buffers, length: 16, flags: 1, next: 7)
        try q.descriptor(7, address: CraftedQueue.buffers + 0x100, length: 1, flags: 2)
        try q.publish(6)
        var queue = q.queue()
        do {
            _ = try queue.next()
            Issue.record("\(name): accepted")
        } catch {
            #expect(error.kind == .chain(head: 0), "\(name): \(error)")
            try queue.complete(head: 0, written: 0)
        }
        let good = try #require(try queue.next(), "\(name)")
        #expect(good.head == 6)
    }

    @Test("bad indices in the avail ring mark the queue broken")
    func badAvailIndices() throws {
        // A head beyond the queue size.
        var q = CraftedQueue(memory: try guestMemory())
        try q.publish(200)
        var queue = q.queue()
        do {
            _ = try queue.next()
            Issue.record("head 200 in a queue of 8 was accepted")
        } catch {
            #expect(error == VirtqueueError(kind: .queue, reason: "avail ring entry 0 names descriptor 200, beyond queue size 8"))
        }
        // An avail idx more than a queue's worth ahead.
        let memory = try guestMemory()
        try memory.write(UInt16(9), at: CraftedQueue.avail + 2)
        var jumped = CraftedQueue(memory: memory).queue()
        do {
            _ = try jumped.next()
            Issue.record("an avail idx 9 ahead of 0 in a queue of 8 was accepted")
        } catch {
            #expect(error.kind == .queue)
        }
    }

    @Test("ring layouts: sizes, alignment and placement are checked before use")
    func layoutChecks() throws {
        let memory = try guestMemory()
        func problem(_ size: UInt16, _ d: UInt64, _ a: UInt64, _ u: UInt64) -> String? {
            VirtqueueLayout(size: size, descriptorTable: d, availableRing: a, usedRing: u).problem(maxSize: 256, memory: memory)
        }
        #expect(problem(8, 0x1000, 0x2000, 0x3000) == nil)
        #expect(problem(0, 0x1000, 0x2000, 0x3000) != nil)
        #expect(problem(12, 0x1000, 0x2000, 0x3000) != nil)
        #expect(problem(512, 0x1000, 0x2000, 0x3000) != nil)
        #expect(problem(8, 0x1008, 0x2000, 0x3000) != nil)
        #expect(problem(8, 0x1000, 0x2001, 0x3000) != nil)
        #expect(problem(8, 0x1000, 0x2000, 0x3002) != nil)
        #expect(problem(8, 0x1000, 0x2000, (4 << 20) - 16) != nil)
        #expect(problem(8, UInt64.max - 15, 0x2000, 0x3000) != nil)
    }

    @Test("VIRTIO_F_EVENT_IDX: avail_event is published and used_event decides interrupts")
    func eventIndex() throws {
        var q = CraftedQueue(memory: try guestMemory())
        try q.descriptor(0, address: CraftedQueue.buffers, length: 1, flags: 2)
        var queue = q.queue(eventIndex: true)
        for round in 0..<3 {
            try q.publish(0)
            _ = try #require(try queue.next())
            try queue.complete(head: 0, written: 1)
            #expect(try !queue.rearmNotification())
            #expect(try q.memory.read(UInt16.self, at: CraftedQueue.used + 4 + 8 * 8) == UInt16(round + 1))
        }
        // used_event = 0: the driver wants an interrupt once the first buffer is used;
        // three were used since the last decision, so vring_need_event(0, 3, 0) holds.
        try q.memory.write(UInt16(0), at: CraftedQueue.avail + 4 + 2 * 8)
        let wanted = queue.needsInterrupt()
        #expect(wanted)
        // used_event far ahead: no interrupt for the next one.
        try q.memory.write(UInt16(10), at: CraftedQueue.avail + 4 + 2 * 8)
        try q.publish(0)
        _ = try #require(try queue.next())
        try queue.complete(head: 0, written: 1)
        let unwanted = queue.needsInterrupt()
        #expect(!unwanted)
    }

    @Test("fuzz: random descriptor tables and avail rings never crash, hang or escape guest RAM")
    func fuzzChainWalker() throws {
        let memory = try guestMemory()
        var generator = SplitMix64(seed: UInt64(getpid()) &* 0x9e37_79b9)
        let interesting: [UInt64] = [0, 1, 0x1000, 0x20000, 0x30000, (4 << 20) - 1, 4 << 20, UInt64.max, UInt64.max - 15, 0xffff_ffff]
        for _ in 0..<3000 {
            let size = UInt16(1) << UInt16(generator.next() % 6)
            var q = CraftedQueue(memory: memory, size: size)
            for table in [CraftedQueue.descriptors, 0x30000 as UInt64] {
                for index in UInt16(0)..<(size * 2) {
                    let r = generator.next()
                    let address = r & 1 == 0 ? interesting[Int(r >> 8) % interesting.count] : 0x20000 + (r >> 16) % 0x4000
                    let length: UInt32 = r & 2 == 0 ? UInt32(truncatingIfNeeded: generator.next()) : UInt32(generator.next() % 600)
                    try q.descriptor(
                        index, address: r & 4 == 0 ? address : 0x30000, length: length,
                        flags: UInt16(truncatingIfNeeded: generator.next() & 7),
                        next: UInt16(truncatingIfNeeded: generator.next() % UInt64(size * 2)),
                        table: table)
                }
            }
            for _ in 0..<Int(generator.next() % 6) { try q.publish(UInt16(truncatingIfNeeded: generator.next() % UInt64(size + 2))) }
            var queue = q.queue(eventIndex: generator.next() & 1 == 0, indirect: generator.next() & 1 == 0)
            var steps = 0
            while steps < 64 {
                steps += 1
                do {
                    guard let chain = try queue.next() else { break }
                    for segment in chain.readable + chain.writable {
                        #expect(memory.contains(segment.address, length: UInt64(segment.length)))
                    }
                    #expect(chain.readable.count + chain.writable.count <= Int(size))
                    try queue.complete(head: chain.head, written: 0)
                } catch {
                    guard case .chain(let head) = error.kind else { break }
                    try queue.complete(head: head, written: 0)
                }
            }
            #expect(steps < 64, "a queue of \(size) produced more than 63 chains from at most 5 published")
        }
    }
}

/// A small deterministic generator for the fuzz test (reproducible from its seed).
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}
