/// Numbers of the virtio socket device (virtio 1.2 §5.10).
enum Vsock {
    /// §5.10.1: VMADDR_CID_HOST, the only peer this device connects the guest to.
    static let hostCID: UInt64 = 2
    /// §5.10.3: VIRTIO_VSOCK_F_STREAM. A device that offers no type feature acts as if STREAM
    /// were negotiated (backwards compatibility), so a driver that does not know the bit
    /// (Linux 6.1) gets the same stream sockets.
    static let featureStream: UInt64 = 1 << 0
    /// §5.10.2: receiveq, transmitq, eventq.
    static let receiveQueue = 0
    static let transmitQueue = 1
    static let eventQueue = 2
    /// §5.10.6: struct virtio_vsock_hdr is 44 bytes, little-endian, packed.
    static let headerSize = 44
    /// The largest payload of one packet this device accepts or sends: Linux's
    /// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE, and the brief's bound on what a guest may make it copy.
    static let maxPayload = 64 << 10
    /// §5.10.6: type VIRTIO_VSOCK_TYPE_STREAM (SEQPACKET, 2, is not offered).
    static let typeStream: UInt16 = 1

    /// §5.10.6: op.
    enum Op {
        static let invalid: UInt16 = 0
        static let request: UInt16 = 1
        static let response: UInt16 = 2
        static let reset: UInt16 = 3
        static let shutdown: UInt16 = 4
        static let readWrite: UInt16 = 5
        static let creditUpdate: UInt16 = 6
        static let creditRequest: UInt16 = 7
    }

    /// §5.10.6.5: VIRTIO_VSOCK_SHUTDOWN_RCV / _SEND (flags of OP_SHUTDOWN).
    static let shutdownReceive: UInt32 = 1
    static let shutdownSend: UInt32 = 2
    static let shutdownBoth: UInt32 = 3
}

/// struct virtio_vsock_hdr (§5.10.6), decoded from or encoded to its 44 little-endian bytes.
struct VsockHeader: Equatable, Sendable {
    var sourceCID: UInt64 = 0
    var destinationCID: UInt64 = 0
    var sourcePort: UInt32 = 0
    var destinationPort: UInt32 = 0
    var length: UInt32 = 0
    var type: UInt16 = Vsock.typeStream
    var op: UInt16 = 0
    var flags: UInt32 = 0
    var bufferAllocation: UInt32 = 0
    var forwardCount: UInt32 = 0

    init(
        sourceCID: UInt64 = 0, destinationCID: UInt64 = 0, sourcePort: UInt32 = 0, destinationPort: UInt32 = 0,
        length: UInt32 = 0, type: UInt16 = Vsock.typeStream, op: UInt16 = 0, flags: UInt32 = 0, bufferAllocation: UInt32 = 0,
        forwardCount: UInt32 = 0
    ) {
        self.sourceCID = sourceCID
        self.destinationCID = destinationCID
        self.sourcePort = sourcePort
        self.destinationPort = destinationPort
        self.length = length
        self.type = type
        self.op = op
        self.flags = flags
        self.bufferAllocation = bufferAllocation
        self.forwardCount = forwardCount
    }

    /// Decodes the first 44 bytes of `raw` (the caller checked there are that many).
    init(_ raw: UnsafeRawBufferPointer) {
        func field<T: FixedWidthInteger>(_ offset: Int, _: T.Type) -> T {
            T(littleEndian: raw.loadUnaligned(fromByteOffset: offset, as: T.self))
        }
        sourceCID = field(0, UInt64.self)
        destinationCID = field(8, UInt64.self)
        sourcePort = field(16, UInt32.self)
        destinationPort = field(20, UInt32.self)
        length = field(24, UInt32.self)
        type = field(28, UInt16.self)
        op = field(30, UInt16.self)
        flags = field(32, UInt32.self)
        bufferAllocation = field(36, UInt32.self)
        forwardCount = field(40, UInt32.self)
    }

    /// Encodes into the first 44 bytes of `raw`.
    func encode(into raw: UnsafeMutableRawBufferPointer) {
        func put<T: FixedWidthInteger>(_ value: T, _ offset: Int) {
            raw.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
        }
        put(sourceCID, 0)
        put(destinationCID, 8)
        put(sourcePort, 16)
        put(destinationPort, 20)
        put(length, 24)
        put(type, 28)
        put(op, 30)
        put(flags, 32)
        put(bufferAllocation, 36)
        put(forwardCount, 40)
    }

    var bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: Vsock.headerSize)
        out.withUnsafeMutableBytes { encode(into: $0) }
        return out
    }
}
