import CLinux
import Glibc
import Synchronization

/// A virtio device behind a transport: its identity, features, configuration space and queue
/// processing. Implementations do their queue work on their own event loop.
public protocol VirtioDevice: AnyObject, Sendable {
    /// §5 device type.
    var deviceID: UInt32 { get }
    /// Device-type feature bits (the transport adds VERSION_1, EVENT_IDX and INDIRECT_DESC).
    var deviceFeatures: UInt64 { get }
    /// QueueNumMax of each queue; the count is the number of queues.
    var queueMaxSizes: [UInt16] { get }
    /// Reads `length` (1, 2, 4 or 8) bytes of the device configuration space at `offset`,
    /// little-endian; bytes beyond the structure read as 0.
    func readConfig(offset: UInt64, length: Int) -> UInt64
    /// A driver write into the configuration space (most fields are read-only).
    func writeConfig(offset: UInt64, length: Int, value: UInt64)
    /// DRIVER_OK: start processing `queues` (nil where the driver did not make a queue ready).
    func activate(_ activation: VirtioActivation) throws
    /// Device reset: when this returns, the device no longer reads or writes guest memory.
    func reset()
}

/// What a device gets when the driver sets DRIVER_OK.
public struct VirtioActivation: Sendable {
    public let features: UInt64
    public let queues: [SplitVirtqueue?]
    /// One eventfd per queue, signalled (by KVM's ioeventfd, or by the transport) when the
    /// driver writes the queue's index to QueueNotify. Owned by the transport.
    public let notifyFDs: [Int32]
    public let interrupt: VirtioInterrupt
}

/// The interrupt side of a transport: InterruptStatus bits and the line (a KVM irqfd), plus
/// the device's "needs reset" flag, all usable from any thread without the register lock.
///
/// Sendable: immutable descriptors and atomics.
public final class VirtioInterrupt: Sendable {
    /// An eventfd registered with KVM_IRQFD on the slot's GSI (or read by unit tests).
    public let eventFD: Int32
    let status = Atomic<UInt32>(0)
    let needsReset = Atomic<Bool>(false)
    private let signals = Atomic<Int>(0)

    init(eventFD: Int32) {
        self.eventFD = eventFD
    }

    /// InterruptStatus as the driver reads it.
    public var pending: UInt32 { status.load(ordering: .acquiring) }
    /// How many times the line was raised (pulses sent).
    public var signalCount: Int { signals.load(ordering: .relaxed) }
    public var deviceNeedsReset: Bool { needsReset.load(ordering: .acquiring) }

    /// Sets `bits` in InterruptStatus and raises the interrupt (§4.2.3.4: the device sets the
    /// InterruptStatus bit, then notifies). The line is edge-triggered (an ISA IRQ), so each
    /// raise is one KVM_IRQFD pulse.
    ///
    /// No pulse when every bit in `bits` was already set: the driver has then not yet
    /// acknowledged an interrupt that was raised (and is latched in the interrupt controller),
    /// and its handler reads InterruptStatus, acknowledges, and only then looks at the rings
    /// (§4.2.2 InterruptStatus/InterruptACK; Linux's vm_interrupt does exactly that), so it
    /// still sees the used buffers published before this call — the notification the driver
    /// asked for (§2.7.7, §2.7.10) is delivered by the pending interrupt. The check and the set
    /// are one atomic operation, and the acknowledge is an atomic clear of the same word, so
    /// a bit is either seen set here (and its handler has not run its ack yet) or it is raised.
    public func signal(_ bits: UInt32) {
        let old = status.bitwiseOr(bits, ordering: .acquiringAndReleasing).oldValue
        if old & bits == bits { return }
        signals.add(1, ordering: .relaxed)
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { Glibc.write(eventFD, $0.baseAddress, 8) }
    }

    /// §2.1.2: a device in an error state sets DEVICE_NEEDS_RESET and sends a configuration
    /// change notification.
    public func markNeedsReset() {
        needsReset.store(true, ordering: .releasing)
        signal(Virtio.Interrupt.configurationChange)
    }

    func acknowledge(_ bits: UInt32) {
        status.bitwiseAnd(~bits, ordering: .acquiringAndReleasing)
    }

    func reset() {
        status.store(0, ordering: .releasing)
        needsReset.store(false, ordering: .releasing)
    }
}

/// Errors of building devices from the configuration.
public typealias DeviceError = AreaError<DeviceErrorCode>

/// What went wrong, for ``DeviceError``.
public enum DeviceErrorCode: String, Sendable {
    case setup, image, locked
}

