import CLinux
import Glibc
import Protocol

/// flotillad: owns the fleet, one flotilla-vmm worker per running VM, their QMP
/// multiplexers, the control socket, and the conversation with systemd. Everything runs on
/// the reactor's thread.
public final class Supervisor {
    public struct Options: Sendable {
        public var runtimeDirectory: String
        public var stateDirectory: String
        public var configDirectory: String?
        /// The flotilla-vmm executable.
        public var vmmPath: String
        /// Seconds between the stop steps: QMP quit, SIGTERM, SIGKILL.
        public var stopTimeout: Double = 10
        /// First restart delay; doubled for each recent failure up to `restartDelayMax`.
        public var restartDelay: Double = 1
        public var restartDelayMax: Double = 60
        /// More than this many unexpected exits within `crashLoopWindow` seconds mark a VM failed.
        public var crashLoopLimit: Int = 5
        public var crashLoopWindow: Double = 300
        /// Stop every VM when flotillad itself is told to stop (default: leave them running,
        /// to be re-attached by the next flotillad).
        public var stopVMsOnExit = false
        /// Seconds a starting worker has to become QMP-ready (readiness reported, greeting
        /// and first reply through its api-channel) before it is killed as a failed start.
        public var startTimeout: Double = 30
        /// Pass each client of `<vm>/qmp.sock` to the worker (QMP getfd + add_client) instead
        /// of multiplexing it: native round trips, clients that outlive flotillad, but
        /// flotillad no longer sees their commands (flotillad --qmp-handoff).
        public var qmpHandoff = false

        public init(runtimeDirectory: String, stateDirectory: String, configDirectory: String?, vmmPath: String) {
            self.runtimeDirectory = runtimeDirectory
            self.stateDirectory = stateDirectory
            self.configDirectory = configDirectory
            self.vmmPath = vmmPath
        }
    }

    public let options: Options
    let reactor: Reactor
    let log: SupervisorLog
    private let store: FleetStore
    /// Fleet-store writes run on their own thread (fsync off the reactor).
    private let writer: StoreWriter
    /// Names whose vm-create is being written; taken, though not yet in `vms`.
    private var creating: Set<String> = []
    var vms: [String: ManagedVM] = [:]
    private var control: ControlServer?
    private var reattachPending = 0
    private var ready = false
    private var shuttingDown = false
    private var lastStatus = ""

    public var controlSocketPath: String { options.runtimeDirectory + "/control.sock" }

    public init(options: Options, reactor: Reactor, log: SupervisorLog) throws(SystemCallError) {
        self.options = options
        self.reactor = reactor
        self.log = log
        try Sys.makeDirectories(options.runtimeDirectory + "/vms", mode: 0o755)
        store = try FleetStore(stateDirectory: options.stateDirectory)
        writer = try StoreWriter(store: store, reactor: reactor)
    }

    // MARK: - Start-up

    /// Loads the fleet, re-attaches running workers, binds the control socket; READY=1 follows
    /// once every re-attachment has finished.
    public func start() throws(SupervisorError) {
        if fl_become_child_subreaper() != 0 {
            log.log(.warning, "cannot become a child subreaper (\(Sys.errorText(errno))); exit statuses of workers will be unknown")
        }
        do {
            try writer.start()
        } catch {
            throw SupervisorError(.failed, "cannot start the fleet-store writer: \(error)")
        }
        let loaded = store.load()
        for problem in loaded.problems { log.log(.error, "fleet store: \(problem)") }
        for record in loaded.records { vms[record.name] = ManagedVM(record: record, runtimeDirectory: options.runtimeDirectory) }
        if let directory = options.configDirectory { importConfigDirectory(directory) }

        var toStart: [ManagedVM] = []
        for name in vms.keys.sorted() {
            guard let vm = vms[name] else { continue }
            switch reattach(vm) {
            case .adopted: break
            case .stale: handleUnexpectedExit(vm, reason: "the worker ended while flotillad was not running", failure: true)
            case .none: if vm.record.autostart { toStart.append(vm) }
            }
        }
        let activated = try SocketActivation.controlSocket(expectedPath: controlSocketPath)
        do {
            control = try ControlServer(path: controlSocketPath, activatedFD: activated, supervisor: self)
        } catch {
            throw SupervisorError(.failed, "cannot listen on \(controlSocketPath): \(error)")
        }
        if activated != nil {
            log.log(.info, "control socket \(controlSocketPath) taken from the service manager (socket activation)")
        }
        for vm in toStart { startWorker(vm) }
        startWatchdog()
        checkReady()
    }

