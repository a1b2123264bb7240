import FlotillaTestSupport
import Foundation
import Glibc
import Testing

/// virtio-net end to end: flotilla-vmm attached to real tap devices in a network namespace the
/// test creates, the test guest's virtio-net driver on real /dev/kvm, the seccomp filter on.
@Suite(
    "virtio-net through the test guest and a tap in a network namespace",
    .enabled(if: KVM.available, "needs read-write /dev/kvm"),
    .enabled(if: NetworkNamespace.available, "needs root, /dev/net/tun and ip(8) to create a network namespace and taps"),
    .serialized)
struct VirtioNetTests {
    let vmm = Executables.path("flotilla-vmm")

    @Test(
        "ARP and ping: the namespace's kernel answers the guest through the tap, with the tap's real MAC; with iothread=NAME the NIC works on that thread",
        arguments: [nil, "networker"])
    func arpAndPing(iothread: String?) throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        let tapMAC = try namespace.addTap("fltap0", address: "10.77.0.1/24")
        var arguments = [
            "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "console=ttyS0 flotilla.hold=1 flotilla.net=10.77.0.2,10.77.0.1",
        ]
        var netdev = "id=net0,netdev=fltap0"
        if let iothread {
            arguments += ["-iothread", "id=\(iothread)", "-iothread", "id=idle"]
            netdev += ",iothread=\(iothread)"
        }
        // The guest holds after its report, so the tap stays attached (and its neighbour
        // entries alive) while they are looked at.
        let process = try BackgroundProcess(namespace.ip, namespace.vmmArguments(vmm, arguments + ["-netdev", netdev]))
        #expect(process.waitForOutput("flotilla-guest: holding", timeout: 60), "\(process.standardOutput)\n\(process.standardError)")
        let report = GuestReport(output: process.standardOutput)
        let fact = try #require(report.fact("device virtio-net"), "\(process.standardOutput)")
        // The first NIC slot (docs/guest-abi.md): slot 4, IRQ 9.
        #expect(fact["base"] == "0xd0004000" && fact["irq"] == "9" && fact["link"] == "1")
        let guestMAC = try #require(fact["mac"])
        // No mac= given: a locally administered unicast address (second hex digit 2, 6, a or e).
        #expect(["2", "6", "a", "e"].contains(guestMAC.dropFirst().prefix(1)), "\(guestMAC)")
        #expect(report.checks["net0"] == "ok")
        // RX: the kernel's ARP reply names the tap's own MAC.
        #expect(report.checks["net_arp"] == "ok", "\(report.lines)")
        let arp = try #require(report.lines.first { $0.contains("check net_arp") })
        #expect(arp.contains("peer=\(tapMAC)"), "\(arp) vs tap \(tapMAC)")
        #expect(report.checks["net_ping"] == "ok", "\(report.lines)")
        #expect(report.done?.fail == 0, "\(report.lines)")
        // TX: the kernel learned the guest's address from the guest's frames, with the MAC
        // the device's config space gave the guest.
        let neighbours = try namespace.command(["-n", namespace.name, "neigh", "show", "dev", "fltap0"])
        #expect(neighbours.contains("10.77.0.2 lladdr \(guestMAC)"), "\(neighbours)")
        if let iothread {
            // The frames read from the tap (ARP and echo replies) and the queue notifications
            // went through the NIC's iothread; an iothread with no device read nothing.
            let threads = VirtioBlockTests.threads(of: process.pid)
            let worker = try #require(threads.first { $0.name == iothread }, "\(threads)")
            let idle = try #require(threads.first { $0.name == "idle" }, "\(threads)")
            #expect(worker.readBytes > 0 && idle.readBytes == 0, "\(threads)")
        }
        process.signal(SIGTERM)
        #expect(process.wait() == 0)
    }

    @Test("two NICs in slots 4 and 5; mac= reaches the guest through the config space")
    func twoNICsAndMAC() throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        try namespace.addTap("fltapA")
        try namespace.addTap("fltapB")
        let result = try run(
            namespace.ip,
            namespace.vmmArguments(
                vmm,
                [
                    "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append", "console=ttyS0",
                    "-netdev", "id=a,netdev=fltapA,mac=0e:90:df:9f:a8:88", "-netdev", "id=b,netdev=fltapB",
                ]), timeout: 120)
        #expect(result.status == 0, "\(result.standardError)")
        let report = GuestReport(output: result.standardOutput)
        let nics = report.facts("device virtio-net")
        try #require(nics.count == 2, "\(report.lines)")
        #expect(nics[0]["base"] == "0xd0004000" && nics[0]["irq"] == "9" && nics[0]["nic"] == "0")
        #expect(nics[1]["base"] == "0xd0005000" && nics[1]["irq"] == "10" && nics[1]["nic"] == "1")
        #expect(nics[0]["mac"] == "0e:90:df:9f:a8:88")
        #expect(nics[1]["mac"] != nics[0]["mac"])
        #expect(report.checks["net0"] == "ok" && report.checks["net1"] == "ok", "\(report.lines)")
        #expect(report.checks["net_arp"] == nil, "no traffic without flotilla.net")
        #expect(report.done?.fail == 0, "\(report.lines)")
    }

    @Test("a tap that does not exist is a configuration error naming the option (exit 1, nothing left behind, no interface created)")
    func missingTap() throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let result = try run(
            namespace.ip,
            namespace.vmmArguments(
                vmm,
                [
                    "-kernel", GuestImages.vmlinux, "-api-channel", "unix:" + directory.file("qmp.sock"), "-daemonize",
                    "-pidfile", directory.file("vm.pid"), "-netdev", "id=net0,netdev=fltapnone",
                ]))
        #expect(result.status == 1)
        #expect(
            result.standardError.contains("-netdev netdev / net.host_dev_name 'fltapnone'")
                && result.standardError.contains("no network interface"), "\(result.standardError)")
        #expect(try directory.contents().isEmpty)
        let links = try namespace.command(["-n", namespace.name, "-o", "link", "show"])
        #expect(!links.contains("fltapnone"), "\(links)")
    }
}
