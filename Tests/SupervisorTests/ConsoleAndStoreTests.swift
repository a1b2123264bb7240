import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Supervisor
import Testing

/// Runs flotillactl; its status and output.
func flotillactl(_ arguments: [String]) throws -> ProcessResult {
    try run(Executables.path("flotillactl"), arguments)
}

@Suite("flotillad: VM consoles served by the workers", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct SupervisedConsoleTests {
    @Test("every worker serves console.sock; flotillactl console attaches; one client at a time; cleaned on stop and after a crash")
    func console() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        try daemon.createVM("con")
        let path = daemon.runtime + "/vms/con/console.sock"
        #expect(try daemon.status("con")["console_socket"] == .string(path))
        let attached = try flotillactl(["--socket", daemon.socket, "console", "con", "--until", "flotilla-guest: holding"])
        #expect(attached.status == 0, "\(attached.standardError)")
        #expect(attached.standardOutput.contains("flotilla-guest: done pass="), "\(attached.standardOutput)")

        // While one client holds the console, flotillactl is refused with a readable error.
        let holder = try UnixClient(path: path)
        _ = try holder.read(until: "flotilla-guest: holding")
        let refused = try flotillactl(["--socket", daemon.socket, "console", "con", "--until", "never printed"])
        #expect(refused.status == 1)
        #expect(refused.standardError.contains("in use by another client"), "\(refused.standardError)")
        holder.close()

        // A SIGKILLed worker cannot remove its socket: flotillad cleans it, and the restarted
        // worker serves a fresh one.
        let pid = try #require(try daemon.pid(of: "con"))
        kill(pid, SIGKILL)
        try waitUntil("the VM runs again under a new worker") {
            let status = try daemon.status("con")
            return status["state"] == "running" && status["pid"]?.numberValue?.signedValue.map { pid_t($0) } != pid
        }
        let again = try flotillactl(["--socket", daemon.socket, "console", "con", "--until", "flotilla-guest: holding"])
        #expect(again.status == 0, "\(again.standardError)")

        let stopped = try daemon.execute("vm-stop", ["name": "con"]).objectValue
        #expect(stopped?["console_socket"] == .null)
        #expect(access(path, F_OK) != 0, "console.sock was left behind")
        let none = try flotillactl(["--socket", daemon.socket, "console", "con"])
        #expect(none.status == 1)
        #expect(none.standardError.contains("not running"), "\(none.standardError)")
    }

    @Test("a stored VM may not name its own console socket")
    func noSocketPathInRecords() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        var config = guestConfig().objectValue ?? JSONObject()
        config["serial"] = ["socket_path": "/tmp/elsewhere.sock"]
        do {
            _ = try daemon.execute("vm-create", ["name": "x", "config": .object(config)])
            Issue.record("accepted a serial.socket_path")
        } catch let failure as ControlClient.Failure {
            #expect(failure.description.contains("serial.socket_path"), "\(failure.description)")
            #expect(failure.description.contains("console.sock"), "\(failure.description)")
        }
    }
}

@Suite("flotillad: start timeout", .serialized)
struct StartTimeoutTests {
    /// Fake workers: one never reports ready; one reports ready and listens on its
    /// api-channel but never sends the QMP greeting.
    static let fakes: [(String, String)] = [
        ("never-ready", "#!/bin/sh\nexec sleep 600\n"),
        (
            "never-greets",
            """
            #!/usr/bin/python3
            import os, socket, sys, time
            path = sys.argv[sys.argv.index("-api-channel") + 1][len("unix:"):]
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(path)
            listener.listen(4)
            os.write(3, b"R")
            os.close(3)
            time.sleep(600)

            """
        ),
    ]

