import Glibc

/// A token bucket holding an average rate of `rate` operations per second with bursts of at
/// most `capacity` (IOPS QoS). Not thread-safe: owned by one device on one event loop.
public struct TokenBucket: Sendable {
    public let rate: UInt64
    public let capacity: Double
    private var tokens: Double
    private var lastRefill: UInt64

    /// `rate` > 0. The burst is 1/20 s worth of operations (at least 1), so the average over
    /// any window of a second or more stays within a few percent of `rate`.
    public init(rate: UInt64, now: UInt64 = TokenBucket.monotonicNanoseconds()) {
        self.rate = max(rate, 1)
        capacity = max(1, Double(self.rate) / 20)
        tokens = capacity
        lastRefill = now
    }

    /// A bucket of `rate` tokens per second holding at most `capacity` (≥ 1).
    public init(rate: UInt64, capacity: Double, now: UInt64 = TokenBucket.monotonicNanoseconds()) {
        self.rate = max(rate, 1)
        self.capacity = max(1, capacity)
        tokens = self.capacity
        lastRefill = now
    }

    public static func monotonicNanoseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) &* 1_000_000_000 &+ UInt64(now.tv_nsec)
    }

    private mutating func refill(_ now: UInt64) {
        guard now > lastRefill else { return }
        tokens = min(capacity, tokens + Double(now - lastRefill) * Double(rate) / 1e9)
        lastRefill = now
    }

    /// 0 when a token is available now, else the nanoseconds until one will be.
    public mutating func wait(now: UInt64 = TokenBucket.monotonicNanoseconds()) -> UInt64 {
        wait(for: 1, now: now)
    }

    /// 0 when `count` tokens (at most the capacity) are available now, else the nanoseconds
    /// until they will be.
    public mutating func wait(for count: Double, now: UInt64 = TokenBucket.monotonicNanoseconds()) -> UInt64 {
        refill(now)
        let needed = min(max(count, 1), capacity)
        if tokens >= needed { return 0 }
        return UInt64(((needed - tokens) * 1e9 / Double(rate)).rounded(.up))
    }

    /// Spends one token (call after ``wait(now:)`` returned 0).
    public mutating func consume() {
        tokens -= 1
    }

    /// Whole tokens available now (as of the last ``wait(now:)``).
    public var available: UInt64 { tokens >= 1 ? UInt64(tokens) : 0 }

    /// Spends `count` tokens (at most ``available``; a byte-rate limit spends one per byte).
    public mutating func consume(_ count: UInt64) {
        tokens -= Double(count)
    }
}
