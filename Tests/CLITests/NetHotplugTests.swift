import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Testing

/// NIC hot-plug over QMP end to end: netdev_add / device_add / device_del / netdev_del on a
/// running MicroVm (real /dev/kvm, the seccomp filter on), flotilla-vmm inside a network
/// namespace the test creates with real taps, whose kernel is the guest's peer. The test guest
/// re-reads its slots (flotilla.rescan=1) and drives a NIC that appears with its virtio-net
/// driver (ARP and ping with flotilla.net=).
@Suite(
    "virtio-net hot-plug over QMP",
    .enabled(if: KVM.available, "needs read-write /dev/kvm"),
    .enabled(if: NetworkNamespace.available, "needs root, /dev/net/tun and ip(8) to create a network namespace and taps"),
    .serialized)
struct NetHotplugTests {
    let vmm = Executables.path("flotilla-vmm")

    /// Starts flotilla-vmm in `namespace` on a held test guest that rescans its slots, with the
    /// api-channel in `directory`, `append` added to the command line and `options` to the VMM's;
    /// returns once QMP is negotiated and the guest holds.
    func startHeldGuest(
        in namespace: NetworkNamespace, directory: TemporaryDirectory, append: String = "", options: [String] = []
    ) throws -> (process: BackgroundProcess, qmp: QMPTestClient) {
        let api = directory.file("api.sock")
        let process = try BackgroundProcess(
            namespace.ip,
            namespace.vmmArguments(
                vmm,
                [
                    "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append",
                    "console=ttyS0 flotilla.hold=1 flotilla.rescan=1" + (append.isEmpty ? "" : " " + append),
                    "-api-channel", "unix:\(api)",
                ] + options))
        let qmp = try QMPTestClient(path: api)
        try qmp.handshake()
        #expect(process.waitForOutput("flotilla-guest: holding", timeout: 60), "\(process.standardOutput)")
        return (process, qmp)
    }

    /// Whether a process has the tap attached: the kernel shows a tap with no queue attached as
    /// NO-CARRIER (and LOWER_UP once one is).
    static func attached(_ namespace: NetworkNamespace, _ tap: String) throws -> Bool {
        let link = try namespace.command(["-n", namespace.name, "-o", "link", "show", tap])
        return link.contains("LOWER_UP") && !link.contains("NO-CARRIER")
    }

    /// The serial lines from the first line containing `marker`.
    static func lines(after marker: String, in output: String) -> [Substring] {
        let all = output.split(separator: "\n")
        guard let start = all.firstIndex(where: { $0.contains(marker) }) else { return [] }
        return Array(all[start...])
    }

    @Test(
        "a NIC plugged into a held guest gets the MAC given and ARPs and pings the namespace's kernel; device_del emits DEVICE_DELETED, the guest sees it go and the tap is released, so it can be plugged again"
    )
    func plugUseUnplugReplug() throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        let tapMAC = try namespace.addTap("flhp0", address: "10.79.0.1/24")
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let (process, qmp) = try startHeldGuest(
            in: namespace, directory: directory, append: "flotilla.net=10.79.0.2,10.79.0.1", options: ["-iothread", "id=nio"])
        #expect(!(try Self.attached(namespace, "flhp0")), "nothing attaches before device_add")

