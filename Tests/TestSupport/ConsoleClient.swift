import Foundation
import Glibc

/// A blocking console client with a receive timeout that only guards against a hang.
public final class ConsoleClient {
    public let fd: Int32
    private var received: [UInt8] = []

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public init(path: String, retryWhileMissing: Bool = false, retryWhileRefused: Bool = false) throws {
        let deadline = Date().addingTimeInterval(30)
        while true {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
            let result = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if result != 0 {
                let code = errno
                Glibc.close(fd)
                if retryWhileMissing && (code == ENOENT || code == ECONNREFUSED) && Date() < deadline {
                    usleep(20_000)
                    continue
                }
                throw Failure(description: "connect \(path): errno \(code)")
            }
            var timeout = timeval(tv_sec: 60, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            if retryWhileRefused {
                // The worker may not have seen the previous client's close yet: a refusal
                // arrives at once and ends the connection.
                var peek = [UInt8](repeating: 0, count: 64)
                var shortTimeout = timeval(tv_sec: 0, tv_usec: 200_000)
                setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &shortTimeout, socklen_t(MemoryLayout<timeval>.size))
                let count = peek.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_PEEK)) }
                setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
                if count > 0, String(decoding: peek[0..<count], as: UTF8.self).hasPrefix("flotilla-vmm: this console is in use"),
                    Date() < deadline
                {
                    Glibc.close(fd)
                    usleep(20_000)
                    continue
                }
            }
            self.fd = fd
            return
        }
    }

    deinit { Glibc.close(fd) }

    public func close() { shutdown(fd, Int32(SHUT_RDWR)) }

    /// Reads until the text received so far contains `text`; returns all of it.
    public func read(until text: String) throws -> String {
        while true {
            let all = String(decoding: received, as: UTF8.self)
            if all.contains(text) { return all }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard count > 0 else { throw Failure(description: "the console ended (errno \(errno)) before '\(text)' in: \(all)") }
            received += chunk[0..<count]
        }
    }

    /// Reads until the worker closes the connection.
    public func readToEnd() throws -> String {
        while true {
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count == 0 { return String(decoding: received, as: UTF8.self) }
            guard count > 0 else { throw Failure(description: "recv: errno \(errno)") }
            received += chunk[0..<count]
        }
    }

    public func send(_ text: String) throws {
        let bytes = Array(text.utf8)
        let count = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard count == bytes.count else { throw Failure(description: "send: errno \(errno)") }
    }
}
