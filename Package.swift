// swift-tools-version: 6.2
import PackageDescription

/// Every Swift target builds in Swift 6 language mode with warnings treated as errors.
let strict: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .treatAllWarnings(as: .error),
]

let package = Package(
    name: "Flotilla",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "flotilla-vmm", targets: ["flotilla-vmm"]),
        .executable(name: "flotillad", targets: ["flotillad"]),
        .executable(name: "flotillactl", targets: ["flotillactl"]),
        .library(name: "Protocol", targets: ["Protocol"]),
        .library(name: "VMMWorker", targets: ["VMMWorker"]),
        .library(name: "Supervisor", targets: ["Supervisor"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
    ],
    targets: [
        // Pure Swift: configuration model, JSON, QMP wire types. No syscalls.
        .target(name: "Protocol", swiftSettings: strict),

        // C shims: ioctl request numbers and KVM structures Swift cannot import directly.
        .target(name: "CKVM"),
        // C shims: _GNU_SOURCE-only libc functions (pthread naming, prctl, pidfd, ...).
        .target(name: "CLinux"),
        // C shim: the worker's seccomp filter through Debian's libseccomp.
        .target(name: "CSeccomp", linkerSettings: [.linkedLibrary("seccomp")]),
        // C shims: libsystemd (sd_notify, the watchdog, structured journal entries) for flotillad.
        .target(name: "CSystemd", linkerSettings: [.linkedLibrary("systemd")]),

        .target(
            name: "VMMWorker",
            dependencies: [
                "Protocol", "CKVM", "CLinux", "CSeccomp",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strict
        ),
        .target(
            name: "Supervisor",
            dependencies: [
                "Protocol", "CLinux", "CSystemd",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strict
        ),

        .executableTarget(
            name: "flotilla-vmm",
            dependencies: ["Protocol", "VMMWorker"],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "flotillad",
            dependencies: [
                "Supervisor", "Protocol",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "flotillactl",
            dependencies: [
                "Protocol", "Supervisor",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strict
        ),

        // Shared helpers for the test suites: locating built executables, running processes,
        // temporary directories.
        .target(name: "FlotillaTestSupport", dependencies: ["Protocol", "CLinux"], path: "Tests/TestSupport", swiftSettings: strict),
        .testTarget(name: "ProtocolTests", dependencies: ["Protocol"], swiftSettings: strict),
        .testTarget(
            name: "CLITests",
            dependencies: ["Protocol", "FlotillaTestSupport", "flotilla-vmm", "flotillad", "flotillactl"],
            swiftSettings: strict),
        .testTarget(name: "VMMWorkerTests", dependencies: ["VMMWorker", "Protocol", "FlotillaTestSupport"], swiftSettings: strict),
        .testTarget(name: "LinuxKernelTests", dependencies: ["Protocol", "FlotillaTestSupport", "flotilla-vmm"], swiftSettings: strict),
        .testTarget(
            name: "SupervisorTests",
            dependencies: ["Supervisor", "Protocol", "CSystemd", "FlotillaTestSupport", "flotilla-vmm", "flotillad", "flotillactl"],
            swiftSettings: strict),
    ]
)
