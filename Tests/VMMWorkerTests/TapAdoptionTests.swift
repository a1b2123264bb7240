import CLinux
import FlotillaTestSupport
import Glibc
import Testing

@testable import VMMWorker

/// ``Tap/init(adopting:)``, which netdev_add fd= uses on a descriptor passed with getfd: only a
/// tap attached with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR is taken, and is set up as a tap opened
/// by name is; anything else is refused naming why, and closed either way (it was handed over).
@Suite("tap descriptors passed in: the tap check")
struct TapAdoptionTests {
    /// Whether the peer of `end` (the other end of a socket pair) is closed: a read sees the end
    /// of the stream.
    static func peerClosed(_ end: Int32) -> Bool {
        var byte: UInt8 = 0
        return recv(end, &byte, 1, Int32(MSG_DONTWAIT)) == 0
    }

    @Test("a socket is not a tap: TUNGETIFF fails with ENOTTY, and the descriptor is closed")
    func socketRefused() throws {
        var ends: [Int32] = [-1, -1]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &ends) == 0)
        defer { close(ends[1]) }
        #expect(!Self.peerClosed(ends[1]))
        do {
            _ = try Tap(adopting: ends[0])
            Issue.record("adopted a socket as a tap")
        } catch {
            #expect(error.kind == .call(step: "TUNGETIFF", code: ENOTTY), "\(error)")
            #expect(error.description == "TUNGETIFF: Inappropriate ioctl for device")
        }
        #expect(Self.peerClosed(ends[1]), "the refused descriptor is closed")
    }

    @Test("/dev/net/tun not attached to an interface: TUNGETIFF fails with EBADFD")
    func unattachedRefused() throws {
        let fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC)
        try #require(fd >= 0, "needs /dev/net/tun")
        do {
            _ = try Tap(adopting: fd)
            Issue.record("adopted an unattached /dev/net/tun descriptor")
        } catch {
            #expect(error.kind == .call(step: "TUNGETIFF", code: EBADFD), "\(error)")
        }
    }

    @Test(
        "a tun, or a tap without IFF_VNET_HDR, is refused naming what it lacks; the interface, which only that descriptor kept, goes",
        .enabled(if: NetworkNamespace.available, "needs root, /dev/net/tun and ip(8) for a network namespace"))
    func wrongFlagsRefused() throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        typealias N = NetworkNamespace
        let cases: [(String, Int16, [String])] = [
            ("fltun0", N.iffTun | N.iffNoPI | N.iffVnetHeader, ["IFF_TAP (it is a tun)"]),
            ("flnohdr0", N.iffTap | N.iffNoPI, ["IFF_VNET_HDR"]),
            ("fltun1", N.iffTun | N.iffNoPI, ["IFF_TAP (it is a tun)", "IFF_VNET_HDR"]),
            // Without IFF_NO_PI the bit still reads set (IFF_NOFILTER, the same bit, while no
            // filter is attached), so only the header is found missing.
            ("flbare0", N.iffTap, ["IFF_VNET_HDR"]),
        ]
        for (name, flags, missing) in cases {
            let fd = try namespace.openTap(name, flags: flags)
            #expect(try namespace.hasInterface(name))
            do {
                _ = try Tap(adopting: fd)
                Issue.record("adopted \(name)")
            } catch {
                #expect(error.kind == .flags(interface: name, missing: missing), "\(error)")
                #expect(error.description.contains("needs a tap attached with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR"))
            }
            #expect(!(try namespace.hasInterface(name)), "\(name): the descriptor was closed, so the interface went")
        }
    }

    @Test(
        "a tap attached as the VMM attaches one is taken and set up the same way: non-blocking, close-on-exec, 12-byte vnet header",
        .enabled(if: NetworkNamespace.available, "needs root, /dev/net/tun and ip(8) for a network namespace"))
    func tapAdopted() throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        typealias N = NetworkNamespace
        // Blocking, no FD_CLOEXEC (cleared), header size left at the kernel's default (10).
        let fd = try namespace.openTap("flok0", flags: N.iffTap | N.iffNoPI | N.iffVnetHeader)
        try #require(fcntl(fd, F_SETFD, 0) == 0)
        #expect(fl_tap_get_vnet_header_size(fd) == 10)
        let tap = try Tap(adopting: fd)
        let present = try namespace.hasInterface("flok0")
        withExtendedLifetime(tap) {
            #expect(tap.name == "flok0" && tap.fd == fd && tap.isTap)
            #expect(fcntl(fd, F_GETFL) & O_NONBLOCK != 0)
            #expect(fcntl(fd, F_GETFD) & FD_CLOEXEC != 0)
            #expect(fl_tap_get_vnet_header_size(fd) == Int32(VirtioNetDevice.headerSize))
        }
        #expect(present)
        // The Tap owned the descriptor: with it gone, so is the (non-persistent) interface.
        _ = consume tap
        #expect(!(try namespace.hasInterface("flok0")))
    }
}
