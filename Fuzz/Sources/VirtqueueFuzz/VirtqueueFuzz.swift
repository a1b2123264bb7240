import Glibc

@testable import VMMWorker

// libFuzzer target for the split-virtqueue descriptor-chain walker (virtio 1.2 §2.7).
//
// One input is one driver's queue: its size, where its rings are, the descriptor table, the
// avail ring and a blob of extra guest bytes (indirect tables), all written into crafted
// guest memory. (DeviceFuzz runs the real VirtioQueueRunner and every device's handler; this
// target is the differential test of the walker itself, including layouts the transport
// refuses.) The target then drives the queue the way VirtioQueueRunner.run does: take
// every available chain with next(into:) (one DescriptorChain reused), complete each one on
// the used ring (a malformed chain with 0 bytes), rearm EVENT_IDX notification, decide the
// interrupt, and optionally do a second batch after the driver publishes more. Invariants
// are checked with fatalError (libFuzzer records the input as a crash):
//
// - every segment of an accepted chain lies inside guest RAM, has a non-zero length, and the
//   chain has at most queue-size segments, readable before writable, with matching totals;
// - the chain, its head and the kind of failure match an independent reference walk of the
//   same bytes (differential check: a malformed chain is never accepted, a good one never
//   refused);
// - with a layout the transport accepts, the used ring is always writable and the used
//   element and idx read back as completed; a `.queue` error only for a bad avail idx or head;
// - the device loop ends within a bound (the walker itself is bounded by queue size; a hang
//   inside it is caught by libFuzzer's -timeout);
// - nothing outside guest RAM is touched: GuestMemory's checks throw, and PROT_NONE guard
//   pages on both sides of the mapping turn any escape into a SEGV.

// MARK: Guest memory

/// Runs `body`, which cannot fail for a correct harness and walker: a throw is a crash.
func must<T>(_ body: () throws -> T) -> T {
    do { return try body() } catch { fatalError("unexpected error: \(error)") }
}

/// An integer at `address`, which the caller knows is in guest RAM.
func load<T: FixedWidthInteger>(_ type: T.Type, at address: UInt64) -> T {
    must { try memory.read(T.self, at: address) }
}

