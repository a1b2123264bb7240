/// A virtio-mmio device announced to the guest on its command line.
public struct VirtioMMIOSlot: Sendable, Equatable {
    public let base: UInt64
    public let size: UInt64
    public let irq: UInt32

    public init(base: UInt64, size: UInt64, irq: UInt32) {
        self.base = base
        self.size = size
        self.irq = irq
    }

    /// Slot `index` of the layout (docs/guest-abi.md "Virtio-mmio slots").
    public init(slot index: Int) {
        self.init(
            base: Layout.virtioMMIOBase + UInt64(index) * Layout.virtioMMIOSlotSize,
            size: Layout.virtioMMIOSlotSize, irq: Layout.virtioFirstIRQ + UInt32(index))
    }

    /// Linux's `virtio_mmio.device=<size>@<baseaddr>:<irq>` (drivers/virtio/virtio_mmio.c);
    /// size is parsed with memparse, so "4K" is accepted.
    public var parameter: String {
        let sizeText = size % 1024 == 0 ? "\(size / 1024)K" : "\(size)"
        return "virtio_mmio.device=\(sizeText)@\(hex(base)):\(irq)"
    }
}

public enum KernelCommandLine {
    /// The user's arguments followed by one entry per virtio-mmio slot.
    public static func build(_ arguments: String, slots: [VirtioMMIOSlot]) -> String {
        var parts: [String] = []
        let trimmed = arguments.trimmingSpaces()
        if !trimmed.isEmpty { parts.append(trimmed) }
        parts.append(contentsOf: slots.map(\.parameter))
        return parts.joined(separator: " ")
    }

    /// The NUL-terminated bytes, checked against the kernel's `cmdline_size` (boot.rst: "the
    /// maximum size of the command line without the terminating zero").
    public static func encode(_ line: String, limit: UInt32, kernelName: String) throws -> [UInt8] {
        var bytes = Array(line.utf8)
        guard !bytes.contains(0) else {
            throw BootError(.commandLineTooLong, "the kernel command line contains a NUL byte")
        }
        guard bytes.count <= Int(limit) else {
            throw BootError(
                .commandLineTooLong,
                "the kernel command line is \(bytes.count) bytes; \(kernelName) accepts at most \(limit) (cmdline_size)")
        }
        bytes.append(0)
        return bytes
    }
}

extension String {
    func trimmingSpaces() -> String {
        var scalars = Substring(self)
        while let first = scalars.first, first == " " || first == "\t" || first == "\n" { scalars.removeFirst() }
        while let last = scalars.last, last == " " || last == "\t" || last == "\n" { scalars.removeLast() }
        return String(scalars)
    }
}
