import CLinux
import Glibc
import Protocol
import Testing

@testable import VMMWorker

/// The virtio-net receive and transmit chain handling without a VM: crafted guest memory, and
/// a SOCK_SEQPACKET socket pair standing in for the tap (one read or write is one frame, as on
/// a tap; a read into too small a buffer truncates, which the overflow buffer detects as a tap's
/// full-size return does). The real tap is covered end to end in CLITests.VirtioNetTests.
@Suite("virtio-net receive and transmit chains")
struct VirtioNetUnitTests {
    static let header = VirtioNetDevice.headerSize

    /// A non-blocking socket pair: [0] is the device's "tap", [1] the host's side.
    func tapPair() throws -> (device: Int32, host: Int32) {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &fds) == 0 else {
            throw SyscallError("socketpair", .init(rawValue: errno))
        }
        return (fds[0], fds[1])
    }

    func segment(_ memory: GuestMemory, _ address: UInt64, _ length: UInt32) throws -> GuestSegment {
        try GuestSegment(address: address, length: length, in: memory)
    }

    func send(_ fd: Int32, _ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }

    func receiveAll(_ fd: Int32) -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: 70000)
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        return count < 0 ? nil : Array(buffer[0..<count])
    }

    /// Runs `body` with fresh guest memory, the host's side of a tap pair and the receive and
    /// transmit handlers on the device's side; closes the pair and frees the handlers' scratch
    /// afterwards.
    func withHandlers(
        _ body: (
            _ memory: GuestMemory, _ host: Int32, _ receiver: inout NetReceiveHandler, _ transmitter: inout NetTransmitHandler
        ) throws -> Void
    ) throws {
        let memory = try guestMemory()
        let tap = try tapPair()
        defer {
            close(tap.device)
            close(tap.host)
        }
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 16)
        defer { scratch.deallocate() }
        scratch.initializeMemory(as: UInt8.self, repeating: 0, count: 64)
        var receiver = NetReceiveHandler(tapFD: tap.device, memory: memory, overflow: iovec(iov_base: scratch + 16, iov_len: 48))
        var transmitter = NetTransmitHandler(tapFD: tap.device, memory: memory, header: iovec(iov_base: scratch, iov_len: Self.header))
        try body(memory, tap.host, &receiver, &transmitter)
    }

    /// A frame as the tap delivers it: `header` (12 bytes) and an Ethernet frame.
    func tapFrame(_ payload: Int, seed: UInt8, header: [UInt8]) -> [UInt8] {
        header + (0..<(14 + payload)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
    }

    /// A receive queue of 16 in crafted memory, chain i one writable buffer of `length` at
    /// 0x40000 + i * 0x10000 (or the chains `build` makes), all posted.
    func receiveQueue(_ memory: GuestMemory, chains: Int, length: UInt32) throws -> (CraftedQueue, SplitVirtqueue) {
        var q = CraftedQueue(memory: memory, size: 16)
        for i in 0..<chains {
            try q.descriptor(UInt16(i), address: 0x40000 + UInt64(i) * 0x10000, length: length, flags: 2)
            try q.publish(UInt16(i))
        }
        return (q, q.queue())
    }

    /// A header as a driver or the tap writes it.
    func header(flags: UInt8 = 0, gso: UInt8 = 0, hdrLen: UInt16 = 0, gsoSize: UInt16 = 0, start: UInt16 = 0, offset: UInt16 = 0)
        -> [UInt8]
    {
        [flags, gso] + [hdrLen, gsoSize, start, offset, 0].flatMap { [UInt8($0 & 0xff), UInt8($0 >> 8)] }
    }

    @Test("receive: a frame lands across the chain's buffers with the tap's header (flags cleared without GUEST_CSUM), num_buffers 1")
    func receiveFrame() throws {
        try withHandlers { memory, host, receiver, _ in
            // The header splits across the first two buffers (5 + 7 bytes), the frame runs on.
            var q = CraftedQueue(memory: memory, size: 16)
            try q.descriptor(0, address: 0x40000, length: 5, flags: 3, next: 1)
            try q.descriptor(1, address: 0x40100, length: 40, flags: 3, next: 2)
            try q.descriptor(2, address: 0x40200, length: 2000, flags: 2)
            try q.publish(0)
            var queue = q.queue()
            #expect(try receiver.serve(&queue) == .blocked, "an empty tap keeps the chain for later")
            #expect(try q.usedIndex() == 0)

            // DATA_VALID and junk in the fields a non-GSO frame does not use: the flags go (no
            // GUEST_CSUM, §5.1.6.4.1), the rest passes as the tap wrote it.
            let frame = tapFrame(100, seed: 1, header: header(flags: 2, hdrLen: 0x1234, start: 7, offset: 9))
            send(host, frame)
            #expect(try receiver.serve(&queue) == .drained)
            #expect(try q.usedIndex() == 1 && q.usedElement(0) == (0, UInt32(frame.count)))
            let landed =
                try memory.read(at: 0x40000, count: 5) + memory.read(at: 0x40100, count: 40) + memory.read(at: 0x40200, count: 2000)
            #expect(Array(landed[0..<Self.header]) == header(hdrLen: 0x1234, start: 7, offset: 9).prefix(10) + [1, 0])
            #expect(Array(landed[Self.header..<frame.count]) == Array(frame[Self.header...]))
            #expect(receiver.frames == 1 && receiver.dropped == 0)
        }
    }

    @Test(
        "receive: with GUEST_CSUM and GUEST_TSO4 the tap's NEEDS_CSUM/GSO header passes whole; a GSO type the driver did not take is dropped and counted"
    )
    func receiveOffloadHeaders() throws {
        try withHandlers { memory, host, receiver, _ in
            let features = VirtioNetDevice.Feature.guestChecksum | VirtioNetDevice.Feature.guestTSO4
            receiver.offloads = NetOffloads(features: features)
            var (q, queue) = try receiveQueue(memory, chains: 2, length: 0x10000)
            let tso4 = header(flags: 1, gso: 1, hdrLen: 54, gsoSize: 1448, start: 34, offset: 16)
            let tso6 = header(flags: 1, gso: 4, hdrLen: 74, gsoSize: 1428, start: 54, offset: 16)
            let ecn = header(flags: 1, gso: 0x81, hdrLen: 54, gsoSize: 1448, start: 34, offset: 16)
            let big = tapFrame(20_000, seed: 2, header: tso4)
            for frame in [tapFrame(20_000, seed: 3, header: tso6), tapFrame(100, seed: 4, header: ecn), big] { send(host, frame) }
            #expect(try receiver.serve(&queue) == .blocked)
            #expect(try q.usedIndex() == 1 && q.usedElement(0) == (0, UInt32(big.count)))
            #expect(try memory.read(at: 0x40000, count: big.count) == Array(tso4.prefix(10)) + [1, 0] + big[Self.header...])
            #expect(receiver.frames == 1 && receiver.dropped == 2, "TCPv6 without GUEST_TSO6, ECN without GUEST_ECN")
            _ = q
        }
    }

    @Test("receive with MRG_RXBUF: a frame spans chains, num_buffers counts them, all published at once; later frames use the rest")
    func receiveMergeable() throws {
        try withHandlers { memory, host, receiver, _ in
            receiver.offloads = NetOffloads(features: VirtioNetDevice.Feature.mergeableReceiveBuffers)
            var (q, queue) = try receiveQueue(memory, chains: 6, length: 1000)
            // 2500 bytes with the header: chains 0, 1 and 2 (1000 + 1000 + 500); then a small
            // frame in chain 3.
            let large = tapFrame(2500 - Self.header - 14, seed: 5, header: header())
            let small = tapFrame(50, seed: 6, header: header())
            send(host, large)
            send(host, small)
            #expect(try receiver.serve(&queue) == .blocked)
            #expect(try q.usedIndex() == 4)
            let used = try (0..<4).map { try q.usedElement($0) }.map { [$0.id, $0.length] }
            #expect(used == [[0, 1000], [1, 1000], [2, 500], [3, UInt32(small.count)]])
            let spread =
                try memory.read(at: 0x40000, count: 1000) + memory.read(at: 0x50000, count: 1000) + memory.read(at: 0x60000, count: 500)
            #expect(Array(spread[10..<12]) == [3, 0], "num_buffers 3")
            #expect(Array(spread[Self.header...]) == Array(large[Self.header...]))
            #expect(try memory.read(at: 0x70000 + 10, count: 2) == [1, 0])
            #expect(receiver.pendingCount == 2, "chains 4 and 5 stay taken for the next frame")
            // A frame larger than everything posted is dropped, never a stall: the rest of the
            // ring stays usable.
            send(host, tapFrame(3000, seed: 7, header: header()))
            send(host, small)
            #expect(try receiver.serve(&queue) == .blocked)
            #expect(try q.usedIndex() == 5 && q.usedElement(4) == (4, UInt32(small.count)))
            #expect(receiver.frames == 3 && receiver.dropped == 1)
        }
    }

    @Test("receive: readable buffers or room for less than the header are returned unused, no frame spent")
    func receiveMalformed() throws {
        try withHandlers { memory, host, receiver, _ in
            let frame = tapFrame(20, seed: 2, header: header())
            send(host, frame)
            var q = CraftedQueue(memory: memory, size: 16)
            try q.descriptor(0, address: 0x40000, length: 100, flags: 1, next: 1)
            try q.descriptor(1, address: 0x41000, length: 2000, flags: 2)
            try q.descriptor(2, address: 0x41000, length: 11, flags: 2)
            try q.descriptor(3, address: 0x42000, length: 2000, flags: 2)
            for head: UInt16 in [0, 2, 3] { try q.publish(head) }
            var queue = q.queue()
            #expect(try receiver.serve(&queue) == .drained)
            let used = try (0..<3).map { try q.usedElement($0) }.map { [$0.id, $0.length] }
            #expect(used == [[0, 0], [2, 0], [3, UInt32(frame.count)]])
            #expect(receiver.frames == 1 && receiver.dropped == 0)
        }
    }

    @Test("receive: a frame larger than the chain is dropped and counted; the next one that fits uses the chain")
    func receiveOversize() throws {
        try withHandlers { memory, host, receiver, _ in
            var (q, queue) = try receiveQueue(memory, chains: 1, length: 200)
            // One byte too many, then far too many, then one that fits exactly.
            let tooLarge = tapFrame(200 - 26 + 1, seed: 3, header: header())
            let huge = tapFrame(1500, seed: 4, header: header())
            let exact = tapFrame(200 - 26, seed: 5, header: header())
            for frame in [tooLarge, huge, exact] { send(host, frame) }
            #expect(try receiver.serve(&queue) == .drained)
            #expect(try q.usedElement(0) == (0, 200))
            #expect(try memory.read(at: 0x40000 + UInt64(Self.header), count: 200 - Self.header) == Array(exact[Self.header...]))
            #expect(receiver.frames == 1 && receiver.dropped == 2)
        }
    }

    @Test("transmit: the driver's header and the frame go to the tap in one write; bad chains are dropped")
    func transmit() throws {
        try withHandlers { memory, host, _, transmitter in
            var bucket: TokenBucket?

            // The driver's header (unknown flag bits, which are cleared, and a num_buffers,
            // which is not passed on) splits 8 + 4 with the frame's start; the frame ends in a
            // third buffer.
            let frame = (0..<60).map { UInt8(truncatingIfNeeded: $0 * 3 + 1) }
            let driverHeader = header(flags: 0xf0, hdrLen: 3, gsoSize: 4, start: 5, offset: 6)
            try memory.write(Array(driverHeader[0..<8]), at: 0x40000)
            try memory.write([6, 0, 9, 9] + frame[0..<20], at: 0x40100)
            try memory.write(Array(frame[20...]), at: 0x40200)
            let chain = DescriptorChain(
                head: 0,
                readable: [try segment(memory, 0x40000, 8), try segment(memory, 0x40100, 24), try segment(memory, 0x40200, 40)],
                writable: [])
            #expect(transmitter.handle(chain, bucket: &bucket) == 0)
            #expect(receiveAll(host) == header(hdrLen: 3, gsoSize: 4, start: 5, offset: 6) + frame)
            #expect(transmitter.frames == 1 && transmitter.dropped == 0)

            // A writable buffer in a transmit chain, and a frame shorter than an Ethernet header.
            let writable = DescriptorChain(
                head: 1, readable: [try segment(memory, 0x40000, 72)], writable: [try segment(memory, 0x41000, 10)])
            #expect(transmitter.handle(writable, bucket: &bucket) == 0)
            let short = DescriptorChain(head: 2, readable: [try segment(memory, 0x40000, UInt32(Self.header + 13))], writable: [])
            #expect(transmitter.handle(short, bucket: &bucket) == 0)
            #expect(receiveAll(host) == nil, "nothing more was sent")
            #expect(transmitter.frames == 1 && transmitter.dropped == 2)
        }
    }

    @Test("transmit: NEEDS_CSUM and GSO headers pass only as negotiated and inside the frame; others are dropped and counted")
    func transmitOffloadHeaders() throws {
        try withHandlers { memory, host, _, transmitter in
            var bucket: TokenBucket?
            let frame = [UInt8](repeating: 0x5a, count: 1000)
            func transmitted(_ driverHeader: [UInt8]) throws -> [UInt8]? {
                try memory.write(driverHeader + frame, at: 0x40000)
                let chain = DescriptorChain(head: 0, readable: [try segment(memory, 0x40000, UInt32(12 + frame.count))], writable: [])
                _ = transmitter.handle(chain, bucket: &bucket)
                return receiveAll(host)
            }
            let checksum = header(flags: 1, start: 34, offset: 16)
            let tso4 = header(flags: 1, gso: 1, hdrLen: 54, gsoSize: 1448, start: 34, offset: 16)
            let tso6 = header(flags: 1, gso: 4, hdrLen: 74, gsoSize: 1428, start: 54, offset: 16)
            // Nothing negotiated: neither passes.
            let before = (try transmitted(checksum), try transmitted(tso4))
            #expect(before.0 == nil && before.1 == nil)
            transmitter.offloads = NetOffloads(features: VirtioNetDevice.Feature.checksum | VirtioNetDevice.Feature.hostTSO4)
            let cases: [(header: [UInt8], passes: Bool, why: String)] = [
                (checksum, true, "NEEDS_CSUM with CSUM"),
                (tso4, true, "TCPv4 GSO with HOST_TSO4"),
                (tso6, false, "HOST_TSO6 not negotiated"),
                (header(flags: 1, start: 990, offset: 9), false, "checksum field past the frame's end"),
                (header(flags: 1, gso: 1, hdrLen: 1001, gsoSize: 1448, start: 34, offset: 16), false, "hdr_len past the end"),
                (header(flags: 1, gso: 1, hdrLen: 54, gsoSize: 0, start: 34, offset: 16), false, "no MSS"),
                (header(flags: 1, gso: 3, hdrLen: 42, gsoSize: 1000, start: 34, offset: 6), false, "UFO is not offered"),
                (header(flags: 1, gso: 0x81, hdrLen: 54, gsoSize: 1448, start: 34, offset: 16), false, "ECN without HOST_ECN"),
            ]
            for test in cases {
                let sent = try transmitted(test.header)
                #expect(sent == (test.passes ? test.header + frame : nil), "\(test.why)")
            }
            #expect(transmitter.frames == 2 && transmitter.dropped == 8)
        }
    }

    @Test("offloads follow the driver's features with §5.1.3.1's dependencies; the tap gets the receive-side ones")
    func offloadsFromFeatures() {
        typealias F = VirtioNetDevice.Feature
        #expect(NetOffloads(features: 0).tapOffloads == 0)
        #expect(NetOffloads(features: F.offered).tapOffloads == 0x0f)
        #expect(NetOffloads(features: F.guestChecksum | F.guestTSO4).tapOffloads == 0x03)
        // TSO without its checksum feature, ECN without TSO: not taken (the kernel refuses
        // TUN_F_TSO* without TUN_F_CSUM).
        #expect(NetOffloads(features: F.guestTSO4 | F.guestTSO6 | F.guestECN).tapOffloads == 0)
        #expect(NetOffloads(features: F.guestChecksum | F.guestECN).tapOffloads == 0x01)
        let host = NetOffloads(features: F.hostTSO4 | F.hostECN | F.mergeableReceiveBuffers)
        #expect(!host.hostTSO4 && !host.hostECN && host.mergeable && host.tapOffloads == 0)
    }

    @Test("the queue runner keeps a receive chain while the tap is empty, and uses it once a frame arrives")
    func runnerBlocksOnEmptyTap() throws {
        try withHandlers { memory, host, receiver, _ in
            let loop = try EventLoop(name: "net-test")
            let notify = fl_eventfd(0, 1)
            let irq = fl_eventfd(0, 1)
            defer {
                close(notify)
                close(irq)
            }
            let interrupt = VirtioInterrupt(eventFD: irq)
            var q = CraftedQueue(memory: memory)
            try q.descriptor(0, address: CraftedQueue.buffers, length: 1600, flags: 2)
            try q.publish(0)
            var runner = try VirtioQueueRunner(queue: q.queue(), notifyFD: notify, interrupt: interrupt, bucket: nil, loop: loop) {}
            defer { runner.stop(loop: loop) }

            #expect(runner.run(serving: &receiver, loop: loop) == .blocked)
            #expect(try q.usedIndex() == 0 && interrupt.signalCount == 0)
            let frame = tapFrame(50, seed: 6, header: header())
            send(host, frame)
            #expect(runner.run(serving: &receiver, loop: loop) == .drained)
            #expect(try q.usedIndex() == 1)
            #expect(try q.usedElement(0) == (0, UInt32(frame.count)))
            #expect(interrupt.signalCount == 1)
        }
    }

    @Test("config space: MAC, LINK_UP; a NIC without mac gets a stable locally administered unicast one")
    func configAndMAC() throws {
        let a = VirtioNetDevice.defaultMAC(for: NetConfig(id: "net0", hostDeviceName: "tap0"))
        #expect(a == VirtioNetDevice.defaultMAC(for: NetConfig(id: "net0", hostDeviceName: "tap0")))
        #expect(a != VirtioNetDevice.defaultMAC(for: NetConfig(id: "net1", hostDeviceName: "tap1")))
        #expect(a.bytes.0 & 3 == 2, "U/L set, I/G clear: \(a)")
    }

    @Test(
        "the device itself on a frame socket instead of a tap (as the fuzzer drives it): activation with offloads and MRG_RXBUF makes no tap ioctl, a frame goes out and one comes in with num_buffers, reset stops receiving"
    )
    func deviceOnFrameSocket() throws {
        let memory = try guestMemory()
        let loop = try EventLoop(name: "net-socket-test")
        let thread = try loop.startThread()
        defer {
            loop.stop()
            HostThread.join(thread)
        }
        let pair = try tapPair()
        defer { close(pair.host) }
        let tap = Tap(frameSocket: pair.device, name: "sock0")
        #expect(!tap.isTap)
        let device = VirtioNetDevice(id: "n0", tap: tap, mac: MACAddress(0x52, 0x54, 0, 1, 2, 3), memory: memory, loop: loop)
        let t = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 4), device: device, memory: memory, vm: nil)
        var rx = QueueAt(memory: memory, base: 0x10000)
        var tx = QueueAt(memory: memory, base: 0x18000)
        typealias F = VirtioNetDevice.Feature
        // On a tap these would be TUNSETOFFLOAD 0x0f, which a socket refuses (ENOTTY).
        bringUp(t, features: F.checksum | F.guestChecksum | F.guestTSO4 | F.hostTSO4 | F.mergeableReceiveBuffers, queues: [rx, tx])
        #expect(t.read(offset: Virtio.MMIORegister.status, length: 4) == 15, "activated")

        // Out: the 12-byte header then the frame, in one record.
        let frame: [UInt8] = [UInt8](repeating: 0xff, count: 6) + [2, 0, 0, 0, 0, 1, 8, 0] + [UInt8](repeating: 7, count: 46)
        try memory.write([UInt8](repeating: 0, count: Self.header) + frame, at: 0x30000)
        try tx.descriptor(0, address: 0x30000, length: UInt32(Self.header + frame.count))
        try tx.publish(0)
        t.write(offset: Virtio.MMIORegister.queueNotify, length: 4, value: 1)
        #expect(waitUntil { (try? tx.usedIndex()) == 1 })
        #expect(receiveAll(pair.host) == [UInt8](repeating: 0, count: Self.header) + frame)

        // In: into a posted buffer, num_buffers 1.
        try rx.descriptor(0, address: 0x40000, length: 2048, flags: 2)
        try rx.publish(0)
        t.write(offset: Virtio.MMIORegister.queueNotify, length: 4, value: 0)
        send(pair.host, [UInt8](repeating: 0, count: Self.header) + frame)
        #expect(waitUntil { (try? rx.usedIndex()) == 1 })
        #expect(try rx.usedElement(0) == (0, UInt32(Self.header + frame.count)))
        #expect(try memory.read(UInt16.self, at: 0x40000 + 10) == 1)
        #expect(try memory.read(at: 0x40000 + UInt64(Self.header), count: frame.count) == frame)
        #expect(device.statistics.received == 1 && device.statistics.transmitted == 1)

        // After a reset nothing reaches guest memory; the socket stays the Tap's.
        t.write(offset: Virtio.MMIORegister.status, length: 4, value: 0)
        try rx.descriptor(1, address: 0x41000, length: 2048, flags: 2)
        try rx.publish(1)
        send(pair.host, [UInt8](repeating: 0, count: Self.header) + frame)
        settle(loop)
        #expect(try rx.usedIndex() == 1)
        #expect(device.statistics.received == 1)
    }

    @Test("a tap that does not exist names the option")
    func missingTap() throws {
        let memory = try guestMemory()
        let loop = try EventLoop(name: "net-test")
        do {
            _ = try VirtioNetDevice(net: NetConfig(id: "n0", hostDeviceName: "flno0"), memory: memory, loop: loop)
            Issue.record("attached to a tap that does not exist")
        } catch {
            #expect("\(error)".contains("net.host_dev_name") && "\(error)".contains("flno0"), "\(error)")
        }
    }
}
