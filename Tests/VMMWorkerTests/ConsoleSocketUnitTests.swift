import Glibc
import Testing

@testable import VMMWorker

@Suite("virtio-console port socket: what guest output costs the host")
struct VirtioConsoleSocketTests {
    /// A transmit chain's buffer can be as large as guest RAM; with no client the port keeps
    /// only the replay history, so it must never copy (or keep capacity for) more than that.
    @Test("output without a client keeps the last historyCapacity bytes and no more memory than that")
    func largeOutputWithoutClient() throws {
        let loop = try EventLoop(name: "console-socket-test")
        let path = "/tmp/flotilla-console-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let socket = try ConsoleSocket(path: path, loop: loop, kind: .virtioConsole)
        defer { socket.close() }
        // 64 MiB of guest output; untouched anonymous pages read as zeroes and cost nothing.
        let size = 64 << 20
        let mapping = try #require(mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        try #require(mapping != MAP_FAILED)
        defer { munmap(mapping, size) }
        let tail = Array("the end of a long write".utf8)
        (mapping + size - tail.count).copyMemory(from: tail, byteCount: tail.count)

        #expect(socket.writeOutput(UnsafeRawBufferPointer(start: mapping, count: size)) == size)
        #expect(socket.retainedBytes <= 2 * ConsoleSocket.historyCapacity, "\(socket.retainedBytes) bytes kept")

        // The replay a client gets is the newest output.
        let client = connectedClient(path)
        defer { close(client) }
        var replay: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        // Each loop round accepts, or sends what the socket takes; bounded, not timed.
        for _ in 0..<1000 where replay.count < ConsoleSocket.historyCapacity {
            loop.stop()
            loop.run()
            let count = buffer.withUnsafeMutableBytes { recv(client, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if count > 0 { replay += buffer[0..<count] }
        }
        #expect(replay.count == ConsoleSocket.historyCapacity)
        #expect(Array(replay.suffix(tail.count)) == tail)
    }

    /// A connected, blocking Unix stream socket to `path`.
    func connectedClient(_ path: String) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in path.utf8.enumerated() where index < raw.count - 1 { raw[index] = byte }
        }
        _ = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        return fd
    }
}
