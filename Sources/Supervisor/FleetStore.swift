import Glibc
import Protocol

/// The fleet on disk: one JSON document per VM in `<state-dir>/vms/<name>.json`. Writes go to
/// a temporary file that is fsynced, renamed over the document and the directory fsynced, so
/// a crash at any point leaves either the old or the new document, never a torn one.
public struct FleetStore: Sendable {
    public let directory: String

    public init(stateDirectory: String) throws(SystemCallError) {
        directory = stateDirectory + "/vms"
        try Sys.makeDirectories(directory, mode: 0o700)
    }

    func path(_ name: String) -> String { "\(directory)/\(name).json" }

    /// Every stored VM; documents that cannot be read are reported, not fatal.
    public func load() -> (records: [VMRecord], problems: [String]) {
        guard let handle = opendir(directory) else { return ([], ["cannot read \(directory): \(Sys.errorText(errno))"]) }
        defer { closedir(handle) }
        var names: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name.hasSuffix(".json") && !name.hasPrefix(".") { names.append(name) }
        }
        var records: [VMRecord] = []
        var problems: [String] = []
        for file in names.sorted() {
            let path = "\(directory)/\(file)"
            guard let bytes = Sys.readFile(path) else {
                problems.append("cannot read \(path): \(Sys.errorText(errno))")
                continue
            }
            do {
                let value = try JSONValue.parse(bytes: bytes)
                let record = try VMRecord(document: value, name: String(file.dropLast(5)), source: path)
                records.append(record)
            } catch let error as JSONSyntaxError {
                problems.append("\(path): \(error)")
            } catch {
                problems.append("\(error)")
            }
        }
        return (records, problems)
    }

    /// Writes `record` atomically (temporary file, fsync, rename, fsync of the directory).
    public func save(_ record: VMRecord) throws(SystemCallError) {
        let target = path(record.name)
        let temporary = "\(directory)/.\(record.name).json.tmp"
        let bytes = Array((record.document.prettyText() + "\n").utf8)
        let fd = try Sys.retrying("open \(temporary)") { open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o600) }
        do throws(SystemCallError) {
            try Sys.writeAll(fd, bytes, operation: "write \(temporary)")
            _ = try Sys.retrying("fsync \(temporary)") { fsync(fd) }
        } catch {
            Sys.close(fd)
            _ = unlink(temporary)
            throw error
        }
        Sys.close(fd)
        do throws(SystemCallError) {
            _ = try Sys.once("rename \(temporary) to \(target)") { rename(temporary, target) }
        } catch {
            _ = unlink(temporary)
            throw error
        }
        try syncDirectory()
    }

    public func delete(_ name: String) throws(SystemCallError) {
        let target = path(name)
        if unlink(target) != 0 && errno != ENOENT {
            throw SystemCallError("unlink \(target)", .init(rawValue: errno))
        }
        try syncDirectory()
    }

    private func syncDirectory() throws(SystemCallError) {
        let fd = try Sys.retrying("open \(directory)") { open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        defer { Sys.close(fd) }
        _ = try Sys.retrying("fsync \(directory)") { fsync(fd) }
    }
}
