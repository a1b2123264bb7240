import ArgumentParser
import Glibc
import Protocol
import Supervisor

/// `flotillactl console NAME`: the terminal on a VM's serial console. The worker serves the
/// console itself (`<runtime-dir>/vms/<name>/console.sock`, one client at a time, recent
/// output replayed on connect); flotillad only says where it is.
struct Console: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Attaches the terminal to a VM's serial console (ttyS0); Ctrl-] detaches.",
        discussion: """
            The console takes one client at a time; a second is refused. On connect the VM's recent \
            output (up to 16 KiB) is shown first. With --until or when standard input is not a \
            terminal, no raw mode is set and Ctrl-] is an ordinary byte.
            """)

    /// Ctrl-]: telnet's and virsh's escape.
    static let escapeByte: UInt8 = 0x1d

    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "The VM's name.") var name: String
    @Option(help: "For scripts: exit 0 as soon as TEXT appears in the console output; exit 1 if the console closes first.")
    var until: String?
    @Flag(help: "Do not send standard input to the guest; only show its output.")
    var noInput = false

    func run() throws {
        let status = try connection.execute("vm-status", ["name": .string(name)]).objectValue ?? JSONObject()
        guard let path = status["console_socket"]?.stringValue else {
            let state = status["state"]?.stringValue ?? "unknown"
            printError("flotillactl: VM '\(name)' has no console now: its worker is not running (state \(state)); start it first")
            throw ExitCode(1)
        }
        let fd: Int32
        do {
            fd = try UnixSocket.connect(path: path, blocking: true)
        } catch {
            printError("flotillactl: cannot connect to the console of VM '\(name)' at \(path): \(error)")
            throw ExitCode(1)
        }
        defer { close(fd) }
        let interactive = until == nil && !noInput && isatty(0) == 1
        var terminal: SavedTerminal?
        if interactive {
            terminal = SavedTerminal.makeRaw()
            printError("flotillactl: connected to the console of VM '\(name)'; Ctrl-] detaches\r")
        }
        defer { terminal?.restore() }
        let outcome = relay(fd, interactive: interactive)
        terminal?.restore()
        terminal = nil
        switch outcome {
        case .detached:
            printError("\nflotillactl: detached from the console of VM '\(name)'")
        case .found:
            return
        case .closed(let output):
            let busy = output.hasPrefix("flotilla-vmm: this console is in use")
            if busy {
                printError("flotillactl: the console of VM '\(name)' is in use by another client (one client at a time)")
                throw ExitCode(1)
            }
            printError("\nflotillactl: the console of VM '\(name)' closed (the VM ended)")
            if until != nil { throw ExitCode(1) }
        }
    }

    enum Outcome {
        case detached
        case found
        /// The worker closed the console; the first bytes it sent, to recognise a refusal.
        case closed(String)
    }

    private func relay(_ fd: Int32, interactive: Bool) -> Outcome {
        let wanted = until.map { Array($0.utf8) }
        var window: [UInt8] = []
        var firstBytes: [UInt8] = []
        var readInput = !noInput
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0)]
            if readInput { fds.append(pollfd(fd: 0, events: Int16(POLLIN), revents: 0)) }
            let ready = poll(&fds, nfds_t(fds.count), -1)
            if ready < 0 {
                if errno == EINTR { continue }
                return .closed("")
            }
            if fds[0].revents != 0 {
                let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if count < 0 && errno == EINTR { continue }
                guard count > 0 else { return .closed(String(decoding: firstBytes, as: UTF8.self)) }
                let bytes = buffer[0..<count]
                if firstBytes.count < 128 { firstBytes += bytes.prefix(128 - firstBytes.count) }
                writeAllBytes(1, Array(bytes))
                if let wanted {
                    window += bytes
                    if window.count > wanted.count + 4096 { window.removeFirst(window.count - wanted.count) }
                    if contains(window, wanted) { return .found }
                }
            }
            if readInput, fds.count > 1, fds[1].revents != 0 {
                let count = buffer.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
                if count < 0 && errno == EINTR { continue }
                guard count > 0 else {
                    // End of input: keep showing output.
                    readInput = false
                    continue
                }
                var bytes = Array(buffer[0..<count])
                var detach = false
                if interactive, let escape = bytes.firstIndex(of: Self.escapeByte) {
                    bytes = Array(bytes[..<escape])
                    detach = true
                }
                if !sendAll(fd, bytes) { return .closed(String(decoding: firstBytes, as: UTF8.self)) }
                if detach { return .detached }
            }
        }
    }

    private func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
        guard !needle.isEmpty else { return true }
        guard haystack.count >= needle.count else { return false }
        for start in 0...(haystack.count - needle.count) where haystack[start..<start + needle.count].elementsEqual(needle) {
            return true
        }
        return false
    }

    private func sendAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let count = bytes[offset...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { return false }
            offset += count
        }
        return true
    }

    private func writeAllBytes(_ fd: Int32, _ bytes: [UInt8]) {
        var offset = 0
        while offset < bytes.count {
            let count = bytes[offset...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { return }
            offset += count
        }
    }
}

/// The terminal's settings before raw mode, restored on the way out.
struct SavedTerminal {
    private var saved: termios

    /// Puts standard input in raw mode (no echo, no line editing, no signals from keys);
    /// nil when it is not a terminal.
    static func makeRaw() -> SavedTerminal? {
        var original = termios()
        guard tcgetattr(0, &original) == 0 else { return nil }
        var raw = original
        cfmakeraw(&raw)
        guard tcsetattr(0, TCSANOW, &raw) == 0 else { return nil }
        return SavedTerminal(saved: original)
    }

    func restore() {
        var settings = saved
        _ = tcsetattr(0, TCSANOW, &settings)
    }
}
