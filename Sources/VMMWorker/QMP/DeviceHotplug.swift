import Protocol
import Synchronization

/// Hot-plug on the MicroVm (StratoVirt docs/qmp.md "Hot plug management", QEMU's
/// blockdev-add / netdev_add / device_add / device_del / blockdev-del / netdev_del): block
/// nodes (open, locked images) and the virtio-blk devices in disk slots 0–3 that use them;
/// netdevs (taps) and the virtio-net devices in NIC slots 4–5 that use them (NetHotplug.swift).
/// Both kinds share the device registry (one id space), slot allocation and device_del.
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
final class DeviceHotplug: Sendable {
    /// At most this many nodes exist at once (each holds an open, locked image).
    static let maximumNodes = 8

    struct Node {
        let backend: BlockBackend
        let drive: DriveConfig
        /// Created by blockdev-add (QEMU: "owned by the monitor"), not by -drive.
        let monitorOwned: Bool
        var device: String?
    }

    /// A tap a NIC attaches to: by name (checked to exist; the NIC's device opens it on
    /// device_add and closes it on device_del, so an unplugged NIC holds nothing), or a
    /// descriptor passed with getfd (netdev_add fd=), held here until netdev_del.
    struct Netdev {
        let ifname: String
        /// The descriptor netdev_add fd= took; nil for a tap named by `ifname`.
        let tap: Tap?
        /// Created by netdev_add, not by -netdev.
        let monitorOwned: Bool
        var device: String?
    }

    struct Device {
        enum Kind {
            case disk(node: String, serial: String?)
            case nic(netdev: String)
        }
        let id: String
        let slot: Int
        let kind: Kind

        var node: String? {
            if case .disk(let node, _) = kind { return node }
            return nil
        }
    }

    struct State {
        /// In creation order, for the query replies.
        var nodes: [(name: String, node: Node)] = []
        var netdevs: [(name: String, netdev: Netdev)] = []
        var devices: [Device] = []

        func nodeIndex(_ name: String) -> Int? { nodes.firstIndex { $0.name == name } }
        func netdevIndex(_ name: String) -> Int? { netdevs.firstIndex { $0.name == name } }

        /// The slot asked for, or the first free one of `slots`.
        func slot(asked: Int?, in slots: Range<Int>, kind: String) throws(QMPCommandError) -> Int {
            let used = Set(devices.map(\.slot))
            if let asked {
                guard !used.contains(asked) else {
                    throw QMPCommandError(.genericError, "The slot \(asked - slots.lowerBound) is occupied already.")
                }
                return asked
            }
            guard let free = slots.first(where: { !used.contains($0) }) else {
                // StratoVirt's words, and what to do about it.
                throw QMPCommandError(
                    .genericError,
                    "A maximum of \(slots.count) \(kind) replaceable devices are supported: every \(kind == "block" ? "disk" : "NIC") slot is in use (device_del one first)"
                )
            }
            return free
        }
    }

    let vm: MicroVM
    let mainLoop: EventLoop
    let iothreads: [String: EventLoop]
    /// Looks taps up after start-up (nil: NIC hot-plug is unavailable, see ``init``).
    let interfaces: NetInterfaces?
    /// Ids of the VM's other devices (consoles, vsock), which a hot-plugged one may not take.
    let otherDeviceIDs: Set<String>
    /// The registry. Not private: NetHotplug.swift's extension works on it too.
    let state = Mutex(State())

    /// Registers the disks `-drive` put in the disk slots as nodes and devices, and the NICs
    /// `-netdev` put in the NIC slots as netdevs and devices.
    init(vm: MicroVM, config: VMConfig, mainLoop: EventLoop, iothreads: [String: EventLoop], interfaces: NetInterfaces?) {
        self.vm = vm
        self.mainLoop = mainLoop
        self.iothreads = iothreads
        self.interfaces = interfaces
        var others = Set(config.consoles.map(\.id))
        if let vsock = config.vsock { others.insert(vsock.id) }
        otherDeviceIDs = others
        var initial = State()
        for slot in VirtioPlan.diskSlots {
            guard let device = vm.replaceableSlots[slot].transport?.device as? VirtioBlockDevice,
                let drive = config.drives.first(where: { $0.id == device.backend.id })
            else { continue }
            initial.nodes.append((drive.id, Node(backend: device.backend, drive: drive, monitorOwned: false, device: drive.id)))
            initial.devices.append(Device(id: drive.id, slot: slot, kind: .disk(node: drive.id, serial: drive.serial)))
        }
        for slot in VirtioPlan.nicSlots {
            guard let device = vm.replaceableSlots[slot].transport?.device as? VirtioNetDevice else { continue }
            initial.netdevs.append((device.id, Netdev(ifname: device.tapName, tap: nil, monitorOwned: false, device: device.id)))
            initial.devices.append(Device(id: device.id, slot: slot, kind: .nic(netdev: device.id)))
        }
        state.withLock { $0 = initial }
    }

    /// The event loop named `iothread`, or the main loop.
    func loop(iothread name: String?) throws(QMPCommandError) -> EventLoop {
        guard let name else { return mainLoop }
        guard let named = iothreads[name] else {
            let known = iothreads.keys.sorted().joined(separator: ", ")
            throw QMPCommandError(
                .genericError, "iothread '\(name)' names no configured iothread; allowed: \(known.isEmpty ? "none defined" : known)")
        }
        return named
    }

