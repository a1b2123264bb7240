#ifndef FLOTILLA_FUZZER_DRIVER_H
#define FLOTILLA_FUZZER_DRIVER_H
#include <stddef.h>
#include <stdint.h>

/// libFuzzer's driver for programs with their own main (compiler-rt FuzzerInterface.h):
/// SwiftPM's executable targets always define main, so the fuzz target calls this.
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));

#endif
