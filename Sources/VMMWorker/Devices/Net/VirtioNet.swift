import CLinux
import Glibc
import Protocol
import Synchronization

/// A virtio-net device (virtio 1.2 §5.1) on a host tap device: receive queue 0 is filled with
/// frames read from the tap, transmit queue 1 is written to it; both processed on `loop` (the
/// NIC's iothread, or the main loop). One queue pair. Checksum and TCP segmentation offloads
/// both ways and mergeable receive buffers are offered: the virtio-net header and the tap's
/// vnet header have one layout, so the driver's header goes to the tap (checked) and the
/// tap's to the driver, and the tap is told at activation which offloads the driver took
/// (TUNSETOFFLOAD), so a driver without GUEST_TSO4 is never handed a TSO frame.
///
/// Sendable: immutable configuration and descriptor; the live queue state is behind a Mutex,
/// taken by the loop thread while it processes a batch and by vCPU threads on activation and
/// reset (so a reset waits for the batch in progress, and nothing touches guest memory after).
public final class VirtioNetDevice: VirtioDevice {
    /// Feature bits (§5.1.3).
    public enum Feature {
        public static let checksum: UInt64 = 1 << 0
        public static let guestChecksum: UInt64 = 1 << 1
        public static let mac: UInt64 = 1 << 5
        public static let guestTSO4: UInt64 = 1 << 7
        public static let guestTSO6: UInt64 = 1 << 8
        public static let guestECN: UInt64 = 1 << 9
        public static let hostTSO4: UInt64 = 1 << 11
        public static let hostTSO6: UInt64 = 1 << 12
        public static let hostECN: UInt64 = 1 << 13
        public static let mergeableReceiveBuffers: UInt64 = 1 << 15
        public static let status: UInt64 = 1 << 16
        /// What this device offers. Not UFO/USO: Linux no longer builds UFO packets, and USO
        /// (GUEST_USO4/6, HOST_USO) postdates virtio 1.2.
        public static let offered: UInt64 =
            checksum | guestChecksum | mac | guestTSO4 | guestTSO6 | guestECN | hostTSO4 | hostTSO6 | hostECN
            | mergeableReceiveBuffers | status
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
    public let mac: MACAddress
    public let loop: EventLoop
    let memory: GuestMemory
    /// The tap: non-blocking, with a 12-byte virtio-net header before every frame. Shared with
    /// the netdev that holds it (netdev_add fd=), which outlives a device_del.
    public let tap: Tap
    /// The tap's interface name.
    public var tapName: String { tap.name }
    /// The tap's descriptor (public for net-bench, which compares plain reads and writes on it).
    public var tapFD: Int32 { tap.fd }
    static let scratchSize = 64

    public var deviceID: UInt32 { Virtio.DeviceID.network }
    public var deviceFeatures: UInt64 { Feature.offered }
    public var queueMaxSizes: [UInt16] { [Self.queueSize, Self.queueSize] }

    struct State {
        /// Host bytes the handlers use as iovec targets: the transmit header and the receive
        /// overflow that detects a frame larger than the chain. Allocated for the
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

    /// Attaches to the tap `net.hostDeviceName` (by name: -netdev, netdev_add ifname=) and
    /// serves it as ``init(id:tap:mac:memory:loop:)`` does; fails naming the option and the
    /// reason. `interfaces` looks the tap up where if_nametoindex(3) cannot run (after start-up,
    /// under the seccomp filter: QMP device_add).
    public convenience init(net: NetConfig, memory: GuestMemory, loop: EventLoop, interfaces: NetInterfaces? = nil) throws(DeviceError) {
        let option = "-netdev id=\(net.id),netdev=\(net.hostDeviceName) / net.host_dev_name"
        guard interfaces?.exists(net.hostDeviceName) ?? (if_nametoindex(net.hostDeviceName) != 0) else {
            throw DeviceError(.setup, "\(option): no network interface '\(net.hostDeviceName)' (create the tap device first)")
        }
        let tap: Tap
        do {
            tap = try Tap.open(name: net.hostDeviceName)
        } catch {
            throw DeviceError(.setup, "\(option): cannot attach to tap '\(net.hostDeviceName)': \(error)")
        }
        self.init(id: net.id, tap: tap, mac: net.mac ?? Self.defaultMAC(id: net.id, tap: net.hostDeviceName), memory: memory, loop: loop)
    }

