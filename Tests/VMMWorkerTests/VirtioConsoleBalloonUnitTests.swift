import Glibc
import Protocol
import Synchronization
import Testing

@testable import VMMWorker

/// A split queue placed at `base` in crafted guest memory: descriptors, then the available
/// ring at +0x1000, the used ring at +0x2000 (the driver's side, as the tests play it).
struct QueueAt {
    let memory: GuestMemory
    let base: UInt64
    let size: UInt16 = 8
    var availIndex: UInt16 = 0

    var avail: UInt64 { base + 0x1000 }
    var used: UInt64 { base + 0x2000 }

    func descriptor(_ index: UInt16, address: UInt64, length: UInt32, flags: UInt16 = 0, next: UInt16 = 0) throws {
        let at = base + 16 * UInt64(index)
        try memory.write(address, at: at)
        try memory.write(length, at: at + 8)
        try memory.write(flags, at: at + 12)
        try memory.write(next, at: at + 14)
    }

    mutating func publish(_ head: UInt16) throws {
        try memory.write(head, at: avail + 4 + 2 * UInt64(availIndex % size))
        availIndex &+= 1
        try memory.write(availIndex, at: avail + 2)
    }

    func usedIndex() throws -> UInt16 { try memory.read(UInt16.self, at: used + 2) }
    func usedElement(_ slot: UInt16) throws -> (id: UInt32, length: UInt32) {
        let at = used + 4 + 8 * UInt64(slot % size)
        return (try memory.read(UInt32.self, at: at), try memory.read(UInt32.self, at: at + 4))
    }

    /// Programs queue `index` of the transport to this place.
    func install(on t: VirtioMMIOTransport, index: Int) {
        typealias R = Virtio.MMIORegister
        t.write(offset: R.queueSelect, length: 4, value: UInt64(index))
        t.write(offset: R.queueSize, length: 4, value: UInt64(size))
        t.write(offset: R.queueDescLow, length: 4, value: base)
        t.write(offset: R.queueDriverLow, length: 4, value: avail)
        t.write(offset: R.queueDeviceLow, length: 4, value: used)
        t.write(offset: R.queueReady, length: 4, value: 1)
    }
}

/// Feature negotiation (VERSION_1 plus `features`) and DRIVER_OK after `queues` are installed.
func bringUp(_ t: VirtioMMIOTransport, features: UInt64 = 0, queues: [QueueAt]) {
    typealias R = Virtio.MMIORegister
    t.write(offset: R.status, length: 4, value: 3)
    t.write(offset: R.driverFeaturesSelect, length: 4, value: 0)
    t.write(offset: R.driverFeatures, length: 4, value: features & 0xffff_ffff)
    t.write(offset: R.driverFeaturesSelect, length: 4, value: 1)
    t.write(offset: R.driverFeatures, length: 4, value: 1)
    t.write(offset: R.status, length: 4, value: 11)
    for (index, queue) in queues.enumerated() { queue.install(on: t, index: index) }
    t.write(offset: R.status, length: 4, value: 15)
}

/// A console port like the socket's, without a socket: takes output up to `room` bytes, holds
/// offered input until the device's sink takes it, and hands it over again on resumeInput.
final class TestConsolePort: ConsolePort {
    struct State {
        var output: [UInt8] = []
        var room = Int.max
        var input: [UInt8] = []
        var sink: (@Sendable ([UInt8]) -> Int)?
        var outputSpace: (@Sendable () -> Void)?
        var resumes = 0
    }
    let state = Mutex(State())
    let loop: EventLoop

    init(loop: EventLoop) { self.loop = loop }

    func writeOutput(_ bytes: UnsafeRawBufferPointer) -> Int {
        state.withLock { s in
            let take = min(bytes.count, s.room)
            s.room -= take
            s.output.append(contentsOf: bytes[0..<take])
            return take
        }
    }
    func setInputSink(_ sink: @escaping @Sendable ([UInt8]) -> Int) { state.withLock { $0.sink = sink } }
    func setOutputSpaceHandler(_ handler: @escaping @Sendable () -> Void) { state.withLock { $0.outputSpace = handler } }
    func resumeInput() {
        state.withLock { $0.resumes += 1 }
        loop.execute { [self] in deliver() }
    }

