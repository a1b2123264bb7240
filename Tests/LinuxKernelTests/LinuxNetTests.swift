import FlotillaTestSupport
import Foundation
import Glibc
import Testing

/// virtio-net as Linux's virtio_net driver sees it: part of the serialized `LinuxBootTests`
/// suite (one boot at a time).
extension LinuxBootTests {
    @Test(
        "a NIC on a tap: Linux's virtio_net probes it, takes the config MAC and finds the link up (kernel IP autoconfiguration)",
        .enabled(if: NetworkNamespace.available, "needs root, /dev/net/tun and ip(8) for a network namespace with a tap"))
    func virtioNet() throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        try namespace.addTap("fltap0", address: "10.79.0.1/24")
        let mac = "0e:90:df:9f:a8:88"
        var plan = LinuxBootPlan(
            label: "net", format: .vmlinux, vcpus: 1, memoryMiB: 256,
            // Static IP autoconfiguration: eth0 must come up with carrier (VIRTIO_NET_F_STATUS,
            // LINK_UP) before IP-Config reports it, with the MAC from the config space.
            extraKernelArguments: ["ip=10.79.0.2::10.79.0.1:255.255.255.0::eth0:off"],
            extraVMMArguments: ["-netdev", "id=net0,netdev=fltap0,mac=\(mac)"])
        plan.namespace = namespace
        let boot = try LinuxBoot.boot(plan)
        let log = boot.log
        #expect(log.contains("IP-Config: Complete:"), "\(log.all(containing: "IP-Config"))\n\(boot.tail)")
        #expect(log.contains("device=eth0, hwaddr=\(mac), ipaddr=10.79.0.2"), "\(log.all(containing: "device="))")
        #expect(log.all(containing: "virtio_net").filter { $0.contains("rror") }.isEmpty, "\(log.all(containing: "virtio_net"))")
        #expect(!log.contains("WARNING:") && !log.contains("BUG:"), "\(log.all(containing: "WARNING:"))")
    }
}
