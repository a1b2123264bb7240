import CLinux
import Glibc
import Protocol

/// A disk image opened for a virtio-blk device: a raw file or a block device, read-only or
/// read-write, with or without O_DIRECT, advisory-locked against other VMs.
///
/// Sendable: every stored property is immutable; the descriptor is used with positioned
/// I/O only (pread/pwrite families), which needs no shared file offset.
public final class BlockBackend: Sendable {
    public static let sectorSize: UInt64 = 512
    /// virtio-blk GET_ID answers with 20 bytes (§5.2.6 VIRTIO_BLK_ID_BYTES).
    public static let serialLength = 20
    /// Memory and length alignment for O_DIRECT; buffers that miss it go through a bounce
    /// buffer. 512 is the logical block size of the devices this runs on; the bounce buffer
    /// itself is page-aligned.
    public static let directAlignment: UInt64 = 512

    public let id: String
    public let path: String
    public let readOnly: Bool
    public let direct: Bool
    public let sizeBytes: UInt64
    public let isBlockDevice: Bool
    /// The serial number, NUL-padded to 20 bytes.
    public let serial: [UInt8]
    let fd: Int32

    public var capacitySectors: UInt64 { sizeBytes / Self.sectorSize }

    /// Opens `drive.path`. Errors name the drive, the path and what went wrong: missing,
    /// unreadable, not a file or block device, O_DIRECT unsupported, or locked by another
    /// process (a writable image is locked exclusively, a read-only one shared).
    public init(drive: DriveConfig) throws(DeviceError) {
        id = drive.id
        path = drive.path
        readOnly = drive.readOnly
        direct = drive.direct
        serial = Self.paddedSerial(drive.serial ?? "")

        let what = "drive '\(drive.id)': image \(drive.path)"
        var opened = fl_open_image(drive.path, drive.readOnly ? 0 : 1, drive.direct ? 1 : 0)
        if opened < 0 && errno == EINTR { opened = fl_open_image(drive.path, drive.readOnly ? 0 : 1, drive.direct ? 1 : 0) }
        guard opened >= 0 else {
            let code = errno
            let hint =
                switch code {
                case ENOENT: "it does not exist"
                case EACCES, EPERM:
                    drive.readOnly ? "it is not readable" : "it is not readable and writable (use readonly=on for a read-only image)"
                case EROFS: "it is on a read-only file system (use readonly=on)"
                case EINVAL where drive.direct: "its file system does not support O_DIRECT (use direct=off)"
                case EISDIR: "it is a directory"
                default: "open failed"
                }
            throw DeviceError(.image, "\(what): \(hint)", cause: SyscallError("open", .init(rawValue: code)))
        }
        var isBlock: Int32 = 0
        let size = fl_image_size(opened, &isBlock)
        guard size >= 0 else {
            let code = errno
            Syscall.close(opened)
            throw DeviceError(.image, "\(what): not a regular file or block device", cause: SyscallError("fstat", .init(rawValue: code)))
        }
        // Advisory lock: two VMs must not open one writable image (QEMU's image locking
        // does the same with OFD locks). Shared for read-only images, so several read-only
        // users may coexist but never with a writer.
        guard fl_lock_image(opened, drive.readOnly ? 0 : 1) == 0 else {
            let code = errno
            Syscall.close(opened)
            if code == EWOULDBLOCK {
                throw DeviceError(.locked, "\(what) is locked by another process (already in use by another VM?)")
            }
            throw DeviceError(.image, "\(what): cannot lock it", cause: SyscallError("flock", .init(rawValue: code)))
        }
        fd = opened
        sizeBytes = UInt64(size)
        isBlockDevice = isBlock != 0
    }

    deinit { Syscall.close(fd) }

    /// `text`'s first 20 bytes, NUL-padded to 20 (GET_ID's answer).
    static func paddedSerial(_ text: String) -> [UInt8] {
        let bytes = Array(text.utf8.prefix(serialLength))
        return bytes + [UInt8](repeating: 0, count: serialLength - bytes.count)
    }

    // MARK: I/O (the device's event loop thread)

    /// Whether `[sector, sector + bytes/512)` lies inside the disk (overflow-safe).
    func contains(sector: UInt64, bytes: UInt64) -> Bool {
        let sectors = bytes / Self.sectorSize
        let capacity = capacitySectors
        return sector <= capacity && sectors <= capacity - sector
    }

    /// Reads or writes the `count` host iovecs at `vectors` (guest memory, `total` bytes) at
    /// byte `offset`, whole, handling short transfers and EINTR; through a page-aligned bounce
    /// buffer when O_DIRECT cannot take the guest's buffers as they are. The iovecs may be
    /// advanced in place.
    func transfer(_ vectors: UnsafeMutablePointer<iovec>, count: Int, total: Int, at offset: UInt64, write: Bool) throws(SyscallError) {
        if direct && !Self.aligned(vectors, count: count) {
            try bounced(vectors, count: count, total: total, at: offset, write: write)
            return
        }
        try Self.transferAll(fd: fd, vectors, count: count, at: offset, write: write)
    }

