import CLinux
import Glibc
import Synchronization

/// A virtio socket device (virtio 1.2 §5.10) served in user space, with its host side on Unix
/// sockets as Firecracker's "hybrid vsock":
///
/// - host-initiated: a host process connects to ``VsockListener`` and writes `CONNECT <port>\n`;
///   the device sends OP_REQUEST to the guest's port; on OP_RESPONSE it writes
///   `OK <host port>\n` (the host port is one the device chose) and the bytes flow; on OP_RST
///   the client is closed.
/// - guest-initiated, to CID 2 port P: the device connects to the Unix socket `<uds path>_P`;
///   success answers OP_RESPONSE, failure OP_RST.
///
/// Stream semantics (§5.10.6.3–6): OP_RW both ways under credit flow control — the guest is
/// never sent more than the `buf_alloc` it advertised minus what it has not yet forwarded; the
/// device advertises ``bufferAllocation`` per connection and keeps that promise: what the
/// host socket does not take at once waits in the connection's buffer (never more than that),
/// and a guest that sends beyond its credit is reset. The host side is back-pressured: a
/// socket is not read while the guest has no credit or no receive buffers. OP_SHUTDOWN and
/// OP_RST tear connections down; at most ``defaultMaxConnections`` exist (handshakes included), so a
/// guest cannot make the VMM run out of descriptors.
///
/// Everything runs on the device's event loop (the main loop); the state is behind one
/// Mutex, also taken by vCPU threads on activation and reset.
public final class VirtioVsockDevice: VirtioDevice {
    public static let queueSize: UInt16 = 256
    /// Connections (and host clients still sending their CONNECT line) at once, by default.
    public static let defaultMaxConnections = 128
    /// The receive buffer the device advertises per connection (§5.10.6.3 buf_alloc): the most
    /// guest bytes it holds for a host socket that does not read.
    public static let bufferAllocation: UInt32 = 128 << 10
    /// How long a host-initiated connection waits for the guest's OP_RESPONSE or OP_RST: a
    /// guest that never answers would otherwise hold the client, and a slot of the connection
    /// cap, until the device resets. (Firecracker waits 2 s; a guest here may be emulated
    /// instruction by instruction, so it gets longer.)
    public static let defaultRequestTimeoutNanoseconds: UInt64 = 10_000_000_000
    /// How long a host client has to send its `CONNECT <port>\n` line (Firecracker's 2 s): one
    /// that connects and sends nothing would otherwise hold a descriptor, and a handshake slot,
    /// for as long as it likes.
    public static let defaultHandshakeTimeoutNanoseconds: UInt64 = 2_000_000_000
    /// How long a connection the guest shut down both ways may wait for its bytes to reach a
    /// host socket that does not read before it is reset (§5.10.6.6: without an OP_RST in an
    /// implementation-specific time, OP_RST forcibly disconnects).
    public static let defaultCloseTimeoutNanoseconds: UInt64 = 10_000_000_000
    /// Host clients still sending their CONNECT line at once. They have their own cap, so
    /// that clients which connect and stay silent cannot take the connection slots that guest
    /// connects and established connections use.
    public static let maxHandshakes = 16
    /// Control packets (responses, resets, credit updates) waiting for receive buffers. While
    /// that many wait, transmitq is not served: a guest that does not post receive buffers is
    /// held back rather than growing this queue.
    static let maxPendingControl = 256

    public let id: String
    public let guestCID: UInt64
    public let loop: EventLoop
    let memory: GuestMemory
    let listener: VsockListener?

    public var deviceID: UInt32 { Virtio.DeviceID.vsock }
    public var deviceFeatures: UInt64 { Vsock.featureStream }
    public var queueMaxSizes: [UInt16] { [Self.queueSize, Self.queueSize, Self.queueSize] }

    struct State {
        var receive: VirtioQueueRunner?
        var transmit: VirtioQueueRunner?
        var event: VirtioQueueRunner?
        var receiveHandler: VsockReceiveHandler
        var transmitHandler: VsockTransmitHandler
        let core: VsockCore
        var listenToken: EventLoop.Token?
        var observer: (@Sendable (String) -> Void)?
    }

    private let state: Mutex<State>

    /// Creates the device; with a listener, host clients are accepted from now on (their
    /// requests reach the guest once the driver is ready).
    public init(
        id: String, guestCID: UInt64, listener: VsockListener?, udsPath: String?, memory: GuestMemory, loop: EventLoop,
        maxConnections: Int = VirtioVsockDevice.defaultMaxConnections,
        requestTimeoutNanoseconds: UInt64 = VirtioVsockDevice.defaultRequestTimeoutNanoseconds,
        handshakeTimeoutNanoseconds: UInt64 = VirtioVsockDevice.defaultHandshakeTimeoutNanoseconds,
        closeTimeoutNanoseconds: UInt64 = VirtioVsockDevice.defaultCloseTimeoutNanoseconds
    ) throws(SyscallError) {
        self.id = id
        self.guestCID = guestCID
        self.memory = memory
        self.loop = loop
        self.listener = listener
        let core = VsockCore(
            memory: memory, guestCID: guestCID, udsPath: udsPath, loop: loop, maxConnections: maxConnections,
            requestTimeoutNanoseconds: requestTimeoutNanoseconds, handshakeTimeoutNanoseconds: handshakeTimeoutNanoseconds,
            closeTimeoutNanoseconds: closeTimeoutNanoseconds)
        state = Mutex(
            State(
                receiveHandler: VsockReceiveHandler(core: core), transmitHandler: VsockTransmitHandler(core: core), core: core))
        let handler: @Sendable (UInt64, UInt32) -> Void = { [weak self] id, events in self?.socketEvent(id: id, events: events) }
        let expiry: @Sendable (UInt64) -> Void = { [weak self] id in self?.requestExpired(id: id) }
        let handshakeExpiry: @Sendable (UInt64) -> Void = { [weak self] id in self?.handshakeExpired(id: id) }
        state.withLock {
            $0.core.eventHandler = handler
            $0.core.expiryHandler = expiry
            $0.core.handshakeExpiryHandler = handshakeExpiry
        }
        if let listener {
            let token = try loop.register(fd: listener.fd, events: EPOLLIN.rawValue) { [weak self] _ in self?.acceptClients() }
            state.withLock { $0.listenToken = token }
        }
    }

