import Protocol
import Testing

@Suite("QMP argument checks (QEMU's QAPI wording)")
struct QMPArgumentTests {
    @Test("members are typed, required ones must be there, unknown ones are refused, nested ones are named by path")
    func typedMembers() throws {
        let object: JSONObject = ["name": "n", "flag": true, "count": 7, "file": ["filename": "/x"]]
        let arguments = try QMPArguments(object, allowed: ["name", "flag", "count", "file", "absent"])
        #expect(try arguments.string("name") == "n")
        #expect(try arguments.optionalBool("flag") == true)
        #expect(try arguments.optionalUnsigned("count") == 7)
        #expect(try arguments.optionalString("absent") == nil)
        #expect(throws: QMPArgumentError("Parameter 'absent' is missing")) { try arguments.string("absent") }
        #expect(throws: QMPArgumentError("Invalid parameter type for 'name', expected: boolean")) { try arguments.optionalBool("name") }
        #expect(throws: QMPArgumentError("Invalid parameter type for 'flag', expected: string")) { try arguments.string("flag") }
        #expect(throws: QMPArgumentError("Invalid parameter type for 'name', expected: integer")) { try arguments.optionalUnsigned("name") }
        let file = try arguments.object("file", allowed: ["filename", "driver"])
        #expect(try file.string("filename") == "/x")
        #expect(throws: QMPArgumentError("Parameter 'file.driver' is missing")) { try file.string("driver") }
        #expect(throws: QMPArgumentError("Parameter 'file.filename' is unexpected")) { try arguments.object("file", allowed: ["driver"]) }
        #expect(throws: QMPArgumentError("Invalid parameter type for 'name', expected: object")) {
            try arguments.optionalObject("name", allowed: [])
        }
        // Unknown members, the first in sorted order.
        #expect(throws: QMPArgumentError("Parameter 'count' is unexpected")) { try QMPArguments(object, allowed: ["name"]) }
        #expect(throws: QMPArgumentError("Parameter 'x' is unexpected")) { try QMPArguments.none(["x": 1]) }
        try QMPArguments.none([:])
        // Negative and fractional numbers are no uint64.
        #expect(throws: QMPArgumentError("Invalid parameter type for 'n', expected: integer")) {
            try QMPArguments(["n": -1], allowed: ["n"]).optionalUnsigned("n")
        }
    }
}

