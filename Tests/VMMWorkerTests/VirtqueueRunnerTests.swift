import CLinux
import Glibc
import Synchronization
import Testing

@testable import VMMWorker

/// A driver that makes every buffer available again as soon as the device uses it (a guest
/// keeping the ring full from another vCPU), until it has done so `reposts` times.
struct RepostingHandler: VirtioChainHandler {
    var driver: CraftedQueue
    let reposts: Int
    var handled = 0

    mutating func handle(_ chain: DescriptorChain, bucket: inout TokenBucket?) -> UInt32? {
        handled += 1
        if handled <= reposts { try? driver.publish(chain.head) }
        return 0
    }
}

@Suite("VirtioQueueRunner batches against crafted guest memory")
struct VirtqueueRunnerTests {
    @Test("a driver that keeps the ring full cannot hold the loop: a batch takes at most chainsPerBatch chains, the next goes on")
    func batchIsBounded() throws {
        let memory = try guestMemory()
        let loop = try EventLoop(name: "runner-test")
        let notify = fl_eventfd(0, 1)
        let irq = fl_eventfd(0, 1)
        defer {
            close(notify)
            close(irq)
        }
        var q = CraftedQueue(memory: memory)
        try q.descriptor(0, address: CraftedQueue.buffers, length: 64, flags: 0)
        try q.publish(0)
        let reposts = 4 * VirtioQueueRunner.chainsPerBatch
        var handler = RepostingHandler(driver: q, reposts: reposts)
        let processed = Mutex(0)
        var runner = try VirtioQueueRunner(
            queue: q.queue(eventIndex: true), notifyFD: notify, interrupt: VirtioInterrupt(eventFD: irq), bucket: nil, loop: loop
        ) { processed.withLock { $0 += 1 } }
        defer { runner.stop(loop: loop) }

        #expect(runner.run(&handler, loop: loop) == .yielded)
        #expect(handler.handled == VirtioQueueRunner.chainsPerBatch)
        // What the batch completed is published, and the rest is still there for the next one.
        #expect(try q.usedIndex() == UInt16(VirtioQueueRunner.chainsPerBatch))
        var batches = 1
        while runner.run(&handler, loop: loop) == .yielded { batches += 1 }
        #expect(handler.handled == reposts + 1)
        #expect(batches == 4)
        #expect(try q.usedIndex() == UInt16(truncatingIfNeeded: reposts + 1))
        // Each yield left a loop task to come back (no kick will: the driver was not asked for
        // one), besides the runner's first look at activation. One round of the loop runs them.
        loop.stop()
        loop.run()
        #expect(processed.withLock { $0 } == 1 + batches)
    }
}
