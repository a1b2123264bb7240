import CLinux
import Glibc
import Protocol
import Synchronization

/// A virtio-rng device (virtio 1.2 §5.4): one request queue whose device-writable buffers it
/// fills with bytes read from the host's `random_file`, at most `bytes_per_sec` on average.
///
/// Sendable: immutable configuration; the live queue state is behind a Mutex, taken by the
/// loop thread while it fills a batch and by vCPU threads on activation and reset.
public final class VirtioRngDevice: VirtioDevice {
    public static let queueSize: UInt16 = 256
    /// The most one request gets in one go: Linux asks for 64 bytes at a time, and a bound
    /// keeps one greedy buffer from holding the loop.
    static let maxBytesPerRequest = 64 << 10
    /// What a throttled queue waits to have before it hands out bytes again.
    static let refillBytes: Double = 64

    public let path: String
    public let bytesPerSecond: UInt64?
    public let loop: EventLoop
    let memory: GuestMemory
    /// `random_file`, opened non-blocking: a source with nothing to give (a FIFO, /dev/random
    /// before the host's pool is ready) yields a short buffer, never a blocked loop.
    let sourceFD: Int32

    public var deviceID: UInt32 { Virtio.DeviceID.rng }
    /// §5.4.3: no device-specific feature bits.
    public var deviceFeatures: UInt64 { 0 }
    public var queueMaxSizes: [UInt16] { [Self.queueSize] }

    /// The live queue (from DRIVER_OK to reset) and the fill handler, under one lock.
    struct State {
        var active: VirtioQueueRunner?
        var source: RngChainHandler
    }

    private let state: Mutex<State>

    /// Bytes given to the guest since start (for tests and statistics).
    public var deliveredBytes: UInt64 { state.withLock { $0.source.delivered } }

    /// Opens `rng.randomFile`; fails with the file and the reason.
    public init(rng: RngConfig, memory: GuestMemory, loop: EventLoop) throws(DeviceError) {
        path = rng.randomFile
        bytesPerSecond = rng.bytesPerSecond
        self.memory = memory
        self.loop = loop
        let fd = open(rng.randomFile, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else {
            throw DeviceError(.setup, "-rng random_file=\(rng.randomFile): cannot open: \(String(cString: strerror(errno)))")
        }
        sourceFD = fd
        state = Mutex(State(source: RngChainHandler(sourceFD: fd, memory: memory)))
    }

    deinit { close(sourceFD) }

    /// §5.4.4: no configuration space.
    public func readConfig(offset: UInt64, length: Int) -> UInt64 { 0 }
    public func writeConfig(offset: UInt64, length: Int, value: UInt64) {}

    public func activate(_ activation: VirtioActivation) throws {
        // The burst is 1/20 s worth, but at least one Linux-sized request (64 bytes), so a
        // low rate still hands out whole requests (the reference: bytes_per_sec limits the
        // average, not bursts).
        let bucket = bytesPerSecond.map { TokenBucket(rate: $0, capacity: max(64, Double($0) / 20)) }
        try state.withLock { state throws in
            state.active = try activation.runner(0, "the request queue", of: "virtio-rng", bucket: bucket, loop: loop) {
                [weak self] in self?.process()
            }
        }
    }

    public func reset() {
        state.withLock { state in
            state.active?.stop(loop: loop)
            state.active = nil
        }
    }

    /// Fills what the driver made available (on the loop thread), until the ring is empty,
    /// the rate limit runs dry (a one-shot timer resumes), or the queue breaks.
    public func process() {
        state.withLock { state in
            _ = state.active?.run(&state.source, loop: loop)
        }
    }

    /// Reads up to `limit` bytes of `random_file` into the chain's writable buffers (see
    /// ``RngChainHandler/fill(_:limit:)``).
    func fill(_ chain: DescriptorChain, limit: Int) -> Int {
        RngChainHandler(sourceFD: sourceFD, memory: memory).fill(chain, limit: limit)
    }
}

/// virtio-rng's part of the queue runner: fills each chain from `random_file`, one bucket
/// token per byte.
struct RngChainHandler: VirtioChainHandler {
    let sourceFD: Int32
    let memory: GuestMemory
    /// Bytes given to the guest since start.
    var delivered: UInt64 = 0

    /// Waits for a Linux-sized request's worth (64 bytes, or the whole burst if smaller)
    /// rather than trickling single bytes out in as many requests.
    func throttle(_ bucket: inout TokenBucket) -> UInt64 {
        bucket.wait(for: VirtioRngDevice.refillBytes)
    }

    mutating func handle(_ chain: DescriptorChain, bucket: inout TokenBucket?) -> UInt32? {
        var allowance = VirtioRngDevice.maxBytesPerRequest
        if let available = bucket?.available { allowance = min(allowance, Int(available)) }
        // §5.4.6.1: the driver places only device-writable buffers; a request with readable
        // ones is malformed and returned unused.
        let written = chain.readableCount == 0 ? fill(chain, limit: allowance) : 0
        bucket?.consume(UInt64(written))
        delivered &+= UInt64(written)
        return UInt32(written)
    }

    /// Reads up to `limit` bytes of `random_file` into the chain's writable buffers, in order;
    /// returns how many landed. Stops early at end of file or when the source has nothing now.
    func fill(_ chain: DescriptorChain, limit: Int) -> Int {
        var filled = 0
        for segment in chain.writable where filled < limit {
            let want = min(Int(segment.length), limit - filled)
            // The walk checked the segment and kept its place in the host mapping.
            let target = memory.base + segment.hostOffset
            var got = 0
            while got < want {
                let count = Glibc.read(sourceFD, target + got, want - got)
                if count < 0 && errno == EINTR { continue }
                if count <= 0 { break }
                got += count
            }
            filled += got
            if got < want { break }
        }
        return filled
    }
}
