import Glibc
import Protocol
import Testing

@testable import VMMWorker

/// The virtio-blk request path and the virtio-mmio register file, without a VM: crafted
/// guest memory, a real image file.
@Suite("virtio-blk requests and the virtio-mmio transport")
struct VirtioBlockUnitTests {
    static let header: UInt64 = 0x40000
    static let data: UInt64 = 0x41000
    static let status: UInt64 = 0x50000

    func image(_ bytes: [UInt8]) throws -> String { try temporaryFile(bytes) }

    func chain(_ memory: GuestMemory, type: UInt32, sector: UInt64, readable: [GuestSegment] = [], writable: [GuestSegment]) throws
        -> DescriptorChain
    {
        try memory.write(type, at: Self.header)
        try memory.write(UInt32(0), at: Self.header + 4)
        try memory.write(sector, at: Self.header + 8)
        try memory.write(UInt8(0xff), at: Self.status)
        return DescriptorChain(head: 0, readable: [try segment(memory, Self.header, 16)] + readable, writable: writable)
    }

    /// A checked segment of `memory` (the only kind a chain holds).
    func segment(_ memory: GuestMemory, _ address: UInt64, _ length: UInt32) throws -> GuestSegment {
        try GuestSegment(address: address, length: length, in: memory)
    }

