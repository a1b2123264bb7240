import Glibc
import Protocol
import Testing

@testable import VMMWorker

/// The virtio-rng fill path without a VM: crafted guest memory, a regular file as the source.
@Suite("virtio-rng fills device-writable buffers from random_file")
struct VirtioRngUnitTests {
    @Test("buffers are filled in order, up to the limit, and a source at its end gives a short fill")
    func fill() throws {
        let bytes = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        let path = try temporaryFile(bytes)
        defer { unlink(path) }
        let memory = try guestMemory()
        let loop = try EventLoop(name: "rng-test")
        let device = try VirtioRngDevice(rng: RngConfig(randomFile: path), memory: memory, loop: loop)
        #expect(device.deviceID == 4 && device.deviceFeatures == 0 && device.readConfig(offset: 0, length: 4) == 0)

        let first = try GuestSegment(address: 0x40000, length: 100, in: memory)
        let second = try GuestSegment(address: 0x50003, length: 300, in: memory)
        let chain = DescriptorChain(head: 0, readable: [], writable: [first, second])
        #expect(device.fill(chain, limit: 1 << 16) == 400)
        #expect(try memory.read(at: 0x40000, count: 100) == Array(bytes[0..<100]))
        #expect(try memory.read(at: 0x50003, count: 300) == Array(bytes[100..<400]))

        // The rate limit's allowance cuts a request short, mid-buffer.
        #expect(device.fill(chain, limit: 150) == 150)
        #expect(try memory.read(at: 0x50003, count: 50) == Array(bytes[500..<550]))

        // 450 bytes left in the file: the second buffer gets what there is.
        #expect(device.fill(chain, limit: 1 << 16) == 400)
        #expect(device.fill(chain, limit: 1 << 16) == 50)
        #expect(device.fill(chain, limit: 1 << 16) == 0)
    }

    @Test("a random_file that cannot be opened names itself")
    func missingSource() throws {
        let memory = try guestMemory()
        let loop = try EventLoop(name: "rng-test")
        do {
            _ = try VirtioRngDevice(rng: RngConfig(randomFile: "/nonexistent/random"), memory: memory, loop: loop)
            Issue.record("opened a file that does not exist")
        } catch {
            #expect("\(error)".contains("random_file=/nonexistent/random") && "\(error)".contains("cannot open"), "\(error)")
        }
    }
}