    /// Host input, delivered on the loop thread as the socket does.
    func offer(_ bytes: [UInt8]) {
        state.withLock { $0.input += bytes }
        loop.execute { [self] in deliver() }
    }

    /// Room for more output, and the device told so (on the loop, as the socket does).
    func makeRoom(_ room: Int) {
        let handler = state.withLock { s -> (@Sendable () -> Void)? in
            s.room = room
            return s.outputSpace
        }
        if let handler { loop.execute(handler) }
    }

    private func deliver() {
        let (pending, sink) = state.withLock { ($0.input, $0.sink) }
        guard !pending.isEmpty, let sink else { return }
        let taken = sink(pending)
        state.withLock { $0.input.removeFirst(min(taken, $0.input.count)) }
    }

    var output: [UInt8] { state.withLock { $0.output } }
    var waitingInput: [UInt8] { state.withLock { $0.input } }
}

/// Whether a loop task has run.
final class RanFlag: Sendable {
    let ran = Mutex(false)
}

/// Waits for `rounds` loop tasks, each queued once the one before has run: what the loop had
/// to do before (ready descriptors, queued tasks, and what they queue in turn, `rounds` deep)
/// is then done. For asserting that something did not happen, without a timed wait.
func settle(_ loop: EventLoop, rounds: Int = 4) {
    for _ in 0..<rounds {
        let flag = RanFlag()
        loop.execute { flag.ran.withLock { $0 = true } }
        _ = waitUntil { flag.ran.withLock { $0 } }
    }
}

@Suite("virtio-console queues against crafted guest memory", .serialized)
struct VirtioConsoleUnitTests {
    static let buffers: UInt64 = 0x40000