    /// Where the device reports what an operator may want in the log: the driver becoming
    /// ready, and the guest's answer to each host-initiated connection (one line per host
    /// client, never per guest packet).
    public func observe(_ observer: @escaping @Sendable (String) -> Void) {
        state.withLock {
            $0.observer = observer
            $0.core.observer = observer
        }
    }

    /// Stops accepting clients and closes every connection (the worker closes the listener).
    public func shutdown() {
        state.withLock { state in
            if let token = state.listenToken { loop.unregister(token) }
            state.listenToken = nil
            state.core.closeAll()
        }
    }

    /// struct virtio_vsock_config (§5.10.4): le64 guest_cid (its upper 32 bits are reserved,
    /// and zero for every CID the configuration allows).
    public func readConfig(offset: UInt64, length: Int) -> UInt64 {
        var bytes = [UInt8](repeating: 0, count: 8)
        bytes.withUnsafeMutableBytes { $0.storeBytes(of: guestCID.littleEndian, as: UInt64.self) }
        return Virtio.readConfig(bytes, offset: offset, length: length)
    }

    /// guest_cid is read-only.
    public func writeConfig(offset: UInt64, length: Int, value: UInt64) {}

    public func activate(_ activation: VirtioActivation) throws {
        let device = "virtio-vsock '\(id)'"
        try state.withLock { state throws in
            state.receive = try activation.runner(Vsock.receiveQueue, "receiveq", of: device, loop: loop) {
                [weak self] in self?.process()
            }
            state.transmit = try activation.runner(Vsock.transmitQueue, "transmitq", of: device, loop: loop) {
                [weak self] in self?.process()
            }
            // §5.10.6.7: eventq carries only VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, for migration,
            // which this VMM does not do: its buffers stay posted and unused.
            state.event = try activation.runner(Vsock.eventQueue, "eventq", of: device, loop: loop) {}
            state.core.active = true
            state.observer?("\(device): driver ready, guest CID \(guestCID), features 0x\(String(activation.features, radix: 16))")
        }
    }

    public func reset() {
        state.withLock { state in
            state.receive?.stop(loop: loop)
            state.transmit?.stop(loop: loop)
            state.event?.stop(loop: loop)
            state.receive = nil
            state.transmit = nil
            state.event = nil
            state.core.active = false
            // §5.10.6.7's reset semantics: every connection ends with the device.
            state.core.closeAll()
        }
    }

    // MARK: Counters (tests, fuzzing)

    public var connectionCount: Int { state.withLock { $0.core.connections.count } }
    /// Guest packets dropped unanswered (wrong CIDs, malformed chains).
    public var droppedPackets: UInt64 { state.withLock { $0.core.dropped } }
    /// OP_RST packets sent to the guest.
    public var resetsSent: UInt64 { state.withLock { $0.core.resetsSent } }
    /// Bytes moved guest → host sockets and host sockets → guest.
    public var bytesToHost: UInt64 { state.withLock { $0.core.bytesToHost } }
    public var bytesToGuest: UInt64 { state.withLock { $0.core.bytesToGuest } }
    /// Entries held by the ready list and the control queue (consumed ones included): bounded
    /// by the connections, however long they stream.
    var queueStorage: Int { state.withLock { $0.core.ready.count + $0.core.control.count } }
    /// Control packets waiting for receive buffers.
    var controlBacklog: Int { state.withLock { $0.core.controlCount } }
    /// The connections' host socket descriptors (tests set socket options on them).
    var hostDescriptors: [Int32] { state.withLock { $0.core.connections.values.map(\.fd) } }
    /// The largest guest → host buffer of any connection, written bytes not yet dropped
    /// included: bounded by twice ``bufferAllocation``, however long a connection streams.
    var largestPendingStorage: Int { state.withLock { $0.core.connections.values.map(\.pending.count).max() ?? 0 } }

    // MARK: Loop-thread work

    /// Serves transmitq then receiveq; transmitq again if it waited for room in the control
    /// queue that receiveq has just made.
    func process() {
        state.withLock { state in serve(&state) }
    }

    private func serve(_ state: inout State) {
        for _ in 0..<4 {
            let sent = state.transmit?.run(&state.transmitHandler, loop: loop)
            _ = state.receive?.run(&state.receiveHandler, loop: loop)
            guard sent == .blocked, state.core.controlCount < Self.maxPendingControl else { return }
        }
        // Still blocked: the next receive kick (new buffers) comes back here.
    }

    private func acceptClients() {
        guard let listener else { return }
        state.withLock { state in
            // Out of descriptors or memory the connection stays queued and the level-triggered
            // listener would wake the loop at once, forever: it rests for a while instead.
            if state.core.accept(from: listener.fd).shortage, let token = state.listenToken {
                loop.rest(token, events: EPOLLIN.rawValue)
            }
            serve(&state)
        }
    }

