import CLinux
import Glibc
import SystemPackage

/// One contiguous range of guest-physical RAM and where it lives in the host mapping.
public struct GuestRegion: Sendable, Equatable {
    public let guestAddress: UInt64
    public let size: UInt64
    /// Offset of the region inside the single host mapping.
    public let hostOffset: UInt64

    public var endAddress: UInt64 { guestAddress + size }
}

/// How guest RAM is backed.
public struct GuestMemoryOptions: Sendable, Equatable {
    /// Directory in which an unlinked backing file is created (`-mem-path`); nil = anonymous.
    public var memPath: String?
    /// MAP_SHARED instead of MAP_PRIVATE (`mem-share`).
    public var shared: Bool
    /// Include guest RAM in core dumps (`dump-guest-core`); false = MADV_DONTDUMP.
    public var dumpable: Bool

    public init(memPath: String? = nil, shared: Bool = false, dumpable: Bool = true) {
        self.memPath = memPath
        self.shared = shared
        self.dumpable = dumpable
    }
}

/// Guest RAM: one host mapping split into the low region `[0, min(size, 3 GiB))` and, for
/// larger guests, the high region from 4 GiB (docs/guest-abi.md). Every access goes through
/// bounds-checked, overflow-safe translation and throws ``MemoryError`` when out of range.
///
/// `@unchecked Sendable`: every stored property is immutable after `init`; the mapping stays
/// valid until `deinit`. Its contents are shared with the running guest and are only ever
/// touched with raw copies (never as Swift values with ownership), so concurrent access by
/// vCPUs and devices cannot break Swift's memory safety.
public final class GuestMemory: @unchecked Sendable {
    public let size: UInt64
    public let regions: [GuestRegion]
    let base: UnsafeMutableRawPointer
    private let backingFD: Int32?
    /// MAP_SHARED (`mem-share=on`): discarding pages must free the shared object's pages.
    let shared: Bool

    /// The regions for `size` bytes of RAM, per the layout.
    public static func regions(forSize size: UInt64) -> [GuestRegion] {
        let low = min(size, Layout.lowRAMLimit)
        var result = [GuestRegion(guestAddress: 0, size: low, hostOffset: 0)]
        if size > low {
            result.append(GuestRegion(guestAddress: Layout.highRAMStart, size: size - low, hostOffset: low))
        }
        return result
    }

    public init(size: UInt64, options: GuestMemoryOptions = GuestMemoryOptions()) throws {
        guard size >= 2 * Layout.highMemoryStart, size % Layout.pageSize == 0 else {
            throw MemoryError(.invalidSize, "guest memory size \(size) bytes is invalid: it must be a multiple of 4 KiB and at least 2 MiB")
        }
        // The largest guest (512 GiB) plus the 1 GiB hole stays far below 2^63; reject the
        // absurd so that every `guestAddress + size` below cannot overflow.
        guard size <= 1 << 46, let length = Int(exactly: size) else {
            throw MemoryError(.invalidSize, "guest memory size \(size) bytes is larger than this VMM supports (64 TiB)")
        }
        var fd: Int32? = nil
        if let dir = options.memPath {
            let opened = fl_open_unlinked_file(dir)
            guard opened >= 0 else {
                throw MemoryError(
                    .backingFile, "cannot create a memory backing file in mem-path '\(dir)'",
                    cause: SyscallError("open(O_TMPFILE)", Errno(rawValue: Glibc.errno)))
            }
            do {
                _ = try Syscall.retrying("ftruncate") { Glibc.ftruncate(opened, off_t(length)) }
            } catch {
                Syscall.close(opened)
                throw MemoryError(.backingFile, "cannot size the memory backing file in mem-path '\(dir)' to \(size) bytes", cause: error)
            }
            fd = opened
        }
        var flags = options.shared ? MAP_SHARED : MAP_PRIVATE
        // MAP_NORESERVE: a large guest that never touches its RAM costs no commit charge.
        flags |= MAP_NORESERVE
        if fd == nil { flags |= MAP_ANONYMOUS }
        let mapped = Glibc.mmap(nil, length, PROT_READ | PROT_WRITE, flags, fd ?? -1, 0)
        guard let mapped, mapped != MAP_FAILED else {
            let code = Errno(rawValue: Glibc.errno)
            if let fd { Syscall.close(fd) }
            throw MemoryError(.mapFailed, "cannot map \(size) bytes of guest memory", cause: SyscallError("mmap", code))
        }
        if !options.dumpable {
            // Advisory; a failure only means the core dump may include guest RAM.
            _ = Glibc.madvise(mapped, length, MADV_DONTDUMP)
        }
        self.base = mapped
        self.size = size
        self.regions = GuestMemory.regions(forSize: size)
        self.backingFD = fd
        self.shared = options.shared
    }

