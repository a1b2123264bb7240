import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Supervisor
import Testing

/// flotillad --qmp-handoff: each client of `<vm>/qmp.sock` is passed to the worker (QMP
/// getfd + add_client) and served by it directly, against real flotilla-vmm workers.
@Suite("QMP hand-off (flotillad --qmp-handoff)", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct QMPHandoffTests {
    @Test("several clients at once: each greeted by the worker, negotiating on its own, with its own ids and every event")
    func severalClients() throws {
        let daemon = try FlotilladHarness(["--qmp-handoff"]).start()
        defer { daemon.cleanUp() }
        try daemon.createVM("hand")
        let path = daemon.runtime + "/vms/hand/qmp.sock"
        let clients = try (0..<4).map { _ in try QMPTestClient(path: path) }
        for client in clients {
            let greeting = try client.receive()
            #expect(greeting["QMP"]?.objectValue?["version"]?.objectValue?["package"]?.stringValue?.hasPrefix("flotilla-vmm") == true)
        }
        // Each one is in negotiation mode of its own.
        let early = try clients[3].execute("query-status", id: "early")
        #expect(early["id"] == "early")
        #expect(early["error"]?.objectValue?["desc"] == "Expecting capabilities negotiation with 'qmp_capabilities'")
        for client in clients.prefix(3) {
            try client.send(QMP.Command(name: "qmp_capabilities"))
            #expect(try client.receive()["return"] == .object([:]))
        }
        #expect(try clients[0].execute("qmp_capabilities", id: 9)["error"]?.objectValue?["class"] == "CommandNotFound")

        // Interleaved commands with the same and different ids of every JSON type, all in flight.
        let ids: [[JSONValue?]] = [
            [.integer(1), "same", .bool(false)],
            [.integer(1), ["nested": [1, 2, ["x": nil]]], nil],
            ["same", .bool(true), .integer(UInt64.max)],
        ]
        for round in 0..<3 {
            for (index, client) in clients.prefix(3).enumerated() {
                try client.send(QMP.Command(name: round == 1 ? "query-name" : "query-status", id: ids[index][round]))
            }
        }
        for (index, client) in clients.prefix(3).enumerated() {
            for round in 0..<3 {
                var events: [JSONObject] = []
                let reply = try client.reply(events: &events)
                #expect(reply["id"] == ids[index][round], "client \(index) round \(round): \(reply)")
                if round == 1 {
                    #expect(reply["return"]?.objectValue?["name"] == "hand")
                } else {
                    #expect(reply["return"]?.objectValue?["status"] == "running")
                }
            }
        }

        // Events reach every negotiated client, and flotillad's own connection: the VM's state follows.
        #expect(try clients[0].execute("stop", id: "s")["id"] == "s")
        for client in clients.dropFirst().prefix(2) { #expect(try client.waitForEvent("STOP")["event"] == "STOP") }
        try waitUntil("the VM shows paused") { try daemon.status("hand")["state"] == "paused" }
        // The client still negotiating got no STOP: its first message is this reply.
        try clients[3].send(QMP.Command(name: "qmp_capabilities", id: "late"))
        #expect(try clients[3].receive()["id"] == "late")
        // The worker sends RESUME before cont's reply; the asker sees it like everyone else.
        try clients[1].send(QMP.Command(name: "cont", id: "c"))
        var events: [JSONObject] = []
        #expect(try clients[1].reply(events: &events)["id"] == "c")
        #expect(events.map { $0["event"] } == ["RESUME"])
        for (index, client) in clients.enumerated() where index != 1 {
            #expect(try client.waitForEvent("RESUME")["event"] == "RESUME")
        }
        try waitUntil("the VM shows running") { try daemon.status("hand")["state"] == "running" }
        #expect(try clients[2].execute("query-status", id: "after")["id"] == "after")
    }

    @Test("a real third-party client: Python's qemu.qmp, two at once, beside a raw client")
    func pythonQemuQMP() throws {
        try QMPMultiplexerTests.checkPythonClient(flotilladArguments: ["--qmp-handoff"])
    }

    @Test("a handed-off client is still answered after flotillad is SIGKILLed and while a new one re-attaches")
    func survivesFlotilladRestart() throws {
        let daemon = try FlotilladHarness(["--qmp-handoff"]).start()
        defer { daemon.cleanUp() }
        try daemon.createVM("keep")
        let pid = try #require(try daemon.pid(of: "keep"))
        let path = daemon.runtime + "/vms/keep/qmp.sock"
        let client = try QMPTestClient(path: path)
        try client.handshake()
        #expect(try client.execute("query-status", id: 1)["return"]?.objectValue?["status"] == "running")

        daemon.killHard()
        // flotillad is gone; the worker serves the client itself.
        #expect(isAlive(pid))
        let alone = try client.execute("query-name", id: 2)
        #expect(alone["id"] == 2)
        #expect(alone["return"]?.objectValue?["name"] == "keep")
        #expect(try client.execute("stop", id: 3)["id"] == 3)

        try daemon.start()
        try waitUntil("the new flotillad re-attached the VM, paused") { try daemon.status("keep")["state"] == "paused" }
        #expect(try daemon.pid(of: "keep") == pid)
        #expect(try daemon.status("keep")["restart_count"] == 0)
        // The old client still works, and sees events caused through the new flotillad.
        let newcomer = try QMPTestClient(path: path)
        try newcomer.handshake()
        #expect(try newcomer.execute("cont", id: "c")["id"] == "c")
        #expect(try client.waitForEvent("RESUME")["event"] == "RESUME")
        #expect(try client.execute("query-status", id: 4)["return"]?.objectValue?["status"] == "running")
        try waitUntil("flotillad sees the VM running") { try daemon.status("keep")["state"] == "running" }
    }

    @Test("without the flag the multiplexer serves the socket: clients do not outlive flotillad")
    func multiplexerIsTheDefault() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        try daemon.createVM("mux")
        let client = try QMPTestClient(path: daemon.runtime + "/vms/mux/qmp.sock")
        try client.handshake()
        #expect(try client.execute("query-status", id: 1)["id"] == 1)
        daemon.killHard()
        #expect(throws: (any Error).self) { try client.execute("query-status", id: 2) }
    }
}
