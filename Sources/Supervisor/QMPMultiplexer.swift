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
    /// A reply for a client, unparsed: its bytes, their top-level members and the `id` member.
    var onRawReply: (Origin, [UInt8], TopLevelMembers, TopLevelMembers.Member) -> Void = { _, _, _, _ in }
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
        if phase == .ready, case .message(let bytes) = piece, forwardReply(bytes) { return }
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

    /// The hot path for a client's reply: found by its wire id without a parse, and handed
    /// over as the worker's own bytes. False for events, flotillad's own commands and
    /// anything unusual, which take the parsing path.
    private func forwardReply(_ bytes: [UInt8]) -> Bool {
        guard let members = TopLevelMembers(bytes), members.named(TopLevelMembers.eventKey, in: bytes).isEmpty else { return false }
        let ids = members.named(TopLevelMembers.idKey, in: bytes)
        guard ids.count == 1, let id = TopLevelMembers.unsigned(bytes[ids[0].value]), case .client = pending[id] else { return false }
        guard let origin = pending.removeValue(forKey: id) else { return false }
        onRawReply(origin, bytes, members, ids[0])
        return true
    }

    /// Sends a client's command as the client wrote it (`text`, already checked by
    /// QMP.parseCommand as `command`), with only its id replaced by a wire id of our own.
    func forward(text: [UInt8], command: QMP.Command, origin: Origin) {
        guard let members = TopLevelMembers(text) else {
            execute(name: command.name, arguments: command.arguments, origin: origin)
            return
        }
        let ids = members.named(TopLevelMembers.idKey, in: text)
        let id = nextID
        let wireID = Array(String(id).utf8)
        var framed: [UInt8] = []
        framed.reserveCapacity(text.count + 32)
        if command.id != nil, ids.count == 1 {
            framed += text[..<ids[0].value.lowerBound]
            framed += wireID
            framed += text[ids[0].value.upperBound...]
        } else if command.id == nil, ids.isEmpty, let open = text.firstIndex(of: UInt8(ascii: "{")) {
            framed += text[...open]
            framed += Array("\"id\":".utf8) + wireID + [UInt8(ascii: ",")]
            framed += text[(open + 1)...]
        } else {
            // An id spelled with escapes: let the parsed command speak.
            execute(name: command.name, arguments: command.arguments, origin: origin)
            return
        }
        framed += [0x0d, 0x0a]
        nextID += 1
        pending[id] = origin
        connection.send(framed: framed)
    }

    /// Sends a command for `origin` with a wire id of its own; with `fd`, that descriptor
    /// goes with it (SCM_RIGHTS, as QEMU's getfd expects) and is closed here once passed.
    func execute(name: String, arguments: JSONObject, origin: Origin, passing fd: Int32? = nil) {
        let id = nextID
        nextID += 1
        pending[id] = origin
        let message = QMP.Command(name: name, arguments: arguments, id: .integer(id)).jsonValue
        if let fd {
            connection.send(framed: QMP.frame(message), passing: fd)
        } else {
            connection.send(message)
        }
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
///
/// With `handoff` (flotillad --qmp-handoff) clients are not proxied: each accepted socket
/// is passed to the worker with QEMU's own mechanism, `getfd` (the descriptor rides on the
/// command, SCM_RIGHTS) then `add_client` with protocol "qmp" (QMP reference), and flotillad
/// closes its copy. The worker greets and serves the client directly, so round trips cost
/// what they cost without flotillad, and the client outlives a flotillad restart; flotillad
/// then neither sees nor polices what the client sends.
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
    private let handoff: Bool
    /// Clients passed to the worker so far (hand-off mode).
    private(set) var handedOff = 0
    /// Events also go to flotillad itself (STOP/RESUME/SHUTDOWN change a VM's state).
    var onEvent: (JSONObject) -> Void = { _ in }
    var clientCount: Int { clients.count }

    /// Reports a hand-off the worker refused: the client name and the worker's error.
    var onHandoffFailure: (String, JSONObject) -> Void = { _, _ in }

    init(path: String, worker: WorkerQMPConnection, reactor: Reactor, handoff: Bool = false) throws(SystemCallError) {
        self.worker = worker
        self.reactor = reactor
        self.handoff = handoff
        worker.onEvent = { [weak self] event in self?.fanOut(event) }
        worker.onReply = { [weak self] origin, reply in self?.route(origin, reply) }
        worker.onRawReply = { [weak self] origin, bytes, members, id in self?.route(origin, bytes, members, id) }
        listener = try Listener(path: path, mode: 0o660, reactor: reactor) { [weak self] fd in self?.accept(fd) }
    }

    private func accept(_ fd: Int32) {
        if handoff {
            handOff(fd)
            return
        }
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

    /// Passes the accepted client `fd` to the worker: `getfd` carrying it, then `add_client`
    /// naming it, both on flotillad's own worker connection with its own wire ids (QMP
    /// reference "getfd", "add_client"). flotillad never reads from the client, so the
    /// worker's greeting reaches it untouched. On the worker's refusal the worker closes its
    /// copy and the client sees the connection end.
    private func handOff(_ fd: Int32) {
        guard worker.isReady else {
            Sys.close(fd)
            return
        }
        let name = "flotillad-client-\(nextClient)"
        nextClient += 1
        let report: (JSONObject) -> Void = { [weak self] reply in
            if reply["error"] != nil { self?.onHandoffFailure(name, reply) }
        }
        worker.execute(name: "getfd", arguments: ["fdname": .string(name)], origin: .supervisor(report), passing: fd)
        worker.execute(name: "add_client", arguments: ["protocol": "qmp", "fdname": .string(name)], origin: .supervisor(report))
        handedOff += 1
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
        if case .message(let text) = piece {
            worker.forward(text: text, command: command, origin: .client(id, command.id))
        }
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

    /// The hot path of ``route(_:_:)``: the worker's reply bytes with only the id replaced by
    /// the client's own (or removed when the client sent none).
    private func route(_ origin: WorkerQMPConnection.Origin, _ bytes: [UInt8], _ members: TopLevelMembers, _ id: TopLevelMembers.Member) {
        guard case .client(let clientID, let originalID) = origin, let client = clients[clientID] else { return }
        var framed: [UInt8] = []
        framed.reserveCapacity(bytes.count + 32)
        if let originalID {
            framed += bytes[..<id.value.lowerBound]
            framed += Array(originalID.compactText.utf8)
            framed += bytes[id.value.upperBound...]
        } else if let index = members.members.firstIndex(where: { $0.range == id.range }), members.members.count > 1 {
            // Remove the member and one comma next to it.
            let cut =
                index > 0
                ? members.members[index - 1].range.upperBound..<id.range.upperBound
                : id.range.lowerBound..<members.members[index + 1].range.lowerBound
            framed += bytes[..<cut.lowerBound]
            framed += bytes[cut.upperBound...]
        } else {
            guard let reply = (try? JSONValue.parse(bytes: bytes))?.objectValue else { return }
            route(origin, reply)
            return
        }
        framed += [0x0d, 0x0a]
        client.connection.send(framed: framed)
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

/// The members of a JSON object text, found without building a JSONValue: enough to read or
/// replace its top-level `id` on the multiplexer's hot path. Keys are compared as raw bytes, so
/// a key spelled with escapes is not found — callers fall back to a full parse then.
struct TopLevelMembers {
    struct Member {
        /// From the key's opening quote to the end of its value.
        var range: Range<Int>
        var key: Range<Int>
        var value: Range<Int>
    }

    let members: [Member]

    /// nil when `bytes` is not a single well-bracketed object.
    init?(_ bytes: [UInt8]) {
        var members: [Member] = []
        let count = bytes.count
        var index = 0
        func skipSpace() {
            while index < count, bytes[index] == 0x20 || bytes[index] == 0x09 || bytes[index] == 0x0a || bytes[index] == 0x0d {
                index += 1
            }
        }
        /// Moves past a string whose opening quote is at `index`.
        func skipString() -> Bool {
            index += 1
            while index < count {
                switch bytes[index] {
                case UInt8(ascii: "\\"): index += 2
                case UInt8(ascii: "\""):
                    index += 1
                    return true
                default: index += 1
                }
            }
            return false
        }
        func skipValue() -> Bool {
            guard index < count else { return false }
            switch bytes[index] {
            case UInt8(ascii: "\""):
                return skipString()
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                var depth = 0
                while index < count {
                    switch bytes[index] {
                    case UInt8(ascii: "\""):
                        guard skipString() else { return false }
                        continue
                    case UInt8(ascii: "{"), UInt8(ascii: "["): depth += 1
                    case UInt8(ascii: "}"), UInt8(ascii: "]"):
                        depth -= 1
                        if depth == 0 {
                            index += 1
                            return true
                        }
                    default: break
                    }
                    index += 1
                }
                return false
            default:
                let start = index
                while index < count,
                    ![UInt8(ascii: ","), UInt8(ascii: "}"), UInt8(ascii: "]"), 0x20, 0x09, 0x0a, 0x0d].contains(bytes[index])
                {
                    index += 1
                }
                return index > start
            }
        }
        skipSpace()
        guard index < count, bytes[index] == UInt8(ascii: "{") else { return nil }
        index += 1
        skipSpace()
        if index < count, bytes[index] == UInt8(ascii: "}") {
            index += 1
        } else {
            while true {
                skipSpace()
                guard index < count, bytes[index] == UInt8(ascii: "\"") else { return nil }
                let keyStart = index
                guard skipString() else { return nil }
                let key = keyStart..<index
                skipSpace()
                guard index < count, bytes[index] == UInt8(ascii: ":") else { return nil }
                index += 1
                skipSpace()
                let valueStart = index
                guard skipValue() else { return nil }
                members.append(Member(range: keyStart..<index, key: key, value: valueStart..<index))
                skipSpace()
                guard index < count else { return nil }
                if bytes[index] == UInt8(ascii: ",") {
                    index += 1
                    continue
                }
                guard bytes[index] == UInt8(ascii: "}") else { return nil }
                index += 1
                break
            }
        }
        skipSpace()
        guard index == count else { return nil }
        self.members = members
    }

    static let idKey = Array("\"id\"".utf8)
    static let eventKey = Array("\"event\"".utf8)

    /// The members whose key is exactly `quotedName` (with its quotes, no escapes).
    func named(_ quotedName: [UInt8], in bytes: [UInt8]) -> [Member] {
        members.filter { bytes[$0.key].elementsEqual(quotedName) }
    }

    /// A plain unsigned integer value (digits only), as flotillad's wire ids are written.
    static func unsigned(_ text: ArraySlice<UInt8>) -> UInt64? {
        guard !text.isEmpty, text.count <= 19 else { return nil }
        var value: UInt64 = 0
        for byte in text {
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
            value = value * 10 + UInt64(byte - UInt8(ascii: "0"))
        }
        return value
    }
}
