import Foundation
import Glibc

/// A network namespace made for one test, with the tap devices it needs; the Linux kernel in it
/// is the guest's real peer (it answers ARP and ICMP echo). Removed with everything in it.
public struct NetworkNamespace: Sendable {
    public static let ipTool: String? = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].first { (path: String) in
        access(path, X_OK) == 0
    }
    /// Root (CAP_NET_ADMIN for namespaces and taps), /dev/net/tun, and ip(8).
    public static let available = getuid() == 0 && access("/dev/net/tun", R_OK | W_OK) == 0 && ipTool != nil

    public let name: String
    /// ip(8).
    public let ip: String

    public init() throws {
        // Unique across concurrent test processes and runs.
        name = "flotilla-net-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        guard let ip = Self.ipTool else { throw NamespaceFailure(description: "no ip(8)") }
        self.ip = ip
        try command(["netns", "add", name])
    }

    @discardableResult
    public func command(_ arguments: [String]) throws -> String {
        let result = try run(ip, arguments, timeout: 30)
        guard result.status == 0 else {
            throw NamespaceFailure(description: "ip \(arguments.joined(separator: " ")): \(result.standardError)")
        }
        return result.standardOutput
    }

    /// A tap in the namespace, with `address` (CIDR), up; returns its MAC address.
    @discardableResult
    public func addTap(_ tap: String, address: String? = nil) throws -> String {
        try command(["-n", name, "tuntap", "add", tap, "mode", "tap"])
        if let address { try command(["-n", name, "addr", "add", address, "dev", tap]) }
        try command(["-n", name, "link", "set", tap, "up"])
        return try mac(of: tap)
    }

    public func mac(of interface: String) throws -> String {
        let text = try command(["-n", name, "-o", "link", "show", interface])
        let words = text.split(separator: " ")
        guard let index = words.firstIndex(of: "link/ether"), index + 1 < words.count else {
            throw NamespaceFailure(description: "no link/ether in: \(text)")
        }
        return String(words[index + 1])
    }

    /// flotilla-vmm run inside the namespace: `ip netns exec` enters it and execs the program.
    public func vmmArguments(_ vmm: String, _ arguments: [String]) -> [String] {
        ["netns", "exec", name, vmm] + arguments
    }

    public func remove() {
        _ = try? run(ip, ["netns", "del", name], timeout: 30)
    }
}

public struct NamespaceFailure: Error, CustomStringConvertible {
    public let description: String
}
