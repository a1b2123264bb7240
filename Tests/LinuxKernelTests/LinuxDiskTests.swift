import FlotillaTestSupport
import Foundation
import Glibc
import Testing

/// virtio-blk as Linux's virtio_blk driver and ext4 see it: capacities, the read-only feature,
/// and real reads and writes of an ext4 root that the host checks afterwards. Two boots, so
/// they are part of the serialized `LinuxBootTests` suite (two boots at once would slow each other
/// into the stall timeout).
extension LinuxBootTests {
    /// The read-only raw disk: 8 MiB, three sectors and a partial one (not visible to the guest,
    /// docs/guest-abi.md), filled with text so that it holds no partition table.
    static let rawDiskBytes = 8 << 20 + 3 * 512 + 100

    @Test("two disks: an ext4 root the kernel mounts read-write, and a read-only raw disk left untouched")
    func twoDisks() throws {
        let directory = try TemporaryDirectory("flotilla-linux-disks")
        defer { directory.remove() }
        let root = directory.file("root.ext4")
        let raw = directory.file("ro.raw")
        // Its /sbin/init proves userspace I/O where userspace can run (hardware virtualization);
        // here the boot ends when the kernel starts it.
        let nonce = String(UInt64.random(in: 0...UInt64.max), radix: 16)
        try DiskImage.makeExt4(root, mebibytes: 48, contents: try DiskImage.userspaceRoot(in: directory.path, nonce: nonce))
        let pattern = Array("flotilla read-only disk\n".utf8)
        let rawBytes = Data((0..<Self.rawDiskBytes).map { pattern[$0 % pattern.count] })
        try rawBytes.write(to: URL(fileURLWithPath: raw))
        let before = try DiskImage.superblock(root)
        #expect(before["Mount count"] == "0", "\(before)")
        #expect(before["Last mount time"] == "n/a", "\(before)")

        let plan = LinuxBootPlan(
            label: "2disks", format: .vmlinux, vcpus: 1, memoryMiB: 256,
            extraKernelArguments: ["root=/dev/vda", "rw", "rootfstype=ext4"],
            extraVMMArguments: ["-drive", "id=root,file=\(root)", "-drive", "id=ro,file=\(raw),readonly=on,serial=RO-DISK"])
        let boot = try LinuxBoot.boot(plan)
        let log = boot.log

        // One virtio-mmio slot per disk, in -drive order, announced on the command line.
        try Self.expectAnnouncedSlots(boot, atLeast: 2)
        // Each disk probed on its slot with one request queue and its capacity in 512-byte
        // sectors: the file size / 512, the partial last sector of the raw disk not counted.
        let disks = log.virtioBlockDisks
        #expect(disks["vda"]?.device == "virtio0", "\(log.all(containing: "virtio_blk"))")
        let rootSectors = UInt64(try DiskImage.size(root) / 512)
        #expect(disks["vda"]?.sectors == rootSectors, "\(log.all(containing: "virtio_blk"))")
        #expect(disks["vdb"]?.device == "virtio1", "\(log.all(containing: "virtio_blk"))")
        #expect(disks["vdb"]?.sectors == UInt64(Self.rawDiskBytes / 512), "\(log.all(containing: "virtio_blk"))")
        #expect(disks.count == 2, "\(log.all(containing: "virtio_blk"))")
        for device in ["virtio0", "virtio1"] {
            #expect(log.contains("virtio_blk \(device): 1/0/0 default/read/poll queues"), "\(log.all(containing: "virtio_blk"))")
        }
        // ext4 mounted vda read-write: its journal and superblock were written through virtio-blk.
        #expect(log.contains("EXT4-fs (vda): mounted filesystem with ordered data mode"), "\(log.all(containing: "EXT4-fs"))")
        #expect(!log.contains("EXT4-fs error"), "\(log.all(containing: "EXT4-fs"))")
        #expect(
            log.first("VFS: Mounted root ")?.hasPrefix("VFS: Mounted root (ext4 filesystem) on device ") == true,
            "\(log.all(containing: "VFS:"))")
        #expect(!log.contains("I/O error"), "\(log.all(containing: "I/O error"))")
        if HardwareVirtualization.available {
            // Userspace read the host's nonce from the disk and wrote its proof, then rebooted.
            #expect(boot.status == 0, "\(boot.tail)")
            #expect(try DiskImage.read("/userspace-proof", in: root) == "userspace read \(nonce)\n")
        } else {
            try Self.expectEndAtInit(boot, fwait: true, initOnDisk: true)
        }

