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

    /// linux/if_tun.h interface flags for ``openTap(_:flags:)``.
    public static let iffTun: Int16 = 0x0001
    public static let iffTap: Int16 = 0x0002
    public static let iffNoPI: Int16 = 0x1000
    public static let iffVnetHeader: Int16 = 0x4000

    /// Opens /dev/net/tun and attaches it (TUNSETIFF with `flags`) to interface `name` in the
    /// namespace, creating it if it does not exist: then it lives only as long as a descriptor
    /// of it is open (it is not persistent). This thread enters the namespace for the ioctl
    /// and goes back. Returns the descriptor (close-on-exec), which the caller closes.
    public func openTap(_ name: String, flags: Int16) throws -> Int32 {
        let home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)
        let target = open("/run/netns/\(self.name)", O_RDONLY | O_CLOEXEC)
        defer {
            if home >= 0 { close(home) }
            if target >= 0 { close(target) }
        }
        guard home >= 0, target >= 0, Self.setns(target, Self.cloneNewNet) == 0 else {
            throw NamespaceFailure(description: "entering network namespace \(self.name): errno \(errno)")
        }
        let fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC)
        var code: Int32 = 0
        if fd >= 0 {
            // struct ifreq: ifr_name[16], then ifr_flags (a short) in the union; 40 bytes.
            var request = [UInt8](repeating: 0, count: 40)
            for (index, byte) in name.utf8.prefix(15).enumerated() { request[index] = byte }
            request.withUnsafeMutableBytes { $0.storeBytes(of: flags, toByteOffset: 16, as: Int16.self) }
            if request.withUnsafeMutableBytes({ raw in raw.baseAddress.map { ioctl(fd, Self.tunSetIFF, $0) } ?? -1 }) != 0 { code = errno }
        } else {
            code = errno
        }
        let back = Self.setns(home, Self.cloneNewNet)
        guard fd >= 0, code == 0 else {
            if fd >= 0 { close(fd) }
            throw NamespaceFailure(description: "attaching to tap \(name): errno \(code)")
        }
        guard back == 0 else {
            close(fd)
            throw NamespaceFailure(description: "leaving network namespace \(self.name): errno \(errno)")
        }
        return fd
    }

    /// Whether interface `name` exists in the namespace.
    public func hasInterface(_ name: String) throws -> Bool {
        try command(["-n", self.name, "-o", "link", "show"]).split(separator: "\n").contains { line in
            line.split(separator: " ").dropFirst().first.map { $0.hasPrefix("\(name):") || $0.hasPrefix("\(name)@") } ?? false
        }
    }

    /// linux/if_tun.h TUNSETIFF: _IOW('T', 202, int).
    static let tunSetIFF: UInt = 0x4004_54ca
    /// sched.h CLONE_NEWNET; setns(2) through dlsym, as Glibc's module does not export it
    /// (it is behind _GNU_SOURCE).
    static let cloneNewNet: Int32 = 0x4000_0000
    static func setns(_ fd: Int32, _ type: Int32) -> Int32 {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "setns") else { return -1 }
        return unsafeBitCast(symbol, to: (@convention(c) (Int32, Int32) -> Int32).self)(fd, type)
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
