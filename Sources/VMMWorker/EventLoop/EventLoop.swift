import CLinux
import Glibc
import Synchronization

/// An epoll loop: the main loop of a worker (QMP sockets, serial input, signals, timers) and
/// each iothread. Handlers run on the loop's thread; `register`, `unregister` and `execute`
/// may be called from any thread.
public final class EventLoop: Sendable {
    public typealias Handler = @Sendable (_ events: UInt32) -> Void

    /// Identifies one registration; never reused within a loop.
    public struct Token: Sendable, Hashable {
        let value: UInt64
    }

    private struct State {
        var handlers: [UInt64: (fd: Int32, ownsFD: Bool, handler: Handler)] = [:]
        var nextToken: UInt64 = 1
        var pending: [@Sendable () -> Void] = []
        var stopped = false
        /// The thread inside `run`, if any.
        var runner: pthread_t?
        /// Its kernel thread id (QMP query-iothreads).
        var threadID: Int32?
        /// Registrations switched off by `rest`: their events and when (CLOCK_MONOTONIC
        /// nanoseconds) to switch them on again.
        var resting: [(token: UInt64, events: UInt32, until: UInt64)] = []
    }

    public let name: String
    /// Threads for the blocking system calls of the devices this loop serves (nil: they run
    /// on the loop thread).
    public let ioWorkers: IOWorkerPool?
    private let epollFD: Int32
    /// An eventfd that wakes `epoll_wait` for `execute` and `stop`.
    private let wakeFD: Int32
    private let state = Mutex(State())
    /// Whether `state.resting` may be non-empty; set after an append, cleared under the lock
    /// when the list empties, so the loop never misses a registration to switch back on.
    private let anyResting = Atomic<Bool>(false)
    /// Token 0 is the wake eventfd.
    private static let wakeToken: UInt64 = 0

    /// `ioThreads` > 0 starts an ``IOWorkerPool`` of that many threads (`<name>-io0`, …) now,
    /// so create the loop before the seccomp filter.
    public init(name: String, ioThreads: Int = 0) throws(SyscallError) {
        self.name = name
        epollFD = try Syscall.once("epoll_create1") { epoll_create1(Int32(EPOLL_CLOEXEC)) }
        do {
            wakeFD = try Syscall.once("eventfd") { fl_eventfd(0, 1) }
        } catch {
            Syscall.close(epollFD)
            throw error
        }
        var event = epoll_event()
        event.events = EPOLLIN.rawValue
        event.data.u64 = Self.wakeToken
        let (epoll, wake) = (epollFD, wakeFD)
        do {
            _ = try Syscall.once("epoll_ctl") { epoll_ctl(epoll, EPOLL_CTL_ADD, wake, &event) }
        } catch {
            Syscall.close(wakeFD)
            Syscall.close(epollFD)
            throw error
        }
        do {
            ioWorkers = ioThreads > 0 ? try IOWorkerPool(name: name, threads: ioThreads) : nil
        } catch {
            Syscall.close(wakeFD)
            Syscall.close(epollFD)
            throw error
        }
    }

    deinit {
        ioWorkers?.shutdown()
        for entry in state.withLock({ Array($0.handlers.values) }) where entry.ownsFD { Syscall.close(entry.fd) }
        Syscall.close(wakeFD)
        Syscall.close(epollFD)
    }

    /// Watches `fd` for `events` (EPOLLIN, EPOLLOUT, ...). The caller keeps owning `fd` and
    /// must unregister before closing it.
    @discardableResult
    public func register(fd: Int32, events: UInt32, handler: @escaping Handler) throws(SyscallError) -> Token {
        try register(fd: fd, events: events, ownsFD: false, handler: handler)
    }

    private func register(fd: Int32, events: UInt32, ownsFD: Bool, handler: @escaping Handler) throws(SyscallError) -> Token {
        let token = state.withLock { state in
            let token = state.nextToken
            state.nextToken += 1
            state.handlers[token] = (fd, ownsFD, handler)
            return token
        }
        var event = epoll_event()
        event.events = events
        event.data.u64 = token
        do {
            _ = try Syscall.once("epoll_ctl") { epoll_ctl(epollFD, EPOLL_CTL_ADD, fd, &event) }
        } catch {
            _ = state.withLock { $0.handlers.removeValue(forKey: token) }
            throw error
        }
        return Token(value: token)
    }

