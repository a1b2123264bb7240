import CBench
import Foundation

// flotilla-bench: flotilla-vmm next to its baselines, in the same run. See README.md.
// Every benchmark prints its own table; a summary with ratios and targets comes last.
// Benchmarks measure, they do not assert: the exit status is 0 unless a run failed.

struct Options {
    var vmm = "../.build-bench/release/flotilla-vmm"
    var vmmDynamic: String? = nil
    var qemu = "/usr/bin/qemu-system-x86_64"
    var guest = "../Guest/build/flotilla-guest.vmlinux"
    var exitGuestSmall = "build/exitloop-n1.vmlinux"
    var exitGuestLarge = "build/exitloop-n2.vmlinux"
    var n1 = 20_000
    var n2 = 220_000
    var baseline = "build/kvm-baseline"
    var startupReps = 20
    var memoryReps = 3
    var exitReps = 5
    var qmpIterations = 1000
    var only: Set<String> = ["startup", "memory", "exits", "qmp"]
    var workDir = "/tmp/flotilla-bench-\(getpid())"

    static let usage = """
        usage: flotilla-bench [--vmm PATH] [--vmm-dynamic PATH] [--qemu PATH] [--guest VMLINUX]
                              [--exit-guests N1_IMAGE N2_IMAGE] [--n1 N] [--n2 N] [--baseline PATH]
                              [--startup-reps N] [--memory-reps N] [--exit-reps N] [--qmp-iterations N]
                              [--only startup,memory,exits,qmp]
        """

    init(_ args: [String]) throws {
        var it = args.makeIterator()
        func value(_ flag: String) throws -> String {
            guard let v = it.next() else { throw BenchError("\(flag) needs a value\n\(Options.usage)") }
            return v
        }
        func number(_ flag: String) throws -> Int {
            guard let n = Int(try value(flag)), n > 0 else { throw BenchError("\(flag) needs a positive integer") }
            return n
        }
        while let flag = it.next() {
            switch flag {
            case "--vmm": vmm = try value(flag)
            case "--vmm-dynamic": vmmDynamic = try value(flag)
            case "--qemu": qemu = try value(flag)
            case "--guest": guest = try value(flag)
            case "--exit-guests":
                exitGuestSmall = try value(flag)
                exitGuestLarge = try value(flag)
            case "--n1": n1 = try number(flag)
            case "--n2": n2 = try number(flag)
            case "--baseline": baseline = try value(flag)
            case "--startup-reps": startupReps = try number(flag)
            case "--memory-reps": memoryReps = try number(flag)
            case "--exit-reps": exitReps = try number(flag)
            case "--qmp-iterations": qmpIterations = try number(flag)
            case "--only": only = Set(try value(flag).split(separator: ",").map(String.init))
            case "-h", "--help":
                print(Options.usage)
                exit(0)
            default: throw BenchError("unknown option \(flag)\n\(Options.usage)")
            }
        }
        guard n2 > n1 else { throw BenchError("--n2 must be larger than --n1") }
    }
}

/// One line of the final summary.
struct Summary {
    var name: String
    var flotilla: String
    var baseline: String
    var ratio: Double
    var target: String
    var met: Bool
}

let memoryMiB = 256
let memoryBytes = UInt64(memoryMiB) << 20

struct Bench {
    let o: Options
    var summary: [Summary] = []

    func socketPath(_ tag: String) -> String { "\(o.workDir)/\(tag).sock" }

    func vmmArguments(socket: String, serial: Bool) -> [String] {
        var args = ["-kernel", o.guest, "-append", "flotilla.hold=1", "-m", "\(memoryMiB)M", "-smp", "1",
                    "-api-channel", "unix:\(socket)"]
        if serial { args += ["-serial", "stdio"] }
        return args
    }

    func qemuArguments(socket: String) -> [String] {
        ["-M", "microvm", "-accel", "kvm", "-S", "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
         "-qmp", "unix:\(socket),server=on,wait=off", "-m", "\(memoryMiB)"]
    }

    // MARK: (a) start-up

