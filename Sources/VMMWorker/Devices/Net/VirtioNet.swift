import CLinux
import Glibc
import Protocol
import Synchronization

/// A virtio-net device (virtio 1.2 §5.1) on a host tap device: receive queue 0 is filled with
/// frames read from the tap, transmit queue 1 is written to it; both processed on `loop` (the
/// NIC's iothread, or the main loop). One queue pair, no offloads (no CSUM/GSO features, and
/// the tap's offloads are off), so every frame crosses whole and checksummed.
///
/// Sendable: immutable configuration and descriptor; the live queue state is behind a Mutex,
/// taken by the loop thread while it processes a batch and by vCPU threads on activation and
/// reset (so a reset waits for the batch in progress, and nothing touches guest memory after).
public final class VirtioNetDevice: VirtioDevice {
    /// Feature bits (§5.1.3).
    public enum Feature {
        public static let mac: UInt64 = 1 << 5
        public static let status: UInt64 = 1 << 16
    }

    /// struct virtio_net_hdr (§5.1.6) with num_buffers: 12 bytes whenever VIRTIO_F_VERSION_1
    /// is negotiated (which the transport requires), MRG_RXBUF or not.
    public static let headerSize = 12
    /// An Ethernet header: the shortest frame the tap takes.
    static let ethernetHeaderSize = 14
    /// The largest frame (after the header) a transmit chain may carry: what one tap write
    /// takes (a 64 KiB packet plus its Ethernet and VLAN headers).
    static let maxFrameSize = 65_535 + 18
    public static let queueSize: UInt16 = 256
    /// §5.1.4: VIRTIO_NET_S_LINK_UP.
    static let linkUp: UInt16 = 1
    static let receiveQueue = 0
    static let transmitQueue = 1

    public let id: String
    public let tapName: String
    public let mac: MACAddress
    public let loop: EventLoop
    let memory: GuestMemory
    /// The tap, non-blocking, with a 12-byte virtio-net header before every frame (public for
    /// net-bench, which compares plain reads and writes on the same descriptor).
    public let tapFD: Int32
    static let scratchSize = 64

    public var deviceID: UInt32 { Virtio.DeviceID.network }
    public var deviceFeatures: UInt64 { Feature.mac | Feature.status }
    public var queueMaxSizes: [UInt16] { [Self.queueSize, Self.queueSize] }

    struct State {
        /// Host bytes the handlers use as iovec targets: the all-zero transmit header and the
        /// receive overflow that detects a frame larger than the chain. Allocated for the
        /// device's lifetime (the handlers live beside it), freed in deinit.
        let scratch: UnsafeMutableRawPointer
        var receive: VirtioQueueRunner?
        var transmit: VirtioQueueRunner?
        var receiver: NetReceiveHandler
        var transmitter: NetTransmitHandler
        /// The tap's readability watch, from activation to reset.
        var tapToken: EventLoop.Token?
        /// Whether that watch asks for EPOLLIN: only while the guest has posted receive
        /// buffers that wait for a frame (otherwise a readable tap would wake the loop for
        /// nothing until the guest kicks the receive queue).
        var watchingTap = false
    }

    private let state: Mutex<State>

    /// Frames given to the guest, frames sent to the tap, and frames dropped (received ones
    /// too large for the chain, malformed or failed transmissions), since start.
    public var statistics: (received: UInt64, transmitted: UInt64, receiveDropped: UInt64, transmitDropped: UInt64) {
        state.withLock { ($0.receiver.frames, $0.transmitter.frames, $0.receiver.dropped, $0.transmitter.dropped) }
    }

