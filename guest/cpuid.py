"""The CPUID probe: is this OS running on bare metal or under a hypervisor?

Linux: ``X86_FEATURE_HYPERVISOR`` (CPUID.1:ECX[31]) then the hypervisor leaves
at 0x40000000 (``KVM_CPUID_SIGNATURE``: max leaf in EAX, "KVMKVMKVM\\0\\0\\0" in
EBX, ECX, EDX) and 0x40000001 (``KVM_CPUID_FEATURES``: feature bits in EAX).

``probe`` takes a ``cpuid(leaf, subleaf) -> (eax, ebx, ecx, edx)`` callable: on
the host it is the CPU's own answer, in a guest every call is a VM exit that
the hypervisor answers from the VM's CPUID profile.  The guest believes
whatever it is told — that is the point of the ``hidden`` profile.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

CPUID_HYPERVISOR_BIT = 1 << 31          # CPUID.1:ECX[31]
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_FEATURE_PV_EOI = 6
KVM_FEATURE_MSI_EXT_DEST_ID = 15
#: irqlab's paravirtual feature: the message-compose hypercall exists (the
#: thread's HCALL domain).  KVM leaves bit 22 unassigned; we claim it.
KVM_FEATURE_IRQLAB_MSI_COMPOSE = 22

Regs = tuple[int, int, int, int]


@dataclass(frozen=True)
class CpuidInfo:
    hypervisor: bool            # CPUID.1:ECX[31]
    vendor: str | None          # the 12-byte signature, when a hypervisor is present
    max_leaf: int
    features: int               # KVM_CPUID_FEATURES EAX (0 when not KVM)

    @property
    def msi_compose(self) -> bool:
        return self.vendor == KVM_SIGNATURE.decode("ascii") and bool(
            self.features >> KVM_FEATURE_IRQLAB_MSI_COMPOSE & 1)

    def describe(self) -> str:
        if not self.hypervisor:
            return "bare metal (CPUID.1:ECX[31] clear)"
        feats = f", features 0x{self.features:08x}" if self.features else ""
        compose = "msi-compose hypercall" if self.msi_compose else "no msi-compose hypercall"
        vendor = (self.vendor or "").rstrip("\0")
        return f"hypervisor {vendor!r}{feats} ({compose})"


def signature(ebx: int, ecx: int, edx: int) -> str:
    raw = struct.pack("<III", ebx, ecx, edx)
    return raw.decode("ascii", errors="replace").replace("\0", "\\0")


def probe(cpuid: Callable[[int, int], Regs]) -> CpuidInfo:
    """Linux ``init_hypervisor_platform`` + ``kvm_para_available`` in miniature."""
    _, _, ecx, _ = cpuid(1, 0)
    if not ecx & CPUID_HYPERVISOR_BIT:
        return CpuidInfo(False, None, 0, 0)
    eax, ebx, ecx2, edx = cpuid(KVM_CPUID_SIGNATURE, 0)
    vendor = struct.pack("<III", ebx, ecx2, edx).decode("ascii", errors="replace")
    features = 0
    if vendor == KVM_SIGNATURE.decode("ascii") and eax >= KVM_CPUID_FEATURES:
        features = cpuid(KVM_CPUID_FEATURES, 0)[0]
    return CpuidInfo(True, vendor, eax, features)


def bare_metal_cpuid(leaf: int, subleaf: int = 0) -> Regs:
    """The CPU's own answer on the host: family 6, hypervisor bit clear, no 0x4000_0000 leaves."""
    if leaf == 0:
        ebx, edx, ecx = struct.unpack("<III", b"GenuineIntel")  # vendor in EBX, EDX, ECX order
        return (0x1F, ebx, ecx, edx)
    if leaf == 1:
        return (0x000906EA, 0, 0x7FFAFBBF & ~CPUID_HYPERVISOR_BIT, 0xBFEBFBFF)
    return (0, 0, 0, 0)