    static func aligned(_ vectors: UnsafePointer<iovec>, count: Int) -> Bool {
        let mask = UInt(directAlignment - 1)
        for v in UnsafeBufferPointer(start: vectors, count: count) {
            guard let base = v.iov_base, UInt(bitPattern: base) & mask == 0, UInt(v.iov_len) & mask == 0 else { return false }
        }
        return true
    }

    private func bounced(_ vectors: UnsafePointer<iovec>, count: Int, total: Int, at offset: UInt64, write: Bool) throws(SyscallError) {
        guard total > 0 else { return }
        guard let buffer = fl_aligned_alloc(4096, UInt64(total)) else { throw SyscallError("posix_memalign", .noMemory) }
        defer { free(buffer) }
        let iovecs = UnsafeBufferPointer(start: vectors, count: count)
        if write {
            var at = 0
            for v in iovecs {
                guard let base = v.iov_base else { continue }
                (buffer + at).copyMemory(from: base, byteCount: v.iov_len)
                at += v.iov_len
            }
        }
        try Self.transferAll(fd: fd, buffer, count: total, at: offset, write: write)
        if !write {
            var at = 0
            for v in iovecs {
                guard let base = v.iov_base else { continue }
                base.copyMemory(from: buffer + at, byteCount: v.iov_len)
                at += v.iov_len
            }
        }
    }

    /// preadv/pwritev until every byte moved; EINTR retried; a read hitting end of file
    /// (the image shrank under us) is EIO. The iovecs are advanced in place.
    static func transferAll(fd: Int32, _ iovecs: UnsafeMutablePointer<iovec>, count: Int, at offset: UInt64, write: Bool)
        throws(SyscallError)
    {
        if count == 1, let base = iovecs[0].iov_base {
            // One contiguous buffer (the usual 4 KiB request): pread/pwrite, which skip
            // preadv's iovec import in the kernel.
            try transferAll(fd: fd, base, count: iovecs[0].iov_len, at: offset, write: write)
            return
        }
        var position = offset
        var first = 0
        while first < count {
            let batch = Int32(min(count - first, 1024))
            let done = write ? pwritev(fd, iovecs + first, batch, off_t(position)) : preadv(fd, iovecs + first, batch, off_t(position))
            if done < 0 {
                if errno == EINTR { continue }
                throw SyscallError(write ? "pwritev" : "preadv", .init(rawValue: errno))
            }
            if done == 0 { throw SyscallError(write ? "pwritev" : "preadv", .ioError) }
            position += UInt64(done)
            var left = done
            while left > 0 && first < count {
                if left >= iovecs[first].iov_len {
                    left -= iovecs[first].iov_len
                    first += 1
                } else {
                    iovecs[first].iov_base = iovecs[first].iov_base.map { $0 + left }
                    iovecs[first].iov_len -= left
                    left = 0
                }
            }
            while first < count && iovecs[first].iov_len == 0 { first += 1 }
        }
    }

    /// ``transferAll(fd:_:at:write:)`` for one buffer of `count` bytes at `buffer`.
    static func transferAll(fd: Int32, _ buffer: UnsafeMutableRawPointer, count: Int, at offset: UInt64, write: Bool)
        throws(SyscallError)
    {
        var done = 0
        while done < count {
            let position = off_t(offset + UInt64(done))
            let n = write ? pwrite(fd, buffer + done, count - done, position) : pread(fd, buffer + done, count - done, position)
            if n < 0 {
                if errno == EINTR { continue }
                throw SyscallError(write ? "pwrite" : "pread", .init(rawValue: errno))
            }
            if n == 0 { throw SyscallError(write ? "pwrite" : "pread", .ioError) }
            done += n
        }
    }

    func flush() throws(SyscallError) {
        _ = try Syscall.retrying("fdatasync") { fdatasync(fd) }
    }

    /// Deallocates `[offset, offset + length)` (VIRTIO_BLK_T_DISCARD). A hint: where the file
    /// system cannot punch holes, nothing happens and the request still succeeds.
    func discard(offset: UInt64, length: UInt64) throws(SyscallError) {
        if fl_punch_hole(fd, offset, length) == 0 { return }
        let code = errno
        if code == EOPNOTSUPP || code == ENOSYS || code == EINVAL { return }
        throw SyscallError("fallocate(PUNCH_HOLE)", .init(rawValue: code))
    }

    /// Zeroes `[offset, offset + length)` (VIRTIO_BLK_T_WRITE_ZEROES): a hole when `unmap`
    /// allows it, else FALLOC_FL_ZERO_RANGE, else written zeroes.
    func writeZeroes(offset: UInt64, length: UInt64, unmap: Bool) throws(SyscallError) {
        if unmap && !isBlockDevice && fl_punch_hole(fd, offset, length) == 0 { return }
        if fl_zero_range(fd, offset, length) == 0 { return }
        let chunk = 1 << 20
        guard let zeroes = fl_aligned_alloc(4096, UInt64(chunk)) else { throw SyscallError("posix_memalign", .noMemory) }
        defer { free(zeroes) }
        memset(zeroes, 0, chunk)
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(chunk), length - done))
            try Self.transferAll(fd: fd, zeroes, count: n, at: offset + done, write: true)
            done += UInt64(n)
        }
    }
}
