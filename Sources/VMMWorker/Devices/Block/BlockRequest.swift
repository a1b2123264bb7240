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

    public init(backend: BlockBackend, memory: GuestMemory) {
        self.backend = backend
        self.memory = memory
    }

    /// Executes `chain`; returns the number of bytes written into its device-writable
    /// buffers (the used length), status byte included. A chain without room for a status
    /// byte or a header gets no status and a used length of 0.
    public func execute(_ chain: DescriptorChain) -> UInt32 {
        var iovecs: [iovec] = []
        return execute(chain, iovecs: &iovecs)
    }

    /// ``execute(_:)`` with the caller's scratch array for the host iovecs (kept per queue, so
    /// a request allocates nothing once its capacity has grown to the queue's segment count).
    public func execute(_ chain: DescriptorChain, iovecs: inout [iovec]) -> UInt32 {
        guard chain.writableLength >= 1, let last = chain.writable.last else { return 0 }
        let statusAddress = last.address + UInt64(last.length) - 1
        func finish(_ status: UInt8, dataWritten: UInt64 = 0) -> UInt32 {
            // The status address was checked when the chain was walked.
            try? memory.write(status, at: statusAddress)
            return UInt32(truncatingIfNeeded: dataWritten + 1)
        }
        guard chain.readableLength >= 16, let first = chain.readable.first else { return finish(BlockStatus.ioError) }
        let type: UInt32
        var sector: UInt64 = 0
        if first.length >= 16, let header = try? memory.hostPointer(first.address, length: 16) {
            // The usual layout: the whole header in the first descriptor.
            type = UInt32(littleEndian: header.loadUnaligned(as: UInt32.self))
            sector = UInt64(littleEndian: header.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        } else {
            guard let header = try? gather(chain.readable, skip: 0, count: 16, of: chain.readableLength) else {
                return finish(BlockStatus.ioError)
            }
            var headerBytes = [UInt8](repeating: 0, count: 16)
            copyOut(header, into: &headerBytes)
            type = UInt32(headerBytes[0]) | UInt32(headerBytes[1]) << 8 | UInt32(headerBytes[2]) << 16 | UInt32(headerBytes[3]) << 24
            for i in 0..<8 { sector |= UInt64(headerBytes[8 + i]) << (8 * UInt64(i)) }
        }

        switch type {
        case BlockRequestType.read:
            // §5.2.6.1: data is a multiple of 512 bytes; here also within the disk.
            let length = chain.writableLength - 1
            guard chain.readableLength == 16, length % BlockBackend.sectorSize == 0, length <= Self.maxRequestBytes,
                backend.contains(sector: sector, bytes: length),
                (try? gather(chain.writable, skip: 0, count: length, of: chain.writableLength, into: &iovecs)) != nil
            else { return finish(BlockStatus.ioError) }
            do {
                if length > 0 { try backend.transfer(&iovecs, total: Int(length), at: sector * BlockBackend.sectorSize, write: false) }
            } catch {
                return finish(BlockStatus.ioError)
            }
            return finish(BlockStatus.ok, dataWritten: length)
        case BlockRequestType.write:
            let length = chain.readableLength - 16
            // §5.2.6.2: a device offering VIRTIO_BLK_F_RO fails writes.
            guard !backend.readOnly, chain.writableLength == 1, length % BlockBackend.sectorSize == 0, length <= Self.maxRequestBytes,
                backend.contains(sector: sector, bytes: length),
                (try? gather(chain.readable, skip: 16, count: length, of: chain.readableLength, into: &iovecs)) != nil
            else { return finish(BlockStatus.ioError) }
            do {
                if length > 0 { try backend.transfer(&iovecs, total: Int(length), at: sector * BlockBackend.sectorSize, write: true) }
            } catch {
                return finish(BlockStatus.ioError)
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
            guard let iovecs = try? gather(chain.writable, skip: 0, count: room, of: chain.writableLength) else {
                return finish(BlockStatus.ioError)
            }
            backend.serial.withUnsafeBytes { source in
                var at = 0
                for v in iovecs {
                    guard let base = v.iov_base, let from = source.baseAddress else { continue }
                    base.copyMemory(from: from + at, byteCount: v.iov_len)
                    at += v.iov_len
                }
            }
            return finish(BlockStatus.ok, dataWritten: room)
        case BlockRequestType.discard, BlockRequestType.writeZeroes:
            return finish(discardOrZero(chain, zero: type == BlockRequestType.writeZeroes))
        default:
            return finish(BlockStatus.unsupported)
        }
    }

    /// §5.2.6: DISCARD and WRITE_ZEROES carry 16-byte segments {sector, num_sectors, flags}.
    private func discardOrZero(_ chain: DescriptorChain, zero: Bool) -> UInt8 {
        let length = chain.readableLength - 16
        guard !backend.readOnly, chain.writableLength == 1, length > 0, length % 16 == 0,
            length / 16 <= Self.maxDiscardSegments,
            let iovecs = try? gather(chain.readable, skip: 16, count: length, of: chain.readableLength)
        else { return BlockStatus.ioError }
        var bytes = [UInt8](repeating: 0, count: Int(length))
        copyOut(iovecs, into: &bytes)
        for index in 0..<Int(length / 16) {
            let base = index * 16
            var sector: UInt64 = 0
            for i in 0..<8 { sector |= UInt64(bytes[base + i]) << (8 * UInt64(i)) }
            var count: UInt32 = 0
            for i in 0..<4 { count |= UInt32(bytes[base + 8 + i]) << (8 * UInt32(i)) }
            var flags: UInt32 = 0
            for i in 0..<4 { flags |= UInt32(bytes[base + 12 + i]) << (8 * UInt32(i)) }
            // §5.2.6.2: flags other than UNMAP (bit 0, WRITE_ZEROES only) are reserved.
            guard flags & ~UInt32(zero ? 1 : 0) == 0 else { return BlockStatus.unsupported }
            let bytesCount = UInt64(count) * BlockBackend.sectorSize
            guard backend.contains(sector: sector, bytes: bytesCount) else { return BlockStatus.ioError }
            do {
                if zero {
                    try backend.writeZeroes(offset: sector * BlockBackend.sectorSize, length: bytesCount, unmap: flags & 1 != 0)
                } else {
                    try backend.discard(offset: sector * BlockBackend.sectorSize, length: bytesCount)
                }
            } catch {
                return BlockStatus.ioError
            }
        }
        return BlockStatus.ok
    }

    /// Host iovecs for `count` bytes starting `skip` bytes into `segments` (whose total is
    /// `total`). Every segment was checked against guest RAM when the chain was walked; the
    /// translation is checked again here.
    func gather(_ segments: [GuestSegment], skip: UInt64, count: UInt64, of total: UInt64) throws(MemoryError) -> [iovec] {
        var result: [iovec] = []
        try gather(segments, skip: skip, count: count, of: total, into: &result)
        return result
    }

    /// ``gather(_:skip:count:of:)`` into `result`, emptied first (its storage is reused).
    func gather(_ segments: [GuestSegment], skip: UInt64, count: UInt64, of total: UInt64, into result: inout [iovec])
        throws(MemoryError)
    {
        result.removeAll(keepingCapacity: true)
        guard skip <= total, count <= total - skip else { throw MemoryError(.outOfRange, "request shorter than its layout") }
        result.reserveCapacity(segments.count)
        var toSkip = skip
        var left = count
        for segment in segments where left > 0 {
            let length = UInt64(segment.length)
            if toSkip >= length {
                toSkip -= length
                continue
            }
            let take = min(length - toSkip, left)
            let pointer = try memory.hostPointer(segment.address + toSkip, length: take)
            result.append(iovec(iov_base: pointer, iov_len: Int(take)))
            left -= take
            toSkip = 0
        }
    }

    func copyOut(_ iovecs: [iovec], into bytes: inout [UInt8]) {
        bytes.withUnsafeMutableBytes { destination in
            var at = 0
            for v in iovecs {
                guard let base = v.iov_base, let target = destination.baseAddress, at + v.iov_len <= destination.count else { continue }
                (target + at).copyMemory(from: base, byteCount: v.iov_len)
                at += v.iov_len
            }
        }
    }
}
