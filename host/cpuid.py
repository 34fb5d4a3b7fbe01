"""The CPUID a VM sees: the hypervisor's answer to the guest's CPUID VM exits.

Profiles (topology ``guest.cpuid``):

- ``kvm``: hypervisor bit set, ``KVMKVMKVM`` at 0x40000000, features at 0x40000001 with
  PV_EOI, MSI_EXT_DEST_ID and irqlab's MSI-compose hypercall bit.
- ``oldkvm``: the same without the compose bit (a KVM that predates the hypercall).
- ``hidden``: the hypervisor bit clear and no 0x4000_0000 leaves (QEMU ``-cpu
  ...,kvm=off,-hypervisor``): the guest believes it runs on bare metal.
"""

from __future__ import annotations

import struct

from guest.cpuid import (CPUID_HYPERVISOR_BIT, KVM_CPUID_FEATURES, KVM_CPUID_SIGNATURE,
                         KVM_FEATURE_IRQLAB_MSI_COMPOSE, KVM_FEATURE_MSI_EXT_DEST_ID,
                         KVM_FEATURE_PV_EOI, KVM_SIGNATURE, bare_metal_cpuid)

PROFILES = ("kvm", "oldkvm", "hidden")

_SIG = struct.unpack("<III", KVM_SIGNATURE)
_BASE_FEATURES = (1 << KVM_FEATURE_PV_EOI) | (1 << KVM_FEATURE_MSI_EXT_DEST_ID)


def vm_cpuid(profile: str, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    if profile not in PROFILES:
        raise ValueError(f"unknown CPUID profile {profile!r} (expected one of {PROFILES})")
    eax, ebx, ecx, edx = bare_metal_cpuid(leaf, subleaf)
    if profile == "hidden":
        return eax, ebx, ecx, edx
    if leaf == 1:
        return eax, ebx, ecx | CPUID_HYPERVISOR_BIT, edx
    if leaf == KVM_CPUID_SIGNATURE:
        return (KVM_CPUID_FEATURES, *_SIG)
    if leaf == KVM_CPUID_FEATURES:
        feats = _BASE_FEATURES | ((1 << KVM_FEATURE_IRQLAB_MSI_COMPOSE) if profile == "kvm" else 0)
        return feats, 0, 0, 0
    return eax, ebx, ecx, edx
