import Glibc
import Protocol
import VMMWorker

/// Reads the `-config` file for the parser, turning I/O failures into configuration errors.
func readConfigFile(_ path: String) throws(ConfigError) -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else {
        let reason = String(cString: strerror(errno))
        throw ConfigError(field: "-config", value: path, problem: "cannot open (\(reason))")
    }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if count < 0 {
            if errno == EINTR { continue }
            let reason = String(cString: strerror(errno))
            throw ConfigError(field: "-config", value: path, problem: "cannot read (\(reason))")
        }
        if count == 0 { break }
        bytes.append(contentsOf: chunk[0..<count])
        guard bytes.count <= 16 << 20 else {
            throw ConfigError(field: "-config", value: path, problem: "file larger than 16 MiB")
        }
    }
    return bytes
}

func writeStandardError(_ text: String) {
    var text = text
    text.withUTF8 { buffer in
        var offset = 0
        while offset < buffer.count {
            let written = write(2, buffer.baseAddress.map { $0 + offset }, buffer.count - offset)
            if written < 0 && errno == EINTR { continue }
            if written <= 0 { return }
            offset += written
        }
    }
}

let invocation: VMMInvocation
do {
    invocation = try StratoVirtCommandLine.parse(Array(CommandLine.arguments.dropFirst()), readFile: readConfigFile)
} catch {
    writeStandardError("flotilla-vmm: configuration error: \(error)\n")
    exit(1)
}

switch invocation.action {
case .help:
    print(StratoVirtCommandLine.helpText, terminator: "")
case .version:
    print("flotilla-vmm \(StratoVirtCommandLine.version)")
case .printConfig:
    if let config = invocation.config { print(config.jsonValue.prettyText()) }
case .run:
    guard let config = invocation.config else { exit(WorkerProcess.ExitStatus.configuration) }
    if let unimplemented = VirtioPlan.unimplementedDevice(in: config) {
        writeStandardError("flotilla-vmm: configuration error: \(unimplemented)\n")
        exit(WorkerProcess.ExitStatus.configuration)
    }
    if let missing = VirtioPlan.missingTap(in: config) {
        writeStandardError("flotilla-vmm: configuration error: \(missing)\n")
        exit(WorkerProcess.ExitStatus.configuration)
    }
    if invocation.runtime.daemonize && !Daemon.isDaemonProcess {
        // The daemon is this program again, in a new session; wait until it is ready.
        let status = Daemon.launch(arguments: Array(CommandLine.arguments.dropFirst())) { message in
            writeStandardError(message.hasSuffix("\n") ? message : message + "\n")
        }
        exit(status)
    }
    exit(WorkerProcess.run(config: config, runtime: invocation.runtime))
}
