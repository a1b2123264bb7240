import CLinux
import Glibc

/// A host tap descriptor set up for ``VirtioNetDevice``: attached as IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR, non-blocking, close-on-exec, with a 12-byte virtio-net header before every
/// frame (TUNSETVNETHDRSZ) and no offloads until a driver accepts some (TUNSETOFFLOAD).
///
/// Two ways in, one set-up: ``open(name:)`` attaches to a tap by interface name (-netdev,
/// netdev_add ifname=), ``init(adopting:)`` takes a descriptor someone else attached (netdev_add
/// fd= after getfd); both check the interface's flags (TUNGETIFF) and configure it the same way.
/// ``init(frameSocket:name:)`` is for tests and the fuzzer only: a socket that carries one frame
/// per datagram in place of a tap, with no tap ioctls at all.
///
/// Sendable: immutable; owns the descriptor (closed in deinit, when the last device or netdev
/// holding it goes).
public final class Tap: Sendable {
    /// Why a descriptor cannot serve as virtio-net's tap.
    public struct SetupError: Error, Sendable, CustomStringConvertible {
        public enum Kind: Sendable, Equatable {
            /// A system call failed: `step` names it, `code` is its errno.
            case call(step: String, code: Int32)
            /// TUNGETIFF answered, but the interface lacks flags virtio-net needs (or is a tun).
            case flags(interface: String, missing: [String])
        }
        public let kind: Kind

        public var description: String {
            switch kind {
            case .call(let step, let code): "\(step): \(String(cString: strerror(code)))"
            case .flags(let interface, let missing):
                "interface '\(interface)' was attached without \(missing.joined(separator: ", ")); virtio-net needs a tap "
                    + "attached with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR"
            }
        }
    }

    /// The virtio-net header size the tap puts before every frame (virtio 1.2 §5.1.6: 12 bytes
    /// with VIRTIO_F_VERSION_1, num_buffers included).
    static let headerSize = VirtioNetDevice.headerSize

    public let fd: Int32
    /// The interface's name (TUNGETIFF).
    public let name: String
    /// Whether `fd` is a real tap whose offloads follow the driver (false only for a frame socket).
    let isTap: Bool

    /// Attaches to the existing tap interface `name`; fails naming the call that failed.
    public static func open(name: String) throws(SetupError) -> Tap {
        var step: UnsafePointer<CChar>?
        let fd = fl_tap_open(name, &step)
        guard fd >= 0 else {
            throw SetupError(kind: .call(step: step.map { String(cString: $0) } ?? "open", code: errno))
        }
        return try Tap(adopting: fd)
    }

    /// Takes `fd`, which must be a tap attached with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    /// (TUNGETIFF says so), and sets it up. The descriptor is this object's from the call on:
    /// closed on failure too (as QEMU's netdev_add consumes a getfd descriptor it refuses).
    public init(adopting fd: Int32) throws(SetupError) {
        var flags: UInt32 = 0
        var interface = [CChar](repeating: 0, count: Int(FL_IFNAMSIZ))
        guard fl_tap_get_flags(fd, &interface, &flags) == 0 else {
            let code = errno
            Syscall.close(fd)
            throw SetupError(kind: .call(step: "TUNGETIFF", code: code))
        }
        let name = String(decoding: interface.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var missing: [String] = []
        if flags & UInt32(FL_IFF_TAP) == 0 { missing.append(flags & UInt32(FL_IFF_TUN) != 0 ? "IFF_TAP (it is a tun)" : "IFF_TAP") }
        // Without IFF_NO_PI every frame comes with a 4-byte packet information header; without
        // IFF_VNET_HDR without the virtio-net header the queues exchange with the driver.
        // TUNGETIFF also sets IFF_NOFILTER, the same bit as IFF_NO_PI, while no socket filter is
        // attached (drivers/net/tun.c), so a clear bit proves IFF_NO_PI missing but a set one
        // does not prove it there; a tap with packet information and no filter gets past this
        // (its frames then fail the kernel's or the driver's checks; nothing here trusts them).
        if flags & UInt32(FL_IFF_NO_PI) == 0 { missing.append("IFF_NO_PI") }
        if flags & UInt32(FL_IFF_VNET_HDR) == 0 { missing.append("IFF_VNET_HDR") }
        guard missing.isEmpty else {
            Syscall.close(fd)
            throw SetupError(kind: .flags(interface: name, missing: missing))
        }
        var step: UnsafePointer<CChar>?
        guard fl_tap_configure(fd, Int32(Self.headerSize), 0, &step) == 0 else {
            let code = errno
            Syscall.close(fd)
            throw SetupError(kind: .call(step: step.map { String(cString: $0) } ?? "configure", code: code))
        }
        self.fd = fd
        self.name = name
        isTap = true
    }

    /// A socket standing in for a tap (tests, the fuzzer): each datagram or SOCK_SEQPACKET
    /// record is one frame with its 12-byte header, as on a tap. It is not checked or
    /// configured, and offloads are not set on it; the caller makes it non-blocking.
    public init(frameSocket fd: Int32, name: String) {
        self.fd = fd
        self.name = name
        isTap = false
    }

    deinit { Syscall.close(fd) }

    /// TUNSETOFFLOAD with `offloads` (TUN_F_* bits); 0, or the errno. Nothing on a frame socket.
    func setOffloads(_ offloads: UInt32) -> Int32 {
        guard isTap else { return 0 }
        return fl_tap_set_offload(fd, offloads) == 0 ? 0 : errno
    }
}
