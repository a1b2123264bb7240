import Glibc
import Protocol
import Synchronization

/// The host end of a user-space vsock device (`-device vsock,...,uds-path=PATH`): the Unix
/// socket the VMM listens on for host-initiated connections (Firecracker's hybrid vsock).
/// The worker creates it before the VM, so that it is removed on every exit path, as the
/// console sockets are.
///
/// Sendable: immutable descriptor and path; whether it was closed is behind a Mutex.
public final class VsockListener: Sendable {
    public let path: String
    let fd: Int32
    private let closed = Mutex(false)

    /// Binds and listens on `path`, which must not exist (EADDRINUSE leaves it alone), mode 0600.
    init(path: String) throws(SyscallError) {
        self.path = path
        fd = try UnixSocket.listen(path: path, mode: 0o600, backlog: 64)
    }

    /// The listener `vsock` asks for (nil without `uds_path`), bound at an absolute path (a
    /// daemon changes to /). Errors name the option.
    public static func make(for vsock: VsockConfig?) throws(VsockSetupError) -> VsockListener? {
        guard let vsock, let path = vsock.udsPath else { return nil }
        do {
            return try VsockListener(path: Paths.absolute(path))
        } catch  where error.errno == .addressInUse {
            throw VsockSetupError(
                description: "-device vsock id=\(vsock.id) uds-path: \(path) already exists; remove it first (the socket must not exist)")
        } catch {
            throw VsockSetupError(description: "-device vsock id=\(vsock.id) uds-path=\(path): \(error)")
        }
    }

    /// Closes the socket and removes its file, once; call after the loop that serves it stopped.
    public func close() {
        let first = closed.withLock { closed in
            defer { closed = true }
            return !closed
        }
        guard first else { return }
        Syscall.close(fd)
        _ = unlink(path)
    }
}

/// A vsock host socket that could not be set up.
public struct VsockSetupError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

/// Whether `-device vsock` without `uds-path` can be served: only by the kernel's
/// vhost-vsock, which this build does not drive yet. The error names the option, the device
/// node and, when it cannot be opened, errno, and says what serves vsock instead.
public enum VhostVsock {
    public static let devicePath = "/dev/vhost-vsock"

    public static func unavailable(for vsock: VsockConfig) -> ConfigError? {
        guard vsock.udsPath == nil else { return nil }
        let fd = open(devicePath, O_RDWR | O_CLOEXEC)
        let reason: String
        if fd < 0 {
            let code = errno
            reason = "\(devicePath) cannot be opened: \(String(cString: strerror(code))) (errno \(code))"
        } else {
            Glibc.close(fd)
            reason = "\(devicePath) exists, but this build does not drive the kernel's vhost-vsock yet"
        }
        return ConfigError(
            field: "-device vsock / vsock", value: "id=\(vsock.id)", problem: reason,
            allowed: "uds-path=PATH (JSON \"uds_path\"), which serves vsock in user space on Unix sockets")
    }
}