    /// Process start until the api-channel socket accepts and the QMP greeting is read, and
    /// (with `query`) until the first `query-status` after `qmp_capabilities` is answered:
    /// flotilla-vmm greets while the machine is still being built and answers commands once
    /// it exists, so the second time is when the VM is ready to be driven.
    func startOnce(_ path: String, _ arguments: [String], socket: String, query: Bool = true) throws -> (greeting: Double, answer: Double) {
        unlink(socket)
        let start = cb_now_ns()
        let child = try Child(path, arguments)
        defer {
            child.stop()
            unlink(socket)
        }
        let qmp = try QMPClient.connect(path: socket, child: child)
        let greeted = Double(cb_now_ns() - start)
        var answered = greeted
        if query {
            try qmp.execute("qmp_capabilities")
            let status = try qmp.execute("query-status")
            guard status.contains("\"return\"") else { throw BenchError("query-status failed: \(status)") }
            answered = Double(cb_now_ns() - start)
        }
        qmp.close()
        return (greeted, answered)
    }

    mutating func startup() throws {
        print("\n(a) Start-up: process start to QMP greeting on the api-channel (\(o.startupReps) runs each, interleaved)")
        print("    C floor:      kvm-baseline doing the same KVM set-up (VM, irqchip, PIT2, 256 MiB memslot, vCPU), then greeting")
        print("    flotilla-vmm: test guest, \(memoryMiB) MiB, 1 vCPU, flotilla.hold=1")
        print("    qemu:         -M microvm -accel kvm -S -nodefaults -no-user-config -nographic -display none -m \(memoryMiB)")
        print("    'answered': until the first query-status after qmp_capabilities is answered (the VM exists)")
        let fs = socketPath("startup-flotilla"), qs = socketPath("startup-qemu")
        // One unmeasured warm-up of each (page cache, dynamic loader caches).
        _ = try startOnce(o.vmm, vmmArguments(socket: fs, serial: false), socket: fs)
        _ = try startOnce(o.qemu, qemuArguments(socket: qs), socket: qs)
        // Reference row: the C floor (KVM VM + irqchip + PIT + 256 MiB memslot + vCPU, then greet).
        let cs = socketPath("startup-floor")
        let floorArgs = [o.guest, "\(memoryMiB)", cs]
        _ = try startOnce(o.baseline, floorArgs, socket: cs, query: false)
        var f: [Double] = [], q: [Double] = [], c: [Double] = [], fa: [Double] = [], qa: [Double] = []
        for _ in 0..<o.startupReps {
            let flotilla = try startOnce(o.vmm, vmmArguments(socket: fs, serial: false), socket: fs)
            f.append(flotilla.greeting)
            fa.append(flotilla.answer)
            let qemu = try startOnce(o.qemu, qemuArguments(socket: qs), socket: qs)
            q.append(qemu.greeting)
            qa.append(qemu.answer)
            c.append(try startOnce(o.baseline, floorArgs, socket: cs, query: false).greeting)
        }
        let r = median(f) / median(q)
        let ra = median(fa) / median(qa)
        printTable([
            ["", "median", "p90", "min", "max"],
            ["flotilla-vmm", ms(median(f)), ms(percentile(f, 90)), ms(f.min()!), ms(f.max()!)],
            ["qemu microvm", ms(median(q)), ms(percentile(q, 90)), ms(q.min()!), ms(q.max()!)],
            ["C floor (reference)", ms(median(c)), ms(percentile(c, 90)), ms(c.min()!), ms(c.max()!)],
            ["flotilla-vmm answered", ms(median(fa)), ms(percentile(fa, 90)), ms(fa.min()!), ms(fa.max()!)],
            ["qemu microvm answered", ms(median(qa)), ms(percentile(qa, 90)), ms(qa.min()!), ms(qa.max()!)],
        ])
        print("    ratio of medians \(ratio(r)) (target ≤ 0.25×); first answer \(ratio(ra)); flotilla-vmm answered − C floor = \(ms(median(fa) - median(c))) (the VMM's own start-up work)")
        summary.append(Summary(name: "(a) start → QMP greeting, median", flotilla: ms(median(f)),
                               baseline: "qemu " + ms(median(q)), ratio: r, target: "≤ 0.25×", met: r <= 0.25))
        summary.append(Summary(name: "    start → first query-status answer", flotilla: ms(median(fa)),
                               baseline: "qemu " + ms(median(qa)), ratio: ra, target: "(info)", met: true))
    }

    // MARK: (b) memory

    struct Footprint {
        var rss: Double, pss: Double, privateDirty: Double
        var excluded: [Mapping]
        var counted: [Mapping]

