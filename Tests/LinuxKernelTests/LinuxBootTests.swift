import FlotillaTestSupport
import Foundation
import Testing

/// Linux, our second and independent client: the kernel built by `Linux/build-kernel` boots
/// under flotilla-vmm and its own log must agree with docs/guest-abi.md. Slow (tens of seconds
/// per boot under this host's emulated KVM): run by `Linux/run-tests`, skipped otherwise.
///
/// Virtio devices get further `LinuxBootPlan`s with `extraVMMArguments` (e.g. `-drive`) and
/// `extraKernelArguments` (e.g. `root=/dev/vda`), asserting on the drivers' probe lines in the
/// same `KernelLog` and on host-side effects: virtio-blk in LinuxDiskTests.swift.
@Suite(
    "Linux boots under flotilla-vmm",
    .enabled(if: LinuxKernel.available, LinuxKernel.skipReason),
    .enabled(if: KVM.available, "needs read-write /dev/kvm"),
    .serialized)
struct LinuxBootTests {
    static let plans = [
        LinuxBootPlan(format: .vmlinux, vcpus: 1, memoryMiB: 256),
        LinuxBootPlan(format: .bzImage, vcpus: 1, memoryMiB: 1024),
        LinuxBootPlan(format: .vmlinux, vcpus: 2, memoryMiB: 256),
        LinuxBootPlan(format: .bzImage, vcpus: 4, memoryMiB: 256),
    ]

    @Test("the kernel's own log agrees with the guest ABI, and the boot ends as expected", arguments: plans)
    func boots(plan: LinuxBootPlan) throws {
        let boot = try LinuxBoot.boot(plan)
        let log = boot.log

        // The image was loaded and entered: the banner is the first thing setup_arch's caller prints.
        let version = try #require(log.first("Linux version "), "no banner: \(boot.tail)")
        #expect(version.contains("6.1."), "\(version)")

        // The command line arrives byte for byte (virtio_mmio.device= entries may follow, in slot order).
        let commandLine = try #require(log.first("Command line: "), "\(boot.tail)")
        let received = String(commandLine.dropFirst("Command line: ".count))
        #expect(received.hasPrefix(plan.append), "sent: \(plan.append)\nreceived: \(received)")
        let appended = received.dropFirst(plan.append.count).split(separator: " ").map(String.init)
        #expect(appended == (0..<appended.count).map(Self.virtioParameter(slot:)), "appended: \(appended)")

        // The firmware map is exactly the documented one for this memory size.
        #expect(log.e820 == E820Entry.documented(memoryBytes: plan.memoryBytes), "\(log.all(containing: "BIOS-e820"))")
        // ... and Linux saw that much memory.
        #expect(log.contains("Memory: "), "\(boot.tail)")

        // CPUs come from our MP table: found where the ABI puts it, read without complaint,
        // one processor entry per vCPU (APIC id = index), all of them brought up.
        try Self.expectMPTable(log, vcpus: plan.vcpus)
        #expect(log.cpusBroughtUp == plan.vcpus, "\(log.all(containing: "smp:")) \(boot.tail)")

        // The 8250 at the legacy address and IRQ was detected as a 16550A.
        #expect(log.contains("serial8250: ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A"), "\(log.all(containing: "8250"))")

        try Self.expectCleanEnd(boot)
    }

    /// What flotilla-vmm appends for virtio-mmio slot `slot` (docs/guest-abi.md).
    static func virtioParameter(slot: Int) -> String {
        "virtio_mmio.device=4K@0x\(String(0xd000_0000 + 0x1000 * slot, radix: 16)):\(5 + slot)"
    }

    static func expectMPTable(_ log: KernelLog, vcpus: Int) throws {
        // The floating pointer at the start of the EBDA (0x9fc00, 16 bytes).
        #expect(log.contains("found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]"), "\(log.all(containing: "MP"))")
        #expect(log.contains("Intel MultiProcessor Specification v1.4"), "\(log.all(containing: "MultiProcessor"))")
        #expect(log.first("MPTABLE: APIC at: ") == "MPTABLE: APIC at: 0xFEE00000")
        #expect(!log.contains("Default MP configuration"), "Linux fell back to a default configuration")
        let processors = log.lines.filter { $0.hasPrefix("Processor #") }
        #expect(processors == ["Processor #0 (Bootup-CPU)"] + (1..<max(vcpus, 1)).map { "Processor #\($0)" }, "\(processors)")
        #expect(log.first("Processors: ") == "Processors: \(vcpus)")
        for complaint in ["MPTABLE: bad", "MPTABLE: checksum error", "MPTABLE: null", "Your mptable is wrong", "BIOS bug, MP table"] {
            #expect(!log.contains(complaint), "\(log.all(containing: complaint))")
        }
        // The IOAPIC entry (id = vCPU count) was accepted.
        #expect(log.contains("IOAPIC[0]: apic_id \(vcpus)"), "\(log.all(containing: "IOAPIC"))")
    }

    /// With no root device the kernel panics and `panic=-1 reboot=k` resets it through the
    /// i8042, which ends flotilla-vmm with status 0.
    static func expectCleanEnd(_ boot: LinuxBoot) throws {
        let log = boot.log
        #expect(!boot.timedOut, "\(boot.tail)")
        #expect(!log.contains("WARNING:"), "\(log.all(containing: "WARNING:"))")
        #expect(!log.contains("BUG:"), "\(log.all(containing: "BUG:"))")
        let panic = try #require(log.first("Kernel panic - not syncing: "), "no panic: \(boot.tail)")
        #expect(panic.contains("VFS: Unable to mount root fs"), "\(panic)")
        #expect(boot.status == 0, "\(boot.tail)")
    }
}
