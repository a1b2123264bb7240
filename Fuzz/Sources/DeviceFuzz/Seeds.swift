import FuzzSupport

@testable import VMMWorker

/// Builds inputs in the byte layout DeviceCase decodes (all little-endian):
///
///     0      device: byte % 10 — blk, rng, net receive, net transmit, console receive,
///            console transmit, balloon inflate, balloon deflate, vsock receive, vsock
///            transmit (Kind)
///     1      flags: 1 EVENT_IDX, 2 INDIRECT_DESC, 4 a second kick after the driver sets avail
///            idx again, 8 the device's variant (DeviceCase.variant)
///     2      queue size: 1 << (byte % 9), so 1...256
///     3..10  u16 offsets from the window base of the descriptor table (aligned down to 16),
///            the avail ring (to 2), the used ring (to 4) and the blob
///     11..18 u16 avail flags, avail idx, used_event, avail idx for the second kick
///     19..20 u16 parameter of the variant (port room, rate, read-only or IOPS, the virtio-net
///            features negotiated: netFeatures)
///     then   16·size bytes of descriptor table, 2·size bytes of avail ring entries, a u16
///            blob length and the blob (buffers, indirect tables; at most 16 KiB), each cut
///            short where the input ends; the rest is the host side: frames for the tap (each
///            a u16 length, mod 2048, and the bytes) or input for the console port
struct DeviceSeed {
    static let buffers = windowBase + 0x3000

    var name: String
    var kind: Kind
    var flags: UInt8 = 0
    var size: UInt16 = 8
    var offsets: [UInt16] = [0, 0x1000, 0x2000, 0x3000]
    var availFlags: UInt16 = 0
    var availIndex: UInt16 = 0
    var usedEvent: UInt16 = 0
    var availIndex2: UInt16 = 0
    var param: UInt16 = 0
    var table: [UInt8]
    var ring: [UInt16] = []
    var blob: [UInt8] = []
    var host: [UInt8] = []

    init(_ name: String, _ kind: Kind, flags: UInt8 = 0, size: UInt16 = 8) {
        self.name = name
        self.kind = kind
        self.flags = flags
        self.size = size
        table = [UInt8](repeating: 0, count: 16 * Int(size))
    }

    /// Descriptor `i` of the queue's table.
    mutating func d(_ i: UInt16, _ address: UInt64, _ length: UInt32, flags: UInt16 = 0, next: UInt16 = 0) {
        table.replaceSubrange(16 * Int(i)..<16 * Int(i) + 16, with: le(address) + le(length) + le(flags) + le(next))
    }

    /// `bytes` at `offset` into the blob (at the buffers' address).
    mutating func put(_ bytes: [UInt8], at offset: Int) {
        if blob.count < offset + bytes.count { blob += [UInt8](repeating: 0, count: offset + bytes.count - blob.count) }
        blob.replaceSubrange(offset..<offset + bytes.count, with: bytes)
    }

    /// Makes `heads` available (avail idx = their count).
    mutating func publish(_ heads: UInt16...) {
        ring += heads
        availIndex = UInt16(ring.count)
    }

    var bytes: [UInt8] {
        var out: [UInt8] = [kind.rawValue, flags, UInt8(size.trailingZeroBitCount)]
        for v in offsets + [availFlags, availIndex, usedEvent, availIndex2, param] { out += le(v) }
        out += table
        var entries = ring.flatMap { le($0) }
        entries += [UInt8](repeating: 0, count: max(0, 2 * Int(size) - entries.count))
        out += entries.prefix(2 * Int(size))
        return out + le(UInt16(blob.count)) + blob + host
    }
}

/// A virtio-blk request header (§5.2.6): type, reserved, sector.
func blockHeader(_ type: UInt32, sector: UInt64) -> [UInt8] { le(type) + le(UInt32(0)) + le(sector) }