    private func handshakeExpired(id: UInt64) {
        state.withLock { state in state.core.handshakeExpired(id: id) }
    }

    private func requestExpired(id: UInt64) {
        state.withLock { state in
            state.core.requestExpired(id: id)
            serve(&state)
        }
    }

    private func socketEvent(id: UInt64, events: UInt32) {
        state.withLock { state in
            state.core.socketEvent(id: id, events: events)
            serve(&state)
        }
    }
}

extension Virtio.DeviceID {
    /// §5: the socket device.
    public static let vsock: UInt32 = 19
}

/// One stream between a guest port and a host Unix socket.
final class VsockConnection {
    enum Phase {
        /// Host-initiated: OP_REQUEST sent, waiting for the guest's OP_RESPONSE.
        case connecting
        case established
    }

    let id: UInt64
    let fd: Int32
    /// The host side's port (CID 2) and the guest's.
    let localPort: UInt32
    let peerPort: UInt32
    var phase: Phase
    var token: EventLoop.Token?
    var registered: UInt32 = 0
    /// The timer that gives up on the guest's OP_RESPONSE (host-initiated, while connecting),
    /// or, once the guest shut down both ways, on the host taking the last bytes.
    var requestTimer: EventLoop.Token?

    /// The guest's receive buffer and how much of what it was sent it has consumed (§5.10.6.3).
    var peerBufferAllocation: UInt32 = 0
    var peerForwardCount: UInt32 = 0
    /// Bytes sent to the guest (tx_cnt).
    var sentToGuest: UInt32 = 0
    /// Bytes received from the guest, and of those written to the host socket (fwd_cnt).
    var receivedFromGuest: UInt32 = 0
    var forwardCount: UInt32 = 0
    /// fwd_cnt as the guest last heard it.
    var reportedForwardCount: UInt32 = 0

    /// Guest bytes the host socket has not taken yet (at most buf_alloc), from `pendingStart`.
    var pending: [UInt8] = []
    var pendingStart = 0
    var pendingCount: Int { pending.count - pendingStart }

    /// The socket is known readable (waiting for credit or receive buffers), so it is not
    /// watched for input; `queued` while it is on the ready list.
    var readable = false
    var queued = false
    /// Waiting for the guest's credit; an OP_CREDIT_REQUEST was sent.
    var creditBlocked = false
    /// The host closed its sending side (read returned 0); OP_SHUTDOWN(SEND) was sent.
    var hostDone = false
    /// OP_SHUTDOWN flags the guest has sent, accumulated.
    var guestShutdown: UInt32 = 0
    /// shutdown(SHUT_WR) was done on the socket after the guest's SEND shutdown.
    var hostWriteClosed = false

    init(id: UInt64, fd: Int32, localPort: UInt32, peerPort: UInt32, phase: Phase) {
        self.id = id
        self.fd = fd
        self.localPort = localPort
        self.peerPort = peerPort
        self.phase = phase
    }

    /// What the guest may still be sent (§5.10.6.3: peer_free = buf_alloc - (tx_cnt - fwd_cnt)).
    var peerCredit: UInt32 {
        let inFlight = sentToGuest &- peerForwardCount
        return inFlight > peerBufferAllocation ? 0 : peerBufferAllocation - inFlight
    }
}

/// A host client of the listener that has not finished its `CONNECT <port>\n` line.
final class VsockHandshake {
    let fd: Int32
    var token: EventLoop.Token?
    /// Closes the client if the line has not come by then.
    var timer: EventLoop.Token?
    var line: [UInt8] = []

    init(fd: Int32) { self.fd = fd }
}

struct VsockPortPair: Hashable {
    let local: UInt32
    let peer: UInt32
}

/// The connection table and the packet logic of a ``VirtioVsockDevice``. Not Sendable: it
/// lives in the device's Mutex-protected state and is used only with that lock held.
final class VsockCore {
    let memory: GuestMemory
    let guestCID: UInt64
    let udsPath: String?
    let loop: EventLoop
    let maxConnections: Int
    let requestTimeoutNanoseconds: UInt64
    let handshakeTimeoutNanoseconds: UInt64
    let closeTimeoutNanoseconds: UInt64
    var eventHandler: (@Sendable (_ id: UInt64, _ events: UInt32) -> Void)?
    var expiryHandler: (@Sendable (_ id: UInt64) -> Void)?
    var handshakeExpiryHandler: (@Sendable (_ id: UInt64) -> Void)?
    var observer: (@Sendable (String) -> Void)?
    var active = false

    var connections: [UInt64: VsockConnection] = [:]
    var byPorts: [VsockPortPair: UInt64] = [:]
    var handshakes: [UInt64: VsockHandshake] = [:]
    var nextID: UInt64 = 1
    /// Host ports handed out for host-initiated connections (Firecracker's choice of range).
    var nextLocalPort: UInt32 = 1 << 30
    /// Control packets for the guest, oldest first from `controlStart`.
    var control: [VsockHeader] = []
    var controlStart = 0
    /// Connections whose socket is readable, in turn.
    var ready: [UInt64] = []
    var readyStart = 0
    /// Header and payload of one packet for the guest.
    var scratch = [UInt8](repeating: 0, count: Vsock.headerSize + Vsock.maxPayload)

    var dropped: UInt64 = 0
    var resetsSent: UInt64 = 0
    var bytesToHost: UInt64 = 0
    var bytesToGuest: UInt64 = 0

