/// What flotilla-vmm was asked to do.
public struct VMMInvocation: Sendable, Equatable {
    public enum Action: Sendable, Equatable {
        /// Boot the VM.
        case run
        /// Print the resolved configuration as JSON in the reference's schema and exit.
        case printConfig
        /// Print the option reference and exit.
        case help
        case version
    }

    public var action: Action
    /// The validated VM; nil only for `help` and `version`.
    public var config: VMConfig?
    public var runtime: RuntimeOptions

    public init(action: Action, config: VMConfig?, runtime: RuntimeOptions) {
        self.action = action
        self.config = config
        self.runtime = runtime
    }
}

/// StratoVirt's command line (Tables 1 and 3 of the reference), parsed into a ``VMConfig``.
///
/// Options are written with one dash (`-kernel`), as StratoVirt and QEMU do; two dashes are
/// accepted too. Option values follow QEMU's syntax: `key=value` pairs separated by commas,
/// `,,` for a literal comma. Flotilla adds `--print-config`, `--help` and `--version`.
public enum StratoVirtCommandLine {
    /// One command-line option: its name, the shape of its argument and its help text.
    public struct OptionSpec: Sendable {
        public let name: String
        public let argument: String?
        public let help: String
        public let repeatable: Bool
    }

    public static let options: [OptionSpec] = [
        .init(name: "name", argument: "NAME", help: "VM name, 1 to 255 characters", repeatable: false),
        .init(
            name: "machine", argument: "[type=]microvm[,dump-guest-core=on|off][,mem-share=on|off]",
            help: "machine type (only MicroVm); include guest RAM in core dumps (default on); map guest RAM shared (default off)",
            repeatable: false),
        .init(name: "kernel", argument: "PATH", help: "kernel image: ELF vmlinux or bzImage (required)", repeatable: false),
        .init(
            name: "append", argument: "ARGS...",
            help: "kernel command line; several words until the next option are joined with spaces",
            repeatable: false),
        .init(name: "initrd", argument: "PATH", help: "initial ramdisk", repeatable: false),
        .init(name: "smp", argument: "[cpus=]N", help: "number of vCPUs, 1 to 254 (default 1)", repeatable: false),
        .init(
            name: "m", argument: "SIZE",
            help: "guest memory in bytes, or with an M or G suffix; 256M to 512G, whole 4 KiB pages (default 256M)",
            repeatable: false),
        .init(
            name: "drive",
            argument: "id=ID,file=PATH[,readonly=on|off][,direct=on|off][,serial=S][,iothread=ID][,iops=N]",
            help: "virtio-blk disk, at most 4; direct (O_DIRECT) defaults to on; serial at most 20 bytes; iops 0 (unlimited) to 1000000",
            repeatable: true),
        .init(
            name: "netdev", argument: "id=ID,netdev=TAP[,mac=XX:XX:XX:XX:XX:XX][,iothread=ID]",
            help: "virtio-net NIC on a host tap device, at most 2; unicast MAC", repeatable: true),
        .init(
            name: "chardev", argument: "id=ID,path=SOCKET",
            help: "virtio-console port on a Unix socket (path at most 107 bytes)", repeatable: true),
        .init(
            name: "device", argument: "vsock,id=ID,guest-cid=N[,uds-path=PATH]",
            help: "vsock device; guest CID 3 to 4294967294; uds-path (Flotilla extension): served in user space on "
                + "Unix sockets as Firecracker's (PATH must not exist; guest connections to port P go to PATH_P)",
            repeatable: false),
        .init(
            name: "api-channel", argument: "unix:PATH",
            help: "QMP control socket (path at most 107 bytes; must not exist)", repeatable: false),
        .init(
            name: "serial", argument: "stdio|unix:PATH,server,nowait",
            help: "8250 serial port (ttyS0) on standard input/output, or served on a Unix socket (one client at a time; "
                + "recent output replayed on connect; path at most 107 bytes, must not exist)",
            repeatable: false),
        .init(name: "D", argument: "PATH", help: "log file", repeatable: false),
        .init(name: "pidfile", argument: "PATH", help: "pid file (only with -daemonize; must not exist)", repeatable: false),
        .init(name: "disable-seccomp", argument: nil, help: "run without the seccomp filter", repeatable: false),
        .init(
            name: "daemonize", argument: nil,
            help: "run in the background; returns once the VM is set up and the api-channel accepts", repeatable: false),
        .init(name: "iothread", argument: "id=ID", help: "named I/O thread, at most 8, unique ids", repeatable: true),
        .init(name: "balloon", argument: "deflate-on-oom=on|off", help: "virtio-balloon device (not with -mem-path)", repeatable: false),
        .init(
            name: "mem-path", argument: "DIR", help: "back guest memory with a file in DIR (hugetlbfs for huge pages)", repeatable: false),
        .init(
            name: "rng", argument: "random_file=PATH[,bytes_per_sec=N]",
            help: "virtio-rng device; bytes_per_sec 64 to 1000000000 (default unlimited)", repeatable: false),
        .init(
            name: "config", argument: "PATH",
            help: "JSON configuration file; options given on the command line win over it", repeatable: false),
        .init(name: "print-config", argument: nil, help: "print the resolved configuration as JSON and exit", repeatable: false),
        .init(name: "help", argument: nil, help: "print this help and exit", repeatable: false),
        .init(name: "version", argument: nil, help: "print the version and exit", repeatable: false),
    ]

