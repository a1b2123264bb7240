/// Numbers of the virtio 1.2 specification used by the transport and the devices.
public enum Virtio {
    // MARK: Device status (§2.1)

    public enum Status {
        public static let acknowledge: UInt32 = 1
        public static let driver: UInt32 = 2
        public static let driverOK: UInt32 = 4
        public static let featuresOK: UInt32 = 8
        public static let deviceNeedsReset: UInt32 = 64
        public static let failed: UInt32 = 128
    }

    // MARK: Reserved feature bits (§6)

    public enum Feature {
        /// §6: VIRTIO_F_INDIRECT_DESC.
        public static let indirectDescriptors: UInt64 = 1 << 28
        /// §6: VIRTIO_F_EVENT_IDX.
        public static let eventIndex: UInt64 = 1 << 29
        /// §6: VIRTIO_F_VERSION_1 — a modern device; this transport offers nothing else.
        public static let version1: UInt64 = 1 << 32
    }

    // MARK: Device types (§5)

    public enum DeviceID {
        public static let network: UInt32 = 1
        public static let block: UInt32 = 2
        public static let console: UInt32 = 3
        public static let rng: UInt32 = 4
        public static let balloon: UInt32 = 5
    }

    // MARK: Interrupt status bits (§4.2.2, InterruptStatus)

    public enum Interrupt {
        public static let usedBuffer: UInt32 = 1
        public static let configurationChange: UInt32 = 2
    }

    /// The MMIO register offsets of a version 2 (modern) device (§4.2.2 Table 4.1).
    public enum MMIORegister {
        public static let magicValue: UInt64 = 0x000
        public static let version: UInt64 = 0x004
        public static let deviceID: UInt64 = 0x008
        public static let vendorID: UInt64 = 0x00c
        public static let deviceFeatures: UInt64 = 0x010
        public static let deviceFeaturesSelect: UInt64 = 0x014
        public static let driverFeatures: UInt64 = 0x020
        public static let driverFeaturesSelect: UInt64 = 0x024
        public static let queueSelect: UInt64 = 0x030
        public static let queueSizeMax: UInt64 = 0x034
        public static let queueSize: UInt64 = 0x038
        public static let queueReady: UInt64 = 0x044
        public static let queueNotify: UInt64 = 0x050
        public static let interruptStatus: UInt64 = 0x060
        public static let interruptAck: UInt64 = 0x064
        public static let status: UInt64 = 0x070
        public static let queueDescLow: UInt64 = 0x080
        public static let queueDescHigh: UInt64 = 0x084
        public static let queueDriverLow: UInt64 = 0x090
        public static let queueDriverHigh: UInt64 = 0x094
        public static let queueDeviceLow: UInt64 = 0x0a0
        public static let queueDeviceHigh: UInt64 = 0x0a4
        public static let sharedMemorySelect: UInt64 = 0x0ac
        public static let sharedMemoryLengthLow: UInt64 = 0x0b0
        public static let sharedMemoryLengthHigh: UInt64 = 0x0b4
        public static let sharedMemoryBaseLow: UInt64 = 0x0b8
        public static let sharedMemoryBaseHigh: UInt64 = 0x0bc
        public static let configGeneration: UInt64 = 0x0fc
        public static let config: UInt64 = 0x100
    }

    /// "virt" (§4.2.2 MagicValue).
    public static let magic: UInt32 = 0x7472_6976
    /// Modern virtio-mmio (§4.2.2 Version: 0x2; legacy devices used 0x1).
    public static let mmioVersion: UInt32 = 2
    /// VendorID of Flotilla's devices: "FLTL" as a little-endian u32.
    public static let vendorID: UInt32 = 0x4c54_4c46
}

extension Virtio {
    /// A driver's read of `length` bytes at `offset` from a configuration space laid out in
    /// `bytes`, little-endian (§4.2.2: device-specific configuration); bytes past the end
    /// read as 0.
    static func readConfig(_ bytes: [UInt8], offset: UInt64, length: Int) -> UInt64 {
        var value: UInt64 = 0
        for i in 0..<length {
            let at = offset &+ UInt64(i)
            guard at < UInt64(bytes.count) else { break }
            value |= UInt64(bytes[Int(at)]) << (8 * UInt64(i))
        }
        return value
    }
}