/// The virtio-mmio transport of one slot (virtio 1.2 §4.2, version 2 only): the register
/// file, feature negotiation, the device status state machine, queue set-up, notifications
/// through KVM_IOEVENTFD and interrupts through KVM_IRQFD.
///
/// Sendable: immutable references and descriptors; the register file is behind a Mutex, the
/// interrupt state is atomic.
public final class VirtioMMIOTransport: Sendable {
    /// Transport features offered with every device (§6).
    public static let transportFeatures = Virtio.Feature.version1 | Virtio.Feature.eventIndex | Virtio.Feature.indirectDescriptors

    struct QueueRegisters {
        var size: UInt16
        var ready = false
        var descriptorTable: UInt64 = 0
        var availableRing: UInt64 = 0
        var usedRing: UInt64 = 0
    }

    struct Registers {
        var deviceFeaturesSelect: UInt32 = 0
        var driverFeaturesSelect: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var queueSelect: UInt32 = 0
        var queues: [QueueRegisters]
        var status: UInt32 = 0
        var configGeneration: UInt32 = 0
        var active = false
    }

    public let slot: VirtioMMIOSlot
    public let device: any VirtioDevice
    public let interrupt: VirtioInterrupt
    let memory: GuestMemory
    let vm: VirtualMachine?
    let notifyFDs: [Int32]
    let offeredFeatures: UInt64
    private let registers: Mutex<Registers>
    /// Whether the irqfd and ioeventfds are still registered with KVM (until ``detach()``).
    private let wired = Atomic<Bool>(true)

    /// `vm == nil` (unit tests) wires nothing into KVM: QueueNotify writes reach the queue's
    /// eventfd through ``write(offset:length:value:)`` and interrupts only count.
    public init(slot: VirtioMMIOSlot, device: any VirtioDevice, memory: GuestMemory, vm: VirtualMachine?) throws {
        self.slot = slot
        self.device = device
        self.memory = memory
        self.vm = vm
        offeredFeatures = device.deviceFeatures | Self.transportFeatures
        let maxSizes = device.queueMaxSizes
        registers = Mutex(Registers(queues: maxSizes.map { QueueRegisters(size: $0) }))

        var created: [Int32] = []
        func closeAll() { for fd in created { Syscall.close(fd) } }
        do {
            let irqFD = try Syscall.once("eventfd") { fl_eventfd(0, 1) }
            created.append(irqFD)
            var notify: [Int32] = []
            for _ in maxSizes {
                let fd = try Syscall.once("eventfd") { fl_eventfd(0, 1) }
                created.append(fd)
                notify.append(fd)
            }
            if let vm {
                try vm.registerIRQFD(irqFD, gsi: slot.irq)
                for (index, fd) in notify.enumerated() {
                    // §4.2.2 QueueNotify: the driver writes the queue index; KVM signals the
                    // matching eventfd without leaving the kernel.
                    try vm.registerIOEventFD(
                        fd, space: .mmio, address: slot.base + Virtio.MMIORegister.queueNotify, length: 4,
                        datamatch: UInt64(index))
                }
            }
            interrupt = VirtioInterrupt(eventFD: irqFD)
            notifyFDs = notify
        } catch {
            closeAll()
            throw DeviceError(.setup, "cannot wire virtio-mmio slot at \(hex(slot.base)) (IRQ \(slot.irq)) into KVM", cause: error)
        }
    }

    deinit {
        device.reset()
        unwire()
        for fd in notifyFDs { Syscall.close(fd) }
        Syscall.close(interrupt.eventFD)
    }

    /// Unplug: resets the device (when this returns it no longer touches guest memory) and
    /// takes the slot's irqfd and ioeventfds out of KVM, so that another transport can be
    /// wired into the same slot. Call once no vCPU can reach this transport any more.
    public func detach() {
        registers.withLock { r in
            if r.active { device.reset() }
            r = Registers(queues: device.queueMaxSizes.map { QueueRegisters(size: $0) })
        }
        interrupt.reset()
        unwire()
    }

    private func unwire() {
        guard wired.exchange(false, ordering: .acquiringAndReleasing), let vm else { return }
        for (index, fd) in notifyFDs.enumerated() {
            try? vm.unregisterIOEventFD(
                fd, space: .mmio, address: slot.base + Virtio.MMIORegister.queueNotify, length: 4, datamatch: UInt64(index))
        }
        try? vm.unregisterIRQFD(interrupt.eventFD, gsi: slot.irq)
    }

