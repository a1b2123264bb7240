import Synchronization

/// One legacy interrupt line of the in-kernel PIC/IOAPIC, driven by a device.
///
/// Sendable: immutable references plus an atomic counter.
public final class InterruptLine: Sendable {
    public let irq: UInt32
    let vm: VirtualMachine?
    private let pulses = Atomic<Int>(0)

    /// `vm == nil` gives a line that only counts (unit tests).
    public init(irq: UInt32, vm: VirtualMachine?) {
        self.irq = irq
        self.vm = vm
    }

    /// How many interrupts were signalled so far.
    public var pulseCount: Int { pulses.load(ordering: .relaxed) }

    /// Signals one edge-triggered interrupt (ISA lines are edge-triggered, MP spec 1.4
    /// Table 4-8 "conforms to bus"): the line is raised and lowered at once.
    public func pulse() {
        pulses.add(1, ordering: .relaxed)
        // A failing KVM_IRQ_LINE means the VM is going away; nothing useful to do here.
        try? vm?.pulseIRQ(irq)
    }
}
