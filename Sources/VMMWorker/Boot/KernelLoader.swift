/// A kernel placed in guest memory, ready for the 64-bit entry.
public struct LoadedKernel: Sendable, Equatable {
    public enum Format: String, Sendable {
        case elf = "ELF vmlinux"
        case bzImage
    }

    public let format: Format
    /// Guest-physical 64-bit entry point.
    public let entry: UInt64
    /// Lowest guest-physical address the kernel occupies.
    public let start: UInt64
    /// End (exclusive) of the memory the kernel needs: ELF segments' end, or load + init_size.
    public let end: UInt64
    /// bzImage only: file bytes 0x1f1 up to the end of the setup header, copied into the zero page.
    public let setupHeader: [UInt8]?
    /// Longest command line (without the NUL) the kernel accepts.
    public let commandLineMax: UInt32
    /// Highest address the initrd may occupy (boot.rst `initrd_addr_max`).
    public let initrdAddressMax: UInt64
}

/// Loads an ELF vmlinux or a bzImage into guest memory (Documentation/arch/x86/boot.rst).
public enum KernelLoader {
    /// Picks the format from the magic numbers and loads the image.
    public static func load(_ image: some ImageSource, into memory: GuestMemory) throws -> LoadedKernel {
        let head = try image.read(offset: 0, count: Int(min(image.size, 0x300)), what: "file header")
        if head.count >= 4, head[0] == 0x7f, head[1] == 0x45, head[2] == 0x4c, head[3] == 0x46 {
            return try ELFLoader.load(image, into: memory)
        }
        if head.count >= 0x206, head.le(UInt32.self, at: BzImageLoader.headerMagicOffset) == BzImageLoader.headerMagic {
            return try BzImageLoader.load(image, into: memory)
        }
        let found = head.prefix(4).map { hex($0) }.joined(separator: " ")
        throw BootError(
            .badMagic,
            "\(image.name) is neither an ELF vmlinux (magic 7f 45 4c 46 at offset 0) nor a bzImage ('HdrS' at offset 0x202); found \(found.isEmpty ? "an empty file" : found) at offset 0"
        )
    }

    /// Checks that `[address, address + length)` is low RAM at or above 1 MiB (the kernel must
    /// not overwrite the boot structures, and it must sit below the identity-mapped 4 GiB).
    static func checkPlacement(_ image: some ImageSource, what: String, address: UInt64, length: UInt64, memory: GuestMemory) throws {
        let ramEnd = memory.lowRAMEnd
        guard address >= Layout.highMemoryStart else {
            throw BootError(
                .invalidHeader,
                "\(image.name): \(what) at \(hex(address)) is below 1 MiB, where the boot structures live; kernels must load at or above 0x100000"
            )
        }
        guard address <= ramEnd, length <= ramEnd - address else {
            throw BootError(
                .tooLarge,
                "\(image.name): \(what) needs \(length) bytes at \(hex(address)), but guest low RAM ends at \(hex(ramEnd)) (\(memory.size >> 20) MiB guest); give the VM more memory or use a smaller kernel"
            )
        }
    }
}

/// ELF64 vmlinux: PT_LOAD segments at their physical addresses, `e_entry` physical (the
/// System V gABI and the x86-64 psABI define the header fields used here).
public enum ELFLoader {
    static let headerSize = 64
    static let programHeaderSize = 56
    static let maxProgramHeaders = 256
    static let ptLoad: UInt32 = 1
    static let machineAMD64: UInt16 = 62
    static let etExec: UInt16 = 2

    struct Segment {
        let offset: UInt64
        let paddr: UInt64
        let fileSize: UInt64
        let memorySize: UInt64
    }

