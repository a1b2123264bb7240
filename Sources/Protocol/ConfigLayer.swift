/// What one source (the command line or the JSON file) says about a VM, before the two are
/// merged. Values are syntax-checked and range-checked by the source that read them, so its
/// errors can name the option or field exactly as the user wrote it.
struct ConfigLayer: Equatable {
    var name: String?
    var kernel: String?
    var bootArgs: String?
    var initrd: String?
    var vcpus: UInt64?
    var memoryBytes: UInt64?
    var dumpGuestCore: Bool?
    var memShare: Bool?
    var memPath: String?
    var drives: [DriveConfig] = []
    var nets: [NetConfig] = []
    var consoles: [ConsoleConfig] = []
    var iothreads: [IothreadConfig] = []
    var vsock: VsockConfig?
    var serial: SerialConfig?
    var balloon: BalloonConfig?
    var rng: RngConfig?

    /// The merge rule when both are given ("the command line configuration mode is used"):
    /// - single values (name, each boot-source and machine-config field): the command line's
    ///   value wins field by field, so `-m 1G` changes only the memory size of a JSON machine;
    /// - devices with ids (drive, net, console, iothread): a command-line entry replaces the
    ///   JSON entry with the same id in place; other command-line entries are appended;
    /// - single devices (vsock, serial, balloon, rng): a command-line option replaces the
    ///   whole JSON section.
    func overriding(_ base: ConfigLayer) -> ConfigLayer {
        func merge<T>(_ base: [T], _ top: [T], id: (T) -> String) -> [T] {
            // Only entries from `base` are replaced, so that a duplicate id within one source
            // survives to validation and is reported rather than silently collapsed.
            var result = base
            for item in top {
                if let index = base.firstIndex(where: { id($0) == id(item) }) {
                    result[index] = item
                } else {
                    result.append(item)
                }
            }
            return result
        }
        return ConfigLayer(
            name: name ?? base.name,
            kernel: kernel ?? base.kernel,
            bootArgs: bootArgs ?? base.bootArgs,
            initrd: initrd ?? base.initrd,
            vcpus: vcpus ?? base.vcpus,
            memoryBytes: memoryBytes ?? base.memoryBytes,
            dumpGuestCore: dumpGuestCore ?? base.dumpGuestCore,
            memShare: memShare ?? base.memShare,
            memPath: memPath ?? base.memPath,
            drives: merge(base.drives, drives, id: \.id),
            nets: merge(base.nets, nets, id: \.id),
            consoles: merge(base.consoles, consoles, id: \.id),
            iothreads: merge(base.iothreads, iothreads, id: \.id),
            vsock: vsock ?? base.vsock,
            serial: serial ?? base.serial,
            balloon: balloon ?? base.balloon,
            rng: rng ?? base.rng)
    }

    /// The validated configuration; fails when no kernel was given or a rule is broken.
    func build() throws(ConfigError) -> VMConfig {
        guard let kernel else {
            throw ConfigError(
                field: "-kernel / boot-source.kernel_image_path", problem: "a kernel image is required",
                allowed: "a path to an ELF vmlinux or a bzImage")
        }
        let machine = MachineConfig(
            vcpuCount: Int(clamping: vcpus ?? UInt64(MachineConfig.defaultVCPUs)),
            memoryBytes: memoryBytes ?? MachineConfig.defaultMemoryBytes,
            dumpGuestCore: dumpGuestCore ?? true,
            memShare: memShare ?? false,
            memPath: memPath)
        let config = VMConfig(
            name: name,
            boot: BootSource(kernelImagePath: kernel, bootArgs: bootArgs ?? "", initrdPath: initrd),
            machine: machine, drives: drives, nets: nets, consoles: consoles, vsock: vsock,
            serial: serial, iothreads: iothreads, balloon: balloon, rng: rng)
        try config.validate()
        return config
    }
}
