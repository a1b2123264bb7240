import FuzzSupport
import Glibc
import Protocol

@testable import VMMWorker

// libFuzzer target for the guest-controlled input of every virtio device: one input is one
// driver's queue for one device (its rings, descriptor table, buffers and what the host side
// delivers), served by the VMM's own code end to end: the device behind a VirtioMMIOTransport
// (brought up through its registers, as a driver does), its VirtioQueueRunner and chain handler,
// notified through the transport's QueueNotify eventfd and run by the device's EventLoop,
// driven round by round on this thread until it has nothing left to do.
//
// Invariants (fatalError, so libFuzzer keeps the input as a crash):
// - no byte of guest RAM changes except in the used rings and the device-writable buffers of
//   the queues' descriptor tables (and, for inflate, pages the balloon gave back, which read
//   0); nothing outside guest RAM is touched (GuestMemory's checks, PROT_NONE guard pages);
// - a layout the transport refuses activates nothing and sets DEVICE_NEEDS_RESET;
// - the used idx never passes the avail idx the driver published, and a device that never
//   waits for the host (blk, rng, net transmit, console transmit into a port with room,
//   balloon) uses every available chain; DEVICE_NEEDS_RESET is set exactly when the ring
//   itself is broken (an avail idx more than Queue Size ahead, a head beyond Queue Size)
//   — for the waiting devices, only then;
// - every used element names a head below Queue Size, with a length no larger than the
//   chain's device-writable bytes and 0 for a malformed chain (by an independent walk);
// - used buffers raise the interrupt unless the driver suppressed it;
// - the device settles: a bounded number of loop rounds (libFuzzer's -timeout catches a hang
//   inside one);
// - after a reset (status 0), a kick changes nothing in guest memory.

/// Where inputs place their queue: the top 64 KiB of the small RAM (rings may straddle its
/// end), at the same guest address in the large one.
let windowBase: UInt64 = 0x1f_0000
let windowSize: UInt64 = 0x1_0000
/// 2 MiB of RAM, so most addresses and PFNs an input names are not RAM.
let smallMemory = guardedMemory(size: 2 << 20)
/// 3 GiB + 2 MiB: low RAM to the 32-bit MMIO hole, 2 MiB more from 4 GiB (Layout; reserved,
/// not committed: MAP_NORESERVE, and only the window is ever touched by the harness).
let largeMemory = guardedMemory(size: (3 << 30) + (2 << 20))
/// The device's other queue, set up empty (size 1) at the top of the window.
let idleLayout = VirtqueueLayout(
    size: 1, descriptorTable: windowBase + 0xff00, availableRing: windowBase + 0xff40, usedRing: windowBase + 0xff80)
/// A three-queue device's third, also empty, just above it.
let idleLayout2 = VirtqueueLayout(
    size: 1, descriptorTable: windowBase + 0xffc0, availableRing: windowBase + 0xffd0, usedRing: windowBase + 0xffe0)
let idleLayouts = [idleLayout, idleLayout2]
let zeroes = [UInt8](repeating: 0, count: Int(windowBase))

/// The decoded input (byte layout in Seeds.swift).
struct DeviceCase {
    static let maxBlob = 16 << 10
    static let maxLength = 21 + 16 * 256 + 2 * 256 + 2 + maxBlob + 4096

    var kind: Kind
    var eventIndex: Bool
    var indirect: Bool
    var secondRound: Bool
    /// Per device: blk read-only image; rng/blk throttled; console transmit into a port with
    /// `param` bytes of room (then more); balloon on RAM with the hole and a high region; net
    /// with the features `param` selects (netFeatures).
    var variant: Bool
    var layout: VirtqueueLayout
    var blobAddress: UInt64
    var availFlags: UInt16
    var availIndex: UInt16
    var usedEvent: UInt16
    var availIndex2: UInt16
    var param: UInt16
    var table: ArraySlice<UInt8>
    var ring: ArraySlice<UInt8>
    var blob: ArraySlice<UInt8>
    /// Host-side input: frames for the tap (a socket pair), bytes for the console port.
    var host: ArraySlice<UInt8>

