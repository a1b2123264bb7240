import FlotillaTestSupport
import Foundation
import Glibc
import Testing

/// virtio-blk end to end: flotilla-vmm with real image files, the test guest's virtio-blk
/// driver on real /dev/kvm, the seccomp filter on (the default).
@Suite("virtio-blk through the test guest", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct VirtioBlockTests {
    let vmm = Executables.path("flotilla-vmm")

    static func randomBytes(_ count: Int) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        var bytes = [UInt8](repeating: 0, count: count)
        for i in stride(from: 0, to: count, by: 8) {
            let word = generator.next()
            for j in 0..<min(8, count - i) { bytes[i + j] = UInt8(truncatingIfNeeded: word >> (8 * UInt64(j))) }
        }
        return bytes
    }

    static func write(_ bytes: [UInt8], to path: String) throws {
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    static func contents(_ path: String) throws -> [UInt8] {
        Array(try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    static func hex(_ value: UInt32) -> String { String(format: "%08x", value) }

    /// The 512-byte sector the guest writes with flotilla.nonce.
    static func nonceSector(index: Int, nonce: String) -> [UInt8] {
        let text = Array("flotilla \(index) \(nonce)".utf8)
        return text + [UInt8](repeating: 0, count: 512 - text.count)
    }

    /// With flotilla.nonce the guest WRITE_ZEROES sectors 8..15 and DISCARDs sectors 16..31
    /// of every writable disk (each over a pattern it wrote first).
    static let zeroedSectors = 8..<16
    static let discardedSectors = 16..<32

    /// `bytes` as the guest leaves a writable disk with flotilla.nonce: the write-zeroes and
    /// discard ranges zero (our backend punches a hole or zeroes the range), the last sector
    /// holding the nonce line.
    static func afterNonceRun(_ bytes: [UInt8], index: Int, nonce: String) -> [UInt8] {
        var expected = bytes
        for sectors in [zeroedSectors, discardedSectors] where bytes.count > 512 * discardedSectors.upperBound {
            expected.replaceSubrange(
                512 * sectors.lowerBound..<512 * sectors.upperBound, with: [UInt8](repeating: 0, count: 512 * sectors.count))
        }
        expected.replaceSubrange(bytes.count - 512..<bytes.count, with: nonceSector(index: index, nonce: nonce))
        return expected
    }

    func boot(_ arguments: [String], append: String = "console=ttyS0") throws -> (ProcessResult, GuestReport) {
        let result = try run(vmm, ["-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", append] + arguments, timeout: 120)
        return (result, GuestReport(output: result.standardOutput))
    }

    @Test("data both ways: the guest reads the host's random image, the host finds the guest's nonce sector")
    func dataBothWays() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let image = directory.file("disk.img")
        var bytes = Self.randomBytes(3 << 20)
        try Self.write(bytes, to: image)
        let nonce = String(UInt64.random(in: 1...UInt64.max), radix: 16)
        let (result, report) = try boot(
            ["-drive", "id=disk0,file=\(image),serial=disk-zero"], append: "console=ttyS0 flotilla.nonce=\(nonce)")
        #expect(result.status == 0, "\(result.standardError)")
        let fact = try #require(report.fact("device virtio-blk"), "\(report.lines)")
        #expect(fact["base"] == "0xd0000000")
        #expect(fact["irq"] == "5")
        #expect(fact["capacity"] == "\((3 << 20) / 512)")
        #expect(fact["crc32"] == Self.hex(crc32(bytes[0..<65536])))
        #expect(fact["ro"] == "0")
        #expect(fact["serial"] == "disk-zero")
        #expect(report.fact("virtio-blk-nonce")?["result"] == "written")
        #expect(report.checks["virtio-blk0"] == "ok", "\(report.lines)")
        #expect(report.done?.fail == 0, "\(report.lines)")
        // After exit, the last sector holds the guest's line, the write-zeroes and discard
        // ranges are zero, and nothing else changed.
        let after = try Self.contents(image)
        bytes = Self.afterNonceRun(bytes, index: 0, nonce: nonce)
        #expect(after == bytes)
    }

    @Test("readonly=on: VIRTIO_BLK_F_RO, the write is refused and the file is unchanged", arguments: [true, false])
    func readOnly(direct: Bool) throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let image = directory.file("ro.img")
        let bytes = Self.randomBytes(1 << 20)
        try Self.write(bytes, to: image)
        // Not even writable on the host: the image is opened O_RDONLY.
        chmod(image, 0o444)
        let (result, report) = try boot(
            ["-drive", "id=ro,file=\(image),readonly=on,direct=\(direct ? "on" : "off")"],
            append: "console=ttyS0 flotilla.nonce=abcdef")
        #expect(result.status == 0, "\(result.standardError)")
        let fact = try #require(report.fact("device virtio-blk"), "\(report.lines)")
        #expect(fact["ro"] == "1")
        #expect(fact["crc32"] == Self.hex(crc32(bytes[0..<65536])))
        #expect(report.fact("virtio-blk-nonce")?["result"] == "refused")
        #expect(report.done?.fail == 0, "\(report.lines)")
        #expect(try Self.contents(image) == bytes)
    }

    @Test("direct=on and direct=off both serve unaligned, oddly split guest buffers", arguments: ["on", "off"])
    func directAndUnaligned(direct: String) throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let image = directory.file("d.img")
        let bytes = Self.randomBytes(1 << 20)
        try Self.write(bytes, to: image)
        let (result, report) = try boot(["-drive", "id=d,file=\(image),direct=\(direct)"], append: "console=ttyS0 flotilla.nonce=42")
        #expect(result.status == 0, "\(result.standardError)")
        let check = report.lines.first { $0.hasPrefix("flotilla-guest: check virtio-blk0 ") } ?? ""
        #expect(check.contains(" ok ") && check.contains("unaligned=ok"), "\(report.lines)")
        #expect(report.fact("device virtio-blk")?["crc32"] == Self.hex(crc32(bytes[0..<65536])))
        #expect(Array(try Self.contents(image).suffix(512)) == Self.nonceSector(index: 0, nonce: "42"))
    }

    /// Allocated bytes of `path` (st_blocks × 512).
    static func allocated(_ path: String) -> Int {
        var info = stat()
        return stat(path, &info) == 0 ? Int(info.st_blocks) * 512 : -1
    }

    @Test("discard and write-zeroes from the guest reach the file: zeroes, and a punched hole", arguments: ["off", "on"])
    func discardAndWriteZeroes(direct: String) throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let image = directory.file("z.img")
        let bytes = Self.randomBytes(1 << 20)
        try Self.write(bytes, to: image)
        let before = Self.allocated(image)
        let (result, report) = try boot(["-drive", "id=z,file=\(image),direct=\(direct)"], append: "console=ttyS0 flotilla.nonce=5eed")
        #expect(result.status == 0, "\(result.standardError)")
        // The guest negotiated both features, saw zeroes after WRITE_ZEROES, and (our backend
        // punches a hole for DISCARD) after DISCARD too.
        let lines = report.lines.filter { $0.contains(" check blk0_") }
        #expect(report.checks["blk0_write_zeroes"] == "ok", "\(report.lines)")
        #expect(report.checks["blk0_discard"] == "ok", "\(report.lines)")
        #expect(lines.allSatisfy { $0.contains("zeroed=1") }, "\(lines)")
        #expect(report.done?.fail == 0, "\(report.lines)")
        let after = try Self.contents(image)
        #expect(after.count == bytes.count, "the file keeps its size (PUNCH_HOLE | KEEP_SIZE)")
        #expect(after == Self.afterNonceRun(bytes, index: 0, nonce: "5eed"))
        // DISCARD on a raw file is fallocate(PUNCH_HOLE | KEEP_SIZE) over the 4 KiB-aligned
        // range: where the file system punches holes, the range is a hole afterwards.
        let fd = open(image, O_RDONLY)
        defer { close(fd) }
        let start = off_t(512 * Self.discardedSectors.lowerBound)
        let end = off_t(512 * Self.discardedSectors.upperBound)
        if Self.punchesHoles(directory.file("probe")) {
            #expect(lseek(fd, start, Self.seekHole) == start, "no hole at the discarded range")
            #expect(lseek(fd, start, Self.seekData) >= end, "data inside the discarded range")
            #expect(Self.allocated(image) <= before - Int(end - start), "allocated \(before) -> \(Self.allocated(image)) bytes")
        }
    }

    /// lseek whence values (Linux <unistd.h>; Glibc's Swift module does not export them).
    static let seekData: Int32 = 3
    static let seekHole: Int32 = 4

    /// Whether the file system under `path` deallocates with fallocate(PUNCH_HOLE | KEEP_SIZE),
    /// probed with util-linux fallocate(1) on a scratch file.
    static func punchesHoles(_ path: String) -> Bool {
        let tool = "/usr/bin/fallocate"
        guard access(tool, X_OK) == 0, (try? write([UInt8](repeating: 1, count: 16384), to: path)) != nil else { return false }
        defer { unlink(path) }
        guard let result = try? run(tool, ["--punch-hole", "--offset", "4096", "--length", "8192", path]), result.status == 0 else {
            return false
        }
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        return fd >= 0 && lseek(fd, 4096, seekHole) == 4096
    }

    @Test("four disks at once, each with its serial, contents and nonce; one read-only; two on iothreads")
    func fourDisks() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        var images: [[UInt8]] = []
        var arguments = ["-iothread", "id=ioA", "-iothread", "id=ioB"]
        for index in 0..<4 {
            // Sizes that are not powers of two, one smaller than 64 KiB.
            let size = [1 << 20, 48 * 1024, 2 << 20 + 4096, 512 * 1024][index]
            let bytes = Self.randomBytes(size)
            images.append(bytes)
            try Self.write(bytes, to: directory.file("disk\(index).img"))
            var drive = "id=disk\(index),file=\(directory.file("disk\(index).img")),serial=SN-\(index)-xyz"
            if index == 2 { drive += ",readonly=on" }
            if index == 1 { drive += ",iothread=ioA" }
            if index == 3 { drive += ",iothread=ioB,direct=off" }
            arguments += ["-drive", drive]
        }
        let (result, report) = try boot(arguments, append: "console=ttyS0 flotilla.nonce=feed")
        #expect(result.status == 0, "\(result.standardError)")
        let facts = report.facts("device virtio-blk")
        #expect(facts.count == 4, "\(report.lines)")
        for (index, fact) in facts.enumerated() where index < 4 {
            let bytes = images[index]
            #expect(fact["base"] == "0xd000\(index)000")
            #expect(fact["irq"] == "\(5 + index)")
            #expect(fact["serial"] == "SN-\(index)-xyz")
            #expect(fact["capacity"] == "\(bytes.count / 512)")
            #expect(fact["crc32"] == Self.hex(crc32(bytes[0..<min(65536, bytes.count)])))
            #expect(fact["ro"] == (index == 2 ? "1" : "0"))
            let after = try Self.contents(directory.file("disk\(index).img"))
            if index == 2 {
                #expect(after == bytes)
            } else {
                #expect(after == Self.afterNonceRun(bytes, index: index, nonce: "feed"), "disk \(index)")
                #expect(report.checks["blk\(index)_write_zeroes"] == "ok", "\(report.lines)")
                #expect(report.checks["blk\(index)_discard"] == "ok", "\(report.lines)")
            }
        }
        let nonces = report.facts("virtio-blk-nonce").map { $0["result"] ?? "" }
        #expect(nonces == ["written", "written", "refused", "written"])
        #expect(report.done?.fail == 0, "\(report.lines)")
    }

    @Test("the guest receives the device's interrupts (KVM_IRQFD) and uses them")
    func interrupts() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        try Self.write(Self.randomBytes(1 << 20), to: directory.file("d.img"))
        let (result, report) = try boot(["-drive", "id=d,file=\(directory.file("d.img"))"])
        #expect(result.status == 0, "\(result.standardError)")
        let fact = try #require(report.fact("device virtio-blk"))
        #expect(fact["notify"] == "interrupt")
        #expect(fact["indirect"] == "1")
        #expect(fact["event_idx"] == "1")
    }

    /// Per-thread names and read byte counts (`/proc/PID/task/TID/io` rchar) of a process.
    static func threads(of pid: pid_t) -> [(name: String, readBytes: UInt64)] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        return tasks.compactMap { tid in
            guard let name = readText("/proc/\(pid)/task/\(tid)/comm")?.trimmingCharacters(in: .whitespacesAndNewlines),
                let io = readText("/proc/\(pid)/task/\(tid)/io")
            else { return nil }
            let rchar = io.split(separator: "\n").first { $0.hasPrefix("rchar:") }.flatMap {
                UInt64($0.dropFirst(6).trimmingCharacters(in: .whitespaces))
            }
            return (name, rchar ?? 0)
        }
    }

    @Test("iothread=NAME: a thread named NAME and its I/O workers NAME-ioN exist and do the disk's I/O; the main loop does not")
    func iothreadPlacement() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let image = directory.file("io.img")
        try Self.write(Self.randomBytes(4 << 20), to: image)
        // The guest reads 64 KiB and 300 sectors more; then holds, so the threads can be seen.
        let process = try BackgroundProcess(
            vmm,
            [
                "-name", "iotest", "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append",
                "console=ttyS0 flotilla.hold=1 flotilla.blkloop=300", "-iothread", "id=blkworker", "-drive",
                "id=d0,file=\(image),iothread=blkworker",
            ])
        #expect(process.waitForOutput("flotilla-guest: holding", timeout: 60), "\(process.standardOutput)\n\(process.standardError)")
        let threads = Self.threads(of: process.pid)
        let worker = threads.filter { $0.name == "blkworker" }
        #expect(worker.count == 1, "\(threads)")
        // The iothread's I/O workers (direct=on requests when another is in flight or waiting).
        let ioWorkers = threads.filter { $0.name.hasPrefix("blkworker-io") }
        #expect(ioWorkers.count == 8, "\(threads)")  // VirtioBlockDevice.defaultIOThreads
        // 64 KiB + 300 × 512 + the unaligned and nonce-less reads went through the iothread
        // and its workers.
        let expected: UInt64 = 65536 + 300 * 512
        let iothreadBytes = (worker + ioWorkers).reduce(0) { $0 + $1.readBytes }
        #expect(iothreadBytes >= expected, "\(threads)")
        for thread in threads where thread.name != "blkworker" && !thread.name.hasPrefix("blkworker-io") {
            #expect(thread.readBytes < expected, "thread \(thread.name) read \(thread.readBytes) bytes")
        }
        let report = GuestReport(output: process.standardOutput)
        #expect(report.fact("blk-loop end")?["ok"] == "300")
        process.signal(SIGTERM)
        #expect(process.wait() == 0)
    }

    @Test("iops=N holds the guest's request rate within 10% of N over more than 2 s", arguments: [(50, 150), (100, 300)])
    func iopsLimit(iops: Int, requests: Int) throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let image = directory.file("q.img")
        try Self.write(Self.randomBytes(1 << 20), to: image)
        // A second, unthrottled disk on the same iothread must not be held back.
        try Self.write(Self.randomBytes(1 << 20), to: directory.file("free.img"))
        let process = try BackgroundProcess(
            vmm,
            [
                "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "console=ttyS0 flotilla.blkloop=\(requests)",
                "-iothread", "id=io0", "-drive", "id=q,file=\(image),iops=\(iops),iothread=io0",
                "-drive", "id=free,file=\(directory.file("free.img")),iothread=io0",
            ])
        #expect(process.waitForOutput("blk-loop start", timeout: 60), "\(process.standardOutput)")
        let start = Date()
        #expect(process.waitForOutput("blk-loop end", timeout: 60), "\(process.standardOutput)")
        let elapsed = Date().timeIntervalSince(start)
        #expect(process.wait(timeout: 60) == 0)
        let report = GuestReport(output: process.standardOutput)
        #expect(report.fact("blk-loop end")?["ok"] == "\(requests)")
        #expect(elapsed >= 2, "the loop took \(elapsed) s")
        let rate = Double(requests) / elapsed
        #expect(abs(rate - Double(iops)) <= 0.1 * Double(iops), "measured \(rate) requests/s for iops=\(iops) over \(elapsed) s")
        // The unthrottled disk on the same iothread did its work as usual.
        #expect(report.checks["virtio-blk1"] == "ok", "\(report.lines)")
        #expect(report.done?.fail == 0, "\(report.lines)")
    }

    @Test("a missing, unreadable or locked image is a clear start-up error (exit 2, nothing left behind)")
    func imageErrors() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let missing = try run(vmm, ["-kernel", GuestImages.vmlinux, "-drive", "id=gone,file=\(directory.file("missing.img"))"])
        #expect(missing.status == 2)
        #expect(
            missing.standardError.contains("drive 'gone'") && missing.standardError.contains("does not exist"), "\(missing.standardError)")

        let dir = directory.file("adir")
        mkdir(dir, 0o755)
        let notFile = try run(vmm, ["-kernel", GuestImages.vmlinux, "-drive", "id=dir,file=\(dir),direct=off"])
        #expect(notFile.status == 2)
        #expect(notFile.standardError.contains("drive 'dir'"), "\(notFile.standardError)")

        // A writable image in use by a running VM cannot be opened by a second one, not even
        // read-only; a read-only image can be shared by two read-only users.
        let image = directory.file("shared.img")
        try Self.write(Self.randomBytes(1 << 20), to: image)
        let first = try BackgroundProcess(
            vmm, ["-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "flotilla.hold=1", "-drive", "id=a,file=\(image)"])
        #expect(first.waitForOutput("flotilla-guest: holding", timeout: 60))
        for extra in ["", ",readonly=on"] {
            let second = try run(vmm, ["-kernel", GuestImages.vmlinux, "-drive", "id=b,file=\(image)\(extra)"])
            #expect(second.status == 2, "\(extra)")
            #expect(second.standardError.contains("locked by another process"), "\(second.standardError)")
        }
        first.signal(SIGTERM)
        #expect(first.wait() == 0)

        let readers = try BackgroundProcess(
            vmm,
            ["-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "flotilla.hold=1", "-drive", "id=a,file=\(image),readonly=on"])
        #expect(readers.waitForOutput("flotilla-guest: holding", timeout: 60))
        let (shared, report) = try boot(["-drive", "id=b,file=\(image),readonly=on"])
        #expect(shared.status == 0, "\(shared.standardError)")
        #expect(report.checks["virtio-blk0"] == "ok")
        readers.signal(SIGTERM)
        #expect(readers.wait() == 0)
    }
}
