import Glibc
import Protocol
import Testing

@testable import VMMWorker

/// Unix stream sockets for the host side of the tests.
enum TestUnix {
    static func listen(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        var (address, length) = try UnixSocket.address(path)
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        try #require(bound == 0 && Glibc.listen(fd, 64) == 0, "bind/listen \(path): \(errno)")
        // accept(2) gives up after 10 s (SO_RCVTIMEO): a missing connection fails the test.
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        return fd
    }

    static func connect(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        var (address, length) = try UnixSocket.address(path)
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) }
        }
        try #require(result == 0, "connect \(path): \(errno)")
        return fd
    }

    static func send(_ fd: Int32, _ text: String) {
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Reads exactly `count` bytes (fewer at end of file), blocking with a 10 s receive timeout.
    static func read(_ fd: Int32, count: Int) -> [UInt8] {
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: count)
        while out.count < count {
            let n = buffer.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, count - out.count, 0) }
            if n <= 0 { break }
            out += buffer[0..<n]
        }
        return out
    }

    /// True when the peer closed (read returns 0 within 10 s).
    static func atEOF(_ fd: Int32) -> Bool {
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var byte: UInt8 = 0
        return Glibc.recv(fd, &byte, 1, 0) == 0
    }
}

/// The guest's side of a vsock device on crafted guest memory: 8 receive buffers of 4 KiB +
/// header, transmit buffers posted one at a time.
final class VsockDriver {
    static let guestCID: UInt64 = 5
    static let receiveBuffers: UInt64 = 0x40000
    static let receiveLength: UInt32 = UInt32(Vsock.headerSize) + 4096
    static let transmitBuffers: UInt64 = 0x80000

    let memory: GuestMemory
    let loop: EventLoop
    let thread: pthread_t
    let directory: String
    let listener: VsockListener
    let device: VirtioVsockDevice
    let transport: VirtioMMIOTransport
    var rx: QueueAt
    var tx: QueueAt
    let event: QueueAt
    var rxSeen: UInt16 = 0
    var txSent: UInt16 = 0

    var udsPath: String { directory + "/v.sock" }

