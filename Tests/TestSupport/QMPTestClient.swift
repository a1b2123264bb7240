import CLinux
import Foundation
import Glibc
import Protocol

/// A blocking QMP client for tests: connects to a Unix socket and reads CRLF-framed JSON.
public final class QMPTestClient {
    public let fd: Int32
    private var buffer: [UInt8] = []

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    /// Connects, retrying for up to `timeout` seconds while the socket does not exist yet.
    public init(path: String, timeout: Double = 10) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { throw Failure(description: "socket: \(errno)") }
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                raw.copyBytes(from: bytes.prefix(raw.count - 1))
            }
            let result = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if result == 0 {
                var timeout = timeval(tv_sec: 20, tv_usec: 0)
                setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
                self.fd = fd
                return
            }
            close(fd)
            if Date() > deadline { throw Failure(description: "cannot connect to \(path): errno \(errno)") }
            usleep(20_000)
        }
    }

    deinit { close(fd) }

    public func sendRaw(_ text: String) throws {
        let bytes = Array(text.utf8)
        let sent = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard sent == bytes.count else { throw Failure(description: "send failed: errno \(errno)") }
    }

    public func send(_ command: QMP.Command) throws {
        try sendRaw(command.jsonValue.compactText + "\n")
    }

    /// The next message from the server; throws on timeout or end of stream.
    public func receive() throws -> JSONObject {
        while true {
            if let end = buffer.firstIndex(of: 10) {
                let line = Array(buffer[..<end])
                buffer.removeSubrange(...end)
                let trimmed = line.last == 13 ? Array(line.dropLast()) : line
                guard let object = try JSONValue.parse(bytes: trimmed).objectValue else {
                    throw Failure(description: "not an object: \(String(decoding: trimmed, as: UTF8.self))")
                }
                return object
            }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard count > 0 else { throw Failure(description: count == 0 ? "connection closed" : "recv failed: errno \(errno)") }
            buffer.append(contentsOf: chunk[0..<count])
        }
    }

    /// The next reply (skipping events, which are returned in `events`).
    public func reply(events: inout [JSONObject]) throws -> JSONObject {
        while true {
            let message = try receive()
            if message["event"] != nil {
                events.append(message)
            } else {
                return message
            }
        }
    }

    /// Reads the greeting and negotiates capabilities.
    public func handshake() throws {
        let greeting = try receive()
        guard greeting["QMP"] != nil else { throw Failure(description: "no greeting: \(greeting)") }
        try send(QMP.Command(name: "qmp_capabilities"))
        var events: [JSONObject] = []
        let reply = try reply(events: &events)
        guard reply["return"] != nil else { throw Failure(description: "qmp_capabilities failed: \(reply)") }
    }

    /// Executes a command and returns its reply.
    public func execute(_ name: String, arguments: JSONObject = JSONObject(), id: JSONValue? = nil) throws -> JSONObject {
        try send(QMP.Command(name: name, arguments: arguments, id: id))
        var events: [JSONObject] = []
        return try reply(events: &events)
    }

    /// Executes a command sent with `descriptor` attached (SCM_RIGHTS, as for getfd) and
    /// returns its reply. The caller keeps its own copy of the descriptor.
    public func execute(_ name: String, arguments: JSONObject = JSONObject(), passing descriptor: Int32) throws -> JSONObject {
        let bytes = Array((QMP.Command(name: name, arguments: arguments).jsonValue.compactText + "\n").utf8)
        let sent = bytes.withUnsafeBytes { fl_send_with_fd(fd, $0.baseAddress, $0.count, 0, descriptor) }
        guard sent == bytes.count else { throw Failure(description: "sendmsg failed: errno \(errno)") }
        var events: [JSONObject] = []
        return try reply(events: &events)
    }

    /// Waits for the named event, skipping others.
    public func waitForEvent(_ name: String) throws -> JSONObject {
        while true {
            let message = try receive()
            if message["event"]?.stringValue == name { return message }
        }
    }
}

/// A QMP reply's error class and description (both nil for a `return`), for comparing with
/// the pair QEMU would give.
public func qmpError(_ reply: JSONObject) -> (String?, String?) {
    let error = reply["error"]?.objectValue
    return (error?["class"]?.stringValue, error?["desc"]?.stringValue)
}
