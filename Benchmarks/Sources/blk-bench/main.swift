// Host-side virtio-blk backend throughput: 4 KiB random reads and writes at queue depth 1
// and 32, through the real request path (split virtqueue in crafted guest memory, the
// virtio-blk device's processing, its I/O worker threads, the used ring and the interrupt
// eventfd) against plain pread/pwrite of the same offsets on the same file, side by side in
// one run: serially, and (at QD > 1) with as many requests in flight from a thread pool.
import CLinux
import Glibc
import Protocol
import Synchronization
import VMMWorker

struct Options {
    var path = "/tmp/flotilla-blk-bench.img"
    var sizeMiB = 256
    var operations = 20000
    var direct = false
    /// Which workloads: reads, writes or both (for profiling one path at a time).
    var kinds = [false, true]
    /// Queue depths to measure.
    var depths = [1, 32]
    /// Time with this thread's CPU clock instead of the wall clock: steadier on a loaded host
    /// (preemption by other processes does not count), blind to time spent blocked.
    var cpuTime = false
    /// Rounds per workload: device and plain alternate (device first in even rounds), and
    /// the medians are compared, so neither side always runs into the same writeback burst
    /// or neighbour's load.
    var rounds = 5
    /// I/O worker threads of the device's loop (0: every request on the loop thread, as
    /// before workers existed).
    var ioThreads = VirtioBlockDevice.defaultIOThreads
}

var options = Options()
var arguments = CommandLine.arguments.dropFirst()
while let flag = arguments.popFirst() {
    switch flag {
    case "--file": options.path = arguments.popFirst() ?? options.path
    case "--size-mib": options.sizeMiB = Int(arguments.popFirst() ?? "") ?? options.sizeMiB
    case "--ops": options.operations = Int(arguments.popFirst() ?? "") ?? options.operations
    case "--direct": options.direct = true
    case "--cpu-time": options.cpuTime = true
    case "--rounds": options.rounds = max(1, Int(arguments.popFirst() ?? "") ?? options.rounds)
    case "--qd": options.depths = [Int(arguments.popFirst() ?? "") ?? 1]
    case "--io-threads": options.ioThreads = max(0, Int(arguments.popFirst() ?? "") ?? options.ioThreads)
    case "--rw":
        switch arguments.popFirst() {
        case "read": options.kinds = [false]
        case "write": options.kinds = [true]
        default: options.kinds = [false, true]
        }
    default:
        print(
            "usage: blk-bench [--file PATH] [--size-mib N] [--ops N] [--direct] [--rw read|write|both] [--qd N] [--cpu-time] [--rounds N] [--io-threads N]"
        )
        exit(2)
    }
}

@MainActor func now() -> Double {
    var t = timespec()
    clock_gettime(options.cpuTime ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &t)
    return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
}

struct Generator: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

// The image: filled, so reads hit real data (in the page cache unless --direct).
let fileSize = options.sizeMiB << 20
do {
    let fd = open(options.path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
    guard fd >= 0 else { fatalError("cannot create \(options.path)") }
    var chunk = [UInt8](repeating: 0, count: 1 << 20)
    var generator = Generator(state: 1)
    for offset in stride(from: 0, to: fileSize, by: chunk.count) {
        for i in 0..<chunk.count { chunk[i] = UInt8(truncatingIfNeeded: generator.next()) }
        _ = chunk.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
    }
    fsync(fd)
    close(fd)
}
defer { unlink(options.path) }

let blocks = UInt64(fileSize / 4096)
var offsetGenerator = Generator(state: 42)
let offsets = (0..<options.operations).map { _ in offsetGenerator.next() % blocks * 4096 }

// Guest side: 64 MiB of RAM, one queue of 256 at fixed places, 32 request slots.
let memory = try GuestMemory(size: 64 << 20)
let descriptors: UInt64 = 0x10000
let avail: UInt64 = 0x11000
let usedRing: UInt64 = 0x12000
let headers: UInt64 = 0x20000
let statuses: UInt64 = 0x21000
let buffers: UInt64 = 0x100000
let loop = try EventLoop(name: "bench", ioThreads: options.ioThreads)
// The loop thread publishes what the I/O workers finish.
_ = try loop.startThread()
let drive = DriveConfig(id: "bench", path: options.path, direct: options.direct)
let device = VirtioBlockDevice(backend: try BlockBackend(drive: drive), memory: memory, loop: loop)
let transport = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 0), device: device, memory: memory, vm: nil)
for (offset, value) in [
    (0x070, 3), (0x024, 1), (0x020, 1), (0x070, 11), (0x038, 256), (0x080, Int(descriptors)), (0x090, Int(avail)),
    (0x0a0, Int(usedRing)), (0x044, 1), (0x070, 15),
] as [(UInt64, Int)] {
    transport.write(offset: offset, length: 4, value: UInt64(value))
}
guard transport.status == 15 else { fatalError("device did not go live: status \(transport.status)") }

