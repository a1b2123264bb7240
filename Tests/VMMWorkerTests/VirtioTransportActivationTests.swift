import Glibc
import Synchronization
import Testing

@testable import VMMWorker

/// A device whose activation starts work and then fails (as a second queue's epoll
/// registration can), counting its resets.
final class HalfActivatingDevice: VirtioDevice {
    struct Failure: Error {}
    let state = Mutex((started: 0, resets: 0))
    var deviceID: UInt32 { 4 }
    var deviceFeatures: UInt64 { 0 }
    var queueMaxSizes: [UInt16] { [8] }
    func readConfig(offset: UInt64, length: Int) -> UInt64 { 0 }
    func writeConfig(offset: UInt64, length: Int, value: UInt64) {}
    func activate(_ activation: VirtioActivation) throws {
        state.withLock { $0.started += 1 }
        throw Failure()
    }
    func reset() { state.withLock { $0.resets += 1 } }
}

@Suite("virtio-mmio transport: activation that fails half way")
struct VirtioTransportActivationTests {
    @Test("a device whose activation failed is reset (it may have started serving a queue), then NEEDS_RESET is shown")
    func failedActivationIsReset() throws {
        let memory = try guestMemory()
        let device = HalfActivatingDevice()
        let t = try VirtioMMIOTransport(slot: VirtioMMIOSlot(slot: 6), device: device, memory: memory, vm: nil)
        bringUp(t, queues: [QueueAt(memory: memory, base: 0x10000)])
        #expect(device.state.withLock { $0.started } == 1)
        #expect(t.status & Virtio.Status.deviceNeedsReset != 0)
        // Whatever it started is stopped before the driver could see the failure.
        #expect(device.state.withLock { $0.resets } == 1)
        // The driver's reset clears the error state.
        t.write(offset: Virtio.MMIORegister.status, length: 4, value: 0)
        #expect(t.status == 0)
    }
}
