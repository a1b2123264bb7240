import CFuzzerDriver
import Glibc

@testable import VMMWorker

// What the device and transport fuzz targets share: guest memory with guard pages, a byte
// reader for inputs, the invariant check, a reference reading of descriptor chains, and a
// way to drive an EventLoop on the fuzzing thread.

/// Fails the input (libFuzzer records it as a crash) when an invariant does not hold.
public func check(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String) {
    if !condition() { fatalError("invariant violated: \(message())") }
}

/// Runs `body`, which cannot fail for a correct harness: a throw is a crash.
public func must<T>(_ body: () throws -> T) -> T {
    do { return try body() } catch { fatalError("unexpected error: \(error)") }
}

/// Hands the command line to libFuzzer, running `target` for every input.
public func runLibFuzzer(_ target: @escaping ([UInt8]) -> Void) -> Never {
    var argc = CommandLine.argc
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
    FuzzTarget.body = target
    exit(
        LLVMFuzzerRunDriver(&argc, &argv) { data, size in
            guard let data else { return 0 }  // libFuzzer always passes a buffer, even for size 0
            return fuzzOneInput(data, size)
        })
}

/// libFuzzer's entry point (also what the linker wants when libFuzzer's own main is pulled in).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    FuzzTarget.body?([UInt8](UnsafeBufferPointer(start: data, count: size)))
    return 0
}

enum FuzzTarget {
    /// Invariant: set once before libFuzzer starts, read only from libFuzzer's thread.
    nonisolated(unsafe) static var body: (([UInt8]) -> Void)?
}

/// Writes `seeds` (name, bytes) as files into `directory`.
public func writeSeeds(_ seeds: [(String, [UInt8])], to directory: String) {
    for (name, bytes) in seeds {
        let path = "\(directory)/\(name)"
        guard let file = fopen(path, "wb") else { fatalError("cannot write \(path)") }
        _ = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, file) }
        fclose(file)
    }
}

// MARK: Guest memory

/// Guest RAM of `size` bytes with PROT_NONE guard pages right below and right above the host
/// mapping (and, for RAM with a high region, nothing mapped for the hole: it is not in the
/// mapping at all), so that any access escaping the mapping is a SEGV.
public func guardedMemory(size: UInt64) -> GuestMemory {
    let memory = must { try GuestMemory(size: size) }
    let page = Int(sysconf(Int32(_SC_PAGESIZE)))
    for at in [memory.base - page, memory.base + Int(size)] {
        let guardPage = mmap(at, page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        if guardPage != at, let guardPage, guardPage != MAP_FAILED { munmap(guardPage, page) }
    }
    return memory
}

/// The bytes of `[address, address + count)` (which the caller knows is in guest RAM).
public func snapshot(_ memory: GuestMemory, at address: UInt64, count: Int) -> [UInt8] {
    must { try memory.read(at: address, count: count) }
}

// MARK: Input decoding

/// Reads an input front to back; past its end every read gives zeroes.
public struct ByteReader {
    let bytes: [UInt8]
    public private(set) var position = 0

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var remaining: Int { max(0, bytes.count - position) }
    public var atEnd: Bool { position >= bytes.count }

    public mutating func u8() -> UInt8 {
        defer { position += 1 }
        return position < bytes.count ? bytes[position] : 0
    }
    public mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    public mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    public mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }
    /// Up to `count` bytes (fewer at the end of the input).
    public mutating func take(_ count: Int) -> ArraySlice<UInt8> {
        let start = min(position, bytes.count)
        let end = min(bytes.count, start + max(0, count))
        position = start + max(0, count)
        return bytes[start..<end]
    }
    public mutating func rest() -> ArraySlice<UInt8> { take(remaining) }
}

/// Little-endian bytes of `value`.
public func le<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.littleEndian, Array.init)
}

// MARK: Reference reading of descriptor chains

