import Glibc

/// virtio-blk request types and statuses (virtio 1.2 §5.2.6).
public enum BlockRequestType {
    public static let read: UInt32 = 0
    public static let write: UInt32 = 1
    public static let flush: UInt32 = 4
    public static let getID: UInt32 = 8
    public static let discard: UInt32 = 11
    public static let writeZeroes: UInt32 = 13
}

public enum BlockStatus {
    public static let ok: UInt8 = 0
    public static let ioError: UInt8 = 1
    public static let unsupported: UInt8 = 2
}

/// Executes virtio-blk requests against a ``BlockBackend``: one descriptor chain in, the
/// status byte written, the used length out. Runs on the device's event loop (or directly,
/// in benchmarks and unit tests).
///
/// The request layout follows §5.2.6 without assuming descriptor boundaries (VERSION_1 implies
/// VIRTIO_F_ANY_LAYOUT, §2.7.4): a 16-byte header at the start of the device-readable bytes,
/// the status byte as the last device-writable byte, data in between.
public struct BlockRequestHandler: Sendable {
    public let backend: BlockBackend
    public let memory: GuestMemory
    /// The largest request (data bytes) accepted; larger ones fail with IOERR.
    public static let maxRequestBytes: UInt64 = 64 << 20
    /// Segments one DISCARD or WRITE_ZEROES request may carry (config max_*_seg).
    public static let maxDiscardSegments: UInt64 = 1

    /// GET_ID's answer: 20 bytes, NUL-padded (§5.2.6).
    let serial: [UInt8]

    /// `serial` is the device's (QMP device_add `serial`); nil answers GET_ID with the
    /// backend's (-drive `serial`).
    public init(backend: BlockBackend, memory: GuestMemory, serial: String? = nil) {
        self.backend = backend
        self.memory = memory
        self.serial = serial.map(BlockBackend.paddedSerial) ?? backend.serial
    }

    /// Executes `chain`; returns the number of bytes written into its device-writable
    /// buffers (the used length), status byte included. A chain without room for a status
    /// byte or a header gets no status and a used length of 0.
    public func execute(_ chain: DescriptorChain) -> UInt32 {
        var iovecs: [iovec] = []
        return execute(chain, iovecs: &iovecs)
    }

    /// ``execute(_:)`` with the caller's scratch array for the host iovecs (kept per queue, so
    /// a request allocates nothing once it has grown to the queue's segment count).
    ///
    /// `chain` must come from a walk of a queue on this handler's `memory` (or be built from
    /// segments checked against it): its segments' host offsets are used as they are.
    public func execute(_ chain: DescriptorChain, iovecs: inout [iovec]) -> UInt32 {
        guard chain.writableCount > 0 else { return 0 }
        let last = chain.storage[chain.segmentCount - 1]
        // The walker never yields an empty segment; a hand-made chain might.
        guard last.length > 0 else { return 0 }
        let base = memory.base
        // The last device-writable byte (§5.2.6: status is the final field).
        let statusByte = base + last.hostOffset + Int(last.length) - 1
        func finish(_ status: UInt8, dataWritten: UInt64 = 0) -> UInt32 {
            statusByte.storeBytes(of: status, as: UInt8.self)
            return UInt32(truncatingIfNeeded: dataWritten + 1)
        }
        guard chain.readableLength >= 16 else { return finish(BlockStatus.ioError) }
        let (type, sector) = header(chain)

        switch type {
        case BlockRequestType.read:
            // §5.2.6.1: data is a multiple of 512 bytes; here also within the disk.
            let length = chain.writableLength - 1
            guard chain.readableLength == 16, length % BlockBackend.sectorSize == 0, length <= Self.maxRequestBytes,
                backend.contains(sector: sector, bytes: length)
            else { return finish(BlockStatus.ioError) }
            if length > 0 {
                do {
                    try transfer(chain, readable: false, skip: 0, count: length, at: sector, write: false, iovecs: &iovecs)
                } catch {
                    return finish(BlockStatus.ioError)
                }
            }
            return finish(BlockStatus.ok, dataWritten: length)
        case BlockRequestType.write:
            let length = chain.readableLength - 16
            // §5.2.6.2: a device offering VIRTIO_BLK_F_RO fails writes.
            guard !backend.readOnly, chain.writableLength == 1, length % BlockBackend.sectorSize == 0, length <= Self.maxRequestBytes,
                backend.contains(sector: sector, bytes: length)
            else { return finish(BlockStatus.ioError) }
            if length > 0 {
                do {
                    try transfer(chain, readable: true, skip: 16, count: length, at: sector, write: true, iovecs: &iovecs)
                } catch {
                    return finish(BlockStatus.ioError)
                }
            }
            return finish(BlockStatus.ok)
        case BlockRequestType.flush:
            do {
                if !backend.readOnly { try backend.flush() }
            } catch {
                return finish(BlockStatus.ioError)
            }
            return finish(BlockStatus.ok)
        case BlockRequestType.getID:
            // §5.2.6: up to VIRTIO_BLK_ID_BYTES (20) bytes, NUL-terminated only if shorter.
            let room = min(chain.writableLength - 1, UInt64(BlockBackend.serialLength))
            serial.withUnsafeBytes { copyIn(chain, from: UnsafeRawBufferPointer(rebasing: $0.prefix(Int(room)))) }
            return finish(BlockStatus.ok, dataWritten: room)
        case BlockRequestType.discard, BlockRequestType.writeZeroes:
            return finish(discardOrZero(chain, zero: type == BlockRequestType.writeZeroes))
        default:
            return finish(BlockStatus.unsupported)
        }
    }

