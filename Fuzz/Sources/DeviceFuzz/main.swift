import FuzzSupport
import Glibc

// `DeviceFuzz --write-seeds DIR` writes the seed corpus; `--max-len` prints the largest
// useful input length; anything else is libFuzzer's command line.
let arguments = CommandLine.arguments
if arguments.count == 3 && arguments[1] == "--write-seeds" {
    let seeds = deviceSeeds()
    for (name, bytes) in seeds { precondition(bytes.count <= DeviceCase.maxLength, name) }
    writeSeeds(seeds, to: arguments[2])
    exit(0)
}
if arguments.count == 2 && arguments[1] == "--max-len" {
    print(DeviceCase.maxLength)
    exit(0)
}
runLibFuzzer { runCase(DeviceCase($0)) }
