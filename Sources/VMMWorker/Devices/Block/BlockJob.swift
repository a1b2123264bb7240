import Glibc

/// The blocking part of one virtio-blk request, taken off the loop thread: what a worker
/// thread (``IOWorkerPool``) needs to do the system call, and where the loop thread then
/// puts the status. Made from a chain on the loop thread, which checked every address when
/// it walked the chain; the worker only moves data between the disk and those host ranges
/// (through the kernel, or a bounce buffer for O_DIRECT) and never touches the rings or the
/// status byte.
struct BlockJob: Sendable {
    enum Operation: Sendable, Equatable {
        case read, write, flush, discard
        case writeZeroes(unmap: Bool)
    }

    /// A checked range of the host mapping of guest RAM: offset and length.
    struct HostRange: Sendable {
        var offset: Int
        var length: Int
    }

    let head: UInt16
    let operation: Operation
    /// Host offset of the status byte (the chain's last device-writable byte).
    let statusOffset: Int
    /// Byte offset on the disk and byte count: the data of READ and WRITE, the extent of
    /// DISCARD and WRITE_ZEROES.
    let offset: UInt64
    let length: UInt64
    /// READ and WRITE data: the first range (the usual single 4 KiB buffer) and any more.
    var first = HostRange(offset: 0, length: 0)
    var rest: [HostRange] = []

    /// The used length when it succeeds: READ's data and the status byte, else the status.
    var usedOnSuccess: UInt32 {
        operation == .read ? UInt32(truncatingIfNeeded: length + 1) : 1
    }
}

/// How a request was started: finished now (the used length) or handed out as a job.
enum BlockStart {
    case done(UInt32)
    case job(BlockJob)
}

extension BlockRequestHandler {
    /// Starts `chain` with its blocking work as a ``BlockJob`` for a worker thread: READ and
    /// WRITE when `transfers` (O_DIRECT images, where each one waits for the disk), FLUSH,
    /// DISCARD and WRITE_ZEROES always. Everything else, and every request that fails its
    /// checks, is executed now (``execute(_:iovecs:)``, which writes the status).
    func start(_ chain: DescriptorChain, iovecs: inout [iovec], transfers: Bool) -> BlockStart {
        guard chain.writableCount > 0, chain.readableLength >= 16 else { return .done(execute(chain, iovecs: &iovecs)) }
        let last = chain.storage[chain.segmentCount - 1]
        guard last.length > 0 else { return .done(execute(chain, iovecs: &iovecs)) }
        let statusOffset = last.hostOffset + Int(last.length) - 1
        let (type, sector) = header(chain)
        var job: BlockJob?
        switch type {
        case BlockRequestType.read where transfers:
            // The same checks as execute's (§5.2.6.1); a request failing them runs there.
            let length = chain.writableLength - 1
            guard chain.readableLength == 16, length > 0, length % BlockBackend.sectorSize == 0, length <= Self.maxRequestBytes,
                backend.contains(sector: sector, bytes: length)
            else { break }
            job = BlockJob(
                head: chain.head, operation: .read, statusOffset: statusOffset, offset: sector * BlockBackend.sectorSize, length: length)
            ranges(chain, readable: false, skip: 0, count: length, into: &job)
        case BlockRequestType.write where transfers:
            let length = chain.readableLength - 16
            guard !backend.readOnly, chain.writableLength == 1, length > 0, length % BlockBackend.sectorSize == 0,
                length <= Self.maxRequestBytes, backend.contains(sector: sector, bytes: length)
            else { break }
            job = BlockJob(
                head: chain.head, operation: .write, statusOffset: statusOffset, offset: sector * BlockBackend.sectorSize, length: length)
            ranges(chain, readable: true, skip: 16, count: length, into: &job)
        case BlockRequestType.flush:
            job = BlockJob(head: chain.head, operation: .flush, statusOffset: statusOffset, offset: 0, length: 0)
        case BlockRequestType.discard, BlockRequestType.writeZeroes:
            let zero = type == BlockRequestType.writeZeroes
            guard case .extent(let offset, let length, let unmap) = discardExtent(chain, zero: zero) else { break }
            job = BlockJob(
                head: chain.head, operation: zero ? .writeZeroes(unmap: unmap) : .discard, statusOffset: statusOffset, offset: offset,
                length: length)
        default:
            break
        }
        guard let job else { return .done(execute(chain, iovecs: &iovecs)) }
        return .job(job)
    }

    /// The host ranges of `count` bytes starting `skip` bytes into the chain's readable (or
    /// writable) segments, which hold at least `skip + count` bytes, into `job`.
    private func ranges(_ chain: DescriptorChain, readable: Bool, skip: UInt64, count: UInt64, into job: inout BlockJob?) {
        var isFirst = true
        chain.forEachPiece(in: chain.segments(readable: readable), skip: skip, count: count) { hostOffset, length in
            let piece = BlockJob.HostRange(offset: hostOffset, length: length)
            if isFirst {
                job?.first = piece
                isFirst = false
            } else {
                job?.rest.append(piece)
            }
        }
    }

    /// Does `job`'s system call (on a worker thread); returns the status byte's value.
    func perform(_ job: BlockJob) -> UInt8 {
        let base = memory.base
        do {
            switch job.operation {
            case .read, .write:
                let write = job.operation == .write
                if job.rest.isEmpty {
                    var one = iovec(iov_base: base + job.first.offset, iov_len: job.first.length)
                    try backend.transfer(&one, count: 1, total: Int(job.length), at: job.offset, write: write)
                } else {
                    let count = 1 + job.rest.count
                    // At most a queue's worth of segments: on the stack, no allocation.
                    let failed = withUnsafeTemporaryAllocation(of: iovec.self, capacity: count) { vectors -> Bool in
                        guard let start = vectors.baseAddress else { return true }
                        vectors[0] = iovec(iov_base: base + job.first.offset, iov_len: job.first.length)
                        for (i, range) in job.rest.enumerated() {
                            vectors[i + 1] = iovec(iov_base: base + range.offset, iov_len: range.length)
                        }
                        do {
                            try backend.transfer(start, count: count, total: Int(job.length), at: job.offset, write: write)
                            return false
                        } catch {
                            return true
                        }
                    }
                    if failed { return BlockStatus.ioError }
                }
            case .flush:
                if !backend.readOnly { try backend.flush() }
            case .discard:
                try backend.discard(offset: job.offset, length: job.length)
            case .writeZeroes(let unmap):
                try backend.writeZeroes(offset: job.offset, length: job.length, unmap: unmap)
            }
        } catch {
            return BlockStatus.ioError
        }
        return BlockStatus.ok
    }

    /// Stores `status` in `job`'s status byte (on the loop thread, before the chain goes on
    /// the used ring) and returns the used length.
    func finish(_ job: BlockJob, status: UInt8) -> UInt32 {
        (memory.base + job.statusOffset).storeBytes(of: status, as: UInt8.self)
        return status == BlockStatus.ok ? job.usedOnSuccess : 1
    }
}