    /// Refuses an id that a device has already.
    func checkNewDevice(_ id: String, in state: State) throws(QMPCommandError) {
        guard !state.devices.contains(where: { $0.id == id }), !otherDeviceIDs.contains(id) else {
            throw QMPCommandError(.genericError, "Duplicate ID '\(id)' for device")
        }
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
            try checkNewDevice(request.id, in: state)
            guard let index = state.nodeIndex(request.node) else {
                throw QMPCommandError(.genericError, "Property 'virtio-blk-device.drive' can't find value '\(request.node)'")
            }
            let node = state.nodes[index].node
            if let user = node.device {
                throw QMPCommandError(.genericError, "Drive '\(request.node)' is already in use by device '\(user)'")
            }
            let slot = try state.slot(
                asked: request.slot.map { VirtioPlan.diskSlots.lowerBound + $0 }, in: VirtioPlan.diskSlots, kind: "block")
            let loop = try loop(iothread: request.iothread)
            let device = VirtioBlockDevice(
                backend: node.backend, memory: vm.memory, loop: loop, iops: node.drive.iops ?? 0, serial: request.serial)
            do {
                _ = try vm.plug(device, slot: slot)
            } catch {
                throw QMPCommandError(.genericError, "cannot plug device '\(request.id)' into disk slot \(slot): \(error)")
            }
            state.nodes[index].node.device = request.id
            state.devices.append(Device(id: request.id, slot: slot, kind: .disk(node: request.node, serial: request.serial)))
        }
    }

    /// Unplugs device `id` (a disk or a NIC); false when no device has that id. A NIC's tap
    /// is closed here: the device held the only descriptor, and the transport, the last
    /// reference to the device, is released once unplugged.
    func deviceDel(_ id: String) -> Bool {
        state.withLock { state in
            guard let index = state.devices.firstIndex(where: { $0.id == id }) else { return false }
            let device = state.devices.remove(at: index)
            vm.unplug(slot: device.slot)
            switch device.kind {
            case .disk(let node, _):
                if let nodeIndex = state.nodeIndex(node) {
                    if state.nodes[nodeIndex].node.monitorOwned {
                        state.nodes[nodeIndex].node.device = nil
                    } else {
                        state.nodes.remove(at: nodeIndex)  // -drive's backend goes with its device
                    }
                }
            case .nic(let netdev):
                if let netdevIndex = state.netdevIndex(netdev) {
                    if state.netdevs[netdevIndex].netdev.monitorOwned {
                        state.netdevs[netdevIndex].netdev.device = nil
                    } else {
                        state.netdevs.remove(at: netdevIndex)  // -netdev's backend goes with its device
                    }
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
                state.devices.sorted { $0.slot < $1.slot }.compactMap { device -> JSONValue? in
                    guard let name = device.node else { return nil }
                    let node = state.nodeIndex(name).map { state.nodes[$0] }
                    var info: JSONObject = [
                        "device": .string(node?.node.monitorOwned == false ? name : ""), "qdev": .string(device.id),
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

/// The QMP commands over ``DeviceHotplug``.
enum HotplugCommands {
    static func failure(_ error: QMPArgumentError) -> Result<JSONValue, QMPCommandError> {
        .failure(QMPCommandError(.genericError, error.description))
    }

    /// Registers `name`: `parse` reads the arguments (a refusal is a GenericError in its words),
    /// `act` carries the request out, and success replies `{}`.
    static func register<Request>(
        _ name: String, in table: inout QMPCommandTable,
        parse: @escaping @Sendable (JSONObject) throws(QMPArgumentError) -> Request,
        act: @escaping @Sendable (Request) throws(QMPCommandError) -> Void
    ) {
        table.register(name) { arguments in
            let request: Request
            do throws(QMPArgumentError) {
                request = try parse(arguments)
            } catch {
                return Self.failure(error)
            }
            do throws(QMPCommandError) {
                try act(request)
            } catch {
                return .failure(error)
            }
            return .success([:])
        }
    }

    static func register(in table: inout QMPCommandTable, hotplug: DeviceHotplug, events: QMPEventSink) {
        register("blockdev-add", in: &table, parse: QMPHotplug.blockdevAdd) { drive throws(QMPCommandError) in
            try hotplug.blockdevAdd(drive)
        }
        register(
            "device_add", in: &table,
            parse: { arguments throws(QMPArgumentError) in
                try QMPHotplug.deviceAdd(arguments, diskSlots: VirtioPlan.diskSlots.count, nicSlots: VirtioPlan.nicSlots.count)
            }
        ) { request throws(QMPCommandError) in
            switch request {
            case .net(let device): try hotplug.deviceAdd(device)
            case .block(let device): try hotplug.deviceAdd(device)
            }
        }
        // StratoVirt emits DEVICE_DELETED (device and path = the id) before device_del's
        // reply: the slot is empty by then. (QEMU waits for the guest to acknowledge; a
        // virtio-mmio slot has no way to ask the guest.)
        register("device_del", in: &table, parse: { arguments throws(QMPArgumentError) in try QMPHotplug.name(arguments, key: "id") }) {
            id throws(QMPCommandError) in
            guard hotplug.deviceDel(id) else { throw QMPCommandError(.deviceNotFound, "Device '\(id)' not found") }
            events.emit("DEVICE_DELETED", data: ["device": .string(id), "path": .string(id)])
        }
        register(
            "blockdev-del", in: &table,
            parse: { arguments throws(QMPArgumentError) in try QMPHotplug.name(arguments, key: "node-name") }
        ) { name throws(QMPCommandError) in try hotplug.blockdevDel(name) }
        registerNet(in: &table, hotplug: hotplug)
        table.registerWithoutArguments("query-block") { .success(hotplug.queryBlock()) }
        table.registerWithoutArguments("query-named-block-nodes") { .success(hotplug.queryNamedBlockNodes()) }
    }
}