    public static func load(_ image: some ImageSource, into memory: GuestMemory) throws -> LoadedKernel {
        let name = image.name
        let header = try image.read(offset: 0, count: headerSize, what: "ELF header")
        guard header[0] == 0x7f, header[1] == 0x45, header[2] == 0x4c, header[3] == 0x46 else {
            throw BootError(.badMagic, "\(name): no ELF magic (7f 45 4c 46) at offset 0")
        }
        // e_ident[EI_CLASS] = ELFCLASS64 (2), [EI_DATA] = ELFDATA2LSB (1), [EI_VERSION] = 1.
        guard header[4] == 2 else {
            throw BootError(.unsupported, "\(name): ELF class \(header[4]) found; a 64-bit ELF (class 2) is needed")
        }
        guard header[5] == 1 else {
            throw BootError(.unsupported, "\(name): ELF data encoding \(header[5]) found; little-endian (1) is needed")
        }
        guard header[6] == 1, header.le(UInt32.self, at: 20) == 1 else {
            throw BootError(.unsupported, "\(name): ELF version \(header[6]) found; version 1 is needed")
        }
        let type = header.le(UInt16.self, at: 16)
        guard type == etExec else {
            throw BootError(.unsupported, "\(name): ELF type \(type) found; an executable (ET_EXEC, 2) vmlinux is needed")
        }
        let machine = header.le(UInt16.self, at: 18)
        guard machine == machineAMD64 else {
            throw BootError(.unsupported, "\(name): ELF machine \(machine) found; x86_64 (62) is needed")
        }
        let entry = header.le(UInt64.self, at: 24)
        let phoff = header.le(UInt64.self, at: 32)
        let phentsize = header.le(UInt16.self, at: 54)
        let phnum = header.le(UInt16.self, at: 56)
        guard Int(phentsize) == programHeaderSize else {
            throw BootError(.invalidHeader, "\(name): e_phentsize is \(phentsize); ELF64 program headers are \(programHeaderSize) bytes")
        }
        guard phnum > 0, Int(phnum) <= maxProgramHeaders else {
            throw BootError(.invalidHeader, "\(name): e_phnum is \(phnum); 1 to \(maxProgramHeaders) program headers are supported")
        }
        let tableSize = UInt64(phnum) * UInt64(programHeaderSize)
        let table = try image.read(
            offset: phoff, count: Int(tableSize), what: "ELF program header table (e_phoff \(phoff), \(phnum) entries)")

        var segments: [Segment] = []
        for i in 0..<Int(phnum) {
            let base = i * programHeaderSize
            guard table.le(UInt32.self, at: base) == ptLoad else { continue }
            let segment = Segment(
                offset: table.le(UInt64.self, at: base + 8), paddr: table.le(UInt64.self, at: base + 24),
                fileSize: table.le(UInt64.self, at: base + 32), memorySize: table.le(UInt64.self, at: base + 40))
            guard segment.fileSize <= segment.memorySize else {
                throw BootError(
                    .invalidHeader, "\(name): PT_LOAD segment \(i) has p_filesz \(segment.fileSize) > p_memsz \(segment.memorySize)")
            }
            try image.checkRange(segment.offset, segment.fileSize, what: "PT_LOAD segment \(i)")
            try KernelLoader.checkPlacement(
                image, what: "PT_LOAD segment \(i)", address: segment.paddr, length: segment.memorySize, memory: memory)
            segments.append(segment)
        }
        guard !segments.isEmpty else {
            throw BootError(.invalidHeader, "\(name): the ELF file has no PT_LOAD segment")
        }
        guard segments.contains(where: { entry >= $0.paddr && entry - $0.paddr < $0.memorySize }) else {
            throw BootError(
                .invalidHeader, "\(name): entry point e_entry \(hex(entry)) lies in no PT_LOAD segment (it must be a physical address)")
        }
        for (i, segment) in segments.enumerated() {
            try memory.withSlice(at: segment.paddr, length: segment.memorySize) { slice in
                let fileLength = Int(segment.fileSize)
                try image.copy(
                    offset: segment.offset, into: UnsafeMutableRawBufferPointer(rebasing: slice[0..<fileLength]),
                    what: "PT_LOAD segment \(i)")
                // The bss part (p_memsz beyond p_filesz) is zero.
                UnsafeMutableRawBufferPointer(rebasing: slice[fileLength...]).initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
        let start = segments.map(\.paddr).min() ?? Layout.highMemoryStart
        let end = segments.map { $0.paddr + $0.memorySize }.max() ?? start
        return LoadedKernel(
            format: .elf, entry: entry, start: start, end: end, setupHeader: nil,
            commandLineMax: Layout.elfCommandLineMax, initrdAddressMax: ZeroPage.elfInitrdAddressMax)
    }
}

/// bzImage (boot.rst "The Real-Mode Kernel Header"): the setup sectors, then the
/// protected-mode kernel, entered at its 64-bit entry (load address + 0x200).
public enum BzImageLoader {
    static let headerMagicOffset = 0x202
    /// "HdrS" read as a little-endian u32.
    static let headerMagic: UInt32 = 0x5372_6448
    static let bootFlagOffset = 0x1fe
    static let bootFlag: UInt16 = 0xaa55
    /// Protocol 2.12 introduced xloadflags and with it XLF_KERNEL_64.
    static let minimumVersion: UInt16 = 0x020c
    static let loadedHigh: UInt8 = 1 << 0
    static let xlfKernel64: UInt16 = 1 << 0
    /// boot.rst: "the 64-bit entry point is at the load address + 0x200".
    static let entryOffset: UInt64 = 0x200
    /// The setup header lies inside boot_params [0x1f1, 0x290).
    static let setupHeaderStart = 0x1f1
    static let setupHeaderLimit = 0x290
    /// The last field read here, init_size, ends at 0x264.
    static let requiredHeaderEnd = 0x264

    public static func load(_ image: some ImageSource, into memory: GuestMemory) throws -> LoadedKernel {
        let name = image.name
        let head = try image.read(offset: 0, count: requiredHeaderEnd, what: "bzImage setup header (protocol 2.12 needs bytes up to 0x264)")
        guard head.le(UInt32.self, at: headerMagicOffset) == headerMagic else {
            throw BootError(.badMagic, "\(name): no 'HdrS' signature at offset 0x202; not a bzImage")
        }
        let flag = head.le(UInt16.self, at: bootFlagOffset)
        guard flag == bootFlag else {
            throw BootError(.badMagic, "\(name): boot_flag at 0x1fe is \(hex(flag)); a bzImage has 0xaa55")
        }
        let version = head.le(UInt16.self, at: 0x206)
        guard version >= minimumVersion else {
            throw BootError(
                .unsupported,
                "\(name): boot protocol \(version >> 8).\(String(format2: version & 0xff)) found; 2.12 or later is needed for the 64-bit entry (XLF_KERNEL_64)"
            )
        }
        let loadflags = head[0x211]
        guard loadflags & loadedHigh != 0 else {
            throw BootError(
                .unsupported, "\(name): loadflags \(hex(loadflags)) lacks LOADED_HIGH; a zImage (loaded at 0x10000) is not supported")
        }
        let xloadflags = head.le(UInt16.self, at: 0x236)
        guard xloadflags & xlfKernel64 != 0 else {
            throw BootError(
                .unsupported,
                "\(name): xloadflags \(hex(xloadflags)) lacks XLF_KERNEL_64; only x86_64 kernels with a 64-bit entry are supported")
        }
        let headerEnd = 0x202 + Int(head[0x201])
        guard headerEnd >= requiredHeaderEnd, headerEnd <= setupHeaderLimit else {
            throw BootError(
                .invalidHeader,
                "\(name): the setup header ends at \(hex(headerEnd)) (0x202 + byte 0x201); it must end between 0x264 and 0x290")
        }
        let alignment = head.le(UInt32.self, at: 0x230)
        guard alignment != 0, alignment & (alignment - 1) == 0 else {
            throw BootError(.invalidHeader, "\(name): kernel_alignment \(hex(alignment)) is not a power of two")
        }
        var setupSectors = UInt64(head[0x1f1])
        if setupSectors == 0 { setupSectors = 4 }  // boot.rst: "If this field is 0, the real value is 4."
        let payloadOffset = (setupSectors + 1) * 512
        guard payloadOffset < image.size else {
            throw BootError(
                .truncated,
                "\(name): setup_sects says the protected-mode kernel starts at offset \(payloadOffset), but the file is only \(image.size) bytes long (truncated?)"
            )
        }
        let payloadSize = image.size - payloadOffset
        let relocatable = head[0x234] != 0
        let preferred = head.le(UInt64.self, at: 0x258)
        let initSize = UInt64(head.le(UInt32.self, at: 0x260))
        var loadAddress = Layout.highMemoryStart
        if relocatable {
            // Relocatable kernels may go anywhere aligned to kernel_alignment; take pref_address.
            let mask = UInt64(alignment) - 1
            guard preferred <= UInt64.max - mask else {
                throw BootError(.invalidHeader, "\(name): pref_address \(hex(preferred)) is out of range")
            }
            loadAddress = (preferred + mask) & ~mask
        }
        let needed = max(initSize, payloadSize)
        try KernelLoader.checkPlacement(
            image, what: "the kernel (init_size \(initSize), \(payloadSize) bytes of payload)", address: loadAddress, length: needed,
            memory: memory)

        try memory.withSlice(at: loadAddress, length: payloadSize) { slice in
            try image.copy(offset: payloadOffset, into: slice, what: "protected-mode kernel")
        }
        let commandLineMax = head.le(UInt32.self, at: 0x238)
        let initrdMax = UInt64(head.le(UInt32.self, at: 0x22c))
        let setupHeader = try image.read(offset: UInt64(setupHeaderStart), count: headerEnd - setupHeaderStart, what: "setup header")
        return LoadedKernel(
            format: .bzImage, entry: loadAddress + entryOffset, start: loadAddress, end: loadAddress + needed,
            setupHeader: setupHeader, commandLineMax: commandLineMax == 0 ? 255 : commandLineMax,
            initrdAddressMax: initrdMax)
    }
}

extension String {
    /// Two-digit decimal with a leading zero (protocol minor versions: "2.05").
    init<T: BinaryInteger>(format2 value: T) {
        let text = String(value)
        self = text.count < 2 ? "0" + text : text
    }
}
