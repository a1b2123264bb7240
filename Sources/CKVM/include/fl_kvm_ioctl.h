#ifndef FLOTILLA_FL_KVM_IOCTL_H
#define FLOTILLA_FL_KVM_IOCTL_H
/* KVM ioctl request numbers (Documentation/virt/kvm/api.rst section 4) as constants, and
 * non-variadic ioctl(2) entry points. The request macros are function-like (_IO/_IOW...),
 * which Swift cannot import. */
#include <linux/kvm.h>
#include <sys/ioctl.h>

/* System ioctls (on /dev/kvm). */
static const unsigned long FL_KVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long FL_KVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long FL_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long FL_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long FL_KVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;

/* VM ioctls. */
static const unsigned long FL_KVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long FL_KVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long FL_KVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
static const unsigned long FL_KVM_CREATE_PIT2 = KVM_CREATE_PIT2;
static const unsigned long FL_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long FL_KVM_IRQ_LINE = KVM_IRQ_LINE;
static const unsigned long FL_KVM_IOEVENTFD = KVM_IOEVENTFD;
static const unsigned long FL_KVM_IRQFD = KVM_IRQFD;
static const unsigned long FL_KVM_CREATE_VCPU = KVM_CREATE_VCPU;

/* vCPU ioctls. */
static const unsigned long FL_KVM_RUN = KVM_RUN;
static const unsigned long FL_KVM_GET_REGS = KVM_GET_REGS;
static const unsigned long FL_KVM_SET_REGS = KVM_SET_REGS;
static const unsigned long FL_KVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long FL_KVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long FL_KVM_GET_FPU = KVM_GET_FPU;
static const unsigned long FL_KVM_SET_FPU = KVM_SET_FPU;
static const unsigned long FL_KVM_GET_LAPIC = KVM_GET_LAPIC;
static const unsigned long FL_KVM_SET_LAPIC = KVM_SET_LAPIC;
static const unsigned long FL_KVM_GET_MP_STATE = KVM_GET_MP_STATE;
static const unsigned long FL_KVM_SET_MP_STATE = KVM_SET_MP_STATE;

/* ioctl(2) is variadic, so Swift cannot call it; these two forms cover every KVM call. */
static inline int fl_ioctl_ptr(int fd, unsigned long request, void *arg) {
    return ioctl(fd, request, arg);
}
static inline int fl_ioctl_val(int fd, unsigned long request, unsigned long arg) {
    return ioctl(fd, request, arg);
}
#endif
