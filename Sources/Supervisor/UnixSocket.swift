import CLinux
import Glibc
import Protocol
import SystemPackage

/// Unix stream sockets: listening, connecting, and the longest path a socket may have.
public enum UnixSocket {
    /// sun_path holds 108 bytes including the terminating NUL.
    public static let maximumPathLength = 107

    static func address(_ path: String) throws(SystemCallError) -> sockaddr_un {
        let bytes = Array(path.utf8)
        guard bytes.count <= maximumPathLength else {
            throw SystemCallError("socket path \(path) is \(bytes.count) bytes, longer than \(maximumPathLength)", .fileNameTooLong)
        }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in raw.copyBytes(from: bytes) }
        return address
    }

    /// Binds and listens on `path` (removing a stale socket file first) with `mode`.
    public static func listen(path: String, mode: mode_t, backlog: Int32 = 128) throws(SystemCallError) -> Int32 {
        var address = try address(path)
        let fd = try Sys.once("socket") {
            socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        }
        do throws(SystemCallError) {
            var info = stat()
            if lstat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFSOCK { _ = unlink(path) }
            _ = try Sys.once("bind \(path)") {
                withUnsafePointer(to: &address) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
                }
            }
            _ = try Sys.once("chmod \(path)") { chmod(path, mode) }
            _ = try Sys.once("listen \(path)") { Glibc.listen(fd, backlog) }
        } catch {
            Sys.close(fd)
            throw error
        }
        return fd
    }

    /// Connects to `path`; the returned socket is non-blocking and close-on-exec.
    public static func connect(path: String, blocking: Bool = false) throws(SystemCallError) -> Int32 {
        var address = try address(path)
        let fd = try Sys.once("socket") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        do throws(SystemCallError) {
            _ = try Sys.retrying("connect \(path)") {
                withUnsafePointer(to: &address) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                    }
                }
            }
            if !blocking {
                let flags = fcntl(fd, F_GETFL)
                _ = try Sys.once("fcntl O_NONBLOCK") { fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
            }
        } catch {
            Sys.close(fd)
            throw error
        }
        return fd
    }

    /// The credentials of the peer of a connected socket.
    public static func peerCredentials(_ fd: Int32) throws(SystemCallError) -> (pid: pid_t, uid: uid_t, gid: gid_t) {
        var pid: pid_t = 0
        var uid: uid_t = 0
        var gid: gid_t = 0
        _ = try Sys.once("getsockopt SO_PEERCRED") { fl_peer_credentials(fd, &pid, &uid, &gid) }
        return (pid, uid, gid)
    }
}

/// A listening socket on the reactor that hands each accepted connection to `onAccept`.
final class Listener {
    let path: String
    private let fd: Int32
    private let reactor: Reactor
    private var token: Reactor.Token?
    /// The socket file is ours to remove (false for a socket the service manager passed:
    /// it stays bound for the next flotillad).
    private let ownsPath: Bool

    /// Listens on `path`; with `inheritedFD` (socket activation) on that already listening
    /// socket instead, which is made non-blocking.
    init(path: String, mode: mode_t, inheritedFD: Int32? = nil, reactor: Reactor, onAccept: @escaping (Int32) -> Void)
        throws(SystemCallError)
    {
        self.path = path
        self.reactor = reactor
        if let inheritedFD {
            _ = try Sys.once("fcntl O_NONBLOCK") { fcntl(inheritedFD, F_SETFL, fcntl(inheritedFD, F_GETFL) | O_NONBLOCK) }
            _ = fcntl(inheritedFD, F_SETFD, FD_CLOEXEC)
            fd = inheritedFD
            ownsPath = false
        } else {
            fd = try UnixSocket.listen(path: path, mode: mode)
            ownsPath = true
        }
        let listenFD = fd
        do {
            token = try reactor.add(fd: fd, events: EPOLLIN.rawValue) { _ in
                while true {
                    let client = fl_accept_nonblocking(listenFD)
                    if client < 0 {
                        if errno == EINTR || errno == ECONNABORTED { continue }
                        return
                    }
                    onAccept(client)
                }
            }
        } catch {
            Sys.close(fd)
            if ownsPath { _ = unlink(path) }
            throw error
        }
    }

    /// Stops listening and removes the socket file (unless the service manager owns it).
    func close() {
        guard let token else { return }
        reactor.remove(token)
        self.token = nil
        Sys.close(fd)
        if ownsPath { _ = unlink(path) }
    }
}

/// One non-blocking JSON stream (a QMP or control connection) on the reactor: incoming bytes
/// are split into JSON texts, outgoing messages are queued and written as the peer reads.
final class JSONConnection {
    /// A peer that stops reading is dropped once this much is queued for it.
    static let maximumQueuedBytes = 8 << 20

    let fd: Int32
    private let reactor: Reactor
    private var token: Reactor.Token?
    private var splitter = JSONStreamSplitter()
    private var outgoing: [UInt8] = []
    /// Descriptors to pass (SCM_RIGHTS) with the queued message starting at `offset` in
    /// `outgoing`, in order; owned here until sent, closed if the connection closes first.
    private var outgoingFDs: [(offset: Int, fd: Int32)] = []
    private var closeAfterFlush = false
    private var watchingWritable = false
    var onPiece: (JSONStreamSplitter.Piece) -> Void = { _ in }
    var onClose: () -> Void = {}
    private(set) var isClosed = false