    init(
        maxConnections: Int = VirtioVsockDevice.defaultMaxConnections,
        requestTimeoutNanoseconds: UInt64 = VirtioVsockDevice.defaultRequestTimeoutNanoseconds,
        handshakeTimeoutNanoseconds: UInt64 = VirtioVsockDevice.defaultHandshakeTimeoutNanoseconds,
        receiveBuffers: Bool = true, closeTimeoutNanoseconds: UInt64 = VirtioVsockDevice.defaultCloseTimeoutNanoseconds
    ) throws {
        memory = try guestMemory()
        loop = try EventLoop(name: "vsock-test")
        thread = try loop.startThread()
        var template = Array("/tmp/flotilla-vsock-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer in buffer.baseAddress.flatMap { mkdtemp($0) } }
        try #require(made != nil)
        directory = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        listener = try VsockListener(path: directory + "/v.sock")
        device = try VirtioVsockDevice(
            id: "vs0", guestCID: Self.guestCID, listener: listener, udsPath: directory + "/v.sock", memory: memory, loop: loop,
            maxConnections: maxConnections, requestTimeoutNanoseconds: requestTimeoutNanoseconds,
            handshakeTimeoutNanoseconds: handshakeTimeoutNanoseconds, closeTimeoutNanoseconds: closeTimeoutNanoseconds)
        transport = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 6), device: device, memory: memory, vm: nil)
        rx = QueueAt(memory: memory, base: 0x10000)
        tx = QueueAt(memory: memory, base: 0x14000)
        event = QueueAt(memory: memory, base: 0x18000)
        bringUp(transport, features: Vsock.featureStream, queues: [rx, tx, event])
        if receiveBuffers { try postReceiveBuffers() }
    }

    /// Posts the 8 receive buffers.
    func postReceiveBuffers() throws {
        for slot in UInt16(0)..<8 {
            try rx.descriptor(
                slot, address: Self.receiveBuffers + UInt64(slot) * 0x2000, length: Self.receiveLength, flags: 2)
            try rx.publish(slot)
        }
        notify(0)
    }

    func close() {
        transport.write(offset: Virtio.MMIORegister.status, length: 4, value: 0)
        device.shutdown()
        loop.stop()
        HostThread.join(thread)
        listener.close()
        _ = rmdir(directory)
    }

    /// A host listener at `<uds path>_<hostPort>` (closed and removed by `close`), a guest
    /// connection to it that the device answers with OP_RESPONSE, and the host end accepted.
    func connectedHost(port hostPort: UInt32 = 1234) throws -> Int32 {
        let server = try TestUnix.listen(udsPath + "_\(hostPort)")
        defer {
            Glibc.close(server)
            unlink(udsPath + "_\(hostPort)")
        }
        try send(packet(Vsock.Op.request, hostPort: hostPort))
        #expect(try receive()?.header.op == Vsock.Op.response)
        let host = accept(server, nil, nil)
        try #require(host >= 0)
        return host
    }

    func notify(_ queue: Int) {
        transport.write(offset: Virtio.MMIORegister.queueNotify, length: 4, value: UInt64(queue))
    }

    /// The next packet the device put on receiveq (the buffer goes back to the ring), or nil
    /// when none comes within 5 s.
    func receive() throws -> (header: VsockHeader, payload: [UInt8])? {
        guard waitUntil({ (try? rx.usedIndex()) != rxSeen }) else { return nil }
        let element = try rx.usedElement(rxSeen)
        rxSeen &+= 1
        let address = Self.receiveBuffers + UInt64(element.id) * 0x2000
        let bytes = try memory.read(at: address, count: Int(element.length))
        try #require(bytes.count >= Vsock.headerSize)
        let header = bytes.withUnsafeBytes { VsockHeader($0) }
        try rx.publish(UInt16(element.id))
        notify(0)
        return (header, Array(bytes[Vsock.headerSize...]))
    }

    /// Nothing more arrives on receiveq once the loop has done what it had to.
    func nothingReceived() throws -> Bool {
        settle(loop)
        return try rx.usedIndex() == rxSeen
    }

    /// One packet on transmitq, waited for until used.
    @discardableResult
    func send(_ header: VsockHeader, _ payload: [UInt8] = [], at address: UInt64? = nil) throws -> Bool {
        let slot = txSent % 8
        let place = address ?? Self.transmitBuffers + UInt64(slot) * 0x1000
        try memory.write(header.bytes + payload, at: place)
        try tx.descriptor(slot, address: place, length: UInt32(Vsock.headerSize + payload.count))
        try tx.publish(slot)
        txSent &+= 1
        notify(1)
        return waitUntil { (try? tx.usedIndex()) == txSent }
    }

    /// A packet from the guest's port `port` to host port `hostPort`.
    func packet(
        _ op: UInt16, port: UInt32 = 3000, hostPort: UInt32, length: Int = 0, flags: UInt32 = 0, bufferAllocation: UInt32 = 64 << 10,
        forwardCount: UInt32 = 0
    ) -> VsockHeader {
        VsockHeader(
            sourceCID: Self.guestCID, destinationCID: Vsock.hostCID, sourcePort: port, destinationPort: hostPort,
            length: UInt32(length), op: op, flags: flags, bufferAllocation: bufferAllocation, forwardCount: forwardCount)
    }
}

@Suite("virtio-vsock against crafted guest memory and real Unix sockets", .serialized)
struct VirtioVsockUnitTests {
    @Test("identity, features, guest_cid in the configuration space")
    func identity() throws {
        let driver = try VsockDriver()
        defer { driver.close() }
        #expect(driver.device.deviceID == 19 && driver.device.queueMaxSizes.count == 3)
        #expect(driver.device.deviceFeatures == Vsock.featureStream)
        #expect(driver.device.readConfig(offset: 0, length: 8) == VsockDriver.guestCID)
        #expect(driver.device.readConfig(offset: 0, length: 4) == VsockDriver.guestCID)
        #expect(driver.device.readConfig(offset: 4, length: 4) == 0)
    }