/// 2 MiB of guest RAM (the smallest GuestMemory), shared by every input; inputs only place
/// data in the top 64 KiB window, so rings and tables can straddle the end of RAM.
let ramSize: UInt64 = 2 << 20
let windowSize: UInt64 = 0x10000
let windowBase: UInt64 = ramSize - windowSize
let memory: GuestMemory = {
    let memory = must { try GuestMemory(size: ramSize) }
    // Guard pages right below and right above the mapping, where the address space is free.
    let page = Int(sysconf(Int32(_SC_PAGESIZE)))
    for at in [memory.base - page, memory.base + Int(ramSize)] {
        let guardPage = mmap(at, page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        if guardPage != at, let guardPage, guardPage != MAP_FAILED { munmap(guardPage, page) }
    }
    return memory
}()

/// Writes the part of `bytes` at `address` (≥ windowBase) that lies inside guest RAM.
func place(_ bytes: some Collection<UInt8>, at address: UInt64) {
    guard address < ramSize else { return }
    let inside = min(UInt64(bytes.count), ramSize - address)
    must { try memory.write(bytes.prefix(Int(inside)), at: address) }
}

// MARK: Input decoding

/// The decoded input; see `SeedBuilder` for the byte layout.
struct FuzzCase {
    static let headerBytes = 18
    static let maxBlob = 4096
    /// The largest useful input: header, a 256-entry table and ring, and the blob.
    static let maxLength = headerBytes + 16 * 256 + 2 * 256 + maxBlob

    var size: UInt16
    var eventIndex: Bool
    var indirect: Bool
    /// Skip the transport's layout check (misaligned rings, rings past the end of RAM).
    var raw: Bool
    var secondRound: Bool
    var layout: VirtqueueLayout
    var blobAddress: UInt64
    var availFlags: UInt16
    var availIndex: UInt16
    var usedEvent: UInt16
    var availIndex2: UInt16
    var descriptors: ArraySlice<UInt8>
    var ring: ArraySlice<UInt8>
    var blob: ArraySlice<UInt8>

    init?(_ bytes: [UInt8]) {
        guard bytes.count >= Self.headerBytes else { return nil }
        func u16(_ at: Int) -> UInt16 { UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8 }
        size = 1 << UInt16(bytes[0] % 9)
        let flags = bytes[1]
        eventIndex = flags & 1 != 0
        indirect = flags & 2 != 0
        raw = flags & 4 != 0
        secondRound = flags & 8 != 0
        var desc = windowBase + UInt64(u16(2))
        var avail = windowBase + UInt64(u16(4))
        var used = windowBase + UInt64(u16(6))
        if !raw {
            // A driver that follows §2.7's alignment (the transport refuses anything else).
            desc &= ~15
            avail &= ~1
            used &= ~3
        }
        layout = VirtqueueLayout(size: size, descriptorTable: desc, availableRing: avail, usedRing: used)
        blobAddress = windowBase + UInt64(u16(8))
        availFlags = u16(10)
        availIndex = u16(12)
        usedEvent = u16(14)
        availIndex2 = u16(16)
        var rest = bytes[Self.headerBytes...]
        descriptors = rest.prefix(16 * Int(size))
        rest = rest.dropFirst(descriptors.count)
        ring = rest.prefix(2 * Int(size))
        rest = rest.dropFirst(ring.count)
        blob = rest.prefix(Self.maxBlob)
    }

    /// Fills the window: zeroes, then the blob, the descriptor table, the avail ring.
    func write() {
        must { try memory.fill(0, at: windowBase, count: windowSize) }
        place(blob, at: blobAddress)
        place(descriptors, at: layout.descriptorTable)
        var availBytes: [UInt8] = []
        func append(_ value: UInt16) { availBytes += [UInt8(truncatingIfNeeded: value), UInt8(value >> 8)] }
        append(availFlags)
        append(availIndex)
        availBytes += ring
        availBytes += [UInt8](repeating: 0, count: 2 * Int(size) - ring.count)
        append(usedEvent)
        place(availBytes, at: layout.availableRing)
    }
}

// MARK: Reference model

/// What taking the next chain should give.
enum Outcome: Equatable {
    case none
    case queueError
    case chainError(head: UInt16)
    case chain(head: UInt16, readable: [GuestSegment], writable: [GuestSegment])
}

/// An independent, deliberately plain reading of §2.7.5–2.7.6 (and this VMM's documented
/// policy: at most one indirect table, the whole chain at most queue-size buffers), using
/// GuestMemory's integer reads instead of the walker's single host-pointer translation.
struct ReferenceQueue {
    let layout: VirtqueueLayout
    let indirect: Bool
    var lastAvailable: UInt16 = 0

    func u16(_ at: UInt64) -> UInt16? { try? memory.read(UInt16.self, at: at) }

    /// The walker's policy for layouts the transport would refuse: a ring not wholly inside
    /// guest RAM breaks the queue at its first use.
    var ringsInRAM: Bool {
        memory.contains(layout.descriptorTable, length: 16 * UInt64(layout.size))
            && memory.contains(layout.availableRing, length: 6 + 2 * UInt64(layout.size))
            && memory.contains(layout.usedRing, length: 6 + 8 * UInt64(layout.size))
    }

    mutating func next() -> Outcome {
        let size = layout.size
        guard ringsInRAM else { return .queueError }
        guard let available = u16(layout.availableRing &+ 2) else { return .queueError }
        if available == lastAvailable { return .none }
        guard available &- lastAvailable <= size else { return .queueError }
        guard let head = u16(layout.availableRing &+ 4 &+ 2 &* UInt64(lastAvailable % size)), head < size else {
            return .queueError
        }
        lastAvailable &+= 1
        return walk(head: head)
    }

    func walk(head: UInt16) -> Outcome {
        var readable: [GuestSegment] = []
        var writable: [GuestSegment] = []
        var table = layout.descriptorTable
        var entries = UInt32(layout.size)
        var index = UInt32(head)
        var inIndirect = false
        while true {
            guard index < entries, readable.count + writable.count < Int(layout.size) else { return .chainError(head: head) }
            let at = table &+ 16 &* UInt64(index)
            guard memory.contains(at, length: 16) else { return .chainError(head: head) }
            let address = load(UInt64.self, at: at)
            let length = load(UInt32.self, at: at + 8)
            let flags = load(UInt16.self, at: at + 12)
            let next = load(UInt16.self, at: at + 14)
            if flags & 4 != 0 {
                guard indirect, !inIndirect, flags & 1 == 0, length > 0, length % 16 == 0, length / 16 <= 0xffff,
                    memory.contains(address, length: UInt64(length))
                else { return .chainError(head: head) }
                table = address
                entries = length / 16
                index = 0
                inIndirect = true
                continue
            }
            guard length > 0, memory.contains(address, length: UInt64(length)) else { return .chainError(head: head) }
            if flags & 2 != 0 {
                writable.append(must { try GuestSegment(address: address, length: length, in: memory) })
            } else {
                guard writable.isEmpty else { return .chainError(head: head) }
                readable.append(must { try GuestSegment(address: address, length: length, in: memory) })
            }
            if flags & 1 == 0 { return .chain(head: head, readable: readable, writable: writable) }
            index = UInt32(next)
        }
    }
}

// MARK: The device loop

/// VIRTQUEUE_FUZZ_VERBOSE=1: print every step (for replaying one input).
let verbose = getenv("VIRTQUEUE_FUZZ_VERBOSE") != nil

func check(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String) {
    if !condition() { fatalError("invariant violated: \(message())") }
}

func runCase(_ c: FuzzCase) {
    c.write()
    // The transport hands the device a queue only when the layout passes this check.
    let valid = c.layout.problem(maxSize: 256, memory: memory) == nil
    if verbose { print("layout \(c.layout) raw=\(c.raw) valid=\(valid) eventIndex=\(c.eventIndex) indirect=\(c.indirect)") }
    if !c.raw && !valid { return }

    var queue = SplitVirtqueue(layout: c.layout, memory: memory, eventIndex: c.eventIndex, indirect: c.indirect)
    var reference = ReferenceQueue(layout: c.layout, indirect: c.indirect)
    var chain = DescriptorChain(head: 0)
    var completed: UInt16 = 0
    let size = c.layout.size

    /// One batch as VirtioQueueRunner.run does it; false once the queue is broken.
    func batch() -> Bool {
        // Each chain consumes one avail entry, at most `size` ahead; the device's own used-ring
        // writes may land on the avail ring, but nothing they write can keep it going.
        var budget = 4 * Int(size) + 8
        while true {
            while true {
                budget -= 1
                check(budget > 0, "the device loop does not end (queue size \(size))")
                let expected = reference.next()
                if verbose { print("reference: \(expected)") }
                let head: UInt16
                let written: UInt32
                do {
                    guard try queue.next(into: &chain) else {
                        check(expected == .none, "walker found nothing, reference \(expected)")
                        break
                    }
                    let got = Outcome.chain(head: chain.head, readable: Array(chain.readable), writable: Array(chain.writable))
                    check(got == expected, "walker accepted \(got), reference \(expected)")
                    checkChain(chain, size: size)
                    head = chain.head
                    written = UInt32(truncatingIfNeeded: min(chain.writableLength, UInt64(UInt32.max)))
                } catch {
                    switch error.kind {
                    case .queue:
                        check(expected == .queueError, "walker: \(error); reference \(expected)")
                        if valid {
                            check(!error.reason.contains("unreadable"), "a validated ring was unreadable: \(error)")
                        }
                        return false
                    case .chain(let h):
                        check(expected == .chainError(head: h), "walker: \(error); reference \(expected)")
                        check(h < size, "failed chain head \(h) beyond queue size \(size)")
                        head = h
                        written = 0
                    }
                }
                do {
                    try queue.complete(head: head, written: written)
                } catch {
                    check(!valid, "used ring of a validated layout unwritable: \(error)")
                    return false
                }
                completed &+= 1
                let element = c.layout.usedRing &+ 4 &+ 8 &* UInt64((completed &- 1) % size)
                check(load(UInt32.self, at: element) == UInt32(head), "used element id")
                check(load(UInt32.self, at: element + 4) == written, "used element len")
                check(load(UInt16.self, at: c.layout.usedRing + 2) == completed, "used idx")
                check(queue.usedIndex == completed, "device used idx")
            }
            let pending: Bool
            do {
                pending = try queue.rearmNotification()
            } catch {
                check(!valid, "rearm on a validated layout failed: \(error)")
                return false
            }
            if c.eventIndex {
                check(
                    load(UInt16.self, at: c.layout.usedRing + 4 + 8 * UInt64(size)) == queue.lastAvailable,
                    "avail_event not published")
            }
            if !pending { break }
        }
        _ = queue.needsInterrupt()
        check(queue.lastAvailable == reference.lastAvailable, "last_avail_idx diverged")
        return true
    }

    guard batch(), c.secondRound else { return }
    // The driver publishes more (or jumps the idx): a second notification.
    place([UInt8(truncatingIfNeeded: c.availIndex2), UInt8(c.availIndex2 >> 8)], at: c.layout.availableRing &+ 2)
    _ = batch()
}

func checkChain(_ chain: DescriptorChain, size: UInt16) {
    check(chain.head < size, "head \(chain.head) beyond queue size \(size)")
    let segments = chain.readable + chain.writable
    check(!segments.isEmpty, "an accepted chain without buffers")
    check(segments.count <= Int(size), "chain of \(segments.count) segments in a queue of \(size)")
    for s in segments {
        check(s.length > 0, "zero-length segment")
        check(memory.contains(s.address, length: UInt64(s.length)), "segment \(s) outside guest RAM")
    }
    check(chain.readableLength == chain.readable.reduce(0) { $0 + UInt64($1.length) }, "readable length")
    check(chain.writableLength == chain.writable.reduce(0) { $0 + UInt64($1.length) }, "writable length")
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = [UInt8](UnsafeBufferPointer(start: data, count: size))
    if let c = FuzzCase(bytes) { runCase(c) }
    return 0
}
