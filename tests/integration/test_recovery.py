"""Recovery: a guest or a device SIGKILLed mid-operation costs the others nothing; the death of
the fabric or the host stops the lab with a message naming it."""

from __future__ import annotations

import os
import signal

import pytest

from irqlab.lab import LabError

TWO_DEVICES = {
    "device": [{"name": "d0", "total_vfs": 2, "vfs": 1}, {"name": "d1", "total_vfs": 2, "vfs": 1}],
    "guest": [{"name": "g1", "assign": ["d0.vf0"]}, {"name": "g2", "assign": ["d1.vf0"]}],
}


async def wait_for(lab, pred, what: str, timeout: float = 60):
    return await lab.wait_event(pred, what, timeout=timeout)


#: A SIOV guest next to another: each has an ADI of a PASID-tagging memory-IMS device (case 3:
#: PASID-bound IRTEs) and a VF with IMS (row 2-ims); g1 commits ``sigkill`` at the start of
#: the workload run, so it dies in the middle of it.
SIOV_KILL = {
    "platform": {"pasid_ir": True},
    "device": [{"name": "d0", "kind": "sriov", "total_vfs": 2, "vfs": 2, "vf_ims_slots": 8},
               {"name": "m0", "kind": "siov", "adis": 2, "ims": "memory", "pasid_interrupts": True}],
    "guest": [{"name": "g1", "irq": "ims", "assign": ["m0.adi0", "d0.vf0"], "behaviours": ["sigkill"]},
              {"name": "g2", "irq": "ims", "assign": ["m0.adi1", "d0.vf1"]}],
}


def irt_entries(irt: list[str]) -> dict[int, tuple[str, str]]:
    """The fabric's IRT dump: IRTE index -> (source-id, PASID it is bound to or '-')."""
    return {int(line.split()[0]): (line.split()[1], line.split()[-1]) for line in irt[1:]}


