import CLinux
import Glibc
import Protocol
import Synchronization

/// A QMP command's failure, sent back as an `error` reply (QMP spec §2.4.2).
public struct QMPCommandError: Error, Sendable {
    public let errorClass: QMP.ErrorClass
    public let description: String

    public init(_ errorClass: QMP.ErrorClass = .genericError, _ description: String) {
        self.errorClass = errorClass
        self.description = description
    }
}

/// The commands a QMP server answers after capabilities negotiation, by name.
/// Handlers run on the server's event loop thread.
public struct QMPCommandTable: Sendable {
    public typealias Handler = @Sendable (_ arguments: JSONObject) -> Result<JSONValue, QMPCommandError>

    private(set) var handlers: [String: Handler] = [:]
    /// Called after a reply is sent (e.g. `quit` ends the process once its reply is out).
    private(set) var afterReply: [String: @Sendable () -> Void] = [:]

    public init() {}

    public mutating func register(_ name: String, afterReply: (@Sendable () -> Void)? = nil, _ handler: @escaping Handler) {
        handlers[name] = handler
        if let afterReply { self.afterReply[name] = afterReply }
    }

    public var names: [String] { handlers.keys.sorted() }
}

/// The api-channel: a QMP server on a Unix stream socket (QMP spec, docs/interop/qmp-spec.rst).
/// Any number of clients connect at once; each negotiates capabilities on its own and
/// receives every event once negotiated.
///
/// The server can listen before the machine exists (`init(path:loop:package:)`): clients are
/// greeted and negotiate capabilities at once, and the commands they send are held, in
/// order, until `open(commands:)` supplies the table once the VM is built.
public final class QMPServer: Sendable {
    public let path: String
    private let loop: EventLoop
    private let listenFD: Int32
    private let greeting: [UInt8]
    private let connections = Mutex<[Int32: QMPConnection]>([:])
    private let listenToken = Mutex<EventLoop.Token?>(nil)
    /// The command table once the machine is ready, and the commands that arrived before it.
    private let commandGate = Mutex<CommandGate>(CommandGate())

    private struct CommandGate {
        var table: QMPCommandTable?
        var held: [(connection: QMPConnection, command: QMP.Command)] = []
    }

    /// Binds and listens on `path` with the commands answered at once.
    public convenience init(path: String, loop: EventLoop, commands: QMPCommandTable, package: String) throws(SyscallError) {
        try self.init(path: path, loop: loop, package: package)
        commandGate.withLock { $0.table = Self.withNegotiation(commands) }
    }

    /// Binds and listens on `path`, which must not exist (as StratoVirt requires), with mode
    /// 0600: whoever can connect controls the VM. Commands are held until `open(commands:)`.
    public init(path: String, loop: EventLoop, package: String) throws(SyscallError) {
        self.path = path
        self.loop = loop
        greeting = QMP.frame(QMP.greeting(major: 0, minor: 1, micro: 0, package: package))
        listenFD = try UnixSocket.listen(path: path, mode: 0o600)
        do {
            let token = try loop.register(fd: listenFD, events: EPOLLIN.rawValue) { [weak self] _ in self?.acceptClients() }
            listenToken.withLock { $0 = token }
        } catch {
            Syscall.close(listenFD)
            _ = unlink(path)
            throw error
        }
    }

    /// Starts answering commands with `commands`, first those held since start-up, in the
    /// order they arrived. Any thread.
    public func open(commands: QMPCommandTable) {
        let table = Self.withNegotiation(commands)
        loop.execute { [self] in
            let held = commandGate.withLock { gate in
                gate.table = table
                defer { gate.held.removeAll() }
                return gate.held
            }
            for (connection, command) in held where !connection.isClosed {
                dispatch(command, from: connection, table: table)
            }
        }
    }

