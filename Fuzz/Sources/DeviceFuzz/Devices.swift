import FuzzSupport
import Glibc
import Protocol

@testable import VMMWorker

// The devices under test: every device is the VMM's own class (virtio-net on a socket pair
// standing in for its tap, FuzzSupport/HostSides.swift).

/// What each input's device is; its queue (and the device's other, idle ones).
enum Kind: UInt8, CaseIterable {
    case block, rng, netReceive, netTransmit, consoleReceive, consoleTransmit, balloonInflate, balloonDeflate
    case vsockReceive, vsockTransmit

    /// The queue the input fills, and the device's other queues (set up empty, in the order
    /// of ``idleLayouts``).
    var queues: (fuzzed: Int, idle: [Int]) {
        switch self {
        case .block, .rng: (0, [])
        case .netReceive, .consoleReceive, .balloonInflate: (0, [1])
        case .netTransmit, .consoleTransmit, .balloonDeflate: (1, [0])
        // virtio-vsock: receiveq 0, transmitq 1, eventq 2 (its buffers are never used).
        case .vsockReceive: (0, [1, 2])
        case .vsockTransmit: (1, [0, 2])
        }
    }
}

/// The host side of the vsock inputs, in tmpfs: a directory per process, the device's
/// listener (`v.sock`, made per input) and a listener for guest connections to host port 1
/// (`v.sock_1`, made once; what connected is accepted and closed after each input).
let vsockDirectory: String = {
    let path = "/dev/shm/flotilla-fuzz-vsock-\(getpid())"
    _ = mkdir(path, 0o700)
    // Removed when the process exits (libFuzzer ends with exit()).
    atexit {
        _ = unlink(vsockDirectory + "/v.sock_1")
        _ = unlink(vsockDirectory + "/v.sock")
        _ = rmdir(vsockDirectory)
    }
    return path
}()
let vsockPortOne: Int32 = {
    let path = vsockDirectory + "/v.sock_1"
    _ = unlink(path)
    // Non-blocking, so drainPortOne stops when nothing is queued.
    let fd = must { try UnixSocket.listen(path: path, mode: 0o600, backlog: 64) }
    return fd
}()

/// Accepts and closes whatever connected to host port 1.
func drainPortOne() {
    while true {
        let fd = accept(vsockPortOne, nil, nil)
        if fd < 0 { return }
        close(fd)
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
