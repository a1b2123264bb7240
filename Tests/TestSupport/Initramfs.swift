import Foundation

/// Builds an initramfs: a "newc" cpio archive (the format Linux unpacks into its rootfs,
/// Documentation/driver-api/early-userspace/buffer-format.rst).
public struct Initramfs {
    private var archive: [UInt8] = []
    private var inode: UInt32 = 1

    public init() {}

    public enum Kind {
        case directory
        case file([UInt8], executable: Bool)
        case characterDevice(major: UInt32, minor: UInt32)
        case symlink(String)
    }

    public mutating func add(_ path: String, _ kind: Kind) {
        let mode: UInt32
        var data: [UInt8] = []
        var rdevMajor: UInt32 = 0
        var rdevMinor: UInt32 = 0
        switch kind {
        case .directory: mode = 0o040755
        case .file(let bytes, let executable):
            mode = executable ? 0o100755 : 0o100644
            data = bytes
        case .characterDevice(let major, let minor):
            mode = 0o020600
            rdevMajor = major
            rdevMinor = minor
        case .symlink(let target):
            mode = 0o120777
            data = Array(target.utf8)
        }
        appendEntry(name: path, mode: mode, data: data, rdevMajor: rdevMajor, rdevMinor: rdevMinor)
    }

    private mutating func appendEntry(name: String, mode: UInt32, data: [UInt8], rdevMajor: UInt32, rdevMinor: UInt32) {
        let nameBytes = Array(name.utf8) + [0]
        let fields: [UInt32] = [
            inode, mode, 0, 0, mode & 0o040000 != 0 ? 2 : 1, 0, UInt32(data.count), 0, 0, rdevMajor, rdevMinor,
            UInt32(nameBytes.count), 0,
        ]
        inode += 1
        var header = "070701"
        for field in fields {
            let hex = String(field, radix: 16, uppercase: true)
            header += String(repeating: "0", count: 8 - hex.count) + hex
        }
        archive += Array(header.utf8) + nameBytes
        pad()
        archive += data
        pad()
    }

    private mutating func pad() {
        while archive.count % 4 != 0 { archive.append(0) }
    }

    /// The archive with its trailer.
    public func bytes() -> [UInt8] {
        var copy = self
        copy.appendEntry(name: "TRAILER!!!", mode: 0, data: [], rdevMajor: 0, rdevMinor: 0)
        return copy.archive
    }
}

/// Whether the CPU offers hardware virtualization (VT-x or AMD-V). Without it, KVM here is a
/// software layer that emulates every instruction and cannot run Linux userspace.
public enum HardwareVirtualization {
    public static let available: Bool = {
        guard let cpuinfo = readText("/proc/cpuinfo") else { return false }
        return cpuinfo.split(separator: "\n").contains { line in
            line.hasPrefix("flags") && line.split(separator: " ").contains { $0 == "vmx" || $0 == "svm" }
        }
    }()
}
