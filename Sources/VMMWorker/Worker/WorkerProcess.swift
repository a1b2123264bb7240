import CLinux
import Glibc
import Protocol
import Synchronization
import SystemPackage

/// The life of one flotilla-vmm process: builds the VM, creates the pidfile and the
/// api-channel, runs the main event loop until the VM ends, and removes everything it
/// created on every path it survives.
public enum WorkerProcess {
    /// Documented exit statuses (README "Exit status").
    public enum ExitStatus {
        public static let clean: Int32 = 0
        public static let configuration: Int32 = 1
        public static let startup: Int32 = 2
        public static let guestFailure: Int32 = 3
    }

    /// Signals that end the VM cleanly; they are read from a signalfd on the main loop.
    static let terminationSignals: [Int32] = [SIGTERM, SIGINT, SIGHUP, SIGQUIT]

    /// Runs the VM to its end and returns the process exit status.
    public static func run(config: VMConfig, runtime: RuntimeOptions) -> Int32 {
        // Before any thread exists: one malloc arena (see fl_malloc.h; the seccomp filter
        // depends on it).
        _ = fl_malloc_single_arena()
        let readiness = DaemonReadiness.inherited()
        let log: VMMLog
        if let path = runtime.logFile {
            do {
                log = try VMMLog(path: path, name: config.name)
            } catch {
                let message = "flotilla-vmm: cannot open the log file: \(error)\n"
                if let readiness { readiness.failed(message) } else { writeStandardError(message) }
                return ExitStatus.startup
            }
        } else {
            log = VMMLog(name: config.name)
        }
        let worker = Worker(config: config, runtime: runtime, log: log, readiness: readiness)
        return worker.run()
    }

    static func writeStandardError(_ text: String) {
        Array(text.utf8).withUnsafeBytes { buffer in
            do {
                try Syscall.writeAll(2, buffer)
            } catch {
                // Standard error is gone; nothing else can be told.
            }
        }
    }
}

/// One run of a worker; the resources it created, in the order it must remove them.
private final class Worker: Sendable {
    let config: VMConfig
    let runtime: RuntimeOptions
    let log: VMMLog
    let readiness: DaemonReadiness?
    /// Why the host asked the VM to end (QMP quit, a signal), for the SHUTDOWN event.
    let hostShutdownReason = Mutex<String?>(nil)

    init(config: VMConfig, runtime: RuntimeOptions, log: VMMLog, readiness: DaemonReadiness?) {
        self.config = config
        self.runtime = runtime
        self.log = log
        self.readiness = readiness
    }

    /// Reports a start-up failure where the user will see it and returns the exit status.
    func startupFailure(_ message: String) -> Int32 {
        log.error(message)
        if let readiness {
            readiness.failed("flotilla-vmm: \(message)\n")
        } else if runtime.logFile != nil {
            WorkerProcess.writeStandardError("flotilla-vmm: \(message)\n")
        }
        return WorkerProcess.ExitStatus.startup
    }

