import CLinux
import Glibc
import Protocol
import Synchronization
import SystemPackage

/// `-serial unix:PATH,server,nowait`: the worker serves the guest's serial console (the 8250
/// UART, ttyS0) on a Unix stream socket itself, so the console survives supervisor restarts
/// and no supervisor sits in its data path.
///
/// - The UART writes guest output into a pipe whose write end is non-blocking
///   (``guestOutput``): when the pipe is full the byte is dropped, so a vCPU never blocks on
///   a slow or absent client. The main loop moves the pipe's bytes to the client.
/// - One client at a time, as StratoVirt's console: a second client is refused with a
///   one-line message and closed; the first keeps the console.
/// - The last ``historyCapacity`` bytes of output are kept and replayed to each new client,
///   so a client attaching late still sees the recent boot messages.
/// - A client that reads slower than the guest writes loses the oldest unsent output beyond
///   ``clientBacklogCapacity`` bytes.
/// - Client input goes to the UART's receive FIFO through the input sink; while the FIFO is
///   full the client is not read (retried every millisecond), as with `-serial stdio`.
///
/// The same socket serves a virtio-console port (``Kind/virtioConsole``, `-chardev`): the
/// device hands transmitq bytes to ``writeOutput(_:)`` on the loop thread (no pipe), and a
/// client that reads slower than the guest writes holds the guest back instead of losing
/// output (the device stops taking transmit buffers until ``setOutputSpaceHandler(_:)``'s
/// handler runs); with no client, output only feeds the replay history. Input the device
/// cannot place (no receive buffers) waits, with the client not read further, until the
/// device calls ``resumeInput()`` — no polling.
///
/// Handlers run on the main loop's thread; all mutable state sits in one `Mutex`. Callbacks
/// into the owner (the input sink, the output-space handler) run without that lock held, and
/// the output-space handler always from a fresh loop task, so an owner may call back in.
public final class ConsoleSocket: ConsolePort {
    /// What the socket serves.
    public enum Kind: Sendable {
        /// The 8250 UART: output through ``guestOutput`` (a pipe a vCPU writes without
        /// blocking), input retried every millisecond while the FIFO is full.
        case serial
        /// A virtio-console port: output through ``writeOutput(_:)``, input resumed by the device.
        case virtioConsole
    }

    public static let historyCapacity = 16 << 10
    public static let clientBacklogCapacity = 256 << 10
    /// What a second client reads before it is disconnected.
    static let busyMessage = "flotilla-vmm: this console is in use by another client (one client at a time)\r\n"

    public typealias InputSink = @Sendable ([UInt8]) -> Int

    private struct State {
        var listenToken: EventLoop.Token?
        var outputToken: EventLoop.Token?
        var client: Int32?
        var clientToken: EventLoop.Token?
        var clientWantsWritable = false
        var clientReadPaused = false
        var retryToken: EventLoop.Token?
        var history: [UInt8] = []
        var backlog: [UInt8] = []
        var input: [UInt8] = []
        var sink: InputSink?
        var outputSpace: (@Sendable () -> Void)?
        /// ``writeOutput(_:)`` refused bytes because the client's backlog was full.
        var outputBlocked = false
        var closed = false

        /// Keeps the newest ``ConsoleSocket/historyCapacity`` bytes. Only that much of `bytes`
        /// is ever copied, and room is made before appending: a virtio-console transmit buffer
        /// can be as large as guest RAM, and an array keeps the capacity it once grew to.
        mutating func remember(_ bytes: some Collection<UInt8>) {
            let kept = bytes.suffix(ConsoleSocket.historyCapacity)
            let excess = history.count + kept.count - ConsoleSocket.historyCapacity
            if excess > 0 { history.removeFirst(min(excess, history.count)) }
            history.append(contentsOf: kept)
        }

        /// The epoll events the client's registration waits for: no reading (and no
        /// read-side hang-up, which would fire until read) while input waits for the UART.
        var clientInterest: UInt32 {
            var events: UInt32 = clientReadPaused ? 0 : EPOLLIN.rawValue | EPOLLRDHUP.rawValue
            if clientWantsWritable { events |= EPOLLOUT.rawValue }
            return events
        }
    }

    public let path: String
    public let kind: Kind
    private let loop: EventLoop
    private let listenFD: Int32
    /// The UART's output pipe (``Kind/serial`` only).
    private let outputReadFD: Int32?
    private let outputWriteFD: Int32?
    private let state = Mutex(State())

