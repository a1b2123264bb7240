import FlotillaTestSupport
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
