#ifndef FLOTILLA_FL_KVM_FLEX_H
#define FLOTILLA_FL_KVM_FLEX_H
/* Calls whose argument is a structure with a flexible array member (struct kvm_cpuid2,
 * struct kvm_msrs), which Swift cannot lay out. Callers pass plain entry arrays. */
#include <linux/kvm.h>
#include <stdint.h>

/* KVM_GET_SUPPORTED_CPUID (api.rst 4.46) into entries[0..<capacity]. Returns the number of
 * entries, or -1 with errno set (E2BIG: capacity too small). */
int fl_kvm_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *entries, uint32_t capacity);

/* KVM_SET_CPUID2 (api.rst 4.73). Returns ioctl's result, -1 with errno on failure. */
int fl_kvm_set_cpuid2(int vcpu_fd, const struct kvm_cpuid_entry2 *entries, uint32_t count);

/* KVM_SET_MSRS / KVM_GET_MSRS (api.rst 4.18, 4.19). Return the number of MSRs processed,
 * or -1 with errno set. */
int fl_kvm_set_msrs(int vcpu_fd, const struct kvm_msr_entry *entries, uint32_t count);
int fl_kvm_get_msrs(int vcpu_fd, struct kvm_msr_entry *entries, uint32_t count);
#endif
