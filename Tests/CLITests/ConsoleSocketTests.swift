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

/// A blocking console client with a receive timeout that only guards against a hang.
final class ConsoleClient {
    let fd: Int32
    private var received: [UInt8] = []

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    init(path: String, retryWhileMissing: Bool = false, retryWhileRefused: Bool = false) throws {
        let deadline = Date().addingTimeInterval(30)
        while true {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
            let result = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if result != 0 {
                let code = errno
                Glibc.close(fd)
                if retryWhileMissing && (code == ENOENT || code == ECONNREFUSED) && Date() < deadline {
                    usleep(20_000)
                    continue
                }
                throw Failure(description: "connect \(path): errno \(code)")
            }
            var timeout = timeval(tv_sec: 60, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            if retryWhileRefused {
                // The worker may not have seen the previous client's close yet: a refusal
                // arrives at once and ends the connection.
                var peek = [UInt8](repeating: 0, count: 64)
                var shortTimeout = timeval(tv_sec: 0, tv_usec: 200_000)
                setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &shortTimeout, socklen_t(MemoryLayout<timeval>.size))
                let count = peek.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_PEEK)) }
                setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
                if count > 0, String(decoding: peek[0..<count], as: UTF8.self).hasPrefix("flotilla-vmm: this console is in use"),
                    Date() < deadline
                {
                    Glibc.close(fd)
                    usleep(20_000)
                    continue
                }
            }
            self.fd = fd
            return
        }
    }

    deinit { Glibc.close(fd) }

    func close() { shutdown(fd, Int32(SHUT_RDWR)) }

    /// Reads until the text received so far contains `text`; returns all of it.
    func read(until text: String) throws -> String {
        while true {
            let all = String(decoding: received, as: UTF8.self)
            if all.contains(text) { return all }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard count > 0 else { throw Failure(description: "the console ended (errno \(errno)) before '\(text)' in: \(all)") }
            received += chunk[0..<count]
        }
    }

    /// Reads until the worker closes the connection.
    func readToEnd() throws -> String {
        while true {
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count == 0 { return String(decoding: received, as: UTF8.self) }
            guard count > 0 else { throw Failure(description: "recv: errno \(errno)") }
            received += chunk[0..<count]
        }
    }

    func send(_ text: String) throws {
        let bytes = Array(text.utf8)
        let count = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard count == bytes.count else { throw Failure(description: "send: errno \(errno)") }
    }
}
