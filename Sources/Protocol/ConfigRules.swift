/// The documented limits of a StratoVirt MicroVm ("Specifications" in the reference) and
/// the value syntaxes shared by the command line and the JSON file.
public enum ConfigRules {
    public static let vcpuRange: ClosedRange<UInt64> = 1...254
    public static let memoryRange: ClosedRange<UInt64> = (256 << 20)...(512 << 30)
    /// Guest memory is mapped in whole 4 KiB pages.
    public static let memoryGranularity: UInt64 = 4096
    public static let nameLength: ClosedRange<Int> = 1...255
    public static let maxDisks = 4
    public static let maxNICs = 2
    public static let maxIothreads = 8
    public static let iopsRange: ClosedRange<UInt64> = 0...1_000_000
    /// x86_64 MicroVm: virtio-mmio devices use the free legacy IRQs 5–15.
    public static let maxMMIODevices = 11
    /// Disk and NIC slots always exist, filled or empty, so that disks and NICs can be
    /// hot-plugged up to their limits (StratoVirt's "including hot plugged-in" devices).
    public static let reservedDiskSlots = maxDisks
    public static let reservedNICSlots = maxNICs

    static let boolSpelling = "true, false, on, off"

    static func parseBool(_ text: String, field: String) throws(ConfigError) -> Bool {
        switch text {
        case "true", "on": return true
        case "false", "off": return false
        default: throw ConfigError(field: field, value: text, allowed: boolSpelling)
        }
    }

    /// A decimal integer without sign.
    static func parseUnsigned(_ text: String, field: String) throws(ConfigError) -> UInt64 {
        guard !text.isEmpty, text.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }),
            let value = UInt64(text)
        else {
            throw ConfigError(field: field, value: text, allowed: "a decimal integer")
        }
        return value
    }

    /// `-m`: bytes, or a number with an `M` or `G` suffix (MiB, GiB), like StratoVirt.
    static func parseMemorySize(_ text: String, field: String) throws(ConfigError) -> UInt64 {
        let allowed = "bytes, or a size with an M or G suffix (e.g. 268435456, 512M, 2G)"
        var digits = Substring(text)
        var shift: UInt64 = 0
        switch digits.last {
        case "M", "m":
            shift = 20
            digits = digits.dropLast()
        case "G", "g":
            shift = 30
            digits = digits.dropLast()
        default: break
        }
        guard !digits.isEmpty, digits.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }),
            let count = UInt64(digits)
        else {
            throw ConfigError(field: field, value: text, allowed: allowed)
        }
        let (bytes, overflow) = count.multipliedReportingOverflow(by: 1 << shift)
        guard !overflow else {
            throw ConfigError(field: field, value: text, problem: "size out of range", allowed: "256M to 512G")
        }
        return bytes
    }

    static func checkVCPUs(_ count: UInt64, field: String) throws(ConfigError) {
        guard vcpuRange.contains(count) else {
            throw ConfigError(field: field, value: String(count), problem: "vCPU count out of range", allowed: "1 to 254")
        }
    }

    static func checkMemory(_ bytes: UInt64, field: String) throws(ConfigError) {
        guard memoryRange.contains(bytes) else {
            throw ConfigError(
                field: field, value: String(bytes), problem: "memory size out of range",
                allowed: "256 MiB (268435456) to 512 GiB (549755813888) bytes")
        }
        guard bytes % memoryGranularity == 0 else {
            throw ConfigError(
                field: field, value: String(bytes), problem: "memory size is not a whole number of pages",
                allowed: "a multiple of 4096 bytes")
        }
    }

    static func checkIOPS(_ iops: UInt64, field: String) throws(ConfigError) {
        guard iopsRange.contains(iops) else {
            throw ConfigError(field: field, value: String(iops), problem: "iops out of range", allowed: "0 (unlimited) to 1000000")
        }
    }

    static func checkRngRate(_ rate: UInt64, field: String) throws(ConfigError) {
        guard RngConfig.bytesPerSecondRange.contains(rate) else {
            throw ConfigError(field: field, value: String(rate), problem: "bytes_per_sec out of range", allowed: "64 to 1000000000")
        }
    }

    static func checkCID(_ cid: UInt64, field: String) throws(ConfigError) {
        guard VsockConfig.cidRange.contains(cid) else {
            throw ConfigError(
                field: field, value: String(cid), problem: "guest CID out of range",
                allowed: "3 to 4294967294 (0-2 are reserved, 4294967295 is VMADDR_CID_ANY)")
        }
    }

    static func checkName(_ name: String, field: String) throws(ConfigError) {
        guard nameLength.contains(name.count) else {
            throw ConfigError(field: field, value: name, problem: "name length \(name.count) out of range", allowed: "1 to 255 characters")
        }
        guard !name.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f }) else {
            throw ConfigError(field: field, value: name, problem: "name contains a control character", allowed: "printable characters")
        }
    }

    static func parseMAC(_ text: String, field: String) throws(ConfigError) -> MACAddress {
        guard let mac = MACAddress(parsing: text) else {
            throw ConfigError(field: field, value: text, allowed: "six hex octets separated by colons, e.g. 52:54:00:12:34:56")
        }
        guard !mac.isMulticast else {
            throw ConfigError(
                field: field, value: text, problem: "multicast MAC address",
                allowed: "a unicast address (bit 0 of the first octet clear)")
        }
        return mac
    }

    static func checkMachineType(_ type: String, field: String) throws(ConfigError) {
        guard type.lowercased() == MachineConfig.machineType.lowercased() else {
            throw ConfigError(field: field, value: type, problem: "unsupported machine type", allowed: MachineConfig.machineType)
        }
    }

    static func checkPath(_ path: String, field: String) throws(ConfigError) {
        guard !path.isEmpty else { throw ConfigError(field: field, value: path, problem: "path must not be empty") }
        guard !path.utf8.contains(0) else {
            throw ConfigError(field: field, value: path, problem: "path contains a NUL byte")
        }
    }

    static func checkID(_ id: String, field: String) throws(ConfigError) {
        guard !id.isEmpty else { throw ConfigError(field: field, value: id, problem: "id must not be empty") }
        guard !id.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f }) else {
            throw ConfigError(field: field, value: id, problem: "id contains a control character", allowed: "printable characters")
        }
    }
}
