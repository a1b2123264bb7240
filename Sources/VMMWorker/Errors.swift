import SystemPackage

/// The shape every VMM error area shares: a machine-readable code, a sentence for the user,
/// and the underlying cause (often a ``SyscallError``) when there is one.
///
/// One generic type serves every area; each area is its own instantiation (``KVMError``,
/// ``BootError``, ...) with its own code enumeration, so errors of different areas stay
/// distinct types.
public struct AreaError<Code: RawRepresentable & Sendable>: Error, CustomStringConvertible, Sendable
where Code.RawValue == String {
    public let code: Code
    public let message: String
    public let cause: (any Error & Sendable)?

    public init(_ code: Code, _ message: String, cause: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

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
public typealias KVMError = AreaError<KVMErrorCode>

/// What went wrong, for ``KVMError``.
public enum KVMErrorCode: String, Sendable {
    case unavailable, apiVersion, missingCapability, ioctl, mmap
}

/// Errors of guest memory: mapping it, and every out-of-range guest address.
public typealias MemoryError = AreaError<MemoryErrorCode>

/// What went wrong, for ``MemoryError``.
public enum MemoryErrorCode: String, Sendable {
    case invalidSize, mapFailed, backingFile, outOfRange
}

/// Errors of loading a kernel, an initrd and the boot structures.
public typealias BootError = AreaError<BootErrorCode>

/// What went wrong, for ``BootError``.
public enum BootErrorCode: String, Sendable {
    case unreadable, truncated, badMagic, unsupported, invalidHeader, tooLarge, commandLineTooLong,
        placement
}

/// Errors of vCPU set-up and of running a vCPU.
public typealias CPUError = AreaError<CPUErrorCode>

/// What went wrong, for ``CPUError``.
public enum CPUErrorCode: String, Sendable {
    case setup, thread, run, guestFailure
}

/// Errors of building or driving the machine as a whole.
public typealias MachineError = AreaError<MachineErrorCode>

/// What went wrong, for ``MachineError``.
public enum MachineErrorCode: String, Sendable {
    case invalidConfig, state, startFailed
}
