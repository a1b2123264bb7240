import Glibc
import SystemPackage

/// The one system-call helper of VMMWorker. Every call reports failure as a
/// ``SyscallError`` carrying `errno`; EINTR is retried only where the caller asks for it
/// (never for `KVM_RUN`, which is interrupted on purpose to kick a vCPU).
enum Syscall {
    /// Calls `body` until it returns something other than -1/EINTR.
    @inline(__always)
    static func retrying<R: FixedWidthInteger>(_ operation: StaticString, _ body: () -> R) throws(SyscallError) -> R {
        while true {
            let result = body()
            if result >= 0 { return result }
            let code = Glibc.errno
            if code == EINTR { continue }
            throw SyscallError(operation.description, Errno(rawValue: code))
        }
    }

    /// Calls `body` once; -1 becomes a thrown error (EINTR included).
    @inline(__always)
    static func once<R: FixedWidthInteger>(_ operation: StaticString, _ body: () -> R) throws(SyscallError) -> R {
        let result = body()
        if result >= 0 { return result }
        throw SyscallError(operation.description, Errno(rawValue: Glibc.errno))
    }

    /// Like ``retrying(_:_:)`` for calls returning 0 or an errno value (pthread_*).
    @inline(__always)
    static func pthread(_ operation: StaticString, _ body: () -> Int32) throws(SyscallError) {
        let code = body()
        if code != 0 { throw SyscallError(operation.description, Errno(rawValue: code)) }
    }

    /// Writes all of `buffer` to `fd`, retrying EINTR and short writes.
    static func writeAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) throws(SyscallError) {
        var offset = 0
        while offset < buffer.count {
            guard let base = buffer.baseAddress else { return }
            let n = try retrying("write") { Glibc.write(fd, base + offset, buffer.count - offset) }
            offset += n
        }
    }

    /// Reads exactly `buffer.count` bytes at `offset`, retrying EINTR and short reads.
    /// Returns false when the file ends first.
    static func preadAll(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SyscallError) -> Bool {
        var done = 0
        while done < buffer.count {
            guard let base = buffer.baseAddress else { return true }
            let n = try retrying("pread") {
                Glibc.pread(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            if n == 0 { return false }
            done += n
        }
        return true
    }

    static func close(_ fd: Int32) {
        // close(2) must not be retried on EINTR on Linux: the descriptor is already released.
        _ = Glibc.close(fd)
    }
}
