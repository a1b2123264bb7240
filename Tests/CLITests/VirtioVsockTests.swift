import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Synchronization
import Testing

/// A Unix stream socket for the host side: listener, client, exact reads.
private struct HostSocket {
    let fd: Int32

    static func address(_ path: String) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(path.utf8)
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }

    /// Every blocking call gives up after 60 s, so a missing peer fails the test.
    static func withTimeout(_ fd: Int32) -> HostSocket {
        var timeout = timeval(tv_sec: 60, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        return HostSocket(fd: fd)
    }

    static func listen(_ path: String) throws -> HostSocket {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        var address = address(path)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        try #require(bound == 0 && Glibc.listen(fd, 8) == 0, "listen \(path): errno \(errno)")
        return withTimeout(fd)
    }

    static func connect(_ path: String) throws -> HostSocket {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        var address = address(path)
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        try #require(result == 0, "connect \(path): errno \(errno)")
        return withTimeout(fd)
    }

    func accept() -> HostSocket? {
        let client = Glibc.accept(fd, nil, nil)
        return client >= 0 ? Self.withTimeout(client) : nil
    }

    func send(_ text: String) {
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    func send(_ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Reads until `count` bytes, end of file or the timeout.
    func read(count: Int) -> [UInt8] {
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while out.count < count {
            let n = buffer.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, min($0.count, count - out.count), 0) }
            if n <= 0 { break }
            out += buffer[0..<n]
        }
        return out
    }

    /// Reads up to and including the first newline.
    func readLine() -> String {
        var out: [UInt8] = []
        var byte: UInt8 = 0
        while Glibc.recv(fd, &byte, 1, 0) == 1 {
            out.append(byte)
            if byte == UInt8(ascii: "\n") { break }
        }
        return String(decoding: out, as: UTF8.self)
    }

    func readToEnd() -> [UInt8] { read(count: Int.max) }

    func close() { Glibc.close(fd) }
}