        /// Rss/Pss/Private_Dirty grouped by what backs the mapping, largest Rss first.
        func breakdown() -> [(String, UInt64, UInt64, UInt64)] {
            var groups: [String: (UInt64, UInt64, UInt64)] = [:]
            for m in counted {
                let key = m.name.isEmpty ? "anonymous (malloc arenas, thread stacks, Swift metadata)"
                    : m.name.hasPrefix("/") ? (m.name as NSString).lastPathComponent : m.name
                let g = groups[key, default: (0, 0, 0)]
                groups[key] = (g.0 + m.rss, g.1 + m.pss, g.2 + m.privateDirty)
            }
            return groups.map { ($0.key, $0.value.0, $0.value.1, $0.value.2) }.sorted { $0.1 > $1.1 }
        }
    }

    /// Sums Rss/Pss/Private_Dirty of every mapping except guest RAM (size ≥ guest memory).
    func footprint(pid: pid_t) throws -> Footprint {
        let maps = try readSmaps(pid: pid)
        let guestRAM = maps.filter { $0.size >= memoryBytes }
        let rest = maps.filter { $0.size < memoryBytes }
        guard !guestRAM.isEmpty else { throw BenchError("pid \(pid): no mapping of ≥ \(memoryMiB) MiB (guest RAM) found") }
        return Footprint(rss: Double(rest.reduce(0) { $0 + $1.rss }), pss: Double(rest.reduce(0) { $0 + $1.pss }),
                         privateDirty: Double(rest.reduce(0) { $0 + $1.privateDirty }), excluded: guestRAM,
                         counted: rest)
    }

