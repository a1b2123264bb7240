import FuzzSupport
import Glibc
import Protocol

@testable import VMMWorker

// libFuzzer target for the virtio-mmio register interface (virtio 1.2 §4.2.2, §4.2.3): one
// input is a device and a sequence of guest accesses to its slot — reads and writes of every
// width at any offset (control registers and configuration space), status writes, feature
// selects, queue set-up with hostile sizes and addresses, QueueNotify, InterruptACK, resets
// in the middle of activity — interleaved with guest-memory writes (so activated queues have
// something to find) and rounds of the device's event loop. The transport and devices are the
// VMM's own (virtio-net on a socket pair standing in for its tap, FuzzSupport/HostSides.swift).
//
// Invariants after every operation (fatalError: libFuzzer keeps the input as a crash):
// - MagicValue, Version, DeviceID and VendorID read as their constants (32-bit aligned reads;
//   any other width or alignment of a control register reads 0);
// - DeviceFeatures is the offered word for selects 0 and 1, else 0; QueueNumMax is the
//   device's for an existing queue, else 0;
// - Status holds only bits the driver wrote since the last reset (plus DEVICE_NEEDS_RESET),
//   and FEATURES_OK only when the features the driver wrote were offered and VERSION_1 was
//   among them; ConfigGeneration never goes back;
// - InterruptACK clears the acknowledged bits;
// - a reset (Status 0) really resets: Status, InterruptStatus, every queue's registers read
//   back as after start-up, and afterwards neither a kick nor loop rounds change guest memory.

let windowBase: UInt64 = 0x1f_0000
let windowSize: UInt64 = 0x1_0000
let memory = guardedMemory(size: 2 << 20)
let slotSize = Layout.virtioMMIOSlotSize

enum DeviceChoice: UInt8, CaseIterable {
    case block, rng, net, console, balloon, vsock
}

/// A shared image for virtio-blk (its contents persist between inputs; 64 KiB in tmpfs).
let disk: BlockBackend = {
    var template = Array("/dev/shm/flotilla-fuzz-mmio-XXXXXX".utf8CString)
    let fd = template.withUnsafeMutableBufferPointer { $0.baseAddress.map { mkstemp($0) } ?? -1 }
    check(fd >= 0 && ftruncate(fd, 64 << 10) == 0, "a tmpfs file for the disk image")
    _ = unlink(String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self))
    return must { try BlockBackend(drive: DriveConfig(id: "fuzz", path: "/proc/self/fd/\(fd)", direct: false)) }
}()

/// A transport with its device and loop, and what the harness knows of the driver's writes.
final class Slot {
    let loop: EventLoop
    let device: any VirtioDevice
    let transport: VirtioMMIOTransport
    var statusBits: UInt32 = 0
    var driverFeatures: UInt64 = 0
    var driverFeaturesSelect: UInt32 = 0
    var deviceFeaturesSelect: UInt32 = 0
    var queueSelect: UInt32 = 0
    var generation: UInt64 = 0

