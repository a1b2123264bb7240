import CLinux
import Glibc
import SystemPackage

/// Unix stream sockets for the api-channel (and later the console sockets).
enum UnixSocket {
    /// A `sockaddr_un` for `path`; fails when the path does not fit `sun_path`.
    static func address(_ path: String) throws(SyscallError) -> (sockaddr_un, socklen_t) {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { throw SyscallError("bind \(path)", .fileNameTooLong) }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + 1)
        return (address, length)
    }

    /// What one accept on a non-blocking listener gave.
    enum Accepted {
        /// A connected socket, non-blocking and close-on-exec.
        case connection(Int32)
        /// Nothing queued (EAGAIN), or the listener is gone.
        case drained
        /// A connection is queued but cannot be taken now (EMFILE, ENFILE, ENOBUFS, ENOMEM):
        /// rest the listener (``EventLoop/rest(_:events:nanoseconds:)``) or it wakes the loop at once.
        case shortage
    }

    /// Connections one listener wakeup accepts at most, so that a flood of connects cannot keep
    /// the loop from its other work (the level-triggered listener wakes it again for the rest).
    static let acceptsPerWakeup = 64

    /// Accepts one connection from `listenFD`, retrying EINTR and connections that were aborted
    /// while queued.
    static func acceptOne(_ listenFD: Int32) -> Accepted {
        while true {
            let fd = fl_accept_nonblocking(listenFD)
            if fd >= 0 { return .connection(fd) }
            switch errno {
            case EINTR, ECONNABORTED, EPROTO: continue
            case EMFILE, ENFILE, ENOBUFS, ENOMEM: return .shortage
            default: return .drained
            }
        }
    }

    /// A non-blocking listening socket bound at `path`, which must not exist yet: binding
    /// over an existing file fails with EADDRINUSE, and nothing is unlinked that we did not create.
    static func listen(path: String, mode: mode_t, backlog: Int32 = 16) throws(SyscallError) -> Int32 {
        var (address, length) = try address(path)
        let fd = try Syscall.once("socket") {
            socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0)
        }
        do {
            _ = try Syscall.once("bind") {
                withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
            }
        } catch {
            Syscall.close(fd)
            throw SyscallError("bind \(path)", error.errno)
        }
        do {
            _ = try Syscall.once("chmod") { chmod(path, mode) }
            _ = try Syscall.once("listen") { Glibc.listen(fd, backlog) }
        } catch {
            Syscall.close(fd)
            _ = unlink(path)
            throw SyscallError("\(error.operation) \(path)", error.errno)
        }
        return fd
    }
}
