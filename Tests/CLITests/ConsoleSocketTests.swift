import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Testing

/// `-serial unix:PATH,server,nowait`: flotilla-vmm serves the guest's serial console on a Unix
/// socket itself. Real worker, real test guest, real sockets.
@Suite("flotilla-vmm console socket", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct ConsoleSocketTests {
    let vmm = Executables.path("flotilla-vmm")

    @Test("the guest's serial output reaches the client; one client at a time; recent output replayed; socket removed after quit")
    func console() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let console = directory.file("console.sock")
        let api = directory.file("api.sock")
        let process = try BackgroundProcess(
            vmm,
            [
                "-kernel", GuestImages.vmlinux, "-append", "console=ttyS0 flotilla.hold=1", "-serial",
                "unix:\(console),server,nowait", "-api-channel", "unix:\(api)",
            ])
        let qmp = try QMPTestClient(path: api)
        try qmp.handshake()
        var info = stat()
        #expect(stat(console, &info) == 0 && (info.st_mode & S_IFMT) == S_IFSOCK && info.st_mode & 0o777 == 0o600)

        let first = try ConsoleClient(path: console)
        let seen = try first.read(until: "flotilla-guest: holding")
        #expect(seen.contains("flotilla-guest: done pass="), "\(seen)")
        #expect(GuestReport(output: seen).done?.fail == 0, "\(seen)")
        #expect(process.standardOutput.isEmpty, "console output leaked to stdout: \(process.standardOutput)")

        // A second client is told the console is busy and disconnected; the first keeps it.
        let second = try ConsoleClient(path: console)
        let refusal = try second.readToEnd()
        #expect(refusal.contains("in use by another client"), "\(refusal)")
        // Input goes to the UART; the guest (which does not read it) keeps running.
        try first.send("hello guest\r")
        #expect(try qmp.execute("query-status")["return"]?.objectValue?["running"] == true)

        // Once the first client leaves, the next one gets the recent output replayed.
        first.close()
        let third = try ConsoleClient(path: console, retryWhileRefused: true)
        let replay = try third.read(until: "flotilla-guest: holding")
        #expect(replay.contains("flotilla-guest: done pass="), "\(replay)")

        #expect(try qmp.execute("quit")["return"] == [:])
        #expect(process.wait() == 0, "\(process.standardError)")
        // The worker closed the client and removed the socket.
        _ = try third.readToEnd()
        #expect(access(console, F_OK) != 0, "console.sock was left behind")
        #expect(access(api, F_OK) != 0)
    }

    @Test("the socket is removed when the guest resets and when the worker is told to stop by a signal", arguments: ["reset", "SIGTERM"])
    func removedOnExit(ending: String) throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let console = directory.file("console.sock")
        let append = ending == "reset" ? "console=ttyS0" : "console=ttyS0 flotilla.hold=1"
        let process = try BackgroundProcess(
            vmm, ["-kernel", GuestImages.vmlinux, "-append", append, "-serial", "unix:\(console),server,nowait"])
        if ending == "SIGTERM" {
            let client = try ConsoleClient(path: console, retryWhileMissing: true)
            _ = try client.read(until: "flotilla-guest: holding")
            process.signal(SIGTERM)
        }
        #expect(process.wait() == 0, "\(process.standardError)")
        #expect(access(console, F_OK) != 0, "console.sock was left behind after \(ending)")
    }

    @Test("an existing console path is refused (exit 2, nothing removed); a start-up failure leaves no socket")
    func refusals() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let taken = directory.file("taken.sock")
        try Data("not a socket".utf8).write(to: URL(fileURLWithPath: taken))
        let result = try run(vmm, ["-kernel", GuestImages.vmlinux, "-serial", "unix:\(taken),server,nowait"])
        #expect(result.status == 2)
        #expect(result.standardError.contains("-serial") && result.standardError.contains(taken), "\(result.standardError)")
        #expect(readText(taken) == "not a socket", "an existing file was touched")

        let console = directory.file("console.sock")
        let badKernel = directory.file("bad-kernel")
        try Data(repeating: 0x41, count: 4096).write(to: URL(fileURLWithPath: badKernel))
        let failed = try run(vmm, ["-kernel", badKernel, "-serial", "unix:\(console),server,nowait"])
        #expect(failed.status == 2, "\(failed.standardError)")
        #expect(access(console, F_OK) != 0, "console.sock was left behind by a failed start")

        let usage = try run(vmm, ["-kernel", GuestImages.vmlinux, "-serial", "unix:\(console)"])
        #expect(usage.status == 1)
        #expect(usage.standardError.contains("unix:\(console),server,nowait"), "\(usage.standardError)")
    }
}
