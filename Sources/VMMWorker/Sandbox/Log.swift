import Glibc
import Synchronization

/// The worker's log: one line per message, `-D FILE` or standard error. Lines are written
/// with one write(2) each, so concurrent threads never interleave within a line.
public final class VMMLog: Sendable {
    public enum Level: String, Sendable {
        case error, warning, info, debug
    }

    private let fd: Mutex<Int32>
    private let ownsFD: Bool
    private let prefix: String

    /// Logs to standard error.
    public init(name: String?) {
        VMMLog.loadTimeZone()
        fd = Mutex(2)
        ownsFD = false
        prefix = "flotilla-vmm[\(getpid())]" + (name.map { " \($0)" } ?? "")
    }

    /// Logs to `path`, appending, created with mode 0640 when missing.
    public init(path: String, name: String?) throws(SyscallError) {
        VMMLog.loadTimeZone()
        let opened: Int32
        do {
            opened = try Syscall.retrying("open") { open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o640) }
        } catch {
            throw SyscallError("open log file \(path)", error.errno)
        }
        fd = Mutex(opened)
        ownsFD = true
        prefix = "flotilla-vmm[\(getpid())]" + (name.map { " \($0)" } ?? "")
    }

    /// glibc's gmtime_r reads /etc/localtime on first use; do it now, before the seccomp
    /// filter forbids opening files.
    private static func loadTimeZone() {
        tzset()
    }

    deinit {
        if ownsFD { Syscall.close(fd.withLock { $0 }) }
    }

    /// After `fork`-free daemonizing the pid changes only via re-exec, so the prefix is fixed.
    public func log(_ level: Level, _ message: String) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var parts = tm()
        var seconds = now.tv_sec
        gmtime_r(&seconds, &parts)
        func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
        let millis = Int(now.tv_nsec / 1_000_000)
        let millisText = millis < 10 ? "00\(millis)" : millis < 100 ? "0\(millis)" : "\(millis)"
        let stamp =
            "\(parts.tm_year + 1900)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday))T"
            + "\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec)).\(millisText)Z"
        var line = "\(stamp) \(prefix) \(level.rawValue): \(message)\n"
        fd.withLock { fd in
            line.withUTF8 { buffer in
                try? Syscall.writeAll(fd, UnsafeRawBufferPointer(buffer))
            }
        }
    }

    public func error(_ message: String) { log(.error, message) }
    public func warning(_ message: String) { log(.warning, message) }
    public func info(_ message: String) { log(.info, message) }
}
