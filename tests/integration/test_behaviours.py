"""Each misbehaviour a guest can commit, with real processes: it is stopped (or absorbed), it is
counted or logged, and nobody else loses anything.  (ims-redirect, ims-steal-device,
ims-forge-device, compose-foreign, hypercall-raw, mmio-outside-ept, dma-outside-memory and
dma-into-interrupt-range are exercised in test_case2.py, test_siov.py and test_matrix.py.)"""

from __future__ import annotations

from guest.hostile import ACTIONS

ALL_TESTED = {"ims-redirect", "ims-steal-device", "ims-forge-device", "compose-foreign", "hypercall-raw", "mmio-outside-ept",
              "dma-outside-memory", "dma-into-interrupt-range", "malformed-frames", "spoof-identity",
              "replay-frames", "storm", "campaign"}


def test_every_behaviour_has_a_help_line_and_a_test():
    assert set(ACTIONS) == ALL_TESTED
    for name, (help_line, fn) in ACTIONS.items():
        assert help_line and fn.__doc__, name


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
    assert stats["functions"]["01:00.1"]["doorbells"] > 2000, stats["functions"]["01:00.1"]
    # and its work queue held it: what g1 does not consume, the device does not take
    assert stats["functions"]["01:00.1"]["wq_full"] > 0, stats["functions"]["01:00.1"]


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
