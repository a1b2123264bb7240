#!/bin/bash
# Assemble the exit-loop guest for loop count $2 into the ELF vmlinux $1
# (one PT_LOAD with p_paddr = p_vaddr = 0x100000, e_entry = its physical entry).
set -euo pipefail
out=$1 n=$2
here=$(cd "$(dirname "$0")" && pwd)
as --64 --defsym N="$n" -o "$out.o" "$here/exitloop.S"
ld -m elf_x86_64 -nostdlib -static -z noexecstack -z max-page-size=0x1000 \
   --no-warn-rwx-segments -T "$here/exitloop.ld" -o "$out" "$out.o"
rm -f "$out.o"
