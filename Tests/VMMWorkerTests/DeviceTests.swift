import Synchronization
import Testing

@testable import VMMWorker

@Suite("8250 UART")
struct SerialTests {
    func uart() -> Serial8250 { Serial8250(output: nil, interrupt: InterruptLine(irq: 4, vm: nil)) }

    @Test("reset state: LSR shows an empty transmitter, IIR no interrupt, MSR a connected line")
    func resetState() {
        let serial = uart()
        #expect(serial.read(offset: 5) == 0x60)
        #expect(serial.read(offset: 2) == 0x01)
        #expect(serial.read(offset: 6) & 0xb0 == 0xb0)
    }

    @Test("DLAB switches offsets 0 and 1 to the divisor latch")
    func divisorLatch() {
        let serial = uart()
        serial.write(offset: 3, value: 0x80)
        serial.write(offset: 0, value: 0x01)
        serial.write(offset: 1, value: 0x02)
        #expect(serial.read(offset: 0) == 0x01 && serial.read(offset: 1) == 0x02)
        serial.write(offset: 3, value: 0x03)
        #expect(serial.read(offset: 1) == 0)  // IER untouched
        #expect(serial.read(offset: 3) == 0x03)
    }

    @Test("THRE interrupt: raised when enabled and after each write, cleared by reading IIR")
    func thre() {
        let serial = uart()
        serial.write(offset: 1, value: 0x02)  // ETBEI
        #expect(serial.interrupt.pulseCount == 1)
        #expect(serial.read(offset: 2) == 0x02)
        #expect(serial.read(offset: 2) == 0x01)
        serial.write(offset: 0, value: 0x41)
        #expect(serial.interrupt.pulseCount == 2)
        serial.write(offset: 2, value: 0x01)  // FIFO on
        #expect(serial.read(offset: 2) == 0xc2)
    }

    @Test("received data: LSR.DR, RDA interrupt, FIFO order, capacity")
    func receive() {
        let serial = uart()
        serial.write(offset: 1, value: 0x01)  // ERBFI
        #expect(serial.enqueueInput([0x61, 0x62]) == 2)
        #expect(serial.interrupt.pulseCount == 1)
        #expect(serial.read(offset: 5) & 1 == 1)
        #expect(serial.read(offset: 2) == 0x04)
        #expect(serial.read(offset: 0) == 0x61)
        #expect(serial.read(offset: 0) == 0x62)
        #expect(serial.read(offset: 5) & 1 == 0)
        #expect(serial.read(offset: 2) == 0x01)
        let accepted = serial.enqueueInput([UInt8](repeating: 0x7a, count: Serial8250.inputCapacity + 10))
        #expect(accepted == Serial8250.inputCapacity)
        #expect(serial.inputSpace == 0)
        serial.write(offset: 2, value: 0x03)  // clear the receive FIFO
        #expect(serial.read(offset: 5) & 1 == 0)
    }

    @Test("loopback returns transmitted bytes and mirrors MCR into MSR")
    func loopback() {
        let serial = uart()
        serial.write(offset: 4, value: 0x1f)  // LOOP | OUT2 | OUT1 | RTS | DTR
        #expect(serial.read(offset: 6) == 0xf0)
        serial.write(offset: 0, value: 0x5a)
        #expect(serial.read(offset: 0) == 0x5a)
        #expect(serial.read(offset: 7) == 0)
        serial.write(offset: 7, value: 0x33)
        #expect(serial.read(offset: 7) == 0x33)
    }
}

@Suite("i8042 and buses")
struct I8042Tests {
    final class Flag: Sendable {
        let count = Synchronization.Atomic<Int>(0)
    }

    @Test("0xfe on port 0x64 requests a reset; status never shows a full input buffer")
    func reset() {
        let flag = Flag()
        let controller = I8042(onReset: { flag.count.add(1, ordering: .relaxed) })
        #expect(controller.read(port: 0x64) & 0x02 == 0)
        controller.write(port: 0x64, value: 0xfe)
        #expect(flag.count.load(ordering: .relaxed) == 1)
    }

    @Test("controller commands answer on port 0x60")
    func commands() {
        let controller = I8042(onReset: {})
        controller.write(port: 0x64, value: 0xaa)
        #expect(controller.read(port: 0x64) & 0x01 == 1)
        #expect(controller.read(port: 0x60) == 0x55)
        #expect(controller.read(port: 0x64) & 0x01 == 0)
        controller.write(port: 0x64, value: 0x60)
        controller.write(port: 0x60, value: 0x47)
        controller.write(port: 0x64, value: 0x20)
        #expect(controller.read(port: 0x60) == 0x47)
        controller.write(port: 0x60, value: 0xff)  // keyboard reset: no keyboard
        #expect(controller.read(port: 0x60) == 0xfe)
    }

    @Test("the port bus routes ranges and floats unclaimed ports high")
    func portBus() {
        let serial = Serial8250(output: nil, interrupt: InterruptLine(irq: 4, vm: nil))
        var bus = PortIOBus()
        bus.register(.serial(serial), start: 0x3f8, count: 8)
        #expect(bus.read(port: 0x3fd) == 0x60)
        #expect(bus.read(port: 0x80) == 0xff)
        bus.write(port: 0x3ff, value: 9)
        #expect(serial.read(offset: 7) == 9)
        var word: UInt32 = 0
        withUnsafeMutableBytes(of: &word) { bytes in
            if let base = bytes.baseAddress { bus.access(port: 0x1234, size: 4, isWrite: false, data: base) }
        }
        #expect(word == 0xffff_ffff)
    }

