import Testing

@testable import Protocol

@Suite("QMP wire format")
struct QMPTests {
    @Test("commands: execute, arguments and any JSON value as id")
    func parseCommands() throws {
        let ids: [String] = ["1", "\"abc\"", "[1,{\"a\":null}]", "{\"x\":1.50}", "null", "true", "-0.5e3"]
        for id in ids {
            let text = #"{"execute": "query-status", "arguments": {"a": 1}, "id": \#(id)}"#
            let command = try QMP.parseCommand(Array(text.utf8)).get()
            #expect(command.name == "query-status")
            #expect(command.arguments["a"] == 1)
            let expectedID = try JSONValue.parse(id)
            #expect(command.id == expectedID)
            // The reply carries the id back byte for byte.
            #expect(QMP.success(id: command.id).compactText.contains("\"id\": \(expectedID.compactText)"))
        }
    }

    @Test(
        "malformed input gives QEMU's error descriptions",
        arguments: [
            ("[1]", "QMP input must be a JSON object"),
            ("{\"arguments\": {}}", "QMP input lacks member 'execute'"),
            ("{\"execute\": 1}", "QMP input member 'execute' must be a string"),
            ("{\"execute\": \"x\", \"arguments\": []}", "QMP input member 'arguments' must be an object"),
            ("{\"execute\": \"x\", \"foo\": 1}", "QMP input member 'foo' is unexpected"),
            ("{\"execute\": ", "JSON parse error"),
        ])
    func malformed(text: String, description: String) {
        guard case .failure(let error) = QMP.parseCommand(Array(text.utf8)) else {
            Issue.record("accepted \(text)")
            return
        }
        #expect(error.description.hasPrefix(description))
    }

    @Test("the id survives an error in the rest of the message")
    func idOnError() {
        guard case .failure(let error) = QMP.parseCommand(Array(#"{"id": "k", "arguments": 1}"#.utf8)) else {
            Issue.record("accepted")
            return
        }
        #expect(error.id == "k")
    }

    @Test("messages: greeting, success, error, event frames end in CRLF")
    func messages() throws {
        let greeting = QMP.greeting(major: 0, minor: 1, micro: 0, package: "flotilla")
        #expect(greeting.objectValue?["QMP"]?.objectValue?["capabilities"] == [])
        let event = QMP.event("STOP", seconds: 5, microseconds: 7)
        #expect(event.compactText == #"{"event": "STOP", "data": {}, "timestamp": {"seconds": 5, "microseconds": 7}}"#)
        let error = QMP.error(.commandNotFound, "The command x has not been found", id: 3)
        #expect(error.compactText == #"{"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}, "id": 3}"#)
        #expect(QMP.frame(.null).suffix(2) == [13, 10])
    }

    @Test("the stream splitter finds messages across and within writes")
    func splitter() {
        var splitter = JSONStreamSplitter()
        #expect(
            splitter.append(Array(#"{"execute": "a", "arguments": {"s": "}{\"x"}}{"exe"#.utf8)) == [
                .message(Array(#"{"execute": "a", "arguments": {"s": "}{\"x"}}"#.utf8))
            ])
        #expect(splitter.append(Array(#"cute": "b"}"#.utf8)) == [.message(Array(#"{"execute": "b"}"#.utf8))])
        #expect(splitter.append(Array("\r\n  [1, [2]] 42 ".utf8)) == [.message(Array("[1, [2]]".utf8)), .message(Array("42".utf8))])
        #expect(splitter.append(Array("}".utf8)) == [.garbage("unexpected '}'")])
        #expect(splitter.append(Array("tr".utf8)) == [])
        #expect(splitter.append(Array("ue {}".utf8)) == [.message(Array("true".utf8)), .message(Array("{}".utf8))])
        #expect(splitter.append(Array(#""str" "#.utf8)) == [.message(Array(#""str""#.utf8))])
    }

    @Test("an endless message is cut off instead of growing without bound")
    func oversized() {
        var splitter = JSONStreamSplitter()
        let chunk = Array(("{\"a\": \"" + String(repeating: "x", count: 65536)).utf8)
        var rounds = 0
        while rounds < 40, !splitter.append(chunk).contains(where: { if case .garbage = $0 { true } else { false } }) {
            rounds += 1
        }
        #expect(rounds * chunk.count <= JSONStreamSplitter.maximumMessageSize)
        #expect(splitter.append(Array("{}".utf8)).last == .message(Array("{}".utf8)))
    }
}