    /// Boots the test guest with -serial stdio on a pipe, waits for "flotilla-guest: holding".
    func flotillaFootprint(_ path: String) throws -> Footprint {
        let socket = socketPath("memory-flotilla")
        unlink(socket)
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw BenchError("pipe: \(errnoText(errno))") }
        let child = try Child(path, vmmArguments(socket: socket, serial: true), stdout: fds[1])
        close(fds[1])
        let reader = LineReader(fd: fds[0])
        defer {
            child.stop()
            reader.close()
            unlink(socket)
        }
        var held = false
        while !held {
            let line = try reader.readLine(timeoutMilliseconds: 30_000)
            held = line.contains("flotilla-guest: holding")
        }
        cb_sleep_us(300_000)  // let start-up transients (freed buffers, thread stacks) settle
        guard child.poll() == nil else { throw BenchError("flotilla-vmm exited while holding") }
        return try footprint(pid: child.pid)
    }

    func qemuFootprint() throws -> Footprint {
        let socket = socketPath("memory-qemu")
        unlink(socket)
        let child = try Child(o.qemu, qemuArguments(socket: socket))
        defer {
            child.stop()
            unlink(socket)
        }
        let qmp = try QMPClient.connect(path: socket, child: child)
        qmp.close()
        cb_sleep_us(300_000)
        return try footprint(pid: child.pid)
    }

    mutating func memory() throws {
        print("\n(b) Non-guest memory of an idle \(memoryMiB) MiB VM: /proc/PID/smaps summed over every mapping except guest RAM")
        print("    (median of \(o.memoryReps) runs; flotilla-vmm after the guest printed 'flotilla-guest: holding', qemu with -S)")
        func medianOf(_ run: () throws -> Footprint) throws -> Footprint {
            var runs: [Footprint] = []
            for _ in 0..<o.memoryReps { runs.append(try run()) }
            return runs.sorted { $0.rss < $1.rss }[runs.count / 2]
        }
        var rows: [(String, Footprint)] = []
        let f = try medianOf { try flotillaFootprint(o.vmm) }
        rows.append(("flotilla-vmm (static executable)", f))
        if let dynamic = o.vmmDynamic {
            rows.append(("flotilla-vmm (dynamic stdlib)", try medianOf { try flotillaFootprint(dynamic) }))
        }
        let q = try medianOf { try qemuFootprint() }
        rows.append(("qemu microvm -S", q))
        var table = [["", "Rss", "Pss", "Private_Dirty", "guest RAM mapping(s) excluded"]]
        for (name, fp) in rows {
            let excluded = fp.excluded.map { "\($0.size >> 20) MiB \($0.name.isEmpty ? "anon" : $0.name) (Rss \($0.rss) KiB)" }
            table.append([name, kib(fp.rss), kib(fp.pss), kib(fp.privateDirty), excluded.joined(separator: "; ")])
        }
        printTable(table)
        for (name, fp) in rows where name.hasPrefix("flotilla") {
            print("\n    where the Rss of \(name) is (top 8 by Rss, KiB):")
            var rows = [["mapping", "Rss", "Pss", "Private_Dirty"]]
            for (key, rss, pss, dirty) in fp.breakdown().prefix(8) {
                rows.append([key, "\(rss)", "\(pss)", "\(dirty)"])
            }
            printTable(rows)
        }
        let r = f.rss / q.rss
        print("    Rss ratio \(ratio(r)); Pss ratio \(ratio(f.pss / q.pss)); Private_Dirty ratio \(ratio(f.privateDirty / q.privateDirty)) (target: Rss ≤ 4096 KiB)")
        summary.append(Summary(name: "(b) non-guest Rss, idle VM", flotilla: kib(f.rss), baseline: "qemu " + kib(q.rss),
                               ratio: r, target: "≤ 4096 KiB", met: f.rss <= 4096))
        summary.append(Summary(name: "    non-guest Pss", flotilla: kib(f.pss), baseline: "qemu " + kib(q.pss),
                               ratio: f.pss / q.pss, target: "(info)", met: true))
        summary.append(Summary(name: "    non-guest Private_Dirty", flotilla: kib(f.privateDirty),
                               baseline: "qemu " + kib(q.privateDirty), ratio: f.privateDirty / q.privateDirty,
                               target: "(info)", met: true))
    }

    // MARK: (c) exits

    /// One complete run of an exit-loop image: wall and CPU time.
    func exitRun(_ path: String, _ arguments: [String]) throws -> (wall: Double, cpu: Double) {
        let start = cb_now_ns()
        let child = try Child(path, arguments)
        let status = child.wait()
        let wall = Double(cb_now_ns() - start)
        guard status == 0 else { throw BenchError("\(path) \(arguments.joined(separator: " ")) exited with status \(status)") }
        return (wall, Double(child.cpuNanoseconds))
    }

    mutating func exits() throws {
        let delta = Double(o.n2 - o.n1)
        print("\n(c) Exit handling: `outb %al,$0x80` port-I/O exits per second, (N2 − N1) / (t(N2) − t(N1)) over complete runs")
        print("    N1 = \(o.n1), N2 = \(o.n2); \(o.exitReps) runs of each image per program, interleaved; medians")
        let vmmArgs = { (image: String) in ["-kernel", image, "-m", "\(memoryMiB)M", "-smp", "1"] }
        let baseArgs = { (image: String) in [image, "\(memoryMiB)"] }
        // Warm-up.
        _ = try exitRun(o.vmm, vmmArgs(o.exitGuestSmall))
        _ = try exitRun(o.baseline, baseArgs(o.exitGuestSmall))
        var f1: [(wall: Double, cpu: Double)] = [], f2 = f1, b1 = f1, b2 = f1
        for _ in 0..<o.exitReps {
            f1.append(try exitRun(o.vmm, vmmArgs(o.exitGuestSmall)))
            b1.append(try exitRun(o.baseline, baseArgs(o.exitGuestSmall)))
            f2.append(try exitRun(o.vmm, vmmArgs(o.exitGuestLarge)))
            b2.append(try exitRun(o.baseline, baseArgs(o.exitGuestLarge)))
        }
        func rate(_ a: [(wall: Double, cpu: Double)], _ b: [(wall: Double, cpu: Double)], _ key: KeyPath<(wall: Double, cpu: Double), Double>) -> Double {
            delta / ((median(b.map { $0[keyPath: key] }) - median(a.map { $0[keyPath: key] })) / 1e9)
        }
        let fw = rate(f1, f2, \.wall), bw = rate(b1, b2, \.wall)
        let fc = rate(f1, f2, \.cpu), bc = rate(b1, b2, \.cpu)
        func s(_ xs: [(wall: Double, cpu: Double)]) -> String {
            String(format: "%.0f / %.0f ms", median(xs.map(\.wall)) / 1e6, median(xs.map(\.cpu)) / 1e6)
        }
        printTable([
            ["", "t(N1) wall/cpu", "t(N2) wall/cpu", "exits/s (wall)", "exits/s (cpu)"],
            ["flotilla-vmm", s(f1), s(f2), String(format: "%.0f", fw), String(format: "%.0f", fc)],
            ["C KVM_RUN loop", s(b1), s(b2), String(format: "%.0f", bw), String(format: "%.0f", bc)],
        ])
        let r = fw / bw
        print("    ratio (wall) \(ratio(r)), ratio (cpu) \(ratio(fc / bc)) (target ≥ 0.9×)")
        summary.append(Summary(name: "(c) port-I/O exits/s (wall)", flotilla: String(format: "%.0f /s", fw),
                               baseline: String(format: "C %.0f /s", bw), ratio: r, target: "≥ 0.9×", met: r >= 0.9))
        summary.append(Summary(name: "    port-I/O exits/s (cpu time)", flotilla: String(format: "%.0f /s", fc),
                               baseline: String(format: "C %.0f /s", bc), ratio: fc / bc, target: "(info)", met: true))
    }

    // MARK: (d) QMP latency

    mutating func qmp() throws {
        print("\n(d) QMP query-status round trip after qmp_capabilities (\(o.qmpIterations) each, interleaved, both VMs up)")
        let fs = socketPath("qmp-flotilla"), qs = socketPath("qmp-qemu")
        unlink(fs)
        unlink(qs)
        let fChild = try Child(o.vmm, vmmArguments(socket: fs, serial: false))
        let qChild = try Child(o.qemu, qemuArguments(socket: qs))
        defer {
            fChild.stop()
            qChild.stop()
            unlink(fs)
            unlink(qs)
        }
        let fq = try QMPClient.connect(path: fs, child: fChild), qq = try QMPClient.connect(path: qs, child: qChild)
        defer {
            fq.close()
            qq.close()
        }
        try fq.execute("qmp_capabilities")
        try qq.execute("qmp_capabilities")
        print("    qemu query-kvm: \(try qq.execute("query-kvm"))")
        for _ in 0..<20 {  // warm-up
            try fq.execute("query-status")
            try qq.execute("query-status")
        }
        var f: [Double] = [], q: [Double] = []
        for _ in 0..<o.qmpIterations {
            var t = cb_now_ns()
            let reply1 = try fq.execute("query-status")
            f.append(Double(cb_now_ns() - t))
            t = cb_now_ns()
            let reply2 = try qq.execute("query-status")
            q.append(Double(cb_now_ns() - t))
            guard reply1.contains("status"), reply2.contains("status") else {
                throw BenchError("unexpected query-status replies: \(reply1) / \(reply2)")
            }
        }
        printTable([
            ["", "median", "p90", "p99", "mean"],
            ["flotilla-vmm", us(median(f)), us(percentile(f, 90)), us(percentile(f, 99)), us(mean(f))],
            ["qemu microvm", us(median(q)), us(percentile(q, 90)), us(percentile(q, 99)), us(mean(q))],
        ])
        let r = median(f) / median(q)
        print("    ratio of medians \(ratio(r)) (lower is better; no target)")
        summary.append(Summary(name: "(d) QMP query-status RTT, median", flotilla: us(median(f)),
                               baseline: "qemu " + us(median(q)), ratio: r, target: "(info, ≤ 1×)", met: r <= 1))
    }

    func printSummary() {
        print("\nSummary (flotilla-vmm vs baseline, same run)")
        var rows = [["benchmark", "flotilla-vmm", "baseline", "ratio", "target", "met"]]
        for s in summary {
            rows.append([s.name, s.flotilla, s.baseline, ratio(s.ratio), s.target,
                         s.target == "(info)" ? "" : (s.met ? "yes" : "NO")])
        }
        printTable(rows)
    }
}

