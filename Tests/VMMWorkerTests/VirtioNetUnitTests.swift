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

    /// A frame as the tap delivers it: a 12-byte header (with junk in every field, which the
    /// device must replace) and an Ethernet frame.
    func tapFrame(_ payload: Int, seed: UInt8) -> [UInt8] {
        [UInt8](repeating: 0xee, count: Self.header) + (0..<(14 + payload)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
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

    @Test("receive: a frame lands across the chain's buffers, with our header (num_buffers 1, no flags)")
    func receiveFrame() throws {
        try withHandlers { memory, host, receiver, _ in
            var bucket: TokenBucket?

            // The header splits across the first two buffers (5 + 7 bytes), the frame runs on.
            let chain = DescriptorChain(
                head: 3, readable: [],
                writable: [try segment(memory, 0x40000, 5), try segment(memory, 0x40100, 40), try segment(memory, 0x40200, 2000)])
            #expect(receiver.handle(chain, bucket: &bucket) == nil, "an empty tap leaves the chain for later")

            let frame = tapFrame(100, seed: 1)
            send(host, frame)
            #expect(receiver.handle(chain, bucket: &bucket) == UInt32(frame.count))
            let landed =
                try memory.read(at: 0x40000, count: 5) + memory.read(at: 0x40100, count: 40) + memory.read(at: 0x40200, count: 2000)
            #expect(Array(landed[0..<Self.header]) == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0])
            #expect(Array(landed[Self.header..<frame.count]) == Array(frame[Self.header...]))
            #expect(receiver.frames == 1 && receiver.dropped == 0)
        }
    }

    @Test("receive: readable buffers or room for less than the header are returned unused, no frame spent")
    func receiveMalformed() throws {
        try withHandlers { memory, host, receiver, _ in
            var bucket: TokenBucket?
            let frame = tapFrame(20, seed: 2)
            send(host, frame)

            let readable = DescriptorChain(
                head: 0, readable: [try segment(memory, 0x40000, 100)], writable: [try segment(memory, 0x41000, 2000)])
            #expect(receiver.handle(readable, bucket: &bucket) == 0)
            let short = DescriptorChain(head: 1, readable: [], writable: [try segment(memory, 0x41000, 11)])
            #expect(receiver.handle(short, bucket: &bucket) == 0)
            // The frame is still there for a good chain.
            let good = DescriptorChain(head: 2, readable: [], writable: [try segment(memory, 0x42000, 2000)])
            #expect(receiver.handle(good, bucket: &bucket) == UInt32(frame.count))
            #expect(receiver.frames == 1 && receiver.dropped == 0)
        }
    }

    @Test("receive: a frame larger than the chain is dropped and counted; the next one that fits uses the chain")
    func receiveOversize() throws {
        try withHandlers { memory, host, receiver, _ in
            var bucket: TokenBucket?
            let chain = DescriptorChain(head: 0, readable: [], writable: [try segment(memory, 0x40000, 200)])
            // One byte too many, then far too many, then one that fits exactly.
            let tooLarge = tapFrame(200 - 26 + 1, seed: 3)
            let huge = tapFrame(1500, seed: 4)
            let exact = tapFrame(200 - 26, seed: 5)
            for frame in [tooLarge, huge, exact] { send(host, frame) }
            #expect(receiver.handle(chain, bucket: &bucket) == 200)
            #expect(try memory.read(at: 0x40000 + UInt64(Self.header), count: 200 - Self.header) == Array(exact[Self.header...]))
            #expect(receiver.frames == 1 && receiver.dropped == 2)
        }
    }

    @Test("transmit: our zero header and the frame after the driver's header, in one write; bad chains are dropped")
    func transmit() throws {
        try withHandlers { memory, host, _, transmitter in
            var bucket: TokenBucket?

            // The driver's header (junk flags it did not negotiate) splits 8 + 4 with the frame's
            // start; the frame ends in a third buffer.
            let frame = (0..<60).map { UInt8(truncatingIfNeeded: $0 * 3 + 1) }
            try memory.write([UInt8](repeating: 0xff, count: 8), at: 0x40000)
            try memory.write([UInt8](repeating: 0xff, count: 4) + frame[0..<20], at: 0x40100)
            try memory.write(Array(frame[20...]), at: 0x40200)
            let chain = DescriptorChain(
                head: 0,
                readable: [try segment(memory, 0x40000, 8), try segment(memory, 0x40100, 24), try segment(memory, 0x40200, 40)],
                writable: [])
            #expect(transmitter.handle(chain, bucket: &bucket) == 0)
            #expect(receiveAll(host) == [UInt8](repeating: 0, count: Self.header) + frame)
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

    @Test("the queue runner puts a receive chain back while the tap is empty, and uses it once a frame arrives")
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

            #expect(runner.run(&receiver, loop: loop) == .blocked)
            #expect(try q.usedIndex() == 0 && runner.queue.lastAvailable == 0)
            let frame = tapFrame(50, seed: 6)
            send(host, frame)
            #expect(runner.run(&receiver, loop: loop) == .drained)
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
