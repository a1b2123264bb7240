import Glibc
import Protocol
import Synchronization

/// A virtio-balloon device (virtio 1.2 §5.5): inflateq 0 and deflateq 1 (no statsq: STATS_VQ
/// is not offered), DEFLATE_ON_OOM when configured. The host sets the target (`num_pages`,
/// QMP `balloon`); the driver reports what it holds (`actual`).
///
/// - inflateq: each chain's device-readable bytes are little-endian 32-bit PFNs of 4 KiB
///   pages (§5.5.6: the page size is 4096 whatever the guest uses). Every PFN is checked to
///   name a page wholly inside guest RAM (the low range or the one above 4 GiB, never the MMIO
///   hole); the host memory behind it is discarded (``GuestMemory/discard(hostOffset:length:)``),
///   contiguous runs in one call. Other PFNs are ignored (counted), as QEMU does.
/// - deflateq: nothing to do on the host (without MUST_TELL_HOST the guest may touch a page
///   again at any time, and touching it faults a fresh one in); only accounting.
///
/// Sendable: immutable configuration; the live queues and the configuration space are behind a
/// Mutex, taken by the loop thread while it serves the queues, by vCPU threads on register
/// access, activation and reset, and by the QMP thread when it sets the target.
public final class VirtioBalloonDevice: VirtioDevice {
    /// Feature bits (§5.5.3).
    public enum Feature {
        public static let mustTellHost: UInt64 = 1 << 0
        public static let statsQueue: UInt64 = 1 << 1
        public static let deflateOnOOM: UInt64 = 1 << 2
    }

    public static let queueSize: UInt16 = 256
    public static let inflateQueue = 0
    public static let deflateQueue = 1
    /// §5.5.6: "the page size is 4096 bytes", whatever the guest's.
    public static let pageSize: UInt64 = 4096

    public let loop: EventLoop
    public let deviceFeatures: UInt64
    let memory: GuestMemory

    public var deviceID: UInt32 { Virtio.DeviceID.balloon }
    public var queueMaxSizes: [UInt16] { [Self.queueSize, Self.queueSize] }

    struct State {
        var inflate: VirtioQueueRunner?
        var deflate: VirtioQueueRunner?
        var inflater: BalloonPageHandler
        var deflater: BalloonPageHandler
        /// struct virtio_balloon_config (§5.5.4): num_pages (the host's), actual (the driver's).
        var numPages: UInt32 = 0
        var actual: UInt32 = 0
        var observer: (@Sendable (UInt32) -> Void)?
        /// A change was observed less than ``changeInterval`` ago: later ones wait for the
        /// timer, which observes the newest `actual` if it moved meanwhile.
        var changeTimerArmed = false
        var changeHeld = false
    }

    /// The observer (QMP's BALLOON_CHANGE) hears of `actual` at most once per this interval,
    /// the newest value at its end, as QEMU rate-limits BALLOON_CHANGE to one a second: every
    /// driver write would otherwise become an event for every QMP client, and a guest writing
    /// `actual` in a loop would flood them (and the output kept for a client that does not read).
    static let changeInterval: UInt64 = 1_000_000_000

    private let state: Mutex<State>

    public init(balloon: BalloonConfig, memory: GuestMemory, loop: EventLoop) {
        self.memory = memory
        self.loop = loop
        deviceFeatures = balloon.deflateOnOOM ? Feature.deflateOnOOM : 0
        state = Mutex(
            State(inflater: BalloonPageHandler(memory: memory, inflate: true), deflater: BalloonPageHandler(memory: memory, inflate: false))
        )
    }

    /// Pages the guest should give up (num_pages).
    public var targetPages: UInt32 { state.withLock { $0.numPages } }
    /// Pages the driver says it holds (actual).
    public var actualPages: UInt32 { state.withLock { $0.actual } }
    /// Pages discarded by inflate requests, PFNs refused as not guest RAM, and pages deflated.
    public var statistics: (inflated: UInt64, refused: UInt64, deflated: UInt64) {
        state.withLock { ($0.inflater.pages, $0.inflater.refused &+ $0.deflater.refused, $0.deflater.pages) }
    }

    /// Sets num_pages; true when it changed (the transport then signals a configuration change).
    func setTarget(pages: UInt32) -> Bool {
        state.withLock { state in
            defer { state.numPages = pages }
            return state.numPages != pages
        }
    }

    /// `observer` runs with the new `actual` when the driver changes it (any thread), at most
    /// once per ``changeInterval``: changes within one are told, newest only, at its end.
    public func observeActual(_ observer: @escaping @Sendable (UInt32) -> Void) {
        state.withLock { $0.observer = observer }
    }

