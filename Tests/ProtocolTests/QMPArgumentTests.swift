import Protocol
import Testing

@Suite("QMP argument checks (QEMU's QAPI wording)")
struct QMPArgumentTests {
    @Test("members are typed, required ones must be there, unknown ones are refused, nested ones are named by path")
    func typedMembers() throws {
        let object: JSONObject = ["name": "n", "flag": true, "count": 7, "file": ["filename": "/x"]]
        let arguments = try QMPArguments(object, allowed: ["name", "flag", "count", "file", "absent"])
        #expect(try arguments.string("name") == "n")
        #expect(try arguments.optionalBool("flag") == true)
        #expect(try arguments.optionalUnsigned("count") == 7)
        #expect(try arguments.optionalString("absent") == nil)
        #expect(throws: QMPArgumentError("Parameter 'absent' is missing")) { try arguments.string("absent") }
        #expect(throws: QMPArgumentError("Invalid parameter type for 'name', expected: boolean")) { try arguments.optionalBool("name") }
        #expect(throws: QMPArgumentError("Invalid parameter type for 'flag', expected: string")) { try arguments.string("flag") }
        #expect(throws: QMPArgumentError("Invalid parameter type for 'name', expected: integer")) { try arguments.optionalUnsigned("name") }
        let file = try arguments.object("file", allowed: ["filename", "driver"])
        #expect(try file.string("filename") == "/x")
        #expect(throws: QMPArgumentError("Parameter 'file.driver' is missing")) { try file.string("driver") }
        #expect(throws: QMPArgumentError("Parameter 'file.filename' is unexpected")) { try arguments.object("file", allowed: ["driver"]) }
        #expect(throws: QMPArgumentError("Invalid parameter type for 'name', expected: object")) {
            try arguments.optionalObject("name", allowed: [])
        }
        // Unknown members, the first in sorted order.
        #expect(throws: QMPArgumentError("Parameter 'count' is unexpected")) { try QMPArguments(object, allowed: ["name"]) }
        #expect(throws: QMPArgumentError("Parameter 'x' is unexpected")) { try QMPArguments.none(["x": 1]) }
        try QMPArguments.none([:])
        // Negative and fractional numbers are no uint64.
        #expect(throws: QMPArgumentError("Invalid parameter type for 'n', expected: integer")) {
            try QMPArguments(["n": -1], allowed: ["n"]).optionalUnsigned("n")
        }
    }
}
