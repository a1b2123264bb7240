import CKVM
import Glibc
import SystemPackage

/// A KVM vCPU: its file descriptor, the mmap'ed `struct kvm_run`, and the vCPU ioctls.
///
/// `@unchecked Sendable`: the stored properties are immutable; the ioctls are only issued by
/// the vCPU's own thread (the thread that created it, as KVM requires). The one operation
/// other threads perform is ``setImmediateExit(_:)``, an atomic byte store into kvm_run that
/// KVM documents for exactly this purpose (api.rst, "immediate_exit"). The mapping and the
/// descriptor are released only in `deinit`, when no thread can hold the object any more.
public final class VirtualCPU: @unchecked Sendable {
    public let index: Int
    let fd: Int32
    let run: UnsafeMutablePointer<kvm_run>
    let runSize: Int

    init(index: Int, fd: Int32, run: UnsafeMutableRawPointer, runSize: Int) {
        self.index = index
        self.fd = fd
        self.run = run.bindMemory(to: kvm_run.self, capacity: 1)
        self.runSize = runSize
    }

    deinit {
        _ = Glibc.munmap(UnsafeMutableRawPointer(run), runSize)
        Syscall.close(fd)
    }

    /// KVM_RUN (api.rst 4.10), never retried here: EINTR means "kicked", EAGAIN means an AP
    /// received INIT/SIPI; the caller decides. Returns 0 or the negated errno.
    @inline(__always)
    func runOnce() -> Int32 {
        let result = fl_ioctl_val(fd, FL_KVM_RUN, 0)
        return result < 0 ? -Glibc.errno : result
    }

    /// Makes the next (or current, once a signal interrupts it) KVM_RUN return EINTR at once.
    @inline(__always)
    func setImmediateExit(_ on: Bool) {
        fl_run_set_immediate_exit(run, on ? 1 : 0)
    }

    // MARK: State ioctls

    private func get<T>(_ name: StaticString, _ request: UInt, _ initial: T) throws -> T {
        var value = initial
        do {
            _ = try withUnsafeMutablePointer(to: &value) { pointer throws(SyscallError) in
                try Syscall.retrying(name) { fl_ioctl_ptr(fd, request, pointer) }
            }
        } catch {
            throw KVMError(.ioctl, "vCPU \(index) state read failed", cause: error)
        }
        return value
    }

    private func set<T>(_ name: StaticString, _ request: UInt, _ value: T) throws {
        var copy = value
        do {
            _ = try withUnsafeMutablePointer(to: &copy) { pointer throws(SyscallError) in
                try Syscall.retrying(name) { fl_ioctl_ptr(fd, request, pointer) }
            }
        } catch {
            throw KVMError(.ioctl, "vCPU \(index) state write failed", cause: error)
        }
    }

    public func getRegisters() throws -> kvm_regs { try get("KVM_GET_REGS", FL_KVM_GET_REGS, kvm_regs()) }
    public func setRegisters(_ regs: kvm_regs) throws { try set("KVM_SET_REGS", FL_KVM_SET_REGS, regs) }
    public func getSpecialRegisters() throws -> kvm_sregs { try get("KVM_GET_SREGS", FL_KVM_GET_SREGS, kvm_sregs()) }
    public func setSpecialRegisters(_ sregs: kvm_sregs) throws { try set("KVM_SET_SREGS", FL_KVM_SET_SREGS, sregs) }
    public func getFPU() throws -> kvm_fpu { try get("KVM_GET_FPU", FL_KVM_GET_FPU, kvm_fpu()) }
    public func setFPU(_ fpu: kvm_fpu) throws { try set("KVM_SET_FPU", FL_KVM_SET_FPU, fpu) }
    public func getLAPIC() throws -> kvm_lapic_state { try get("KVM_GET_LAPIC", FL_KVM_GET_LAPIC, kvm_lapic_state()) }
    public func setLAPIC(_ lapic: kvm_lapic_state) throws { try set("KVM_SET_LAPIC", FL_KVM_SET_LAPIC, lapic) }

    /// KVM_GET_MP_STATE / KVM_SET_MP_STATE (api.rst 4.38, 4.39), e.g. KVM_MP_STATE_RUNNABLE.
    public func getMPState() throws -> UInt32 {
        try get("KVM_GET_MP_STATE", FL_KVM_GET_MP_STATE, kvm_mp_state()).mp_state
    }
    public func setMPState(_ state: UInt32) throws {
        var value = kvm_mp_state()
        value.mp_state = state
        try set("KVM_SET_MP_STATE", FL_KVM_SET_MP_STATE, value)
    }

    /// KVM_SET_CPUID2 (api.rst 4.73). Must come before KVM_SET_SREGS on this host (a CR4 the
    /// CPUID does not allow is rejected).
    public func setCPUID(_ entries: [CPUIDEntry]) throws {
        let raw = entries.map(\.raw)
        let rc = raw.withUnsafeBufferPointer { fl_kvm_set_cpuid2(fd, $0.baseAddress, UInt32($0.count)) }
        if rc < 0 {
            throw KVMError(
                .ioctl, "vCPU \(index): KVM_SET_CPUID2 with \(entries.count) entries failed",
                cause: SyscallError("KVM_SET_CPUID2", Errno(rawValue: Glibc.errno)))
        }
    }

    /// KVM_SET_MSRS (api.rst 4.19); fails naming the first MSR KVM did not accept.
    public func setMSRs(_ msrs: [(index: UInt32, value: UInt64)]) throws {
        var raw = [kvm_msr_entry]()
        raw.reserveCapacity(msrs.count)
        for msr in msrs {
            var entry = kvm_msr_entry()
            entry.index = msr.index
            entry.data = msr.value
            raw.append(entry)
        }
        let rc = raw.withUnsafeBufferPointer { fl_kvm_set_msrs(fd, $0.baseAddress, UInt32($0.count)) }
        if rc < 0 {
            throw KVMError(
                .ioctl, "vCPU \(index): KVM_SET_MSRS failed",
                cause: SyscallError("KVM_SET_MSRS", Errno(rawValue: Glibc.errno)))
        }
        // The ioctl returns how many MSRs it set, stopping at the first it rejects.
        if Int(rc) < msrs.count {
            throw KVMError(.ioctl, "vCPU \(index): KVM rejected MSR \(hex(msrs[Int(rc)].index)) = \(hex(msrs[Int(rc)].value))")
        }
    }

    /// KVM_GET_MSRS for the given indices.
    public func getMSRs(_ indices: [UInt32]) throws -> [UInt64] {
        var raw = indices.map { index -> kvm_msr_entry in
            var entry = kvm_msr_entry()
            entry.index = index
            return entry
        }
        let rc = raw.withUnsafeMutableBufferPointer { fl_kvm_get_msrs(fd, $0.baseAddress, UInt32($0.count)) }
        if rc < 0 {
            throw KVMError(
                .ioctl, "vCPU \(index): KVM_GET_MSRS failed",
                cause: SyscallError("KVM_GET_MSRS", Errno(rawValue: Glibc.errno)))
        }
        return raw.prefix(Int(rc)).map(\.data)
    }
}
