import SystemPackage

/// The shape every VMM error area shares: a machine-readable code, a sentence for the user,
/// and the underlying cause (often a ``SyscallError``) when there is one.
public protocol VMMAreaError: Error, CustomStringConvertible, Sendable {
    associatedtype Code: RawRepresentable, Sendable where Code.RawValue == String
    var code: Code { get }
    var message: String { get }
    var cause: (any Error & Sendable)? { get }
}

extension VMMAreaError {
    public var description: String {
        if let cause { return "\(message): \(cause)" }
        return message
    }
}

/// A failed system call: which call, and the errno it returned.
public struct SyscallError: Error, CustomStringConvertible, Sendable {
    public let operation: String
    public let errno: Errno

    public init(_ operation: String, _ errno: Errno) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String { "\(operation) failed: \(errno) (errno \(errno.rawValue))" }
}

/// Errors of the KVM handles (`/dev/kvm`, the VM and vCPU file descriptors).
public struct KVMError: VMMAreaError {
    public enum Code: String, Sendable {
        case unavailable, apiVersion, missingCapability, ioctl, mmap
    }
    public let code: Code
    public let message: String
    public let cause: (any Error & Sendable)?

    public init(_ code: Code, _ message: String, cause: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }
}

/// Errors of guest memory: mapping it, and every out-of-range guest address.
public struct MemoryError: VMMAreaError {
    public enum Code: String, Sendable {
        case invalidSize, mapFailed, backingFile, outOfRange
    }
    public let code: Code
    public let message: String
    public let cause: (any Error & Sendable)?

    public init(_ code: Code, _ message: String, cause: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }
}

/// Errors of loading a kernel, an initrd and the boot structures.
public struct BootError: VMMAreaError {
    public enum Code: String, Sendable {
        case unreadable, truncated, badMagic, unsupported, invalidHeader, tooLarge, commandLineTooLong,
            placement
    }
    public let code: Code
    public let message: String
    public let cause: (any Error & Sendable)?

    public init(_ code: Code, _ message: String, cause: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }
}

/// Errors of vCPU set-up and of running a vCPU.
public struct CPUError: VMMAreaError {
    public enum Code: String, Sendable {
        case setup, thread, run, guestFailure
    }
    public let code: Code
    public let message: String
    public let cause: (any Error & Sendable)?

    public init(_ code: Code, _ message: String, cause: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }
}

/// Errors of building or driving the machine as a whole.
public struct MachineError: VMMAreaError {
    public enum Code: String, Sendable {
        case invalidConfig, state, startFailed
    }
    public let code: Code
    public let message: String
    public let cause: (any Error & Sendable)?

    public init(_ code: Code, _ message: String, cause: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }
}
