import CKVM
import Glibc

/// The exit loop of one vCPU, run on that vCPU's own thread (api.rst 4.10 KVM_RUN and 5.
/// "The kvm_run structure"). Port and MMIO exits go to the buses; everything that ends the
/// vCPU becomes an ``VMExitReason``.
struct VCPURunner {
    let vcpu: VirtualCPU
    let ports: PortIOBus
    let mmio: MMIOBus
    let memory: GuestMemory
    let control: MachineControl

    /// Runs until the VM stops. Returns nil when the vCPU stopped on request, else why the
    /// guest (or KVM) ended it.
    func run() -> VMExitReason? {
        let run = vcpu.run
        let raw = UnsafeMutableRawPointer(run)
        let runSize = vcpu.runSize
        while true {
            if control.pending.load(ordering: .acquiring) != 0 {
                if control.parkIfRequested() { return nil }
            }
            let result = vcpu.runOnce()
            if result != 0 {
                if result == -EINTR {
                    // Kicked (immediate_exit or the kick signal): clear and look at the request.
                    vcpu.setImmediateExit(false)
                    continue
                }
                // An AP's KVM_RUN returns EAGAIN when it receives INIT/SIPI; run it again.
                if result == -EAGAIN { continue }
                return .failed("vCPU \(vcpu.index): KVM_RUN failed with errno \(-result) (\(String(cString: strerror(-result))))")
            }
            switch fl_run_exit_reason(run) {
            case UInt32(KVM_EXIT_IO):
                let size = Int(fl_run_io_size(run))
                let count = Int(fl_run_io_count(run))
                let offset = fl_run_io_data_offset(run)
                // The data lives inside the kvm_run mapping; never trust it blindly.
                guard size == 1 || size == 2 || size == 4, count >= 1, offset <= UInt64(runSize),
                    count <= (runSize - Int(offset)) / size
                else {
                    return .failed("vCPU \(vcpu.index): malformed KVM_EXIT_IO (size \(size), count \(count), data offset \(offset))")
                }
                let isWrite = fl_run_io_direction(run) == UInt8(KVM_EXIT_IO_OUT)
                let port = fl_run_io_port(run)
                var data = raw + Int(offset)
                for _ in 0..<count {
                    ports.access(port: port, size: size, isWrite: isWrite, data: data)
                    data += size
                }
            case UInt32(KVM_EXIT_MMIO):
                let length = Int(min(fl_run_mmio_len(run), 8))
                guard let data = fl_run_mmio_data(run) else { continue }
                mmio.access(
                    address: fl_run_mmio_phys_addr(run), length: length, isWrite: fl_run_mmio_is_write(run) != 0,
                    data: UnsafeMutableRawPointer(data))
            case UInt32(KVM_EXIT_INTR):
                continue
            case UInt32(KVM_EXIT_HLT):
                // Only reachable without the in-kernel LAPIC: a halted CPU with nothing to
                // wake it is a powered-off machine.
                return .guestShutdown
            case UInt32(KVM_EXIT_SHUTDOWN):
                // The guest triple-faulted (api.rst: "KVM_EXIT_SHUTDOWN ... typically a triple fault").
                return .failed(describe("triple fault (KVM_EXIT_SHUTDOWN)"))
            case UInt32(KVM_EXIT_SYSTEM_EVENT):
                switch Int32(fl_run_system_event_type(run)) {
                case KVM_SYSTEM_EVENT_SHUTDOWN: return .guestShutdown
                case KVM_SYSTEM_EVENT_RESET: return .guestReset
                case let type: return .failed(describe("KVM_EXIT_SYSTEM_EVENT type \(type)"))
                }
            case UInt32(KVM_EXIT_INTERNAL_ERROR):
                let suberror = fl_run_internal_suberror(run)
                let ndata = min(fl_run_internal_ndata(run), 16)
                let data = (0..<ndata).map { hex(fl_run_internal_data(run, $0)) }.joined(separator: " ")
                let kind =
                    switch Int32(suberror) {
                    case KVM_INTERNAL_ERROR_EMULATION: "emulation failure (an instruction KVM cannot emulate)"
                    case KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions"
                    case KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failure"
                    case KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason"
                    default: "unknown"
                    }
                return .failed(describe("KVM internal error (KVM_EXIT_INTERNAL_ERROR), suberror \(suberror): \(kind); data [\(data)]"))
            case UInt32(KVM_EXIT_FAIL_ENTRY):
                return .failed(describe("VM entry failed (KVM_EXIT_FAIL_ENTRY), hardware reason \(hex(fl_run_fail_entry_reason(run)))"))
            case let reason:
                return .failed(describe("unexpected KVM exit reason \(reason)"))
            }
        }
    }

