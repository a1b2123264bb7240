import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Testing

/// virtio-balloon end to end: QMP `balloon` / `query-balloon` / BALLOON_CHANGE on a real
/// api-channel, the test guest's balloon driver on real /dev/kvm, and the host memory of the
/// worker's guest RAM mapping read from /proc/PID/smaps.
@Suite("virtio-balloon through the test guest and QMP", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct VirtioBalloonTests {
    let vmm = Executables.path("flotilla-vmm")
    static let ram: Int64 = 256 << 20
    /// The test guest's balloon region (Guest/src/virtio_balloon.c): 4096 pages it has touched.
    static let pages = 4096

    /// Rss in bytes of the worker's guest RAM: its only mapping of exactly the RAM size.
    static func guestRAMRss(pid: pid_t) throws -> Int64 {
        let smaps = try #require(readText("/proc/\(pid)/smaps"))
        var sizes: [(size: Int64, rss: Int64)] = []
        for line in smaps.split(separator: "\n") {
            let words = line.split(separator: " ", omittingEmptySubsequences: true)
            guard words.count >= 2, let kib = Int64(words[1]) else { continue }
            if words[0] == "Size:" { sizes.append((kib << 10, -1)) }
            if words[0] == "Rss:", let last = sizes.indices.last { sizes[last].rss = kib << 10 }
        }
        let ram = sizes.filter { $0.size == Self.ram }
        try #require(ram.count == 1, "mappings of \(Self.ram) bytes: \(ram.count)")
        return ram[0].rss
    }

    @Test("QMP balloon inflates the guest's balloon: its fact, query-balloon, BALLOON_CHANGE and the host Rss agree; then it deflates")
    func inflateAndDeflate() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let api = directory.file("api.sock")
        let process = try BackgroundProcess(
            vmm,
            [
                "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "console=ttyS0 flotilla.hold=1",
                "-balloon", "deflate-on-oom=true", "-api-channel", "unix:\(api)",
            ])
        let qmp = try QMPTestClient(path: api)
        try qmp.handshake()
        #expect(process.waitForOutput("flotilla-guest: fact balloon pages=0", timeout: 60), "\(process.standardOutput)")
        let report = GuestReport(output: process.standardOutput)
        let fact = try #require(report.fact("device virtio-balloon"), "\(process.standardOutput)")
        #expect(fact["max_pages"] == "\(Self.pages)" && fact["deflate_on_oom"] == "1")
        #expect(report.checks["virtio-balloon"] == "ok" && report.done?.fail == 0, "\(report.lines)")
        #expect(try qmp.execute("query-balloon")["return"] == ["actual": .integer(Self.ram)])

        // The guest has written into every page of its region: resident now.
        let before = try Self.guestRAMRss(pid: process.pid)
        let target = Self.ram - Int64(Self.pages) * 4096
        #expect(try qmp.execute("balloon", arguments: ["value": .integer(target)])["return"] == [:])
        let inflated = try qmp.waitForEvent("BALLOON_CHANGE")
        #expect(inflated["data"] == ["actual": .integer(target)])
        #expect(
            process.waitForLine(containing: "fact balloon pages=\(Self.pages) target=\(Self.pages)", timeout: 60),
            "\(process.standardOutput)")
        #expect(try qmp.execute("query-balloon")["return"] == ["actual": .integer(target)])
        let after = try Self.guestRAMRss(pid: process.pid)
        // Every ballooned page left the host's resident set (the idle guest adds none meanwhile).
        #expect(before - after >= Int64(Self.pages) * 4096, "guest RAM Rss \(before) -> \(after)")

        // Deflate: back to the whole RAM; the pages the guest gets back read as zeroes.
        #expect(try qmp.execute("balloon", arguments: ["value": .integer(Self.ram)])["return"] == [:])
        let deflated = try qmp.waitForEvent("BALLOON_CHANGE")
        #expect(deflated["data"] == ["actual": .integer(Self.ram)])
        #expect(
            process.waitForLine(containing: "fact balloon pages=0 target=0 zeroed=\(Self.pages)", timeout: 60), "\(process.standardOutput)")
        #expect(try qmp.execute("query-balloon")["return"] == ["actual": .integer(Self.ram)])

        // QEMU's checks of the value.
        let zero = try qmp.execute("balloon", arguments: ["value": 0])
        #expect(zero["error"]?.objectValue?["class"] == "GenericError", "\(zero)")
        let text = try qmp.execute("balloon", arguments: ["value": "1G"])
        #expect(text["error"]?.objectValue?["desc"] == "Invalid parameter type for 'value', expected: integer", "\(text)")

        #expect(try qmp.execute("quit")["return"] == [:])
        #expect(process.wait() == 0, "\(process.standardError)")
    }

    @Test("without a balloon device, balloon and query-balloon fail as QEMU's do (DeviceNotActive)")
    func noDevice() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let api = directory.file("api.sock")
        let process = try BackgroundProcess(
            vmm, ["-kernel", GuestImages.vmlinux, "-append", "console=ttyS0 flotilla.hold=1", "-api-channel", "unix:\(api)"])
        let qmp = try QMPTestClient(path: api)
        try qmp.handshake()
        for (command, arguments) in [("balloon", ["value": JSONValue.integer(1 << 28)]), ("query-balloon", [:])] as [(String, JSONObject)] {
            let reply = try qmp.execute(command, arguments: arguments)
            let error = try #require(reply["error"]?.objectValue, "\(reply)")
            #expect(error["class"] == "DeviceNotActive" && error["desc"] == "No balloon device has been activated", "\(reply)")
        }
        #expect(try qmp.execute("quit")["return"] == [:])
        #expect(process.wait() == 0, "\(process.standardError)")
    }

    @Test("-balloon with -mem-path is a configuration error (exit 1), nothing created")
    func hugePages() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let result = try run(
            vmm,
            [
                "-kernel", GuestImages.vmlinux, "-balloon", "deflate-on-oom=on", "-mem-path", directory.path, "-api-channel",
                "unix:\(directory.file("api.sock"))",
            ])
        #expect(result.status == 1)
        #expect(result.standardError.contains("-mem-path") && result.standardError.contains("-balloon"), "\(result.standardError)")
        #expect(try directory.contents().isEmpty)
    }
}