    deinit {
        if let length = Int(exactly: size) { _ = Glibc.munmap(base, length) }
        if let backingFD { Syscall.close(backingFD) }
    }

    /// Top of low RAM (exclusive): `min(size, 3 GiB)`.
    public var lowRAMEnd: UInt64 { regions[0].endAddress }

    /// Gives the host memory behind `[hostOffset, hostOffset + length)` of the mapping back
    /// (a balloon inflate): the guest reads zeroes there afterwards, and touching it costs a
    /// fresh page. Private mappings drop their pages with MADV_DONTNEED; a shared one
    /// (`mem-share=on`: shmem, or a file in `-mem-path`) needs MADV_REMOVE, which frees the
    /// backing pages (punches the hole) rather than only unmapping them. Both ends must be
    /// page-aligned and inside the mapping (callers translate checked guest ranges).
    func discard(hostOffset: Int, length: Int) throws(SyscallError) {
        _ = try Syscall.once("madvise") { Glibc.madvise(base + hostOffset, length, shared ? MADV_REMOVE : MADV_DONTNEED) }
    }

    /// Host address of the region for KVM_SET_USER_MEMORY_REGION.
    func hostAddress(of region: GuestRegion) -> UInt64 {
        UInt64(UInt(bitPattern: base)) + region.hostOffset
    }

    // MARK: Translation

    /// Offset into the host mapping of `[address, address + length)`, which must lie wholly
    /// inside one region. Overflow-safe for any inputs.
    @inline(__always)
    public func hostOffset(_ address: UInt64, length: UInt64) throws(MemoryError) -> Int {
        for region in regions where address >= region.guestAddress {
            let delta = address - region.guestAddress
            // delta < size and length <= size - delta, written so that neither side overflows.
            if delta < region.size, length <= region.size - delta {
                return Int(truncatingIfNeeded: region.hostOffset + delta)
            }
        }
        throw MemoryError(.outOfRange, "guest range [\(hex(address)), +\(hex(length))) is not guest RAM")
    }

    /// Whether `[address, address + length)` lies inside one RAM region.
    public func contains(_ address: UInt64, length: UInt64) -> Bool {
        (try? hostOffset(address, length: length)) != nil
    }

    /// Gives `body` the host bytes of `[address, address + length)` after checking them.
    public func withSlice<R>(at address: UInt64, length: UInt64, _ body: (UnsafeMutableRawBufferPointer) throws -> R) throws -> R {
        let offset = try hostOffset(address, length: length)
        return try body(UnsafeMutableRawBufferPointer(start: base + offset, count: Int(truncatingIfNeeded: length)))
    }

    /// The host address of `[address, address + length)` after checking it lies in one
    /// region: for handing guest buffers straight to preadv/pwritev. Valid while `self` lives.
    @inline(__always)
    public func hostPointer(_ address: UInt64, length: UInt64) throws(MemoryError) -> UnsafeMutableRawPointer {
        base + (try hostOffset(address, length: length))
    }

    // MARK: Bytes

    public func read(at address: UInt64, count: Int) throws(MemoryError) -> [UInt8] {
        let length = UInt64(max(count, 0))
        let offset = try hostOffset(address, length: length)
        return [UInt8](UnsafeRawBufferPointer(start: base + offset, count: Int(length)))
    }

    public func write(_ bytes: some Collection<UInt8>, at address: UInt64) throws(MemoryError) {
        let offset = try hostOffset(address, length: UInt64(bytes.count))
        let destination = UnsafeMutableRawBufferPointer(start: base + offset, count: bytes.count)
        destination.copyBytes(from: bytes)
    }

    public func fill(_ value: UInt8, at address: UInt64, count: UInt64) throws(MemoryError) {
        let offset = try hostOffset(address, length: count)
        memset(base + offset, Int32(value), Int(truncatingIfNeeded: count))
    }

    // MARK: Little-endian integers

    public func read<T: FixedWidthInteger>(_ type: T.Type = T.self, at address: UInt64) throws(MemoryError) -> T {
        let offset = try hostOffset(address, length: UInt64(MemoryLayout<T>.size))
        return T(littleEndian: (base + offset).loadUnaligned(as: T.self))
    }

    public func write<T: FixedWidthInteger>(_ value: T, at address: UInt64) throws(MemoryError) {
        let offset = try hostOffset(address, length: UInt64(MemoryLayout<T>.size))
        (base + offset).storeBytes(of: value.littleEndian, toByteOffset: 0, as: T.self)
    }
}

@inline(never)
func hex<T: BinaryInteger>(_ value: T) -> String {
    "0x" + String(value, radix: 16)
}
