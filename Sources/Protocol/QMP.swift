/// QMP wire types (QEMU Machine Protocol, docs/interop/qmp-spec.rst): what flotilla-vmm's
/// api-channel and flotillad's multiplexer send and receive.
public enum QMP {
    /// The error classes of QMP spec §2.4.2 that Flotilla uses.
    public enum ErrorClass: String, Sendable {
        case genericError = "GenericError"
        case commandNotFound = "CommandNotFound"
        case deviceNotFound = "DeviceNotFound"
        case deviceNotActive = "DeviceNotActive"
    }

    /// A command sent by a client (spec §2.3): `execute`, optional `arguments` and `id`.
    public struct Command: Sendable, Equatable {
        public var name: String
        public var arguments: JSONObject
        /// Any JSON value; echoed unchanged in the reply.
        public var id: JSONValue?

        public init(name: String, arguments: JSONObject = JSONObject(), id: JSONValue? = nil) {
            self.name = name
            self.arguments = arguments
            self.id = id
        }

        /// The command as a client writes it.
        public var jsonValue: JSONValue {
            var object: JSONObject = ["execute": .string(name)]
            if !arguments.isEmpty { object["arguments"] = .object(arguments) }
            if let id { object["id"] = id }
            return .object(object)
        }
    }

    /// A message from a client that is not a well-formed command: the error to send back,
    /// and the id when one could still be read (QEMU replies with it when present).
    public struct InputError: Error, Sendable, Equatable {
        public let description: String
        public let id: JSONValue?
    }

    /// Reads one client message, following QEMU's checks of "execute", "arguments", "id".
    public static func parseCommand(_ text: [UInt8]) -> Result<Command, InputError> {
        let value: JSONValue
        do {
            value = try JSONValue.parse(bytes: text)
        } catch {
            return .failure(InputError(description: "JSON parse error, \(error.message)", id: nil))
        }
        guard let object = value.objectValue else {
            return .failure(InputError(description: "QMP input must be a JSON object", id: nil))
        }
        let id = object["id"]
        for key in object.keys where !["execute", "arguments", "id", "exec-oob"].contains(key) {
            return .failure(InputError(description: "QMP input member '\(key)' is unexpected", id: id))
        }
        if object["exec-oob"] != nil {
            return .failure(
                InputError(description: "QMP input member 'exec-oob' is unexpected: out-of-band execution is not enabled", id: id))
        }
        guard let execute = object["execute"] else {
            return .failure(InputError(description: "QMP input lacks member 'execute'", id: id))
        }
        guard let name = execute.stringValue else {
            return .failure(InputError(description: "QMP input member 'execute' must be a string", id: id))
        }
        var arguments = JSONObject()
        if let value = object["arguments"] {
            guard let object = value.objectValue else {
                return .failure(InputError(description: "QMP input member 'arguments' must be an object", id: id))
            }
            arguments = object
        }
        return .success(Command(name: name, arguments: arguments, id: id))
    }

    /// The greeting a server sends on connect (spec §2.2).
    public static func greeting(major: Int, minor: Int, micro: Int, package: String) -> JSONValue {
        [
            "QMP": [
                "version": [
                    "qemu": ["micro": .integer(micro), "minor": .integer(minor), "major": .integer(major)],
                    "package": .string(package),
                ],
                "capabilities": [],
            ]
        ]
    }

    /// A successful reply (spec §2.4.1).
    public static func success(_ value: JSONValue = .object([:]), id: JSONValue?) -> JSONValue {
        var object: JSONObject = ["return": value]
        if let id { object["id"] = id }
        return .object(object)
    }

    /// An error reply (spec §2.4.2).
    public static func error(_ errorClass: ErrorClass, _ description: String, id: JSONValue?) -> JSONValue {
        var object: JSONObject = ["error": ["class": .string(errorClass.rawValue), "desc": .string(description)]]
        if let id { object["id"] = id }
        return .object(object)
    }

    /// An asynchronous event (spec §2.5) with the time it happened.
    public static func event(_ name: String, data: JSONObject = JSONObject(), seconds: Int64, microseconds: Int64) -> JSONValue {
        [
            "event": .string(name),
            "data": .object(data),
            "timestamp": ["seconds": .integer(seconds), "microseconds": .integer(microseconds)],
        ]
    }

    /// The bytes of one outgoing message: compact JSON ended by CRLF, as QEMU writes it.
    public static func frame(_ message: JSONValue) -> [UInt8] {
        Array((message.compactText + "\r\n").utf8)
    }
}

/// Splits a byte stream into top-level JSON texts, as QMP's streaming parser does: a client
/// may send several commands in one write, or one command over many writes, with or without
/// newlines between them.
public struct JSONStreamSplitter: Sendable {
    /// Refuse a single message larger than this (QEMU's limit is of the same order).
    public static let maximumMessageSize = 1 << 20

    private var buffer: [UInt8] = []
    private var depth = 0
    private var inString = false
    private var escaped = false
    private var scanned = 0

    public init() {}

    public enum Piece: Sendable, Equatable {
        /// One complete JSON text (an object or array), or a lone scalar token.
        case message([UInt8])
        /// Input that can never become valid (an oversized message, or a stray closing bracket).
        case garbage(String)
    }

    /// Adds bytes and returns the complete pieces they finish.
    public mutating func append(_ bytes: some Sequence<UInt8>) -> [Piece] {
        buffer.append(contentsOf: bytes)
        var pieces: [Piece] = []
        var start = 0
        var index = scanned
        while index < buffer.count {
            let byte = buffer[index]
            index += 1
            if inString {
                if escaped {
                    escaped = false
                } else if byte == UInt8(ascii: "\\") {
                    escaped = true
                } else if byte == UInt8(ascii: "\"") {
                    inString = false
                    if depth == 0 {
                        // A string outside any object: hand it over so the reply can say why.
                        pieces.append(.message(Array(buffer[start..<index])))
                        start = index
                    }
                }
                continue
            }
            switch byte {
            case UInt8(ascii: "\""):
                inString = true
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                depth += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                if depth == 0 {
                    pieces.append(.garbage("unexpected '\(Character(UnicodeScalar(byte)))'"))
                    start = index
                } else {
                    depth -= 1
                    if depth == 0 {
                        pieces.append(.message(Array(buffer[start..<index])))
                        start = index
                    }
                }
            case 0x20, 0x09, 0x0a, 0x0d:
                if depth == 0 { start = index }
            default:
                if depth == 0 {
                    // A scalar outside any object: read up to the next delimiter and hand it
                    // over, so that the reply says "must be a JSON object".
                    var end = index
                    while end < buffer.count, ![0x20, 0x09, 0x0a, 0x0d, UInt8(ascii: "{"), UInt8(ascii: "[")].contains(buffer[end]) {
                        end += 1
                    }
                    if end == buffer.count {
                        // Perhaps more of this token is still coming.
                        index -= 1
                        buffer.removeSubrange(0..<index)
                        scanned = 0
                        return pieces
                    }
                    pieces.append(.message(Array(buffer[(index - 1)..<end])))
                    index = end
                    start = end
                }
            }
        }
        buffer.removeSubrange(0..<start)
        scanned = buffer.count
        if buffer.count > Self.maximumMessageSize {
            buffer.removeAll()
            depth = 0
            inString = false
            escaped = false
            scanned = 0
            pieces.append(.garbage("message larger than \(Self.maximumMessageSize) bytes"))
        }
        return pieces
    }
}
