/// The per-request part of a device whose queue a ``VirtioQueueRunner`` serves: what it does
/// with one descriptor chain, and how a request spends the device's token bucket.
///
/// The runner is generic over its handler, so within the module each device's batch loop is
/// specialised for its handler: no existential, no closure and no allocation per request.
protocol VirtioChainHandler {
    /// Nanoseconds until `bucket` admits the next request (0: now). The default waits for one
    /// token (one request).
    func throttle(_ bucket: inout TokenBucket) -> UInt64
    /// Serves one chain the walk found well-formed (its buffers are in guest RAM), spending
    /// from `bucket` what it used. Returns the bytes written into its device-writable buffers
    /// (the used element's `len`, virtio 1.2 §2.7.8), or nil when the request cannot be served
    /// now: the chain goes back to the available ring and the batch stops, for the device to
    /// resume when what it waits for (such as host data) arrives.
    mutating func handle(_ chain: DescriptorChain, bucket: inout TokenBucket?) -> UInt32?
    /// ``handle(_:bucket:)`` for a handler that may also keep a chain in flight: the device
    /// then completes it later with ``VirtioQueueRunner/complete(_:)``. `more` says whether
    /// the driver has made further chains available (only computed when
    /// ``wantsLookahead``). The default serves every chain with `handle`.
    mutating func serve(_ chain: DescriptorChain, more: Bool, bucket: inout TokenBucket?) -> ChainDisposition
    /// Whether ``serve(_:more:bucket:)`` uses `more` (false by default: the runner then does
    /// not look at the ring for it).
    static var wantsLookahead: Bool { get }
}

/// What became of a chain a handler was given.
enum ChainDisposition {
    /// Used now, with this many bytes written (the used element's `len`, §2.7.8).
    case used(UInt32)
    /// Not served now: back to the available ring, the batch stops.
    case declined
    /// Taken and in flight: completed later, possibly after chains taken after it (the used
    /// ring need not follow the available ring's order, §2.7.8).
    case inFlight
}

/// The per-queue part of a device that takes chains itself, several per request: virtio-net
/// receive with MRG_RXBUF, where one packet fills as many chains as it needs and they are
/// published together (virtio 1.2 §5.1.6.4), and chains may stay taken between batches.
protocol VirtioQueueHandler {
    /// One batch: takes chains from `queue` and completes them. Returns `.drained` after
    /// ``SplitVirtqueue/rearmNotification()`` found the ring empty, `.blocked` when it waits
    /// for host data, `.yielded` after a bounded amount of work (the runner schedules the
    /// rest); a thrown `.queue` error breaks the queue.
    mutating func serve(_ queue: inout SplitVirtqueue) throws(VirtqueueError) -> VirtioQueueRunner.Outcome
}

extension VirtioChainHandler {
    func throttle(_ bucket: inout TokenBucket) -> UInt64 { bucket.wait() }

    static var wantsLookahead: Bool { false }

    @inline(__always)
    mutating func serve(_ chain: DescriptorChain, more: Bool, bucket: inout TokenBucket?) -> ChainDisposition {
        guard let written = handle(chain, bucket: &bucket) else { return .declined }
        return .used(written)
    }
}

extension VirtioActivation {
    /// Starts serving queue `index` with a ``VirtioQueueRunner`` (see its initialiser), or
    /// throws a setup error naming `device` and `queueName` when the driver did not make that
    /// queue ready (§4.2.3.2): every device here needs all of its queues.
    func runner(
        _ index: Int, _ queueName: String, of device: String, bucket: TokenBucket? = nil, loop: EventLoop,
        process: @escaping @Sendable () -> Void
    ) throws -> VirtioQueueRunner {
        guard index < queues.count, let queue = queues[index] else {
            throw DeviceError(.setup, "\(device): the driver did not set up \(queueName)")
        }
        return try VirtioQueueRunner(
            queue: queue, notifyFD: notifyFDs[index], interrupt: interrupt, bucket: bucket, loop: loop, process: process)
    }
}

/// One live virtqueue served on an event loop, from DRIVER_OK to reset: the notification
/// watch, the optional token bucket and its resume timer, and the batch loop that takes
/// chains, completes them, re-arms notifications and interrupts the driver.
///
/// A device keeps it (as an optional) in its Mutex-protected state and calls ``run(_:loop:)``
/// in place from its `process`, on the loop thread; ``stop(loop:)`` on reset.
struct VirtioQueueRunner: Sendable {
    /// How a batch ended.
    enum Outcome: Equatable {
        /// The available ring is empty and notifications are re-armed (§2.7.10).
        case drained
        /// The bucket ran dry: the rest waits in the ring for a timer, not a kick.
        case throttled
        /// The handler could not serve a chain now; it is back in the ring.
        case blocked
        /// The ring is unusable: the device is marked DEVICE_NEEDS_RESET (§2.1.2).
        case broken
        /// ``chainsPerBatch`` chains were taken and more may wait: the rest is left in the ring
        /// and `process` runs again from a fresh loop task, after the loop's other ready work.
        case yielded
    }

    /// The most chains one batch takes. A driver can make a buffer available again as soon as
    /// it is used (and with EVENT_IDX it need not kick while the device works), so without a
    /// bound a guest that keeps the ring full would keep this loop — and the QMP monitor, the
    /// signal handling and every other device on it — in one batch for ever. A full ring's
    /// worth of the largest queue (256) keeps batching for every real workload.
    static let chainsPerBatch = 256

