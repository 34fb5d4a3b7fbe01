"""The irqlab hypercall ABI, version 1 (shared by guests and the host; see docs/hypercalls.md).

A hypercall is a VM exit of reason ``"hypercall"`` whose args are
``{"nr": int, "a": [int, ...]}`` — like KVM's ``kvm_hypercall4(nr, a0..a3)``, a
number and up to four integer arguments, nothing else.  The host answers
``{"ret": int, "v": [int, ...]}``: ``ret`` is 0 or a negative KVM error code, ``v``
the return values.  Every argument is checked by the host against what the
calling VM owns; a hostile call gets an error code, never a crash and never
another VM's resource.

    nr  name                 args                                 returns
    --  -------------------  -----------------------------------  -------------------------------
    0   HC_QUERY_FEATURES    -                                    version, features bitmap
    1   HC_MSI_COMPOSE       dev (guest BDF), vector, dest (vCPU   addr_lo, addr_hi, data,
                             APIC ID), cookie (driver's index)    handle (for HC_MSI_FREE)
    2   HC_MSI_FREE          dev, handle                          -

``dev`` is the routing ID of the function as the guest sees it (bus 0,
``00:03.0`` -> 0x18).  ``vector`` must be a valid external vector (0x20..0xEF).
"""

from __future__ import annotations

import errno

HYPERCALL_ABI_VERSION = 1

HC_QUERY_FEATURES = 0
HC_MSI_COMPOSE = 1
HC_MSI_FREE = 2

NAMES = {HC_QUERY_FEATURES: "QUERY_FEATURES", HC_MSI_COMPOSE: "MSI_COMPOSE", HC_MSI_FREE: "MSI_FREE"}

#: features bitmap returned by HC_QUERY_FEATURES
FEAT_MSI_COMPOSE = 1 << 0

#: HC_MSI_COMPOSE cookie: bits 15:0 the slot index, bit 16 set when the message will be
#: stored in a memory-kind IMS (queue context in guest RAM, fetched by the device)
COOKIE_SLOT_MASK = 0xFFFF
COOKIE_MEMORY = 1 << 16

# Return codes: KVM's (include/uapi/linux/kvm_para.h), negated by the callee.
KVM_ENOSYS = 1000
KVM_EFAULT = errno.EFAULT
KVM_EINVAL = errno.EINVAL
KVM_E2BIG = errno.E2BIG
KVM_EPERM = errno.EPERM
KVM_EOPNOTSUPP = 95
KVM_ENOSPC = errno.ENOSPC     # irqlab: quota or IRT exhausted

ERROR_NAMES = {-KVM_ENOSYS: "ENOSYS", -KVM_EFAULT: "EFAULT", -KVM_EINVAL: "EINVAL", -KVM_E2BIG: "E2BIG",
               -KVM_EPERM: "EPERM", -KVM_EOPNOTSUPP: "EOPNOTSUPP", -KVM_ENOSPC: "ENOSPC"}

MAX_ARGS = 4
FIRST_VECTOR, LAST_VECTOR = 0x20, 0xEF


class HypercallError(RuntimeError):
    """A hypercall returned an error; ``ret`` is the negative code."""

    def __init__(self, nr: int, ret: int, detail: str = ""):
        self.nr, self.ret = nr, ret
        name = ERROR_NAMES.get(ret, str(ret))
        super().__init__(f"hypercall {NAMES.get(nr, nr)} failed: -{name}" + (f" ({detail})" if detail else ""))


def request(nr: int, *args: int) -> dict:
    """The args of a ``"hypercall"`` VM exit."""
    return {"nr": nr, "a": list(args)}


def parse_request(args: object) -> tuple[int, list[int]] | None:
    """Validate the shape of a guest's hypercall; None if it is not even well-formed."""
    if type(args) is not dict:
        return None
    nr, a = args.get("nr"), args.get("a", [])
    if type(nr) is not int or type(a) is not list or len(a) > MAX_ARGS:
        return None
    if any(type(x) is not int or not -(1 << 63) <= x < (1 << 64) for x in a):
        return None
    return nr, a


def reply(ret: int, *values: int) -> dict:
    return {"ret": ret, "v": list(values)}