    /// Bytes of memory the socket holds for replay, the client's backlog and input (their
    /// arrays' capacities): bounded by the capacities above, whatever the guest writes.
    var retainedBytes: Int { state.withLock { $0.history.capacity + $0.backlog.capacity + $0.input.capacity } }

    /// The descriptor the UART writes guest output to (nil for a virtio-console port).
    public var guestOutput: FileDescriptor? { outputWriteFD.map { FileDescriptor(rawValue: $0) } }

    /// Binds and listens on `path`, which must not exist (as for the api-channel: an
    /// existing file fails with EADDRINUSE and is left alone), mode 0600.
    public init(path: String, loop: EventLoop, kind: Kind = .serial) throws(SyscallError) {
        self.path = path
        self.loop = loop
        self.kind = kind
        var ends: [Int32] = [-1, -1]
        if kind == .serial {
            // pipe2 is hidden from Swift's Glibc; the worker spawns no process once it runs, so
            // setting close-on-exec right after pipe() leaks nothing.
            _ = try Syscall.once("pipe") { pipe(&ends) }
            for end in ends {
                _ = fcntl(end, F_SETFD, FD_CLOEXEC)
                _ = fcntl(end, F_SETFL, fcntl(end, F_GETFL) | O_NONBLOCK)
            }
            outputReadFD = ends[0]
            outputWriteFD = ends[1]
        } else {
            outputReadFD = nil
            outputWriteFD = nil
        }
        do {
            listenFD = try UnixSocket.listen(path: path, mode: 0o600)
        } catch {
            for end in ends where end >= 0 { Syscall.close(end) }
            throw error
        }
        do {
            let listenToken = try loop.register(fd: listenFD, events: EPOLLIN.rawValue) { [weak self] _ in self?.acceptClients() }
            state.withLock { $0.listenToken = listenToken }
            if let outputReadFD {
                let outputToken = try loop.register(fd: outputReadFD, events: EPOLLIN.rawValue) { [weak self] _ in
                    self?.readGuestOutput()
                }
                state.withLock { $0.outputToken = outputToken }
            }
        } catch {
            close()
            throw error
        }
    }

    /// The console socket that `serial` asks for (nil without `socket_path`), bound at an
    /// absolute path (a daemon changes to /). Errors read as the option's problem.
    public static func make(for serial: SerialConfig?, loop: EventLoop) throws(ConsoleSocketError) -> ConsoleSocket? {
        guard let path = serial?.socketPath else { return nil }
        do {
            return try ConsoleSocket(path: Paths.absolute(path), loop: loop)
        } catch  where error.errno == .addressInUse {
            throw ConsoleSocketError(description: "\(path) already exists; remove it first (as for the api-channel)")
        } catch {
            throw ConsoleSocketError(description: "\(path): \(error)")
        }
    }

    /// The socket for one `-chardev` (virtio-console port), bound at an absolute path.
    public static func make(for console: ConsoleConfig, loop: EventLoop) throws(ConsoleSocketError) -> ConsoleSocket {
        do {
            return try ConsoleSocket(path: Paths.absolute(console.socketPath), loop: loop, kind: .virtioConsole)
        } catch  where error.errno == .addressInUse {
            throw ConsoleSocketError(
                description:
                    "-chardev id=\(console.id): \(console.socketPath) already exists; remove it first (the console file must not exist)")
        } catch {
            throw ConsoleSocketError(description: "-chardev id=\(console.id): \(console.socketPath): \(error)")
        }
    }

    /// Where client input goes (the UART's receive path); returns how many bytes it took.
    /// Input that arrives earlier waits.
    public func setInputSink(_ sink: @escaping InputSink) {
        state.withLock { $0.sink = sink }
        loop.executeNowOrSoon { [weak self] in self?.deliverInput() }
    }

    /// Called (on the loop thread, from its own task) once output refused by
    /// ``writeOutput(_:)`` would be taken again.
    public func setOutputSpaceHandler(_ handler: @escaping @Sendable () -> Void) {
        state.withLock { $0.outputSpace = handler }
    }

    /// Offers waiting client input to the sink again (a virtio-console device calls it when
    /// the driver posts receive buffers). Any thread; runs on the loop thread soon.
    public func resumeInput() {
        loop.execute { [weak self] in self?.deliverInput() }
    }

