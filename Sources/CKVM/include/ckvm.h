#ifndef FLOTILLA_CKVM_H
#define FLOTILLA_CKVM_H
#include <linux/kvm.h>
#endif
