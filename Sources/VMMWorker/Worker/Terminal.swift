import Glibc

/// Standard input in raw mode for `-serial stdio`, restored by ``restore()`` on every exit
/// path the process survives. Output processing stays on, so a guest's bare "\n" still
/// starts a new line on the host terminal.
final class RawTerminal: Sendable {
    private let saved: termios?

    init() {
        guard isatty(0) == 1 else {
            saved = nil
            return
        }
        var original = termios()
        guard tcgetattr(0, &original) == 0 else {
            saved = nil
            return
        }
        var raw = original
        // Every key goes to the guest as typed: no line editing, echo or signal keys
        // (as StratoVirt's and QEMU's stdio serial do).
        raw.c_iflag &= ~tcflag_t(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON)
        raw.c_lflag &= ~tcflag_t(ECHO | ECHONL | ICANON | ISIG | IEXTEN)
        raw.c_cflag &= ~tcflag_t(CSIZE | PARENB)
        raw.c_cflag |= tcflag_t(CS8)
        withUnsafeMutableBytes(of: &raw.c_cc) { cc in
            cc[Int(VMIN)] = 1
            cc[Int(VTIME)] = 0
        }
        saved = tcsetattr(0, TCSANOW, &raw) == 0 ? original : nil
    }

    func restore() {
        guard var saved else { return }
        _ = tcsetattr(0, TCSANOW, &saved)
    }
}
