import Glibc
import Protocol

/// A blocking client of one VM's QMP socket as flotillad serves it, `<runtime-dir>/vms/<name>/qmp.sock`
/// (flotillactl qmp / events / pause / resume, tests). The same conversation works whether
/// flotillad multiplexes the socket or hands each client off to the worker (--qmp-handoff):
/// either way the client is greeted, negotiates capabilities on its own, and gets its own
/// replies by id and every event from then on (QMP spec §2.2 greeting, §4 capabilities
/// negotiation, §2.4 replies carrying the command's id, §2.5 events).
public final class QMPClient {
    /// Why the conversation failed; `closed` when the other side ended it.
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        public let closed: Bool
    }

    /// A reply or event as it arrived: its bytes (without the line ending) and the parsed object.
    public struct Reply {
        public let bytes: [UInt8]
        public let object: JSONObject

        /// `return`'s value, or nil for an error reply.
        public var value: JSONValue? { object["return"] }
        /// `error`'s class and description, or nil for a success.
        public var error: (errorClass: String, description: String)? {
            guard object["return"] == nil else { return nil }
            let error = object["error"]?.objectValue
            return (error?["class"]?.stringValue ?? "GenericError", error?["desc"]?.stringValue ?? JSONValue.object(object).compactText)
        }
    }

    private let fd: Int32
    private let path: String
    private var splitter = JSONStreamSplitter()
    private var pieces: [[UInt8]] = []
    private var nextID = 1
    /// Events that arrived while a reply was awaited, oldest first.
    private var events: [Reply] = []
    /// The greeting the socket sent (the worker's, in both modes).
    public private(set) var greeting = JSONObject()

    private init(fd: Int32, path: String) {
        self.fd = fd
        self.path = path
    }

    deinit { Sys.close(fd) }

    /// Connects to `socketPath`, reads the greeting and negotiates capabilities.
    public static func connect(socketPath: String) throws(Failure) -> QMPClient {
        let fd: Int32
        do {
            fd = try UnixSocket.connect(path: socketPath, blocking: true)
        } catch {
            var hint = ""
            switch error.errno {
            case .noSuchFileOrDirectory, .connectionRefused: hint = " (the VM's worker is no longer running)"
            case .permissionDenied: hint = " (the QMP socket is mode 0660: run as root or as a member of its group)"
            default: break
            }
            throw Failure(description: "cannot connect to \(socketPath): \(error.errno)\(hint)", closed: false)
        }
        // From here the client owns the descriptor: it is closed when the client goes.
        let client = QMPClient(fd: fd, path: socketPath)
        let first = try client.receive(deadline: nil, purpose: "its greeting")
        guard let first, first.object["QMP"] != nil else {
            let text = first.map { String(decoding: $0.bytes, as: UTF8.self) } ?? ""
            throw Failure(description: "\(socketPath) did not greet like QMP: \(text)", closed: false)
        }
        client.greeting = first.object
        if let error = try client.execute("qmp_capabilities").error {
            throw Failure(description: "qmp_capabilities was refused: \(error.errorClass): \(error.description)", closed: false)
        }
        return client
    }

    /// The next message; nil once `deadline` (monotonic seconds) passes.
    private func receive(deadline: Double?, purpose: String) throws(Failure) -> Reply? {
        while true {
            if !pieces.isEmpty {
                let bytes = pieces.removeFirst()
                guard let object = (try? JSONValue.parse(bytes: bytes))?.objectValue else {
                    throw Failure(
                        description:
                            "\(path) sent something that is not a JSON object: \(String(decoding: bytes.prefix(200), as: UTF8.self))",
                        closed: false)
                }
                return Reply(bytes: bytes, object: object)
            }
            if let deadline {
                let remaining = deadline - Sys.monotonicNow()
                if remaining <= 0 { return nil }
                var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let ready = poll(&descriptor, 1, Int32(min(remaining * 1000 + 1, 3_600_000)))
                if ready < 0 && errno != EINTR {
                    throw Failure(description: "poll on \(path): \(Sys.errorText(errno))", closed: false)
                }
                if ready <= 0 { continue }
            }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else {
                throw Failure(
                    description: "the VM's QMP connection closed before \(purpose)" + (count < 0 ? ": \(Sys.errorText(errno))" : ""),
                    closed: true)
            }
            for piece in splitter.append(chunk[0..<count]) {
                switch piece {
                case .message(let bytes): pieces.append(bytes)
                case .garbage(let reason): throw Failure(description: "\(path) sent malformed JSON: \(reason)", closed: false)
                }
            }
        }
    }

    /// Runs one command and returns its reply, success or error; events that arrive first
    /// are kept for ``nextEvent(timeout:)``.
    public func execute(_ name: String, _ arguments: JSONObject = JSONObject()) throws(Failure) -> Reply {
        let id = JSONValue.string("flotillactl-\(nextID)")
        nextID += 1
        let bytes = QMP.frame(QMP.Command(name: name, arguments: arguments, id: id).jsonValue)
        do {
            try Sys.writeAll(fd, bytes, operation: "send")
        } catch {
            throw Failure(description: "cannot send to \(path): \(error)", closed: error.errno == .brokenPipe)
        }
        while true {
            guard let message = try receive(deadline: nil, purpose: "it answered '\(name)'") else { continue }
            if message.object["event"] != nil {
                events.append(message)
                continue
            }
            // Another id is no reply of ours (QMP spec §2.4: a reply carries its command's id).
            guard message.object["id"] == id else { continue }
            return message
        }
    }

    /// The next event, as it arrived; nil when `timeout` seconds pass first (nil: wait as long
    /// as it takes).
    public func nextEvent(timeout: Double? = nil) throws(Failure) -> Reply? {
        if !events.isEmpty { return events.removeFirst() }
        let deadline = timeout.map { Sys.monotonicNow() + $0 }
        while true {
            guard let message = try receive(deadline: deadline, purpose: "the awaited event") else { return nil }
            if message.object["event"] != nil { return message }
        }
    }
}