    public func readConfig(offset: UInt64, length: Int) -> UInt64 {
        let (numPages, actual) = state.withLock { ($0.numPages, $0.actual) }
        let config = UInt64(numPages) | UInt64(actual) << 32
        guard offset < 8 else { return 0 }
        let value = config >> (8 * offset)
        return length >= 8 ? value : value & ((1 << (8 * UInt64(length))) - 1)
    }

    /// Only `actual` (bytes 4–7) is the driver's to write (§5.5.4); a partial write changes
    /// the bytes it covers.
    public func writeConfig(offset: UInt64, length: Int, value: UInt64) {
        guard offset < 8, length > 0, length <= 8 else { return }
        let changed = state.withLock { state -> Bool in
            var config = UInt64(state.numPages) | UInt64(state.actual) << 32
            for i in 0..<UInt64(length) where offset + i >= 4 && offset + i < 8 {
                let shift = 8 * (offset + i)
                config = (config & ~(0xff << shift)) | (((value >> (8 * i)) & 0xff) << shift)
            }
            let actual = UInt32(truncatingIfNeeded: config >> 32)
            guard actual != state.actual else { return false }
            state.actual = actual
            return true
        }
        if changed { actualChanged() }
    }

    /// `actual` changed: the observer hears of it now, or — within ``changeInterval`` of the
    /// last time it heard — when the interval ends. Any thread; the observer runs unlocked.
    private func actualChanged() {
        let now = state.withLock { state -> (UInt32, @Sendable (UInt32) -> Void)? in
            guard let observer = state.observer else { return nil }
            if state.changeTimerArmed {
                state.changeHeld = true
                return nil
            }
            state.changeTimerArmed = true
            return (state.actual, observer)
        }
        guard let (actual, observer) = now else { return }
        observer(actual)
        armChangeTimer()
    }

    private func armChangeTimer() {
        do {
            try loop.schedule(afterNanoseconds: Self.changeInterval) { [weak self] in self?.changeIntervalEnded() }
        } catch {
            // No timer (descriptors exhausted): no rate limit rather than no more events.
            state.withLock { $0.changeTimerArmed = false }
        }
    }

    /// On the loop thread: the newest `actual` if it changed during the interval (and a new
    /// interval begins), else the limit is lifted.
    private func changeIntervalEnded() {
        let held = state.withLock { state -> (UInt32, @Sendable (UInt32) -> Void)? in
            guard state.changeHeld, let observer = state.observer else {
                state.changeTimerArmed = false
                return nil
            }
            state.changeHeld = false
            return (state.actual, observer)
        }
        guard let (actual, observer) = held else { return }
        observer(actual)
        armChangeTimer()
    }

    public func activate(_ activation: VirtioActivation) throws {
        try state.withLock { state throws in
            state.inflate = try activation.runner(Self.inflateQueue, "inflateq", of: "virtio-balloon", loop: loop) {
                [weak self] in self?.processInflate()
            }
            state.deflate = try activation.runner(Self.deflateQueue, "deflateq", of: "virtio-balloon", loop: loop) {
                [weak self] in self?.processDeflate()
            }
        }
    }

    /// The driver is gone: what it held in the balloon is the next driver's to use, so
    /// `actual` returns to 0; the host's target stays.
    public func reset() {
        let changed = state.withLock { state -> Bool in
            state.inflate?.stop(loop: loop)
            state.deflate?.stop(loop: loop)
            state.inflate = nil
            state.deflate = nil
            guard state.actual != 0 else { return false }
            state.actual = 0
            return true
        }
        if changed { actualChanged() }
    }

    func processInflate() {
        let outcome = state.withLock { state in
            state.inflater.budget = BalloonPageHandler.pfnsPerBatch
            return state.inflate?.run(&state.inflater, loop: loop)
        }
        // Out of budget (the only reason this handler declines): the rest waits in the ring
        // for a fresh loop task, after the loop's other work; no kick is owed for it.
        if outcome == .blocked { loop.execute { [weak self] in self?.processInflate() } }
    }

    func processDeflate() {
        let outcome = state.withLock { state in
            state.deflater.budget = BalloonPageHandler.pfnsPerBatch
            return state.deflate?.run(&state.deflater, loop: loop)
        }
        if outcome == .blocked { loop.execute { [weak self] in self?.processDeflate() } }
    }
}

