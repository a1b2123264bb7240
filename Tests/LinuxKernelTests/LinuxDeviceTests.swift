import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Testing

/// virtio-console, virtio-rng and virtio-balloon as Linux's own drivers (virtio_console with
/// hvc, virtio-rng with the hw_random core, virtio_balloon) use them. One boot for all three,
/// as each boot costs tens of seconds; part of the serialized `LinuxBootTests` suite.
///
/// `root=/dev/vda rootwait` with no disk: after its initcalls the kernel waits for a root
/// device that never comes ("Waiting for root device /dev/vda..."), polling every 5 ms. That
/// keeps it alive, with its workqueues and kthreads running, for as long as the test needs
/// (a boot that panics for want of a root, as the others do, would race the balloon's
/// workqueue); the test ends the VM with QMP `quit`.
extension LinuxBootTests {
    @Test(
        "one boot, three of Linux's drivers: kernel messages and tty echo over hvc0, bytes taken from the random_file FIFO, the balloon inflated and deflated over QMP"
    )
    func consoleRngBalloon() throws {
        let directory = try TemporaryDirectory("flotilla-linux-devices")
        defer { directory.remove() }
        let consolePath = directory.file("hvc0.sock")
        let vsockPath = directory.file("v.sock")
        let api = directory.file("qmp.sock")
        let ram: Int64 = 256 << 20

        // random_file is a FIFO this test holds open read-write: the device's non-blocking
        // reads take bytes from it only for buffers Linux posted, and whatever is left in the
        // pipe after the VM ends shows how many it took.
        let fifo = directory.file("random.fifo")
        guard mkfifo(fifo, 0o600) == 0 else { throw LinuxTestError("mkfifo \(fifo): errno \(errno)") }
        let fifoFD = open(fifo, O_RDWR | O_NONBLOCK | O_CLOEXEC)
        guard fifoFD >= 0 else { throw LinuxTestError("open \(fifo): errno \(errno)") }
        defer { close(fifoFD) }
        // Less than the pipe's 64 KiB, so one write takes it all.
        let offered = (0..<16384).map { _ in UInt8.random(in: 0...255) }
        let written = offered.withUnsafeBytes { write(fifoFD, $0.baseAddress, $0.count) }
        try #require(written == offered.count, "wrote \(written) of \(offered.count) bytes into the FIFO")

        // console=hvc0 last: hvc0 becomes /dev/console (the tty the kernel opens for init), and
        // kernel messages go to every console, ttyS0 and hvc0.
        let plan = LinuxBootPlan(
            label: "console-rng-balloon", format: .vmlinux, vcpus: 1, memoryMiB: Int(ram >> 20),
            extraKernelArguments: ["console=hvc0", "root=/dev/vda", "rootwait"],
            extraVMMArguments: [
                "-chardev", "id=con0,path=\(consolePath)", "-balloon", "deflate-on-oom=true", "-rng", "random_file=\(fifo)",
                "-device", "vsock,id=vs0,guest-cid=3,uds-path=\(vsockPath)", "-api-channel", "unix:\(api)",
            ])
        let nonce = String(UInt64.random(in: 0...UInt64.max), radix: 16)
        let waiting = "Waiting for root device /dev/vda..."
        var consoleText = ""
        var inflated: [Int64] = []
        var deflated: [Int64] = []
        var vsockReply: [UInt8]?
        let boot = try LinuxBoot.boot(plan) { running in
            let qmp = try QMPTestClient(path: api)
            try qmp.handshake()
            // Emulated guests are slow: the guest's balloon work may take a while.
            var timeout = timeval(tv_sec: 120, tv_usec: 0)
            setsockopt(qmp.fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            // Connected from the start, so nothing waits for the replay history.
            let console = try ConsoleClient(path: consolePath, retryWhileMissing: true)
            #expect(try qmp.execute("query-balloon")["return"] == ["actual": .integer(ram)])

            try #require(running.waitForSerial(waiting), "the kernel did not reach the root wait: \(running.serial.lines.suffix(30))")

            // virtio_console's hvc0 carries the kernel's messages: the root wait is printed
            // long after hvc0 registered, by printk through hvc_console_print → transmitq.
            // (Linux itself drops the few lines printed while it registers the console, such
            // as "console [hvc0] enabled": the port is not yet on virtio_console's list, so
            // its put_chars fails; and with earlyprintk still up then, hvc0 gets no replay.)
            _ = try console.read(until: waiting)
            // ... and it is a tty Linux reads: kernel_init holds /dev/console (hvc0) open, so
            // what the client types is taken from the receive queue by hvc's poll, and n_tty
            // echoes it through hvc_write → transmitq (our device never loops input back).
            try console.send("flotilla echo \(nonce)\n")
            consoleText = try console.read(until: "flotilla echo \(nonce)")

            // virtio_balloon: `balloon` lowers the target, the configuration-change interrupt
            // has the driver's workqueue inflate (256 pages a request), and each `actual` it
            // writes back comes out as BALLOON_CHANGE (one a second at most, the newest last).
            let target = ram - (2 << 20)
            inflated = try Self.balloon(qmp, to: target)
            #expect(try qmp.execute("query-balloon")["return"] == ["actual": .integer(target)])
            deflated = try Self.balloon(qmp, to: ram)
            #expect(try qmp.execute("query-balloon")["return"] == ["actual": .integer(ram)])

            // The hw_random core's kthread credited the device's bytes to the input pool, which
            // initialised the CRNG (nothing else can here within the boot: no RDRAND/RDSEED
            // with clearcpuid, no trusted bootloader seed, no userspace waiting on getrandom).
            #expect(running.waitForSerial("random: crng init done", timeout: 60), "\(running.serial.all(containing: "random:"))")

            // virtio_vsock (probed long before the root wait): a host connection to a guest
            // port nobody listens on reaches Linux as OP_REQUEST, and Linux's answer, OP_RST,
            // closes the client without "OK".
            let client = try ConsoleClient(path: vsockPath)
            try client.send("CONNECT 1234\n")
            vsockReply = Array(try client.readToEnd().utf8)

            #expect(try qmp.execute("quit")["return"] == [:])
            consoleText = try console.readToEnd()
        }
        boot.keep(consoleText, as: "hvc0")
        let log = boot.log

        // The VM ended by `quit`, after the kernel had done all of the above without complaint.
        #expect(!boot.timedOut && boot.status == 0, "\(boot.tail)")
        #expect(!log.contains("WARNING:") && !log.contains("BUG:") && !log.contains("Kernel panic"), "\(boot.tail)")
        // Six fixed slots, then the console (slot 6), vsock (7), the balloon (8) and the rng (9).
        try Self.expectAnnouncedSlots(boot, atLeast: 10)

        // virtio_vsock negotiated and set DRIVER_OK (the device logs it), and its answer to the
        // host's connection came back through transmitq.
        #expect(boot.standardError.contains("virtio-vsock 'vs0': driver ready, guest CID 3"), "\(boot.standardError)")
        #expect(boot.standardError.contains("to guest port 1234 refused by the guest"), "\(boot.standardError)")
        #expect(vsockReply == [], "the client read \(String(decoding: vsockReply ?? [], as: UTF8.self))")

        // hvc0 registered as a console once virtio_console probed the port.
        #expect(log.contains("printk: console [hvc0] enabled"), "\(log.all(containing: "console ["))")
        #expect(!log.contains("unable to open an initial console"), "\(boot.tail)")
        // Every line hvc0 carried is one of the kernel's messages, as ttyS0 shows them (hvc's
        // console writes end lines with CR LF), and they include the root wait.
        let consoleLines = consoleText.split(whereSeparator: \.isNewline).map(String.init)
        let kernelLines = Set(log.text.split(whereSeparator: \.isNewline).map(String.init))
        let messages = consoleLines.filter { $0.hasPrefix("[") }
        #expect(messages.contains { $0.hasSuffix("] " + waiting) }, "hvc0: \(consoleText)")
        #expect(
            messages.allSatisfy { kernelLines.contains($0) }, "hvc0 lines not on ttyS0: \(messages.filter { !kernelLines.contains($0) })")
        #expect(consoleLines.contains("flotilla echo \(nonce)"), "hvc0: \(consoleText)")

        // The balloon went down to the target and back, each step reported in order.
        let target = ram - (2 << 20)
        #expect(inflated.last == target && inflated == inflated.sorted(by: >), "BALLOON_CHANGE actual while inflating: \(inflated)")
        #expect(inflated.allSatisfy { $0 >= target && $0 < ram }, "\(inflated)")
        #expect(deflated.last == ram && deflated == deflated.sorted(), "BALLOON_CHANGE actual while deflating: \(deflated)")
        #expect(log.all(containing: "virtio_balloon").isEmpty, "\(log.all(containing: "virtio_balloon"))")

        // virtio-rng: the device read a prefix of the FIFO's bytes, in order, for Linux's
        // requests (hw_random's early randomness at registration and its kthread).
        var remaining: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fifoFD, $0.baseAddress, $0.count) }
            guard count > 0 else { break }
            remaining += chunk[0..<count]
        }
        let consumed = offered.count - remaining.count
        print("Linux took \(consumed) bytes from the virtio-rng FIFO; BALLOON_CHANGE actual: inflate \(inflated), deflate \(deflated)")
        #expect(consumed > 0, "Linux's virtio-rng driver took no bytes from random_file")
        #expect(remaining == Array(offered[consumed...]), "the FIFO's remaining bytes are not what followed the taken ones")
    }

    /// Sets the balloon's target with QMP `balloon` and collects the `actual` of every
    /// BALLOON_CHANGE until the driver reports the target reached.
    static func balloon(_ qmp: QMPTestClient, to value: Int64) throws -> [Int64] {
        var events: [JSONObject] = []
        try qmp.send(QMP.Command(name: "balloon", arguments: ["value": .integer(value)]))
        let reply = try qmp.reply(events: &events)
        try #require(reply["return"] == [:], "\(reply)")
        var actuals = events.filter { $0["event"]?.stringValue == "BALLOON_CHANGE" }.compactMap(Self.actual)
        while actuals.last != value {
            let event = try qmp.waitForEvent("BALLOON_CHANGE")
            actuals.append(try #require(Self.actual(event), "\(event)"))
        }
        return actuals
    }

    static func actual(_ event: JSONObject) -> Int64? {
        event["data"]?.objectValue?["actual"]?.numberValue?.signedValue
    }
}
