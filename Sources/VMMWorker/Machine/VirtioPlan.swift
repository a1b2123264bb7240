import Glibc
import Protocol

/// A device for one virtio-mmio slot, and the event loop that will process its queues.
public struct VirtioDeviceSpec: Sendable {
    public enum Kind: Sendable {
        case block(DriveConfig)
        case console(ConsoleConfig, any ConsolePort)
        case balloon(BalloonConfig)
        case rng(RngConfig)
        case net(NetConfig)
        /// The user-space vsock device and its host listener (made by the worker, which
        /// removes it on every exit path).
        case vsock(VsockConfig, VsockListener?)
    }
    public let slot: Int
    public let kind: Kind
    public let loop: EventLoop

    public init(slot: Int, kind: Kind, loop: EventLoop) {
        self.slot = slot
        self.kind = kind
        self.loop = loop
    }

    /// Builds the device: opens and locks a disk image, ...
    func makeDevice(memory: GuestMemory) throws -> any VirtioDevice {
        switch kind {
        case .block(let drive):
            let backend = try BlockBackend(drive: drive)
            return VirtioBlockDevice(backend: backend, memory: memory, loop: loop, iops: drive.iops ?? 0)
        case .console(let console, let port):
            return VirtioConsoleDevice(id: console.id, port: port, memory: memory, loop: loop)
        case .balloon(let balloon):
            return VirtioBalloonDevice(balloon: balloon, memory: memory, loop: loop)
        case .rng(let rng):
            return try VirtioRngDevice(rng: rng, memory: memory, loop: loop)
        case .net(let net):
            return try VirtioNetDevice(net: net, memory: memory, loop: loop)
        case .vsock(let vsock, let listener):
            return try VirtioVsockDevice(
                id: vsock.id, guestCID: vsock.guestCID, listener: listener, udsPath: vsock.udsPath.map(Paths.absolute),
                memory: memory, loop: loop)
        }
    }
}

/// The fixed virtio-mmio layout (docs/guest-abi.md "Virtio-mmio slots"): slots 0–3 disks,
/// 4–5 NICs, always announced (empty ones for hot-plug), then the optional devices.
public enum VirtioPlan {
    public static let diskSlots = 0..<4
    public static let nicSlots = 4..<6

    /// The slots of the optional devices that `config` has, in the documented order
    /// (consoles, vsock, balloon, rng), from slot 6 on.
    static func optionalSlots(for config: VMConfig) -> (consoles: [Int], vsock: Int?, balloon: Int?, rng: Int?, count: Int) {
        var next = nicSlots.upperBound
        var consoles: [Int] = []
        for _ in config.consoles {
            consoles.append(next)
            next += 1
        }
        var vsock: Int?
        if config.vsock != nil {
            vsock = next
            next += 1
        }
        var balloon: Int?
        if config.balloon != nil {
            balloon = next
            next += 1
        }
        var rng: Int?
        if config.rng != nil {
            rng = next
            next += 1
        }
        return (consoles, vsock, balloon, rng, next - nicSlots.upperBound)
    }

    /// The slots announced on the kernel command line.
    public static func slots(for config: VMConfig) -> [VirtioMMIOSlot] {
        (0..<nicSlots.upperBound + optionalSlots(for: config).count).map { VirtioMMIOSlot(slot: $0) }
    }

    /// The first configured device this build cannot provide yet, as a configuration error
    /// naming its option: refusing it is better than starting a VM without a device its
    /// owner asked for (a StratoVirt command line is meant to give the same VM).
    /// Today that is a vsock without `uds-path`: only the kernel's vhost-vsock would serve it
    /// (``VhostVsock/unavailable(for:)``).
    public static func unimplementedDevice(in config: VMConfig) -> ConfigError? {
        if let vsock = config.vsock, let problem = VhostVsock.unavailable(for: vsock) { return problem }
        return nil
    }

    /// The first NIC whose tap interface does not exist, as a configuration error naming its
    /// option (checked before anything is created; a tap is attached, never created, by the
    /// VMM, as creating one would leave an interface behind or need privileges it drops).
    public static func missingTap(in config: VMConfig) -> ConfigError? {
        for net in config.nets where if_nametoindex(net.hostDeviceName) == 0 {
            return missingTapError(id: net.id, tap: net.hostDeviceName)
        }
        return nil
    }

    /// The error for NIC `id`'s tap `tap` that does not exist: at start-up, and for QMP
    /// netdev_add (the same words, so a tool recognises it either way).
    public static func missingTapError(id: String, tap: String) -> ConfigError {
        ConfigError(
            field: "-netdev netdev / net.host_dev_name", value: tap, problem: "no network interface of that name (NIC '\(id)')",
            allowed: "an existing tap device, e.g. created with 'ip tuntap add NAME mode tap'")
    }

    /// One spec per configured device; each runs on its `iothread` loop, else on `mainLoop`.
    /// `consolePorts` are the host ends of the consoles, by console id, and `vsockListener`
    /// the vsock's (the worker creates the sockets, so that it removes them on every exit path).
    public static func devices(
        for config: VMConfig, mainLoop: EventLoop, iothreads: [String: EventLoop], consolePorts: [String: any ConsolePort] = [:],
        vsockListener: VsockListener? = nil
    ) throws -> [VirtioDeviceSpec] {
        guard config.drives.count <= diskSlots.count else {
            throw MachineError(.invalidConfig, "\(config.drives.count) drives configured; at most \(diskSlots.count) are allowed")
        }
        var specs: [VirtioDeviceSpec] = []
        for (index, drive) in config.drives.enumerated() {
            var loop = mainLoop
            if let name = drive.iothread {
                guard let named = iothreads[name] else {
                    throw MachineError(.invalidConfig, "drive '\(drive.id)': iothread '\(name)' is not defined (-iothread id=\(name))")
                }
                loop = named
            }
            specs.append(VirtioDeviceSpec(slot: diskSlots.lowerBound + index, kind: .block(drive), loop: loop))
        }
        guard config.nets.count <= nicSlots.count else {
            throw MachineError(.invalidConfig, "\(config.nets.count) NICs configured; at most \(nicSlots.count) are allowed")
        }
        for (index, net) in config.nets.enumerated() {
            var loop = mainLoop
            if let name = net.iothread {
                guard let named = iothreads[name] else {
                    throw MachineError(.invalidConfig, "NIC '\(net.id)': iothread '\(name)' is not defined (-iothread id=\(name))")
                }
                loop = named
            }
            specs.append(VirtioDeviceSpec(slot: nicSlots.lowerBound + index, kind: .net(net), loop: loop))
        }
        let optional = optionalSlots(for: config)
        for (console, slot) in zip(config.consoles, optional.consoles) {
            guard let port = consolePorts[console.id] else {
                throw MachineError(.invalidConfig, "console '\(console.id)': no host socket was set up for it")
            }
            specs.append(VirtioDeviceSpec(slot: slot, kind: .console(console, port), loop: mainLoop))
        }
        if let vsock = config.vsock, let slot = optional.vsock {
            specs.append(VirtioDeviceSpec(slot: slot, kind: .vsock(vsock, vsockListener), loop: mainLoop))
        }
        if let balloon = config.balloon, let slot = optional.balloon {
            specs.append(VirtioDeviceSpec(slot: slot, kind: .balloon(balloon), loop: mainLoop))
        }
        if let rng = config.rng, let slot = optional.rng {
            specs.append(VirtioDeviceSpec(slot: slot, kind: .rng(rng), loop: mainLoop))
        }
        return specs
    }
}
