import Synchronization

/// Enough of the i8042 keyboard controller (IBM PC/AT "8042" interface: data port 0x60,
/// status/command port 0x64) for Linux's i8042 probe and `reboot=k`: command 0xfe pulses
/// the CPU reset line, which ends the VM as a guest reset.
///
/// No keyboard or mouse is attached: device commands are answered with 0xfe (resend / no
/// device), so probes fail quickly instead of waiting. Sendable: state is in the `Mutex`.
public final class I8042: Sendable {
    // Status register bits.
    static let statusOutputFull: UInt8 = 1 << 0
    static let statusInputFull: UInt8 = 1 << 1
    static let statusSystemFlag: UInt8 = 1 << 2
    static let statusCommand: UInt8 = 1 << 3
    static let statusAuxData: UInt8 = 1 << 5

    // Controller commands written to 0x64.
    static let commandReadCTR: UInt8 = 0x20
    static let commandWriteCTR: UInt8 = 0x60
    static let commandDisableAux: UInt8 = 0xa7
    static let commandEnableAux: UInt8 = 0xa8
    static let commandTestAux: UInt8 = 0xa9
    static let commandSelfTest: UInt8 = 0xaa
    static let commandTestKeyboard: UInt8 = 0xab
    static let commandDisableKeyboard: UInt8 = 0xad
    static let commandEnableKeyboard: UInt8 = 0xae
    static let commandReadOutputPort: UInt8 = 0xd0
    static let commandWriteOutputPort: UInt8 = 0xd1
    static let commandWriteAux: UInt8 = 0xd4
    static let commandPulseReset: UInt8 = 0xfe

    // Controller configuration byte (CTR) bits.
    static let ctrKeyboardInterrupt: UInt8 = 1 << 0
    static let ctrAuxInterrupt: UInt8 = 1 << 1
    static let ctrSystemFlag: UInt8 = 1 << 2
    static let ctrKeyboardDisabled: UInt8 = 1 << 4
    static let ctrAuxDisabled: UInt8 = 1 << 5
    static let ctrTranslate: UInt8 = 1 << 6

    struct State {
        var status: UInt8 = I8042.statusSystemFlag
        var ctr: UInt8 = I8042.ctrSystemFlag | I8042.ctrTranslate | I8042.ctrKeyboardDisabled | I8042.ctrAuxDisabled
        var output: UInt8 = 0
        /// The controller command whose data byte is expected on port 0x60.
        var pendingCommand: UInt8? = nil

        mutating func respond(_ byte: UInt8, aux: Bool = false) {
            output = byte
            status |= I8042.statusOutputFull
            if aux { status |= I8042.statusAuxData } else { status &= ~I8042.statusAuxData }
        }
    }

    private let state = Mutex(State())
    private let onReset: @Sendable () -> Void

    /// `onReset` runs (on the vCPU thread) when the guest pulses the reset line.
    public init(onReset: @escaping @Sendable () -> Void) {
        self.onReset = onReset
    }

    public func read(port: UInt16) -> UInt8 {
        state.withLock { s in
            if port == Layout.i8042CommandPort { return s.status }
            let value = s.output
            s.status &= ~(I8042.statusOutputFull | I8042.statusAuxData)
            return value
        }
    }

    public func write(port: UInt16, value: UInt8) {
        let reset = state.withLock { s -> Bool in
            if port == Layout.i8042CommandPort {
                s.status |= I8042.statusCommand
                switch value {
                case I8042.commandReadCTR: s.respond(s.ctr)
                case I8042.commandWriteCTR, I8042.commandWriteOutputPort, I8042.commandWriteAux: s.pendingCommand = value
                case I8042.commandDisableAux: s.ctr |= I8042.ctrAuxDisabled
                case I8042.commandEnableAux: s.ctr &= ~I8042.ctrAuxDisabled
                case I8042.commandDisableKeyboard: s.ctr |= I8042.ctrKeyboardDisabled
                case I8042.commandEnableKeyboard: s.ctr &= ~I8042.ctrKeyboardDisabled
                case I8042.commandSelfTest: s.respond(0x55)  // "controller OK"
                case I8042.commandTestKeyboard, I8042.commandTestAux: s.respond(0x00)  // "interface OK"
                case I8042.commandReadOutputPort: s.respond(0x01)  // reset line high (not asserted)
                case I8042.commandPulseReset: return true
                default: break
                }
                return false
            }
            s.status &= ~I8042.statusCommand
            switch s.pendingCommand {
            case I8042.commandWriteCTR?:
                s.ctr = value
                s.pendingCommand = nil
            case I8042.commandWriteOutputPort?:
                s.pendingCommand = nil
                // Output port bit 0 low asserts the CPU reset line.
                if value & 1 == 0 { return true }
            case I8042.commandWriteAux?:
                s.pendingCommand = nil
                s.respond(0xfe, aux: true)  // no mouse
            default:
                s.respond(0xfe)  // no keyboard
            }
            return false
        }
        if reset { onReset() }
    }
}
