import CLinux
import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Synchronization
import Testing

@testable import VMMWorker

@Suite("QMP server")
struct QMPServerTests {
    final class CallLog: Sendable {
        let names = Mutex<[String]>([])
    }

    /// A server on a fresh socket with a few commands, its loop on its own thread.
    final class Fixture: Sendable {
        let directory: TemporaryDirectory
        let loop: EventLoop
        let server: QMPServer
        let calls = CallLog()

        init() throws {
            directory = try TemporaryDirectory()
            loop = try EventLoop(name: "test-qmp")
            var table = QMPCommandTable()
            let calls = self.calls
            table.register("echo") { arguments in
                calls.names.withLock { $0.append("echo") }
                return .success(.object(arguments))
            }
            table.register("fail") { _ in .failure(QMPCommandError(.genericError, "it failed")) }
            server = try QMPServer(path: directory.file("qmp.sock"), loop: loop, commands: table, package: "test")
            _ = try loop.startThread()
        }

        func shutdown() {
            let done = CallLog()
            loop.execute { [server] in
                server.close()
                done.names.withLock { $0.append("closed") }
            }
            while done.names.withLock({ $0.isEmpty }) { usleep(1000) }
            loop.stop()
            directory.remove()
        }
    }

    @Test("greeting, negotiation mode, commands, errors and ids")
    func conversation() throws {
        let fixture = try Fixture()
        defer { fixture.shutdown() }
        let client = try QMPTestClient(path: fixture.server.path)
        let greeting = try client.receive()
        #expect(greeting["QMP"]?.objectValue?["capabilities"] == [])

        // Before qmp_capabilities only qmp_capabilities is accepted (QMP spec §4).
        var events: [JSONObject] = []
        try client.send(QMP.Command(name: "echo", id: "early"))
        let early = try client.reply(events: &events)
        #expect(early["error"]?.objectValue?["class"] == "CommandNotFound")
        #expect(early["id"] == "early")
        #expect(fixture.calls.names.withLock { $0.isEmpty })

        try client.send(QMP.Command(name: "qmp_capabilities", id: 1))
        #expect(try client.reply(events: &events)["return"] == .object([:]))

        let id: JSONValue = ["nested": [1, "two", nil], "n": .number(JSONNumber(integer: UInt64.max))]
        let echoed = try client.execute("echo", arguments: ["x": 1], id: id)
        #expect(echoed["return"] == ["x": 1])
        #expect(echoed["id"] == id)

        let failed = try client.execute("fail", id: 2)
        #expect(failed["error"]?.objectValue?["desc"] == "it failed")
        let missing = try client.execute("nope")
        #expect(missing["error"]?.objectValue?["class"] == "CommandNotFound")
        let again = try client.execute("qmp_capabilities")
        #expect(again["error"]?.objectValue?["class"] == "CommandNotFound")
        let commands = try client.execute("query-commands")
        let names = commands["return"]?.arrayValue?.compactMap { $0.objectValue?["name"]?.stringValue } ?? []
        #expect(names.contains("echo") && names.contains("query-commands") && names.contains("qmp_capabilities"))
    }

