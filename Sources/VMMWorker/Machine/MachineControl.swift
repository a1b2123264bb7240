import CLinux
import Glibc
import Synchronization

/// Why a MicroVM ended.
public enum VMExitReason: Sendable, Equatable, CustomStringConvertible {
    /// The guest reset the machine (i8042 0xfe, KVM reset event). Like StratoVirt and
    /// Firecracker, a reset ends the VM cleanly.
    case guestReset
    /// The guest powered off (KVM shutdown system event).
    case guestShutdown
    /// The owner called ``MicroVM/requestShutdown()``.
    case requested
    /// A vCPU failed: KVM internal error, failed entry, triple fault, set-up error. The
    /// message carries exit reason, registers and instruction bytes where known.
    case failed(String)

    /// The process exit status this reason maps to: 0 except for failures.
    public var exitCode: Int32 {
        if case .failed = self { return 1 }
        return 0
    }

    public var description: String {
        switch self {
        case .guestReset: "guest reset"
        case .guestShutdown: "guest shutdown"
        case .requested: "shutdown requested"
        case .failed(let message): "failed: \(message)"
        }
    }
}

/// The guest's run state, named like QMP `query-status`'s `status`.
public enum GuestState: String, Sendable {
    case prelaunch
    case running
    case paused
    case shutdown
}

/// Coordinates the vCPU threads: start barrier, pause/resume parking, stop, and the end of
/// the VM. Sendable: the request word is atomic and everything else is inside the lock.
final class MachineControl: Sendable {
    enum Request: UInt8 {
        case none = 0
        case pause = 1
        case stop = 2
    }

    enum Phase {
        case created, starting, running, paused, stopping, exited
    }

    struct State {
        var phase = Phase.created
        var request = Request.none
        var total = 0
        /// Per vCPU: its thread (once started) and its handle (once created), for kicks.
        var threads: [pthread_t?] = []
        /// Per vCPU: its kernel thread id once started (QMP query-cpus).
        var threadIDs: [Int32?] = []
        var vcpus: [VirtualCPU?] = []
        /// A thread is live from registration until it ends; only live threads get signals.
        var live: [Bool] = []
        var ready = 0
        var setupFailure: String? = nil
        var go = false
        var parked = 0
        var exited = 0
        var reason: VMExitReason? = nil
        var finished = false

        var liveCount: Int { live.count { $0 } }
    }

    /// Mirrors `State.request` for the vCPU loop's lock-free check before each KVM_RUN.
    let pending = Atomic<UInt8>(0)
    let lock = ConditionLock(State())
    let exitEventFD: Int32

    init() throws {
        let fd = fl_eventfd(0, 1)
        guard fd >= 0 else {
            throw MachineError(
                .startFailed, "cannot create the VM exit eventfd", cause: SyscallError("eventfd", .init(rawValue: Glibc.errno)))
        }
        exitEventFD = fd
    }

    deinit { Syscall.close(exitEventFD) }

    // MARK: Called with the lock held

    private func setRequest(_ request: Request, in state: inout State) {
        state.request = request
        pending.store(request.rawValue, ordering: .sequentiallyConsistent)
    }

    /// Kicks every live vCPU out of KVM_RUN: immediate_exit makes a KVM_RUN that has not
    /// started yet return at once, the signal interrupts one in progress (api.rst,
    /// "immediate_exit"). The request must be published before this.
    private func kickAll(_ state: State) {
        for index in 0..<state.total where state.live[index] {
            state.vcpus[index]?.setImmediateExit(true)
            if let thread = state.threads[index] {
                _ = pthread_kill(thread, NativeThread.kickSignal)
            }
        }
    }

    // MARK: Owner side

    func prepare(vcpus: Int) {
        lock.withLock { s in
            s.total = vcpus
            s.threads = Array(repeating: nil, count: vcpus)
            s.threadIDs = Array(repeating: nil, count: vcpus)
            s.vcpus = Array(repeating: nil, count: vcpus)
            s.live = Array(repeating: false, count: vcpus)
            s.phase = .starting
        }
    }

    /// Waits for every vCPU thread to finish set-up; releases them all, or returns the first
    /// set-up failure (after stopping the rest).
    func awaitReadyAndGo() -> String? {
        let failure = lock.wait(until: { $0.ready + $0.exited >= $0.total || $0.setupFailure != nil }) { s -> String? in
            if let failure = s.setupFailure {
                if s.reason == nil { s.reason = .failed(failure) }
                setRequest(.stop, in: &s)
                s.phase = .stopping
                kickAll(s)
                return failure
            }
            s.go = true
            if s.phase == .starting { s.phase = .running }
            return nil
        }
        lock.broadcast()
        return failure
    }