    /// Changes the events a registration waits for.
    public func modify(_ token: Token, events: UInt32) throws(SyscallError) {
        guard let fd = state.withLock({ $0.handlers[token.value]?.fd }) else { return }
        var event = epoll_event()
        event.events = events
        event.data.u64 = token.value
        _ = try Syscall.once("epoll_ctl") { epoll_ctl(epollFD, EPOLL_CTL_MOD, fd, &event) }
    }

    /// Stops watching; the handler is not called again once this returns on the loop thread.
    public func unregister(_ token: Token) {
        guard let entry = state.withLock({ $0.handlers.removeValue(forKey: token.value) }) else { return }
        var event = epoll_event()
        _ = epoll_ctl(epollFD, EPOLL_CTL_DEL, entry.fd, &event)
        if entry.ownsFD { Syscall.close(entry.fd) }
    }

    /// Switches `token`'s events off for `nanoseconds`, then waits for `events` again. For a
    /// level-triggered listener whose accept4 fails for want of descriptors or memory (EMFILE,
    /// ENFILE, ENOBUFS, ENOMEM): the connection stays queued, so the listener would wake the loop
    /// again at once, for as long as the shortage lasts. Needs no descriptor (the loop's own
    /// epoll_wait timeout brings it back), since it is used when there are none to spare.
    public func rest(_ token: Token, events: UInt32, nanoseconds: UInt64 = 100_000_000) {
        guard (try? modify(token, events: 0)) != nil else { return }
        let until = Self.monotonicNanoseconds() &+ nanoseconds
        state.withLock { $0.resting.append((token.value, events, until)) }
        anyResting.store(true, ordering: .releasing)
        wake()
    }

