import Glibc
import SystemPackage

/// A failed system call: what was being done and the errno it returned.
public struct SystemCallError: Error, Sendable, Equatable, CustomStringConvertible {
    public let operation: String
    public let errno: Errno

    public init(_ operation: String, _ errno: Errno) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String { "\(operation): \(errno)" }
}

/// The one system-call helper of the Supervisor module: -1 becomes a thrown
/// ``SystemCallError`` carrying errno; EINTR is retried only by ``retrying(_:_:)``.
enum Sys {
    /// Calls `body` until it returns something other than -1/EINTR.
    static func retrying<R: FixedWidthInteger>(_ operation: @autoclosure () -> String, _ body: () -> R) throws(SystemCallError) -> R {
        while true {
            let result = body()
            if result >= 0 { return result }
            let code = Glibc.errno
            if code == EINTR { continue }
            throw SystemCallError(operation(), Errno(rawValue: code))
        }
    }

    /// Calls `body` once; -1 becomes a thrown error (EINTR included).
    static func once<R: FixedWidthInteger>(_ operation: @autoclosure () -> String, _ body: () -> R) throws(SystemCallError) -> R {
        let result = body()
        if result >= 0 { return result }
        throw SystemCallError(operation(), Errno(rawValue: Glibc.errno))
    }

    static func close(_ fd: Int32) {
        // close(2) is never retried on Linux: the descriptor is released even on EINTR.
        _ = Glibc.close(fd)
    }

    /// Seconds on the monotonic clock.
    static func monotonicNow() -> Double {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
    }

    /// Seconds since the epoch, for QMP timestamps and uptimes shown to people.
    static func wallNow() -> Double {
        var time = timespec()
        clock_gettime(CLOCK_REALTIME, &time)
        return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
    }

    /// Reads a whole file; nil when it cannot be opened.
    static func readFile(_ path: String) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 && Glibc.errno == EINTR { continue }
            if count <= 0 { break }
            result.append(contentsOf: chunk[0..<count])
        }
        return result
    }

    /// Writes all of `bytes` to `fd`, retrying EINTR and short writes.
    static func writeAll(_ fd: Int32, _ bytes: [UInt8], operation: String = "write") throws(SystemCallError) {
        var offset = 0
        while offset < bytes.count {
            let count = try retrying(operation) {
                bytes.withUnsafeBytes { buffer in Glibc.write(fd, buffer.baseAddress.map { $0 + offset }, buffer.count - offset) }
            }
            offset += count
        }
    }

    /// `mkdir -p` with `mode` for the directories it creates.
    static func makeDirectories(_ path: String, mode: mode_t) throws(SystemCallError) {
        var current = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            current += "/" + component
            if mkdir(current, mode) != 0 && Glibc.errno != EEXIST {
                throw SystemCallError("mkdir \(current)", Errno(rawValue: Glibc.errno))
            }
        }
    }

    static func fileExists(_ path: String) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0
    }

    /// Removes a file, ignoring a missing one.
    static func unlinkIfPresent(_ path: String) {
        _ = unlink(path)
    }

    static func errorText(_ code: Int32) -> String {
        String(cString: strerror(code))
    }
}
