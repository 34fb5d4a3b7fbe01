"""The CPUID a VM sees (``host/cpuid.py``) and the guest's probe (``guest/cpuid.py``).

The thread's catch: "This only works when the guest OS actually knows that it
runs in a VM ... i.e. via CPUID".  The three profiles must probe as bare metal
(``hidden``), KVM with the compose hypercall (``kvm``) and KVM without it
(``oldkvm``).  Register values are checked against the encodings Linux uses
(``KVM_CPUID_SIGNATURE``: EBX 0x4b4d564b, ECX 0x564b4d56, EDX 0x4d).
"""

from __future__ import annotations

import struct
from functools import partial

import pytest

from guest.cpuid import (CPUID_HYPERVISOR_BIT, KVM_CPUID_FEATURES, KVM_CPUID_SIGNATURE,
                         KVM_FEATURE_IRQLAB_MSI_COMPOSE, KVM_FEATURE_MSI_EXT_DEST_ID,
                         KVM_FEATURE_PV_EOI, KVM_SIGNATURE, CpuidInfo, bare_metal_cpuid, probe,
                         signature)
from host.cpuid import PROFILES, vm_cpuid

COMPOSE = 1 << KVM_FEATURE_IRQLAB_MSI_COMPOSE
BASE_FEATURES = (1 << KVM_FEATURE_PV_EOI) | (1 << KVM_FEATURE_MSI_EXT_DEST_ID)
KVM_VENDOR = "KVMKVMKVM\0\0\0"


class Recorder:
    """A cpuid callable that remembers which leaves the probe asked for."""

    def __init__(self, cpuid):
        self.cpuid = cpuid
        self.leaves: list[tuple[int, int]] = []

    def __call__(self, leaf: int, subleaf: int = 0):
        self.leaves.append((leaf, subleaf))
        return self.cpuid(leaf, subleaf)


def fixed(table: dict[int, tuple[int, int, int, int]]):
    return lambda leaf, subleaf=0: table.get(leaf, (0, 0, 0, 0))


# ------------------------------------------------------------ the profiles


def test_profiles():
    assert PROFILES == ("kvm", "oldkvm", "hidden")


def test_bare_metal_probes_as_bare_metal():
    info = probe(bare_metal_cpuid)
    assert info == CpuidInfo(hypervisor=False, vendor=None, max_leaf=0, features=0)
    assert not info.msi_compose
    assert "bare metal" in info.describe()


def test_kvm_probes_as_kvm_with_compose():
    info = probe(partial(vm_cpuid, "kvm"))
    assert info.hypervisor
    assert info.vendor == KVM_VENDOR
    assert info.max_leaf == KVM_CPUID_FEATURES
    assert info.features == BASE_FEATURES | COMPOSE
    assert info.msi_compose
    assert info.describe() == ("hypervisor 'KVMKVMKVM', features 0x%08x (msi-compose hypercall)"
                               % (BASE_FEATURES | COMPOSE))


def test_oldkvm_probes_as_kvm_without_compose():
    info = probe(partial(vm_cpuid, "oldkvm"))
    assert info.hypervisor
    assert info.vendor == KVM_VENDOR
    assert info.features == BASE_FEATURES
    assert not info.msi_compose
    assert "no msi-compose hypercall" in info.describe()


def test_hidden_probes_exactly_like_bare_metal():
    assert probe(partial(vm_cpuid, "hidden")) == probe(bare_metal_cpuid)


@pytest.mark.parametrize("leaf", [0, 1, 7, KVM_CPUID_SIGNATURE, KVM_CPUID_FEATURES, 0x8000_0000])
def test_hidden_answers_every_leaf_like_the_cpu(leaf):
    assert vm_cpuid("hidden", leaf) == bare_metal_cpuid(leaf)


def test_the_probe_stops_at_leaf_1_without_the_hypervisor_bit():
    rec = Recorder(partial(vm_cpuid, "hidden"))
    probe(rec)
    assert rec.leaves == [(1, 0)]


def test_the_probe_reads_the_signature_then_the_features():
    rec = Recorder(partial(vm_cpuid, "kvm"))
    probe(rec)
    assert rec.leaves == [(1, 0), (KVM_CPUID_SIGNATURE, 0), (KVM_CPUID_FEATURES, 0)]


# ------------------------------------------------------- register encodings


def test_hypervisor_bit_is_ecx_bit_31_of_leaf_1():
    assert CPUID_HYPERVISOR_BIT == 1 << 31
    assert not bare_metal_cpuid(1)[2] & CPUID_HYPERVISOR_BIT
    for profile in ("kvm", "oldkvm"):
        assert vm_cpuid(profile, 1)[2] & CPUID_HYPERVISOR_BIT
    assert not vm_cpuid("hidden", 1)[2] & CPUID_HYPERVISOR_BIT


@pytest.mark.parametrize("profile", ["kvm", "oldkvm"])
def test_leaf_1_differs_from_the_cpu_only_in_the_hypervisor_bit(profile):
    eax, ebx, ecx, edx = bare_metal_cpuid(1)
    assert vm_cpuid(profile, 1) == (eax, ebx, ecx | CPUID_HYPERVISOR_BIT, edx)


