/*
 * kvm-baseline: the least a VMM can do per port-I/O exit.
 *
 * Creates a VM (in-kernel IRQ chip and PIT, like flotilla-vmm), maps guest RAM, loads
 * the PT_LOAD segments of an ELF64 image at their p_paddr, enters its e_entry in 64-bit
 * long mode (GDT, identity page tables, CPUID from KVM_GET_SUPPORTED_CPUID) and loops
 * on KVM_RUN.  KVM_EXIT_IO: a write of 0xFE to port 0x64 ends the run (exit 0), a read
 * of port 0x64 returns 0, every other access is ignored.  Nothing else is emulated.
 *
 * usage: kvm-baseline IMAGE [MEM_MiB [QMP_SOCKET]]
 *
 * With QMP_SOCKET it is the start-up floor instead: after all of the set-up above (but
 * before the first KVM_RUN) it listens on the unix socket, sends a QMP greeting to the
 * first client and waits to be killed.  That is the least any VMM must do on this machine
 * before its QMP socket greets; benchmark (a) reports it as a reference row.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define die(...) do { fprintf(stderr, "kvm-baseline: " __VA_ARGS__); \
	fprintf(stderr, ": %s\n", strerror(errno)); exit(2); } while (0)

enum { GDT = 0x500, BOOT_PARAMS = 0x7000, STACK = 0x8ff0, PML4 = 0x9000, PDPT = 0xa000, PD = 0xb000 };

static void put64(uint8_t *mem, uint64_t addr, uint64_t v) { memcpy(mem + addr, &v, 8); }

static struct kvm_segment segment(uint16_t sel, uint8_t type, uint8_t l, uint8_t db)
{
	return (struct kvm_segment){ .base = 0, .limit = 0xfffff, .selector = sel, .type = type,
		.present = 1, .dpl = 0, .db = db, .s = 1, .l = l, .g = 1 };
}

int main(int argc, char **argv)
{
	if (argc < 2) { fprintf(stderr, "usage: kvm-baseline IMAGE [MEM_MiB [QMP_SOCKET]]\n"); return 2; }
	uint64_t memsize = (uint64_t)(argc > 2 ? atoi(argv[2]) : 256) << 20;

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) die("open /dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) die("KVM_CREATE_VM");
	if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0) die("KVM_SET_TSS_ADDR");
	uint64_t idmap = 0xfffbc000;
	if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &idmap) < 0) die("KVM_SET_IDENTITY_MAP_ADDR");
	if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
	struct kvm_pit_config pit = { .flags = 0 };
	if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2");

	uint8_t *mem = mmap(NULL, memsize, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED) die("mmap");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = memsize, .userspace_addr = (uintptr_t)mem };
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");

	/* The image: PT_LOAD segments at p_paddr. */
	int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
	if (fd < 0) die("open %s", argv[1]);
	struct stat st;
	if (fstat(fd, &st) < 0) die("fstat");
	uint8_t *img = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (img == MAP_FAILED) die("mmap image");
	Elf64_Ehdr *eh = (Elf64_Ehdr *)img;
	if ((size_t)st.st_size < sizeof *eh || memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS64) {
		errno = EINVAL; die("%s is not an ELF64 image", argv[1]);
	}
	for (int i = 0; i < eh->e_phnum; i++) {
		Elf64_Phdr *ph = (Elf64_Phdr *)(img + eh->e_phoff + (uint64_t)i * eh->e_phentsize);
		if (ph->p_type != PT_LOAD) continue;
		if (ph->p_paddr + ph->p_memsz > memsize || ph->p_offset + ph->p_filesz > (uint64_t)st.st_size) {
			errno = ERANGE; die("segment %d out of range", i);
		}
		memcpy(mem + ph->p_paddr, img + ph->p_offset, ph->p_filesz);
	}

	/* GDT: null, null, 64-bit code (0x10), data (0x18); identity map of 0-4 GiB with 2 MiB pages. */
	put64(mem, GDT + 0x10, 0x00af9b000000ffffULL);
	put64(mem, GDT + 0x18, 0x00cf93000000ffffULL);
	put64(mem, PML4, PDPT | 3);
	for (int i = 0; i < 4; i++) put64(mem, PDPT + 8 * i, (PD + 0x1000 * i) | 3);
	for (uint64_t i = 0; i < 2048; i++) put64(mem, PD + 8 * i, (i << 21) | 0x83);

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0) die("KVM_CREATE_VCPU");
	int runsize = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (runsize < 0) die("KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, runsize, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED) die("mmap kvm_run");

	/* CPUID before SREGS (this machine's KVM rejects long-mode sregs otherwise). */
	int n = 256;
	struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + n * sizeof(struct kvm_cpuid_entry2));
	cpuid->nent = n;
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
	if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0) die("KVM_SET_CPUID2");

	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
	sregs.cs = segment(0x10, 0xb, 1, 0);
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = segment(0x18, 0x3, 0, 1);
	sregs.gdt.base = GDT;
	sregs.gdt.limit = 0x1f;
	sregs.cr0 = 0x80000011;         /* PG | ET | PE */
	sregs.cr3 = PML4;
	sregs.cr4 = 0x20;               /* PAE, no PCID */
	sregs.efer = 0x500;             /* LME | LMA */
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = eh->e_entry, .rsi = BOOT_PARAMS, .rsp = STACK, .rbp = STACK, .rflags = 2 };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

	if (argc > 3) {
		static const char greeting[] = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, "
			"\"major\": 0}, \"package\": \"kvm-baseline\"}, \"capabilities\": []}}\r\n";
		struct sockaddr_un addr = { .sun_family = AF_UNIX };
		if (strlen(argv[3]) >= sizeof addr.sun_path) { errno = ENAMETOOLONG; die("%s", argv[3]); }
		strcpy(addr.sun_path, argv[3]);
		int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (ls < 0 || bind(ls, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(ls, 16) < 0) die("listen %s", argv[3]);
		for (;;) {
			int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
			if (c < 0) { if (errno == EINTR) continue; die("accept"); }
			if (write(c, greeting, sizeof greeting - 1) < 0) die("write");
		}
	}

	unsigned long exits = 0;
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN) continue;
			die("KVM_RUN");
		}
		exits++;
		switch (run->exit_reason) {
		case KVM_EXIT_IO: {
			uint8_t *data = (uint8_t *)run + run->io.data_offset;
			if (run->io.port == 0x64) {
				if (run->io.direction == KVM_EXIT_IO_OUT && data[0] == 0xfe) {
					if (getenv("KVM_BASELINE_VERBOSE")) fprintf(stderr, "kvm-baseline: reset after %lu exits\n", exits);
					return 0;
				}
				if (run->io.direction == KVM_EXIT_IO_IN) memset(data, 0, (size_t)run->io.size * run->io.count);
			}
			break;
		}
		case KVM_EXIT_HLT:
			fprintf(stderr, "kvm-baseline: guest halted after %lu exits\n", exits);
			return 1;
		default:
			fprintf(stderr, "kvm-baseline: unexpected exit reason %u after %lu exits\n", run->exit_reason, exits);
			return 3;
		}
	}
}