    /// Bumps ConfigGeneration and tells the driver the configuration changed (§2.5.1,
    /// §4.2.3.4: InterruptStatus bit 1, then the interrupt). Before DRIVER_OK there is no
    /// driver to tell (it reads the configuration when it sets the device up), so only the
    /// generation moves.
    public func configurationChanged() {
        let live = registers.withLock { r -> Bool in
            r.configGeneration &+= 1
            return r.status & Virtio.Status.driverOK != 0
        }
        if live { interrupt.signal(Virtio.Interrupt.configurationChange) }
    }

    /// The device status as the driver reads it.
    public var status: UInt32 {
        registers.withLock { $0.status } | (interrupt.deviceNeedsReset ? Virtio.Status.deviceNeedsReset : 0)
    }

    // MARK: Register access (vCPU threads)

    /// A driver read of `length` bytes at `offset` into the slot.
    public func read(offset: UInt64, length: Int) -> UInt64 {
        if offset >= Virtio.MMIORegister.config {
            guard length == 1 || length == 2 || length == 4 || length == 8 else { return 0 }
            return device.readConfig(offset: offset - Virtio.MMIORegister.config, length: length)
        }
        // §4.2.2: the control registers are 32 bits wide and accessed as such.
        guard length == 4, offset % 4 == 0 else { return 0 }
        typealias R = Virtio.MMIORegister
        switch offset {
        case R.magicValue: return UInt64(Virtio.magic)
        case R.version: return UInt64(Virtio.mmioVersion)
        case R.deviceID: return UInt64(device.deviceID)
        case R.vendorID: return UInt64(Virtio.vendorID)
        case R.interruptStatus: return UInt64(interrupt.pending)
        case R.status: return UInt64(status)
        case R.sharedMemoryLengthLow, R.sharedMemoryLengthHigh:
            // §4.2.2: no shared memory regions; a length of all ones says "does not exist".
            return 0xffff_ffff
        default: break
        }
        let offered = offeredFeatures
        return registers.withLock { r -> UInt64 in
            let queue = Int(r.queueSelect) < r.queues.count ? r.queues[Int(r.queueSelect)] : nil
            switch offset {
            case R.deviceFeatures:
                return r.deviceFeaturesSelect < 2 ? (offered >> (32 * UInt64(r.deviceFeaturesSelect))) & 0xffff_ffff : 0
            case R.queueSizeMax:
                guard queue != nil else { return 0 }
                return UInt64(device.queueMaxSizes[Int(r.queueSelect)])
            case R.queueReady: return queue?.ready == true ? 1 : 0
            case R.configGeneration: return UInt64(r.configGeneration)
            case R.queueDescLow: return (queue?.descriptorTable ?? 0) & 0xffff_ffff
            case R.queueDescHigh: return (queue?.descriptorTable ?? 0) >> 32
            case R.queueDriverLow: return (queue?.availableRing ?? 0) & 0xffff_ffff
            case R.queueDriverHigh: return (queue?.availableRing ?? 0) >> 32
            case R.queueDeviceLow: return (queue?.usedRing ?? 0) & 0xffff_ffff
            case R.queueDeviceHigh: return (queue?.usedRing ?? 0) >> 32
            default: return 0
            }
        }
    }

