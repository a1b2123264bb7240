import Synchronization

/// A port-I/O device. An enum of concrete classes rather than an existential, so a port
/// exit costs a range compare and a direct call (this is the vCPU hot path).
public enum PortDevice: Sendable {
    case serial(Serial8250)
    case i8042(I8042)
}

/// The port-I/O bus: a short table of port ranges. Unclaimed ports read as 0xff (an empty
/// ISA bus floats high) and ignore writes.
public struct PortIOBus: Sendable {
    public struct Entry: Sendable {
        public let start: UInt16
        public let count: UInt16
        public let device: PortDevice
    }

    public private(set) var entries: [Entry] = []

    public init() {}

    public mutating func register(_ device: PortDevice, start: UInt16, count: UInt16) {
        entries.append(Entry(start: start, count: count, device: device))
    }

    @inline(__always)
    func lookup(_ port: UInt16) -> Entry? {
        for entry in entries where port &- entry.start < entry.count {
            return entry
        }
        return nil
    }

    /// Reads one byte from `port`.
    @inline(__always)
    public func read(port: UInt16) -> UInt8 {
        guard let entry = lookup(port) else { return 0xff }
        switch entry.device {
        case .serial(let serial): return serial.read(offset: port &- entry.start)
        case .i8042(let controller): return controller.read(port: port)
        }
    }

    /// Writes one byte to `port`.
    @inline(__always)
    public func write(port: UInt16, value: UInt8) {
        guard let entry = lookup(port) else { return }
        switch entry.device {
        case .serial(let serial): serial.write(offset: port &- entry.start, value: value)
        case .i8042(let controller): controller.write(port: port, value: value)
        }
    }

    /// A port access of `size` bytes: 8-bit devices see consecutive byte accesses, as on
    /// the ISA bus.
    @inline(__always)
    func access(port: UInt16, size: Int, isWrite: Bool, data: UnsafeMutableRawPointer) {
        if entries.isEmpty || lookup(port) == nil && lookup(port &+ UInt16(truncatingIfNeeded: size - 1)) == nil {
            if !isWrite { data.initializeMemory(as: UInt8.self, repeating: 0xff, count: size) }
            return
        }
        for i in 0..<size {
            let bytePort = port &+ UInt16(truncatingIfNeeded: i)
            if isWrite {
                write(port: bytePort, value: data.load(fromByteOffset: i, as: UInt8.self))
            } else {
                data.storeBytes(of: read(port: bytePort), toByteOffset: i, as: UInt8.self)
            }
        }
    }
}

/// A virtio-mmio slot whose transport can be plugged and unplugged while vCPUs run: the
/// disk and NIC slots (StratoVirt's "replaceable" devices). Empty, it reads like
/// ``MMIODevice/emptySlot``.
///
/// Sendable: the transport is behind a Mutex, held for the whole of each guest access, so an
/// access reaches either the old or the new transport, never one that was unplugged before
/// the access began; unplugging waits for an access in progress.
public final class ReplaceableSlot: Sendable {
    public let index: Int
    private let current = Mutex<VirtioMMIOTransport?>(nil)

    init(index: Int) {
        self.index = index
    }

    public var transport: VirtioMMIOTransport? { current.withLock { $0 } }

    /// Installs `transport`; false (and nothing changes) if the slot is occupied.
    func plug(_ transport: VirtioMMIOTransport) -> Bool {
        current.withLock { slot in
            guard slot == nil else { return false }
            slot = transport
            return true
        }
    }

    /// Empties the slot; returns what was plugged. From here on guest accesses read an empty slot.
    func unplug() -> VirtioMMIOTransport? {
        current.withLock { slot in
            defer { slot = nil }
            return slot
        }
    }

    @inline(__always)
    func access(offset: UInt64, length: Int, isWrite: Bool, data: UnsafeMutableRawPointer) {
        current.withLock { transport in
            if let transport {
                MMIOBus.access(transport, offset: offset, length: length, isWrite: isWrite, data: data)
            } else {
                MMIOBus.accessEmpty(offset: offset, length: length, isWrite: isWrite, data: data)
            }
        }
    }
}

/// An MMIO device: a virtio-mmio slot, empty or with a transport.
public enum MMIODevice: Sendable {
    /// A virtio-mmio transport with its device (virtio 1.2 §4.2).
    case virtio(VirtioMMIOTransport)

    /// A disk or NIC slot: a transport that QMP device_add/device_del plug and unplug.
    case replaceable(ReplaceableSlot)

    /// A pre-announced virtio-mmio slot with nothing plugged in. Like QEMU's empty
    /// transport it reads MagicValue "virt" (0x000) and Version 2 (0x004), and DeviceID 0
    /// (0x008), which virtio 1.x §4.2.2 defines as "no device": Linux's virtio_mmio probe
    /// then leaves the slot alone. Every other register reads 0; writes are ignored.
    case emptySlot

    /// MagicValue: "virt" as a little-endian u32 (virtio 1.x §4.2.2).
    static let virtioMagic: UInt32 = 0x7472_6976
    static let virtioVersion: UInt32 = 2
}

/// The MMIO bus: a short table of guest-physical ranges. Unclaimed addresses read as zero
/// and ignore writes.
public struct MMIOBus: Sendable {
    public struct Entry: Sendable {
        public let base: UInt64
        public let size: UInt64
        public let device: MMIODevice
    }

    public private(set) var entries: [Entry] = []

    public init() {}

    public mutating func register(_ device: MMIODevice, base: UInt64, size: UInt64) {
        entries.append(Entry(base: base, size: size, device: device))
    }

    @inline(__always)
    func access(address: UInt64, length: Int, isWrite: Bool, data: UnsafeMutableRawPointer) {
        if !isWrite { data.initializeMemory(as: UInt8.self, repeating: 0, count: length) }
        for entry in entries where address &- entry.base < entry.size {
            let offset = address - entry.base
            switch entry.device {
            case .virtio(let transport):
                Self.access(transport, offset: offset, length: length, isWrite: isWrite, data: data)
            case .replaceable(let slot):
                slot.access(offset: offset, length: length, isWrite: isWrite, data: data)
            case .emptySlot:
                Self.accessEmpty(offset: offset, length: length, isWrite: isWrite, data: data)
            }
            return
        }
    }

    /// A register access to a transport; `data` holds `length` little-endian bytes (zeroed
    /// beforehand for reads).
    @inline(__always)
    static func access(_ transport: VirtioMMIOTransport, offset: UInt64, length: Int, isWrite: Bool, data: UnsafeMutableRawPointer) {
        guard length == 1 || length == 2 || length == 4 || length == 8 else { return }
        if isWrite {
            var value: UInt64 = 0
            for i in 0..<length { value |= UInt64(data.load(fromByteOffset: i, as: UInt8.self)) << (8 * UInt64(i)) }
            transport.write(offset: offset, length: length, value: value)
        } else {
            let value = transport.read(offset: offset, length: length)
            for i in 0..<length {
                data.storeBytes(of: UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))), toByteOffset: i, as: UInt8.self)
            }
        }
    }

    /// An access to an empty slot (``MMIODevice/emptySlot``).
    @inline(__always)
    static func accessEmpty(offset: UInt64, length: Int, isWrite: Bool, data: UnsafeMutableRawPointer) {
        guard !isWrite, length == 4 else { return }
        let register =
            switch offset {
            case 0x000: MMIODevice.virtioMagic
            case 0x004: MMIODevice.virtioVersion
            default: UInt32(0)
            }
        data.storeBytes(of: register.littleEndian, as: UInt32.self)
    }
}
