import CKVM

/// One CPUID leaf/subleaf as KVM describes it (`struct kvm_cpuid_entry2`, api.rst 4.46).
public struct CPUIDEntry: Sendable, Equatable {
    public var function: UInt32
    public var index: UInt32
    public var flags: UInt32
    public var eax: UInt32
    public var ebx: UInt32
    public var ecx: UInt32
    public var edx: UInt32

    /// KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the subleaf (ECX input) selects this entry.
    public static let significantIndex: UInt32 = 1

    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0, eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0)
    {
        self.function = function
        self.index = index
        self.flags = flags
        self.eax = eax
        self.ebx = ebx
        self.ecx = ecx
        self.edx = edx
    }

    init(_ raw: kvm_cpuid_entry2) {
        self.init(function: raw.function, index: raw.index, flags: raw.flags, eax: raw.eax, ebx: raw.ebx, ecx: raw.ecx, edx: raw.edx)
    }

    var raw: kvm_cpuid_entry2 {
        var entry = kvm_cpuid_entry2()
        entry.function = function
        entry.index = index
        entry.flags = flags
        entry.eax = eax
        entry.ebx = ebx
        entry.ecx = ecx
        entry.edx = edx
        return entry
    }
}

/// Turns the host's supported CPUID into what one vCPU of an N-vCPU MicroVm sees: one
/// package, N cores, one thread per core, APIC id = vCPU index; features this host's
/// emulator lacks are hidden. Leaf numbers and bit positions are from the Intel SDM vol. 2A,
/// "CPUID—CPU Identification".
public enum CPUIDTemplate {
    // Leaf 1 ECX
    static let ecxCX16: UInt32 = 1 << 13
    static let ecxFMA: UInt32 = 1 << 12
    static let ecxXSAVE: UInt32 = 1 << 26
    static let ecxOSXSAVE: UInt32 = 1 << 27
    static let ecxAVX: UInt32 = 1 << 28
    static let ecxF16C: UInt32 = 1 << 29
    static let ecxHypervisor: UInt32 = 1 << 31
    // Leaf 1 EDX
    static let edxHTT: UInt32 = 1 << 28
    // Leaf 7.0 EBX: AVX2 (5) and the AVX-512 family (16, 17, 21, 26, 27, 28, 30, 31), all of
    // which need XSAVE-managed state.
    static let leaf7EBXNeedsXSAVE: UInt32 =
        (1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27)
        | (1 << 28) | (1 << 30) | (1 << 31)
    // Leaf 7.0 ECX: AVX512_VBMI (1), AVX512_VBMI2 (6), VAES (9), VPCLMULQDQ (10),
    // AVX512_VNNI (11), AVX512_BITALG (12), AVX512_VPOPCNTDQ (14).
    static let leaf7ECXNeedsXSAVE: UInt32 = (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14)
    // Leaf 7.0 EDX: AVX512_4VNNIW (2), AVX512_4FMAPS (3), AMX (22, 24, 25), AVX512_FP16 (23).
    static let leaf7EDXNeedsXSAVE: UInt32 = (1 << 2) | (1 << 3) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25)
    /// KVM's paravirtual feature leaf (Documentation/virt/kvm/x86/cpuid.rst: KVM_CPUID_FEATURES
    /// = 0x40000001, features in EAX).
    static let kvmFeatureLeaf: UInt32 = 0x4000_0001
    // KVM_CPUID_FEATURES EAX bits whose guest side issues VMCALL (hypercalls.rst):
    // PV_UNHALT (7) → KVM_HC_KICK_CPU, PV_SEND_IPI (11) → KVM_HC_SEND_IPI, PV_SCHED_YIELD (13)
    // → KVM_HC_SCHED_YIELD, HC_MAP_GPA_RANGE (16) → KVM_HC_MAP_GPA_RANGE. This host's
    // emulator never completes a VMCALL (../shared/DESIGN.md), so a guest that uses any of
    // them hangs: Linux 6.1 with PV_SEND_IPI sends every IPI by VMCALL, and its first AP
    // stops in smp_callin() on the first IPI it sends. The MSR-based features (kvmclock,
    // async PF, steal time, PV EOI, poll control) stay; qemu's default CPU models (qemu64)
    // do not offer these four either, which is why SMP Linux comes up under qemu here.
    static let kvmFeaturesNeedingHypercall: UInt32 = (1 << 7) | (1 << 11) | (1 << 13) | (1 << 16)

    /// Number of bits needed for `count` distinct ids (ceil(log2(count))).
    static func idBits(_ count: Int) -> UInt32 {
        var bits: UInt32 = 0
        while (1 << bits) < count { bits += 1 }
        return bits
    }

    /// The CPUID for vCPU `index` of `count`.
    public static func configure(_ supported: [CPUIDEntry], index: Int, count: Int) -> [CPUIDEntry] {
        let apicID = UInt32(truncatingIfNeeded: index)
        let total = UInt32(truncatingIfNeeded: count)
        var result: [CPUIDEntry] = []
        result.reserveCapacity(supported.count + 3)
        var sawLeafB = false
        for var entry in supported {
            switch entry.function {
            case 0x1:
                // EBX[31:24] initial APIC id, EBX[23:16] addressable logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apicID << 24) | ((min(total, 255) & 0xff) << 16)
                entry.ecx &= ~(ecxCX16 | ecxXSAVE | ecxOSXSAVE | ecxAVX | ecxFMA | ecxF16C)
                entry.ecx |= ecxHypervisor
                if count > 1 { entry.edx |= edxHTT } else { entry.edx &= ~edxHTT }
            case 0x4:
                // Deterministic cache parameters: EAX[31:26] = cores per package - 1,
                // EAX[25:14] = logical processors sharing this cache - 1 (0 for L1/L2, which
                // are per core; all for L3).
                let level = (entry.eax >> 5) & 0x7
                let cores = min(total, 64) - 1
                let sharing: UInt32 = level >= 3 ? min(total, 4096) - 1 : 0
                entry.eax = (entry.eax & 0x3fff) | (cores << 26) | (sharing << 14)
            case 0x7 where entry.index == 0:
                entry.ebx &= ~leaf7EBXNeedsXSAVE
                entry.ecx &= ~leaf7ECXNeedsXSAVE
                entry.edx &= ~leaf7EDXNeedsXSAVE
            case 0xb:
                // Replaced below by a topology matching this VM.
                sawLeafB = true
                continue
            case 0x1f:
                // V2 extended topology would describe the host; leaf 0xB is enough.
                continue
            case 0xd:
                // XSAVE is hidden in leaf 1, so no state component may be advertised either.
                entry.eax = 0
                entry.ebx = 0
                entry.ecx = 0
                entry.edx = 0
            case kvmFeatureLeaf:
                entry.eax &= ~kvmFeaturesNeedingHypercall
            case 0x8000_0001:
                // AMD: CMP_LEGACY (ECX bit 1) and extended APIC space / topology hints would
                // contradict the Intel-style topology; clear CMP_LEGACY.
                entry.ecx &= ~UInt32(1 << 1)
            default:
                break
            }
            result.append(entry)
        }
        if sawLeafB || supported.contains(where: { $0.function == 0 && $0.eax >= 0xb }) {
            // Leaf 0xB (extended topology): subleaf 0 = SMT level (1 thread per core), subleaf
            // 1 = core level (all vCPUs), subleaf 2 terminates. EAX[4:0] = bits to shift the
            // x2APIC id right to reach the next level; ECX[15:8] = level type (1 SMT, 2 core);
            // EDX = this processor's x2APIC id.
            let flags = CPUIDEntry.significantIndex
            result.append(CPUIDEntry(function: 0xb, index: 0, flags: flags, eax: 0, ebx: 1, ecx: (1 << 8) | 0, edx: apicID))
            result.append(
                CPUIDEntry(
                    function: 0xb, index: 1, flags: flags, eax: idBits(count), ebx: total & 0xffff,
                    ecx: (2 << 8) | 1, edx: apicID))
            result.append(CPUIDEntry(function: 0xb, index: 2, flags: flags, eax: 0, ebx: 0, ecx: 2, edx: apicID))
        }
        return result
    }
}
