import Testing

@testable import Protocol

/// Parses a command line with an in-memory file system for `-config`.
func parse(_ arguments: [String], files: [String: String] = [:]) throws(ConfigError) -> VMMInvocation {
    try StratoVirtCommandLine.parse(arguments) { (path: String) throws(ConfigError) -> [UInt8] in
        guard let text = files[path] else {
            throw ConfigError(field: "-config", value: path, problem: "cannot open (No such file or directory)")
        }
        return Array(text.utf8)
    }
}

func config(_ arguments: [String], files: [String: String] = [:]) throws -> VMConfig {
    try #require(try parse(arguments, files: files).config)
}

/// The error a command line gives, or nil when it is accepted.
func configError(_ arguments: [String], files: [String: String] = [:]) -> ConfigError? {
    do {
        _ = try parse(arguments, files: files)
        return nil
    } catch {
        return error
    }
}

let kernel = ["-kernel", "/boot/vmlinux"]