    /// Asks every vCPU to park and returns once all live ones are parked (or the VM ended).
    func pause() throws {
        try lock.withLock { s in
            switch s.phase {
            case .running: break
            case .paused: return
            default: throw MachineError(.state, "cannot pause: the VM is \(s.phase)")
            }
            setRequest(.pause, in: &s)
            kickAll(s)
        }
        lock.wait(until: { $0.finished || $0.request != .pause || $0.parked >= $0.liveCount }) { s in
            if !s.finished, s.request == .pause { s.phase = .paused }
        }
    }

    func resume() throws {
        try lock.withLock { s in
            switch s.phase {
            case .paused: break
            case .running: return
            default: throw MachineError(.state, "cannot resume: the VM is \(s.phase)")
            }
            setRequest(.none, in: &s)
            s.phase = .running
        }
        lock.broadcast()
    }

    /// Ends the VM: the first reason recorded wins.
    func stop(_ reason: VMExitReason) {
        lock.withLock { s in
            if s.reason == nil { s.reason = reason }
            guard !s.finished else { return }
            setRequest(.stop, in: &s)
            if s.phase != .exited { s.phase = .stopping }
            kickAll(s)
            if s.phase == .created || s.total == 0 { finish(&s) }
        }
        lock.broadcast()
    }

    var guestState: GuestState {
        lock.withLock { s in
            switch s.phase {
            case .created, .starting: .prelaunch
            case .running: .running
            case .paused: .paused
            case .stopping, .exited: .shutdown
            }
        }
    }

    /// Each vCPU's kernel thread id, nil before its thread started.
    var threadIDs: [Int32?] {
        lock.withLock { $0.threadIDs }
    }

    var reason: VMExitReason? {
        lock.withLock { $0.finished ? $0.reason : nil }
    }

    func waitForExit() -> VMExitReason {
        lock.wait(until: { $0.finished }) { $0.reason ?? .requested }
    }

    func waitForExit(timeoutNanoseconds: UInt64) -> VMExitReason? {
        lock.wait(until: { $0.finished }, timeoutNanoseconds: timeoutNanoseconds) { $0.reason ?? .requested }
    }

    private func finish(_ s: inout State) {
        s.finished = true
        s.phase = .exited
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { try? Syscall.writeAll(exitEventFD, $0) }
    }

    // MARK: vCPU thread side

    func registerThread(_ index: Int) {
        let threadID = fl_current_thread_id()
        lock.withLock { s in
            s.threads[index] = pthread_self()
            s.threadIDs[index] = threadID
            s.live[index] = true
        }
    }

    func registerVCPU(_ vcpu: VirtualCPU) {
        lock.withLock { s in s.vcpus[vcpu.index] = vcpu }
    }

    /// Reports set-up done (or failed) and blocks until the VM starts; false = do not run.
    func reportReadyAndWait(_ index: Int, failure: String?) -> Bool {
        lock.withLock { s in
            if let failure {
                if s.setupFailure == nil { s.setupFailure = failure }
            } else {
                s.ready += 1
            }
        }
        lock.broadcast()
        if failure != nil { return false }
        return lock.wait(until: { $0.go || $0.request == .stop }) { s in s.request != .stop }
    }

    /// Called by a vCPU loop that saw a pending request: parks while paused. Returns true
    /// when the vCPU must exit.
    func parkIfRequested() -> Bool {
        var parked = false
        lock.withLock { s in
            if s.request == .pause {
                s.parked += 1
                parked = true
            }
        }
        if parked { lock.broadcast() }
        return lock.wait(until: { $0.request != .pause }) { s in
            if parked { s.parked -= 1 }
            return s.request == .stop
        }
    }

    /// A vCPU thread ends. Any end other than an answered stop request ends the whole VM.
    func vcpuExited(_ index: Int, reason: VMExitReason?) {
        lock.withLock { s in
            s.live[index] = false
            s.exited += 1
            if let reason {
                if s.reason == nil { s.reason = reason }
                if s.request != .stop {
                    setRequest(.stop, in: &s)
                    s.phase = .stopping
                    kickAll(s)
                }
            }
            if s.exited >= s.total { finish(&s) }
        }
        lock.broadcast()
    }
}
