import Glibc
import Protocol
import Testing

@testable import VMMWorker

/// The MMIO side of hot-plug: a replaceable slot on the bus reads as the empty transport, then
/// as the plugged device, then empty again after unplug, with the device reset.
@Suite("Replaceable virtio-mmio slots")
struct ReplaceableSlotTests {
    static func read32(_ bus: MMIOBus, _ address: UInt64) -> UInt32 {
        var value: UInt32 = 0xdead_beef
        withUnsafeMutableBytes(of: &value) { raw in
            if let pointer = raw.baseAddress { bus.access(address: address, length: 4, isWrite: false, data: pointer) }
        }
        return UInt32(littleEndian: value)
    }

    static func write32(_ bus: MMIOBus, _ address: UInt64, _ value: UInt32) {
        var little = value.littleEndian
        withUnsafeMutableBytes(of: &little) { raw in
            if let pointer = raw.baseAddress { bus.access(address: address, length: 4, isWrite: true, data: pointer) }
        }
    }

    @Test("empty -> plugged virtio-blk -> empty; unplug resets the device; an occupied slot refuses a second transport")
    func plugAndUnplug() throws {
        var template = Array("/tmp/flotilla-slot-XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        try #require(fd >= 0)
        let path = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { unlink(path) }
        _ = ftruncate(fd, 1 << 20)
        close(fd)
        let memory = try GuestMemory(size: 16 << 20)
        let loop = try EventLoop(name: "t")
        let slot = ReplaceableSlot(index: 1)
        let base: UInt64 = 0xd000_1000
        var bus = MMIOBus()
        bus.register(.replaceable(slot), base: base, size: 0x1000)
        typealias R = Virtio.MMIORegister

        #expect(Self.read32(bus, base + R.magicValue) == 0x7472_6976)
        #expect(Self.read32(bus, base + R.version) == 2)
        #expect(Self.read32(bus, base + R.deviceID) == 0, "an empty slot is DeviceID 0")
        Self.write32(bus, base + R.status, 1)  // ignored
        #expect(Self.read32(bus, base + R.status) == 0)

        let device = VirtioBlockDevice(
            backend: try BlockBackend(drive: DriveConfig(id: "d", path: path, direct: false)), memory: memory, loop: loop,
            serial: "own")
        let transport = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 1), device: device, memory: memory, vm: nil)
        #expect(slot.plug(transport))
        #expect(Self.read32(bus, base + R.deviceID) == 2)
        Self.write32(bus, base + R.status, 3)  // ACKNOWLEDGE | DRIVER
        #expect(Self.read32(bus, base + R.status) == 3)
        #expect(transport.status == 3)

        let other = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 1), device: device, memory: memory, vm: nil)
        #expect(!slot.plug(other), "an occupied slot keeps its transport")
        #expect(slot.transport === transport)

        let removed = try #require(slot.unplug())
        removed.detach()
        #expect(removed === transport)
        #expect(transport.status == 0, "detach resets the transport")
        #expect(Self.read32(bus, base + R.deviceID) == 0)
        #expect(Self.read32(bus, base + R.status) == 0)
        #expect(slot.unplug() == nil)
        // The device's own serial (device_add serial=) answers GET_ID, not the backend's.
        #expect(device.handler.serial == Array("own".utf8) + [UInt8](repeating: 0, count: 17))
    }
}
