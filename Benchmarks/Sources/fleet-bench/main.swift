// fleet-bench: flotillad's own costs, side by side in one run (issue 5):
//  1. VMs created through flotillad's control API until QMP-ready, per second (N at once);
//  2. QMP query-status round trip directly to the worker, through flotillad's multiplexer (the
//     default), and through a flotillad started with --qmp-handoff (the client is passed to the
//     worker with QMP getfd + add_client, so flotillad leaves the data path): the first
//     flotillad is SIGKILLed, the second re-attaches the same workers, and direct is measured
//     again beside it (round trips alternate between the two connections);
//  3. flotillad's resident memory per managed VM.
// Usage: fleet-bench --bin DIR --guest VMLINUX [--vms 20] [--round-trips 2000]
import Foundation
import Glibc
import Protocol
import Supervisor
import Synchronization

func argument(_ name: String, _ fallback: String? = nil) -> String {
    let arguments = CommandLine.arguments
    if let index = arguments.firstIndex(of: name), index + 1 < arguments.count { return arguments[index + 1] }
    guard let fallback else {
        FileHandle.standardError.write(Data("fleet-bench: \(name) is required\n".utf8))
        exit(2)
    }
    return fallback
}

let bin = argument("--bin")
let guest = argument("--guest")
let vmCount = Int(argument("--vms", "20")) ?? 20
let roundTrips = Int(argument("--round-trips", "2000")) ?? 2000

func now() -> Double {
    var time = timespec()
    clock_gettime(CLOCK_MONOTONIC, &time)
    return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
}

func rssKiB(_ pid: pid_t) -> Int {
    let text = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    let line = text.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
    return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
}

/// A blocking QMP connection: send one command, read lines until its reply.
final class RawQMP {
    let fd: Int32
    var buffer: [UInt8] = []
    init(_ path: String) throws {
        fd = try UnixSocket.connect(path: path, blocking: true)
        _ = try line()
        _ = try roundTrip("{\"execute\":\"qmp_capabilities\"}\n")
    }
    deinit { close(fd) }
    func line() throws -> [UInt8] {
        while true {
            if let end = buffer.firstIndex(of: 10) {
                let result = Array(buffer[..<end])
                buffer.removeSubrange(...end)
                return result
            }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = recv(fd, &chunk, chunk.count, 0)
            guard count > 0 else { throw CocoaError(.fileReadUnknown) }
            buffer += chunk[0..<count]
        }
    }
    func roundTrip(_ text: String) throws -> [UInt8] {
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        while true {
            let reply = try line()
            if !String(decoding: reply, as: UTF8.self).hasPrefix("{\"event\"") { return reply }
        }
    }
}

let directory = "/tmp/fleet-bench.\(getpid())"
try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)

/// Starts a flotillad on the run's directories; `extra` are added options.
func startDaemon(_ extra: [String] = []) throws -> Process {
    let daemon = Process()
    daemon.executableURL = URL(fileURLWithPath: bin + "/flotillad")
    daemon.arguments =
        [
            "--runtime-dir", directory + "/run", "--state-dir", directory + "/state", "--log-target", "stderr",
            "--vmm", bin + "/flotilla-vmm", "--stop-vms-on-exit",
        ] + extra
    daemon.standardError = FileHandle.nullDevice
    try daemon.run()
    return daemon
}

var daemon = try startDaemon()
defer {
    daemon.terminate()
    daemon.waitUntilExit()
    try? FileManager.default.removeItem(atPath: directory)
}
var client: ControlClient?
for _ in 0..<500 where client == nil {
    client = try? ControlClient(socketPath: directory + "/run/control.sock")
    if client == nil { usleep(10_000) }
}
guard client != nil else { fatalError("flotillad did not come up") }
usleep(200_000)
let idleRSS = rssKiB(daemon.processIdentifier)

let config: JSONValue = [
    "boot-source": ["kernel_image_path": .string(guest), "boot_args": "console=ttyS0 flotilla.hold=1"],
    "machine-config": ["vcpu_count": 1, "mem_size": .integer(256 << 20)],
]

// 1. N VMs at once, each on its own control connection and its own thread (all N really in
// flight together: DispatchQueue.concurrentPerform would run only as many as there are cores);
// vm-create with start replies once QMP is ready.
let failures = Mutex<Int>(0)
let go = DispatchSemaphore(value: 0)
let finished = DispatchGroup()
for index in 0..<vmCount {
    finished.enter()
    let thread = Thread {
        defer { finished.leave() }
        go.wait()
        do {
            let connection = try ControlClient(socketPath: directory + "/run/control.sock")
            _ = try connection.execute("vm-create", ["name": .string("bench\(index)"), "config": config, "start": true])
        } catch {
            failures.withLock { $0 += 1 }
        }
    }
    thread.start()
}
usleep(100_000)
let start = now()
for _ in 0..<vmCount { go.signal() }
finished.wait()
let elapsed = now() - start
let loadedRSS = rssKiB(daemon.processIdentifier)

