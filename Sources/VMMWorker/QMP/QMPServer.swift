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
    /// A command that may take descriptors the client passed before with getfd.
    public typealias DescriptorHandler =
        @Sendable (_ arguments: JSONObject, _ descriptors: QMPNamedDescriptors) -> Result<JSONValue, QMPCommandError>

    private(set) var handlers: [String: DescriptorHandler] = [:]
    /// Called after a reply is sent (e.g. `quit` ends the process once its reply is out).
    private(set) var afterReply: [String: @Sendable () -> Void] = [:]

    public init() {}

    public mutating func register(_ name: String, afterReply: (@Sendable () -> Void)? = nil, _ handler: @escaping Handler) {
        handlers[name] = { arguments, _ in handler(arguments) }
        if let afterReply { self.afterReply[name] = afterReply }
    }

    /// Registers a command that may take descriptors the client holds by name (getfd), as
    /// QEMU's netdev_add fd= does (monitor_fd_param).
    public mutating func register(_ name: String, takingDescriptors handler: @escaping DescriptorHandler) {
        handlers[name] = handler
    }

    /// Registers a command that takes no arguments: any member of `arguments` is refused as
    /// QEMU refuses it ("Parameter 'x' is unexpected").
    public mutating func registerWithoutArguments(
        _ name: String, afterReply: (@Sendable () -> Void)? = nil, _ handler: @escaping @Sendable () -> Result<JSONValue, QMPCommandError>
    ) {
        register(name, afterReply: afterReply) { arguments in
            do throws(QMPArgumentError) {
                try QMPArguments.none(arguments)
            } catch {
                return .failure(QMPCommandError(.genericError, error.description))
            }
            return handler()
        }
    }

    public var names: [String] { handlers.keys.sorted() }
}

/// The descriptors one client connection holds by name (getfd), as a command handler sees
/// them: only for the duration of the call, on the server's loop thread.
public struct QMPNamedDescriptors {
    let taking: (String) -> Int32?

    /// Removes descriptor `name` from the connection and returns it, now the caller's to
    /// close (QEMU's monitor_get_fd); nil when the connection holds none by that name.
    public func take(_ name: String) -> Int32? { taking(name) }

    /// A connection without descriptors (for tests that call handlers directly).
    public static var none: QMPNamedDescriptors { QMPNamedDescriptors { _ in nil } }
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
        /// Each with the descriptors that arrived with it (SCM_RIGHTS), still to be claimed.
        var held: [(connection: QMPConnection, command: QMP.Command, fds: [Int32])] = []
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
            for (connection, command, fds) in held {
                if connection.isClosed {
                    QMPConnection.closeAll(fds)
                } else {
                    dispatch(command, from: connection, table: table, fds: fds)
                }
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
        let held = commandGate.withLock { gate in
            defer { gate.held.removeAll() }
            return gate.held
        }
        for entry in held { QMPConnection.closeAll(entry.fds) }
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
        for _ in 0..<UnixSocket.acceptsPerWakeup {
            switch UnixSocket.acceptOne(listenFD) {
            case .connection(let fd): _ = adopt(fd)
            case .drained: return
            case .shortage:
                if let token = listenToken.withLock({ $0 }) { loop.rest(token, events: EPOLLIN.rawValue) }
                return
            }
        }
    }

    /// Serves the connected, non-blocking socket `fd` as a new client: greeted, then in
    /// capabilities negotiation mode like any other. Closes `fd` and returns false if it
    /// cannot be watched. On the loop thread.
    private func adopt(_ fd: Int32) -> Bool {
        let connection = QMPConnection(fd: fd, loop: loop) { [weak self] connection, piece, fds in
            guard let self else {
                QMPConnection.closeAll(fds)
                return
            }
            self.handle(piece, from: connection, fds: fds)
        } onClose: { [weak self] fd in
            _ = self?.connections.withLock { $0.removeValue(forKey: fd) }
        }
        do {
            try connection.start()
        } catch {
            Syscall.close(fd)
            return false
        }
        connections.withLock { $0[fd] = connection }
        connection.send(greeting)
        return true
    }

