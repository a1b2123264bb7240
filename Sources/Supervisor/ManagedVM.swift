import Glibc
import Protocol

/// A VM's state as the control API reports it.
public enum VMState: String, Sendable, CaseIterable {
    case stopped, starting, running, paused, stopping, failed
}

/// One VM of the fleet at run time: its record, its worker (process, QMP), its
/// timers and whoever waits for it. Confined to the reactor thread.
final class ManagedVM {
    enum Intent {
        case none
        /// A stop was requested; `then` runs once the worker is gone.
        case stop
    }

    var record: VMRecord
    let directory: String
    var state = VMState.stopped

    /// The worker's readiness pipe while it starts: set from the spawn until the worker
    /// reports ready (`R`) or fails.
    var readiness: ReadinessPipe?
    /// The worker, the VM's process (spawned or adopted), until it ends.
    var worker: ProcessWatch?
    /// A worker that closed its readiness pipe without `R` is killed if it lingers.
    var startFailureTimer: Reactor.Timer?
    /// The readiness pipe closed without `R`; the worker's exit finishes the failed start.
    var pendingStartFailure: ReadinessPipe.Outcome?
    var adopted = false
    /// Kills a worker that is not QMP-ready within the start timeout.
    var startTimeoutTimer: Reactor.Timer?
    /// Set when the start timeout killed the worker: why, for its exit's reason.
    var startTimeoutReason: String?
    /// vm-delete is under way (stopping the worker, removing the document).
    var deleting = false
    var qmp: WorkerQMPConnection?
    var multiplexer: QMPMultiplexer?

    var startedAt: Double?
    var restartCount = 0
    var lastExit: String?
    /// Monotonic times of unexpected exits, for the crash-loop limit.
    var failureTimes: [Double] = []
    var restartTimer: Reactor.Timer?
    var stopTimers: [Reactor.Timer] = []
    /// The stop steps taken so far (quit, SIGTERM, SIGKILL).
    var stopSteps: [String] = []
    var intent = Intent.none
    /// The SHUTDOWN event's reason, when the worker sent one before ending.
    var shutdownReason: String?

    var startWaiters: [(Result<Void, SupervisorError>) -> Void] = []
    var stopWaiters: [() -> Void] = []

    init(record: VMRecord, runtimeDirectory: String) {
        self.record = record
        directory = "\(runtimeDirectory)/vms/\(record.name)"
    }

    var name: String { record.name }
    var pid: pid_t? { worker?.pid }
    var apiSocket: String { directory + "/api.sock" }
    /// The guest's serial console, served by the worker itself (`-serial unix:...`).
    var consoleSocket: String { directory + "/console.sock" }
    var qmpSocket: String { directory + "/qmp.sock" }
    var pidfile: String { directory + "/pid" }
    var logFile: String { directory + "/vm.log" }
    var launchLog: String { directory + "/launch.log" }
    var configFile: String { directory + "/config.json" }

    /// The longest runtime path of a VM (its sockets) must fit a Unix socket address.
    static func checkPaths(runtimeDirectory: String, name: String) throws(SupervisorError) {
        let longest = "\(runtimeDirectory)/vms/\(name)/console.sock"
        if longest.utf8.count > UnixSocket.maximumPathLength {
            throw SupervisorError(
                .invalidArgument,
                "'name' '\(name)' makes the socket path \(longest) \(longest.utf8.count) bytes long; "
                    + "allowed: at most \(UnixSocket.maximumPathLength) (use a shorter name or --runtime-dir)")
        }
    }

    var status: JSONValue {
        var object: JSONObject = [
            "name": .string(name),
            "state": .string(state.rawValue),
            "pid": pid.map { .integer($0) } ?? .null,
            "uptime": .null,
            "restart_count": .integer(restartCount),
            "last_exit": lastExit.map { .string($0) } ?? .null,
            "restart": .string(record.restart.rawValue),
            "autostart": .bool(record.autostart),
            "qmp_socket": multiplexer == nil ? .null : .string(qmpSocket),
            "console_socket": worker == nil ? .null : .string(consoleSocket),
            "log": .string(logFile),
            "adopted": .bool(adopted),
        ]
        if let startedAt, state == .running || state == .paused || state == .stopping {
            object["uptime"] = .integer(max(0, Int64(Sys.wallNow() - startedAt)))
        }
        return .object(object)
    }

    func resolveStart(_ result: Result<Void, SupervisorError>) {
        let waiters = startWaiters
        startWaiters.removeAll()
        for waiter in waiters { waiter(result) }
    }

    func resolveStop() {
        let waiters = stopWaiters
        stopWaiters.removeAll()
        for waiter in waiters { waiter() }
    }
}