    /// Attaches to the tap `net.hostDeviceName`; fails naming the option and the reason.
    /// `interfaces` looks the tap up where if_nametoindex(3) cannot run (after start-up, under
    /// the seccomp filter: QMP device_add).
    public init(net: NetConfig, memory: GuestMemory, loop: EventLoop, interfaces: NetInterfaces? = nil) throws(DeviceError) {
        id = net.id
        tapName = net.hostDeviceName
        mac = net.mac ?? Self.defaultMAC(for: net)
        self.memory = memory
        self.loop = loop
        let option = "-netdev id=\(net.id),netdev=\(net.hostDeviceName) / net.host_dev_name"
        guard interfaces?.exists(net.hostDeviceName) ?? (if_nametoindex(net.hostDeviceName) != 0) else {
            throw DeviceError(.setup, "\(option): no network interface '\(net.hostDeviceName)' (create the tap device first)")
        }
        var step: UnsafePointer<CChar>?
        let fd = fl_tap_open(net.hostDeviceName, Int32(Self.headerSize), 0, &step)
        guard fd >= 0 else {
            let what = step.map { String(cString: $0) } ?? "open"
            throw DeviceError(
                .setup, "\(option): cannot attach to tap '\(net.hostDeviceName)': \(what): \(String(cString: strerror(errno)))")
        }
        tapFD = fd
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Self.scratchSize, alignment: 16)
        scratch.initializeMemory(as: UInt8.self, repeating: 0, count: Self.scratchSize)
        let header = iovec(iov_base: scratch, iov_len: Self.headerSize)
        let overflow = iovec(iov_base: scratch + 16, iov_len: Self.scratchSize - 16)
        state = Mutex(
            State(
                scratch: scratch,
                receiver: NetReceiveHandler(tapFD: fd, memory: memory, overflow: overflow),
                transmitter: NetTransmitHandler(tapFD: fd, memory: memory, header: header)))
    }

    deinit {
        close(tapFD)
        state.withLock { $0.scratch.deallocate() }
    }

    /// A stable locally administered unicast address for a NIC without `mac`: FNV-1a of its
    /// id and tap name, with the U/L bit set and the I/G bit clear (IEEE 802-2014 §8.2).
    static func defaultMAC(for net: NetConfig) -> MACAddress {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in "\(net.id)/\(net.hostDeviceName)".utf8 {
            hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3
        }
        func octet(_ index: UInt64) -> UInt8 { UInt8(truncatingIfNeeded: hash >> (8 * index)) }
        return MACAddress((octet(0) & 0xfc) | 0x02, octet(1), octet(2), octet(3), octet(4), octet(5))
    }

    /// struct virtio_net_config (§5.1.4): mac[6], status (LINK_UP), max_virtqueue_pairs (1).
    public func readConfig(offset: UInt64, length: Int) -> UInt64 {
        Virtio.readConfig(mac.array + [UInt8(Self.linkUp), 0, 1, 0], offset: offset, length: length)
    }

    /// §5.1.4: without VIRTIO_NET_F_CTRL_MAC_ADDR the driver does not write the config.
    public func writeConfig(offset: UInt64, length: Int, value: UInt64) {}

    public func activate(_ activation: VirtioActivation) throws {
        let device = "virtio-net '\(id)'"
        try state.withLock { state throws in
            state.receive = try activation.runner(Self.receiveQueue, "receiveq", of: device, loop: loop) {
                [weak self] in self?.receive()
            }
            state.transmit = try activation.runner(Self.transmitQueue, "transmitq", of: device, loop: loop) {
                [weak self] in self?.transmit()
            }
            // Registered with no events; the first receive pass decides.
            state.tapToken = try loop.register(fd: tapFD, events: 0) { [weak self] events in self?.tapReady(events) }
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

    /// Sends what the driver put on the transmit queue (on the loop thread).
    public func transmit() {
        state.withLock { state in
            _ = state.transmit?.run(&state.transmitter, loop: loop)
        }
    }

    func tapReady(_ events: UInt32) {
        // EPOLLERR/EPOLLHUP: the tap went away under us (its interface deleted); stop watching
        // it rather than wake for it forever. Receiving ends; transmissions fail and count.
        if events & (EPOLLERR.rawValue | EPOLLHUP.rawValue) != 0 {
            state.withLock { state in
                if let token = state.tapToken { loop.unregister(token) }
                state.tapToken = nil
                state.watchingTap = false
            }
            return
        }
        receive()
    }

    /// Moves frames from the tap into the guest's receive buffers (on the loop thread), until
    /// the tap is empty or the driver has no buffers left.
    ///
    /// The tap is watched only while buffers wait for frames: when the ring is empty the watch
    /// is dropped (the frames wait in the tap's queue) and the driver's next kick — it kicks
    /// once it adds buffers, as the drained runner re-armed avail_event (§2.7.10) — resumes.
    public func receive() {
        state.withLock { state in
            guard let outcome = state.receive?.run(&state.receiver, loop: loop) else { return }
            let watch = outcome == .blocked
            if watch != state.watchingTap, let token = state.tapToken {
                do {
                    try loop.modify(token, events: watch ? EPOLLIN.rawValue : 0)
                    state.watchingTap = watch
                } catch {
                    // Only for a descriptor epoll no longer knows; nothing to watch then.
                    state.watchingTap = false
                }
            }
        }
    }
}

/// The receive queue's part (§5.1.6.3, §5.1.6.4): one frame per chain of device-writable
/// buffers, read from the tap straight into them (the tap writes the 12-byte header first).
struct NetReceiveHandler: VirtioChainHandler {
    let tapFD: Int32
    let memory: GuestMemory
    /// A host buffer after the chain's buffers in every read: bytes landing there mean the
    /// frame did not fit.
    let overflow: iovec
    var iovecs: [iovec] = []
    /// Frames given to the guest, and frames dropped (too large for the chain they met).
    var frames: UInt64 = 0
    var dropped: UInt64 = 0
    /// Frames one chain may see dropped before the batch yields (the loop's other work goes
    /// on; a readable tap brings it back).
    static let maxDropsPerChain = 16

    init(tapFD: Int32, memory: GuestMemory, overflow: iovec) {
        self.tapFD = tapFD
        self.memory = memory
        self.overflow = overflow
        iovecs = Array(repeating: iovec(), count: Int(VirtioNetDevice.queueSize) + 1)
    }

    mutating func handle(_ chain: DescriptorChain, bucket: inout TokenBucket?) -> UInt32? {
        // §5.1.6.3.1: receive buffers are device-writable, room for the header at least.
        // Anything else is malformed: returned unused, no frame spent on it.
        guard chain.readableCount == 0, chain.writableLength >= UInt64(VirtioNetDevice.headerSize) else { return 0 }
        let capacity = chain.writableLength
        let count = chain.writableCount
        let memory = memory
        let overflow = overflow
        let tapFD = tapFD
        let chain = chain
        for _ in 0..<Self.maxDropsPerChain {
            let result = iovecs.withUnsafeMutableBufferPointer { vectors -> Int in
                var index = 0
                for segment in chain.writable {
                    // The walk checked the segment and kept its place in the host mapping.
                    vectors[index] = iovec(iov_base: memory.base + segment.hostOffset, iov_len: Int(segment.length))
                    index += 1
                }
                vectors[index] = overflow
                return readv(tapFD, vectors.baseAddress, Int32(count + 1))
            }
            if result < 0 {
                switch errno {
                case EINTR: continue
                case EAGAIN: return nil
                default:
                    // The tap dropped a frame it could not place (or is failing): count it and
                    // wait for the next readiness rather than spin.
                    dropped &+= 1
                    return nil
                }
            }
            // The tap returns the frame's whole size even when it was cut short.
            guard UInt64(result) <= capacity, result >= VirtioNetDevice.headerSize + VirtioNetDevice.ethernetHeaderSize else {
                dropped &+= 1
                continue
            }
            Self.storeHeader(in: chain, memory: memory)
            frames &+= 1
            return UInt32(result)
        }
        return nil
    }

    /// Writes our own header over the tap's: no flags (no GUEST_CSUM, so no DATA_VALID,
    /// §5.1.6.4.1), GSO_NONE, and num_buffers 1 (§5.1.6.4: one chain per packet without
    /// MRG_RXBUF; the tap leaves those two bytes untouched).
    static func storeHeader(in chain: DescriptorChain, memory: GuestMemory) {
        var done = 0
        for segment in chain.writable where done < VirtioNetDevice.headerSize {
            let count = min(Int(segment.length), VirtioNetDevice.headerSize - done)
            let target = memory.base + segment.hostOffset
            for i in 0..<count {
                target.storeBytes(of: done + i == 10 ? 1 : 0, toByteOffset: i, as: UInt8.self)
            }
            done += count
        }
    }
}

/// The transmit queue's part (§5.1.6.2): one frame per chain of device-readable buffers, the
/// driver's header first. The tap gets our all-zero header (no offloads were offered, so
/// the driver's may ask for none) followed by the frame, in one writev.
struct NetTransmitHandler: VirtioChainHandler {
    let tapFD: Int32
    let memory: GuestMemory
    let header: iovec
    var iovecs: [iovec] = []
    /// Frames written to the tap, and frames dropped (malformed chains, tap write failures).
    var frames: UInt64 = 0
    var dropped: UInt64 = 0

    init(tapFD: Int32, memory: GuestMemory, header: iovec) {
        self.tapFD = tapFD
        self.memory = memory
        self.header = header
        iovecs = Array(repeating: iovec(), count: Int(VirtioNetDevice.queueSize) + 1)
    }

    mutating func handle(_ chain: DescriptorChain, bucket: inout TokenBucket?) -> UInt32? {
        let headerSize = UInt64(VirtioNetDevice.headerSize)
        // §5.1.6.2: transmit buffers are device-readable only; a frame needs its Ethernet
        // header and fits one tap write. Anything else is dropped (used with 0 bytes written).
        guard chain.writableCount == 0, chain.readableLength >= headerSize + UInt64(VirtioNetDevice.ethernetHeaderSize),
            chain.readableLength - headerSize <= UInt64(VirtioNetDevice.maxFrameSize)
        else {
            dropped &+= 1
            return 0
        }
        let memory = memory
        let header = header
        let tapFD = tapFD
        let chain = chain
        let result = iovecs.withUnsafeMutableBufferPointer { vectors -> Int in
            vectors[0] = header
            var count = 1
            var skip = VirtioNetDevice.headerSize
            for segment in chain.readable {
                // The walk checked the segment and kept its place in the host mapping.
                let length = Int(segment.length)
                if skip >= length {
                    skip -= length
                    continue
                }
                vectors[count] = iovec(iov_base: memory.base + segment.hostOffset + skip, iov_len: length - skip)
                skip = 0
                count += 1
            }
            while true {
                let written = writev(tapFD, vectors.baseAddress, Int32(count))
                if written < 0 && errno == EINTR { continue }
                return written
            }
        }
        if result < 0 { dropped &+= 1 } else { frames &+= 1 }
        return 0
    }
}
