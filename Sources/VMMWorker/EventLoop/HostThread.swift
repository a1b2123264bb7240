import CLinux
import Glibc
import SystemPackage

/// Starts dedicated, named pthreads for blocking work (epoll_wait, KVM_RUN), which must
/// never run on the Swift concurrency pool.
enum HostThread {
    /// The closure a new thread runs, boxed so it can cross the C boundary.
    private final class Start {
        let name: String
        let body: () -> Void
        init(name: String, body: @escaping () -> Void) {
            self.name = name
            self.body = body
        }
    }

    /// Spawns a joinable thread named `name` (truncated to 15 bytes) running `body`.
    @discardableResult
    static func spawn(name: String, _ body: @escaping @Sendable () -> Void) throws(SyscallError) -> pthread_t {
        let start = Unmanaged.passRetained(Start(name: name, body: body))
        var thread = pthread_t()
        let code = pthread_create(
            &thread, nil,
            { argument in
                guard let argument else { return nil }
                let start = Unmanaged<Start>.fromOpaque(argument).takeRetainedValue()
                _ = fl_set_current_thread_name(start.name)
                start.body()
                return nil
            }, start.toOpaque())
        if code != 0 {
            start.release()
            throw SyscallError("pthread_create", Errno(rawValue: code))
        }
        return thread
    }

    static func join(_ thread: pthread_t) {
        _ = pthread_join(thread, nil)
    }
}