    init(_ choice: DeviceChoice) {
        let loop = must { try EventLoop(name: "fuzz") }
        self.loop = loop
        let device: any VirtioDevice
        switch choice {
        case .block: device = VirtioBlockDevice(backend: disk, memory: memory, loop: loop)
        case .rng:
            device = must { try VirtioRngDevice(rng: RngConfig(randomFile: "/dev/zero"), memory: memory, loop: loop) }
        case .net: device = fuzzNet(memory: memory, loop: loop)
        case .console: device = VirtioConsoleDevice(id: "con0", port: FuzzConsolePort(loop: loop), memory: memory, loop: loop)
        case .balloon: device = VirtioBalloonDevice(balloon: BalloonConfig(deflateOnOOM: true), memory: memory, loop: loop)
        // No host sockets: its queues and configuration space (guest_cid) behind the registers.
        case .vsock:
            device = must {
                try VirtioVsockDevice(id: "vs0", guestCID: 3, listener: nil, udsPath: nil, memory: memory, loop: loop)
            }
        }
        self.device = device
        transport = must { try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 0), device: device, memory: memory, vm: nil) }
    }

    var offered: UInt64 { device.deviceFeatures | VirtioMMIOTransport.transportFeatures }

    func read(_ offset: UInt64, _ width: Int) -> UInt64 {
        let value = transport.read(offset: offset, length: width)
        typealias R = Virtio.MMIORegister
        if width < 8 { check(value >> (8 * UInt64(width)) == 0, "a \(width)-byte read at \(hex(offset)) gave \(hex(value))") }
        guard offset < R.config else { return value }
        guard width == 4, offset % 4 == 0 else {
            check(value == 0, "a \(width)-byte read of control register \(hex(offset)) gave \(hex(value))")
            return value
        }
        switch offset {
        case R.magicValue: check(value == UInt64(Virtio.magic), "MagicValue \(hex(value))")
        case R.version: check(value == 2, "Version \(value)")
        case R.deviceID: check(value == UInt64(device.deviceID), "DeviceID \(value)")
        case R.vendorID: check(value == UInt64(Virtio.vendorID), "VendorID \(hex(value))")
        case R.deviceFeatures:
            let expected = deviceFeaturesSelect < 2 ? (offered >> (32 * UInt64(deviceFeaturesSelect))) & 0xffff_ffff : 0
            check(value == expected, "DeviceFeatures[\(deviceFeaturesSelect)] \(hex(value)), offered \(hex(offered))")
        case R.queueSizeMax:
            let sizes = device.queueMaxSizes
            check(value == (Int(queueSelect) < sizes.count ? UInt64(sizes[Int(queueSelect)]) : 0), "QueueNumMax \(value)")
        case R.status: checkStatus(UInt32(value))
        case R.configGeneration:
            check(value >= generation, "ConfigGeneration went back from \(generation) to \(value)")
            generation = value
        default: break
        }
        return value
    }

    func checkStatus(_ status: UInt32) {
        let own = status & ~Virtio.Status.deviceNeedsReset
        check(own & ~statusBits == 0, "Status \(hex(status)) has bits the driver never wrote (\(hex(statusBits)))")
        if own & Virtio.Status.featuresOK != 0 {
            check(
                driverFeatures & ~offered == 0 && driverFeatures & Virtio.Feature.version1 != 0,
                "FEATURES_OK with features \(hex(driverFeatures)) (offered \(hex(offered)))")
        }
    }

    func write(_ offset: UInt64, _ width: Int, _ value: UInt64) {
        typealias R = Virtio.MMIORegister
        let statusBefore = transport.status
        transport.write(offset: offset, length: width, value: value)
        guard offset < R.config, width == 4, offset % 4 == 0 else { return }
        let value32 = UInt32(truncatingIfNeeded: value)
        switch offset {
        case R.deviceFeaturesSelect: deviceFeaturesSelect = value32
        case R.driverFeaturesSelect: driverFeaturesSelect = value32
        case R.driverFeatures:
            if statusBefore & Virtio.Status.featuresOK == 0 && driverFeaturesSelect < 2 {
                let shift = 32 * UInt64(driverFeaturesSelect)
                driverFeatures = (driverFeatures & ~(0xffff_ffff << shift)) | (UInt64(value32) << shift)
            }
        case R.queueSelect: queueSelect = value32
        case R.interruptAck:
            check(transport.interrupt.pending & value32 == 0, "InterruptACK \(hex(value32)) left \(hex(transport.interrupt.pending))")
        case R.status:
            if value32 == 0 {
                checkReset()
            } else {
                statusBits |= value32
            }
        default: break
        }
        checkStatus(transport.status)
    }

    /// §2.4 / §4.2.3.1: after writing 0 the device is as after start-up.
    func checkReset() {
        statusBits = 0
        driverFeatures = 0
        driverFeaturesSelect = 0
        deviceFeaturesSelect = 0
        queueSelect = 0
        typealias R = Virtio.MMIORegister
        check(transport.status == 0, "Status \(hex(transport.status)) after reset")
        check(transport.interrupt.pending == 0, "InterruptStatus \(transport.interrupt.pending) after reset")
        for (index, maxSize) in device.queueMaxSizes.enumerated() {
            write(R.queueSelect, 4, UInt64(index))
            check(read(R.queueReady, 4) == 0, "queue \(index) ready after reset")
            check(read(R.queueSizeMax, 4) == UInt64(maxSize), "queue \(index) QueueNumMax after reset")
            for register in [R.queueDescLow, R.queueDescHigh, R.queueDriverLow, R.queueDriverHigh, R.queueDeviceLow, R.queueDeviceHigh] {
                check(read(register, 4) == 0, "queue \(index) register \(hex(register)) after reset")
            }
        }
        write(R.queueSelect, 4, 0)
        // The device is gone from guest memory: a kick and loop rounds change nothing.
        let before = snapshot(memory, at: windowBase, count: Int(windowSize))
        for index in device.queueMaxSizes.indices {
            transport.write(offset: R.queueNotify, length: 4, value: UInt64(index))
        }
        for _ in 0..<3 { loop.runOneRound() }
        check(before == snapshot(memory, at: windowBase, count: Int(windowSize)), "guest memory changed after reset")
    }

    /// A driver's whole bring-up (§3.1.1) with queues at valid places in the window, so that
    /// inputs reach live devices quickly; `features` is what it accepts.
    func bringUp(features: UInt64, layoutSeed: UInt64) {
        typealias R = Virtio.MMIORegister
        write(R.status, 4, 0)
        write(R.status, 4, UInt64(Virtio.Status.acknowledge | Virtio.Status.driver))
        for select in [UInt64(0), 1] {
            write(R.driverFeaturesSelect, 4, select)
            write(R.driverFeatures, 4, (features >> (32 * select)) & 0xffff_ffff)
        }
        write(R.status, 4, UInt64(Virtio.Status.featuresOK))
        for index in device.queueMaxSizes.indices {
            // Queue i at window + i·0x4000: table, avail +0x1000, used +0x2000; size from the seed.
            let base = windowBase + 0x4000 * UInt64(index)
            write(R.queueSelect, 4, UInt64(index))
            write(R.queueSize, 4, 1 << ((layoutSeed >> (4 * UInt64(index))) % 9))
            write(R.queueDescLow, 4, base)
            write(R.queueDriverLow, 4, base + 0x1000)
            write(R.queueDeviceLow, 4, base + 0x2000)
            write(R.queueReady, 4, 1)
        }
        write(R.status, 4, UInt64(Virtio.Status.driverOK))
    }
}