async def test_guest_sigkilled_mid_workload_is_reclaimed(start_lab):
    """g1 (an ADI and a VF) SIGKILLs itself in the middle of a workload run.  In that very run
    the host and g2 lose nothing; then g1's IRTEs (those composed before the run and during
    it), its PASID, its ADI (reset) and VF (FLR), its EPT, IOMMU domain and RAM window are
    all taken back, and the others keep working on the same devices."""
    per = 3000
    lab = await start_lab(SIOV_KILL)
    vms = await lab.call("host", "vms")
    g1 = vms["g1"]
    assert sorted(g1["assigned"].values()) == ["01:00.1", "02:00.0 ADI 0"], g1["assigned"]
    (pasid,) = g1["pasids"].values()
    assert {b["pasid"] for b in g1["irte_bindings"]} == {pasid, None}, g1["irte_bindings"]   # ADI, VF
    g1_irtes = {b["irte"] for b in g1["irte_bindings"]}
    composes_before = g1["hypercalls"].get("MSI_COMPOSE", 0)
    irt = irt_entries(await lab.call("fabric", "irt"))
    assert {irt[i][0] for i in g1_irtes} == {"01:00.1", "02:00.0"}, irt
    m0 = (await lab.call("m0", "stats"))["adis"]
    assert m0[0]["enabled"] and m0[0]["pasid_enable"] and m0[0]["mem_ims_enable"], m0[0]

    report = await lab.run_workload(per_function=per, inflight=8, timeout_s=300)

    # g1 died in that run, in the middle of its own work ...
    assert [(d["name"], d["how"]) for d in report["deaths"]] == [("g1", "SIGKILL")], report["deaths"]
    assert report["oses"]["g1"]["died"] is True
    vf_stats = (await lab.call("d0", "stats"))["functions"]["01:00.1"]
    assert 0 < vf_stats["doorbells"] < per, vf_stats        # it had not finished its workload
    # ... and the host and g2 lost nothing in that very run
    assert {r["os"] for r in report["functions"]} == {"host", "g2"}
    for r in report["functions"]:
        assert r["outcome"] == "delivered" and r["lost"] == 0 and r["sent"] == r["interrupts"] == per, r
    assert all(o["breaches"] == 0 for name, o in report["oses"].items() if name != "g1"), report["oses"]

    ev = await lab.wait_event(lambda e: e.name == "g1" and e.kind == "reclaimed", "g1 to be reclaimed",
                              timeout=120)
    assert ev.data["fabric"]["known"] is True and "error" not in ev.data, ev.data
    reclaimed = ev.data["host"]
    vms = await lab.call("host", "vms")
    composed_while_dying = vms["g1"]["hypercalls"].get("MSI_COMPOSE", 0) - composes_before
    assert composed_while_dying >= 1, vms["g1"]["hypercalls"]
    assert reclaimed["irtes"] == len(g1_irtes) + composed_while_dying, (reclaimed, composed_while_dying)
    assert reclaimed["pasids"] == [pasid] and reclaimed["adis_reset"] == ["02:00.0 ADI 0"], reclaimed
    assert reclaimed["vfs_reset"] == ["01:00.1"], reclaimed
    assert reclaimed["ept"] is True and isinstance(reclaimed["iommu_domain"], int), reclaimed
    assert reclaimed["ram_window"][1] == 16 << 20, reclaimed
    assert vms["g1"]["state"] == "dead" and vms["g2"]["state"] == "running", vms
    # the IRT: none of g1's entries, none bound to its PASID, and nothing it composed while
    # dying was left behind (exactly its entries from before the run are gone)
    after = irt_entries(await lab.call("fabric", "irt"))
    assert set(after) == set(irt) - g1_irtes, (irt, after)
    assert f"0x{pasid:x}" not in {p for _, p in after.values()} and "01:00.1" not in {s for s, _ in after.values()}
    # the ADI was reset (its PASID and memory IMS off) and is free; the VF was FLRed
    adi0 = (await lab.call("m0", "stats"))["adis"][0]
    assert not (adi0["enabled"] or adi0["pasid_enable"] or adi0["mem_ims_enable"]), adi0
    assert adi0["resets"] >= 1 and adi0["dma_pasid"] is None, adi0
    assert "  ADI 0: owner free, PASID -," in (await lab.call("host", "views"))["adis"]
    vf = (await lab.call("d0", "stats"))["functions"]["01:00.1"]
    assert vf["flrs"] == 1 and not vf["msix_enabled"] and not vf["bus_master"], vf
    # asked again, the host has nothing more to take back
    assert await lab.call("host", "vm.died", {"name": "g1"}) == {"known": True}

    # the others go on, on the same PF (g2's ADI) and the same SR-IOV device (g2's VF)
    report = await lab.run_workload(per_function=300, inflight=8)
    for r in report["functions"]:
        assert r["outcome"] == "delivered" and r["lost"] == 0 and r["sent"] == 300, r


async def test_device_sigkilled_gives_its_guests_a_clear_error(start_lab):
    lab = await start_lab(TWO_DEVICES)
    os.kill(lab.children["d0"].proc.pid, signal.SIGKILL)
    ev = await wait_for(lab, lambda e: e.name == "d0" and e.kind == "reclaimed", "d0's removal to be handled")
    assert ev.data["fabric"]["buses"] == [1]
    assert ev.data["host"]["told"] == ["g1:00:03.0"]
    report = await lab.run_workload(per_function=300, inflight=8, stall_s=2.0)
    rows = {(r["os"], r["phys"]): r for r in report["functions"]}
    g1 = rows[("g1", "01:00.1")]
    assert g1["outcome"] == "clean error" and "surprise removal" in g1["why"], g1
    assert rows[("host", "01:00.0")]["outcome"] == "clean error"
    assert rows[("g2", "02:00.1")]["outcome"] == "delivered" and rows[("host", "02:00.0")]["outcome"] == "delivered"
    assert not report["timed_out"]
    # nothing hangs: a config read of the dead device completes (UR, all ones)
    views = await lab.call("g1", "views")
    assert "surprise removal" in views["dmesg"]


@pytest.mark.parametrize("victim", ["fabric", "host"])
async def test_death_of_fabric_or_host_names_it(start_lab, victim):
    lab = await start_lab({"guest": []})
    os.kill(lab.children[victim].proc.pid, signal.SIGKILL)
    with pytest.raises(LabError, match=rf"{victim} '{victim}' was killed by SIGKILL"):
        await lab.run_workload(per_function=100, inflight=4)
