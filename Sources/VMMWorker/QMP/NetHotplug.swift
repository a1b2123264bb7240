import Glibc
import Protocol
import Synchronization

/// NIC hot-plug on the MicroVm, on ``DeviceHotplug``'s registry (StratoVirt docs/qmp.md "Net
/// device backend management", "Hot plug management"):
///
/// - netdev_add `ifname=` records a tap by name after checking that it exists (the error
///   `-netdev` gives at start-up for a missing one). Nothing is opened yet.
/// - netdev_add `fd=NAME` (QEMU's spelling, for a manager that opens the tap itself: libvirt
///   and unprivileged stacks) takes the descriptor the client passed as NAME with getfd out of
///   its connection (QEMU's monitor_fd_param: it is the netdev's now, and closed if refused),
///   checks that it is a tap attached with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (TUNGETIFF) and
///   sets it up as ``Tap`` does for a tap opened by name. The netdev holds it until netdev_del
///   (as QEMU's tap netdev does), so a NIC on it can be unplugged and plugged again.
/// - device_add attaches a virtio-net device to the netdev's tap exactly as `-netdev` does
///   (``VirtioNetDevice``: by name, TUNSETIFF then ``Tap``'s set-up; or the netdev's descriptor)
///   and plugs it into the NIC slot asked for (`addr` 0x0–0x1) or the first free one: a
///   MicroVm has 2 NICs at most, cold- and hot-plugged together (StratoVirt's limit).
/// - device_del (shared with disks) unplugs it; the device goes, and with it a tap it opened
///   by name, so the tap can be attached again. A `-netdev` netdev goes with its device.
/// - netdev_del forgets a netdev, closing a descriptor it holds; refused while a NIC uses it.
extension DeviceHotplug {
    /// At most this many netdevs exist at once (they hold nothing, but are kept few).
    static let maximumNetdevs = 8

    func netdevAdd(_ request: QMPHotplug.Netdev, descriptors: QMPNamedDescriptors) throws(QMPCommandError) {
        try state.withLock { state throws(QMPCommandError) in
            guard state.netdevIndex(request.id) == nil else {
                throw QMPCommandError(.genericError, "Duplicate ID '\(request.id)' for netdev")
            }
            guard state.netdevs.count < Self.maximumNetdevs else {
                throw QMPCommandError(
                    .genericError,
                    "netdev '\(request.id)': \(Self.maximumNetdevs) netdevs exist, the most allowed; remove one with netdev_del")
            }
            switch request.source {
            case .ifname(let ifname):
                guard let interfaces else {
                    throw QMPCommandError(
                        .genericError, "netdev '\(request.id)': NIC hot-plug is unavailable (no interface look-up socket)")
                }
                guard interfaces.exists(ifname) else {
                    throw QMPCommandError(.genericError, VirtioPlan.missingTapError(id: request.id, tap: ifname).description)
                }
                state.netdevs.append((request.id, Netdev(ifname: ifname, tap: nil, monitorOwned: true, device: nil)))
            case .descriptor(let name):
                let tap = try Self.adoptTap(named: name, from: descriptors, netdev: request.id)
                state.netdevs.append((request.id, Netdev(ifname: tap.name, tap: tap, monitorOwned: true, device: nil)))
            }
        }
    }

    /// The tap passed as `name` with getfd, taken from the connection and set up; refused in
    /// QEMU's words where QEMU has them (monitor_get_fd, tap_probe_vnet_hdr).
    static func adoptTap(named name: String, from descriptors: QMPNamedDescriptors, netdev: String) throws(QMPCommandError) -> Tap {
        guard let fd = descriptors.take(name) else {
            throw QMPCommandError(.genericError, "File descriptor named '\(name)' has not been found")
        }
        do {
            return try Tap(adopting: fd)
        } catch {
            switch error.kind {
            case .call(step: "TUNGETIFF", let code):
                throw QMPCommandError(.genericError, "Unable to query TUNGETIFF on FD \(fd): \(String(cString: strerror(code)))")
            case .call, .flags:
                throw QMPCommandError(.genericError, "netdev '\(netdev)': file descriptor '\(name)': \(error)")
            }
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
            if let tap = netdev.tap {
                // The descriptor netdev_add took; the netdev keeps it after device_del.
                device = VirtioNetDevice(
                    id: request.id, tap: tap, mac: request.mac ?? VirtioNetDevice.defaultMAC(id: request.id, tap: tap.name),
                    memory: vm.memory, loop: loop)
            } else {
                do throws(DeviceError) {
                    // The device id names the NIC (its default MAC derives from it, as for -netdev).
                    device = try VirtioNetDevice(
                        net: NetConfig(id: request.id, hostDeviceName: netdev.ifname, mac: request.mac, iothread: request.iothread),
                        memory: vm.memory, loop: loop, interfaces: interfaces)
                } catch {
                    // The message -netdev gives at start-up for the same tap.
                    throw QMPCommandError(.genericError, error.description)
                }
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
        // netdev_add fd= takes a descriptor the connection holds (getfd).
        table.register("netdev_add") { arguments, descriptors in
            do throws(QMPCommandError) {
                let netdev: QMPHotplug.Netdev
                do throws(QMPArgumentError) {
                    netdev = try QMPHotplug.netdevAdd(arguments)
                } catch {
                    throw QMPCommandError(.genericError, error.description)
                }
                try hotplug.netdevAdd(netdev, descriptors: descriptors)
            } catch {
                return .failure(error)
            }
            return .success([:])
        }
        register("netdev_del", in: &table, parse: { arguments throws(QMPArgumentError) in try QMPHotplug.name(arguments, key: "id") }) {
            id throws(QMPCommandError) in try hotplug.netdevDel(id)
        }
    }
}