    @Test("garbage, split and batched input; the connection survives")
    func robustness() throws {
        let fixture = try Fixture()
        defer { fixture.shutdown() }
        let client = try QMPTestClient(path: fixture.server.path)
        try client.handshake()
        var events: [JSONObject] = []
        try client.sendRaw("}]} [1] \"x\" {\"execute\": 5}")
        for _ in 0..<6 {
            let reply = try client.reply(events: &events)
            #expect(reply["error"]?.objectValue?["class"] == "GenericError")
        }
        // Two commands in one write, then one command split over three writes.
        try client.sendRaw(#"{"execute":"echo","id":1}{"execute":"echo","id":2}"#)
        #expect(try client.reply(events: &events)["id"] == 1)
        #expect(try client.reply(events: &events)["id"] == 2)
        try client.sendRaw(#"{"exec"#)
        usleep(10_000)
        try client.sendRaw(#"ute": "echo", "#)
        usleep(10_000)
        try client.sendRaw(#""id": 3}"#)
        #expect(try client.reply(events: &events)["id"] == 3)
    }

    @Test("events reach every negotiated client, not clients still negotiating")
    func events() throws {
        let fixture = try Fixture()
        defer { fixture.shutdown() }
        let first = try QMPTestClient(path: fixture.server.path)
        try first.handshake()
        let second = try QMPTestClient(path: fixture.server.path)
        try second.handshake()
        let pending = try QMPTestClient(path: fixture.server.path)
        _ = try pending.receive()  // greeting only
        fixture.server.broadcast(event: "STOP")
        #expect(try first.waitForEvent("STOP")["timestamp"]?.objectValue?["seconds"] != nil)
        #expect(try second.waitForEvent("STOP")["data"] == .object([:]))
        // The client still negotiating gets only its reply, no STOP.
        try pending.send(QMP.Command(name: "qmp_capabilities", id: "p"))
        #expect(try pending.receive()["id"] == "p")
    }

    @Test("a client that disconnects mid-command does not disturb the others")
    func disconnect() throws {
        let fixture = try Fixture()
        defer { fixture.shutdown() }
        do {
            let leaving = try QMPTestClient(path: fixture.server.path)
            try leaving.handshake()
            try leaving.sendRaw(#"{"execute": "echo", "id": "#)
        }
        let staying = try QMPTestClient(path: fixture.server.path)
        try staying.handshake()
        #expect(try staying.execute("echo", id: 9)["id"] == 9)
    }

    @Test("the socket must not exist beforehand, and is removed on close")
    func socketLifecycle() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let loop = try EventLoop(name: "test-qmp")
        let path = directory.file("qmp.sock")
        let stale = open(path, O_CREAT | O_WRONLY, 0o600)
        close(stale)
        #expect(throws: SyscallError.self) {
            _ = try QMPServer(path: path, loop: loop, commands: QMPCommandTable(), package: "test")
        }
        unlink(path)
        let server = try QMPServer(path: path, loop: loop, commands: QMPCommandTable(), package: "test")
        var info = stat()
        #expect(stat(path, &info) == 0 && info.st_mode & 0o777 == 0o600)
        server.close()
        #expect(access(path, F_OK) != 0)
    }

    @Test("a server opened before its commands greets and negotiates at once, then answers held commands in order")
    func commandsHeldUntilOpen() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let loop = try EventLoop(name: "test-qmp")
        let server = try QMPServer(path: directory.file("qmp.sock"), loop: loop, package: "test")
        let thread = try loop.startThread()
        defer {
            loop.execute { server.close() }
            loop.stop()
            HostThread.join(thread)
        }
        let first = try QMPTestClient(path: server.path)
        let second = try QMPTestClient(path: server.path)
        #expect(try first.receive()["QMP"] != nil)
        #expect(try second.receive()["QMP"] != nil)
        var events: [JSONObject] = []
        try first.send(QMP.Command(name: "qmp_capabilities", id: 0))
        #expect(try first.reply(events: &events)["return"] == .object([:]))
        try second.send(QMP.Command(name: "qmp_capabilities", id: 0))
        #expect(try second.reply(events: &events)["return"] == .object([:]))

        // Sent before the table exists: held, not refused.
        try first.send(QMP.Command(name: "echo", arguments: ["n": 1], id: "a"))
        try second.send(QMP.Command(name: "echo", arguments: ["n": 2], id: "b"))
        try first.send(QMP.Command(name: "echo", arguments: ["n": 3], id: "c"))
        // A round trip through the loop proves all three were read before the table came.
        let seen = Mutex(false)
        loop.execute { seen.withLock { $0 = true } }
        while !seen.withLock({ $0 }) { usleep(1000) }

        let order = Mutex<[Int]>([])
        var table = QMPCommandTable()
        table.register("echo") { arguments in
            if let value = arguments["n"]?.numberValue?.signedValue { order.withLock { $0.append(Int(value)) } }
            return .success(.object(arguments))
        }
        server.open(commands: table)
        let a = try first.reply(events: &events)
        let c = try first.reply(events: &events)
        let b = try second.reply(events: &events)
        #expect(a["id"] == "a" && a["return"] == ["n": 1])
        #expect(c["id"] == "c" && c["return"] == ["n": 3])
        #expect(b["id"] == "b" && b["return"] == ["n": 2])
        // Each connection's commands run in the order it sent them (across connections, in
        // the order the loop read them).
        let ran = order.withLock { $0 }
        #expect(ran.sorted() == [1, 2, 3])
        #expect((ran.firstIndex(of: 1) ?? 3) < (ran.firstIndex(of: 3) ?? 0), "\(ran)")
        // Once open, commands are answered at once.
        #expect(try second.execute("echo", arguments: ["n": 4])["return"] == ["n": 4])
    }
}

/// getfd, closefd and add_client (QMP reference): descriptors passed with SCM_RIGHTS.
/// Descriptors are followed by the inode of the pipe or socket they name, looked up in
/// /proc/self/fd, so other tests running in parallel in this process do not disturb the count.
@Suite("QMP server: file descriptor passing")
struct QMPDescriptorPassingTests {
    /// Sends `text` with `fd` attached (SCM_RIGHTS) in one sendmsg.
    func send(_ text: String, passing fd: Int32, on client: QMPTestClient) throws {
        let bytes = Array(text.utf8)
        let sent = bytes.withUnsafeBytes { fl_send_with_fd(client.fd, $0.baseAddress, $0.count, 0, fd) }
        try #require(sent == bytes.count, "sendmsg: errno \(errno)")
    }

    /// The read end of a fresh pipe (its write end closed at once: both ends name the same
    /// inode); the caller closes it.
    func pipeEnd() throws -> Int32 {
        var ends: [Int32] = [-1, -1]
        try #require(pipe(&ends) == 0)
        close(ends[1])
        return ends[0]
    }

    /// What /proc/self/fd/N links to for `fd`, e.g. "pipe:[1234]".
    func target(of fd: Int32) -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) ?? ""
    }

