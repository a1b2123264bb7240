import FlotillaTestSupport
import Foundation
import Glibc
import Testing

/// A real Linux kernel boots to a busybox shell on ttyS0 and runs a command typed on the
/// host's standard input. Needs hardware virtualization: on a host whose KVM emulates every
/// instruction (like this project's development machines), Linux cannot run userspace.
///
/// Run it on a VT-x/AMD-V host with `FLOTILLA_LINUX_KERNEL=/path/to/bzImage` (any x86_64
/// kernel with 8250 console and initramfs support, e.g. Debian's linux-image-*-cloud-amd64
/// vmlinuz) and Debian's busybox-static installed.
@Suite(
    "Linux boots to a shell",
    .enabled(if: KVM.available, "needs read-write /dev/kvm"),
    .enabled(
        if: HardwareVirtualization.available,
        "no VT-x/AMD-V on this host: its KVM emulates every instruction, so Linux userspace cannot run here"),
    .enabled(if: ProcessInfo.processInfo.environment["FLOTILLA_LINUX_KERNEL"] != nil, "set FLOTILLA_LINUX_KERNEL to a bzImage")
)
struct LinuxShellTests {
    @Test("busybox shell prompt on ttyS0, a typed command runs, reboot -f ends the VM cleanly")
    func shell() throws {
        let kernel = try #require(ProcessInfo.processInfo.environment["FLOTILLA_LINUX_KERNEL"])
        let busybox = try #require(
            FileManager.default.contents(atPath: "/bin/busybox").map { Array($0) },
            "install Debian's busybox-static (/bin/busybox)")
        let directory = try TemporaryDirectory()
        defer { directory.remove() }

        var initramfs = Initramfs()
        for path in ["bin", "dev", "proc", "sys"] { initramfs.add(path, .directory) }
        initramfs.add("dev/console", .characterDevice(major: 5, minor: 1))
        initramfs.add("bin/busybox", .file(busybox, executable: true))
        initramfs.add("bin/sh", .symlink("busybox"))
        let initScript = """
            #!/bin/sh
            /bin/busybox --install -s /bin
            mount -t proc proc /proc
            mount -t sysfs sysfs /sys
            echo FLOTILLA-USERSPACE-UP
            exec setsid cttyhack sh

            """
        initramfs.add("init", .file(Array(initScript.utf8), executable: true))
        let image = directory.file("initramfs.cpio")
        try Data(initramfs.bytes()).write(to: URL(fileURLWithPath: image))

        let process = try BackgroundProcess(
            Executables.path("flotilla-vmm"),
            [
                "-kernel", kernel, "-initrd", image, "-m", "512M", "-smp", "2", "-serial", "stdio",
                "-append", "console=ttyS0 rdinit=/init panic=-1 reboot=k",
            ],
            withInput: true)
        #expect(process.waitForOutput("FLOTILLA-USERSPACE-UP", timeout: 120), "\(process.standardOutput.suffix(3000))")
        #expect(process.waitForOutput("/ #", timeout: 60), "no shell prompt: \(process.standardOutput.suffix(2000))")
        let nonce = UInt32.random(in: 0...UInt32.max)
        try process.write(toStandardInput: "echo hello-$((\(nonce) + 1))\n")
        #expect(process.waitForOutput("hello-\(UInt64(nonce) + 1)", timeout: 30), "\(process.standardOutput.suffix(2000))")
        try process.write(toStandardInput: "reboot -f\n")
        #expect(process.wait(timeout: 60) == 0, "\(process.standardError)")
    }
}

@Suite("initramfs archives")
struct InitramfsTests {
    @Test("cpio reads back what the builder wrote")
    func readableByCpio() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        var initramfs = Initramfs()
        initramfs.add("bin", .directory)
        initramfs.add("bin/hello", .file(Array("odd-length!".utf8), executable: true))
        initramfs.add("bin/link", .symlink("hello"))
        initramfs.add("dev", .directory)
        let archive = directory.file("a.cpio")
        try Data(initramfs.bytes()).write(to: URL(fileURLWithPath: archive))
        let extracted = directory.file("out")
        try FileManager.default.createDirectory(atPath: extracted, withIntermediateDirectories: true)
        let result = try run("/bin/sh", ["-c", "cd '\(extracted)' && cpio -idm --quiet < '\(archive)'"])
        #expect(result.status == 0, "\(result.standardError)")
        #expect(readText(extracted + "/bin/hello") == "odd-length!")
        #expect(access(extracted + "/bin/hello", X_OK) == 0)
        #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: extracted + "/bin/link")) == "hello")
        var info = stat()
        #expect(stat(extracted + "/dev", &info) == 0 && info.st_mode & S_IFMT == S_IFDIR)
    }
}