    init(_ bytes: [UInt8]) {
        var r = ByteReader(bytes)
        kind = Kind(rawValue: r.u8() % UInt8(Kind.allCases.count)) ?? .block
        let flags = r.u8()
        eventIndex = flags & 1 != 0
        indirect = flags & 2 != 0
        secondRound = flags & 4 != 0
        variant = flags & 8 != 0
        let size = UInt16(1) << UInt16(r.u8() % 9)
        // Aligned as §2.7 requires (the transport refuses anything else; the MMIO target
        // covers that refusal).
        let desc = windowBase + UInt64(r.u16() & ~15)
        let avail = windowBase + UInt64(r.u16() & ~1)
        let used = windowBase + UInt64(r.u16() & ~3)
        layout = VirtqueueLayout(size: size, descriptorTable: desc, availableRing: avail, usedRing: used)
        blobAddress = windowBase + UInt64(r.u16())
        availFlags = r.u16()
        availIndex = r.u16()
        usedEvent = r.u16()
        availIndex2 = r.u16()
        param = r.u16()
        table = r.take(16 * Int(size))
        ring = r.take(2 * Int(size))
        blob = r.take(Int(r.u16()) % (Self.maxBlob + 1))
        host = r.rest()
    }

    var memory: GuestMemory { (kind == .balloonInflate || kind == .balloonDeflate) && variant ? largeMemory : smallMemory }

    /// Fills the window: zeroes, the blob, the descriptor table, the avail ring.
    func write() {
        let memory = memory
        must { try memory.fill(0, at: windowBase, count: windowSize) }
        place(blob, at: blobAddress)
        place(table, at: layout.descriptorTable)
        var avail = le(availFlags) + le(availIndex) + ring
        avail += [UInt8](repeating: 0, count: 2 * Int(layout.size) - ring.count)
        place(avail + le(usedEvent), at: layout.availableRing)
    }

    /// Writes the part of `bytes` at `address` (in the window) that lies inside the window.
    func place(_ bytes: some Collection<UInt8>, at address: UInt64) {
        let end = windowBase + windowSize
        guard address < end else { return }
        let inside = min(UInt64(bytes.count), end - address)
        must { try memory.write(bytes.prefix(Int(inside)), at: address) }
    }
}

/// The virtio-net features (§5.1.3) a net input's variant negotiates, one per bit of `param`:
/// CSUM, GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, GUEST_ECN, HOST_TSO4, HOST_TSO6, HOST_ECN,
/// MRG_RXBUF, MAC, STATUS — any combination, including ones §5.1.3.1 forbids (a TSO bit without
/// its CSUM bit), which the device must treat as not accepted.
func netFeatures(_ param: UInt16) -> UInt64 {
    typealias F = VirtioNetDevice.Feature
    let bits = [
        F.checksum, F.guestChecksum, F.guestTSO4, F.guestTSO6, F.guestECN, F.hostTSO4, F.hostTSO6, F.hostECN,
        F.mergeableReceiveBuffers, F.mac, F.status,
    ]
    return bits.enumerated().reduce(0) { features, bit in param & (1 << bit.offset) != 0 ? features | bit.element : features }
}