    /// Guest output from a virtio-console port (loop thread): kept for replay and queued for
    /// the client. Returns how many bytes were taken: all of them without a client, else as
    /// many as fit the client's backlog (``clientBacklogCapacity``); when that is fewer, the
    /// output-space handler runs once the client has read enough.
    public func writeOutput(_ bytes: UnsafeRawBufferPointer) -> Int {
        let taken = state.withLock { s -> Int in
            guard !s.closed else { return bytes.count }
            var take = bytes.count
            if s.client != nil {
                take = min(take, max(Self.clientBacklogCapacity - s.backlog.count, 0))
                if take < bytes.count { s.outputBlocked = true }
                s.backlog.append(contentsOf: bytes[0..<take])
            }
            s.remember(bytes[0..<take])
            return take
        }
        if taken > 0 { flushClient() }
        return taken
    }

    /// Runs the output-space handler from a fresh loop task if output was refused.
    private func releaseOutput(_ s: inout State) {
        guard s.outputBlocked, let handler = s.outputSpace else { return }
        s.outputBlocked = false
        loop.execute(handler)
    }

    /// Stops listening, disconnects the client, removes the socket file and closes the
    /// pipe. Any thread: handlers do their system calls under the same lock and find
    /// everything closed afterwards. Call once no vCPU runs (the UART writes to the pipe).
    public func close() {
        let tokens = state.withLock { s -> [EventLoop.Token]? in
            guard !s.closed else { return nil }
            s.closed = true
            defer {
                s.listenToken = nil
                s.outputToken = nil
                s.clientToken = nil
                s.retryToken = nil
            }
            return [s.listenToken, s.outputToken, s.clientToken, s.retryToken].compactMap { $0 }
        }
        guard let tokens else { return }
        // Out of epoll first, then closed: a descriptor number is never reused while registered.
        for token in tokens { loop.unregister(token) }
        state.withLock { s in
            if let client = s.client { Syscall.close(client) }
            s.client = nil
            s.backlog = []
            s.input = []
            Syscall.close(listenFD)
            _ = unlink(path)
            if let outputReadFD { Syscall.close(outputReadFD) }
            if let outputWriteFD { Syscall.close(outputWriteFD) }
        }
    }

    // MARK: - Loop handlers (system calls under the lock, so close() cannot race them)

    private func acceptClients() {
        for _ in 0..<UnixSocket.acceptsPerWakeup {
            enum Accepted {
                case none
                case refused
                case client(Int32)
            }
            let accepted = state.withLock { s -> Accepted in
                guard !s.closed else { return .none }
                let fd: Int32
                switch UnixSocket.acceptOne(listenFD) {
                case .connection(let accepted): fd = accepted
                case .drained: return .none
                case .shortage:
                    if let token = s.listenToken { loop.rest(token, events: EPOLLIN.rawValue) }
                    return .none
                }
                guard s.client == nil else {
                    Array(Self.busyMessage.utf8).withUnsafeBytes { _ = send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                    Syscall.close(fd)
                    return .refused
                }
                s.client = fd
                s.clientWantsWritable = false
                s.clientReadPaused = false
                // The recent output first, then whatever comes next.
                s.backlog = s.history
                return .client(fd)
            }
            switch accepted {
            case .none:
                return
            case .refused:
                continue
            case .client(let fd):
                do {
                    let token = try loop.register(fd: fd, events: EPOLLIN.rawValue | EPOLLRDHUP.rawValue) { [weak self] events in
                        self?.clientEvent(events)
                    }
                    let stale = state.withLock { s -> Bool in
                        guard s.client == fd else { return true }
                        s.clientToken = token
                        return false
                    }
                    if stale { loop.unregister(token) }
                } catch {
                    dropClient()
                }
                flushClient()
            }
        }
    }

    private func readGuestOutput() {
        guard let outputReadFD else { return }
        var chunk = [UInt8](repeating: 0, count: 4096)
        state.withLock { s in
            guard !s.closed else { return }
            while true {
                let count = chunk.withUnsafeMutableBytes { Glibc.read(outputReadFD, $0.baseAddress, $0.count) }
                if count < 0 && errno == EINTR { continue }
                guard count > 0 else { return }
                s.remember(chunk[0..<count])
                if s.client != nil {
                    s.backlog.append(contentsOf: chunk[0..<count])
                    if s.backlog.count > Self.clientBacklogCapacity {
                        s.backlog.removeFirst(s.backlog.count - Self.clientBacklogCapacity)
                    }
                }
                if count < chunk.count { return }
            }
        }
        flushClient()
    }

    private func clientEvent(_ events: UInt32) {
        if events & EPOLLOUT.rawValue != 0 { flushClient() }
        if events & (EPOLLERR.rawValue | EPOLLHUP.rawValue) != 0 {
            dropClient()
            return
        }
        if events & (EPOLLIN.rawValue | EPOLLRDHUP.rawValue) != 0 { readClient() }
    }

    /// Sends as much of the backlog as the client takes without blocking.
    private func flushClient() {
        var drop = false
        var interest: UInt32?
        var token: EventLoop.Token?
        state.withLock { s in
            guard let client = s.client else { return }
            while !s.backlog.isEmpty {
                let count = s.backlog.withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                if count > 0 {
                    s.backlog.removeFirst(count)
                    continue
                }
                if count < 0 && errno == EINTR { continue }
                if count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { break }
                drop = true
                return
            }
            if s.backlog.count < Self.clientBacklogCapacity { releaseOutput(&s) }
            let wantsWritable = !s.backlog.isEmpty
            if wantsWritable != s.clientWantsWritable {
                s.clientWantsWritable = wantsWritable
                interest = s.clientInterest
                token = s.clientToken
            }
        }
        if drop {
            dropClient()
        } else if let interest, let token {
            try? loop.modify(token, events: interest)
        }
    }

    private func readClient() {
        var chunk = [UInt8](repeating: 0, count: 256)
        let ended = state.withLock { s -> Bool in
            guard let client = s.client, !s.clientReadPaused else { return false }
            while true {
                let count = chunk.withUnsafeMutableBytes { recv(client, $0.baseAddress, $0.count, 0) }
                if count < 0 && errno == EINTR { continue }
                if count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return false }
                guard count > 0 else { return true }
                s.input.append(contentsOf: chunk[0..<count])
                return false
            }
        }
        if ended {
            dropClient()
        } else {
            deliverInput()
        }
    }

