import Protocol
import Synchronization

/// NIC hot-plug on the MicroVm, on ``DeviceHotplug``'s registry (StratoVirt docs/qmp.md "Net
/// device backend management", "Hot plug management"):
///
/// - netdev_add records a tap by name after checking that it exists (the error `-netdev`
///   gives at start-up for a missing one). Nothing is opened yet.
/// - device_add attaches a virtio-net device to the netdev's tap exactly as `-netdev` does
///   (``VirtioNetDevice``: TUNSETIFF, TUNSETVNETHDRSZ, TUNSETOFFLOAD) and plugs it into the NIC
///   slot asked for (`addr` 0x0–0x1) or the first free one: a MicroVm has 2 NICs at most,
///   cold- and hot-plugged together (StratoVirt's limit).
/// - device_del (shared with disks) unplugs it; the device, and with it the tap descriptor,
///   goes, so the tap can be attached again. A `-netdev` netdev goes with its device.
/// - netdev_del forgets a netdev; refused while a NIC uses it.
extension DeviceHotplug {
    /// At most this many netdevs exist at once (they hold nothing, but are kept few).
    static let maximumNetdevs = 8

    func netdevAdd(_ request: QMPHotplug.Netdev) throws(QMPCommandError) {
        try state.withLock { state throws(QMPCommandError) in
            guard state.netdevIndex(request.id) == nil else {
                throw QMPCommandError(.genericError, "Duplicate ID '\(request.id)' for netdev")
            }
            guard state.netdevs.count < Self.maximumNetdevs else {
                throw QMPCommandError(
                    .genericError,
                    "netdev '\(request.id)': \(Self.maximumNetdevs) netdevs exist, the most allowed; remove one with netdev_del")
            }
            guard let interfaces else {
                throw QMPCommandError(.genericError, "netdev '\(request.id)': NIC hot-plug is unavailable (no interface look-up socket)")
            }
            guard interfaces.exists(request.ifname) else {
                throw QMPCommandError(.genericError, VirtioPlan.missingTapError(id: request.id, tap: request.ifname).description)
            }
            state.netdevs.append((request.id, Netdev(ifname: request.ifname, monitorOwned: true, device: nil)))
        }
    }

    func deviceAdd(_ request: QMPHotplug.NetDevice) throws(QMPCommandError) {
        try state.withLock { state throws(QMPCommandError) in
            try checkNewDevice(request.id, in: state)
            guard let index = state.netdevIndex(request.netdev) else {
                throw QMPCommandError(.genericError, "Property 'virtio-net-device.netdev' can't find value '\(request.netdev)'")
            }
            let netdev = state.netdevs[index].netdev
            if netdev.device != nil {
                throw QMPCommandError(
                    .genericError, "Property 'virtio-net-device.netdev' can't take value '\(request.netdev)', it's in use")
            }
            let slot = try state.slot(
                asked: request.slot.map { VirtioPlan.nicSlots.lowerBound + $0 }, in: VirtioPlan.nicSlots, kind: "net")
            let loop = try loop(iothread: request.iothread)
            let device: VirtioNetDevice
            do throws(DeviceError) {
                // The device id names the NIC (its default MAC derives from it, as for -netdev).
                device = try VirtioNetDevice(
                    net: NetConfig(id: request.id, hostDeviceName: netdev.ifname, mac: request.mac, iothread: request.iothread),
                    memory: vm.memory, loop: loop, interfaces: interfaces)
            } catch {
                // The message -netdev gives at start-up for the same tap.
                throw QMPCommandError(.genericError, error.description)
            }
            do {
                _ = try vm.plug(device, slot: slot)
            } catch {
                throw QMPCommandError(.genericError, "cannot plug device '\(request.id)' into NIC slot \(slot): \(error)")
            }
            state.netdevs[index].netdev.device = request.id
            state.devices.append(Device(id: request.id, slot: slot, kind: .nic(netdev: request.netdev)))
        }
    }

    func netdevDel(_ id: String) throws(QMPCommandError) {
        try state.withLock { state throws(QMPCommandError) in
            guard let index = state.netdevIndex(id) else { throw QMPCommandError(.deviceNotFound, "Device '\(id)' not found") }
            if let user = state.netdevs[index].netdev.device {
                throw QMPCommandError(.genericError, "Netdev '\(id)' is in use by device '\(user)'; device_del it first")
            }
            state.netdevs.remove(at: index)
        }
    }
}

extension HotplugCommands {
    static func registerNet(in table: inout QMPCommandTable, hotplug: DeviceHotplug) {
        register("netdev_add", in: &table, parse: QMPHotplug.netdevAdd) { netdev throws(QMPCommandError) in
            try hotplug.netdevAdd(netdev)
        }
        register("netdev_del", in: &table, parse: { arguments throws(QMPArgumentError) in try QMPHotplug.name(arguments, key: "id") }) {
            id throws(QMPCommandError) in try hotplug.netdevDel(id)
        }
    }
}
