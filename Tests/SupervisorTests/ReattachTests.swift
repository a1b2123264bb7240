import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Supervisor
import Testing

@Suite("flotillad restarts without restarting its VMs", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct ReattachTests {
    @Test("SIGKILL flotillad with 3 VMs running; a new flotillad re-attaches every one: same pids, none restarted")
    func reattachAfterKill() throws {
        let directory = try TemporaryDirectory("flsup")
        let notify = try NotifySocket(path: directory.file("notify.sock"))
        let first = try FlotilladHarness(directory: directory).start()
        defer { first.cleanUp() }
        let names = ["r1", "r2", "r3"]
        for name in names { try first.createVM(name) }
        // One paused VM: its state survives too.
        let qmp = try QMPTestClient(path: first.runtime + "/vms/r3/qmp.sock")
        try qmp.handshake()
        _ = try qmp.execute("stop")
        try waitUntil("r3 is paused") { try first.status("r3")["state"] == "paused" }
        var pids: [String: pid_t] = [:]
        for name in names { pids[name] = try #require(try first.pid(of: name) as pid_t?) }
        first.killHard()
        for name in names { #expect(isAlive(pids[name] ?? 0), "\(name)") }

        let second = try FlotilladHarness(environment: ["NOTIFY_SOCKET": notify.path], directory: directory, logName: "second.err")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Executables.path("flotillad"))
        process.arguments = second.arguments
        process.environment = second.environment
        _ = FileManager.default.createFile(atPath: second.stderrPath, contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: second.stderrPath))
        log.seekToEndOfFile()
        process.standardError = log
        try process.run()
        defer {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        // READY=1 comes only once every worker is re-attached: at that moment all are running.
        let ready = try notify.receive(until: "READY=1")
        #expect(ready.last?.contains("STATUS=2 running, 1 paused") == true, "\(ready)")
        for name in names {
            let status = try second.status(name)
            #expect(status["pid"] == .integer(pids[name] ?? 0), "\(name)")
            #expect(status["restart_count"] == 0, "\(name)")
            #expect(status["adopted"] == true, "\(name)")
            #expect(isAlive(pids[name] ?? 0), "\(name)")
        }
        #expect(try second.status("r1")["state"] == "running")
        #expect(try second.status("r3")["state"] == "paused")
        #expect(second.stderrText.contains("re-attaching to running worker \(pids["r1"] ?? 0)"))
        #expect(!second.stderrText.contains("started VM r1 (worker"))

        // The adopted workers work through the new multiplexer, and stop cleanly.
        let again = try QMPTestClient(path: second.runtime + "/vms/r3/qmp.sock")
        try again.handshake()
        #expect(try again.execute("query-status")["return"]?.objectValue?["status"] == "paused")
        _ = try again.execute("cont")
        try waitUntil("r3 runs again") { try second.status("r3")["state"] == "running" }
        let stopped = try second.execute("vm-stop", ["name": "r1"]).objectValue
        #expect(stopped?["state"] == "stopped")
        #expect(!isAlive(pids["r1"] ?? 0))
        // An adopted worker that is killed is restarted by its policy like any other.
        kill(pids["r2"] ?? 0, SIGKILL)
        try waitUntil("r2 is restarted") { try second.status("r2")["restart_count"] == 1 && second.status("r2")["state"] == "running" }
        #expect(try second.pid(of: "r2") != pids["r2"])
    }

    @Test("a stale pidfile naming a live but unrelated process (a reused pid) is not adopted")
    func stalePidfile() throws {
        let directory = try TemporaryDirectory("flsup")
        let first = try FlotilladHarness(directory: directory).start()
        defer { first.cleanUp() }
        try first.createVM("ghost", start: false)
        first.terminate()
        // The VM's pidfile from a crash, whose pid now belongs to some other process.
        let impostor = Process()
        impostor.executableURL = URL(fileURLWithPath: "/bin/sleep")
        impostor.arguments = ["300"]
        try impostor.run()
        defer {
            kill(impostor.processIdentifier, SIGKILL)
            impostor.waitUntilExit()
        }
        let vmDirectory = first.runtime + "/vms/ghost"
        try FileManager.default.createDirectory(atPath: vmDirectory, withIntermediateDirectories: true)
        try Data("\(impostor.processIdentifier)\n".utf8).write(to: URL(fileURLWithPath: vmDirectory + "/pid"))

        let second = try FlotilladHarness(directory: directory, logName: "second.err").start()
        defer { second.killHard() }
        try waitUntil("the VM is started fresh by its policy") { try second.status("ghost")["state"] == "running" }
        let status = try second.status("ghost")
        let pid = try #require(status["pid"]?.numberValue?.signedValue)
        #expect(pid != Int64(impostor.processIdentifier))
        #expect(status["adopted"] == false)
        #expect(status["restart_count"] == 1)
        #expect(status["last_exit"] == "the worker ended while flotillad was not running")
        #expect(impostor.isRunning, "the impostor must not be signalled")
        #expect(
            second.stderrText.contains(
                "stale pidfile \(vmDirectory)/pid (pid \(impostor.processIdentifier), lock held by nobody); not adopted"))
        // The new pidfile is the real worker's.
        #expect(readText(vmDirectory + "/pid")?.trimmingCharacters(in: .whitespacesAndNewlines) == "\(pid)")
    }
}
