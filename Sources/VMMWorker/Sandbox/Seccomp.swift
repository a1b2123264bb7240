import CKVM
import CLinux
import CSeccomp
import Glibc
import SystemPackage

/// The worker's seccomp filter: once the VM is built and its sockets exist, every thread
/// may make only the system calls the running VM needs (and ioctl only with the listed
/// requests). Anything else kills the whole process with SIGSYS (like Firecracker), so a
/// guest escape into the VMM cannot open files, create sockets or spawn processes.
///
/// When a code path needs a new system call after start-up, add it here and cover the path
/// with a test that runs with the filter on (the default).
enum Seccomp {
    /// What the event loops, vCPU threads, QMP server, logging, timers and the exit path use.
    static let allowedSystemCalls = [
        // I/O on descriptors the VMM already owns.
        "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "lseek",
        "recvfrom", "sendto", "recvmsg", "sendmsg", "accept4", "shutdown", "close", "fcntl",
        "fsync", "fdatasync", "fstat", "newfstatat",
        // virtio-blk DISCARD and WRITE_ZEROES (punch hole, zero range).
        "fallocate",
        // Event loops and timers.
        "epoll_wait", "epoll_pwait", "epoll_ctl", "timerfd_create", "timerfd_settime", "ppoll", "poll",
        // Threads: parking, kicking vCPUs (pthread_kill → tgkill), signals.
        "futex", "tgkill", "tkill", "rt_sigreturn", "rt_sigprocmask", "sched_yield", "getpid", "gettid",
        "restart_syscall", "nanosleep", "clock_nanosleep", "clock_gettime", "gettimeofday",
        // Memory: malloc and the Swift runtime.
        "mmap", "munmap", "mremap", "mprotect", "madvise", "brk", "getrandom",
        // The exit path: removing the socket and pidfile, ending threads and the process.
        "unlink", "unlinkat", "exit", "exit_group",
    ]

    /// What QMP disk hot-plug adds, only for a VM with an api-channel: blockdev-add opens and
    /// locks an image (openat, flock; fstat and BLKGETSIZE64 for its size), device_add creates
    /// the slot's eventfds and wires them into KVM (KVM_IRQFD, KVM_IOEVENTFD, listed anyway).
    /// This is StratoVirt's trade too (its MicroVm whitelist has openat for hot-plug): whoever
    /// holds the api-channel already controls the VM; a guest gains open() only with code
    /// execution in the VMM.
    /// NIC hot-plug opens /dev/net/tun with the same openat.
    static let hotplugSystemCalls = ["openat", "flock", "eventfd2"]

    /// ioctl requests in use after start-up: running vCPUs and raising IRQs, reading vCPU
    /// state for failure reports, restoring the terminal, and setting a tap's offloads when a
    /// virtio-net driver's features are known (TUNSETOFFLOAD: it only changes what a tap the
    /// VMM already holds may hand it).
    static var allowedIoctls: [UInt64] {
        [
            FL_KVM_RUN, FL_KVM_IRQ_LINE, FL_KVM_IOEVENTFD, FL_KVM_IRQFD, FL_KVM_GET_REGS, FL_KVM_GET_SREGS,
            FL_KVM_GET_FPU, FL_KVM_GET_LAPIC, FL_KVM_GET_MP_STATE, FL_KVM_SET_MP_STATE,
            UInt(TCGETS), UInt(TCSETS), UInt(TCSETSW), UInt(TIOCGWINSZ), UInt(fl_blkgetsize64_request()),
            fl_tap_set_offload_request(),
        ].map { UInt64($0) }
    }

    /// What QMP NIC hot-plug adds to the ioctl requests, only with an api-channel: netdev_add
    /// and device_add look the tap up (SIOCGIFINDEX, on a socket made before the filter; no
    /// socket(2) is allowed), and device_add attaches to it as -netdev does (TUNSETIFF,
    /// TUNGETIFF, TUNSETVNETHDRSZ, TUNSETOFFLOAD on the /dev/net/tun descriptor it opens);
    /// netdev_add fd= checks and sets up a tap passed with getfd the same way (TUNGETIFF and
    /// on).
    static var hotplugIoctls: [UInt64] {
        var requests = [UInt](repeating: 0, count: Int(FL_TAP_HOTPLUG_REQUESTS))
        requests.withUnsafeMutableBufferPointer { fl_tap_hotplug_requests($0.baseAddress) }
        return requests.map { UInt64($0) }
    }

    /// Installs the filter on every thread; `hotplug` adds ``hotplugSystemCalls`` and ``hotplugIoctls``. `logOnly` (FLOTILLA_SECCOMP_LOG=1) allows and
    /// audit-logs violations instead, to find a missing entry.
    /// `vsock` (a user-space vsock device, `uds-path=`) adds socket(2) for AF_UNIX only and
    /// connect(2): a guest-initiated connection to host port P connects to `<uds path>_P` on
    /// the main loop (accept4 for host-initiated ones is allowed anyway). A guest gains the
    /// ability to connect to Unix sockets only with code execution in the VMM.
    static func install(logOnly: Bool, hotplug: Bool, vsock: Bool = false) throws(SyscallError) {
        let names = (allowedSystemCalls + (hotplug ? hotplugSystemCalls : [])).map { strdup($0) }
        defer { for name in names { free(name) } }
        let ioctls = allowedIoctls + (hotplug ? hotplugIoctls : [])
        var failedName: UnsafePointer<CChar>?
        let result = names.map { UnsafePointer($0) }.withUnsafeBufferPointer { namesBuffer in
            ioctls.withUnsafeBufferPointer { ioctlBuffer in
                fl_seccomp_install(
                    namesBuffer.baseAddress, Int32(namesBuffer.count), ioctlBuffer.baseAddress, Int32(ioctlBuffer.count), vsock ? 1 : 0,
                    Int32(logOnly ? FL_SECCOMP_LOG.rawValue : FL_SECCOMP_KILL_PROCESS.rawValue), &failedName)
            }
        }
        guard result == 0 else {
            let what = failedName.map { "seccomp (unknown system call \(String(cString: $0)))" } ?? "seccomp"
            throw SyscallError(what, Errno(rawValue: -result))
        }
    }
}
