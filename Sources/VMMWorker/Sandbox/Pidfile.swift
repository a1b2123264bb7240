import Glibc
import SystemPackage

/// `-pidfile`: created exclusively (refused when the file exists), mode 0600, holding the
/// worker's pid, and write-locked with a POSIX record lock for the process's lifetime so a
/// supervisor can ask the kernel (F_GETLK) which live process owns it — a reused pid
/// cannot fake that. Removed on every exit the process survives.
final class Pidfile: Sendable {
    let path: String
    private let fd: Int32

    init(path: String) throws(SyscallError) {
        let absolute = Paths.absolute(path)
        self.path = absolute
        let fd: Int32
        do {
            fd = try Syscall.retrying("open") { open(absolute, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600) }
        } catch {
            throw SyscallError("create pidfile \(absolute)", error.errno)
        }
        self.fd = fd
        do throws(SyscallError) {
            var lock = flock()
            lock.l_type = Int16(F_WRLCK)
            lock.l_whence = Int16(SEEK_SET)
            _ = try Syscall.retrying("fcntl") { fcntl(fd, F_SETLK, &lock) }
            let text = Array("\(getpid())\n".utf8)
            let written = try Syscall.retrying("write") { text.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } }
            guard written == text.count else { throw SyscallError("write", .noSpace) }
        } catch {
            _ = unlink(absolute)
            Syscall.close(fd)
            throw SyscallError("write pidfile \(absolute)", error.errno)
        }
    }

    /// Unlinks the file, then closes it (which drops the lock).
    func remove() {
        _ = unlink(path)
        Syscall.close(fd)
    }
}

enum Paths {
    /// `path` made absolute against the current directory, so that it still names the same
    /// file after the daemon changes directory to `/`.
    static func absolute(_ path: String) -> String {
        guard !path.hasPrefix("/") else { return path }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buffer, buffer.count) != nil else { return path }
        let directory = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return directory == "/" ? "/" + path : directory + "/" + path
    }
}
