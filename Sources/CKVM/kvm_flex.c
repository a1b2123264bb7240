/* Marshalling for the flexible-array KVM structures; see fl_kvm_flex.h. */
#include "fl_kvm_flex.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

int fl_kvm_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *entries, uint32_t capacity) {
    size_t bytes = sizeof(struct kvm_cpuid2) + (size_t)capacity * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *cpuid = calloc(1, bytes);
    if (cpuid == NULL) { errno = ENOMEM; return -1; }
    cpuid->nent = capacity;
    int rc = ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid);
    if (rc < 0) { int saved = errno; free(cpuid); errno = saved; return -1; }
    uint32_t n = cpuid->nent <= capacity ? cpuid->nent : capacity;
    memcpy(entries, cpuid->entries, (size_t)n * sizeof(struct kvm_cpuid_entry2));
    free(cpuid);
    return (int)n;
}

int fl_kvm_set_cpuid2(int vcpu_fd, const struct kvm_cpuid_entry2 *entries, uint32_t count) {
    size_t bytes = sizeof(struct kvm_cpuid2) + (size_t)count * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *cpuid = calloc(1, bytes);
    if (cpuid == NULL) { errno = ENOMEM; return -1; }
    cpuid->nent = count;
    memcpy(cpuid->entries, entries, (size_t)count * sizeof(struct kvm_cpuid_entry2));
    int rc = ioctl(vcpu_fd, KVM_SET_CPUID2, cpuid);
    int saved = errno;
    free(cpuid);
    errno = saved;
    return rc;
}

/* Copies entries in, issues the call, and copies the (possibly updated) entries to out. */
static int msrs_call(int vcpu_fd, unsigned long request, const struct kvm_msr_entry *entries,
                     struct kvm_msr_entry *out, uint32_t count) {
    size_t bytes = sizeof(struct kvm_msrs) + (size_t)count * sizeof(struct kvm_msr_entry);
    struct kvm_msrs *msrs = calloc(1, bytes);
    if (msrs == NULL) { errno = ENOMEM; return -1; }
    msrs->nmsrs = count;
    memcpy(msrs->entries, entries, (size_t)count * sizeof(struct kvm_msr_entry));
    int rc = ioctl(vcpu_fd, request, msrs);
    int saved = errno;
    if (rc >= 0 && out != NULL) memcpy(out, msrs->entries, (size_t)count * sizeof(struct kvm_msr_entry));
    free(msrs);
    errno = saved;
    return rc;
}

int fl_kvm_set_msrs(int vcpu_fd, const struct kvm_msr_entry *entries, uint32_t count) {
    return msrs_call(vcpu_fd, KVM_SET_MSRS, entries, NULL, count);
}

int fl_kvm_get_msrs(int vcpu_fd, struct kvm_msr_entry *entries, uint32_t count) {
    return msrs_call(vcpu_fd, KVM_GET_MSRS, entries, entries, count);
}
