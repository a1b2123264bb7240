import ArgumentParser
import Glibc
import Protocol
import Supervisor

/// How to reach flotillad: every subcommand takes these.
struct ControlSocketOptions: ParsableArguments {
    @Option(help: "flotillad's control socket (default: $FLOTILLAD_SOCKET or /run/flotillad/control.sock).")
    var socket: String?

    var socketPath: String {
        if let socket { return socket }
        if let value = getenv("FLOTILLAD_SOCKET") { return String(cString: value) }
        return "/run/flotillad/control.sock"
    }

    /// Runs a control command; flotillad's error (or failing to reach it) is printed and exits 1.
    func execute(_ name: String, _ arguments: JSONObject = JSONObject()) throws -> JSONValue {
        do {
            let client = try ControlClient(socketPath: socketPath)
            return try client.execute(name, arguments)
        } catch {
            printError("flotillactl: \(error.description)")
            throw ExitCode(1)
        }
    }
}

/// Options the fleet subcommands share: the control socket and --json.
struct ConnectionOptions: ParsableArguments {
    @OptionGroup var control: ControlSocketOptions

    @Flag(help: "Print flotillad's reply as JSON instead of a table.")
    var json = false

    func execute(_ name: String, _ arguments: JSONObject = JSONObject()) throws -> JSONValue {
        try control.execute(name, arguments)
    }
}

