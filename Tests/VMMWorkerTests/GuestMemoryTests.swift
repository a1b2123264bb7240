import Testing

@testable import VMMWorker

@Suite("GuestMemory")
struct GuestMemoryTests {
    @Test("regions: low RAM up to 3 GiB, the rest from 4 GiB")
    func regions() {
        #expect(GuestMemory.regions(forSize: 256 << 20) == [GuestRegion(guestAddress: 0, size: 256 << 20, hostOffset: 0)])
        let six = GuestMemory.regions(forSize: 6 << 30)
        #expect(
            six == [
                GuestRegion(guestAddress: 0, size: 3 << 30, hostOffset: 0),
                GuestRegion(guestAddress: 4 << 30, size: 3 << 30, hostOffset: 3 << 30),
            ])
    }

    @Test("little-endian integers and bytes round-trip")
    func roundTrip() throws {
        let memory = try GuestMemory(size: 16 << 20)
        try memory.write(UInt32(0x1122_3344), at: 0x1000)
        #expect(try memory.read(at: 0x1000, count: 4) == [0x44, 0x33, 0x22, 0x11])
        #expect(try memory.read(UInt16.self, at: 0x1001) == 0x2233)
        try memory.write([1, 2, 3], at: (16 << 20) - 3)
        #expect(try memory.read(at: (16 << 20) - 3, count: 3) == [1, 2, 3])
    }

    @Test("accesses past the end, at overflowing addresses, or with huge lengths throw")
    func bounds() throws {
        let memory = try GuestMemory(size: 16 << 20)
        let end: UInt64 = 16 << 20
        #expect(throws: MemoryError.self) { try memory.read(UInt8.self, at: end) }
        #expect(throws: MemoryError.self) { try memory.read(UInt32.self, at: end - 2) }
        #expect(throws: MemoryError.self) { try memory.read(UInt64.self, at: UInt64.max - 3) }
        #expect(throws: MemoryError.self) { try memory.hostOffset(0x10, length: UInt64.max) }
        #expect(throws: MemoryError.self) { try memory.hostOffset(UInt64.max, length: 1) }
        #expect(throws: MemoryError.self) { try memory.fill(0, at: 1, count: end) }
        #expect(try memory.hostOffset(end - 1, length: 1) == Int(end - 1))
        #expect(try memory.hostOffset(0, length: end) == 0)
        #expect(memory.contains(0, length: end))
        #expect(!memory.contains(0, length: end + 1))
    }

    @Test("a 6 GiB guest maps without reserving memory and checks both regions")
    func highMemory() throws {
        let memory = try GuestMemory(size: 6 << 30)
        let three: UInt64 = 3 << 30
        let four: UInt64 = 4 << 30
        #expect(memory.lowRAMEnd == three)
        // The hole [3 GiB, 4 GiB) is not RAM.
        #expect(throws: MemoryError.self) { try memory.read(UInt8.self, at: three) }
        #expect(throws: MemoryError.self) { try memory.read(UInt8.self, at: four - 1) }
        // A range crossing from low RAM into the hole fails even though both ends look close.
        #expect(throws: MemoryError.self) { try memory.read(UInt64.self, at: three - 4) }
        try memory.write(UInt64(0xdead_beef), at: four)
        #expect(try memory.read(UInt64.self, at: four) == 0xdead_beef)
        // The high byte of the high region maps to the last byte of the host mapping.
        #expect(try memory.hostOffset(four + three - 1, length: 1) == Int(6 << 30) - 1)
        #expect(throws: MemoryError.self) { try memory.read(UInt8.self, at: four + three) }
        #expect(throws: MemoryError.self) { try memory.read(UInt16.self, at: four + three - 1) }
    }

    @Test("sizes that are not page multiples or too small are rejected")
    func invalidSizes() {
        #expect(throws: MemoryError.self) { try GuestMemory(size: (16 << 20) + 1) }
        #expect(throws: MemoryError.self) { try GuestMemory(size: 4096) }
    }

    @Test("a mem-path directory backs guest memory with an unlinked file")
    func memPath() throws {
        let memory = try GuestMemory(size: 4 << 20, options: GuestMemoryOptions(memPath: "/tmp", shared: true, dumpable: false))
        try memory.write(UInt8(7), at: 0x2000)
        #expect(try memory.read(UInt8.self, at: 0x2000) == 7)
        #expect(throws: MemoryError.self) {
            try GuestMemory(size: 4 << 20, options: GuestMemoryOptions(memPath: "/nonexistent-flotilla-dir"))
        }
    }
}
