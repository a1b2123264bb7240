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

    /// A device_add for a NIC.
    public struct NetDevice: Sendable, Equatable {
        public var id: String
        /// The netdev (netdev_add `id`, or a `-netdev` id) whose tap the NIC attaches to.
        public var netdev: String
        /// The NIC slot asked for with `addr` (0–1, StratoVirt: 0x0 is eth0), or nil for the
        /// first free one.
        public var slot: Int?
        /// nil: the stable locally administered address `-netdev` without mac= gets.
        public var mac: MACAddress?
        public var iothread: String?

        public init(id: String, netdev: String, slot: Int? = nil, mac: MACAddress? = nil, iothread: String? = nil) {
            self.id = id
            self.netdev = netdev
            self.slot = slot
            self.mac = mac
            self.iothread = iothread
        }
    }

    public enum DeviceAdd: Sendable, Equatable {
        case block(BlockDevice)
        case net(NetDevice)
    }

    /// device_add: `id`, `driver`, `addr` (the slot among the model's own: disk slots "0x0" to
    /// "0x3", NIC slots "0x0" to "0x1", hexadecimal or decimal as StratoVirt's str_to_usize
    /// reads it) and `iothread`; for a disk `drive` (the node; StratoVirt's MicroVm takes the
    /// node whose name is the `id` when it is absent) and `serial`; for a NIC `netdev` (the
    /// netdev named like the `id` when absent, likewise) and `mac`.
    public static func deviceAdd(_ object: JSONObject, diskSlots: Int, nicSlots: Int = 2) throws(QMPArgumentError) -> DeviceAdd {
        // QEMU checks the driver first and names the model's properties in its errors.
        guard let driver = object["driver"]?.stringValue else {
            _ = try QMPArguments(object, allowed: Set(object.keys)).string("driver")
            throw QMPArgumentError("Parameter 'driver' is missing")
        }
        let isNet = netDrivers.contains(driver)
        guard isNet || blockDrivers.contains(driver) else { throw QMPArgumentError("'\(driver)' is not a valid device model name") }
        let allowed: Set<String> =
            isNet ? ["id", "driver", "netdev", "mac", "addr", "iothread"] : ["id", "driver", "drive", "addr", "serial", "iothread"]
        for key in object.keys.sorted() where !allowed.contains(key) {
            throw QMPArgumentError("Property '\(driver).\(key)' not found")
        }
        let arguments = try QMPArguments(object, allowed: allowed)
        let id = try arguments.string("id")
        try check { () throws(ConfigError) in try ConfigRules.checkID(id, field: "id") }
        let slot = try slotArgument(arguments, id: id, count: isNet ? nicSlots : diskSlots, kind: isNet ? "NIC" : "disk")
        if isNet {
            var mac: MACAddress?
            if let text = try arguments.optionalString("mac") {
                // -netdev mac='s rules (a unicast address), in QEMU's words for a bad property value.
                guard let parsed = MACAddress(parsing: text), !parsed.isMulticast else {
                    throw QMPArgumentError(
                        "Property '\(driver).mac' doesn't take value '\(text)'; allowed: a unicast MAC address, six hex octets separated by colons (bit 0 of the first octet clear)"
                    )
                }
                mac = parsed
            }
            return .net(
                NetDevice(
                    id: id, netdev: try arguments.optionalString("netdev") ?? id, slot: slot, mac: mac,
                    iothread: try arguments.optionalString("iothread")))
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

    /// `addr`: the index among the model's `count` slots, or nil when absent.
    static func slotArgument(_ arguments: QMPArguments, id: String, count: Int, kind: String) throws(QMPArgumentError) -> Int? {
        guard let addr = try arguments.optionalString("addr") else { return nil }
        guard let number = parseAddress(addr) else { throw QMPArgumentError("Invalid addr for device \(id)") }
        guard number < UInt64(count) else {
            throw QMPArgumentError(
                "addr '\(addr)' of device \(id) is out of range: a MicroVm has \(count) \(kind) slots, addr 0x0 to 0x\(String(count - 1, radix: 16))"
            )
        }
        return Int(number)
    }

    /// A netdev_add: the tap a NIC will attach to.
    public struct Netdev: Sendable, Equatable {
        /// Where the tap comes from.
        public enum Source: Sendable, Equatable {
            /// `ifname`: the tap interface, which must exist (the VMM attaches, never creates).
            case ifname(String)
            /// `fd`: the name of a tap descriptor the client passed with getfd (QEMU's
            /// monitor_fd_param), taken out of the connection's descriptors by netdev_add.
            case descriptor(String)
        }
        public var id: String
        public var source: Source

        public init(id: String, ifname: String) {
            self.id = id
            source = .ifname(ifname)
        }

        public init(id: String, fd: String) {
            self.id = id
            source = .descriptor(fd)
        }
    }

    /// QEMU's refusal of the members that name a tap some other way next to `fd` (net/tap.c).
    public static let invalidWithFD =
        "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and vhostfds= are invalid with fd="

    /// netdev_add as StratoVirt's qmp_schema `netdev_add` spells it: `id`, `ifname` (the tap),
    /// and QEMU's `type` ("tap", the only backend), or QEMU's `fd` instead of `ifname`: a tap
    /// passed with getfd, by its fdname. The members StratoVirt also accepts are taken where
    /// they ask for what the device does anyway (`vhost` off, `queues` 1, `script`/`downscript`
    /// "no": no script ever runs) and otherwise refused naming why; `fd` goes with none of
    /// `ifname`, `script`, `downscript`, `queues` (QEMU's rule and words); a descriptor number
    /// as `fd`, and `fds`, `vhostfd`, `vhostfds`, are not supported.
    public static func netdevAdd(_ object: JSONObject) throws(QMPArgumentError) -> Netdev {
        let descriptors = ["fds", "vhostfd", "vhostfds"]
        let arguments = try QMPArguments(
            object, allowed: Set(["id", "ifname", "fd", "type", "vhost", "queues", "script", "downscript"] + descriptors))
        let id = try arguments.string("id")
        try check { () throws(ConfigError) in try ConfigRules.checkID(id, field: "id") }
        if let type = try arguments.optionalString("type"), type != "tap" {
            throw QMPArgumentError("Parameter 'type' value '\(type)' is not supported on a MicroVm; allowed: 'tap'")
        }
        let fd = try arguments.optionalString("fd")
        if fd != nil, ["ifname", "script", "downscript", "queues", "fds", "vhostfds"].contains(where: arguments.has) {
            throw QMPArgumentError(invalidWithFD)
        }
        for key in descriptors where arguments.has(key) {
            throw QMPArgumentError(
                "Parameter '\(key)' is not supported: name the tap with 'ifname', or pass one tap with getfd and name it with 'fd'")
        }
        switch arguments.object["vhost"] {
        case nil, .bool(false), .string("off"), .string("false"): break
        default: throw QMPArgumentError("Parameter 'vhost' is not supported: virtio-net runs in the VMM (no vhost-net); allowed: false")
        }
        switch arguments.object["queues"] {
        case nil, .string("1"): break
        case .some(let value) where value.numberValue?.unsignedValue == 1: break
        default: throw QMPArgumentError("Parameter 'queues' is not supported: a NIC has one queue pair; allowed: 1")
        }
        for key in ["script", "downscript"] {
            if let value = try arguments.optionalString(key), value != "no" {
                throw QMPArgumentError("Parameter '\(key)' value '\(value)' is not supported: the VMM runs no scripts; allowed: 'no'")
            }
        }
        if let fd {
            // QEMU reads a leading digit as a descriptor number the process already has
            // (monitor_fd_param); getfd refuses such names, so they cannot be one of ours.
            if let first = fd.utf8.first, first >= UInt8(ascii: "0"), first <= UInt8(ascii: "9") {
                throw QMPArgumentError(
                    "Invalid file descriptor number '\(fd)': descriptor numbers of the VMM process are not accepted; "
                        + "pass the tap with getfd and give its fdname")
            }
            return Netdev(id: id, fd: fd)
        }
        guard let ifname = try arguments.optionalString("ifname") else {
            throw QMPArgumentError("Parameter 'ifname' is missing")
        }
        // IFNAMSIZ is 16 including the terminating NUL (as -netdev netdev= is checked).
        guard !ifname.isEmpty, ifname.utf8.count < 16, !ifname.utf8.contains(0), !ifname.contains("/") else {
            throw QMPArgumentError("Parameter 'ifname' value '\(ifname)' is not a valid tap device name; allowed: 1 to 15 bytes")
        }
        return Netdev(id: id, ifname: ifname)
    }

    /// `0x`-prefixed hexadecimal or decimal, as StratoVirt's str_to_usize.
    static func parseAddress(_ text: String) -> UInt64? {
        if text.hasPrefix("0x") || text.hasPrefix("0X") { return UInt64(text.dropFirst(2), radix: 16) }
        return UInt64(text)
    }

    /// The `id` argument of device_del and netdev_del, or the `node-name` of blockdev-del.
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
