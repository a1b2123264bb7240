import Testing

@testable import Protocol

/// The JSON example of the reference, verbatim.
let referenceJSON = """
    {
      "boot-source": {
        "kernel_image_path": "/path/to/vmlinux.bin",
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off tsc=reliable ipv6.disable=1 root=/dev/vda quiet rw"
      },
     "machine-config": {
        "type": "MicroVm",
        "vcpu_count": 2,
        "mem_size": 268435456
      },
      "drive": [
        {
          "drive_id": "rootfs",
          "path_on_host": "/path/to/rootfs",
          "serial_num": "11111111",
          "direct": true,
          "read_only": false,
          "iops": 200000,
          "iothread": "iothread2"
        }
      ],
      "net": [
        {
          "iface_id": "net0",
          "host_dev_name": "tap0",
          "mac": "0e:90:df:9f:a8:88",
          "iothread": "iothread1"
        }
      ],
      "console": [
        {
        "console_id": "charconsole0",
        "socket_path": "/path/to/console.socket"
        }
      ],
      "serial": {
        "stdio": true
      },
      "vsock": {
        "vsock_id": "vsock-123321132",
        "guest_cid": 4
      },
      "iothread": [
        {"id": "iothread1"},
        {"id": "iothread2"}
      ]
    }
    """

/// The same VM as `referenceJSON`, written as a command line.
let referenceJSONAsCommandLine = [
    "-kernel", "/path/to/vmlinux.bin",
    "-append", "console=ttyS0 reboot=k panic=1 pci=off tsc=reliable ipv6.disable=1 root=/dev/vda quiet rw",
    "-machine", "type=MicroVm", "-smp", "2", "-m", "256M",
    "-drive", "id=rootfs,file=/path/to/rootfs,serial=11111111,direct=true,readonly=false,iops=200000,iothread=iothread2",
    "-netdev", "id=net0,netdev=tap0,mac=0e:90:df:9f:a8:88,iothread=iothread1",
    "-chardev", "id=charconsole0,path=/path/to/console.socket",
    "-serial", "stdio",
    "-device", "vsock,id=vsock-123321132,guest-cid=4",
    "-iothread", "id=iothread1", "-iothread", "id=iothread2",
]

@Suite("StratoVirt JSON configuration")
struct JSONConfigTests {
    let expectedReferenceVM = VMConfig(
        boot: BootSource(
            kernelImagePath: "/path/to/vmlinux.bin",
            bootArgs: "console=ttyS0 reboot=k panic=1 pci=off tsc=reliable ipv6.disable=1 root=/dev/vda quiet rw"),
        machine: MachineConfig(vcpuCount: 2, memoryBytes: 268_435_456),
        drives: [
            DriveConfig(
                id: "rootfs", path: "/path/to/rootfs", readOnly: false, direct: true, serial: "11111111", iothread: "iothread2",
                iops: 200_000)
        ],
        nets: [NetConfig(id: "net0", hostDeviceName: "tap0", mac: MACAddress(0x0e, 0x90, 0xdf, 0x9f, 0xa8, 0x88), iothread: "iothread1")],
        consoles: [ConsoleConfig(id: "charconsole0", socketPath: "/path/to/console.socket")],
        vsock: VsockConfig(id: "vsock-123321132", guestCID: 4),
        serial: SerialConfig(stdio: true),
        iothreads: [IothreadConfig(id: "iothread1"), IothreadConfig(id: "iothread2")])

    @Test("the reference's JSON example and the same VM as a command line give equal VMConfigs")
    func referenceExample() throws {
        let fromJSON = try config(
            ["-config", "/home/config.json", "-api-channel", "unix:/tmp/stratovirt.socket"], files: ["/home/config.json": referenceJSON])
        let fromCLI = try config(referenceJSONAsCommandLine)
        #expect(fromJSON == expectedReferenceVM)
        #expect(fromCLI == fromJSON)
        #expect(try VMConfig(json: Array(referenceJSON.utf8)) == fromJSON)
    }

