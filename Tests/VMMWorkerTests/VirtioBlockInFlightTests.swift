import CLinux
import Glibc
import Protocol
import Synchronization
import Testing

@testable import VMMWorker

/// Many virtio-blk requests in flight on I/O worker threads: completion in any order, reset
/// with requests held inside a worker (by a userfaultfd-registered guest page), flush after
/// writes. A live device on a loop with workers, crafted guest memory, a real image file.
@Suite("virtio-blk requests in flight on I/O workers")
struct VirtioBlockInFlightTests {
    static let headers: UInt64 = 0x40000
    static let statuses: UInt64 = 0x50000
    static let data: UInt64 = 0x100000
    static let queueSize: UInt16 = 128

    /// A device on a running loop with `ioThreads` workers, live with one queue of 128.
    struct Live {
        let memory: GuestMemory
        let loop: EventLoop
        let thread: pthread_t
        let device: VirtioBlockDevice
        let transport: VirtioMMIOTransport
        var queue: CraftedQueue

        init(path: String, direct: Bool, ioThreads: Int) throws {
            memory = try guestMemory()
            loop = try EventLoop(name: "blk-par", ioThreads: ioThreads)
            thread = try loop.startThread()
            device = VirtioBlockDevice(
                backend: try BlockBackend(drive: DriveConfig(id: "d", path: path, direct: direct)), memory: memory, loop: loop)
            transport = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 0), device: device, memory: memory, vm: nil)
            queue = CraftedQueue(memory: memory, size: VirtioBlockInFlightTests.queueSize)
            typealias R = Virtio.MMIORegister
            let t = transport
            t.write(offset: R.status, length: 4, value: 3)
            t.write(offset: R.driverFeaturesSelect, length: 4, value: 1)
            t.write(offset: R.driverFeatures, length: 4, value: 1)
            t.write(offset: R.status, length: 4, value: 11)
            t.write(offset: R.queueSize, length: 4, value: UInt64(VirtioBlockInFlightTests.queueSize))
            t.write(offset: R.queueDescLow, length: 4, value: UInt64(CraftedQueue.descriptors))
            t.write(offset: R.queueDriverLow, length: 4, value: UInt64(CraftedQueue.avail))
            t.write(offset: R.queueDeviceLow, length: 4, value: UInt64(CraftedQueue.used))
            t.write(offset: R.queueReady, length: 4, value: 1)
            t.write(offset: R.status, length: 4, value: 15)
        }

        func stop() {
            loop.stop()
            HostThread.join(thread)
        }

        /// Request `slot`: header, `data` (device-writable for reads), status (0xff until
        /// the device writes it); three descriptors from 3·slot; made available.
        mutating func post(slot: Int, type: UInt32, sector: UInt64, data: (address: UInt64, length: UInt32)?) throws {
            let head = UInt16(slot * 3)
            let header = VirtioBlockInFlightTests.headers + UInt64(slot) * 16
            let status = VirtioBlockInFlightTests.statuses + UInt64(slot)
            try memory.write(type, at: header)
            try memory.write(UInt32(0), at: header + 4)
            try memory.write(sector, at: header + 8)
            try memory.write(UInt8(0xff), at: status)
            try queue.descriptor(head, address: header, length: 16, flags: 1, next: head + 1)
            if let data {
                try queue.descriptor(head + 1, address: data.address, length: data.length, flags: type == 0 ? 3 : 1, next: head + 2)
                try queue.descriptor(head + 2, address: status, length: 1, flags: 2)
            } else {
                try queue.descriptor(head + 1, address: status, length: 1, flags: 2)
            }
            try queue.publish(head)
        }

        func notify() { transport.write(offset: Virtio.MMIORegister.queueNotify, length: 4, value: 0) }

        func status(_ slot: Int) throws -> UInt8 { try memory.read(UInt8.self, at: VirtioBlockInFlightTests.statuses + UInt64(slot)) }

        /// Waits until the loop has run every task queued before this call.
        func settle() {
            let ran = Atomic<Bool>(false)
            loop.execute { ran.store(true, ordering: .releasing) }
            _ = waitUntil { ran.load(ordering: .acquiring) }
        }
    }

    @Test("32 reads and writes in flight at once on an O_DIRECT image: right data, status and used length, in any order")
    func manyInFlight() throws {
        let bytes = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ $0 >> 9) }
        let path = try temporaryFile(bytes)
        defer { unlink(path) }
        var live = try Live(path: path, direct: true, ioThreads: 4)
        defer { live.stop() }
        // Slots 0–15 read 4 KiB at sector 16·i (aligned buffers, straight to the disk);
        // 16–31 write 4 KiB at sector 16·i, half of them from unaligned buffers (bounced).
        for i in 0..<32 {
            let aligned = i < 24
            let address = Self.data + UInt64(i) * 8192 + (aligned ? 0 : 8)
            if i >= 16 { try live.memory.write([UInt8](repeating: UInt8(i), count: 4096), at: address) }
            try live.post(slot: i, type: i < 16 ? 0 : 1, sector: UInt64(16 * i), data: (address, 4096))
        }
        live.notify()
        #expect(waitUntil { (try? live.queue.usedIndex()) == 32 })
        var used: [UInt32: UInt32] = [:]
        for slot in 0..<UInt16(32) {
            let element = try live.queue.usedElement(slot)
            used[element.id] = element.length
        }
        #expect(used.count == 32, "every head used once: \(used)")
        for i in 0..<32 {
            #expect(used[UInt32(i * 3)] == (i < 16 ? 4097 : 1), "slot \(i)")
            #expect(try live.status(i) == 0, "slot \(i)")
        }
        for i in 0..<16 {
            let expected = Array(bytes[(i * 8192)..<(i * 8192 + 4096)])
            #expect(try live.memory.read(at: Self.data + UInt64(i) * 8192, count: 4096) == expected, "read \(i)")
        }
        let file = try readFile(path)
        for i in 16..<32 {
            #expect(file[(i * 8192)..<(i * 8192 + 4096)].allSatisfy { $0 == UInt8(i) }, "write \(i)")
        }
        #expect(live.device.completedRequests == 32)
        #expect(live.transport.interrupt.signalCount >= 1)
    }

    @Test("a flush after completed writes: page-cache writes on the loop thread, the flush (fdatasync) on a worker")
    func flushAfterWrites() throws {
        let path = try temporaryFile([UInt8](repeating: 0x33, count: 1 << 20))
        defer { unlink(path) }
        var live = try Live(path: path, direct: false, ioThreads: 2)
        defer { live.stop() }
        for i in 0..<8 {
            try live.memory.write([UInt8](repeating: 0xc0 | UInt8(i), count: 512), at: Self.data + UInt64(i) * 512)
            try live.post(slot: i, type: 1, sector: UInt64(i), data: (Self.data + UInt64(i) * 512, 512))
        }
        live.notify()
        #expect(waitUntil { (try? live.queue.usedIndex()) == 8 })
        // The driver saw the writes complete; the flush it sends now covers them.
        try live.post(slot: 8, type: 4, sector: 0, data: nil)
        live.notify()
        #expect(waitUntil { (try? live.queue.usedIndex()) == 9 })
        #expect(try live.queue.usedElement(8) == (24, 1))
        for i in 0...8 { #expect(try live.status(i) == 0, "slot \(i)") }
        let file = try readFile(path)
        for i in 0..<8 { #expect(file[(i * 512)..<(i * 512 + 512)].allSatisfy { $0 == 0xc0 | UInt8(i) }) }
        #expect(file[4096...].allSatisfy { $0 == 0x33 })
    }

    @Test("reset with requests in flight waits for the running one, skips the queued one, publishes nothing after")
    func resetWithRequestsInFlight() throws {
        let bytes = [UInt8](repeating: 0x5a, count: 1 << 20)
        let path = try temporaryFile(bytes)
        defer { unlink(path) }
        let uffd = fl_userfaultfd_open()
        try #require(uffd >= 0, "userfaultfd: errno \(errno)")
        defer { close(uffd) }
        // One worker: the first request holds it, the second waits in the pool's queue.
        var live = try Live(path: path, direct: true, ioThreads: 1)
        defer { live.stop() }
        // A page nobody has touched, registered for missing faults: the worker's copy out of
        // the bounce buffer (the buffer is unaligned, so O_DIRECT bounces) stops there until
        // the page is supplied.
        let held: UInt64 = 0x300000
        let page = try live.memory.hostPointer(held, length: 4096)
        try #require(fl_userfaultfd_register(uffd, page, 4096) == 0, "UFFDIO_REGISTER: errno \(errno)")
        try live.memory.write([UInt8](repeating: 0x77, count: 512), at: Self.data)
        try live.post(slot: 0, type: 0, sector: 0, data: (held + 8, 512))
        try live.post(slot: 1, type: 0, sector: 8, data: (Self.data, 512))
        live.notify()

        // The fault message: the worker is inside the copy into guest memory.
        var message = [UInt8](repeating: 0, count: 32)
        let got = message.withUnsafeMutableBytes { read(uffd, $0.baseAddress, 32) }
        #expect(got == 32)

        let signalsBefore = live.transport.interrupt.signalCount
        let resetDone = Atomic<Bool>(false)
        let transport = live.transport
        let resetter = try HostThread.spawn(name: "resetter") {
            transport.write(offset: Virtio.MMIORegister.status, length: 4, value: 0)
            resetDone.store(true, ordering: .releasing)
        }
        // Reset cannot return while a worker may still write guest memory. (A reset that did
        // not wait would be caught here unless it were slower than this pause.)
        usleep(200_000)
        let returnedEarly = resetDone.load(ordering: .acquiring)
        #expect(!returnedEarly, "reset returned with a request still in a worker")
        // Let the worker go: the copy completes, the job ends, reset returns.
        #expect(fl_userfaultfd_zeropage(uffd, page, 4096) == 0)
        HostThread.join(resetter)
        let returned = resetDone.load(ordering: .acquiring)
        #expect(returned)

        live.settle()
        // Nothing published, no status written, no interrupt: neither for the request that
        // was running nor for the one that never started, whose buffer is untouched.
        #expect(try live.queue.usedIndex() == 0)
        #expect(try live.status(0) == 0xff)
        #expect(try live.status(1) == 0xff)
        #expect(try live.memory.read(at: Self.data, count: 512) == [UInt8](repeating: 0x77, count: 512))
        #expect(live.transport.interrupt.signalCount == signalsBefore)
        #expect(live.transport.read(offset: Virtio.MMIORegister.status, length: 4) == 0)
    }
}