/// inflateq's or deflateq's part of the queue runner: reads the chain's PFNs and, for inflate,
/// discards the guest pages they name.
struct BalloonPageHandler: VirtioChainHandler {
    let memory: GuestMemory
    let inflate: Bool
    /// PFNs that named a guest RAM page, since start.
    var pages: UInt64 = 0
    /// PFNs that did not (beyond RAM, in the MMIO hole), since start.
    var refused: UInt64 = 0
    /// Failed discards (which only mean the host keeps the memory).
    var failures: UInt64 = 0
    /// PFNs this batch may still read (the device sets it before each batch; unlimited for a
    /// handler used on its own). A request begins only while some are left.
    var budget = Int.max

    /// The most PFNs one request is read for. §5.5.6 bounds no request, but a chain of Queue
    /// Size buffers each as large as guest RAM would be billions of PFNs — and as many
    /// madvise calls, on the loop the balloon shares with QMP, while a vCPU resetting the
    /// device waits for the lock. Drivers send far fewer (Linux 256 a request, FreeBSD 256,
    /// Windows a page of PFNs); the rest of a longer request is ignored and counted refused:
    /// the driver believes those pages given, the host only keeps their memory.
    static let maxPFNsPerRequest = 4096
    /// PFNs one batch reads before it leaves the rest to a new loop task (at most this plus one
    /// request: a few milliseconds even when each page needs its own madvise).
    static let pfnsPerBatch = 16384

    mutating func handle(_ chain: DescriptorChain, bucket: inout TokenBucket?) -> UInt32? {
        guard budget > 0 else { return nil }
        // Whole PFNs only (odd trailing bytes are ignored), at most maxPFNsPerRequest of them.
        let total = chain.readableLength / 4
        let read = min(total, UInt64(Self.maxPFNsPerRequest))
        var left = Int(read) * 4
        var collector = BalloonPageRuns(memory: memory)
        var carry: UInt32 = 0
        var carried = 0
        for segment in chain.readable where left > 0 {
            // The walk checked the segment and kept its place in the host mapping; only its
            // first `left` bytes are read.
            let count = min(Int(segment.length), left)
            left -= count
            let bytes = UnsafeRawBufferPointer(start: memory.base + segment.hostOffset, count: count)
            var index = 0
            // A PFN may straddle two buffers: finish the one begun in the previous buffer.
            while carried > 0 && carried < 4 && index < bytes.count {
                carry |= UInt32(bytes[index]) << (8 * UInt32(carried))
                carried += 1
                index += 1
            }
            if carried == 4 {
                collector.add(pfn: carry, into: &self)
                carry = 0
                carried = 0
            }
            while bytes.count - index >= 4 {
                collector.add(pfn: UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: index, as: UInt32.self)), into: &self)
                index += 4
            }
            while index < bytes.count {
                carry |= UInt32(bytes[index]) << (8 * UInt32(carried))
                carried += 1
                index += 1
            }
        }
        collector.finish(into: &self)
        refused &+= total - read
        budget -= Int(read)
        // §5.5.6: the device writes nothing back.
        return 0
    }
}

/// Gathers consecutive pages into runs of host memory, so an inflate of contiguous guest
/// pages costs one madvise per run rather than per page.
struct BalloonPageRuns {
    let memory: GuestMemory
    var run: (offset: Int, length: Int)?

    init(memory: GuestMemory) {
        self.memory = memory
    }

    /// Where the page `pfn` lives in the host mapping, when all of it is guest RAM. A u32 PFN
    /// times 4096 is below 2^44: no overflow, and the range check is GuestMemory's.
    static func hostOffset(pfn: UInt32, memory: GuestMemory) -> Int? {
        try? memory.hostOffset(UInt64(pfn) << 12, length: VirtioBalloonDevice.pageSize)
    }

    mutating func add(pfn: UInt32, into handler: inout BalloonPageHandler) {
        guard let offset = Self.hostOffset(pfn: pfn, memory: memory) else {
            handler.refused &+= 1
            return
        }
        handler.pages &+= 1
        guard handler.inflate else { return }
        let page = Int(VirtioBalloonDevice.pageSize)
        if let current = run, current.offset + current.length == offset {
            run = (current.offset, current.length + page)
            return
        }
        finish(into: &handler)
        run = (offset, page)
    }

    mutating func finish(into handler: inout BalloonPageHandler) {
        guard let current = run else { return }
        run = nil
        do {
            try memory.discard(hostOffset: current.offset, length: current.length)
        } catch {
            handler.failures &+= 1
        }
    }
}
