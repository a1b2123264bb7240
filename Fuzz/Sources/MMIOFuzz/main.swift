import FuzzSupport
import Glibc

// `MMIOFuzz --write-seeds DIR` writes the seed corpus; `--max-len` prints the largest useful
// input length; anything else is libFuzzer's command line.
let arguments = CommandLine.arguments
if arguments.count == 3 && arguments[1] == "--write-seeds" {
    writeSeeds(mmioSeeds(), to: arguments[2])
    exit(0)
}
if arguments.count == 2 && arguments[1] == "--max-len" {
    print(1 + 11 * 256)
    exit(0)
}
runLibFuzzer(runInput)
