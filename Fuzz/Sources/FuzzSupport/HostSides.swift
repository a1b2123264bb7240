import CLinux
import Glibc
import Synchronization

@testable import VMMWorker

// Host sides the device and MMIO targets share. virtio-net: VirtioNetDevice attaches to a real
// tap by name, so `NetStandIn` serves the two queues with the device's own NetReceiveHandler
// and NetTransmitHandler through the same VirtioQueueRunner, with a SOCK_SEQPACKET socket pair
// standing in for the tap (one read or write is one frame, as on a tap), as VirtioNetUnitTests
// do. Its glue mirrors VirtioNetDevice's: activation, reset, and the tap watch that is on only
// while the receive queue waits for a frame. virtio-console: `FuzzConsolePort`, a port without
// a socket, in front of the real VirtioConsoleDevice.

/// The stand-in tap: [0] the device's end, [1] the host's (non-blocking SOCK_SEQPACKET).
public let tap: (device: Int32, host: Int32) = {
    var fds: [Int32] = [0, 0]
    check(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &fds) == 0, "socketpair")
    return (fds[0], fds[1])
}()

/// Reads and drops whatever waits on `fd` (non-blocking).
public func drain(_ fd: Int32) {
    var buffer = [UInt8](repeating: 0, count: 70_000)
    while buffer.withUnsafeMutableBytes({ read(fd, $0.baseAddress, $0.count) }) >= 0 {}
}

/// virtio-net's queues on the stand-in tap (see the top of this file).
public final class NetStandIn: VirtioDevice {
    let loop: EventLoop
    let memory: GuestMemory

    struct State {
        var receive: VirtioQueueRunner?
        var transmit: VirtioQueueRunner?
        var receiver: NetReceiveHandler
        var transmitter: NetTransmitHandler
        var tapToken: EventLoop.Token?
        var watchingTap = false
    }
    let state: Mutex<State>
    /// Host bytes the handlers use (the transmit header and the receive overflow), as the
    /// device's own scratch. Invariant: allocated once, never freed, only the handlers use it.
    nonisolated(unsafe) static let scratch: UnsafeMutableRawPointer = {
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: VirtioNetDevice.scratchSize, alignment: 16)
        scratch.initializeMemory(as: UInt8.self, repeating: 0, count: VirtioNetDevice.scratchSize)
        return scratch
    }()

    public init(memory: GuestMemory, loop: EventLoop) {
        self.memory = memory
        self.loop = loop
        let scratch = Self.scratch
        let header = iovec(iov_base: scratch, iov_len: VirtioNetDevice.headerSize)
        let overflow = iovec(iov_base: scratch + 16, iov_len: VirtioNetDevice.scratchSize - 16)
        state = Mutex(
            State(
                receiver: NetReceiveHandler(tapFD: tap.device, memory: memory, overflow: overflow),
                transmitter: NetTransmitHandler(tapFD: tap.device, memory: memory, header: header)))
    }

    public var deviceID: UInt32 { Virtio.DeviceID.network }
    public var deviceFeatures: UInt64 { VirtioNetDevice.Feature.mac | VirtioNetDevice.Feature.status }
    public var queueMaxSizes: [UInt16] { [VirtioNetDevice.queueSize, VirtioNetDevice.queueSize] }
    public func readConfig(offset: UInt64, length: Int) -> UInt64 { 0 }
    public func writeConfig(offset: UInt64, length: Int, value: UInt64) {}

    public var frames: (UInt64, UInt64, UInt64, UInt64) {
        state.withLock { ($0.receiver.frames, $0.receiver.dropped, $0.transmitter.frames, $0.transmitter.dropped) }
    }

    public func activate(_ activation: VirtioActivation) throws {
        guard activation.queues.count == 2, let receiveQueue = activation.queues[0], let transmitQueue = activation.queues[1] else {
            throw DeviceError(.setup, "virtio-net stand-in: both queues are needed")
        }
        try state.withLock { state throws in
            state.receive = try VirtioQueueRunner(
                queue: receiveQueue, notifyFD: activation.notifyFDs[0], interrupt: activation.interrupt, bucket: nil, loop: loop
            ) { [weak self] in self?.receive() }
            state.transmit = try VirtioQueueRunner(
                queue: transmitQueue, notifyFD: activation.notifyFDs[1], interrupt: activation.interrupt, bucket: nil, loop: loop
            ) { [weak self] in self?.transmit() }
            state.tapToken = try loop.register(fd: tap.device, events: 0) { [weak self] _ in self?.receive() }
            state.watchingTap = false
        }
    }

    public func reset() {
        state.withLock { state in
            state.receive?.stop(loop: loop)
            state.transmit?.stop(loop: loop)
            if let token = state.tapToken { loop.unregister(token) }
            state.receive = nil
            state.transmit = nil
            state.tapToken = nil
            state.watchingTap = false
        }
    }

    func transmit() {
        state.withLock { state in _ = state.transmit?.run(&state.transmitter, loop: loop) }
    }

    func receive() {
        state.withLock { state in
            guard let outcome = state.receive?.run(serving: &state.receiver, loop: loop) else { return }
            let watch = outcome == .blocked
            if watch != state.watchingTap, let token = state.tapToken {
                state.watchingTap = (try? loop.modify(token, events: watch ? EPOLLIN.rawValue : 0)) != nil && watch
            }
        }
    }
}

/// A console port without a socket, as VirtioConsoleUnitTests' TestConsolePort: takes output
/// up to `room` bytes, holds offered input until the device's sink takes it, and hands it over
/// again when the device asks (on the loop, as ConsoleSocket does).
public final class FuzzConsolePort: ConsolePort {
    public struct State {
        public var room = Int.max
        var taken = 0
        var input: [UInt8] = []
        var sink: (@Sendable ([UInt8]) -> Int)?
        var outputSpace: (@Sendable () -> Void)?
    }
    public let state = Mutex(State())
    let loop: EventLoop

    public init(loop: EventLoop) { self.loop = loop }

    public func writeOutput(_ bytes: UnsafeRawBufferPointer) -> Int {
        state.withLock { s in
            let take = min(bytes.count, s.room)
            s.room -= take
            s.taken += take
            return take
        }
    }
    public func setInputSink(_ sink: @escaping @Sendable ([UInt8]) -> Int) { state.withLock { $0.sink = sink } }
    public func setOutputSpaceHandler(_ handler: @escaping @Sendable () -> Void) { state.withLock { $0.outputSpace = handler } }
    public func resumeInput() { loop.execute { [weak self] in self?.deliver() } }

    public func offer(_ bytes: ArraySlice<UInt8>) {
        state.withLock { $0.input += bytes }
        loop.execute { [weak self] in self?.deliver() }
    }

    public func makeRoom(_ room: Int) {
        let handler = state.withLock { s -> (@Sendable () -> Void)? in
            s.room = room
            return s.outputSpace
        }
        if let handler { loop.execute(handler) }
    }

    private func deliver() {
        let (pending, sink) = state.withLock { ($0.input, $0.sink) }
        guard !pending.isEmpty, let sink else { return }
        let placed = sink(pending)
        check(placed >= 0 && placed <= pending.count, "the console sink placed \(placed) of \(pending.count) bytes")
        state.withLock { $0.input.removeFirst(min(placed, $0.input.count)) }
    }

    public var waiting: Int { state.withLock { $0.input.count } }
    public var taken: Int { state.withLock { $0.taken } }
}
