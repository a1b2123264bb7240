import Glibc
import Synchronization

/// A small fixed set of named threads for blocking system calls (disk I/O with O_DIRECT,
/// fdatasync, fallocate) on behalf of the devices an event loop serves, so that several
/// requests of one queue can be in flight at once (QEMU's aio=threads) without blocking the
/// loop. Jobs run in submission order as threads become free; they do only the system call
/// and hand the result back to the loop (``EventLoop/execute(_:)``), which alone owns the
/// queues.
///
/// The threads are created with the pool, before the seccomp filter (which allows no clone),
/// and end in ``shutdown()``.
public final class IOWorkerPool: Sendable {
    public typealias Job = @Sendable () -> Void

    private struct Queue {
        var jobs: [Job] = []
        /// Index of the next job to run in `jobs` (taken jobs are dropped in bulk).
        var next = 0
        var stopping = false
        var isEmpty: Bool { next == jobs.count }
    }

    public let name: String
    public let threadCount: Int
    private let queue = ConditionLock(Queue())
    private let threads = Mutex<[pthread_t]>([])

    /// Starts `threads` threads named `<name>-io0`, `<name>-io1`, … (`<name>` cut to fit the
    /// kernel's 15 bytes).
    public init(name: String, threads count: Int) throws(SyscallError) {
        self.name = name
        threadCount = count
        for index in 0..<count {
            do {
                // The suffix survives the kernel's 15-byte limit: the loop's name is cut instead.
                let suffix = "-io\(index)"
                let thread = try HostThread.spawn(name: String(name.utf8.prefix(15 - suffix.utf8.count)).map { $0 + suffix } ?? suffix) {
                    [self] in work()
                }
                threads.withLock { $0.append(thread) }
            } catch {
                shutdown()
                throw error
            }
        }
    }

    /// Runs `job` on a pool thread soon.
    public func submit(_ job: @escaping Job) {
        queue.withLock { $0.jobs.append(job) }
        queue.signal()
    }

    /// Lets the threads finish the queued jobs, then ends and joins them. Idempotent.
    public func shutdown() {
        queue.withLock { $0.stopping = true }
        queue.broadcast()
        for thread in threads.withLock({ list in
            defer { list = [] }
            return list
        }) { HostThread.join(thread) }
    }

    private func work() {
        while true {
            let job: Job? = queue.wait(until: { !$0.isEmpty || $0.stopping }) { queue in
                guard !queue.isEmpty else { return nil }
                let job = queue.jobs[queue.next]
                queue.next += 1
                if queue.isEmpty {
                    // Keeps the array's storage: no allocation once it has grown.
                    queue.jobs.removeAll(keepingCapacity: true)
                    queue.next = 0
                } else if queue.next >= 64 && queue.next * 2 >= queue.jobs.count {
                    // Never empty under a steady stream: drop the taken half now and then.
                    queue.jobs.removeFirst(queue.next)
                    queue.next = 0
                }
                return job
            }
            guard let job else { return }
            job()
        }
    }
}
