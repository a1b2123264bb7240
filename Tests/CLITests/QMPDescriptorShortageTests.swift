import FlotillaTestSupport
import Foundation
import Glibc
import Testing

/// The api-channel when flotilla-vmm has no descriptor left for another client (run under
/// `prlimit --nofile`): accept4 fails with EMFILE and the connection stays queued, which keeps
/// the level-triggered listener ready. The main loop must rest the listener rather than spin on
/// it, and take the client once a descriptor is free again.
@Suite(
    "QMP api-channel out of descriptors",
    .enabled(if: KVM.available, "needs read-write /dev/kvm"),
    .enabled(if: access("/usr/bin/prlimit", X_OK) == 0, "needs prlimit (util-linux)"))
struct QMPDescriptorShortageTests {
    let vmm = Executables.path("flotilla-vmm")

    /// Whether `client` has something to read (its greeting) within `milliseconds`.
    static func readable(_ client: QMPTestClient, milliseconds: Int32) -> Bool {
        var entry = pollfd(fd: client.fd, events: Int16(POLLIN), revents: 0)
        return poll(&entry, 1, milliseconds) == 1
    }

    /// The process's CPU time so far, in clock ticks (utime + stime, /proc/PID/stat).
    static func cpuTicks(_ pid: pid_t) -> Int? {
        guard let stat = readText("/proc/\(pid)/stat"), let end = stat.lastIndex(of: ")") else { return nil }
        // After "pid (comm) ": state is field 3, utime 14 and stime 15.
        let fields = stat[stat.index(after: end)...].split(separator: " ")
        guard fields.count > 13, let user = Int(fields[11]), let system = Int(fields[12]) else { return nil }
        return user + system
    }

    @Test("with every descriptor in use, new clients wait queued while the main loop rests (no spinning), and are greeted once one is free")
    func shortage() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let api = directory.file("api.sock")
        let process = try BackgroundProcess(
            "/usr/bin/prlimit",
            [
                "--nofile=24:24", vmm, "-kernel", GuestImages.vmlinux, "-append", "console=ttyS0 flotilla.hold=1", "-serial", "stdio",
                "-api-channel", "unix:\(api)",
            ])
        #expect(process.waitForOutput("flotilla-guest: holding", timeout: 60), "\(process.standardError)")

        // Clients until one is not greeted: the VMM's descriptors are used up.
        var greeted: [QMPTestClient] = []
        var waiting: [QMPTestClient] = []
        while greeted.count < 24 {
            let client = try QMPTestClient(path: api)
            if Self.readable(client, milliseconds: 2000) {
                greeted.append(client)
            } else {
                waiting.append(client)
                break
            }
        }
        try #require(waiting.count == 1, "every client was greeted: the descriptor limit did not apply")
        #expect(greeted.count >= 1)
        waiting.append(try QMPTestClient(path: api))

        // Two queued connections for two seconds: a loop spinning on the ready listener would
        // use the CPU it can get (here at least a quarter of it); a resting one wakes ten times a
        // second and sleeps.
        let before = try #require(Self.cpuTicks(process.pid))
        usleep(2_000_000)
        let after = try #require(Self.cpuTicks(process.pid))
        let ticksPerSecond = sysconf(Int32(_SC_CLK_TCK))
        #expect(after - before < ticksPerSecond / 2, "used \(after - before) ticks of CPU in 2 s while out of descriptors")

        // A descriptor freed: the first queued client is greeted.
        greeted.removeLast()
        #expect(Self.readable(waiting[0], milliseconds: 10_000), "a queued client was not served once a descriptor was free")

        process.signal(SIGTERM)
        #expect(process.wait() == 0, "\(process.standardError)")
        #expect(access(api, F_OK) != 0, "the api socket was left behind")
    }
}
