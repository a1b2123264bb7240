#!/usr/bin/env python3
"""Build the Flotilla test guest's bzImage.

Usage: mkbzimage.py SETUP.bin VMLINUX OUT.bzImage

SETUP.bin is the flat real-mode part (boot sector + setup header, src/setup.S).
VMLINUX is the ELF executable.  The protected-mode part is the image of the
ELF's PT_LOAD file contents laid out flat from the lowest p_paddr, which must
be code32_start (0x100000); its 64-bit entry (e_entry) must be at +0x200.

Fills, as Linux's arch/x86/boot/tools/build does: setup_sects, syssize,
init_size, and kernel_info_offset (boot protocol 2.15).
"""
import struct
import sys

SECTOR = 512
SETUP_SECTS_MIN = 4          # loaders assume 4 when the field is 0; never go below
LOAD_ADDR = 0x100000


def fail(msg):
    sys.stderr.write("mkbzimage: %s\n" % msg)
    sys.exit(1)


def read_elf(path):
    data = open(path, "rb").read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        fail("%s: not a little-endian ELF64 file" % path)
    (e_type, e_machine, _, e_entry, e_phoff, e_shoff, _, _, e_phentsize, e_phnum,
     e_shentsize, e_shnum, e_shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
    if e_type != 2 or e_machine != 62:
        fail("%s: not an x86-64 executable" % path)
    loads = []
    for i in range(e_phnum):
        p_type, _, p_offset, _, p_paddr, p_filesz, p_memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == 1:
            loads.append((p_paddr, p_offset, p_filesz, p_memsz))
    symbols = {}
    for i in range(e_shnum):
        (_, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize) = struct.unpack_from(
            "<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
        if sh_type != 2:                       # SHT_SYMTAB
            continue
        str_off = struct.unpack_from("<Q", data, e_shoff + sh_link * e_shentsize + 24)[0]
        for j in range(sh_size // sh_entsize):
            st_name, _, _, _, st_value, _ = struct.unpack_from("<IBBHQQ", data, sh_offset + j * sh_entsize)
            end = data.index(b"\0", str_off + st_name)
            symbols[data[str_off + st_name:end].decode()] = st_value
    return data, e_entry, loads, symbols


def main():
    if len(sys.argv) != 4:
        fail("usage: mkbzimage.py SETUP.bin VMLINUX OUT.bzImage")
    setup = bytearray(open(sys.argv[1], "rb").read())
    elf, entry, loads, syms = read_elf(sys.argv[2])

    if len(setup) < 0x270 or setup[0x1fe:0x200] != b"\x55\xaa" or setup[0x202:0x206] != b"HdrS":
        fail("setup: no setup header")
    version = struct.unpack_from("<H", setup, 0x206)[0]
    hdr_end = 0x202 + setup[0x201]
    if hdr_end < 0x26c:
        fail("setup: header too short for protocol 2.15 (ends at 0x%x)" % hdr_end)

    if not loads:
        fail("vmlinux: no PT_LOAD segments")
    base = min(p[0] for p in loads)
    code32_start = struct.unpack_from("<I", setup, 0x214)[0]
    if base != LOAD_ADDR or code32_start != LOAD_ADDR:
        fail("vmlinux loads at 0x%x, setup says code32_start=0x%x, want 0x%x" % (base, code32_start, LOAD_ADDR))
    if entry != base + 0x200:
        fail("e_entry 0x%x is not load address + 0x200" % entry)

    file_end = max(p[0] + p[2] for p in loads)
    mem_end = max(p[0] + p[3] for p in loads)
    kernel = bytearray(file_end - base)
    for paddr, off, filesz, _ in loads:
        kernel[paddr - base:paddr - base + filesz] = elf[off:off + filesz]
    kernel += b"\0" * (-len(kernel) % 16)

    # Setup: boot sector + at least SETUP_SECTS_MIN sectors.
    setup += b"\0" * (-len(setup) % SECTOR)
    sects = len(setup) // SECTOR - 1
    if sects < SETUP_SECTS_MIN:
        setup += b"\0" * ((SETUP_SECTS_MIN - sects) * SECTOR)
        sects = SETUP_SECTS_MIN
    if sects > 0xff:
        fail("setup too large")

    end_sym = syms.get("__kernel_end", mem_end)
    init_size = max(mem_end, end_sym) - base
    init_size = (init_size + 4095) & ~4095
    kinfo = syms.get("kernel_info")
    if kinfo is None:
        fail("vmlinux has no kernel_info symbol")
    kinfo_off = kinfo - base
    if kernel[kinfo_off:kinfo_off + 4] != b"LToP":
        fail("kernel_info at 0x%x has no LToP header" % kinfo)

    setup[0x1f1] = sects
    struct.pack_into("<I", setup, 0x1f4, len(kernel) // 16)
    struct.pack_into("<I", setup, 0x260, init_size)
    struct.pack_into("<I", setup, 0x268, kinfo_off)

    with open(sys.argv[3], "wb") as f:
        f.write(setup)
        f.write(kernel)
    sys.stderr.write("mkbzimage: protocol %d.%d, setup_sects=%d, syssize=0x%x (%d bytes), init_size=0x%x, "
                     "kernel_info_offset=0x%x\n" % (version >> 8, version & 0xff, sects, len(kernel) // 16,
                                                    len(kernel), init_size, kinfo_off))


if __name__ == "__main__":
    main()