func printError(_ text: String) {
    let bytes = Array((text + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
}

enum Render {
    static func text(_ value: JSONValue?) -> String {
        switch value {
        case .none, .null?: "-"
        case .string(let text)?: text
        case .number(let number)?: number.text
        case .bool(let flag)?: flag ? "yes" : "no"
        case let other?: other.compactText
        }
    }

    static func uptime(_ value: JSONValue?) -> String {
        guard let seconds = value?.numberValue?.signedValue else { return "-" }
        if seconds < 60 { return "\(seconds)s" }
        if seconds < 3600 { return "\(seconds / 60)m\(seconds % 60)s" }
        if seconds < 86400 { return "\(seconds / 3600)h\(seconds % 3600 / 60)m" }
        return "\(seconds / 86400)d\(seconds % 86400 / 3600)h"
    }

    static func table(_ rows: [[String]]) -> String {
        guard let header = rows.first else { return "" }
        var widths = header.map(\.count)
        for row in rows {
            for (index, cell) in row.enumerated() where index < widths.count { widths[index] = max(widths[index], cell.count) }
        }
        return rows.map { row in
            row.enumerated().map { index, cell in
                index == row.count - 1 ? cell : cell + String(repeating: " ", count: widths[index] - cell.count)
            }.joined(separator: "  ")
        }.joined(separator: "\n")
    }

    static func statusRows(_ vms: [JSONValue]) -> String {
        var rows = [["NAME", "STATE", "PID", "UPTIME", "RESTARTS", "POLICY", "LAST EXIT"]]
        for vm in vms {
            let object = vm.objectValue ?? JSONObject()
            rows.append([
                text(object["name"]), text(object["state"]), text(object["pid"]), uptime(object["uptime"]),
                text(object["restart_count"]), text(object["restart"]), text(object["last_exit"]),
            ])
        }
        return table(rows)
    }

    static func status(_ vm: JSONValue) -> String {
        let object = vm.objectValue ?? JSONObject()
        let fields: [(String, String)] = [
            ("name", text(object["name"])), ("state", text(object["state"])), ("pid", text(object["pid"])),
            ("uptime", uptime(object["uptime"])), ("restarts", text(object["restart_count"])),
            ("restart policy", text(object["restart"])), ("autostart", text(object["autostart"])),
            ("last exit", text(object["last_exit"])), ("qmp socket", text(object["qmp_socket"])),
            ("console socket", text(object["console_socket"])), ("log", text(object["log"])),
        ]
        let width = fields.map(\.0.count).max() ?? 0
        return fields.map { $0.0 + ":" + String(repeating: " ", count: width - $0.0.count + 1) + $0.1 }.joined(separator: "\n")
    }

    static func output(_ value: JSONValue, json: Bool, human: (JSONValue) -> String) {
        print(json ? value.prettyText() : human(value))
    }
}

struct Flotillactl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flotillactl", abstract: "Controls flotillad, the Flotilla fleet supervisor.",
        subcommands: [
            List.self, Status.self, Create.self, Start.self, Stop.self, Restart.self, Delete.self, Console.self,
            QMPCommand.self, Events.self, Pause.self, Resume.self,
        ])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Lists the fleet: every VM with its state.")
        @OptionGroup var connection: ConnectionOptions

        func run() throws {
            let value = try connection.execute("vm-list")
            Render.output(value, json: connection.json) { Render.statusRows($0.arrayValue ?? []) }
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Shows one VM's status.")
        @OptionGroup var connection: ConnectionOptions
        @Argument(help: "The VM's name.") var name: String

        func run() throws {
            let value = try connection.execute("vm-status", ["name": .string(name)])
            Render.output(value, json: connection.json, human: Render.status)
        }
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Adds a VM to the fleet from a StratoVirt JSON configuration.")
        @OptionGroup var connection: ConnectionOptions
        @Argument(help: "The VM's name.") var name: String
        @Option(help: "The VM's configuration file, in StratoVirt's JSON schema (may also hold autostart and restart).")
        var config: String
        @Option(help: "Restart policy: never, on-failure, always (default: the file's, else on-failure).")
        var restart: String?
        @Flag(help: "Start the VM whenever flotillad starts.") var autostart = false
        @Flag(help: "Start the VM once it is created.") var start = false

        func run() throws {
            guard let bytes = readWholeFile(config) else {
                printError("flotillactl: --config '\(config)': cannot read the file: \(String(cString: strerror(errno)))")
                throw ExitCode(1)
            }
            let document: JSONValue
            do {
                document = try JSONValue.parse(bytes: bytes)
            } catch {
                printError("flotillactl: --config '\(config)': not valid JSON: \(error)")
                throw ExitCode(1)
            }
            var arguments: JSONObject = ["name": .string(name), "config": document, "start": .bool(start)]
            if autostart { arguments["autostart"] = true }
            if let restart { arguments["restart"] = .string(restart) }
            let value = try connection.execute("vm-create", arguments)
            Render.output(value, json: connection.json, human: Render.status)
        }
    }

    struct Start: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Starts a VM and waits until its QMP is ready.")
        @OptionGroup var connection: ConnectionOptions
        @Argument(help: "The VM's name.") var name: String

        func run() throws {
            let value = try connection.execute("vm-start", ["name": .string(name)])
            Render.output(value, json: connection.json, human: Render.status)
        }
    }

    struct Stop: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stops a VM (QMP quit, then SIGTERM, then SIGKILL) and waits.")
        @OptionGroup var connection: ConnectionOptions
        @Argument(help: "The VM's name.") var name: String

        func run() throws {
            let value = try connection.execute("vm-stop", ["name": .string(name)])
            Render.output(value, json: connection.json, human: Render.status)
        }
    }

    struct Restart: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stops and starts a VM.")
        @OptionGroup var connection: ConnectionOptions
        @Argument(help: "The VM's name.") var name: String

        func run() throws {
            let value = try connection.execute("vm-restart", ["name": .string(name)])
            Render.output(value, json: connection.json, human: Render.status)
        }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stops a VM if it runs and removes it from the fleet.")
        @OptionGroup var connection: ConnectionOptions
        @Argument(help: "The VM's name.") var name: String

        func run() throws {
            let value = try connection.execute("vm-delete", ["name": .string(name)])
            Render.output(value, json: connection.json) { _ in "deleted \(name)" }
        }
    }
}

func readWholeFile(_ path: String) -> [UInt8]? {
    guard let file = fopen(path, "rb") else { return nil }
    defer { fclose(file) }
    var result: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = fread(&chunk, 1, chunk.count, file)
        if count == 0 { break }
        result.append(contentsOf: chunk[0..<count])
    }
    return result
}

/// `flotillactl --socket PATH list` as well as `flotillactl list --socket PATH`: the shared
/// options may come before the subcommand.
func reorderedArguments(_ arguments: [String]) -> [String] {
    var leading: [String] = []
    var rest = arguments[...]
    while let first = rest.first, first.hasPrefix("--") && first != "--help" {
        leading.append(first)
        rest = rest.dropFirst()
        if first == "--socket", let value = rest.first {
            leading.append(value)
            rest = rest.dropFirst()
        }
    }
    guard let subcommand = rest.first else { return arguments }
    return [subcommand] + leading + rest.dropFirst()
}

Flotillactl.main(reorderedArguments(Array(CommandLine.arguments.dropFirst())))
