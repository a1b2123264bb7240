import CLinux
import Glibc
import Protocol
import Synchronization

/// A virtio-blk device (virtio 1.2 §5.2): one request queue, processed on `loop` (the
/// drive's iothread, or the main loop), optionally held to `iops` requests per second.
///
/// Sendable: immutable configuration; the live queue state is behind a Mutex, taken by the
/// loop thread while it processes a batch and by vCPU threads on activation and reset (so a
/// reset waits for the batch in progress, and nothing touches guest memory after it).
public final class VirtioBlockDevice: VirtioDevice {
    /// Feature bits (§5.2.3).
    public enum Feature {
        public static let segMax: UInt64 = 1 << 2
        public static let readOnly: UInt64 = 1 << 5
        public static let blockSize: UInt64 = 1 << 6
        public static let flush: UInt64 = 1 << 9
        public static let discard: UInt64 = 1 << 13
        public static let writeZeroes: UInt64 = 1 << 14
    }

    public static let queueSize: UInt16 = 256
    /// Largest DISCARD / WRITE_ZEROES extent in sectors (config max_discard_sectors).
    static let maxDiscardSectors: UInt32 = 1 << 22

    public let backend: BlockBackend
    public let loop: EventLoop
    public let iops: UInt64
    let memory: GuestMemory
    let handler: BlockRequestHandler
    let config: [UInt8]
    public let deviceFeatures: UInt64
    public var deviceID: UInt32 { Virtio.DeviceID.block }
    public var queueMaxSizes: [UInt16] { [Self.queueSize] }

    /// Everything the loop thread mutates, under one lock: the live queue (from DRIVER_OK to
    /// reset) and the request handler with its scratch (host iovecs), which outlives
    /// activations and is mutated in place, so its storage stays uniquely owned and a request
    /// allocates nothing.
    struct State {
        var active: VirtioQueueRunner?
        var requests: BlockChainHandler
    }

    private let state: Mutex<State>

    /// Requests completed since start (for tests and statistics).
    public var completedRequests: UInt64 { state.withLock { $0.requests.completed } }

    /// `serial` overrides the backend's for GET_ID (a hot-plugged device's own `serial`).
    public init(backend: BlockBackend, memory: GuestMemory, loop: EventLoop, iops: UInt64 = 0, serial: String? = nil) {
        self.backend = backend
        self.memory = memory
        self.loop = loop
        self.iops = iops
        handler = BlockRequestHandler(backend: backend, memory: memory, serial: serial)
        state = Mutex(State(requests: BlockChainHandler(requests: handler)))
        var features = Feature.segMax | Feature.blockSize | Feature.flush
        features |= backend.readOnly ? Feature.readOnly : Feature.discard | Feature.writeZeroes
        deviceFeatures = features

        // struct virtio_blk_config (§5.2.4), little-endian, 60 bytes.
        var bytes = [UInt8](repeating: 0, count: 60)
        func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
            withUnsafeBytes(of: value.littleEndian) { bytes.replaceSubrange(offset..<offset + MemoryLayout<T>.size, with: $0) }
        }
        put(backend.capacitySectors, at: 0)  // capacity, in 512-byte sectors
        put(UInt32(Self.queueSize - 2), at: 12)  // seg_max: leave room for header and status
        put(UInt32(BlockBackend.sectorSize), at: 20)  // blk_size
        put(Self.maxDiscardSectors, at: 36)  // max_discard_sectors
        put(UInt32(BlockRequestHandler.maxDiscardSegments), at: 40)  // max_discard_seg
        put(UInt32(8), at: 44)  // discard_sector_alignment: 4 KiB
        put(Self.maxDiscardSectors, at: 48)  // max_write_zeroes_sectors
        put(UInt32(BlockRequestHandler.maxDiscardSegments), at: 52)  // max_write_zeroes_seg
        bytes[56] = 1  // write_zeroes_may_unmap
        config = bytes
    }

    public func readConfig(offset: UInt64, length: Int) -> UInt64 {
        Virtio.readConfig(config, offset: offset, length: length)
    }

    /// Every field this device offers is read-only (no CONFIG_WCE).
    public func writeConfig(offset: UInt64, length: Int, value: UInt64) {}

    public func activate(_ activation: VirtioActivation) throws {
        let bucket = iops > 0 ? TokenBucket(rate: iops) : nil
        try state.withLock { state throws in
            state.active = try activation.runner(
                0, "the request queue", of: "virtio-blk '\(backend.id)'", bucket: bucket, loop: loop
            ) { [weak self] in self?.process() }
        }
    }

    public func reset() {
        state.withLock { state in
            state.active?.stop(loop: loop)
            state.active = nil
        }
    }

    /// Processes what the driver made available (on the loop thread): until the ring is
    /// empty, the QoS bucket runs dry (a one-shot timer resumes), or the queue breaks.
    public func process() {
        state.withLock { state in
            // In place (optional chaining on the stored property): no copy of the queue state,
            // and the scratch stays uniquely owned.
            _ = state.active?.run(&state.requests, loop: loop)
        }
    }
}

/// virtio-blk's part of the queue runner: one request per chain, one IOPS token per request.
struct BlockChainHandler: VirtioChainHandler {
    let requests: BlockRequestHandler
    var iovecs: [iovec] = []
    /// Requests completed since start.
    var completed: UInt64 = 0

    @inline(__always)
    mutating func handle(_ chain: DescriptorChain, bucket: inout TokenBucket?) -> UInt32? {
        bucket?.consume()
        completed &+= 1
        return requests.execute(chain, iovecs: &iovecs)
    }
}
