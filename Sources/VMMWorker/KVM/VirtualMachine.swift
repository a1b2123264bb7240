import CKVM
import Glibc
import SystemPackage

/// A KVM virtual machine file descriptor and its VM-wide ioctls.
///
/// Sendable: immutable descriptor plus an immutable reference to the system handle; the
/// VM ioctls used here are safe to issue from any thread (api.rst 1. "General description":
/// only vCPU ioctls are bound to the creating thread).
public final class VirtualMachine: Sendable {
    let fd: Int32
    public let system: KVMSystem

    init(fd: Int32, system: KVMSystem) {
        self.fd = fd
        self.system = system
    }

    deinit { Syscall.close(fd) }

    private func vmIoctl(_ name: StaticString, _ request: UInt, _ value: UInt) throws {
        do {
            _ = try Syscall.retrying(name) { fl_ioctl_val(fd, request, value) }
        } catch {
            throw KVMError(.ioctl, "VM set-up failed", cause: error)
        }
    }

    private func vmIoctl<T>(_ name: StaticString, _ request: UInt, _ argument: inout T) throws {
        do {
            _ = try withUnsafeMutablePointer(to: &argument) { pointer throws(SyscallError) in
                try Syscall.retrying(name) { fl_ioctl_ptr(fd, request, pointer) }
            }
        } catch {
            throw KVMError(.ioctl, "VM ioctl failed", cause: error)
        }
    }

    /// KVM_SET_TSS_ADDR (api.rst 4.40): three pages of guest-physical space that are not RAM,
    /// needed by Intel hosts to emulate real mode.
    public func setTSSAddress(_ address: UInt64) throws {
        try vmIoctl("KVM_SET_TSS_ADDR", FL_KVM_SET_TSS_ADDR, UInt(address))
    }

    /// KVM_SET_IDENTITY_MAP_ADDR (api.rst 4.46): one page for the EPT identity map.
    public func setIdentityMapAddress(_ address: UInt64) throws {
        var value = address
        try vmIoctl("KVM_SET_IDENTITY_MAP_ADDR", FL_KVM_SET_IDENTITY_MAP_ADDR, &value)
    }

    /// KVM_CREATE_IRQCHIP (api.rst 4.24): in-kernel PIC, IOAPIC and per-vCPU local APICs.
    /// Must precede vCPU creation.
    public func createIRQChip() throws {
        try vmIoctl("KVM_CREATE_IRQCHIP", FL_KVM_CREATE_IRQCHIP, 0)
    }

    /// KVM_CREATE_PIT2 (api.rst 4.64): the in-kernel i8254 on ports 0x40–0x43. The speaker
    /// port 0x61 is emulated too unless KVM_PIT_SPEAKER_DUMMY is given; we keep it real.
    public func createPIT2() throws {
        var config = kvm_pit_config()
        config.flags = 0
        try vmIoctl("KVM_CREATE_PIT2", FL_KVM_CREATE_PIT2, &config)
    }

