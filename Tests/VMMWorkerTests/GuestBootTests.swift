import Glibc
import Protocol
import SystemPackage
import Testing

@testable import VMMWorker

/// The repository root, found from this file's path (Tests/VMMWorkerTests/<file>).
let repositoryRoot: String = {
    var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
    parts.removeLast(3)
    return parts.joined(separator: "/")
}()

func guestImage(_ name: String) -> String { repositoryRoot + "/Guest/build/" + name }

let guestImagesBuilt = access(guestImage("flotilla-guest.vmlinux"), R_OK) == 0 && access(guestImage("flotilla-guest.bzImage"), R_OK) == 0

/// Boots the Flotilla test guest (Guest/, `make -C Guest`) as ELF vmlinux and as bzImage.
/// Needs /dev/kvm and the built images; skipped otherwise.
@Suite(
    "Flotilla test guest", .serialized, .enabled(if: kvmAvailable, "needs a usable /dev/kvm"),
    .enabled(if: guestImagesBuilt, "needs Guest/build/flotilla-guest.{vmlinux,bzImage}: run make -C Guest"))
struct GuestBootTests {
    static let images = ["flotilla-guest.vmlinux", "flotilla-guest.bzImage"]

    @Test("boots and passes every check", arguments: images, [1, 2, 4])
    func boot(image: String, vcpus: Int) throws {
        let output = try OutputCollector()
        let config = VMConfig(
            name: "guest", boot: BootSource(kernelImagePath: guestImage(image), bootArgs: "console=ttyS0 reboot=k"),
            machine: MachineConfig(vcpuCount: vcpus, memoryBytes: 256 << 20))
        let vm = try MicroVM(
            config: config, serialOutput: FileDescriptor(rawValue: output.writeFD),
            virtioSlots: [VirtioMMIOSlot(slot: 0)])
        try vm.start()
        let reason = vm.waitForExit(timeoutNanoseconds: 120_000_000_000)
        if reason == nil { vm.requestShutdown() }
        let text = output.drain()
        #expect(reason == .guestReset, "exit: \(String(describing: reason))\n\(text)")
        let done = text.split(separator: "\n").first { $0.hasPrefix("flotilla-guest: done ") }
        let summary = try #require(done, "no done line in:\n\(text)")
        #expect(summary.hasSuffix(" fail=0"), "\(text)")
        #expect(text.contains("flotilla-guest: fact cpus online=\(vcpus)"), "\(text)")
        if getenv("FLOTILLA_SHOW_GUEST") != nil { print(text) }
    }

    @Test("passes an initrd the guest can checksum", arguments: images)
    func initrd(image: String) throws {
        // 300 KiB + 5 bytes of a pattern: not a page multiple, so placement alignment matters.
        let bytes = (0..<(300 * 1024 + 5)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 9) }
        let path = try temporaryFile(bytes)
        defer { unlink(path) }
        let output = try OutputCollector()
        let config = VMConfig(
            name: "guest", boot: BootSource(kernelImagePath: guestImage(image), bootArgs: "console=ttyS0", initrdPath: path),
            machine: MachineConfig(vcpuCount: 1, memoryBytes: 256 << 20))
        let vm = try MicroVM(config: config, serialOutput: FileDescriptor(rawValue: output.writeFD))
        try vm.start()
        let reason = vm.waitForExit(timeoutNanoseconds: 120_000_000_000)
        if reason == nil { vm.requestShutdown() }
        let text = output.drain()
        #expect(reason == .guestReset, "\(text)")
        let expected = "flotilla-guest: fact initrd size=\(bytes.count) crc32=\(crc32Hex(bytes))"
        #expect(text.contains(expected), "\(text)")
        #expect(text.contains("flotilla-guest: check initrd ok"), "\(text)")
        #expect(text.contains(" fail=0"), "\(text)")
        let initrd = try #require(vm.bootInfo.initrd)
        #expect(initrd.address % 4096 == 0 && initrd.address + initrd.size <= 256 << 20)
    }
}

/// CRC-32/IEEE (zlib's crc32), as the guest reports it.
func crc32Hex(_ bytes: [UInt8]) -> String {
    var crc: UInt32 = 0xffff_ffff
    for byte in bytes {
        crc ^= UInt32(byte)
        for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0xedb8_8320 : crc >> 1 }
    }
    let digits = String(crc ^ 0xffff_ffff, radix: 16)
    return String(repeating: "0", count: 8 - digits.count) + digits
}
