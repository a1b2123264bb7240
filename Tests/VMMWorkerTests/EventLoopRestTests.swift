import CLinux
import Foundation
import Glibc
import Synchronization
import Testing

@testable import VMMWorker

@Suite("EventLoop.rest")
struct EventLoopRestTests {
    final class Calls: Sendable {
        let count = Mutex(0)
    }

    @Test("a level-triggered descriptor that stays ready is not handled while it rests, and is again afterwards")
    func restSwitchesEventsOffThenOn() throws {
        let loop = try EventLoop(name: "test-rest")
        _ = try loop.startThread()
        defer { loop.stop() }
        var ends: [Int32] = [-1, -1]
        try #require(pipe(&ends) == 0)
        defer {
            close(ends[0])
            close(ends[1])
        }
        // One byte never read: the read end stays readable, as a listener with a connection it
        // cannot accept stays ready.
        try #require(write(ends[1], "x", 1) == 1)
        let calls = Calls()
        let token = Mutex<EventLoop.Token?>(nil)
        // Registered with no events until the handler can know its token.
        let registered = try loop.register(fd: ends[0], events: 0) { _ in
            let first = calls.count.withLock { count in
                count += 1
                return count == 1
            }
            if first, let token = token.withLock({ $0 }) { loop.rest(token, events: EPOLLIN.rawValue, nanoseconds: 400_000_000) }
        }
        token.withLock { $0 = registered }
        try loop.modify(registered, events: EPOLLIN.rawValue)
        while calls.count.withLock({ $0 }) == 0 { usleep(1000) }
        // Without the rest the handler runs thousands of times in this while.
        usleep(150_000)
        let whileResting = calls.count.withLock { $0 }
        #expect(whileResting == 1, "handled \(whileResting) times while resting")
        // Afterwards the descriptor is watched again.
        var after = whileResting
        for _ in 0..<500 where after <= whileResting {
            usleep(10_000)
            after = calls.count.withLock { $0 }
        }
        #expect(after > whileResting, "never handled again after the rest")
        loop.unregister(registered)
    }
}