var availIndex: UInt16 = 0
// The driver's side of the rings, written the way a guest driver writes them: plain stores
// into its own memory (through one checked host pointer for the whole control area, so the
// harness's own cost does not count against the device).
let control = try memory.hostPointer(descriptors, length: statuses + 0x1000 - descriptors)
@MainActor @inline(__always) func store<T: FixedWidthInteger>(_ value: T, at address: UInt64) {
    control.storeBytes(of: value.littleEndian, toByteOffset: Int(address - descriptors), as: T.self)
}
/// Posts one request in `slot`: header, three descriptors (header, data, status), avail entry.
@MainActor func post(slot: Int, write: Bool, offset: UInt64) {
    let head = UInt16(slot * 3)
    let header = headers + UInt64(slot) * 16
    store(UInt32(write ? 1 : 0), at: header)
    store(offset / 512, at: header + 8)
    let data = buffers + UInt64(slot) * 4096
    let table = descriptors + UInt64(head) * 16
    func descriptor(_ i: UInt16, _ address: UInt64, _ length: UInt32, _ flags: UInt16) {
        let at = table + UInt64(i) * 16
        store(address, at: at)
        store(length, at: at + 8)
        store(flags, at: at + 12)
        store(head + i + 1, at: at + 14)
    }
    descriptor(0, header, 16, 1)
    descriptor(1, data, 4096, write ? 1 : 3)
    descriptor(2, statuses + UInt64(slot), 1, 2)
    store(head, at: avail + 4 + 2 * UInt64(availIndex % 256))
    availIndex &+= 1
    store(availIndex, at: avail + 2)
}

/// What a guest's interrupt handler does for virtio-mmio (Linux vm_interrupt): read
/// InterruptStatus and acknowledge it.
@MainActor func acknowledgeInterrupt() {
    let status = transport.read(offset: 0x060, length: 4)
    if status != 0 { transport.write(offset: 0x064, length: 4, value: status) }
}

/// Operations per second through the device with `depth` requests outstanding, as a guest
/// driver at that queue depth keeps them: each used request's slot is refilled with the next
/// one at once, and one notification covers what was refilled together.
@MainActor func device(write: Bool, depth: Int) throws -> Double {
    let start = now()
    var posted = 0
    var completed = 0
    var seen = usedIndex()
    for slot in 0..<min(depth, offsets.count) {
        post(slot: slot, write: write, offset: offsets[posted])
        posted += 1
    }
    device.process()
    while completed < offsets.count {
        // What the driver's interrupt handler does: ack, take the used elements, refill their
        // slots, kick; sleep until the next interrupt when nothing was used.
        acknowledgeInterrupt()
        let used = usedIndex()
        if used == seen {
            var count: UInt64 = 0
            _ = read(transport.interrupt.eventFD, &count, 8)
            continue
        }
        var refilled = false
        while seen != used {
            let head = control.load(fromByteOffset: Int(usedRing + 4 + 8 * UInt64(seen % 256) - descriptors), as: UInt32.self)
            seen &+= 1
            completed += 1
            if posted < offsets.count {
                post(slot: Int(UInt32(littleEndian: head)) / 3, write: write, offset: offsets[posted])
                posted += 1
                refilled = true
            }
        }
        if refilled { device.process() }
    }
    let elapsed = now() - start
    guard usedIndex() == availIndex else { fatalError("requests left unprocessed") }
    return Double(offsets.count) / elapsed
}

/// The used ring's idx, as the driver reads it.
@MainActor func usedIndex() -> UInt16 {
    let index = control.load(fromByteOffset: Int(usedRing + 2 - descriptors), as: UInt16.self)
    atomicMemoryFence(ordering: .acquiring)
    return UInt16(littleEndian: index)
}

/// Operations per second with plain pread/pwrite of the same offsets (depth has no meaning
/// for synchronous calls; the same sequence of offsets is issued).
@MainActor func plain(write: Bool) -> Double {
    let fd = open(options.path, O_RDWR | (options.direct ? 0o40000 : 0))  // 0o40000: O_DIRECT on x86_64
    defer { close(fd) }
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
    defer { buffer.deallocate() }
    let start = now()
    for offset in offsets {
        let n = write ? pwrite(fd, buffer, 4096, off_t(offset)) : pread(fd, buffer, 4096, off_t(offset))
        if n != 4096 { fatalError("plain I/O failed") }
    }
    return Double(offsets.count) / (now() - start)
}

/// One thread of ``parallel(write:threads:)``: its share of the offsets, through its own buffer.
final class PlainWorker: @unchecked Sendable {
    // Invariant: the fields are set before the thread starts and read after it is joined;
    // the thread itself only reads them.
    let fd: Int32
    let write: Bool
    let offsets: [UInt64]
    var failed = false
    init(fd: Int32, write: Bool, offsets: [UInt64]) {
        self.fd = fd
        self.write = write
        self.offsets = offsets
    }
    func run() {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        for offset in offsets {
            let n = write ? pwrite(fd, buffer, 4096, off_t(offset)) : pread(fd, buffer, 4096, off_t(offset))
            if n != 4096 { failed = true }
        }
    }
}