    /// `title`, the registers, and the instruction bytes at RIP.
    func describe(_ title: String) -> String {
        var text = "vCPU \(vcpu.index): \(title)"
        guard let regs = try? vcpu.getRegisters(), let sregs = try? vcpu.getSpecialRegisters() else {
            return text + "; registers unavailable"
        }
        text += "\n" + VCPUDiagnostics.registerDump(regs, sregs)
        let linear = sregs.cs.base &+ regs.rip
        if let physical = VCPUDiagnostics.translate(linear, sregs: sregs, memory: memory) {
            var bytes: [UInt8] = []
            for i in 0..<UInt64(16) {
                guard let byte = try? memory.read(UInt8.self, at: physical &+ i) else { break }
                bytes.append(byte)
            }
            let rendered = bytes.map { byte in
                let digits = String(byte, radix: 16)
                return digits.count == 1 ? "0" + digits : digits
            }.joined(separator: " ")
            text += "\ncode at RIP (guest-physical \(hex(physical))): \(rendered.isEmpty ? "not in guest RAM" : rendered)"
        } else {
            text += "\ncode at RIP: linear address \(hex(linear)) is not mapped to guest RAM"
        }
        return text
    }
}

/// Register dumps and guest page-table walks for error reports.
enum VCPUDiagnostics {
    static func registerDump(_ r: kvm_regs, _ s: kvm_sregs) -> String {
        func h(_ v: UInt64) -> String {
            let digits = String(v, radix: 16)
            return "0x" + String(repeating: "0", count: max(0, 16 - digits.count)) + digits
        }
        func seg(_ name: String, _ g: kvm_segment) -> String {
            "\(name)=\(hex(g.selector)) base=\(hex(g.base)) limit=\(hex(g.limit)) type=\(g.type) l=\(g.l) db=\(g.db)"
        }
        return """
            RIP=\(h(r.rip)) RSP=\(h(r.rsp)) RFLAGS=\(h(r.rflags))
            RAX=\(h(r.rax)) RBX=\(h(r.rbx)) RCX=\(h(r.rcx)) RDX=\(h(r.rdx))
            RSI=\(h(r.rsi)) RDI=\(h(r.rdi)) RBP=\(h(r.rbp)) R8=\(h(r.r8))
            R9=\(h(r.r9)) R10=\(h(r.r10)) R11=\(h(r.r11)) R12=\(h(r.r12))
            R13=\(h(r.r13)) R14=\(h(r.r14)) R15=\(h(r.r15))
            CR0=\(h(s.cr0)) CR2=\(h(s.cr2)) CR3=\(h(s.cr3)) CR4=\(h(s.cr4)) EFER=\(h(s.efer))
            \(seg("CS", s.cs)) \(seg("SS", s.ss))
            GDT=\(hex(s.gdt.base))/\(hex(s.gdt.limit)) IDT=\(hex(s.idt.base))/\(hex(s.idt.limit))
            """
    }

    /// Guest-physical address of `linear`: through the 4-level page tables when long-mode
    /// paging is on (SDM vol. 3A 4.5, 4 KiB / 2 MiB / 1 GiB pages), identity otherwise.
    /// nil when a table entry is not present or lies outside guest RAM.
    static func translate(_ linear: UInt64, sregs: kvm_sregs, memory: GuestMemory) -> UInt64? {
        let paging = sregs.cr0 & (1 << 31) != 0
        guard paging else { return linear }
        let longMode = sregs.efer & (1 << 10) != 0
        guard longMode, sregs.cr4 & (1 << 12) == 0 else {
            // 32-bit/PAE paging or 5-level paging: not walked; try identity.
            return linear
        }
        let addressMask: UInt64 = 0x000f_ffff_ffff_f000
        var table = sregs.cr3 & addressMask
        // PML4 (bits 47:39), PDPT (38:30), PD (29:21), PT (20:12).
        for (level, shift) in [(4, UInt64(39)), (3, 30), (2, 21), (1, 12)] {
            let index = (linear >> shift) & 0x1ff
            guard let entry = try? memory.read(UInt64.self, at: table + index * 8), entry & 1 != 0 else { return nil }
            let isLarge = (level == 3 || level == 2) && entry & (1 << 7) != 0
            if isLarge || level == 1 {
                let pageMask = (UInt64(1) << shift) - 1
                return (entry & addressMask & ~pageMask) | (linear & pageMask)
            }
            table = entry & addressMask
        }
        return nil
    }
}
