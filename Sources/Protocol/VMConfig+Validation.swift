extension VMConfig {
    /// Each device the VM really creates, with the virtio-mmio slot it takes, in slot order.
    ///
    /// Disk and NIC slots always exist (empty ones wait for hot-plug); consoles, vsock,
    /// balloon and rng follow. See docs/guest-abi.md.
    public var mmioDeviceCount: Int {
        ConfigRules.reservedDiskSlots + ConfigRules.reservedNICSlots + consoles.count
            + (vsock == nil ? 0 : 1) + (balloon == nil ? 0 : 1) + (rng == nil ? 0 : 1)
    }

    /// Checks every documented rule of the reference; throws the first violation.
    public func validate() throws(ConfigError) {
        if let name { try ConfigRules.checkName(name, field: "-name") }
        try ConfigRules.checkPath(boot.kernelImagePath, field: "-kernel / boot-source.kernel_image_path")
        if let initrd = boot.initrdPath {
            try ConfigRules.checkPath(initrd, field: "-initrd / boot-source.initrd_fs_path")
        }
        guard !boot.bootArgs.utf8.contains(0) else {
            throw ConfigError(field: "-append / boot-source.boot_args", problem: "contains a NUL byte")
        }
        guard machine.vcpuCount >= 0 else {
            throw ConfigError(field: "-smp cpus / machine-config.vcpu_count", value: String(machine.vcpuCount), allowed: "1 to 254")
        }
        try ConfigRules.checkVCPUs(UInt64(machine.vcpuCount), field: "-smp cpus / machine-config.vcpu_count")
        try ConfigRules.checkMemory(machine.memoryBytes, field: "-m / machine-config.mem_size")
        if let memPath = machine.memPath {
            try ConfigRules.checkPath(memPath, field: "-mem-path / machine-config.mem_path")
        }

        guard drives.count <= ConfigRules.maxDisks else {
            throw ConfigError(
                field: "-drive / drive", value: String(drives.count), problem: "too many disks",
                allowed: "0 to \(ConfigRules.maxDisks), including hot-plugged disks")
        }
        guard nets.count <= ConfigRules.maxNICs else {
            throw ConfigError(
                field: "-netdev / net", value: String(nets.count), problem: "too many NICs",
                allowed: "0 to \(ConfigRules.maxNICs), including hot-plugged NICs")
        }
        guard mmioDeviceCount <= ConfigRules.maxMMIODevices else {
            let others = mmioDeviceCount - ConfigRules.reservedDiskSlots - ConfigRules.reservedNICSlots
            throw ConfigError(
                field: "virtio-mmio devices", value: String(mmioDeviceCount),
                problem: "too many MMIO devices (4 disk slots + 2 NIC slots + \(others) console/vsock/balloon/rng devices)",
                allowed: "at most \(ConfigRules.maxMMIODevices) on x86_64, so at most 5 consoles, vsock, balloon and rng together")
        }

        guard iothreads.count <= ConfigRules.maxIothreads else {
            throw ConfigError(
                field: "-iothread / iothread", value: String(iothreads.count), problem: "too many iothreads",
                allowed: "0 to \(ConfigRules.maxIothreads)")
        }
        var iothreadIDs: Set<String> = []
        for iothread in iothreads {
            try ConfigRules.checkID(iothread.id, field: "-iothread id / iothread.id")
            guard iothreadIDs.insert(iothread.id).inserted else {
                throw ConfigError(
                    field: "-iothread id / iothread.id", value: iothread.id, problem: "duplicate iothread id", allowed: "unique ids")
            }
        }
        func checkIothread(_ name: String?, field: String) throws(ConfigError) {
            guard let name else { return }
            guard iothreadIDs.contains(name) else {
                let known = iothreadIDs.isEmpty ? "none defined" : iothreads.map(\.id).joined(separator: ", ")
                throw ConfigError(field: field, value: name, problem: "names no configured iothread", allowed: known)
            }
        }

        var deviceIDs: Set<String> = []
        func claim(_ id: String, field: String) throws(ConfigError) {
            try ConfigRules.checkID(id, field: field)
            guard deviceIDs.insert(id).inserted else {
                throw ConfigError(field: field, value: id, problem: "duplicate device id", allowed: "ids unique among all devices")
            }
        }
        for drive in drives {
            try claim(drive.id, field: "-drive id / drive.drive_id")
            try ConfigRules.checkPath(drive.path, field: "-drive file / drive.path_on_host")
            if let iops = drive.iops { try ConfigRules.checkIOPS(iops, field: "-drive iops / drive.iops") }
            try checkIothread(drive.iothread, field: "-drive iothread / drive.iothread")
            if let serial = drive.serial, serial.utf8.count > 20 {
                // virtio 1.2 §5.2.6: VIRTIO_BLK_T_GET_ID returns at most 20 bytes.
                throw ConfigError(
                    field: "-drive serial / drive.serial_num", value: serial, problem: "serial number too long",
                    allowed: "at most 20 bytes (virtio-blk device ID size)")
            }
        }
        for net in nets {
            try claim(net.id, field: "-netdev id / net.iface_id")
            guard !net.hostDeviceName.isEmpty, net.hostDeviceName.utf8.count < 16 else {
                // IFNAMSIZ is 16 including the terminating NUL.
                throw ConfigError(
                    field: "-netdev netdev / net.host_dev_name", value: net.hostDeviceName,
                    problem: "invalid tap device name", allowed: "1 to 15 bytes")
            }
            if let mac = net.mac, mac.isMulticast {
                throw ConfigError(
                    field: "-netdev mac / net.mac", value: mac.description, problem: "multicast MAC address", allowed: "a unicast address")
            }
            try checkIothread(net.iothread, field: "-netdev iothread / net.iothread")
        }
        for console in consoles {
            try claim(console.id, field: "-chardev id / console.console_id")
            try ConfigRules.checkSocketPath(console.socketPath, field: "-chardev path / console.socket_path")
        }
        if let vsock {
            try claim(vsock.id, field: "-device vsock id / vsock.vsock_id")
            try ConfigRules.checkCID(vsock.guestCID, field: "-device vsock guest-cid / vsock.guest_cid")
            if let path = vsock.udsPath { try ConfigRules.checkVsockUdsPath(path, field: "-device vsock uds-path / vsock.uds_path") }
        }
        if let rng {
            try ConfigRules.checkPath(rng.randomFile, field: "-rng random_file / rng.random_file")
            if let rate = rng.bytesPerSecond { try ConfigRules.checkRngRate(rate, field: "-rng bytes_per_sec / rng.bytes_per_sec") }
        }
        if balloon != nil, let memPath = machine.memPath {
            throw ConfigError(
                field: "-mem-path / machine-config.mem_path", value: memPath,
                problem: "the balloon cannot reclaim file-backed (huge page) memory, so -balloon cannot be combined with it",
                allowed: "either -balloon or -mem-path, not both")
        }
    }
}