    @Test("transmitq reaches the port; receiveq fills posted buffers, waits without them; a full port holds the chain back")
    func queues() throws {
        let memory = try guestMemory()
        let loop = try EventLoop(name: "console-test")
        let thread = try loop.startThread()
        defer {
            loop.stop()
            HostThread.join(thread)
        }
        let port = TestConsolePort(loop: loop)
        let device = VirtioConsoleDevice(id: "con0", port: port, memory: memory, loop: loop)
        #expect(device.deviceID == 3 && device.deviceFeatures == 0 && device.queueMaxSizes.count == 2)
        let t = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 6), device: device, memory: memory, vm: nil)
        var rx = QueueAt(memory: memory, base: 0x10000)
        var tx = QueueAt(memory: memory, base: 0x18000)
        typealias R = Virtio.MMIORegister

        // Input before the driver is there waits with the port.
        port.offer(Array("abcdef".utf8))
        bringUp(t, queues: [rx, tx])
        #expect(t.read(offset: R.status, length: 4) == 15)
        // Once the loop has done everything queued (activation's first look, the port's
        // delivery it asks for), still nothing: no receive buffers.
        settle(loop)
        #expect(device.receivedBytes == 0)
        #expect(port.waitingInput == Array("abcdef".utf8))

        // Transmit: two readable buffers, in order.
        try memory.write(Array("hello ".utf8), at: Self.buffers)
        try memory.write(Array("world".utf8), at: Self.buffers + 0x100)
        try tx.descriptor(0, address: Self.buffers, length: 6, flags: 1, next: 1)
        try tx.descriptor(1, address: Self.buffers + 0x100, length: 5)
        try tx.publish(0)
        t.write(offset: R.queueNotify, length: 4, value: 1)
        #expect(waitUntil { (try? tx.usedIndex()) == 1 })
        #expect(try tx.usedElement(0) == (0, 0))
        #expect(port.output == Array("hello world".utf8))

        // Receive: a 4-byte buffer takes "abcd"; the rest waits for the next buffer.
        try rx.descriptor(0, address: Self.buffers + 0x1000, length: 4, flags: 2)
        try rx.publish(0)
        t.write(offset: R.queueNotify, length: 4, value: 0)
        #expect(waitUntil { (try? rx.usedIndex()) == 1 })
        #expect(try rx.usedElement(0) == (0, 4))
        #expect(try memory.read(at: Self.buffers + 0x1000, count: 4) == Array("abcd".utf8))
        #expect(port.waitingInput == Array("ef".utf8))
        try rx.descriptor(1, address: Self.buffers + 0x2000, length: 64, flags: 2)
        try rx.publish(1)
        t.write(offset: R.queueNotify, length: 4, value: 0)
        #expect(waitUntil { (try? rx.usedIndex()) == 2 })
        #expect(try rx.usedElement(1) == (1, 2))
        #expect(try memory.read(at: Self.buffers + 0x2000, count: 2) == Array("ef".utf8))
        #expect(device.receivedBytes == 6)

        // A receive chain with a device-readable buffer is malformed: returned unused, the
        // input stays for the next good buffer.
        try rx.descriptor(2, address: Self.buffers + 0x3000, length: 16)
        try rx.publish(2)
        t.write(offset: R.queueNotify, length: 4, value: 0)
        port.offer(Array("xyz".utf8))
        #expect(waitUntil { (try? rx.usedIndex()) == 3 })
        #expect(try rx.usedElement(2) == (2, 0))
        #expect(port.waitingInput == Array("xyz".utf8))

        // A port with room for 3 bytes: the chain stays unused until there is room, and then
        // only the rest is sent.
        port.state.withLock { $0.room = 3 }
        try memory.write(Array("12345".utf8), at: Self.buffers + 0x200)
        try tx.descriptor(2, address: Self.buffers + 0x200, length: 5)
        try tx.publish(2)
        t.write(offset: R.queueNotify, length: 4, value: 1)
        #expect(waitUntil { port.output.count == 14 })
        settle(loop)
        #expect(try tx.usedIndex() == 1, "the chain the port could not take whole was used")
        port.makeRoom(100)
        #expect(waitUntil { (try? tx.usedIndex()) == 2 })
        #expect(port.output == Array("hello world12345".utf8))
        #expect(device.transmittedBytes == 16)

        // Reset: nothing is taken any more.
        t.write(offset: R.status, length: 4, value: 0)
        #expect(device.receive(Array("late".utf8)) == 0)
    }
}

@Suite("virtio-balloon page accounting and PFN checks")
struct VirtioBalloonUnitTests {
    static let pageSize = VirtioBalloonDevice.pageSize

    /// A chain of PFNs as the driver writes them (little-endian u32), in one readable buffer
    /// at `address`, or split across two buffers at byte `split`.
    func chain(_ memory: GuestMemory, pfns: [UInt32], at address: UInt64, split: Int? = nil) throws -> DescriptorChain {
        var bytes: [UInt8] = []
        for pfn in pfns { withUnsafeBytes(of: pfn.littleEndian) { bytes += $0 } }
        try memory.write(bytes, at: address)
        guard let split else {
            return DescriptorChain(
                head: 0, readable: [try GuestSegment(address: address, length: UInt32(bytes.count), in: memory)], writable: [])
        }
        // The second half a page further on, so the two are not adjacent.
        try memory.write(Array(bytes[split...]), at: address + 0x1000)
        return DescriptorChain(
            head: 0,
            readable: [
                try GuestSegment(address: address, length: UInt32(split), in: memory),
                try GuestSegment(address: address + 0x1000, length: UInt32(bytes.count - split), in: memory),
            ], writable: [])
    }

