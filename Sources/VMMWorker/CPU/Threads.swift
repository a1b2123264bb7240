import CLinux
import Glibc

/// A mutex with a condition variable guarding a value, for the few places that must block
/// (parking vCPUs, waiting for the VM to end). `Synchronization.Mutex` has no condition
/// variable, so this wraps pthread's.
///
/// `@unchecked Sendable`: `value` is read and written only between pthread_mutex_lock and
/// pthread_mutex_unlock of `mutex` (inside ``withLock(_:)`` and ``wait(until:)``); the
/// pthread objects live in heap memory that is never moved and is freed only in `deinit`.
final class ConditionLock<Value>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    private var value: Value

    init(_ initial: Value) {
        value = initial
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        condition = .allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }

    /// Wakes every waiter; call after changing the value.
    func broadcast() {
        pthread_cond_broadcast(condition)
    }

    /// Wakes one waiter (when any one of them can take what changed, such as a queued job).
    func signal() {
        pthread_cond_signal(condition)
    }

    /// Blocks until `predicate` holds, then runs `body` with the lock still held.
    func wait<R>(until predicate: (Value) -> Bool, then body: (inout Value) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while !predicate(value) {
            pthread_cond_wait(condition, mutex)
        }
        return try body(&value)
    }

    /// Like ``wait(until:then:)`` but gives up after `nanoseconds`; returns nil on timeout.
    func wait<R>(until predicate: (Value) -> Bool, timeoutNanoseconds: UInt64, then body: (inout Value) throws -> R) rethrows -> R? {
        var deadline = timespec()
        clock_gettime(CLOCK_MONOTONIC, &deadline)
        let total = UInt64(deadline.tv_nsec) + timeoutNanoseconds % 1_000_000_000
        deadline.tv_sec += Int(timeoutNanoseconds / 1_000_000_000) + Int(total / 1_000_000_000)
        deadline.tv_nsec = Int(total % 1_000_000_000)
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while !predicate(value) {
            if pthread_cond_timedwait(condition, mutex, &deadline) == ETIMEDOUT {
                if predicate(value) { break }
                return nil
            }
        }
        return try body(&value)
    }
}

/// Dedicated native threads for blocking work (KVM_RUN): not Dispatch, not the Swift
/// concurrency pool.
enum NativeThread {
    /// Starts a detached pthread named `name` (truncated to the kernel's 15 bytes).
    static func spawn(name: String, _ body: @escaping @Sendable () -> Void) throws {
        let thread: pthread_t
        do {
            thread = try HostThread.spawn(name: name, body)
        } catch {
            throw CPUError(.thread, "cannot start thread \(name)", cause: error)
        }
        pthread_detach(thread)
    }

    /// The kick signal (SIGRTMIN) with a do-nothing handler installed once per process,
    /// without SA_RESTART so that KVM_RUN returns EINTR.
    static let kickSignal: Int32 = {
        let signal = fl_kick_signal()
        _ = fl_install_noop_handler(signal)
        return signal
    }()

    /// The vCPU thread-name convention `<vmname>-vcpu<N>`; the kernel keeps 15 bytes.
    static func vcpuThreadName(vmName: String, index: Int) -> String {
        threadName(vmName: vmName, suffix: "vcpu\(index)")
    }

    /// `<vmname>-<suffix>`, the VM name cut so that the whole fits the kernel's 15 bytes.
    static func threadName(vmName: String, suffix: String) -> String {
        let suffix = "-" + suffix
        let room = max(0, 15 - suffix.utf8.count)
        var prefix = ""
        for character in vmName {
            if prefix.utf8.count + character.utf8.count > room { break }
            prefix.append(character)
        }
        return prefix + suffix
    }
}
