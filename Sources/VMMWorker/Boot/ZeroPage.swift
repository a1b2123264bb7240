/// `struct boot_params`, the zero page (Documentation/arch/x86/zero-page.rst), with the
/// setup header fields of Documentation/arch/x86/boot.rst at their zero-page offsets.
public struct ZeroPage {
    // zero-page.rst
    static let e820EntriesOffset = 0x1e8
    static let e820TableOffset = 0x2d0
    static let e820MaxEntries = 128
    // boot.rst setup header (offsets within boot_params)
    static let setupHeaderOffset = 0x1f1
    static let bootFlagOffset = 0x1fe
    static let headerOffset = 0x202
    static let versionOffset = 0x206
    static let typeOfLoaderOffset = 0x210
    static let loadflagsOffset = 0x211
    static let code32StartOffset = 0x214
    static let ramdiskImageOffset = 0x218
    static let ramdiskSizeOffset = 0x21c
    static let cmdLinePtrOffset = 0x228
    static let initrdAddrMaxOffset = 0x22c
    static let cmdlineSizeOffset = 0x238
    /// type_of_loader 0xff: "undefined" boot loader (boot.rst, "type_of_loader").
    static let typeOfLoaderUndefined: UInt8 = 0xff
    /// The protocol version written for ELF kernels, which have no header of their own.
    static let elfProtocolVersion: UInt16 = 0x020f
    /// Highest initrd address offered to ELF kernels (2 GiB - 1; every 64-bit kernel accepts it).
    public static let elfInitrdAddressMax: UInt64 = 0x7fff_ffff

    public private(set) var bytes = [UInt8](repeating: 0, count: Int(Layout.zeroPageSize))

    /// Builds the zero page for `kernel`, with the command line at `commandLineAddress`
    /// (`commandLineLength` bytes without the NUL), the initrd (if any) and the e820 map.
    public init(
        kernel: LoadedKernel, commandLineAddress: UInt64, commandLineLength: Int,
        initrd: (address: UInt64, size: UInt64)?, e820: [E820Entry]
    ) throws {
        if let header = kernel.setupHeader {
            // bzImage: the loader copies the kernel's setup header and then fills its fields.
            bytes.replaceSubrange(ZeroPage.setupHeaderOffset..<ZeroPage.setupHeaderOffset + header.count, with: header)
        } else {
            bytes.putLE(UInt16(0xaa55), at: ZeroPage.bootFlagOffset)
            bytes.putLE(BzImageLoader.headerMagic, at: ZeroPage.headerOffset)
            bytes.putLE(ZeroPage.elfProtocolVersion, at: ZeroPage.versionOffset)
            bytes[ZeroPage.loadflagsOffset] = BzImageLoader.loadedHigh
            bytes.putLE(UInt32(truncatingIfNeeded: ZeroPage.elfInitrdAddressMax), at: ZeroPage.initrdAddrMaxOffset)
            bytes.putLE(Layout.elfCommandLineMax, at: ZeroPage.cmdlineSizeOffset)
            bytes.putLE(UInt32(truncatingIfNeeded: kernel.start), at: ZeroPage.code32StartOffset)
        }
        bytes[ZeroPage.typeOfLoaderOffset] = ZeroPage.typeOfLoaderUndefined
        guard commandLineAddress <= UInt32.max else {
            throw BootError(.placement, "command line address \(hex(commandLineAddress)) is above 4 GiB")
        }
        bytes.putLE(UInt32(commandLineAddress), at: ZeroPage.cmdLinePtrOffset)
        if kernel.setupHeader != nil {
            bytes.putLE(UInt32(truncatingIfNeeded: kernel.start), at: ZeroPage.code32StartOffset)
        }
        if let initrd {
            guard initrd.address <= UInt32.max, initrd.size <= UInt32.max else {
                throw BootError(
                    .placement, "initrd at \(hex(initrd.address)) (\(initrd.size) bytes) does not fit the 32-bit ramdisk fields")
            }
            bytes.putLE(UInt32(initrd.address), at: ZeroPage.ramdiskImageOffset)
            bytes.putLE(UInt32(initrd.size), at: ZeroPage.ramdiskSizeOffset)
        }
        guard e820.count <= ZeroPage.e820MaxEntries else {
            throw BootError(.placement, "\(e820.count) e820 entries exceed the zero page's \(ZeroPage.e820MaxEntries)")
        }
        bytes[ZeroPage.e820EntriesOffset] = UInt8(e820.count)
        for (i, entry) in e820.enumerated() {
            let offset = ZeroPage.e820TableOffset + 20 * i
            bytes.putLE(entry.address, at: offset)
            bytes.putLE(entry.size, at: offset + 8)
            bytes.putLE(entry.kind.rawValue, at: offset + 16)
        }
    }
}
