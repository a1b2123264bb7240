import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Testing

/// flotilla-vmm as a user runs it: real /dev/kvm, the Flotilla test guest, real sockets.
@Suite("flotilla-vmm boots the test guest", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct VMMBootTests {
    let vmm = Executables.path("flotilla-vmm")

    static let formats = ["vmlinux", "bzImage"]

    func image(_ format: String) -> String {
        format == "vmlinux" ? GuestImages.vmlinux : GuestImages.bzImage
    }

    @Test("both image formats boot and pass every check with 1, 2 and 4 vCPUs", arguments: formats, [1, 2, 4])
    func boots(format: String, vcpus: Int) throws {
        let result = try run(vmm, ["-kernel", image(format), "-smp", "\(vcpus)", "-append", "console=ttyS0", "-serial", "stdio"])
        let report = GuestReport(output: result.standardOutput)
        #expect(result.status == 0, "\(result.standardError)")
        #expect(report.fact("boot")?["entry"] == "64")
        #expect(report.fact("boot")?["protocol"] == "2.15")
        #expect(report.fact("cpus")?["online"] == "\(vcpus)")
        let done = try #require(report.done, "no done line in: \(result.standardOutput)")
        #expect(done.fail == 0, "\(report.lines)")
        #expect(done.pass >= 6)
        #expect(report.checks.values.allSatisfy { $0 == "ok" }, "\(report.checks)")
    }

    @Test("the command line and the initrd arrive intact")
    func commandLineAndInitrd() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        var generator = SystemRandomNumberGenerator()
        let initrd = (0..<300_001).map { _ in UInt8.random(in: 0...255, using: &generator) }
        try Data(initrd).write(to: URL(fileURLWithPath: directory.file("initrd.img")))
        // Commas, quotes, equals signs and several -append words, as a user writes them.
        let words = ["console=ttyS0", "quiet", "a=\"b,c\"", "x=1=2", "nonce=\(UInt64.random(in: 0...UInt64.max))"]
        let result = try run(
            vmm, ["-kernel", GuestImages.bzImage, "-initrd", directory.file("initrd.img"), "-serial", "stdio", "-append"] + words)
        #expect(result.status == 0, "\(result.standardError)")
        let report = GuestReport(output: result.standardOutput)
        let cmdline = try #require(report.fact("cmdline"))
        // The six always-present virtio-mmio slots (4 disks, 2 NICs) follow the user's words.
        let slots = (0..<6).map { "virtio_mmio.device=4K@0x\(String(0xd000_0000 + $0 * 0x1000, radix: 16)):\(5 + $0)" }
        let expected = (words + slots).joined(separator: " ")
        #expect(cmdline["text"] == expected)
        #expect(cmdline["crc32"] == String(format: "%08x", crc32(Array(expected.utf8))))
        let initrdFact = try #require(report.fact("initrd"))
        #expect(initrdFact["size"] == "300001")
        #expect(initrdFact["crc32"] == String(format: "%08x", crc32(initrd)))
        #expect(report.done?.fail == 0, "\(report.lines)")
    }

    @Test("256 MiB and a sparse, never-touched 6 GiB guest boot with the right e820 RAM")
    func memorySizes() throws {
        // e820 RAM: [0, 0x9fc00) + [1 MiB, low top) + the part above 4 GiB (docs/guest-abi.md).
        for (size, expected) in [("256M", 0x9fc00 + (256 << 20) - (1 << 20)), ("6G", 0x9fc00 + (3 << 30) - (1 << 20) + (3 << 30))] {
            let result = try run(vmm, ["-kernel", GuestImages.vmlinux, "-m", size, "-serial", "stdio"])
            #expect(result.status == 0, "\(result.standardError)")
            let report = GuestReport(output: result.standardOutput)
            #expect(report.fact("memory")?["e820_ram_bytes"] == "\(expected)", "\(size)")
            #expect(report.done?.fail == 0, "\(size): \(report.lines)")
        }
    }

    /// The /proc/PID/smaps entries (header line plus fields) of mappings of at least `size` bytes.
    func largeMappings(pid: pid_t, size: UInt64) -> [String] {
        guard let smaps = readText("/proc/\(pid)/smaps") else { return [] }
        var blocks: [[Substring]] = []
        for line in smaps.split(separator: "\n") {
            // An entry starts with "start-end perms offset dev inode [path]"; fields are "Key: value".
            let first = line.split(separator: " ").first ?? ""
            if first.contains("-") && !first.hasSuffix(":") {
                blocks.append([line])
            } else if !blocks.isEmpty {
                blocks[blocks.count - 1].append(line)
            }
        }
        return blocks.compactMap { block -> String? in
            guard let range = block.first?.split(separator: " ").first?.split(separator: "-"), range.count == 2,
                let start = UInt64(range[0], radix: 16), let end = UInt64(range[1], radix: 16), end - start >= size
            else { return nil }
            return block.joined(separator: "\n")
        }
    }

    @Test("mem-path, mem-share and dump-guest-core show in /proc/PID/smaps")
    func memoryBacking() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let cases: [(arguments: [String], check: (String) -> Bool, label: String)] = [
            ([], { $0.contains(" rw-p ") && !$0.contains(" dd") }, "anonymous private, dumpable"),
            (["-machine", "mem-share=on"], { $0.contains(" rw-s ") }, "shared"),
            (["-machine", "dump-guest-core=off"], { $0.contains("VmFlags:") && $0.contains(" dd") }, "not dumped"),
            (["-mem-path", directory.path], { $0.contains(directory.path) }, "file in the mem-path directory"),
        ]
        for testCase in cases {
            let process = try BackgroundProcess(
                vmm, ["-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "flotilla.hold=1"] + testCase.arguments)
            #expect(process.waitForOutput("flotilla-guest: holding"), "\(testCase.label): \(process.standardError)")
            let mappings = largeMappings(pid: process.pid, size: 256 << 20)
            #expect(mappings.count == 1, "\(testCase.label): \(mappings.count) mappings of guest RAM size")
            #expect(mappings.contains(where: testCase.check), "\(testCase.label): \(mappings)")
            process.signal(SIGTERM)
            #expect(process.wait() == 0)
        }
        // The backing file was unlinked at creation: nothing is left in the directory.
        #expect(try directory.contents().isEmpty)
    }

    @Test("stop really stops the vCPUs and cont resumes them, with STOP and RESUME events")
    func stopAndCont() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let socket = directory.file("qmp.sock")
        let process = try BackgroundProcess(
            vmm,
            [
                "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "flotilla.hold=1 flotilla.tick=1", "-api-channel",
                "unix:\(socket)",
            ])
        #expect(process.waitForOutput("flotilla-guest: tick 3"))
        let client = try QMPTestClient(path: socket)
        try client.handshake()
        #expect(try client.execute("query-status")["return"] == ["status": "running", "singlestep": false, "running": true])
        // Commands without arguments refuse any, as QEMU's do.
        let refused = try client.execute("query-status", arguments: ["verbose": true])
        #expect(refused["error"]?.objectValue?["desc"] == "Parameter 'verbose' is unexpected", "\(refused)")
        // As in QEMU, the STOP event comes before stop's reply.
        try client.send(QMP.Command(name: "stop", id: "s"))
        #expect(try client.receive()["event"] == "STOP")
        #expect(try client.receive()["id"] == "s")
        #expect(try client.execute("query-status")["return"]?.objectValue?["status"] == "paused")
        let stoppedAt = process.standardOutput.count
        usleep(300_000)
        #expect(process.standardOutput.count == stoppedAt, "the guest kept printing while stopped")
        try client.send(QMP.Command(name: "cont"))
        #expect(try client.receive()["event"] == "RESUME")
        #expect(try client.receive()["return"] == [:])
        let resumedAt = process.standardOutput.count
        #expect(process.waitForOutput("tick", timeout: 5))
        usleep(200_000)
        #expect(process.standardOutput.count > resumedAt, "the guest did not run again after cont")
        #expect(try client.execute("query-status")["return"]?.objectValue?["running"] == true)
        #expect(try client.execute("quit")["return"] == [:])
        let shutdown = try client.waitForEvent("SHUTDOWN")
        #expect(shutdown["data"] == ["guest": false, "reason": "host-qmp-quit"])
        // SHUTDOWN is the last word, said once: whatever else arrives until the VMM closes the
        // connection is not another one.
        var after: [JSONObject] = []
        while let message = try? client.receive() { after.append(message) }
        #expect(!after.contains { $0["event"] == "SHUTDOWN" }, "\(after)")
        #expect(process.wait() == 0)
        #expect(access(socket, F_OK) != 0, "the api-channel socket was left behind")
    }

    @Test("-daemonize returns only when the api-channel accepts; pidfile 0600 holds the daemon's pid; quit removes both")
    func daemonize() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let socket = directory.file("qmp.sock")
        let pidfile = directory.file("vm.pid")
        let result = try run(
            vmm,
            [
                "-name", "daemon-test", "-kernel", GuestImages.vmlinux, "-append", "flotilla.hold=1",
                "-api-channel", "unix:\(socket)", "-daemonize", "-pidfile", pidfile, "-D", directory.file("vm.log"),
            ])
        #expect(result.status == 0, "\(result.standardError)")
        // No retry: the socket must accept the moment the command has returned.
        let client = try QMPTestClient(path: socket, timeout: 0)
        try client.handshake()
        let pidText = try #require(readText(pidfile)).trimmingCharacters(in: .whitespacesAndNewlines)
        let pid = try #require(pid_t(pidText))
        #expect(kill(pid, 0) == 0, "the daemon is not running")
        var info = stat()
        #expect(stat(pidfile, &info) == 0 && info.st_mode & 0o777 == 0o600)
        // The daemon leads its own session and has stdio detached.
        #expect(getsid(pid) == pid)
        #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/1")) == "/dev/null")
        // -name shows in the thread names.
        let comm = readText("/proc/\(pid)/comm")?.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(comm == "daemon-test")
        let threads = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        let names = threads.compactMap { readText("/proc/\(pid)/task/\($0)/comm")?.trimmingCharacters(in: .whitespacesAndNewlines) }
        #expect(names.contains("daemon-te-vcpu0"), "\(names)")
        // The seccomp filter is on by default, on every thread.
        #expect(readText("/proc/\(pid)/status")?.contains("Seccomp:\t2") == true)
        for thread in threads {
            #expect(readText("/proc/\(pid)/task/\(thread)/status")?.contains("Seccomp:\t2") == true, "thread \(thread)")
        }

        #expect(try client.execute("quit")["return"] == [:])
        var waited = 0
        while kill(pid, 0) == 0 && waited < 10_000 {
            usleep(1000)
            waited += 1
        }
        #expect(kill(pid, 0) != 0, "the daemon did not exit")
        let leftovers = try directory.contents()
        #expect(leftovers == ["vm.log"], "left behind: \(leftovers)")
        #expect(readText(directory.file("vm.log"))?.contains("VM ended") == true)
    }

    @Test("-disable-seccomp runs without a filter")
    func seccompDisabled() throws {
        let process = try BackgroundProcess(
            vmm, ["-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "flotilla.hold=1", "-disable-seccomp"])
        #expect(process.waitForOutput("flotilla-guest: holding"))
        #expect(readText("/proc/\(process.pid)/status")?.contains("Seccomp:\t0") == true)
        process.signal(SIGTERM)
        #expect(process.wait() == 0)
    }

    @Test("an existing pidfile is refused and left alone, with nothing else left behind")
    func existingPidfile() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let pidfile = directory.file("vm.pid")
        try "12345\n".write(toFile: pidfile, atomically: true, encoding: .utf8)
        let result = try run(
            vmm,
            [
                "-kernel", GuestImages.vmlinux, "-api-channel", "unix:\(directory.file("qmp.sock"))", "-daemonize", "-pidfile", pidfile,
            ])
        #expect(result.status == 2)
        #expect(result.standardError.contains("-pidfile") && result.standardError.contains(pidfile), "\(result.standardError)")
        #expect(readText(pidfile) == "12345\n")
        #expect(try directory.contents() == ["vm.pid"])
    }

    @Test("no leftovers after a guest reset, SIGTERM and SIGINT")
    func noLeftovers() throws {
        for ending in ["reset", "SIGTERM", "SIGINT"] {
            let directory = try TemporaryDirectory()
            defer { directory.remove() }
            let append = ending == "reset" ? "console=ttyS0" : "flotilla.hold=1"
            let process = try BackgroundProcess(
                vmm,
                [
                    "-kernel", GuestImages.bzImage, "-serial", "stdio", "-append", append, "-api-channel",
                    "unix:\(directory.file("qmp.sock"))",
                ])
            if ending != "reset" {
                #expect(process.waitForOutput("flotilla-guest: holding"))
                process.signal(ending == "SIGTERM" ? SIGTERM : SIGINT)
            }
            #expect(process.wait() == 0, "\(ending): \(process.standardError)")
            let leftovers = try directory.contents()
            #expect(leftovers.isEmpty, "\(ending) left: \(leftovers)")
        }
    }

    @Test("a guest that triple-faults ends the VM with status 3, the vCPU state in the log, and no leftovers")
    func guestFailure() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        // ud2 with no IDT: #UD cannot be delivered, #DF neither: a triple fault.
        let kernel = directory.file("ud2.elf")
        try Data(makeELF(code: [0x0f, 0x0b])).write(to: URL(fileURLWithPath: kernel))
        let result = try run(
            vmm,
            [
                "-kernel", kernel, "-api-channel", "unix:\(directory.file("qmp.sock"))", "-D", directory.file("vm.log"),
            ])
        #expect(result.status == 3, "\(result.standardError)")
        let log = readText(directory.file("vm.log")) ?? ""
        #expect(log.contains("triple fault"), "\(log)")
        #expect(log.contains("rip") || log.contains("RIP"), "no registers in: \(log)")
        #expect(result.standardError.contains("the VM failed"))
        let leftovers = try directory.contents()
        #expect(leftovers == ["ud2.elf", "vm.log"], "left: \(leftovers)")
    }

    /// Kernel files that must be refused, and what the error must say.
    static func badKernels(in directory: TemporaryDirectory) throws -> [(String, [UInt8], [String])] {
        let elf = Array(try Data(contentsOf: URL(fileURLWithPath: GuestImages.vmlinux)))
        var bzImage = Array(try Data(contentsOf: URL(fileURLWithPath: GuestImages.bzImage)))
        var tooLarge = bzImage
        // init_size (setup header offset 0x260) far beyond a 256 MiB guest.
        withUnsafeBytes(of: UInt32(0x4000_0000).littleEndian) { tooLarge.replaceSubrange(0x260..<0x264, with: $0) }
        var oldProtocol = bzImage
        oldProtocol[0x206] = 0x0b  // version 2.11: no XLF_KERNEL_64
        bzImage[0x202] = UInt8(ascii: "X")  // "HdrS" magic broken
        return [
            ("truncated-elf", Array(elf.prefix(100)), ["truncated-elf"]),
            ("wrong-magic", Array(repeating: 0x5a, count: 8192), ["wrong-magic"]),
            ("empty", [], ["empty"]),
            ("bad-hdrs", bzImage, ["bad-hdrs"]),
            ("too-large", tooLarge, ["too-large"]),
            ("old-protocol", oldProtocol, ["old-protocol"]),
        ]
    }

    @Test("bad kernel files give clear errors, exit 2 and leave nothing behind")
    func badKernelFiles() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let kernels = try Self.badKernels(in: directory)
        for (name, bytes, _) in kernels {
            let path = directory.file(name)
            try Data(bytes).write(to: URL(fileURLWithPath: path))
        }
        for (name, _, fragments) in kernels {
            let runtime = try TemporaryDirectory()
            defer { runtime.remove() }
            let result = try run(
                vmm,
                [
                    "-kernel", directory.file(name), "-api-channel", "unix:\(runtime.file("qmp.sock"))",
                    "-daemonize", "-pidfile", runtime.file("vm.pid"),
                ])
            #expect(result.status == 2, "\(name): \(result.standardError)")
            for fragment in fragments {
                #expect(result.standardError.contains(fragment), "\(name): \(result.standardError)")
            }
            let leftovers = try runtime.contents()
            #expect(leftovers.isEmpty, "\(name) left: \(leftovers)")
        }
        let missing = try run(vmm, ["-kernel", directory.file("does-not-exist")])
        #expect(missing.status == 2)
        #expect(missing.standardError.contains("does-not-exist"))
    }
}
