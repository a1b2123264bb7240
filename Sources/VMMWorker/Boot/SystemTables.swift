/// The GDT and identity page tables the 64-bit entry runs on (docs/guest-abi.md).
public enum SystemTables {
    /// A GDT descriptor from access/flags bits (Intel SDM vol. 3A 3.4.5 "Segment Descriptors"):
    /// `flags` packs the access byte (bits 0–7) and the G/D/L/AVL nibble (bits 12–15).
    static func descriptor(flags: UInt16, base: UInt32, limit: UInt32) -> UInt64 {
        let base64 = UInt64(base)
        let limit64 = UInt64(limit)
        return ((base64 & 0xff00_0000) << 32) | ((base64 & 0x00ff_ffff) << 16) | (limit64 & 0xffff)
            | ((limit64 & 0xf_0000) << 32) | ((UInt64(flags) & 0xf0ff) << 40)
    }

    /// 0x00 null, 0x08 null, 0x10 64-bit code (access 0x9b, L=1, G=1), 0x18 data (0x93, D/B=1,
    /// G=1), 0x20 a 64-bit busy TSS (0x8b) for the task register KVM requires in long mode.
    public static let gdt: [UInt64] = [
        0,
        0,
        descriptor(flags: 0xa09b, base: 0, limit: 0xfffff),
        descriptor(flags: 0xc093, base: 0, limit: 0xfffff),
        descriptor(flags: 0x808b, base: 0, limit: 0xfffff),
    ]

    // Page-table entry bits (SDM vol. 3A 4.5): present, writable, page size (2 MiB).
    static let present: UInt64 = 1 << 0
    static let writable: UInt64 = 1 << 1
    static let pageSize: UInt64 = 1 << 7

    /// Writes the GDT, an empty IDT and the identity map of 0–4 GiB (PML4 -> PDPT -> 4 PDs of
    /// 2 MiB pages).
    public static func write(to memory: GuestMemory) throws {
        for (i, entry) in gdt.enumerated() {
            try memory.write(entry, at: Layout.gdtAddress + UInt64(i) * 8)
        }
        try memory.write(UInt64(0), at: Layout.idtAddress)

        try memory.fill(0, at: Layout.pml4Address, count: Layout.pageSize * (2 + Layout.pageDirectoryCount))
        try memory.write(Layout.pdptAddress | present | writable, at: Layout.pml4Address)
        for directory in 0..<Layout.pageDirectoryCount {
            let pdAddress = Layout.pageDirectoryAddress + directory * Layout.pageSize
            try memory.write(pdAddress | present | writable, at: Layout.pdptAddress + directory * 8)
            for entry in 0..<UInt64(512) {
                let physical = (directory << 30) | (entry << 21)
                try memory.write(physical | present | writable | pageSize, at: pdAddress + entry * 8)
            }
        }
    }
}
