/// Everything the BSP needs to start the loaded guest.
public struct BootInfo: Sendable, Equatable {
    public let kernel: LoadedKernel
    public let commandLine: String
    public let initrd: InitrdPlacement?
    public let e820: [E820Entry]
    /// RIP of the 64-bit entry.
    public var entry: UInt64 { kernel.entry }
}

public struct InitrdPlacement: Sendable, Equatable {
    public let address: UInt64
    public let size: UInt64
}

/// Puts kernel, initrd, command line, zero page, MP table, GDT and page tables into guest
/// memory, per docs/guest-abi.md.
public enum BootLoader {
    public static func load(
        kernel kernelImage: some ImageSource, initrd initrdImage: (any ImageSource)?, arguments: String,
        slots: [VirtioMMIOSlot], vcpus: Int, memory: GuestMemory
    ) throws -> BootInfo {
        let kernel = try KernelLoader.load(kernelImage, into: memory)
        let commandLine = KernelCommandLine.build(arguments, slots: slots)
        let encoded = try KernelCommandLine.encode(commandLine, limit: kernel.commandLineMax, kernelName: kernelImage.name)
        try memory.write(encoded, at: Layout.commandLineAddress)

        var initrd: InitrdPlacement? = nil
        if let initrdImage {
            let address = try placeInitrd(
                size: initrdImage.size, addressMax: kernel.initrdAddressMax, lowRAMEnd: memory.lowRAMEnd,
                kernelStart: kernel.start, kernelEnd: kernel.end, name: initrdImage.name)
            try memory.withSlice(at: address, length: initrdImage.size) { slice in
                try initrdImage.copy(offset: 0, into: slice, what: "initrd")
            }
            initrd = InitrdPlacement(address: address, size: initrdImage.size)
        }

        let e820 = E820Entry.map(memorySize: memory.size)
        let zeroPage = try ZeroPage(
            kernel: kernel, commandLineAddress: Layout.commandLineAddress, commandLineLength: encoded.count - 1,
            initrd: initrd.map { ($0.address, $0.size) }, e820: e820)
        try memory.write(zeroPage.bytes, at: Layout.zeroPageAddress)
        try MPTable(vcpus: vcpus).write(to: memory)
        try SystemTables.write(to: memory)
        return BootInfo(kernel: kernel, commandLine: commandLine, initrd: initrd, e820: e820)
    }

    /// The initrd's address: page aligned, as high as possible with its last byte at or below
    /// `addressMax` and below the top of low RAM, not overlapping the kernel's
    /// `[kernelStart, kernelEnd)`, and not below 1 MiB.
    public static func placeInitrd(
        size: UInt64, addressMax: UInt64, lowRAMEnd: UInt64, kernelStart: UInt64, kernelEnd: UInt64,
        name: String
    ) throws -> UInt64 {
        let pageMask = Layout.pageSize - 1
        let limit = min(addressMax == UInt64.max ? addressMax : addressMax + 1, lowRAMEnd)
        func fail() -> BootError {
            BootError(
                .placement,
                "initrd \(name) (\(size) bytes) does not fit in guest RAM: it must end at or below \(hex(limit)) (initrd_addr_max \(hex(addressMax)), low RAM end \(hex(lowRAMEnd))) without overlapping the kernel at [\(hex(kernelStart)), \(hex(kernelEnd)))"
            )
        }
        guard size > 0 else { throw BootError(.placement, "initrd \(name) is empty") }
        guard size <= limit else { throw fail() }
        var candidate = (limit - size) & ~pageMask
        if candidate < kernelEnd, candidate + size > kernelStart {
            // Overlaps the kernel: try just below it.
            guard kernelStart >= size else { throw fail() }
            candidate = (kernelStart - size) & ~pageMask
        }
        guard candidate >= Layout.highMemoryStart else { throw fail() }
        return candidate
    }
}