    init(
        memory: GuestMemory, guestCID: UInt64, udsPath: String?, loop: EventLoop, maxConnections: Int, requestTimeoutNanoseconds: UInt64,
        handshakeTimeoutNanoseconds: UInt64, closeTimeoutNanoseconds: UInt64 = VirtioVsockDevice.defaultCloseTimeoutNanoseconds
    ) {
        self.closeTimeoutNanoseconds = closeTimeoutNanoseconds
        self.maxConnections = maxConnections
        self.handshakeTimeoutNanoseconds = handshakeTimeoutNanoseconds
        self.requestTimeoutNanoseconds = requestTimeoutNanoseconds
        self.memory = memory
        self.guestCID = guestCID
        self.udsPath = udsPath
        self.loop = loop
    }

    var controlCount: Int { control.count - controlStart }

    // MARK: Control packets

    func enqueue(_ header: VsockHeader) {
        if header.op == Vsock.Op.reset { resetsSent &+= 1 }
        control.append(header)
    }

    func nextControl() -> VsockHeader? {
        guard controlStart < control.count else { return nil }
        let header = control[controlStart]
        controlStart += 1
        if controlStart == control.count {
            control.removeAll(keepingCapacity: control.capacity <= 64)
            controlStart = 0
        } else if controlStart >= 64 && controlStart * 2 >= control.count {
            // Never empty under steady load: drop the consumed front so the array stays bounded.
            control.removeFirst(controlStart)
            controlStart = 0
        }
        return header
    }

    /// A header from the host side of `connection` to the guest, with our credit fields.
    func header(_ connection: VsockConnection, op: UInt16, flags: UInt32 = 0, length: UInt32 = 0) -> VsockHeader {
        connection.reportedForwardCount = connection.forwardCount
        return VsockHeader(
            sourceCID: Vsock.hostCID, destinationCID: guestCID, sourcePort: connection.localPort,
            destinationPort: connection.peerPort, length: length, op: op, flags: flags,
            bufferAllocation: VirtioVsockDevice.bufferAllocation, forwardCount: connection.forwardCount)
    }

    /// OP_RST in answer to a guest packet that has no connection (ports swapped).
    func resetReply(to packet: VsockHeader) {
        enqueue(
            VsockHeader(
                sourceCID: Vsock.hostCID, destinationCID: guestCID, sourcePort: packet.destinationPort,
                destinationPort: packet.sourcePort, op: Vsock.Op.reset))
    }

    // MARK: Connections

    /// Connections open; handshakes have their own cap (``VirtioVsockDevice/maxHandshakes``), so
    /// the descriptors held are at most the sum of both caps.
    var openCount: Int { connections.count }

    func add(_ connection: VsockConnection) {
        connections[connection.id] = connection
        byPorts[VsockPortPair(local: connection.localPort, peer: connection.peerPort)] = connection.id
    }

    /// Closes the socket and forgets the connection (nothing is sent).
    func drop(_ connection: VsockConnection) {
        if let token = connection.token { loop.unregister(token) }
        connection.token = nil
        if let timer = connection.requestTimer { loop.unregister(timer) }
        connection.requestTimer = nil
        Syscall.close(connection.fd)
        connections.removeValue(forKey: connection.id)
        byPorts.removeValue(forKey: VsockPortPair(local: connection.localPort, peer: connection.peerPort))
    }

    /// Ends the connection with OP_RST to the guest.
    func reset(_ connection: VsockConnection) {
        enqueue(header(connection, op: Vsock.Op.reset))
        drop(connection)
    }

    func closeAll() {
        for connection in Array(connections.values) { drop(connection) }
        for id in Array(handshakes.keys) { closeHandshake(id: id) }
        control.removeAll()
        controlStart = 0
        ready.removeAll()
        readyStart = 0
    }

    /// Watches the socket for what the connection can use now: input while established,
    /// not known readable, and neither side has ended the host → guest direction; output
    /// while guest bytes wait. Unwatched entirely when neither (a hung-up socket reports
    /// EPOLLHUP whatever it is watched for).
    func updateInterest(_ connection: VsockConnection) {
        var events: UInt32 = 0
        if connection.phase == .established && !connection.readable && !connection.hostDone
            && connection.guestShutdown & Vsock.shutdownReceive == 0
        {
            events |= EPOLLIN.rawValue
        }
        if connection.pendingCount > 0 { events |= EPOLLOUT.rawValue }
        guard events != connection.registered else { return }
        if events == 0 {
            if let token = connection.token { loop.unregister(token) }
            connection.token = nil
        } else if let token = connection.token {
            do { try loop.modify(token, events: events) } catch {
                reset(connection)
                return
            }
        } else {
            let id = connection.id
            let handler = eventHandler
            do {
                connection.token = try loop.register(fd: connection.fd, events: events) { events in handler?(id, events) }
            } catch {
                reset(connection)
                return
            }
        }
        connection.registered = events
    }

    func markReadable(_ connection: VsockConnection) {
        connection.readable = true
        if !connection.queued {
            connection.queued = true
            ready.append(connection.id)
        }
        updateInterest(connection)
    }

    /// The next connection on the ready list, taken off it.
    func takeReady() -> VsockConnection? {
        while readyStart < ready.count {
            let id = ready[readyStart]
            readyStart += 1
            if readyStart == ready.count {
                ready.removeAll(keepingCapacity: true)
                readyStart = 0
            } else if readyStart >= 64 && readyStart * 2 >= ready.count {
                // Several streaming connections keep the list from ever emptying (each goes
                // back to its end): drop the consumed front so it stays bounded.
                ready.removeFirst(readyStart)
                readyStart = 0
            }
            guard let connection = connections[id] else { continue }
            connection.queued = false
            return connection
        }
        return nil
    }