    public static let version = "0.1.0"

    public static var helpText: String {
        var text = """
            Usage: flotilla-vmm [OPTION]...
            Runs one KVM MicroVm. Accepts StratoVirt's command line and JSON configuration.

            Options:

            """
        let limits = """

            Limits: 1-254 vCPUs; 256 MiB-512 GiB memory; at most 4 disks and 2 NICs (including
            hot-plugged ones); at most 11 virtio-mmio devices (4 disk + 2 NIC slots, then consoles,
            vsock, balloon, rng); at most 8 iothreads. Booleans: true, false, on, off.
            Option values use QEMU's syntax: key=value,key=value with ",," for a literal comma.

            Exit status: 0 when the guest shut down or reset, or the VM was told to quit;
            1 for a configuration error; 2 for a start-up failure; 3 when the guest failed
            (triple fault, KVM internal error).

            """
        for option in options {
            let flotillaOnly = ["help", "version", "print-config"].contains(option.name)
            var line = "  " + (flotillaOnly ? "--" : "-") + option.name
            if let argument = option.argument { line += " " + argument }
            text += line + "\n      " + option.help + (option.repeatable ? " (repeatable)" : "") + "\n"
        }
        return text + limits
    }

    /// Parses `arguments` (without the program name). `readFile` reads the `-config` file;
    /// it is the only I/O, so that this module stays free of system calls.
    public static func parse(
        _ arguments: [String],
        readFile: (String) throws(ConfigError) -> [UInt8]
    ) throws(ConfigError) -> VMMInvocation {
        var layer = ConfigLayer()
        var runtime = RuntimeOptions()
        var configPath: String?
        var action = VMMInvocation.Action.run
        var seen: Set<String> = []

        var index = 0
        func value(for option: String) throws(ConfigError) -> String {
            guard index + 1 < arguments.count else {
                throw ConfigError(field: "-\(option)", problem: "needs a value")
            }
            index += 1
            return arguments[index]
        }

        while index < arguments.count {
            let argument = arguments[index]
            guard argument.hasPrefix("-"), argument.count > 1 else {
                throw ConfigError(
                    field: "command line", value: argument, problem: "unexpected argument",
                    allowed: "options starting with '-'; see --help")
            }
            let name = argument.hasPrefix("--") ? String(argument.dropFirst(2)) : String(argument.dropFirst())
            guard let spec = options.first(where: { $0.name == name }) else {
                throw ConfigError(field: "command line", value: argument, problem: "unknown option", allowed: "see --help")
            }
            if !spec.repeatable {
                guard seen.insert(name).inserted else {
                    throw ConfigError(field: "-\(name)", problem: "given more than once", allowed: "once")
                }
            }
            let option = "-\(name)"
            switch name {
            case "name":
                let text = try value(for: name)
                try ConfigRules.checkName(text, field: option)
                layer.name = text
            case "machine":
                let opts = try OptionString(
                    try value(for: name), option: option, impliedKey: "type",
                    allowedKeys: ["type", "dump-guest-core", "mem-share"])
                if let type = opts["type"] { try ConfigRules.checkMachineType(type, field: opts.field("type")) }
                layer.dumpGuestCore = try opts.bool("dump-guest-core")
                layer.memShare = try opts.bool("mem-share")
            case "kernel":
                let path = try value(for: name)
                try ConfigRules.checkPath(path, field: option)
                layer.kernel = path
            case "append":
                var words = [try value(for: name)]
                while index + 1 < arguments.count, !arguments[index + 1].hasPrefix("-") {
                    index += 1
                    words.append(arguments[index])
                }
                layer.bootArgs = words.joined(separator: " ")
            case "initrd":
                let path = try value(for: name)
                try ConfigRules.checkPath(path, field: option)
                layer.initrd = path
            case "smp":
                let opts = try OptionString(try value(for: name), option: option, impliedKey: "cpus", allowedKeys: ["cpus"])
                let cpus = try opts.unsigned("cpus") ?? 0
                try ConfigRules.checkVCPUs(cpus, field: opts.field("cpus"))
                layer.vcpus = cpus
            case "m":
                let bytes = try ConfigRules.parseMemorySize(try value(for: name), field: option)
                try ConfigRules.checkMemory(bytes, field: option)
                layer.memoryBytes = bytes
            case "drive":
                let opts = try OptionString(
                    try value(for: name), option: option,
                    allowedKeys: ["id", "file", "readonly", "direct", "serial", "iothread", "iops"])
                let iops = try opts.unsigned("iops")
                if let iops { try ConfigRules.checkIOPS(iops, field: opts.field("iops")) }
                layer.drives.append(
                    DriveConfig(
                        id: try opts.required("id"), path: try opts.required("file"),
                        readOnly: try opts.bool("readonly") ?? false, direct: try opts.bool("direct") ?? true,
                        serial: opts["serial"], iothread: try opts.optionalString("iothread"), iops: iops))
            case "netdev":
                let opts = try OptionString(
                    try value(for: name), option: option, allowedKeys: ["id", "netdev", "mac", "iothread"])
                var mac: MACAddress?
                if let text = opts["mac"] { mac = try ConfigRules.parseMAC(text, field: opts.field("mac")) }
                layer.nets.append(
                    NetConfig(
                        id: try opts.required("id"), hostDeviceName: try opts.required("netdev"), mac: mac,
                        iothread: try opts.optionalString("iothread")))
            case "chardev":
                let opts = try OptionString(try value(for: name), option: option, allowedKeys: ["id", "path"])
                layer.consoles.append(ConsoleConfig(id: try opts.required("id"), socketPath: try opts.required("path")))
            case "device":
                let opts = try OptionString(
                    try value(for: name), option: option, impliedKey: "driver", allowedKeys: ["driver", "id", "guest-cid", "uds-path"])
                guard opts["driver"] == "vsock" else {
                    throw ConfigError(field: "-device", value: opts["driver"] ?? "", problem: "unsupported device", allowed: "vsock")
                }
                guard let cid = try opts.unsigned("guest-cid") else {
                    throw ConfigError(field: opts.field("guest-cid"), problem: "is required")
                }
                try ConfigRules.checkCID(cid, field: opts.field("guest-cid"))
                let udsPath = try opts.optionalString("uds-path")
                if let udsPath { try ConfigRules.checkVsockUdsPath(udsPath, field: opts.field("uds-path")) }
                layer.vsock = VsockConfig(id: try opts.required("id"), guestCID: cid, udsPath: udsPath)
            case "api-channel":
                let text = try value(for: name)
                guard text.hasPrefix("unix:"), text.count > 5 else {
                    throw ConfigError(field: option, value: text, allowed: "unix:PATH")
                }
                let path = String(text.dropFirst(5))
                try ConfigRules.checkSocketPath(path, field: option)
                runtime.apiChannelPath = path
            case "serial":
                let text = try value(for: name)
                if text == "stdio" {
                    layer.serial = SerialConfig(stdio: true)
                } else if text.hasPrefix("unix:") {
                    let path = try SerialSocketOption.parse(String(text.dropFirst(5)), option: option)
                    layer.serial = SerialConfig(stdio: false, socketPath: path)
                } else {
                    throw ConfigError(field: option, value: text, allowed: SerialSocketOption.allowed)
                }
            case "D":
                let path = try value(for: name)
                try ConfigRules.checkPath(path, field: option)
                runtime.logFile = path
            case "pidfile":
                let path = try value(for: name)
                try ConfigRules.checkPath(path, field: option)
                runtime.pidfile = path
            case "disable-seccomp":
                runtime.disableSeccomp = true
            case "daemonize":
                runtime.daemonize = true
            case "iothread":
                let opts = try OptionString(try value(for: name), option: option, allowedKeys: ["id"])
                layer.iothreads.append(IothreadConfig(id: try opts.required("id")))
            case "balloon":
                let opts = try OptionString(try value(for: name), option: option, allowedKeys: ["deflate-on-oom"])
                layer.balloon = BalloonConfig(deflateOnOOM: try opts.bool("deflate-on-oom") ?? false)
            case "mem-path":
                let path = try value(for: name)
                try ConfigRules.checkPath(path, field: option)
                layer.memPath = path
            case "rng":
                let opts = try OptionString(
                    try value(for: name), option: option, allowedKeys: ["random_file", "bytes_per_sec"])
                let rate = try opts.unsigned("bytes_per_sec")
                if let rate { try ConfigRules.checkRngRate(rate, field: opts.field("bytes_per_sec")) }
                layer.rng = RngConfig(randomFile: try opts.required("random_file"), bytesPerSecond: rate)
            case "config":
                configPath = try value(for: name)
            case "print-config":
                action = .printConfig
            case "help":
                action = .help
            case "version":
                action = .version
            default:
                // Every entry of `options` is handled above.
                throw ConfigError(field: "command line", value: argument, problem: "unknown option", allowed: "see --help")
            }
            index += 1
        }

        if action == .help || action == .version {
            return VMMInvocation(action: action, config: nil, runtime: runtime)
        }
        var base = ConfigLayer()
        if let configPath {
            let bytes = try readFile(configPath)
            base = try JSONConfig.layer(fromJSON: bytes, file: configPath)
        }
        let config = try layer.overriding(base).build()
        try runtime.validate(for: config)
        return VMMInvocation(action: action, config: config, runtime: runtime)
    }
}

