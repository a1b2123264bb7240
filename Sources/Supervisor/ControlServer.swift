import Glibc
import Protocol

/// `<runtime-dir>/control.sock`: flotillad's control API, JSON in QMP style. The server greets
/// like QMP; a client sends `{"execute": "vm-list", "arguments": {...}, "id": ...}` and gets
/// `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}` with its id. The socket is
/// mode 0660, and a peer must be root, flotillad's own user, or in the socket's group.
final class ControlServer {
    static let commands: [String: (required: [String], optional: [String])] = [
        "vm-create": (["name", "config"], ["autostart", "restart", "start"]),
        "vm-delete": (["name"], []),
        "vm-start": (["name"], []),
        "vm-stop": (["name"], []),
        "vm-restart": (["name"], []),
        "vm-status": (["name"], []),
        "vm-list": ([], []),
        "qmp_capabilities": ([], []),
    ]

    private weak var supervisor: Supervisor?
    private var listener: Listener?
    private var connections: [UInt64: JSONConnection] = [:]
    private var nextConnection: UInt64 = 1

    /// Listens on `path`, or on `activatedFD`, the listening socket systemd passed for it.
    init(path: String, activatedFD: Int32? = nil, supervisor: Supervisor) throws(SystemCallError) {
        self.supervisor = supervisor
        listener = try Listener(path: path, mode: 0o660, inheritedFD: activatedFD, reactor: supervisor.reactor) { [weak self] fd in
            self?.accept(fd)
        }
    }

    func close() {
        listener?.close()
        listener = nil
        for connection in connections.values { connection.closeWhenFlushed() }
        connections.removeAll()
    }

    private func accept(_ fd: Int32) {
        guard let supervisor else {
            Sys.close(fd)
            return
        }
        let connection: JSONConnection
        do {
            connection = try JSONConnection(fd: fd, reactor: supervisor.reactor)
        } catch {
            return
        }
        guard let credentials = try? UnixSocket.peerCredentials(fd) else {
            connection.close()
            return
        }
        if credentials.uid != 0 && credentials.uid != geteuid() && credentials.gid != getegid() {
            supervisor.log.log(
                .warning, "control socket: refused pid \(credentials.pid) (uid \(credentials.uid), gid \(credentials.gid))",
                fields: ["FLOTILLA_EVENT": "control-refused", "PEER_UID": "\(credentials.uid)"])
            connection.send(
                QMP.error(
                    .genericError,
                    "permission denied: uid \(credentials.uid) may not use flotillad's control socket; "
                        + "allowed: root, uid \(geteuid()), or group \(getegid())", id: nil))
            connection.closeWhenFlushed()
            return
        }
        let id = nextConnection
        nextConnection += 1
        connections[id] = connection
        connection.onClose = { [weak self] in self?.connections[id] = nil }
        connection.onPiece = { [weak self, weak connection] piece in
            guard let self, let connection else { return }
            self.received(piece, on: connection)
        }
        connection.send(QMP.greeting(major: 0, minor: 1, micro: 0, package: "flotillad"))
    }

    private func received(_ piece: JSONStreamSplitter.Piece, on connection: JSONConnection) {
        let command: QMP.Command
        switch piece {
        case .garbage(let reason):
            connection.send(QMP.error(.genericError, "JSON parse error, \(reason)", id: nil))
            return
        case .message(let bytes):
            switch QMP.parseCommand(bytes) {
            case .failure(let error):
                connection.send(QMP.error(.genericError, error.description, id: error.id))
                return
            case .success(let parsed):
                command = parsed
            }
        }
        let reply: (Result<JSONValue, SupervisorError>) -> Void = { [weak connection] result in
            switch result {
            case .success(let value):
                connection?.send(QMP.success(value, id: command.id))
            case .failure(let error):
                var object: JSONObject = ["error": ["class": .string(error.code.rawValue), "desc": .string(error.message)]]
                if let id = command.id { object["id"] = id }
                connection?.send(.object(object))
            }
        }
        do throws(SupervisorError) {
            try dispatch(command, reply: reply)
        } catch {
            reply(.failure(error))
        }
    }

    private func dispatch(_ command: QMP.Command, reply: @escaping (Result<JSONValue, SupervisorError>) -> Void) throws(SupervisorError) {
        guard let supervisor else { throw SupervisorError(.failed, "flotillad is shutting down") }
        guard let shape = Self.commands[command.name] else {
            throw SupervisorError(
                .unknownCommand, "unknown command '\(command.name)'; allowed: " + Self.commands.keys.sorted().joined(separator: ", "))
        }
        for key in command.arguments.keys where !shape.required.contains(key) && !shape.optional.contains(key) {
            let allowed = shape.required + shape.optional
            throw SupervisorError(
                .invalidArgument,
                "\(command.name): unknown argument '\(key)'; allowed: " + (allowed.isEmpty ? "none" : allowed.joined(separator: ", ")))
        }
        for key in shape.required where command.arguments[key] == nil {
            throw SupervisorError(.invalidArgument, "\(command.name): argument '\(key)' is missing")
        }
        func string(_ key: String) throws(SupervisorError) -> String {
            guard let value = command.arguments[key], let text = value.stringValue else {
                throw .invalid("\(command.name): \(key)", command.arguments[key]?.compactText, "a string")
            }
            return text
        }
        func flag(_ key: String) throws(SupervisorError) -> Bool? {
            guard let value = command.arguments[key] else { return nil }
            guard let flag = value.boolValue else { throw .invalid("\(command.name): \(key)", value.compactText, "true or false") }
            return flag
        }
        let done: (Result<Void, SupervisorError>) -> Void = { result in
            reply(result.map { () -> JSONValue in .null })
        }
        switch command.name {
        case "qmp_capabilities":
            reply(.success(.object([:])))
        case "vm-list":
            reply(.success(.array(supervisor.vms.keys.sorted().compactMap { supervisor.vms[$0]?.status })))
        case "vm-status":
            reply(.success(try supervisor.lookup(try string("name")).status))
        case "vm-create":
            let name = try string("name")
            try VMRecord.checkName(name, field: "vm-create: name")
            guard let config = command.arguments["config"], config.objectValue != nil else {
                throw .invalid("vm-create: config", command.arguments["config"]?.compactText, "a JSON object in StratoVirt's schema")
            }
            var document = config.objectValue ?? JSONObject()
            if let autostart = try flag("autostart") { document["autostart"] = .bool(autostart) }
            if command.arguments["restart"] != nil { document["restart"] = .string(try string("restart")) }
            let record = try VMRecord(document: .object(document), name: name, source: "vm-create: config")
            supervisor.create(record, start: try flag("start") ?? false, done: reply)
        case "vm-start":
            let vm = try supervisor.lookup(try string("name"))
            supervisor.start(vm) { [weak vm] result in reply(result.map { vm?.status ?? .null }) }
        case "vm-stop":
            let vm = try supervisor.lookup(try string("name"))
            supervisor.stopVM(vm) { [weak vm] in reply(.success(vm?.status ?? .null)) }
        case "vm-restart":
            let vm = try supervisor.lookup(try string("name"))
            supervisor.restart(vm) { [weak vm] result in reply(result.map { vm?.status ?? .null }) }
        case "vm-delete":
            let vm = try supervisor.lookup(try string("name"))
            supervisor.delete(vm) { result in done(result) }
        default:
            throw SupervisorError(.unknownCommand, "unknown command '\(command.name)'")
        }
    }
}
