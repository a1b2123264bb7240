import Protocol
import Synchronization

/// Disk hot-plug on the MicroVm (StratoVirt docs/qmp.md "Hot plug management", QEMU's
/// blockdev-add / device_add / device_del / blockdev-del): block nodes (open, locked images)
/// and the virtio-blk devices in disk slots 0–3 that use them.
///
/// - blockdev-add opens and locks the image exactly as `-drive` does (BlockBackend, the same
///   errors); the node waits, unused, for a device.
/// - device_add builds a virtio-blk device on a node and plugs it into the slot asked for
///   (`addr`) or the first free disk slot; the guest finds it when it looks at the slot again.
/// - device_del unplugs it (the slot reads empty again) and emits DEVICE_DELETED. A node that
///   `-drive` created goes with its device, as QEMU deletes a -drive's backend on unplug; a
///   node from blockdev-add stays until blockdev-del.
/// - blockdev-del closes the image (releasing its lock); refused while a device uses it.
///
/// Sendable: the registry is behind a Mutex; commands run one at a time on the main loop.
final class BlockHotplug: Sendable {
    /// At most this many nodes exist at once (each holds an open, locked image).
    static let maximumNodes = 8

    struct Node {
        let backend: BlockBackend
        let drive: DriveConfig
        /// Created by blockdev-add (QEMU: "owned by the monitor"), not by -drive.
        let monitorOwned: Bool
        var device: String?
    }

    struct Device {
        let id: String
        let node: String
        let slot: Int
        let serial: String?
    }

    struct State {
        /// In creation order, for the query replies.
        var nodes: [(name: String, node: Node)] = []
        var devices: [Device] = []

        func nodeIndex(_ name: String) -> Int? { nodes.firstIndex { $0.name == name } }
    }

    let vm: MicroVM
    let mainLoop: EventLoop
    let iothreads: [String: EventLoop]
    /// Ids of the VM's other devices (consoles, NICs, vsock), which a disk may not take.
    let otherDeviceIDs: Set<String>
    private let state = Mutex(State())

    /// Registers the disks `-drive` put in the disk slots as nodes and devices.
    init(vm: MicroVM, config: VMConfig, mainLoop: EventLoop, iothreads: [String: EventLoop]) {
        self.vm = vm
        self.mainLoop = mainLoop
        self.iothreads = iothreads
        var others = Set(config.consoles.map(\.id)).union(config.nets.map(\.id))
        if let vsock = config.vsock { others.insert(vsock.id) }
        otherDeviceIDs = others
        var initial = State()
        for slot in VirtioPlan.diskSlots {
            guard let device = vm.replaceableSlots[slot].transport?.device as? VirtioBlockDevice,
                let drive = config.drives.first(where: { $0.id == device.backend.id })
            else { continue }
            initial.nodes.append((drive.id, Node(backend: device.backend, drive: drive, monitorOwned: false, device: drive.id)))
            initial.devices.append(Device(id: drive.id, node: drive.id, slot: slot, serial: drive.serial))
        }
        state.withLock { $0 = initial }
    }

    func blockdevAdd(_ drive: DriveConfig) throws(QMPCommandError) {
        try state.withLock { state throws(QMPCommandError) in
            guard state.nodeIndex(drive.id) == nil else {
                throw QMPCommandError(.genericError, "Duplicate nodes with node-name='\(drive.id)'")
            }
            guard state.nodes.count < Self.maximumNodes else {
                throw QMPCommandError(
                    .genericError,
                    "node-name='\(drive.id)': \(Self.maximumNodes) block nodes exist, the most allowed; remove one with blockdev-del")
            }
            let backend: BlockBackend
            do {
                backend = try BlockBackend(drive: drive)
            } catch {
                // The message -drive gives at start-up for the same image.
                throw QMPCommandError(.genericError, "\(error)")
            }
            state.nodes.append((drive.id, Node(backend: backend, drive: drive, monitorOwned: true, device: nil)))
        }
    }

