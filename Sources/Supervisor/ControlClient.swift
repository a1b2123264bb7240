import Glibc
import Protocol

/// A blocking client of flotillad's control socket (flotillactl, tests, benchmarks).
public final class ControlClient {
    /// A reply flotillad sent as an error, or a failure to talk to it at all.
    public struct Failure: Error, CustomStringConvertible {
        /// The error class flotillad sent (NotFound, InvalidArgument, ...), or nil for
        /// connection problems.
        public let errorClass: String?
        public let description: String
    }

    private let fd: Int32
    private var splitter = JSONStreamSplitter()
    private var pieces: [[UInt8]] = []
    private var nextID = 1

    /// Connects and reads the greeting.
    public init(socketPath: String) throws(Failure) {
        do {
            fd = try UnixSocket.connect(path: socketPath, blocking: true)
        } catch {
            var hint = ""
            switch error.errno {
            case .noSuchFileOrDirectory: hint = " (is flotillad running? give its socket with --socket)"
            case .connectionRefused: hint = " (flotillad is not running)"
            case .permissionDenied: hint = " (the control socket is mode 0660: run as root or as a member of its group)"
            default: break
            }
            throw Failure(errorClass: nil, description: "cannot connect to \(socketPath): \(error.errno)\(hint)")
        }
        let greeting = try receive()
        if let error = greeting["error"]?.objectValue {
            throw Failure(errorClass: error["class"]?.stringValue, description: error["desc"]?.stringValue ?? "refused")
        }
        guard greeting["QMP"] != nil else {
            throw Failure(
                errorClass: nil, description: "\(socketPath) did not greet like flotillad: \(JSONValue.object(greeting).compactText)")
        }
    }

    deinit { Sys.close(fd) }

    private func receive() throws(Failure) -> JSONObject {
        while true {
            if !pieces.isEmpty {
                let bytes = pieces.removeFirst()
                guard let object = (try? JSONValue.parse(bytes: bytes))?.objectValue else {
                    throw Failure(errorClass: nil, description: "flotillad sent something that is not a JSON object")
                }
                return object
            }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else {
                throw Failure(
                    errorClass: nil, description: "flotillad closed the connection" + (count < 0 ? ": \(Sys.errorText(errno))" : ""))
            }
            for piece in splitter.append(chunk[0..<count]) {
                if case .message(let bytes) = piece { pieces.append(bytes) }
            }
        }
    }

    /// Runs one command and returns its `return` value, or throws flotillad's error.
    public func execute(_ name: String, _ arguments: JSONObject = JSONObject()) throws(Failure) -> JSONValue {
        let id = nextID
        nextID += 1
        let bytes = QMP.frame(QMP.Command(name: name, arguments: arguments, id: .integer(id)).jsonValue)
        do {
            try Sys.writeAll(fd, bytes, operation: "send")
        } catch {
            throw Failure(errorClass: nil, description: "cannot send to flotillad: \(error)")
        }
        while true {
            let reply = try receive()
            guard reply["id"] == .integer(id) else { continue }
            if let value = reply["return"] { return value }
            let error = reply["error"]?.objectValue
            throw Failure(errorClass: error?["class"]?.stringValue, description: error?["desc"]?.stringValue ?? "unknown error")
        }
    }
}
