import Glibc
import Synchronization

/// A 16550A-compatible 8250 UART (the PC's COM1 on 0x3f8, IRQ 4), register model per the
/// National Semiconductor PC16550D data sheet, Table II "Summary of Registers".
///
/// Transmit goes to an output file descriptor (or nowhere); receive comes from
/// ``enqueueInput(_:)``. Sendable: all mutable state is inside the `Mutex`.
public final class Serial8250: Sendable {
    // Register offsets from the base port.
    static let dataRegister: UInt16 = 0  // RBR (read) / THR (write); DLL when DLAB
    static let interruptEnable: UInt16 = 1  // IER; DLM when DLAB
    static let interruptIdentification: UInt16 = 2  // IIR (read) / FCR (write)
    static let lineControl: UInt16 = 3
    static let modemControl: UInt16 = 4
    static let lineStatus: UInt16 = 5
    static let modemStatus: UInt16 = 6
    static let scratch: UInt16 = 7

    // IER bits.
    static let ierReceivedData: UInt8 = 1 << 0
    static let ierTransmitterEmpty: UInt8 = 1 << 1
    static let ierLineStatus: UInt8 = 1 << 2
    static let ierModemStatus: UInt8 = 1 << 3
    // IIR values: bit 0 set = nothing pending; bits 1–3 the source; bits 6–7 FIFOs enabled.
    static let iirNone: UInt8 = 0x01
    static let iirTransmitterEmpty: UInt8 = 0x02
    static let iirReceivedData: UInt8 = 0x04
    static let iirFIFOEnabled: UInt8 = 0xc0
    // FCR bits.
    static let fcrEnable: UInt8 = 1 << 0
    static let fcrClearReceive: UInt8 = 1 << 1
    // LCR: divisor latch access bit.
    static let lcrDLAB: UInt8 = 1 << 7
    // MCR bits.
    static let mcrDTR: UInt8 = 1 << 0
    static let mcrRTS: UInt8 = 1 << 1
    static let mcrOUT1: UInt8 = 1 << 2
    static let mcrOUT2: UInt8 = 1 << 3
    static let mcrLoop: UInt8 = 1 << 4
    // LSR bits.
    static let lsrDataReady: UInt8 = 1 << 0
    static let lsrOverrun: UInt8 = 1 << 1
    static let lsrTHREmpty: UInt8 = 1 << 5
    static let lsrTransmitterEmpty: UInt8 = 1 << 6
    // MSR bits: CTS, DSR, RI, DCD in 4–7.
    static let msrCTS: UInt8 = 1 << 4
    static let msrDSR: UInt8 = 1 << 5
    static let msrRI: UInt8 = 1 << 6
    static let msrDCD: UInt8 = 1 << 7

    /// Bytes held for the guest to read; input beyond this is refused (the caller retries).
    public static let inputCapacity = 1024

    struct State {
        var ier: UInt8 = 0
        var lcr: UInt8 = 0x03  // 8 data bits, as after a BIOS
        var mcr: UInt8 = Serial8250.mcrOUT2
        var scr: UInt8 = 0
        var dll: UInt8 = 0x0c  // 9600 baud from the 1.8432 MHz clock
        var dlm: UInt8 = 0
        var fifoEnabled = false
        var overrun = false
        /// A THR-empty interrupt is pending (cleared by reading IIR or writing THR).
        var thrEmptyPending = false
        var input = ByteRing(capacity: Serial8250.inputCapacity)

        var dataReady: Bool { !input.isEmpty }

        /// IIR: the highest-priority pending interrupt source (RDA above THRE).
        var identification: UInt8 {
            let fifo = fifoEnabled ? Serial8250.iirFIFOEnabled : 0
            if ier & Serial8250.ierReceivedData != 0, dataReady { return Serial8250.iirReceivedData | fifo }
            if ier & Serial8250.ierTransmitterEmpty != 0, thrEmptyPending { return Serial8250.iirTransmitterEmpty | fifo }
            return Serial8250.iirNone | fifo
        }

        var lineStatus: UInt8 {
            var value = Serial8250.lsrTHREmpty | Serial8250.lsrTransmitterEmpty
            if dataReady { value |= Serial8250.lsrDataReady }
            if overrun { value |= Serial8250.lsrOverrun }
            return value
        }

        var modemStatus: UInt8 {
            if mcr & Serial8250.mcrLoop != 0 {
                // Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (PC16550D "Modem Control Register").
                var value: UInt8 = 0
                if mcr & Serial8250.mcrRTS != 0 { value |= Serial8250.msrCTS }
                if mcr & Serial8250.mcrDTR != 0 { value |= Serial8250.msrDSR }
                if mcr & Serial8250.mcrOUT1 != 0 { value |= Serial8250.msrRI }
                if mcr & Serial8250.mcrOUT2 != 0 { value |= Serial8250.msrDCD }
                return value
            }
            // A connected terminal: carrier, data set ready, clear to send.
            return Serial8250.msrDCD | Serial8250.msrDSR | Serial8250.msrCTS
        }
    }

    private let state = Mutex(State())
    private let outputFD: Int32?
    public let interrupt: InterruptLine