    /// A NIC `id` on `tap`, set up already (``Tap``: by name, or a descriptor passed in).
    public init(id: String, tap: Tap, mac: MACAddress, memory: GuestMemory, loop: EventLoop) {
        self.id = id
        self.tap = tap
        self.mac = mac
        self.memory = memory
        self.loop = loop
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Self.scratchSize, alignment: 16)
        scratch.initializeMemory(as: UInt8.self, repeating: 0, count: Self.scratchSize)
        let header = iovec(iov_base: scratch, iov_len: Self.headerSize)
        let overflow = iovec(iov_base: scratch + 16, iov_len: Self.scratchSize - 16)
        state = Mutex(
            State(
                scratch: scratch,
                receiver: NetReceiveHandler(tapFD: tap.fd, memory: memory, overflow: overflow),
                transmitter: NetTransmitHandler(tapFD: tap.fd, memory: memory, header: header)))
    }

    deinit {
        state.withLock { $0.scratch.deallocate() }
    }

    /// A stable locally administered unicast address for a NIC without `mac`: FNV-1a of its
    /// id and tap name, with the U/L bit set and the I/G bit clear (IEEE 802-2014 §8.2).
    static func defaultMAC(for net: NetConfig) -> MACAddress { defaultMAC(id: net.id, tap: net.hostDeviceName) }

