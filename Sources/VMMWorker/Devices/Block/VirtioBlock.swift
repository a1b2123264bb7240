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

    /// The live queue, from DRIVER_OK to reset.
    struct Active {
        var queue: SplitVirtqueue
        let notifyFD: Int32
        let interrupt: VirtioInterrupt
        var token: EventLoop.Token?
        var bucket: TokenBucket?
        var resumeTimer: EventLoop.Token?
        var broken = false
    }

    /// Everything the loop thread mutates, under one lock. The scratch (the chain being
    /// executed and its host iovecs) outlives activations and is mutated in place, so its
    /// storage stays uniquely owned and a request allocates nothing.
    struct State {
        var active: Active?
        var chain = DescriptorChain(head: 0)
        var iovecs: [iovec] = []
        /// Requests completed since start.
        var completed: UInt64 = 0
    }

    private let state = Mutex(State())

    /// Requests completed since start (for tests and statistics).
    public var completedRequests: UInt64 { state.withLock { $0.completed } }

    public init(backend: BlockBackend, memory: GuestMemory, loop: EventLoop, iops: UInt64 = 0) {
        self.backend = backend
        self.memory = memory
        self.loop = loop
        self.iops = iops
        handler = BlockRequestHandler(backend: backend, memory: memory)
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
        var value: UInt64 = 0
        for i in 0..<length {
            let at = offset &+ UInt64(i)
            guard at < UInt64(config.count) else { break }
            value |= UInt64(config[Int(at)]) << (8 * UInt64(i))
        }
        return value
    }

    /// Every field this device offers is read-only (no CONFIG_WCE).
    public func writeConfig(offset: UInt64, length: Int, value: UInt64) {}

    public func activate(_ activation: VirtioActivation) throws {
        guard let first = activation.queues.first, let queue = first else {
            throw DeviceError(.setup, "virtio-blk '\(backend.id)': the driver did not set up the request queue")
        }
        let notifyFD = activation.notifyFDs[0]
        try state.withLock { state throws in
            var active = Active(
                queue: queue, notifyFD: notifyFD, interrupt: activation.interrupt,
                bucket: iops > 0 ? TokenBucket(rate: iops) : nil)
            active.token = try loop.watchQueueNotifications(fd: notifyFD) { [weak self] in self?.process() }
            state.active = active
        }
        // The driver may have queued requests before DRIVER_OK; look once.
        loop.execute { [weak self] in self?.process() }
    }

    public func reset() {
        state.withLock { state in
            if let token = state.active?.token { loop.unregister(token) }
            if let timer = state.active?.resumeTimer { loop.unregister(timer) }
            state.active = nil
        }
    }

    /// Processes what the driver made available (on the loop thread): until the ring is
    /// empty, the QoS bucket runs dry (a one-shot timer resumes), or the queue breaks.
    public func process() {
        state.withLock { state in
            // In place (optional chaining on the stored property): no copy of the queue state,
            // and the scratch stays uniquely owned.
            state.completed &+= state.active?.run(device: self, chain: &state.chain, iovecs: &state.iovecs) ?? 0
        }
    }

    func resumeFromTimer() {
        state.withLock { $0.active?.resumeTimer = nil }
        process()
    }
}

extension VirtioBlockDevice.Active {
    /// One batch: requests until the ring is empty or the bucket runs dry, then one interrupt
    /// if the driver wants one (§2.7.10). Returns the number of requests completed.
    mutating func run(device: VirtioBlockDevice, chain: inout DescriptorChain, iovecs: inout [iovec]) -> UInt64 {
        guard !broken else { return 0 }
        let done = requests(device: device, chain: &chain, iovecs: &iovecs)
        if queue.needsInterrupt() { interrupt.signal(Virtio.Interrupt.usedBuffer) }
        return done
    }

    private mutating func requests(device: VirtioBlockDevice, chain: inout DescriptorChain, iovecs: inout [iovec]) -> UInt64 {
        var done: UInt64 = 0
        func fail(_ error: VirtqueueError) -> UInt64 {
            broken = true
            interrupt.markNeedsReset()
            return done
        }
        while true {
            while true {
                if bucket != nil, let wait = bucket?.wait(), wait > 0 {
                    // Throttled: leave the rest in the ring and come back when a token is due,
                    // without blocking this loop's other devices (or the vCPUs).
                    // With EVENT_IDX the driver only kicks when avail_event asks for it, so ask
                    // (else a request posted now would wait for a kick that never comes).
                    let pending: Bool
                    do { pending = try queue.rearmNotification() } catch { return fail(error) }
                    if pending && resumeTimer == nil {
                        resumeTimer = try? device.loop.schedule(afterNanoseconds: wait) { [weak device] in device?.resumeFromTimer() }
                    }
                    return done
                }
                do {
                    guard try queue.next(into: &chain) else { break }
                } catch {
                    guard case .chain(let head) = error.kind else { return fail(error) }
                    // A malformed chain fails on its own: returned unused, nothing written.
                    do { try queue.complete(head: head, written: 0) } catch { return fail(error) }
                    continue
                }
                bucket?.consume()
                let written = device.handler.execute(chain, iovecs: &iovecs)
                do { try queue.complete(head: chain.head, written: written) } catch { return fail(error) }
                done += 1
            }
            do {
                if try queue.rearmNotification() { continue }
            } catch {
                return fail(error)
            }
            return done
        }
    }
}
