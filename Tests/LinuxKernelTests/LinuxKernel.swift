import FlotillaTestSupport
import Foundation
import Glibc
import Testing

/// The Linux test kernel built by `Linux/build-kernel`, found through FLOTILLA_LINUX_KERNEL_DIR
/// (set by `Linux/run-tests`). Without it the suite skips, so the quick `swift test` stays quick.
enum LinuxKernel {
    static let directory: String? = {
        guard let value = getenv("FLOTILLA_LINUX_KERNEL_DIR").map({ String(cString: $0) }), !value.isEmpty else { return nil }
        return value
    }()

    static let available = directory != nil

    static let skipReason: Comment =
        "set FLOTILLA_LINUX_KERNEL_DIR to a Linux/build-kernel result (Linux/run-tests does; each boot takes tens of seconds)"

    static func image(_ format: ImageFormat) throws -> String {
        guard let directory else { throw LinuxTestError("FLOTILLA_LINUX_KERNEL_DIR is not set") }
        let path = directory + "/" + format.rawValue
        guard access(path, R_OK) == 0 else { throw LinuxTestError("no readable \(path); run Linux/build-kernel") }
        return path
    }

    /// The kernel arguments every boot needs on this host (see ../shared/DESIGN.md, "A real
    /// Linux kernel as a test client"): the console on the 8250, no XSAVE and none of the CPU
    /// features the nested layer reports but whose instructions its emulator lacks,
    /// `no_int3_selftest` (Linux/patches/0001), and an immediate reset through the i8042 on panic.
    static let baseArguments = [
        "console=ttyS0", "earlyprintk=serial,ttyS0,115200", "noxsave",
        "clearcpuid=popcnt,smap,smep,fsgsbase,rdpid,rdtscp,invpcid,pcid,rdrand,rdseed,clflushopt,clwb,avx,avx2",
        "no_int3_selftest", "panic=-1", "reboot=k",
    ]
}

enum ImageFormat: String, Sendable, CaseIterable, CustomTestStringConvertible {
    case vmlinux
    case bzImage

    var testDescription: String { rawValue }
}

struct LinuxTestError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// One VM to boot: the image, its size, and room for what later tests add (virtio devices as
/// extra flotilla-vmm options, their kernel arguments such as `root=/dev/vda`, an initrd).
struct LinuxBootPlan: Sendable, CustomTestStringConvertible {
    /// Tells boots of the same image, vCPUs and memory apart (in the test name and the log file names).
    var label: String?
    var format: ImageFormat
    var vcpus: Int
    var memoryMiB: Int
    var extraKernelArguments: [String] = []
    var extraVMMArguments: [String] = []
    var initrd: String?
    /// Runs flotilla-vmm inside this network namespace (`ip netns exec`), for NICs on its taps.
    var namespace: NetworkNamespace?
    /// Ends the boot (a failure) after this long in all, or after `stallTimeout` seconds
    /// without new serial output (a hung kernel). The slowest quiet stretch measured here is
    /// about 20 s (network initcalls) on a quiet host and under a minute with the host's two
    /// CPUs busy with other work; a whole boot takes 50-100 s. (A kernel with tinyconfig's
    /// periodic 250 Hz tick on every vCPU could go quiet for good here: see
    /// Linux/config.fragment, "Timer ticks".)
    var timeout: Double = 480
    var stallTimeout: Double = 240

    var kernelArguments: [String] { LinuxKernel.baseArguments + extraKernelArguments }
    var append: String { kernelArguments.joined(separator: " ") }
    var memoryBytes: UInt64 { UInt64(memoryMiB) << 20 }

    var testDescription: String { "\(format.rawValue), \(vcpus) vCPU, \(memoryMiB) MiB" + (label.map { ", \($0)" } ?? "") }

    func vmmArguments(kernel: String) -> [String] {
        var arguments = ["-kernel", kernel, "-smp", "\(vcpus)", "-m", "\(memoryMiB)M", "-serial", "stdio"]
        if let initrd { arguments += ["-initrd", initrd] }
        return arguments + extraVMMArguments + ["-append"] + kernelArguments
    }
}

/// What one boot produced, with the host time at which each milestone first showed on the serial port.
struct LinuxBoot: Sendable {
    let plan: LinuxBootPlan
    let status: Int32
    /// flotilla-vmm was killed: the kernel hung (no output for `stallTimeout`) or ran too long.
    let timedOut: Bool
    let log: KernelLog
    let standardError: String
    let seconds: Double
    let milestones: [(name: String, seconds: Double)]

    /// The milestones a boot passes, in order, and the serial text that marks each.
    static let milestoneMarkers: [(name: String, text: String)] = [
        ("version line", "Linux version "),
        ("e820", "BIOS-e820: "),
        ("MP table", "Intel MultiProcessor Specification"),
        ("smp brought up", "smp: Brought up "),
        ("8250", "serial8250: ttyS0"),
        ("virtio-blk", "virtio_blk virtio0: [vda] "),
        ("root mounted", "VFS: Mounted root "),
        ("end of kernel init", "Freeing unused kernel image"),
        ("init run", " as init process"),
        ("panic", "Kernel panic - not syncing"),
    ]