/// An independent, plain reading of a chain (§2.7.5, §2.7.5.3; this VMM's policy of at most
/// one indirect table and at most queue-size buffers), through GuestMemory's checked integer
/// reads: nil for a chain the device must refuse, else its device-writable buffers.
public func referenceWritableBuffers(
    memory: GuestMemory, layout: VirtqueueLayout, indirect: Bool, head: UInt16
) -> [Range<UInt64>]? {
    func read<T: FixedWidthInteger>(_: T.Type, _ at: UInt64) -> T? { try? memory.read(T.self, at: at) }
    var table = layout.descriptorTable
    var entries = UInt32(layout.size)
    var index = UInt32(head)
    var inIndirect = false
    var buffers = 0
    var writable: [Range<UInt64>] = []
    while true {
        guard index < entries, buffers < Int(layout.size) else { return nil }
        let at = table &+ 16 &* UInt64(index)
        guard let address = read(UInt64.self, at), let length = read(UInt32.self, at &+ 8),
            let flags = read(UInt16.self, at &+ 12), let next = read(UInt16.self, at &+ 14)
        else { return nil }
        if flags & 4 != 0 {
            guard indirect, !inIndirect, flags & 1 == 0, length > 0, length % 16 == 0,
                memory.contains(address, length: UInt64(length))
            else { return nil }
            table = address
            entries = length / 16
            index = 0
            inIndirect = true
            continue
        }
        guard length > 0, memory.contains(address, length: UInt64(length)) else { return nil }
        buffers += 1
        if flags & 2 != 0 {
            writable.append(address..<address + UInt64(length))
        } else if !writable.isEmpty {
            return nil
        }
        if flags & 1 == 0 { return writable }
        index = UInt32(next)
    }
}

/// The device-writable bytes of a chain by ``referenceWritableBuffers``, nil if malformed.
public func referenceWritableBytes(memory: GuestMemory, layout: VirtqueueLayout, indirect: Bool, head: UInt16) -> UInt64? {
    referenceWritableBuffers(memory: memory, layout: layout, indirect: indirect, head: head)?.reduce(0) {
        $0 + $1.upperBound - $1.lowerBound
    }
}

/// Every range a device may write for a queue laid out as `layout` whose driver made chains
/// available from the heads in its avail ring: its used ring (with avail_event) and the
/// device-writable buffers of those chains, by the reference reading.
public func writableRanges(memory: GuestMemory, layout: VirtqueueLayout, indirect: Bool) -> [Range<UInt64>] {
    var ranges: [Range<UInt64>] = [layout.usedRing..<layout.usedRing + 6 + 8 * UInt64(layout.size)]
    var seen = Set<UInt16>()
    for slot in 0..<UInt64(layout.size) {
        guard let head = try? memory.read(UInt16.self, at: layout.availableRing + 4 + 2 * slot), head < layout.size,
            seen.insert(head).inserted
        else { continue }
        ranges += referenceWritableBuffers(memory: memory, layout: layout, indirect: indirect, head: head) ?? []
    }
    return ranges
}

/// The ranges `layout`'s descriptor tables occupy: the queue's own and every indirect table
/// one of its descriptors names.
public func tableRanges(memory: GuestMemory, layout: VirtqueueLayout) -> [Range<UInt64>] {
    var ranges: [Range<UInt64>] = [layout.descriptorTable..<layout.descriptorTable + 16 * UInt64(layout.size)]
    for i in 0..<UInt64(layout.size) {
        let at = layout.descriptorTable &+ 16 &* i
        guard let address = try? memory.read(UInt64.self, at: at), let length = try? memory.read(UInt32.self, at: at &+ 8),
            let flags = try? memory.read(UInt16.self, at: at &+ 12), flags & 4 != 0, length > 0,
            memory.contains(address, length: UInt64(length))
        else { continue }
        ranges.append(address..<address + UInt64(length))
    }
    return ranges
}

public func overlaps(_ a: Range<UInt64>, _ ranges: [Range<UInt64>]) -> Bool {
    ranges.contains { $0.overlaps(a) }
}

// MARK: Driving an event loop on this thread

extension EventLoop {
    /// One round of the loop on the calling thread: the descriptors ready now (queue
    /// notifications, the stand-in tap, timers that expired) and the tasks queued before it,
    /// as the loop's thread would run them. `stop` makes `run` return after its round, and its
    /// wake-up means the round does not wait.
    public func runOneRound() {
        stop()
        run()
    }
}