    @Test("inflate discards RAM pages (they read 0 again); PFNs beyond RAM are refused, even straddling buffers")
    func inflateLowRAM() throws {
        let memory = try GuestMemory(size: 16 << 20)
        var handler = BalloonPageHandler(memory: memory, inflate: true)
        for page: UInt64 in [0x800, 0x801, 0x900] { try memory.write(UInt64(0x5a5a), at: page * Self.pageSize) }
        try memory.write(UInt64(0x5a5a), at: 0x902 * Self.pageSize)
        let pfns: [UInt32] = [0x800, 0x801, 0x1000, 0xc0000, 0xffff_ffff, 0x900]
        var bucket: TokenBucket?
        // Split in the middle of the fourth PFN.
        #expect(handler.handle(try chain(memory, pfns: pfns, at: 0x40000, split: 14), bucket: &bucket) == 0)
        #expect(handler.pages == 3 && handler.refused == 3 && handler.failures == 0)
        #expect(try memory.read(UInt64.self, at: 0x800 * Self.pageSize) == 0)
        #expect(try memory.read(UInt64.self, at: 0x801 * Self.pageSize) == 0)
        #expect(try memory.read(UInt64.self, at: 0x900 * Self.pageSize) == 0)
        #expect(try memory.read(UInt64.self, at: 0x902 * Self.pageSize) == 0x5a5a, "a page not named was touched")

        // Deflate only counts; the page keeps what the guest writes.
        var deflater = BalloonPageHandler(memory: memory, inflate: false)
        try memory.write(UInt64(7), at: 0x800 * Self.pageSize)
        #expect(deflater.handle(try chain(memory, pfns: [0x800, 0x1_0000], at: 0x40000), bucket: &bucket) == 0)
        #expect(deflater.pages == 1 && deflater.refused == 1)
        #expect(try memory.read(UInt64.self, at: 0x800 * Self.pageSize) == 7)
    }

    @Test("with RAM above 4 GiB: high pages are discarded, PFNs in the MMIO hole and past the end refused")
    func highRAM() throws {
        // 3 GiB low + 1 GiB from 4 GiB; MAP_NORESERVE, so nothing is committed.
        let memory = try GuestMemory(size: 4 << 30)
        var handler = BalloonPageHandler(memory: memory, inflate: true)
        let high: UInt32 = 0x10_0000  // 4 GiB
        let last: UInt32 = 0x13_ffff  // last page of RAM, at 5 GiB - 4 KiB
        try memory.write(UInt64(1), at: UInt64(high) * Self.pageSize)
        try memory.write(UInt64(1), at: UInt64(last) * Self.pageSize)
        try memory.write(UInt64(1), at: 0xbffff * Self.pageSize)
        let pfns: [UInt32] = [0xbffff, 0xc0000, 0xfee00, 0xfffff, high, last, last + 1]
        var bucket: TokenBucket?
        #expect(handler.handle(try chain(memory, pfns: pfns, at: 0x40000), bucket: &bucket) == 0)
        #expect(handler.pages == 3 && handler.refused == 4)
        #expect(try memory.read(UInt64.self, at: UInt64(high) * Self.pageSize) == 0)
        #expect(try memory.read(UInt64.self, at: UInt64(last) * Self.pageSize) == 0)
        #expect(try memory.read(UInt64.self, at: 0xbffff * Self.pageSize) == 0)
    }

    @Test("a huge request of bad PFNs is refused and counted in full, and the odd trailing bytes are ignored")
    func hugeCount() throws {
        let memory = try GuestMemory(size: 16 << 20)
        var handler = BalloonPageHandler(memory: memory, inflate: true)
        // 1 MiB of 0xff: 262144 PFNs of 0xffffffff, then 3 stray bytes.
        try memory.fill(0xff, at: 0x200000, count: (1 << 20) + 3)
        let segment = try GuestSegment(address: 0x200000, length: (1 << 20) + 3, in: memory)
        var bucket: TokenBucket?
        #expect(handler.handle(DescriptorChain(head: 0, readable: [segment], writable: []), bucket: &bucket) == 0)
        #expect(handler.refused == 262_144 && handler.pages == 0)
    }