    /// The request header's type and sector (§5.2.6 struct virtio_blk_req); the chain has at
    /// least 16 readable bytes.
    @inline(__always)
    func header(_ chain: DescriptorChain) -> (type: UInt32, sector: UInt64) {
        let first = chain.storage[0]
        if first.length >= 16 {
            // The usual layout: the whole header in the first descriptor.
            let header = memory.base + first.hostOffset
            return (
                UInt32(littleEndian: header.loadUnaligned(as: UInt32.self)),
                UInt64(littleEndian: header.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            )
        }
        var header = (UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &header) { copyOut(chain, readable: true, skip: 0, into: $0) }
        return (UInt32(truncatingIfNeeded: UInt64(littleEndian: header.0)), UInt64(littleEndian: header.1))
    }

    /// What a DISCARD or WRITE_ZEROES request asks for: the byte extent, or the status that
    /// fails it.
    enum DiscardExtent {
        case extent(offset: UInt64, length: UInt64, unmap: Bool)
        case failed(UInt8)
    }

    /// §5.2.6: DISCARD and WRITE_ZEROES carry 16-byte segments {sector, num_sectors, flags};
    /// the device takes one per request (config max_discard_seg = max_write_zeroes_seg =
    /// ``maxDiscardSegments`` = 1). The chain has at least 16 readable bytes.
    func discardExtent(_ chain: DescriptorChain, zero: Bool) -> DiscardExtent {
        let length = chain.readableLength - 16
        guard !backend.readOnly, chain.writableLength == 1, length == 16 else {
            return .failed(BlockStatus.ioError)
        }
        var bytes = (UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &bytes) { copyOut(chain, readable: true, skip: 16, into: $0) }
        let sector = UInt64(littleEndian: bytes.0)
        let count = UInt32(truncatingIfNeeded: UInt64(littleEndian: bytes.1))
        let flags = UInt32(truncatingIfNeeded: UInt64(littleEndian: bytes.1) >> 32)
        // §5.2.6.2: flags other than UNMAP (bit 0, WRITE_ZEROES only) are reserved.
        guard flags & ~UInt32(zero ? 1 : 0) == 0 else { return .failed(BlockStatus.unsupported) }
        let bytesCount = UInt64(count) * BlockBackend.sectorSize
        guard backend.contains(sector: sector, bytes: bytesCount) else { return .failed(BlockStatus.ioError) }
        return .extent(offset: sector * BlockBackend.sectorSize, length: bytesCount, unmap: flags & 1 != 0)
    }

    private func discardOrZero(_ chain: DescriptorChain, zero: Bool) -> UInt8 {
        switch discardExtent(chain, zero: zero) {
        case .failed(let status):
            return status
        case .extent(let offset, let length, let unmap):
            do {
                if zero {
                    try backend.writeZeroes(offset: offset, length: length, unmap: unmap)
                } else {
                    try backend.discard(offset: offset, length: length)
                }
            } catch {
                return BlockStatus.ioError
            }
            return BlockStatus.ok
        }
    }

    /// Moves `count` bytes between the disk at `sector` and the chain's readable (or
    /// writable) segments, starting `skip` bytes into them; the caller checked that the
    /// segments hold `skip + count` bytes. One buffer (the usual 4 KiB request) goes to
    /// pread/pwrite directly; several are gathered into `iovecs`.
    private func transfer(
        _ chain: DescriptorChain, readable: Bool, skip: UInt64, count: UInt64, at sector: UInt64, write: Bool,
        iovecs: inout [iovec]
    ) throws(SyscallError) {
        let offset = sector * BlockBackend.sectorSize
        let range = readable ? 0..<chain.readableCount : chain.readableCount..<chain.segmentCount
        let base = memory.base
        // Fast path: the data lies inside one segment.
        var toSkip = skip
        for i in range {
            let segment = chain.storage[i]
            let length = UInt64(segment.length)
            if toSkip >= length {
                toSkip -= length
                continue
            }
            if count <= length - toSkip {
                var one = iovec(iov_base: base + segment.hostOffset + Int(toSkip), iov_len: Int(count))
                try backend.transfer(&one, count: 1, total: Int(count), at: offset, write: write)
                return
            }
            break
        }
        if iovecs.count < range.count { iovecs = Array(repeating: iovec(), count: max(range.count, 256)) }
        try iovecs.withUnsafeMutableBufferPointer { buffer throws(SyscallError) in
            guard let vectors = buffer.baseAddress else { return }
            let n = gather(chain, range: range, skip: skip, count: count, into: vectors)
            try backend.transfer(vectors, count: n, total: Int(count), at: offset, write: write)
        }
    }

    /// Host iovecs for `count` bytes starting `skip` bytes into the segments `range` of
    /// `chain` (which hold at least `skip + count` bytes); returns how many were filled
    /// (at most `range.count`).
    private func gather(_ chain: DescriptorChain, range: Range<Int>, skip: UInt64, count: UInt64, into vectors: UnsafeMutablePointer<iovec>)
        -> Int
    {
        let base = memory.base
        var n = 0
        chain.forEachPiece(in: range, skip: skip, count: count) { hostOffset, length in
            vectors[n] = iovec(iov_base: base + hostOffset, iov_len: length)
            n += 1
        }
        return n
    }

    /// Copies the chain's readable (or writable) bytes from `skip` on into `destination`
    /// (as many as fit, and as there are).
    func copyOut(_ chain: DescriptorChain, readable: Bool, skip: UInt64, into destination: UnsafeMutableRawBufferPointer) {
        guard let target = destination.baseAddress else { return }
        var at = 0
        chain.forEachPiece(in: chain.segments(readable: readable), skip: skip, count: UInt64(destination.count)) { hostOffset, length in
            (target + at).copyMemory(from: memory.base + hostOffset, byteCount: length)
            at += length
        }
    }

    /// Copies `source` into the chain's writable segments from their start (as much as fits).
    func copyIn(_ chain: DescriptorChain, from source: UnsafeRawBufferPointer) {
        guard let from = source.baseAddress else { return }
        var at = 0
        for i in chain.readableCount..<chain.segmentCount where at < source.count {
            let segment = chain.storage[i]
            let take = min(Int(segment.length), source.count - at)
            (memory.base + segment.hostOffset).copyMemory(from: from + at, byteCount: take)
            at += take
        }
    }
}