cb_line_buffered_stdout()
signal(SIGPIPE, SIG_IGN)
do {
    let options = try Options(Array(CommandLine.arguments.dropFirst()))
    mkdir(options.workDir, 0o700)
    defer { rmdir(options.workDir) }
    for path in [options.vmm, options.qemu] + (options.vmmDynamic.map { [$0] } ?? []) {
        guard access(path, X_OK) == 0 else { throw BenchError("\(path) is not executable") }
    }
    var bench = Bench(o: options)
    print("flotilla-bench: \(ProcessInfo.processInfo.activeProcessorCount) CPUs, load average \((try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8))?.split(separator: " ").prefix(3).joined(separator: " ") ?? "?")")
    print("  flotilla-vmm \(options.vmm)")
    var failures: [String] = []
    for name in ["startup", "memory", "exits", "qmp"] where options.only.contains(name) {
        do {
            switch name {
            case "startup": try bench.startup()
            case "memory": try bench.memory()
            case "exits": try bench.exits()
            default: try bench.qmp()
            }
        } catch {
            failures.append("\(name): \(error)")
            print("    FAILED: \(error)")
        }
    }
    bench.printSummary()
    if !failures.isEmpty {
        print("\nfailed runs:\n  " + failures.joined(separator: "\n  "))
        exit(1)
    }
} catch {
    FileHandle.standardError.write(Data("flotilla-bench: \(error)\n".utf8))
    exit(2)
}