        // The host sees the kernel's writes: the superblock's mount count and mount time, and
        // the journal in use (needs_recovery, as the VM ended without unmounting) ...
        let after = try DiskImage.superblock(root)
        #expect(after["Mount count"] == "1", "before: \(before)\nafter: \(after)")
        #expect(after["Last mount time"] != before["Last mount time"], "before: \(before)\nafter: \(after)")
        // (Where userspace ran, init remounted the root read-only first, which checkpoints the
        // journal so that debugfs sees the proof file in place.)
        let needsRecovery = after["Filesystem features"]?.split(separator: " ").contains("needs_recovery") == true
        #expect(needsRecovery == !HardwareVirtualization.available, "\(after)")
        // ... the file system is consistent ...
        let check = try DiskImage.fsck(root)
        #expect(check.status == 0, "e2fsck -fn: \(check.standardOutput)\(check.standardError)")
        #expect(try DiskImage.size(root) == 48 << 20)
        // ... and the read-only disk was not written.
        #expect(try Data(contentsOf: URL(fileURLWithPath: raw)) == rawBytes, "the read-only disk's bytes changed")
    }

    @Test("a read-only disk as root=/dev/vda rw: Linux sees the RO feature and mounts it read-only")
    func readOnlyRoot() throws {
        // Linux 6.1's virtio_blk honours VIRTIO_BLK_F_RO silently (set_disk_ro, no message); it
        // shows when the block layer refuses to open the disk for writing and the root mount
        // falls back to read-only.
        let directory = try TemporaryDirectory("flotilla-linux-disks")
        defer { directory.remove() }
        let root = directory.file("ro.ext4")
        // Its /sbin/init proves userspace I/O where userspace can run (hardware virtualization);
        // here the boot ends when the kernel starts it.
        let nonce = String(UInt64.random(in: 0...UInt64.max), radix: 16)
        try DiskImage.makeExt4(root, mebibytes: 48, contents: try DiskImage.userspaceRoot(in: directory.path, nonce: nonce))
        let bytes = try Data(contentsOf: URL(fileURLWithPath: root))

        let plan = LinuxBootPlan(
            label: "ro-root", format: .vmlinux, vcpus: 1, memoryMiB: 256,
            extraKernelArguments: ["root=/dev/vda", "rw", "rootfstype=ext4"],
            extraVMMArguments: ["-drive", "id=root,file=\(root),readonly=on,serial=RO-ROOT"])
        let boot = try LinuxBoot.boot(plan)
        let log = boot.log

        try Self.expectAnnouncedSlots(boot, atLeast: 1)
        #expect(log.virtioBlockDisks["vda"]?.sectors == UInt64(48 << 20 / 512), "\(log.all(containing: "virtio_blk"))")
        #expect(log.contains("EXT4-fs (vda): mounted filesystem with ordered data mode"), "\(log.all(containing: "EXT4-fs"))")
        #expect(
            log.first("VFS: Mounted root ")?.hasPrefix("VFS: Mounted root (ext4 filesystem) readonly on device ") == true,
            "\(log.all(containing: "VFS:"))")
        #expect(!log.contains("I/O error"), "\(log.all(containing: "I/O error"))")
        try Self.expectEndAtInit(boot, fwait: false)

        #expect(try Data(contentsOf: URL(fileURLWithPath: root)) == bytes, "the read-only disk's bytes changed")
    }

    /// The command line ends with one `virtio_mmio.device=` per slot, from slot 0, and the
    /// kernel registered each of them.
    static func expectAnnouncedSlots(_ boot: LinuxBoot, atLeast count: Int) throws {
        let plan = boot.plan
        let commandLine = try #require(boot.log.first("Command line: "), "\(boot.tail)")
        let received = String(commandLine.dropFirst("Command line: ".count))
        #expect(received.hasPrefix(plan.append), "sent: \(plan.append)\nreceived: \(received)")
        let appended = received.dropFirst(plan.append.count).split(separator: " ").map(String.init)
        #expect(appended.count >= count && appended == (0..<appended.count).map(virtioParameter(slot:)), "appended: \(appended)")
        for slot in 0..<count {
            let base = String(0xd000_0000 + 0x1000 * slot, radix: 16)
            #expect(
                boot.log.contains(
                    "virtio-mmio: Registering device virtio-mmio.\(slot) at 0x\(base)-0x\(String(0xd000_0fff + 0x1000 * slot, radix: 16)), IRQ \(5 + slot)."
                ),
                "\(boot.log.all(containing: "virtio-mmio"))")
        }
    }

    /// How a boot with a mounted root ends. The file system holds no init, so the kernel runs
    /// `/sbin/init`, `/etc/init`, `/bin/init`, `/bin/sh` in vain and panics ("No working init
    /// found"); `panic=-1 reboot=k` then resets through the i8042 and flotilla-vmm exits 0. That
    /// is what a read-only root does here. With a read-write root (ext4's lazyinit and jbd2
    /// threads running), this host's emulated KVM stops earlier, right after
    /// `Run /sbin/init as init process`: an FWAIT (the tail of the kernel's FNSAVE of the init
    /// task's FPU state) it cannot emulate, which flotilla-vmm reports as a KVM internal error,
    /// with the instruction bytes, and exits 3. With hardware virtualization both panic.
    /// `initOnDisk`: the root holds an /sbin/init. The emulator's FWAIT then stops the kernel a
    /// little earlier, after the root is mounted but before "Run /sbin/init" reaches the console.
    static func expectEndAtInit(_ boot: LinuxBoot, fwait: Bool, initOnDisk: Bool = false) throws {
        let log = boot.log
        #expect(!boot.timedOut, "\(boot.tail)")
        #expect(!log.contains("WARNING:"), "\(log.all(containing: "WARNING:"))")
        #expect(!log.contains("BUG:"), "\(log.all(containing: "BUG:"))")
        if !initOnDisk {
            #expect(log.index(of: "Run /sbin/init as init process") ?? 0 > log.index(of: "VFS: Mounted root ") ?? .max, "\(boot.tail)")
        }
        if fwait && !HardwareVirtualization.available {
            if initOnDisk {
                #expect(log.index(of: "VFS: Mounted root ") != nil, "\(boot.tail)")
            } else {
                #expect(log.lines.last == "Run /sbin/init as init process", "\(boot.tail)")
            }
            #expect(!log.contains("Kernel panic"), "\(boot.tail)")
            #expect(boot.status == 3, "\(boot.tail)")
            #expect(
                boot.standardError.contains("KVM internal error (KVM_EXIT_INTERNAL_ERROR), suberror 1: emulation failure"), "\(boot.tail)")
            // 9b: FWAIT.
            #expect(boot.standardError.contains("code at RIP (guest-physical 0x") && boot.standardError.contains("): 9b "), "\(boot.tail)")
        } else {
            let tried = log.lines.filter { $0.hasSuffix(" as init process") }
            #expect(tried == ["/sbin/init", "/etc/init", "/bin/init", "/bin/sh"].map { "Run \($0) as init process" }, "\(boot.tail)")
            let panic = try #require(log.first("Kernel panic - not syncing: "), "no panic: \(boot.tail)")
            #expect(panic.hasPrefix("Kernel panic - not syncing: No working init found."), "\(panic)")
            #expect(boot.status == 0, "\(boot.tail)")
            #expect(boot.standardError.contains("VM ended: guest reset"), "\(boot.tail)")
        }
    }
}