    func deviceAdd(_ request: QMPHotplug.BlockDevice) throws(QMPCommandError) {
        try state.withLock { state throws(QMPCommandError) in
            guard !state.devices.contains(where: { $0.id == request.id }), !otherDeviceIDs.contains(request.id) else {
                throw QMPCommandError(.genericError, "Duplicate ID '\(request.id)' for device")
            }
            guard let index = state.nodeIndex(request.node) else {
                throw QMPCommandError(.genericError, "Property 'virtio-blk-device.drive' can't find value '\(request.node)'")
            }
            let node = state.nodes[index].node
            if let user = node.device {
                throw QMPCommandError(.genericError, "Drive '\(request.node)' is already in use by device '\(user)'")
            }
            let used = Set(state.devices.map(\.slot))
            let slot: Int
            if let asked = request.slot {
                guard !used.contains(asked) else { throw QMPCommandError(.genericError, "The slot \(asked) is occupied already.") }
                slot = asked
            } else {
                guard let free = VirtioPlan.diskSlots.first(where: { !used.contains($0) }) else {
                    throw QMPCommandError(
                        .genericError,
                        "A maximum of \(VirtioPlan.diskSlots.count) block replaceable devices are supported: every disk slot is in use (device_del one first)"
                    )
                }
                slot = free
            }
            var loop = mainLoop
            if let name = request.iothread {
                guard let named = iothreads[name] else {
                    let known = iothreads.keys.sorted().joined(separator: ", ")
                    throw QMPCommandError(
                        .genericError, "iothread '\(name)' names no configured iothread; allowed: \(known.isEmpty ? "none defined" : known)"
                    )
                }
                loop = named
            }
            let device = VirtioBlockDevice(
                backend: node.backend, memory: vm.memory, loop: loop, iops: node.drive.iops ?? 0, serial: request.serial)
            do {
                _ = try vm.plug(device, slot: slot)
            } catch {
                throw QMPCommandError(.genericError, "cannot plug device '\(request.id)' into disk slot \(slot): \(error)")
            }
            state.nodes[index].node.device = request.id
            state.devices.append(Device(id: request.id, node: request.node, slot: slot, serial: request.serial))
        }
    }

    /// Unplugs disk `id`; false when no disk has that id.
    func deviceDel(_ id: String) -> Bool {
        state.withLock { state in
            guard let index = state.devices.firstIndex(where: { $0.id == id }) else { return false }
            let device = state.devices.remove(at: index)
            vm.unplug(slot: device.slot)
            if let nodeIndex = state.nodeIndex(device.node) {
                if state.nodes[nodeIndex].node.monitorOwned {
                    state.nodes[nodeIndex].node.device = nil
                } else {
                    state.nodes.remove(at: nodeIndex)  // -drive's backend goes with its device
                }
            }
            return true
        }
    }

    func blockdevDel(_ name: String) throws(QMPCommandError) {
        try state.withLock { state throws(QMPCommandError) in
            guard let index = state.nodeIndex(name) else {
                throw QMPCommandError(.genericError, "Failed to find node with node-name='\(name)'")
            }
            let node = state.nodes[index].node
            if let user = node.device {
                throw QMPCommandError(.genericError, "Node \(name) is in use by device '\(user)'; device_del it first")
            }
            guard node.monitorOwned else { throw QMPCommandError(.genericError, "Node \(name) is not owned by the monitor") }
            // The last reference to the backend: its descriptor closes and the lock goes.
            state.nodes.remove(at: index)
        }
    }

    /// QEMU's BlockDeviceInfo for a node.
    static func nodeInfo(name: String, node: Node) -> JSONValue {
        let drive = node.drive
        let size = JSONValue.integer(node.backend.sizeBytes)
        return [
            "node-name": .string(name), "file": .string(drive.path), "ro": .bool(drive.readOnly), "drv": "raw",
            "backing_file_depth": 0, "encrypted": false, "detect_zeroes": "off", "bps": 0, "bps_rd": 0, "bps_wr": 0,
            "iops": .integer(drive.iops ?? 0), "iops_rd": 0, "iops_wr": 0, "write_threshold": 0,
            "cache": ["writeback": true, "direct": .bool(drive.direct), "no-flush": false],
            "image": ["filename": .string(drive.path), "format": "raw", "virtual-size": size],
        ]
    }