    private func importConfigDirectory(_ directory: String) {
        guard let handle = opendir(directory) else {
            log.log(.error, "--config-dir \(directory): \(Sys.errorText(errno))")
            return
        }
        var files: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name.hasSuffix(".json") && !name.hasPrefix(".") { files.append(name) }
        }
        closedir(handle)
        for file in files.sorted() {
            let path = "\(directory)/\(file)"
            do {
                guard let bytes = Sys.readFile(path) else { throw SupervisorError(.failed, "\(path): \(Sys.errorText(errno))") }
                let value: JSONValue
                do {
                    value = try JSONValue.parse(bytes: bytes)
                } catch {
                    throw SupervisorError(.invalidArgument, "\(path): \(error)")
                }
                let name = value.objectValue?["name"]?.stringValue ?? String(file.dropLast(5))
                guard vms[name] == nil else { continue }
                var record = try VMRecord(document: resolvingKernelPath(value, against: directory), name: name, source: path)
                record.name = name
                try ManagedVM.checkPaths(runtimeDirectory: options.runtimeDirectory, name: name)
                try saveRecord(record)
                vms[name] = ManagedVM(record: record, runtimeDirectory: options.runtimeDirectory)
                log.log(.info, "created VM \(name) from \(path)", fields: ["VM_NAME": name, "FLOTILLA_EVENT": "vm-created"])
            } catch {
                log.log(.error, "--config-dir: \(error)")
            }
        }
    }

    /// Relative image paths in a config-dir document are relative to that directory.
    private func resolvingKernelPath(_ value: JSONValue, against directory: String) -> JSONValue {
        guard var root = value.objectValue, var boot = root["boot-source"]?.objectValue else { return value }
        for key in ["kernel_image_path", "initrd_fs_path"] {
            if let path = boot[key]?.stringValue, !path.isEmpty, !path.hasPrefix("/") {
                boot[key] = .string(directory + "/" + path)
            }
        }
        root["boot-source"] = .object(boot)
        return .object(root)
    }

    private func saveRecord(_ record: VMRecord) throws(SupervisorError) {
        do {
            try store.save(record)
        } catch {
            throw SupervisorError(.failed, "cannot store VM \(record.name): \(error)")
        }
    }

    // MARK: - Re-attach

    private enum Reattach {
        case adopted
        case stale
        case none
    }

    /// Takes back a worker that an earlier flotillad started: its pidfile must be locked by
    /// the very pid it records (F_GETLK), so a reused pid is never adopted.
    private func reattach(_ vm: ManagedVM) -> Reattach {
        guard let finding = PidfileProbe.probe(vm.pidfile) else {
            cleanRuntimeFiles(vm)
            return .none
        }
        guard finding.isLive, let pid = finding.recordedPID else {
            log.log(
                .warning,
                "stale pidfile \(vm.pidfile) (pid \(finding.recordedPID.map(String.init) ?? "unreadable"), "
                    + "lock held by \(finding.lockHolder.map(String.init) ?? "nobody")); not adopted",
                fields: ["VM_NAME": vm.name, "FLOTILLA_EVENT": "stale-pidfile"])
            cleanRuntimeFiles(vm)
            return .stale
        }
        let watch: ProcessWatch
        do {
            watch = try ProcessWatch(pid: pid, reactor: reactor) { [weak self, weak vm] exit in
                guard let self, let vm else { return }
                self.workerEnded(vm, exit)
            }
        } catch {
            log.log(.error, "cannot watch worker \(pid): \(error)", fields: ["VM_NAME": vm.name, "VM_PID": "\(pid)"])
            cleanRuntimeFiles(vm)
            return .stale
        }
        // The pidfd was opened after the lock check: check again, so the pidfd surely names
        // the lock holder and not a process that took over a freed pid in between.
        guard PidfileProbe.probe(vm.pidfile)?.lockHolder == pid else {
            cleanRuntimeFiles(vm)
            return .stale
        }
        vm.worker = watch
        vm.adopted = true
        vm.state = .starting
        vm.startedAt = processStartTime(pid)
        reattachPending += 1
        log.log(
            .info, "re-attaching to running worker \(pid) (\(PidfileProbe.executable(of: pid) ?? "?"))",
            fields: ["VM_NAME": vm.name, "VM_PID": "\(pid)", "FLOTILLA_EVENT": "vm-reattach"])
        connectQMP(vm) { [weak self] result in
            guard let self else { return }
            self.reattachPending -= 1
            if case .failure(let error) = result {
                self.log.log(.error, "re-attached worker's QMP: \(error)", fields: ["VM_NAME": vm.name, "VM_PID": "\(pid)"])
            }
            self.checkReady()
        }
        return .adopted
    }

    /// The wall-clock time a process started, from /proc (for uptimes of adopted workers).
    private func processStartTime(_ pid: pid_t) -> Double? {
        guard let stat = Sys.readFile("/proc/\(pid)/stat"), let uptimeText = Sys.readFile("/proc/uptime") else { return nil }
        let text = String(decoding: stat, as: UTF8.self)
        guard let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // Field 22 (starttime) is the 20th after the command name.
        guard fields.count > 19, let ticks = Double(fields[19]) else { return nil }
        guard let uptime = Double(String(decoding: uptimeText, as: UTF8.self).split(separator: " ").first ?? "") else { return nil }
        let hertz = Double(sysconf(Int32(_SC_CLK_TCK)))
        return Sys.wallNow() - (uptime - ticks / hertz)
    }

    private func checkReady() {
        guard !ready, reattachPending == 0, control != nil else { return }
        ready = true
        ServiceNotifier.notify("READY=1\nSTATUS=\(fleetSummary)")
        lastStatus = fleetSummary
        log.log(.notice, "ready: \(fleetSummary)", fields: ["FLOTILLA_EVENT": "ready"])
    }

    // MARK: - Workers

    private func cleanRuntimeFiles(_ vm: ManagedVM) {
        for path in [vm.apiSocket, vm.qmpSocket, vm.consoleSocket, vm.configFile] { Sys.unlinkIfPresent(path) }
        // Never remove a pidfile that a live process still holds.
        if let finding = PidfileProbe.probe(vm.pidfile), finding.lockHolder == nil { Sys.unlinkIfPresent(vm.pidfile) }
    }

    /// Spawns the VM's worker as the daemon itself: `flotilla-vmm -daemonize` with
    /// `FLOTILLA_DAEMON_READY_FD=3` skips its re-exec, runs the VM in this one process (a new
    /// session leader, our child), creates and locks its pidfile, and writes `R` to descriptor 3
    /// once the VM runs and the api-channel accepts (an error message otherwise, then exits).
    func startWorker(_ vm: ManagedVM) {
        reactor.cancel(vm.restartTimer)
        vm.restartTimer = nil
        vm.state = .starting
        vm.adopted = false
        vm.shutdownReason = nil
        vm.stopSteps = []
        reportStatus()
        do throws(SupervisorError) {
            do {
                try Sys.makeDirectories(vm.directory, mode: 0o750)
            } catch {
                throw SupervisorError(.failed, "cannot create \(vm.directory): \(error)")
            }
            cleanRuntimeFiles(vm)
            if PidfileProbe.probe(vm.pidfile) != nil {
                throw SupervisorError(.failed, "\(vm.pidfile) is held by a live process; not starting a second worker")
            }
            let config = Array((vm.record.config.jsonValue.prettyText() + "\n").utf8)
            let fd = open(vm.configFile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw SupervisorError(.failed, "cannot write \(vm.configFile): \(Sys.errorText(errno))") }
            do {
                try Sys.writeAll(fd, config)
            } catch {
                Sys.close(fd)
                throw SupervisorError(.failed, "cannot write \(vm.configFile): \(error)")
            }
            Sys.close(fd)
            let output = open(vm.launchLog, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o640)
            guard output >= 0 else { throw SupervisorError(.failed, "cannot open \(vm.launchLog): \(Sys.errorText(errno))") }
            defer { Sys.close(output) }
            let readiness: ReadinessPipe
            let writeEnd: Int32
            do {
                (readiness, writeEnd) = try ReadinessPipe.make(reactor: reactor) { [weak self, weak vm] outcome in
                    guard let self, let vm else { return }
                    self.readinessReported(vm, outcome)
                }
            } catch {
                throw SupervisorError(.failed, "cannot create a readiness pipe: \(error)")
            }
            let arguments = [
                "flotilla-vmm", "-config", vm.configFile, "-api-channel", "unix:\(vm.apiSocket)", "-daemonize",
                "-pidfile", vm.pidfile, "-D", vm.logFile, "-serial", "unix:\(vm.consoleSocket),server,nowait",
            ]
            let pid: pid_t
            do {
                defer { Sys.close(writeEnd) }
                pid = try Spawner.spawn(
                    path: options.vmmPath, arguments: arguments, outputFD: output, extraFDs: [writeEnd],
                    environment: [Self.readinessVariable + "=3"])
            } catch {
                readiness.close()
                throw SupervisorError(.failed, "cannot start \(options.vmmPath): \(error)")
            }
            do {
                // Our child: its pid cannot be reused before we reap it through this pidfd.
                vm.worker = try ProcessWatch(pid: pid, reactor: reactor) { [weak self, weak vm] exit in
                    guard let self, let vm else { return }
                    self.workerEnded(vm, exit)
                }
            } catch {
                readiness.close()
                kill(pid, SIGKILL)
                throw SupervisorError(.failed, "cannot watch \(options.vmmPath) (pid \(pid)): \(error)")
            }
            vm.readiness = readiness
            armStartTimeout(vm, pid: pid)
        } catch {
            vm.resolveStart(.failure(error))
            handleUnexpectedExit(vm, reason: error.message, failure: true)
        }
    }

    /// A worker not QMP-ready within `startTimeout` is killed; its exit then goes through the
    /// failed-start path and the restart policy, with the timeout as the reason.
    private func armStartTimeout(_ vm: ManagedVM, pid: pid_t) {
        reactor.cancel(vm.startTimeoutTimer)
        vm.startTimeoutReason = nil
        let timeout = options.startTimeout
        vm.startTimeoutTimer = reactor.after(timeout) { [weak self, weak vm] in
            guard let self, let vm, let worker = vm.worker, worker.pid == pid else { return }
            vm.startTimeoutTimer = nil
            let reason = "start timed out: not QMP-ready within \(Self.seconds(timeout)) s (--start-timeout); killed"
            vm.startTimeoutReason = reason
            self.log.log(
                .error, "VM \(vm.name) worker \(pid): \(reason)",
                fields: ["VM_NAME": vm.name, "VM_PID": "\(pid)", "FLOTILLA_EVENT": "vm-start-timeout"])
            worker.signal(SIGKILL)
        }
    }

    private func cancelStartTimeout(_ vm: ManagedVM) {
        reactor.cancel(vm.startTimeoutTimer)
        vm.startTimeoutTimer = nil
    }

    static func seconds(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : String(value)
    }

    /// flotilla-vmm's variable naming the readiness pipe (see VMMWorker's Daemon).
    static let readinessVariable = "FLOTILLA_DAEMON_READY_FD"

    /// The worker's word on its readiness pipe.
    private func readinessReported(_ vm: ManagedVM, _ outcome: ReadinessPipe.Outcome) {
        vm.readiness = nil
        guard let worker = vm.worker else { return }
        switch outcome {
        case .pending:
            return
        case .failed:
            // The worker says why and exits; its exit (workerEnded) reports the failure.
            // One that lingers anyway is ended, so the start cannot hang.
            let pid = worker.pid
            vm.startFailureTimer = reactor.after(options.stopTimeout) { [weak vm] in
                guard let vm, let worker = vm.worker, worker.pid == pid else { return }
                worker.signal(SIGKILL)
            }
            vm.pendingStartFailure = outcome
        case .ready:
            vm.startedAt = Sys.wallNow()
            log.log(
                .info, "started VM \(vm.name) (worker \(worker.pid))",
                fields: ["VM_NAME": vm.name, "VM_PID": "\(worker.pid)", "FLOTILLA_EVENT": "vm-started"])
            if case .stop = vm.intent {
                beginStopSteps(vm)
                return
            }
            connectQMP(vm) { _ in }
        }
    }

    /// A worker that ended before it reported ready: the VM did not start.
    private func startFailed(_ vm: ManagedVM, _ exit: ProcessExit, message: String) {
        let launchOutput = Sys.readFile(vm.launchLog).map { String(decoding: $0, as: UTF8.self) } ?? ""
        let output = (message + "\n" + launchOutput).trimmingCharactersInWhitespace()
        var reason = "flotilla-vmm \(exit)" + (output.isEmpty ? "" : ": \(output)")
        if let timeout = vm.startTimeoutReason {
            vm.startTimeoutReason = nil
            reason = "\(timeout) (\(reason))"
        }
        cleanRuntimeFiles(vm)
        vm.resolveStart(.failure(SupervisorError(.failed, "VM \(vm.name) did not start: \(reason)")))
        if case .stop = vm.intent {
            finishStop(vm, reason: reason)
        } else {
            handleUnexpectedExit(vm, reason: reason, failure: true)
        }
    }

    /// Connects flotillad's QMP connection to the worker, asks its status and opens the
    /// multiplexer; then the VM is running (or paused).
    private func connectQMP(_ vm: ManagedVM, done: @escaping (Result<Void, SupervisorError>) -> Void) {
        let finish: (Result<Void, SupervisorError>) -> Void = { [weak self, weak vm] result in
            guard let self, let vm else { return }
            self.cancelStartTimeout(vm)
            if let timeout = vm.startTimeoutReason {
                // The start timeout killed the worker, which closed its QMP connection.
                vm.resolveStart(.failure(SupervisorError(.failed, "VM \(vm.name): \(timeout)")))
                done(result)
                return
            }
            if case .failure = result, vm.worker != nil, vm.state == .starting {
                // The worker runs but its QMP is unusable: it is still the VM's process.
                vm.state = .running
            }
            vm.resolveStart(result.mapError { SupervisorError(.failed, "VM \(vm.name): \($0.message)") })
            self.reportStatus()
            done(result)
        }
        let connection: WorkerQMPConnection
        do {
            connection = try WorkerQMPConnection(path: vm.apiSocket, reactor: reactor) { [weak self, weak vm] result in
                guard let self, let vm else { return }
                switch result {
                case .failure(let error):
                    finish(.failure(error))
                case .success:
                    self.openMultiplexer(vm, finish: finish)
                }
            }
        } catch {
            finish(.failure(SupervisorError(.failed, "cannot connect to \(vm.apiSocket): \(error)")))
            return
        }
        connection.onClose = { [weak vm] in
            vm?.qmp = nil
            vm?.multiplexer?.close()
            vm?.multiplexer = nil
        }
        vm.qmp = connection
    }

    private func openMultiplexer(_ vm: ManagedVM, finish: @escaping (Result<Void, SupervisorError>) -> Void) {
        guard let connection = vm.qmp else { return }
        let multiplexer: QMPMultiplexer
        do {
            multiplexer = try QMPMultiplexer(path: vm.qmpSocket, worker: connection, reactor: reactor, handoff: options.qmpHandoff)
        } catch {
            finish(.failure(SupervisorError(.failed, "cannot listen on \(vm.qmpSocket): \(error)")))
            return
        }
        multiplexer.onEvent = { [weak self, weak vm] event in
            guard let self, let vm else { return }
            self.workerEvent(vm, event)
        }
        multiplexer.onHandoffFailure = { [weak self, weak vm] client, reply in
            guard let self, let vm else { return }
            let reason = reply["error"]?.objectValue?["desc"]?.stringValue ?? JSONValue.object(reply).compactText
            self.log.log(
                .warning, "VM \(vm.name): the worker refused QMP client \(client): \(reason)",
                fields: ["VM_NAME": vm.name, "VM_PID": "\(vm.pid ?? 0)", "FLOTILLA_EVENT": "qmp-handoff-failed"])
        }
        vm.multiplexer = multiplexer
        multiplexer.execute("query-status") { [weak vm] reply in
            guard let vm else { return }
            if vm.state == .starting {
                let status = reply["return"]?.objectValue?["status"]?.stringValue
                vm.state = status == "paused" ? .paused : .running
            }
            finish(.success(()))
        }
    }

    private func workerEvent(_ vm: ManagedVM, _ event: JSONObject) {
        guard let name = event["event"]?.stringValue else { return }
        var fields: KeyValuePairs<String, String> = ["VM_NAME": vm.name, "VM_PID": "\(vm.pid ?? 0)", "QMP_EVENT": name]
        switch name {
        case "STOP":
            if vm.state == .running { vm.state = .paused }
        case "RESUME":
            if vm.state == .paused { vm.state = .running }
        case "SHUTDOWN":
            let data = event["data"]?.objectValue
            let reason = data?["reason"]?.stringValue ?? "unknown"
            vm.shutdownReason = reason
            fields = ["VM_NAME": vm.name, "VM_PID": "\(vm.pid ?? 0)", "QMP_EVENT": name, "SHUTDOWN_REASON": reason]
        default:
            break
        }
        log.log(.info, "VM \(vm.name): QMP event \(name)", fields: fields)
        reportStatus()
    }

    private func workerEnded(_ vm: ManagedVM, _ exit: ProcessExit) {
        let pid = vm.worker?.pid ?? 0
        vm.worker = nil
        reactor.cancel(vm.startFailureTimer)
        vm.startFailureTimer = nil
        cancelStartTimeout(vm)
        if let readiness = vm.readiness {
            // The exit may be seen before the pipe's last words: read them now.
            vm.readiness = nil
            readiness.readAvailable(notify: false)
            readiness.close()
            if readiness.outcome != .ready {
                vm.pendingStartFailure = readiness.outcome
            }
        }
        if let failure = vm.pendingStartFailure {
            vm.pendingStartFailure = nil
            var message = ""
            if case .failed(let text) = failure { message = text }
            startFailed(vm, exit, message: message)
            return
        }
        vm.startedAt = nil
        vm.qmp?.close()
        vm.qmp = nil
        vm.multiplexer?.close()
        vm.multiplexer = nil
        for timer in vm.stopTimers { reactor.cancel(timer) }
        vm.stopTimers = []
        cleanRuntimeFiles(vm)
        var reason = exit.description
        if let shutdown = vm.shutdownReason { reason += " after SHUTDOWN (\(shutdown))" }
        if let timeout = vm.startTimeoutReason {
            vm.startTimeoutReason = nil
            reason = "\(timeout) (\(reason))"
        }
        if vm.stopSteps.count > 1 { reason += "; stop steps: " + vm.stopSteps.joined(separator: ", ") }
        var failure = exit.isFailure
        // An adopted worker's status is unknown; a SHUTDOWN event says it ended cleanly.
        if exit == .unknown, vm.shutdownReason != nil { failure = false }
        var fields: [(String, String)] = [("VM_NAME", vm.name), ("VM_PID", "\(pid)"), ("FLOTILLA_EVENT", "vm-exited")]
        switch exit {
        case .exited(let status): fields.append(("EXIT_STATUS", "\(status)"))
        case .signaled(let signal): fields.append(("EXIT_SIGNAL", ProcessExit.signalName(signal)))
        case .unknown: break
        }
        let priority: LogPriority = failure && vm.stopSteps.isEmpty ? .warning : .info
        logPairs(priority, "VM \(vm.name) worker \(pid) \(reason)", fields)
        vm.resolveStart(.failure(SupervisorError(.failed, "VM \(vm.name) worker \(reason)")))
        if case .stop = vm.intent {
            finishStop(vm, reason: reason)
        } else {
            handleUnexpectedExit(vm, reason: reason, failure: failure)
        }
    }

    func logPairs(_ priority: LogPriority, _ message: String, _ pairs: [(String, String)]) {
        // KeyValuePairs cannot be built from an array; the few shapes used here are spelled out.
        switch pairs.count {
        case 3: log.log(priority, message, fields: [pairs[0].0: pairs[0].1, pairs[1].0: pairs[1].1, pairs[2].0: pairs[2].1])
        case 4:
            log.log(
                priority, message,
                fields: [pairs[0].0: pairs[0].1, pairs[1].0: pairs[1].1, pairs[2].0: pairs[2].1, pairs[3].0: pairs[3].1])
        default: log.log(priority, message)
        }
    }

    /// The restart policy, exponential backoff and the crash-loop limit.
    private func handleUnexpectedExit(_ vm: ManagedVM, reason: String, failure: Bool) {
        vm.lastExit = reason
        vm.adopted = false
        guard !shuttingDown else {
            vm.state = failure ? .failed : .stopped
            reportStatus()
            return
        }
        let restart: Bool
        switch vm.record.restart {
        case .never: restart = false
        case .onFailure: restart = failure
        case .always: restart = true
        }
        guard restart else {
            vm.state = failure ? .failed : .stopped
            reportStatus()
            return
        }
        let now = Sys.monotonicNow()
        vm.failureTimes = vm.failureTimes.filter { now - $0 < options.crashLoopWindow } + [now]
        let recent = vm.failureTimes.count
        if recent > options.crashLoopLimit {
            vm.state = .failed
            vm.lastExit =
                reason
                + "; crash loop: \(recent) exits within \(Int(options.crashLoopWindow)) s (limit \(options.crashLoopLimit)), not restarted"
            log.log(
                .error, "VM \(vm.name) is failing repeatedly (\(recent) exits within \(Int(options.crashLoopWindow)) s); marked failed",
                fields: ["VM_NAME": vm.name, "FLOTILLA_EVENT": "vm-crash-loop", "RESTART_COUNT": "\(vm.restartCount)"])
            reportStatus()
            return
        }
        let delay = min(options.restartDelayMax, options.restartDelay * Double(1 << min(recent - 1, 30)))
        vm.state = .starting
        log.log(
            .notice, "VM \(vm.name) will restart in \(delay) s (policy \(vm.record.restart.rawValue))",
            fields: ["VM_NAME": vm.name, "FLOTILLA_EVENT": "vm-restart-scheduled", "RESTART_DELAY_SECONDS": "\(delay)"])
        vm.restartTimer = reactor.after(delay) { [weak self, weak vm] in
            guard let self, let vm else { return }
            vm.restartTimer = nil
            vm.restartCount += 1
            self.startWorker(vm)
        }
        reportStatus()
    }

    // MARK: - Stop

    /// Stops the VM: QMP quit, then SIGTERM, then SIGKILL, `stopTimeout` apart. `done` runs
    /// once no worker is left.
    func stopVM(_ vm: ManagedVM, done: @escaping () -> Void) {
        reactor.cancel(vm.restartTimer)
        vm.restartTimer = nil
        if vm.worker == nil {
            vm.state = .stopped
            vm.intent = .none
            reportStatus()
            done()
            return
        }
        vm.stopWaiters.append(done)
        if case .stop = vm.intent { return }
        vm.intent = .stop
        vm.state = .stopping
        reportStatus()
        // A worker still starting is stopped once it reports (readinessReported, or its exit).
        if vm.readiness == nil && vm.pendingStartFailure == nil { beginStopSteps(vm) }
    }

    private func beginStopSteps(_ vm: ManagedVM) {
        guard let worker = vm.worker else { return }
        let pid = worker.pid
        vm.state = .stopping
        if let multiplexer = vm.multiplexer {
            vm.stopSteps = ["quit"]
            log.log(
                .info, "stopping VM \(vm.name): QMP quit",
                fields: ["VM_NAME": vm.name, "VM_PID": "\(pid)", "FLOTILLA_EVENT": "vm-stop-quit"])
            multiplexer.execute("quit") { _ in }
        } else {
            vm.stopSteps = []
        }
        let timeout = options.stopTimeout
        let term = reactor.after(vm.stopSteps.isEmpty ? 0 : timeout) { [weak self, weak vm] in
            guard let self, let vm, let worker = vm.worker else { return }
            vm.stopSteps.append("SIGTERM")
            self.log.log(
                .warning, "VM \(vm.name) did not quit within \(timeout) s; sending SIGTERM",
                fields: ["VM_NAME": vm.name, "VM_PID": "\(worker.pid)", "FLOTILLA_EVENT": "vm-stop-sigterm"])
            worker.signal(SIGTERM)
            let killTimer = self.reactor.after(timeout) { [weak self, weak vm] in
                guard let self, let vm, let worker = vm.worker else { return }
                vm.stopSteps.append("SIGKILL")
                self.log.log(
                    .warning, "VM \(vm.name) ignored SIGTERM for \(timeout) s; sending SIGKILL",
                    fields: ["VM_NAME": vm.name, "VM_PID": "\(worker.pid)", "FLOTILLA_EVENT": "vm-stop-sigkill"])
                worker.signal(SIGKILL)
            }
            vm.stopTimers.append(killTimer)
        }
        vm.stopTimers.append(term)
    }

    private func finishStop(_ vm: ManagedVM, reason: String) {
        vm.intent = .none
        vm.state = .stopped
        vm.lastExit = reason
        vm.adopted = false
        log.log(.info, "VM \(vm.name) stopped", fields: ["VM_NAME": vm.name, "FLOTILLA_EVENT": "vm-stopped"])
        reportStatus()
        vm.resolveStop()
    }

    // MARK: - Fleet operations (control API)

    func lookup(_ name: String) throws(SupervisorError) -> ManagedVM {
        guard let vm = vms[name] else {
            let known = vms.keys.sorted()
            throw SupervisorError(
                .notFound,
                "no VM named '\(name)'" + (known.isEmpty ? "; the fleet is empty" : "; known VMs: " + known.joined(separator: ", ")))
        }
        return vm
    }

    /// Stores the VM's document durably (on the store writer's thread), and only then adds
    /// the VM and answers; the name is taken meanwhile.
    func create(_ record: VMRecord, start: Bool, done: @escaping (Result<JSONValue, SupervisorError>) -> Void) {
        do throws(SupervisorError) {
            guard vms[record.name] == nil, !creating.contains(record.name) else {
                throw SupervisorError(.alreadyExists, "a VM named '\(record.name)' exists already")
            }
            try ManagedVM.checkPaths(runtimeDirectory: options.runtimeDirectory, name: record.name)
        } catch {
            done(.failure(error))
            return
        }
        creating.insert(record.name)
        writer.submit(.save(record)) { [weak self] result in
            guard let self else { return }
            self.creating.remove(record.name)
            if case .failure(let error) = result {
                self.log.log(.error, "cannot store VM \(record.name): \(error)", fields: ["VM_NAME": record.name])
                done(.failure(SupervisorError(.failed, "cannot store VM \(record.name): \(error)")))
                return
            }
            let vm = ManagedVM(record: record, runtimeDirectory: self.options.runtimeDirectory)
            self.vms[record.name] = vm
            self.log.log(.info, "created VM \(record.name)", fields: ["VM_NAME": record.name, "FLOTILLA_EVENT": "vm-created"])
            self.reportStatus()
            if start {
                self.start(vm) { result in done(result.map { vm.status }) }
            } else {
                done(.success(vm.status))
            }
        }
    }

    func start(_ vm: ManagedVM, done: @escaping (Result<Void, SupervisorError>) -> Void) {
        if vm.deleting {
            done(.failure(SupervisorError(.wrongState, "VM '\(vm.name)' is being deleted")))
            return
        }
        switch vm.state {
        case .running, .paused:
            done(.success(()))
        case .stopping:
            done(.failure(SupervisorError(.wrongState, "VM '\(vm.name)' is stopping; start it once it has stopped")))
        case .starting where vm.worker != nil:
            vm.startWaiters.append(done)
        case .starting, .stopped, .failed:
            vm.failureTimes = []
            vm.startWaiters.append(done)
            startWorker(vm)
        }
    }

    func restart(_ vm: ManagedVM, done: @escaping (Result<Void, SupervisorError>) -> Void) {
        stopVM(vm) { [weak self, weak vm] in
            guard let self, let vm else { return }
            self.start(vm, done: done)
        }
    }

    /// Stops the VM, removes its document durably (on the store writer's thread), then its
    /// files; answers once all is done.
    func delete(_ vm: ManagedVM, done: @escaping (Result<Void, SupervisorError>) -> Void) {
        guard !vm.deleting else {
            done(.failure(SupervisorError(.wrongState, "VM '\(vm.name)' is being deleted already")))
            return
        }
        vm.deleting = true
        stopVM(vm) { [weak self, weak vm] in
            guard let self, let vm else { return }
            self.writer.submit(.delete(vm.name)) { [weak self, weak vm] result in
                guard let self, let vm else { return }
                self.finishDelete(vm, result, done: done)
            }
        }
    }

    private func finishDelete(
        _ vm: ManagedVM, _ result: Result<Void, SystemCallError>, done: @escaping (Result<Void, SupervisorError>) -> Void
    ) {
        do {
            try result.get()
        } catch {
            vm.deleting = false
            done(.failure(SupervisorError(.failed, "cannot delete VM \(vm.name): \(error)")))
            return
        }
        cleanRuntimeFiles(vm)
        for path in [vm.logFile, vm.launchLog] { Sys.unlinkIfPresent(path) }
        _ = rmdir(vm.directory)
        vms[vm.name] = nil
        log.log(.info, "deleted VM \(vm.name)", fields: ["VM_NAME": vm.name, "FLOTILLA_EVENT": "vm-deleted"])
        reportStatus()
        done(.success(()))
    }

    // MARK: - systemd

    /// "3 running, 1 failed": the fleet by state, for STATUS= and people.
    public var fleetSummary: String {
        var counts: [VMState: Int] = [:]
        for vm in vms.values { counts[vm.state, default: 0] += 1 }
        let parts = VMState.allCases.compactMap { state in counts[state].map { "\($0) \(state.rawValue)" } }
        return parts.isEmpty ? "no VMs" : parts.joined(separator: ", ")
    }

    func reportStatus() {
        guard ready else { return }
        let summary = fleetSummary
        guard summary != lastStatus else { return }
        lastStatus = summary
        ServiceNotifier.notify("STATUS=\(summary)")
    }

    private func startWatchdog() {
        guard let interval = ServiceNotifier.watchdogInterval else { return }
        log.log(.info, "watchdog: pinging every \(interval / 2) s")
        func ping() {
            ServiceNotifier.notify("WATCHDOG=1")
            reactor.after(interval / 2) { ping() }
        }
        ping()
    }

    /// SIGTERM/SIGINT: STOPPING=1, then either leave the workers running for the next
    /// flotillad (default) or stop them all; `done` runs when flotillad may exit.
    public func shutdown(done: @escaping () -> Void) {
        guard !shuttingDown else { return }
        shuttingDown = true
        ServiceNotifier.notify("STOPPING=1\nSTATUS=stopping: \(fleetSummary)")
        log.log(
            .notice, "stopping flotillad (\(options.stopVMsOnExit ? "stopping" : "leaving running") its VMs)",
            fields: ["FLOTILLA_EVENT": "stopping"])
        control?.close()
        control = nil
        let finish = { [weak self] in
            guard let self else { return }
            for vm in self.vms.values {
                self.reactor.cancel(vm.restartTimer)
                vm.multiplexer?.close()
                vm.qmp?.close()
            }
            // Writes under way finish first: what a client was told is stored, is.
            self.writer.whenIdle(done)
        }
        let running = vms.values.filter { $0.worker != nil }
        guard options.stopVMsOnExit, !running.isEmpty else {
            finish()
            return
        }
        var remaining = running.count
        for vm in running {
            stopVM(vm) {
                remaining -= 1
                if remaining == 0 { finish() }
            }
        }
    }
}

extension ManagedVM.Intent: Equatable {}
