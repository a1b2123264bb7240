import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Testing

/// Disk hot-plug over QMP end to end: blockdev-add / device_add / device_del / blockdev-del on
/// a running MicroVm (real /dev/kvm), the test guest re-reading its disk slots
/// (flotilla.rescan=1) and driving what appears with its virtio-blk driver; image locks
/// checked with a second flotilla-vmm and with flock(2).
@Suite("virtio-blk hot-plug over QMP", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct BlockHotplugTests {
    let vmm = Executables.path("flotilla-vmm")

    static func image(_ directory: TemporaryDirectory, _ name: String, bytes count: Int) throws -> (path: String, crc: String) {
        let path = directory.file(name)
        let bytes = VirtioBlockTests.randomBytes(count)
        try VirtioBlockTests.write(bytes, to: path)
        return (path, VirtioBlockTests.hex(crc32(bytes[0..<min(count, 65536)])))
    }

    /// Whether nobody holds a lock on `path` (an exclusive flock succeeds at once).
    static func unlocked(_ path: String) -> Bool {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return flock(fd, LOCK_EX | LOCK_NB) == 0
    }

    /// The guest's fact line for a disk at slot `slot` with this serial and CRC.
    static func diskFact(slot: Int, serial: String, crc: String, sectors: Int) -> String {
        "fact device virtio-blk base=0x\(String(0xd000_0000 + 0x1000 * slot, radix: 16)) irq=\(5 + slot) capacity=\(sectors) serial=\(serial) ro=0 crc32=\(crc)"
    }

    @Test(
        "plug, use, unplug and re-plug disks while the guest runs; errors as QEMU words them; blockdev-del and the VM's end release the image locks"
    )
    func hotplug() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let api = directory.file("api.sock")
        let cold = try Self.image(directory, "cold.img", bytes: 1 << 20)
        let hot = try Self.image(directory, "hot.img", bytes: 1 << 20)
        let extra = try (0..<3).map { try Self.image(directory, "extra\($0).img", bytes: 128 << 10) }
        let process = try BackgroundProcess(
            vmm,
            [
                "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "console=ttyS0 flotilla.hold=1 flotilla.rescan=1",
                "-drive", "id=disk0,file=\(cold.path),serial=cold", "-iothread", "id=io1", "-api-channel", "unix:\(api)",
            ])
        let qmp = try QMPTestClient(path: api)
        try qmp.handshake()
        #expect(process.waitForOutput("flotilla-guest: holding", timeout: 60), "\(process.standardOutput)")
        #expect(process.standardOutput.contains(Self.diskFact(slot: 0, serial: "cold", crc: cold.crc, sectors: 2048)))

        // blockdev-add as StratoVirt documents it, then device_add with the node's name as id.
        let added = try qmp.execute(
            "blockdev-add",
            arguments: [
                "node-name": "hp1", "file": ["driver": "file", "filename": .string(hot.path), "aio": "native"],
                "cache": ["direct": true], "read-only": false,
            ])
        #expect(added["return"] == [:], "\(added)")
        #expect(!Self.unlocked(hot.path), "blockdev-add locks the image")
        let plugged = try qmp.execute("device_add", arguments: ["id": "hp1", "driver": "virtio-blk-mmio", "serial": "hot-one"])
        #expect(plugged["return"] == [:], "\(plugged)")
        // The first free disk slot is 1; the guest finds it, reads it, and reports the host's bytes.
        #expect(
            process.waitForLine(containing: Self.diskFact(slot: 1, serial: "hot-one", crc: hot.crc, sectors: 2048), timeout: 60),
            "\(process.standardOutput)")
        #expect(process.waitForLine(containing: "check virtio-blk1 ok", timeout: 30), "\(process.standardOutput)")

        let block = try #require(try qmp.execute("query-block")["return"]?.arrayValue)
        #expect(block.count == 2)
        let first = try #require(block.first?.objectValue)
        #expect(first["device"] == "disk0" && first["qdev"] == "disk0")
        let second = try #require(block.last?.objectValue)
        #expect(second["device"] == "" && second["qdev"] == "hp1")
        let inserted = try #require(second["inserted"]?.objectValue)
        #expect(inserted["node-name"] == "hp1" && inserted["file"] == .string(hot.path) && inserted["ro"] == false)
        #expect(inserted["image"]?.objectValue?["virtual-size"] == .integer(1 << 20))

        // Errors, QEMU-shaped.
        #expect(
            qmpError(
                try qmp.execute(
                    "blockdev-add", arguments: ["node-name": "hp1", "file": ["driver": "file", "filename": .string(hot.path)]]))
                == ("GenericError", "Duplicate nodes with node-name='hp1'"))
        #expect(
            qmpError(try qmp.execute("device_add", arguments: ["id": "hp1", "driver": "virtio-blk-mmio", "drive": "hp1"]))
                == ("GenericError", "Duplicate ID 'hp1' for device"))
        #expect(
            qmpError(try qmp.execute("device_add", arguments: ["id": "x", "driver": "virtio-blk-mmio", "drive": "nope"]))
                == ("GenericError", "Property 'virtio-blk-device.drive' can't find value 'nope'"))
        #expect(
            qmpError(try qmp.execute("device_add", arguments: ["id": "x", "driver": "virtio-scsi-mmio"]))
                == ("GenericError", "'virtio-scsi-mmio' is not a valid device model name"))
        #expect(
            qmpError(try qmp.execute("device_del", arguments: ["id": "nope"])) == ("DeviceNotFound", "Device 'nope' not found"))
        #expect(
            qmpError(try qmp.execute("blockdev-del", arguments: ["node-name": "hp1"]))
                == ("GenericError", "Node hp1 is in use by device 'hp1'; device_del it first"))
        #expect(
            qmpError(try qmp.execute("blockdev-del", arguments: ["node-name": "disk0"]))
                == ("GenericError", "Node disk0 is in use by device 'disk0'; device_del it first"))
        // A missing image: the same message -drive gives at start-up.
        let missing = directory.file("missing.img")
        let (missingClass, missingText) = qmpError(
            try qmp.execute("blockdev-add", arguments: ["node-name": "gone", "file": ["driver": "file", "filename": .string(missing)]]))
        #expect(missingClass == "GenericError")
        let startup = try run(vmm, ["-kernel", GuestImages.vmlinux, "-drive", "id=gone,file=\(missing)"], timeout: 60)
        #expect(startup.status == 2)
        let text = try #require(missingText)
        #expect(text.contains("it does not exist") && startup.standardError.contains(text), "\(text) vs \(startup.standardError)")

        // Fill slots 2 and 3 (one on the iothread, one at the slot asked for); a fifth disk has no slot.
        for (index, image) in extra.enumerated() {
            let name = "x\(index)"
            #expect(
                try qmp.execute(
                    "blockdev-add", arguments: ["node-name": .string(name), "file": ["driver": "file", "filename": .string(image.path)]])[
                        "return"] == [:])
        }
        #expect(
            try qmp.execute("device_add", arguments: ["id": "d3", "driver": "virtio-blk-device", "drive": "x1", "addr": "0x3"])["return"]
                == [:])
        #expect(
            try qmp.execute("device_add", arguments: ["id": "d2", "driver": "virtio-blk-mmio", "drive": "x0", "iothread": "io1"])["return"]
                == [:])
        #expect(
            qmpError(try qmp.execute("device_add", arguments: ["id": "d4", "driver": "virtio-blk-mmio", "drive": "x2", "addr": "0x3"]))
                == ("GenericError", "The slot 3 is occupied already."))
        let (fifthClass, fifthText) = qmpError(
            try qmp.execute("device_add", arguments: ["id": "d4", "driver": "virtio-blk-mmio", "drive": "x2"]))
        #expect(fifthClass == "GenericError" && fifthText?.hasPrefix("A maximum of 4 block replaceable devices are supported") == true)
        #expect(process.waitForLine(containing: Self.diskFact(slot: 3, serial: "", crc: extra[1].crc, sectors: 256), timeout: 60))
        #expect(process.waitForLine(containing: Self.diskFact(slot: 2, serial: "", crc: extra[0].crc, sectors: 256), timeout: 60))

        // device_del: DEVICE_DELETED (before the reply), the guest sees the slot empty again.
        try qmp.send(QMP.Command(name: "device_del", arguments: ["id": "hp1"], id: 7))
        let deleted = try qmp.receive()
        #expect(deleted["event"] == "DEVICE_DELETED" && deleted["data"] == ["device": "hp1", "path": "hp1"], "\(deleted)")
        #expect(try qmp.receive() == ["return": [:], "id": 7])
        #expect(process.waitForLine(containing: "fact device-removed base=0xd0001000", timeout: 60), "\(process.standardOutput)")
        // The node stays (blockdev-add made it) and keeps its lock: another VM cannot have it.
        let locked = try run(vmm, ["-kernel", GuestImages.vmlinux, "-drive", "id=again,file=\(hot.path)"], timeout: 60)
        #expect(locked.status == 2 && locked.standardError.contains("locked"), "\(locked.standardError)")
        #expect(try qmp.execute("blockdev-del", arguments: ["node-name": "hp1"])["return"] == [:])
        #expect(Self.unlocked(hot.path), "blockdev-del releases the lock")
        // ... so a second VM opens it writable and reads the same bytes.
        let secondVM = try run(
            vmm,
            [
                "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "console=ttyS0", "-drive",
                "id=again,file=\(hot.path),serial=again",
            ],
            timeout: 120)
        #expect(secondVM.status == 0, "\(secondVM.standardError)")
        #expect(
            secondVM.standardOutput.contains(Self.diskFact(slot: 0, serial: "again", crc: hot.crc, sectors: 2048)),
            "\(secondVM.standardOutput)")

        // Re-plug the freed slot 1 with another node: a new transport at the same address.
        #expect(
            try qmp.execute("device_add", arguments: ["id": "d4", "driver": "virtio-blk-mmio", "drive": "x2", "serial": "re"])["return"]
                == [:])
        #expect(process.waitForLine(containing: Self.diskFact(slot: 1, serial: "re", crc: extra[2].crc, sectors: 256), timeout: 60))

        // A -drive disk can be unplugged too; its node goes with it (QEMU's rule for -drive).
        #expect(try qmp.execute("device_del", arguments: ["id": "disk0"])["return"] == [:])
        #expect(process.waitForLine(containing: "fact device-removed base=0xd0000000", timeout: 60), "\(process.standardOutput)")
        #expect(Self.unlocked(cold.path))
        #expect(
            qmpError(try qmp.execute("blockdev-del", arguments: ["node-name": "disk0"]))
                == ("GenericError", "Failed to find node with node-name='disk0'"))
        let nodes = try #require(try qmp.execute("query-named-block-nodes")["return"]?.arrayValue)
        #expect(nodes.compactMap { $0.objectValue?["node-name"]?.stringValue } == ["x0", "x1", "x2"])

        // Every disk the guest drove, at boot or plugged later, passed its checks.
        let failed = process.standardOutput.split(separator: "\n").filter { $0.contains("check virtio-blk") && $0.contains(" fail") }
        #expect(failed.isEmpty, "\(failed)")

        // The VM's end closes every image still plugged or added.
        #expect(try qmp.execute("quit")["return"] == [:])
        #expect(process.wait() == 0, "\(process.standardError)")
        for image in extra { #expect(Self.unlocked(image.path)) }
    }
}
