/// A request flotillad refuses or an operation that failed, in words a person can act on:
/// which field or VM, the value given and what is allowed.
public struct SupervisorError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Code: String, Sendable {
        /// A field of a request or document is missing or has a value that is not allowed.
        case invalidArgument = "InvalidArgument"
        /// No VM has that name.
        case notFound = "NotFound"
        /// A VM with that name exists already.
        case alreadyExists = "AlreadyExists"
        /// The VM is not in a state that allows the request.
        case wrongState = "WrongState"
        /// The operation was attempted and failed (spawn, start-up, file system).
        case failed = "Failed"
        /// The peer is not allowed to use the control socket.
        case permissionDenied = "PermissionDenied"
        /// The command is not one flotillad knows.
        case unknownCommand = "CommandNotFound"
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// A field with a value that is not allowed.
    public static func invalid(_ field: String, _ value: String?, _ allowed: String) -> SupervisorError {
        let given = value.map { "\(field): \($0) is not allowed" } ?? "\(field): a value is required"
        return SupervisorError(.invalidArgument, given + "; allowed: \(allowed)")
    }

    public var description: String { message }
}
