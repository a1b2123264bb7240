import Glibc
import SystemPackage

/// Bytes of a kernel or initrd image, read on demand (a kernel is never held in a Swift
/// array: it is read straight into guest memory).
public protocol ImageSource {
    /// Name used in error messages (the path).
    var name: String { get }
    var size: UInt64 { get }
    /// Reads `count` bytes at `offset`; throws ``BootError`` `.truncated` when the image ends first.
    func read(offset: UInt64, count: Int, what: String) throws -> [UInt8]
    /// Copies `[offset, offset + destination.count)` into `destination`.
    func copy(offset: UInt64, into destination: UnsafeMutableRawBufferPointer, what: String) throws
}

extension ImageSource {
    func truncated(_ what: String, offset: UInt64, count: UInt64) -> BootError {
        BootError(
            .truncated, "\(name): \(what) at offset \(offset) needs \(count) bytes, but the file is only \(size) bytes long (truncated?)")
    }

    /// Checks `[offset, offset + count)` lies in the image, overflow-safe.
    func checkRange(_ offset: UInt64, _ count: UInt64, what: String) throws {
        guard offset <= size, count <= size - offset else { throw truncated(what, offset: offset, count: count) }
    }
}

/// An image file opened read-only.
public final class FileImage: ImageSource {
    public let name: String
    public let size: UInt64
    private let fd: Int32

    public init(path: String) throws {
        name = path
        do {
            fd = try Syscall.retrying("open") { Glibc.open(path, O_RDONLY | O_CLOEXEC) }
        } catch {
            throw BootError(.unreadable, "cannot open '\(path)'", cause: error)
        }
        var info = stat()
        if fstat(fd, &info) != 0 {
            let code = Errno(rawValue: Glibc.errno)
            Syscall.close(fd)
            throw BootError(.unreadable, "cannot stat '\(path)'", cause: SyscallError("fstat", code))
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            Syscall.close(fd)
            throw BootError(.unreadable, "'\(path)' is not a regular file")
        }
        size = UInt64(info.st_size)
    }

    deinit { Syscall.close(fd) }

    public func read(offset: UInt64, count: Int, what: String) throws -> [UInt8] {
        try checkRange(offset, UInt64(count), what: what)
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try copy(offset: offset, into: $0, what: what) }
        return bytes
    }

    public func copy(offset: UInt64, into destination: UnsafeMutableRawBufferPointer, what: String) throws {
        try checkRange(offset, UInt64(destination.count), what: what)
        let complete: Bool
        do {
            complete = try Syscall.preadAll(fd, destination, at: offset)
        } catch {
            throw BootError(.unreadable, "\(name): cannot read \(what)", cause: error)
        }
        if !complete { throw truncated(what, offset: offset, count: UInt64(destination.count)) }
    }
}

/// An image held in memory (tests, small generated images).
public struct ByteImage: ImageSource {
    public let name: String
    public let bytes: [UInt8]
    public var size: UInt64 { UInt64(bytes.count) }

    public init(name: String, bytes: [UInt8]) {
        self.name = name
        self.bytes = bytes
    }

    public func read(offset: UInt64, count: Int, what: String) throws -> [UInt8] {
        try checkRange(offset, UInt64(count), what: what)
        return Array(bytes[Int(offset)..<Int(offset) + count])
    }

    public func copy(offset: UInt64, into destination: UnsafeMutableRawBufferPointer, what: String) throws {
        try checkRange(offset, UInt64(destination.count), what: what)
        bytes.withUnsafeBytes { source in
            guard let base = source.baseAddress, let target = destination.baseAddress else { return }
            target.copyMemory(from: base + Int(offset), byteCount: destination.count)
        }
    }
}

/// Little-endian field access into header bytes (callers check lengths first).
extension Array where Element == UInt8 {
    func le<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
        var value: T = 0
        for i in 0..<MemoryLayout<T>.size where offset + i < count {
            value |= T(self[offset + i]) << (8 * i)
        }
        return value
    }

    mutating func putLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        for i in 0..<MemoryLayout<T>.size where offset + i < count {
            self[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i))
        }
    }
}
