import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Testing

/// virtio-console end to end: flotilla-vmm serving `-chardev id=,path=` on a real Unix socket,
/// the test guest's virtio-console driver on real /dev/kvm, seccomp on (the default).
@Suite("virtio-console through the test guest", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct VirtioConsoleTests {
    let vmm = Executables.path("flotilla-vmm")

    @Test("a client reads the guest's transmitq line and its line reaches the guest's receiveq; the socket goes on exit")
    func echo() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let socket = directory.file("con0.sock")
        let api = directory.file("api.sock")
        let nonce = String(UInt32.random(in: 1...UInt32.max), radix: 16)
        let process = try BackgroundProcess(
            vmm,
            [
                "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "console=ttyS0 flotilla.hold=1 flotilla.nonce=\(nonce)",
                "-chardev", "id=con0,path=\(socket)", "-api-channel", "unix:\(api)",
            ])
        let qmp = try QMPTestClient(path: api)
        try qmp.handshake()
        var info = stat()
        #expect(stat(socket, &info) == 0 && (info.st_mode & S_IFMT) == S_IFSOCK && info.st_mode & 0o777 == 0o600)

        // The guest wrote its line at boot, before any client: it comes with the replay.
        let client = try ConsoleClient(path: socket, retryWhileMissing: true)
        let hello = try client.read(until: "flotilla-guest console hello \(nonce)\n")
        #expect(!hello.contains("flotilla-guest: "), "serial output leaked onto the virtio console: \(hello)")
        #expect(process.waitForOutput("flotilla-guest: holding", timeout: 60), "\(process.standardOutput)")
        let report = GuestReport(output: process.standardOutput)
        let fact = try #require(report.fact("device virtio-console"), "\(process.standardOutput)")
        // The first optional slot (docs/guest-abi.md): the console comes before rng.
        #expect(fact["base"] == "0xd0006000" && fact["irq"] == "11")
        #expect(report.checks["virtio-console"] == "ok")
        #expect(report.done?.fail == 0, "\(report.lines)")

        try client.send("ping \(nonce)\n")
        #expect(process.waitForLine(containing: "fact console-rx text=ping \(nonce)", timeout: 60), "\(process.standardOutput)")
        _ = try client.read(until: "flotilla-guest console echo ping \(nonce)\n")

        #expect(try qmp.execute("quit")["return"] == [:])
        #expect(process.wait() == 0, "\(process.standardError)")
        _ = try client.readToEnd()
        #expect(access(socket, F_OK) != 0, "the console socket was left behind")
    }

    @Test("consoles, balloon and rng take the optional slots in the documented order")
    func slotOrder() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let source = directory.file("random.bin")
        try Data(repeating: 0x42, count: 4096).write(to: URL(fileURLWithPath: source))
        let result = try run(
            vmm,
            [
                "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "console=ttyS0", "-chardev",
                "id=con0,path=\(directory.file("a.sock"))", "-chardev", "id=con1,path=\(directory.file("b.sock"))",
                "-balloon", "deflate-on-oom=off", "-rng", "random_file=\(source)",
            ], timeout: 120)
        #expect(result.status == 0, "\(result.standardError)")
        let report = GuestReport(output: result.standardOutput)
        let slots = report.facts("device virtio-mmio").map { ($0["base"] ?? "", $0["irq"] ?? "", $0["device_id"] ?? "") }
        #expect(slots.map(\.2) == ["3", "3", "5", "4"], "\(report.lines)")
        #expect(slots.map(\.0) == ["0xd0006000", "0xd0007000", "0xd0008000", "0xd0009000"])
        #expect(slots.map(\.1) == ["11", "12", "13", "14"])
        #expect(report.done?.fail == 0, "\(report.lines)")
        #expect(try directory.contents().sorted() == ["random.bin"], "sockets left behind")
    }

    @Test("an existing console path is refused naming it, exit 2, the file untouched and nothing else left")
    func existingPath() throws {
        // A first console whose socket is made (and must be removed again) before the second fails.
        try expectExistingSocketPathRefused(vmm: vmm, option: "-chardev id=con1") { taken in
            [
                "-chardev", "id=con0,path=\(URL(fileURLWithPath: taken).deletingLastPathComponent().path)/other.sock", "-chardev",
                "id=con1,path=\(taken)",
            ]
        }
    }
}
