import FlotillaTestSupport
import Glibc
import Protocol
import SystemPackage
import Testing

@testable import VMMWorker

/// Port-I/O exit throughput of the vCPU loop, for comparison with a bare C KVM_RUN loop
/// running the same instructions. Opt-in (FLOTILLA_BENCH=1): timing is not a unit test.
@Suite(
    "Exit cost", .enabled(if: kvmAvailable, "needs a usable /dev/kvm"),
    .enabled(if: getenv("FLOTILLA_BENCH") != nil, "set FLOTILLA_BENCH=1"))
struct ExitCostBenchmark {
    @Test("port-I/O exits per second")
    func portExits() throws {
        let count: UInt32 = 100_000
        var code: [UInt8] = [0xb9]  // mov ecx, count
        code += withUnsafeBytes(of: count.littleEndian, Array.init)
        code += [0xe6, 0x80, 0xff, 0xc9, 0x75, 0xfa]  // loop: out 0x80, al; dec ecx; jnz loop
        code += [0xb0, 0xfe, 0xe6, 0x64, 0xf4]  // reset
        let path = try temporaryFile(makeELF(code: code))
        defer { unlink(path) }
        let config = VMConfig(
            name: "bench", boot: BootSource(kernelImagePath: path), machine: MachineConfig(vcpuCount: 1, memoryBytes: 64 << 20))
        let vm = try MicroVM(config: config, serialOutput: nil)
        var start = timespec()
        clock_gettime(CLOCK_MONOTONIC, &start)
        try vm.start()
        #expect(vm.waitForExit() == .guestReset)
        var end = timespec()
        clock_gettime(CLOCK_MONOTONIC, &end)
        let seconds = Double(end.tv_sec - start.tv_sec) + Double(end.tv_nsec - start.tv_nsec) / 1e9
        print("Swift MicroVM: \(count) port exits in \(seconds) s = \(Int(Double(count) / seconds)) exits/s")
    }
}
