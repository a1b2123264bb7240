import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Testing

/// `-config FILE` end to end: StratoVirt's JSON (as the reference spells it) is the whole
/// configuration of a real VM, and the test guest reports every device it configured; and a
/// device given both in the file and on the command line is the command line's.
@Suite("-config JSON end to end through the test guest", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct JSONConfigDeviceTests {
    let vmm = Executables.path("flotilla-vmm")

    static func write(_ json: JSONValue, to path: String) throws {
        try Data(json.compactText.utf8).write(to: URL(fileURLWithPath: path))
    }

    @Test(
        "every device from the file alone: a disk on an iothread, a NIC on a tap, two consoles, the balloon and rng in their slots, as the guest reports them",
        .enabled(if: NetworkNamespace.available, "needs root, /dev/net/tun and ip(8) for a network namespace with a tap"))
    func everyDeviceFromJSON() throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        try namespace.addTap("fltapj0")
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let disk = directory.file("disk.img")
        let diskBytes = VirtioBlockTests.randomBytes(1 << 20)
        try VirtioBlockTests.write(diskBytes, to: disk)
        let random = directory.file("random.bin")
        let randomBytes = VirtioBlockTests.randomBytes(4096)
        try VirtioBlockTests.write(randomBytes, to: random)
        let consoles = [directory.file("con0.sock"), directory.file("con1.sock")]
        let nonce = String(UInt32.random(in: 1...UInt32.max), radix: 16)
        let mac = "0e:90:df:9f:a8:89"
        let json: JSONValue = .object([
            "name": "json-vm",
            "boot-source": .object([
                "kernel_image_path": .string(GuestImages.vmlinux),
                "boot_args": .string("console=ttyS0 flotilla.hold=1 flotilla.rngbytes=1000 flotilla.nonce=\(nonce)"),
            ]),
            "machine-config": .object(["type": "MicroVm", "vcpu_count": 1, "mem_size": .integer(256 << 20)]),
            "drive": .array([
                .object([
                    "drive_id": "rootfs", "path_on_host": .string(disk), "serial_num": "json-disk", "direct": false,
                    "read_only": true, "iothread": "io1",
                ])
            ]),
            "net": .array([.object(["iface_id": "net0", "host_dev_name": "fltapj0", "mac": .string(mac)])]),
            "console": .array(
                consoles.enumerated().map { .object(["console_id": .string("con\($0.offset)"), "socket_path": .string($0.element)]) }),
            "serial": .object(["stdio": true]),
            "iothread": .array([.object(["id": "io1"])]),
            "balloon": .object(["deflate_on_oom": true]),
            "rng": .object(["random_file": .string(random), "bytes_per_sec": 1_000_000]),
        ])
        let file = directory.file("vm.json")
        try Self.write(json, to: file)

        let process = try BackgroundProcess(namespace.ip, namespace.vmmArguments(vmm, ["-config", file]))
        // Both console sockets are served; the guest drives the first port, whose hello comes
        // through its socket (Guest/README.md: a second port gets `driver=none`).
        let first = try ConsoleClient(path: consoles[0], retryWhileMissing: true)
        _ = try first.read(until: "flotilla-guest console hello \(nonce)\n")
        _ = try ConsoleClient(path: consoles[1], retryWhileMissing: true)
        #expect(process.waitForOutput("flotilla-guest: holding", timeout: 60), "\(process.standardOutput)\n\(process.standardError)")
        let report = GuestReport(output: process.standardOutput)

        let block = try #require(report.fact("device virtio-blk"), "\(report.lines)")
        #expect(block["base"] == "0xd0000000" && block["capacity"] == "\((1 << 20) / 512)" && block["ro"] == "1", "\(block)")
        #expect(block["serial"] == "json-disk" && block["crc32"] == VirtioBlockTests.hex(crc32(diskBytes[0..<65536])), "\(block)")
        let net = try #require(report.fact("device virtio-net"), "\(report.lines)")
        #expect(net["base"] == "0xd0004000" && net["mac"] == mac && net["link"] == "1", "\(net)")
        // Optional devices after the six fixed slots: consoles in file order, balloon, rng.
        let ports = report.facts("device virtio-console")
        #expect(ports.map { $0["base"] } == ["0xd0006000", "0xd0007000"], "\(ports)")
        let balloon = try #require(report.fact("device virtio-balloon"), "\(report.lines)")
        #expect(balloon["base"] == "0xd0008000" && balloon["deflate_on_oom"] == "1", "\(balloon)")
        let rng = try #require(report.fact("device virtio-rng"), "\(report.lines)")
        #expect(rng["base"] == "0xd0009000" && rng["bytes"] == "1000", "\(rng)")
        #expect(rng["crc32"] == VirtioBlockTests.hex(crc32(randomBytes[0..<1000])), "\(rng)")
        for check in ["virtio-blk0", "net0", "virtio-console", "virtio-balloon", "virtio-rng"] {
            #expect(report.checks[check] == "ok", "\(check): \(report.lines)")
        }
        #expect(report.done?.fail == 0, "\(report.lines)")
        // `name` named the main thread.
        #expect(readText("/proc/\(process.pid)/comm") == "json-vm\n")
        // The disk's iothread served it: the thread exists and read the image.
        let threads = VirtioBlockTests.threads(of: process.pid)
        #expect(threads.first { $0.name == "io1" }.map { $0.readBytes > 0 } == true, "\(threads)")

        process.signal(SIGTERM)
        #expect(process.wait() == 0, "\(process.standardError)")
        #expect(try directory.contents().sorted() == ["disk.img", "random.bin", "vm.json"], "sockets left behind")
    }

    @Test("a device in both: the command line's console (same id), balloon and rng replace the file's; the file's other console stays")
    func commandLineWins() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let fileRandom = directory.file("file-random.bin")
        let cliRandom = directory.file("cli-random.bin")
        let fileBytes = VirtioBlockTests.randomBytes(4096)
        let cliBytes = VirtioBlockTests.randomBytes(4096)
        try VirtioBlockTests.write(fileBytes, to: fileRandom)
        try VirtioBlockTests.write(cliBytes, to: cliRandom)
        let fileConsole = directory.file("file-con0.sock")
        let cliConsole = directory.file("cli-con0.sock")
        let otherConsole = directory.file("file-con1.sock")
        let nonce = String(UInt32.random(in: 1...UInt32.max), radix: 16)
        let json: JSONValue = .object([
            "boot-source": .object([
                "kernel_image_path": .string(GuestImages.vmlinux),
                "boot_args": .string("console=ttyS0 flotilla.hold=1 flotilla.rngbytes=1000 flotilla.nonce=\(nonce)"),
            ]),
            "console": .array([
                .object(["console_id": "con0", "socket_path": .string(fileConsole)]),
                .object(["console_id": "con1", "socket_path": .string(otherConsole)]),
            ]),
            "serial": .object(["stdio": true]),
            "balloon": .object(["deflate_on_oom": false]),
            "rng": .object(["random_file": .string(fileRandom)]),
        ])
        let file = directory.file("vm.json")
        try Self.write(json, to: file)

        let process = try BackgroundProcess(
            vmm,
            [
                "-config", file, "-chardev", "id=con0,path=\(cliConsole)", "-balloon", "deflate-on-oom=true", "-rng",
                "random_file=\(cliRandom)",
            ])
        // con0 is served where the command line put it (and never where the file did): the
        // guest's hello on its first port comes through there; con1 where the file put it.
        let first = try ConsoleClient(path: cliConsole, retryWhileMissing: true)
        _ = try first.read(until: "flotilla-guest console hello \(nonce)\n")
        _ = try ConsoleClient(path: otherConsole, retryWhileMissing: true)
        #expect(process.waitForOutput("flotilla-guest: holding", timeout: 60), "\(process.standardOutput)\n\(process.standardError)")
        #expect(access(fileConsole, F_OK) != 0, "the file's con0 socket exists: the JSON entry was not replaced")
        let report = GuestReport(output: process.standardOutput)
        // Two ports, con0 still first (replaced in place); then the balloon and rng.
        #expect(report.facts("device virtio-console").map { $0["base"] } == ["0xd0006000", "0xd0007000"], "\(report.lines)")
        #expect(report.fact("device virtio-balloon")?["deflate_on_oom"] == "1", "\(report.lines)")
        // The guest's bytes are the command line's random_file's, not the file's.
        let rng = try #require(report.fact("device virtio-rng"), "\(report.lines)")
        #expect(rng["bytes"] == "1000" && rng["crc32"] == VirtioBlockTests.hex(crc32(cliBytes[0..<1000])), "\(rng)")
        #expect(rng["crc32"] != VirtioBlockTests.hex(crc32(fileBytes[0..<1000])))
        #expect(report.done?.fail == 0, "\(report.lines)")

        process.signal(SIGTERM)
        #expect(process.wait() == 0, "\(process.standardError)")
        #expect(try directory.contents().sorted() == ["cli-random.bin", "file-random.bin", "vm.json"], "sockets left behind")
    }
}
