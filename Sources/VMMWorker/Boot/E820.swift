/// One BIOS e820 memory-map entry (zero-page.rst `e820_table`, 20 bytes each).
public struct E820Entry: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: UInt32, Sendable {
        case ram = 1
        case reserved = 2
    }

    public let address: UInt64
    public let size: UInt64
    public let kind: Kind

    public init(address: UInt64, size: UInt64, kind: Kind) {
        self.address = address
        self.size = size
        self.kind = kind
    }

    public var description: String { "[\(hex(address)), \(hex(address + size))) \(kind)" }

    /// The map docs/guest-abi.md promises for a guest with `memorySize` bytes of RAM:
    /// base memory below the EBDA, the EBDA and the BIOS area reserved, RAM from 1 MiB to the
    /// top of low RAM, and RAM from 4 GiB for the rest.
    public static func map(memorySize: UInt64) -> [E820Entry] {
        var entries = [
            E820Entry(address: 0, size: Layout.ebdaStart, kind: .ram),
            E820Entry(address: Layout.ebdaStart, size: Layout.ebdaEnd - Layout.ebdaStart, kind: .reserved),
            E820Entry(address: Layout.biosAreaStart, size: Layout.highMemoryStart - Layout.biosAreaStart, kind: .reserved),
        ]
        for region in GuestMemory.regions(forSize: memorySize) {
            let start = max(region.guestAddress, Layout.highMemoryStart)
            if region.endAddress > start {
                entries.append(E820Entry(address: start, size: region.endAddress - start, kind: .ram))
            }
        }
        return entries
    }
}