    func run() -> Int32 {
        // Signals: ignore SIGPIPE (a QMP client may vanish mid-write; sends use MSG_NOSIGNAL
        // too), and block the termination signals in this thread before any other thread
        // exists, so every thread inherits the mask and only the signalfd sees them.
        signal(SIGPIPE, SIG_IGN)
        var mask = sigset_t()
        sigemptyset(&mask)
        for signal in WorkerProcess.terminationSignals { sigaddset(&mask, signal) }
        pthread_sigmask(SIG_BLOCK, &mask, nil)
        if let name = config.name { _ = fl_set_current_thread_name(name) }

        // I/O worker threads for the loops that may serve disks (-drive, or hot-plug through
        // the api-channel): made now, before the seccomp filter, which allows no clone.
        let diskIOThreads = !config.drives.isEmpty || runtime.apiChannelPath != nil ? VirtioBlockDevice.defaultIOThreads : 0
        let loop: EventLoop
        do {
            loop = try EventLoop(name: NativeThread.threadName(vmName: config.name ?? "flotilla", suffix: "main"), ioThreads: diskIOThreads)
        } catch {
            return startupFailure("cannot create the main event loop: \(error)")
        }

        var pidfile: Pidfile?
        if let path = runtime.pidfile {
            do {
                pidfile = try Pidfile(path: path)
            } catch {
                return startupFailure("-pidfile: \(error)")
            }
        }
        defer { pidfile?.remove() }

        // The api-channel listens, and greets clients, from the start: the main loop runs on
        // its own thread while the machine is built here, and commands wait until the VM
        // exists (QMPServer.open). Registering guest memory with KVM alone takes milliseconds.
        var server: QMPServer?
        let events = QMPEventSink()
        if let path = runtime.apiChannelPath {
            do {
                server = try QMPServer(path: Paths.absolute(path), loop: loop, package: "flotilla-vmm \(StratoVirtCommandLine.version)")
            } catch let error where error.errno == .addressInUse {
                return startupFailure("-api-channel: \(path) already exists; remove it first (as StratoVirt requires)")
            } catch {
                return startupFailure("-api-channel: \(error)")
            }
        }
        if let server { events.attach(server) }
        // Removes the socket file; runs after the loop thread has ended.
        defer { server?.close() }
        let qmp = server

        let mainLoop: LoopThread
        do {
            mainLoop = LoopThread(loop: loop, thread: try loop.startThread())
        } catch {
            return startupFailure("cannot start the main loop's thread: \(error)")
        }
        // Whatever the main loop serves is closed only after its thread has ended: every
        // later cleanup stops it first (stopping twice is harmless).
        defer { mainLoop.stop() }

        // -iothread id=NAME: a thread named NAME with its own event loop, processing the
        // queues of the devices configured with iothread=NAME.
        var iothreads: [String: EventLoop] = [:]
        for iothread in config.iothreads {
            do {
                iothreads[iothread.id] = try EventLoop(name: iothread.id, ioThreads: diskIOThreads)
            } catch {
                return startupFailure("-iothread id=\(iothread.id): cannot create its event loop: \(error)")
            }
        }
        var iothreadThreads: [pthread_t] = []
        defer {
            for loop in iothreads.values { loop.stop() }
            for thread in iothreadThreads { HostThread.join(thread) }
        }

        // -serial unix:PATH,server,nowait: the worker serves the console itself (ConsoleSocket).
        let console: ConsoleSocket?
        do {
            console = try ConsoleSocket.make(for: config.serial, loop: loop)
        } catch {
            return startupFailure("-serial: \(error)")
        }
        defer {
            mainLoop.stop()
            console?.close()
        }

        // -chardev: one listening socket per virtio-console port, removed on every exit path.
        var consolePorts: [String: ConsoleSocket] = [:]
        defer {
            mainLoop.stop()
            for port in consolePorts.values { port.close() }
        }
        for chardev in config.consoles {
            do {
                consolePorts[chardev.id] = try ConsoleSocket.make(for: chardev, loop: loop)
            } catch {
                return startupFailure("\(error)")
            }
        }

        // -device vsock,uds-path=PATH: the host-initiated connections' socket, removed on every exit path.
        let vsockListener: VsockListener?
        do {
            vsockListener = try VsockListener.make(for: config.vsock)
        } catch {
            return startupFailure("\(error)")
        }
        defer {
            mainLoop.stop()
            vsockListener?.close()
        }

        let vm: MicroVM
        do {
            let output: FileDescriptor? = config.serial?.stdio == true ? .standardOutput : console?.guestOutput
            let devices = try VirtioPlan.devices(
                for: config, mainLoop: loop, iothreads: iothreads, consolePorts: consolePorts, vsockListener: vsockListener)
            vm = try MicroVM(config: config, serialOutput: output, virtioSlots: VirtioPlan.slots(for: config), virtioDevices: devices)
        } catch {
            return startupFailure("cannot create the VM: \(error)")
        }
        console?.setInputSink { vm.enqueueSerialInput($0) }
        vm.vsock?.observe { [log] message in log.info(message) }
        // QEMU's BALLOON_CHANGE: the guest's memory as the balloon leaves it, whenever the
        // driver changes `actual` (emitted from the main loop).
        let ramBytes = config.machine.memoryBytes
        vm.balloon?.device.observeActual { actual in
            loop.execute {
                events.emit("BALLOON_CHANGE", data: ["actual": .integer(BalloonCommands.guestBytes(ram: ramBytes, actual: actual))])
            }
        }
        for (name, iothread) in iothreads.sorted(by: { $0.key < $1.key }) {
            do {
                iothreadThreads.append(try iothread.startThread())
            } catch {
                return startupFailure("-iothread id=\(name): cannot start its thread: \(error)")
            }
        }

        let signalFD: Int32
        do {
            signalFD = try Syscall.once("signalfd") { signalfd(-1, &mask, Int32(SFD_CLOEXEC | SFD_NONBLOCK)) }
        } catch {
            return startupFailure("cannot create the signalfd: \(error)")
        }
        defer {
            mainLoop.stop()
            Syscall.close(signalFD)
        }
        // Set once the VM has ended and its SHUTDOWN event is out.
        let finished = ConditionLock(false)
        do {
            try loop.register(fd: signalFD, events: EPOLLIN.rawValue) { [self] _ in
                var info = signalfd_siginfo()
                while withUnsafeMutableBytes(of: &info, { Glibc.read(signalFD, $0.baseAddress, $0.count) }) > 0 {
                    log.info("received signal \(info.ssi_signo); shutting down")
                    hostShutdownReason.withLock { $0 = $0 ?? "host-signal" }
                    vm.requestShutdown()
                }
            }
            try loop.register(fd: vm.exitEventFD.rawValue, events: EPOLLIN.rawValue) { [self] _ in
                // The eventfd is written once, when the VM has ended; reading it is what stops
                // epoll (level-triggered) from reporting it again, and SHUTDOWN going out again.
                var count: UInt64 = 0
                guard withUnsafeMutableBytes(of: &count, { Glibc.read(vm.exitEventFD.rawValue, $0.baseAddress, $0.count) }) == 8
                else { return }
                let reason = vm.exitReason ?? .requested
                qmp?.broadcast(event: "SHUTDOWN", data: shutdownEventData(reason))
                finished.withLock { $0 = true }
                finished.broadcast()
            }
        } catch {
            return startupFailure("cannot set up the main loop: \(error)")
        }

        var terminal: RawTerminal?
        if config.serial?.stdio == true {
            terminal = RawTerminal()
            forwardStandardInput(to: vm, loop: loop)
        }
        defer { terminal?.restore() }

        do {
            try vm.start()
        } catch {
            return startupFailure("cannot start the VM: \(error)")
        }
        if readiness != nil {
            // A daemon keeps no directory busy; every path it still needs is absolute.
            _ = chdir("/")
        }
        // NIC hot-plug looks taps up after the filter is on, on a socket made before it.
        var interfaces: NetInterfaces?
        if qmp != nil {
            do {
                interfaces = try NetInterfaces()
            } catch {
                log.error("NIC hot-plug unavailable: \(error)")
            }
        }
        if !runtime.disableSeccomp {
            do {
                try Seccomp.install(
                    logOnly: getenv("FLOTILLA_SECCOMP_LOG") != nil, hotplug: qmp != nil, vsock: config.vsock?.udsPath != nil)
            } catch {
                vm.requestShutdown()
                _ = vm.waitForExit()
                return startupFailure("cannot install the seccomp filter: \(error)")
            }
        }
        log.info("VM started: \(config.machine.vcpuCount) vCPUs, \(config.machine.memoryBytes >> 20) MiB")
        qmp?.open(commands: commands(vm: vm, events: events, mainLoop: loop, iothreads: iothreads, interfaces: interfaces))
        readiness?.ready()

        // The main loop's thread serves the VM from here; this thread waits for its end
        // (the SHUTDOWN event has gone out), then stops the loop and cleans up.
        finished.wait(until: { $0 }, then: { _ in })
        mainLoop.stop()

        let reason = vm.waitForExit()
        switch reason {
        case .failed(let message):
            log.error("the VM failed: \(message)")
            if runtime.logFile != nil && readiness == nil {
                WorkerProcess.writeStandardError("flotilla-vmm: the VM failed: \(message)\n")
            }
            return WorkerProcess.ExitStatus.guestFailure
        default:
            log.info("VM ended: \(reason)")
            return WorkerProcess.ExitStatus.clean
        }
    }