/// virtio-vsock end to end: flotilla-vmm serving `-device vsock,...,uds-path=` on real Unix
/// sockets, the test guest's virtio-vsock driver on real /dev/kvm, seccomp on (the default).
@Suite("virtio-vsock through the test guest", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct VirtioVsockTests {
    let vmm = Executables.path("flotilla-vmm")

    @Test(
        "the guest connects to UDS_PATH_PORT and gets its bytes echoed; a host client CONNECTs through UDS_PATH and gets its bytes echoed; the socket goes on exit"
    )
    func bothDirections() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let uds = directory.file("v.sock")
        let api = directory.file("api.sock")
        let port: UInt32 = 5123
        let nonce = String(UInt32.random(in: 1...UInt32.max), radix: 16)

        // The host's echo server for guest-initiated connections to port 5123: it records
        // what it read and writes it back, until the guest closes.
        let server = try HostSocket.listen("\(uds)_\(port)")
        let received = Mutex<[UInt8]>([])
        let serverDone = Mutex(false)
        let serverFD = server.fd
        let echo = Thread {
            defer { serverDone.withLock { $0 = true } }
            guard let client = HostSocket(fd: serverFD).accept() else { return }
            defer { client.close() }
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = buffer.withUnsafeMutableBytes { Glibc.recv(client.fd, $0.baseAddress, $0.count, 0) }
                if n <= 0 { return }
                let bytes = Array(buffer[0..<n])
                received.withLock { $0 += bytes }
                client.send(bytes)
            }
        }
        echo.start()
        defer { server.close() }

        let process = try BackgroundProcess(
            vmm,
            [
                "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append",
                "console=ttyS0 flotilla.hold=1 flotilla.vsock=\(port) flotilla.nonce=\(nonce)", "-device",
                "vsock,id=vs0,guest-cid=7,uds-path=\(uds)", "-api-channel", "unix:\(api)",
            ])
        let qmp = try QMPTestClient(path: api)
        try qmp.handshake()
        var info = stat()
        #expect(stat(uds, &info) == 0 && (info.st_mode & S_IFMT) == S_IFSOCK && info.st_mode & 0o777 == 0o600)

        #expect(process.waitForLine(containing: "fact vsock-listen port=\(port)", timeout: 120), "\(process.standardOutput)")
        let report = GuestReport(output: process.standardOutput)
        let fact = try #require(report.fact("device virtio-vsock"), "\(process.standardOutput)")
        // The first optional slot (docs/guest-abi.md): no consoles, so vsock.
        #expect(fact["cid"] == "7" && fact["base"] == "0xd0006000" && fact["irq"] == "11")
        for name in ["vsock_init", "vsock_connect", "vsock_echo", "vsock_close"] {
            #expect(report.checks[name] == "ok", "\(name): \(report.lines)")
        }
        // Exactly the guest's message reached the host (and went back: vsock_echo).
        #expect(waitFor { serverDone.withLock { $0 } }, "the guest's connection did not end")
        #expect(String(decoding: received.withLock { $0 }, as: UTF8.self) == "flotilla-vsock \(nonce)\n")

        // Host-initiated: CONNECT, OK <host port>, bytes echoed exactly, then close.
        let client = try HostSocket.connect(uds)
        client.send("CONNECT \(port)\n")
        let ok = client.readLine()
        #expect(ok.hasPrefix("OK ") && ok.hasSuffix("\n") && UInt32(ok.dropFirst(3).dropLast()) != nil, "\(ok)")
        let message = Array("ping \(nonce) ".utf8) + (0..<200).map { UInt8(ascii: "a") + UInt8($0 % 26) } + [10]
        client.send(message)
        #expect(client.read(count: message.count) == message)
        shutdown(client.fd, Int32(SHUT_WR))
        #expect(process.waitForLine(containing: "check vsock_accept ", timeout: 120), "\(process.standardOutput)")
        #expect(GuestReport(output: process.standardOutput).checks["vsock_accept"] == "ok", "\(process.standardOutput)")
        // The guest answered the shutdown with RST: the client reads end of file, nothing more.
        #expect(client.readToEnd().isEmpty)
        client.close()

        #expect(try qmp.execute("quit")["return"] == [:])
        #expect(process.wait() == 0, "\(process.standardError)")
        // The log says when the driver was ready and how the guest answered the host.
        #expect(process.standardError.contains("virtio-vsock 'vs0': driver ready, guest CID 7"), "\(process.standardError)")
        #expect(process.standardError.contains("to guest port \(port) accepted"), "\(process.standardError)")
        #expect(access(uds, F_OK) != 0, "the vsock socket was left behind")
        server.close()
        unlink("\(uds)_\(port)")
        let leftovers = try directory.contents().filter { $0 != "api.sock" }
        #expect(leftovers.isEmpty, "left behind: \(leftovers)")
    }

    @Test("an existing uds-path is refused naming it, the file untouched and nothing else left")
    func existingPath() throws {
        try expectExistingSocketPathRefused(vmm: vmm, option: "-device vsock id=vs0 uds-path") { taken in
            ["-device", "vsock,id=vs0,guest-cid=3,uds-path=\(taken)"]
        }
    }

    @Test("a guest CID out of range is a configuration error naming guest-cid, exit 1")
    func badCID() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let result = try run(
            vmm, ["-kernel", GuestImages.vmlinux, "-device", "vsock,id=vs0,guest-cid=2,uds-path=\(directory.file("v.sock"))"])
        #expect(result.status == 1)
        #expect(result.standardError.contains("guest-cid") && result.standardError.contains("3 to 4294967294"), "\(result.standardError)")
        #expect(try directory.contents().isEmpty, "left behind")
    }
}

/// Polls `condition` every 10 ms for up to 60 s.
private func waitFor(_ condition: () -> Bool) -> Bool {
    for _ in 0..<6000 {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}
