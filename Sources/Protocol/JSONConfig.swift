/// StratoVirt's JSON configuration file (Table 2 of the reference).
public enum JSONConfig {
    /// The top-level sections, in the order `--print-config` writes them.
    static let sections = [
        "name", "boot-source", "machine-config", "drive", "net", "console", "vsock", "serial", "iothread",
        "balloon", "rng",
    ]

    /// Reads one JSON document into a layer; every error names the file and the field path.
    static func layer(fromJSON bytes: [UInt8], file: String) throws(ConfigError) -> ConfigLayer {
        let document: JSONValue
        do {
            document = try JSONValue.parse(bytes: bytes)
        } catch {
            throw ConfigError(field: file, problem: "invalid JSON at \(error.description)")
        }
        return try Reader(file: file).read(document)
    }

    /// Walks the document, checking types, keys and ranges with the field's path.
    struct Reader {
        let file: String

        func field(_ path: String) -> String { "\(file): \(path)" }

        func object(_ value: JSONValue, _ path: String, allowed: [String]) throws(ConfigError) -> JSONObject {
            guard let object = value.objectValue else {
                throw ConfigError(field: field(path), value: value.typeName, problem: "expected an object")
            }
            for key in object.keys where !allowed.contains(key) {
                throw ConfigError(
                    field: field(path.isEmpty ? key : "\(path).\(key)"), problem: "unknown field",
                    allowed: allowed.joined(separator: ", "))
            }
            return object
        }

        func array(_ value: JSONValue, _ path: String) throws(ConfigError) -> [JSONValue] {
            guard let array = value.arrayValue else {
                throw ConfigError(field: field(path), value: value.typeName, problem: "expected an array")
            }
            return array
        }

        func string(_ object: JSONObject, _ key: String, _ path: String, required: Bool = false) throws(ConfigError) -> String? {
            guard let value = object[key] else {
                if required { throw ConfigError(field: field("\(path).\(key)"), problem: "is required") }
                return nil
            }
            guard let string = value.stringValue else {
                throw ConfigError(field: field("\(path).\(key)"), value: value.typeName, problem: "expected a string")
            }
            if required, string.isEmpty {
                throw ConfigError(field: field("\(path).\(key)"), value: string, problem: "must not be empty")
            }
            return string
        }

        func requiredString(_ object: JSONObject, _ key: String, _ path: String) throws(ConfigError) -> String {
            try string(object, key, path, required: true) ?? ""
        }

        func bool(_ object: JSONObject, _ key: String, _ path: String) throws(ConfigError) -> Bool? {
            guard let value = object[key] else { return nil }
            guard let bool = value.boolValue else {
                throw ConfigError(
                    field: field("\(path).\(key)"), value: value.compactText, problem: "expected a boolean",
                    allowed: "true, false")
            }
            return bool
        }

        func unsigned(_ object: JSONObject, _ key: String, _ path: String, required: Bool = false) throws(ConfigError) -> UInt64? {
            guard let value = object[key] else {
                if required { throw ConfigError(field: field("\(path).\(key)"), problem: "is required") }
                return nil
            }
            guard let number = value.numberValue?.unsignedValue else {
                throw ConfigError(
                    field: field("\(path).\(key)"), value: value.compactText, problem: "expected a non-negative integer")
            }
            return number
        }

        /// The one spelling of a key among its accepted aliases (`mem-share`/`mem_share`).
        func aliased(_ object: JSONObject, _ keys: [String], _ path: String) throws(ConfigError) -> String {
            let present = keys.filter { object[$0] != nil }
            guard present.count <= 1 else {
                throw ConfigError(field: field("\(path).\(present[1])"), problem: "given together with its alias \(present[0])")
            }
            return present.first ?? keys[0]
        }