// 2. query-status round trips: through flotillad vs directly to the worker.
/// Round trips on a connection to `path` (direct) and one to `other`, alternating one by one
/// so that load from the rest of the machine falls on both alike; each list sorted.
func measure(_ path: String, beside other: String) throws -> (direct: [Double], other: [Double]) {
    let connections = [try RawQMP(path), try RawQMP(other)]
    for qmp in connections {
        for _ in 0..<100 { _ = try qmp.roundTrip("{\"execute\":\"query-status\"}\n") }
    }
    var samples: [[Double]] = [[], []]
    for _ in 0..<roundTrips {
        for (index, qmp) in connections.enumerated() {
            let begin = now()
            _ = try qmp.roundTrip("{\"execute\":\"query-status\",\"id\":1}\n")
            samples[index].append(now() - begin)
        }
    }
    return (samples[0].sorted(), samples[1].sorted())
}
let vmDirectory = directory + "/run/vms/bench0"
let (direct, muxed) = try measure(vmDirectory + "/api.sock", beside: vmDirectory + "/qmp.sock")

// 3. The same workers under a flotillad with --qmp-handoff: SIGKILL leaves them running, the
// new flotillad re-attaches them and opens qmp.sock in hand-off mode.
kill(daemon.processIdentifier, SIGKILL)
daemon.waitUntilExit()
daemon = try startDaemon(["--qmp-handoff"])
var reattached = false
for _ in 0..<1000 where !reattached {
    let status = (try? ControlClient(socketPath: directory + "/run/control.sock").execute("vm-status", ["name": "bench0"]))?.objectValue
    reattached = status?["state"] == "running" && status?["qmp_socket"]?.stringValue != nil
    if !reattached { usleep(10_000) }
}
guard reattached else { fatalError("flotillad --qmp-handoff did not re-attach bench0") }
let (directAgain, handedOff) = try measure(vmDirectory + "/api.sock", beside: vmDirectory + "/qmp.sock")
func median(_ values: [Double]) -> Double { values[values.count / 2] }
func p99(_ values: [Double]) -> Double { values[min(values.count - 1, values.count * 99 / 100)] }
print("== flotillad (fleet-bench)")
print(
    String(
        format: "VMs created → QMP-ready:   %d VMs in %.2f s = %.1f VMs/s (target ≥ 25/s), %d failed", vmCount, elapsed,
        Double(vmCount) / elapsed, failures.withLock { $0 }))
let target = 1.25
let muxRatio = median(muxed) / median(direct)
let handoffRatio = median(handedOff) / median(directAgain)
func verdict(_ ratio: Double) -> String { ratio <= target ? "meets" : "misses" }
print(
    String(
        format: "query-status direct:                 median %.1f µs, p99 %.1f µs (beside the multiplexer)", median(direct) * 1e6,
        p99(direct) * 1e6))
print(
    String(
        format: "query-status via multiplexer:        median %.1f µs, p99 %.1f µs  ratio %.2f× vs direct (default mode)",
        median(muxed) * 1e6, p99(muxed) * 1e6, muxRatio) + ": \(verdict(muxRatio)) the target ≤ 1.25×")
print(
    String(
        format: "query-status direct:                 median %.1f µs, p99 %.1f µs (beside the hand-off, same workers)",
        median(directAgain) * 1e6, p99(directAgain) * 1e6))
print(
    String(
        format: "query-status via --qmp-handoff:      median %.1f µs, p99 %.1f µs  ratio %.2f× vs direct",
        median(handedOff) * 1e6, p99(handedOff) * 1e6, handoffRatio) + ": \(verdict(handoffRatio)) the target ≤ 1.25×")
print(
    "QMP target ≤ 1.25×: "
        + (muxRatio <= target ? "met by the multiplexer" : "not met by the multiplexer (a proxy doubles the process wake-ups)")
        + (handoffRatio <= target ? "; met by --qmp-handoff (flotillad out of the data path)" : "; not met by --qmp-handoff either"))
print(
    String(
        format: "flotillad RSS:             %d KiB idle, %d KiB with %d VMs = %.1f KiB per VM", idleRSS, loadedRSS, vmCount,
        Double(loadedRSS - idleRSS) / Double(max(1, vmCount))))
