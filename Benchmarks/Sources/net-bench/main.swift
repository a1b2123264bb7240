// Host-side virtio-net backend throughput: frames through the real receive and transmit paths
// (split virtqueues in crafted guest memory, the virtio-net device's processing, the used
// ring and the interrupt eventfd) against a real tap device, compared with plain read(2) and
// write(2) of the same frames on the same tap descriptor, side by side in one run.
//
// Run it inside a network namespace holding the tap (Benchmarks/run does: `ip netns add`,
// `ip tuntap add`, txqueuelen 10000, up, then `ip netns exec NS net-bench --tap NAME`).
// Transmit: the guest's frames go to the tap, where the namespace's kernel drops them (a
// destination MAC that is not the tap's, an unregistered EtherType). Receive: an AF_PACKET
// socket in the namespace queues frames on the tap (untimed), then the device drains the
// tap's queue into posted guest buffers (timed), or plain reads do.
import CBench
import CLinux
import Glibc
import Protocol
import VMMWorker

struct Options {
    var tap = "fbtap0"
    /// Frames per round for 64 B and 1500 B frames, and for 64 KiB GSO frames.
    var frames = 8192
    var gsoFrames = 512
    var rounds = 5
    var cpuTime = false
    /// Negotiate the device's offloads (CSUM, GUEST_/HOST_TSO4/6, MRG_RXBUF) when it offers them.
    var offloads = true
}

var options = Options()
var arguments = CommandLine.arguments.dropFirst()
while let flag = arguments.popFirst() {
    switch flag {
    case "--tap": options.tap = arguments.popFirst() ?? options.tap
    case "--frames": options.frames = Int(arguments.popFirst() ?? "") ?? options.frames
    case "--gso-frames": options.gsoFrames = Int(arguments.popFirst() ?? "") ?? options.gsoFrames
    case "--rounds": options.rounds = max(1, Int(arguments.popFirst() ?? "") ?? options.rounds)
    case "--cpu-time": options.cpuTime = true
    case "--no-offloads": options.offloads = false
    default:
        print("usage: net-bench [--tap NAME] [--frames N] [--gso-frames N] [--rounds N] [--cpu-time] [--no-offloads]")
        exit(2)
    }
}

@MainActor func now() -> Double {
    var t = timespec()
    clock_gettime(options.cpuTime ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &t)
    return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
}

@MainActor func fail(_ message: String) -> Never {
    print("net-bench: \(message)")
    exit(1)
}

// Virtio-net feature bits (virtio 1.2 §5.1.3) the harness asks for when offered.
let csum: UInt64 = 1 << 0
let guestCsum: UInt64 = 1 << 1
let guestTSO4: UInt64 = 1 << 7
let guestTSO6: UInt64 = 1 << 8
let hostTSO4: UInt64 = 1 << 11
let hostTSO6: UInt64 = 1 << 12
let mergeable: UInt64 = 1 << 15
let version1: UInt64 = 1 << 32
let headerSize = 12

// Guest side: 64 MiB of RAM; receive queue 0 and transmit queue 1 of 256 at fixed places.
let memory = try GuestMemory(size: 64 << 20)
let rxRings: (UInt64, UInt64, UInt64) = (0x10000, 0x11000, 0x12000)
let txRings: (UInt64, UInt64, UInt64) = (0x13000, 0x14000, 0x15000)
let rxBuffers: UInt64 = 0x100000
let txBuffers: UInt64 = 0x2000000
/// Room per transmit slot: a 64 KiB GSO frame and its header.
let txStride: UInt64 = 0x11000
let queueSize = 256

