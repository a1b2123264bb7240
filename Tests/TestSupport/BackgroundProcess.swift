import Foundation
import Glibc

/// A child process that keeps running while a test talks to it; its output is collected
/// as it arrives.
public final class BackgroundProcess: @unchecked Sendable {
    // Invariant: `process` is configured before `run()` and only read afterwards; the output
    // is in `collected`, under its lock.
    private let process = Process()
    /// What the reader threads fill. They hold this, not the BackgroundProcess: were they to
    /// hold `self` until the pipes close, a test that fails before ending its process would
    /// never run `deinit`, and the process (a VM holding forever) would outlive the test run.
    private final class Collected: @unchecked Sendable {
        // Invariant: every field is read and written with `lock` held.
        let lock = NSLock()
        var output = Data()
        var errorOutput = Data()
        var readersDone = 0
    }
    private let collected = Collected()

    /// Where `write(toStandardInput:)` sends bytes, when the process was started with input.
    private let inputPipe: Pipe?

    public init(_ executable: String, _ arguments: [String], withInput: Bool = false) throws {
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let outputPipe = Pipe()
        let errorPipe = Pipe()
        process.standardOutput = outputPipe
        process.standardError = errorPipe
        inputPipe = withInput ? Pipe() : nil
        if let inputPipe {
            process.standardInput = inputPipe
        } else {
            process.standardInput = FileHandle.nullDevice
        }
        try process.run()
        for (pipe, isError) in [(outputPipe, false), (errorPipe, true)] {
            Thread { [collected] in
                let handle = pipe.fileHandleForReading
                while true {
                    let chunk = handle.availableData
                    collected.lock.lock()
                    if chunk.isEmpty {
                        collected.readersDone += 1
                        collected.lock.unlock()
                        return
                    }
                    if isError { collected.errorOutput.append(chunk) } else { collected.output.append(chunk) }
                    collected.lock.unlock()
                }
            }.start()
        }
    }

    public var pid: pid_t { process.processIdentifier }

    /// Sends `text` to the process's standard input (started with `withInput: true`).
    public func write(toStandardInput text: String) throws {
        try inputPipe?.fileHandleForWriting.write(contentsOf: Data(text.utf8))
    }
    public var isRunning: Bool { process.isRunning }

    public var standardOutput: String {
        collected.lock.lock()
        defer { collected.lock.unlock() }
        return String(decoding: collected.output, as: UTF8.self)
    }

    public var standardError: String {
        collected.lock.lock()
        defer { collected.lock.unlock() }
        return String(decoding: collected.errorOutput, as: UTF8.self)
    }

    /// Waits until standard output contains `text`; false on timeout or exit.
    public func waitForOutput(_ text: String, timeout: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if standardOutput.contains(text) { return true }
            if !process.isRunning { return standardOutput.contains(text) }
            usleep(5000)
        }
        return false
    }

    /// Standard output's complete lines: a line still being written (no newline yet) is left out,
    /// so a check read from it is never cut short.
    public var completeLines: [Substring] {
        let output = standardOutput
        guard let lastNewline = output.lastIndex(of: "\n") else { return [] }
        return output[..<lastNewline].split(separator: "\n", omittingEmptySubsequences: false)
    }

    /// Waits until `count` complete lines of standard output contain `text`; false on timeout or exit.
    public func waitForLine(containing text: String, count: Int = 1, timeout: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        func matched() -> Bool { completeLines.lazy.filter { $0.contains(text) }.count >= count }
        while Date() < deadline {
            if matched() { return true }
            if !process.isRunning { return matched() }
            usleep(5000)
        }
        return false
    }

    public func signal(_ signal: Int32) {
        kill(process.processIdentifier, signal)
    }

    /// Waits for the exit status; kills the process after `timeout` seconds.
    @discardableResult
    public func wait(timeout: Double = 30) -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning {
            if Date() > deadline { kill(process.processIdentifier, SIGKILL) }
            usleep(2000)
        }
        process.waitUntilExit()
        let readDeadline = Date().addingTimeInterval(2)
        while Date() < readDeadline {
            collected.lock.lock()
            let done = collected.readersDone == 2
            collected.lock.unlock()
            if done { break }
            usleep(1000)
        }
        return process.terminationStatus
    }

    deinit {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }
}

/// Reads a text file, or nil. Reads to the end rather than trusting the file size, which
/// /proc files report as 0.
public func readText(_ path: String) -> String? {
    guard let handle = FileHandle(forReadingAtPath: path) else { return nil }
    defer { try? handle.close() }
    guard let data = try? handle.readToEnd() else { return "" }
    return String(decoding: data, as: UTF8.self)
}
