// swift-tools-version: 6.0
// The Flotilla benchmark suite: a separate package, so building or testing the root package
// never resolves anything benchmark-only. It measures built binaries (flotilla-vmm, qemu,
// the C KVM baseline) as child processes; see README.md and ./run.
import PackageDescription

let package = Package(
    name: "FlotillaBenchmarks",
    // blk-bench runs the real virtio-blk request path, so it links the VMM library.
    dependencies: [.package(name: "Flotilla", path: "..")],
    targets: [
        // posix_spawn with clean signal state and explicit stdio, wait4 with rusage, clocks.
        .target(name: "CBench"),
        .executableTarget(
            name: "flotilla-bench",
            dependencies: ["CBench"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // Host-side virtio-blk backend throughput against plain pread/pwrite (issue 4).
        .executableTarget(
            name: "blk-bench",
            dependencies: [
                .product(name: "VMMWorker", package: "Flotilla"),
                .product(name: "Protocol", package: "Flotilla"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // Host-side virtio-net backend throughput against plain read/write on the same tap.
        .executableTarget(
            name: "net-bench",
            dependencies: [
                "CBench",
                .product(name: "VMMWorker", package: "Flotilla"),
                .product(name: "Protocol", package: "Flotilla"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // flotillad's costs: VMs to QMP-ready per second, QMP through the multiplexer vs direct, RSS per VM (issue 5).
        .executableTarget(
            name: "fleet-bench",
            dependencies: [
                .product(name: "Supervisor", package: "Flotilla"),
                .product(name: "Protocol", package: "Flotilla"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
    ]
)