let loop = try EventLoop(name: "bench")
let device: VirtioNetDevice
do {
    device = try VirtioNetDevice(net: NetConfig(id: "bench", hostDeviceName: options.tap), memory: memory, loop: loop)
} catch {
    fail("\(error) (run inside the namespace holding the tap, as Benchmarks/run does)")
}
let offered = device.deviceFeatures
let wanted = options.offloads ? (csum | guestCsum | guestTSO4 | guestTSO6 | hostTSO4 | hostTSO6 | mergeable) : 0
let features = offered & (wanted | 1 << 5 | 1 << 16)
let transport = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 0), device: device, memory: memory, vm: nil)
var setup: [(UInt64, UInt64)] = [(0x070, 3), (0x024, 0), (0x020, features & 0xffff_ffff), (0x024, 1), (0x020, 1), (0x070, 11)]
for (index, rings) in [rxRings, txRings].enumerated() {
    setup += [(0x030, UInt64(index)), (0x038, 256), (0x080, rings.0), (0x090, rings.1), (0x0a0, rings.2), (0x044, 1)]
}
for (offset, value) in setup + [(0x070, 15)] { transport.write(offset: offset, length: 4, value: value) }
guard transport.status == 15 else { fail("device did not go live: status \(transport.status)") }
let accepted = features | version1
let gsoOn = accepted & guestTSO4 != 0 && accepted & hostTSO4 != 0
let mergeOn = accepted & mergeable != 0
/// Receive buffer size: 2 KiB when frames fit one (no GUEST_TSO) or span several
/// (MRG_RXBUF, as Linux posts page-sized ones: 4 KiB); a whole 64 KiB GSO frame otherwise
/// (§5.1.6.3.1).
let rxBufferSize: UInt64 = accepted & guestTSO4 == 0 ? 2048 : (mergeOn ? 4096 : 65_562)

let control = try memory.hostPointer(0, length: 64 << 20)
@MainActor @inline(__always) func store<T: FixedWidthInteger>(_ value: T, at address: UInt64) {
    control.storeBytes(of: value.littleEndian, toByteOffset: Int(address), as: T.self)
}
@MainActor @inline(__always) func load<T: FixedWidthInteger>(_: T.Type, at address: UInt64) -> T {
    T(littleEndian: control.loadUnaligned(fromByteOffset: Int(address), as: T.self))
}

/// The driver's side of one queue: descriptors 0..<256 each one buffer, posted by head.
@MainActor struct DriverQueue {
    let rings: (descriptors: UInt64, avail: UInt64, used: UInt64)
    var availIndex: UInt16 = 0
    var usedSeen: UInt16 = 0

    func describe(_ head: Int, address: UInt64, length: UInt32, writable: Bool) {
        let at = rings.descriptors + UInt64(head) * 16
        store(address, at: at)
        store(length, at: at + 8)
        store(UInt16(writable ? 2 : 0), at: at + 12)
    }

    mutating func post(_ head: Int) {
        store(UInt16(head), at: rings.avail + 4 + 2 * UInt64(availIndex % 256))
        availIndex &+= 1
        store(availIndex, at: rings.avail + 2)
    }

    /// Used elements not yet seen, as (id, len).
    mutating func harvest(_ body: (Int, UInt32) -> Void) {
        let index = load(UInt16.self, at: rings.used + 2)
        while usedSeen != index {
            let at = rings.used + 4 + 8 * UInt64(usedSeen % 256)
            body(Int(load(UInt32.self, at: at)), load(UInt32.self, at: at + 4))
            usedSeen &+= 1
        }
    }
}

var rx = DriverQueue(rings: rxRings)
var tx = DriverQueue(rings: txRings)
for head in 0..<queueSize {
    rx.describe(head, address: rxBuffers + UInt64(head) * rxBufferSize, length: UInt32(rxBufferSize), writable: true)
    rx.post(head)
}

/// What a guest's interrupt handler does for virtio-mmio: read InterruptStatus, acknowledge.
@MainActor func acknowledgeInterrupt() {
    let status = transport.read(offset: 0x060, length: 4)
    if status != 0 { transport.write(offset: 0x064, length: 4, value: status) }
}