/// Drivers' side of the transport (virtio 1.2 §3.1.1, §4.2.3): status, features, queues.
func bringUp(_ t: VirtioMMIOTransport, features: UInt64, queues: [(Int, VirtqueueLayout)]) {
    typealias R = Virtio.MMIORegister
    t.write(offset: R.status, length: 4, value: UInt64(Virtio.Status.acknowledge | Virtio.Status.driver))
    t.write(offset: R.driverFeaturesSelect, length: 4, value: 0)
    t.write(offset: R.driverFeatures, length: 4, value: features & 0xffff_ffff)
    t.write(offset: R.driverFeaturesSelect, length: 4, value: 1)
    t.write(offset: R.driverFeatures, length: 4, value: features >> 32)
    t.write(offset: R.status, length: 4, value: UInt64(Virtio.Status.featuresOK))
    check(t.status & Virtio.Status.featuresOK != 0, "offered features refused")
    for (index, layout) in queues {
        t.write(offset: R.queueSelect, length: 4, value: UInt64(index))
        t.write(offset: R.queueSize, length: 4, value: UInt64(layout.size))
        for (low, address) in [
            (R.queueDescLow, layout.descriptorTable), (R.queueDriverLow, layout.availableRing), (R.queueDeviceLow, layout.usedRing),
        ] {
            t.write(offset: low, length: 4, value: address & 0xffff_ffff)
            t.write(offset: low + 4, length: 4, value: address >> 32)
        }
        t.write(offset: R.queueReady, length: 4, value: 1)
    }
    t.write(offset: R.status, length: 4, value: UInt64(Virtio.Status.driverOK))
}

/// What the harness can observe of the device's progress (to know when it has settled).
struct Progress: Equatable {
    var used: UInt16
    var idleUsed: UInt16
    var signals: Int
    var device: [UInt64]
}

final class Harness {
    let c: DeviceCase
    let memory: GuestMemory
    let loop: EventLoop
    let device: any VirtioDevice
    let transport: VirtioMMIOTransport
    let port: FuzzConsolePort?
    /// A vsock input's listener and the host client that connected to it.
    var vsockListener: VsockListener?
    var vsockClient: Int32 = -1
    /// Whether the device serves every available chain without waiting for the host.
    let neverWaits: Bool