    /// One piece of a client's input, with the descriptors that arrived with it (SCM_RIGHTS):
    /// a command that claims them (getfd) takes them, every other path closes them.
    private func handle(_ piece: JSONStreamSplitter.Piece, from connection: QMPConnection, fds: [Int32]) {
        let text: [UInt8]
        switch piece {
        case .garbage(let reason):
            QMPConnection.closeAll(fds)
            connection.send(QMP.frame(QMP.error(.genericError, "JSON parse error, \(reason)", id: nil)))
            return
        case .message(let bytes):
            text = bytes
        }
        let command: QMP.Command
        switch QMP.parseCommand(text) {
        case .failure(let error):
            QMPConnection.closeAll(fds)
            connection.send(QMP.frame(QMP.error(.genericError, error.description, id: error.id)))
            return
        case .success(let parsed):
            command = parsed
        }
        if !connection.negotiated {
            QMPConnection.closeAll(fds)
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
            if gate.table == nil { gate.held.append((connection, command, fds)) }
            return gate.table
        }
        if let table { dispatch(command, from: connection, table: table, fds: fds) }
    }

    /// The commands the server answers itself, for every table: they act on the connection
    /// (its named descriptors) or on the server (a new client).
    static let descriptorCommands = ["add_client", "closefd", "getfd"]

    /// Runs one command and sends its reply; `fds` arrived with it and are claimed by
    /// getfd or closed. On the loop thread.
    private func dispatch(_ command: QMP.Command, from connection: QMPConnection, table commands: QMPCommandTable, fds: [Int32]) {
        var fds = fds
        defer { QMPConnection.closeAll(fds) }
        if command.name == "query-commands" {
            let names = commands.names + ["query-commands"] + Self.descriptorCommands
            let list = JSONValue.array(Set(names).sorted().map { .object(["name": .string($0)]) })
            connection.send(QMP.frame(QMP.success(list, id: command.id)))
            return
        }
        let result: Result<JSONValue, QMPCommandError>
        switch command.name {
        case "getfd":
            let claimed = fds.isEmpty ? nil : fds.removeFirst()
            result = getfd(command.arguments, fd: claimed, on: connection)
        case "closefd":
            result = closefd(command.arguments, on: connection)
        case "add_client":
            result = addClient(command.arguments, on: connection)
        default:
            guard let handler = commands.handlers[command.name] else {
                connection.send(
                    QMP.frame(QMP.error(.commandNotFound, "The command \(command.name) has not been found", id: command.id)))
                return
            }
            result = handler(command.arguments, QMPNamedDescriptors { connection.namedFDs.removeValue(forKey: $0) })
        }
        switch result {
        case .success(let value):
            connection.send(QMP.frame(QMP.success(value, id: command.id)))
        case .failure(let error):
            connection.send(QMP.frame(QMP.error(error.errorClass, error.description, id: command.id)))
        }
        commands.afterReply[command.name]?()
    }

    /// QMP reference "getfd": keeps the descriptor that came with the command (SCM_RIGHTS)
    /// under `fdname` on this connection, replacing (and closing) one of the same name.
    private func getfd(_ arguments: JSONObject, fd: Int32?, on connection: QMPConnection) -> Result<JSONValue, QMPCommandError> {
        let fdname: String
        do throws(QMPCommandError) {
            try Self.checkArguments(arguments, allowed: ["fdname"])
            fdname = try Self.string("fdname", in: arguments)
        } catch {
            if let fd { Syscall.close(fd) }
            return .failure(error)
        }
        guard let fd else { return .failure(QMPCommandError(.genericError, "No file descriptor supplied via SCM_RIGHTS")) }
        // QEMU refuses names starting with a digit (they would read as descriptor numbers).
        if let first = fdname.utf8.first, first >= UInt8(ascii: "0"), first <= UInt8(ascii: "9") {
            Syscall.close(fd)
            return .failure(QMPCommandError(.genericError, "Parameter 'fdname' expects a name not starting with a digit"))
        }
        if let old = connection.namedFDs[fdname] {
            connection.namedFDs[fdname] = fd
            Syscall.close(old)
            return .success(.object([:]))
        }
        guard connection.namedFDs.count < QMPConnection.maximumNamedFDs else {
            Syscall.close(fd)
            return .failure(
                QMPCommandError(
                    .genericError,
                    "Parameter 'fdname' value '\(fdname)' is refused: this connection already holds "
                        + "\(QMPConnection.maximumNamedFDs) file descriptors, the most allowed; close one with closefd"))
        }
        connection.namedFDs[fdname] = fd
        return .success(.object([:]))
    }

