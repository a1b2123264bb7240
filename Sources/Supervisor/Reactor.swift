import CLinux
import Glibc

/// flotillad's one event loop: an epoll set, timers and signals, run on the thread that
/// calls ``run()`` (flotillad's main thread — a dedicated thread, never the Swift concurrency
/// pool). Every supervisor object is confined to that thread, so none needs a lock.
public final class Reactor {
    public typealias Handler = (_ events: UInt32) -> Void

    /// A registration; tokens are never reused, so an event for a closed descriptor cannot
    /// reach a handler registered later on the same descriptor number.
    public struct Token: Hashable {
        fileprivate let value: UInt64
    }

    /// A pending timer, cancellable.
    public struct Timer: Hashable {
        fileprivate let value: UInt64
    }

    private let epollFD: Int32
    private var handlers: [UInt64: (fd: Int32, handler: Handler)] = [:]
    private var timers: [UInt64: (deadline: Double, action: () -> Void)] = [:]
    private var nextID: UInt64 = 1
    private var stopped = false
    /// One read buffer for every connection: handlers run one at a time on this thread.
    var readBuffer = [UInt8](repeating: 0, count: 65536)

    public init() throws(SystemCallError) {
        epollFD = try Sys.once("epoll_create1") { epoll_create1(Int32(EPOLL_CLOEXEC)) }
    }

    deinit { Sys.close(epollFD) }

    /// Watches `fd` for `events`; the caller keeps owning `fd` and removes it before closing.
    @discardableResult
    public func add(fd: Int32, events: UInt32, _ handler: @escaping Handler) throws(SystemCallError) -> Token {
        let token = Token(value: nextID)
        nextID += 1
        var event = epoll_event()
        event.events = events
        event.data.u64 = token.value
        _ = try Sys.once("epoll_ctl ADD") { epoll_ctl(epollFD, EPOLL_CTL_ADD, fd, &event) }
        handlers[token.value] = (fd, handler)
        return token
    }

    public func modify(_ token: Token, events: UInt32) {
        guard let entry = handlers[token.value] else { return }
        var event = epoll_event()
        event.events = events
        event.data.u64 = token.value
        _ = epoll_ctl(epollFD, EPOLL_CTL_MOD, entry.fd, &event)
    }

    public func remove(_ token: Token) {
        guard let entry = handlers.removeValue(forKey: token.value) else { return }
        _ = epoll_ctl(epollFD, EPOLL_CTL_DEL, entry.fd, nil)
    }

    /// Runs `action` on the loop after `seconds`.
    @discardableResult
    public func after(_ seconds: Double, _ action: @escaping () -> Void) -> Timer {
        let timer = Timer(value: nextID)
        nextID += 1
        timers[timer.value] = (Sys.monotonicNow() + max(0, seconds), action)
        return timer
    }

    public func cancel(_ timer: Timer?) {
        guard let timer else { return }
        timers.removeValue(forKey: timer.value)
    }

    /// Makes ``run()`` return after the current iteration.
    public func stop() { stopped = true }

    /// Dispatches events and timers until ``stop()``.
    public func run() {
        var events = [epoll_event](repeating: epoll_event(), count: 64)
        while !stopped {
            fireDueTimers()
            if stopped { break }
            var timeout: Int32 = -1
            if let next = timers.values.map(\.deadline).min() {
                timeout = Int32(min(60_000, max(0, ((next - Sys.monotonicNow()) * 1000).rounded(.up))))
            }
            let count = epoll_wait(epollFD, &events, Int32(events.count), timeout)
            if count < 0 { continue }  // EINTR: go round again
            for index in 0..<Int(count) {
                let event = events[index]
                // A handler earlier in this batch may have removed this registration.
                guard let entry = handlers[event.data.u64] else { continue }
                entry.handler(event.events)
            }
        }
    }

    private func fireDueTimers() {
        let now = Sys.monotonicNow()
        let due = timers.filter { $0.value.deadline <= now }.sorted { $0.value.deadline < $1.value.deadline }
        for (id, entry) in due {
            guard timers.removeValue(forKey: id) != nil else { continue }
            entry.action()
        }
    }

    /// Blocks `signals` in this thread (call before any other thread starts, so all inherit
    /// the mask) and delivers them to `handler` through a signalfd on the loop.
    public func handleSignals(_ signals: [Int32], _ handler: @escaping (Int32) -> Void) throws(SystemCallError) {
        var mask = sigset_t()
        sigemptyset(&mask)
        for signal in signals { sigaddset(&mask, signal) }
        pthread_sigmask(SIG_BLOCK, &mask, nil)
        let fd = try Sys.once("signalfd") { signalfd(-1, &mask, Int32(SFD_CLOEXEC | SFD_NONBLOCK)) }
        try add(fd: fd, events: EPOLLIN.rawValue) { _ in
            var info = signalfd_siginfo()
            while withUnsafeMutableBytes(of: &info, { Glibc.read(fd, $0.baseAddress, $0.count) }) > 0 {
                handler(Int32(info.ssi_signo))
            }
        }
    }
}
