import CLinux
import Glibc
import SystemPackage

/// `-daemonize` without fork(): the command re-executes itself as a new session leader with
/// stdio on /dev/null, and returns only once that daemon reports the VM set up and the
/// api-channel accepting (StratoVirt returns earlier). A daemon that fails before that
/// sends its error back, and the command exits with the daemon's status.
public enum Daemon {
    static let readinessVariable = "FLOTILLA_DAEMON_READY_FD"
    /// The daemon's readiness pipe is its descriptor 3.
    static let readinessFD: Int32 = 3
    static let readyByte = UInt8(ascii: "R")

    /// True in the daemon that ``launch(arguments:log:)`` started (its readiness pipe is inherited).
    public static var isDaemonProcess: Bool { getenv(readinessVariable) != nil }

    /// Starts the daemon and waits for its word. Returns the exit status for this process.
    public static func launch(arguments: [String], log: (String) -> Void) -> Int32 {
        var ends: [Int32] = [-1, -1]
        // pipe2 is a GNU extension; this runs before any other thread exists, so setting
        // close-on-exec right after pipe() cannot race with a spawn.
        guard pipe(&ends) == 0 else {
            log("cannot daemonize: pipe failed: \(String(cString: strerror(errno)))")
            return 2
        }
        _ = fcntl(ends[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(ends[1], F_SETFD, FD_CLOEXEC)
        defer { Syscall.close(ends[0]) }
        var environment = currentEnvironment().filter { !$0.hasPrefix(readinessVariable + "=") }
        environment.append("\(readinessVariable)=\(readinessFD)")
        let pid: pid_t
        do {
            pid = try Spawn.spawn(
                path: "/proc/self/exe", arguments: [CommandLine.arguments.first ?? "flotilla-vmm"] + arguments,
                environment: environment, descriptors: [-1, -1, -1, ends[1]], newSession: true)
        } catch {
            Syscall.close(ends[1])
            log("cannot daemonize: \(error)")
            return 2
        }
        Syscall.close(ends[1])
        var message: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1024)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(ends[0], $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { break }
            message.append(contentsOf: chunk[0..<count])
            if message.first == readyByte { return 0 }
        }
        // The daemon closed the pipe without being ready: it failed, and said why.
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        if !message.isEmpty { log(String(decoding: message, as: UTF8.self)) }
        let exited = status & 0x7f == 0
        return exited ? (status >> 8) & 0xff : 2
    }

    private static func currentEnvironment() -> [String] {
        var result: [String] = []
        var cursor = environ
        while let entry = cursor.pointee {
            result.append(String(cString: entry))
            cursor += 1
        }
        return result
    }
}

/// The daemon's end of the readiness pipe.
public struct DaemonReadiness: Sendable {
    let fd: Int32

    /// The pipe handed down by ``Daemon/launch(arguments:log:)``, when this process is that daemon.
    public static func inherited() -> DaemonReadiness? {
        guard let value = getenv(Daemon.readinessVariable), let fd = Int32(String(cString: value)), fd >= 0 else { return nil }
        unsetenv(Daemon.readinessVariable)
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return DaemonReadiness(fd: fd)
    }

    /// Tells the waiting command that the VM is up; it exits 0.
    public func ready() {
        var byte = Daemon.readyByte
        _ = Glibc.write(fd, &byte, 1)
        Syscall.close(fd)
    }

    /// Tells the waiting command why start-up failed; it prints this and exits with our status.
    public func failed(_ message: String) {
        let bytes = Array(message.utf8)
        bytes.withUnsafeBytes { buffer in
            do {
                try Syscall.writeAll(fd, buffer)
            } catch {
                // The waiting command is gone; nobody is left to tell.
            }
        }
        Syscall.close(fd)
    }
}

/// posix_spawn for VMMWorker (see fl_spawn.h).
enum Spawn {
    static func spawn(
        path: String, arguments: [String], environment: [String], descriptors: [Int32], newSession: Bool
    ) throws(SyscallError) -> pid_t {
        var cArguments = arguments.map { strdup($0) } + [nil]
        var cEnvironment = environment.map { strdup($0) } + [nil]
        defer {
            for pointer in cArguments { free(pointer) }
            for pointer in cEnvironment { free(pointer) }
        }
        var pid: pid_t = 0
        let code = descriptors.withUnsafeBufferPointer { fds in
            fl_spawn(&pid, path, &cArguments, &cEnvironment, fds.baseAddress, Int32(fds.count), newSession ? 1 : 0)
        }
        guard code == 0 else { throw SyscallError("posix_spawn \(path)", Errno(rawValue: code)) }
        return pid
    }
}