    /// QMP reference "closefd": closes the descriptor this connection holds as `fdname`.
    private func closefd(_ arguments: JSONObject, on connection: QMPConnection) -> Result<JSONValue, QMPCommandError> {
        let fdname: String
        do throws(QMPCommandError) {
            try Self.checkArguments(arguments, allowed: ["fdname"])
            fdname = try Self.string("fdname", in: arguments)
        } catch {
            return .failure(error)
        }
        guard let fd = connection.namedFDs.removeValue(forKey: fdname) else {
            return .failure(QMPCommandError(.genericError, "File descriptor named '\(fdname)' not found"))
        }
        Syscall.close(fd)
        return .success(.object([:]))
    }

    /// QMP reference "add_client": the socket held as `fdname` (taken from this connection's
    /// descriptors, as QEMU's monitor_get_fd does) becomes a new client of this server,
    /// greeted and negotiating on its own. Only `protocol: "qmp"` is served here (QEMU's
    /// others are spice, vnc, @dbus-display and chardev names); `skipauth` is accepted and
    /// means nothing (there is no authentication), `tls: true` is refused.
    private func addClient(_ arguments: JSONObject, on connection: QMPConnection) -> Result<JSONValue, QMPCommandError> {
        let fdname: String
        let requestedProtocol: String
        do throws(QMPCommandError) {
            try Self.checkArguments(arguments, allowed: ["protocol", "fdname", "skipauth", "tls"])
            requestedProtocol = try Self.string("protocol", in: arguments)
            fdname = try Self.string("fdname", in: arguments)
            _ = try Self.bool("skipauth", in: arguments)
            if try Self.bool("tls", in: arguments) == true {
                throw QMPCommandError(
                    .genericError, "Parameter 'tls' value 'true' is not supported: the QMP socket has no TLS; allowed: false")
            }
        } catch {
            return .failure(error)
        }
        guard let fd = connection.namedFDs.removeValue(forKey: fdname) else {
            return .failure(QMPCommandError(.genericError, "File descriptor named '\(fdname)' has not been found"))
        }
        var info = stat()
        guard fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK else {
            Syscall.close(fd)
            return .failure(QMPCommandError(.genericError, "parameter @fdname must name a socket"))
        }
        guard requestedProtocol == "qmp" else {
            Syscall.close(fd)
            return .failure(
                QMPCommandError(
                    .genericError, "protocol '\(requestedProtocol)' is invalid; allowed: 'qmp' (a new QMP client of this server)"))
        }
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0, fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0 else {
            let code = errno
            Syscall.close(fd)
            return .failure(QMPCommandError(.genericError, "cannot make the socket non-blocking: \(String(cString: strerror(code)))"))
        }
        guard adopt(fd) else { return .failure(QMPCommandError(.genericError, "failed to add client")) }
        return .success(.object([:]))
    }

    /// QEMU's argument checks, with its wording (qapi visitors).
    private static func checkArguments(_ arguments: JSONObject, allowed: Set<String>) throws(QMPCommandError) {
        for key in arguments.keys.sorted() where !allowed.contains(key) {
            throw QMPCommandError(.genericError, "Parameter '\(key)' is unexpected")
        }
    }

    private static func string(_ key: String, in arguments: JSONObject) throws(QMPCommandError) -> String {
        guard let value = arguments[key] else { throw QMPCommandError(.genericError, "Parameter '\(key)' is missing") }
        guard let text = value.stringValue else {
            throw QMPCommandError(.genericError, "Invalid parameter type for '\(key)', expected: string")
        }
        return text
    }

    private static func bool(_ key: String, in arguments: JSONObject) throws(QMPCommandError) -> Bool? {
        guard let value = arguments[key] else { return nil }
        guard case .bool(let flag) = value else {
            throw QMPCommandError(.genericError, "Invalid parameter type for '\(key)', expected: boolean")
        }
        return flag
    }
}

/// One client connection.
///
/// `@unchecked Sendable`: every stored property except the immutable `fd`, `loop` and
/// callbacks is touched only on `loop`'s thread (handlers and `execute`d work run there).
final class QMPConnection: @unchecked Sendable {
    /// The most descriptors a connection may hold by name (getfd) at once.
    static let maximumNamedFDs = 16

