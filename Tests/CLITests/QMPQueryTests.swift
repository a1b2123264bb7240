import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Testing

/// StratoVirt's QMP query commands on a running MicroVm (real /dev/kvm, the test guest held):
/// the reply shapes and values, checked against the process itself (/proc/PID/task).
@Suite("QMP query commands", .enabled(if: KVM.available, "needs read-write /dev/kvm"), .serialized)
struct QMPQueryTests {
    let vmm = Executables.path("flotilla-vmm")

    /// Every command flotilla-vmm answers; query-commands must list exactly these.
    static let implemented: Set<String> = [
        "qmp_capabilities", "query-commands", "getfd", "closefd", "add_client", "query-status", "stop", "cont", "quit",
        "query-version", "query-name", "balloon", "query-balloon", "query-target", "query-kvm", "query-machines",
        "query-events", "query-migrate", "query-migrate-capabilities", "query-tpm-models", "query-tpm-types",
        "query-block-jobs", "query-cpus", "query-cpus-fast", "query-hotpluggable-cpus", "query-iothreads", "query-chardev",
        "query-block", "query-named-block-nodes", "blockdev-add", "blockdev-del", "device_add", "device_del", "netdev_add",
        "netdev_del",
    ]

    static func threadName(pid: pid_t, tid: Int64) -> String? {
        readText("/proc/\(pid)/task/\(tid)/comm")?.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    @Test("query-cpus(-fast), query-hotpluggable-cpus and query-iothreads name real threads; the constant queries have QEMU's shapes")
    func queries() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let api = directory.file("api.sock")
        let process = try BackgroundProcess(
            vmm,
            [
                "-name", "qvm", "-smp", "2", "-kernel", GuestImages.vmlinux, "-serial", "stdio", "-append",
                "console=ttyS0 flotilla.hold=1", "-iothread", "id=io1", "-api-channel", "unix:\(api)",
            ])
        let qmp = try QMPTestClient(path: api)
        try qmp.handshake()
        #expect(process.waitForOutput("flotilla-guest: holding", timeout: 60), "\(process.standardOutput)")
        let pid = process.pid

        let fast = try #require(try qmp.execute("query-cpus-fast")["return"]?.arrayValue, "query-cpus-fast")
        #expect(fast.count == 2)
        var vcpuThreads: [Int64] = []
        for (index, entry) in fast.enumerated() {
            let cpu = try #require(entry.objectValue)
            #expect(cpu["cpu-index"] == .integer(index))
            #expect(cpu["qom-path"] == .string("/machine/unattached/device[\(index)]"))
            #expect(cpu["target"] == "x86_64")
            #expect(cpu["props"] == ["socket-id": 0, "die-id": 0, "core-id": .integer(index), "thread-id": 0])
            let tid = try #require(cpu["thread-id"]?.numberValue?.signedValue)
            // The thread exists in this process and is that vCPU's thread.
            #expect(Self.threadName(pid: pid, tid: tid) == "qvm-vcpu\(index)", "tid \(tid)")
            vcpuThreads.append(tid)
        }
        #expect(Set(vcpuThreads).count == 2 && !vcpuThreads.contains(Int64(pid)))

        let slow = try #require(try qmp.execute("query-cpus")["return"]?.arrayValue)
        #expect(slow.count == 2)
        for (index, entry) in slow.enumerated() {
            let cpu = try #require(entry.objectValue)
            #expect(cpu["CPU"] == .integer(index) && cpu["arch"] == "x86" && cpu["halted"] == false)
            #expect(cpu["current"] == .bool(index == 0))
            #expect(cpu["thread_id"] == .integer(vcpuThreads[index]))
            #expect(cpu["qom_path"] == .string("/machine/unattached/device[\(index)]"))
        }

        let pluggable = try #require(try qmp.execute("query-hotpluggable-cpus")["return"]?.arrayValue)
        #expect(pluggable.count == 2)
        #expect(
            pluggable.first
                == [
                    "type": "host-x86-cpu", "vcpus-count": 1, "props": ["socket-id": 0, "die-id": 0, "core-id": 0, "thread-id": 0],
                    "qom-path": "/machine/unattached/device[0]",
                ])

        let iothreads = try #require(try qmp.execute("query-iothreads")["return"]?.arrayValue)
        #expect(iothreads.count == 1)
        let io = try #require(iothreads.first?.objectValue)
        #expect(io["id"] == "io1" && io["poll-max-ns"] == 0)
        let ioTID = try #require(io["thread-id"]?.numberValue?.signedValue)
        #expect(Self.threadName(pid: pid, tid: ioTID) == "io1", "tid \(ioTID)")

        #expect(try qmp.execute("query-target")["return"] == ["arch": "x86_64"])
        #expect(try qmp.execute("query-kvm")["return"] == ["enabled": true, "present": true])
        let machines = try #require(try qmp.execute("query-machines")["return"]?.arrayValue)
        #expect(machines.first?.objectValue?["name"] == "microvm" && machines.first?.objectValue?["cpu-max"] == 254)
        let events = try #require(try qmp.execute("query-events")["return"]?.arrayValue)
        #expect(
            Set(events.compactMap { $0.objectValue?["name"]?.stringValue }) == [
                "SHUTDOWN", "STOP", "RESUME", "BALLOON_CHANGE", "DEVICE_DELETED",
            ])
        let version = try #require(try qmp.execute("query-version")["return"]?.objectValue)
        #expect(version["qemu"]?.objectValue?["major"]?.numberValue != nil)
        #expect(version["package"]?.stringValue?.hasPrefix("flotilla-vmm ") == true)
        #expect(try qmp.execute("query-migrate")["return"] == [:])
        #expect(try qmp.execute("query-block-jobs")["return"] == [])
        #expect(try qmp.execute("query-chardev")["return"] == [["label": "serial0", "filename": "stdio", "frontend-open": true]])

        #expect(try qmp.execute("query-block")["return"] == [])
        #expect(try qmp.execute("query-named-block-nodes")["return"] == [])

        let listed = try #require(try qmp.execute("query-commands")["return"]?.arrayValue)
        let names = listed.compactMap { $0.objectValue?["name"]?.stringValue }
        #expect(
            Set(names) == Self.implemented,
            "extra: \(Set(names).subtracting(Self.implemented)), missing: \(Self.implemented.subtracting(names))")
        #expect(names.count == Set(names).count)

        // What StratoVirt only stubs, and what does not exist: QEMU's CommandNotFound.
        for unknown in ["query-qmp-schema", "query-vnc", "human-monitor-command", "no-such-command"] {
            let reply = try qmp.execute(unknown, id: "x")
            #expect(
                reply == ["error": ["class": "CommandNotFound", "desc": .string("The command \(unknown) has not been found")], "id": "x"],
                "\(reply)")
        }
        // Queries take no arguments (QEMU's wording).
        let extra = try qmp.execute("query-cpus-fast", arguments: ["cpu": 1])
        #expect(extra["error"] == ["class": "GenericError", "desc": "Parameter 'cpu' is unexpected"], "\(extra)")

        #expect(try qmp.execute("quit")["return"] == [:])
        #expect(process.wait() == 0, "\(process.standardError)")
    }
}
