import CLinux
import Glibc

/// Looks host network interfaces up by name (SIOCGIFINDEX) on a socket made in advance: QMP
/// netdev_add and device_add check that a tap exists after the seccomp filter is on, which
/// allows no socket(2) (what if_nametoindex(3) would call) but this ioctl on this socket.
///
/// Sendable: the descriptor is immutable and owned (closed in deinit); the ioctl is safe from
/// any thread.
public final class NetInterfaces: Sendable {
    let fd: Int32

    /// In the caller's network namespace (the one whose taps the VMM attaches to).
    public init() throws(SyscallError) {
        fd = try Syscall.once("socket") { fl_if_query_socket() }
    }

    deinit { Syscall.close(fd) }

    /// Whether an interface called `name` exists.
    public func exists(_ name: String) -> Bool { fl_if_index(fd, name) != 0 }
}