    @Test("print-config JSON reads back as the same VM")
    func roundTrip() throws {
        var everything = expectedReferenceVM
        everything.name = "round, trip"
        everything.boot.initrdPath = "/initrd"
        everything.machine = MachineConfig(vcpuCount: 3, memoryBytes: 6 << 30, dumpGuestCore: false, memShare: true, memPath: nil)
        everything.rng = RngConfig(randomFile: "/dev/urandom", bytesPerSecond: 4096)
        everything.balloon = BalloonConfig(deflateOnOOM: true)
        everything.vsock?.udsPath = "/run/vm/v.sock"
        let text = everything.jsonValue.prettyText()
        #expect(try VMConfig(json: Array(text.utf8)) == everything)
        let hugePages = VMConfig(boot: BootSource(kernelImagePath: "/k"), machine: MachineConfig(memPath: "/dev/hugepages"))
        #expect(try VMConfig(json: Array(hugePages.jsonValue.compactText.utf8)) == hugePages)
        // Keys come out in the order of the reference's Table 2.
        let keys = try #require(everything.jsonValue.objectValue?.keys)
        #expect(
            keys == ["name", "boot-source", "machine-config", "drive", "net", "console", "vsock", "serial", "iothread", "balloon", "rng"])
    }

    @Test("alias spellings of machine-config keys")
    func aliases() throws {
        let json = #"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"mem_share": true, "mem-path": "/hp"}}"#
        let parsed = try VMConfig(json: Array(json.utf8))
        #expect(parsed.machine.memShare && parsed.machine.memPath == "/hp")
        let both = #"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"mem_share": true, "mem-share": true}}"#
        #expect(throws: ConfigError.self) { try VMConfig(json: Array(both.utf8)) }
    }

    static let rejections: [(String, [String])] = [
        (#"{"boot-source": {"kernel_image_path": "/k"}, "bogus": 1}"#, ["vm.json: bogus", "unknown field", "boot-source"]),
        (#"{"boot-source": {"kernel_image_path": "/k", "cmdline": "x"}}"#, ["boot-source.cmdline", "unknown field", "boot_args"]),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "drive": [{"drive_id": "d", "path_on_host": "/d", "cache": 1}]}"#,
            ["drive[0].cache", "unknown field"]
        ),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 0}}"#,
            ["machine-config.vcpu_count", "'0'", "1 to 254"]
        ),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 255}}"#,
            ["machine-config.vcpu_count", "'255'", "1 to 254"]
        ),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": "2"}}"#,
            ["machine-config.vcpu_count", "non-negative integer"]
        ),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 2.5}}"#, ["machine-config.vcpu_count", "'2.5'"]),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"mem_size": 268431360}}"#,
            ["machine-config.mem_size", "'268431360'", "256 MiB"]
        ),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"mem_size": 549755817984}}"#,
            ["machine-config.mem_size", "'549755817984'", "512 GiB"]
        ),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"type": "pc"}}"#, ["machine-config.type", "'pc'", "MicroVm"]),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"dump_guest_core": "off"}}"#,
            ["machine-config.dump_guest_core", "boolean"]
        ),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "drive": [{"drive_id": "d", "path_on_host": "/d", "iops": 1000001}]}"#,
            ["drive[0].iops", "'1000001'", "1000000"]
        ),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "drive": [{"drive_id": "d"}]}"#, ["drive[0].path_on_host", "is required"]),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "drive": {"drive_id": "d"}}"#, ["drive", "expected an array"]),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "net": [{"iface_id": "n", "host_dev_name": "tap0", "mac": "zz"}]}"#,
            ["net[0].mac", "'zz'", "six hex octets"]
        ),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "vsock": {"vsock_id": "v", "guest_cid": 2}}"#,
            ["vsock.guest_cid", "'2'", "3 to 4294967294"]
        ),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "vsock": {"vsock_id": "v", "guest_cid": 3, "uds_path": 5}}"#,
            ["vsock.uds_path", "expected a string"]
        ),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "vsock": {"vsock_id": "v", "guest_cid": 3, "uds_path": "/"#
                + String(repeating: "s", count: 96) + #""}}"#,
            ["vsock.uds_path", "PATH_P", "at most 96 bytes"]
        ),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "rng": {"random_file": "/dev/random", "bytes_per_sec": 63}}"#,
            ["rng.bytes_per_sec", "'63'", "64 to 1000000000"]
        ),
        (
            #"{"boot-source": {"kernel_image_path": "/k"}, "balloon": {"deflate_on_oom": true}, "machine-config": {"mem_path": "/hp"}}"#,
            ["mem_path", "'/hp'", "-balloon"]
        ),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "iothread": [{"id": "a"}, {"id": "a"}]}"#, ["iothread.id", "'a'", "duplicate"]),
        (#"{"machine-config": {"vcpu_count": 1}}"#, ["kernel_image_path", "required"]),
        (#"{"boot-source": {"kernel_image_path": "/k"}"#, ["vm.json", "invalid JSON", "line 1"]),
        (#"[]"#, ["vm.json", "expected an object"]),
    ]

    @Test("bad JSON documents are rejected naming the file, field path, value and what is allowed", arguments: rejections)
    func rejects(json: String, fragments: [String]) throws {
        let error = try #require(configError(["-config", "vm.json"], files: ["vm.json": json]))
        for fragment in fragments {
            #expect(error.description.contains(fragment), "\(error.description) lacks \(fragment)")
        }
    }

    @Test("a missing config file is a clear error")
    func missingFile() throws {
        let error = try #require(configError(["-config", "/nope.json"]))
        #expect(error.description.contains("-config") && error.description.contains("/nope.json"))
    }
}

@Suite("Command line over JSON")
struct PrecedenceTests {
    let files = ["vm.json": referenceJSON]

    @Test("single values: the command line wins field by field")
    func scalars() throws {
        let merged = try config(["-config", "vm.json", "-smp", "4", "-append", "quiet", "-name", "cli"], files: files)
        #expect(merged.machine.vcpuCount == 4)
        #expect(merged.machine.memoryBytes == 268_435_456, "memory not given on the command line keeps the JSON value")
        #expect(merged.boot.bootArgs == "quiet")
        #expect(merged.boot.kernelImagePath == "/path/to/vmlinux.bin")
        #expect(merged.name == "cli")
        let machine = try config(["-config", "vm.json", "-machine", "dump-guest-core=off"], files: files)
        #expect(machine.machine.dumpGuestCore == false && machine.machine.vcpuCount == 2)
    }

    @Test("devices with ids: same id replaces in place, new ids are appended")
    func lists() throws {
        let merged = try config(
            ["-config", "vm.json", "-drive", "id=rootfs,file=/cli/root,readonly=on", "-drive", "id=data,file=/cli/data"],
            files: files)
        #expect(merged.drives.map(\.id) == ["rootfs", "data"])
        #expect(merged.drives[0] == DriveConfig(id: "rootfs", path: "/cli/root", readOnly: true))
        let iothreads = try config(["-config", "vm.json", "-iothread", "id=iothread3"], files: files)
        #expect(iothreads.iothreads.map(\.id) == ["iothread1", "iothread2", "iothread3"])
    }

    @Test("single devices: the command line replaces the whole section")
    func sections() throws {
        let merged = try config(["-config", "vm.json", "-device", "vsock,id=v2,guest-cid=9"], files: files)
        #expect(merged.vsock == VsockConfig(id: "v2", guestCID: 9))
    }

    @Test("rules apply to the merged result")
    func mergedRules() throws {
        // JSON's net0 plus two more NICs from the command line make three.
        let error = try #require(
            configError(["-config", "vm.json", "-netdev", "id=n1,netdev=tap1", "-netdev", "id=n2,netdev=tap2"], files: files))
        #expect(error.description.contains("too many NICs"))
        // The command line may supply the kernel a JSON file lacks.
        let noKernel = #"{"machine-config": {"vcpu_count": 2}}"#
        #expect(try config(["-config", "k.json", "-kernel", "/k"], files: ["k.json": noKernel]).machine.vcpuCount == 2)
    }
}
