import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Supervisor
import Testing

@Suite("QMP multiplexing at <runtime-dir>/vms/<name>/qmp.sock", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct QMPMultiplexerTests {
    @Test("several clients at once: each negotiates on its own and gets its own ids back, whatever JSON they are")
    func severalClients() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        try daemon.createVM("mux")
        let path = daemon.runtime + "/vms/mux/qmp.sock"
        let clients = try (0..<4).map { _ in try QMPTestClient(path: path) }
        for client in clients {
            let greeting = try client.receive()
            #expect(greeting["QMP"]?.objectValue?["version"]?.objectValue?["package"]?.stringValue?.hasPrefix("flotilla-vmm") == true)
        }
        // Before negotiation a client may only negotiate.
        try clients[3].send(QMP.Command(name: "query-status", id: "early"))
        let early = try clients[3].receive()
        #expect(early["id"] == "early")
        #expect(early["error"]?.objectValue?["class"] == "CommandNotFound")
        #expect(early["error"]?.objectValue?["desc"] == "Expecting capabilities negotiation with 'qmp_capabilities'")
        for client in clients.prefix(3) {
            try client.send(QMP.Command(name: "qmp_capabilities"))
            #expect(try client.receive()["return"] == .object([:]))
        }
        let again = try clients[0].execute("qmp_capabilities", id: 9)
        #expect(again["error"]?.objectValue?["class"] == "CommandNotFound")
        #expect(again["id"] == 9)

        // Interleaved commands from three clients with ids of every JSON type, all in flight at once.
        let ids: [[JSONValue?]] = [
            [.integer(1), "same", .number(try #require(JSONValue.parse("1.50").numberValue))],
            [.integer(1), ["nested": [1, 2, ["x": nil]]], nil],
            ["same", .bool(true), .integer(UInt64.max)],
        ]
        for round in 0..<3 {
            for (index, client) in clients.prefix(3).enumerated() {
                let name = round == 1 ? "query-name" : "query-status"
                try client.send(QMP.Command(name: name, id: ids[index][round]))
            }
        }
        for (index, client) in clients.prefix(3).enumerated() {
            for round in 0..<3 {
                var events: [JSONObject] = []
                let reply = try client.reply(events: &events)
                #expect(reply["id"] == ids[index][round], "client \(index) round \(round): \(reply)")
                if round == 1 {
                    #expect(reply["return"]?.objectValue?["name"] == "mux")
                } else {
                    #expect(reply["return"]?.objectValue?["status"] == "running")
                }
            }
        }
        // The 1.50 id came back byte for byte.
        try clients[0].sendRaw("{\"execute\":\"query-status\",\"id\":1.50}\n")
        var raw = [UInt8](repeating: 0, count: 4096)
        let count = recv(clients[0].fd, &raw, raw.count, 0)
        #expect(String(decoding: raw[0..<max(0, count)], as: UTF8.self).contains("\"id\": 1.50}"))
        // An id key spelled with an escape is an id all the same.
        try clients[1].sendRaw("{\"execute\":\"query-status\",\"\\u0069d\":\"esc\"}\n")
        var events: [JSONObject] = []
        #expect(try clients[1].reply(events: &events)["id"] == "esc")
        // No id asked, none answered: the wire id is cut out cleanly, leaving valid JSON.
        try clients[2].sendRaw("{ \"execute\" : \"query-status\" }\n")
        let plain = recv(clients[2].fd, &raw, raw.count, 0)
        let text = String(decoding: raw[0..<max(0, plain)], as: UTF8.self)
        #expect(!text.contains("\"id\""), "\(text)")
        #expect(try JSONValue.parse(text.trimmingCharacters(in: .whitespacesAndNewlines)).objectValue?["return"] != nil, "\(text)")
    }

    @Test("events reach every negotiated client and no un-negotiated one; STOP/RESUME change the VM's state")
    func eventFanOut() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        try daemon.createVM("events")
        let path = daemon.runtime + "/vms/events/qmp.sock"
        let a = try QMPTestClient(path: path)
        let b = try QMPTestClient(path: path)
        let quiet = try QMPTestClient(path: path)
        try a.handshake()
        try b.handshake()
        _ = try quiet.receive()
        try a.send(QMP.Command(name: "stop", id: "s"))
        var aEvents: [JSONObject] = []
        #expect(try a.reply(events: &aEvents)["id"] == "s")
        // The worker sends STOP before its reply; the asker sees it like everyone else.
        #expect(aEvents.map { $0["event"] } == ["STOP"])
        let stopEvent = try b.waitForEvent("STOP")
        #expect(stopEvent["timestamp"]?.objectValue?["seconds"] != nil)
        try waitUntil("the VM shows paused") { try daemon.status("events")["state"] == "paused" }
        // Had STOP been sent to the un-negotiated client it would arrive before this reply.
        try quiet.send(QMP.Command(name: "qmp_capabilities", id: "late"))
        let first = try quiet.receive()
        #expect(first["id"] == "late")
        #expect(first["event"] == nil)
        _ = try b.execute("cont")
        #expect(try a.waitForEvent("RESUME")["event"] == "RESUME")
        #expect(try quiet.waitForEvent("RESUME")["event"] == "RESUME")
        try waitUntil("the VM shows running") { try daemon.status("events")["state"] == "running" }
    }

    @Test("garbage and mid-command disconnects lose nothing and mix nothing up for other clients")
    func robustness() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        try daemon.createVM("robust")
        let path = daemon.runtime + "/vms/robust/qmp.sock"
        let steady = try QMPTestClient(path: path)
        try steady.handshake()
        // A client that sends garbage gets errors and keeps its connection.
        let noisy = try QMPTestClient(path: path)
        try noisy.handshake()
        try noisy.sendRaw(
            "} 42 {\"execute\": \"query-status\", \"arguments\": 7, \"id\": \"g\"} {\"id\": 3} {\"execute\":\"query-name\",\"id\":\"ok\"}\n"
        )
        let errors = try (0..<4).map { _ in try noisy.receive() }
        #expect(errors[0]["error"]?.objectValue?["desc"]?.stringValue?.contains("JSON parse error") == true, "\(errors[0])")
        #expect(errors[1]["error"]?.objectValue?["desc"] == "QMP input must be a JSON object")
        #expect(errors[2]["error"]?.objectValue?["desc"] == "QMP input member 'arguments' must be an object")
        #expect(errors[2]["id"] == "g")
        #expect(errors[3]["error"]?.objectValue?["desc"] == "QMP input lacks member 'execute'")
        #expect(errors[3]["id"] == 3)
        let ok = try noisy.receive()
        #expect(ok["id"] == "ok")
        #expect(ok["return"]?.objectValue?["name"] == "robust")
        // Unknown commands are the worker's to refuse, and the refusal comes back to the asker.
        let unknown = try noisy.execute("no-such-command", id: "u")
        #expect(unknown["id"] == "u")
        #expect(unknown["error"]?.objectValue?["class"] == "CommandNotFound")

        // Clients that leave with commands in flight.
        for _ in 0..<5 {
            let leaver = try QMPTestClient(path: path)
            try leaver.handshake()
            for index in 0..<20 { try leaver.send(QMP.Command(name: "query-status", id: .integer(index))) }
            try leaver.sendRaw("{\"execute\": \"query-na")  // and a half-written command
        }
        // The steady client's commands still each get their own reply, in order.
        for index in 0..<30 {
            let reply = try steady.execute(index % 2 == 0 ? "query-status" : "query-name", id: .string("steady-\(index)"))
            #expect(reply["id"] == .string("steady-\(index)"))
            #expect(reply["return"] != nil)
        }
        #expect(try daemon.status("robust")["state"] == "running")
    }

    @Test("a real third-party client: Python's qemu.qmp, two at once, beside a raw client")
    func pythonQemuQMP() throws {
        try Self.checkPythonClient(flotilladArguments: [])
    }

    /// Python's qemu.qmp (two clients at once, pythonClient) against a VM of flotillad started
    /// with `flotilladArguments`, beside a raw client that sees the events Python caused.
    static func checkPythonClient(flotilladArguments: [String]) throws {
        let python = "/usr/bin/env"
        let probe = try run(python, ["python3", "-c", "import qemu.qmp"])
        try #require(probe.status == 0, "Python's qemu.qmp is needed: pip install qemu.qmp (\(probe.standardError))")
        let daemon = try FlotilladHarness(flotilladArguments).start()
        defer { daemon.cleanUp() }
        try daemon.createVM("py")
        let path = daemon.runtime + "/vms/py/qmp.sock"
        let raw = try QMPTestClient(path: path)
        try raw.handshake()
        let script = daemon.directory.file("client.py")
        try Data(pythonClient.utf8).write(to: URL(fileURLWithPath: script))
        let result = try run(python, ["python3", script, path])
        #expect(result.status == 0, "\(result.standardOutput)\n\(result.standardError)")
        let lines = result.standardOutput.split(separator: "\n").map(String.init)
        #expect(lines.contains("status running running"), "\(lines)")
        #expect(lines.contains("name py"), "\(lines)")
        #expect(lines.contains("event STOP"), "\(lines)")
        #expect(lines.contains("event RESUME"), "\(lines)")
        #expect(lines.contains("error CommandNotFound"), "\(lines)")
        #expect(lines.last == "done")
        // The raw client saw the events Python caused.
        #expect(try raw.waitForEvent("STOP")["event"] == "STOP")
        #expect(try raw.waitForEvent("RESUME")["event"] == "RESUME")
    }

    static let pythonClient = #"""
        import asyncio, sys
        from qemu.qmp import QMPClient, ExecuteError

        async def main(path):
            a = QMPClient('a')
            b = QMPClient('b')
            await a.connect(path)
            await b.connect(path)
            sa, sb = await asyncio.gather(a.execute('query-status'), b.execute('query-status'))
            print('status', sa['status'], sb['status'])
            print('name', (await b.execute('query-name'))['name'])
            with b.listener() as listener:
                await a.execute('stop')
                async for event in listener:
                    print('event', event['event'])
                    if event['event'] == 'STOP':
                        await a.execute('cont')
                    if event['event'] == 'RESUME':
                        break
            try:
                await a.execute('no-such-command')
            except ExecuteError as error:
                print('error', error.error_class)
            await a.disconnect()
            await b.disconnect()
            print('done')

        asyncio.run(asyncio.wait_for(main(sys.argv[1]), 60))
        """#
}