    /// KVM_SET_USER_MEMORY_REGION (api.rst 4.35).
    public func setUserMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64, hostAddress: UInt64, readOnly: Bool = false) throws {
        var region = kvm_userspace_memory_region()
        region.slot = slot
        region.flags = readOnly ? UInt32(KVM_MEM_READONLY) : 0
        region.guest_phys_addr = guestAddress
        region.memory_size = size
        region.userspace_addr = hostAddress
        try vmIoctl("KVM_SET_USER_MEMORY_REGION", FL_KVM_SET_USER_MEMORY_REGION, &region)
    }

    /// Maps all of `memory`'s regions into the guest, slot i for region i.
    public func register(_ memory: GuestMemory) throws {
        for (index, region) in memory.regions.enumerated() {
            try setUserMemoryRegion(
                slot: UInt32(index), guestAddress: region.guestAddress, size: region.size,
                hostAddress: memory.hostAddress(of: region))
        }
    }

    /// KVM_IRQ_LINE (api.rst 4.25): drive GSI `irq` to `level` on the in-kernel PIC/IOAPIC.
    @inline(__always)
    public func setIRQLine(_ irq: UInt32, level: Bool) throws(SyscallError) {
        var line = kvm_irq_level()
        line.irq = irq
        line.level = level ? 1 : 0
        _ = try withUnsafeMutablePointer(to: &line) { pointer throws(SyscallError) in
            try Syscall.retrying("KVM_IRQ_LINE") { fl_ioctl_ptr(fd, FL_KVM_IRQ_LINE, pointer) }
        }
    }

    /// An edge on `irq`: raise then lower. ISA interrupts are edge-triggered on the PIC and, per
    /// the MP table's "conforms to bus" flags, on the IOAPIC, so the pulse delivers exactly one.
    public func pulseIRQ(_ irq: UInt32) throws(SyscallError) {
        try setIRQLine(irq, level: true)
        try setIRQLine(irq, level: false)
    }

    /// Where an ioeventfd listens (api.rst 4.59 KVM_IOEVENTFD).
    public enum IOEventSpace: Sendable {
        case mmio
        case pio
    }

    /// KVM_IOEVENTFD: signal `eventFD` when the guest writes `length` bytes (1, 2, 4, 8; 0 =
    /// any) at `address`, optionally only when the value equals `datamatch`.
    public func registerIOEventFD(_ eventFD: Int32, space: IOEventSpace, address: UInt64, length: UInt32, datamatch: UInt64? = nil) throws {
        try ioEventFD(eventFD, space: space, address: address, length: length, datamatch: datamatch, deassign: false)
    }

    public func unregisterIOEventFD(_ eventFD: Int32, space: IOEventSpace, address: UInt64, length: UInt32, datamatch: UInt64? = nil) throws
    {
        try ioEventFD(eventFD, space: space, address: address, length: length, datamatch: datamatch, deassign: true)
    }

    private func ioEventFD(_ eventFD: Int32, space: IOEventSpace, address: UInt64, length: UInt32, datamatch: UInt64?, deassign: Bool)
        throws
    {
        var request = kvm_ioeventfd()
        request.addr = address
        request.len = length
        request.fd = eventFD
        var flags: UInt32 = 0
        if space == .pio { flags |= UInt32(1) << UInt32(kvm_ioeventfd_flag_nr_pio) }
        if let datamatch {
            request.datamatch = datamatch
            flags |= UInt32(1) << UInt32(kvm_ioeventfd_flag_nr_datamatch)
        }
        if deassign { flags |= UInt32(1) << UInt32(kvm_ioeventfd_flag_nr_deassign) }
        request.flags = flags
        try vmIoctl("KVM_IOEVENTFD", FL_KVM_IOEVENTFD, &request)
    }

    /// KVM_IRQFD (api.rst 4.75): a write to `eventFD` injects GSI `gsi`. With `resampleFD`
    /// the line is level-triggered and `resampleFD` is signalled on EOI.
    public func registerIRQFD(_ eventFD: Int32, gsi: UInt32, resampleFD: Int32? = nil) throws {
        var request = kvm_irqfd()
        request.fd = UInt32(bitPattern: eventFD)
        request.gsi = gsi
        if let resampleFD {
            request.flags = UInt32(KVM_IRQFD_FLAG_RESAMPLE)
            request.resamplefd = UInt32(bitPattern: resampleFD)
        }
        try vmIoctl("KVM_IRQFD", FL_KVM_IRQFD, &request)
    }

    public func unregisterIRQFD(_ eventFD: Int32, gsi: UInt32) throws {
        var request = kvm_irqfd()
        request.fd = UInt32(bitPattern: eventFD)
        request.gsi = gsi
        request.flags = UInt32(KVM_IRQFD_FLAG_DEASSIGN)
        try vmIoctl("KVM_IRQFD", FL_KVM_IRQFD, &request)
    }

    /// KVM_CREATE_VCPU (api.rst 4.7) plus the kvm_run mapping. Call it on the thread that
    /// will run the vCPU: vCPU ioctls belong to the creating thread.
    public func createVCPU(index: Int) throws -> VirtualCPU {
        let vcpuFD: Int32
        do {
            vcpuFD = try Syscall.retrying("KVM_CREATE_VCPU") { fl_ioctl_val(fd, FL_KVM_CREATE_VCPU, UInt(index)) }
        } catch {
            throw KVMError(.ioctl, "cannot create vCPU \(index)", cause: error)
        }
        let size: Int
        do {
            size = try system.vcpuMmapSize()
        } catch {
            Syscall.close(vcpuFD)
            throw KVMError(.ioctl, "cannot size kvm_run of vCPU \(index)", cause: error)
        }
        let mapped = Glibc.mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpuFD, 0)
        guard let mapped, mapped != MAP_FAILED else {
            let code = Errno(rawValue: Glibc.errno)
            Syscall.close(vcpuFD)
            throw KVMError(.mmap, "cannot map kvm_run of vCPU \(index)", cause: SyscallError("mmap", code))
        }
        return VirtualCPU(index: index, fd: vcpuFD, run: mapped, runSize: size)
    }
}
