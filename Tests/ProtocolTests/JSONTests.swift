import Testing

@testable import Protocol

@Suite("JSON values")
struct JSONTests {
    @Test("parses every kind of value and keeps member order")
    func parsesValues() throws {
        let value = try JSONValue.parse(#"{"b": [1, -2.5e3, true, false, null], "a": "x\ny\u00e9\ud83d\ude00", "c": {}}"#)
        let object = try #require(value.objectValue)
        #expect(object.keys == ["b", "a", "c"])
        #expect(object["a"] == .string("x\nyé😀"))
        #expect(object["b"] == .array([1, .number(JSONNumber(validatedText: "-2.5e3")), true, false, nil]))
        #expect(object["c"] == .object([:]))
    }

    @Test("numbers keep their exact text")
    func numberText() throws {
        let big = "123456789012345678901234567890"
        let value = try JSONValue.parse("[\(big), 1.50, 0, -0]")
        #expect(value.compactText == "[\(big),1.50,0,-0]")
        #expect(try JSONValue.parse("18446744073709551615").numberValue?.unsignedValue == UInt64.max)
        #expect(try JSONValue.parse("1.0").numberValue?.unsignedValue == nil)
        #expect(try JSONValue.parse("-1").numberValue?.unsignedValue == nil)
    }

    @Test("serialization round-trips, escaping control characters")
    func roundTrip() throws {
        let original: JSONValue = ["s": "tab\tquote\"back\\slash\u{01}", "n": [1, 2], "o": ["k": nil]]
        #expect(try JSONValue.parse(original.compactText) == original)
        #expect(try JSONValue.parse(original.prettyText()) == original)
        #expect(original.compactText.contains(#"\u0001"#))
    }

    @Test(
        "rejects malformed documents",
        arguments: [
            ("", "expected a value"),
            ("{", "expected a string as object key"),
            ("[1,]", "expected a value"),
            ("[1 2]", "expected ',' or ']'"),
            ("{\"a\":1,\"a\":2}", "duplicate key"),
            ("\"abc", "unterminated string"),
            ("\"a\u{01}\"", "control character"),
            ("\"\\x\"", "invalid escape"),
            ("\"\\ud800\"", "unpaired surrogate"),
            ("\"\\udc00\"", "unpaired surrogate"),
            ("01", "after the JSON value"),
            ("1.", "invalid number"),
            ("-", "invalid number"),
            ("tru", "invalid literal"),
            ("{} x", "after the JSON value"),
            (String(repeating: "[", count: 100) + String(repeating: "]", count: 100), "nesting deeper"),
        ])
    func rejectsMalformed(text: String, message: String) {
        #expect {
            _ = try JSONValue.parse(text)
        } throws: { error in
            (error as? JSONSyntaxError)?.message.contains(message) == true
        }
    }

    @Test("reports line and column of an error")
    func errorPosition() {
        #expect {
            _ = try JSONValue.parse("{\n  \"a\": tru\n}")
        } throws: { error in
            guard let error = error as? JSONSyntaxError else { return false }
            return error.line == 2 && error.description.hasPrefix("line 2,")
        }
    }

    @Test("rejects invalid UTF-8")
    func invalidUTF8() {
        #expect(throws: JSONSyntaxError.self) {
            _ = try JSONValue.parse(bytes: [0x22, 0xff, 0xfe, 0x22])
        }
    }
}
