import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Supervisor
import Testing

@Suite("systemd: sd_notify, the journal, unit files", .serialized)
struct SystemdTests {
    @Test("journal field names: the ones flotillad uses are valid, invalid ones are recognised")
    func fieldNames() {
        for name in [
            "MESSAGE", "PRIORITY", "VM_NAME", "VM_PID", "FLOTILLA_EVENT", "QMP_EVENT", "EXIT_STATUS", "EXIT_SIGNAL",
            "SHUTDOWN_REASON", "RESTART_COUNT", "RESTART_DELAY_SECONDS", "PEER_UID", "SYSLOG_IDENTIFIER",
        ] {
            #expect(SupervisorLog.isValidFieldName(name), "\(name)")
        }
        for name in ["", "vm_name", "VM-NAME", "_PID", "1ABC", "VM NAME", String(repeating: "A", count: 65), "VMÄ"] {
            #expect(!SupervisorLog.isValidFieldName(name), "\(name)")
        }
        // Every field name that appears in the Supervisor sources is valid.
        let sources = GuestImages.repositoryRoot.appendingPathComponent("Sources/Supervisor").path
        let files = (try? FileManager.default.contentsOfDirectory(atPath: sources)) ?? []
        var seen = 0
        for file in files where file.hasSuffix(".swift") {
            let text = readText(sources + "/" + file) ?? ""
            for match in text.matches(of: /"([A-Z][A-Z0-9_]*)": "/) {
                seen += 1
                #expect(SupervisorLog.isValidFieldName(String(match.output.1)), "\(file): \(match.output.1)")
            }
        }
        #expect(seen > 10)
    }