    /// Boots `plan` under flotilla-vmm, with the serial port on its standard output. In
    /// `whileRunning` the test works with the running VM first (QMP, sockets, waiting for
    /// serial output through ``RunningBoot/waitForSerial(_:)``) and usually ends it; the boot
    /// is then watched to its end as usual. An error it throws kills the VM, and comes back with
    /// the boot's tail once the logs are kept.
    static func boot(_ plan: LinuxBootPlan, whileRunning: (RunningBoot) throws -> Void = { _ in }) throws -> LinuxBoot {
        let kernel = try LinuxKernel.image(plan.format)
        let vmm = Executables.path("flotilla-vmm")
        let arguments = plan.vmmArguments(kernel: kernel)
        let process =
            try plan.namespace.map { try BackgroundProcess($0.ip, $0.vmmArguments(vmm, arguments)) }
            ?? BackgroundProcess(vmm, arguments)
        let running = RunningBoot(plan: plan, process: process)
        var failure: (any Error)?
        do {
            try whileRunning(running)
        } catch {
            failure = error
            process.signal(SIGKILL)
        }
        while running.poll() {
            usleep(20_000)
        }
        let timedOut = process.isRunning
        let status = process.wait(timeout: 0)
        let seconds = Date().timeIntervalSince(running.start)
        let output = process.standardOutput
        for marker in milestoneMarkers where running.reached[marker.name] == nil && output.contains(marker.text) {
            running.reached[marker.name] = seconds
        }
        let milestones =
            milestoneMarkers.compactMap { marker in running.reached[marker.name].map { (marker.name, $0) } } + [("end", seconds)]
        let boot = LinuxBoot(
            plan: plan, status: status, timedOut: timedOut, log: KernelLog(output), standardError: process.standardError, seconds: seconds,
            milestones: milestones)
        boot.keep()
        if let failure { throw LinuxTestError("\(failure)\n\(boot.tail)") }
        return boot
    }

    /// Writes the serial log and the VMM's standard error next to each other for inspection,
    /// and prints the milestone times.
    func keep() {
        keep(log.text, as: "serial")
        keep(standardError, as: "stderr")
        let times = milestones.map { "\($0.name) \(String(format: "%.1f", $0.seconds)) s" }.joined(separator: ", ")
        print(
            "Linux boot \(plan.testDescription): \(timedOut ? "killed, " : "")exit \(status); \(times); logs in \(Self.logDirectory)/\(logName).*.log"
        )
    }

    static var logDirectory: String { (getenv("FLOTILLA_LINUX_LOG_DIR").map { String(cString: $0) }) ?? NSTemporaryDirectory() }
    var logName: String {
        "flotilla-linux-\(plan.format.rawValue)-\(plan.vcpus)cpu-\(plan.memoryMiB)M" + (plan.label.map { "-\($0)" } ?? "")
    }

    /// Keeps `text` (another transcript of this boot, such as a virtio console's) next to the
    /// serial log, as `<name>.<kind>.log`.
    func keep(_ text: String, as kind: String) {
        try? text.write(toFile: Self.logDirectory + "/" + logName + "." + kind + ".log", atomically: true, encoding: .utf8)
    }

    /// The last lines of the log and the VMM's messages, for failure messages.
    var tail: String {
        (timedOut ? "KILLED (hung or too slow), " : "")
            + "exit \(status) after \(String(format: "%.1f", seconds)) s\n--- serial (last 40 lines) ---\n"
            + log.lines.suffix(40).joined(separator: "\n") + "\n--- flotilla-vmm stderr ---\n" + standardError
    }
}

/// A boot in progress: the flotilla-vmm process and the milestones seen so far. Used on the
/// test's thread only.
final class RunningBoot {
    let plan: LinuxBootPlan
    let process: BackgroundProcess
    let start = Date()
    /// The host time (seconds from `start`) at which each milestone first showed.
    var reached: [String: Double] = [:]
    private var lastLength = 0
    private var lastOutput = Date()

    init(plan: LinuxBootPlan, process: BackgroundProcess) {
        self.plan = plan
        self.process = process
    }

    /// Notes new milestones; false once the VM ended, ran longer than the plan's `timeout`, or
    /// printed nothing for its `stallTimeout`.
    func poll() -> Bool {
        guard process.isRunning else { return false }
        let output = process.standardOutput
        let now = Date()
        if output.utf8.count != lastLength {
            lastLength = output.utf8.count
            lastOutput = now
        }
        for marker in LinuxBoot.milestoneMarkers where reached[marker.name] == nil && output.contains(marker.text) {
            reached[marker.name] = now.timeIntervalSince(start)
        }
        return now.timeIntervalSince(start) < plan.timeout && now.timeIntervalSince(lastOutput) < plan.stallTimeout
    }

