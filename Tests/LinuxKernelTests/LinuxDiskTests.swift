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
        try DiskImage.makeExt4(root, mebibytes: 48)
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
        try Self.expectEndAtInit(boot, fwait: true)

        // The host sees the kernel's writes: the superblock's mount count and mount time, and
        // the journal in use (needs_recovery, as the VM ended without unmounting) ...
        let after = try DiskImage.superblock(root)
        #expect(after["Mount count"] == "1", "before: \(before)\nafter: \(after)")
        #expect(after["Last mount time"] != before["Last mount time"], "before: \(before)\nafter: \(after)")
        #expect(after["Filesystem features"]?.split(separator: " ").contains("needs_recovery") == true, "\(after)")
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
        try DiskImage.makeExt4(root, mebibytes: 48)
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
    static func expectEndAtInit(_ boot: LinuxBoot, fwait: Bool) throws {
        let log = boot.log
        #expect(!boot.timedOut, "\(boot.tail)")
        #expect(!log.contains("WARNING:"), "\(log.all(containing: "WARNING:"))")
        #expect(!log.contains("BUG:"), "\(log.all(containing: "BUG:"))")
        #expect(log.index(of: "Run /sbin/init as init process") ?? 0 > log.index(of: "VFS: Mounted root ") ?? .max, "\(boot.tail)")
        if fwait && !HardwareVirtualization.available {
            #expect(log.lines.last == "Run /sbin/init as init process", "\(boot.tail)")
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

    /// A sparse file of `mebibytes` MiB holding a fresh ext4 file system.
    static func makeExt4(_ path: String, mebibytes: Int) throws {
        guard FileManager.default.createFile(atPath: path, contents: nil), truncate(path, off_t(mebibytes) << 20) == 0 else {
            throw LinuxTestError("cannot create \(path)")
        }
        let result = try run(try tool("mkfs.ext4"), ["-q", "-F", path])
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
