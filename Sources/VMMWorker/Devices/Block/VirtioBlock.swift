import CLinux
import Glibc
import Protocol
import Synchronization

/// A virtio-blk device (virtio 1.2 §5.2): one request queue, processed on `loop` (the
/// drive's iothread, or the main loop), optionally held to `iops` requests per second.
///
/// When the loop has ``EventLoop/ioWorkers``, requests that wait for the disk run there, many
/// at once (QEMU's aio=threads): READ and WRITE of an O_DIRECT image, FLUSH, DISCARD and
/// WRITE_ZEROES of any. The loop thread takes the chain, checks it and hands the worker a
/// ``BlockJob``; the worker does the system call and hands the status back through
/// ``BlockInFlight`` and a loop task, and the loop thread writes the status byte, puts the
/// chain on the used ring (in completion order, §2.7.8) and interrupts once per batch of
/// completions. Page-cache READ and WRITE stay on the loop thread: they do not wait for the
/// disk, and a thread hop would cost more than the copy.
///
/// Sendable: immutable configuration; the live queue state is behind a Mutex, taken by the
/// loop thread while it processes a batch or publishes completions and by vCPU threads on
/// activation and reset (so a reset waits for the batch in progress). Reset also waits for
/// the requests in flight on workers and drops their results, so nothing touches guest memory
/// after it.
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
    /// I/O worker threads (``EventLoop/ioWorkers``) of each loop that serves disks: up to this
    /// many requests of its disks wait for the host's storage at once.
    public static let defaultIOThreads = 8
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
    /// The requests on worker threads (nil: the loop has no ``EventLoop/ioWorkers``).
    private let inFlight: BlockInFlight?

    /// Requests completed since start (for tests and statistics).
    public var completedRequests: UInt64 { state.withLock { $0.requests.completed } }

    /// `serial` overrides the backend's for GET_ID (a hot-plugged device's own `serial`).
    public init(backend: BlockBackend, memory: GuestMemory, loop: EventLoop, iops: UInt64 = 0, serial: String? = nil) {
        self.backend = backend
        self.memory = memory
        self.loop = loop
        self.iops = iops
        handler = BlockRequestHandler(backend: backend, memory: memory, serial: serial)
        let inFlight = loop.ioWorkers.map { BlockInFlight(pool: $0, loop: loop) }
        self.inFlight = inFlight
        state = Mutex(State(requests: BlockChainHandler(requests: handler, inFlight: inFlight)))
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
            inFlight?.setPublisher { [weak self] in self?.publishCompletions() }
        }
    }

    /// Stops the queue; waits for the requests still on worker threads (they cannot be
    /// interrupted inside the kernel; those not yet started are skipped) and drops their
    /// results, so that when this returns nothing reads or writes guest memory for this
    /// activation and nothing is published on its rings (as QEMU drains on reset).
    public func reset() {
        state.withLock { state in
            state.active?.stop(loop: loop)
            state.active = nil
            inFlight?.cancelAndWait()
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

    /// Publishes what the workers finished (on the loop thread, from the task
    /// ``BlockInFlight`` schedules): status bytes, used elements, one interrupt.
    func publishCompletions() {
        guard let inFlight else { return }
        state.withLock { state in
            let done = inFlight.takeCompleted()
            // After a reset the list was emptied and the queue is gone; a task scheduled
            // before it finds nothing, or (after a new activation) only the new queue's work.
            guard !done.isEmpty, state.active != nil else { return }
            let handler = handler
            state.active?.complete(done.lazy.map { (head: $0.job.head, written: handler.finish($0.job, status: $0.status)) })
        }
    }
}

/// virtio-blk's part of the queue runner: one request per chain, one IOPS token per request
/// (taken when the request starts, wherever it runs).
struct BlockChainHandler: VirtioChainHandler {
    let requests: BlockRequestHandler
    /// Where requests that wait for the disk go (nil: everything runs here).
    let inFlight: BlockInFlight?
    var iovecs: [iovec] = []
    /// Requests taken since start.
    var completed: UInt64 = 0

    init(requests: BlockRequestHandler, inFlight: BlockInFlight? = nil) {
        self.requests = requests
        self.inFlight = inFlight
    }

    @inline(__always)
    mutating func handle(_ chain: DescriptorChain, bucket: inout TokenBucket?) -> UInt32? {
        bucket?.consume()
        completed &+= 1
        return requests.execute(chain, iovecs: &iovecs)
    }

    static var wantsLookahead: Bool { true }

    /// A lone request on an idle device runs here, as without workers (a thread hop would add
    /// its latency to every QD1 request); with more available or some in flight, O_DIRECT
    /// reads and writes go to the workers, so they wait for the disk together.
    @inline(__always)
    mutating func serve(_ chain: DescriptorChain, more: Bool, bucket: inout TokenBucket?) -> ChainDisposition {
        guard let inFlight else { return .used(handle(chain, bucket: &bucket) ?? 0) }
        bucket?.consume()
        completed &+= 1
        let transfers = requests.backend.direct && (more || inFlight.busy)
        switch requests.start(chain, iovecs: &iovecs, transfers: transfers) {
        case .done(let written):
            return .used(written)
        case .job(let job):
            inFlight.submit(job, handler: requests)
            return .inFlight
        }
    }
}

/// The requests of one virtio-blk device that are on worker threads, and the results they
/// hand back to the loop thread.
///
/// Sendable: all state is behind a ConditionLock (reset waits on it for the count to drop
/// to zero); the pool and loop are Sendable.
final class BlockInFlight: Sendable {
    struct Completion {
        let job: BlockJob
        let status: UInt8
    }

    private struct State {
        /// Jobs submitted and not yet finished (run or skipped).
        var count = 0
        /// Finished jobs of the current activation, in completion order.
        var completed: [Completion] = []
        /// Bumped by reset: jobs of an older generation are skipped, and their results dropped.
        var generation: UInt64 = 0
        /// The device's `publishCompletions`, run as a loop task.
        var publish: (@Sendable () -> Void)?
    }

    let pool: IOWorkerPool
    let loop: EventLoop
    private let state = ConditionLock(State())

    init(pool: IOWorkerPool, loop: EventLoop) {
        self.pool = pool
        self.loop = loop
    }

    /// Whether any job is on a worker (or its result not yet taken).
    var busy: Bool { state.withLock { $0.count > 0 || !$0.completed.isEmpty } }

    func setPublisher(_ publish: @escaping @Sendable () -> Void) {
        state.withLock { $0.publish = publish }
    }

    /// Runs `job` on a worker; its result goes to ``takeCompleted()`` and, when the list was
    /// empty, a loop task publishes it (one task for every completion that arrives before
    /// it runs).
    func submit(_ job: BlockJob, handler: BlockRequestHandler) {
        let generation = state.withLock { state in
            state.count += 1
            return state.generation
        }
        pool.submit { [self] in
            // Skipped when a reset came first: a chain of a reset queue must not be touched.
            let current = state.withLock { $0.generation == generation }
            let status = current ? handler.perform(job) : nil
            let publish: (@Sendable () -> Void)? = state.withLock { state in
                state.count -= 1
                guard let status, state.generation == generation else { return nil }
                state.completed.append(Completion(job: job, status: status))
                return state.completed.count == 1 ? state.publish : nil
            }
            state.broadcast()
            if let publish { loop.execute(publish) }
        }
    }

    /// What the workers finished since the last call (loop thread).
    func takeCompleted() -> [Completion] {
        state.withLock { state in
            var done: [Completion] = []
            swap(&done, &state.completed)
            return done
        }
    }

    /// Reset: jobs not yet started are skipped, the running ones are waited for, and every
    /// result not yet published is dropped.
    func cancelAndWait() {
        state.withLock { $0.generation &+= 1 }
        state.wait(until: { $0.count == 0 }) { state in
            state.completed.removeAll()
        }
    }
}
