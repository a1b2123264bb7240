/// Guest-physical layout of the x86_64 MicroVm; kept in sync with docs/guest-abi.md.
public enum Layout {
    // MARK: Boot structures below 1 MiB

    /// GDT for the 64-bit entry: 0x00 null, 0x08 null, 0x10 code64, 0x18 data, 0x20 TSS.
    /// Selectors 0x10/0x18 are the __BOOT_CS/__BOOT_DS the 64-bit boot protocol names
    /// (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").
    public static let gdtAddress: UInt64 = 0x500
    public static let codeSelector: UInt16 = 0x10
    public static let dataSelector: UInt16 = 0x18
    public static let tssSelector: UInt16 = 0x20
    /// IDT for the entry: a limit of 0 (the kernel loads its own before enabling interrupts).
    public static let idtAddress: UInt64 = 0x520
    /// `boot_params` (the zero page, Documentation/arch/x86/zero-page.rst).
    public static let zeroPageAddress: UInt64 = 0x7000
    public static let zeroPageSize: UInt64 = 0x1000
    /// Initial RSP/RBP: top of the page 0x8000–0x8fff (the kernel switches stacks at once).
    public static let bootStackPointer: UInt64 = 0x8ff0
    /// Identity page tables: PML4, PDPT, then 4 page directories of 2 MiB pages (0–4 GiB).
    public static let pml4Address: UInt64 = 0x9000
    public static let pdptAddress: UInt64 = 0xa000
    public static let pageDirectoryAddress: UInt64 = 0xb000
    public static let pageDirectoryCount: UInt64 = 4
    /// Kernel command line.
    public static let commandLineAddress: UInt64 = 0x20000
    /// Command-line limit for ELF kernels (x86 COMMAND_LINE_SIZE); bzImages give their own.
    public static let elfCommandLineMax: UInt32 = 2048
    /// Extended BIOS data area: MP floating pointer, then the MP configuration table when it
    /// fits in the EBDA's 1 KiB (up to 40 vCPUs), else at ``mpConfigFallbackAddress``.
    public static let ebdaStart: UInt64 = 0x9fc00
    public static let ebdaEnd: UInt64 = 0xa0000
    /// The BIOS area [0xf0000, 0x100000) is e820-reserved; large MP tables go there.
    public static let biosAreaStart: UInt64 = 0xf0000
    public static let mpConfigFallbackAddress: UInt64 = 0xf0000
    /// Start of the kernel and of e820 RAM above the legacy hole.
    public static let highMemoryStart: UInt64 = 0x10_0000

    // MARK: RAM

    /// Low RAM ends at 3 GiB at most; the 32-bit MMIO hole [3 GiB, 4 GiB) is never RAM.
    public static let lowRAMLimit: UInt64 = 0xc000_0000
    /// RAM beyond ``lowRAMLimit`` bytes continues at 4 GiB.
    public static let highRAMStart: UInt64 = 0x1_0000_0000

    // MARK: MMIO

    public static let mmioHoleStart: UInt64 = 0xc000_0000
    /// virtio-mmio slot i lives at `virtioMMIOBase + i * virtioMMIOSlotSize`, IRQ `virtioFirstIRQ + i`.
    public static let virtioMMIOBase: UInt64 = 0xd000_0000
    public static let virtioMMIOSlotSize: UInt64 = 0x1000
    public static let virtioFirstIRQ: UInt32 = 5
    public static let virtioMaxSlots = 11
    public static let ioapicAddress: UInt32 = 0xfec0_0000
    public static let lapicAddress: UInt32 = 0xfee0_0000
    /// KVM_SET_IDENTITY_MAP_ADDR (one page) and KVM_SET_TSS_ADDR (three pages), inside the
    /// MMIO hole below the IOAPIC (api.rst 4.40, 4.46).
    public static let identityMapAddress: UInt64 = 0xfffb_c000
    public static let tssAddress: UInt64 = 0xfffb_d000

    // MARK: Legacy I/O

    public static let serialPortBase: UInt16 = 0x3f8
    public static let serialIRQ: UInt32 = 4
    public static let i8042DataPort: UInt16 = 0x60
    public static let i8042CommandPort: UInt16 = 0x64

    public static let pageSize: UInt64 = 0x1000
}
