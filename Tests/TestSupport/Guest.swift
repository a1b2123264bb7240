import Foundation
import Glibc

/// The Flotilla test guest's images, built on demand with `make -C Guest`.
public enum GuestImages {
    public static let repositoryRoot: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    public static var vmlinux: String { build("flotilla-guest.vmlinux") }
    public static var bzImage: String { build("flotilla-guest.bzImage") }

    private static let buildLock = NSLock()

    private static func build(_ name: String) -> String {
        buildLock.lock()
        defer { buildLock.unlock() }
        let path = repositoryRoot.appendingPathComponent("Guest/build/\(name)").path
        // make is cheap when the images are up to date; it keeps them current when Guest/ changed.
        _ = try? run("/usr/bin/make", ["-s", "-C", repositoryRoot.appendingPathComponent("Guest").path], timeout: 300)
        return path
    }
}

/// What the test guest reported on its serial port.
public struct GuestReport: Sendable {
    public let lines: [String]

    public init(output: String) {
        lines = output.split(separator: "\n", omittingEmptySubsequences: true).map { String($0) }
            .filter { $0.hasPrefix("flotilla-guest: ") }
    }

    /// `key=value` pairs of the first `fact <topic>` line (values up to the next space;
    /// `text=` takes the rest of the line).
    public func fact(_ topic: String) -> [String: String]? {
        let prefix = "flotilla-guest: fact \(topic) "
        guard let line = lines.first(where: { $0.hasPrefix(prefix) }) else { return nil }
        return Self.pairs(String(line.dropFirst(prefix.count)))
    }

    /// Every `fact <topic>` line's pairs.
    public func facts(_ topic: String) -> [[String: String]] {
        let prefix = "flotilla-guest: fact \(topic) "
        return lines.filter { $0.hasPrefix(prefix) }.map { Self.pairs(String($0.dropFirst(prefix.count))) }
    }

    static func pairs(_ text: String) -> [String: String] {
        var result: [String: String] = [:]
        var rest = Substring(text)
        while !rest.isEmpty {
            rest = rest.drop { $0 == " " }
            guard let equals = rest.firstIndex(of: "=") else { break }
            let key = String(rest[..<equals])
            let afterEquals = rest[rest.index(after: equals)...]
            if key == "text" {
                result[key] = String(afterEquals)
                break
            }
            let value = afterEquals.prefix { $0 != " " }
            result[key] = String(value)
            rest = afterEquals.dropFirst(value.count)
        }
        return result
    }

    /// `check <name>` results: name → "ok" or "fail".
    public var checks: [String: String] {
        var result: [String: String] = [:]
        for line in lines where line.hasPrefix("flotilla-guest: check ") {
            let words = line.split(separator: " ")
            if words.count >= 4 { result[String(words[2])] = String(words[3]) }
        }
        return result
    }

    /// The final `done pass=<n> fail=<m>` counts.
    public var done: (pass: Int, fail: Int)? {
        guard let line = lines.last(where: { $0.hasPrefix("flotilla-guest: done ") }) else { return nil }
        let pairs = Self.pairs(String(line.dropFirst("flotilla-guest: done ".count)))
        guard let pass = pairs["pass"].flatMap(Int.init), let fail = pairs["fail"].flatMap(Int.init) else { return nil }
        return (pass, fail)
    }
}

/// Whether this host can run KVM guests; tests that need it are skipped otherwise.
public enum KVM {
    public static let available: Bool = access("/dev/kvm", R_OK | W_OK) == 0
}

/// CRC-32/IEEE (zlib's crc32), to check what the guest computed.
public func crc32(_ bytes: some Sequence<UInt8>) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    for byte in bytes {
        crc ^= UInt32(byte)
        for _ in 0..<8 { crc = crc & 1 == 1 ? (crc >> 1) ^ 0xEDB8_8320 : crc >> 1 }
    }
    return ~crc
}
