import Glibc
import Protocol
@testable import VMMWorker

/// Builds a minimal ELF64 x86_64 executable: one PT_LOAD of `code` at `loadAddress`
/// (p_paddr), entry at its start. Lets tests boot hand-assembled guests through the same
/// loader as Linux.
func makeELF(code: [UInt8], loadAddress: UInt64 = 0x100000, entry: UInt64? = nil, memorySize: UInt64? = nil) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: 64 + 56)
    bytes.replaceSubrange(0..<4, with: [0x7f, 0x45, 0x4c, 0x46])
    bytes[4] = 2  // ELFCLASS64
    bytes[5] = 1  // little-endian
    bytes[6] = 1  // EV_CURRENT
    bytes.putLE(UInt16(2), at: 16)  // ET_EXEC
    bytes.putLE(UInt16(62), at: 18)  // EM_X86_64
    bytes.putLE(UInt32(1), at: 20)
    bytes.putLE(entry ?? loadAddress, at: 24)
    bytes.putLE(UInt64(64), at: 32)  // e_phoff
    bytes.putLE(UInt16(64), at: 52)  // e_ehsize
    bytes.putLE(UInt16(56), at: 54)  // e_phentsize
    bytes.putLE(UInt16(1), at: 56)  // e_phnum
    let ph = 64
    bytes.putLE(UInt32(1), at: ph)  // PT_LOAD
    bytes.putLE(UInt32(7), at: ph + 4)
    bytes.putLE(UInt64(0x1000), at: ph + 8)  // p_offset
    bytes.putLE(loadAddress, at: ph + 16)
    bytes.putLE(loadAddress, at: ph + 24)
    bytes.putLE(UInt64(code.count), at: ph + 32)
    bytes.putLE(memorySize ?? UInt64(code.count), at: ph + 40)
    bytes.putLE(UInt64(0x1000), at: ph + 48)
    bytes += [UInt8](repeating: 0, count: 0x1000 - bytes.count)
    bytes += code
    return bytes
}

/// A bzImage-shaped image: setup sectors with a protocol header, then `payload`.
func makeBzImage(version: UInt16 = 0x020f, xloadflags: UInt16 = 1, loadflags: UInt8 = 1, initSize: UInt32 = 0x100000,
                 relocatable: Bool = true, prefAddress: UInt64 = 0x1000000, alignment: UInt32 = 0x200000,
                 cmdlineSize: UInt32 = 2048, payload: [UInt8] = [UInt8](repeating: 0x90, count: 0x1000)) -> [UInt8] {
    let setupSectors: UInt8 = 4
    var bytes = [UInt8](repeating: 0, count: (Int(setupSectors) + 1) * 512)
    bytes[0x1f1] = setupSectors
    bytes.putLE(UInt16(0xaa55), at: 0x1fe)
    bytes[0x200] = 0xeb  // jmp short
    bytes[0x201] = 0x6a  // header ends at 0x202 + 0x6a = 0x26c
    bytes.putLE(UInt32(0x5372_6448), at: 0x202)
    bytes.putLE(version, at: 0x206)
    bytes[0x211] = loadflags
    bytes.putLE(UInt32(0x7fff_ffff), at: 0x22c)  // initrd_addr_max
    bytes.putLE(alignment, at: 0x230)
    bytes[0x234] = relocatable ? 1 : 0
    bytes.putLE(xloadflags, at: 0x236)
    bytes.putLE(cmdlineSize, at: 0x238)
    bytes.putLE(prefAddress, at: 0x258)
    bytes.putLE(initSize, at: 0x260)
    return bytes + payload
}

/// Writes `bytes` to a fresh temporary file and returns its path.
func temporaryFile(_ bytes: [UInt8], suffix: String = "") throws -> String {
    var template = Array("/tmp/flotilla-test-XXXXXX".utf8CString)
    let fd = template.withUnsafeMutableBufferPointer { buffer -> Int32 in
        guard let base = buffer.baseAddress else { return -1 }
        return mkstemp(base)
    }
    guard fd >= 0 else { throw SyscallError("mkstemp", .init(rawValue: errno)) }
    defer { close(fd) }
    try bytes.withUnsafeBytes { try Syscall.writeAll(fd, $0) }
    return String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// A pipe whose read end collects everything written to the write end.
final class OutputCollector: @unchecked Sendable {
    // Invariant: `readFD` is only read by `drain()`, called from the test's own thread.
    let readFD: Int32
    let writeFD: Int32

    init() throws {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw SyscallError("pipe", .init(rawValue: errno)) }
        _ = fcntl(fds[0], F_SETFL, O_NONBLOCK)
        readFD = fds[0]
        writeFD = fds[1]
    }

    deinit {
        close(readFD)
        close(writeFD)
    }

    func drain() -> String {
        var collected: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(readFD, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            collected += buffer[0..<n]
        }
        return String(decoding: collected, as: UTF8.self)
    }
}

let kvmAvailable = KVMSystem.isAvailable