    init(_ c: DeviceCase) {
        self.c = c
        let memory = c.memory
        let loop = must { try EventLoop(name: "fuzz") }
        self.memory = memory
        self.loop = loop
        let device: any VirtioDevice
        var port: FuzzConsolePort?
        var neverWaits = true
        switch c.kind {
        case .block:
            device = VirtioBlockDevice(
                backend: c.variant && c.param & 1 == 0 ? readOnlyDisk : writableDisk, memory: memory, loop: loop,
                iops: c.variant && c.param & 1 != 0 ? UInt64(c.param >> 1) + 1 : 0)
            neverWaits = !(c.variant && c.param & 1 != 0)
        case .rng:
            let rate = c.variant ? UInt64(c.param) + 64 : nil
            device = must { try VirtioRngDevice(rng: RngConfig(randomFile: "/dev/zero", bytesPerSecond: rate), memory: memory, loop: loop) }
            neverWaits = !c.variant
        case .netReceive, .netTransmit:
            device = fuzzNet(memory: memory, loop: loop)
            neverWaits = c.kind == .netTransmit
        case .consoleReceive, .consoleTransmit:
            let consolePort = FuzzConsolePort(loop: loop)
            if c.variant { consolePort.state.withLock { $0.room = Int(c.param) } }
            port = consolePort
            device = VirtioConsoleDevice(id: "con0", port: consolePort, memory: memory, loop: loop)
            // A port short of room holds transmit chains back (untaken): a driver that moves avail
            // idx meanwhile may then look right to the device again, so only an unlimited port
            // is held to using every chain.
            neverWaits = c.kind == .consoleTransmit && !c.variant
        case .balloonInflate, .balloonDeflate:
            let balloon = VirtioBalloonDevice(balloon: BalloonConfig(deflateOnOOM: c.param & 1 != 0), memory: memory, loop: loop)
            balloon.observeActual { _ in }
            device = balloon
        case .vsockReceive, .vsockTransmit:
            // Guest CID 3; host port 1 has a listener, every other port refuses. A receive
            // chain may wait for packets, and transmit waits while control packets pile up.
            _ = vsockPortOne
            let listener = must { try VsockListener(path: vsockDirectory + "/v.sock") }
            vsockListener = listener
            device = must {
                try VirtioVsockDevice(
                    id: "vs0", guestCID: 3, listener: listener, udsPath: vsockDirectory + "/v.sock", memory: memory, loop: loop,
                    maxConnections: 8)
            }
            neverWaits = false
        }
        self.device = device
        self.port = port
        self.neverWaits = neverWaits
        transport = must { try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 0), device: device, memory: memory, vm: nil) }
    }

    var progress: Progress {
        var counters: [UInt64] = []
        switch device {
        case let d as VirtioBlockDevice: counters = [d.completedRequests]
        case let d as VirtioRngDevice: counters = [d.deliveredBytes]
        case let d as VirtioNetDevice:
            let s = d.statistics
            counters = [s.received, s.transmitted, s.receiveDropped, s.transmitDropped]
        case let d as VirtioConsoleDevice: counters = [d.receivedBytes, d.transmittedBytes]
        case let d as VirtioBalloonDevice:
            let s = d.statistics
            counters = [s.inflated, s.refused, s.deflated]
        case let d as VirtioVsockDevice:
            counters = [UInt64(d.connectionCount), d.droppedPackets, d.resetsSent, d.bytesToHost, d.bytesToGuest]
        default: break
        }
        return Progress(
            used: (try? memory.read(UInt16.self, at: c.layout.usedRing &+ 2)) ?? 0,
            idleUsed: (try? memory.read(UInt16.self, at: idleLayout.usedRing + 2)) ?? 0,
            signals: transport.interrupt.signalCount, device: counters)
    }

    /// Runs loop rounds until three in a row change nothing observable. A balloon request
    /// of many PFNs spreads over several rounds (its per-batch budget), so the bound is
    /// generous; reaching it means the device keeps the loop busy for ever.
    func settle() {
        var quiet = 0
        var last = progress
        for _ in 0..<2000 {
            loop.runOneRound()
            let now = progress
            quiet = now == last ? quiet + 1 : 0
            last = now
            if quiet == 3 { return }
        }
        check(false, "the device did not settle in 2000 loop rounds")
    }

    func kick(_ queue: Int) {
        transport.write(offset: Virtio.MMIORegister.queueNotify, length: 4, value: UInt64(queue))
    }
}

/// Changed bytes of the window outside every range in `allowed` (guest addresses); compares
/// 256-byte blocks first, bytes only in blocks that differ.
func violations(before: [UInt8], after: [UInt8], allowed: [Range<UInt64>], zeroAllowed: Bool) -> [UInt64] {
    var bad: [UInt64] = []
    before.withUnsafeBytes { b in
        after.withUnsafeBytes { a in
            guard let bBase = b.baseAddress, let aBase = a.baseAddress else { return }
            var block = 0
            while block < b.count && bad.count <= 8 {
                let count = min(256, b.count - block)
                defer { block += count }
                if memcmp(bBase + block, aBase + block, count) == 0 { continue }
                for i in block..<block + count where b[i] != a[i] {
                    let address = windowBase + UInt64(i)
                    if allowed.contains(where: { $0.contains(address) }) { continue }
                    if zeroAllowed && a[i] == 0 { continue }
                    bad.append(address)
                }
            }
        }
    }
    return bad
}

/// DEVICE_FUZZ_VERBOSE=1: print what each input did (for replaying one).
let verbose = getenv("DEVICE_FUZZ_VERBOSE") != nil

