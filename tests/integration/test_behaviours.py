"""Each misbehaviour a guest can commit, with real processes: it is stopped (or absorbed), it is
counted or logged, and nobody else loses anything.  (ims-redirect, compose-foreign,
hypercall-raw, mmio-outside-ept and dma-outside-memory are also exercised in test_case2.py,
test_siov.py and test_matrix.py; sigkill from a topology in test_recovery.py.)"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import signal

from fabric.ir import compose_remappable
from guest.hostile import ACTIONS
from tests.integration.launcher import ROOT, run_launch, start_held, wait_exit
from tests.integration.test_launch import project_processes

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # tests/


def untested(actions, sources: dict[str, str]) -> list[str]:
    """The behaviours whose quoted name ("name" or 'name') appears in none of ``sources``."""
    return [name for name in actions
            if not any(f'"{name}"' in text or f"'{name}'" in text for text in sources.values())]


def test_every_behaviour_has_a_help_line_and_a_test():
    sources = {}
    for path in glob.glob(os.path.join(TESTS, "**", "test_*.py"), recursive=True):
        with open(path) as f:
            sources[os.path.relpath(path, TESTS)] = f.read()
    assert "integration/test_behaviours.py" in sources and len(sources) > 10, sorted(sources)
    for name, (help_line, fn) in ACTIONS.items():
        assert help_line and fn.__doc__, name
    assert untested(ACTIONS, sources) == [], "behaviours no test file uses"
    # the check can fail: a behaviour nobody tests is named (spelt so that this file lacks it)
    fake = "-".join(("never", "tested", "xyz"))
    assert untested({**ACTIONS, fake: None}, sources) == [fake]


def test_docs_list_every_behaviour_and_nothing_else():
    """docs/misbehaviours.md has one table row per name in ACTIONS, and no row for anything else."""
    import re
    with open(os.path.join(ROOT, "docs", "misbehaviours.md")) as f:
        rows = re.findall(r"^\| (\S+) \|", f.read(), re.M)
    names = [r.strip("`") for r in rows if r not in ("name", "---")]
    assert sorted(names) == sorted(ACTIONS) and all(r.startswith("`") for r in rows if r.strip("`") in ACTIONS), rows


async def hostile(lab, action, **args):
    return await lab.call("g1", "hostile", {"action": action, **args})


def all_delivered(report):
    return all(r["outcome"] == "delivered" and r["lost"] == 0 for r in report["functions"])


async def test_malformed_frames_are_dropped_and_counted(start_lab):
    lab = await start_lab()
    before = await lab.call("fabric", "counters")
    res = await hostile(lab, "malformed-frames", count=16)
    assert res["sent"] == 17
    report = await lab.run_workload(per_function=300, inflight=8)
    assert all_delivered(report), report["functions"]
    after = await lab.call("fabric", "counters")
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in ("drop:malformed", "drop:oversized", "drop:multipart")}
    assert grew["drop:malformed"] >= 8 and grew["drop:oversized"] >= 2 and grew["drop:multipart"] == 1, grew
    peers = await lab.call("fabric", "peers")
    assert sum(peers["g1"]["drops"].values()) >= 12 and not peers["g2"]["drops"], peers


async def test_spoofed_identities_are_stamped_or_refused(start_lab):
    lab = await start_lab()
    before = await lab.call("fabric", "counters")
    res = await hostile(lab, "spoof-identity")
    assert len(res["sent"]) == 8
    report = await lab.run_workload(per_function=300, inflight=8)
    assert all_delivered(report), report["functions"]          # the host was not shut down either
    after = await lab.call("fabric", "counters")
    assert after.get("drop:unauthorized", 0) - before.get("drop:unauthorized", 0) >= 6   # HELLO, INJECT,
    # REG, VMENTRY, CTL, CfgRd: none of them is a guest's to send
    vms = await lab.call("host", "vms")
    # the VM exit that claimed to be g2's was stamped g1's
    assert vms["g1"]["hypercalls"].get("QUERY_FEATURES") == 1 and vms["g2"]["hypercalls"] == {}
    # the interrupt "from 01:00.2" was a CPU store to an unmapped guest-physical page
    assert any("EPT violation: write at GPA 0xfee00018" in x for x in vms["g1"]["refused"]), vms["g1"]["refused"]


async def test_replayed_frames_do_no_harm(start_lab):
    lab = await start_lab()
    await lab.run_workload(per_function=100, inflight=4)
    res = await hostile(lab, "replay-frames", count=32)
    assert res["replayed"] == 32
    # The replayed doorbells' interrupts are still on their way: a short run rings after them
    # on the same path (g1 -> fabric -> device -> host -> g1, each hop in order), so once it
    # completes they have all arrived and cannot be counted in the run we judge.
    await lab.run_workload(per_function=50, inflight=4)
    report = await lab.run_workload(per_function=300, inflight=8)
    for r in report["functions"]:
        assert r["lost"] == 0 and r["record_missing"] == 0 and r["outcome"] == "delivered", r
    assert report["oses"]["g2"]["breaches"] == 0


async def test_storm_from_one_vm_loses_nothing_for_the_others(start_lab):
    lab = await start_lab({"guest": [{"name": "g1", "assign": ["d0.vf0"], "behaviours": ["storm"]},
                                     {"name": "g2", "assign": ["d0.vf1"]}]})
    report = await lab.run_workload(per_function=500, inflight=4)
    rows = {r["os"]: r for r in report["functions"]}
    assert rows["g2"]["outcome"] == "delivered" and rows["g2"]["lost"] == 0, rows["g2"]
    assert rows["host"]["outcome"] == "delivered" and rows["host"]["lost"] == 0
    # the storm really happened (the topology's behaviour ran with the workload)
    stats = await lab.call("d0", "stats")
    assert stats["functions"]["01:00.1"]["doorbells"] > 64, stats["functions"]["01:00.1"]
    # and its work queue held it: what g1 does not consume, the device does not take
    assert stats["functions"]["01:00.1"]["wq_full"] > 0, stats["functions"]["01:00.1"]
    # the device told the fabric whose stores those were, and the fabric throttled g1 alone
    peers = await lab.call("fabric", "peers")
    assert peers["g1"]["wasted"] > 0 and peers["g1"]["throttles"] > 0, peers["g1"]
    assert peers["g2"]["wasted"] == 0 and peers["g2"]["throttles"] == 0, peers["g2"]
    assert not peers["g1"]["drops"], peers["g1"]           # held, never dropped


async def test_topology_behaviours_run_with_each_workload(start_lab):
    lab = await start_lab({"guest": [{"name": "g1", "assign": ["d0.vf0"],
                                      "behaviours": ["compose-foreign", "mmio-outside-ept", "malformed-frames"]},
                                     {"name": "g2", "assign": ["d0.vf1"]}]})
    report = await lab.run_workload(per_function=200, inflight=4)
    assert all_delivered(report), report["functions"]
    vms = await lab.call("host", "vms")
    assert any("not assigned to g1" in x for x in vms["g1"]["refused"])
    assert any("EPT violation" in x for x in vms["g1"]["refused"])


async def test_campaign_of_random_misbehaviours_hurts_nobody_else(start_lab):
    lab = await start_lab({"device": [{"name": "d0", "total_vfs": 4, "vfs": 2, "vf_ims_slots": 8}],
                           "guest": [{"name": "g1", "assign": ["d0.vf0"], "irq": "ims"},
                                     {"name": "g2", "assign": ["d0.vf1"], "irq": "ims"}]})
    res = await hostile(lab, "campaign", count=2000, seed=7, hypercall_every=100)
    assert res["total"] == 2000 and res["tried"]["hypercall"] == 20 and len(res["tried"]) >= 6, res
    report = await lab.run_workload(per_function=300, inflight=8, oses=["host", "g2"])
    for r in report["functions"]:
        assert r["outcome"] == "delivered" and r["lost"] == 0, r
    assert all(o["breaches"] == 0 for o in report["oses"].values())
    assert report["deaths"] == []
    assert report["faults"]["by_source"]["01:00.1"], report["faults"]     # the IR unit saw the forgeries


def irt_entries(irt: list[str]) -> dict[int, str]:
    """The fabric's IRT dump: IRTE index -> source-id it validates."""
    return {int(line.split()[0]): line.split()[1] for line in irt[1:]}


