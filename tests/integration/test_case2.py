"""Case 2 and its failure modes (DESIGN.md §5 rows 2, 2-ims, 2-oldkvm, 2-hidden, 2-legacy),
with real processes: a VF assigned to a guest, MSI-X trapped by the VMM or IMS on the VF."""

from __future__ import annotations

import pytest

IMS_DEVICE = [{"name": "d0", "total_vfs": 4, "vfs": 1, "vf_ims_slots": 8}]


def ims_row(cpuid: str, kernel: str = "modern") -> dict:
    return {"device": IMS_DEVICE,
            "guest": [{"name": "g1", "cpuid": cpuid, "kernel": kernel, "irq": "ims", "assign": ["d0.vf0"]}]}


def row_of(report: dict, os_name: str) -> dict:
    rows = [r for r in report["functions"] if r["os"] == os_name]
    assert len(rows) == 1, report["functions"]
    return rows[0]


async def test_row_2_vf_msix_trapped_and_injected_into_two_guests(start_lab):
    lab = await start_lab()   # the default: host drives the PF, g1 and g2 one VF each
    report = await lab.run_workload(per_function=500, inflight=8)
    for name, phys in (("g1", "01:00.1"), ("g2", "01:00.2")):
        r = row_of(report, name)
        assert (r["phys"], r["rid"], r["irq_mode"]) == (phys, "00:03.0", "msix"), r
        assert r["outcome"] == "delivered" and r["sent"] == r["interrupts"] == 500 and r["lost"] == 0, r
        assert r["record_missing"] == 0, r
    assert row_of(report, "host")["outcome"] == "delivered"
    assert report["fabric"]["injected"] == 1000
    assert sum(o["breaches"] for o in report["oses"].values()) == 0
    vms = report["vms"]
    assert vms["g1"]["assigned"] == {"00:03.0": "01:00.1"} and vms["g1"]["exits"]["mmio"] >= 2
    # inside the guest: a plain VECTOR -> PCI-MSIX hierarchy (the table is trapped, the guest
    # composes compatibility messages the VMM translates), the VF seen through virtual config
    views = await lab.call("g1", "views")
    assert "PCI-MSIX-0000:00:03.0" in views["domains"] and "INTEL-IR" not in views["domains"]
    assert "HCALL" in views["domains"]       # a kvm guest builds it, MSI-X does not use it
    assert "00:03.0 " in views["lspci"] and "Device 1b36:11a1" in views["lspci"]
    assert "MSI-X: Enable+ Count=4" in views["lspci"]
    assert "irqlab-engine:00:03.0" in views["proc_interrupts"]


async def test_row_2_ims_delivered_via_the_hcall_domain(start_lab):
    lab = await start_lab(ims_row("kvm"))
    report = await lab.run_workload(per_function=500, inflight=8)
    r = row_of(report, "g1")
    assert r["irq_mode"] == "ims" and r["outcome"] == "delivered", r
    assert r["sent"] == r["interrupts"] == 500 and r["lost"] == 0
    assert report["vms"]["g1"]["hypercalls"] == {"MSI_COMPOSE": 1}
    views = await lab.call("g1", "views")
    assert "HCALL-IMS-0000:00:03.0" in views["domains"], views["domains"]
    # the IMS slot holds a real remappable message whose IRTE is bound to the VF's RID
    irt = await lab.call("fabric", "irt")
    assert any(line.split()[1] == "01:00.1" for line in irt[1:]), irt


async def test_row_2_oldkvm_ims_domain_creation_fails_clearly(start_lab):
    lab = await start_lab(ims_row("oldkvm"))
    info = lab.guest_info["g1"]
    assert "no MSI compose hypercall" in info["ims_refusal"]
    report = await lab.run_workload(per_function=300, inflight=8)
    r = row_of(report, "g1")
    assert r["outcome"] == "clean error", r
    assert "cannot create irq domain 'IMS-0000:00:03.0'" in r["ims_error"]
    assert "KVM_FEATURE_IRQLAB_MSI_COMPOSE" in r["ims_error"]
    # the driver fell back to MSI-X and nothing was lost
    assert r["irq_mode"] == "msix" and r["sent"] == r["interrupts"] == 300
    assert report["vms"]["g1"]["hypercalls"] == {}


@pytest.mark.parametrize("cpuid, kernel", [("hidden", "modern"), ("kvm", "legacy2020")],
                         ids=["2-hidden", "2-legacy"])