    @Test("READY=1 once the control socket accepts, STATUS= with the fleet summary, WATCHDOG=1 at half WATCHDOG_USEC, STOPPING=1")
    func notifications() throws {
        let directory = try TemporaryDirectory("flsup")
        let notify = try NotifySocket(path: directory.file("notify.sock"))
        let daemon = try FlotilladHarness(
            environment: ["NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "300000"], directory: directory)
        defer { daemon.cleanUp() }
        // Started without waiting, so the first datagram is observed as it comes.
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Executables.path("flotillad"))
        process.arguments = daemon.arguments
        process.environment = daemon.environment
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer {
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
        let before = try notify.receive(until: "READY=1")
        let ready = try #require(before.last)
        // The control socket was bound before READY=1 was sent.
        let client = try ControlClient(socketPath: daemon.socket)
        #expect(ready.contains("STATUS=no VMs"), "\(ready)")
        #expect(before.allSatisfy { !$0.contains("STOPPING") })
        // Watchdog pings: two in a row prove they repeat.
        _ = try notify.receive(until: "WATCHDOG=1")
        _ = try notify.receive(until: "WATCHDOG=1")
        _ = try client.execute("vm-create", ["name": "n1", "config": guestConfig()])
        let status = try notify.receive(until: "STATUS=1 stopped")
        #expect(status.last?.contains("STATUS=1 stopped") == true)
        kill(process.processIdentifier, SIGTERM)
        let stopping = try notify.receive(until: "STOPPING=1")
        #expect(stopping.last?.contains("STOPPING=1") == true)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
        #expect(!FileManager.default.fileExists(atPath: daemon.socket))
    }

    @Test("without WATCHDOG_USEC no watchdog pings are sent, and WATCHDOG_PID for another process disables them")
    func noWatchdog() throws {
        setenv("WATCHDOG_USEC", "100000", 1)
        setenv("WATCHDOG_PID", "1", 1)
        #expect(ServiceNotifier.watchdogInterval == nil)
        setenv("WATCHDOG_PID", "\(getpid())", 1)
        #expect(ServiceNotifier.watchdogInterval == 0.1)
        unsetenv("WATCHDOG_USEC")
        unsetenv("WATCHDOG_PID")
        #expect(ServiceNotifier.watchdogInterval == nil)
    }

    static var journalSocket: String { "/run/systemd/journal/socket" }

    /// Whether a journald is listening: the socket file can outlive its journald (a stopped
    /// session leaves it behind), so ask the socket itself.
    static var journaldListening: Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(journalSocket.utf8)) }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        } == 0
    }

    /// Starts the real systemd-journald in the background when none is listening.
    static func ensureJournald() throws {
        if journaldListening { return }
        // A stale socket file would make libsystemd's entries vanish; journald recreates it.
        unlink(journalSocket)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/lib/systemd/systemd-journald")
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        try waitUntil("systemd-journald listens") { journaldListening }
    }

    static func journalEntries(_ match: String) throws -> [JSONObject] {
        let result = try run("/usr/bin/journalctl", ["-o", "json", "--no-pager", match])
        return result.standardOutput.split(separator: "\n").compactMap { try? JSONValue.parse(String($0)).objectValue }
    }

    @Test(
        "structured entries land in a real journal: MESSAGE, PRIORITY, VM_NAME, VM_PID and event fields",
        .enabled(if: FileManager.default.fileExists(atPath: "/lib/systemd/systemd-journald"), "needs systemd-journald"))
    func journal() throws {
        try Self.ensureJournald()
        let name = "journal-\(UInt32.random(in: 0...UInt32.max))"
        // In-process: an invalid field name is dropped, the entry still lands.
        let log = SupervisorLog(target: .journal)
        log.log(.warning, "hello from the test", fields: ["VM_NAME": name, "VM_PID": "42", "bad-name": "x", "FLOTILLA_EVENT": "test"])
        try waitUntil("the entry is in the journal") { try !Self.journalEntries("VM_NAME=\(name)").isEmpty }
        let entry = try #require(try Self.journalEntries("VM_NAME=\(name)").first)
        #expect(entry["MESSAGE"] == "hello from the test")
        #expect(entry["PRIORITY"] == "4")
        #expect(entry["VM_PID"] == "42")
        #expect(entry["FLOTILLA_EVENT"] == "test")
        #expect(entry["SYSLOG_IDENTIFIER"] == "flotillad")
        #expect(entry.keys.allSatisfy { !$0.contains("-") })

        // flotillad itself, with --log-target journal.
        let daemon = try FlotilladHarness(["--log-target", "journal"])
        defer { daemon.cleanUp() }
        try daemon.start()
        let vm = "j\(UInt32.random(in: 0...UInt32.max))"
        try daemon.createVM(vm, start: false)
        try waitUntil("flotillad's entry is in the journal") { try !Self.journalEntries("VM_NAME=\(vm)").isEmpty }
        let created = try #require(try Self.journalEntries("VM_NAME=\(vm)").first)
        #expect(created["MESSAGE"] == .string("created VM \(vm)"))
        #expect(created["PRIORITY"] == "6")
        #expect(created["FLOTILLA_EVENT"] == "vm-created")
        #expect(created["_PID"] == .string("\(daemon.pid)"))
        // Nothing went to stderr.
        #expect(!daemon.stderrText.contains("created VM"))
    }

    @Test("stderr lines when there is no journal: one line per entry with VM_NAME and VM_PID")
    func stderrLines() throws {
        let daemon = try FlotilladHarness()
        defer { daemon.cleanUp() }
        try daemon.start()
        try daemon.createVM("plain", start: false)
        try waitUntil("the line is written") { daemon.stderrText.contains("created VM plain") }
        #expect(daemon.stderrText.contains("flotillad: info: created VM plain [VM_NAME=plain]"))
    }

    @Test("unit files pass systemd-analyze verify", .enabled(if: FileManager.default.fileExists(atPath: "/usr/bin/systemd-analyze")))
    func unitFiles() throws {
        let root = GuestImages.repositoryRoot.appendingPathComponent("systemd").path
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        // The unit's ExecStart must exist for verify; install a copy where the unit expects it.
        let unit = try #require(readText(root + "/flotillad.service"))
        let rewritten = unit.replacingOccurrences(of: "/usr/local/bin/", with: Executables.directory.path + "/")
        try Data(rewritten.utf8).write(to: URL(fileURLWithPath: directory.file("flotillad.service")))
        let socketUnit = try #require(readText(root + "/flotillad.socket"))
        try Data(socketUnit.utf8).write(to: URL(fileURLWithPath: directory.file("flotillad.socket")))
        let result = try run(
            "/usr/bin/systemd-analyze", ["verify", directory.file("flotillad.service"), directory.file("flotillad.socket")])
        #expect(result.status == 0, "\(result.standardError)")
        #expect(!result.standardError.contains("flotillad.service"), "\(result.standardError)")
        #expect(!result.standardError.contains("flotillad.socket"), "\(result.standardError)")
        #expect(socketUnit.contains("ListenStream=/run/flotillad/control.sock"))
        #expect(unit.contains("Type=notify"))
        #expect(unit.contains("KillMode=process"))
        #expect(unit.contains("DeviceAllow=/dev/kvm rw"))
        #expect(unit.contains("DeviceAllow=/dev/net/tun rw"))
    }
}
