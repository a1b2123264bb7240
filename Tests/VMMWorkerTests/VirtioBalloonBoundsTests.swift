import Glibc
import Protocol
import Synchronization
import Testing

@testable import VMMWorker

/// How much work a hostile balloon driver can make one request, and one batch, cost the loop
/// the balloon shares with QMP (and a vCPU resetting the device waits for).
@Suite("virtio-balloon work per request and per batch", .serialized)
struct VirtioBalloonBoundsTests {
    /// One readable buffer of `count` copies of `pfn` at `address`.
    func request(_ memory: GuestMemory, pfn: UInt32, count: Int, at address: UInt64) throws -> GuestSegment {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(4 * count)
        for _ in 0..<count { withUnsafeBytes(of: pfn.littleEndian) { bytes += $0 } }
        try memory.write(bytes, at: address)
        return try GuestSegment(address: address, length: UInt32(bytes.count), in: memory)
    }

    @Test("a request is read for at most maxPFNsPerRequest PFNs; the rest (here: the same 1 MiB buffer 256 times) is ignored and counted")
    func requestIsBounded() throws {
        let memory = try GuestMemory(size: 16 << 20)
        // 262144 PFNs of one good page, in one buffer; the chain names that buffer 256 times
        // (a queue-size chain: 64 Mi PFNs, which the driver can make as large as its RAM).
        let segment = try request(memory, pfn: 0x100, count: 1 << 18, at: 0x40_0000)
        let chain = DescriptorChain(head: 0, readable: Array(repeating: segment, count: 256), writable: [])
        var handler = BalloonPageHandler(memory: memory, inflate: true)
        var bucket: TokenBucket?
        #expect(handler.handle(chain, bucket: &bucket) == 0)
        #expect(handler.pages == UInt64(BalloonPageHandler.maxPFNsPerRequest))
        #expect(handler.pages + handler.refused == 256 << 18)
    }

    @Test("a batch reads at most pfnsPerBatch PFNs (plus one request), then comes back from a loop task")
    func batchIsBounded() throws {
        let memory = try guestMemory()
        let loop = try EventLoop(name: "balloon-bounds-test")
        let device = VirtioBalloonDevice(balloon: BalloonConfig(deflateOnOOM: false), memory: memory, loop: loop)
        let t = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 6), device: device, memory: memory, vm: nil)
        var inflate = QueueAt(memory: memory, base: 0x10000)
        bringUp(t, queues: [inflate, QueueAt(memory: memory, base: 0x18000)])
        // 8 requests of maxPFNsPerRequest PFNs each, all of one good page.
        let per = BalloonPageHandler.maxPFNsPerRequest
        let segment = try request(memory, pfn: 0x100, count: per, at: 0x40000)
        for head in UInt16(0)..<8 {
            try inflate.descriptor(head, address: segment.address, length: segment.length)
            try inflate.publish(head)
        }
        device.processInflate()
        let first = try inflate.usedIndex()
        #expect(Int(first) * per <= BalloonPageHandler.pfnsPerBatch + per, "\(first) requests in one batch")
        #expect(first < 8)
        // The loop task the batch left finishes the ring (no kick needed).
        for _ in 0..<8 where try inflate.usedIndex() < 8 {
            loop.stop()
            loop.run()
        }
        #expect(try inflate.usedIndex() == 8)
        #expect(device.statistics.inflated == UInt64(8 * per))
        t.write(offset: Virtio.MMIORegister.status, length: 4, value: 0)
    }

    /// Every change of `actual` became a BALLOON_CHANGE event on every QMP client (whose
    /// output is buffered without bound for a client that does not read): QEMU rate-limits
    /// this event to one a second, keeping the newest value for the end of the second.
    @Test("a driver rewriting actual in a loop is observed once, then with its last value once the interval ends")
    func actualChangesAreRateLimited() throws {
        let memory = try guestMemory()
        let loop = try EventLoop(name: "balloon-bounds-test")
        let device = VirtioBalloonDevice(balloon: BalloonConfig(deflateOnOOM: false), memory: memory, loop: loop)
        let seen = Mutex<[UInt32]>([])
        device.observeActual { actual in seen.withLock { $0.append(actual) } }
        let t = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 6), device: device, memory: memory, vm: nil)
        for actual in UInt64(1)...1000 { t.write(offset: Virtio.MMIORegister.config + 4, length: 4, value: actual) }
        #expect(seen.withLock { $0.count } == 1)
        #expect(seen.withLock { $0.first } == 1)
        #expect(device.actualPages == 1000)

        // The interval's end delivers the newest value (from the loop), and nothing else.
        let thread = try loop.startThread()
        for _ in 0..<600 where seen.withLock({ $0.count }) < 2 { usleep(50_000) }
        loop.stop()
        pthread_join(thread, nil)
        #expect(seen.withLock { $0.count } == 2)
        #expect(seen.withLock { $0.last } == 1000)
    }
}