        func read(_ document: JSONValue) throws(ConfigError) -> ConfigLayer {
            let root = try object(document, "", allowed: JSONConfig.sections)
            var layer = ConfigLayer()
            if let name = root["name"] {
                guard let text = name.stringValue else {
                    throw ConfigError(field: field("name"), value: name.typeName, problem: "expected a string")
                }
                try ConfigRules.checkName(text, field: field("name"))
                layer.name = text
            }
            if let value = root["boot-source"] {
                let path = "boot-source"
                let boot = try object(value, path, allowed: ["kernel_image_path", "boot_args", "initrd_fs_path"])
                layer.kernel = try string(boot, "kernel_image_path", path)
                if let kernel = layer.kernel { try ConfigRules.checkPath(kernel, field: field("\(path).kernel_image_path")) }
                layer.bootArgs = try string(boot, "boot_args", path)
                layer.initrd = try string(boot, "initrd_fs_path", path)
                if let initrd = layer.initrd { try ConfigRules.checkPath(initrd, field: field("\(path).initrd_fs_path")) }
            }
            if let value = root["machine-config"] {
                let path = "machine-config"
                let machine = try object(
                    value, path,
                    allowed: ["type", "vcpu_count", "mem_size", "dump_guest_core", "mem-share", "mem_share", "mem_path", "mem-path"])
                if let type = try string(machine, "type", path) {
                    try ConfigRules.checkMachineType(type, field: field("\(path).type"))
                }
                if let vcpus = try unsigned(machine, "vcpu_count", path) {
                    try ConfigRules.checkVCPUs(vcpus, field: field("\(path).vcpu_count"))
                    layer.vcpus = vcpus
                }
                if let bytes = try unsigned(machine, "mem_size", path) {
                    try ConfigRules.checkMemory(bytes, field: field("\(path).mem_size"))
                    layer.memoryBytes = bytes
                }
                layer.dumpGuestCore = try bool(machine, "dump_guest_core", path)
                layer.memShare = try bool(machine, try aliased(machine, ["mem-share", "mem_share"], path), path)
                let memPathKey = try aliased(machine, ["mem_path", "mem-path"], path)
                layer.memPath = try string(machine, memPathKey, path)
                if let memPath = layer.memPath { try ConfigRules.checkPath(memPath, field: field("\(path).\(memPathKey)")) }
            }
            if let value = root["drive"] {
                for (index, element) in try array(value, "drive").enumerated() {
                    let path = "drive[\(index)]"
                    let drive = try object(
                        element, path,
                        allowed: ["drive_id", "path_on_host", "read_only", "direct", "serial_num", "iothread", "iops"])
                    let iops = try unsigned(drive, "iops", path)
                    if let iops { try ConfigRules.checkIOPS(iops, field: field("\(path).iops")) }
                    layer.drives.append(
                        DriveConfig(
                            id: try requiredString(drive, "drive_id", path),
                            path: try requiredString(drive, "path_on_host", path),
                            readOnly: try bool(drive, "read_only", path) ?? false,
                            direct: try bool(drive, "direct", path) ?? true,
                            serial: try string(drive, "serial_num", path),
                            iothread: try string(drive, "iothread", path),
                            iops: iops))
                }
            }
            if let value = root["net"] {
                for (index, element) in try array(value, "net").enumerated() {
                    let path = "net[\(index)]"
                    let net = try object(element, path, allowed: ["iface_id", "host_dev_name", "mac", "iothread"])
                    var mac: MACAddress?
                    if let text = try string(net, "mac", path) {
                        mac = try ConfigRules.parseMAC(text, field: field("\(path).mac"))
                    }
                    layer.nets.append(
                        NetConfig(
                            id: try requiredString(net, "iface_id", path),
                            hostDeviceName: try requiredString(net, "host_dev_name", path),
                            mac: mac, iothread: try string(net, "iothread", path)))
                }
            }
            if let value = root["console"] {
                for (index, element) in try array(value, "console").enumerated() {
                    let path = "console[\(index)]"
                    let console = try object(element, path, allowed: ["console_id", "socket_path"])
                    layer.consoles.append(
                        ConsoleConfig(
                            id: try requiredString(console, "console_id", path),
                            socketPath: try requiredString(console, "socket_path", path)))
                }
            }
            if let value = root["vsock"] {
                let vsock = try object(value, "vsock", allowed: ["vsock_id", "guest_cid", "uds_path"])
                let cid = try unsigned(vsock, "guest_cid", "vsock", required: true) ?? 0
                try ConfigRules.checkCID(cid, field: field("vsock.guest_cid"))
                var udsPath: String?
                if vsock["uds_path"] != nil {
                    let path = try requiredString(vsock, "uds_path", "vsock")
                    try ConfigRules.checkVsockUdsPath(path, field: field("vsock.uds_path"))
                    udsPath = path
                }
                layer.vsock = VsockConfig(id: try requiredString(vsock, "vsock_id", "vsock"), guestCID: cid, udsPath: udsPath)
            }
            if let value = root["serial"] {
                let serial = try object(value, "serial", allowed: ["stdio", "socket_path"])
                let stdio = try bool(serial, "stdio", "serial") ?? false
                var socketPath: String?
                if serial["socket_path"] != nil {
                    let path = try requiredString(serial, "socket_path", "serial")
                    try ConfigRules.checkSocketPath(path, field: field("serial.socket_path"))
                    socketPath = path
                }
                if stdio, let socketPath {
                    throw ConfigError(
                        field: field("serial.socket_path"), value: socketPath,
                        problem: "the serial port goes to one place, and serial.stdio is true",
                        allowed: "either \"stdio\": true or \"socket_path\"")
                }
                layer.serial = SerialConfig(stdio: stdio, socketPath: socketPath)
            }
            if let value = root["iothread"] {
                for (index, element) in try array(value, "iothread").enumerated() {
                    let path = "iothread[\(index)]"
                    let iothread = try object(element, path, allowed: ["id"])
                    layer.iothreads.append(IothreadConfig(id: try requiredString(iothread, "id", path)))
                }
            }
            if let value = root["balloon"] {
                let balloon = try object(value, "balloon", allowed: ["deflate_on_oom"])
                layer.balloon = BalloonConfig(deflateOnOOM: try bool(balloon, "deflate_on_oom", "balloon") ?? false)
            }
            if let value = root["rng"] {
                let rng = try object(value, "rng", allowed: ["random_file", "bytes_per_sec"])
                let rate = try unsigned(rng, "bytes_per_sec", "rng")
                if let rate { try ConfigRules.checkRngRate(rate, field: field("rng.bytes_per_sec")) }
                layer.rng = RngConfig(randomFile: try requiredString(rng, "random_file", "rng"), bytesPerSecond: rate)
            }
            return layer
        }
    }
}