    public init(output: Int32?, interrupt: InterruptLine) {
        self.outputFD = output
        self.interrupt = interrupt
    }

    /// A guest read of register `offset` (0–7).
    public func read(offset: UInt16) -> UInt8 {
        state.withLock { s in
            switch offset {
            case Serial8250.dataRegister:
                if s.lcr & Serial8250.lcrDLAB != 0 { return s.dll }
                s.overrun = false
                return s.input.pop() ?? 0
            case Serial8250.interruptEnable:
                return s.lcr & Serial8250.lcrDLAB != 0 ? s.dlm : s.ier
            case Serial8250.interruptIdentification:
                let value = s.identification
                // Reading IIR while it reports THRE clears that interrupt.
                if value & 0x0f == Serial8250.iirTransmitterEmpty { s.thrEmptyPending = false }
                return value
            case Serial8250.lineControl: return s.lcr
            case Serial8250.modemControl: return s.mcr
            case Serial8250.lineStatus: return s.lineStatus
            case Serial8250.modemStatus: return s.modemStatus
            case Serial8250.scratch: return s.scr
            default: return 0xff
            }
        }
    }

    /// A guest write of `value` to register `offset` (0–7).
    public func write(offset: UInt16, value: UInt8) {
        var transmit: UInt8? = nil
        let raise = state.withLock { s -> Bool in
            switch offset {
            case Serial8250.dataRegister:
                if s.lcr & Serial8250.lcrDLAB != 0 {
                    s.dll = value
                    return false
                }
                if s.mcr & Serial8250.mcrLoop != 0 {
                    // Loopback: the byte comes straight back to the receiver.
                    if !s.input.push(value) { s.overrun = true }
                } else {
                    transmit = value
                }
                // Transmission is instantaneous, so THR is empty again at once.
                s.thrEmptyPending = true
                return s.ier & Serial8250.ierTransmitterEmpty != 0
                    || (s.mcr & Serial8250.mcrLoop != 0 && s.ier & Serial8250.ierReceivedData != 0)
            case Serial8250.interruptEnable:
                if s.lcr & Serial8250.lcrDLAB != 0 {
                    s.dlm = value
                    return false
                }
                let enabledTHRE = value & Serial8250.ierTransmitterEmpty != 0 && s.ier & Serial8250.ierTransmitterEmpty == 0
                let enabledRDA = value & Serial8250.ierReceivedData != 0 && s.ier & Serial8250.ierReceivedData == 0
                s.ier = value & 0x0f
                // Enabling THRE while THR is empty raises the interrupt at once (Linux's 8250
                // driver relies on this to start transmission).
                if enabledTHRE { s.thrEmptyPending = true }
                return enabledTHRE || (enabledRDA && s.dataReady)
            case Serial8250.interruptIdentification:
                s.fifoEnabled = value & Serial8250.fcrEnable != 0
                if value & Serial8250.fcrClearReceive != 0 { s.input.removeAll() }
                return false
            case Serial8250.lineControl:
                s.lcr = value
                return false
            case Serial8250.modemControl:
                s.mcr = value & 0x1f
                return false
            case Serial8250.scratch:
                s.scr = value
                return false
            default:
                // LSR and MSR are read-only.
                return false
            }
        }
        if let transmit, let outputFD {
            var byte = transmit
            // Output errors (a closed terminal) must not stop the guest; the byte is dropped.
            _ = try? withUnsafeBytes(of: &byte) { try Syscall.writeAll(outputFD, $0) }
        }
        if raise { interrupt.pulse() }
    }

    /// Queues host input for the guest; returns how many bytes were accepted (the rest
    /// should be offered again later). Raises the received-data interrupt when enabled.
    @discardableResult
    public func enqueueInput(_ bytes: some Collection<UInt8>) -> Int {
        let (accepted, raise) = state.withLock { s -> (Int, Bool) in
            var count = 0
            for byte in bytes {
                guard s.input.push(byte) else { break }
                count += 1
            }
            let enabled = s.ier & Serial8250.ierReceivedData != 0
            return (count, count > 0 && enabled)
        }
        if raise { interrupt.pulse() }
        return accepted
    }

    /// Free space for input (the main loop may stop reading stdin while this is 0).
    public var inputSpace: Int {
        state.withLock { Serial8250.inputCapacity - $0.input.count }
    }
}

/// A fixed-capacity FIFO of bytes.
struct ByteRing {
    private var storage: [UInt8]
    private var head = 0
    private(set) var count = 0

    init(capacity: Int) {
        storage = [UInt8](repeating: 0, count: capacity)
    }

    var isEmpty: Bool { count == 0 }

    mutating func push(_ byte: UInt8) -> Bool {
        guard count < storage.count else { return false }
        storage[(head + count) % storage.count] = byte
        count += 1
        return true
    }

    mutating func pop() -> UInt8? {
        guard count > 0 else { return nil }
        let byte = storage[head]
        head = (head + 1) % storage.count
        count -= 1
        return byte
    }

    mutating func removeAll() {
        head = 0
        count = 0
    }
}
