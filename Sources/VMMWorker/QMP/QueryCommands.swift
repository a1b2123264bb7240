import Protocol

/// The query commands StratoVirt answers on a MicroVm (its qmp_schema.rs and machine
/// code), with the reply shapes of QEMU's QMP reference where StratoVirt follows it. Commands
/// StratoVirt only stubs with made-up data (query-qmp-schema, query-command-line-options,
/// qom-list, query-vnc, query-gic-capabilities, ...) are not registered, so they answer
/// QEMU's CommandNotFound rather than something untrue.
enum QueryCommands {
    /// The events this VMM emits, for query-events (QEMU's names; StratoVirt's reply spells
    /// its own enum cases instead).
    static let events = ["BALLOON_CHANGE", "DEVICE_DELETED", "RESUME", "SHUTDOWN", "STOP"]

    /// QEMU's CPU path for vCPU `index`, as StratoVirt reports it.
    static func qomPath(_ index: Int) -> String { "/machine/unattached/device[\(index)]" }

    /// The topology docs/guest-abi.md promises (CPUID leaf 0xB): one package, one core per
    /// vCPU, one thread per core.
    static func props(_ index: Int) -> JSONValue {
        ["socket-id": 0, "die-id": 0, "core-id": .integer(index), "thread-id": 0]
    }

    static func register(in table: inout QMPCommandTable, vm: MicroVM, config: VMConfig, iothreads: [String: EventLoop]) {
        func constant(_ name: String, _ value: JSONValue) {
            table.registerWithoutArguments(name) { .success(value) }
        }
        func query(_ name: String, _ answer: @escaping @Sendable () -> JSONValue) {
            table.registerWithoutArguments(name) { .success(answer()) }
        }

        constant("query-target", ["arch": "x86_64"])
        constant("query-kvm", ["enabled": true, "present": true])
        constant(
            "query-machines",
            [
                [
                    "name": "microvm", "cpu-max": .integer(MPTable.maxVCPUs), "hotpluggable-cpus": false,
                    "numa-mem-supported": false, "deprecated": false, "is-default": true,
                ]
            ])
        constant("query-events", .array(events.map { .object(["name": .string($0)]) }))
        // No migration was ever started: QEMU answers an empty MigrationInfo.
        constant("query-migrate", [:])
        constant("query-migrate-capabilities", [])
        constant("query-tpm-models", [])
        constant("query-tpm-types", [])
        constant("query-block-jobs", [])

        let vcpus = vm.vcpuCount
        // QEMU's pre-6.0 CpuInfo, which StratoVirt answers query-cpus with. `halted` is not
        // tracked (StratoVirt reports false too); `current` is the monitor's CPU, 0.
        query("query-cpus") {
            let threads = vm.vcpuThreadIDs
            return .array(
                (0..<vcpus).map { index in
                    [
                        "CPU": .integer(index), "current": .bool(index == 0), "halted": false,
                        "qom_path": .string(qomPath(index)), "arch": "x86",
                        "thread_id": .integer(Int(threads[index] ?? 0)), "props": props(index),
                    ]
                })
        }
        // QEMU's CpuInfoFast (since 6.0: `target` instead of `arch`); no vCPU is interrupted.
        query("query-cpus-fast") {
            let threads = vm.vcpuThreadIDs
            return .array(
                (0..<vcpus).map { index in
                    [
                        "cpu-index": .integer(index), "qom-path": .string(qomPath(index)),
                        "thread-id": .integer(Int(threads[index] ?? 0)), "props": props(index), "target": "x86_64",
                    ]
                })
        }
        // Every vCPU is present from boot (no CPU hot-plug), so each has its qom-path.
        query("query-hotpluggable-cpus") {
            .array(
                (0..<vcpus).map { index in
                    ["type": "host-x86-cpu", "vcpus-count": 1, "props": props(index), "qom-path": .string(qomPath(index))]
                })
        }
        // IOThreadInfo; these loops do not poll, so the polling parameters are 0.
        let named = iothreads.sorted { $0.key < $1.key }
        query("query-iothreads") {
            .array(
                named.map { name, loop in
                    [
                        "id": .string(name), "thread-id": .integer(Int(loop.threadID ?? 0)), "poll-max-ns": 0,
                        "poll-grow": 0, "poll-shrink": 0, "aio-max-batch": 0,
                    ]
                })
        }
        // ChardevInfo: the serial port (QEMU's label serial0) and each virtio-console chardev.
        // `frontend-open` is whether the guest side is open: always for the UART, DRIVER_OK
        // for a console port.
        let serial = config.serial
        let consoles = config.consoles
        query("query-chardev") {
            var list: [JSONValue] = []
            if let serial {
                let filename = serial.stdio ? "stdio" : serial.socketPath.map { "unix:\($0),server=on" } ?? "null"
                list.append(["label": "serial0", "filename": .string(filename), "frontend-open": true])
            }
            for console in consoles {
                let open = vm.virtioTransports.contains { transport in
                    (transport.device as? VirtioConsoleDevice)?.id == console.id && transport.status & Virtio.Status.driverOK != 0
                }
                list.append(
                    [
                        "label": .string(console.id), "filename": .string("unix:\(console.socketPath),server=on"),
                        "frontend-open": .bool(open),
                    ])
            }
            return .array(list)
        }
    }
}
