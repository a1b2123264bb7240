/// The arguments of StratoVirt's MicroVm hot-plug commands (docs/qmp.md "blockdev-add",
/// "device_add"; qmp_schema.rs `blockdev_add`, `device_add`), parsed and checked with the
/// same rules as the command line's `-drive`.
public enum QMPHotplug {
    /// The device models device_add takes for a disk: StratoVirt's name and QEMU's
    /// virtio-mmio one.
    public static let blockDrivers: Set<String> = ["virtio-blk-mmio", "virtio-blk-device"]
    public static let netDrivers: Set<String> = ["virtio-net-mmio", "virtio-net-device"]

    /// blockdev-add: `node-name`, `file` {`driver`: "file", `filename`, `aio`}, `cache`
    /// {`direct`, `no-flush`}, `read-only`, `driver` ("raw"), `throttling.iops-total`, and
    /// `detect-zeroes` / `discard` where they name what the device does anyway ("off",
    /// "unmap"). The result is the node as a ``DriveConfig`` whose `id` is the node name.
    public static func blockdevAdd(_ object: JSONObject) throws(QMPArgumentError) -> DriveConfig {
        let arguments = try QMPArguments(
            object,
            allowed: ["node-name", "file", "cache", "read-only", "driver", "throttling.iops-total", "detect-zeroes", "discard"])
        let nodeName = try arguments.string("node-name")
        try check { () throws(ConfigError) in try ConfigRules.checkID(nodeName, field: "node-name") }
        let file = try arguments.object("file", allowed: ["driver", "filename", "aio"])
        let fileDriver = try file.string("driver")
        guard fileDriver == "file" else {
            throw QMPArgumentError(
                "Parameter 'file.driver' value '\(fileDriver)' is not supported; allowed: 'file' (a raw image file or block device)")
        }
        let filename = try file.string("filename")
        try check { () throws(ConfigError) in try ConfigRules.checkPath(filename, field: "file.filename") }
        // I/O is synchronous on the device's thread whatever the mode asked for.
        if let aio = try file.optionalString("aio"), !["threads", "native", "io_uring"].contains(aio) {
            throw QMPArgumentError("Parameter 'file.aio' does not accept value '\(aio)'")
        }
        if let driver = try arguments.optionalString("driver"), driver != "raw" {
            throw QMPArgumentError("Parameter 'driver' value '\(driver)' is not supported on a MicroVm; allowed: 'raw'")
        }
        var direct = true  // StratoVirt's default, as -drive direct=
        if let cache = try arguments.optionalObject("cache", allowed: ["direct", "no-flush"]) {
            direct = try cache.optionalBool("direct") ?? true
            if try cache.optionalBool("no-flush") == true {
                throw QMPArgumentError("Parameter 'cache.no-flush' value 'true' is not supported: flush requests always reach the image")
            }
        }
        if let value = try arguments.optionalString("detect-zeroes"), value != "off" {
            throw QMPArgumentError("Parameter 'detect-zeroes' value '\(value)' is not supported; allowed: 'off'")
        }
        if let value = try arguments.optionalString("discard"), value != "unmap" {
            throw QMPArgumentError("Parameter 'discard' value '\(value)' is not supported; allowed: 'unmap' (discard requests punch holes)")
        }
        let iops = try arguments.optionalUnsigned("throttling.iops-total")
        if let iops, iops > 0 {
            try check { () throws(ConfigError) in try ConfigRules.checkIOPS(iops, field: "throttling.iops-total") }
        }
        return DriveConfig(
            id: nodeName, path: filename, readOnly: try arguments.optionalBool("read-only") ?? false, direct: direct,
            iops: iops == 0 ? nil : iops)
    }

    /// A device_add for a disk.
    public struct BlockDevice: Sendable, Equatable {
        public var id: String
        /// The node (blockdev-add `node-name`, or a `-drive` id) the disk reads and writes.
        public var node: String
        /// The disk slot asked for with `addr` (0–3), or nil for the first free one.
        public var slot: Int?
        public var serial: String?
        public var iothread: String?

        public init(id: String, node: String, slot: Int? = nil, serial: String? = nil, iothread: String? = nil) {
            self.id = id
            self.node = node
            self.slot = slot
            self.serial = serial
            self.iothread = iothread
        }
    }

    public enum DeviceAdd: Sendable, Equatable {
        case block(BlockDevice)
        /// A NIC: parsed so that the refusal can say what is missing.
        case net(id: String)
    }

    /// device_add: `id`, `driver`, and for a disk `drive` (the node; StratoVirt's MicroVm
    /// takes the node whose name is the `id` when it is absent), `addr` (the disk slot, "0x0"
    /// to "0x3" or decimal, as StratoVirt's str_to_usize reads it), `serial` and `iothread`.
    public static func deviceAdd(_ object: JSONObject, diskSlots: Int) throws(QMPArgumentError) -> DeviceAdd {
        // QEMU checks the driver first and names the model's properties in its errors.
        guard let driver = object["driver"]?.stringValue else {
            _ = try QMPArguments(object, allowed: Set(object.keys)).string("driver")
            throw QMPArgumentError("Parameter 'driver' is missing")
        }
        if netDrivers.contains(driver) {
            let arguments = try QMPArguments(object, allowed: Set(object.keys))
            return .net(id: try arguments.string("id"))
        }
        guard blockDrivers.contains(driver) else { throw QMPArgumentError("'\(driver)' is not a valid device model name") }
        let allowed: Set<String> = ["id", "driver", "drive", "addr", "serial", "iothread"]
        for key in object.keys.sorted() where !allowed.contains(key) {
            throw QMPArgumentError("Property '\(driver).\(key)' not found")
        }
        let arguments = try QMPArguments(object, allowed: allowed)
        let id = try arguments.string("id")
        try check { () throws(ConfigError) in try ConfigRules.checkID(id, field: "id") }
        var slot: Int?
        if let addr = try arguments.optionalString("addr") {
            guard let number = parseAddress(addr) else { throw QMPArgumentError("Invalid addr for device \(id)") }
            guard number < UInt64(diskSlots) else {
                throw QMPArgumentError(
                    "addr '\(addr)' of device \(id) is out of range: a MicroVm has \(diskSlots) disk slots, addr 0x0 to 0x\(String(diskSlots - 1, radix: 16))"
                )
            }
            slot = Int(number)
        }
        let serial = try arguments.optionalString("serial")
        if let serial, serial.utf8.count > 20 {
            // virtio 1.2 §5.2.6: VIRTIO_BLK_T_GET_ID returns at most 20 bytes.
            throw QMPArgumentError(
                "Parameter 'serial' value '\(serial)' is too long; allowed: at most 20 bytes (virtio-blk device ID size)")
        }
        return .block(
            BlockDevice(
                id: id, node: try arguments.optionalString("drive") ?? id, slot: slot, serial: serial,
                iothread: try arguments.optionalString("iothread")))
    }

    /// `0x`-prefixed hexadecimal or decimal, as StratoVirt's str_to_usize.
    static func parseAddress(_ text: String) -> UInt64? {
        if text.hasPrefix("0x") || text.hasPrefix("0X") { return UInt64(text.dropFirst(2), radix: 16) }
        return UInt64(text)
    }

    /// The `id` argument of device_del, or the `node-name` of blockdev-del.
    public static func name(_ object: JSONObject, key: String) throws(QMPArgumentError) -> String {
        try QMPArguments(object, allowed: [key]).string(key)
    }

    private static func check(_ body: () throws(ConfigError) -> Void) throws(QMPArgumentError) {
        do {
            try body()
        } catch {
            throw QMPArgumentError(error.description)
        }
    }
}
