import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Supervisor
import Testing

@Suite("control API: errors, permissions, flotillactl", .serialized)
struct ControlAPITests {
    /// The error flotillad sends for `command`.
    func failure(_ daemon: FlotilladHarness, _ command: String, _ arguments: JSONObject) throws -> ControlClient.Failure {
        do {
            _ = try daemon.execute(command, arguments)
        } catch let failure as ControlClient.Failure {
            return failure
        }
        throw FlotilladHarness.Failure(description: "\(command) succeeded")
    }

    @Test("bad requests are refused with the class and a message naming the field, the value and what is allowed")
    func errors() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        let cases: [(String, JSONObject, String, String)] = [
            ("vm-explode", [:], "CommandNotFound", "unknown command 'vm-explode'; allowed: qmp_capabilities, vm-create"),
            ("vm-status", [:], "InvalidArgument", "vm-status: argument 'name' is missing"),
            ("vm-status", ["name": "x", "force": true], "InvalidArgument", "vm-status: unknown argument 'force'; allowed: name"),
            ("vm-status", ["name": 7], "InvalidArgument", "vm-status: name: 7 is not allowed; allowed: a string"),
            ("vm-status", ["name": "ghost"], "NotFound", "no VM named 'ghost'; the fleet is empty"),
            (
                "vm-create", ["name": "a/b", "config": guestConfig()], "InvalidArgument",
                "vm-create: name: a/b is not allowed; allowed: 1-64"
            ),
            ("vm-create", ["name": "x", "config": "file.json"], "InvalidArgument", "vm-create: config: \"file.json\" is not allowed"),
            (
                "vm-create", ["name": "x", "config": guestConfig(), "restart": "sometimes"], "InvalidArgument",
                "restart: \"sometimes\" is not allowed; allowed: never, on-failure, always"
            ),
            (
                "vm-create", ["name": "x", "config": guestConfig(), "start": "yes"], "InvalidArgument",
                "vm-create: start: \"yes\" is not allowed; allowed: true or false"
            ),
            ("vm-create", ["name": "x", "config": ["boot-source": ["boot_args": ""]]], "InvalidArgument", "kernel_image_path"),
        ]
        for (command, arguments, errorClass, message) in cases {
            let error = try failure(daemon, command, arguments)
            #expect(error.errorClass == errorClass, "\(command) \(arguments): \(error)")
            #expect(error.description.contains(message), "\(command) \(arguments): \(error)")
        }
        try daemon.createVM("one", start: false)
        let duplicate = try failure(daemon, "vm-create", ["name": "one", "config": guestConfig()])
        #expect(duplicate.errorClass == "AlreadyExists")
        #expect(try failure(daemon, "vm-status", ["name": "two"]).description == "no VM named 'two'; known VMs: one")
        // Nothing bad was stored.
        #expect(try FileManager.default.contentsOfDirectory(atPath: daemon.state + "/vms") == ["one.json"])
    }

    @Test("garbage on the control socket gets an error and the connection keeps working")
    func garbage() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        let client = try QMPTestClient(path: daemon.socket)
        #expect(try client.receive()["QMP"] != nil)
        try client.sendRaw("]{\"execute\": 5} [1] {\"execute\":\"vm-list\",\"id\":\"L\"}")
        #expect(try client.receive()["error"] != nil)
        #expect(try client.receive()["error"]?.objectValue?["desc"] == "QMP input member 'execute' must be a string")
        #expect(try client.receive()["error"]?.objectValue?["desc"] == "QMP input must be a JSON object")
        let list = try client.receive()
        #expect(list["id"] == "L")
        #expect(list["return"] == .array([]))
    }

    @Test("the control socket is mode 0660; other users are refused by the file mode and by the peer-credential check")
    func permissions() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        var info = stat()
        #expect(stat(daemon.socket, &info) == 0)
        #expect(info.st_mode & 0o777 == 0o660)
        #expect(info.st_mode & S_IFMT == S_IFSOCK)
        guard getuid() == 0, FileManager.default.fileExists(atPath: "/usr/bin/setpriv") else { return }
        // Let uid 65534 reach the socket file.
        for path in [daemon.directory.path, daemon.runtime] { chmod(path, 0o755) }
        let ctl = Executables.path("flotillactl")
        let asNobody = ["--reuid=65534", "--regid=65534", "--clear-groups", ctl, "--socket", daemon.socket, "list"]
        let denied = try run("/usr/bin/setpriv", asNobody)
        #expect(denied.status == 1)
        #expect(denied.standardError.contains("Permission denied"), "\(denied.standardError)")
        #expect(denied.standardError.contains("run as root or as a member of its group"), "\(denied.standardError)")
        // Even with the file opened up, flotillad itself checks who is calling.
        chmod(daemon.socket, 0o666)
        let refused = try run("/usr/bin/setpriv", asNobody)
        #expect(refused.status == 1)
        #expect(
            refused.standardError.contains("permission denied: uid 65534 may not use flotillad's control socket"),
            "\(refused.standardError)")
        #expect(daemon.stderrText.contains("control socket: refused pid"))
    }

    @Test("flotillactl: readable errors and exit status 1; --json output; create from a file")
    func flotillactl() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        let ctl = Executables.path("flotillactl")
        let missing = try run(ctl, ["--socket", daemon.directory.file("nope.sock"), "list"])
        #expect(missing.status == 1)
        #expect(missing.standardError.contains("cannot connect to \(daemon.directory.file("nope.sock"))"))
        #expect(missing.standardError.contains("is flotillad running?"))
        let notFound = try run(ctl, ["status", "ghost", "--socket", daemon.socket])
        #expect(notFound.status == 1)
        #expect(notFound.standardError == "flotillactl: no VM named 'ghost'; the fleet is empty\n")
        let badFile = try run(ctl, ["create", "x", "--config", daemon.directory.file("absent.json"), "--socket", daemon.socket])
        #expect(badFile.status == 1)
        #expect(badFile.standardError.contains("--config '\(daemon.directory.file("absent.json"))': cannot read the file"))
        let file = daemon.directory.file("vm.json")
        try Data(guestConfig().prettyText().utf8).write(to: URL(fileURLWithPath: file))
        let created = try run(ctl, ["--socket", daemon.socket, "create", "web", "--config", file, "--restart", "never", "--json"])
        #expect(created.status == 0, "\(created.standardError)")
        let status = try JSONValue.parse(created.standardOutput).objectValue
        #expect(status?["name"] == "web")
        #expect(status?["state"] == "stopped")
        #expect(status?["restart"] == "never")
        let list = try run(ctl, ["list", "--socket", daemon.socket])
        #expect(
            list.standardOutput.hasPrefix("NAME  STATE    PID  UPTIME  RESTARTS  POLICY  LAST EXIT\nweb   stopped  -"),
            "\(list.standardOutput)")
        let listJSON = try JSONValue.parse(try run(ctl, ["list", "--json", "--socket", daemon.socket]).standardOutput)
        #expect(listJSON.arrayValue?.count == 1)
        let deleted = try run(ctl, ["delete", "web", "--socket", daemon.socket])
        #expect(deleted.status == 0)
        #expect(deleted.standardOutput == "deleted web\n")
    }
}
