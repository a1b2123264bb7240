import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Supervisor
import Testing

@Suite("flotillad runs real flotilla-vmm workers", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct WorkerLifecycleTests {
    @Test("create, start, stop, restart, delete: the worker, its pidfile and sockets come and go")
    func spawnAndStop() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        let created = try daemon.createVM("vm1")
        #expect(created["state"] == "running")
        let pid = try #require(try daemon.pid(of: "vm1"))
        #expect(isAlive(pid))
        let directory = daemon.runtime + "/vms/vm1"
        #expect(readText(directory + "/pid")?.trimmingCharacters(in: .whitespacesAndNewlines) == "\(pid)")
        #expect(FileManager.default.fileExists(atPath: directory + "/api.sock"))
        #expect(FileManager.default.fileExists(atPath: directory + "/qmp.sock"))
        // The worker is its own session leader and inherited none of flotillad's descriptors
        // beyond what it opened itself.
        #expect(getsid(pid) == pid)
        // One process start: flotilla-vmm ran as the daemon itself (no re-exec), so it is
        // flotillad's own child, and it closed its readiness pipe once it reported ready.
        #expect(parentPID(of: pid) == daemon.pid)
        let descriptor3 = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/3")
        #expect(descriptor3?.hasPrefix("pipe:") != true, "\(descriptor3 ?? "none")")
        let status = try daemon.status("vm1")
        #expect(status["restart_count"] == 0)
        #expect(status["qmp_socket"] == .string(directory + "/qmp.sock"))

        let stopped = try daemon.execute("vm-stop", ["name": "vm1"]).objectValue
        #expect(stopped?["state"] == "stopped")
        #expect(stopped?["pid"] == .null)
        #expect(stopped?["last_exit"] == "exited with status 0 after SHUTDOWN (host-qmp-quit)")
        #expect(!isAlive(pid))
        for file in ["pid", "api.sock", "qmp.sock"] { #expect(!FileManager.default.fileExists(atPath: "\(directory)/\(file)"), "\(file)") }

        let started = try daemon.execute("vm-start", ["name": "vm1"]).objectValue
        let second = try #require(started?["pid"]?.numberValue?.signedValue)
        #expect(started?["state"] == "running")
        let restarted = try daemon.execute("vm-restart", ["name": "vm1"]).objectValue
        let third = try #require(restarted?["pid"]?.numberValue?.signedValue)
        #expect(third != second)
        #expect(!isAlive(pid_t(second)))

        _ = try daemon.execute("vm-delete", ["name": "vm1"])
        #expect(!isAlive(pid_t(third)))
        #expect(try daemon.execute("vm-list") == .array([]))
        #expect(!FileManager.default.fileExists(atPath: directory))
        #expect(!FileManager.default.fileExists(atPath: daemon.state + "/vms/vm1.json"))
    }

    @Test("a SIGKILLed worker is restarted with exponential backoff and its exit reason kept")
    func restartWithBackoff() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        try daemon.createVM("crashy")
        var pid = try #require(try daemon.pid(of: "crashy"))
        for round in 1...2 {
            kill(pid, SIGKILL)
            try waitUntil("the VM is restarted (round \(round))") {
                let status = try daemon.status("crashy")
                return status["state"] == "running" && status["restart_count"] == .integer(round)
            }
            let status = try daemon.status("crashy")
            #expect(status["last_exit"] == "killed by signal 9 (SIGKILL)")
            let next = try #require(try daemon.pid(of: "crashy"))
            #expect(next != pid)
            #expect(isAlive(next))
            pid = next
        }
        // The delay doubled: 0.2 s after the first failure, 0.4 s after the second.
        #expect(daemon.stderrText.contains("VM crashy will restart in 0.2 s (policy on-failure)"))
        #expect(daemon.stderrText.contains("VM crashy will restart in 0.4 s (policy on-failure)"))
        #expect(daemon.stderrText.contains("flotillad: warning: VM crashy worker"))
    }

    @Test("restart policy never: a killed worker leaves the VM failed, not restarted")
    func policyNever() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        try daemon.createVM("once", restart: "never")
        let pid = try #require(try daemon.pid(of: "once"))
        kill(pid, SIGKILL)
        try waitUntil("the VM is failed") { try daemon.status("once")["state"] == "failed" }
        #expect(try daemon.status("once")["restart_count"] == 0)
        #expect(try daemon.status("once")["pid"] == .null)
    }

    @Test("a worker that keeps failing to start hits the crash-loop limit and is marked failed")
    func crashLoop() throws {
        let daemon = try FlotilladHarness(["--crash-loop-limit", "2"]).start()
        defer { daemon.cleanUp() }
        let kernel = daemon.directory.file("broken.vmlinux")
        try Data(repeating: 0x90, count: 4096).write(to: URL(fileURLWithPath: kernel))
        _ = try? daemon.createVM("broken", kernel: kernel)
        try waitUntil("the VM is failed") { try daemon.status("broken")["state"] == "failed" }
        let status = try daemon.status("broken")
        #expect(status["restart_count"] == 2)
        let lastExit = status["last_exit"]?.stringValue ?? ""
        #expect(lastExit.contains("flotilla-vmm exited with status 2"), "\(lastExit)")
        // The worker's own words, sent back through its readiness pipe.
        #expect(lastExit.contains("flotilla-vmm exited with status 2: flotilla-vmm: "), "\(lastExit)")
        #expect(lastExit.contains("crash loop: 3 exits within 300 s (limit 2), not restarted"), "\(lastExit)")
        #expect(daemon.stderrText.contains("VM broken is failing repeatedly"))
        // An explicit start tries again (and reports why it fails).
        #expect(throws: ControlClient.Failure.self) { try daemon.execute("vm-start", ["name": "broken"]) }
    }

    @Test("stop escalates: a worker that ignores quit gets SIGTERM, then SIGKILL")
    func stopEscalation() throws {
        let daemon = try FlotilladHarness(["--stop-timeout", "0.5"]).start()
        defer { daemon.cleanUp() }
        try daemon.createVM("stuck")
        let pid = try #require(try daemon.pid(of: "stuck"))
        // A stopped process neither reads QMP nor handles SIGTERM; only SIGKILL ends it.
        kill(pid, SIGSTOP)
        let stopped = try daemon.execute("vm-stop", ["name": "stuck"]).objectValue
        #expect(stopped?["state"] == "stopped")
        #expect(stopped?["last_exit"] == "killed by signal 9 (SIGKILL); stop steps: quit, SIGTERM, SIGKILL")
        #expect(!isAlive(pid))
        #expect(daemon.stderrText.contains("VM stuck did not quit within 0.5 s; sending SIGTERM"))
        #expect(daemon.stderrText.contains("VM stuck ignored SIGTERM for 0.5 s; sending SIGKILL"))
        let directory = daemon.runtime + "/vms/stuck"
        for file in ["pid", "api.sock", "qmp.sock"] { #expect(!FileManager.default.fileExists(atPath: "\(directory)/\(file)"), "\(file)") }
        // Not restarted: it was asked to stop.
        #expect(try daemon.status("stuck")["restart_count"] == 0)
    }

    @Test("autostart VMs from --config-dir start with flotillad; relative kernel paths resolve against the directory")
    func configDirectory() throws {
        let directory = try TemporaryDirectory("flsup")
        let fleet = directory.file("fleet")
        try FileManager.default.createDirectory(atPath: fleet, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: GuestImages.vmlinux, toPath: fleet + "/guest.vmlinux")
        for (name, autostart) in [("auto-a", true), ("auto-b", true), ("manual", false)] {
            var document = guestConfig(kernel: "guest.vmlinux").objectValue ?? JSONObject()
            document["autostart"] = .bool(autostart)
            try Data(JSONValue.object(document).prettyText().utf8).write(to: URL(fileURLWithPath: "\(fleet)/\(name).json"))
        }
        let daemon = try FlotilladHarness(["--config-dir", fleet], directory: directory).start()
        defer { daemon.cleanUp() }
        try waitUntil("both autostart VMs run") {
            try daemon.status("auto-a")["state"] == "running" && daemon.status("auto-b")["state"] == "running"
        }
        #expect(try daemon.status("manual")["state"] == "stopped")
        #expect(try daemon.status("auto-a")["autostart"] == true)
    }
}

/// The parent of a live process, from /proc.
func parentPID(of pid: pid_t) -> pid_t? {
    guard let stat = readText("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return nil }
    // After the command name: state, then ppid.
    let fields = stat[stat.index(after: close)...].split(separator: " ")
    return fields.count > 1 ? pid_t(fields[1]) : nil
}