    var queue: SplitVirtqueue
    let interrupt: VirtioInterrupt
    var bucket: TokenBucket?
    /// The device's `process` (held weakly by the closure), run by the resume timer.
    private let process: @Sendable () -> Void
    private var token: EventLoop.Token?
    private var resumeTimer: EventLoop.Token?
    /// When the pending resume timer fires (monotonic ns); a throttled batch schedules a new
    /// one only once that has passed, so a kick while throttled adds no second timer.
    private var resumeAt: UInt64 = 0
    private(set) var broken = false
    /// The chain being served: its storage is sized to the queue at the first walk and then
    /// refilled in place, so taking a chain allocates nothing.
    private var chain = DescriptorChain(head: 0)

    /// Starts serving `queue`: watches `notifyFD` on `loop`, running `process` after each
    /// notification, and has `process` run once soon, since the driver may have made buffers
    /// available before DRIVER_OK. `process` must take the device's lock (so it waits for the
    /// caller to store the runner) and call ``run(_:loop:)``.
    init(
        queue: SplitVirtqueue, notifyFD: Int32, interrupt: VirtioInterrupt, bucket: TokenBucket?, loop: EventLoop,
        process: @escaping @Sendable () -> Void
    ) throws(SyscallError) {
        self.queue = queue
        self.interrupt = interrupt
        self.bucket = bucket
        self.process = process
        token = try loop.watchQueueNotifications(fd: notifyFD, process: process)
        loop.execute(process)
    }

    /// Reset: no notification or timer calls `process` for this activation any more.
    func stop(loop: EventLoop) {
        if let token { loop.unregister(token) }
        if let resumeTimer { loop.unregister(resumeTimer) }
    }

    /// One batch: chains until the ring is empty, the bucket runs dry (a one-shot timer
    /// resumes), the handler blocks, ``chainsPerBatch`` chains were taken (a loop task
    /// resumes), or the queue breaks; then one interrupt if the driver wants one (§2.7.10).
    @inline(__always)
    mutating func run<Handler: VirtioChainHandler>(_ handler: inout Handler, loop: EventLoop) -> Outcome {
        guard !broken else { return .broken }
        let outcome = serve(&handler, loop: loop)
        if queue.needsInterrupt() { interrupt.signal(Virtio.Interrupt.usedBuffer) }
        return outcome
    }

    /// ``run(_:loop:)`` for a handler that takes chains itself; one interrupt at the end if
    /// the driver wants one.
    @inline(__always)
    mutating func run<Handler: VirtioQueueHandler>(serving handler: inout Handler, loop: EventLoop) -> Outcome {
        guard !broken else { return .broken }
        var outcome: Outcome
        do {
            outcome = try handler.serve(&queue)
        } catch {
            broken = true
            interrupt.markNeedsReset()
            outcome = .broken
        }
        if outcome == .yielded { loop.execute(process) }
        if queue.needsInterrupt() { interrupt.signal(Virtio.Interrupt.usedBuffer) }
        return outcome
    }

    private mutating func serve<Handler: VirtioChainHandler>(_ handler: inout Handler, loop: EventLoop) -> Outcome {
        func fail() -> Outcome {
            broken = true
            interrupt.markNeedsReset()
            return .broken
        }
        var taken = 0
        while true {
            while true {
                if taken == Self.chainsPerBatch {
                    // No rearm: the driver need not kick for what waits, the task comes back.
                    loop.execute(process)
                    return .yielded
                }
                if var refilled = bucket {
                    let wait = handler.throttle(&refilled)
                    bucket = refilled
                    if wait > 0 { return throttled(wait: wait, loop: loop) ?? fail() }
                }
                do {
                    guard try queue.next(into: &chain) else { break }
                    taken += 1
                } catch {
                    taken += 1
                    guard case .chain(let head) = error.kind else { return fail() }
                    // A malformed chain fails on its own: returned unused, nothing written.
                    do { try queue.complete(head: head, written: 0) } catch { return fail() }
                    continue
                }
                let more = Handler.wantsLookahead && ((try? queue.hasPending()) ?? false)
                switch handler.serve(chain, more: more, bucket: &bucket) {
                case .used(let written):
                    do { try queue.complete(head: chain.head, written: written) } catch { return fail() }
                case .declined:
                    queue.untake()
                    return .blocked
                case .inFlight:
                    break
                }
            }
            do {
                if try queue.rearmNotification() { continue }
            } catch {
                return fail()
            }
            return .drained
        }
    }

    /// Publishes chains that were in flight (head, bytes written), in the given order, then
    /// interrupts the driver once if it wants it (§2.7.10). The device stores what the
    /// requests produced (such as status bytes) before calling this: each used idx update is
    /// a release. Nothing is published on a broken queue.
    mutating func complete(_ completions: some Sequence<(head: UInt16, written: UInt32)>) {
        guard !broken else { return }
        for (head, written) in completions {
            do {
                try queue.complete(head: head, written: written)
            } catch {
                broken = true
                interrupt.markNeedsReset()
                return
            }
        }
        if queue.needsInterrupt() { interrupt.signal(Virtio.Interrupt.usedBuffer) }
    }

    /// Throttled: leave the rest in the ring and come back when the bucket allows, without
    /// blocking this loop's other devices (or the vCPUs). With EVENT_IDX the driver only kicks
    /// when avail_event asks for it, so ask (else a request posted now would wait for a kick
    /// that never comes). nil when the queue broke.
    private mutating func throttled(wait: UInt64, loop: EventLoop) -> Outcome? {
        let pending: Bool
        do { pending = try queue.rearmNotification() } catch { return nil }
        let now = TokenBucket.monotonicNanoseconds()
        if pending && now >= resumeAt {
            resumeAt = now &+ wait
            resumeTimer = try? loop.schedule(afterNanoseconds: wait, handler: process)
        }
        return .throttled
    }
}
