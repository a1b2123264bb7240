import CLinux
import Glibc

/// How a worker process ended.
public enum ProcessExit: Sendable, Equatable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)
    /// The process was not our child (adopted from an earlier flotillad), so its status is
    /// not ours to read; only that it ended.
    case unknown

    public var isFailure: Bool {
        switch self {
        case .exited(let status): status != 0
        case .signaled: true
        case .unknown: true
        }
    }

    public var description: String {
        switch self {
        case .exited(let status): "exited with status \(status)"
        case .signaled(let signal): "killed by signal \(signal) (\(ProcessExit.signalName(signal)))"
        case .unknown: "ended (exit status unknown: the worker was adopted from an earlier flotillad)"
        }
    }

    static func signalName(_ signal: Int32) -> String {
        switch signal {
        case SIGKILL: "SIGKILL"
        case SIGTERM: "SIGTERM"
        case SIGSEGV: "SIGSEGV"
        case SIGABRT: "SIGABRT"
        case SIGINT: "SIGINT"
        case SIGBUS: "SIGBUS"
        case SIGSYS: "SIGSYS"
        case SIGHUP: "SIGHUP"
        default: "signal \(signal)"
        }
    }
}

/// A process watched through a pidfd on the reactor: the pidfd turns readable when the
/// process ends, and a child's status is then reaped with waitid(P_PIDFD) — never with
/// waitpid(-1), which could reap a process someone else watches.
final class ProcessWatch {
    let pid: pid_t
    let pidfd: Int32
    private let reactor: Reactor
    private var token: Reactor.Token?
    private var onExit: ((ProcessExit) -> Void)?

    /// Opens a pidfd for `pid`. For a child or an adopted process whose pid cannot have been
    /// reused yet (a zombie child, or one verified by its pidfile lock after this call).
    init(pid: pid_t, reactor: Reactor, onExit: @escaping (ProcessExit) -> Void) throws(SystemCallError) {
        self.pid = pid
        self.reactor = reactor
        self.onExit = onExit
        pidfd = try Sys.once("pidfd_open \(pid)") { fl_pidfd_open(pid) }
        do {
            token = try reactor.add(fd: pidfd, events: EPOLLIN.rawValue) { [weak self] _ in self?.ended() }
        } catch {
            Sys.close(pidfd)
            throw error
        }
    }

    deinit {
        if let token { reactor.remove(token) }
        Sys.close(pidfd)
    }

    private func ended() {
        var code: Int32 = 0
        var status: Int32 = 0
        let result = fl_pidfd_reap(pidfd, &code, &status)
        let exit: ProcessExit
        if result == 1 {
            exit = code == CLD_EXITED ? .exited(status) : .signaled(status)
        } else if result == 0 {
            // Readable but not yet reapable: look again shortly.
            reactor.after(0.01) { [weak self] in self?.ended() }
            return
        } else {
            exit = .unknown
        }
        if let token { reactor.remove(token) }
        token = nil
        let handler = onExit
        onExit = nil
        handler?(exit)
    }

    /// Sends `signal` through the pidfd, so it can only reach this process.
    func signal(_ signal: Int32) {
        _ = fl_pidfd_send_signal(pidfd, signal)
    }
}

/// Spawning processes with posix_spawn (never fork): see fl_spawn.h.
enum Spawner {
    /// Variables that belong to flotillad's relation with systemd, never to a worker.
    static let privateVariables = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"]

    static func environment() -> [String] {
        var result: [String] = []
        var cursor = environ
        while let entry = cursor.pointee {
            let text = String(cString: entry)
            let name = text.split(separator: "=", maxSplits: 1).first.map(String.init) ?? text
            if !privateVariables.contains(name) { result.append(text) }
            cursor += 1
        }
        return result
    }

    /// Spawns `arguments[0]`-named `path` in a new session with stdin on /dev/null and
    /// stdout/stderr on `outputFD`; no other descriptor is inherited.
    static func spawn(path: String, arguments: [String], outputFD: Int32) throws(SystemCallError) -> pid_t {
        var cArguments = arguments.map { strdup($0) } + [nil]
        var cEnvironment = environment().map { strdup($0) } + [nil]
        defer {
            for pointer in cArguments { free(pointer) }
            for pointer in cEnvironment { free(pointer) }
        }
        var pid: pid_t = 0
        let descriptors: [Int32] = [-1, outputFD, outputFD]
        let code = descriptors.withUnsafeBufferPointer { fds in
            fl_spawn(&pid, path, &cArguments, &cEnvironment, fds.baseAddress, Int32(fds.count), 1)
        }
        guard code == 0 else { throw SystemCallError("posix_spawn \(path)", .init(rawValue: code)) }
        return pid
    }
}

/// The worker's pidfile (see VMMWorker's Pidfile): the pid it holds, and the live process
/// that holds its POSIX write lock, as the kernel reports it (F_GETLK).
enum PidfileProbe {
    struct Finding: Equatable {
        /// The pid written in the file, when it parses.
        var recordedPID: pid_t?
        /// The process holding the lock, or nil when nobody does.
        var lockHolder: pid_t?

        /// The file names a live process that really is its writer.
        var isLive: Bool { recordedPID != nil && recordedPID == lockHolder }
    }

    /// nil when the file does not exist.
    static func probe(_ path: String) -> Finding? {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return nil }
        defer { Sys.close(fd) }
        var bytes = [UInt8](repeating: 0, count: 64)
        let count = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        let text = count > 0 ? String(decoding: bytes[0..<count], as: UTF8.self) : ""
        let recorded = pid_t(text.trimmingCharactersInWhitespace())
        var lock = flock()
        lock.l_type = Int16(F_WRLCK)
        lock.l_whence = Int16(SEEK_SET)
        lock.l_start = 0
        lock.l_len = 0
        var holder: pid_t?
        if fcntl(fd, F_GETLK, &lock) == 0 && lock.l_type != Int16(F_UNLCK) && lock.l_pid > 0 {
            holder = lock.l_pid
        }
        return Finding(recordedPID: recorded.flatMap { $0 > 0 ? $0 : nil }, lockHolder: holder)
    }

    /// The executable of a live process, as /proc shows it.
    static func executable(of pid: pid_t) -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = readlink("/proc/\(pid)/exe", &buffer, buffer.count - 1)
        guard count > 0 else { return nil }
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

extension String {
    func trimmingCharactersInWhitespace() -> String {
        let scalars = unicodeScalars
        guard let first = scalars.firstIndex(where: { !$0.properties.isWhitespace }),
            let last = scalars.lastIndex(where: { !$0.properties.isWhitespace })
        else { return "" }
        return String(scalars[first...last])
    }
}