    @Test("configuration: num_pages from the host, actual from the driver (any width), observed; DEFLATE_ON_OOM as configured")
    func configuration() throws {
        let memory = try guestMemory()
        let loop = try EventLoop(name: "balloon-test")
        let device = VirtioBalloonDevice(balloon: BalloonConfig(deflateOnOOM: true), memory: memory, loop: loop)
        #expect(device.deviceID == 5 && device.deviceFeatures == VirtioBalloonDevice.Feature.deflateOnOOM)
        #expect(VirtioBalloonDevice(balloon: BalloonConfig(deflateOnOOM: false), memory: memory, loop: loop).deviceFeatures == 0)
        let seen = Mutex<[UInt32]>([])
        device.observeActual { actual in seen.withLock { $0.append(actual) } }
        let t = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 6), device: device, memory: memory, vm: nil)
        typealias R = Virtio.MMIORegister

        #expect(device.setTarget(pages: 0x1234))
        #expect(!device.setTarget(pages: 0x1234))
        #expect(t.read(offset: R.config, length: 4) == 0x1234)
        #expect(t.read(offset: R.config + 1, length: 1) == 0x12)
        // The driver cannot change num_pages.
        t.write(offset: R.config, length: 4, value: 7)
        #expect(t.read(offset: R.config, length: 4) == 0x1234)
        t.write(offset: R.config + 4, length: 4, value: 0x1000)
        t.write(offset: R.config + 5, length: 1, value: 0x20)  // actual = 0x2000
        t.write(offset: R.config + 5, length: 1, value: 0x20)  // unchanged: not observed again
        #expect(device.actualPages == 0x2000)
        #expect(t.read(offset: R.config, length: 8) == 0x2000_0000_1234)
        // Observed at once, then rate-limited: 0x2000 waits for the interval's end.
        #expect(seen.withLock { $0 } == [0x1000])

        // A configuration change before DRIVER_OK moves the generation only; after, it also
        // raises InterruptStatus bit 1 (§4.2.2).
        let generation = t.read(offset: R.configGeneration, length: 4)
        t.configurationChanged()
        #expect(t.read(offset: R.configGeneration, length: 4) == generation + 1)
        #expect(t.read(offset: R.interruptStatus, length: 4) == 0)
        bringUp(
            t, features: VirtioBalloonDevice.Feature.deflateOnOOM,
            queues: [QueueAt(memory: memory, base: 0x10000), QueueAt(memory: memory, base: 0x18000)])
        #expect(t.read(offset: R.status, length: 4) == 15)
        t.configurationChanged()
        #expect(t.read(offset: R.interruptStatus, length: 4) == 2)
        #expect(t.interrupt.signalCount == 1)

        // Reset: the driver's balloon is gone, actual is 0 again (and observed).
        t.write(offset: R.status, length: 4, value: 0)
        #expect(device.actualPages == 0 && device.targetPages == 0x1234)
        // The interval's end tells the newest value only (0x2000 was overtaken by the reset).
        let thread = try loop.startThread()
        for _ in 0..<600 where seen.withLock({ $0.count }) < 2 { usleep(50_000) }
        loop.stop()
        pthread_join(thread, nil)
        #expect(seen.withLock { $0 } == [0x1000, 0])
    }

    @Test("QMP sizes: target pages from a byte value (clamped to RAM), actual bytes never below 0")
    func sizes() {
        let ram: UInt64 = 256 << 20
        #expect(BalloonCommands.targetPages(ram: ram, value: ram - (16 << 20)) == 4096)
        #expect(BalloonCommands.targetPages(ram: ram, value: ram + 1) == 0)
        #expect(BalloonCommands.targetPages(ram: ram, value: 1) == 65535)
        #expect(BalloonCommands.guestBytes(ram: ram, actual: 4096) == ram - (16 << 20))
        #expect(BalloonCommands.guestBytes(ram: ram, actual: .max) == 0)
    }
}
