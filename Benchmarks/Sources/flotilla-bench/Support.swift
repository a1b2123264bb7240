import CBench
import Foundation

struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

func errnoText(_ code: Int32) -> String { String(cString: strerror(code)) }

// MARK: Statistics

func median(_ xs: [Double]) -> Double { percentile(xs, 50) }

/// Nearest-rank percentile (p in 0...100).
func percentile(_ xs: [Double], _ p: Double) -> Double {
    precondition(!xs.isEmpty)
    let sorted = xs.sorted()
    let rank = Int((p / 100 * Double(sorted.count)).rounded(.up))
    return sorted[min(max(rank, 1), sorted.count) - 1]
}

func mean(_ xs: [Double]) -> Double { xs.reduce(0, +) / Double(xs.count) }

// MARK: Child processes

/// A spawned child. Killed (SIGKILL) and reaped by `stop()`.
final class Child {
    let pid: pid_t
    let name: String
    private(set) var exitStatus: Int32?
    private(set) var cpuNanoseconds: UInt64 = 0

    init(_ path: String, _ arguments: [String], stdout: Int32 = -1, stderr: Int32 = -1) throws {
        name = (path as NSString).lastPathComponent
        var cArgs: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) }
        cArgs.append(nil)
        defer { for p in cArgs { free(p) } }
        let r = cb_spawn(path, cArgs, stdout, stderr)
        guard r > 0 else { throw BenchError("spawn \(path): \(errnoText(-r))") }
        pid = r
    }

    /// nil while running.
    func poll() -> Int32? {
        if let exitStatus { return exitStatus }
        var cpu: UInt64 = 0
        let r = cb_wait(pid, 1, &cpu)
        if r == -1000 { return nil }
        exitStatus = r
        cpuNanoseconds = cpu
        return r
    }

    @discardableResult
    func wait() -> Int32 {
        if let exitStatus { return exitStatus }
        var cpu: UInt64 = 0
        let r = cb_wait(pid, 0, &cpu)
        exitStatus = r
        cpuNanoseconds = cpu
        return r
    }

    func stop() {
        if exitStatus == nil {
            kill(pid, SIGKILL)
            wait()
        }
    }

    deinit { stop() }
}

/// A line reader over a file descriptor (QMP socket or a child's stdout pipe).
final class LineReader {
    let state: UnsafeMutablePointer<cb_reader>
    private var line = [CChar](repeating: 0, count: 65536)

    init(fd: Int32) {
        state = .allocate(capacity: 1)
        state.pointee.fd = fd
        state.pointee.len = 0
    }

    var fd: Int32 { state.pointee.fd }

    func readLine(timeoutMilliseconds: Int32 = 10_000) throws -> String {
        let n = line.withUnsafeMutableBufferPointer { buffer in
            cb_read_line(state, buffer.baseAddress, buffer.count, timeoutMilliseconds)
        }
        guard n >= 0 else { throw BenchError("read line: \(errnoText(Int32(-n)))") }
        return line.withUnsafeBufferPointer { buffer in
            String(decoding: UnsafeRawBufferPointer(buffer).prefix(Int(n)), as: UTF8.self)
        }
    }

    func close() { Glibc.close(state.pointee.fd) }

    deinit { state.deallocate() }
}

/// A QMP connection: greeting already read by `connect`.
final class QMPClient {
    let reader: LineReader
    let greeting: String

    init(reader: LineReader, greeting: String) {
        self.reader = reader
        self.greeting = greeting
    }

