import CKVM
import Glibc
import SystemPackage

/// A KVM capability this VMM relies on (api.rst section 8 and KVM_CHECK_EXTENSION, 4.4).
public struct KVMCapability: Sendable, CustomStringConvertible {
    public let name: String
    public let number: Int32

    public var description: String { name }

    /// Everything MicroVM uses: in-kernel IRQ chip and PIT, user memory slots, eventfd
    /// fast paths, immediate_exit kicks, the x86 TSS/identity-map set-up, CPUID2, MP state.
    public static let required: [KVMCapability] = [
        KVMCapability(name: "KVM_CAP_IRQCHIP", number: KVM_CAP_IRQCHIP),
        KVMCapability(name: "KVM_CAP_PIT2", number: KVM_CAP_PIT2),
        KVMCapability(name: "KVM_CAP_USER_MEMORY", number: KVM_CAP_USER_MEMORY),
        KVMCapability(name: "KVM_CAP_SET_TSS_ADDR", number: KVM_CAP_SET_TSS_ADDR),
        KVMCapability(name: "KVM_CAP_SET_IDENTITY_MAP_ADDR", number: KVM_CAP_SET_IDENTITY_MAP_ADDR),
        KVMCapability(name: "KVM_CAP_EXT_CPUID", number: KVM_CAP_EXT_CPUID),
        KVMCapability(name: "KVM_CAP_MP_STATE", number: KVM_CAP_MP_STATE),
        KVMCapability(name: "KVM_CAP_IOEVENTFD", number: KVM_CAP_IOEVENTFD),
        KVMCapability(name: "KVM_CAP_IRQFD", number: KVM_CAP_IRQFD),
        KVMCapability(name: "KVM_CAP_IMMEDIATE_EXIT", number: KVM_CAP_IMMEDIATE_EXIT),
    ]
}

/// `/dev/kvm`: API version and capability checks, system-wide queries, VM creation.
///
/// Sendable: the only stored state is the immutable descriptor, closed in `deinit`.
public final class KVMSystem: Sendable {
    /// KVM_GET_API_VERSION must return 12 (api.rst 4.1: "the only stable API version").
    public static let expectedAPIVersion: Int32 = 12
    public static let devicePath = "/dev/kvm"

    let fd: Int32

    /// Whether this process can open /dev/kvm (for test gating and clear errors).
    public static var isAvailable: Bool {
        let fd = Glibc.open(devicePath, O_RDWR | O_CLOEXEC)
        if fd < 0 { return false }
        Syscall.close(fd)
        return true
    }

    /// Opens /dev/kvm and checks the API version and every capability in
    /// ``KVMCapability/required``.
    public init(path: String = KVMSystem.devicePath) throws {
        let opened: Int32
        do {
            opened = try Syscall.retrying("open(/dev/kvm)") { Glibc.open(path, O_RDWR | O_CLOEXEC) }
        } catch {
            throw KVMError(.unavailable, "cannot open \(path) (is KVM enabled and accessible?)", cause: error)
        }
        fd = opened
        let version = try Syscall.once("KVM_GET_API_VERSION") { fl_ioctl_val(opened, FL_KVM_GET_API_VERSION, 0) }
        guard version == KVMSystem.expectedAPIVersion else {
            throw KVMError(.apiVersion, "\(path) reports KVM API version \(version); version \(KVMSystem.expectedAPIVersion) is required")
        }
        for capability in KVMCapability.required where try checkExtension(capability.number) <= 0 {
            throw KVMError(.missingCapability, "\(path) lacks \(capability.name), which flotilla-vmm requires")
        }
    }

    deinit { Syscall.close(fd) }

    /// KVM_CHECK_EXTENSION (api.rst 4.4): 0 = unsupported, > 0 = supported (sometimes a count).
    public func checkExtension(_ capability: Int32) throws -> Int32 {
        try Syscall.once("KVM_CHECK_EXTENSION") { fl_ioctl_val(fd, FL_KVM_CHECK_EXTENSION, UInt(capability)) }
    }

    /// KVM_GET_VCPU_MMAP_SIZE (api.rst 4.5): bytes to mmap from a vCPU fd for `struct kvm_run`.
    public func vcpuMmapSize() throws -> Int {
        Int(try Syscall.once("KVM_GET_VCPU_MMAP_SIZE") { fl_ioctl_val(fd, FL_KVM_GET_VCPU_MMAP_SIZE, 0) })
    }

    /// KVM_CAP_NR_VCPUS: the recommended vCPU maximum; KVM_CAP_MAX_VCPUS: the hard one.
    public func maxVCPUs() throws -> Int {
        let hard = try checkExtension(KVM_CAP_MAX_VCPUS)
        return Int(hard > 0 ? hard : try checkExtension(KVM_CAP_NR_VCPUS))
    }

    /// KVM_GET_SUPPORTED_CPUID (api.rst 4.46), retried with a larger buffer on E2BIG.
    public func supportedCPUID() throws -> [CPUIDEntry] {
        var capacity: UInt32 = 128
        while true {
            var raw = [kvm_cpuid_entry2](repeating: kvm_cpuid_entry2(), count: Int(capacity))
            let count = raw.withUnsafeMutableBufferPointer { buffer in
                fl_kvm_get_supported_cpuid(fd, buffer.baseAddress, capacity)
            }
            if count >= 0 {
                return raw.prefix(Int(count)).map(CPUIDEntry.init)
            }
            let code = Glibc.errno
            if code == E2BIG, capacity < 4096 {
                capacity *= 2
                continue
            }
            throw KVMError(
                .ioctl, "cannot read the host's supported CPUID", cause: SyscallError("KVM_GET_SUPPORTED_CPUID", Errno(rawValue: code)))
        }
    }

    /// KVM_CREATE_VM (api.rst 4.2) with the default machine type.
    public func createVM() throws -> VirtualMachine {
        let vmFD = try Syscall.retrying("KVM_CREATE_VM") { fl_ioctl_val(fd, FL_KVM_CREATE_VM, 0) }
        return VirtualMachine(fd: vmFD, system: self)
    }
}