    static func monotonicNanoseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) &* 1_000_000_000 &+ UInt64(now.tv_nsec)
    }

    /// The epoll_wait timeout in milliseconds: until the first resting registration is due
    /// (rounded up), or -1 (none). Registrations that are due are switched on again.
    private func wakeResting() -> Int32 {
        // Every round of every loop comes here: without resting registrations (nearly always)
        // it costs one atomic load, no clock read and no lock.
        guard anyResting.load(ordering: .acquiring) else { return -1 }
        let now = Self.monotonicNanoseconds()
        let (due, next) = state.withLock { state -> ([(token: UInt64, events: UInt32, until: UInt64)], UInt64?) in
            let due = state.resting.filter { $0.until <= now }
            state.resting.removeAll { $0.until <= now }
            if state.resting.isEmpty { anyResting.store(false, ordering: .releasing) }
            return (due, state.resting.map(\.until).min())
        }
        for entry in due { try? modify(Token(value: entry.token), events: entry.events) }
        guard let next else { return -1 }
        return Int32(clamping: (next - now + 999_999) / 1_000_000)
    }

    /// A timerfd that calls `handler` on the loop thread every `intervalNanoseconds`
    /// (first after one interval) until unregistered; the loop owns the descriptor.
    public func addTimer(intervalNanoseconds: UInt64, handler: @escaping @Sendable () -> Void) throws(SyscallError) -> Token {
        let fd = try Syscall.once("timerfd_create") {
            timerfd_create(CLOCK_MONOTONIC, Int32(TFD_CLOEXEC | TFD_NONBLOCK))
        }
        var spec = itimerspec()
        spec.it_interval.tv_sec = Int(intervalNanoseconds / 1_000_000_000)
        spec.it_interval.tv_nsec = Int(intervalNanoseconds % 1_000_000_000)
        spec.it_value = spec.it_interval
        do {
            _ = try Syscall.once("timerfd_settime") { timerfd_settime(fd, 0, &spec, nil) }
            return try register(fd: fd, events: EPOLLIN.rawValue, ownsFD: true) { _ in
                var expirations: UInt64 = 0
                _ = withUnsafeMutableBytes(of: &expirations) { Glibc.read(fd, $0.baseAddress, 8) }
                handler()
            }
        } catch {
            Syscall.close(fd)
            throw error
        }
    }

    /// A one-shot timerfd: `handler` runs once on the loop thread after `delayNanoseconds`
    /// (at least 1 ns); the registration then removes itself. Unregistering the token before
    /// it fires cancels it.
    @discardableResult
    public func schedule(afterNanoseconds delayNanoseconds: UInt64, handler: @escaping @Sendable () -> Void) throws(SyscallError) -> Token {
        let fd = try Syscall.once("timerfd_create") {
            timerfd_create(CLOCK_MONOTONIC, Int32(TFD_CLOEXEC | TFD_NONBLOCK))
        }
        let delay = max(delayNanoseconds, 1)
        var spec = itimerspec()
        spec.it_value.tv_sec = Int(delay / 1_000_000_000)
        spec.it_value.tv_nsec = Int(delay % 1_000_000_000)
        let tokenBox = Mutex<Token?>(nil)
        do {
            _ = try Syscall.once("timerfd_settime") { timerfd_settime(fd, 0, &spec, nil) }
            let token = try register(fd: fd, events: EPOLLIN.rawValue, ownsFD: true) { [self] _ in
                // Consume the expiry so the descriptor stops being readable even if the token
                // is not known yet (scheduled from another thread and fired at once).
                var expirations: UInt64 = 0
                let consumed = withUnsafeMutableBytes(of: &expirations) { Glibc.read(fd, $0.baseAddress, 8) }
                guard consumed == 8 else { return }
                if let token = tokenBox.withLock({ $0 }) { unregister(token) }
                handler()
            }
            tokenBox.withLock { $0 = token }
            return token
        } catch {
            Syscall.close(fd)
            throw error
        }
    }

    /// True when called from the thread running this loop.
    public var inLoopThread: Bool {
        guard let runner = state.withLock({ $0.runner }) else { return false }
        return pthread_equal(runner, pthread_self()) != 0
    }

    /// The kernel thread id of the thread running this loop, while one does.
    public var threadID: Int32? { state.withLock { $0.threadID } }

    /// Runs `work` now when called on the loop thread, else on the loop thread soon.
    public func executeNowOrSoon(_ work: @escaping @Sendable () -> Void) {
        if inLoopThread { work() } else { execute(work) }
    }

    /// Runs `work` on the loop thread soon.
    public func execute(_ work: @escaping @Sendable () -> Void) {
        state.withLock { $0.pending.append(work) }
        wake()
    }

    /// Makes `run` return after the current round of handlers.
    public func stop() {
        state.withLock { $0.stopped = true }
        wake()
    }

    private func wake() {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { Glibc.write(wakeFD, $0.baseAddress, 8) }
    }

    /// Dispatches events on the calling thread until `stop`.
    public func run() {
        let threadID = fl_current_thread_id()
        state.withLock {
            $0.runner = pthread_self()
            $0.threadID = threadID
        }
        defer {
            state.withLock {
                $0.runner = nil
                $0.threadID = nil
            }
        }
        let capacity = 32
        var events = [epoll_event](repeating: epoll_event(), count: capacity)
        while true {
            let timeout = wakeResting()
            let count = events.withUnsafeMutableBufferPointer { buffer in
                epoll_wait(epollFD, buffer.baseAddress, Int32(capacity), timeout)
            }
            if count < 0 {
                if errno == EINTR { continue }
                return
            }
            for index in 0..<Int(count) {
                let token = events[index].data.u64
                let mask = events[index].events
                if token == Self.wakeToken {
                    var value: UInt64 = 0
                    _ = withUnsafeMutableBytes(of: &value) { Glibc.read(wakeFD, $0.baseAddress, 8) }
                    continue
                }
                // Looked up per event: an earlier handler of this round may have unregistered it.
                guard let handler = state.withLock({ $0.handlers[token]?.handler }) else { continue }
                handler(mask)
            }
            let (work, stopped) = state.withLock { state in
                let work = state.pending
                state.pending.removeAll()
                return (work, state.stopped)
            }
            for item in work { item() }
            if stopped { return }
        }
    }

    /// Runs the loop on a new thread named after the loop.
    public func startThread() throws(SyscallError) -> pthread_t {
        let thread = try HostThread.spawn(name: name) { [self] in run() }
        // Return only once the thread runs the loop: a thread still starting makes system
        // calls (rseq, set_robust_list, prctl) that the seccomp filter, installed right after
        // start-up, would kill it for.
        while state.withLock({ $0.runner == nil }) { usleep(50) }
        return thread
    }
}
