import Protocol

/// A device for one virtio-mmio slot, and the event loop that will process its queues.
public struct VirtioDeviceSpec: Sendable {
    public enum Kind: Sendable {
        case block(DriveConfig)
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
        }
    }
}

/// The fixed virtio-mmio layout (docs/guest-abi.md "Virtio-mmio slots"): slots 0–3 disks,
/// 4–5 NICs, always announced (empty ones for hot-plug), then the optional devices.
public enum VirtioPlan {
    public static let diskSlots = 0..<4
    public static let nicSlots = 4..<6

    /// The slots announced on the kernel command line.
    public static func slots(for config: VMConfig) -> [VirtioMMIOSlot] {
        (0..<nicSlots.upperBound).map { VirtioMMIOSlot(slot: $0) }
    }

    /// One spec per configured device; each runs on its `iothread` loop, else on `mainLoop`.
    public static func devices(for config: VMConfig, mainLoop: EventLoop, iothreads: [String: EventLoop]) throws -> [VirtioDeviceSpec] {
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
        return specs
    }
}
