/// The Intel MultiProcessor Specification 1.4 tables: the MP floating pointer structure
/// (chapter 4.1, Figure 4-2) and the MP configuration table (4.2, Table 4-2) with its base
/// entries (4.3, Table 4-3).
public struct MPTable: Sendable {
    public let floatingPointerAddress: UInt64
    public let floatingPointer: [UInt8]
    public let configAddress: UInt64
    public let config: [UInt8]

    // Entry types (Table 4-3) and sizes.
    static let processorEntry: UInt8 = 0
    static let busEntry: UInt8 = 1
    static let ioapicEntry: UInt8 = 2
    static let ioInterruptEntry: UInt8 = 3
    static let localInterruptEntry: UInt8 = 4
    static let headerSize = 44
    static let processorEntrySize = 20
    static let otherEntrySize = 8
    // Interrupt types (Table 4-10).
    static let interruptINT: UInt8 = 0
    static let interruptNMI: UInt8 = 1
    static let interruptExtINT: UInt8 = 3
    /// Spec revision 1.4 is encoded as 4 (4.1, "SPEC_REV").
    static let specRevision: UInt8 = 4
    /// Local APIC version of an integrated (xAPIC) local APIC, as KVM's in-kernel LAPIC reports.
    static let lapicVersion: UInt8 = 0x14
    /// IOAPIC version of KVM's in-kernel 24-pin IOAPIC.
    static let ioapicVersion: UInt8 = 0x11
    /// ISA IRQs 0–15 are routed to IOAPIC pins 0–15; KVM's default GSI routing maps GSI n to
    /// IOAPIC pin n (and the PIT to GSI 0), so no pin swizzle is needed.
    static let isaIRQCount: UInt8 = 16
    public static let maxVCPUs = 254

    public static func configSize(vcpus: Int) -> Int {
        headerSize + processorEntrySize * vcpus + otherEntrySize * (2 + Int(isaIRQCount) + 2)
    }

    public init(vcpus: Int) throws {
        guard vcpus >= 1, vcpus <= MPTable.maxVCPUs else {
            throw BootError(
                .placement,
                "\(vcpus) vCPUs: the MP table describes 1 to \(MPTable.maxVCPUs) processors (APIC ids 0–253, IOAPIC id = vCPU count)")
        }
        let size = MPTable.configSize(vcpus: vcpus)
        floatingPointerAddress = Layout.ebdaStart
        // The configuration table follows the floating pointer when it fits in the EBDA;
        // otherwise it lives in the e820-reserved BIOS area.
        let afterPointer = Layout.ebdaStart + 16
        configAddress = afterPointer + UInt64(size) <= Layout.ebdaEnd ? afterPointer : Layout.mpConfigFallbackAddress

        var table = [UInt8](repeating: 0, count: size)
        // Header (Table 4-2).
        table.replaceSubrange(0..<4, with: Array("PCMP".utf8))
        table.putLE(UInt16(size), at: 4)  // base table length
        table[6] = MPTable.specRevision
        // [7] checksum, filled below.
        table.replaceSubrange(8..<16, with: Array("FLOTILLA".utf8))  // OEM id, 8 bytes
        table.replaceSubrange(16..<28, with: Array("MICROVM     ".utf8))  // product id, 12 bytes
        // [28] OEM table pointer 0, [32] OEM table size 0.
        let entryCount = vcpus + 2 + Int(MPTable.isaIRQCount) + 2
        table.putLE(UInt16(entryCount), at: 34)
        table.putLE(Layout.lapicAddress, at: 36)
        // [40] extended table length 0, [42] extended checksum 0.

        var offset = MPTable.headerSize
        // Processor entries (Table 4-4): id, version, flags EN (bit 0) | BP (bit 1), signature, features.
        for cpu in 0..<vcpus {
            table[offset] = MPTable.processorEntry
            table[offset + 1] = UInt8(cpu)
            table[offset + 2] = MPTable.lapicVersion
            table[offset + 3] = cpu == 0 ? 0x3 : 0x1
            table.putLE(UInt32(0x600), at: offset + 4)  // family 6, as KVM's default model
            table.putLE(UInt32(0x201), at: offset + 8)  // CPUID.1 EDX: FPU (bit 0), APIC (bit 9)
            offset += MPTable.processorEntrySize
        }
        // Bus entry (Table 4-6): bus 0, "ISA   ".
        table[offset] = MPTable.busEntry
        table[offset + 1] = 0
        table.replaceSubrange(offset + 2..<offset + 8, with: Array("ISA   ".utf8))
        offset += MPTable.otherEntrySize
        // IOAPIC entry (Table 4-7): id = vCPU count, version, EN, address.
        let ioapicID = UInt8(vcpus)
        table[offset] = MPTable.ioapicEntry
        table[offset + 1] = ioapicID
        table[offset + 2] = MPTable.ioapicVersion
        table[offset + 3] = 1
        table.putLE(Layout.ioapicAddress, at: offset + 4)
        offset += MPTable.otherEntrySize
        // I/O interrupt entries (Table 4-8): ISA IRQ n -> IOAPIC pin n, flags 0 = "conforms to
        // the bus" (ISA: edge-triggered, active high).
        for irq in 0..<MPTable.isaIRQCount {
            table[offset] = MPTable.ioInterruptEntry
            table[offset + 1] = MPTable.interruptINT
            table.putLE(UInt16(0), at: offset + 2)
            table[offset + 4] = 0  // source bus id
            table[offset + 5] = irq
            table[offset + 6] = ioapicID
            table[offset + 7] = irq
            offset += MPTable.otherEntrySize
        }
        // Local interrupt entries (Table 4-9): LINT0 = ExtINT (the 8259 in virtual-wire mode),
        // LINT1 = NMI, both to every local APIC (destination 0xff).
        for (type, lint) in [(MPTable.interruptExtINT, UInt8(0)), (MPTable.interruptNMI, UInt8(1))] {
            table[offset] = MPTable.localInterruptEntry
            table[offset + 1] = type
            table.putLE(UInt16(0), at: offset + 2)
            table[offset + 4] = 0
            table[offset + 5] = 0
            table[offset + 6] = 0xff
            table[offset + 7] = lint
            offset += MPTable.otherEntrySize
        }
        table[7] = MPTable.checksum(table)
        config = table

        // Floating pointer (Figure 4-2): "_MP_", config table address, length 1 (16-byte
        // units), revision, checksum, feature byte 1 = 0 (a configuration table is present),
        // feature byte 2 bit 7 (IMCRP) = 0: virtual-wire mode, no IMCR.
        var pointer = [UInt8](repeating: 0, count: 16)
        pointer.replaceSubrange(0..<4, with: Array("_MP_".utf8))
        pointer.putLE(UInt32(configAddress), at: 4)
        pointer[8] = 1
        pointer[9] = MPTable.specRevision
        pointer[10] = MPTable.checksum(pointer)
        floatingPointer = pointer
    }

    /// The byte that makes the sum of all bytes (with it in place of a zero) 0 mod 256.
    static func checksum(_ bytes: [UInt8]) -> UInt8 {
        let sum = bytes.reduce(UInt8(0)) { $0 &+ $1 }
        return 0 &- sum
    }

    public func write(to memory: GuestMemory) throws {
        try memory.write(floatingPointer, at: floatingPointerAddress)
        try memory.write(config, at: configAddress)
    }
}