    /// Retries connect(2) every `pollMicroseconds` until the socket accepts and sends its
    /// greeting, or the child dies, or `timeout` passes.
    static func connect(path: String, child: Child?, timeout: Double = 20, pollMicroseconds: UInt32 = 200) throws
        -> QMPClient
    {
        let deadline = cb_now_ns() + UInt64(timeout * 1e9)
        while true {
            let fd = cb_connect_unix(path)
            if fd >= 0 {
                let reader = LineReader(fd: fd)
                let greeting = try reader.readLine()
                guard greeting.contains("\"QMP\"") else { throw BenchError("not a QMP greeting: \(greeting)") }
                return QMPClient(reader: reader, greeting: greeting)
            }
            guard fd == -ENOENT || fd == -ECONNREFUSED else {
                throw BenchError("connect \(path): \(errnoText(-fd))")
            }
            if let child, let status = child.poll() {
                throw BenchError("\(child.name) exited with status \(status) before its QMP socket accepted")
            }
            guard cb_now_ns() < deadline else { throw BenchError("QMP socket \(path) not ready after \(timeout) s") }
            cb_sleep_us(pollMicroseconds)
        }
    }

    /// Sends one command and returns its reply line (skipping asynchronous events).
    @discardableResult
    func execute(_ command: String) throws -> String {
        let text = "{\"execute\":\"\(command)\"}\r\n"
        let r = text.withCString { cb_write_all(reader.fd, $0, strlen($0)) }
        guard r == 0 else { throw BenchError("QMP write: \(errnoText(-r))") }
        while true {
            let line = try reader.readLine()
            if line.contains("\"return\"") || line.contains("\"error\"") { return line }
        }
    }

    func close() { reader.close() }
}

// MARK: /proc/PID/smaps

struct Mapping {
    var range: String
    var size: UInt64
    var name: String
    var rss: UInt64 = 0  // KiB
    var pss: UInt64 = 0
    var privateDirty: UInt64 = 0
}

func readSmaps(pid: pid_t) throws -> [Mapping] {
    // /proc files report size 0: read to EOF rather than by stat size.
    guard let handle = FileHandle(forReadingAtPath: "/proc/\(pid)/smaps") else {
        throw BenchError("cannot open /proc/\(pid)/smaps")
    }
    defer { try? handle.close() }
    let text = String(decoding: handle.readDataToEndOfFile(), as: UTF8.self)
    var mappings: [Mapping] = []
    for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
        let fields = line.split(separator: " ", omittingEmptySubsequences: true)
        guard let first = fields.first else { continue }
        if first.contains("-"), !first.hasSuffix(":") {
            let bounds = first.split(separator: "-")
            guard bounds.count == 2, let lo = UInt64(bounds[0], radix: 16), let hi = UInt64(bounds[1], radix: 16) else {
                continue
            }
            let name = fields.count > 5 ? fields[5...].joined(separator: " ") : ""
            mappings.append(Mapping(range: String(first), size: hi - lo, name: name))
            continue
        }
        guard fields.count >= 2, let value = UInt64(fields[1]), !mappings.isEmpty else { continue }
        switch first {
        case "Rss:": mappings[mappings.count - 1].rss = value
        case "Pss:": mappings[mappings.count - 1].pss = value
        case "Private_Dirty:": mappings[mappings.count - 1].privateDirty = value
        default: break
        }
    }
    return mappings
}

// MARK: Formatting

func ms(_ ns: Double) -> String { String(format: "%.1f ms", ns / 1e6) }
func us(_ ns: Double) -> String { String(format: "%.0f µs", ns / 1e3) }
func kib(_ k: Double) -> String { String(format: "%.0f KiB", k) }
func ratio(_ x: Double) -> String { String(format: "%.2f×", x) }

func pad(_ s: String, _ width: Int, right: Bool = false) -> String {
    let n = s.count
    if n >= width { return s }
    let fill = String(repeating: " ", count: width - n)
    return right ? fill + s : s + fill
}

/// Prints rows as a table; the first row is the header.
func printTable(_ rows: [[String]]) {
    guard let header = rows.first else { return }
    var widths = header.map(\.count)
    for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
    func render(_ row: [String]) -> String {
        row.enumerated().map { i, cell in pad(cell, widths[i], right: i > 0) }.joined(separator: "  ")
    }
    print(render(header))
    print(widths.map { String(repeating: "-", count: $0) }.joined(separator: "  "))
    for row in rows.dropFirst() { print(render(row)) }
}