    /// A socket event (loop thread).
    func socketEvent(id: UInt64, events: UInt32) {
        if let handshake = handshakes[id] {
            readHandshake(id: id, handshake)
            return
        }
        guard let connection = connections[id] else { return }
        if events & EPOLLOUT.rawValue != 0 || (events & (EPOLLHUP.rawValue | EPOLLERR.rawValue) != 0 && connection.pendingCount > 0) {
            flush(connection)
            guard connections[id] != nil else { return }
        }
        if events & (EPOLLIN.rawValue | EPOLLHUP.rawValue | EPOLLERR.rawValue) != 0 && connection.registered & EPOLLIN.rawValue != 0 {
            markReadable(connection)
        }
    }

    // MARK: Host-initiated connections

    /// Accepts at most ``UnixSocket/acceptsPerWakeup`` host clients (a connect flood cannot
    /// hold the loop; the level-triggered listener wakes it again for the rest). Returns how
    /// many were taken (refused ones included), and whether accepting stopped for want of
    /// descriptors or memory.
    @discardableResult
    func accept(from listenFD: Int32) -> (accepted: Int, shortage: Bool) {
        for accepted in 0..<UnixSocket.acceptsPerWakeup {
            let fd: Int32
            switch UnixSocket.acceptOne(listenFD) {
            case .connection(let connected): fd = connected
            case .drained: return (accepted, false)
            case .shortage: return (accepted, true)
            }
            guard active, openCount < maxConnections, handshakes.count < VirtioVsockDevice.maxHandshakes else {
                // No driver to connect to, or the cap reached: the client sees its socket close.
                Syscall.close(fd)
                continue
            }
            let id = nextID
            nextID += 1
            let handshake = VsockHandshake(fd: fd)
            let handler = eventHandler
            do {
                handshake.token = try loop.register(fd: fd, events: EPOLLIN.rawValue) { events in handler?(id, events) }
            } catch {
                Syscall.close(fd)
                continue
            }
            handshakes[id] = handshake
            let expiry = handshakeExpiryHandler
            guard let timer = try? loop.schedule(afterNanoseconds: handshakeTimeoutNanoseconds, handler: { expiry?(id) }) else {
                closeHandshake(id: id)
                continue
            }
            handshake.timer = timer
        }
        return (UnixSocket.acceptsPerWakeup, false)
    }

    /// Forgets a handshake and closes its client.
    func closeHandshake(id: UInt64) {
        guard let handshake = handshakes.removeValue(forKey: id) else { return }
        if let token = handshake.token { loop.unregister(token) }
        if let timer = handshake.timer { loop.unregister(timer) }
        Syscall.close(handshake.fd)
    }

    /// A host client did not finish its CONNECT line in time: closed.
    func handshakeExpired(id: UInt64) {
        guard handshakes[id] != nil else { return }
        observer?("virtio-vsock: host client sent no CONNECT line within the handshake deadline; closed")
        closeHandshake(id: id)
    }

    /// The longest `CONNECT <port>\n` line: "CONNECT " + 10 digits + "\n".
    static let maxConnectLine = 19

