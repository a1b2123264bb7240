/// The one validated description of a Flotilla virtual machine.
///
/// Produced from StratoVirt's command line (``StratoVirtCommandLine``), from its JSON
/// configuration file (``VMConfig/init(json:)``), or from both, where the command line wins.
/// Every other module speaks this type: flotilla-vmm builds the VM from it, flotillad
/// stores it, flotillactl sends it.
///
/// The sections mirror Table 2 of StratoVirt's "Configuring VMs" reference.
public struct VMConfig: Sendable, Equatable {
    /// `-name` (1 to 255 characters). Not part of StratoVirt's JSON schema; Flotilla
    /// accepts and emits it as the top-level key `name` so that a configuration
    /// survives a round trip through JSON.
    public var name: String?
    public var boot: BootSource
    public var machine: MachineConfig
    public var drives: [DriveConfig]
    public var nets: [NetConfig]
    public var consoles: [ConsoleConfig]
    public var vsock: VsockConfig?
    public var serial: SerialConfig?
    public var iothreads: [IothreadConfig]
    public var balloon: BalloonConfig?
    public var rng: RngConfig?

    public init(
        name: String? = nil,
        boot: BootSource,
        machine: MachineConfig = MachineConfig(),
        drives: [DriveConfig] = [],
        nets: [NetConfig] = [],
        consoles: [ConsoleConfig] = [],
        vsock: VsockConfig? = nil,
        serial: SerialConfig? = nil,
        iothreads: [IothreadConfig] = [],
        balloon: BalloonConfig? = nil,
        rng: RngConfig? = nil
    ) {
        self.name = name
        self.boot = boot
        self.machine = machine
        self.drives = drives
        self.nets = nets
        self.consoles = consoles
        self.vsock = vsock
        self.serial = serial
        self.iothreads = iothreads
        self.balloon = balloon
        self.rng = rng
    }
}

/// JSON `boot-source`; CLI `-kernel`, `-append`, `-initrd`.
public struct BootSource: Sendable, Equatable {
    public var kernelImagePath: String
    public var bootArgs: String
    public var initrdPath: String?

    public init(kernelImagePath: String, bootArgs: String = "", initrdPath: String? = nil) {
        self.kernelImagePath = kernelImagePath
        self.bootArgs = bootArgs
        self.initrdPath = initrdPath
    }
}

/// JSON `machine-config`; CLI `-machine`, `-smp`, `-m`, `-mem-path`.
public struct MachineConfig: Sendable, Equatable {
    /// The only machine type: StratoVirt's lightweight `MicroVm`.
    public static let machineType = "MicroVm"
    public static let defaultVCPUs = 1
    /// StratoVirt's default guest memory: 256 MiB.
    public static let defaultMemoryBytes: UInt64 = 256 << 20

    public var vcpuCount: Int
    public var memoryBytes: UInt64
    /// Include guest memory in core dumps (StratoVirt's default: on).
    public var dumpGuestCore: Bool
    /// Map guest memory MAP_SHARED so that other processes can share it.
    public var memShare: Bool
    /// Directory in which a file backing guest memory is created (hugetlbfs for huge pages).
    public var memPath: String?

    public init(
        vcpuCount: Int = MachineConfig.defaultVCPUs,
        memoryBytes: UInt64 = MachineConfig.defaultMemoryBytes,
        dumpGuestCore: Bool = true,
        memShare: Bool = false,
        memPath: String? = nil
    ) {
        self.vcpuCount = vcpuCount
        self.memoryBytes = memoryBytes
        self.dumpGuestCore = dumpGuestCore
        self.memShare = memShare
        self.memPath = memPath
    }
}

/// One virtio-blk disk: JSON `drive[]`; CLI `-drive`.
public struct DriveConfig: Sendable, Equatable {
    public var id: String
    public var path: String
    public var readOnly: Bool
    /// Open the image with O_DIRECT (StratoVirt's default: true).
    public var direct: Bool
    public var serial: String?
    public var iothread: String?
    /// Average I/O operations per second; 0 or nil means unlimited.
    public var iops: UInt64?

    public init(
        id: String,
        path: String,
        readOnly: Bool = false,
        direct: Bool = true,
        serial: String? = nil,
        iothread: String? = nil,
        iops: UInt64? = nil
    ) {
        self.id = id
        self.path = path
        self.readOnly = readOnly
        self.direct = direct
        self.serial = serial
        self.iothread = iothread
        self.iops = iops
    }
}

/// One virtio-net NIC backed by a host tap device: JSON `net[]`; CLI `-netdev`.
public struct NetConfig: Sendable, Equatable {
    public var id: String
    public var hostDeviceName: String
    public var mac: MACAddress?
    public var iothread: String?

