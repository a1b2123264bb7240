import CLinux
import Glibc

extension EventLoop {
    /// Watches a queue's notification eventfd (KVM's ioeventfd on QueueNotify, virtio 1.2
    /// §4.2.2): each wake-up drains the counter, then calls `process`, which takes whatever
    /// the driver made available since.
    func watchQueueNotifications(fd: Int32, process: @escaping @Sendable () -> Void) throws(SyscallError) -> Token {
        try register(fd: fd, events: EPOLLIN.rawValue) { _ in
            var value: UInt64 = 0
            _ = withUnsafeMutableBytes(of: &value) { Glibc.read(fd, $0.baseAddress, 8) }
            process()
        }
    }
}