async def test_rows_2_hidden_and_legacy_silent_loss_is_detected(start_lab, cpuid, kernel):
    lab = await start_lab(ims_row(cpuid, kernel))
    info = lab.guest_info["g1"]
    assert info["drivers"]["vf 00:03.0"] == {"irq_mode": "ims", "ims_error": ""}   # creation "succeeded"
    report = await lab.run_workload(per_function=300, inflight=8, stall_s=2.0)
    r = row_of(report, "g1")
    assert r["outcome"] == "silent loss detected", r
    assert r["interrupts"] == 0 and r["sent"] == 8, r       # inflight doorbells, then nothing
    assert report["faults"]["by_source"]["01:00.1"] == {"0x25": 8}
    assert "blocked them (fault 0x25 x8)" in r["why"]
    assert report["oses"]["g1"]["stalled"] is True
    # the guest was never told: its driver saw no error, the host's PF kept working
    assert row_of(report, "host")["outcome"] == "delivered"
    views = await lab.call("g1", "views")
    assert "HCALL" not in views["domains"]
    assert "IMS-0000:00:03.0" in views["domains"]


async def test_hostile_guest_is_refused_and_nobody_loses_anything(start_lab):
    lab = await start_lab()
    g1 = lambda action, **kw: lab.call("g1", "hostile", {"action": action, **kw})
    # 1. touch a page outside its EPT: g2's VF BAR, host-physical, as if the guest guessed it
    res = await g1("mmio-outside-ept", addr=0xE000_8000)
    assert res["read"] is None                               # UR: nothing there for g1
    # 2. DMA outside its memory through its own VF
    await g1("dma-outside-memory")
    # 3. compose an interrupt for the host's PF
    res = await g1("compose-foreign", dev=0x0100)
    assert res["ret"] == -1 and "EPERM" in res["error"], res
    report = await lab.run_workload(per_function=500, inflight=8)
    for r in report["functions"]:
        assert r["outcome"] == "delivered" and r["lost"] == 0 and r["sent"] == 500, r
    refused = report["vms"]["g1"]["refused"]
    assert any("EPT violation: write at GPA 0xe0008000" in x for x in refused), refused
    assert any("EPT violation: read at GPA 0xe0008000" in x for x in refused), refused
    assert any("compose for 01:00.0, which is not assigned to g1" in x for x in refused), refused
    assert report["vms"]["g2"]["refused_total"] == 0
    dma = report["faults"]["by_source"]["01:00.1"]
    assert dma == {"0x05": 1}, report["faults"]
    assert report["fabric"]["ept:violation"] == 2


async def test_hostile_hypercalls_get_error_codes(start_lab):
    lab = await start_lab(ims_row("kvm"))
    raw = lambda nr, a: lab.call("g1", "hostile", {"action": "hypercall-raw", "nr": nr, "a": a})
    assert (await raw(0, [])) == {"ret": 0, "v": [1, 1]}                   # version 1, compose available
    assert (await raw(99, []))["ret"] == -1000                             # -KVM_ENOSYS
    assert (await raw(1, [0x18, 0x05, 0, 0]))["ret"] == -22                # vector below 0x20
    assert (await raw(1, [0x18, 0x40, 7, 0]))["ret"] == -22                # no vCPU with APIC ID 7
    assert (await raw(1, [0x20, 0x40, 0, 0]))["ret"] == -1                 # 00:04.0 is not g1's
    assert (await raw(1, [0x18]))["ret"] == -22                            # too few arguments
    assert (await raw("x", [1]))["ret"] == -22                             # not even a number
    assert (await raw(1, [1, 2, 3, 4, 5]))["ret"] == -22                   # too many arguments
    assert (await raw(2, [0x18, 12345]))["ret"] == -1                      # free of a foreign handle
    ok = await raw(1, [0x18, 0x41, 0, 3])
    assert ok["ret"] == 0 and len(ok["v"]) == 4 and ok["v"][0] >> 20 == 0xFEE and ok["v"][0] & 0x10
    assert (await raw(2, [0x18, ok["v"][3]]))["ret"] == 0
    # quota: 64 live composes per VM, then -ENOSPC; the guest keeps working afterwards
    rets = [(await raw(1, [0x18, 0x42, 0, 0]))["ret"] for _ in range(64)]
    assert rets.count(0) == 63 and rets[-1] == -28, rets    # one compose is the driver's own
    report = await lab.run_workload(per_function=200, inflight=4)
    assert all(r["outcome"] == "delivered" for r in report["functions"]), report["functions"]
    vms = await lab.call("host", "vms")
    assert vms["g1"]["refused_total"] >= 8
