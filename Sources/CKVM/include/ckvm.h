#ifndef FLOTILLA_CKVM_H
#define FLOTILLA_CKVM_H
/* Umbrella header of the CKVM shim: KVM structures plus the pieces Swift cannot import
 * (function-like ioctl request macros, variadic ioctl(2), anonymous unions of kvm_run,
 * flexible-array structures). Each concern lives in its own header. */
#include <linux/kvm.h>
#include "fl_kvm_ioctl.h"
#include "fl_kvm_run.h"
#include "fl_kvm_flex.h"
#endif