/// One input: a device (byte 0) and operations of 11 bytes each: an opcode byte, a u16 offset
/// and a u64 value (little-endian). Opcode bits 0–2: 0 read, 1 write, 2 write Status, 3 bring
/// the device up (features = value), 4 loop rounds, 5 a u64 into guest memory (window +
/// offset), 6 QueueNotify, 7 configuration space; bits 3–4 the width (1, 2, 4, 8); for 7,
/// bit 5 makes it a write.
/// MMIO_FUZZ_VERBOSE=1: print the state after every operation (for replaying one input).
let verbose = getenv("MMIO_FUZZ_VERBOSE") != nil

func runInput(_ bytes: [UInt8]) {
    var r = ByteReader(bytes)
    let choice = DeviceChoice(rawValue: r.u8() % UInt8(DeviceChoice.allCases.count)) ?? .block
    must { try memory.fill(0, at: windowBase, count: windowSize) }
    let slot = Slot(choice)
    typealias R = Virtio.MMIORegister
    while r.remaining >= 11 {
        let op = r.u8()
        let offset = UInt64(r.u16())
        let value = r.u64()
        let width = 1 << Int((op >> 3) & 3)
        switch op & 7 {
        case 0: _ = slot.read(offset % slotSize, width)
        case 1: slot.write(offset % slotSize, width, value)
        case 2: slot.write(R.status, 4, value & 0xff)
        case 3: slot.bringUp(features: value | Virtio.Feature.version1, layoutSeed: offset)
        case 4: for _ in 0...(value % 8) { slot.loop.runOneRound() }
        case 5: must { try memory.write(value, at: windowBase + (offset % (windowSize - 7))) }
        case 6: slot.write(R.queueNotify, 4, value % 4)
        default:
            let at = R.config + offset % 0x100
            if op & 0x20 != 0 { slot.write(at, width, value) } else { _ = slot.read(at, width) }
        }
        // The constants, whatever happened.
        _ = slot.read(R.magicValue, 4)
        _ = slot.read(R.version, 4)
        _ = slot.read(R.status, 4)
        if verbose {
            let used = must { try memory.read(UInt16.self, at: windowBase + 0x2002) }
            print("op \(op & 7) at \(hex(offset)): status \(hex(slot.transport.status)), queue 0 used idx \(used)")
        }
    }
    slot.write(R.status, 4, 0)
}