    /// Reads the client's line a byte at a time (what follows it stays in the socket for the
    /// guest); on `\n`, asks the guest with OP_REQUEST.
    func readHandshake(id: UInt64, _ handshake: VsockHandshake) {
        func close() { closeHandshake(id: id) }
        var byte: UInt8 = 0
        while true {
            let count = recv(handshake.fd, &byte, 1, Int32(MSG_DONTWAIT))
            if count < 0 && errno == EINTR { continue }
            if count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return }
            guard count == 1 else { return close() }
            if byte != UInt8(ascii: "\n") {
                handshake.line.append(byte)
                if handshake.line.count >= Self.maxConnectLine { return close() }
                continue
            }
            // A guest that posts no receive buffers leaves control packets queued; a client
            // that would add its OP_REQUEST to a full queue is refused, so host clients cannot
            // grow it (transmitq is held back at the same bound).
            guard let port = Self.parseConnect(handshake.line), active, openCount < maxConnections,
                controlCount < VirtioVsockDevice.maxPendingControl
            else { return close() }
            // Without its deadline a connection the guest ignores would be held forever: no
            // timer (out of descriptors), no connection — the client is closed.
            let expiry = expiryHandler
            guard let requestTimer = try? loop.schedule(afterNanoseconds: requestTimeoutNanoseconds, handler: { expiry?(id) })
            else { return close() }
            if let token = handshake.token { loop.unregister(token) }
            if let timer = handshake.timer { loop.unregister(timer) }
            handshakes.removeValue(forKey: id)
            var local = nextLocalPort
            while byPorts[VsockPortPair(local: local, peer: port)] != nil { local &+= 1 }
            nextLocalPort = local &+ 1
            if nextLocalPort < 1 << 30 { nextLocalPort = 1 << 30 }
            let connection = VsockConnection(id: id, fd: handshake.fd, localPort: local, peerPort: port, phase: .connecting)
            add(connection)
            enqueue(header(connection, op: Vsock.Op.request))
            connection.requestTimer = requestTimer
            return
        }
    }

    /// The guest did not answer a host-initiated OP_REQUEST in time: OP_RST (so a late
    /// OP_RESPONSE finds no connection) and the client is closed. If the OP_REQUEST itself
    /// still waits for a receive buffer, the guest never heard of the connection: the request
    /// is taken back instead, so expiring connections cannot grow the control queue.
    func requestExpired(id: UInt64) {
        guard let connection = connections[id] else { return }
        guard connection.phase == .connecting else {
            // Shut down both ways by the guest, and the host has not taken its bytes in time.
            connection.requestTimer = nil
            observer?(
                "virtio-vsock: connection \(connection.localPort) to guest port \(connection.peerPort) closed with bytes the host did not read; reset"
            )
            return reset(connection)
        }
        connection.requestTimer = nil
        observer?("virtio-vsock: host connection \(connection.localPort) to guest port \(connection.peerPort) unanswered; closed")
        let queued = control[controlStart...].firstIndex {
            $0.op == Vsock.Op.request && $0.sourcePort == connection.localPort && $0.destinationPort == connection.peerPort
        }
        guard let queued else { return reset(connection) }
        control.remove(at: queued)
        drop(connection)
    }

    /// `CONNECT <decimal port>` (the newline already taken off), or nil.
    static func parseConnect(_ line: [UInt8]) -> UInt32? {
        let prefix = Array("CONNECT ".utf8)
        guard line.count > prefix.count, line.count <= prefix.count + 10, Array(line[0..<prefix.count]) == prefix else {
            return nil
        }
        var port: UInt64 = 0
        for digit in line[prefix.count...] {
            guard digit >= UInt8(ascii: "0"), digit <= UInt8(ascii: "9") else { return nil }
            port = port * 10 + UInt64(digit - UInt8(ascii: "0"))
        }
        return port <= UInt64(UInt32.max) ? UInt32(port) : nil
    }

    // MARK: Guest packets (transmitq)

    /// One packet from the guest, its header already checked for the CIDs and its payload
    /// length for the chain; `payload(skip, count, body)` walks the payload's guest memory.
    func handle(_ packet: VsockHeader, payload: (_ body: (_ hostOffset: Int, _ length: Int) -> Void) -> Void) {
        let key = VsockPortPair(local: packet.destinationPort, peer: packet.sourcePort)
        let connection = byPorts[key].flatMap { connections[$0] }
        // §5.10.6: only stream sockets are offered; another type is answered with OP_RST.
        guard packet.type == Vsock.typeStream else {
            if packet.op != Vsock.Op.reset { resetReply(to: packet) }
            return
        }
        if packet.op == Vsock.Op.request {
            guard connection == nil else { return resetReply(to: packet) }
            return connectToHost(packet)
        }
        guard let connection else {
            // §5.10.6.4 (connection management): a packet for no connection gets OP_RST, except
            // OP_RST itself.
            if packet.op != Vsock.Op.reset { resetReply(to: packet) }
            return
        }
        // §5.10.6.3: every packet carries the sender's buffer space and forward count.
        connection.peerBufferAllocation = packet.bufferAllocation
        connection.peerForwardCount = packet.forwardCount
        if connection.creditBlocked && connection.peerCredit > 0 {
            connection.creditBlocked = false
            if connection.readable && !connection.queued {
                connection.queued = true
                ready.append(connection.id)
            }
        }
        switch packet.op {
        case Vsock.Op.response:
            guard connection.phase == .connecting else { return reset(connection) }
            connection.phase = .established
            if let timer = connection.requestTimer { loop.unregister(timer) }
            connection.requestTimer = nil
            observer?("virtio-vsock: host connection \(connection.localPort) to guest port \(connection.peerPort) accepted")
            let reply = Array("OK \(connection.localPort)\n".utf8)
            let sent = reply.withUnsafeBytes { send(connection.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) }
            // A fresh socket has room for a few bytes; one that does not is as good as gone.
            guard sent == reply.count else { return reset(connection) }
            updateInterest(connection)
        case Vsock.Op.reset:
            if connection.phase == .connecting {
                observer?("virtio-vsock: host connection \(connection.localPort) to guest port \(connection.peerPort) refused by the guest")
            }
            drop(connection)
        case Vsock.Op.shutdown:
            connection.guestShutdown |= packet.flags & Vsock.shutdownBoth
            if connection.guestShutdown & Vsock.shutdownReceive != 0 { connection.readable = false }
            closeHostWritingIfDone(connection)
            finishIfDone(connection)
            guard connections[connection.id] != nil else { return }
            updateInterest(connection)
            // Done both ways but its bytes still wait for the host: they get a deadline.
            if connection.guestShutdown == Vsock.shutdownBoth, connection.requestTimer == nil {
                let expiry = expiryHandler
                let id = connection.id
                guard let timer = try? loop.schedule(afterNanoseconds: closeTimeoutNanoseconds, handler: { expiry?(id) }) else {
                    return reset(connection)
                }
                connection.requestTimer = timer
            }
        case Vsock.Op.readWrite:
            receive(packet, on: connection, payload: payload)
        case Vsock.Op.creditUpdate:
            break
        case Vsock.Op.creditRequest:
            enqueue(header(connection, op: Vsock.Op.creditUpdate))
        default:
            // OP_INVALID or unknown.
            reset(connection)
        }
    }

    /// OP_REQUEST from the guest to host port P: connect to `<uds path>_P`.
    func connectToHost(_ packet: VsockHeader) {
        guard active, let udsPath, openCount < maxConnections else { return resetReply(to: packet) }
        let path = "\(udsPath)_\(packet.destinationPort)"
        guard case (var address, let length)? = try? UnixSocket.address(path) else { return resetReply(to: packet) }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { return resetReply(to: packet) }
        var result: Int32
        repeat {
            result = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) }
            }
        } while result < 0 && errno == EINTR
        // A Unix stream connect completes at once or fails (EAGAIN: the listener's backlog is
        // full; ENOENT/ECONNREFUSED: nobody listens): no connection then.
        guard result == 0 else {
            Syscall.close(fd)
            return resetReply(to: packet)
        }
        let id = nextID
        nextID += 1
        let connection = VsockConnection(
            id: id, fd: fd, localPort: packet.destinationPort, peerPort: packet.sourcePort, phase: .established)
        connection.peerBufferAllocation = packet.bufferAllocation
        connection.peerForwardCount = packet.forwardCount
        add(connection)
        enqueue(header(connection, op: Vsock.Op.response))
        updateInterest(connection)
    }

    /// OP_RW: the payload goes to the host socket; what it does not take now waits.
    func receive(
        _ packet: VsockHeader, on connection: VsockConnection,
        payload: (_ body: (_ hostOffset: Int, _ length: Int) -> Void) -> Void
    ) {
        let length = Int(packet.length)
        // Data before the connection exists, after the guest said it sends no more, or beyond
        // the credit this device advertised (§5.10.6.3: the sender MUST NOT): reset.
        guard connection.phase == .established, connection.guestShutdown & Vsock.shutdownSend == 0,
            !connection.hostWriteClosed, length <= Vsock.maxPayload,
            connection.pendingCount + length <= Int(VirtioVsockDevice.bufferAllocation)
        else { return reset(connection) }
        var failed = false
        let base = memory.base
        payload { offset, count in
            guard !failed else { return }
            var written = 0
            if connection.pendingCount == 0 {
                while written < count {
                    let n = send(connection.fd, base + offset + written, count - written, Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
                    if n > 0 {
                        written += n
                        continue
                    }
                    if n < 0 && errno == EINTR { continue }
                    if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { break }
                    failed = true
                    return
                }
            }
            if written < count {
                connection.pending.append(
                    contentsOf: UnsafeRawBufferPointer(start: base + offset + written, count: count - written))
            }
            connection.forwardCount &+= UInt32(truncatingIfNeeded: written)
            bytesToHost &+= UInt64(written)
        }
        guard !failed else { return reset(connection) }
        connection.receivedFromGuest &+= packet.length
        creditUpdateIfLow(connection)
        updateInterest(connection)
    }

    /// Written bytes at the front of a connection's buffer that are dropped even while it is
    /// less than half consumed.
    static let pendingCompaction = 64 << 10

    /// Writes waiting guest bytes to the host socket (it reported room).
    func flush(_ connection: VsockConnection) {
        while connection.pendingCount > 0 {
            let n = connection.pending.withUnsafeBytes { raw in
                send(
                    connection.fd, raw.baseAddress.map { $0 + connection.pendingStart }, connection.pendingCount,
                    Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
            }
            if n > 0 {
                connection.pendingStart += n
                connection.forwardCount &+= UInt32(truncatingIfNeeded: n)
                bytesToHost &+= UInt64(n)
                continue
            }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { break }
            return reset(connection)
        }
        if connection.pendingCount == 0 {
            connection.pending.removeAll(keepingCapacity: false)
            connection.pendingStart = 0
        } else if connection.pendingStart >= Self.pendingCompaction || connection.pendingStart * 2 >= connection.pending.count {
            // A host reader slightly slower than the guest never lets the buffer empty: drop
            // the written front, so it holds less than twice buf_alloc however long it streams.
            connection.pending.removeFirst(connection.pendingStart)
            connection.pendingStart = 0
        }
        creditUpdateIfLow(connection)
        closeHostWritingIfDone(connection)
        finishIfDone(connection)
        if connections[connection.id] != nil { updateInterest(connection) }
    }

    /// OP_CREDIT_UPDATE when the guest's view of our free space has fallen below half and
    /// we have forwarded more since it last heard (§5.10.6.3: the receiver tells the sender
    /// of freed space; a guest that sees no room stops sending).
    func creditUpdateIfLow(_ connection: VsockConnection) {
        guard connection.forwardCount != connection.reportedForwardCount else { return }
        let seenInFlight = connection.receivedFromGuest &- connection.reportedForwardCount
        guard seenInFlight >= VirtioVsockDevice.bufferAllocation / 2 else { return }
        enqueue(header(connection, op: Vsock.Op.creditUpdate))
    }

    /// After the guest's SEND shutdown and once its bytes are written, the host reads EOF.
    func closeHostWritingIfDone(_ connection: VsockConnection) {
        guard connection.guestShutdown & Vsock.shutdownSend != 0, connection.pendingCount == 0, !connection.hostWriteClosed
        else { return }
        connection.hostWriteClosed = true
        _ = Glibc.shutdown(connection.fd, Int32(SHUT_WR))
    }

    /// §5.10.6.6: once the guest will neither send nor receive (or both sides have stopped
    /// sending) and its bytes reached the host, the device answers with OP_RST and closes.
    func finishIfDone(_ connection: VsockConnection) {
        let guestDone = connection.guestShutdown == Vsock.shutdownBoth
        let bothSendsDone = connection.hostDone && connection.guestShutdown & Vsock.shutdownSend != 0
        guard guestDone || bothSendsDone, connection.pendingCount == 0 else { return }
        reset(connection)
    }

    // MARK: Packets for the guest (receiveq)

    /// Fills `chain` with the next packet for the guest: a control packet, else data from a
    /// readable socket with credit. Returns the bytes written, or nil when there is nothing.
    func fill(_ chain: DescriptorChain) -> UInt32? {
        let room = chain.writableLength
        let writable = chain.segments(readable: false)
        if let header = nextControl() {
            write(header, payload: 0, into: chain, range: writable)
            return UInt32(Vsock.headerSize)
        }
        while let connection = takeReady() {
            guard connection.readable, connection.phase == .established else { continue }
            let credit = connection.peerCredit
            guard credit > 0 else {
                if !connection.creditBlocked {
                    connection.creditBlocked = true
                    write(header(connection, op: Vsock.Op.creditRequest), payload: 0, into: chain, range: writable)
                    return UInt32(Vsock.headerSize)
                }
                continue
            }
            let limit = min(Int(room) - Vsock.headerSize, Vsock.maxPayload, Int(credit))
            let count = scratch.withUnsafeMutableBytes { raw in
                recv(connection.fd, raw.baseAddress.map { $0 + Vsock.headerSize }, limit, Int32(MSG_DONTWAIT))
            }
            if count > 0 {
                connection.sentToGuest &+= UInt32(count)
                bytesToGuest &+= UInt64(count)
                // Round robin: back at the end of the list, still readable.
                connection.queued = true
                ready.append(connection.id)
                write(header(connection, op: Vsock.Op.readWrite, length: UInt32(count)), payload: count, into: chain, range: writable)
                return UInt32(Vsock.headerSize + count)
            }
            if count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
                connection.readable = false
                updateInterest(connection)
                continue
            }
            if count == 0 {
                // The host closed its sending side: the guest reads EOF (§5.10.6.5).
                connection.readable = false
                connection.hostDone = true
                write(header(connection, op: Vsock.Op.shutdown, flags: Vsock.shutdownSend), payload: 0, into: chain, range: writable)
                finishIfDone(connection)
                if connections[connection.id] != nil { updateInterest(connection) }
                return UInt32(Vsock.headerSize)
            }
            // ECONNRESET and the like.
            resetsSent &+= 1
            write(header(connection, op: Vsock.Op.reset), payload: 0, into: chain, range: writable)
            drop(connection)
            return UInt32(Vsock.headerSize)
        }
        return nil
    }

    /// Scatters the header and `payload` bytes of ``scratch`` into the chain's writable buffers.
    func write(_ header: VsockHeader, payload: Int, into chain: DescriptorChain, range: Range<Int>) {
        let base = memory.base
        scratch.withUnsafeMutableBytes { raw in
            header.encode(into: raw)
            guard let source = raw.baseAddress else { return }
            var done = 0
            chain.forEachPiece(in: range, skip: 0, count: UInt64(Vsock.headerSize + payload)) { offset, length in
                (base + offset).copyMemory(from: source + done, byteCount: length)
                done += length
            }
        }
    }
}