    /// How many descriptors of this process name `target`.
    func holders(of target: String) -> Int {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return fds.filter { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\($0)")) == target }.count
    }

    /// Waits (the deadline only guards against a hang) until `target` has `count` holders.
    func expectHolders(_ target: String, _ count: Int, _ comment: Comment) {
        for _ in 0..<2000 where holders(of: target) != count { usleep(5000) }
        #expect(holders(of: target) == count, comment)
    }

    @Test("getfd keeps the descriptor that came with it; without one, QEMU's error; closefd closes it")
    func getfdAndClosefd() throws {
        let fixture = try QMPServerTests.Fixture()
        defer { fixture.shutdown() }
        let client = try QMPTestClient(path: fixture.server.path)
        try client.handshake()
        var events: [JSONObject] = []

        let missing = try client.execute("getfd", arguments: ["fdname": "x"], id: 1)
        #expect(missing["error"]?.objectValue?["class"] == "GenericError")
        #expect(missing["error"]?.objectValue?["desc"] == "No file descriptor supplied via SCM_RIGHTS")
        #expect(missing["id"] == 1)

        let pipe = try pipeEnd()
        let name = target(of: pipe)
        try send(#"{"execute": "getfd", "arguments": {"fdname": "log"}, "id": 2}"# + "\r\n", passing: pipe, on: client)
        close(pipe)
        let kept = try client.reply(events: &events)
        #expect(kept["return"] == .object([:]), "\(kept)")
        #expect(kept["id"] == 2)
        #expect(holders(of: name) == 1, "the server holds the passed descriptor")

        // The same name again replaces (and closes) the first, as QEMU's monitor_add_fd does.
        let second = try pipeEnd()
        let secondName = target(of: second)
        try send(#"{"execute": "getfd", "arguments": {"fdname": "log"}}"#, passing: second, on: client)
        close(second)
        #expect(try client.reply(events: &events)["return"] == .object([:]))
        #expect(holders(of: name) == 0)
        #expect(holders(of: secondName) == 1)

        // A name starting with a digit is refused and the descriptor closed.
        let digit = try pipeEnd()
        let digitName = target(of: digit)
        try send(#"{"execute": "getfd", "arguments": {"fdname": "3"}}"#, passing: digit, on: client)
        close(digit)
        #expect(
            try client.reply(events: &events)["error"]?.objectValue?["desc"]
                == "Parameter 'fdname' expects a name not starting with a digit")
        #expect(holders(of: digitName) == 0)

        #expect(try client.execute("getfd")["error"]?.objectValue?["desc"] == "Parameter 'fdname' is missing")
        #expect(
            try client.execute("getfd", arguments: ["fdname": 5])["error"]?.objectValue?["desc"]
                == "Invalid parameter type for 'fdname', expected: string")
        #expect(
            try client.execute("closefd", arguments: ["fdname": "log", "extra": 1])["error"]?.objectValue?["desc"]
                == "Parameter 'extra' is unexpected")

        #expect(try client.execute("closefd", arguments: ["fdname": "log"])["return"] == .object([:]))
        #expect(holders(of: secondName) == 0)
        let unknown = try client.execute("closefd", arguments: ["fdname": "log"], id: "c")
        #expect(unknown["error"]?.objectValue?["desc"] == "File descriptor named 'log' not found")
        #expect(unknown["id"] == "c")

        let commands = try client.execute("query-commands")
        let names = commands["return"]?.arrayValue?.compactMap { $0.objectValue?["name"]?.stringValue } ?? []
        #expect(names.contains("getfd") && names.contains("closefd") && names.contains("add_client"), "\(names)")
    }

    @Test("add_client makes a passed socket a QMP client of its own: greeting, negotiation, commands, events")
    func addClient() throws {
        let fixture = try QMPServerTests.Fixture()
        defer { fixture.shutdown() }
        let owner = try QMPTestClient(path: fixture.server.path)
        try owner.handshake()
        var events: [JSONObject] = []

        // The new client connects to a listener of the test's own; the accepted end is passed.
        let listenerPath = fixture.directory.file("handoff.sock")
        let listener = try listenUnix(listenerPath)
        defer { close(listener) }
        let newcomer = try QMPTestClient(path: listenerPath)
        let accepted = accept(listener, nil, nil)
        try #require(accepted >= 0)
        let socketName = target(of: accepted)
        try send(#"{"execute": "getfd", "arguments": {"fdname": "c1"}, "id": 1}"#, passing: accepted, on: owner)
        close(accepted)
        #expect(try owner.reply(events: &events)["return"] == .object([:]))
        let added = try owner.execute("add_client", arguments: ["protocol": "qmp", "fdname": "c1", "skipauth": true], id: 2)
        #expect(added["return"] == .object([:]), "\(added)")
        #expect(added["id"] == 2)
        // add_client takes the descriptor from the table (QEMU's monitor_get_fd).
        #expect(
            try owner.execute("closefd", arguments: ["fdname": "c1"])["error"]?.objectValue?["desc"]
                == "File descriptor named 'c1' not found")

        // Greeted like any client, in negotiation mode of its own.
        let greeting = try newcomer.receive()
        #expect(greeting["QMP"]?.objectValue?["version"] != nil)
        #expect(try newcomer.execute("echo", id: "early")["error"]?.objectValue?["class"] == "CommandNotFound")
        try newcomer.send(QMP.Command(name: "qmp_capabilities", id: "n"))
        #expect(try newcomer.reply(events: &events)["id"] == "n")
        let echoed = try newcomer.execute("echo", arguments: ["k": "v"], id: 7)
        #expect(echoed["return"] == ["k": "v"])
        #expect(echoed["id"] == 7)
        fixture.server.broadcast(event: "STOP")
        #expect(try newcomer.waitForEvent("STOP")["event"] == "STOP")
        #expect(try owner.waitForEvent("STOP")["event"] == "STOP")

        // The client stays when the connection that added it leaves.
        shutdown(owner.fd, Int32(SHUT_RDWR))
        #expect(try newcomer.execute("echo", id: 8)["id"] == 8)
        #expect(holders(of: socketName) == 1, "the server holds the client socket once")
    }

    @Test("add_client errors: unknown name, other protocols, tls, a descriptor that is not a socket")
    func addClientErrors() throws {
        let fixture = try QMPServerTests.Fixture()
        defer { fixture.shutdown() }
        let client = try QMPTestClient(path: fixture.server.path)
        try client.handshake()
        var events: [JSONObject] = []
        func desc(_ reply: JSONObject) -> String? { reply["error"]?.objectValue?["desc"]?.stringValue }

        #expect(
            desc(try client.execute("add_client", arguments: ["protocol": "qmp", "fdname": "nope"]))
                == "File descriptor named 'nope' has not been found")
        #expect(desc(try client.execute("add_client", arguments: ["fdname": "x"])) == "Parameter 'protocol' is missing")
        #expect(
            desc(try client.execute("add_client", arguments: ["protocol": "qmp", "fdname": "x", "tls": true]))
                == "Parameter 'tls' value 'true' is not supported: the QMP socket has no TLS; allowed: false")