    @Test("a worker not QMP-ready in time is killed and handled as a failed start by the restart policy", arguments: fakes)
    func timeout(name: String, script: String) throws {
        let directory = try TemporaryDirectory("flsup")
        let fake = directory.file(name)
        try Data(script.utf8).write(to: URL(fileURLWithPath: fake))
        chmod(fake, 0o755)
        let daemon = try FlotilladHarness(
            ["--vmm", fake, "--start-timeout", "1", "--crash-loop-limit", "1", "--restart-delay", "0.1"], directory: directory
        ).start()
        defer { daemon.cleanUp() }
        do {
            try daemon.createVM("slow", restart: "on-failure")
            Issue.record("vm-create with start succeeded")
        } catch let failure as ControlClient.Failure {
            #expect(failure.description.contains("start timed out: not QMP-ready within 1 s"), "\(failure.description)")
        }
        // on-failure restarts it once; the second timeout exceeds the crash-loop limit.
        try waitUntil("the VM is marked failed") { try daemon.status("slow")["state"] == "failed" }
        let status = try daemon.status("slow")
        #expect(status["restart_count"] == 1)
        #expect(status["pid"] == .null)
        let lastExit = status["last_exit"]?.stringValue ?? ""
        #expect(lastExit.contains("start timed out: not QMP-ready within 1 s (--start-timeout); killed"), "\(lastExit)")
        #expect(lastExit.contains("SIGKILL") && lastExit.contains("crash loop"), "\(lastExit)")
        #expect(daemon.stderrText.contains("start timed out"), "\(daemon.stderrText)")
        #expect(access(daemon.runtime + "/vms/slow/api.sock", F_OK) != 0)
    }

    @Test("--start-timeout must be positive")
    func validation() throws {
        let result = try run(Executables.path("flotillad"), ["--start-timeout", "0"])
        #expect(result.status != 0)
        #expect(result.standardError.contains("--start-timeout '0.0' is not allowed"), "\(result.standardError)")
    }
}

@Suite("flotillad: fleet-store writes run off the reactor", .serialized)
struct StoreWriterTests {
    /// The store writer thread's current system call number, from /proc (nil if not found).
    func writerSyscall(_ pid: pid_t) -> Int? {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        for task in tasks where readText("/proc/\(pid)/task/\(task)/comm")?.hasPrefix("store-writer") == true {
            return readText("/proc/\(pid)/task/\(task)/syscall")?.split(separator: " ").first.flatMap { Int($0) }
        }
        return nil
    }

    @Test("while a vm-create's write is blocked the control API answers; the reply waits for the write, and a failed write creates nothing")
    func blockedWrite() throws {
        let daemon = try FlotilladHarness().start()
        defer { daemon.cleanUp() }
        // The document's temporary file is a FIFO: the writer's open blocks until we read it,
        // and its fsync then fails (EINVAL), as a write to a broken disk would.
        let fifo = daemon.state + "/vms/.slow.json.tmp"
        #expect(mkfifo(fifo, 0o600) == 0)
        let outcome = Outcome()
        let socketPath = daemon.socket
        let create = Thread {
            do {
                _ = try ControlClient(socketPath: socketPath).execute("vm-create", ["name": "slow", "config": guestConfig()])
                outcome.set("created")
            } catch {
                outcome.set("\(error)")
            }
        }
        create.start()
        // openat is system call 257 on x86_64: the writer thread waits in it for a reader.
        try waitUntil("the store writer is blocked opening the FIFO") { writerSyscall(daemon.pid) == 257 }
        #expect(try daemon.execute("vm-list") == .array([]))
        do {
            _ = try daemon.status("slow")
            Issue.record("a VM whose document is not stored yet was reported")
        } catch let failure as ControlClient.Failure {
            #expect(failure.errorClass == "NotFound")
        }
        do {
            _ = try daemon.execute("vm-create", ["name": "slow", "config": guestConfig()])
            Issue.record("a name being created was accepted twice")
        } catch let failure as ControlClient.Failure {
            #expect(failure.errorClass == "AlreadyExists")
        }
        #expect(outcome.value == nil, "vm-create answered before its document was written")

        // Reading the FIFO lets the write go on; the fsync then fails.
        let document = try #require(readText(fifo))
        #expect(document.contains("\"name\": \"slow\""), "\(document)")
        try waitUntil("vm-create answered") { outcome.value != nil }
        let failure = outcome.value ?? ""
        #expect(failure.contains("cannot store VM slow") && failure.contains("fsync"), "\(failure)")
        #expect(access(fifo, F_OK) != 0, "the temporary file was left behind")
        #expect(access(daemon.state + "/vms/slow.json", F_OK) != 0)
        #expect(try daemon.execute("vm-list") == .array([]))

        // A normal create: the document is on disk when the reply arrives; a delete's reply
        // comes once it is gone.
        _ = try daemon.execute("vm-create", ["name": "slow", "config": guestConfig()])
        #expect(readText(daemon.state + "/vms/slow.json")?.contains("\"name\": \"slow\"") == true)
        _ = try daemon.execute("vm-delete", ["name": "slow"])
        #expect(access(daemon.state + "/vms/slow.json", F_OK) != 0)
    }
}

