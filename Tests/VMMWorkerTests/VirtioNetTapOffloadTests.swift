import FlotillaTestSupport
import Glibc
import Protocol
import Testing

@testable import VMMWorker

/// The tap's offloads follow what the driver accepted (TUNSETOFFLOAD at DRIVER_OK), seen from
/// a real tap in a network namespace the test creates: a 64 KiB TCPv4 GSO packet is queued on
/// the tap by an AF_PACKET socket in the namespace (PACKET_VNET_HDR) and received through the
/// device into crafted guest memory. The kernel keeps it whole only for a tap with TUN_F_TSO4;
/// otherwise it segments and checksums it in software before the tap.
@Suite(
    "virtio-net offloads on a real tap",
    .enabled(if: NetworkNamespace.available, "needs root, /dev/net/tun and ip(8) for a network namespace with a tap"),
    .serialized)
struct VirtioNetTapOffloadTests {
    /// linux/if_packet.h: SOL_PACKET, PACKET_VNET_HDR; linux/if_ether.h: sizeof(sockaddr_ll).
    static let solPacket: Int32 = 263
    static let packetVnetHeader: Int32 = 15
    /// sched.h CLONE_NEWNET; setns(2) through dlsym, as Glibc's module does not export it
    /// (it is behind _GNU_SOURCE).
    static let cloneNewNet: Int32 = 0x4000_0000
    static func setns(_ fd: Int32, _ type: Int32) -> Int32 {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "setns") else { return -1 }
        return unsafeBitCast(symbol, to: (@convention(c) (Int32, Int32) -> Int32).self)(fd, type)
    }

    @Test(
        "with GUEST_CSUM+GUEST_TSO4 the packet arrives as one GSO frame (TCPV4, NEEDS_CSUM) over several merged buffers; without them as MSS-sized checksummed frames",
        arguments: [true, false])
    func offloadsFollowFeatures(tso: Bool) throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        try namespace.addTap("floff0")
        // This thread enters the namespace to attach to the tap and make the packet socket
        // (both stay bound to it), then goes back.
        let home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)
        let target = open("/run/netns/\(namespace.name)", O_RDONLY | O_CLOEXEC)
        defer {
            close(home)
            close(target)
        }
        try #require(home >= 0 && target >= 0 && Self.setns(target, Self.cloneNewNet) == 0, "errno \(errno)")
        let memory = try GuestMemory(size: 8 << 20)
        let loop = try EventLoop(name: "net-offload-test")
        let made = Result { try VirtioNetDevice(net: NetConfig(id: "n0", hostDeviceName: "floff0"), memory: memory, loop: loop) }
        let index = if_nametoindex("floff0")
        let packet = socket(AF_PACKET, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        let back = Self.setns(home, Self.cloneNewNet)
        let device = try made.get()
        defer { close(packet) }
        try #require(back == 0 && index != 0 && packet >= 0)
        var on: Int32 = 1
        try #require(setsockopt(packet, Self.solPacket, Self.packetVnetHeader, &on, 4) == 0)
        // struct sockaddr_ll: family, protocol (0: send only), ifindex, then zeros (20 bytes).
        var address = [UInt8](repeating: 0, count: 20)
        address.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: UInt16(AF_PACKET), as: UInt16.self)
            raw.storeBytes(of: Int32(index), toByteOffset: 4, as: Int32.self)
        }
        let bound = address.withUnsafeBytes { raw in
            bind(packet, raw.baseAddress?.assumingMemoryBound(to: sockaddr.self), 20)
        }
        try #require(bound == 0, "bind: errno \(errno)")

        // The driver: VERSION_1, MRG_RXBUF, and GUEST_CSUM + GUEST_TSO4 or not; 64 receive
        // chains of 2048 bytes.
        typealias F = VirtioNetDevice.Feature
        let features = F.mac | F.mergeableReceiveBuffers | (tso ? F.guestChecksum | F.guestTSO4 : 0)
        let transport = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 0), device: device, memory: memory, vm: nil)
        var q = CraftedQueue(memory: memory, size: 64)
        for i in 0..<64 {
            try q.descriptor(UInt16(i), address: 0x100000 + UInt64(i) * 2048, length: 2048, flags: 2)
            try q.publish(UInt16(i))
        }
        var setup: [(UInt64, UInt64)] = [(0x070, 3), (0x024, 0), (0x020, features), (0x024, 1), (0x020, 1), (0x070, 11)]
        for (queue, rings) in [(0, (CraftedQueue.descriptors, CraftedQueue.avail, CraftedQueue.used)), (1, (0x13000, 0x14000, 0x15000))] {
            setup += [(0x030, UInt64(queue)), (0x038, 64), (0x080, rings.0), (0x090, rings.1), (0x0a0, rings.2), (0x044, 1)]
        }
        for (offset, value) in setup + [(0x070, 15)] { transport.write(offset: offset, length: 4, value: value) }
        try #require(transport.status == 15)
        defer { device.reset() }

        // Attaching gave the tap its carrier; the kernel's link watch then brings it to
        // operstate UP and gives it a real qdisc (until then sends are dropped): wait for it.
        var up = false
        for _ in 0..<100 where !up {
            up = try namespace.command(["-n", namespace.name, "link", "show", "floff0"]).contains("state UP")
            if !up { usleep(50_000) }
        }
        try #require(up, "the tap never came up")

        // 64 KiB of TCP payload to a foreign MAC: Ethernet, IPv4, TCP headers, then data.
        let total = 14 + 20 + 20 + 65_000
        var frame = [UInt8](repeating: 0x61, count: total)
        let ipLength = total - 14
        let headers: [UInt8] =
            [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0]
            + [0x45, 0, UInt8(ipLength >> 8), UInt8(ipLength & 0xff), 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 78, 0, 1, 10, 78, 0, 2]
            + [0x30, 0x39, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]
        frame.replaceSubrange(0..<54, with: headers)
        // struct virtio_net_hdr: NEEDS_CSUM, GSO_TCPV4, hdr_len 54, gso_size 1448, csum 34+16.
        let message: [UInt8] = [1, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0] + frame
        let sent = message.withUnsafeBytes { send(packet, $0.baseAddress, $0.count, 0) }
        try #require(sent == message.count, "send: errno \(errno)")

        // The tap's qdisc may hand the packet (or its segments) over on another CPU: receive
        // whenever the tap is readable, until the frames expected are in or the tap stays
        // empty for 5 s. Walk the used ring frame by frame (num_buffers in each frame's first
        // buffer), keeping the IPv4 frames to our MAC (the namespace may send its own).
        let expected = tso ? 1 : (65_000 + 1447) / 1448
        var frames: [(flags: UInt8, gso: UInt8, buffers: Int, length: Int)] = []
        var slot: UInt16 = 0
        var ready = pollfd(fd: device.tapFD, events: Int16(POLLIN), revents: 0)
        while frames.count < expected && poll(&ready, 1, 5000) > 0 {
            device.receive()
            while slot != (try q.usedIndex()) {
                let (head, _) = try q.usedElement(slot)
                let base = 0x100000 + UInt64(head) * 2048
                let header = try memory.read(at: base, count: 12)
                let buffers = Int(header[10]) | Int(header[11]) << 8
                try #require(buffers >= 1)
                var length = 0
                for i in 0..<UInt16(buffers) {
                    let (reposted, used) = try q.usedElement(slot + i)
                    length += Int(used)
                    try q.publish(UInt16(reposted))
                }
                if try memory.read(at: base + 12, count: 6) == [2, 0, 0, 0, 0, 1] {
                    frames.append((header[0], header[1], buffers, length - 12))
                }
                slot &+= UInt16(buffers)
            }
        }
        if tso {
            try #require(frames.count == 1, "\(frames)")
            #expect(frames[0].gso == NetHeader.gsoTCPv4 && frames[0].flags & NetHeader.needsChecksum != 0)
            #expect(frames[0].length == total && frames[0].buffers == (total + 12 + 2047) / 2048)
        } else {
            // 65000 bytes in 1448-byte segments: 45 frames, none GSO, none needing a checksum.
            #expect(frames.count == expected)
            #expect(frames.allSatisfy { $0.gso == 0 && $0.flags == 0 && $0.buffers == 1 && $0.length <= 1514 })
        }
        #expect(device.statistics.receiveDropped == 0)
    }
}