    /// query-block: QEMU's BlockInfo per disk device, in slot order. `device` is the -drive
    /// id for a -drive disk and empty for one on a blockdev-add node (as QEMU has it); `qdev`
    /// is the device id.
    func queryBlock() -> JSONValue {
        state.withLock { state in
            .array(
                state.devices.sorted { $0.slot < $1.slot }.map { device in
                    let node = state.nodeIndex(device.node).map { state.nodes[$0] }
                    var info: JSONObject = [
                        "device": .string(node?.node.monitorOwned == false ? device.node : ""), "qdev": .string(device.id),
                        "type": "unknown", "removable": false, "locked": false,
                    ]
                    if let node { info["inserted"] = Self.nodeInfo(name: node.name, node: node.node) }
                    return .object(info)
                })
        }
    }

    /// query-named-block-nodes: every node, attached or not.
    func queryNamedBlockNodes() -> JSONValue {
        state.withLock { state in .array(state.nodes.map { Self.nodeInfo(name: $0.name, node: $0.node) }) }
    }
}

/// The QMP commands over ``BlockHotplug``.
enum HotplugCommands {
    static func failure(_ error: QMPArgumentError) -> Result<JSONValue, QMPCommandError> {
        .failure(QMPCommandError(.genericError, error.description))
    }

    static func register(in table: inout QMPCommandTable, hotplug: BlockHotplug, events: QMPEventSink) {
        table.register("blockdev-add") { arguments in
            let drive: DriveConfig
            do throws(QMPArgumentError) {
                drive = try QMPHotplug.blockdevAdd(arguments)
            } catch {
                return Self.failure(error)
            }
            do throws(QMPCommandError) {
                try hotplug.blockdevAdd(drive)
            } catch {
                return .failure(error)
            }
            return .success([:])
        }
        table.register("device_add") { arguments in
            let request: QMPHotplug.DeviceAdd
            do throws(QMPArgumentError) {
                request = try QMPHotplug.deviceAdd(arguments, diskSlots: VirtioPlan.diskSlots.count)
            } catch {
                return Self.failure(error)
            }
            switch request {
            case .net(let id):
                return .failure(
                    QMPCommandError(
                        .genericError,
                        "device '\(id)': virtio-net hot-plug is not implemented yet (NICs are configured with -netdev at start)"))
            case .block(let device):
                do throws(QMPCommandError) {
                    try hotplug.deviceAdd(device)
                } catch {
                    return .failure(error)
                }
                return .success([:])
            }
        }
        // StratoVirt emits DEVICE_DELETED (device and path = the id) before device_del's
        // reply: the slot is empty by then. (QEMU waits for the guest to acknowledge; a
        // virtio-mmio slot has no way to ask the guest.)
        table.register("device_del") { arguments in
            let id: String
            do throws(QMPArgumentError) {
                id = try QMPHotplug.name(arguments, key: "id")
            } catch {
                return Self.failure(error)
            }
            guard hotplug.deviceDel(id) else { return .failure(QMPCommandError(.deviceNotFound, "Device '\(id)' not found")) }
            events.emit("DEVICE_DELETED", data: ["device": .string(id), "path": .string(id)])
            return .success([:])
        }
        table.register("blockdev-del") { arguments in
            let name: String
            do throws(QMPArgumentError) {
                name = try QMPHotplug.name(arguments, key: "node-name")
            } catch {
                return Self.failure(error)
            }
            do throws(QMPCommandError) {
                try hotplug.blockdevDel(name)
            } catch {
                return .failure(error)
            }
            return .success([:])
        }
        table.registerWithoutArguments("query-block") { .success(hotplug.queryBlock()) }
        table.registerWithoutArguments("query-named-block-nodes") { .success(hotplug.queryNamedBlockNodes()) }
    }
}
