/// A QMP command's arguments that do not fit its schema, worded as QEMU's QAPI input
/// visitor words them ("Parameter 'x' is missing", "Parameter 'x' is unexpected",
/// "Invalid parameter type for 'x', expected: boolean"); always a GenericError.
public struct QMPArgumentError: Error, Sendable, Equatable, CustomStringConvertible {
    public let description: String

    public init(_ description: String) {
        self.description = description
    }
}

/// Typed access to a command's `arguments` object (or a nested object such as blockdev-add's
/// `file`), checked against the members the command knows. Nested members are named with
/// their path (`file.filename`), as QEMU names them in its errors.
public struct QMPArguments: Sendable {
    public let object: JSONObject
    let path: String

    /// Refuses any member not in `allowed` (in sorted order, so the error is deterministic).
    public init(_ object: JSONObject, allowed: Set<String>, path: String = "") throws(QMPArgumentError) {
        self.object = object
        self.path = path
        for key in object.keys.sorted() where !allowed.contains(key) {
            throw QMPArgumentError("Parameter '\(path + key)' is unexpected")
        }
    }

    /// The arguments of a command that takes none.
    public static func none(_ object: JSONObject) throws(QMPArgumentError) {
        _ = try QMPArguments(object, allowed: [])
    }

    func name(_ key: String) -> String { path + key }

    public func has(_ key: String) -> Bool { object[key] != nil }

    public func string(_ key: String) throws(QMPArgumentError) -> String {
        guard let value = try optionalString(key) else { throw QMPArgumentError("Parameter '\(name(key))' is missing") }
        return value
    }

    public func optionalString(_ key: String) throws(QMPArgumentError) -> String? {
        guard let value = object[key] else { return nil }
        guard let text = value.stringValue else {
            throw QMPArgumentError("Invalid parameter type for '\(name(key))', expected: string")
        }
        return text
    }

    public func optionalBool(_ key: String) throws(QMPArgumentError) -> Bool? {
        guard let value = object[key] else { return nil }
        guard let flag = value.boolValue else {
            throw QMPArgumentError("Invalid parameter type for '\(name(key))', expected: boolean")
        }
        return flag
    }

    /// A JSON integer that fits UInt64 (QAPI's uint64 and size types).
    public func optionalUnsigned(_ key: String) throws(QMPArgumentError) -> UInt64? {
        guard let value = object[key] else { return nil }
        guard let number = value.numberValue?.unsignedValue else {
            throw QMPArgumentError("Invalid parameter type for '\(name(key))', expected: integer")
        }
        return number
    }

    /// A nested object, checked against its own members; nil when absent.
    public func optionalObject(_ key: String, allowed: Set<String>) throws(QMPArgumentError) -> QMPArguments? {
        guard let value = object[key] else { return nil }
        guard let nested = value.objectValue else {
            throw QMPArgumentError("Invalid parameter type for '\(name(key))', expected: object")
        }
        return try QMPArguments(nested, allowed: allowed, path: name(key) + ".")
    }

    public func object(_ key: String, allowed: Set<String>) throws(QMPArgumentError) -> QMPArguments {
        guard let nested = try optionalObject(key, allowed: allowed) else {
            throw QMPArgumentError("Parameter '\(name(key))' is missing")
        }
        return nested
    }
}
