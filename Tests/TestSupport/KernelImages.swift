/// Hand-made kernel images, so tests can boot tiny guests through the same loaders as Linux.

/// Builds a minimal ELF64 x86_64 executable: one PT_LOAD of `code` at `loadAddress`
/// (p_paddr), entry at its start. Lets tests boot hand-assembled guests through the same
/// loader as Linux.
public func makeELF(code: [UInt8], loadAddress: UInt64 = 0x100000, entry: UInt64? = nil, memorySize: UInt64? = nil) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: 64 + 56)
    bytes.replaceSubrange(0..<4, with: [0x7f, 0x45, 0x4c, 0x46])
    bytes[4] = 2  // ELFCLASS64
    bytes[5] = 1  // little-endian
    bytes[6] = 1  // EV_CURRENT
    bytes.putLittleEndian(UInt16(2), at: 16)  // ET_EXEC
    bytes.putLittleEndian(UInt16(62), at: 18)  // EM_X86_64
    bytes.putLittleEndian(UInt32(1), at: 20)
    bytes.putLittleEndian(entry ?? loadAddress, at: 24)
    bytes.putLittleEndian(UInt64(64), at: 32)  // e_phoff
    bytes.putLittleEndian(UInt16(64), at: 52)  // e_ehsize
    bytes.putLittleEndian(UInt16(56), at: 54)  // e_phentsize
    bytes.putLittleEndian(UInt16(1), at: 56)  // e_phnum
    let ph = 64
    bytes.putLittleEndian(UInt32(1), at: ph)  // PT_LOAD
    bytes.putLittleEndian(UInt32(7), at: ph + 4)
    bytes.putLittleEndian(UInt64(0x1000), at: ph + 8)  // p_offset
    bytes.putLittleEndian(loadAddress, at: ph + 16)
    bytes.putLittleEndian(loadAddress, at: ph + 24)
    bytes.putLittleEndian(UInt64(code.count), at: ph + 32)
    bytes.putLittleEndian(memorySize ?? UInt64(code.count), at: ph + 40)
    bytes.putLittleEndian(UInt64(0x1000), at: ph + 48)
    bytes += [UInt8](repeating: 0, count: 0x1000 - bytes.count)
    bytes += code
    return bytes
}

/// A bzImage-shaped image: setup sectors with a protocol header, then `payload`.
public func makeBzImage(
    version: UInt16 = 0x020f, xloadflags: UInt16 = 1, loadflags: UInt8 = 1, initSize: UInt32 = 0x100000,
    relocatable: Bool = true, prefAddress: UInt64 = 0x1000000, alignment: UInt32 = 0x200000,
    cmdlineSize: UInt32 = 2048, payload: [UInt8] = [UInt8](repeating: 0x90, count: 0x1000)
) -> [UInt8] {
    let setupSectors: UInt8 = 4
    var bytes = [UInt8](repeating: 0, count: (Int(setupSectors) + 1) * 512)
    bytes[0x1f1] = setupSectors
    bytes.putLittleEndian(UInt16(0xaa55), at: 0x1fe)
    bytes[0x200] = 0xeb  // jmp short
    bytes[0x201] = 0x6a  // header ends at 0x202 + 0x6a = 0x26c
    bytes.putLittleEndian(UInt32(0x5372_6448), at: 0x202)
    bytes.putLittleEndian(version, at: 0x206)
    bytes[0x211] = loadflags
    bytes.putLittleEndian(UInt32(0x7fff_ffff), at: 0x22c)  // initrd_addr_max
    bytes.putLittleEndian(alignment, at: 0x230)
    bytes[0x234] = relocatable ? 1 : 0
    bytes.putLittleEndian(xloadflags, at: 0x236)
    bytes.putLittleEndian(cmdlineSize, at: 0x238)
    bytes.putLittleEndian(prefAddress, at: 0x258)
    bytes.putLittleEndian(initSize, at: 0x260)
    return bytes + payload
}

extension Array where Element == UInt8 {
    /// Stores `value` little-endian at `offset`.
    mutating func putLittleEndian<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        Swift.withUnsafeBytes(of: value.littleEndian) { replaceSubrange(offset..<(offset + MemoryLayout<T>.size), with: $0) }
    }
}