    /// Offers pending input to the UART; what it cannot take yet is retried every
    /// millisecond while the client is not read further.
    private func deliverInput() {
        let (pending, sink) = state.withLock { ($0.input, $0.sink) }
        guard !pending.isEmpty else { return }
        let accepted = sink?(pending) ?? 0
        var schedule = false
        var modify: (EventLoop.Token, UInt32)?
        var cancel: EventLoop.Token?
        state.withLock { s in
            s.input.removeFirst(min(accepted, s.input.count))
            let paused = !s.input.isEmpty
            if paused != s.clientReadPaused {
                s.clientReadPaused = paused
                if let token = s.clientToken { modify = (token, s.clientInterest) }
            }
            if paused {
                // A virtio-console device says when it has room again (resumeInput).
                schedule = kind == .serial && s.retryToken == nil && !s.closed
            } else {
                cancel = s.retryToken
                s.retryToken = nil
            }
        }
        if let modify { try? loop.modify(modify.0, events: modify.1) }
        if let cancel { loop.unregister(cancel) }
        if schedule {
            let token = try? loop.schedule(afterNanoseconds: 1_000_000) { [weak self] in
                guard let self else { return }
                self.state.withLock { $0.retryToken = nil }
                self.deliverInput()
            }
            state.withLock { $0.retryToken = token }
        }
    }

    private func dropClient() {
        let token = state.withLock { s -> EventLoop.Token? in
            defer { s.clientToken = nil }
            return s.clientToken
        }
        if let token { loop.unregister(token) }
        state.withLock { s in
            // Once closing, close() owns the descriptor.
            guard !s.closed else { return }
            if let client = s.client { Syscall.close(client) }
            s.client = nil
            s.backlog = []
            s.input = []
            s.clientReadPaused = false
            s.clientWantsWritable = false
            releaseOutput(&s)
        }
    }
}

/// The host end of a virtio-console port (``ConsoleSocket``, or a test's stand-in). The
/// device calls it on its loop thread, with its own lock held: implementations must not call
/// back into the device synchronously.
public protocol ConsolePort: AnyObject, Sendable {
    /// Takes guest output; returns how many bytes it took (fewer: the port is full for now,
    /// and the output-space handler runs when it has room).
    func writeOutput(_ bytes: UnsafeRawBufferPointer) -> Int
    /// Where host input goes; the sink returns how many bytes it placed.
    func setInputSink(_ sink: @escaping @Sendable ([UInt8]) -> Int)
    func setOutputSpaceHandler(_ handler: @escaping @Sendable () -> Void)
    /// The device has room for input again.
    func resumeInput()
}

/// Why the console socket could not be set up.
public struct ConsoleSocketError: Error, CustomStringConvertible, Sendable {
    public let description: String
}