    @Test("guest REQUEST connects to UDS_PATH_PORT; RW both ways within credit; SHUTDOWN and RST tear down")
    func guestInitiated() throws {
        let driver = try VsockDriver()
        defer { driver.close() }
        let server = try TestUnix.listen(driver.udsPath + "_1234")
        defer {
            Glibc.close(server)
            unlink(driver.udsPath + "_1234")
        }
        try driver.send(driver.packet(Vsock.Op.request, hostPort: 1234))
        let response = try #require(try driver.receive())
        #expect(response.header.op == Vsock.Op.response)
        #expect(response.header.sourceCID == 2 && response.header.destinationCID == VsockDriver.guestCID)
        #expect(response.header.sourcePort == 1234 && response.header.destinationPort == 3000)
        #expect(response.header.bufferAllocation == VirtioVsockDevice.bufferAllocation)
        let host = accept(server, nil, nil)
        try #require(host >= 0)
        defer { Glibc.close(host) }
        #expect(driver.device.connectionCount == 1)

        // Guest → host.
        try driver.send(driver.packet(Vsock.Op.readWrite, hostPort: 1234, length: 5), Array("hello".utf8))
        #expect(TestUnix.read(host, count: 5) == Array("hello".utf8))

        // Host → guest; the header reports what reached the host (fwd_cnt 5).
        TestUnix.send(host, "world")
        let data = try #require(try driver.receive())
        #expect(data.header.op == Vsock.Op.readWrite && data.header.length == 5 && data.payload == Array("world".utf8))
        #expect(data.header.forwardCount == 5)

        // The guest has 8 bytes of buffer: the device sends no more than that, then asks for
        // credit, then waits; each credit update lets 8 more through.
        try driver.send(driver.packet(Vsock.Op.creditUpdate, hostPort: 1234, bufferAllocation: 8, forwardCount: 5))
        TestUnix.send(host, "0123456789abcdefghij")
        var received: [UInt8] = []
        var forwarded: UInt32 = 5
        for _ in 0..<3 {
            let chunk = try #require(try driver.receive())
            #expect(chunk.header.op == Vsock.Op.readWrite && chunk.header.length <= 8, "\(chunk.header)")
            received += chunk.payload
            if received.count < 20 {
                let ask = try #require(try driver.receive())
                #expect(ask.header.op == Vsock.Op.creditRequest)
                #expect(try driver.nothingReceived(), "more than the guest's credit was sent")
            }
            forwarded &+= UInt32(chunk.payload.count)
            try driver.send(driver.packet(Vsock.Op.creditUpdate, hostPort: 1234, bufferAllocation: 8, forwardCount: forwarded))
        }
        #expect(received == Array("0123456789abcdefghij".utf8))

        // CREDIT_REQUEST is answered with our fwd_cnt.
        try driver.send(driver.packet(Vsock.Op.creditRequest, hostPort: 1234, bufferAllocation: 8, forwardCount: forwarded))
        let update = try #require(try driver.receive())
        #expect(update.header.op == Vsock.Op.creditUpdate && update.header.forwardCount == 5)

        // The host stops sending: the guest is told SHUTDOWN(SEND); the guest then shuts
        // down both ways and the device answers RST, closing the host socket.
        shutdown(host, Int32(SHUT_WR))
        let shut = try #require(try driver.receive())
        #expect(shut.header.op == Vsock.Op.shutdown && shut.header.flags == Vsock.shutdownSend)
        try driver.send(
            driver.packet(Vsock.Op.shutdown, hostPort: 1234, flags: Vsock.shutdownBoth, forwardCount: forwarded))
        let reset = try #require(try driver.receive())
        #expect(reset.header.op == Vsock.Op.reset)
        #expect(TestUnix.atEOF(host))
        #expect(driver.device.connectionCount == 0)
        #expect(driver.device.bytesToHost == 5 && driver.device.bytesToGuest == 25)
    }

    @Test("host CONNECT through UDS_PATH: REQUEST to the guest, OK <port> on RESPONSE, bytes both ways, RST closes; a refused one closes")
    func hostInitiated() throws {
        let driver = try VsockDriver()
        defer { driver.close() }
        let client = try TestUnix.connect(driver.udsPath)
        defer { Glibc.close(client) }
        // The bytes after the line wait for the connection.
        TestUnix.send(client, "CONNECT 52\nearly")
        let request = try #require(try driver.receive())
        #expect(request.header.op == Vsock.Op.request && request.header.destinationPort == 52 && request.header.sourceCID == 2)
        let hostPort = request.header.sourcePort
        #expect(hostPort >= 1 << 30)
        try driver.send(driver.packet(Vsock.Op.response, port: 52, hostPort: hostPort))
        let ok = Array("OK \(hostPort)\n".utf8)
        #expect(TestUnix.read(client, count: ok.count) == ok)
        let early = try #require(try driver.receive())
        #expect(early.header.op == Vsock.Op.readWrite && early.payload == Array("early".utf8))
        try driver.send(driver.packet(Vsock.Op.readWrite, port: 52, hostPort: hostPort, length: 5), Array("reply".utf8))
        #expect(TestUnix.read(client, count: 5) == Array("reply".utf8))
        try driver.send(driver.packet(Vsock.Op.reset, port: 52, hostPort: hostPort))
        #expect(TestUnix.atEOF(client))
        #expect(driver.device.connectionCount == 0)

        // The guest refuses (RST to the REQUEST): the client is closed without OK.
        let refused = try TestUnix.connect(driver.udsPath)
        defer { Glibc.close(refused) }
        TestUnix.send(refused, "CONNECT 53\n")
        let second = try #require(try driver.receive())
        #expect(second.header.op == Vsock.Op.request && second.header.destinationPort == 53)
        try driver.send(driver.packet(Vsock.Op.reset, port: 53, hostPort: second.header.sourcePort))
        #expect(TestUnix.atEOF(refused))

        // A malformed line closes the client; nothing reaches the guest.
        let bad = try TestUnix.connect(driver.udsPath)
        defer { Glibc.close(bad) }
        TestUnix.send(bad, "CONNECT x\n")
        #expect(TestUnix.atEOF(bad))
        #expect(try driver.nothingReceived())
    }

