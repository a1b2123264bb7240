import FuzzSupport
import Glibc
import Protocol

@testable import VMMWorker

// The devices under test: every device is the VMM's own class (virtio-net on a socket pair
// standing in for its tap, FuzzSupport/HostSides.swift).

/// What each input's device is; its queue (and for two-queue devices, the other, idle one).
enum Kind: UInt8, CaseIterable {
    case block, rng, netReceive, netTransmit, consoleReceive, consoleTransmit, balloonInflate, balloonDeflate

    /// The queue the input fills, and the device's other queue (set up empty), if any.
    var queues: (fuzzed: Int, idle: Int?) {
        switch self {
        case .block, .rng: (0, nil)
        case .netReceive, .consoleReceive, .balloonInflate: (0, 1)
        case .netTransmit, .consoleTransmit, .balloonDeflate: (1, 0)
        }
    }
}

/// Two disk images in tmpfs (no disk I/O), one writable and one read-only, 64 KiB each: most
/// sectors a request names are beyond the end. Shared by every input (their contents persist).
let writableDisk = openDisk(readOnly: false)
let readOnlyDisk = openDisk(readOnly: true)

func openDisk(readOnly: Bool) -> BlockBackend {
    var template = Array("/dev/shm/flotilla-fuzz-disk-XXXXXX".utf8CString)
    let fd = template.withUnsafeMutableBufferPointer { $0.baseAddress.map { mkstemp($0) } ?? -1 }
    check(fd >= 0 && ftruncate(fd, 64 << 10) == 0, "a tmpfs file for the disk image")
    _ = unlink(String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self))
    // Not closed: the backend opens its own descriptor through /proc, this one keeps the file.
    return must { try BlockBackend(drive: DriveConfig(id: "fuzz", path: "/proc/self/fd/\(fd)", readOnly: readOnly, direct: false)) }
}
