import CLinux
import Glibc
import Protocol
import SystemPackage

/// An x86_64 KVM MicroVm built from a ``VMConfig``: guest memory, the loaded kernel, the
/// in-kernel IRQ chip and PIT, the legacy devices, and one thread per vCPU.
///
/// Lifecycle: `init` builds everything (and fails with a clear error); ``start()`` runs the
/// vCPUs; ``pause()``/``resume()``; the VM ends on ``requestShutdown()``, a guest reset or
/// power-off, or a failure. Learn that it ended with ``waitForExit()`` (blocking, from a
/// dedicated thread) or by watching ``exitEventFD`` in an epoll loop, then ``exitReason``.
///
/// Sendable: every stored property is an immutable reference to a Sendable object.
public final class MicroVM: Sendable {
    public let name: String
    public let vcpuCount: Int
    public let memory: GuestMemory
    public let vm: VirtualMachine
    public let bootInfo: BootInfo
    public let serial: Serial8250
    public let i8042: I8042
    /// The transports of the slots after the NICs (consoles, balloon, rng), which never change.
    let fixedTransports: [VirtioMMIOTransport]
    /// The disk and NIC slots (0–5), whose transports QMP plugs and unplugs.
    public let replaceableSlots: [ReplaceableSlot]
    /// The virtio-mmio transports with a device now, in slot order.
    public var virtioTransports: [VirtioMMIOTransport] {
        replaceableSlots.compactMap(\.transport) + fixedTransports
    }
    let ports: PortIOBus
    let mmio: MMIOBus
    let supportedCPUID: [CPUIDEntry]
    let control: MachineControl

    /// Builds the VM. `serialOutput` receives the guest's ttyS0 output (nil discards it);
    /// `virtioSlots` are announced on the kernel command line; `virtioDevices` fill some of
    /// them (the others read as empty slots). Disk images are opened (and locked) here, so a
    /// bad image is a start-up error.
    public init(
        config: VMConfig, serialOutput: FileDescriptor?, virtioSlots: [VirtioMMIOSlot] = [],
        virtioDevices: [VirtioDeviceSpec] = []
    ) throws {
        let machine = config.machine
        name = config.name ?? "flotilla"
        guard (1...MPTable.maxVCPUs).contains(machine.vcpuCount) else {
            throw MachineError(
                .invalidConfig, "machine-config vcpu_count \(machine.vcpuCount) is out of range: 1 to \(MPTable.maxVCPUs) are allowed")
        }
        guard virtioSlots.count <= Layout.virtioMaxSlots else {
            throw MachineError(
                .invalidConfig, "\(virtioSlots.count) virtio-mmio devices requested; at most \(Layout.virtioMaxSlots) fit the legacy IRQs")
        }
        vcpuCount = machine.vcpuCount
        control = try MachineControl()

        let system = try KVMSystem()
        let maxVCPUs = try system.maxVCPUs()
        guard vcpuCount <= maxVCPUs else {
            throw MachineError(.invalidConfig, "machine-config vcpu_count \(vcpuCount) exceeds this host's KVM limit of \(maxVCPUs)")
        }
        supportedCPUID = try system.supportedCPUID()
        vm = try system.createVM()
        try vm.setTSSAddress(Layout.tssAddress)
        try vm.setIdentityMapAddress(Layout.identityMapAddress)
        try vm.createIRQChip()
        try vm.createPIT2()

        memory = try GuestMemory(
            size: machine.memoryBytes,
            options: GuestMemoryOptions(memPath: machine.memPath, shared: machine.memShare, dumpable: machine.dumpGuestCore))
        try vm.register(memory)

        let kernel = try FileImage(path: config.boot.kernelImagePath)
        let initrd = try config.boot.initrdPath.map { try FileImage(path: $0) }
        bootInfo = try BootLoader.load(
            kernel: kernel, initrd: initrd, arguments: config.boot.bootArgs, slots: virtioSlots,
            vcpus: vcpuCount, memory: memory)

        serial = Serial8250(output: serialOutput?.rawValue, interrupt: InterruptLine(irq: Layout.serialIRQ, vm: vm))
        let control = self.control
        i8042 = I8042(onReset: { control.stop(.guestReset) })
        var ports = PortIOBus()
        ports.register(.serial(serial), start: Layout.serialPortBase, count: 8)
        ports.register(.i8042(i8042), start: Layout.i8042DataPort, count: 1)
        ports.register(.i8042(i8042), start: Layout.i8042CommandPort, count: 1)
        self.ports = ports
        var mmio = MMIOBus()
        var transports: [VirtioMMIOTransport] = []
        var replaceable: [ReplaceableSlot] = []
        for (index, slot) in virtioSlots.enumerated() {
            let specs = virtioDevices.filter { $0.slot == index }
            guard specs.count <= 1 else {
                throw MachineError(.invalidConfig, "\(specs.count) devices assigned to virtio-mmio slot \(index)")
            }
            var transport: VirtioMMIOTransport?
            if let spec = specs.first {
                transport = try VirtioMMIOTransport(slot: slot, device: spec.makeDevice(memory: memory), memory: memory, vm: vm)
            }
            // Disk and NIC slots take hot-plugged devices (and give up cold-plugged ones).
            if index < VirtioPlan.nicSlots.upperBound {
                let holder = ReplaceableSlot(index: index)
                if let transport { _ = holder.plug(transport) }
                replaceable.append(holder)
                mmio.register(.replaceable(holder), base: slot.base, size: slot.size)
            } else if let transport {
                transports.append(transport)
                mmio.register(.virtio(transport), base: slot.base, size: slot.size)
            } else {
                mmio.register(.emptySlot, base: slot.base, size: slot.size)
            }
        }
        for spec in virtioDevices where spec.slot < 0 || spec.slot >= virtioSlots.count {
            throw MachineError(.invalidConfig, "a device is assigned to virtio-mmio slot \(spec.slot), which is not announced")
        }
        fixedTransports = transports
        replaceableSlots = replaceable
        self.mmio = mmio
    }

