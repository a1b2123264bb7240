import Glibc
import Protocol

@testable import VMMWorker

/// Writes `bytes` to a fresh temporary file and returns its path.
func temporaryFile(_ bytes: [UInt8], suffix: String = "") throws -> String {
    var template = Array("/tmp/flotilla-test-XXXXXX".utf8CString)
    let fd = template.withUnsafeMutableBufferPointer { buffer -> Int32 in
        guard let base = buffer.baseAddress else { return -1 }
        return mkstemp(base)
    }
    guard fd >= 0 else { throw SyscallError("mkstemp", .init(rawValue: errno)) }
    defer { close(fd) }
    try bytes.withUnsafeBytes { try Syscall.writeAll(fd, $0) }
    return String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// A pipe whose read end collects everything written to the write end.
final class OutputCollector: @unchecked Sendable {
    // Invariant: `readFD` is only read by `drain()`, called from the test's own thread.
    let readFD: Int32
    let writeFD: Int32

    init() throws {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw SyscallError("pipe", .init(rawValue: errno)) }
        _ = fcntl(fds[0], F_SETFL, O_NONBLOCK)
        readFD = fds[0]
        writeFD = fds[1]
    }

    deinit {
        close(readFD)
        close(writeFD)
    }

    func drain() -> String {
        var collected: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(readFD, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            collected += buffer[0..<n]
        }
        return String(decoding: collected, as: UTF8.self)
    }
}

let kvmAvailable = KVMSystem.isAvailable
