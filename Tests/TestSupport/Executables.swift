import Foundation

/// Locates the package's executables next to the running test bundle, so tests run the
/// binaries this build produced, whatever scratch path it used.
public enum Executables {
    public static var directory: URL {
        let testBinary = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        var directory = testBinary.deletingLastPathComponent()
        // On Linux the bundle is `<build dir>/FlotillaPackageTests.xctest`, a plain executable.
        if directory.lastPathComponent.hasSuffix(".xctest") { directory.deleteLastPathComponent() }
        return directory
    }

    public static func path(_ name: String) -> String {
        directory.appendingPathComponent(name).path
    }
}

/// The outcome of running a process to completion.
public struct ProcessResult: Sendable {
    public let status: Int32
    public let standardOutput: String
    public let standardError: String
}

/// Runs `executable` with `arguments`, waits for it (killing it after `timeout` seconds)
/// and collects its output.
public func run(
    _ executable: String, _ arguments: [String], environment: [String: String]? = nil, timeout: Double = 120
) throws -> ProcessResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    if let environment { process.environment = environment }
    let output = Pipe()
    let error = Pipe()
    process.standardOutput = output
    process.standardError = error
    process.standardInput = FileHandle.nullDevice
    try process.run()
    // Drain both pipes on their own threads so a chatty child cannot block on a full pipe.
    let outputData = LockedData()
    let errorData = LockedData()
    Thread { outputData.set(output.fileHandleForReading.readDataToEndOfFile()) }.start()
    Thread { errorData.set(error.fileHandleForReading.readDataToEndOfFile()) }.start()
    let deadline = Date().addingTimeInterval(timeout)
    while process.isRunning {
        if Date() > deadline {
            kill(process.processIdentifier, SIGKILL)
            break
        }
        usleep(2000)
    }
    process.waitUntilExit()
    // A daemon may keep the pipes open after the command exits; do not wait for it.
    let readDeadline = Date().addingTimeInterval(5)
    while !(outputData.isSet && errorData.isSet) && Date() < readDeadline { usleep(1000) }
    return ProcessResult(
        status: process.terminationStatus,
        standardOutput: String(decoding: outputData.value, as: UTF8.self),
        standardError: String(decoding: errorData.value, as: UTF8.self))
}

/// A `Data` handed from a reader thread to the test thread.
final class LockedData: @unchecked Sendable {
    // Invariant: `data` and `done` are only touched while holding `lock`.
    private let lock = NSLock()
    private var data = Data()
    private var done = false

    func set(_ value: Data) {
        lock.lock()
        data = value
        done = true
        lock.unlock()
    }

    var isSet: Bool {
        lock.lock()
        defer { lock.unlock() }
        return done
    }

    var value: Data {
        lock.lock()
        defer { lock.unlock() }
        return data
    }
}

/// A fresh temporary directory, removed by `remove()`.
public struct TemporaryDirectory: Sendable {
    public let path: String

    public init(_ prefix: String = "flotilla-test") throws {
        var template = Array("/tmp/\(prefix).XXXXXX".utf8CString)
        let created = template.withUnsafeMutableBufferPointer { buffer -> String? in
            guard let base = buffer.baseAddress, mkdtemp(base) != nil else { return nil }
            return String(cString: base)
        }
        guard let created else { throw CocoaError(.fileWriteUnknown) }
        path = created
    }

    public func file(_ name: String) -> String { path + "/" + name }

    /// The names in the directory, sorted.
    public func contents() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: path).sorted()
    }

    public func remove() {
        try? FileManager.default.removeItem(atPath: path)
    }
}
