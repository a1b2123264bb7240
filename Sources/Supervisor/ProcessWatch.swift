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

    /// Spawns `arguments[0]`-named `path` in a new session with stdin on /dev/null,
    /// stdout/stderr on `outputFD`, and `extraFDs` as its descriptors 3, 4, ...; no other
    /// descriptor is inherited. `environment` entries are added to flotillad's own.
    static func spawn(
        path: String, arguments: [String], outputFD: Int32, extraFDs: [Int32] = [], environment extra: [String] = []
    ) throws(SystemCallError) -> pid_t {
        var cArguments = arguments.map { strdup($0) } + [nil]
        let names = Set(extra.map { $0.split(separator: "=", maxSplits: 1).first.map(String.init) ?? $0 })
        let inherited = environment().filter { !names.contains($0.split(separator: "=", maxSplits: 1).first.map(String.init) ?? $0) }
        var cEnvironment = (inherited + extra).map { strdup($0) } + [nil]
        defer {
            for pointer in cArguments { free(pointer) }
            for pointer in cEnvironment { free(pointer) }
        }
        var pid: pid_t = 0
        let descriptors: [Int32] = [-1, outputFD, outputFD] + extraFDs
        let code = descriptors.withUnsafeBufferPointer { fds in
            fl_spawn(&pid, path, &cArguments, &cEnvironment, fds.baseAddress, Int32(fds.count), 1)
        }
        guard code == 0 else { throw SystemCallError("posix_spawn \(path)", .init(rawValue: code)) }
        return pid
    }
}

/// The read end of a worker's readiness pipe (flotilla-vmm's `FLOTILLA_DAEMON_READY_FD`): the
/// worker writes `R` once the VM runs and its api-channel accepts, or an error message and
/// then exits. Confined to the reactor thread.
final class ReadinessPipe {
    enum Outcome: Equatable {
        /// Nothing decisive read yet.
        case pending
        /// The worker wrote `R`.
        case ready
        /// The pipe closed without `R`; the text is whatever the worker wrote.
        case failed(String)
    }

    static let readyByte = UInt8(ascii: "R")

    private let fd: Int32
    private let reactor: Reactor
    private var token: Reactor.Token?
    private var received: [UInt8] = []
    private(set) var outcome = Outcome.pending
    private var onOutcome: ((Outcome) -> Void)?

    /// Creates the pipe: `writeEnd` goes to the worker (then ``closeWriteEnd()``), and
    /// `onOutcome` runs once on the reactor when the worker reports ready or the pipe closes.
    static func make(reactor: Reactor, onOutcome: @escaping (Outcome) -> Void) throws(SystemCallError) -> (ReadinessPipe, writeEnd: Int32) {
        var ends: [Int32] = [-1, -1]
        // pipe2 is hidden from Swift's Glibc; only the reactor thread spawns processes, so
        // setting close-on-exec right after pipe() cannot leak the ends into another spawn.
        _ = try Sys.once("pipe") { pipe(&ends) }
        _ = fcntl(ends[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(ends[1], F_SETFD, FD_CLOEXEC)
        // Only the read end is non-blocking (the worker's end is a separate open file).
        _ = fcntl(ends[0], F_SETFL, fcntl(ends[0], F_GETFL) | O_NONBLOCK)
        do {
            return (try ReadinessPipe(fd: ends[0], reactor: reactor, onOutcome: onOutcome), ends[1])
        } catch {
            Sys.close(ends[1])
            throw error
        }
    }

    private init(fd: Int32, reactor: Reactor, onOutcome: @escaping (Outcome) -> Void) throws(SystemCallError) {
        self.fd = fd
        self.reactor = reactor
        self.onOutcome = onOutcome
        do {
            token = try reactor.add(fd: fd, events: EPOLLIN.rawValue) { [weak self] _ in self?.readAvailable(notify: true) }
        } catch {
            Sys.close(fd)
            throw error
        }
    }

    deinit { close() }

    /// Reads what the worker wrote so far; `notify` runs the outcome handler when decided.
    /// Without it (the worker's exit was seen first), the caller reads ``outcome`` itself.
    func readAvailable(notify: Bool) {
        guard token != nil, outcome == .pending else { return }
        var chunk = [UInt8](repeating: 0, count: 512)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count > 0 {
                received.append(contentsOf: chunk[0..<count])
                if received.first == Self.readyByte {
                    decide(.ready, notify: notify)
                    return
                }
                continue
            }
            if count < 0 && errno == EINTR { continue }
            if count < 0 && errno == EAGAIN { return }
            decide(.failed(String(decoding: received, as: UTF8.self)), notify: notify)
            return
        }
    }

    private func decide(_ outcome: Outcome, notify: Bool) {
        self.outcome = outcome
        let handler = onOutcome
        close()
        if notify { handler?(outcome) }
    }

    /// Stops watching; no handler runs after this.
    func close() {
        guard let token else { return }
        reactor.remove(token)
        self.token = nil
        Sys.close(fd)
        onOutcome = nil
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
