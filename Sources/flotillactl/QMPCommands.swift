import ArgumentParser
import Glibc
import Protocol
import Supervisor

/// A VM's QMP, reached the way any QMP client reaches it: flotillad's `vm-status` names the
/// socket (`<runtime-dir>/vms/<name>/qmp.sock`), and whether flotillad multiplexes it or hands
/// the connection off to the worker (--qmp-handoff), the client is greeted and negotiates on
/// its own. An unknown VM, one that is not running and a lost connection exit 1.
func connectQMP(_ control: ControlSocketOptions, name: String) throws -> QMPClient {
    let status = try control.execute("vm-status", ["name": .string(name)]).objectValue ?? JSONObject()
    guard let path = status["qmp_socket"]?.stringValue else {
        let state = status["state"]?.stringValue ?? "unknown"
        if state == VMState.starting.rawValue {
            printError("flotillactl: VM '\(name)' has no QMP yet: it is still starting (state \(state)); try again once it runs")
        } else {
            printError("flotillactl: VM '\(name)' has no QMP now: its worker is not running (state \(state)); start it first")
        }
        throw ExitCode(1)
    }
    do {
        return try QMPClient.connect(socketPath: path)
    } catch {
        printError("flotillactl: VM '\(name)': \(error.description)")
        throw ExitCode(1)
    }
}

/// Runs `command` on the VM; prints the QMP error as `class: desc` and exits 1 for an error
/// reply (after `onReply` had the reply), 1 for a lost connection.
func runQMP(
    _ control: ControlSocketOptions, name: String, command: String, arguments: JSONObject, onReply: (QMPClient.Reply) -> Void = { _ in }
) throws -> JSONValue {
    let client = try connectQMP(control, name: name)
    let reply: QMPClient.Reply
    do {
        reply = try client.execute(command, arguments)
    } catch {
        printError("flotillactl: VM '\(name)': \(error.description)")
        throw ExitCode(1)
    }
    onReply(reply)
    if let error = reply.error {
        printError("\(error.errorClass): \(error.description)")
        throw ExitCode(1)
    }
    return reply.value ?? .null
}

/// Writes one line to standard output at once, so a pipe sees each line as it happens.
func writeLine(_ bytes: [UInt8]) {
    let line = bytes + [0x0a]
    var offset = 0
    while offset < line.count {
        let count = line[offset...].withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
        if count < 0 && errno == EINTR { continue }
        guard count > 0 else { return }
        offset += count
    }
}

/// `flotillactl qmp NAME COMMAND [ARGUMENTS-JSON]`.
struct QMPCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qmp", abstract: "Runs one QMP command on a running VM and prints what it returns, as JSON.",
        discussion: """
            Connects to the VM's QMP socket as flotillad serves it (multiplexed, or handed off to the \
            worker with flotillad --qmp-handoff), negotiates capabilities and sends \
            {"execute": COMMAND, "arguments": ARGUMENTS-JSON}. Other clients of the same VM are \
            unaffected. Exit status: 0 and the `return` value on standard output (indented; one line \
            with --compact); 1 with `CLASS: DESCRIPTION` on standard error when the VM answers with a \
            QMP error; 1 with a message when the VM is unknown or not running or flotillad cannot be \
            reached; 64 for bad usage, such as ARGUMENTS-JSON that is not a JSON object.
            """)

    @OptionGroup var control: ControlSocketOptions
    @Argument(help: "The VM's name.") var name: String
    @Argument(help: "The QMP command, as QMP spells it (query-status, stop, cont, device_del, ...).") var command: String
    @Argument(help: ArgumentHelp("The command's arguments: one JSON object, e.g. '{\"id\": \"disk1\"}'.", valueName: "arguments-json"))
    var argumentsJSON: String?
    @Flag(help: "Print the return value on one line instead of indented.") var compact = false
    @Flag(help: "Print the whole reply line as the VM sent it (success or error) instead of its return value.")
    var raw = false

    /// The parsed ARGUMENTS-JSON; a usage error (exit 64) names it and says what is wrong.
    static func parseArguments(_ text: String?) throws(ValidationError) -> JSONObject {
        guard let text else { return JSONObject() }
        let value: JSONValue
        do {
            value = try JSONValue.parse(text)
        } catch {
            throw ValidationError("<arguments-json> '\(text)' is not valid JSON: \(error)")
        }
        guard let object = value.objectValue else {
            throw ValidationError("<arguments-json> '\(text)' is a JSON \(value.typeName); QMP arguments must be a JSON object")
        }
        return object
    }

    func validate() throws {
        _ = try Self.parseArguments(argumentsJSON)
        if compact && raw { throw ValidationError("--compact and --raw exclude each other") }
    }

    func run() throws {
        let arguments = try Self.parseArguments(argumentsJSON)
        let value = try runQMP(control, name: name, command: command, arguments: arguments) { reply in
            if raw { writeLine(reply.bytes) }
        }
        if !raw { writeLine(Array((compact ? value.compactText : value.prettyText()).utf8)) }
    }
}