    @Test("wrong CIDs and short or lying chains are dropped; wrong type, unknown connections and bad ops get RST")
    func badHeaders() throws {
        let driver = try VsockDriver()
        defer { driver.close() }
        var wrongSource = driver.packet(Vsock.Op.request, hostPort: 1)
        wrongSource.sourceCID = 7
        var wrongDestination = driver.packet(Vsock.Op.request, hostPort: 1)
        wrongDestination.destinationCID = 3
        // len says 100 bytes follow; the chain has none.
        let lying = driver.packet(Vsock.Op.readWrite, hostPort: 1, length: 100)
        for packet in [wrongSource, wrongDestination, lying] { #expect(try driver.send(packet)) }
        // A chain shorter than a header.
        try driver.memory.write([UInt8](repeating: 0, count: 10), at: 0x90000)
        try driver.tx.descriptor(0, address: 0x90000, length: 10)
        try driver.tx.publish(0)
        driver.txSent &+= 1
        driver.notify(1)
        #expect(waitUntil { (try? driver.tx.usedIndex()) == driver.txSent })
        #expect(driver.device.droppedPackets == 4)
        #expect(try driver.nothingReceived())

        var seqpacket = driver.packet(Vsock.Op.request, hostPort: 1)
        seqpacket.type = 2
        for packet in [
            seqpacket, driver.packet(Vsock.Op.readWrite, hostPort: 9, length: 3), driver.packet(Vsock.Op.invalid, hostPort: 9),
            driver.packet(99, hostPort: 9),
            // Nobody listens at UDS_PATH_77.
            driver.packet(Vsock.Op.request, port: 4000, hostPort: 77),
        ] {
            try driver.send(packet, packet.length == 3 ? [1, 2, 3] : [])
            let answer = try #require(try driver.receive())
            #expect(answer.header.op == Vsock.Op.reset, "\(packet)")
            #expect(answer.header.destinationPort == packet.sourcePort && answer.header.sourcePort == packet.destinationPort)
        }
        // RST for nothing is not answered.
        try driver.send(driver.packet(Vsock.Op.reset, hostPort: 9))
        #expect(try driver.nothingReceived())

        // A packet larger than 64 KiB, and data beyond the advertised credit, reset the connection.
        let server = try TestUnix.listen(driver.udsPath + "_5")
        defer {
            Glibc.close(server)
            unlink(driver.udsPath + "_5")
        }
        try driver.send(driver.packet(Vsock.Op.request, hostPort: 5))
        #expect(try driver.receive()?.header.op == Vsock.Op.response)
        let big = [UInt8](repeating: 7, count: Vsock.maxPayload + 1)
        try driver.send(driver.packet(Vsock.Op.readWrite, hostPort: 5, length: big.count), big, at: 0x200000)
        #expect(try driver.receive()?.header.op == Vsock.Op.reset)
        #expect(driver.device.connectionCount == 0)

        // The host does not read: 128 KiB (the credit) is held, one byte more is a violation.
        try driver.send(driver.packet(Vsock.Op.request, port: 3001, hostPort: 5))
        #expect(try driver.receive()?.header.op == Vsock.Op.response)
        let host = accept(server, nil, nil)
        defer { Glibc.close(host) }
        var bufferSize: Int32 = 4096
        setsockopt(host, SOL_SOCKET, SO_RCVBUF, &bufferSize, socklen_t(4))
        let chunk = [UInt8](repeating: 1, count: Vsock.maxPayload)
        var sent = 0
        while sent < Int(VirtioVsockDevice.bufferAllocation) {
            try driver.send(driver.packet(Vsock.Op.readWrite, port: 3001, hostPort: 5, length: chunk.count), chunk, at: 0x200000)
            sent += chunk.count
        }
        // Not reset yet: at most a credit update so far.
        settle(driver.loop)
        #expect(driver.device.connectionCount == 1)
        for _ in 0..<8 {
            try driver.send(driver.packet(Vsock.Op.readWrite, port: 3001, hostPort: 5, length: chunk.count), chunk, at: 0x200000)
            if driver.device.connectionCount == 0 { break }
        }
        #expect(driver.device.connectionCount == 0, "a guest beyond its credit was not reset")
    }

    @Test("at most maxConnections connections: further REQUESTs and host clients are refused")
    func connectionCap() throws {
        let driver = try VsockDriver(maxConnections: 3)
        defer { driver.close() }
        let server = try TestUnix.listen(driver.udsPath + "_8")
        defer {
            Glibc.close(server)
            unlink(driver.udsPath + "_8")
        }
        for port: UInt32 in 100..<103 {
            try driver.send(driver.packet(Vsock.Op.request, port: port, hostPort: 8))
            #expect(try driver.receive()?.header.op == Vsock.Op.response)
        }
        try driver.send(driver.packet(Vsock.Op.request, port: 103, hostPort: 8))
        #expect(try driver.receive()?.header.op == Vsock.Op.reset)
        #expect(driver.device.connectionCount == 3)
        let client = try TestUnix.connect(driver.udsPath)
        defer { Glibc.close(client) }
        #expect(TestUnix.atEOF(client), "a host client beyond the cap was kept")
        // One ends: room for another.
        try driver.send(driver.packet(Vsock.Op.reset, port: 100, hostPort: 8))
        try driver.send(driver.packet(Vsock.Op.request, port: 104, hostPort: 8))
        #expect(try driver.receive()?.header.op == Vsock.Op.response)
        // Device reset closes them all: the host sees EOF on each.
        var accepted: [Int32] = []
        for _ in 0..<4 { accepted.append(accept(server, nil, nil)) }
        defer { for fd in accepted { Glibc.close(fd) } }
        driver.transport.write(offset: Virtio.MMIORegister.status, length: 4, value: 0)
        #expect(driver.device.connectionCount == 0)
        for fd in accepted { #expect(TestUnix.atEOF(fd)) }
    }

    @Test("three host sockets stream 3 × 600 KiB at once under the guest's credit: every byte in order, and the ready list stays bounded")
    func streaming() throws {
        let driver = try VsockDriver()
        defer { driver.close() }
        let server = try TestUnix.listen(driver.udsPath + "_1234")
        defer {
            Glibc.close(server)
            unlink(driver.udsPath + "_1234")
        }
        let ports: [UInt32] = [3000, 3001, 3002]
        var hosts: [Int32] = []
        for port in ports {
            try driver.send(driver.packet(Vsock.Op.request, port: port, hostPort: 1234, bufferAllocation: 32 << 10))
            #expect(try driver.receive()?.header.op == Vsock.Op.response)
            hosts.append(accept(server, nil, nil))
        }
        defer { for fd in hosts { Glibc.close(fd) } }
        let total = 600 << 10
        func pattern(_ stream: Int, _ offset: Int) -> UInt8 { UInt8(truncatingIfNeeded: offset &* 7 &+ stream &* 101) }
        var writers: [pthread_t] = []
        for (stream, fd) in hosts.enumerated() {
            let bytes = (0..<total).map { pattern(stream, $0) }
            writers.append(
                try HostThread.spawn(name: "writer\(stream)") {
                    var sent = 0
                    while sent < bytes.count {
                        let n = bytes[sent...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, min($0.count, 8192), Int32(MSG_NOSIGNAL)) }
                        if n <= 0 { return }
                        sent += n
                    }
                })
        }
        defer { for writer in writers { HostThread.join(writer) } }
        var received = [[UInt8]](repeating: [], count: ports.count)
        var reported = [Int](repeating: 0, count: ports.count)
        var largestStorage = 0
        var packets = 0
        while received.map(\.count).reduce(0, +) < total * ports.count {
            guard let packet = try driver.receive() else {
                Issue.record("stalled at \(received.map(\.count)) bytes")
                break
            }
            packets += 1
            largestStorage = max(largestStorage, driver.device.queueStorage)
            let stream = try #require(ports.firstIndex(of: packet.header.destinationPort))
            switch packet.header.op {
            case Vsock.Op.readWrite:
                received[stream] += packet.payload
                // The guest consumes at once and tells the device every 16 KiB.
                if received[stream].count - reported[stream] >= 16 << 10 {
                    reported[stream] = received[stream].count
                    try driver.send(
                        driver.packet(
                            Vsock.Op.creditUpdate, port: ports[stream], hostPort: 1234, bufferAllocation: 32 << 10,
                            forwardCount: UInt32(reported[stream])))
                }
            case Vsock.Op.creditRequest:
                reported[stream] = received[stream].count
                try driver.send(
                    driver.packet(
                        Vsock.Op.creditUpdate, port: ports[stream], hostPort: 1234, bufferAllocation: 32 << 10,
                        forwardCount: UInt32(reported[stream])))
            default:
                Issue.record("unexpected \(packet.header)")
            }
        }
        for stream in 0..<ports.count {
            #expect(received[stream].count == total)
            #expect(received[stream] == (0..<total).map { pattern(stream, $0) }, "stream \(stream) corrupted")
        }
        #expect(largestStorage < 150, "the ready list grew with the packets (\(largestStorage) entries after \(packets) packets)")
    }

    @Test(
        "a host socket that does not read: the device holds at most its buf_alloc, reports only written bytes as fwd_cnt, and the guest stalls until the host reads"
    )
    func backPressure() throws {
        let driver = try VsockDriver()
        defer { driver.close() }
        let host = try driver.connectedHost()
        defer { Glibc.close(host) }
        let chunkSize = Vsock.maxPayload
        let window = Int(VirtioVsockDevice.bufferAllocation)
        func byte(_ offset: Int) -> UInt8 { UInt8(truncatingIfNeeded: offset &* 13 &+ offset >> 16) }
        // The guest sends whenever its view of the device's free space allows a whole chunk.
        var sent = 0
        var peerForward = 0
        var stalled = false
        for _ in 0..<64 {
            while window - (sent - peerForward) >= chunkSize {
                let chunk = (sent..<sent + chunkSize).map(byte)
                try driver.send(driver.packet(Vsock.Op.readWrite, hostPort: 1234, length: chunk.count), chunk, at: 0x200000)
                sent += chunk.count
            }
            if try driver.nothingReceived() {
                stalled = true
                break
            }
            let update = try #require(try driver.receive())
            #expect(update.header.op == Vsock.Op.creditUpdate, "\(update.header)")
            peerForward = Int(update.header.forwardCount)
            // fwd_cnt counts bytes the host socket took, never more.
            #expect(peerForward <= Int(driver.device.bytesToHost) && peerForward <= sent)
        }
        #expect(stalled, "the host never pushed back")
        #expect(sent - Int(driver.device.bytesToHost) <= window, "the device holds more than it advertised")
        #expect(driver.device.connectionCount == 1)

        // The host reads: every byte, in order; the device tells the guest it may go on.
        #expect(TestUnix.read(host, count: sent) == (0..<sent).map(byte))
        // (The flush may take several rounds; updates come until the guest has room for a
        // whole packet again.)
        var reported = peerForward
        while window - (sent - reported) < chunkSize, let update = try driver.receive() {
            #expect(update.header.op == Vsock.Op.creditUpdate && Int(update.header.forwardCount) > reported)
            reported = Int(update.header.forwardCount)
        }
        #expect(window - (sent - reported) >= chunkSize, "the guest was left without credit")
        #expect(driver.device.bytesToHost == UInt64(sent))
    }

    @Test(
        "a guest streams 4 MiB to a host socket with a small send buffer read 16 KiB at a time, so the device buffer never empties: every byte arrives and the buffer stays under twice buf_alloc"
    )
    func slowHostReader() throws {
        let driver = try VsockDriver()
        defer { driver.close() }
        let host = try driver.connectedHost()
        defer { Glibc.close(host) }
        // A small send buffer on the device's socket: each time the host reads, the device
        // can write only a little of what it holds, so its buffer never empties.
        let deviceFD = try #require(driver.device.hostDescriptors.first)
        var sendBuffer: Int32 = 8192
        try #require(setsockopt(deviceFD, SOL_SOCKET, SO_SNDBUF, &sendBuffer, socklen_t(4)) == 0)
        // Small packets keep the guest's view of the buffer full, so the device always has
        // more than the socket takes at once.
        let chunkSize = 4096
        let window = Int(VirtioVsockDevice.bufferAllocation)
        let total = 4 << 20
        func byte(_ offset: Int) -> UInt8 { UInt8(truncatingIfNeeded: offset &* 31 &+ offset >> 12) }
        var sent = 0
        var peerForward = 0
        var read = 0
        var largest = 0
        var intact = true
        while read < total {
            // The guest sends whenever its view of the device's free space allows a whole chunk.
            while sent < total && window - (sent - peerForward) >= chunkSize {
                let chunk = (sent..<sent + chunkSize).map(byte)
                try driver.send(driver.packet(Vsock.Op.readWrite, hostPort: 1234, length: chunk.count), chunk, at: 0x200000)
                sent += chunk.count
            }
            settle(driver.loop)
            largest = max(largest, driver.device.largestPendingStorage)
            // The host takes 16 KiB (the device refills its socket from the buffer).
            let piece = TestUnix.read(host, count: min(16 << 10, total - read))
            try #require(!piece.isEmpty, "the host read nothing at \(read) of \(sent) bytes")
            if piece != (read..<read + piece.count).map(byte) { intact = false }
            read += piece.count
            settle(driver.loop)
            while try !driver.nothingReceived(), let update = try driver.receive() {
                #expect(update.header.op == Vsock.Op.creditUpdate, "\(update.header)")
                peerForward = max(peerForward, Int(update.header.forwardCount))
            }
        }
        #expect(intact, "the host read corrupted bytes")
        #expect(driver.device.bytesToHost == UInt64(total))
        #expect(largest > 0, "the buffer was never used: the test did not slow the host down")
        #expect(largest < 2 * window, "the connection's buffer grew to \(largest) bytes")
    }

    @Test("a host-initiated connection the guest never answers is given up: RST to the guest, the client closed, a late RESPONSE reset")
    func unansweredRequest() throws {
        let driver = try VsockDriver(requestTimeoutNanoseconds: 50_000_000)
        defer { driver.close() }
        let client = try TestUnix.connect(driver.udsPath)
        defer { Glibc.close(client) }
        TestUnix.send(client, "CONNECT 60\n")
        let request = try #require(try driver.receive())
        #expect(request.header.op == Vsock.Op.request && request.header.destinationPort == 60)
        #expect(TestUnix.atEOF(client), "the client was kept")
        let reset = try #require(try driver.receive())
        #expect(reset.header.op == Vsock.Op.reset && reset.header.destinationPort == 60)
        #expect(reset.header.sourcePort == request.header.sourcePort)
        #expect(driver.device.connectionCount == 0)
        try driver.send(driver.packet(Vsock.Op.response, port: 60, hostPort: request.header.sourcePort))
        #expect(try driver.receive()?.header.op == Vsock.Op.reset)
    }

    @Test("host clients that never finish their CONNECT line are closed at the handshake deadline and never take connection slots")
    func silentHostClients() throws {
        let driver = try VsockDriver(maxConnections: 2, handshakeTimeoutNanoseconds: 50_000_000)
        defer { driver.close() }
        // More silent clients than the connection cap, one with half a line.
        var silent: [Int32] = []
        defer { for fd in silent { Glibc.close(fd) } }
        for _ in 0..<4 { silent.append(try TestUnix.connect(driver.udsPath)) }
        TestUnix.send(silent[0], "CONNECT 5")
        settle(driver.loop)
        // They do not hold the guest's connects back.
        let server = try TestUnix.listen(driver.udsPath + "_8")
        defer {
            Glibc.close(server)
            unlink(driver.udsPath + "_8")
        }
        try driver.send(driver.packet(Vsock.Op.request, port: 100, hostPort: 8))
        #expect(try driver.receive()?.header.op == Vsock.Op.response)
        // The deadline closes each of them; nothing reached the guest.
        for fd in silent { #expect(TestUnix.atEOF(fd), "a silent host client was kept") }
        #expect(try driver.nothingReceived())
        // A client that does send its line is still served.
        let client = try TestUnix.connect(driver.udsPath)
        defer { Glibc.close(client) }
        TestUnix.send(client, "CONNECT 52\n")
        let request = try #require(try driver.receive())
        #expect(request.header.op == Vsock.Op.request && request.header.destinationPort == 52)
    }

    @Test(
        "a guest that posts no receive buffers: host clients are refused once the control queue is full, and expiring requests are taken back rather than answered with RST"
    )
    func controlQueueFromHost() throws {
        let limit = VirtioVsockDevice.maxPendingControl
        do {
            // Requests wait far longer than the client's 10 s read: only a refusal closes it.
            let driver = try VsockDriver(maxConnections: limit + 8, requestTimeoutNanoseconds: 600_000_000_000, receiveBuffers: false)
            defer { driver.close() }
            var clients: [Int32] = []
            defer { for fd in clients { Glibc.close(fd) } }
            for index in 0..<limit {
                let client = try TestUnix.connect(driver.udsPath)
                clients.append(client)
                TestUnix.send(client, "CONNECT \(index + 1)\n")
                try #require(waitUntil { driver.device.connectionCount == index + 1 }, "client \(index) was not connected")
            }
            #expect(driver.device.controlBacklog == limit)
            let refused = try TestUnix.connect(driver.udsPath)
            defer { Glibc.close(refused) }
            TestUnix.send(refused, "CONNECT 9999\n")
            #expect(TestUnix.atEOF(refused), "a client was kept with the control queue full")
            #expect(driver.device.controlBacklog == limit && driver.device.connectionCount == limit)
        }
        // The guest never saw these requests: when they expire nothing is queued for it.
        let driver = try VsockDriver(requestTimeoutNanoseconds: 50_000_000, receiveBuffers: false)
        defer { driver.close() }
        for index in 0..<10 {
            let client = try TestUnix.connect(driver.udsPath)
            defer { Glibc.close(client) }
            TestUnix.send(client, "CONNECT \(index + 1)\n")
            #expect(TestUnix.atEOF(client), "an unanswered client was kept")
        }
        settle(driver.loop)
        #expect(driver.device.connectionCount == 0)
        #expect(driver.device.controlBacklog == 0, "expired requests left packets for the guest")
        try driver.postReceiveBuffers()
        #expect(try driver.nothingReceived())
    }

    @Test("one listener wakeup accepts at most 64 host clients; the rest wait for the next")
    func acceptsPerWakeup() throws {
        let memory = try guestMemory()
        let loop = try EventLoop(name: "vsock-accept-test")
        var template = Array("/tmp/flotilla-vsock-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer in buffer.baseAddress.flatMap { mkdtemp($0) } }
        try #require(made != nil)
        let directory = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let path = directory + "/l.sock"
        let listenFD = try UnixSocket.listen(path: path, mode: 0o600, backlog: 128)
        defer {
            Glibc.close(listenFD)
            unlink(path)
            rmdir(directory)
        }
        var clients: [Int32] = []
        defer { for fd in clients { Glibc.close(fd) } }
        for _ in 0..<100 { clients.append(try TestUnix.connect(path)) }
        // Not active (no driver): every client taken is closed at once.
        let core = VsockCore(
            memory: memory, guestCID: 5, udsPath: nil, loop: loop, maxConnections: 128, requestTimeoutNanoseconds: 1,
            handshakeTimeoutNanoseconds: 1)
        let first = core.accept(from: listenFD)
        #expect(first.accepted == UnixSocket.acceptsPerWakeup && !first.shortage)
        let second = core.accept(from: listenFD)
        #expect(second.accepted == 100 - UnixSocket.acceptsPerWakeup && !second.shortage)
        for fd in clients { #expect(TestUnix.atEOF(fd)) }
    }

    @Test("the guest shuts down both ways while its bytes wait for a host that does not read: reset at the close deadline (§5.10.6.6)")
    func forcedClose() throws {
        let driver = try VsockDriver(closeTimeoutNanoseconds: 50_000_000)
        defer { driver.close() }
        let host = try driver.connectedHost()
        defer { Glibc.close(host) }
        let deviceFD = try #require(driver.device.hostDescriptors.first)
        var sendBuffer: Int32 = 4096
        try #require(setsockopt(deviceFD, SOL_SOCKET, SO_SNDBUF, &sendBuffer, socklen_t(4)) == 0)
        let chunk = [UInt8](repeating: 3, count: Vsock.maxPayload)
        try driver.send(driver.packet(Vsock.Op.readWrite, hostPort: 1234, length: chunk.count), chunk, at: 0x200000)
        settle(driver.loop)
        try #require(driver.device.largestPendingStorage > 0, "the host socket took everything: nothing waits")
        try driver.send(driver.packet(Vsock.Op.shutdown, hostPort: 1234, flags: Vsock.shutdownBoth))
        // (A credit update for the bytes the socket took may come first.)
        var packet = try #require(try driver.receive(), "no RST: the connection is held for the host")
        if packet.header.op == Vsock.Op.creditUpdate {
            packet = try #require(try driver.receive(), "no RST: the connection is held for the host")
        }
        #expect(packet.header.op == Vsock.Op.reset && packet.header.destinationPort == 3000, "\(packet.header)")
        #expect(driver.device.connectionCount == 0)
    }
}