/// Starts a thread running `worker` (outside the main actor: the thread's closure must not
/// inherit its isolation).
func startPlainThread(_ worker: PlainWorker) -> pthread_t {
    var thread = pthread_t()
    let box = Unmanaged.passRetained(worker).toOpaque()
    let code = pthread_create(
        &thread, nil,
        { argument in
            guard let argument else { return nil }
            Unmanaged<PlainWorker>.fromOpaque(argument).takeRetainedValue().run()
            return nil
        }, box)
    if code != 0 { fatalError("pthread_create failed") }
    return thread
}

/// Operations per second with plain pread/pwrite of the same offsets from `threads` threads
/// at once (each its own interleaved share): `threads` requests in flight, the most a device
/// doing the same system calls from worker threads can reach. Always wall-clock time.
@MainActor func parallel(write: Bool, threads: Int) -> Double {
    let fd = open(options.path, O_RDWR | (options.direct ? 0o40000 : 0))
    defer { close(fd) }
    let workers = (0..<threads).map { t in
        PlainWorker(fd: fd, write: write, offsets: stride(from: t, to: offsets.count, by: threads).map { offsets[$0] })
    }
    var clock = timespec()
    clock_gettime(CLOCK_MONOTONIC, &clock)
    let start = Double(clock.tv_sec) + Double(clock.tv_nsec) / 1e9
    let handles = workers.map(startPlainThread)
    for thread in handles { pthread_join(thread, nil) }
    clock_gettime(CLOCK_MONOTONIC, &clock)
    let elapsed = Double(clock.tv_sec) + Double(clock.tv_nsec) / 1e9 - start
    if workers.contains(where: { $0.failed }) { fatalError("plain parallel I/O failed") }
    return Double(offsets.count) / elapsed
}

func pad(_ value: Int, _ width: Int) -> String {
    let text = String(value)
    return String(repeating: " ", count: max(0, width - text.count)) + text
}

/// The cost of raising the interrupt once, the way VirtioInterrupt does (one 8-byte write to
/// an eventfd, here with no KVM irqfd behind it, so a lower bound), in seconds.
@MainActor func eventfdWrite() -> Double {
    let fd = fl_eventfd(0, 1)
    defer { close(fd) }
    var one: UInt64 = 1
    let count = 100_000
    let start = now()
    var drained: UInt64 = 0
    // Plain calls, no closures: a closure formed here would carry the main actor's dynamic
    // isolation check (~200 instructions) into the measurement.
    for i in 0..<count {
        _ = write(fd, &one, 8)
        if i & 0xffff == 0xffff { _ = read(fd, &drained, 8) }
    }
    return (now() - start) / Double(count)
}

func median(_ values: [Double]) -> Double {
    let sorted = values.sorted()
    return sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
}

print(
    "virtio-blk backend, 4 KiB random I/O, \(options.operations) ops on a \(options.sizeMiB) MiB file (\(options.direct ? "O_DIRECT" : "page cache")), median of \(options.rounds) alternating rounds"
)
print("device I/O threads: \(options.ioThreads)\(options.cpuTime ? " (CPU time: blind to them)" : "")")
print("workload        virtio-blk ops/s   plain ops/s   ratio   plain in flight ops/s   ratio")
var plainReadQD1: Double?
for write in options.kinds {
    // Warm up both paths once.
    _ = plain(write: write)
    _ = try device(write: write, depth: 32)
    for depth in options.depths {
        var viaDevice: [Double] = []
        var baseline: [Double] = []
        var inFlight: [Double] = []
        for round in 0..<options.rounds {
            if round % 2 == 0 {
                viaDevice.append(try device(write: write, depth: depth))
                baseline.append(plain(write: write))
                if depth > 1 { inFlight.append(parallel(write: write, threads: depth)) }
            } else {
                if depth > 1 { inFlight.append(parallel(write: write, threads: depth)) }
                baseline.append(plain(write: write))
                viaDevice.append(try device(write: write, depth: depth))
            }
        }
        let (d, b) = (median(viaDevice), median(baseline))
        if !write && depth == 1 { plainReadQD1 = b }
        let name = "\(write ? "write" : "read") QD\(depth)"
        let padded = name + String(repeating: " ", count: max(0, 14 - name.count))
        var line = "\(padded)  \(pad(Int(d), 16))  \(pad(Int(b), 12))   \(Double(Int(d / b * 100)) / 100)x"
        if depth > 1 {
            let p = median(inFlight)
            line += "  \(pad(Int(p), 20))   \(Double(Int(d / p * 100)) / 100)x"
        }
        print(line)
    }
}
// At QD1 every request needs its own interrupt (the driver asks for each, §2.7.10), so even a
// device costing nothing else cannot beat plain I/O + one eventfd write per request.
if let plainReadQD1 {
    let pread = 1 / plainReadQD1
    let irq = eventfdWrite()
    print(
        "QD1 read ceiling: plain pread \(Int(pread * 1e9)) ns + one eventfd write \(Int(irq * 1e9)) ns per request -> at most \(Double(Int(pread / (pread + irq) * 100)) / 100)x"
    )
}
