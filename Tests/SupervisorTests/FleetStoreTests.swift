import FlotillaTestSupport
import Foundation
import Glibc
import Protocol
import Supervisor
import Testing

@Suite("fleet store and VM documents")
struct FleetStoreTests {
    func record(_ name: String, restart: RestartPolicy = .onFailure) throws -> VMRecord {
        try VMRecord(document: guestConfig(kernel: "/boot/guest.vmlinux"), name: name, source: "test")
    }

    @Test("a saved VM loads back equal, with its supervisor fields in the same document")
    func roundTrip() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let store = try FleetStore(stateDirectory: directory.path)
        var first = try record("web-1")
        first.autostart = true
        first.restart = .always
        try store.save(first)
        try store.save(try record("db_2"))
        let loaded = store.load()
        #expect(loaded.problems.isEmpty)
        #expect(loaded.records.map(\.name) == ["db_2", "web-1"])
        #expect(loaded.records.last == first)
        let text = try #require(readText(directory.file("vms/web-1.json")))
        let document = try JSONValue.parse(text).objectValue
        #expect(document?["autostart"] == true)
        #expect(document?["restart"] == "always")
        #expect(document?["boot-source"]?.objectValue?["kernel_image_path"] == "/boot/guest.vmlinux")
        // Only the documents remain: no temporary files, and the directory is private.
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.file("vms")).sorted() == ["db_2.json", "web-1.json"])
        var info = stat()
        #expect(stat(directory.file("vms/web-1.json"), &info) == 0 && info.st_mode & 0o777 == 0o600)
    }

    @Test("a crash mid-write leaves the old document: a torn temporary file is ignored and replaced")
    func tornWrite() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let store = try FleetStore(stateDirectory: directory.path)
        let original = try record("vm")
        try store.save(original)
        // What a crash between write and rename leaves behind.
        try Data("{\"boot-source\": {\"kernel_ima".utf8).write(to: URL(fileURLWithPath: directory.file("vms/.vm.json.tmp")))
        let loaded = store.load()
        #expect(loaded.records == [original])
        #expect(loaded.problems.isEmpty)
        var changed = original
        changed.restart = .never
        try store.save(changed)
        #expect(store.load().records == [changed])
        #expect(!FileManager.default.fileExists(atPath: directory.file("vms/.vm.json.tmp")))
        try store.delete("vm")
        #expect(store.load().records.isEmpty)
    }

    @Test("an unreadable document is reported by path and does not hide the others")
    func badDocument() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let store = try FleetStore(stateDirectory: directory.path)
        try store.save(try record("good"))
        try Data("{not json".utf8).write(to: URL(fileURLWithPath: directory.file("vms/bad.json")))
        let loaded = store.load()
        #expect(loaded.records.map(\.name) == ["good"])
        #expect(loaded.problems.count == 1)
        #expect(loaded.problems.first?.contains("vms/bad.json") == true)
    }

    @Test(
        "documents with bad supervisor fields or configuration name the field, the value and what is allowed",
        arguments: [
            ("restart", JSONValue.string("sometimes"), "restart: \"sometimes\" is not allowed; allowed: never, on-failure, always"),
            ("autostart", JSONValue.string("yes"), "autostart: \"yes\" is not allowed; allowed: true or false"),
            ("serial", JSONValue(dictionaryLiteral: ("stdio", true)), "serial.stdio: true is not allowed"),
            ("name", JSONValue.string("other"), "'name' 'other' differs from the VM name 'vm'"),
        ])
    func badFields(key: String, value: JSONValue, message: String) throws {
        var document = guestConfig().objectValue ?? JSONObject()
        document[key] = value
        #expect {
            _ = try VMRecord(document: .object(document), name: "vm", source: "vm.json")
        } throws: { error in
            (error as? SupervisorError)?.message.contains(message) == true && (error as? SupervisorError)?.code == .invalidArgument
        }
    }

    @Test("VM names are checked", arguments: ["", "-x", "a/b", "a b", String(repeating: "n", count: 65), "../etc"])
    func badNames(name: String) throws {
        #expect(throws: SupervisorError.self) { try VMRecord.checkName(name) }
    }

    @Test("good VM names pass", arguments: ["a", "web-1", "db_2.prod", String(repeating: "n", count: 64)])
    func goodNames(name: String) throws {
        try VMRecord.checkName(name)
    }

    @Test("a configuration error from the StratoVirt schema keeps its field name")
    func configError() throws {
        var document = guestConfig().objectValue ?? JSONObject()
        document["machine-config"] = ["vcpu_count": 0, "mem_size": .integer(256 << 20)]
        #expect {
            _ = try VMRecord(document: .object(document), name: "vm", source: "vm.json")
        } throws: { error in
            let message = (error as? SupervisorError)?.message ?? ""
            return message.contains("vcpu_count") && message.contains("vm.json")
        }
    }
}
