import CSystemd
import Glibc

/// The service manager's side channel (sd_notify): READY=1, STATUS=, WATCHDOG=1, STOPPING=1.
/// Without NOTIFY_SOCKET every call is a no-op, as libsystemd defines it.
public enum ServiceNotifier {
    /// Sends `state` ("READY=1\nSTATUS=..."); returns false when it could not be delivered.
    @discardableResult
    public static func notify(_ state: String) -> Bool {
        fl_sd_notify(state) >= 0
    }

    /// The watchdog interval the service manager set (WatchdogSec=, as WATCHDOG_USEC), in
    /// seconds, or nil when no watchdog pings are expected.
    public static var watchdogInterval: Double? {
        var usec: UInt64 = 0
        guard fl_sd_watchdog_usec(&usec) > 0, usec > 0 else { return nil }
        return Double(usec) / 1_000_000
    }
}

/// Where flotillad's log entries go.
public enum LogTarget: String, Sendable, CaseIterable {
    /// The journal when flotillad runs under systemd (JOURNAL_STREAM set), stderr otherwise.
    case auto
    case journal
    case stderr
}

/// Syslog priorities (the journal's PRIORITY field).
public enum LogPriority: Int, Sendable {
    case error = 3
    case warning = 4
    case notice = 5
    case info = 6
    case debug = 7

    var label: String {
        switch self {
        case .error: "error"
        case .warning: "warning"
        case .notice: "notice"
        case .info: "info"
        case .debug: "debug"
        }
    }
}

/// flotillad's log: structured journal entries (MESSAGE, PRIORITY, VM_NAME, VM_PID and event
/// fields) through libsystemd, or one plain line per entry on stderr.
public final class SupervisorLog {
    public let useJournal: Bool

    public init(target: LogTarget) {
        switch target {
        case .journal: useJournal = true
        case .stderr: useJournal = false
        case .auto: useJournal = getenv("JOURNAL_STREAM") != nil
        }
    }

    /// A journal field name as journald accepts it: 1–64 characters of A–Z, 0–9 and '_',
    /// not starting with '_' (reserved for trusted fields) or a digit.
    public static func isValidFieldName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...64).contains(bytes.count), let first = bytes.first else { return false }
        guard first != UInt8(ascii: "_"), !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first) else { return false }
        return bytes.allSatisfy {
            (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0)
                || $0 == UInt8(ascii: "_")
        }
    }

    /// Logs `message` with extra `fields` (journal names, e.g. VM_NAME); names that journald
    /// would refuse are dropped here, so an entry is never lost over one bad field.
    public func log(_ priority: LogPriority, _ message: String, fields: KeyValuePairs<String, String> = [:]) {
        let valid = fields.filter { Self.isValidFieldName($0.key) && $0.key != "MESSAGE" && $0.key != "PRIORITY" }
        if useJournal {
            var entries = ["MESSAGE=\(message)", "PRIORITY=\(priority.rawValue)", "SYSLOG_IDENTIFIER=flotillad"]
            entries += valid.map { "\($0.key)=\($0.value)" }
            if send(entries) { return }
        }
        var line = "flotillad: \(priority.label): \(message)"
        let context = valid.filter { $0.key == "VM_NAME" || $0.key == "VM_PID" }
        if !context.isEmpty { line += " [" + context.map { "\($0.key)=\($0.value)" }.joined(separator: " ") + "]" }
        line += "\n"
        let bytes = Array(line.utf8)
        do {
            try Sys.writeAll(2, bytes)
        } catch {
            // stderr is gone; nothing else can be told.
        }
    }

    private func send(_ entries: [String]) -> Bool {
        // One contiguous buffer, so every field pointer stays valid for the call.
        var joined: [UInt8] = []
        var offsets: [Int] = []
        var lengths: [Int] = []
        for entry in entries {
            let bytes = Array(entry.utf8)
            offsets.append(joined.count)
            lengths.append(bytes.count)
            joined += bytes
            joined.append(0)
        }
        return joined.withUnsafeBufferPointer { buffer in
            guard let base = buffer.baseAddress else { return false }
            let raw = UnsafeRawPointer(base)
            let pointers: [UnsafePointer<CChar>?] = offsets.map { (raw + $0).assumingMemoryBound(to: CChar.self) }
            return pointers.withUnsafeBufferPointer { fields in
                lengths.withUnsafeBufferPointer { sizes in
                    fl_sd_journal_send_fields(fields.baseAddress, sizes.baseAddress, Int32(fields.count)) >= 0
                }
            }
        }
    }
}

/// Socket activation (systemd/flotillad.socket): the control socket as a listening
/// descriptor passed by the service manager (LISTEN_FDS, LISTEN_PID; sd_listen_fds), so
/// clients can connect while flotillad restarts.
enum SocketActivation {
    /// The passed control socket, or nil when flotillad was not socket-activated (it then
    /// binds the socket itself). The LISTEN_* variables are consumed either way.
    static func controlSocket(expectedPath: String) throws(SupervisorError) -> Int32? {
        let count = fl_sd_listen_fds()
        guard count >= 0 else {
            throw SupervisorError(.failed, "socket activation: cannot take the passed sockets: \(Sys.errorText(-count))")
        }
        guard count > 0 else { return nil }
        guard count == 1 else {
            throw SupervisorError(
                .failed,
                "socket activation: \(count) sockets were passed; allowed: exactly one, the control socket "
                    + "(ListenStream=\(expectedPath))")
        }
        let fd: Int32 = 3  // SD_LISTEN_FDS_START
        guard fl_sd_is_listening_unix_socket(fd, expectedPath) > 0 else {
            throw SupervisorError(
                .failed,
                "socket activation: the passed socket is not a listening Unix stream socket bound to \(expectedPath); "
                    + "allowed: ListenStream= naming <--runtime-dir>/control.sock")
        }
        return fd
    }
}