func mmioSeeds() -> [(String, [UInt8])] {
    typealias R = Virtio.MMIORegister
    func op(_ code: UInt8, _ offset: UInt64, _ value: UInt64) -> [UInt8] { [code] + le(UInt16(offset)) + le(value) }
    let w4: UInt8 = 2 << 3
    var all: [(String, [UInt8])] = []
    for choice in DeviceChoice.allCases {
        // A driver's bring-up through single register writes, a buffer posted, a kick.
        var ops = op(1 | w4, R.status, 3) + op(1 | w4, R.driverFeaturesSelect, 1) + op(1 | w4, R.driverFeatures, 1)
        ops += op(0 | w4, R.deviceFeatures, 0) + op(1 | w4, R.status, 11) + op(0 | w4, R.status, 0)
        for queue in 0..<UInt64(choice == .block || choice == .rng ? 1 : choice == .vsock ? 3 : 2) {
            let base = windowBase + 0x4000 * queue
            ops += op(1 | w4, R.queueSelect, queue) + op(0 | w4, R.queueSizeMax, 0) + op(1 | w4, R.queueSize, 8)
            ops += op(1 | w4, R.queueDescLow, base) + op(1 | w4, R.queueDriverLow, base + 0x1000)
            ops += op(1 | w4, R.queueDeviceLow, base + 0x2000) + op(1 | w4, R.queueReady, 1)
        }
        ops += op(1 | w4, R.status, 15)
        // Descriptor 0: 64 bytes at window + 0x8000, writable; avail ring entry 0, idx 1.
        ops += op(5, 0, windowBase + 0x8000) + op(5, 8, 64 | 2 << 32) + op(5, 0x1002, 1 << 0)
        ops += op(6, 0, 0) + op(4, 0, 3) + op(0 | w4, R.interruptStatus, 0) + op(1 | w4, R.interruptAck, 3)
        for width in UInt8(0)..<4 { ops += op(7 | width << 3, UInt64(width), 0) + op(7 | 0x20 | width << 3, 4, 0x1234_5678) }
        ops += op(0 | w4, R.configGeneration, 0) + op(2, 0, 0) + op(3, 0x8888, 0) + op(4, 0, 2) + op(1 | (1 << 3), R.status, 0)
        all.append(("\(choice)-bring-up", [choice.rawValue] + ops))
        // Hostile queue set-up: a huge size, addresses past RAM, not a power of 2, misaligned.
        var hostile = op(1 | w4, R.status, 3) + op(1 | w4, R.driverFeaturesSelect, 1) + op(1 | w4, R.driverFeatures, 1)
        hostile += op(1 | w4, R.status, 11) + op(1 | w4, R.queueSize, 0x8000) + op(1 | w4, R.queueDescHigh, 0xffff_ffff)
        hostile += op(1 | w4, R.queueReady, 1) + op(1 | w4, R.queueSelect, 1) + op(1 | w4, R.queueSize, 3)
        hostile += op(1 | w4, R.queueDriverLow, 0x1f_fff1) + op(1 | w4, R.queueReady, 1) + op(1 | w4, R.status, 15)
        hostile += op(0 | w4, R.status, 0) + op(6, 0, 1) + op(4, 0, 1) + op(1 | w4, R.status, 0)
        all.append(("\(choice)-hostile-queues", [choice.rawValue] + hostile))
    }
    return all
}