    @Test("read, write, flush, get-id, discard, write-zeroes and their failures", arguments: [false, true])
    func requests(direct: Bool) throws {
        let bytes = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        let path = try image(bytes)
        defer { unlink(path) }
        let backend = try BlockBackend(drive: DriveConfig(id: "t", path: path, direct: direct, serial: "0123456789abcdefghijXYZ"))
        let memory = try guestMemory()
        let handler = BlockRequestHandler(backend: backend, memory: memory)
        #expect(backend.capacitySectors == 16)

        // Read sectors 2–3 into two unaligned pieces.
        var request = try chain(
            memory, type: 0, sector: 2,
            writable: [
                segment(memory, Self.data + 3, 700), segment(memory, Self.data + 1001, 324), segment(memory, Self.status, 1),
            ])
        #expect(handler.execute(request) == 1025)
        #expect(try memory.read(UInt8.self, at: Self.status) == 0)
        #expect(try memory.read(at: Self.data + 3, count: 700) + memory.read(at: Self.data + 1001, count: 324) == Array(bytes[1024..<2048]))

        // Write sector 15 (the last), then read it back from the file.
        try memory.write([UInt8](repeating: 0xab, count: 512), at: Self.data)
        request = try chain(
            memory, type: 1, sector: 15, readable: [segment(memory, Self.data, 512)], writable: [segment(memory, Self.status, 1)])
        #expect(handler.execute(request) == 1)
        #expect(try memory.read(UInt8.self, at: Self.status) == 0)
        let fd = open(path, O_RDONLY)
        var back = [UInt8](repeating: 0, count: 512)
        _ = back.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 512, 15 * 512) }
        close(fd)
        #expect(back == [UInt8](repeating: 0xab, count: 512))

        // Beyond the end, a partial sector, and a sector number that overflows: IOERR.
        for (sector, length) in [(UInt64(16), UInt32(512)), (15, 1024), (0, 100), (UInt64.max, 512), (UInt64.max / 512 + 1, 512)] {
            request = try chain(
                memory, type: 0, sector: sector, writable: [segment(memory, Self.data, length), segment(memory, Self.status, 1)])
            _ = handler.execute(request)
            #expect(try memory.read(UInt8.self, at: Self.status) == 1, "sector \(sector) length \(length)")
        }

        // Flush.
        request = try chain(memory, type: 4, sector: 0, writable: [segment(memory, Self.status, 1)])
        #expect(handler.execute(request) == 1)
        #expect(try memory.read(UInt8.self, at: Self.status) == 0)

        // GET_ID: the first 20 bytes of the serial, no NUL when it fills them (§5.2.6).
        request = try chain(memory, type: 8, sector: 0, writable: [segment(memory, Self.data, 20), segment(memory, Self.status, 1)])
        #expect(handler.execute(request) == 21)
        #expect(try memory.read(at: Self.data, count: 20) == Array("0123456789abcdefghij".utf8))

        // WRITE_ZEROES on sectors 4–5, DISCARD on 8–15: the file reads zeroes there.
        for (type, sector, count) in [(UInt32(13), UInt64(4), UInt32(2)), (11, 8, 8)] {
            try memory.write(sector, at: Self.data)
            try memory.write(count, at: Self.data + 8)
            try memory.write(UInt32(0), at: Self.data + 12)
            request = try chain(
                memory, type: type, sector: 0, readable: [segment(memory, Self.data, 16)], writable: [segment(memory, Self.status, 1)])
            #expect(handler.execute(request) == 1)
            #expect(try memory.read(UInt8.self, at: Self.status) == 0, "type \(type)")
        }
        let after = try readFile(path)
        #expect(after[2048..<3072].allSatisfy { $0 == 0 })
        #expect(after[4096..<8192].allSatisfy { $0 == 0 })
        #expect(after[0..<2048] == bytes[0..<2048])

        // Unknown type: UNSUPP. No header: IOERR. No status byte: nothing written, used 0.
        request = try chain(memory, type: 99, sector: 0, writable: [segment(memory, Self.status, 1)])
        _ = handler.execute(request)
        #expect(try memory.read(UInt8.self, at: Self.status) == 2)
        let short = DescriptorChain(
            head: 0, readable: [try segment(memory, Self.header, 8)], writable: [try segment(memory, Self.status, 1)])
        try memory.write(UInt8(0xff), at: Self.status)
        _ = handler.execute(short)
        #expect(try memory.read(UInt8.self, at: Self.status) == 1)
        let noStatus = DescriptorChain(head: 0, readable: [try segment(memory, Self.header, 16)], writable: [])
        #expect(handler.execute(noStatus) == 0)
        // An empty last writable segment (the walker never makes one; a hand-made chain can)
        // has no status byte: nothing is written before it (here, before guest RAM itself).
        let emptyLast = DescriptorChain(
            head: 0, readable: [try segment(memory, Self.header, 16)],
            writable: [try segment(memory, Self.data, 1), try segment(memory, 0, 0)])
        #expect(handler.execute(emptyLast) == 0)
    }

    @Test("a read-only disk refuses writes, discards and write-zeroes with IOERR and keeps the file")
    func readOnly() throws {
        let bytes = [UInt8](repeating: 0x11, count: 4096)
        let path = try image(bytes)
        defer { unlink(path) }
        let backend = try BlockBackend(drive: DriveConfig(id: "ro", path: path, readOnly: true, direct: false))
        let memory = try guestMemory()
        let handler = BlockRequestHandler(backend: backend, memory: memory)
        for type in [UInt32(1), 11, 13] {
            let request = try chain(
                memory, type: type, sector: 0, readable: [segment(memory, Self.data, 512)], writable: [segment(memory, Self.status, 1)])
            _ = handler.execute(request)
            #expect(try memory.read(UInt8.self, at: Self.status) == 1, "type \(type)")
        }
        #expect(try readFile(path) == bytes)
        let device = VirtioBlockDevice(backend: backend, memory: memory, loop: try EventLoop(name: "t"))
        #expect(device.deviceFeatures & VirtioBlockDevice.Feature.readOnly != 0)
        #expect(device.deviceFeatures & VirtioBlockDevice.Feature.discard == 0)
    }

    @Test("virtio-mmio registers: identity, feature negotiation, queue set-up, reset")
    func transport() throws {
        let path = try image([UInt8](repeating: 0, count: 1 << 20))
        defer { unlink(path) }
        let memory = try guestMemory()
        let loop = try EventLoop(name: "t")
        let device = VirtioBlockDevice(
            backend: try BlockBackend(drive: DriveConfig(id: "d", path: path, direct: false)), memory: memory,
            loop: loop)
        let t = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 0), device: device, memory: memory, vm: nil)
        typealias R = Virtio.MMIORegister
        #expect(t.read(offset: R.magicValue, length: 4) == 0x7472_6976)
        #expect(t.read(offset: R.version, length: 4) == 2)
        #expect(t.read(offset: R.deviceID, length: 4) == 2)
        #expect(t.read(offset: R.magicValue, length: 2) == 0, "registers are 32-bit only")
        // capacity in the config space, at any width.
        #expect(t.read(offset: R.config, length: 8) == 2048)
        #expect(t.read(offset: R.config + 1, length: 1) == 8)
        #expect(t.read(offset: R.config + 0x1000, length: 4) == 0)

        t.write(offset: R.deviceFeaturesSelect, length: 4, value: 1)
        #expect(t.read(offset: R.deviceFeatures, length: 4) & 1 == 1, "VERSION_1")
        // FEATURES_OK without VERSION_1 does not stick.
        t.write(offset: R.status, length: 4, value: 1 | 2)
        t.write(offset: R.driverFeaturesSelect, length: 4, value: 0)
        t.write(offset: R.driverFeatures, length: 4, value: 1 << 9)
        t.write(offset: R.status, length: 4, value: 1 | 2 | 8)
        #expect(t.read(offset: R.status, length: 4) == 3)
        // Features that were not offered do not either.
        t.write(offset: R.driverFeaturesSelect, length: 4, value: 1)
        t.write(offset: R.driverFeatures, length: 4, value: 1 | 1 << 30)
        t.write(offset: R.status, length: 4, value: 1 | 2 | 8)
        #expect(t.read(offset: R.status, length: 4) == 3)
        t.write(offset: R.driverFeatures, length: 4, value: 1)
        t.write(offset: R.status, length: 4, value: 1 | 2 | 8)
        #expect(t.read(offset: R.status, length: 4) == 11)

        // A queue in the wrong place: DRIVER_OK ends in DEVICE_NEEDS_RESET, not in a crash.
        t.write(offset: R.queueSelect, length: 4, value: 0)
        #expect(t.read(offset: R.queueSizeMax, length: 4) == 256)
        t.write(offset: R.queueSize, length: 4, value: 8)
        t.write(offset: R.queueDescLow, length: 4, value: 0xffff_f000)
        t.write(offset: R.queueDescHigh, length: 4, value: 0xffff)
        t.write(offset: R.queueReady, length: 4, value: 1)
        t.write(offset: R.status, length: 4, value: 1 | 2 | 8 | 4)
        #expect(t.read(offset: R.status, length: 4) & UInt64(Virtio.Status.deviceNeedsReset) != 0)
        #expect(t.read(offset: R.interruptStatus, length: 4) & 2 != 0)

        // Reset: everything back to zero.
        t.write(offset: R.status, length: 4, value: 0)
        #expect(t.read(offset: R.status, length: 4) == 0)
        #expect(t.read(offset: R.queueReady, length: 4) == 0)
        #expect(t.read(offset: R.interruptStatus, length: 4) == 0)
    }

    @Test("a live queue: requests through notify and the loop, then a broken avail ring marks the device")
    func liveQueue() throws {
        let path = try image([UInt8](repeating: 0x5a, count: 1 << 20))
        defer { unlink(path) }
        let memory = try guestMemory()
        let loop = try EventLoop(name: "blk-test")
        let thread = try loop.startThread()
        defer {
            loop.stop()
            HostThread.join(thread)
        }
        let device = VirtioBlockDevice(
            backend: try BlockBackend(drive: DriveConfig(id: "d", path: path, direct: false)), memory: memory,
            loop: loop)
        let t = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 0), device: device, memory: memory, vm: nil)
        typealias R = Virtio.MMIORegister
        var q = CraftedQueue(memory: memory)
        t.write(offset: R.status, length: 4, value: 3)
        t.write(offset: R.driverFeaturesSelect, length: 4, value: 1)
        t.write(offset: R.driverFeatures, length: 4, value: 1)
        t.write(offset: R.status, length: 4, value: 11)
        t.write(offset: R.queueSize, length: 4, value: 8)
        t.write(offset: R.queueDescLow, length: 4, value: UInt64(CraftedQueue.descriptors))
        t.write(offset: R.queueDriverLow, length: 4, value: UInt64(CraftedQueue.avail))
        t.write(offset: R.queueDeviceLow, length: 4, value: UInt64(CraftedQueue.used))
        t.write(offset: R.queueReady, length: 4, value: 1)
        t.write(offset: R.status, length: 4, value: 15)
        #expect(t.read(offset: R.status, length: 4) == 15)

        // A read of sector 0.
        try memory.write(UInt32(0), at: Self.header)
        try memory.write(UInt64(0), at: Self.header + 8)
        try q.descriptor(0, address: Self.header, length: 16, flags: 1, next: 1)
        try q.descriptor(1, address: Self.data, length: 512, flags: 1 | 2, next: 2)
        try q.descriptor(2, address: Self.status, length: 1, flags: 2)
        try q.publish(0)
        t.write(offset: R.queueNotify, length: 4, value: 0)
        #expect(waitUntil { (try? q.usedIndex()) == 1 })
        #expect(try q.usedElement(0) == (0, 513))
        #expect(try memory.read(at: Self.data, count: 512) == [UInt8](repeating: 0x5a, count: 512))
        #expect(waitUntil { t.interrupt.signalCount >= 1 })
        #expect(t.read(offset: R.interruptStatus, length: 4) == 1)
        t.write(offset: R.interruptAck, length: 4, value: 1)
        #expect(t.read(offset: R.interruptStatus, length: 4) == 0)

        // An avail idx far ahead: DEVICE_NEEDS_RESET, the loop keeps running.
        try memory.write(UInt16(1000), at: CraftedQueue.avail + 2)
        t.write(offset: R.queueNotify, length: 4, value: 0)
        #expect(waitUntil { t.read(offset: R.status, length: 4) & UInt64(Virtio.Status.deviceNeedsReset) != 0 })
        // Reset and set up again: the device works again.
        t.write(offset: R.status, length: 4, value: 0)
        #expect(t.read(offset: R.status, length: 4) == 0)
    }
}

func readFile(_ path: String) throws -> [UInt8] {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { throw SyscallError("open", .init(rawValue: errno)) }
    defer { close(fd) }
    var result: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        result += buffer[0..<n]
    }
    return result
}

func waitUntil(timeout: Double = 5, _ condition: () -> Bool) -> Bool {
    let deadline = Double(TokenBucket.monotonicNanoseconds()) / 1e9 + timeout
    while Double(TokenBucket.monotonicNanoseconds()) / 1e9 < deadline {
        if condition() { return true }
        usleep(1000)
    }
    return condition()
}