    /// Waits until the serial output contains `text`; false when the VM ended, stalled or ran
    /// out of time first, or after `timeout` seconds when given (for a line that is due and
    /// would otherwise be waited for until the stall timeout of a quiet kernel).
    func waitForSerial(_ text: String, timeout: Double? = nil) -> Bool {
        let deadline = timeout.map { Date().addingTimeInterval($0) }
        while poll() && deadline.map({ Date() < $0 }) != false {
            if process.standardOutput.contains(text) { return true }
            usleep(20_000)
        }
        return process.standardOutput.contains(text)
    }

    /// The serial output so far, for failure messages.
    var serial: KernelLog { KernelLog(process.standardOutput) }
}

/// The kernel's console output, with the printk timestamps removed.
struct KernelLog: Sendable {
    let text: String
    /// Every line without its `[    1.234567] ` prefix.
    let lines: [String]

    init(_ text: String) {
        self.text = text
        lines = text.split(omittingEmptySubsequences: true, whereSeparator: \.isNewline).map { line in
            var rest = Substring(line)
            if rest.hasPrefix("["), let close = rest.firstIndex(of: "]") {
                rest = rest[rest.index(after: close)...]
                if rest.hasPrefix(" ") { rest = rest.dropFirst() }
            }
            return String(rest)
        }
    }

    func first(_ prefix: String) -> String? { lines.first { $0.hasPrefix(prefix) } }
    func all(containing text: String) -> [String] { lines.filter { $0.contains(text) } }
    func contains(_ text: String) -> Bool { lines.contains { $0.contains(text) } }
    func index(of text: String) -> Int? { lines.firstIndex { $0.contains(text) } }

    /// The firmware map as the kernel printed it: `BIOS-e820: [mem 0x...-0x...] type`.
    var e820: [E820Entry] {
        lines.compactMap { line in
            guard line.hasPrefix("BIOS-e820: [mem 0x") else { return nil }
            let body = line.dropFirst("BIOS-e820: [mem ".count)
            guard let close = body.firstIndex(of: "]") else { return nil }
            let range = body[..<close].split(separator: "-")
            guard range.count == 2, let first = UInt64(range[0].dropFirst(2), radix: 16),
                let last = UInt64(range[1].dropFirst(2), radix: 16)
            else { return nil }
            let type = body[body.index(after: close)...].trimmingCharacters(in: .whitespaces)
            return E820Entry(first: first, last: last, type: type)
        }
    }

    /// What virtio_blk printed for each disk it probed, by disk name (`vda`):
    /// `virtio_blk virtioK: [vda] N 512-byte logical blocks (...)`.
    var virtioBlockDisks: [String: (device: String, sectors: UInt64)] {
        var disks: [String: (device: String, sectors: UInt64)] = [:]
        for line in lines where line.hasPrefix("virtio_blk virtio") && line.contains(" 512-byte logical blocks") {
            let words = line.split(separator: " ")
            guard words.count >= 4, words[2].hasPrefix("["), words[2].hasSuffix("]"), let sectors = UInt64(words[3]) else { continue }
            disks[String(words[2].dropFirst().dropLast())] = (String(words[1].dropLast()), sectors)
        }
        return disks
    }

    /// N from `smp: Brought up 1 node, N CPUs`.
    var cpusBroughtUp: Int? {
        guard let line = first("smp: Brought up ") else { return nil }
        let words = line.split(separator: " ")
        guard let index = words.firstIndex(where: { $0.hasPrefix("CPU") }), index > 0 else { return nil }
        return Int(words[index - 1])
    }
}

struct E820Entry: Equatable, Sendable, CustomStringConvertible {
    var first: UInt64
    var last: UInt64
    var type: String

    var description: String { String(format: "[mem %#018llx-%#018llx] ", first, last) + type }

    /// The map docs/guest-abi.md promises for `memoryBytes` of guest RAM: `[0, 0x9fc00)` RAM,
    /// the EBDA and the BIOS area reserved, `[1 MiB, top of low RAM)` RAM (low RAM ends at
    /// 3 GiB at most) and the rest of RAM from 4 GiB.
    static func documented(memoryBytes: UInt64) -> [E820Entry] {
        let lowTop = min(memoryBytes, 3 << 30)
        var map = [
            E820Entry(first: 0, last: 0x9_fbff, type: "usable"),
            E820Entry(first: 0x9_fc00, last: 0x9_ffff, type: "reserved"),
            E820Entry(first: 0xf_0000, last: 0xf_ffff, type: "reserved"),
            E820Entry(first: 0x10_0000, last: lowTop - 1, type: "usable"),
        ]
        if memoryBytes > lowTop {
            map.append(E820Entry(first: 4 << 30, last: (4 << 30) + (memoryBytes - lowTop) - 1, type: "usable"))
        }
        return map
    }
}
