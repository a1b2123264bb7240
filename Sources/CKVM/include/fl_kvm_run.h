#ifndef FLOTILLA_FL_KVM_RUN_H
#define FLOTILLA_FL_KVM_RUN_H
/* Accessors for the mmap'ed struct kvm_run (api.rst 5. "The kvm_run structure"). Its exit
 * data is an anonymous union, so the fields are reached here and inlined into Swift. */
#include <linux/kvm.h>
#include <stdint.h>

static inline uint32_t fl_run_exit_reason(const struct kvm_run *run) { return run->exit_reason; }

/* immediate_exit is polled by KVM_RUN on entry; another thread sets it to kick the vCPU
 * (api.rst: "KVM_CAP_IMMEDIATE_EXIT"), so the store is atomic. */
static inline void fl_run_set_immediate_exit(struct kvm_run *run, uint8_t value) {
    __atomic_store_n(&run->immediate_exit, value, __ATOMIC_SEQ_CST);
}

/* KVM_EXIT_IO */
static inline uint8_t fl_run_io_direction(const struct kvm_run *run) { return run->io.direction; }
static inline uint8_t fl_run_io_size(const struct kvm_run *run) { return run->io.size; }
static inline uint16_t fl_run_io_port(const struct kvm_run *run) { return run->io.port; }
static inline uint32_t fl_run_io_count(const struct kvm_run *run) { return run->io.count; }
static inline uint64_t fl_run_io_data_offset(const struct kvm_run *run) { return run->io.data_offset; }

/* KVM_EXIT_MMIO */
static inline uint64_t fl_run_mmio_phys_addr(const struct kvm_run *run) { return run->mmio.phys_addr; }
static inline uint8_t *fl_run_mmio_data(struct kvm_run *run) { return run->mmio.data; }
static inline uint32_t fl_run_mmio_len(const struct kvm_run *run) { return run->mmio.len; }
static inline uint8_t fl_run_mmio_is_write(const struct kvm_run *run) { return run->mmio.is_write; }

/* KVM_EXIT_FAIL_ENTRY */
static inline uint64_t fl_run_fail_entry_reason(const struct kvm_run *run) {
    return run->fail_entry.hardware_entry_failure_reason;
}

/* KVM_EXIT_INTERNAL_ERROR */
static inline uint32_t fl_run_internal_suberror(const struct kvm_run *run) { return run->internal.suberror; }
static inline uint32_t fl_run_internal_ndata(const struct kvm_run *run) { return run->internal.ndata; }
static inline uint64_t fl_run_internal_data(const struct kvm_run *run, uint32_t i) {
    return i < 16 ? run->internal.data[i] : 0;
}

/* KVM_EXIT_SYSTEM_EVENT */
static inline uint32_t fl_run_system_event_type(const struct kvm_run *run) { return run->system_event.type; }
#endif
