import CLinux
import Glibc
import Synchronization

/// Fleet-store writes (temporary file, fsync, rename, fsync of the directory) on a dedicated
/// thread, so fsync never stalls the reactor: QMP multiplexing and the control API keep
/// flowing while the disk catches up.
///
/// Jobs run one at a time in the order they were submitted (so two writes of one document
/// land in order), and each job's completion runs on the reactor thread once the write is
/// durable or has failed; callers answer their client only then. The thread blocks every
/// signal, so signals stay with flotillad's signalfd.
final class StoreWriter {
    enum Job: Sendable {
        case save(VMRecord)
        case delete(String)
    }

    typealias Completion = (Result<Void, SystemCallError>) -> Void

    /// What the writer thread and the reactor share.
    private final class Shared: Sendable {
        struct Queues {
            var jobs: [(id: UInt64, job: Job)] = []
            var finished: [(id: UInt64, result: Result<Void, SystemCallError>)] = []
        }

        let store: FleetStore
        /// Blocking eventfd: the writer thread sleeps on it until jobs arrive.
        let wakeFD: Int32
        /// Non-blocking eventfd on the reactor: completions are ready.
        let doneFD: Int32
        let queues = Mutex(Queues())

        init(store: FleetStore, wakeFD: Int32, doneFD: Int32) {
            self.store = store
            self.wakeFD = wakeFD
            self.doneFD = doneFD
        }

        func signal(_ fd: Int32) {
            var one: UInt64 = 1
            _ = withUnsafeBytes(of: &one) { Glibc.write(fd, $0.baseAddress, 8) }
        }

        /// The writer thread's body: runs forever (flotillad exits with it idle).
        func serve() {
            var all = sigset_t()
            sigfillset(&all)
            pthread_sigmask(SIG_BLOCK, &all, nil)
            _ = fl_set_current_thread_name("store-writer")
            while true {
                var value: UInt64 = 0
                let count = withUnsafeMutableBytes(of: &value) { Glibc.read(wakeFD, $0.baseAddress, 8) }
                if count < 0 && errno == EINTR { continue }
                while let next = queues.withLock({ $0.jobs.isEmpty ? nil : $0.jobs.removeFirst() }) {
                    let result: Result<Void, SystemCallError>
                    do {
                        switch next.job {
                        case .save(let record): try store.save(record)
                        case .delete(let name): try store.delete(name)
                        }
                        result = .success(())
                    } catch {
                        result = .failure(error)
                    }
                    queues.withLock { $0.finished.append((next.id, result)) }
                    signal(doneFD)
                }
            }
        }
    }

    private let shared: Shared
    private let reactor: Reactor
    private var token: Reactor.Token?
    private var waiting: [UInt64: Completion] = [:]
    private var idleWaiters: [() -> Void] = []
    private var nextID: UInt64 = 1
    private var started = false

    init(store: FleetStore, reactor: Reactor) throws(SystemCallError) {
        self.reactor = reactor
        let wakeFD = try Sys.once("eventfd") { fl_eventfd(0, 0) }
        let doneFD: Int32
        do {
            doneFD = try Sys.once("eventfd") { fl_eventfd(0, 1) }
        } catch {
            Sys.close(wakeFD)
            throw error
        }
        shared = Shared(store: store, wakeFD: wakeFD, doneFD: doneFD)
        do {
            token = try reactor.add(fd: doneFD, events: EPOLLIN.rawValue) { [weak self] _ in self?.collect() }
        } catch {
            Sys.close(wakeFD)
            Sys.close(doneFD)
            throw error
        }
    }

    /// Starts the thread; call once flotillad's signals are blocked (the thread blocks them
    /// too, but would otherwise inherit an open mask for a moment).
    func start() throws(SystemCallError) {
        guard !started else { return }
        var thread = pthread_t()
        let box = Unmanaged.passRetained(shared)
        let code = pthread_create(
            &thread, nil,
            { raw in
                guard let raw else { return nil }
                let shared = Unmanaged<Shared>.fromOpaque(raw).takeRetainedValue()
                shared.serve()
                return nil
            }, box.toOpaque())
        guard code == 0 else {
            box.release()
            throw SystemCallError("pthread_create (fleet-store writer)", .init(rawValue: code))
        }
        pthread_detach(thread)
        started = true
    }

    /// Whether any write is still under way.
    var isBusy: Bool { !waiting.isEmpty }

    /// Queues `job`; `done` runs on the reactor once it is durable (or failed).
    func submit(_ job: Job, done: @escaping Completion) {
        let id = nextID
        nextID += 1
        waiting[id] = done
        shared.queues.withLock { $0.jobs.append((id, job)) }
        shared.signal(shared.wakeFD)
    }

    /// Runs `action` once no write is under way (at once when none is).
    func whenIdle(_ action: @escaping () -> Void) {
        if waiting.isEmpty {
            action()
        } else {
            idleWaiters.append(action)
        }
    }

    private func collect() {
        var value: UInt64 = 0
        _ = withUnsafeMutableBytes(of: &value) { Glibc.read(shared.doneFD, $0.baseAddress, 8) }
        let finished = shared.queues.withLock { queues in
            defer { queues.finished.removeAll() }
            return queues.finished
        }
        for (id, result) in finished {
            waiting.removeValue(forKey: id)?(result)
        }
        if waiting.isEmpty && !idleWaiters.isEmpty {
            let actions = idleWaiters
            idleWaiters.removeAll()
            for action in actions { action() }
        }
    }
}
