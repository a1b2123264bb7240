import ArgumentParser
import Glibc
import Supervisor

extension LogTarget: ExpressibleByArgument {}

/// flotillad: the Flotilla fleet supervisor (a systemd Type=notify service).
struct Flotillad: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flotillad",
        abstract: "Supervises a fleet of flotilla-vmm microVMs: restarts, re-attaches, multiplexes QMP, reports to systemd.")

    @Option(help: "Sockets, pidfiles and logs of running VMs (control.sock, vms/<name>/).")
    var runtimeDir = "/run/flotillad"

    @Option(help: "The fleet store: one JSON document per VM under vms/.")
    var stateDir = "/var/lib/flotillad"

    @Option(help: "A directory of VM documents (*.json) to create at start when not yet in the store.")
    var configDir: String?

    @Option(help: "The flotilla-vmm executable (default: next to flotillad).")
    var vmm: String?

    @Option(help: "Seconds between the stop steps: QMP quit, SIGTERM, SIGKILL.")
    var stopTimeout: Double = 10

    @Option(help: "Seconds a starting worker has to become QMP-ready before it is killed as a failed start.")
    var startTimeout: Double = 30

    @Option(help: "First restart delay in seconds; doubles with each recent failure.")
    var restartDelay: Double = 1

    @Option(help: "Longest restart delay in seconds.")
    var restartDelayMax: Double = 60

    @Option(help: "Restarts allowed within --crash-loop-window before a VM is marked failed.")
    var crashLoopLimit: Int = 5

    @Option(help: "The crash-loop window in seconds.")
    var crashLoopWindow: Double = 300

    @Flag(
        name: .customLong("stop-vms-on-exit"),
        help: "Stop every VM when flotillad is stopped (default: leave them running for the next flotillad).")
    var stopVMsOnExit = false

    @Flag(
        name: .customLong("qmp-handoff"),
        help: ArgumentHelp(
            "Pass each client of vms/<name>/qmp.sock to the VM's worker (QMP getfd + add_client) instead of multiplexing it.",
            discussion:
                "Handed-off clients talk to the worker directly: native round-trip latency, and they keep working across a flotillad restart; but flotillad no longer sees or can police their commands. Default: multiplex (one worker connection, flotillad sees everything)."
        ))
    var qmpHandoff = false

    @Option(help: "Where log entries go: auto (the journal under systemd, else stderr), journal, stderr.")
    var logTarget: LogTarget = .auto

    func validate() throws {
        for (name, value) in [("--stop-timeout", stopTimeout), ("--restart-delay", restartDelay), ("--restart-delay-max", restartDelayMax)]
        where !(value >= 0 && value <= 86400) {
            throw ValidationError("\(name) '\(value)' is not allowed; allowed: 0 to 86400 seconds")
        }
        guard startTimeout > 0 && startTimeout <= 86400 else {
            throw ValidationError("--start-timeout '\(startTimeout)' is not allowed; allowed: more than 0, at most 86400 seconds")
        }
        guard crashLoopLimit >= 0 else {
            throw ValidationError("--crash-loop-limit '\(crashLoopLimit)' is not allowed; allowed: 0 or more")
        }
        guard crashLoopWindow > 0 else {
            throw ValidationError("--crash-loop-window '\(crashLoopWindow)' is not allowed; allowed: more than 0 seconds")
        }
    }

    func run() throws {
        let log = SupervisorLog(target: logTarget)
        let reactor: Reactor
        do {
            reactor = try Reactor()
        } catch {
            log.log(.error, "cannot create the event loop: \(error)")
            throw ExitCode(2)
        }
        signal(SIGPIPE, SIG_IGN)
        var options = Supervisor.Options(
            runtimeDirectory: absolute(runtimeDir), stateDirectory: absolute(stateDir), configDirectory: configDir.map(absolute),
            vmmPath: vmm.map(absolute) ?? siblingExecutable("flotilla-vmm"))
        options.stopTimeout = stopTimeout
        options.startTimeout = startTimeout
        options.restartDelay = restartDelay
        options.restartDelayMax = restartDelayMax
        options.crashLoopLimit = crashLoopLimit
        options.crashLoopWindow = crashLoopWindow
        options.stopVMsOnExit = stopVMsOnExit
        options.qmpHandoff = qmpHandoff
        do {
            let supervisor = try Supervisor(options: options, reactor: reactor, log: log)
            // Blocks the signals on this (main) thread before any other thread exists.
            try reactor.handleSignals([SIGTERM, SIGINT, SIGHUP]) { signal in
                if signal == SIGHUP { return }
                supervisor.shutdown { reactor.stop() }
            }
            try supervisor.start()
        } catch {
            log.log(.error, "cannot start: \(error)")
            throw ExitCode(2)
        }
        reactor.run()
        log.log(.info, "flotillad exited")
    }
}

func absolute(_ path: String) -> String {
    if path.hasPrefix("/") { return path }
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    guard getcwd(&buffer, buffer.count) != nil else { return path }
    return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) + "/" + path
}

func siblingExecutable(_ name: String) -> String {
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard count > 0 else { return name }
    let path = String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    guard let slash = path.lastIndex(of: "/") else { return name }
    return String(path[..<slash]) + "/" + name
}

Flotillad.main()