    /// ``defaultMAC(for:)`` for NIC `id` on interface `tap`.
    public static func defaultMAC(id: String, tap: String) -> MACAddress {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in "\(id)/\(tap)".utf8 {
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
            // The offloads this driver took, in the handlers and the tap (§5.1.3; the tap hands
            // GSO and partial-checksum frames only to a driver that accepted them).
            let offloads = NetOffloads(features: activation.features)
            let code = tap.setOffloads(offloads.tapOffloads)
            guard code == 0 else {
                throw DeviceError(.setup, "\(device): TUNSETOFFLOAD on tap '\(tapName)': \(String(cString: strerror(code)))")
            }
            state.receiver.offloads = offloads
            state.receiver.pendingCount = 0
            state.receiver.pendingCapacity = 0
            state.transmitter.offloads = offloads
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
            // The taken chains go with the queue; the next driver sets its own offloads.
            state.receiver.pendingCount = 0
            state.receiver.pendingCapacity = 0
            _ = tap.setOffloads(0)
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
            guard let outcome = state.receive?.run(serving: &state.receiver, loop: loop) else { return }
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

/// struct virtio_net_hdr (§5.1.6), the same 12 bytes as the tap's vnet header (TUNSETVNETHDRSZ
/// 12: the kernel reads and writes the first 10 and leaves num_buffers alone).
struct NetHeader: Equatable {
    /// §5.1.6 flags.
    static let needsChecksum: UInt8 = 1
    static let dataValid: UInt8 = 2
    /// §5.1.6 gso_type values, and the ECN bit that may be or-ed into the TCP ones.
    static let gsoNone: UInt8 = 0
    static let gsoTCPv4: UInt8 = 1
    static let gsoTCPv6: UInt8 = 4
    static let gsoECN: UInt8 = 0x80

    /// Bytes 0-7 (flags, gso_type, hdr_len, gso_size, csum_start) and 8-11 (csum_offset,
    /// num_buffers), as little-endian integers.
    var low: UInt64 = 0
    var high: UInt32 = 0

    var flags: UInt8 {
        get { UInt8(truncatingIfNeeded: low) }
        set { low = low & ~0xff | UInt64(newValue) }
    }
    var gsoType: UInt8 { UInt8(truncatingIfNeeded: low >> 8) }
    var headerLength: Int { Int(UInt16(truncatingIfNeeded: low >> 16)) }
    var gsoSize: Int { Int(UInt16(truncatingIfNeeded: low >> 32)) }
    var checksumStart: Int { Int(UInt16(truncatingIfNeeded: low >> 48)) }
    var checksumOffset: Int { Int(UInt16(truncatingIfNeeded: high)) }
    var buffers: UInt16 {
        get { UInt16(truncatingIfNeeded: high >> 16) }
        set { high = high & 0xffff | UInt32(newValue) << 16 }
    }

    /// Copies the header out of the first bytes of `segments` (at least 12 bytes long).
    init<Segments: Collection<GuestSegment>>(from segments: Segments, memory: GuestMemory) {
        var bytes: (UInt64, UInt32) = (0, 0)
        withUnsafeMutableBytes(of: &bytes) { header in
            var done = 0
            for segment in segments where done < VirtioNetDevice.headerSize {
                let count = min(Int(segment.length), VirtioNetDevice.headerSize - done)
                // The walk checked the segment and kept its place in the host mapping.
                header.baseAddress.map { $0.advanced(by: done).copyMemory(from: memory.base + segment.hostOffset, byteCount: count) }
                done += count
            }
        }
        low = UInt64(littleEndian: bytes.0)
        high = UInt32(littleEndian: bytes.1)
    }

    init() {}

    /// Stores the 12 bytes at `target`.
    func store(to target: UnsafeMutableRawPointer) {
        target.storeBytes(of: low.littleEndian, as: UInt64.self)
        target.storeBytes(of: high.littleEndian, toByteOffset: 8, as: UInt32.self)
    }

    /// Stores the header over the first bytes of `segments`.
    func store<Segments: Collection<GuestSegment>>(to segments: Segments, memory: GuestMemory) {
        var little = (low.littleEndian, high.littleEndian)
        withUnsafeBytes(of: &little) { header in
            var done = 0
            for segment in segments where done < VirtioNetDevice.headerSize {
                let count = min(Int(segment.length), VirtioNetDevice.headerSize - done)
                header.baseAddress.map { (memory.base + segment.hostOffset).copyMemory(from: $0.advanced(by: done), byteCount: count) }
                done += count
            }
        }
    }

    /// Whether a GSO type is one the negotiated features allow (§5.1.6.2, §5.1.6.4: TCPv4 with
    /// *_TSO4, TCPv6 with *_TSO6, the ECN bit with *_ECN; UDP and USO are not offered).
    func gsoAllowed(tso4: Bool, tso6: Bool, ecn: Bool) -> Bool {
        if gsoType & Self.gsoECN != 0 && !ecn { return false }
        switch gsoType & ~Self.gsoECN {
        case Self.gsoNone: return gsoType == Self.gsoNone
        case Self.gsoTCPv4: return tso4
        case Self.gsoTCPv6: return tso6
        default: return false
        }
    }
}

/// The offloads a driver accepted (§5.1.3), with the dependencies of §5.1.3.1 applied (a TSO
/// bit without its CSUM bit, or ECN without TSO, counts as not accepted), and what the tap
/// is told (TUNSETOFFLOAD, linux/if_tun.h TUN_F_*).
struct NetOffloads: Equatable {
    var guestChecksum = false
    var guestTSO4 = false
    var guestTSO6 = false
    var guestECN = false
    var hostChecksum = false
    var hostTSO4 = false
    var hostTSO6 = false
    var hostECN = false
    var mergeable = false

    init() {}

    init(features: UInt64) {
        typealias F = VirtioNetDevice.Feature
        func has(_ bit: UInt64) -> Bool { features & bit != 0 }
        guestChecksum = has(F.guestChecksum)
        guestTSO4 = guestChecksum && has(F.guestTSO4)
        guestTSO6 = guestChecksum && has(F.guestTSO6)
        guestECN = (guestTSO4 || guestTSO6) && has(F.guestECN)
        hostChecksum = has(F.checksum)
        hostTSO4 = hostChecksum && has(F.hostTSO4)
        hostTSO6 = hostChecksum && has(F.hostTSO6)
        hostECN = (hostTSO4 || hostTSO6) && has(F.hostECN)
        mergeable = has(F.mergeableReceiveBuffers)
    }

    /// TUN_F_CSUM 0x01, TUN_F_TSO4 0x02, TUN_F_TSO6 0x04, TUN_F_TSO_ECN 0x08: what the tap may
    /// hand the guest (the receive direction). Transmitted GSO frames need no tap offload.
    var tapOffloads: UInt32 {
        (guestChecksum ? 0x01 : 0) | (guestTSO4 ? 0x02 : 0) | (guestTSO6 ? 0x04 : 0) | (guestECN ? 0x08 : 0)
    }

    /// The largest frame after the header the guest may be handed: a 64 KiB GSO packet with
    /// its Ethernet and VLAN headers when it takes TSO, else one the tap's MTU allows (which
    /// we cannot bound here, so the same: a frame too large for the buffers is dropped).
    static let maxFrame = VirtioNetDevice.maxFrameSize
}

/// The receive queue's part (§5.1.6.3, §5.1.6.4): frames read from the tap straight into
/// chains of device-writable buffers, the tap's vnet header first. Without MRG_RXBUF a frame
/// goes into one chain (big enough for a 64 KiB GSO frame when the driver took GUEST_TSO*,
/// §5.1.6.3.1); with it, into as many chains as it needs, num_buffers saying how many, all
/// published together.
///
/// Chains are taken into `pending` before the read (with MRG_RXBUF until they hold a
/// largest frame, or the ring is empty) and stay there, in order, until a frame uses them;
/// they are the device's until then (§2.7.13), and reset forgets them with the queue.
struct NetReceiveHandler: VirtioQueueHandler {
    let tapFD: Int32
    let memory: GuestMemory
    /// A host buffer after the chains' buffers in every read: bytes landing there mean the
    /// frame did not fit.
    let overflow: iovec
    var offloads: NetOffloads
    var iovecs: [iovec]
    /// Taken chains waiting for frames: a ring of `pendingCount` from `pendingStart`.
    var pending: [DescriptorChain]
    var pendingStart = 0
    var pendingCount = 0
    /// Writable bytes of the pending chains.
    var pendingCapacity: UInt64 = 0
    /// Frames given to the guest, and frames dropped (too large for the buffers, or a header
    /// the driver's features do not allow).
    var frames: UInt64 = 0
    var dropped: UInt64 = 0
    /// Frames one batch may move (or drop) before it yields to the loop's other work.
    static let framesPerBatch = 256
    /// The most iovecs a read may use (UIO_MAXIOV), the overflow included.
    static let maxIovecs = 1024

    init(tapFD: Int32, memory: GuestMemory, overflow: iovec, offloads: NetOffloads = NetOffloads()) {
        self.tapFD = tapFD
        self.memory = memory
        self.overflow = overflow
        self.offloads = offloads
        iovecs = Array(repeating: iovec(), count: Self.maxIovecs)
        pending = Array(repeating: DescriptorChain(head: 0), count: Int(VirtioNetDevice.queueSize))
    }

    /// Takes chains into `pending`: one when empty, and with MRG_RXBUF more until they hold a
    /// largest frame. Malformed chains (§5.1.6.3.1: device-writable only, room for the header
    /// at least — every buffer with MRG_RXBUF) are returned unused.
    mutating func gather(_ queue: inout SplitVirtqueue) throws(VirtqueueError) {
        let want = UInt64(VirtioNetDevice.headerSize + NetOffloads.maxFrame)
        while pendingCount < pending.count && (pendingCount == 0 || (offloads.mergeable && pendingCapacity < want)) {
            let slot = (pendingStart + pendingCount) % pending.count
            do {
                guard try queue.next(into: &pending[slot]) else { return }
            } catch {
                guard case .chain(let head) = error.kind else { throw error }
                try queue.complete(head: head, written: 0)
                continue
            }
            let chain = pending[slot]
            guard chain.readableCount == 0, chain.writableLength >= UInt64(VirtioNetDevice.headerSize) else {
                try queue.complete(head: chain.head, written: 0)
                continue
            }
            pendingCount += 1
            pendingCapacity += chain.writableLength
        }
    }

    mutating func serve(_ queue: inout SplitVirtqueue) throws(VirtqueueError) -> VirtioQueueRunner.Outcome {
        for _ in 0..<Self.framesPerBatch {
            try gather(&queue)
            if pendingCount == 0 {
                // Nothing to receive into: ask for a kick when the driver adds buffers.
                if try queue.rearmNotification() { continue }
                return .drained
            }
            // The chains this read may fill: the first, and with MRG_RXBUF the following
            // ones up to a largest frame (or UIO_MAXIOV).
            let want = UInt64(VirtioNetDevice.headerSize + NetOffloads.maxFrame)
            let memory = memory
            let start = pendingStart
            let available = pendingCount
            let mergeable = offloads.mergeable
            let (count, capacity) = pending.withUnsafeBufferPointer { pending in
                iovecs.withUnsafeMutableBufferPointer { vectors -> (Int, UInt64) in
                    var count = 0
                    var chains = 0
                    var capacity: UInt64 = 0
                    while chains < available && (chains == 0 || (mergeable && capacity < want)) {
                        let index = (start + chains) % pending.count
                        guard count + pending[index].writableCount < Self.maxIovecs else { break }
                        for segment in pending[index].writable {
                            // The walk checked the segment and kept its place in the host mapping.
                            vectors[count] = iovec(iov_base: memory.base + segment.hostOffset, iov_len: Int(segment.length))
                            count += 1
                        }
                        chains += 1
                        capacity += pending[index].writableLength
                    }
                    vectors[count] = overflow
                    return (count + 1, capacity)
                }
            }
            let result = readv(tapFD, iovecs, Int32(count))
            if result < 0 {
                if errno == EINTR { continue }
                // EAGAIN: wait for the tap. Anything else: the tap dropped a frame it could
                // not place, or is failing; count it and wait for the next readiness rather
                // than spin.
                if errno != EAGAIN { dropped &+= 1 }
                return .blocked
            }
            // The tap returns the frame's whole size even when it was cut short.
            guard UInt64(result) <= capacity, result >= VirtioNetDevice.headerSize + VirtioNetDevice.ethernetHeaderSize else {
                dropped &+= 1
                continue
            }
            let first = pending[pendingStart]
            var header = NetHeader(from: first.writable, memory: memory)
            // §5.1.6.4.1: flags only with GUEST_CSUM (NEEDS_CSUM cannot be honoured without
            // it: drop; DATA_VALID is only a hint: clear), GSO only as negotiated. The tap
            // only does otherwise for frames it queued before this driver's offloads were set.
            if !offloads.guestChecksum {
                guard header.flags & NetHeader.needsChecksum == 0 else {
                    dropped &+= 1
                    continue
                }
                header.flags = 0
            }
            header.flags &= NetHeader.needsChecksum | NetHeader.dataValid
            guard header.gsoAllowed(tso4: offloads.guestTSO4, tso6: offloads.guestTSO6, ecn: offloads.guestECN) else {
                dropped &+= 1
                continue
            }
            // The chains the frame used, each completed with what it holds.
            var left = UInt64(result)
            var used: UInt16 = 0
            while left > 0 {
                let chain = pending[pendingStart]
                let written = min(left, chain.writableLength)
                try queue.complete(head: chain.head, written: UInt32(written), publish: false)
                left -= written
                used += 1
                pendingStart = (pendingStart + 1) % pending.count
                pendingCount -= 1
                pendingCapacity -= chain.writableLength
            }
            // §5.1.6.4: num_buffers, 1 without MRG_RXBUF.
            header.buffers = used
            header.store(to: first.writable, memory: memory)
            queue.publishUsed()
            frames &+= 1
        }
        return .yielded
    }
}

/// The transmit queue's part (§5.1.6.2): one frame per chain of device-readable buffers, the
/// driver's header first. The header is copied out, checked against the negotiated features
/// and handed to the tap before the frame, in one writev; the kernel validates the rest
/// (virtio_net_hdr_to_skb) and a write it refuses is a dropped frame.
struct NetTransmitHandler: VirtioChainHandler {
    let tapFD: Int32
    let memory: GuestMemory
    /// Host memory for the header handed to the tap (12 bytes).
    let header: iovec
    var offloads: NetOffloads
    var iovecs: [iovec] = []
    /// Frames written to the tap, and frames dropped (malformed chains or headers, tap write
    /// failures).
    var frames: UInt64 = 0
    var dropped: UInt64 = 0

    init(tapFD: Int32, memory: GuestMemory, header: iovec, offloads: NetOffloads = NetOffloads()) {
        self.tapFD = tapFD
        self.memory = memory
        self.header = header
        self.offloads = offloads
        iovecs = Array(repeating: iovec(), count: Int(VirtioNetDevice.queueSize) + 1)
    }

    /// The header to hand the tap, or nil when the frame must be dropped: NEEDS_CSUM only
    /// with CSUM, and its checksum field inside the frame; GSO types only as negotiated, with
    /// an MSS and a header length inside the frame (§5.1.6.2). Unknown flag bits are
    /// cleared; num_buffers, which the driver leaves 0 on transmit, is not passed on.
    func checked(_ header: NetHeader, frameLength: Int) -> NetHeader? {
        var header = header
        header.flags &= NetHeader.needsChecksum
        header.buffers = 0
        if header.flags & NetHeader.needsChecksum != 0 {
            guard offloads.hostChecksum, header.checksumStart + header.checksumOffset + 2 <= frameLength else { return nil }
        }
        guard header.gsoAllowed(tso4: offloads.hostTSO4, tso6: offloads.hostTSO6, ecn: offloads.hostECN) else { return nil }
        if header.gsoType != NetHeader.gsoNone {
            guard header.gsoSize > 0, header.headerLength <= frameLength else { return nil }
        }
        return header
    }

    mutating func handle(_ chain: DescriptorChain, bucket: inout TokenBucket?) -> UInt32? {
        let headerSize = UInt64(VirtioNetDevice.headerSize)
        // §5.1.6.2: transmit buffers are device-readable only; a frame needs its Ethernet
        // header and fits one tap write. Anything else is dropped (used with 0 bytes written).
        guard chain.writableCount == 0, chain.readableLength >= headerSize + UInt64(VirtioNetDevice.ethernetHeaderSize),
            chain.readableLength - headerSize <= UInt64(VirtioNetDevice.maxFrameSize),
            let tapHeader = checked(
                NetHeader(from: chain.readable, memory: memory), frameLength: Int(chain.readableLength - headerSize))
        else {
            dropped &+= 1
            return 0
        }
        let header = header
        header.iov_base.map { tapHeader.store(to: $0) }
        let memory = memory
        let tapFD = tapFD
        let chain = chain
        let result = iovecs.withUnsafeMutableBufferPointer { vectors -> Int in
            vectors[0] = header
            var count = 1
            // The frame: everything after the driver's header. The walk checked the segments
            // and kept their places in the host mapping.
            let frame = chain.segments(readable: true)
            chain.forEachPiece(in: frame, skip: UInt64(VirtioNetDevice.headerSize), count: chain.readableLength) { hostOffset, length in
                vectors[count] = iovec(iov_base: memory.base + hostOffset, iov_len: length)
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