    public init(id: String, hostDeviceName: String, mac: MACAddress? = nil, iothread: String? = nil) {
        self.id = id
        self.hostDeviceName = hostDeviceName
        self.mac = mac
        self.iothread = iothread
    }
}

/// One virtio-console port exposed as a Unix socket: JSON `console[]`; CLI `-chardev`.
public struct ConsoleConfig: Sendable, Equatable {
    public var id: String
    public var socketPath: String

    public init(id: String, socketPath: String) {
        self.id = id
        self.socketPath = socketPath
    }
}

/// The vsock device: JSON `vsock`; CLI `-device vsock`.
public struct VsockConfig: Sendable, Equatable {
    /// Context IDs 0–2 are reserved (hypervisor, local, host); 0xFFFFFFFF is VMADDR_CID_ANY.
    public static let cidRange: ClosedRange<UInt64> = 3...0xFFFF_FFFE

    public var id: String
    public var guestCID: UInt64
    /// Flotilla extension (`uds-path=` / JSON `uds_path`), Firecracker's hybrid vsock: the
    /// device is served in user space, host-initiated connections arrive on this Unix socket
    /// (`CONNECT <port>\n`), guest-initiated ones to host port P go to `<udsPath>_P`. nil:
    /// the kernel's vhost-vsock.
    public var udsPath: String?

    public init(id: String, guestCID: UInt64, udsPath: String? = nil) {
        self.id = id
        self.guestCID = guestCID
        self.udsPath = udsPath
    }
}

/// The 8250 serial port: JSON `serial`; CLI `-serial stdio` or, as a Flotilla extension in
/// QEMU's syntax, `-serial unix:PATH,server,nowait` (JSON `serial.socket_path`): the worker
/// itself serves the console on a Unix socket, one client at a time.
public struct SerialConfig: Sendable, Equatable {
    public var stdio: Bool
    /// The console socket the worker listens on; nil for none.
    public var socketPath: String?

    public init(stdio: Bool, socketPath: String? = nil) {
        self.stdio = stdio
        self.socketPath = socketPath
    }
}

/// A named I/O thread: JSON `iothread[]`; CLI `-iothread`.
public struct IothreadConfig: Sendable, Equatable {
    public var id: String

    public init(id: String) {
        self.id = id
    }
}

/// The virtio-balloon device: JSON `balloon`; CLI `-balloon`.
public struct BalloonConfig: Sendable, Equatable {
    public var deflateOnOOM: Bool

    public init(deflateOnOOM: Bool) {
        self.deflateOnOOM = deflateOnOOM
    }
}

/// The virtio-rng device: JSON `rng`; CLI `-rng`.
public struct RngConfig: Sendable, Equatable {
    public static let bytesPerSecondRange: ClosedRange<UInt64> = 64...1_000_000_000

    public var randomFile: String
    /// Average entropy rate limit; nil means unlimited.
    public var bytesPerSecond: UInt64?

    public init(randomFile: String, bytesPerSecond: UInt64? = nil) {
        self.randomFile = randomFile
        self.bytesPerSecond = bytesPerSecond
    }
}

/// A unicast Ethernet address.
public struct MACAddress: Sendable, Equatable, Hashable, CustomStringConvertible {
    public var bytes: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8)

    public init(_ b0: UInt8, _ b1: UInt8, _ b2: UInt8, _ b3: UInt8, _ b4: UInt8, _ b5: UInt8) {
        bytes = (b0, b1, b2, b3, b4, b5)
    }

    /// Parses `xx:xx:xx:xx:xx:xx` (hex digits in either case); nil when malformed.
    public init?(parsing text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var octets: [UInt8] = []
        for part in parts {
            guard part.count == 2, part.allSatisfy(\.isHexDigit), let value = UInt8(part, radix: 16) else {
                return nil
            }
            octets.append(value)
        }
        self.init(octets[0], octets[1], octets[2], octets[3], octets[4], octets[5])
    }

    public var array: [UInt8] { [bytes.0, bytes.1, bytes.2, bytes.3, bytes.4, bytes.5] }

    /// The I/G bit (bit 0 of the first octet, IEEE 802-2014 §8.2) marks group addresses,
    /// which a NIC cannot own.
    public var isMulticast: Bool { bytes.0 & 1 == 1 }

    public var description: String {
        array.map { byte in
            let digits = String(byte, radix: 16)
            return digits.count == 1 ? "0" + digits : digits
        }.joined(separator: ":")
    }

    public static func == (lhs: MACAddress, rhs: MACAddress) -> Bool { lhs.array == rhs.array }
    public func hash(into hasher: inout Hasher) { hasher.combine(array) }
}