    /// QMP's SHUTDOWN event data (QAPI ShutdownCause).
    func shutdownEventData(_ reason: VMExitReason) -> JSONObject {
        switch reason {
        case .guestReset: return ["guest": true, "reason": "guest-reset"]
        case .guestShutdown: return ["guest": true, "reason": "guest-shutdown"]
        case .requested:
            let host = hostShutdownReason.withLock { $0 } ?? "host-qmp-quit"
            return ["guest": false, "reason": .string(host)]
        case .failed: return ["guest": false, "reason": "host-error"]
        }
    }

    /// The QMP command set: lifecycle (query-status, stop, cont, quit), query-version,
    /// query-name, the balloon's and the other queries (QueryCommands), disk and NIC hot-plug
    /// (HotplugCommands).
    func commands(
        vm: MicroVM, events: QMPEventSink, mainLoop: EventLoop, iothreads: [String: EventLoop], interfaces: NetInterfaces?
    ) -> QMPCommandTable {
        var table = QMPCommandTable()
        let name = config.name
        table.registerWithoutArguments("query-status") {
            let state = vm.guestState
            return .success(["status": .string(state.rawValue), "singlestep": false, "running": .bool(state == .running)])
        }
        // QEMU emits STOP/RESUME only on a real change of state.
        table.registerWithoutArguments("stop") {
            guard vm.guestState == .running else { return .success([:]) }
            do {
                try vm.pause()
            } catch {
                return .failure(QMPCommandError(.genericError, "cannot stop the VM: \(error)"))
            }
            events.emit("STOP")
            return .success([:])
        }
        table.registerWithoutArguments("cont") {
            guard vm.guestState == .paused else { return .success([:]) }
            do {
                try vm.resume()
            } catch {
                return .failure(QMPCommandError(.genericError, "cannot resume the VM: \(error)"))
            }
            events.emit("RESUME")
            return .success([:])
        }
        table.registerWithoutArguments(
            "quit",
            afterReply: { [self] in
                hostShutdownReason.withLock { $0 = $0 ?? "host-qmp-quit" }
                vm.requestShutdown()
            }
        ) { .success([:]) }
        table.registerWithoutArguments("query-version") {
            .success([
                "qemu": ["major": 0, "minor": 1, "micro": 0],
                "package": .string("flotilla-vmm \(StratoVirtCommandLine.version)"),
            ])
        }
        table.registerWithoutArguments("query-name") {
            .success(name.map { ["name": .string($0)] } ?? [:])
        }
        BalloonCommands.register(in: &table, vm: vm, ramBytes: config.machine.memoryBytes)
        QueryCommands.register(in: &table, vm: vm, config: config, iothreads: iothreads)
        let hotplug = DeviceHotplug(vm: vm, config: config, mainLoop: mainLoop, iothreads: iothreads, interfaces: interfaces)
        HotplugCommands.register(in: &table, hotplug: hotplug, events: events)
        return table
    }

