import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Supervisor
import Testing

/// `flotillactl qmp / events / pause / resume` against a real flotillad with real workers,
/// in both ways flotillad serves `<vm>/qmp.sock`: multiplexed (the default) and handed off
/// to the worker (--qmp-handoff).
@Suite("flotillactl qmp, events, pause, resume", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct FlotillactlQMPTests {
    static let modes = ["multiplexer", "handoff"]

    static func daemon(_ mode: String) throws -> FlotilladHarness {
        try FlotilladHarness(mode == "handoff" ? ["--qmp-handoff"] : []).start()
    }

    static func lines(_ text: String) -> [String] {
        text.split(separator: "\n").map(String.init)
    }

    @Test("qmp prints the return value (indented, --compact, --raw) and exits 0; a QMP error is `class: desc` and exit 1", arguments: modes)
    func returnsAndErrors(mode: String) throws {
        let daemon = try Self.daemon(mode)
        defer { daemon.cleanUp() }
        try daemon.createVM("ctl")
        let socket = ["--socket", daemon.socket]

        let status = try flotillactl(socket + ["qmp", "ctl", "query-status"])
        #expect(status.status == 0, "\(status.standardError)")
        #expect(status.standardError.isEmpty, "\(status.standardError)")
        let value = try JSONValue.parse(status.standardOutput).objectValue
        #expect(value?["status"] == "running")
        #expect(value?["running"] == true)
        #expect(Self.lines(status.standardOutput).count > 1, "indented by default: \(status.standardOutput)")

        let compact = try flotillactl(socket + ["qmp", "ctl", "query-status", "--compact"])
        #expect(compact.status == 0)
        #expect(Self.lines(compact.standardOutput).count == 1, "\(compact.standardOutput)")
        #expect(try JSONValue.parse(compact.standardOutput).objectValue == value)

        // --raw: the reply line itself, with its id; shared options may come first.
        let raw = try flotillactl(socket + ["qmp", "--raw", "ctl", "query-name"])
        #expect(raw.status == 0)
        #expect(Self.lines(raw.standardOutput).count == 1, "\(raw.standardOutput)")
        let reply = try JSONValue.parse(raw.standardOutput).objectValue
        #expect(reply?["return"]?.objectValue?["name"] == "ctl")
        #expect(reply?["id"] != nil)

        // Arguments reach the VM: the empty object is accepted, an unknown member refused.
        let empty = try flotillactl(socket + ["qmp", "ctl", "query-kvm", "{}", "--compact"])
        #expect(empty.status == 0, "\(empty.standardError)")
        #expect(try JSONValue.parse(empty.standardOutput).objectValue?["enabled"] == true)
        let unexpected = try flotillactl(socket + ["qmp", "ctl", "query-kvm", "{\"bogus\": 1}"])
        #expect(unexpected.status == 1)
        #expect(unexpected.standardOutput.isEmpty)
        #expect(unexpected.standardError == "GenericError: Parameter 'bogus' is unexpected\n", "\(unexpected.standardError)")

        let unknown = try flotillactl(socket + ["qmp", "ctl", "no-such-command"])
        #expect(unknown.status == 1)
        #expect(unknown.standardOutput.isEmpty)
        #expect(unknown.standardError.hasPrefix("CommandNotFound: "), "\(unknown.standardError)")
        let rawError = try flotillactl(socket + ["qmp", "ctl", "no-such-command", "--raw"])
        #expect(rawError.status == 1)
        #expect(try JSONValue.parse(rawError.standardOutput).objectValue?["error"]?.objectValue?["class"] == "CommandNotFound")

        // Usage errors: exit 64, naming the argument; nothing is sent.
        for bad in ["{\"id\": ", "[1, 2]", "7"] {
            let refused = try flotillactl(socket + ["qmp", "ctl", "stop", bad])
            #expect(refused.status == 64, "\(bad): \(refused.standardError)")
            #expect(refused.standardError.contains("<arguments-json> '\(bad)'"), "\(refused.standardError)")
        }
        #expect(try daemon.status("ctl")["state"] == "running")

        // An unknown VM and a stopped one: exit 1, as flotillactl status says it.
        let ghost = try flotillactl(socket + ["qmp", "ghost", "query-status"])
        #expect(ghost.status == 1)
        #expect(ghost.standardError == "flotillactl: no VM named 'ghost'; known VMs: ctl\n", "\(ghost.standardError)")
        _ = try daemon.execute("vm-stop", ["name": "ctl"])
        let stopped = try flotillactl(socket + ["qmp", "ctl", "query-status"])
        #expect(stopped.status == 1)
        #expect(
            stopped.standardError.contains("VM 'ctl' has no QMP now: its worker is not running (state stopped)"), "\(stopped.standardError)"
        )
        let noEvents = try flotillactl(socket + ["events", "ctl"])
        #expect(noEvents.status == 1)
        #expect(noEvents.standardError.contains("not running"), "\(noEvents.standardError)")
    }

    @Test("flotillactl qmp beside another client of the same VM: each gets its own answers, even under the same id", arguments: modes)
    func besideAnotherClient(mode: String) throws {
        let daemon = try Self.daemon(mode)
        defer { daemon.cleanUp() }
        try daemon.createVM("two")
        let other = try QMPTestClient(path: daemon.runtime + "/vms/two/qmp.sock")
        try other.handshake()
        // In flight while flotillactl runs, under the id flotillactl gives its command.
        let count = 20
        for _ in 0..<count { try other.send(QMP.Command(name: "query-name", id: "flotillactl-2")) }
        let result = try flotillactl(["--socket", daemon.socket, "qmp", "two", "query-status", "--raw"])
        #expect(result.status == 0, "\(result.standardError)")
        let reply = try JSONValue.parse(result.standardOutput).objectValue
        #expect(reply?["id"] == "flotillactl-2")
        #expect(reply?["return"]?.objectValue?["status"] == "running", "\(result.standardOutput)")
        for index in 0..<count {
            var events: [JSONObject] = []
            let answer = try other.reply(events: &events)
            #expect(answer["id"] == "flotillactl-2")
            #expect(answer["return"]?.objectValue?["name"] == "two", "reply \(index): \(answer)")
        }
        #expect(try other.execute("query-status", id: 1)["return"]?.objectValue?["status"] == "running")
    }

    @Test("events sees STOP and RESUME caused by other flotillactl runs; pause/resume; --until SHUTDOWN; --timeout", arguments: modes)
    func events(mode: String) throws {
        let daemon = try Self.daemon(mode)
        defer { daemon.cleanUp() }
        try daemon.createVM("ev")
        let ctl = Executables.path("flotillactl")
        let socket = ["--socket", daemon.socket]

        let follower = try BackgroundProcess(ctl, socket + ["events", "ev", "--count", "2"])
        try waitUntil("flotillactl events is negotiated") { follower.standardError.contains("following the QMP events of VM 'ev'") }
        let stop = try flotillactl(socket + ["qmp", "ev", "stop", "--compact"])
        #expect(stop.status == 0, "\(stop.standardError)")
        #expect(stop.standardOutput == "{}\n")
        try waitUntil("the VM shows paused") { try daemon.status("ev")["state"] == "paused" }
        #expect(try flotillactl(socket + ["qmp", "ev", "cont"]).status == 0)
        #expect(follower.wait() == 0, "\(follower.standardError)")
        let seen = try Self.lines(follower.standardOutput).map { try JSONValue.parse($0).objectValue ?? JSONObject() }
        #expect(seen.map { $0["event"] } == ["STOP", "RESUME"], "\(follower.standardOutput)")
        #expect(seen.allSatisfy { $0["timestamp"]?.objectValue?["seconds"] != nil })

        // pause and resume are stop and cont; --until ends at the named event.
        let untilResume = try BackgroundProcess(ctl, socket + ["events", "ev", "--until", "RESUME"])
        try waitUntil("flotillactl events is negotiated") { untilResume.standardError.contains("following the QMP events") }
        let pause = try flotillactl(socket + ["pause", "ev"])
        #expect(pause.status == 0)
        #expect(pause.standardOutput == "paused ev\n")
        try waitUntil("the VM shows paused") { try daemon.status("ev")["state"] == "paused" }
        #expect(try flotillactl(socket + ["resume", "ev"]).standardOutput == "resumed ev\n")
        #expect(untilResume.wait() == 0, "\(untilResume.standardError)")
        #expect(Self.lines(untilResume.standardOutput).compactMap { try? JSONValue.parse($0).objectValue?["event"] } == ["STOP", "RESUME"])
        try waitUntil("the VM shows running") { try daemon.status("ev")["state"] == "running" }

        // Nothing happens to a holding guest: --timeout ends an unmet --until with exit 1, a
        // plain follow with exit 0.
        let quiet = try flotillactl(socket + ["events", "ev", "--until", "SHUTDOWN", "--timeout", "0.3"])
        #expect(quiet.status == 1)
        #expect(quiet.standardOutput.isEmpty)
        #expect(quiet.standardError.contains("timed out after 0.3 s waiting for a SHUTDOWN event from VM 'ev'"), "\(quiet.standardError)")
        let bounded = try flotillactl(socket + ["events", "ev", "--timeout", "0.3"])
        #expect(bounded.status == 0, "\(bounded.standardError)")
        for bad in [["--count", "0"], ["--timeout", "-1"], ["--timeout", "soon"]] {
            #expect(try flotillactl(socket + ["events", "ev"] + bad).status == 64, "\(bad)")
        }

        // The VM ending: SHUTDOWN satisfies --until; a plain follow ends when the VM does.
        let untilShutdown = try BackgroundProcess(ctl, socket + ["events", "ev", "--until", "SHUTDOWN"])
        let plain = try BackgroundProcess(ctl, socket + ["events", "ev"])
        try waitUntil("both followers are negotiated") {
            untilShutdown.standardError.contains("following") && plain.standardError.contains("following")
        }
        _ = try daemon.execute("vm-stop", ["name": "ev"])
        #expect(untilShutdown.wait() == 0, "\(untilShutdown.standardError)")
        let last = try JSONValue.parse(try #require(Self.lines(untilShutdown.standardOutput).last)).objectValue
        #expect(last?["event"] == "SHUTDOWN")
        #expect(last?["data"]?.objectValue?["reason"] == "host-qmp-quit")
        #expect(plain.wait() == 0, "\(plain.standardError)")
        #expect(plain.standardOutput.contains("\"SHUTDOWN\""), "\(plain.standardOutput)")
        #expect(plain.standardError.contains("closed (the VM ended)"), "\(plain.standardError)")
    }
}