    /// `qmp_capabilities` after negotiation is an error (QMP spec §4).
    private static func withNegotiation(_ commands: QMPCommandTable) -> QMPCommandTable {
        var table = commands
        table.register("qmp_capabilities") { _ in
            .failure(QMPCommandError(.commandNotFound, "Capabilities negotiation is already complete, command ignored"))
        }
        return table
    }

    /// Stops listening, disconnects every client and removes the socket file.
    /// Call on the loop thread, or after the loop stopped.
    public func close() {
        if let token = listenToken.withLock({ token -> EventLoop.Token? in
            defer { token = nil }
            return token
        }) {
            loop.unregister(token)
            Syscall.close(listenFD)
            _ = unlink(path)
        }
        let all = connections.withLock { connections -> [QMPConnection] in
            defer { connections.removeAll() }
            return Array(connections.values)
        }
        for connection in all { connection.close() }
    }

    /// Sends an event to every client that completed capabilities negotiation. Any thread.
    public func broadcast(event name: String, data: JSONObject = JSONObject()) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let frame = QMP.frame(QMP.event(name, data: data, seconds: Int64(now.tv_sec), microseconds: Int64(now.tv_nsec / 1000)))
        // On the loop thread (a command handler) the event goes out at once, before the
        // command's reply, as QEMU orders STOP before stop's return.
        loop.executeNowOrSoon { [self] in
            for connection in connections.withLock({ Array($0.values) }) where connection.negotiated {
                connection.send(frame)
            }
        }
    }

    private func acceptClients() {
        while true {
            let fd = fl_accept_nonblocking(listenFD)
            if fd < 0 {
                if errno == EINTR { continue }
                return  // EAGAIN: no more pending connections; other errors: try again on the next event
            }
            let connection = QMPConnection(fd: fd, loop: loop) { [weak self] connection, piece in
                self?.handle(piece, from: connection)
            } onClose: { [weak self] fd in
                _ = self?.connections.withLock { $0.removeValue(forKey: fd) }
            }
            do {
                try connection.start()
            } catch {
                Syscall.close(fd)
                continue
            }
            connections.withLock { $0[fd] = connection }
            connection.send(greeting)
        }
    }

    private func handle(_ piece: JSONStreamSplitter.Piece, from connection: QMPConnection) {
        let text: [UInt8]
        switch piece {
        case .garbage(let reason):
            connection.send(QMP.frame(QMP.error(.genericError, "JSON parse error, \(reason)", id: nil)))
            return
        case .message(let bytes):
            text = bytes
        }
        let command: QMP.Command
        switch QMP.parseCommand(text) {
        case .failure(let error):
            connection.send(QMP.frame(QMP.error(.genericError, error.description, id: error.id)))
            return
        case .success(let parsed):
            command = parsed
        }
        if !connection.negotiated {
            // QMP spec §4: only qmp_capabilities is accepted in capabilities negotiation mode.
            guard command.name == "qmp_capabilities" else {
                connection.send(
                    QMP.frame(
                        QMP.error(
                            .commandNotFound, "Expecting capabilities negotiation with 'qmp_capabilities'", id: command.id)))
                return
            }
            if let enable = command.arguments["enable"], enable.arrayValue?.isEmpty != true {
                connection.send(
                    QMP.frame(QMP.error(.genericError, "Parameter 'enable' names a capability this server lacks", id: command.id)))
                return
            }
            connection.negotiated = true
            connection.send(QMP.frame(QMP.success(id: command.id)))
            return
        }
        let table = commandGate.withLock { gate -> QMPCommandTable? in
            if gate.table == nil { gate.held.append((connection, command)) }
            return gate.table
        }
        if let table { dispatch(command, from: connection, table: table) }
    }

    /// Runs one command and sends its reply. On the loop thread.
    private func dispatch(_ command: QMP.Command, from connection: QMPConnection, table commands: QMPCommandTable) {
        if command.name == "query-commands" {
            let names = commands.names + ["query-commands"]
            let list = JSONValue.array(names.sorted().map { .object(["name": .string($0)]) })
            connection.send(QMP.frame(QMP.success(list, id: command.id)))
            return
        }
        guard let handler = commands.handlers[command.name] else {
            connection.send(
                QMP.frame(QMP.error(.commandNotFound, "The command \(command.name) has not been found", id: command.id)))
            return
        }
        switch handler(command.arguments) {
        case .success(let value):
            connection.send(QMP.frame(QMP.success(value, id: command.id)))
        case .failure(let error):
            connection.send(QMP.frame(QMP.error(error.errorClass, error.description, id: command.id)))
        }
        commands.afterReply[command.name]?()
    }
}