func runCase(_ c: DeviceCase) {
    let memory = c.memory
    // In the large RAM the window's end is not RAM's: rings running past it would hold bytes
    // the input never placed (and the harness does not reset). Only the small RAM tests rings
    // at the end of RAM.
    let end = windowBase + windowSize
    let layout = c.layout
    if memory === largeMemory
        && (layout.descriptorTable + layout.descriptorTableBytes > end || layout.availableRing + layout.availableRingBytes > end
            || layout.usedRing + layout.usedRingBytes > end)
    {
        return
    }
    c.write()
    let h = Harness(c)
    let queues = c.kind.queues
    var layouts = [(queues.fuzzed, c.layout)]
    for (n, idle) in queues.idle.enumerated() { layouts.append((idle, idleLayouts[n])) }
    layouts.sort { $0.0 < $1.0 }
    var before = snapshot(memory, at: windowBase, count: Int(windowSize))
    let idleBefore = idleLayouts.map { snapshot(memory, at: $0.availableRing, count: 6) }
    var allowed =
        writableRanges(memory: memory, layout: c.layout, indirect: c.indirect)
        + idleLayouts.flatMap { writableRanges(memory: memory, layout: $0, indirect: c.indirect) }
    var tables = tableRanges(memory: memory, layout: c.layout)
    let allowedBefore = allowed
    let tablesBefore = tables

    var features = Virtio.Feature.version1
    if c.eventIndex { features |= Virtio.Feature.eventIndex }
    if c.indirect { features |= Virtio.Feature.indirectDescriptors }
    if c.variant, c.kind == .netReceive || c.kind == .netTransmit { features |= netFeatures(c.param) }
    bringUp(h.transport, features: features, queues: layouts)
    let valid = c.layout.problem(maxSize: 256, memory: memory) == nil

    // The host side: frames waiting in the tap, bytes waiting at the console port.
    var host = ByteReader(Array(c.host))
    switch c.kind {
    case .netReceive:
        while !host.atEnd {
            let frame = host.take(Int(host.u16()) % 2048)
            _ = frame.withUnsafeBytes { send(tap.host, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
        }
    case .consoleReceive:
        if !c.host.isEmpty { h.port?.offer(c.host) }
    case .vsockReceive, .vsockTransmit:
        // A host client of the listener sends the host bytes (such as "CONNECT 5\n..."):
        // OP_REQUEST and what follows reach receiveq.
        if !c.host.isEmpty, let listener = h.vsockListener {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                let bytes = Array(listener.path.utf8)
                raw.copyBytes(from: bytes)
                raw[bytes.count] = 0
            }
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            check(connected == 0, "connect to the vsock listener")
            _ = Array(c.host).withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) }
            h.vsockClient = fd
        }
    default: break
    }

    // Activation's first look, then a kick (as a driver that filled the ring after DRIVER_OK).
    h.settle()
    h.kick(queues.fuzzed)
    h.settle()
    var published = [c.availIndex]
    if c.secondRound {
        // The driver publishes more (or jumps the idx) and kicks again; the harness's own
        // write counts as the driver's (in `before`).
        if (try? memory.write(c.availIndex2, at: c.layout.availableRing + 2)) != nil {
            published.append(c.availIndex2)
            let offset = Int(c.layout.availableRing + 2 - windowBase)
            if offset + 2 <= before.count { before.replaceSubrange(offset..<offset + 2, with: le(c.availIndex2)) }
        }
        h.kick(queues.fuzzed)
        h.settle()
    }
    if c.kind == .consoleTransmit && c.variant {
        // The port has room again: what was held back goes out.
        h.port?.makeRoom(Int.max)
        h.settle()
    }

    let after = snapshot(memory, at: windowBase, count: Int(windowSize))
    allowed +=
        writableRanges(memory: memory, layout: c.layout, indirect: c.indirect)
        + idleLayouts.flatMap { writableRanges(memory: memory, layout: $0, indirect: c.indirect) }
    tables += tableRanges(memory: memory, layout: c.layout)
    // The idle queue stayed idle (nothing of the input landed on its avail ring): only then
    // is DEVICE_NEEDS_RESET the fuzzed queue's.
    let idleQuiet =
        idleBefore.allSatisfy { $0 == [0, 0, 0, 0, 0, 0] }
        && idleLayouts.map { snapshot(memory, at: $0.availableRing, count: 6) } == idleBefore
    let zeroAllowed = c.kind == .balloonInflate
    // A driver whose used ring or writable buffers lie over its own descriptor table lets the
    // device rewrite descriptors between rounds: chains walked later describe buffers that
    // neither the table before nor the one after shows, so where the device may write cannot be
    // known from the two snapshots. Only for such inputs, and only when the table did change,
    // the write-location checks are skipped (guard pages still catch anything outside RAM).
    let selfModifying =
        allowedBefore.contains { overlaps($0, tablesBefore) }
        && tablesBefore.contains { range in
            let lower = max(range.lowerBound, windowBase)
            let upper = min(range.upperBound, windowBase + windowSize)
            return lower < upper && (Int(lower - windowBase)..<Int(upper - windowBase)).contains { before[$0] != after[$0] }
        }
    if !selfModifying {
        let bad = violations(before: before, after: after, allowed: allowed, zeroAllowed: zeroAllowed)
        check(bad.isEmpty, "\(c.kind) wrote outside its used ring and writable buffers, at \(bad.map { hex($0) })")
    }
    if memory === smallMemory {
        if selfModifying {
            must { try memory.fill(0, at: 0, count: windowBase) }
        } else {
            checkOutsideWindow(memory, allowed: allowed, zeroAllowed: zeroAllowed)
        }
    }

    let needsReset = h.transport.status & Virtio.Status.deviceNeedsReset != 0
    guard valid else {
        check(needsReset, "a refused layout \(c.layout) did not set DEVICE_NEEDS_RESET")
        check(before == after, "a refused layout changed guest memory")
        return finish(h)
    }

    // What the device wrote itself, apart from its used ring and the idle one's.
    func changed(_ range: Range<UInt64>) -> Bool {
        let lower = max(range.lowerBound, windowBase)
        let upper = min(range.upperBound, windowBase + windowSize)
        guard lower < upper else { return false }
        return (Int(lower - windowBase)..<Int(upper - windowBase)).contains { before[$0] != after[$0] }
    }
    let size = c.layout.size
    let availRange = c.layout.availableRing..<c.layout.availableRing + 6 + 2 * UInt64(size)
    let usedRange = c.layout.usedRing..<c.layout.usedRing + 6 + 8 * UInt64(size)
    let buffers = allowed.filter { $0 != usedRange }
    // The rings as the device saw them: the avail ring is what the driver wrote when nothing
    // changed it; the used ring is the device's own when no buffer or other ring overlaps it.
    let availIntact = !changed(availRange)
    let idleRings = idleLayouts.flatMap { idle in
        [idle.descriptorTable..<idle.descriptorTable + 16, idle.availableRing..<idle.availableRing + 8]
    }
    let usedIntact =
        !overlaps(usedRange, buffers + tables + idleRings + [availRange])
        && (usedRange.lowerBound - windowBase..<min(usedRange.upperBound, windowBase + windowSize) - windowBase).allSatisfy {
            before[Int($0)] == 0
        }
    let tablesIntact = !tables.contains { changed($0) }
    let usedIndex = must { try memory.read(UInt16.self, at: c.layout.usedRing + 2) }
    if verbose {
        let lengths = (0..<min(UInt64(usedIndex), UInt64(size))).map { n in
            must { try memory.read(UInt32.self, at: c.layout.usedRing + 8 + 8 * n) }
        }
        print(
            "\(c.kind): used \(usedIndex) lens \(lengths), needs reset \(needsReset), \(h.progress.device), "
                + "avail intact \(availIntact), used intact \(usedIntact), tables intact \(tablesIntact), idle quiet \(idleQuiet)")
    }

    if availIntact && usedIntact && (idleQuiet || queues.idle.isEmpty) {
        // Replay the avail ring: which chains were there to take, and where it breaks.
        var last: UInt16 = 0
        var broken = false
        rounds: for idx in published {
            guard idx &- last <= size else {
                broken = true
                break
            }
            while last != idx {
                let head = must { try memory.read(UInt16.self, at: c.layout.availableRing + 4 + 2 * UInt64(last % size)) }
                if head >= size {
                    broken = true
                    break rounds
                }
                last &+= 1
            }
        }
        check(usedIndex <= last, "used idx \(usedIndex) beyond the \(last) chains made available")
        if needsReset { check(broken, "DEVICE_NEEDS_RESET for a ring that is not broken") }
        if h.neverWaits {
            // (With a broken ring, fewer: a device that was held back meets the break sooner.)
            if !broken { check(usedIndex == last, "\(c.kind) used \(usedIndex) of \(last) available chains") }
            check(needsReset == broken, "ring broken: \(broken), DEVICE_NEEDS_RESET: \(needsReset)")
        }
        if usedIndex > 0 && !c.eventIndex && c.availFlags & 1 == 0 && availIntact {
            check(h.transport.interrupt.signalCount > 0, "used buffers without an interrupt")
        }
    }
    if usedIntact && tablesIntact {
        // Each used element: a head of the queue, no more bytes than the chain could take.
        let count = min(UInt64(usedIndex), UInt64(size))
        for n in 0..<count {
            let slot = (UInt64(usedIndex) &- 1 &- n) % UInt64(size)
            let element = c.layout.usedRing + 4 + 8 * slot
            let id = must { try memory.read(UInt32.self, at: element) }
            let length = must { try memory.read(UInt32.self, at: element + 4) }
            check(id < UInt32(size), "used id \(id) beyond queue size \(size)")
            let writable = referenceWritableBytes(memory: memory, layout: c.layout, indirect: c.indirect, head: UInt16(id))
            check(UInt64(length) <= writable ?? 0, "used len \(length) for chain \(id) with \(String(describing: writable)) writable bytes")
        }
    }
    finish(h)
}

