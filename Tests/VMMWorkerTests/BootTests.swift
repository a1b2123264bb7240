import FlotillaTestSupport
import Testing

@testable import VMMWorker

@Suite("Kernel loaders")
struct KernelLoaderTests {
    func memory() throws -> GuestMemory { try GuestMemory(size: 32 << 20) }

    func loadError(_ bytes: [UInt8], memorySize: UInt64 = 32 << 20) throws -> BootError? {
        let memory = try GuestMemory(size: memorySize)
        do {
            _ = try KernelLoader.load(ByteImage(name: "kernel.img", bytes: bytes), into: memory)
            return nil
        } catch let error as BootError {
            return error
        }
    }

    @Test("an ELF vmlinux loads at p_paddr with bss zeroed")
    func elfLoads() throws {
        let memory = try memory()
        try memory.fill(0xaa, at: 0x100000, count: 0x100)
        let image = ByteImage(name: "vmlinux", bytes: makeELF(code: [1, 2, 3, 4], entry: 0x100002, memorySize: 0x10))
        let kernel = try KernelLoader.load(image, into: memory)
        #expect(kernel.format == .elf)
        #expect(kernel.entry == 0x100002)
        #expect(kernel.start == 0x100000 && kernel.end == 0x100010)
        #expect(try memory.read(at: 0x100000, count: 6) == [1, 2, 3, 4, 0, 0])
        #expect(try memory.read(UInt8.self, at: 0x100010) == 0xaa)
    }

    @Test("ELF validation: truncated, wrong class, machine, segments, entry")
    func elfValidation() throws {
        let good = makeELF(code: [0xf4])
        #expect(try loadError(Array(good.prefix(40)))?.code == .truncated)
        var bad = good
        bad[4] = 1  // 32-bit
        #expect(try loadError(bad)?.code == .unsupported)
        bad = good
        bad.putLE(UInt16(3), at: 18)  // EM_386
        let machine = try #require(try loadError(bad))
        #expect(machine.code == .unsupported && machine.message.contains("machine 3"))
        bad = good
        bad.putLE(UInt64(0x1000_0000_0000), at: 64 + 8)  // p_offset far beyond the file
        #expect(try loadError(bad)?.code == .truncated)
        bad = good
        bad.putLE(UInt64.max - 10, at: 64 + 24)  // p_paddr wrapping around
        #expect(try loadError(bad) != nil)
        bad = good
        bad.putLE(UInt64(0x8000), at: 64 + 24)  // below 1 MiB
        #expect(try loadError(bad)?.code == .invalidHeader)
        bad = good
        bad.putLE(UInt64(0x200000), at: 24)  // entry outside the segment
        #expect(try loadError(bad)?.code == .invalidHeader)
        bad = good
        bad.putLE(UInt64(1 << 30), at: 64 + 40)  // p_memsz: 1 GiB in a 32 MiB guest
        let tooBig = try #require(try loadError(bad))
        #expect(tooBig.code == .tooLarge && tooBig.message.contains("kernel.img"))
        bad = good
        bad.putLE(UInt64.max, at: 32)  // e_phoff overflow
        #expect(try loadError(bad)?.code == .truncated)
    }

    @Test("unknown formats name what was found")
    func badMagic() throws {
        let error = try #require(try loadError([0x4d, 0x5a, 0, 0] + [UInt8](repeating: 0, count: 100)))
        #expect(error.code == .badMagic)
        #expect(error.message.contains("kernel.img") && error.message.contains("0x4d 0x5a"))
        #expect(try loadError([])?.code == .badMagic)
    }

    @Test("a relocatable bzImage loads at pref_address with entry +0x200")
    func bzImageLoads() throws {
        let memory = try memory()
        let kernel = try KernelLoader.load(ByteImage(name: "bzImage", bytes: makeBzImage()), into: memory)
        #expect(kernel.format == .bzImage)
        #expect(kernel.start == 0x1000000 && kernel.entry == 0x1000200)
        #expect(kernel.end == 0x1100000)
        #expect(kernel.commandLineMax == 2048)
        #expect(kernel.setupHeader?.count == 0x26c - 0x1f1)
        #expect(try memory.read(UInt8.self, at: 0x1000000) == 0x90)
        let fixed = try KernelLoader.load(ByteImage(name: "bzImage", bytes: makeBzImage(relocatable: false)), into: memory)
        #expect(fixed.start == 0x100000 && fixed.entry == 0x100200)
    }