/// One client connection.
///
/// `@unchecked Sendable`: every stored property except the immutable `fd`, `loop` and
/// callbacks is touched only on `loop`'s thread (handlers and `execute`d work run there).
final class QMPConnection: @unchecked Sendable {
    let fd: Int32
    private let loop: EventLoop
    private let onPiece: (QMPConnection, JSONStreamSplitter.Piece) -> Void
    private let onClose: (Int32) -> Void
    private var splitter = JSONStreamSplitter()
    private var output: [UInt8] = []
    private var token: EventLoop.Token?
    private var closed = false
    var negotiated = false
    var isClosed: Bool { closed }

    init(
        fd: Int32, loop: EventLoop,
        onPiece: @escaping (QMPConnection, JSONStreamSplitter.Piece) -> Void,
        onClose: @escaping (Int32) -> Void
    ) {
        self.fd = fd
        self.loop = loop
        self.onPiece = onPiece
        self.onClose = onClose
    }

    func start() throws(SyscallError) {
        token = try loop.register(fd: fd, events: EPOLLIN.rawValue | EPOLLRDHUP.rawValue) { [self] events in
            handleEvents(events)
        }
    }

    private func handleEvents(_ events: UInt32) {
        if events & EPOLLOUT.rawValue != 0 { flush() }
        if events & (EPOLLIN.rawValue | EPOLLHUP.rawValue | EPOLLRDHUP.rawValue | EPOLLERR.rawValue) != 0 { readAvailable() }
    }

    private func readAvailable() {
        var chunk = [UInt8](repeating: 0, count: 4096)
        while !closed {
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count > 0 {
                for piece in splitter.append(chunk[0..<count]) {
                    onPiece(self, piece)
                    if closed { return }
                }
                continue
            }
            if count < 0 && errno == EINTR { continue }
            if count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return }
            close()  // end of stream or a socket error
            return
        }
    }

    /// Queues `bytes` and writes what the socket takes now.
    func send(_ bytes: [UInt8]) {
        guard !closed else { return }
        output.append(contentsOf: bytes)
        flush()
    }

    private func flush() {
        while !output.isEmpty, !closed {
            let count = output.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if count > 0 {
                output.removeFirst(count)
                continue
            }
            if count < 0 && errno == EINTR { continue }
            if count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { break }
            close()
            return
        }
        guard let token, !closed else { return }
        let events = EPOLLIN.rawValue | EPOLLRDHUP.rawValue | (output.isEmpty ? 0 : EPOLLOUT.rawValue)
        try? loop.modify(token, events: events)
    }

    func close() {
        guard !closed else { return }
        closed = true
        if let token { loop.unregister(token) }
        Syscall.close(fd)
        onClose(fd)
    }
}

/// Where command handlers send events: the server, once it exists (handlers are built
/// before the server they are registered with).
public final class QMPEventSink: Sendable {
    private let server = Mutex<QMPServer?>(nil)

    public init() {}

    public func attach(_ server: QMPServer) {
        self.server.withLock { $0 = server }
    }

    public func emit(_ name: String, data: JSONObject = JSONObject()) {
        server.withLock { $0 }?.broadcast(event: name, data: data)
    }
}