/// A value set by another thread.
final class Outcome: @unchecked Sendable {
    // Invariant: `stored` is only touched while holding `lock`.
    private let lock = NSLock()
    private var stored: String?

    func set(_ value: String) {
        lock.lock()
        stored = value
        lock.unlock()
    }

    var value: String? {
        lock.lock()
        defer { lock.unlock() }
        return stored
    }
}

@Suite("flotillad: socket activation", .serialized)
struct SocketActivationTests {
    /// A listening Unix socket bound by the test, as systemd binds ListenStream=.
    func listeningSocket(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, listen(fd, 16) == 0 else { throw FlotilladHarness.Failure(description: "bind \(path): errno \(errno)") }
        return fd
    }

    /// Starts flotillad the way systemd does: the socket on descriptor 3, LISTEN_FDS=1 and
    /// LISTEN_PID set to flotillad's own pid (by a shell that then execs it).
    func activated(_ daemon: FlotilladHarness, socket fd: Int32) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments =
            ["-c", "exec 3<&0 0</dev/null; export LISTEN_PID=$$ LISTEN_FDS=1; exec \"$0\" \"$@\"", Executables.path("flotillad")]
            + daemon.arguments
        process.environment = daemon.environment
        process.standardInput = FileHandle(fileDescriptor: fd, closeOnDealloc: false)
        _ = FileManager.default.createFile(atPath: daemon.stderrPath, contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: daemon.stderrPath))
        log.seekToEndOfFile()
        process.standardError = log
        process.standardOutput = log
        try process.run()
        return process
    }

    func inode(_ path: String) -> ino_t? {
        var info = stat()
        return lstat(path, &info) == 0 ? info.st_ino : nil
    }

    @Test("flotillad serves the control socket systemd passed, leaves it bound on exit, and the next flotillad takes it again")
    func passedSocket() throws {
        let daemon = try FlotilladHarness()
        defer { daemon.cleanUp() }
        mkdir(daemon.runtime, 0o755)
        let listener = try listeningSocket(daemon.socket)
        defer { close(listener) }
        let bound = inode(daemon.socket)
        for round in 1...2 {
            let process = try activated(daemon, socket: listener)
            defer {
                if process.isRunning { kill(process.processIdentifier, SIGKILL) }
                process.waitUntilExit()
            }
            try waitUntil("flotillad answers on the passed socket (round \(round))") { (try? daemon.client()) != nil }
            _ = try daemon.execute("vm-create", ["name": .string("vm\(round)"), "config": guestConfig()])
            #expect(try daemon.execute("vm-list").arrayValue?.count == round)
            #expect(inode(daemon.socket) == bound, "flotillad bound a socket of its own")
            #expect(daemon.stderrText.contains("taken from the service manager (socket activation)"), "\(daemon.stderrText)")
            kill(process.processIdentifier, SIGTERM)
            process.waitUntilExit()
            #expect(process.terminationStatus == 0)
            // systemd's socket stays: clients queue on it until the next flotillad.
            #expect(inode(daemon.socket) == bound, "flotillad removed the service manager's socket")
        }
    }

    @Test("a passed socket bound elsewhere is refused with a clear error")
    func wrongSocket() throws {
        let daemon = try FlotilladHarness()
        defer { daemon.cleanUp() }
        mkdir(daemon.runtime, 0o755)
        let elsewhere = daemon.directory.file("other.sock")
        let listener = try listeningSocket(elsewhere)
        defer { close(listener) }
        let process = try activated(daemon, socket: listener)
        process.waitUntilExit()
        #expect(process.terminationStatus == 2)
        #expect(daemon.stderrText.contains("socket activation: the passed socket is not a listening Unix stream socket bound to"))
        #expect(daemon.stderrText.contains(daemon.socket), "\(daemon.stderrText)")
    }
}

/// A blocking Unix stream client with a receive timeout that only guards against a hang.
final class UnixClient {
    let fd: Int32
    private var received: [UInt8] = []

    init(path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard result == 0 else { throw FlotilladHarness.Failure(description: "connect \(path): errno \(errno)") }
        var timeout = timeval(tv_sec: 60, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { Glibc.close(fd) }

    func close() { shutdown(fd, Int32(SHUT_RDWR)) }

    func read(until text: String) throws -> String {
        while true {
            let all = String(decoding: received, as: UTF8.self)
            if all.contains(text) { return all }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard count > 0 else { throw FlotilladHarness.Failure(description: "ended before '\(text)': \(all)") }
            received += chunk[0..<count]
        }
    }
}