/// A frame of `size` bytes (Ethernet header included) to a MAC that is not the tap's, with
/// an unregistered EtherType (the namespace's kernel drops it), or for GSO an IPv4/TCP
/// segment train the kernel may keep whole: `size` is then the whole 64 KiB packet.
@MainActor func frame(size: Int, gso: Bool) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: size)
    for i in 0..<size { bytes[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
    let destination: [UInt8] = [0x02, 0, 0, 0, 0, 0x01]
    let source: [UInt8] = [0x02, 0, 0, 0, 0, 0x02]
    bytes.replaceSubrange(0..<12, with: destination + source)
    if !gso {
        bytes[12] = 0x88
        bytes[13] = 0xb5
        return bytes
    }
    // IPv4 (20 bytes, no options) and TCP (20 bytes) headers; checksums left to the offload.
    bytes[12] = 0x08
    bytes[13] = 0x00
    let ipLength = size - 14
    let ip: [UInt8] = [
        0x45, 0, UInt8(ipLength >> 8), UInt8(ipLength & 0xff), 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 99, 0, 2, 10, 99, 0, 1,
    ]
    var checksum: UInt32 = 0
    for i in stride(from: 0, to: 20, by: 2) { checksum += UInt32(ip[i]) << 8 | UInt32(ip[i + 1]) }
    while checksum > 0xffff { checksum = (checksum & 0xffff) + (checksum >> 16) }
    var header = ip
    header[10] = UInt8(~checksum >> 8 & 0xff)
    header[11] = UInt8(~checksum & 0xff)
    let tcp: [UInt8] = [0x30, 0x39, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]
    bytes.replaceSubrange(14..<54, with: header + tcp)
    return bytes
}

/// struct virtio_net_hdr for a frame: zeros, or for a GSO frame NEEDS_CSUM with the TCP
/// checksum's place, GSO_TCPV4, hdr_len 54 and an MSS of 1448.
@MainActor func vnetHeader(gso: Bool) -> [UInt8] {
    guard gso else { return [UInt8](repeating: 0, count: headerSize) }
    return [1, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0]
}

// --- receive ---------------------------------------------------------------------------------

let packetSocket = cb_packet_socket(options.tap, 0)
let gsoPacketSocket = cb_packet_socket(options.tap, 1)
guard packetSocket >= 0, gsoPacketSocket >= 0 else { fail("AF_PACKET socket on \(options.tap): errno \(-packetSocket)") }

/// Queues `count` frames on the tap from the namespace side (untimed).
@MainActor func fill(_ frameBytes: [UInt8], gso: Bool, count: Int) {
    let message = gso ? Array(vnetHeader(gso: true)[0..<10]) + frameBytes : frameBytes
    for _ in 0..<count {
        let sent = message.withUnsafeBytes { send(gso ? gsoPacketSocket : packetSocket, $0.baseAddress, $0.count, 0) }
        if sent < 0 { fail("AF_PACKET send: errno \(errno)") }
    }
}

/// Drains the tap through the device: posts buffers back as the "driver" consumes them.
/// Returns (frames, frame bytes, seconds).
@MainActor func deviceReceive() -> (Int, Int, Double) {
    var frames = 0
    var bytes = 0
    let start = now()
    while true {
        device.receive()
        acknowledgeInterrupt()
        var got = 0
        var heads: [Int] = []
        rx.harvest { head, length in
            heads.append(head)
            got += 1
            bytes += Int(length)
        }
        if mergeOn {
            // Only the first buffer of a frame carries the header; its num_buffers counts the
            // frame's buffers (published together, so a frame never spans two harvests).
            var rest = 0
            for head in heads {
                if rest > 0 {
                    rest -= 1
                    continue
                }
                rest = Int(load(UInt16.self, at: rxBuffers + UInt64(head) * rxBufferSize + 10)) - 1
                frames += 1
                bytes -= headerSize
            }
        } else {
            frames += got
            bytes -= got * headerSize
        }
        for head in heads { rx.post(head) }
        if got == 0 { break }
    }
    return (frames, bytes, now() - start)
}

let readBuffer = UnsafeMutableRawPointer.allocate(byteCount: 70_000, alignment: 4096)
@MainActor func plainReceive() -> (Int, Int, Double) {
    var frames = 0
    var bytes = 0
    let start = now()
    while true {
        let n = read(device.tapFD, readBuffer, 70_000)
        if n < 0 {
            if errno == EINTR { continue }
            break
        }
        frames += 1
        bytes += n - headerSize
    }
    return (frames, bytes, now() - start)
}

// --- transmit --------------------------------------------------------------------------------

/// Writes `frameBytes` with its header into every transmit slot.
@MainActor func prepareTransmit(_ frameBytes: [UInt8], gso: Bool) {
    let message = vnetHeader(gso: gso) + frameBytes
    for head in 0..<queueSize {
        let at = txBuffers + UInt64(head) * txStride
        control.advanced(by: Int(at)).copyMemory(from: message, byteCount: message.count)
        tx.describe(head, address: at, length: UInt32(message.count), writable: false)
    }
}

@MainActor func deviceTransmit(count: Int, size: Int) -> (Int, Int, Double) {
    let before = device.statistics.transmitted
    let start = now()
    var posted = 0
    while posted < count {
        let batch = min(queueSize, count - posted)
        for head in 0..<batch { tx.post(head) }
        device.transmit()
        acknowledgeInterrupt()
        tx.harvest { _, _ in }
        posted += batch
    }
    let elapsed = now() - start
    let sent = Int(device.statistics.transmitted - before)
    return (sent, sent * size, elapsed)
}

@MainActor func plainTransmit(count: Int, size: Int) -> (Int, Int, Double) {
    var sent = 0
    let start = now()
    for i in 0..<count {
        let at = txBuffers + UInt64(i % queueSize) * txStride
        if write(device.tapFD, control.advanced(by: Int(at)), headerSize + size) > 0 { sent += 1 }
    }
    return (sent, sent * size, now() - start)
}

// --- the table -------------------------------------------------------------------------------

@MainActor func median(_ values: [Double]) -> Double {
    let sorted = values.sorted()
    return sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
}

@MainActor func pad(_ text: String, _ width: Int) -> String { String(repeating: " ", count: max(0, width - text.count)) + text }
@MainActor func fixed(_ value: Double, _ digits: Int) -> String {
    let scale = Double([1, 10, 100, 1000][digits])
    let rounded = (value * scale).rounded() / scale
    return "\(rounded)"
}

@MainActor func names(_ bits: UInt64) -> String {
    let known: [(UInt64, String)] = [
        (csum, "CSUM"), (guestCsum, "GUEST_CSUM"), (guestTSO4, "GUEST_TSO4"), (guestTSO6, "GUEST_TSO6"), (hostTSO4, "HOST_TSO4"),
        (hostTSO6, "HOST_TSO6"), (mergeable, "MRG_RXBUF"),
    ]
    let list = known.filter { bits & $0.0 != 0 }.map(\.1)
    return list.isEmpty ? "none" : list.joined(separator: " ")
}

print(
    "virtio-net backend vs plain read/write on the same tap fd (\(options.tap), in a network namespace), median of \(options.rounds) alternating rounds"
)
print("offloads negotiated: \(names(accepted)); receive buffers \(rxBufferSize) B")
print("workload          frames   virtio-net frames/s  Gbit/s   plain frames/s  Gbit/s   ratio")

struct Workload {
    let name: String
    let size: Int
    let gso: Bool
    let transmit: Bool
}
var workloads: [Workload] = []
for transmit in [false, true] {
    for size in [64, 1500] {
        workloads.append(Workload(name: "\(transmit ? "TX" : "RX") \(size) B", size: size, gso: false, transmit: transmit))
    }
    if gsoOn { workloads.append(Workload(name: "\(transmit ? "TX" : "RX") 64 KiB GSO", size: 65_514, gso: true, transmit: transmit)) }
}

for workload in workloads {
    let bytes = frame(size: workload.size, gso: workload.gso)
    let count = workload.gso ? options.gsoFrames : options.frames
    if workload.transmit { prepareTransmit(bytes, gso: workload.gso) }
    @MainActor func measure(_ viaDevice: Bool) -> (Int, Double, Double) {
        let result: (Int, Int, Double)
        if workload.transmit {
            result = viaDevice ? deviceTransmit(count: count, size: workload.size) : plainTransmit(count: count, size: workload.size)
        } else {
            fill(bytes, gso: workload.gso, count: count)
            result = viaDevice ? deviceReceive() : plainReceive()
        }
        let (frames, frameBytes, seconds) = result
        return (frames, Double(frames) / seconds, Double(frameBytes) * 8 / seconds / 1e9)
    }
    // Warm-up of both paths.
    _ = measure(true)
    _ = measure(false)
    var viaDevice: [(Int, Double, Double)] = []
    var baseline: [(Int, Double, Double)] = []
    for round in 0..<options.rounds {
        if round % 2 == 0 {
            viaDevice.append(measure(true))
            baseline.append(measure(false))
        } else {
            baseline.append(measure(false))
            viaDevice.append(measure(true))
        }
    }
    let d = (median(viaDevice.map { Double($0.0) }), median(viaDevice.map(\.1)), median(viaDevice.map(\.2)))
    let b = (median(baseline.map { Double($0.0) }), median(baseline.map(\.1)), median(baseline.map(\.2)))
    let frames = d.0 == b.0 ? "\(Int(d.0))" : "\(Int(d.0))/\(Int(b.0))"
    print(
        "\(workload.name + String(repeating: " ", count: max(0, 16 - workload.name.count)))\(pad(frames, 8))  \(pad("\(Int(d.1))", 19))  \(pad(fixed(d.2, 2), 6))  \(pad("\(Int(b.1))", 15))  \(pad(fixed(b.2, 2), 6))   \(fixed(d.1 / b.1, 2))x"
    )
}
print("device counters: \(device.statistics)")