    /// A driver write of `length` bytes at `offset` into the slot.
    public func write(offset: UInt64, length: Int, value: UInt64) {
        if offset >= Virtio.MMIORegister.config {
            guard length == 1 || length == 2 || length == 4 || length == 8 else { return }
            device.writeConfig(offset: offset - Virtio.MMIORegister.config, length: length, value: value)
            return
        }
        guard length == 4, offset % 4 == 0 else { return }
        let value32 = UInt32(truncatingIfNeeded: value)
        typealias R = Virtio.MMIORegister
        switch offset {
        case R.queueNotify:
            // Reached only when KVM's ioeventfd did not take the write (no VM, or a queue
            // index that matches no eventfd): forward valid indices, ignore the rest.
            guard Int(value32) < notifyFDs.count else { return }
            var one: UInt64 = 1
            _ = withUnsafeBytes(of: &one) { Glibc.write(notifyFDs[Int(value32)], $0.baseAddress, 8) }
            return
        case R.interruptAck:
            interrupt.acknowledge(value32)
            return
        case R.status:
            writeStatus(value32)
            return
        default: break
        }
        registers.withLock { r in
            let q = Int(r.queueSelect)
            // Queue registers may change only while the queue is not ready and the device
            // not live (§4.2.3.2: the driver writes them before QueueReady).
            let queueWritable = q < r.queues.count && !r.queues[q].ready && !r.active
            func setLow(_ old: UInt64) -> UInt64 { (old & 0xffff_ffff_0000_0000) | UInt64(value32) }
            func setHigh(_ old: UInt64) -> UInt64 { (old & 0xffff_ffff) | (UInt64(value32) << 32) }
            switch offset {
            case R.deviceFeaturesSelect: r.deviceFeaturesSelect = value32
            case R.driverFeaturesSelect: r.driverFeaturesSelect = value32
            case R.driverFeatures:
                // §3.1.1: features are written before FEATURES_OK; later writes are ignored.
                guard r.status & Virtio.Status.featuresOK == 0, r.driverFeaturesSelect < 2 else { return }
                let shift = 32 * UInt64(r.driverFeaturesSelect)
                r.driverFeatures = (r.driverFeatures & ~(0xffff_ffff << shift)) | (UInt64(value32) << shift)
            case R.queueSelect: r.queueSelect = value32
            case R.queueSize:
                guard queueWritable else { return }
                r.queues[q].size = UInt16(truncatingIfNeeded: value32)
            case R.queueReady:
                guard q < r.queues.count, !r.active else { return }
                r.queues[q].ready = value32 & 1 == 1
            case R.queueDescLow: if queueWritable { r.queues[q].descriptorTable = setLow(r.queues[q].descriptorTable) }
            case R.queueDescHigh: if queueWritable { r.queues[q].descriptorTable = setHigh(r.queues[q].descriptorTable) }
            case R.queueDriverLow: if queueWritable { r.queues[q].availableRing = setLow(r.queues[q].availableRing) }
            case R.queueDriverHigh: if queueWritable { r.queues[q].availableRing = setHigh(r.queues[q].availableRing) }
            case R.queueDeviceLow: if queueWritable { r.queues[q].usedRing = setLow(r.queues[q].usedRing) }
            case R.queueDeviceHigh: if queueWritable { r.queues[q].usedRing = setHigh(r.queues[q].usedRing) }
            default: break
            }
        }
    }

    /// The device status state machine (§2.1, §3.1.1, §4.2.3.1).
    private func writeStatus(_ value: UInt32) {
        registers.withLock { r in
            if value == 0 {
                // §2.4: writing 0 resets the device; it reads back 0 once the reset is done,
                // which is when this write returns (device.reset() is synchronous).
                if r.active { device.reset() }
                let generation = r.configGeneration
                r = Registers(queues: device.queueMaxSizes.map { QueueRegisters(size: $0) })
                r.configGeneration = generation
                interrupt.reset()
                return
            }
            // The driver only ever adds bits (§2.1.2); anything else is ignored.
            var new = r.status | value
            if new & Virtio.Status.featuresOK != 0 && r.status & Virtio.Status.featuresOK == 0 {
                // §2.2.1 / §6.1: only offered features, and VERSION_1 is mandatory on this
                // modern-only transport; otherwise FEATURES_OK does not stick (§3.1.1 step 6).
                let acceptable = r.driverFeatures & ~offeredFeatures == 0 && r.driverFeatures & Virtio.Feature.version1 != 0
                if !acceptable { new &= ~Virtio.Status.featuresOK }
            }
            let goingLive = new & Virtio.Status.driverOK != 0 && r.status & Virtio.Status.driverOK == 0
            r.status = new
            guard goingLive, !r.active else { return }
            guard new & Virtio.Status.featuresOK != 0 else {
                interrupt.markNeedsReset()
                return
            }
            let features = r.driverFeatures
            var queues: [SplitVirtqueue?] = []
            for (index, q) in r.queues.enumerated() {
                guard q.ready else {
                    queues.append(nil)
                    continue
                }
                let layout = VirtqueueLayout(
                    size: q.size, descriptorTable: q.descriptorTable, availableRing: q.availableRing,
                    usedRing: q.usedRing)
                if layout.problem(maxSize: device.queueMaxSizes[index], memory: memory) != nil {
                    interrupt.markNeedsReset()
                    return
                }
                queues.append(
                    SplitVirtqueue(
                        layout: layout, memory: memory, eventIndex: features & Virtio.Feature.eventIndex != 0,
                        indirect: features & Virtio.Feature.indirectDescriptors != 0))
            }
            do {
                try device.activate(VirtioActivation(features: features, queues: queues, notifyFDs: notifyFDs, interrupt: interrupt))
                r.active = true
            } catch {
                // It may have started part of its work (a queue's watch registered before the
                // next one failed): stop it now. The driver's later reset does not reach a device
                // that never went active, and a second activation would run beside the first.
                device.reset()
                interrupt.markNeedsReset()
            }
        }
    }
}