extension RuntimeOptions {
    /// Rules that involve the process options, alone or together with the VM.
    public func validate(for config: VMConfig) throws(ConfigError) {
        if let pidfile {
            try ConfigRules.checkPath(pidfile, field: "-pidfile")
            guard daemonize else {
                throw ConfigError(field: "-pidfile", value: pidfile, problem: "is only allowed together with -daemonize")
            }
        }
        if let apiChannelPath { try ConfigRules.checkSocketPath(apiChannelPath, field: "-api-channel") }
        if let logFile { try ConfigRules.checkPath(logFile, field: "-D") }
        if daemonize, config.serial?.stdio == true {
            throw ConfigError(
                field: "-serial", value: "stdio", problem: "a daemon has no stdio, so -daemonize cannot be combined with it",
                allowed: "-daemonize without -serial stdio")
        }
    }
}

extension ConfigRules {
    /// `sockaddr_un.sun_path` holds 108 bytes including the terminating NUL.
    public static let maxSocketPathBytes = 107

    /// A guest connection to host port P is connected to `<uds-path>_P`: "_" and up to 10
    /// digits more must still fit sun_path.
    public static let maxVsockUdsPathBytes = maxSocketPathBytes - 11

    static func checkVsockUdsPath(_ path: String, field: String) throws(ConfigError) {
        try checkSocketPath(path, field: field)
        guard path.utf8.count <= maxVsockUdsPathBytes else {
            throw ConfigError(
                field: field, value: path,
                problem:
                    "socket path too long (\(path.utf8.count) bytes): guest connections to port P use PATH_P, up to 11 bytes longer, which must fit sockaddr_un (\(maxSocketPathBytes) bytes)",
                allowed: "at most \(maxVsockUdsPathBytes) bytes")
        }
    }

    static func checkSocketPath(_ path: String, field: String) throws(ConfigError) {
        try checkPath(path, field: field)
        guard path.utf8.count <= maxSocketPathBytes else {
            throw ConfigError(
                field: field, value: path, problem: "socket path too long (\(path.utf8.count) bytes)",
                allowed: "at most \(maxSocketPathBytes) bytes (sockaddr_un)")
        }
    }
}