async def test_ims_steal_device_on_a_vf_is_caught_by_the_source_id_check(start_lab):
    """VF IMS (row 2-ims): the slot page is the guest's, so the stolen handle leaves the device
    with the VF's RID -- and the victim's IRTE validates another source: fault 0x26 at the
    victim's IRTE index, nothing reaches the victim, and both go on working."""
    lab = await start_lab({"device": [{"name": "d0", "total_vfs": 4, "vfs": 2, "vf_ims_slots": 8}],
                           "guest": [{"name": "g1", "assign": ["d0.vf0"], "irq": "ims"},
                                     {"name": "g2", "assign": ["d0.vf1"], "irq": "ims"}]})
    vms = await lab.call("host", "vms")
    (victim,) = [b["irte"] for b in vms["g2"]["irte_bindings"]]
    assert irt_entries(await lab.call("fabric", "irt"))[victim] == "01:00.2"
    res = await hostile(lab, "ims-steal-device", handle=victim)
    assert res == {"slot": 0, "handle": victim, "restored": True}, res
    faults = await lab.call("fabric", "faults")
    assert faults["by_source"] == {"01:00.1": {"0x26": 1}}, faults
    assert any(line.startswith(f"DMAR: [INTR-REMAP] Request device [01:00.1] fault index 0x{victim:x} "
                               "[fault reason 0x26]") for line in faults["lines"]), faults["lines"]
    report = await lab.run_workload(per_function=300, inflight=8)
    assert all_delivered(report), report["functions"]
    assert all(o["breaches"] == 0 for o in report["oses"].values()), report["oses"]