@pytest.mark.parametrize("profile", ["kvm", "oldkvm"])
def test_signature_is_kvmkvmkvm_in_ebx_ecx_edx_little_endian(profile):
    eax, ebx, ecx, edx = vm_cpuid(profile, KVM_CPUID_SIGNATURE)
    assert eax == KVM_CPUID_FEATURES            # max hypervisor leaf
    assert struct.pack("<III", ebx, ecx, edx) == KVM_SIGNATURE == b"KVMKVMKVM\0\0\0"
    # The constants Linux compares against (arch/x86/include/uapi/asm/kvm_para.h users).
    assert (ebx, ecx, edx) == (0x4B4D564B, 0x564B4D56, 0x0000004D)
    assert signature(ebx, ecx, edx) == "KVMKVMKVM\\0\\0\\0"


@pytest.mark.parametrize("profile", ["kvm", "oldkvm"])
def test_feature_leaf(profile):
    eax, ebx, ecx, edx = vm_cpuid(profile, KVM_CPUID_FEATURES)
    assert eax & BASE_FEATURES == BASE_FEATURES
    assert bool(eax & COMPOSE) == (profile == "kvm")
    assert (ebx, ecx, edx) == (0, 0, 0)


def test_compose_feature_is_bit_22():
    assert KVM_FEATURE_IRQLAB_MSI_COMPOSE == 22
    assert (KVM_FEATURE_PV_EOI, KVM_FEATURE_MSI_EXT_DEST_ID) == (6, 15)


@pytest.mark.parametrize("cpuid", [bare_metal_cpuid] + [partial(vm_cpuid, p) for p in PROFILES],
                         ids=["bare"] + list(PROFILES))
def test_leaf_0_vendor_is_genuineintel_in_ebx_edx_ecx_order(cpuid):
    max_leaf, ebx, ecx, edx = cpuid(0, 0)
    assert max_leaf >= 1
    assert struct.pack("<III", ebx, edx, ecx) == b"GenuineIntel"
    assert (ebx, edx, ecx) == (0x756E6547, 0x49656E69, 0x6C65746E)    # "Genu" "ineI" "ntel"


def test_bare_metal_has_no_hypervisor_leaves():
    assert bare_metal_cpuid(KVM_CPUID_SIGNATURE) == (0, 0, 0, 0)
    assert bare_metal_cpuid(KVM_CPUID_FEATURES) == (0, 0, 0, 0)


@pytest.mark.parametrize("profile", ["kvm", "oldkvm"])
@pytest.mark.parametrize("leaf", [0, 7, 0x8000_0000])
def test_other_leaves_are_the_cpus(profile, leaf):
    assert vm_cpuid(profile, leaf) == bare_metal_cpuid(leaf)


@pytest.mark.parametrize("profile", ["", "KVM", "xen", "hyperv", "kvm ", None])
def test_unknown_profile_is_a_value_error(profile):
    with pytest.raises(ValueError, match="unknown CPUID profile"):
        vm_cpuid(profile, 1)


def test_unknown_profile_is_refused_for_any_leaf():
    with pytest.raises(ValueError, match="'bogus'"):
        vm_cpuid("bogus", 0)


# ------------------------------------------------------ the probe's logic


def test_a_foreign_hypervisor_has_no_kvm_features():
    rec = Recorder(fixed({1: (0, 0, CPUID_HYPERVISOR_BIT, 0),
                          KVM_CPUID_SIGNATURE: (0x4000_000B, *struct.unpack("<III", b"Microsoft Hv"))}))
    info = probe(rec)
    assert info.hypervisor and info.vendor == "Microsoft Hv"
    assert info.features == 0 and not info.msi_compose
    assert (KVM_CPUID_FEATURES, 0) not in rec.leaves
    assert info.describe() == "hypervisor 'Microsoft Hv' (no msi-compose hypercall)"


def test_kvm_whose_max_leaf_excludes_the_feature_leaf():
    rec = Recorder(fixed({1: (0, 0, CPUID_HYPERVISOR_BIT, 0),
                          KVM_CPUID_SIGNATURE: (KVM_CPUID_SIGNATURE, *struct.unpack("<III", KVM_SIGNATURE)),
                          KVM_CPUID_FEATURES: (COMPOSE, 0, 0, 0)}))
    info = probe(rec)
    assert info.vendor == KVM_VENDOR and info.features == 0 and not info.msi_compose
    assert (KVM_CPUID_FEATURES, 0) not in rec.leaves


def test_compose_bit_counts_only_for_kvm():
    assert not CpuidInfo(True, "Microsoft Hv", 0x4000_0001, COMPOSE).msi_compose
    assert CpuidInfo(True, KVM_VENDOR, 0x4000_0001, COMPOSE).msi_compose


def test_hypervisor_bit_without_signature_leaf():
    info = probe(fixed({1: (0, 0, CPUID_HYPERVISOR_BIT, 0)}))
    assert info.hypervisor and info.vendor == "\0" * 12
    assert info.features == 0 and not info.msi_compose