    /// Feeds standard input to the serial port. Bytes the UART's FIFO cannot take yet wait
    /// here, retried every millisecond, while standard input is not read further.
    func forwardStandardInput(to vm: MicroVM, loop: EventLoop) {
        let forwarder = InputForwarder(vm: vm, loop: loop, log: log)
        forwarder.start()
    }
}

/// The main loop's thread, stopped and joined once.
private final class LoopThread: Sendable {
    let loop: EventLoop
    private let thread: Mutex<pthread_t?>

    init(loop: EventLoop, thread: pthread_t) {
        self.loop = loop
        self.thread = Mutex(thread)
    }

    /// Stops the loop and waits for its thread to end; later calls return at once.
    func stop() {
        guard
            let thread = thread.withLock({ thread -> pthread_t? in
                defer { thread = nil }
                return thread
            })
        else { return }
        loop.stop()
        HostThread.join(thread)
    }
}

/// Moves bytes from standard input to the guest's UART.
///
/// `@unchecked Sendable`: `pending`, `inputToken` and `retryToken` are touched only on the
/// main loop's thread (in its handlers and after `start`, which runs before the loop).
private final class InputForwarder: @unchecked Sendable {
    let vm: MicroVM
    let loop: EventLoop
    let log: VMMLog
    var pending: [UInt8] = []
    var inputToken: EventLoop.Token?
    var retryToken: EventLoop.Token?

    init(vm: MicroVM, loop: EventLoop, log: VMMLog) {
        self.vm = vm
        self.loop = loop
        self.log = log
    }

    func start() {
        // Standard input may be a regular file or /dev/null, which epoll refuses: then
        // there is simply no input.
        inputToken = try? loop.register(fd: 0, events: EPOLLIN.rawValue) { [self] _ in readInput() }
    }

    private func readInput() {
        var chunk = [UInt8](repeating: 0, count: 256)
        let count = chunk.withUnsafeMutableBytes { Glibc.read(0, $0.baseAddress, $0.count) }
        if count < 0 && (errno == EINTR || errno == EAGAIN) { return }
        guard count > 0 else {
            // End of input (or an error): stop watching; the guest keeps running.
            if let inputToken { loop.unregister(inputToken) }
            inputToken = nil
            return
        }
        pending.append(contentsOf: chunk[0..<count])
        deliver()
    }

    private func deliver() {
        let accepted = vm.enqueueSerialInput(pending)
        pending.removeFirst(accepted)
        if pending.isEmpty {
            if let retryToken { loop.unregister(retryToken) }
            retryToken = nil
            if let inputToken { try? loop.modify(inputToken, events: EPOLLIN.rawValue) }
        } else if retryToken == nil {
            if let inputToken { try? loop.modify(inputToken, events: 0) }
            retryToken = try? loop.addTimer(intervalNanoseconds: 1_000_000) { [self] in deliver() }
        }
    }
}