        // StratoVirt's documented spelling: netdev_add id/ifname, device_add with the same id.
        #expect(try qmp.execute("netdev_add", arguments: ["id": "net-0", "ifname": "flhp0"])["return"] == [:])
        #expect(!(try Self.attached(namespace, "flhp0")), "netdev_add only records the tap")
        let plugged = try qmp.execute(
            "device_add", arguments: ["id": "net-0", "driver": "virtio-net-mmio", "mac": "52:54:00:4e:48:50", "iothread": "nio"])
        #expect(plugged["return"] == [:], "\(plugged)")
        #expect(try Self.attached(namespace, "flhp0"))
        // The first NIC slot: slot 4, IRQ 9; the guest reads the MAC given and talks to the kernel.
        #expect(
            process.waitForLine(containing: "fact device virtio-net base=0xd0004000 irq=9 nic=0 mac=52:54:00:4e:48:50 link=1", timeout: 60),
            "\(process.standardOutput)")
        #expect(process.waitForLine(containing: "check net_ping", timeout: 60), "\(process.standardOutput)")
        var report = GuestReport(output: process.standardOutput)
        #expect(report.checks["net0"] == "ok" && report.checks["net_ping"] == "ok", "\(report.lines)")
        let arp = try #require(report.lines.first { $0.contains("check net_arp") })
        #expect(arp.contains("check net_arp ok") && arp.contains("peer=\(tapMAC)"), "\(arp) vs tap \(tapMAC)")
        // TX: the kernel learned the guest's address with the MAC given to device_add.
        let neighbours = try namespace.command(["-n", namespace.name, "neigh", "show", "dev", "flhp0"])
        #expect(neighbours.contains("10.79.0.2 lladdr 52:54:00:4e:48:50"), "\(neighbours)")

        // While the NIC has the tap, a second netdev on it cannot be attached (the tap has one queue).
        #expect(try qmp.execute("netdev_add", arguments: ["id": "again", "ifname": "flhp0", "type": "tap"])["return"] == [:])
        let (busyClass, busyText) = qmpError(
            try qmp.execute("device_add", arguments: ["id": "nic1", "driver": "virtio-net-device", "netdev": "again"]))
        #expect(busyClass == "GenericError" && busyText?.contains("cannot attach to tap 'flhp0': TUNSETIFF") == true, "\(busyText ?? "")")
        #expect(
            qmpError(try qmp.execute("netdev_del", arguments: ["id": "net-0"]))
                == ("GenericError", "Netdev 'net-0' is in use by device 'net-0'; device_del it first"))

        // device_del: DEVICE_DELETED before the reply; the guest sees the slot empty; the tap is free.
        try qmp.send(QMP.Command(name: "device_del", arguments: ["id": "net-0"], id: 9))
        let deleted = try qmp.receive()
        #expect(deleted["event"] == "DEVICE_DELETED" && deleted["data"] == ["device": "net-0", "path": "net-0"], "\(deleted)")
        #expect(try qmp.receive() == ["return": [:], "id": 9])
        #expect(
            process.waitForLine(containing: "fact device-removed base=0xd0004000 irq=9 device_id=1", timeout: 60),
            "\(process.standardOutput)")
        #expect(!(try Self.attached(namespace, "flhp0")), "device_del closes the tap")
        #expect(try qmp.execute("netdev_del", arguments: ["id": "net-0"])["return"] == [:])
        #expect(
            qmpError(try qmp.execute("netdev_del", arguments: ["id": "net-0"])) == ("DeviceNotFound", "Device 'net-0' not found"))

        // Re-plug the same tap through the other netdev, into NIC slot 0x1 (slot 5, IRQ 10),
        // with the default MAC; the guest drives it and pings again.
        #expect(
            try qmp.execute("device_add", arguments: ["id": "nic1", "driver": "virtio-net-device", "netdev": "again", "addr": "0x1"])[
                "return"] == [:])
        #expect(
            process.waitForLine(containing: "fact device virtio-net base=0xd0005000 irq=10 nic=1", timeout: 60), "\(process.standardOutput)"
        )
        // The second NIC's ARP and ping lines are the second ones of their kind.
        #expect(process.waitForLine(containing: "check net_ping", count: 2, timeout: 60), "\(process.standardOutput)")
        let after = Self.lines(after: "fact device virtio-net base=0xd0005000", in: process.standardOutput)
        #expect(after.contains { $0.contains("check net1 ok") }, "\(after)")
        #expect(after.contains { $0.contains("check net_arp ok") && $0.contains("peer=\(tapMAC)") }, "\(after)")
        #expect(after.contains { $0.contains("check net_ping ok") }, "\(after)")
        #expect(try Self.attached(namespace, "flhp0"))

        // Every check the guest printed, at boot or for a plugged NIC, passed.
        report = GuestReport(output: process.standardOutput)
        let failed = report.lines.filter { $0.contains("check ") && $0.contains(" fail") }
        #expect(failed.isEmpty, "\(failed)")

        // The VM's end releases the tap still plugged; the socket goes; the tap itself stays.
        #expect(try qmp.execute("quit")["return"] == [:])
        #expect(process.wait() == 0, "\(process.standardError)")
        #expect(!(try Self.attached(namespace, "flhp0")))
        #expect(try directory.contents().isEmpty)
    }

    @Test(
        "errors as QEMU and StratoVirt word them: duplicate ids, unknown or busy netdev, a missing tap (-netdev's message), no free NIC slot with a cold NIC and a hot one; a -netdev NIC can be unplugged and its netdev goes with it"
    )
    func errorsAndLimits() throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        for tap in ["flhpc", "flhpd", "flhpe"] { try namespace.addTap(tap) }
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let disk = try BlockHotplugTests.image(directory, "disk.img", bytes: 64 << 10)
        let (process, qmp) = try startHeldGuest(
            in: namespace, directory: directory, options: ["-netdev", "id=cold,netdev=flhpc", "-drive", "id=disk0,file=\(disk.path)"])
        #expect(process.standardOutput.contains("fact device virtio-net base=0xd0004000 irq=9 nic=0"))

        #expect(try qmp.execute("netdev_add", arguments: ["id": "h1", "ifname": "flhpd"])["return"] == [:])
        #expect(
            qmpError(try qmp.execute("netdev_add", arguments: ["id": "h1", "ifname": "flhpe"]))
                == ("GenericError", "Duplicate ID 'h1' for netdev"))
        #expect(
            qmpError(try qmp.execute("netdev_add", arguments: ["id": "cold", "ifname": "flhpe"]))
                == ("GenericError", "Duplicate ID 'cold' for netdev"))
        #expect(
            qmpError(try qmp.execute("netdev_add", arguments: ["id": "x", "ifname": "flhpe", "type": "user"]))
                == ("GenericError", "Parameter 'type' value 'user' is not supported on a MicroVm; allowed: 'tap'"))
        // A missing tap: the words -netdev gives at start-up, and no interface is created.
        let (missingClass, missingText) = qmpError(try qmp.execute("netdev_add", arguments: ["id": "gone", "ifname": "flhpnone"]))
        #expect(missingClass == "GenericError")
        let startup = try run(
            namespace.ip, namespace.vmmArguments(vmm, ["-kernel", GuestImages.vmlinux, "-netdev", "id=gone,netdev=flhpnone"]),
            timeout: 60)
        #expect(startup.status == 1)
        let text = try #require(missingText)
        #expect(text.contains("no network interface") && startup.standardError.contains(text), "\(text) vs \(startup.standardError)")
        #expect(!(try namespace.command(["-n", namespace.name, "-o", "link", "show"]).contains("flhpnone")))

        #expect(
            qmpError(try qmp.execute("device_add", arguments: ["id": "x", "driver": "virtio-net-mmio", "netdev": "nope"]))
                == ("GenericError", "Property 'virtio-net-device.netdev' can't find value 'nope'"))
        #expect(
            qmpError(try qmp.execute("device_add", arguments: ["id": "x", "driver": "virtio-net-mmio", "netdev": "cold"]))
                == ("GenericError", "Property 'virtio-net-device.netdev' can't take value 'cold', it's in use"))
        // Device ids are one space across disks and NICs.
        for taken in ["cold", "disk0"] {
            #expect(
                qmpError(try qmp.execute("device_add", arguments: ["id": .string(taken), "driver": "virtio-net-mmio", "netdev": "h1"]))
                    == ("GenericError", "Duplicate ID '\(taken)' for device"))
        }
        #expect(
            qmpError(try qmp.execute("device_add", arguments: ["id": "x", "driver": "virtio-net-mmio", "netdev": "h1", "addr": "0x0"]))
                == ("GenericError", "The slot 0 is occupied already."))
        let (threadClass, threadText) = qmpError(
            try qmp.execute("device_add", arguments: ["id": "x", "driver": "virtio-net-mmio", "netdev": "h1", "iothread": "none"]))
        #expect(threadClass == "GenericError" && threadText?.hasPrefix("iothread 'none' names no configured iothread") == true)
        #expect(
            qmpError(try qmp.execute("device_add", arguments: ["id": "x", "driver": "virtio-net-mmio", "netdev": "h1", "drive": "d"]))
                == ("GenericError", "Property 'virtio-net-mmio.drive' not found"))

        // The first free NIC slot is 0x1; then both are taken (the cold NIC counts) and a third NIC has none.
        #expect(try qmp.execute("device_add", arguments: ["id": "h1", "driver": "virtio-net-mmio"])["return"] == [:])
        #expect(
            process.waitForLine(containing: "fact device virtio-net base=0xd0005000 irq=10 nic=1", timeout: 60), "\(process.standardOutput)"
        )
        #expect(try qmp.execute("netdev_add", arguments: ["id": "h2", "ifname": "flhpe"])["return"] == [:])
        let (fullClass, fullText) = qmpError(
            try qmp.execute("device_add", arguments: ["id": "h2", "driver": "virtio-net-mmio"]))
        #expect(fullClass == "GenericError" && fullText?.hasPrefix("A maximum of 2 net replaceable devices are supported") == true)
        #expect(!(try Self.attached(namespace, "flhpe")), "a refused device_add leaves the tap alone")

        // The -netdev NIC unplugs too; its netdev goes with it (as a -drive node does), and its tap is free.
        #expect(try Self.attached(namespace, "flhpc"))
        #expect(try qmp.execute("device_del", arguments: ["id": "cold"])["return"] == [:])
        #expect(
            process.waitForLine(containing: "fact device-removed base=0xd0004000 irq=9 device_id=1", timeout: 60),
            "\(process.standardOutput)")
        #expect(!(try Self.attached(namespace, "flhpc")))
        #expect(qmpError(try qmp.execute("netdev_del", arguments: ["id": "cold"])) == ("DeviceNotFound", "Device 'cold' not found"))
        // Its slot takes the waiting NIC.
        #expect(try qmp.execute("device_add", arguments: ["id": "h2", "driver": "virtio-net-mmio"])["return"] == [:])
        #expect(
            process.waitForLine(containing: "fact device virtio-net base=0xd0004000 irq=9 nic=2", timeout: 60), "\(process.standardOutput)")
        #expect(try Self.attached(namespace, "flhpe"))
        // query-block lists disks only.
        let block = try #require(try qmp.execute("query-block")["return"]?.arrayValue)
        #expect(block.compactMap { $0.objectValue?["qdev"]?.stringValue } == ["disk0"])

        let failed = GuestReport(output: process.standardOutput).lines.filter { $0.contains("check ") && $0.contains(" fail") }
        #expect(failed.isEmpty, "\(failed)")

        // The VM's end releases every tap; nothing else is left.
        #expect(try qmp.execute("quit")["return"] == [:])
        #expect(process.wait() == 0, "\(process.standardError)")
        for tap in ["flhpc", "flhpd", "flhpe"] { #expect(!(try Self.attached(namespace, tap)), "\(tap)") }
        let links = try namespace.command(["-n", namespace.name, "-o", "link", "show"])
        #expect(links.split(separator: "\n").count == 4, "lo and the three taps only: \(links)")
        #expect(try directory.contents() == ["disk.img"])
    }

    @Test(
        "netdev_add fd=: a tap the client opened in the namespace and passed with getfd is taken out of the connection, checked and set up; a NIC on it ARPs and pings the namespace's kernel; device_del leaves it with the netdev (a NIC plugged again pings too), netdev_del closes it, and so does the VM's end; unknown names, descriptor numbers, fd with ifname, a socket and a tap without a vnet header are refused in QEMU's words and a refused descriptor is closed"
    )
    func tapPassedWithGetfd() throws {
        typealias N = NetworkNamespace
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        // The test opens the tap itself, as a manager that keeps /dev/net/tun from the VMM
        // does; it is not persistent, so it exists only while a descriptor of it is open.
        let full = N.iffTap | N.iffNoPI | N.iffVnetHeader
        var tapFD = try namespace.openTap("flfd0", flags: full)
        defer { if tapFD >= 0 { close(tapFD) } }
        try namespace.command(["-n", namespace.name, "addr", "add", "10.79.1.1/24", "dev", "flfd0"])
        try namespace.command(["-n", namespace.name, "link", "set", "flfd0", "up"])
        let tapMAC = try namespace.mac(of: "flfd0")
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let (process, qmp) = try startHeldGuest(in: namespace, directory: directory, append: "flotilla.net=10.79.1.2,10.79.1.1")

        // Refusals before any descriptor is taken.
        #expect(
            qmpError(try qmp.execute("netdev_add", arguments: ["id": "n", "fd": "nothere"]))
                == ("GenericError", "File descriptor named 'nothere' has not been found"))
        #expect(
            qmpError(try qmp.execute("netdev_add", arguments: ["id": "n", "fd": "x", "ifname": "flfd0"]))
                == ("GenericError", QMPHotplug.invalidWithFD))
        let (numberClass, numberText) = qmpError(try qmp.execute("netdev_add", arguments: ["id": "n", "fd": "3"]))
        #expect(numberClass == "GenericError" && numberText?.hasPrefix("Invalid file descriptor number '3': ") == true)

        // A socket is not a tap: QEMU's TUNGETIFF words; the descriptor was taken and closed.
        var ends: [Int32] = [-1, -1]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &ends) == 0)
        defer { close(ends[1]) }
        #expect(try qmp.execute("getfd", arguments: ["fdname": "sock"], passing: ends[0])["return"] == [:])
        close(ends[0])
        let (socketClass, socketText) = qmpError(try qmp.execute("netdev_add", arguments: ["id": "n", "fd": "sock"]))
        #expect(socketClass == "GenericError", "\(socketText ?? "")")
        #expect(
            socketText?.hasPrefix("Unable to query TUNGETIFF on FD ") == true
                && socketText?.hasSuffix(": Inappropriate ioctl for device") == true, "\(socketText ?? "")")
        var byte: UInt8 = 0
        #expect(recv(ends[1], &byte, 1, Int32(MSG_DONTWAIT)) == 0, "the VMM closed the socket it refused")
        #expect(
            qmpError(try qmp.execute("closefd", arguments: ["fdname": "sock"]))
                == ("GenericError", "File descriptor named 'sock' not found"))

        // A tap without a vnet header is refused naming what it lacks; closed, it goes.
        let plain = try namespace.openTap("flfd1", flags: N.iffTap | N.iffNoPI)
        #expect(try qmp.execute("getfd", arguments: ["fdname": "plain"], passing: plain)["return"] == [:])
        close(plain)
        let (plainClass, plainText) = qmpError(try qmp.execute("netdev_add", arguments: ["id": "n", "fd": "plain"]))
        #expect(plainClass == "GenericError")
        #expect(
            plainText?.hasPrefix("netdev 'n': file descriptor 'plain': interface 'flfd1' was attached without IFF_VNET_HDR") == true,
            "\(plainText ?? "")")
        #expect(!(try namespace.hasInterface("flfd1")), "the refused tap was closed")

        // The tap: getfd, then netdev_add takes it (closefd no longer finds it); the VMM's
        // descriptor is the only one left, and keeps the interface.
        #expect(try qmp.execute("getfd", arguments: ["fdname": "tap0"], passing: tapFD)["return"] == [:])
        close(tapFD)
        tapFD = -1
        #expect(try qmp.execute("netdev_add", arguments: ["type": "tap", "id": "fdnet", "fd": "tap0"])["return"] == [:])
        #expect(
            qmpError(try qmp.execute("closefd", arguments: ["fdname": "tap0"]))
                == ("GenericError", "File descriptor named 'tap0' not found"))
        #expect(try namespace.hasInterface("flfd0"))
        let plugged = try qmp.execute(
            "device_add", arguments: ["id": "fdnic", "driver": "virtio-net-mmio", "netdev": "fdnet", "mac": "52:54:00:46:44:30"])
        #expect(plugged["return"] == [:], "\(plugged)")
        #expect(
            process.waitForLine(containing: "fact device virtio-net base=0xd0004000 irq=9 nic=0 mac=52:54:00:46:44:30 link=1", timeout: 60),
            "\(process.standardOutput)")
        #expect(process.waitForLine(containing: "check net_ping", timeout: 60), "\(process.standardOutput)")
        let report = GuestReport(output: process.standardOutput)
        #expect(report.checks["net0"] == "ok" && report.checks["net_ping"] == "ok", "\(report.lines)")
        let arp = try #require(report.lines.first { $0.contains("check net_arp") })
        #expect(arp.contains("check net_arp ok") && arp.contains("peer=\(tapMAC)"), "\(arp) vs tap \(tapMAC)")
        let neighbours = try namespace.command(["-n", namespace.name, "neigh", "show", "dev", "flfd0"])
        #expect(neighbours.contains("10.79.1.2 lladdr 52:54:00:46:44:30"), "\(neighbours)")

        // device_del: the NIC goes, the netdev keeps the tap (as QEMU's tap netdev does);
        // netdev_del closes it, and the interface, which only that descriptor kept, goes.
        #expect(try qmp.execute("device_del", arguments: ["id": "fdnic"])["return"] == [:])
        #expect(
            process.waitForLine(containing: "fact device-removed base=0xd0004000 irq=9 device_id=1", timeout: 60),
            "\(process.standardOutput)")
        #expect(try namespace.hasInterface("flfd0"), "the netdev still holds the tap")
        // So a NIC can be plugged on it again, and works (its ping is the second one).
        #expect(
            try qmp.execute("device_add", arguments: ["id": "fdnic2", "driver": "virtio-net-mmio", "netdev": "fdnet"])["return"] == [:])
        #expect(
            process.waitForLine(containing: "fact device virtio-net base=0xd0004000 irq=9 nic=1", timeout: 60), "\(process.standardOutput)")
        #expect(process.waitForLine(containing: "check net_ping", count: 2, timeout: 60), "\(process.standardOutput)")
        let again = Self.lines(after: "fact device virtio-net base=0xd0004000 irq=9 nic=1", in: process.standardOutput)
        #expect(again.contains { $0.contains("check net_ping ok") }, "\(again)")
        #expect(
            qmpError(try qmp.execute("netdev_del", arguments: ["id": "fdnet"]))
                == ("GenericError", "Netdev 'fdnet' is in use by device 'fdnic2'; device_del it first"))
        #expect(try qmp.execute("device_del", arguments: ["id": "fdnic2"])["return"] == [:])
        #expect(process.waitForLine(containing: "fact device-removed base=0xd0004000", count: 2, timeout: 60), "\(process.standardOutput)")
        #expect(try qmp.execute("netdev_del", arguments: ["id": "fdnet"])["return"] == [:])
        #expect(!(try namespace.hasInterface("flfd0")), "netdev_del closed the tap")

        // The VM's end closes a passed tap a netdev still holds.
        let held = try namespace.openTap("flfd2", flags: full)
        #expect(try qmp.execute("getfd", arguments: ["fdname": "held"], passing: held)["return"] == [:])
        close(held)
        #expect(try qmp.execute("netdev_add", arguments: ["id": "held", "fd": "held"])["return"] == [:])
        #expect(try namespace.hasInterface("flfd2"))

        let failed = GuestReport(output: process.standardOutput).lines.filter { $0.contains("check ") && $0.contains(" fail") }
        #expect(failed.isEmpty, "\(failed)")
        #expect(try qmp.execute("quit")["return"] == [:])
        #expect(process.wait() == 0, "\(process.standardError)")
        #expect(!(try namespace.hasInterface("flfd2")), "the VM's end closed the tap")
        #expect(try directory.contents().isEmpty)
    }
}