/// Reset (status 0): afterwards a kick must not reach the device any more.
func finish(_ h: Harness) {
    let memory = h.memory
    h.transport.write(offset: Virtio.MMIORegister.status, length: 4, value: 0)
    check(h.transport.status == 0, "status after reset")
    let before = snapshot(memory, at: windowBase, count: Int(windowSize))
    h.kick(h.c.kind.queues.fuzzed)
    h.port?.offer([1, 2, 3])
    if h.c.kind == .netReceive { _ = send(tap.host, [UInt8](repeating: 0, count: 64), 64, Int32(MSG_DONTWAIT)) }
    for _ in 0..<3 { h.loop.runOneRound() }
    check(before == snapshot(memory, at: windowBase, count: Int(windowSize)), "guest memory changed after reset")
    drain(tap.host)
    drain(tap.device)
    if let vsock = h.device as? VirtioVsockDevice {
        check(vsock.connectionCount == 0, "vsock connections left after reset")
        vsock.shutdown()
        h.vsockListener?.close()
        if h.vsockClient >= 0 { close(h.vsockClient) }
        drainPortOne()
    }
}

/// RAM below the window starts every input zero; afterwards only allowed ranges may be
/// non-zero (and are cleared again).
func checkOutsideWindow(_ memory: GuestMemory, allowed: [Range<UInt64>], zeroAllowed: Bool) {
    let dirty = zeroes.withUnsafeBytes { zero in zero.baseAddress.map { memcmp(memory.base, $0, zero.count) != 0 } ?? true }
    guard dirty else { return }
    let bytes = snapshot(memory, at: 0, count: Int(windowBase))
    for i in 0..<bytes.count where bytes[i] != 0 {
        check(allowed.contains { $0.contains(UInt64(i)) }, "a write outside the window and every writable buffer at \(hex(i))")
    }
    must { try memory.fill(0, at: 0, count: windowBase) }
}
