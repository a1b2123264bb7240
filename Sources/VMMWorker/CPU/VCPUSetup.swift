import CKVM

/// Architectural state of a vCPU at the Linux 64-bit entry (boot.rst "64-bit Boot
/// Protocol"), and the per-vCPU set-up every vCPU gets (CPUID, MSRs, FPU, LAPIC).
enum VCPUSetup {
    // MSR numbers (Intel SDM vol. 4, "Model-Specific Registers").
    static let msrIA32TSC: UInt32 = 0x10
    static let msrSysenterCS: UInt32 = 0x174
    static let msrSysenterESP: UInt32 = 0x175
    static let msrSysenterEIP: UInt32 = 0x176
    static let msrMiscEnable: UInt32 = 0x1a0
    static let msrMTRRDefType: UInt32 = 0x2ff
    static let msrSTAR: UInt32 = 0xc000_0081
    static let msrLSTAR: UInt32 = 0xc000_0082
    static let msrCSTAR: UInt32 = 0xc000_0083
    static let msrSyscallMask: UInt32 = 0xc000_0084
    static let msrKernelGSBase: UInt32 = 0xc000_0102
    /// IA32_MISC_ENABLE bit 0: fast-string operations enabled.
    static let miscEnableFastStrings: UInt64 = 1

    // Control-register bits (SDM vol. 3A 2.5).
    static let cr0PE: UInt64 = 1 << 0
    static let cr0ET: UInt64 = 1 << 4
    static let cr0PG: UInt64 = 1 << 31
    static let cr4PAE: UInt64 = 1 << 5
    static let eferLME: UInt64 = 1 << 8
    static let eferLMA: UInt64 = 1 << 10

    // Local APIC registers (SDM vol. 3A 10.5.1): LVT LINT0 at 0x350, LINT1 at 0x360;
    // delivery mode is bits 8–10: ExtINT = 0b111, NMI = 0b100.
    static let lapicLINT0: Int = 0x350
    static let lapicLINT1: Int = 0x360
    static let deliveryExtINT: UInt32 = 0b111
    static let deliveryNMI: UInt32 = 0b100

    /// The MSRs Linux expects a boot loader / firmware to leave in a known state, as
    /// Firecracker sets them: SYSENTER/SYSCALL targets zero, TSC 0, fast strings on.
    static let bootMSRs: [(index: UInt32, value: UInt64)] = [
        (msrSysenterCS, 0), (msrSysenterESP, 0), (msrSysenterEIP, 0),
        (msrSTAR, 0), (msrCSTAR, 0), (msrKernelGSBase, 0), (msrSyscallMask, 0), (msrLSTAR, 0),
        (msrIA32TSC, 0),
        (msrMiscEnable, miscEnableFastStrings),
    ]

    /// Set-up shared by the BSP and the APs. CPUID goes first: KVM validates later state
    /// (CR4 in KVM_SET_SREGS, MSRs) against it.
    static func configureCommon(_ vcpu: VirtualCPU, cpuid: [CPUIDEntry]) throws {
        try vcpu.setCPUID(cpuid)
        try vcpu.setMSRs(bootMSRs)
        var fpu = kvm_fpu()
        fpu.fcw = 0x37f  // x87 default control word (FNINIT state)
        fpu.mxcsr = 0x1f80  // SSE default: all exceptions masked, round to nearest
        try vcpu.setFPU(fpu)
        var lapic = try vcpu.getLAPIC()
        withUnsafeMutableBytes(of: &lapic.regs) { regs in
            setDeliveryMode(regs, offset: lapicLINT0, mode: deliveryExtINT)
            setDeliveryMode(regs, offset: lapicLINT1, mode: deliveryNMI)
        }
        try vcpu.setLAPIC(lapic)
    }

    static func setDeliveryMode(_ regs: UnsafeMutableRawBufferPointer, offset: Int, mode: UInt32) {
        guard offset + 4 <= regs.count else { return }
        let value = regs.loadUnaligned(fromByteOffset: offset, as: UInt32.self)
        regs.storeBytes(of: (value & ~UInt32(0x700)) | (mode << 8), toByteOffset: offset, as: UInt32.self)
    }

    /// The BSP's registers for the 64-bit entry: long mode on the identity page tables, flat
    /// CS = 0x10 / data = 0x18 from the GDT, RSI = zero page, interrupts off.
    static func configureBootProcessor(_ vcpu: VirtualCPU, entry: UInt64) throws {
        var sregs = try vcpu.getSpecialRegisters()
        sregs.gdt.base = Layout.gdtAddress
        sregs.gdt.limit = UInt16(SystemTables.gdt.count * 8 - 1)
        sregs.idt.base = Layout.idtAddress
        sregs.idt.limit = 7
        sregs.cs = segment(selector: Layout.codeSelector)
        let data = segment(selector: Layout.dataSelector)
        sregs.ds = data
        sregs.es = data
        sregs.fs = data
        sregs.gs = data
        sregs.ss = data
        sregs.tr = segment(selector: Layout.tssSelector)
        sregs.cr3 = Layout.pml4Address
        sregs.cr4 = cr4PAE
        sregs.cr0 = cr0PE | cr0ET | cr0PG
        sregs.efer = eferLME | eferLMA
        try vcpu.setSpecialRegisters(sregs)

        var regs = kvm_regs()
        regs.rip = entry
        regs.rsi = Layout.zeroPageAddress
        regs.rsp = Layout.bootStackPointer
        regs.rbp = Layout.bootStackPointer
        regs.rflags = 0x2  // bit 1 is reserved and always 1; IF = 0
        try vcpu.setRegisters(regs)
    }

    /// A `kvm_segment` from the GDT entry at `selector`.
    static func segment(selector: UInt16) -> kvm_segment {
        let descriptor = SystemTables.gdt[Int(selector >> 3)]
        var segment = kvm_segment()
        segment.selector = selector
        segment.base = ((descriptor >> 16) & 0xff_ffff) | (((descriptor >> 56) & 0xff) << 24)
        let rawLimit = UInt32(truncatingIfNeeded: (descriptor & 0xffff) | (((descriptor >> 48) & 0xf) << 16))
        segment.g = UInt8((descriptor >> 55) & 1)
        // With G=1 the limit counts 4 KiB pages; KVM wants it in bytes.
        segment.limit = segment.g == 1 ? (rawLimit << 12) | 0xfff : rawLimit
        segment.type = UInt8((descriptor >> 40) & 0xf)
        segment.s = UInt8((descriptor >> 44) & 1)
        segment.dpl = UInt8((descriptor >> 45) & 3)
        segment.present = UInt8((descriptor >> 47) & 1)
        segment.avl = UInt8((descriptor >> 52) & 1)
        segment.l = UInt8((descriptor >> 53) & 1)
        segment.db = UInt8((descriptor >> 54) & 1)
        segment.unusable = segment.present == 0 ? 1 : 0
        return segment
    }
}
