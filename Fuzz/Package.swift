// swift-tools-version: 6.2
import PackageDescription

// The libFuzzer target for the virtqueue descriptor-chain walker (see `run`). Its own package,
// depending on the root one by path, so the root Package.swift and its builds are untouched.
// Build it through `run` only: it needs `-sanitize=fuzzer,address`.
let package = Package(
    name: "FlotillaFuzz",
    dependencies: [.package(name: "Flotilla", path: "..")],
    targets: [
        // The declaration of LLVMFuzzerRunDriver (libFuzzer's entry for programs with a main).
        .target(name: "CFuzzerDriver"),
        .executableTarget(
            name: "VirtqueueFuzz",
            dependencies: ["CFuzzerDriver", .product(name: "VMMWorker", package: "Flotilla")],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
    ]
)
