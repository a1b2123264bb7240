import Testing

@testable import Protocol

@Suite("StratoVirt command line")
struct CommandLineTests {
    @Test("the reference's command-line example")
    func referenceExample() throws {
        // Table 1's example, with -append's words unquoted as in the reference.
        let parsed = try config([
            "-kernel", "/path/to/vmlinux.bin",
            "-append", "console=ttyS0", "root=/dev/vda", "rw", "reboot=k", "panic=1",
            "-drive", "file=/home/rootfs.ext4,id=rootfs,readonly=false",
            "-api-channel", "unix:/tmp/stratovirt.socket",
            "-serial", "stdio",
        ])
        let expected = VMConfig(
            boot: BootSource(kernelImagePath: "/path/to/vmlinux.bin", bootArgs: "console=ttyS0 root=/dev/vda rw reboot=k panic=1"),
            drives: [DriveConfig(id: "rootfs", path: "/home/rootfs.ext4", readOnly: false)],
            serial: SerialConfig(stdio: true))
        #expect(parsed == expected)
        #expect(try parse(kernel + ["-api-channel", "unix:/tmp/stratovirt.socket"]).runtime.apiChannelPath == "/tmp/stratovirt.socket")
    }

    @Test("every option and key reaches the configuration")
    func everyOption() throws {
        let invocation = try parse([
            "-name", "vm1",
            "-machine", "type=MicroVm,dump-guest-core=off,mem-share=on",
            "-kernel", "/k", "-append", "quiet", "-initrd", "/initrd.img",
            "-smp", "cpus=4", "-m", "2G",
            "-iothread", "id=io1", "-iothread", "id=io2",
            "-drive", "id=d0,file=/d0.img,readonly=on,direct=off,serial=SN,,1,iothread=io1,iops=200",
            "-netdev", "id=n0,netdev=tap0,mac=0e:90:df:9f:a8:88,iothread=io2",
            "-chardev", "id=c0,path=/run/console.sock",
            "-device", "vsock,id=v0,guest-cid=3",
            "-api-channel", "unix:/run/qmp.sock",
            "-serial", "stdio",
            "-D", "/var/log/vm.log",
            "-disable-seccomp",
            "-rng", "random_file=/dev/urandom,bytes_per_sec=64",
            "--print-config",
        ])
        let vm = try #require(invocation.config)
        #expect(invocation.action == .printConfig)
        #expect(vm.name == "vm1")
        #expect(vm.machine == MachineConfig(vcpuCount: 4, memoryBytes: 2 << 30, dumpGuestCore: false, memShare: true))
        #expect(vm.boot == BootSource(kernelImagePath: "/k", bootArgs: "quiet", initrdPath: "/initrd.img"))
        #expect(vm.iothreads == [IothreadConfig(id: "io1"), IothreadConfig(id: "io2")])
        #expect(
            vm.drives == [
                DriveConfig(id: "d0", path: "/d0.img", readOnly: true, direct: false, serial: "SN,1", iothread: "io1", iops: 200)
            ])
        #expect(
            vm.nets == [NetConfig(id: "n0", hostDeviceName: "tap0", mac: MACAddress(0x0e, 0x90, 0xdf, 0x9f, 0xa8, 0x88), iothread: "io2")])
        #expect(vm.consoles == [ConsoleConfig(id: "c0", socketPath: "/run/console.sock")])
        #expect(vm.vsock == VsockConfig(id: "v0", guestCID: 3))
        #expect(vm.serial == SerialConfig(stdio: true))
        #expect(vm.rng == RngConfig(randomFile: "/dev/urandom", bytesPerSecond: 64))
        #expect(
            invocation.runtime
                == RuntimeOptions(apiChannelPath: "/run/qmp.sock", logFile: "/var/log/vm.log", disableSeccomp: true))
        let daemon = try parse(kernel + ["-daemonize", "-pidfile", "/run/vm.pid", "-balloon", "deflate-on-oom=true"])
        #expect(daemon.runtime.daemonize && daemon.runtime.pidfile == "/run/vm.pid")
        #expect(daemon.config?.balloon == BalloonConfig(deflateOnOOM: true))
        #expect(try config(kernel + ["-mem-path", "/dev/hugepages"]).machine.memPath == "/dev/hugepages")
    }

    @Test("defaults follow StratoVirt")
    func defaults() throws {
        let parsed = try config(kernel + ["-drive", "id=d,file=/f"])
        #expect(parsed.machine == MachineConfig(vcpuCount: 1, memoryBytes: 256 << 20, dumpGuestCore: true, memShare: false))
        #expect(parsed.drives[0].direct == true && parsed.drives[0].readOnly == false && parsed.drives[0].iops == nil)
        #expect(parsed.serial == nil && parsed.balloon == nil && parsed.rng == nil && parsed.vsock == nil)
    }

    /// Each accepted edge: the options, and a check of the value they must produce.
    static let edges: [([String], @Sendable (VMConfig) -> Bool)] = [
        (["-smp", "1"], { $0.machine.vcpuCount == 1 }),
        (["-smp", "254"], { $0.machine.vcpuCount == 254 }),
        (["-smp", "cpus=254"], { $0.machine.vcpuCount == 254 }),
        (["-m", "256M"], { $0.machine.memoryBytes == 256 << 20 }),
        (["-m", "268435456"], { $0.machine.memoryBytes == 268_435_456 }),
        (["-m", "512G"], { $0.machine.memoryBytes == 512 << 30 }),
        (["-m", "512g"], { $0.machine.memoryBytes == 512 << 30 }),
        (["-m", "549755813888"], { $0.machine.memoryBytes == 549_755_813_888 }),
        (["-drive", "id=d,file=/f,iops=0"], { $0.drives.first?.iops == 0 }),
        (["-drive", "id=d,file=/f,iops=1000000"], { $0.drives.first?.iops == 1_000_000 }),
        (["-rng", "random_file=/dev/random,bytes_per_sec=64"], { $0.rng?.bytesPerSecond == 64 }),
        (["-rng", "random_file=/dev/random,bytes_per_sec=1000000000"], { $0.rng?.bytesPerSecond == 1_000_000_000 }),
        (["-device", "vsock,id=v,guest-cid=3"], { $0.vsock?.guestCID == 3 }),
        (["-device", "vsock,id=v,guest-cid=4294967294"], { $0.vsock?.guestCID == 4_294_967_294 }),
        (["-device", "vsock,id=v,guest-cid=3,uds-path=/run/v.sock"], { $0.vsock?.udsPath == "/run/v.sock" }),
        (
            ["-device", "vsock,id=v,guest-cid=3,uds-path=/" + String(repeating: "s", count: 95)],
            { $0.vsock?.udsPath?.utf8.count == ConfigRules.maxVsockUdsPathBytes }
        ),
        (["-device", "vsock,id=v,guest-cid=3"], { $0.vsock?.udsPath == nil }),
        (["-name", String(repeating: "n", count: 255)], { $0.name?.count == 255 }),
        (["-name", "a"], { $0.name == "a" }),
        (["-machine", "microvm"], { !$0.machine.memShare }),
        (["-machine", "dump-guest-core=on"], { $0.machine.dumpGuestCore }),
        (["-machine", "mem-share=true"], { $0.machine.memShare }),
        (["-machine", "mem-share=off"], { !$0.machine.memShare }),
        (["-drive", "id=d,file=/f,serial=12345678901234567890"], { $0.drives.first?.serial?.count == 20 }),
        (["-netdev", "id=n,netdev=tap0123456789ab,mac=02:00:00:00:00:01"], { $0.nets.first?.mac?.description == "02:00:00:00:00:01" }),
    ]

    @Test("accepted edge values", arguments: edges)
    func acceptsEdges(arguments: [String], check: @Sendable (VMConfig) -> Bool) throws {
        let parsed = try config(kernel + arguments)
        #expect(check(parsed), "\(arguments)")
    }

    /// Each rejected command line, with texts its error must contain: the option, the value, what is allowed.
    static let rejections: [([String], [String])] = [
        (["-smp", "0"], ["-smp cpus", "'0'", "1 to 254"]),
        (["-smp", "255"], ["-smp cpus", "'255'", "1 to 254"]),
        (["-smp", "cpus=-1"], ["-smp cpus", "'-1'", "decimal integer"]),
        (["-smp", "sockets=2"], ["-smp", "'sockets'", "unknown key", "cpus"]),
        (["-m", "255M"], ["-m", "'267386880'", "256 MiB"]),
        (["-m", "268431360"], ["-m", "'268431360'", "256 MiB"]),
        (["-m", "513G"], ["-m", "'550829555712'", "512 GiB"]),
        (["-m", "268435457"], ["-m", "'268435457'", "multiple of 4096"]),
        (["-m", "1T"], ["-m", "'1T'", "M or G suffix"]),
        (["-m", "99999999999999999999G"], ["-m", "'99999999999999999999G'", "M or G suffix"]),
        (["-m", "18014398509481984G"], ["-m", "'18014398509481984G'", "256M to 512G"]),
        (["-drive", "id=d,file=/f,iops=1000001"], ["-drive iops", "'1000001'", "0 (unlimited) to 1000000"]),
        (["-drive", "id=d,file=/f,readonly=yes"], ["-drive readonly", "'yes'", "true, false, on, off"]),
        (["-drive", "id=d,file=/f,direct=1"], ["-drive direct", "'1'", "true, false, on, off"]),
        (["-drive", "file=/f"], ["-drive id", "is required"]),
        (["-drive", "id=d"], ["-drive file", "is required"]),
        (["-drive", "id=d,file="], ["-drive file", "must not be empty"]),
        (["-drive", "id=d,file=/f,id=e"], ["-drive id", "more than once"]),
        (["-drive", "id=d,file=/f,cache=none"], ["-drive", "'cache'", "unknown key", "iops"]),
        (["-drive", "id=d,file=/f,serial=123456789012345678901"], ["serial_num", "'123456789012345678901'", "20 bytes"]),
        (["-drive", "/f"], ["-drive", "'/f'", "expected key=value"]),
        (["-rng", "random_file=/dev/random,bytes_per_sec=63"], ["-rng bytes_per_sec", "'63'", "64 to 1000000000"]),
        (["-rng", "random_file=/dev/random,bytes_per_sec=1000000001"], ["-rng bytes_per_sec", "'1000000001'", "64 to 1000000000"]),
        (["-rng", "bytes_per_sec=100"], ["-rng random_file", "is required"]),
        (["-device", "vsock,id=v,guest-cid=2"], ["guest-cid", "'2'", "3 to 4294967294"]),
        (["-device", "vsock,id=v,guest-cid=4294967295"], ["guest-cid", "'4294967295'", "3 to 4294967294"]),
        (["-device", "vsock,id=v"], ["guest-cid", "is required"]),
        (["-device", "vsock,id=v,guest-cid=3,uds-path="], ["uds-path", "must not be empty"]),
        (["-device", "vsock,id=v,guest-cid=3,uds-path=/" + String(repeating: "s", count: 107)], ["uds-path", "at most 107 bytes"]),
        // PATH_4294967295 must fit sun_path too: 97 bytes is one too many.
        (
            ["-device", "vsock,id=v,guest-cid=3,uds-path=/" + String(repeating: "s", count: 96)],
            ["uds-path", "PATH_P", "at most 96 bytes"]
        ),
        (["-device", "virtio-blk,id=v"], ["-device", "'virtio-blk'", "vsock"]),
        (["-name", ""], ["-name", "''", "1 to 255 characters"]),
        (["-name", String(repeating: "n", count: 256)], ["-name", "1 to 255 characters"]),
        (["-netdev", "id=n,netdev=tap0,mac=0e:90:df:9f:a8"], ["-netdev mac", "'0e:90:df:9f:a8'", "six hex octets"]),
        (["-netdev", "id=n,netdev=tap0,mac=0e:90:df:9f:a8:zz"], ["-netdev mac", "'0e:90:df:9f:a8:zz'", "six hex octets"]),
        (["-netdev", "id=n,netdev=tap0,mac=01:00:5e:00:00:01"], ["-netdev mac", "'01:00:5e:00:00:01'", "multicast", "unicast"]),
        (["-netdev", "id=n,netdev=a-very-long-tap-name0"], ["net.host_dev_name", "'a-very-long-tap-name0'", "1 to 15 bytes"]),
        (["-machine", "type=pc"], ["-machine type", "'pc'", "MicroVm"]),
        (["-machine", "mem-share=maybe"], ["-machine mem-share", "'maybe'", "true, false, on, off"]),
        (["-serial", "pty"], ["-serial", "'pty'", "stdio"]),
        (["-api-channel", "/tmp/x.sock"], ["-api-channel", "'/tmp/x.sock'", "unix:PATH"]),
        (["-api-channel", "unix:/" + String(repeating: "s", count: 107)], ["-api-channel", "at most 107 bytes"]),
        (["-chardev", "id=c,path=/" + String(repeating: "s", count: 107)], ["console.socket_path", "at most 107 bytes"]),
        (["-pidfile", "/run/vm.pid"], ["-pidfile", "'/run/vm.pid'", "-daemonize"]),
        (["-daemonize", "-serial", "stdio"], ["-serial", "'stdio'", "-daemonize"]),
        (["-balloon", "deflate-on-oom=true", "-mem-path", "/dev/hugepages"], ["-mem-path", "'/dev/hugepages'", "-balloon"]),
        (["-balloon", "deflate-on-oom=maybe"], ["-balloon deflate-on-oom", "'maybe'", "true, false, on, off"]),
        (["-iothread", "name=x"], ["-iothread", "'name'", "unknown key", "id"]),
        (["-bogus"], ["command line", "'-bogus'", "unknown option"]),
        (["stray"], ["command line", "'stray'", "unexpected argument"]),
        (["-smp"], ["-smp", "needs a value"]),
        (["-smp", "2", "-smp", "3"], ["-smp", "more than once"]),
        (["-kernel", "/other"], ["-kernel", "more than once"]),
        (["-balloon", "deflate-on-oom=on", "-balloon", "deflate-on-oom=off"], ["-balloon", "more than once"]),
    ]

    @Test("values just outside the rules are rejected naming option, value and what is allowed", arguments: rejections)
    func rejects(arguments: [String], fragments: [String]) throws {
        let error = try #require(configError(kernel + arguments), "accepted: \(arguments)")
        for fragment in fragments {
            #expect(error.description.contains(fragment), "\(error.description) lacks \(fragment)")
        }
    }

    @Test("a kernel is required")
    func kernelRequired() throws {
        let error = try #require(configError(["-smp", "2"]))
        #expect(error.description.contains("-kernel") && error.description.contains("required"))
    }

    @Test("device counts: 4 disks, 2 NICs, 11 MMIO devices, 8 iothreads")
    func deviceCounts() throws {
        let disks = (0..<4).flatMap { ["-drive", "id=d\($0),file=/d\($0)"] }
        #expect(try config(kernel + disks).drives.count == 4)
        let fifth = try #require(configError(kernel + disks + ["-drive", "id=d4,file=/d4"]))
        #expect(fifth.description.contains("too many disks") && fifth.description.contains("'5'") && fifth.description.contains("0 to 4"))

        let nics = (0..<2).flatMap { ["-netdev", "id=n\($0),netdev=tap\($0)"] }
        #expect(try config(kernel + nics).nets.count == 2)
        let third = try #require(configError(kernel + nics + ["-netdev", "id=n2,netdev=tap2"]))
        #expect(third.description.contains("too many NICs") && third.description.contains("0 to 2"))

        // 4 disk + 2 NIC slots always exist: five other devices fill the 11 slots.
        let consoles = (0..<2).flatMap { ["-chardev", "id=c\($0),path=/c\($0)"] }
        let five = consoles + ["-device", "vsock,id=v,guest-cid=3", "-balloon", "deflate-on-oom=on", "-rng", "random_file=/dev/random"]
        #expect(try config(kernel + five).mmioDeviceCount == 11)
        let twelve = try #require(configError(kernel + five + ["-chardev", "id=c9,path=/c9"]))
        #expect(
            twelve.description.contains("too many MMIO devices") && twelve.description.contains("'12'")
                && twelve.description.contains("at most 11"))

        let iothreads = (0..<8).flatMap { ["-iothread", "id=io\($0)"] }
        #expect(try config(kernel + iothreads).iothreads.count == 8)
        let ninth = try #require(configError(kernel + iothreads + ["-iothread", "id=io8"]))
        #expect(
            ninth.description.contains("too many iothreads") && ninth.description.contains("'9'") && ninth.description.contains("0 to 8"))
    }

    @Test("ids: unique iothreads, unique devices, iothread references resolve")
    func identifiers() throws {
        let duplicateIothread = try #require(configError(kernel + ["-iothread", "id=a", "-iothread", "id=a"]))
        #expect(duplicateIothread.description.contains("duplicate iothread id") && duplicateIothread.description.contains("'a'"))

        let duplicateDevice = try #require(
            configError(kernel + ["-drive", "id=x,file=/f", "-netdev", "id=x,netdev=tap0"]))
        #expect(duplicateDevice.description.contains("duplicate device id") && duplicateDevice.description.contains("'x'"))

        let dangling = try #require(configError(kernel + ["-iothread", "id=io1", "-drive", "id=d,file=/f,iothread=io2"]))
        #expect(dangling.description.contains("'io2'") && dangling.description.contains("io1"))
        let danglingNIC = try #require(configError(kernel + ["-netdev", "id=n,netdev=tap0,iothread=none"]))
        #expect(danglingNIC.description.contains("-netdev iothread") && danglingNIC.description.contains("none defined"))
    }

    @Test("QEMU option syntax: ',,' is a literal comma, booleans true/false/on/off")
    func optionSyntax() throws {
        let parsed = try config(kernel + ["-drive", "id=d,file=/images/a,,b.img,readonly=on,direct=false"])
        #expect(parsed.drives[0].path == "/images/a,b.img")
        #expect(parsed.drives[0].readOnly && !parsed.drives[0].direct)
        let trailing = try config(kernel + ["-drive", "id=d,file=/f,,"])
        #expect(trailing.drives[0].path == "/f,")
    }

    @Test("-append takes every word up to the next option; one quoted argument works too")
    func appendWords() throws {
        #expect(try config(kernel + ["-append", "a=1", "b", "-smp", "2"]).boot.bootArgs == "a=1 b")
        #expect(try config(kernel + ["-append", "a=1 b"]).boot.bootArgs == "a=1 b")
        #expect(try config(["--kernel", "/boot/vmlinux", "--smp", "2"]).machine.vcpuCount == 2)
    }

    @Test("--help lists every option with its range")
    func help() throws {
        let invocation = try parse(["--help"])
        #expect(invocation.action == .help && invocation.config == nil)
        let text = StratoVirtCommandLine.helpText
        for option in StratoVirtCommandLine.options {
            #expect(text.contains("-" + option.name), "help lacks \(option.name)")
        }
        for range in ["1 to 254", "256M to 512G", "0 (unlimited) to 1000000", "64 to 1000000000", "at most 8", "at most 4", "at most 2"] {
            #expect(text.contains(range), "help lacks \(range)")
        }
    }
}
