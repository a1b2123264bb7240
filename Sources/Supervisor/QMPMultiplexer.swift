import Glibc
import Protocol

/// flotillad's one QMP connection to a worker's api-channel. It negotiates capabilities
/// itself, then carries commands from many origins: each gets a fresh integer id on the
/// wire, and the reply goes back to the origin that asked.
final class WorkerQMPConnection {
    enum Origin {
        /// A multiplexer client and the id it used (any JSON value, or none).
        case client(UInt64, JSONValue?)
        /// flotillad itself (quit, query-status).
        case supervisor((JSONObject) -> Void)
    }

    private enum Phase {
        case greeting
        case negotiating
        case ready
    }

    private let connection: JSONConnection
    private var phase = Phase.greeting
    private(set) var greeting: JSONValue?
    private var pending: [UInt64: Origin] = [:]
    private var nextID: UInt64 = 1
    var isReady: Bool { phase == .ready && !connection.isClosed }

    private var onReady: ((Result<Void, SupervisorError>) -> Void)?
    var onReply: (Origin, JSONObject) -> Void = { _, _ in }
    var onEvent: (JSONObject) -> Void = { _ in }
    var onClose: () -> Void = {}

    /// Connects to the worker at `path`; `ready` runs once capabilities are negotiated, or
    /// with the reason it could not be.
    init(path: String, reactor: Reactor, ready: @escaping (Result<Void, SupervisorError>) -> Void) throws(SystemCallError) {
        let fd = try UnixSocket.connect(path: path)
        connection = try JSONConnection(fd: fd, reactor: reactor)
        onReady = ready
        connection.onPiece = { [weak self] piece in self?.received(piece) }
        connection.onClose = { [weak self] in self?.closed() }
    }

    private func finishReady(_ result: Result<Void, SupervisorError>) {
        let handler = onReady
        onReady = nil
        handler?(result)
    }

    private func received(_ piece: JSONStreamSplitter.Piece) {
        guard case .message(let bytes) = piece, let object = (try? JSONValue.parse(bytes: bytes))?.objectValue else {
            // A worker never sends garbage; if it did, there is nothing to route it to.
            return
        }
        switch phase {
        case .greeting:
            guard object["QMP"] != nil else {
                connection.close()
                return
            }
            greeting = .object(object)
            phase = .negotiating
            connection.send(QMP.Command(name: "qmp_capabilities", id: "flotillad-negotiation").jsonValue)
        case .negotiating:
            if object["event"] != nil { return }
            if object["return"] != nil {
                phase = .ready
                finishReady(.success(()))
            } else {
                finishReady(
                    .failure(SupervisorError(.failed, "the worker refused qmp_capabilities: \(JSONValue.object(object).compactText)")))
                connection.close()
            }
        case .ready:
            if object["event"] != nil {
                onEvent(object)
                return
            }
            guard let id = object["id"]?.numberValue?.unsignedValue, let origin = pending.removeValue(forKey: id) else { return }
            onReply(origin, object)
        }
    }

    /// Sends a command for `origin` with a wire id of its own.
    func execute(name: String, arguments: JSONObject, origin: Origin) {
        let id = nextID
        nextID += 1
        pending[id] = origin
        connection.send(QMP.Command(name: name, arguments: arguments, id: .integer(id)).jsonValue)
    }

    private func closed() {
        phase = .greeting
        finishReady(.failure(SupervisorError(.failed, "the worker closed its QMP connection during negotiation")))
        let orphans = pending
        pending.removeAll()
        let error: JSONObject = ["error": ["class": "GenericError", "desc": "the VM's QMP connection closed before it replied"]]
        for (_, origin) in orphans.sorted(by: { $0.key < $1.key }) { onReply(origin, error) }
        onClose()
    }

    func close() {
        connection.close()
    }
}

/// `<runtime-dir>/vms/<name>/qmp.sock`: a standard QMP endpoint in front of one worker. Each
/// client gets the worker's greeting and negotiates capabilities on its own; commands go
/// through the one worker connection with ids rewritten, and each reply carries the client's
/// own id back; events reach every negotiated client.
final class QMPMultiplexer {
    private final class Client {
        let connection: JSONConnection
        var negotiated = false
        init(connection: JSONConnection) { self.connection = connection }
    }