    @Test("an empty virtio-mmio slot reads magic 'virt', version 2, device id 0")
    func emptySlot() {
        var bus = MMIOBus()
        bus.register(.emptySlot, base: 0xd000_0000, size: 0x1000)
        func read(_ address: UInt64) -> UInt32 {
            var value: UInt32 = 0xdead
            withUnsafeMutableBytes(of: &value) { bytes in
                if let base = bytes.baseAddress { bus.access(address: address, length: 4, isWrite: false, data: base) }
            }
            return value
        }
        #expect(read(0xd000_0000) == 0x7472_6976)
        #expect(read(0xd000_0004) == 2)
        #expect(read(0xd000_0008) == 0)
        #expect(read(0xe000_0000) == 0)
    }
}

@Suite("CPUID")
struct CPUIDTests {
    static let host: [CPUIDEntry] = [
        CPUIDEntry(function: 0, eax: 0x1f, ebx: 0x756e_6547),
        CPUIDEntry(function: 1, eax: 0x906ea, ebx: 0x0810_0800 | (7 << 24), ecx: 0xffff_ffff & ~(1 << 31), edx: 0xbfeb_fbff),
        CPUIDEntry(function: 4, index: 0, flags: 1, eax: 0x1c00_4121),
        CPUIDEntry(function: 4, index: 3, flags: 1, eax: 0x1c03_c163),
        CPUIDEntry(function: 7, index: 0, flags: 1, ebx: 0xffff_ffff, ecx: 0xffff_ffff, edx: 0xffff_ffff),
        CPUIDEntry(function: 0xb, index: 0, flags: 1, eax: 1, ebx: 2, ecx: 0x100, edx: 7),
        CPUIDEntry(function: 0xd, index: 0, flags: 1, eax: 0x7, ebx: 0x340, ecx: 0x340),
        CPUIDEntry(function: 0xd, index: 1, flags: 1, eax: 0xf),
        CPUIDEntry(function: 0x1f, index: 0, flags: 1, eax: 1),
        CPUIDEntry(function: 0x4000_0001, eax: 0x01ff_ffff),
    ]

    @Test("leaf 0x40000001: KVM PV features that need VMCALL hidden, MSR-based ones kept")
    func kvmFeatures() throws {
        let entries = CPUIDTemplate.configure(Self.host, index: 1, count: 2)
        let leaf = try #require(entries.first { $0.function == 0x4000_0001 })
        // PV_UNHALT (7), PV_SEND_IPI (11), PV_SCHED_YIELD (13), HC_MAP_GPA_RANGE (16) hidden.
        #expect(leaf.eax & ((1 << 7) | (1 << 11) | (1 << 13) | (1 << 16)) == 0)
        // CLOCKSOURCE2 (3), ASYNC_PF (4), STEAL_TIME (5), PV_EOI (6) kept.
        #expect(leaf.eax & 0x78 == 0x78)
    }

    @Test("leaf 1: APIC id, logical count, hypervisor bit; XSAVE, OSXSAVE, AVX, CX16 hidden", arguments: [(0, 1), (2, 4), (5, 6)])
    func leaf1(index: Int, count: Int) throws {
        let entries = CPUIDTemplate.configure(Self.host, index: index, count: count)
        let leaf1 = try #require(entries.first { $0.function == 1 })
        #expect(leaf1.ebx >> 24 == UInt32(index))
        #expect((leaf1.ebx >> 16) & 0xff == UInt32(count))
        #expect(leaf1.ebx & 0xffff == 0x0800)
        #expect(leaf1.ecx & (1 << 31) != 0)
        #expect(leaf1.ecx & ((1 << 26) | (1 << 27) | (1 << 28) | (1 << 13)) == 0)
        #expect((leaf1.edx & (1 << 28) != 0) == (count > 1))
    }

    @Test("leaf 0xB describes one thread per core and count cores; 0x1F dropped; 0xD empty")
    func topology() throws {
        let entries = CPUIDTemplate.configure(Self.host, index: 5, count: 6)
        let leafB = entries.filter { $0.function == 0xb }.sorted { $0.index < $1.index }
        #expect(leafB.count == 3)
        #expect(leafB.allSatisfy { $0.edx == 5 && $0.flags == 1 })
        #expect(leafB[0].eax == 0 && leafB[0].ebx == 1 && leafB[0].ecx == 0x100)
        #expect(leafB[1].eax == 3 && leafB[1].ebx == 6 && leafB[1].ecx == 0x201)
        #expect(leafB[2].ebx == 0 && (leafB[2].ecx >> 8) & 0xff == 0)
        #expect(!entries.contains { $0.function == 0x1f })
        #expect(entries.filter { $0.function == 0xd }.allSatisfy { $0.eax == 0 && $0.ebx == 0 && $0.ecx == 0 && $0.edx == 0 })
        let leaf7 = try #require(entries.first { $0.function == 7 })
        #expect(leaf7.ebx & (1 << 5) == 0 && leaf7.ebx & (1 << 16) == 0)
    }

    @Test("leaf 4: cores per package, cache sharing")
    func leaf4() {
        let entries = CPUIDTemplate.configure(Self.host, index: 0, count: 4).filter { $0.function == 4 }
        #expect(entries.allSatisfy { $0.eax >> 26 == 3 })
        #expect((entries[0].eax >> 14) & 0xfff == 0)  // L1: per core
        #expect((entries[1].eax >> 14) & 0xfff == 3)  // L3: shared by all
        #expect(entries[0].eax & 0x3fff == 0x0121)
    }

    @Test("thread names keep the vCPU suffix within 15 bytes")
    func threadNames() {
        #expect(NativeThread.vcpuThreadName(vmName: "vm", index: 3) == "vm-vcpu3")
        let long = NativeThread.vcpuThreadName(vmName: "a-very-long-vm-name", index: 12)
        #expect(long == "a-very-l-vcpu12" && long.utf8.count == 15)
    }
}