    /// Takes ownership of the connected, non-blocking socket `fd`.
    init(fd: Int32, reactor: Reactor) throws(SystemCallError) {
        self.fd = fd
        self.reactor = reactor
        do {
            token = try reactor.add(fd: fd, events: EPOLLIN.rawValue | EPOLLRDHUP.rawValue) { [weak self] events in
                self?.handle(events)
            }
        } catch {
            Sys.close(fd)
            throw error
        }
    }

    private func handle(_ events: UInt32) {
        if events & EPOLLOUT.rawValue != 0 { flush() }
        if isClosed { return }
        if events & (EPOLLIN.rawValue | EPOLLHUP.rawValue | EPOLLERR.rawValue | EPOLLRDHUP.rawValue) != 0 { readAvailable() }
    }

    private func readAvailable() {
        while !isClosed {
            let count = reactor.readBuffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count > 0 {
                // The splitter copies the bytes before any handler runs (a handler may read
                // another connection into the same buffer).
                let pieces = reactor.readBuffer.withUnsafeBufferPointer { splitter.append($0[0..<count]) }
                for piece in pieces {
                    if isClosed { return }
                    onPiece(piece)
                }
                // A short read drained the socket: epoll is level-triggered and reports
                // whatever arrives next, so no second recv just to see EAGAIN.
                if count < reactor.readBuffer.count { return }
                continue
            }
            if count < 0 && errno == EINTR { continue }
            if count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return }
            close()
            return
        }
    }

    func send(_ message: JSONValue) {
        send(framed: QMP.frame(message))
    }

    /// Sends bytes that already are one framed message (JSON text and CRLF).
    func send(framed bytes: [UInt8]) {
        guard !isClosed else { return }
        if outgoing.isEmpty {
            // The common case: nothing queued, so one send, and no copy into the queue
            // unless the peer cannot take it all.
            let count = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if count == bytes.count {
                if closeAfterFlush { close() }
                return
            }
            if count < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR {
                close()
                return
            }
            outgoing.append(contentsOf: bytes[max(0, count)...])
        } else {
            outgoing.append(contentsOf: bytes)
        }
        if outgoing.count > Self.maximumQueuedBytes {
            close()
            return
        }
        flush()
    }

    /// Sends one framed message with `fd` attached (SCM_RIGHTS, unix(7)), after whatever is
    /// queued. Takes ownership of `fd`: it is closed once the kernel holds its passed copy,
    /// or when the connection closes first.
    func send(framed bytes: [UInt8], passing fd: Int32) {
        guard !isClosed, !bytes.isEmpty else {
            Sys.close(fd)
            return
        }
        outgoingFDs.append((outgoing.count, fd))
        outgoing.append(contentsOf: bytes)
        if outgoing.count > Self.maximumQueuedBytes {
            close()
            return
        }
        flush()
    }

    /// Closes once everything queued has been written.
    func closeWhenFlushed() {
        closeAfterFlush = true
        flush()
    }

    private func flush() {
        while !outgoing.isEmpty && !isClosed {
            // Up to the next message that carries a descriptor, or that message with it.
            let passing = outgoingFDs.first.flatMap { $0.offset == 0 ? $0.fd : nil }
            let length =
                passing == nil ? (outgoingFDs.first?.offset ?? outgoing.count) : (outgoingFDs.dropFirst().first?.offset ?? outgoing.count)
            let count = outgoing.withUnsafeBytes { bytes in
                if let passing { return fl_send_with_fd(fd, bytes.baseAddress, length, 0, passing) }
                return Glibc.send(fd, bytes.baseAddress, length, Int32(MSG_NOSIGNAL))
            }
            if count > 0 {
                if let passing {
                    // The kernel attached it to the first byte sent and holds its own reference.
                    Sys.close(passing)
                    outgoingFDs.removeFirst()
                }
                outgoing.removeFirst(count)
                for index in outgoingFDs.indices { outgoingFDs[index].offset -= count }
                continue
            }
            if count < 0 && errno == EINTR { continue }
            if count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                watchWritable(true)
                return
            }
            close()
            return
        }
        if isClosed { return }
        watchWritable(false)
        if closeAfterFlush { close() }
    }

    /// EPOLLOUT only while something is queued; epoll_ctl only when that changes.
    private func watchWritable(_ wanted: Bool) {
        guard wanted != watchingWritable, let token else { return }
        watchingWritable = wanted
        reactor.modify(token, events: EPOLLIN.rawValue | EPOLLRDHUP.rawValue | (wanted ? EPOLLOUT.rawValue : 0))
    }

    func close() {
        guard !isClosed else { return }
        isClosed = true
        if let token { reactor.remove(token) }
        token = nil
        Sys.close(fd)
        outgoing.removeAll()
        for (_, passing) in outgoingFDs { Sys.close(passing) }
        outgoingFDs.removeAll()
        let handler = onClose
        onClose = {}
        onPiece = { _ in }
        handler()
    }
}