/// `flotillactl events NAME`: the VM's QMP events, one JSON line each.
struct Events: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Follows a running VM's QMP events (STOP, RESUME, SHUTDOWN, BALLOON_CHANGE, DEVICE_DELETED, ...).",
        discussion: """
            Prints each event as one line of JSON, as the VM sent it, from the moment the connection is \
            negotiated (flotillactl says so on standard error) until interrupted, or until --count or \
            --until is satisfied (exit 0). Exit status 1: --timeout passed, or the VM's QMP closed, \
            before --count or --until was satisfied; the VM is unknown or not running. Without --count \
            and --until, the VM ending or --timeout passing exits 0. 64 for bad usage.
            """)

    @OptionGroup var control: ControlSocketOptions
    @Argument(help: "The VM's name.") var name: String
    @Option(help: ArgumentHelp("Exit 0 after N events.", valueName: "n")) var count: Int?
    @Option(help: ArgumentHelp("Exit 0 after the first EVENT event, as QMP spells it (e.g. SHUTDOWN).", valueName: "event"))
    var until: String?
    @Option(help: ArgumentHelp("Give up after SECONDS (exit 1 if --count or --until is still unsatisfied, else 0).", valueName: "seconds"))
    var timeout: Double?

    func validate() throws {
        if let count, count < 1 { throw ValidationError("--count '\(count)': allowed: a whole number of at least 1") }
        if let timeout, !(timeout > 0 && timeout.isFinite) {
            throw ValidationError("--timeout '\(timeout)': allowed: a number of seconds greater than 0")
        }
        if let until, until.isEmpty { throw ValidationError("--until '': allowed: an event name, such as SHUTDOWN") }
    }

    /// What is still awaited, for messages.
    private func awaited(seen: Int) -> String {
        var parts: [String] = []
        if let until { parts.append("a \(until) event") }
        if let count { parts.append("\(count) events (saw \(seen))") }
        return parts.joined(separator: " or ")
    }

    func run() throws {
        let client = try connectQMP(control, name: name)
        printError("flotillactl: following the QMP events of VM '\(name)'")
        let conditional = count != nil || until != nil
        let start = Self.now()
        var seen = 0
        while true {
            var remaining: Double?
            if let timeout {
                remaining = timeout - (Self.now() - start)
            }
            let event: QMPClient.Reply?
            if let left = remaining, left <= 0 {
                event = nil
            } else {
                do {
                    event = try client.nextEvent(timeout: remaining)
                } catch {
                    if error.closed && !conditional {
                        printError("flotillactl: the QMP connection of VM '\(name)' closed (the VM ended)")
                        return
                    }
                    printError(
                        "flotillactl: VM '\(name)': \(error.description)" + (conditional ? " while waiting for \(awaited(seen: seen))" : "")
                    )
                    throw ExitCode(1)
                }
            }
            guard let event else {
                guard conditional, let timeout else { return }
                printError("flotillactl: timed out after \(timeout) s waiting for \(awaited(seen: seen)) from VM '\(name)'")
                throw ExitCode(1)
            }
            writeLine(event.bytes)
            seen += 1
            if let until, event.object["event"]?.stringValue == until { return }
            if let count, seen >= count { return }
        }
    }

    static func now() -> Double {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
    }
}

/// `flotillactl pause NAME`: QMP `stop`.
struct Pause: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Pauses a running VM's vCPUs (QMP stop).")
    @OptionGroup var control: ControlSocketOptions
    @Argument(help: "The VM's name.") var name: String

    func run() throws {
        _ = try runQMP(control, name: name, command: "stop", arguments: JSONObject())
        print("paused \(name)")
    }
}

/// `flotillactl resume NAME`: QMP `cont`.
struct Resume: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Resumes a paused VM (QMP cont).")
    @OptionGroup var control: ControlSocketOptions
    @Argument(help: "The VM's name.") var name: String

    func run() throws {
        _ = try runQMP(control, name: name, command: "cont", arguments: JSONObject())
        print("resumed \(name)")
    }
}
