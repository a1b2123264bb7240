import CFuzzerDriver
import Glibc

// `VirtqueueFuzz --write-seeds DIR` writes the seed corpus; `--max-len` prints the largest
// useful input length; anything else is libFuzzer's command line.
let arguments = CommandLine.arguments
if arguments.count == 3 && arguments[1] == "--write-seeds" {
    writeSeeds(to: arguments[2])
    exit(0)
}
if arguments.count == 2 && arguments[1] == "--max-len" {
    print(FuzzCase.maxLength)
    exit(0)
}
var argc = CommandLine.argc
var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
exit(
    LLVMFuzzerRunDriver(&argc, &argv) { data, size in
        guard let data else { return 0 }  // libFuzzer always passes a buffer, even for size 0
        return fuzz(data, size)
    })