async def test_ims_steal_device_in_a_trapped_adi_slot_is_refused_by_the_vmm(start_lab):
    """Case 4 (device IMS of a non-tagging SIOV device, slot page trapped): the VMM writes only
    pairs it composed, so the stolen one never reaches the device -- it logs "a pair the VMM
    did not compose" and keeps the real slot masked: the doorbell's interrupt waits there,
    pending, and nothing reaches the IR unit."""
    lab = await start_lab({"device": [{"name": "v0", "kind": "siov", "adis": 2, "ims": "device",
                                       "pasid_interrupts": False}],
                           "guest": [{"name": "g1", "assign": ["v0.adi0"], "irq": "ims"},
                                     {"name": "g2", "assign": ["v0.adi1"], "irq": "ims"}]})
    vms = await lab.call("host", "vms")
    (own,) = vms["g1"]["irte_bindings"]
    (victim,) = [b["irte"] for b in vms["g2"]["irte_bindings"]]
    assert own["kind"] == "fake", own
    res = await hostile(lab, "ims-steal-device", handle=victim, restore=False)
    assert res == {"slot": 0, "handle": victim, "restored": False}, res
    lo, hi, data = compose_remappable(victim, 0, shv=True)
    vms = await lab.call("host", "vms")
    assert [x for x in vms["g1"]["refused"] if "did not compose" in x] == [
        f"IMS slot 0 of 00:03.0: a pair the VMM did not compose (0x{hi:x}_{lo:08x}/0x{data:x}); "
        "the real slot stays masked"], vms["g1"]["refused"]
    stats = await lab.call("v0", "stats")
    (slot,) = [s for s in stats["adis"][0]["ims"] if s["slot"] == 0]
    assert slot["masked"] and slot["pending"], slot
    handle = (slot["address"] >> 5) & 0x7FFF | ((slot["address"] >> 2) & 1) << 15
    assert handle == own["irte"] != victim, (slot, own)          # still the VMM's pair
    assert (await lab.call("fabric", "faults"))["by_source"] == {}
    report = await lab.run_workload(per_function=300, inflight=8, oses=["host", "g2"])
    assert all_delivered(report), report["functions"]
    assert all(o["breaches"] == 0 for o in report["oses"].values()), report["oses"]


async def test_dma_into_interrupt_range_reaches_the_irte_checks_with_dword_records(start_lab):
    """The 16-byte completion record is no interrupt request (0x20); one DWORD of the guest's
    choosing is, and the IRTE checks stop it: 0x26 at another VM's IRTE (source-id), 0x22 at a
    free one, 0x25 in compatibility format.  Nobody receives anything, and nobody loses anything."""
    lab = await start_lab()
    irt = irt_entries(await lab.call("fabric", "irt"))
    victim = min(i for i, sid in irt.items() if sid == "01:00.2")       # g2's VF's MSI-X entry
    free = max(irt) + 1
    res = await hostile(lab, "dma-into-interrupt-range", handle=victim)
    lo, _hi, _data = compose_remappable(victim, 0, shv=True)
    assert res == {"writes": [{"addr": 0xFEE0_0000, "bytes": 16}, {"addr": lo, "data": 0, "bytes": 4}]}, res
    await hostile(lab, "dma-into-interrupt-range", handle=free, record=False)
    await hostile(lab, "dma-into-interrupt-range", record=False, addr=0xFEE0_0000, data=0x41)
    faults = await lab.call("fabric", "faults")
    assert faults["by_source"] == {"01:00.1": {"0x20": 1, "0x22": 1, "0x25": 1, "0x26": 1}}, faults
    lines = faults["lines"]
    for index, reason in ((0, 0x20), (victim, 0x26), (free, 0x22), (0, 0x25)):
        assert any(line.startswith(f"DMAR: [INTR-REMAP] Request device [01:00.1] fault index 0x{index:x} "
                                   f"[fault reason 0x{reason:02x}]") for line in lines), (index, reason, lines)
    report = await lab.run_workload(per_function=300, inflight=8)
    assert all_delivered(report), report["functions"]
    assert all(o["breaches"] == 0 for o in report["oses"].values()), report["oses"]