/// Disk images for the Linux boots, made and inspected with Debian's e2fsprogs.
enum DiskImage {
    static func tool(_ name: String) throws -> String {
        for directory in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] where access(directory + "/" + name, X_OK) == 0 {
            return directory + "/" + name
        }
        throw LinuxTestError("\(name) not found (Debian package e2fsprogs)")
    }

    /// A sparse file of `mebibytes` MiB holding a fresh ext4 file system, populated from the
    /// directory `contents` when given (`mkfs.ext4 -d`).
    static func makeExt4(_ path: String, mebibytes: Int, contents: String? = nil) throws {
        guard FileManager.default.createFile(atPath: path, contents: nil), truncate(path, off_t(mebibytes) << 20) == 0 else {
            throw LinuxTestError("cannot create \(path)")
        }
        let result = try run(try tool("mkfs.ext4"), ["-q", "-F"] + (contents.map { ["-d", $0] } ?? []) + [path])
        guard result.status == 0 else { throw LinuxTestError("mkfs.ext4 \(path): \(result.standardError)") }
    }

    /// The superblock fields `dumpe2fs -h` prints, by name ("Mount count" → "1").
    static func superblock(_ path: String) throws -> [String: String] {
        let result = try run(try tool("dumpe2fs"), ["-h", path])
        guard result.status == 0 else { throw LinuxTestError("dumpe2fs -h \(path): \(result.standardError)") }
        var fields: [String: String] = [:]
        for line in result.standardOutput.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return fields
    }

    /// The contents of the file at `path` inside the ext4 image, read with debugfs.
    static func read(_ file: String, in image: String) throws -> String {
        let result = try run(try tool("debugfs"), ["-R", "cat \(file)", image])
        guard result.status == 0 else { throw LinuxTestError("debugfs cat \(file): \(result.standardError)") }
        return result.standardOutput
    }

    /// A root file system whose /sbin/init (busybox sh) reads `/host-nonce`, writes
    /// `/userspace-proof` with it, syncs and reboots: the userspace half of the disk check,
    /// which runs only where the CPU lets Linux run userspace. Needs Debian's busybox-static.
    static func userspaceRoot(in directory: String, nonce: String) throws -> String {
        let root = directory + "/rootfs"
        let fileManager = FileManager.default
        for path in ["bin", "sbin", "proc", "dev"] {
            try fileManager.createDirectory(atPath: root + "/" + path, withIntermediateDirectories: true)
        }
        guard fileManager.fileExists(atPath: "/bin/busybox") else {
            throw LinuxTestError("/bin/busybox not found (Debian package busybox-static)")
        }
        try fileManager.copyItem(atPath: "/bin/busybox", toPath: root + "/bin/busybox")
        let initScript = """
            #!/bin/busybox sh
            /bin/busybox echo "userspace read $(/bin/busybox cat /host-nonce)" > /userspace-proof
            /bin/busybox sync
            /bin/busybox mount -o remount,ro /
            /bin/busybox reboot -f

            """
        try initScript.write(toFile: root + "/sbin/init", atomically: true, encoding: .utf8)
        guard chmod(root + "/sbin/init", 0o755) == 0 else { throw LinuxTestError("chmod /sbin/init: errno \(errno)") }
        try nonce.write(toFile: root + "/host-nonce", atomically: true, encoding: .utf8)
        return root
    }

    /// A forced, read-only check: status 0 means clean.
    static func fsck(_ path: String) throws -> ProcessResult {
        try run(try tool("e2fsck"), ["-fn", path])
    }

    static func size(_ path: String) throws -> Int {
        var info = stat()
        guard stat(path, &info) == 0 else { throw LinuxTestError("stat \(path): errno \(errno)") }
        return Int(info.st_size)
    }
}