/// receiveq's part of the queue runner: each device-writable chain of at least a header's
/// size gets the next packet; with none to send, the chain goes back to the ring.
struct VsockReceiveHandler: VirtioChainHandler {
    let core: VsockCore

    mutating func handle(_ chain: DescriptorChain, bucket: inout TokenBucket?) -> UInt32? {
        // §5.10.6.1: receive buffers are device-writable and hold at least the header; any
        // other chain is malformed and returned unused.
        guard chain.readableCount == 0, chain.writableLength >= UInt64(Vsock.headerSize) else { return 0 }
        // A buffer with room for a header only can carry control packets; data waits for a
        // larger one (a driver posting only such buffers gets control packets and no data).
        if chain.writableLength == UInt64(Vsock.headerSize), core.controlCount == 0 { return nil }
        return core.fill(chain)
    }
}

/// transmitq's part of the queue runner: parses and checks each packet and hands it to the
/// core. Nothing is written into a transmit buffer (used length 0).
struct VsockTransmitHandler: VirtioChainHandler {
    let core: VsockCore

    mutating func handle(_ chain: DescriptorChain, bucket: inout TokenBucket?) -> UInt32? {
        // Control packets wait for receive buffers; while too many do, the guest waits too.
        guard core.controlCount < VirtioVsockDevice.maxPendingControl else { return nil }
        let readable = chain.segments(readable: true)
        // §5.10.6.2: transmit buffers are device-readable, header first. Short or mixed
        // chains are malformed: dropped (used, nothing done).
        guard chain.writableCount == 0, chain.readableLength >= UInt64(Vsock.headerSize) else {
            core.dropped &+= 1
            return 0
        }
        var raw = [UInt8](repeating: 0, count: Vsock.headerSize)
        let base = core.memory.base
        raw.withUnsafeMutableBytes { target in
            guard let destination = target.baseAddress else { return }
            var done = 0
            chain.forEachPiece(in: readable, skip: 0, count: UInt64(Vsock.headerSize)) { offset, length in
                destination.advanced(by: done).copyMemory(from: base + offset, byteCount: length)
                done += length
            }
        }
        let packet = raw.withUnsafeBytes { VsockHeader($0) }
        // The payload must be in the chain; the guest must speak from its own CID to the host
        // (§5.10.4: guest_cid is its address; CID 2 is the only peer here). Packets that are
        // neither are dropped without an answer, as Linux's vhost-vsock does: there is no
        // connection they could belong to.
        guard UInt64(packet.length) <= chain.readableLength - UInt64(Vsock.headerSize),
            packet.sourceCID == core.guestCID, packet.destinationCID == Vsock.hostCID
        else {
            core.dropped &+= 1
            return 0
        }
        core.handle(packet) { body in
            chain.forEachPiece(in: readable, skip: UInt64(Vsock.headerSize), count: UInt64(packet.length), body)
        }
        return 0
    }
}