@Suite("QMP hot-plug arguments (blockdev-add, device_add as StratoVirt takes them)")
struct QMPHotplugArgumentTests {
    @Test("blockdev-add: StratoVirt's example becomes the node's drive; defaults as -drive; what cannot be honoured is refused")
    func blockdevAdd() throws {
        let drive = try QMPHotplug.blockdevAdd([
            "node-name": "drive-0", "file": ["driver": "file", "filename": "/path/to/block", "aio": "native"],
            "cache": ["direct": false], "read-only": true, "throttling.iops-total": 500,
        ])
        #expect(drive == DriveConfig(id: "drive-0", path: "/path/to/block", readOnly: true, direct: false, iops: 500))
        let plain = try QMPHotplug.blockdevAdd(["node-name": "n", "file": ["driver": "file", "filename": "/img"], "driver": "raw"])
        #expect(plain == DriveConfig(id: "n", path: "/img", readOnly: false, direct: true))

        func refused(_ object: JSONObject) -> String? {
            do {
                _ = try QMPHotplug.blockdevAdd(object)
                return nil
            } catch {
                return error.description
            }
        }
        let file: JSONValue = ["driver": "file", "filename": "/img"]
        #expect(refused(["file": file]) == "Parameter 'node-name' is missing")
        #expect(refused(["node-name": "n"]) == "Parameter 'file' is missing")
        #expect(refused(["node-name": "n", "file": ["driver": "file"]]) == "Parameter 'file.filename' is missing")
        #expect(refused(["node-name": "n", "file": file, "bogus": 1]) == "Parameter 'bogus' is unexpected")
        #expect(
            refused(["node-name": "n", "file": file, "read-only": "yes"]) == "Invalid parameter type for 'read-only', expected: boolean")
        #expect(refused(["node-name": "n", "file": file, "driver": "qcow2"])?.contains("allowed: 'raw'") == true)
        #expect(
            refused(["node-name": "n", "file": ["driver": "nbd", "filename": "/img"]])?.hasPrefix("Parameter 'file.driver' value 'nbd'")
                == true)
        #expect(refused(["node-name": "n", "file": ["driver": "file", "filename": ""]]) == "file.filename '': path must not be empty")
        #expect(refused(["node-name": "", "file": file]) == "node-name '': id must not be empty")
        #expect(
            refused(["node-name": "n", "file": file, "throttling.iops-total": 2_000_000])?.hasPrefix("throttling.iops-total '2000000'")
                == true)
        #expect(refused(["node-name": "n", "file": file, "cache": ["no-flush": true]])?.hasPrefix("Parameter 'cache.no-flush'") == true)
    }

    @Test("device_add: the node defaults to the id (StratoVirt's MicroVm rule), addr is the disk slot, QEMU's wording for the rest")
    func deviceAdd() throws {
        #expect(
            try QMPHotplug.deviceAdd(["id": "drive-0", "driver": "virtio-blk-mmio"], diskSlots: 4)
                == .block(.init(id: "drive-0", node: "drive-0", slot: nil, serial: nil, iothread: nil)))
        #expect(
            try QMPHotplug.deviceAdd(
                ["id": "d", "driver": "virtio-blk-device", "drive": "n", "addr": "0x3", "serial": "s", "iothread": "io"], diskSlots: 4)
                == .block(.init(id: "d", node: "n", slot: 3, serial: "s", iothread: "io")))
        #expect(
            try QMPHotplug.deviceAdd(["id": "d", "driver": "virtio-blk-mmio", "addr": "2"], diskSlots: 4)
                == .block(.init(id: "d", node: "d", slot: 2)))

        func refused(_ object: JSONObject) -> String? {
            do {
                _ = try QMPHotplug.deviceAdd(object, diskSlots: 4)
                return nil
            } catch {
                return error.description
            }
        }
        #expect(refused(["id": "d"]) == "Parameter 'driver' is missing")
        #expect(refused(["id": "d", "driver": 3]) == "Invalid parameter type for 'driver', expected: string")
        #expect(refused(["id": "d", "driver": "e1000"]) == "'e1000' is not a valid device model name")
        #expect(refused(["driver": "virtio-blk-mmio"]) == "Parameter 'id' is missing")
        #expect(refused(["id": "d", "driver": "virtio-blk-mmio", "mac": "x"]) == "Property 'virtio-blk-mmio.mac' not found")
        #expect(refused(["id": "d", "driver": "virtio-blk-mmio", "addr": "zz"]) == "Invalid addr for device d")
        #expect(
            refused(["id": "d", "driver": "virtio-blk-mmio", "addr": "0x4"])?.hasPrefix("addr '0x4' of device d is out of range") == true)
        #expect(refused(["id": "d", "driver": "virtio-blk-mmio", "serial": "123456789012345678901"])?.contains("at most 20 bytes") == true)
        #expect(refused(["id": "d", "driver": "virtio-blk-mmio", "drive": 1]) == "Invalid parameter type for 'drive', expected: string")
        #expect(try QMPHotplug.name(["id": "d"], key: "id") == "d")
        #expect(try QMPHotplug.name(["id": "net-0"], key: "id") == "net-0")
        #expect(throws: QMPArgumentError("Parameter 'id' is missing")) { try QMPHotplug.name([:], key: "id") }
        #expect(throws: QMPArgumentError("Parameter 'force' is unexpected")) { try QMPHotplug.name(["id": "d", "force": true], key: "id") }
    }

    @Test(
        "device_add for a NIC: netdev defaults to the id (StratoVirt's MicroVm rule), addr is the NIC slot (0x0 is eth0), mac is a unicast address; disk properties are not NIC ones"
    )
    func deviceAddNet() throws {
        #expect(
            try QMPHotplug.deviceAdd(["id": "net-0", "driver": "virtio-net-mmio", "addr": "0x0"], diskSlots: 4, nicSlots: 2)
                == .net(.init(id: "net-0", netdev: "net-0", slot: 0)))
        #expect(
            try QMPHotplug.deviceAdd(
                ["id": "n", "driver": "virtio-net-device", "netdev": "tapnet", "mac": "52:54:00:AB:cd:01", "addr": "1", "iothread": "io"],
                diskSlots: 4, nicSlots: 2)
                == .net(.init(id: "n", netdev: "tapnet", slot: 1, mac: MACAddress(0x52, 0x54, 0, 0xab, 0xcd, 1), iothread: "io")))

        func refused(_ object: JSONObject) -> String? {
            do {
                _ = try QMPHotplug.deviceAdd(object, diskSlots: 4, nicSlots: 2)
                return nil
            } catch {
                return error.description
            }
        }
        #expect(refused(["driver": "virtio-net-mmio"]) == "Parameter 'id' is missing")
        #expect(refused(["id": "", "driver": "virtio-net-mmio"])?.contains("id must not be empty") == true)
        #expect(refused(["id": "n", "driver": "virtio-net-mmio", "drive": "d"]) == "Property 'virtio-net-mmio.drive' not found")
        #expect(refused(["id": "n", "driver": "virtio-net-device", "serial": "s"]) == "Property 'virtio-net-device.serial' not found")
        #expect(
            refused(["id": "n", "driver": "virtio-net-mmio", "addr": "0x2"])
                == "addr '0x2' of device n is out of range: a MicroVm has 2 NIC slots, addr 0x0 to 0x1")
        #expect(refused(["id": "n", "driver": "virtio-net-mmio", "addr": "eth0"]) == "Invalid addr for device n")
        #expect(
            refused(["id": "n", "driver": "virtio-net-mmio", "mac": "52:54:00:12:34"])?.hasPrefix(
                "Property 'virtio-net-mmio.mac' doesn't take value '52:54:00:12:34'") == true)
        #expect(refused(["id": "n", "driver": "virtio-net-mmio", "mac": "01:00:5e:00:00:01"])?.contains("unicast") == true)
        #expect(refused(["id": "n", "driver": "virtio-net-mmio", "netdev": 1]) == "Invalid parameter type for 'netdev', expected: string")
    }

    @Test(
        "netdev_add as StratoVirt spells it (id, ifname) and QEMU's type=tap or fd=NAME (a getfd name); vhost/queues/scripts only where they ask for what the device does; fd= with ifname/scripts/queues refused in QEMU's words; descriptor numbers, fds, vhostfds refused"
    )
    func netdevAdd() throws {
        #expect(try QMPHotplug.netdevAdd(["id": "net-0", "ifname": "tap0"]) == .init(id: "net-0", ifname: "tap0"))
        #expect(
            try QMPHotplug.netdevAdd([
                "id": "n", "ifname": "tap0", "type": "tap", "vhost": false, "queues": 1, "script": "no", "downscript": "no",
            ]) == .init(id: "n", ifname: "tap0"))
        // StratoVirt's schema has had vhost and queues as strings too.
        #expect(try QMPHotplug.netdevAdd(["id": "n", "ifname": "t", "vhost": "off", "queues": "1"]) == .init(id: "n", ifname: "t"))

        func refused(_ object: JSONObject) -> String? {
            do {
                _ = try QMPHotplug.netdevAdd(object)
                return nil
            } catch {
                return error.description
            }
        }
        #expect(refused(["ifname": "tap0"]) == "Parameter 'id' is missing")
        #expect(refused(["id": "n"]) == "Parameter 'ifname' is missing")
        #expect(refused(["id": "n", "ifname": 3]) == "Invalid parameter type for 'ifname', expected: string")
        #expect(refused(["id": "n", "ifname": "tap0", "dnssearch": "x"]) == "Parameter 'dnssearch' is unexpected")
        #expect(
            refused(["id": "n", "ifname": "tap0", "type": "user"])
                == "Parameter 'type' value 'user' is not supported on a MicroVm; allowed: 'tap'")
        #expect(refused(["id": "n", "ifname": "a-very-long-tap-name"])?.contains("allowed: 1 to 15 bytes") == true)
        #expect(refused(["id": "n", "ifname": ""])?.contains("not a valid tap device name") == true)
        #expect(refused(["id": "n", "fds": "fd1"])?.hasPrefix("Parameter 'fds' is not supported") == true)
        // fd=: a tap passed with getfd, by name, instead of ifname.
        #expect(try QMPHotplug.netdevAdd(["id": "n", "type": "tap", "fd": "tap0"]) == .init(id: "n", fd: "tap0"))
        #expect(try QMPHotplug.netdevAdd(["id": "n", "fd": "t", "vhost": false]) == .init(id: "n", fd: "t"))
        #expect(refused(["id": "n", "fd": 4]) == "Invalid parameter type for 'fd', expected: string")
        for other: JSONObject in [["ifname": "tap0"], ["script": "no"], ["downscript": "no"], ["queues": 1], ["fds": "a:b"]] {
            var object: JSONObject = ["id": "n", "fd": "tap0"]
            for (key, value) in other { object[key] = value }
            #expect(refused(object) == QMPHotplug.invalidWithFD, "\(other)")
        }
        #expect(
            QMPHotplug.invalidWithFD
                == "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and vhostfds= are invalid with fd=")
        #expect(refused(["id": "n", "fd": "5"])?.hasPrefix("Invalid file descriptor number '5': ") == true)
        #expect(refused(["id": "n", "ifname": "t", "vhostfd": "3"])?.hasPrefix("Parameter 'vhostfd' is not supported") == true)
        #expect(refused(["id": "n", "ifname": "t", "vhost": true])?.hasPrefix("Parameter 'vhost' is not supported") == true)
        #expect(refused(["id": "n", "ifname": "t", "queues": 4])?.hasPrefix("Parameter 'queues' is not supported") == true)
        #expect(refused(["id": "n", "ifname": "t", "script": "/etc/qemu-ifup"])?.contains("runs no scripts") == true)
    }
}