/// `-serial unix:PATH,server,nowait` (QEMU's spelling; `server=on`, `wait=off` work too): the
/// worker listens on PATH and never waits for a client before running the guest.
enum SerialSocketOption {
    static let allowed = "stdio, unix:PATH,server,nowait"

    /// The path, from the text after `unix:`; `,,` stands for a literal comma in it.
    static func parse(_ text: String, option: String) throws(ConfigError) -> String {
        let elements = OptionString.split(text)
        let path = elements.first ?? ""
        guard !path.isEmpty else {
            throw ConfigError(field: option, value: "unix:\(text)", problem: "the socket path is missing", allowed: allowed)
        }
        try ConfigRules.checkSocketPath(path, field: option)
        var server = false
        var noWait = false
        for element in elements.dropFirst() {
            switch element {
            case "server", "server=on": server = true
            case "nowait", "wait=off": noWait = true
            case "server=off":
                throw ConfigError(
                    field: option, value: element, problem: "connecting to a console socket as a client is not supported",
                    allowed: "server (flotilla-vmm listens)")
            case "wait", "wait=on":
                throw ConfigError(
                    field: option, value: element, problem: "the VM never waits for a console client before it runs",
                    allowed: "nowait")
            default:
                throw ConfigError(field: option, value: element, problem: "unknown flag", allowed: "server, nowait")
            }
        }
        guard server && noWait else {
            throw ConfigError(
                field: option, value: "unix:\(text)",
                problem: "flotilla-vmm serves the console itself and never waits for a client, so say so as QEMU would",
                allowed: "unix:\(path),server,nowait")
        }
        return path
    }
}