extension VMConfig {
    /// Reads and validates a configuration from StratoVirt's JSON schema alone.
    /// `source` names the document in errors (a file path, or e.g. "vm-create").
    public init(json bytes: [UInt8], source: String = "config") throws(ConfigError) {
        self = try JSONConfig.layer(fromJSON: bytes, file: source).build()
    }

    /// The configuration in StratoVirt's JSON schema (Table 2), every value explicit, so that
    /// reading it back gives an equal `VMConfig`.
    public var jsonValue: JSONValue {
        var root = JSONObject()
        if let name { root["name"] = .string(name) }
        var boot: JSONObject = ["kernel_image_path": .string(self.boot.kernelImagePath), "boot_args": .string(self.boot.bootArgs)]
        if let initrd = self.boot.initrdPath { boot["initrd_fs_path"] = .string(initrd) }
        root["boot-source"] = .object(boot)
        var machine: JSONObject = [
            "type": .string(MachineConfig.machineType),
            "vcpu_count": .integer(self.machine.vcpuCount),
            "mem_size": .integer(self.machine.memoryBytes),
            "dump_guest_core": .bool(self.machine.dumpGuestCore),
            "mem-share": .bool(self.machine.memShare),
        ]
        if let memPath = self.machine.memPath { machine["mem_path"] = .string(memPath) }
        root["machine-config"] = .object(machine)
        if !drives.isEmpty {
            root["drive"] = .array(
                drives.map { drive in
                    var object: JSONObject = [
                        "drive_id": .string(drive.id), "path_on_host": .string(drive.path),
                        "read_only": .bool(drive.readOnly), "direct": .bool(drive.direct),
                    ]
                    if let serial = drive.serial { object["serial_num"] = .string(serial) }
                    if let iothread = drive.iothread { object["iothread"] = .string(iothread) }
                    if let iops = drive.iops { object["iops"] = .integer(iops) }
                    return .object(object)
                })
        }
        if !nets.isEmpty {
            root["net"] = .array(
                nets.map { net in
                    var object: JSONObject = ["iface_id": .string(net.id), "host_dev_name": .string(net.hostDeviceName)]
                    if let mac = net.mac { object["mac"] = .string(mac.description) }
                    if let iothread = net.iothread { object["iothread"] = .string(iothread) }
                    return .object(object)
                })
        }
        if !consoles.isEmpty {
            root["console"] = .array(
                consoles.map { .object(["console_id": .string($0.id), "socket_path": .string($0.socketPath)]) })
        }
        if let vsock {
            var object: JSONObject = ["vsock_id": .string(vsock.id), "guest_cid": .integer(vsock.guestCID)]
            if let path = vsock.udsPath { object["uds_path"] = .string(path) }
            root["vsock"] = .object(object)
        }
        if let serial {
            var object: JSONObject = ["stdio": .bool(serial.stdio)]
            if let path = serial.socketPath { object["socket_path"] = .string(path) }
            root["serial"] = .object(object)
        }
        if !iothreads.isEmpty { root["iothread"] = .array(iothreads.map { .object(["id": .string($0.id)]) }) }
        if let balloon { root["balloon"] = .object(["deflate_on_oom": .bool(balloon.deflateOnOOM)]) }
        if let rng {
            var object: JSONObject = ["random_file": .string(rng.randomFile)]
            if let rate = rng.bytesPerSecond { object["bytes_per_sec"] = .integer(rate) }
            root["rng"] = .object(object)
        }
        return .object(root)
    }
}