        var ends: [Int32] = [-1, -1]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &ends) == 0)
        defer { close(ends[1]) }
        let socketName = target(of: ends[0])
        try send(#"{"execute": "getfd", "arguments": {"fdname": "s"}}"#, passing: ends[0], on: client)
        close(ends[0])
        #expect(try client.reply(events: &events)["return"] == .object([:]))
        #expect(
            desc(try client.execute("add_client", arguments: ["protocol": "vnc", "fdname": "s"]))
                == "protocol 'vnc' is invalid; allowed: 'qmp' (a new QMP client of this server)")
        // Refused, it is closed, as QEMU closes it.
        #expect(holders(of: socketName) == 0)

        let pipe = try pipeEnd()
        let pipeName = target(of: pipe)
        try send(#"{"execute": "getfd", "arguments": {"fdname": "p"}}"#, passing: pipe, on: client)
        close(pipe)
        #expect(try client.reply(events: &events)["return"] == .object([:]))
        #expect(
            desc(try client.execute("add_client", arguments: ["protocol": "qmp", "fdname": "p"])) == "parameter @fdname must name a socket")
        #expect(holders(of: pipeName) == 0)
    }

    @Test("descriptors that come without a command claiming them are closed, not leaked")
    func strayDescriptorsClosed() throws {
        let fixture = try QMPServerTests.Fixture()
        defer { fixture.shutdown() }
        let client = try QMPTestClient(path: fixture.server.path)
        _ = try client.receive()
        var events: [JSONObject] = []
        let pipe = try pipeEnd()
        let name = target(of: pipe)
        let before = holders(of: name)
        #expect(before == 1)

        // Before negotiation, even with getfd: refused, closed.
        try send(#"{"execute": "getfd", "arguments": {"fdname": "a"}}"#, passing: pipe, on: client)
        #expect(try client.reply(events: &events)["error"]?.objectValue?["class"] == "CommandNotFound")
        try send(#"{"execute": "qmp_capabilities"}"#, passing: pipe, on: client)
        #expect(try client.reply(events: &events)["return"] == .object([:]))
        // With a command that does not claim it.
        try send(#"{"execute": "echo", "id": 1}"#, passing: pipe, on: client)
        #expect(try client.reply(events: &events)["id"] == 1)
        // With white space alone.
        try send("\r\n", passing: pipe, on: client)
        // With garbage, and with a malformed command.
        try send("}", passing: pipe, on: client)
        #expect(try client.reply(events: &events)["error"] != nil)
        try send(#"{"execute": 5}"#, passing: pipe, on: client)
        #expect(try client.reply(events: &events)["error"] != nil)
        // With the first half of a command: it goes with that command, echo, which closes it.
        try send(#"{"execute": "ec"#, passing: pipe, on: client)
        try client.sendRaw(#"ho", "id": 2}"#)
        #expect(try client.reply(events: &events)["id"] == 2)
        // A round trip after all of the above: each has been read and handled.
        #expect(try client.execute("echo", id: 3)["id"] == 3)
        #expect(holders(of: name) == before, "only the test's own copy is left")

        // Held under a name, or mid-command, when the client leaves: closed with the connection.
        let leaving = try QMPTestClient(path: fixture.server.path)
        try leaving.handshake()
        try send(#"{"execute": "getfd", "arguments": {"fdname": "kept"}}"#, passing: pipe, on: leaving)
        #expect(try leaving.reply(events: &events)["return"] == .object([:]))
        try send(#"{"execute": "getfd", "argu"#, passing: pipe, on: leaving)
        close(pipe)
        expectHolders(name, 2, "kept and pending, while the client is connected")
        // shutdown, not close: the client object still owns (and later closes) its descriptor.
        shutdown(leaving.fd, Int32(SHUT_RDWR))
        expectHolders(name, 0, "both closed with the connection")
    }
}

/// A listening Unix socket of the test's own at `path`.
func listenUnix(_ path: String) throws -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
    let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    try #require(bound == 0 && listen(fd, 4) == 0, "listen \(path): errno \(errno)")
    return fd
}
