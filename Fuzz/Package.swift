// swift-tools-version: 6.2
import PackageDescription

// The libFuzzer targets (see `run`): the virtqueue descriptor-chain walker against a reference
// model, every virtio device's queue processing, and the virtio-mmio register interface. Its
// own package, depending on the root one by path, so the root Package.swift and its builds are
// untouched. Build it through `run` only: it needs `-sanitize=fuzzer,address`.
let package = Package(
    name: "FlotillaFuzz",
    dependencies: [.package(name: "Flotilla", path: "..")],
    targets: [
        // The declaration of LLVMFuzzerRunDriver (libFuzzer's entry for programs with a main).
        .target(name: "CFuzzerDriver"),
        // What the device and MMIO targets share: guarded guest memory, input reading, the
        // reference chain reading, running an EventLoop on the fuzzing thread.
        .target(
            name: "FuzzSupport",
            dependencies: ["CFuzzerDriver", .product(name: "VMMWorker", package: "Flotilla")],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "VirtqueueFuzz",
            dependencies: ["CFuzzerDriver", .product(name: "VMMWorker", package: "Flotilla")],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "DeviceFuzz",
            dependencies: [
                "FuzzSupport", .product(name: "VMMWorker", package: "Flotilla"), .product(name: "Protocol", package: "Flotilla"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "MMIOFuzz",
            dependencies: [
                "FuzzSupport", .product(name: "VMMWorker", package: "Flotilla"), .product(name: "Protocol", package: "Flotilla"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
    ]
)
