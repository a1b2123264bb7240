import Testing

@testable import Protocol

/// `-serial unix:PATH,server,nowait` and JSON `serial.socket_path`: Flotilla's console socket.
@Suite("Serial console socket option")
struct SerialSocketTests {
    @Test(
        "QEMU's spellings give the console socket path",
        arguments: [
            "unix:/run/vm/console.sock,server,nowait",
            "unix:/run/vm/console.sock,server=on,wait=off",
            "unix:/run/vm/console.sock,nowait,server",
        ])
    func spellings(text: String) throws {
        let parsed = try config(kernel + ["-serial", text])
        #expect(parsed.serial == SerialConfig(stdio: false, socketPath: "/run/vm/console.sock"))
    }

    @Test("a literal comma in the path is written ,,")
    func commaInPath() throws {
        let parsed = try config(kernel + ["-serial", "unix:/run/a,,b.sock,server,nowait"])
        #expect(parsed.serial?.socketPath == "/run/a,b.sock")
    }

    @Test("the socket works with -daemonize, unlike stdio")
    func daemonize() throws {
        let invocation = try parse(kernel + ["-daemonize", "-serial", "unix:/run/c.sock,server,nowait"])
        #expect(invocation.config?.serial?.socketPath == "/run/c.sock")
    }

    static let rejections: [([String], [String])] = [
        (["-serial", "unix:/run/c.sock"], ["-serial", "'unix:/run/c.sock'", "unix:/run/c.sock,server,nowait"]),
        (["-serial", "unix:/run/c.sock,server"], ["-serial", "nowait"]),
        (["-serial", "unix:/run/c.sock,server,wait"], ["-serial", "'wait'", "never waits", "nowait"]),
        (["-serial", "unix:/run/c.sock,server=off,nowait"], ["-serial", "'server=off'", "client", "server"]),
        (["-serial", "unix:/run/c.sock,server,nowait,telnet"], ["-serial", "'telnet'", "unknown flag", "server, nowait"]),
        (["-serial", "unix:,server,nowait"], ["-serial", "path is missing", "unix:PATH,server,nowait"]),
        (["-serial", "unix:/" + String(repeating: "s", count: 107) + ",server,nowait"], ["-serial", "at most 107 bytes"]),
        (["-serial", "tcp:localhost:4444"], ["-serial", "'tcp:localhost:4444'", "stdio, unix:PATH,server,nowait"]),
    ]

    @Test("bad -serial values name the option, the value and what is allowed", arguments: rejections)
    func rejects(arguments: [String], fragments: [String]) throws {
        let error = try #require(configError(kernel + arguments), "accepted: \(arguments)")
        for fragment in fragments {
            #expect(error.description.contains(fragment), "\(error.description) lacks \(fragment)")
        }
    }

    @Test("JSON serial.socket_path reads, prints and reads back")
    func json() throws {
        let text = #"{"boot-source": {"kernel_image_path": "/k"}, "serial": {"socket_path": "/run/c.sock"}}"#
        let parsed = try config(["-config", "vm.json"], files: ["vm.json": text])
        #expect(parsed.serial == SerialConfig(stdio: false, socketPath: "/run/c.sock"))
        #expect(parsed.jsonValue.objectValue?["serial"] == ["stdio": false, "socket_path": "/run/c.sock"])
        #expect(try VMConfig(json: Array(parsed.jsonValue.compactText.utf8)) == parsed)
    }

    @Test(
        "JSON serial rejects stdio together with a socket, and bad paths",
        arguments: [
            (
                #"{"boot-source": {"kernel_image_path": "/k"}, "serial": {"stdio": true, "socket_path": "/c"}}"#,
                ["serial.socket_path", "'/c'", "stdio"]
            ),
            (#"{"boot-source": {"kernel_image_path": "/k"}, "serial": {"socket_path": 7}}"#, ["serial", "socket_path"]),
            (
                #"{"boot-source": {"kernel_image_path": "/k"}, "serial": {"pty": true}}"#,
                ["serial.pty", "unknown field", "stdio, socket_path"]
            ),
        ])
    func jsonRejects(json: String, fragments: [String]) throws {
        let error = try #require(configError(["-config", "vm.json"], files: ["vm.json": json]))
        for fragment in fragments {
            #expect(error.description.contains(fragment), "\(error.description) lacks \(fragment)")
        }
    }

    @Test("the command line's -serial replaces JSON's serial section")
    func precedence() throws {
        let text = #"{"boot-source": {"kernel_image_path": "/k"}, "serial": {"socket_path": "/json.sock"}}"#
        let merged = try config(["-config", "vm.json", "-serial", "unix:/cli.sock,server,nowait"], files: ["vm.json": text])
        #expect(merged.serial?.socketPath == "/cli.sock")
        let stdio = try config(["-config", "vm.json", "-serial", "stdio"], files: ["vm.json": text])
        #expect(stdio.serial == SerialConfig(stdio: true))
    }
}
