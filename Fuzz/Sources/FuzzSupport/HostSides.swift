import Glibc
import Protocol
import Synchronization

@testable import VMMWorker

// Host sides the device and MMIO targets share. virtio-net: the real VirtioNetDevice on a
// `Tap` that is a SOCK_SEQPACKET socket pair instead of a tap (one read or write is one frame,
// with its 12-byte header, as on a tap; Tap(frameSocket:) makes no tap ioctls, so only
// TUNSETOFFLOAD at activation is skipped — the queues, the handlers, the tap watch and the
// offload and mergeable-buffer logic are the device's own). virtio-console: `FuzzConsolePort`,
// a port without a socket, in front of the real VirtioConsoleDevice.

/// The stand-in tap: [0] the device's end, [1] the host's (non-blocking SOCK_SEQPACKET).
public let tap: (device: Int32, host: Int32) = {
    var fds: [Int32] = [0, 0]
    check(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &fds) == 0, "socketpair")
    return (fds[0], fds[1])
}()

/// The device's end as the `Tap` every input's VirtioNetDevice shares (kept open for the run).
public let fuzzTap = Tap(frameSocket: tap.device, name: "fuzz0")

/// A virtio-net device on the stand-in tap.
public func fuzzNet(memory: GuestMemory, loop: EventLoop) -> VirtioNetDevice {
    VirtioNetDevice(id: "net0", tap: fuzzTap, mac: MACAddress(0x52, 0x54, 0, 0x12, 0x34, 0x56), memory: memory, loop: loop)
}

/// Reads and drops whatever waits on `fd` (non-blocking).
public func drain(_ fd: Int32) {
    var buffer = [UInt8](repeating: 0, count: 70_000)
    while buffer.withUnsafeMutableBytes({ read(fd, $0.baseAddress, $0.count) }) >= 0 {}
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
