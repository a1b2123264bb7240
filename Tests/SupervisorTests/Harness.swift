import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Supervisor

/// A real flotillad in a temporary directory, with its stderr in a file.
final class FlotilladHarness {
    let directory: TemporaryDirectory
    let arguments: [String]
    let environment: [String: String]
    private(set) var process: Process?
    var runtime: String { directory.file("run") }
    var state: String { directory.file("state") }
    var socket: String { runtime + "/control.sock" }
    let logName: String
    var stderrPath: String { directory.file(logName) }
    var stderrText: String { readText(stderrPath) ?? "" }

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// `extra` are added flotillad options; quick restarts and stops so tests finish promptly.
    init(
        _ extra: [String] = [], environment: [String: String] = [:], directory: TemporaryDirectory? = nil, logName: String = "flotillad.err"
    ) throws {
        self.logName = logName
        self.directory = try directory ?? TemporaryDirectory("flsup")
        arguments =
            ["--runtime-dir", self.directory.file("run"), "--state-dir", self.directory.file("state"), "--log-target", "stderr"]
            + ["--stop-timeout", "2", "--restart-delay", "0.2", "--restart-delay-max", "1"] + extra
        var base = ProcessInfo.processInfo.environment
        for key in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"] { base[key] = nil }
        self.environment = base.merging(environment) { $1 }
    }

    /// Starts flotillad and waits until its control socket answers.
    @discardableResult
    func start() throws -> FlotilladHarness {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Executables.path("flotillad"))
        process.arguments = arguments
        process.environment = environment
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: stderrPath))
        handle.seekToEndOfFile()
        process.standardError = handle
        process.standardOutput = handle
        process.standardInput = FileHandle.nullDevice
        try process.run()
        self.process = process
        try waitUntil("flotillad's control socket answers") { (try? ControlClient(socketPath: socket)) != nil }
        return self
    }

    var pid: pid_t { process?.processIdentifier ?? 0 }

    func client() throws -> ControlClient { try ControlClient(socketPath: socket) }

    func execute(_ command: String, _ arguments: JSONObject = JSONObject()) throws -> JSONValue {
        try client().execute(command, arguments)
    }

    func status(_ name: String) throws -> JSONObject {
        try execute("vm-status", ["name": .string(name)]).objectValue ?? JSONObject()
    }

    func pid(of name: String) throws -> pid_t? {
        try status(name)["pid"]?.numberValue?.signedValue.map { pid_t($0) }
    }

    /// Creates a test-guest VM (idle with flotilla.hold=1) and optionally starts it.
    @discardableResult
    func createVM(
        _ name: String, start: Bool = true, restart: String? = nil, kernel: String = GuestImages.vmlinux, autostart: Bool = false
    ) throws -> JSONObject {
        var arguments: JSONObject = ["name": .string(name), "config": guestConfig(kernel: kernel), "start": .bool(start)]
        if let restart { arguments["restart"] = .string(restart) }
        if autostart { arguments["autostart"] = true }
        return try execute("vm-create", arguments).objectValue ?? JSONObject()
    }

    /// SIGTERM and wait; flotillad leaves its workers running unless told otherwise.
    func terminate() {
        guard let process, process.isRunning else { return }
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
    }

    func killHard() {
        guard let process, process.isRunning else { return }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    /// Ends flotillad and every worker it left, and removes the directory.
    func cleanUp() {
        killHard()
        for pid in workerPIDs() { kill(pid, SIGKILL) }
        usleep(100_000)
        directory.remove()
    }

    /// The pids recorded in the VMs' pidfiles.
    func workerPIDs() -> [pid_t] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: runtime + "/vms")) ?? []
        return names.compactMap { name in
            readText("\(runtime)/vms/\(name)/pid").flatMap { pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
    }
}

/// The test guest idling (flotilla.hold=1), in StratoVirt's JSON schema.
func guestConfig(kernel: String = GuestImages.vmlinux) -> JSONValue {
    [
        "boot-source": ["kernel_image_path": .string(kernel), "boot_args": "console=ttyS0 flotilla.hold=1"],
        "machine-config": ["vcpu_count": 1, "mem_size": .integer(256 << 20)],
    ]
}

/// Polls `condition` until it holds; the deadline only guards against a hang.
func waitUntil(_ what: String, timeout: Double = 60, _ condition: () throws -> Bool) throws {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if (try? condition()) == true { return }
        usleep(20_000)
    }
    throw FlotilladHarness.Failure(description: "timed out waiting until \(what)")
}

func isAlive(_ pid: pid_t) -> Bool {
    guard kill(pid, 0) == 0 else { return false }
    // A zombie is not alive.
    guard let stat = readText("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return false }
    let state = stat[stat.index(close, offsetBy: 2)]
    return state != "Z" && state != "X"
}

/// A datagram socket bound in a temporary directory, standing in for systemd's NOTIFY_SOCKET.
final class NotifySocket {
    let path: String
    let fd: Int32

    init(path: String) throws {
        self.path = path
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard result == 0 else { throw FlotilladHarness.Failure(description: "bind \(path): errno \(errno)") }
        var timeout = timeval(tv_sec: 60, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    /// The next datagram; throws when none comes (the timeout only guards against a hang).
    func receive() throws -> String {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        guard count > 0 else { throw FlotilladHarness.Failure(description: "no notification arrived (errno \(errno))") }
        return String(decoding: buffer[0..<count], as: UTF8.self)
    }

    /// Datagrams until one contains `text`; returns all of them.
    func receive(until text: String) throws -> [String] {
        var all: [String] = []
        while true {
            let message = try receive()
            all.append(message)
            if message.contains(text) { return all }
        }
    }
}
