import Glibc
import Synchronization

/// A virtio-console device (virtio 1.2 §5.3) with one port and no feature bits (no SIZE, no
/// MULTIPORT, no EMERG_WRITE): receiveq 0 carries host→guest bytes, transmitq 1 guest→host
/// (§5.3.2). Its host end is a ``ConsolePort`` — the `-chardev` Unix socket.
///
/// - receiveq: host input fills the device-writable buffers the driver posted, in order; a
///   buffer may be filled only partly (§5.3.6.2: the used length says how much). With no
///   buffers posted, input stays with the port, which stops reading its client (backpressure,
///   nothing buffered here), until the driver posts more and the device asks for it again.
/// - transmitq: the device-readable bytes of each chain go to the port. When the port is full
///   (a slow client), the chain goes back to the ring with how far it got, and the queue waits
///   for the port to make room: the guest is held back, the loop and the vCPUs never wait.
///
/// Sendable: immutable configuration; the live queues are behind a Mutex, taken by the loop
/// thread while it serves them and by vCPU threads on activation and reset.
public final class VirtioConsoleDevice: VirtioDevice {
    public static let queueSize: UInt16 = 256
    public static let receiveQueue = 0
    public static let transmitQueue = 1

    public let id: String
    public let loop: EventLoop
    let port: any ConsolePort
    let memory: GuestMemory

    public var deviceID: UInt32 { Virtio.DeviceID.console }
    /// §5.3.3: none of SIZE, MULTIPORT, EMERG_WRITE.
    public var deviceFeatures: UInt64 { 0 }
    public var queueMaxSizes: [UInt16] { [Self.queueSize, Self.queueSize] }

    struct State {
        var receive: VirtioQueueRunner?
        var transmit: VirtioQueueRunner?
        var input: ConsoleInputHandler
        var output: ConsoleOutputHandler
    }

    private let state: Mutex<State>

    /// Bytes placed in the guest's receive buffers since start.
    public var receivedBytes: UInt64 { state.withLock { $0.input.delivered } }
    /// Bytes of the guest's transmit buffers taken by the port since start.
    public var transmittedBytes: UInt64 { state.withLock { $0.output.sent } }

    public init(id: String, port: any ConsolePort, memory: GuestMemory, loop: EventLoop) {
        self.id = id
        self.port = port
        self.memory = memory
        self.loop = loop
        state = Mutex(State(input: ConsoleInputHandler(memory: memory), output: ConsoleOutputHandler(port: port, memory: memory)))
        port.setInputSink { [weak self] bytes in self?.receive(bytes) ?? 0 }
        port.setOutputSpaceHandler { [weak self] in self?.transmit() }
    }

    /// struct virtio_console_config (§5.3.4): cols, rows, max_nr_ports, emerg_wr. None of
    /// the features that make them meaningful is offered; they read as 0.
    public func readConfig(offset: UInt64, length: Int) -> UInt64 { 0 }
    /// emerg_wr exists only with VIRTIO_CONSOLE_F_EMERG_WRITE (§5.3.4), not offered.
    public func writeConfig(offset: UInt64, length: Int, value: UInt64) {}

    public func activate(_ activation: VirtioActivation) throws {
        let device = "virtio-console '\(id)'"
        try state.withLock { state throws in
            // A kick on receiveq means new receive buffers: ask the port for waiting input.
            state.receive = try activation.runner(Self.receiveQueue, "receiveq", of: device, loop: loop) {
                [weak self] in self?.port.resumeInput()
            }
            state.transmit = try activation.runner(Self.transmitQueue, "transmitq", of: device, loop: loop) {
                [weak self] in self?.transmit()
            }
        }
    }

    public func reset() {
        state.withLock { state in
            state.receive?.stop(loop: loop)
            state.transmit?.stop(loop: loop)
            state.receive = nil
            state.transmit = nil
            state.output.resume = nil
        }
    }

    /// Host input (the port's sink, on the loop thread): fills receive buffers; returns how
    /// many bytes were placed (0 while the driver has posted none, or before DRIVER_OK).
    func receive(_ bytes: [UInt8]) -> Int {
        state.withLock { state in
            guard state.receive != nil else { return 0 }
            let before = state.input.delivered
            bytes.withUnsafeBytes { raw in
                state.input.pending = raw
                _ = state.receive?.run(&state.input, loop: loop)
                state.input.pending = UnsafeRawBufferPointer(start: nil, count: 0)
            }
            return Int(state.input.delivered &- before)
        }
    }

    /// Serves transmitq (a kick, or the port has room again), on the loop thread.
    func transmit() {
        state.withLock { state in
            _ = state.transmit?.run(&state.output, loop: loop)
        }
    }
}

/// receiveq's part of the queue runner: copies the host bytes of one delivery into each chain's
/// device-writable buffers; with nothing (left) to deliver, the chain goes back to the ring.
struct ConsoleInputHandler: VirtioChainHandler {
    let memory: GuestMemory
    /// The bytes being delivered (valid during one ``VirtioConsoleDevice/receive(_:)``).
    var pending = UnsafeRawBufferPointer(start: nil, count: 0)
    var delivered: UInt64 = 0

    mutating func handle(_ chain: DescriptorChain, bucket: inout TokenBucket?) -> UInt32? {
        guard !pending.isEmpty else { return nil }
        // §5.3.6.1: receive buffers are device-writable; a chain with readable ones is
        // malformed and returned unused.
        guard chain.readableCount == 0 else { return 0 }
        var written = 0
        for segment in chain.writable where !pending.isEmpty {
            let count = min(Int(segment.length), pending.count)
            // The walk checked the segment and kept its place in the host mapping.
            if let source = pending.baseAddress {
                (memory.base + segment.hostOffset).copyMemory(from: source, byteCount: count)
            }
            pending = UnsafeRawBufferPointer(rebasing: pending[count...])
            written += count
        }
        delivered &+= UInt64(written)
        // At most the chain's writable length, which fits the used element (§2.7.8).
        return UInt32(truncatingIfNeeded: written)
    }
}

/// transmitq's part of the queue runner: hands each chain's device-readable bytes to the port.
/// A chain the port cannot take whole goes back to the ring, remembering how many of its bytes
/// were taken, and the batch stops until the port has room.
struct ConsoleOutputHandler: VirtioChainHandler {
    let port: any ConsolePort
    let memory: GuestMemory
    /// The chain that was cut short: its head and the bytes of it already taken.
    var resume: (head: UInt16, taken: UInt64)?
    var sent: UInt64 = 0

    mutating func handle(_ chain: DescriptorChain, bucket: inout TokenBucket?) -> UInt32? {
        var skip: UInt64 = 0
        if let resume, resume.head == chain.head { skip = resume.taken }
        resume = nil
        var taken: UInt64 = 0
        for segment in chain.readable {
            let length = UInt64(segment.length)
            if skip >= length {
                skip -= length
                taken += length
                continue
            }
            // skip < length ≤ UInt32.max: the slice lies inside the checked segment.
            let start = memory.base + segment.hostOffset + Int(skip)
            let count = Int(length - skip)
            let accepted = port.writeOutput(UnsafeRawBufferPointer(start: start, count: count))
            sent &+= UInt64(accepted)
            taken += skip + UInt64(accepted)
            skip = 0
            if accepted < count {
                resume = (chain.head, taken)
                return nil
            }
        }
        // §5.3.6.2 / §2.7.8: the device wrote nothing into the chain.
        return 0
    }
}