/// Small valid and malformed requests for every device.
func deviceSeeds() -> [(String, [UInt8])] {
    let b = DeviceSeed.buffers
    var all: [DeviceSeed] = []
    func add(_ name: String, _ kind: Kind, flags: UInt8 = 0, size: UInt16 = 8, _ build: (inout DeviceSeed) -> Void) {
        var s = DeviceSeed(name, kind, flags: flags, size: size)
        build(&s)
        all.append(s)
    }
    // virtio-blk: header readable, data, status byte last (§5.2.6).
    add("blk-read", .block) { s in
        s.put(blockHeader(0, sector: 1), at: 0)
        s.d(0, b, 16, flags: 1, next: 1)
        s.d(1, b + 0x200, 512, flags: 1 | 2, next: 2)
        s.d(2, b + 0x400, 1, flags: 2)
        s.publish(0)
    }
    add("blk-write-then-read", .block, flags: 1) { s in
        s.put(blockHeader(1, sector: 2), at: 0)
        s.put(blockHeader(0, sector: 2), at: 0x10)
        s.d(0, b, 16, flags: 1, next: 1)
        s.d(1, b + 0x200, 512, flags: 1, next: 2)
        s.d(2, b + 0x400, 1, flags: 2)
        s.d(3, b + 0x10, 16, flags: 1, next: 4)
        s.d(4, b + 0x800, 512, flags: 1 | 2, next: 5)
        s.d(5, b + 0x401, 1, flags: 2)
        s.publish(0, 3)
    }
    for (name, type) in [("blk-flush", UInt32(4)), ("blk-get-id", 8), ("blk-unsupported", 99)] {
        add(name, .block) { s in
            s.put(blockHeader(type, sector: 0), at: 0)
            s.d(0, b, 16, flags: 1, next: 1)
            s.d(1, b + 0x100, 21, flags: 2)
            s.publish(0)
        }
    }
    for (name, type, segmentFlags) in [("blk-discard", UInt32(11), UInt32(0)), ("blk-write-zeroes", 13, 1)] {
        add(name, .block) { s in
            s.put(blockHeader(type, sector: 0) + le(UInt64(8)) + le(UInt32(8)) + le(segmentFlags), at: 0)
            s.d(0, b, 32, flags: 1, next: 1)
            s.d(1, b + 0x100, 1, flags: 2)
            s.publish(0)
        }
    }
    add("blk-read-only-write", .block, flags: 8) { s in
        s.put(blockHeader(1, sector: 0), at: 0)
        s.d(0, b, 16 + 512, flags: 1, next: 1)
        s.d(1, b + 0x400, 1, flags: 2)
        s.publish(0)
    }
    add("blk-indirect-split-header", .block, flags: 2) { s in
        s.put(blockHeader(0, sector: 3), at: 0x1000)
        s.put(le(b + 0x1000) + le(UInt32(5)) + le(UInt16(1)) + le(UInt16(1)), at: 0)
        s.put(le(b + 0x1005) + le(UInt32(11)) + le(UInt16(1)) + le(UInt16(2)), at: 16)
        s.put(le(b + 0x1200) + le(UInt32(1024)) + le(UInt16(1 | 2)) + le(UInt16(3)), at: 32)
        s.put(le(b + 0x1600) + le(UInt32(1)) + le(UInt16(2)) + le(UInt16(0)), at: 48)
        s.d(0, b, 64, flags: 4)
        s.publish(0)
    }
    add("blk-throttled", .block, flags: 8) { s in
        s.param = 3
        s.put(blockHeader(4, sector: 0), at: 0)
        for i in UInt16(0)..<4 {
            s.d(2 * i, b, 16, flags: 1, next: 2 * i + 1)
            s.d(2 * i + 1, b + 0x100 + UInt64(i), 1, flags: 2)
        }
        s.publish(0, 2, 4, 6)
    }
    add("blk-avail-idx-jump", .block) { s in
        s.publish(0)
        s.availIndex = 9
    }
    add("blk-head-beyond-size", .block) { s in
        s.put(blockHeader(4, sector: 0), at: 0)
        s.d(0, b, 16, flags: 1, next: 1)
        s.d(1, b + 0x100, 1, flags: 2)
        s.publish(0, 200)
    }
    add("blk-rings-overlap", .block) { s in
        s.offsets = [0, 0x1000, 0x1000, 0x3000]
        s.d(0, b, 16, flags: 1, next: 1)
        s.d(1, windowBase + 0x1000, 8, flags: 2)
        s.publish(0, 0)
    }
    // virtio-rng: device-writable buffers only (§5.4.6.1).
    add("rng-two-rounds-event-idx", .rng, flags: 1 | 4) { s in
        s.d(0, b, 64, flags: 2)
        s.d(1, b + 0x100, 16, flags: 2 | 1, next: 2)
        s.d(2, b + 0x200, 4, flags: 2)
        s.d(3, b + 0x300, 8)
        s.publish(0, 1)
        s.ring += [3, 0]
        s.usedEvent = 1
        s.availIndex2 = 4
    }
    add("rng-throttled", .rng, flags: 8) { s in
        for i in UInt16(0)..<8 { s.d(i, b + 0x100 * UInt64(i), 128, flags: 2) }
        s.publish(0, 1, 2, 3, 4, 5, 6, 7)
    }
    // virtio-net: transmit is the 12-byte header and a frame; receive chains take a frame each.
    add("net-transmit", .netTransmit) { s in
        s.put(
            [UInt8](repeating: 0, count: 12) + [UInt8](repeating: 0xff, count: 6) + [2, 0, 0, 0, 0, 1, 8, 0]
                + [UInt8](repeating: 7, count: 46), at: 0)
        s.d(0, b, 12, flags: 1, next: 1)
        s.d(1, b + 12, 60)
        s.d(2, b, 20)
        s.publish(0, 2)
    }
    add("net-receive", .netReceive) { s in
        s.d(0, b, 1526, flags: 2)
        s.d(1, b + 0x800, 5, flags: 2 | 1, next: 2)
        s.d(2, b + 0x900, 40, flags: 2)
        s.d(3, b + 0xa00, 64, flags: 2)
        s.publish(0, 1, 3)
        let frame =
            [UInt8](repeating: 0xee, count: 12) + [UInt8](repeating: 0xff, count: 6) + [2, 0, 0, 0, 0, 1, 8, 0]
            + [UInt8](repeating: 9, count: 46)
        s.host = le(UInt16(frame.count)) + frame + le(UInt16(30)) + Array(frame.prefix(30)) + le(UInt16(200)) + frame + frame + frame
    }
    // virtio-net with offloads: a TCPv4 GSO frame with NEEDS_CSUM out (every feature taken);
    // frames into mergeable buffers, each chain too small for a whole one (MRG_RXBUF, GUEST_CSUM).
    add("net-transmit-offloads", .netTransmit, flags: 8) { s in
        s.param = 0x7ff
        // flags NEEDS_CSUM, gso_type TCPV4, hdr_len 54, gso_size 1448, csum_start 34, csum_offset 16.
        let header: [UInt8] = [1, 1] + le(UInt16(54)) + le(UInt16(1448)) + le(UInt16(34)) + le(UInt16(16)) + [0, 0]
        s.put(header + [UInt8](repeating: 0xff, count: 6) + [2, 0, 0, 0, 0, 1, 8, 0] + [UInt8](repeating: 7, count: 3000), at: 0)
        s.d(0, b, 12, flags: 1, next: 1)
        s.d(1, b + 12, 3014)
        s.publish(0)
    }
    add("net-receive-mergeable", .netReceive, flags: 8) { s in
        s.param = 0x102
        for i in UInt16(0)..<6 { s.d(i, b + 0x100 * UInt64(i), 40, flags: 2) }
        s.publish(0, 1, 2, 3, 4, 5)
        let frame =
            [UInt8](repeating: 0, count: 12) + [UInt8](repeating: 0xff, count: 6) + [2, 0, 0, 0, 0, 1, 8, 0]
            + [UInt8](repeating: 9, count: 60)
        s.host = le(UInt16(frame.count)) + frame + le(UInt16(frame.count)) + frame
    }
    // virtio-console: transmit readable bytes out; receive fills writable buffers with input.
    add("console-transmit", .consoleTransmit) { s in
        s.put(Array("hello world".utf8), at: 0)
        s.d(0, b, 6, flags: 1, next: 1)
        s.d(1, b + 6, 5)
        s.publish(0)
    }
    add("console-transmit-full-port", .consoleTransmit, flags: 8 | 4) { s in
        s.param = 3
        s.put(Array("12345".utf8), at: 0)
        s.d(0, b, 5)
        s.d(1, b, 2, flags: 1, next: 2)
        s.d(2, b + 2, 3)
        s.publish(0, 1)
        s.ring += [0]
        s.availIndex2 = 3
    }
    add("console-receive", .consoleReceive) { s in
        s.d(0, b, 4, flags: 2)
        s.d(1, b + 0x100, 64, flags: 2)
        s.d(2, b + 0x200, 16)
        s.publish(0, 2, 1)
        s.host = Array("abcdefghij".utf8)
    }
    // virtio-balloon: readable arrays of 4 KiB PFNs (§5.5.6).
    add("balloon-inflate", .balloonInflate) { s in
        s.put([0x1f8, 0x1f9, 0x1fa, 0x9999, 0x10_0000, 0x1f8].flatMap { le(UInt32($0)) }, at: 0)
        s.d(0, b, 14, flags: 1, next: 1)
        s.d(1, b + 14, 10)
        s.publish(0)
    }
    add("balloon-inflate-large-ram", .balloonInflate, flags: 8) { s in
        s.put([0xc_0000 - 1, 0xc_0000, 0xf_ffff, 0x10_0000, 0x10_01ff, 0x10_0200, 0x1fb].flatMap { le(UInt32($0)) }, at: 0)
        s.d(0, b, 28)
        s.publish(0)
    }
    add("balloon-deflate", .balloonDeflate) { s in
        s.put([0x10, 0x11, 0xffff_ffff].flatMap { le(UInt32($0)) }, at: 0)
        s.d(0, b, 12)
        s.d(1, b, 0x4000)
        s.publish(0, 1)
    }
    // virtio-vsock (guest CID 3): transmit packets are a 44-byte header and the payload;
    // host port 1 listens. Receive chains take the packets a host client's CONNECT causes.
    func vsock(_ op: UInt16, from port: UInt32 = 7, to hostPort: UInt32 = 1, length: UInt32 = 0, flags: UInt32 = 0, cid: UInt64 = 3)
        -> [UInt8]
    {
        le(cid) + le(UInt64(2)) + le(port) + le(hostPort) + le(length) + le(UInt16(1)) + le(op) + le(flags) + le(UInt32(4096))
            + le(UInt32(0))
    }
    add("vsock-transmit", .vsockTransmit) { s in
        s.put(vsock(1), at: 0)
        s.put(vsock(5, length: 5) + Array("hello".utf8), at: 0x40)
        s.put(vsock(7), at: 0x80)
        s.put(vsock(4, flags: 3), at: 0xc0)
        s.put(vsock(1, to: 9), at: 0x100)
        s.put(vsock(1, cid: 4), at: 0x140)
        s.put(vsock(5, length: 9) + Array("split".utf8), at: 0x180)
        s.d(0, b, 44)
        s.d(1, b + 0x40, 20, flags: 1, next: 2)
        s.d(2, b + 0x54, 29)
        s.d(3, b + 0x80, 44)
        s.d(4, b + 0xc0, 44)
        s.d(5, b + 0x100, 44)
        s.d(6, b + 0x140, 44)
        s.d(7, b + 0x180, 49)
        s.publish(0, 1, 3, 4, 5, 6, 7)
    }
    add("vsock-receive", .vsockReceive, flags: 4) { s in
        s.d(0, b, 44 + 64, flags: 2)
        s.d(1, b + 0x100, 20, flags: 2 | 1, next: 2)
        s.d(2, b + 0x200, 64, flags: 2)
        s.d(3, b + 0x300, 44, flags: 2)
        s.d(4, b + 0x400, 30, flags: 2)
        s.publish(0, 1, 3, 4)
        s.availIndex2 = 4
        s.host = Array("CONNECT 5\nearly bytes".utf8)
    }
    return all.map { ($0.name, $0.bytes) }
}