    private let worker: WorkerQMPConnection
    private let reactor: Reactor
    private var listener: Listener?
    private var clients: [UInt64: Client] = [:]
    private var nextClient: UInt64 = 1
    /// Events also go to flotillad itself (STOP/RESUME/SHUTDOWN change a VM's state).
    var onEvent: (JSONObject) -> Void = { _ in }
    var clientCount: Int { clients.count }

    init(path: String, worker: WorkerQMPConnection, reactor: Reactor) throws(SystemCallError) {
        self.worker = worker
        self.reactor = reactor
        worker.onEvent = { [weak self] event in self?.fanOut(event) }
        worker.onReply = { [weak self] origin, reply in self?.route(origin, reply) }
        listener = try Listener(path: path, mode: 0o660, reactor: reactor) { [weak self] fd in self?.accept(fd) }
    }

    private func accept(_ fd: Int32) {
        let connection: JSONConnection
        do {
            connection = try JSONConnection(fd: fd, reactor: reactor)
        } catch {
            return
        }
        let id = nextClient
        nextClient += 1
        let client = Client(connection: connection)
        clients[id] = client
        connection.onPiece = { [weak self] piece in self?.received(piece, from: id) }
        connection.onClose = { [weak self] in self?.clients[id] = nil }
        connection.send(worker.greeting ?? QMP.greeting(major: 0, minor: 0, micro: 0, package: "flotillad"))
    }

    private func received(_ piece: JSONStreamSplitter.Piece, from id: UInt64) {
        guard let client = clients[id] else { return }
        let command: QMP.Command
        switch piece {
        case .garbage(let reason):
            client.connection.send(QMP.error(.genericError, "JSON parse error, \(reason)", id: nil))
            return
        case .message(let bytes):
            switch QMP.parseCommand(bytes) {
            case .failure(let error):
                client.connection.send(QMP.error(.genericError, error.description, id: error.id))
                return
            case .success(let parsed):
                command = parsed
            }
        }
        if command.name == "qmp_capabilities" {
            if client.negotiated {
                client.connection.send(
                    QMP.error(.commandNotFound, "Capabilities negotiation is already complete, command ignored", id: command.id))
            } else if let enable = command.arguments["enable"], enable.arrayValue?.isEmpty != true {
                client.connection.send(
                    QMP.error(
                        .genericError, "Capability '\(enable.arrayValue?.first?.stringValue ?? enable.compactText)' not available",
                        id: command.id))
            } else {
                client.negotiated = true
                client.connection.send(QMP.success(id: command.id))
            }
            return
        }
        guard client.negotiated else {
            client.connection.send(
                QMP.error(.commandNotFound, "Expecting capabilities negotiation with 'qmp_capabilities'", id: command.id))
            return
        }
        guard worker.isReady else {
            client.connection.send(QMP.error(.genericError, "the VM's QMP connection is not available", id: command.id))
            return
        }
        worker.execute(name: command.name, arguments: command.arguments, origin: .client(id, command.id))
    }

    private func route(_ origin: WorkerQMPConnection.Origin, _ reply: JSONObject) {
        switch origin {
        case .supervisor(let handler):
            handler(reply)
        case .client(let id, let originalID):
            // A client that left mid-command simply gets nothing.
            guard let client = clients[id] else { return }
            var rewritten = reply
            rewritten["id"] = originalID
            client.connection.send(.object(rewritten))
        }
    }

    private func fanOut(_ event: JSONObject) {
        for (_, client) in clients.sorted(by: { $0.key < $1.key }) where client.negotiated {
            client.connection.send(.object(event))
        }
        onEvent(event)
    }

    /// flotillad's own command on the worker connection.
    func execute(_ name: String, arguments: JSONObject = JSONObject(), reply: @escaping (JSONObject) -> Void) {
        guard worker.isReady else {
            reply(["error": ["class": "GenericError", "desc": "the VM's QMP connection is not available"]])
            return
        }
        worker.execute(name: name, arguments: arguments, origin: .supervisor(reply))
    }

    /// Stops listening, removes the socket and disconnects every client.
    func close() {
        listener?.close()
        listener = nil
        for client in clients.values { client.connection.closeWhenFlushed() }
        clients.removeAll()
    }
}