    let fd: Int32
    private let loop: EventLoop
    /// A complete piece of input and the descriptors that arrived with it, now the
    /// callee's to keep or close.
    private let onPiece: (QMPConnection, JSONStreamSplitter.Piece, [Int32]) -> Void
    private let onClose: (Int32) -> Void
    private var splitter = JSONStreamSplitter()
    private var output: [UInt8] = []
    private var token: EventLoop.Token?
    private var closed = false
    /// Descriptors that arrived in the middle of a command not yet complete: they go with it.
    private var pendingFDs: [Int32] = []
    /// Descriptors kept by getfd, by name (QMP reference "getfd"); closed with the connection.
    var namedFDs: [String: Int32] = [:]
    var negotiated = false
    var isClosed: Bool { closed }

    init(
        fd: Int32, loop: EventLoop,
        onPiece: @escaping (QMPConnection, JSONStreamSplitter.Piece, [Int32]) -> Void,
        onClose: @escaping (Int32) -> Void
    ) {
        self.fd = fd
        self.loop = loop
        self.onPiece = onPiece
        self.onClose = onClose
    }

    static func closeAll(_ fds: [Int32]) {
        for fd in fds { Syscall.close(fd) }
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

    /// Reads with recvmsg so that descriptors passed with SCM_RIGHTS arrive (close-on-exec).
    /// On a stream socket Linux ends a read right after the message that carried them
    /// (unix(7)), so they belong to the command whose text reaches the end of this read: the
    /// last one completed here if nothing but white space follows it, else the next one to
    /// complete. Descriptors that arrive with white space alone are closed.
    private func readAvailable() {
        var chunk = [UInt8](repeating: 0, count: 4096)
        var received = [Int32](repeating: -1, count: Int(FL_FDPASS_MAX))
        while !closed {
            var receivedCount: Int32 = 0
            let count = chunk.withUnsafeMutableBytes { bytes in
                received.withUnsafeMutableBufferPointer {
                    fl_recv_with_fds(fd, bytes.baseAddress, bytes.count, 0, $0.baseAddress, &receivedCount)
                }
            }
            let arrived = Array(received.prefix(Int(receivedCount)))
            if count > 0 {
                let bytes = chunk[0..<count]
                let pieces = splitter.append(bytes)
                var given = [[Int32]](repeating: [], count: pieces.count)
                if !pieces.isEmpty {
                    given[0] = pendingFDs
                    pendingFDs = []
                }
                if !arrived.isEmpty {
                    if let last = pieces.last, Self.piece(last, endsContentOf: bytes) {
                        given[pieces.count - 1] += arrived
                    } else if bytes.contains(where: { !Self.isSpace($0) }) {
                        pendingFDs += arrived
                    } else {
                        Self.closeAll(arrived)
                    }
                    if pendingFDs.count > Int(FL_FDPASS_MAX) {
                        Self.closeAll(Array(pendingFDs.dropLast(Int(FL_FDPASS_MAX))))
                        pendingFDs = Array(pendingFDs.suffix(Int(FL_FDPASS_MAX)))
                    }
                }
                for (index, piece) in pieces.enumerated() {
                    if closed {
                        Self.closeAll(given[index])
                        continue
                    }
                    onPiece(self, piece, given[index])
                }
                if closed { return }
                continue
            }
            Self.closeAll(arrived)
            if count < 0 && errno == EINTR { continue }
            if count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return }
            close()  // end of stream or a socket error
            return
        }
    }

    private static func isSpace(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x09 || byte == 0x0a || byte == 0x0d
    }

    /// Whether `piece` ends where the non-white-space content of `bytes` ends (the piece may
    /// have begun in an earlier read).
    private static func piece(_ piece: JSONStreamSplitter.Piece, endsContentOf bytes: ArraySlice<UInt8>) -> Bool {
        guard case .message(let text) = piece else { return true }  // garbage: closed with it
        var end = bytes.endIndex
        while end > bytes.startIndex, isSpace(bytes[end - 1]) { end -= 1 }
        let content = bytes[bytes.startIndex..<end]
        let compared = min(content.count, text.count)
        return compared > 0 && content.suffix(compared).elementsEqual(text.suffix(compared))
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
        Self.closeAll(pendingFDs)
        Self.closeAll(Array(namedFDs.values))
        pendingFDs = []
        namedFDs = [:]
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