async def test_sigkill_mid_operation_is_reclaimed_and_costs_the_others_nothing(start_lab):
    """``sigkill``: the guest answers, works (doorbells, compose hypercalls) and SIGKILLs itself
    with a hypercall and a doorbell in flight.  The host takes back every IRTE it held --
    including those it composed just before dying -- FLRs its VF and drops its EPT, IOMMU
    domain and RAM window; the host and g2 then lose nothing."""
    lab = await start_lab()
    irt = irt_entries(await lab.call("fabric", "irt"))
    g1_msix = [i for i, sid in irt.items() if sid == "01:00.1"]
    assert g1_msix, irt
    res = await hostile(lab, "sigkill", after=48)
    assert res == {"pid": lab.children["g1"].proc.pid, "after": 48, "functions": ["vf 00:03.0"],
                   "then": "SIGKILL, with a hypercall and a doorbell in flight"}, res
    ev = await lab.wait_event(lambda e: e.name == "g1" and e.kind == "reclaimed", "g1 to die and be reclaimed",
                              timeout=120)
    assert ev.data["how"] == "SIGKILL" and ev.data["fabric"]["known"] is True, ev.data
    vms = await lab.call("host", "vms")
    composes = vms["g1"]["hypercalls"].get("MSI_COMPOSE", 0)
    assert 6 <= composes <= 7, vms["g1"]["hypercalls"]   # every 8th of 48, + the one in flight if it arrived
    reclaimed = ev.data["host"]
    assert reclaimed["irtes"] == len(g1_msix) + composes, (reclaimed, composes)
    assert reclaimed["vfs_reset"] == ["01:00.1"] and reclaimed["ept"] is True, reclaimed
    assert isinstance(reclaimed["iommu_domain"], int) and reclaimed["ram_window"][1] == 16 << 20, reclaimed
    assert vms["g1"]["state"] == "dead" and vms["g1"]["reclaimed"] == reclaimed and vms["g2"]["state"] == "running"
    after = irt_entries(await lab.call("fabric", "irt"))
    assert "01:00.1" not in after.values() and len(after) == len(irt) - len(g1_msix), (irt, after)
    vf = (await lab.call("d0", "stats"))["functions"]["01:00.1"]
    assert vf["flrs"] == 1 and not vf["msix_enabled"] and not vf["bus_master"], vf
    assert vf["doorbells"] >= 48 - 6, vf                        # its doorbells reached the device
    report = await lab.run_workload(per_function=500, inflight=8)
    assert {r["os"] for r in report["functions"]} == {"host", "g2"}
    for r in report["functions"]:
        assert r["outcome"] == "delivered" and r["lost"] == 0 and r["sent"] == 500, r
    assert [d["name"] for d in report["deaths"]] == ["g1"]


async def test_sigkill_through_launch_py_ctl():
    """The documented way: ``launch.py ctl g1 hostile '{"action": "sigkill"}'`` on a held
    topology answers (exit 0, what it will do), the guest dies, the host marks the VM dead,
    the other guest still answers, and Ctrl-C still takes everything down."""
    proc, runtime, _ = await start_held("--per-function", "100")
    kids = []
    try:
        kids = [pid for pid, (ppid, _) in project_processes().items() if ppid == proc.pid]
        rc, out, err = await run_launch("ctl", "--runtime", runtime, "g1", "hostile", '{"action": "sigkill"}')
        assert rc == 0, err
        res = json.loads(out)
        assert res["after"] == 64 and res["pid"] in kids and res["functions"] == ["vf 00:03.0"], res
        await wait_exit(res["pid"], 120, "it was to SIGKILL itself")
        # g1 is gone: asking it fails -- once the fabric has forgotten it (peer.gone), and the
        # launcher sends the host vm.died right after that answer, before it relays another request
        rc, out, err = await run_launch("ctl", "--runtime", runtime, "g1", "status")
        assert rc == 3 and ("g1 is gone" in err or "no such peer 'g1'" in err), (rc, out, err)
        rc, out, err = await run_launch("ctl", "--runtime", runtime, "host", "vms")
        assert rc == 0, err
        vms = json.loads(out)
        assert vms["g1"]["state"] == "dead" and vms["g2"]["state"] == "running", vms
        rc, out, err = await run_launch("ctl", "--runtime", runtime, "g2", "status")
        assert rc == 0 and list(json.loads(out)["functions"]) == ["vf 00:03.0"], (out, err)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError("launch.py still running 60 s after Ctrl-C") from None
    assert runtime is not None and not os.path.exists(runtime)
    alive = [pid for pid in kids if pid in project_processes()]
    assert alive == [], alive