    deinit {
        // Threads hold their own references to what they use; make sure they end.
        control.stop(.requested)
    }

    /// Starts one thread per vCPU (named `<name>-vcpu<N>`), each creating and configuring
    /// its vCPU; returns once all are set up and running, or throws the first set-up error.
    public func start() throws {
        let alreadyStarted = control.lock.withLock { s -> Bool in
            if s.phase != .created { return true }
            return false
        }
        if alreadyStarted { throw MachineError(.state, "the VM was already started") }
        control.prepare(vcpus: vcpuCount)
        for index in 0..<vcpuCount {
            do {
                try NativeThread.spawn(name: NativeThread.vcpuThreadName(vmName: name, index: index)) { [self] in
                    vcpuThreadMain(index)
                }
            } catch {
                // Threads already started see the failure and stop; the ones never started
                // count as ended so that the VM can finish.
                let message = "cannot start the thread of vCPU \(index): \(error)"
                _ = control.reportReadyAndWait(index, failure: message)
                for missing in index..<vcpuCount { control.vcpuExited(missing, reason: .failed(message)) }
                _ = control.awaitReadyAndGo()
                throw MachineError(.startFailed, "cannot start vCPU \(index)", cause: error)
            }
        }
        if let failure = control.awaitReadyAndGo() {
            throw MachineError(.startFailed, "vCPU set-up failed: \(failure)")
        }
    }

    private func vcpuThreadMain(_ index: Int) {
        _ = fl_unblock_signal(NativeThread.kickSignal)
        control.registerThread(index)
        let vcpu: VirtualCPU
        do {
            vcpu = try vm.createVCPU(index: index)
            control.registerVCPU(vcpu)
            let cpuid = CPUIDTemplate.configure(supportedCPUID, index: index, count: vcpuCount)
            try VCPUSetup.configureCommon(vcpu, cpuid: cpuid)
            if index == 0 {
                try VCPUSetup.configureBootProcessor(vcpu, entry: bootInfo.entry)
            }
            // Application processors keep KVM's reset state (KVM_MP_STATE_UNINITIALIZED with
            // the in-kernel LAPIC) and wait for the guest's INIT–SIPI–SIPI.
        } catch {
            let message = "vCPU \(index) set-up: \(error)"
            _ = control.reportReadyAndWait(index, failure: message)
            control.vcpuExited(index, reason: .failed(message))
            return
        }
        guard control.reportReadyAndWait(index, failure: nil) else {
            control.vcpuExited(index, reason: nil)
            return
        }
        let runner = VCPURunner(vcpu: vcpu, ports: ports, mmio: mmio, memory: memory, control: control)
        let reason = runner.run()
        control.vcpuExited(index, reason: reason)
    }

