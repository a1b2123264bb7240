import FlotillaTestSupport
import Foundation
import Testing

/// The rule every socket the VMM serves follows (api-channel, -chardev, vsock uds-path): a path
/// that already exists is refused at start-up naming the option and the path, exit 2, the file
/// untouched and nothing else left in its directory. `options` gets the taken path and returns
/// the VMM options that use it; `option` is how the error must name the option.
func expectExistingSocketPathRefused(vmm: String, option: String, options: (String) -> [String]) throws {
    let directory = try TemporaryDirectory()
    defer { directory.remove() }
    let taken = directory.file("taken.sock")
    try Data("not a socket".utf8).write(to: URL(fileURLWithPath: taken))
    let result = try run(
        vmm, ["-kernel", GuestImages.vmlinux, "-api-channel", "unix:\(directory.file("api.sock"))"] + options(taken))
    #expect(result.status == 2)
    #expect(
        result.standardError.contains(option) && result.standardError.contains(taken) && result.standardError.contains("already exists"),
        "\(result.standardError)")
    #expect(readText(taken) == "not a socket", "an existing file was touched")
    #expect(try directory.contents() == ["taken.sock"], "left behind")
}
