import FlotillaTestSupport
import Glibc
import Protocol
import SystemPackage
import Testing

@testable import VMMWorker

/// Boots hand-assembled 64-bit guests (machine code bytes in an ELF built by the test).
/// Skipped when /dev/kvm cannot be opened: these need a real KVM.
@Suite("MicroVM on KVM", .serialized, .enabled(if: kvmAvailable, "needs a usable /dev/kvm"))
struct MicroVMTests {
    func boot(_ code: [UInt8], vcpus: Int = 1, output: OutputCollector? = nil) throws -> MicroVM {
        let path = try temporaryFile(makeELF(code: code))
        defer { unlink(path) }
        let config = VMConfig(
            name: "test", boot: BootSource(kernelImagePath: path, bootArgs: "console=ttyS0"),
            machine: MachineConfig(vcpuCount: vcpus, memoryBytes: 64 << 20))
        let vm = try MicroVM(config: config, serialOutput: output.map { FileDescriptor(rawValue: $0.writeFD) })
        try vm.start()
        return vm
    }

    @Test("a guest writes OK to the UART and resets through the i8042")
    func helloAndReset() throws {
        let code: [UInt8] = [
            0x66, 0xba, 0xf8, 0x03,  // mov dx, 0x3f8
            0xb0, 0x4f, 0xee,  // mov al, 'O'; out dx, al
            0xb0, 0x4b, 0xee,  // mov al, 'K'; out dx, al
            0xb0, 0x0a, 0xee,  // mov al, '\n'; out dx, al
            0xb0, 0xfe, 0xe6, 0x64,  // mov al, 0xfe; out 0x64, al
            0xf4, 0xeb, 0xfd,  // hlt; jmp hlt
        ]
        let output = try OutputCollector()
        let vm = try boot(code, output: output)
        let reason = try #require(vm.waitForExit(timeoutNanoseconds: 20_000_000_000))
        #expect(reason == .guestReset)
        #expect(reason.exitCode == 0)
        #expect(output.drain() == "OK\n")
        #expect(vm.guestState == .shutdown)
    }

    @Test("a guest that triple-faults ends the VM with a register dump")
    func tripleFault() throws {
        // ud2 with an empty IDT: #UD cannot be delivered -> #GP -> #DF -> shutdown.
        let vm = try boot([0x90, 0x0f, 0x0b])
        let reason = try #require(vm.waitForExit(timeoutNanoseconds: 20_000_000_000))
        guard case .failed(let message) = reason else {
            Issue.record("expected a failure, got \(reason)")
            return
        }
        if getenv("FLOTILLA_SHOW_GUEST") != nil { print(message) }
        #expect(message.contains("RIP=0x0000000000100001"))
        #expect(message.contains("code at RIP"))
        #expect(reason.exitCode != 0)
    }

    @Test("an instruction the emulator lacks (INT3 here) or its fault ends the VM as failed")
    func unsupportedInstruction() throws {
        let vm = try boot([0xcc, 0xf4])
        let reason = try #require(vm.waitForExit(timeoutNanoseconds: 20_000_000_000))
        guard case .failed(let message) = reason else {
            Issue.record("expected a failure, got \(reason)")
            return
        }
        if getenv("FLOTILLA_SHOW_GUEST") != nil { print(message) }
        #expect(message.contains("RIP="))
    }

    @Test("pause stops a guest incrementing a counter (and parks an AP waiting for SIPI); resume lets it continue")
    func pauseResume() throws {
        let code: [UInt8] = [
            0xb8, 0x00, 0x00, 0x20, 0x00,  // mov eax, 0x200000
            0x48, 0xff, 0x00,  // loop: inc qword [rax]
            0xeb, 0xfb,  // jmp loop
        ]
        let vm = try boot(code, vcpus: 2)
        defer {
            vm.requestShutdown()
            _ = vm.waitForExit()
        }
        func counter() throws -> UInt64 { try vm.memory.read(UInt64.self, at: 0x200000) }
        usleep(200_000)
        #expect(try counter() > 0)
        try vm.pause()
        #expect(vm.guestState == .paused)
        let paused = try counter()
        usleep(200_000)
        #expect(try counter() == paused)
        try vm.resume()
        #expect(vm.guestState == .running)
        usleep(200_000)
        #expect(try counter() > paused)
        vm.requestShutdown()
        #expect(vm.waitForExit() == .requested)
    }

    @Test("requestShutdown stops a guest spinning in a loop and signals the exit eventfd")
    func requestedShutdown() throws {
        let vm = try boot([0xeb, 0xfe], vcpus: 2)  // jmp $
        usleep(50_000)
        vm.requestShutdown()
        #expect(vm.waitForExit() == .requested)
        var value: UInt64 = 0
        let n = withUnsafeMutableBytes(of: &value) { read(vm.exitEventFD.rawValue, $0.baseAddress, 8) }
        #expect(n == 8 && value == 1)
    }
}
