import FlotillaTestSupport
import Foundation
import Glibc
import Testing

/// virtio-rng end to end: flotilla-vmm reading a real `random_file`, the test guest's
/// virtio-rng driver on real /dev/kvm, the seccomp filter on (the default).
@Suite("virtio-rng through the test guest", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct VirtioRngTests {
    let vmm = Executables.path("flotilla-vmm")

    @Test("the guest receives random_file's bytes, in order, from the device in slot 6")
    func bytesFromRandomFile() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        // A regular file stands in for the character device, so the bytes are known.
        let source = directory.file("random.bin")
        let bytes = VirtioBlockTests.randomBytes(4096)
        try VirtioBlockTests.write(bytes, to: source)
        let result = try run(
            vmm,
            [
                "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "console=ttyS0 flotilla.rngbytes=1000",
                "-rng", "random_file=\(source)",
            ], timeout: 120)
        #expect(result.status == 0, "\(result.standardError)")
        let report = GuestReport(output: result.standardOutput)
        let fact = try #require(report.fact("device virtio-rng"), "\(result.standardOutput)")
        // Optional devices follow the six disk and NIC slots (docs/guest-abi.md).
        #expect(fact["base"] == "0xd0006000" && fact["irq"] == "11")
        #expect(fact["bytes"] == "1000")
        #expect(fact["crc32"] == VirtioBlockTests.hex(crc32(bytes[0..<1000])))
        #expect(report.checks["virtio-rng"] == "ok")
        #expect(report.done?.fail == 0, "\(report.lines)")
    }

    @Test("bytes_per_sec holds the guest's average rate at or under the limit")
    func rateLimit() throws {
        // 3000 bytes at 1000 bytes/s: about 3 s after the first 64-byte burst.
        let limit = 1000.0
        let total = 3000.0
        let process = try BackgroundProcess(
            vmm,
            [
                "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "console=ttyS0 flotilla.rngbytes=\(Int(total))",
                "-rng", "random_file=/dev/urandom,bytes_per_sec=\(Int(limit))",
            ])
        #expect(process.waitForLine(containing: "fact rng-read start", timeout: 60), "\(process.standardOutput)")
        let start = Date()
        #expect(process.waitForLine(containing: "fact device virtio-rng", timeout: 60), "\(process.standardOutput)")
        let elapsed = Date().timeIntervalSince(start)
        #expect(process.wait(timeout: 60) == 0)
        let report = GuestReport(output: process.standardOutput)
        #expect(report.fact("device virtio-rng")?["bytes"] == "\(Int(total))")
        #expect(report.checks["virtio-rng"] == "ok")
        // The burst the device allows up front (64 bytes) is not rate-limited; the rest is.
        let rate = (total - 64) / elapsed
        #expect(rate <= limit * 1.1, "measured \(rate) bytes/s with bytes_per_sec=\(limit) over \(elapsed) s")
        #expect(elapsed >= 2, "the guest read \(total) bytes in \(elapsed) s")
    }

    @Test("a random_file that cannot be opened is a start-up error naming it, with nothing left behind")
    func missingRandomFile() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let missing = directory.file("no-such-device")
        let result = try run(
            vmm,
            ["-kernel", GuestImages.vmlinux, "-api-channel", "unix:" + directory.file("qmp.sock"), "-rng", "random_file=\(missing)"])
        #expect(result.status == 2)
        #expect(
            result.standardError.contains("random_file=\(missing)") && result.standardError.contains("cannot open"),
            "\(result.standardError)")
        let leftovers = try directory.contents()
        #expect(leftovers.isEmpty, "left behind: \(leftovers)")
    }
}