    @Test("bzImage validation: boot flag, version, flags, alignment, size")
    func bzImageValidation() throws {
        var bad = makeBzImage()
        bad.putLE(UInt16(0x1234), at: 0x1fe)
        #expect(try loadError(bad)?.code == .badMagic)
        let old = try #require(try loadError(makeBzImage(version: 0x020a)))
        #expect(old.code == .unsupported && old.message.contains("2.10") && old.message.contains("2.12"))
        let noKernel64 = try #require(try loadError(makeBzImage(xloadflags: 0)))
        #expect(noKernel64.code == .unsupported && noKernel64.message.contains("XLF_KERNEL_64"))
        #expect(try loadError(makeBzImage(loadflags: 0))?.code == .unsupported)
        #expect(try loadError(makeBzImage(alignment: 0x30000))?.code == .invalidHeader)
        let tooBig = try #require(try loadError(makeBzImage(initSize: 0x2000000)))
        #expect(tooBig.code == .tooLarge)
        #expect(try loadError(Array(makeBzImage().prefix(0x240)))?.code == .truncated)
        #expect(try loadError(Array(makeBzImage().prefix(0x400)))?.code == .truncated)
    }
}

@Suite("Boot structures")
struct BootStructureTests {
    @Test("e820 for 256 MiB")
    func e820Small() {
        #expect(
            E820Entry.map(memorySize: 256 << 20) == [
                E820Entry(address: 0, size: 0x9fc00, kind: .ram),
                E820Entry(address: 0x9fc00, size: 0x400, kind: .reserved),
                E820Entry(address: 0xf0000, size: 0x10000, kind: .reserved),
                E820Entry(address: 0x100000, size: (256 << 20) - 0x100000, kind: .ram),
            ])
    }

    @Test("e820 for 6 GiB splits around the 32-bit hole")
    func e820Large() {
        let map = E820Entry.map(memorySize: 6 << 30)
        #expect(map.count == 5)
        #expect(map[3] == E820Entry(address: 0x100000, size: (3 << 30) - 0x100000, kind: .ram))
        #expect(map[4] == E820Entry(address: 4 << 30, size: 3 << 30, kind: .ram))
        let ram = map.filter { $0.kind == .ram }.reduce(0) { $0 + $1.size }
        #expect(ram == (6 << 30) - 0x100000 + 0x9fc00)
    }

    func sum(_ bytes: [UInt8]) -> UInt8 { bytes.reduce(0, &+) }

    @Test("MP table: checksums, processors, bus, IOAPIC and interrupt entries", arguments: [1, 2, 4, 40, 41, 254])
    func mpTable(vcpus: Int) throws {
        let table = try MPTable(vcpus: vcpus)
        let pointer = table.floatingPointer
        #expect(Array(pointer[0..<4]) == Array("_MP_".utf8))
        #expect(sum(pointer) == 0)
        #expect(pointer[8] == 1 && pointer[9] == 4)
        #expect(UInt64(pointer.le(UInt32.self, at: 4)) == table.configAddress)
        #expect(table.floatingPointerAddress == 0x9fc00)
        #expect(table.configAddress == (vcpus <= 40 ? 0x9fc10 : 0xf0000))
        let config = table.config
        #expect(Array(config[0..<4]) == Array("PCMP".utf8))
        #expect(sum(config) == 0)
        #expect(Int(config.le(UInt16.self, at: 4)) == config.count)
        #expect(config.le(UInt32.self, at: 36) == 0xfee0_0000)
        let entries = Int(config.le(UInt16.self, at: 34))
        #expect(entries == vcpus + 1 + 1 + 16 + 2)
        // Walk the entries.
        var offset = 44
        var processors: [(id: UInt8, flags: UInt8)] = []
        var ioInterrupts: [(irq: UInt8, pin: UInt8, apic: UInt8)] = []
        var locals: [(type: UInt8, lint: UInt8)] = []
        var ioapic: (id: UInt8, address: UInt32)? = nil
        var bus = ""
        for _ in 0..<entries {
            switch config[offset] {
            case 0:
                processors.append((config[offset + 1], config[offset + 3]))
                offset += 20
            case 1:
                bus = String(decoding: config[offset + 2..<offset + 8], as: UTF8.self)
                offset += 8
            case 2:
                ioapic = (config[offset + 1], config.le(UInt32.self, at: offset + 4))
                offset += 8
            case 3:
                ioInterrupts.append((config[offset + 5], config[offset + 7], config[offset + 6]))
                offset += 8
            case 4:
                locals.append((config[offset + 1], config[offset + 7]))
                offset += 8
            default:
                Issue.record("unknown entry type \(config[offset])")
                return
            }
        }
        #expect(offset == config.count)
        #expect(processors.map(\.id) == (0..<vcpus).map { UInt8($0) })
        #expect(processors.map(\.flags) == [3] + Array(repeating: 1, count: vcpus - 1))
        #expect(bus == "ISA   ")
        #expect(ioapic?.id == UInt8(vcpus) && ioapic?.address == 0xfec0_0000)
        #expect(ioInterrupts.map(\.irq) == Array(0..<16))
        #expect(ioInterrupts.allSatisfy { $0.irq == $0.pin && $0.apic == UInt8(vcpus) })
        #expect(locals.map(\.type) == [3, 1] && locals.map(\.lint) == [0, 1])
    }

    @Test("MP table rejects 0 and 255 vCPUs")
    func mpTableLimits() {
        #expect(throws: BootError.self) { try MPTable(vcpus: 0) }
        #expect(throws: BootError.self) { try MPTable(vcpus: 255) }
    }

    @Test("command line: virtio slots appended, too long rejected")
    func commandLine() throws {
        let line = KernelCommandLine.build(" console=ttyS0 ", slots: [VirtioMMIOSlot(slot: 0), VirtioMMIOSlot(slot: 10)])
        #expect(line == "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd000a000:15")
        #expect(KernelCommandLine.build("", slots: []) == "")
        #expect(try KernelCommandLine.encode("abc", limit: 3, kernelName: "k") == [0x61, 0x62, 0x63, 0])
        let error = try #require(throws: BootError.self) { try KernelCommandLine.encode("abcd", limit: 3, kernelName: "k") }
        #expect(error.code == .commandLineTooLong && error.message.contains("4 bytes") && error.message.contains("at most 3"))
    }

    @Test("initrd placement: page aligned, highest, below initrd_addr_max, clear of the kernel")
    func initrdPlacement() throws {
        let mib: UInt64 = 1 << 20
        // Top of a 256 MiB guest.
        #expect(
            try BootLoader.placeInitrd(
                size: 5000, addressMax: 0x7fff_ffff, lowRAMEnd: 256 * mib, kernelStart: mib, kernelEnd: 2 * mib, name: "i")
                == 256 * mib - 8192)
        // initrd_addr_max below the top of RAM: the last byte must be <= addressMax.
        let capped = try BootLoader.placeInitrd(
            size: 4096, addressMax: 0x37ff_ffff, lowRAMEnd: 2048 * mib, kernelStart: mib, kernelEnd: 2 * mib, name: "i")
        #expect(capped == 0x3800_0000 - 4096)
        // The kernel occupies the top: go below it.
        let below = try BootLoader.placeInitrd(
            size: 4096, addressMax: 0x7fff_ffff, lowRAMEnd: 64 * mib, kernelStart: 32 * mib, kernelEnd: 64 * mib, name: "i")
        #expect(below == 32 * mib - 4096)
        // Too big.
        #expect(throws: BootError.self) {
            try BootLoader.placeInitrd(
                size: 70 * mib, addressMax: 0x7fff_ffff, lowRAMEnd: 64 * mib, kernelStart: mib, kernelEnd: 2 * mib, name: "i")
        }
        #expect(throws: BootError.self) {
            try BootLoader.placeInitrd(
                size: 40 * mib, addressMax: 0x7fff_ffff, lowRAMEnd: 64 * mib, kernelStart: 20 * mib, kernelEnd: 30 * mib, name: "i")
        }
    }

    @Test("zero page for an ELF kernel: magic, version, loader type, command line, initrd, e820")
    func zeroPage() throws {
        let kernel = LoadedKernel(
            format: .elf, entry: 0x100000, start: 0x100000, end: 0x200000, setupHeader: nil,
            commandLineMax: 2048, initrdAddressMax: ZeroPage.elfInitrdAddressMax)
        let e820 = E820Entry.map(memorySize: 256 << 20)
        let page = try ZeroPage(
            kernel: kernel, commandLineAddress: 0x20000, commandLineLength: 10,
            initrd: (0x0800_0000, 0x1234), e820: e820
        ).bytes
        #expect(page.le(UInt16.self, at: 0x1fe) == 0xaa55)
        #expect(Array(page[0x202..<0x206]) == Array("HdrS".utf8))
        #expect(page.le(UInt16.self, at: 0x206) == 0x020f)
        #expect(page[0x210] == 0xff)
        #expect(page.le(UInt32.self, at: 0x228) == 0x20000)
        #expect(page.le(UInt32.self, at: 0x238) == 2048)
        #expect(page.le(UInt32.self, at: 0x218) == 0x0800_0000)
        #expect(page.le(UInt32.self, at: 0x21c) == 0x1234)
        #expect(page[0x1e8] == 4)
        #expect(page.le(UInt64.self, at: 0x2d0 + 20 * 3) == 0x100000)
        #expect(page.le(UInt32.self, at: 0x2d0 + 20 * 3 + 16) == 1)
        #expect(page.le(UInt32.self, at: 0x2d0 + 20 * 1 + 16) == 2)
    }

    @Test("GDT descriptors decode to flat long-mode segments")
    func gdt() {
        let code = VCPUSetup.segment(selector: Layout.codeSelector)
        #expect(code.l == 1 && code.db == 0 && code.present == 1 && code.type == 0xb && code.limit == 0xffff_ffff && code.s == 1)
        let data = VCPUSetup.segment(selector: Layout.dataSelector)
        #expect(data.l == 0 && data.db == 1 && data.type == 3 && data.base == 0)
        let tss = VCPUSetup.segment(selector: Layout.tssSelector)
        #expect(tss.s == 0 && tss.type == 0xb)
    }
}
