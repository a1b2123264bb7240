import Glibc
import Protocol
import SystemPackage
import Testing

@testable import VMMWorker

/// A real Linux kernel through the bzImage loader (slow: minutes under this host's emulated
/// KVM). Opt-in: FLOTILLA_LINUX_KERNEL=<path to a bzImage>, e.g. the vmlinuz of Debian's
/// linux-image-*-cloud-amd64. On hosts whose KVM emulates instructions the kernel ends in a
/// KVM internal error (reported as `.failed`); with hardware virtualization it panics
/// without a root file system and resets (`panic=-1 reboot=k`).
@Suite(
    "Linux smoke test", .enabled(if: kvmAvailable, "needs a usable /dev/kvm"),
    .enabled(if: getenv("FLOTILLA_LINUX_KERNEL") != nil, "set FLOTILLA_LINUX_KERNEL to a bzImage"))
struct LinuxSmokeTests {
    @Test("Linux prints its banner, command line and e820 map on ttyS0")
    func linuxBoots() throws {
        guard let kernel = getenv("FLOTILLA_LINUX_KERNEL").map({ String(cString: $0) }) else { return }
        let logPath = "/tmp/flotilla-linux-smoke-\(getpid()).log"
        let log = Glibc.open(logPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        try #require(log >= 0)
        defer { close(log) }
        let arguments = "console=ttyS0 earlyprintk=serial,ttyS0,115200 noxsave panic=-1 reboot=k"
        let config = VMConfig(
            name: "linux", boot: BootSource(kernelImagePath: kernel, bootArgs: arguments),
            machine: MachineConfig(vcpuCount: 1, memoryBytes: 256 << 20))
        let vm = try MicroVM(config: config, serialOutput: FileDescriptor(rawValue: log))
        try vm.start()
        let reason = vm.waitForExit(timeoutNanoseconds: 240_000_000_000)
        if reason == nil {
            vm.requestShutdown()
            _ = vm.waitForExit()
        }
        let text = try String(
            decoding: FileImage(path: logPath).read(offset: 0, count: Int(FileImage(path: logPath).size), what: "log"), as: UTF8.self)
        #expect(text.contains("Linux version"), "\(text.suffix(2000))")
        #expect(text.contains("Command line: \(arguments)"))
        #expect(text.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"))
        print("Linux smoke test: exit \(String(describing: reason)); log in \(logPath)")
    }
}