    /// Stops every vCPU outside KVM_RUN; returns when all are parked.
    public func pause() throws { try control.pause() }

    /// Lets paused vCPUs run again.
    public func resume() throws { try control.resume() }

    /// Ends the VM (reason ``VMExitReason/requested`` unless it already ended otherwise).
    /// Returns at once; use ``waitForExit()`` or ``exitEventFD`` to learn when it is over.
    public func requestShutdown() { control.stop(.requested) }

    /// Blocks the calling thread until every vCPU thread has ended.
    public func waitForExit() -> VMExitReason { control.waitForExit() }

    /// Like ``waitForExit()`` with a time limit; nil if the VM is still running.
    public func waitForExit(timeoutNanoseconds: UInt64) -> VMExitReason? {
        control.waitForExit(timeoutNanoseconds: timeoutNanoseconds)
    }

    /// Non-blocking: the reason once the VM has ended, else nil.
    public var exitReason: VMExitReason? { control.reason }

    /// An eventfd (EFD_NONBLOCK) that becomes readable when the VM has ended. Owned by the VM.
    public var exitEventFD: FileDescriptor { FileDescriptor(rawValue: control.exitEventFD) }

    /// Each vCPU's kernel thread id (an entry in /proc/PID/task), nil before it started.
    public var vcpuThreadIDs: [Int32?] { control.threadIDs }

    /// For QMP `query-status`.
    public var guestState: GuestState { control.guestState }

    /// The virtio-vsock device, when the VM has one.
    public var vsock: VirtioVsockDevice? {
        virtioTransports.lazy.compactMap { $0.device as? VirtioVsockDevice }.first
    }

    /// The virtio-balloon device and its transport, when the VM has one.
    public var balloon: (device: VirtioBalloonDevice, transport: VirtioMMIOTransport)? {
        for transport in virtioTransports {
            if let device = transport.device as? VirtioBalloonDevice { return (device, transport) }
        }
        return nil
    }

    /// Sets the balloon's target (num_pages) and, when it changed, tells the driver (§5.5.6.2:
    /// a configuration change). False without a balloon.
    @discardableResult
    public func setBalloonTarget(pages: UInt32) -> Bool {
        guard let balloon else { return false }
        if balloon.device.setTarget(pages: pages) { balloon.transport.configurationChanged() }
        return true
    }

    /// Hot-plug: wires a transport for `device` into the empty replaceable slot `index` (KVM
    /// irqfd and ioeventfds first, then the slot, so the guest's first access finds it
    /// complete). Throws if the slot is not replaceable or not empty.
    public func plug(_ device: any VirtioDevice, slot index: Int) throws -> VirtioMMIOTransport {
        guard replaceableSlots.indices.contains(index) else {
            throw MachineError(.invalidConfig, "virtio-mmio slot \(index) does not take hot-plugged devices")
        }
        let holder = replaceableSlots[index]
        guard holder.transport == nil else { throw MachineError(.state, "virtio-mmio slot \(index) is occupied") }
        let transport = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: index), device: device, memory: memory, vm: vm)
        guard holder.plug(transport) else {
            transport.detach()
            throw MachineError(.state, "virtio-mmio slot \(index) is occupied")
        }
        return transport
    }

    /// Hot-unplug: empties slot `index` (guest reads see an empty slot from here on), then
    /// resets the device and unwires it from KVM. Returns what was plugged.
    @discardableResult
    public func unplug(slot index: Int) -> VirtioMMIOTransport? {
        guard replaceableSlots.indices.contains(index), let transport = replaceableSlots[index].unplug() else { return nil }
        transport.detach()
        return transport
    }

    /// Host input for the guest's serial port; returns how many bytes were accepted.
    @discardableResult
    public func enqueueSerialInput(_ bytes: some Collection<UInt8>) -> Int { serial.enqueueInput(bytes) }
}
