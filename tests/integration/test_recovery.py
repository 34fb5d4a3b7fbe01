"""Recovery: a guest or a device SIGKILLed mid-operation costs the others nothing; the death of
the fabric or the host stops the lab with a message naming it."""

from __future__ import annotations

import asyncio
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


async def test_guest_sigkilled_mid_workload_is_reclaimed(start_lab):
    lab = await start_lab()
    irt_before = await lab.call("fabric", "irt")
    assert any(line.split()[1] == "01:00.1" for line in irt_before[1:])
    run = asyncio.ensure_future(lab.run_workload(per_function=200_000, inflight=4, timeout_s=120))
    # let the workload get going: g1's first interrupts have been delivered
    for _ in range(200):
        counters = await lab.call("fabric", "counters")
        if counters.get("injected", 0) > 500:
            break
    os.kill(lab.children["g1"].proc.pid, signal.SIGKILL)
    ev = await wait_for(lab, lambda e: e.name == "g1" and e.kind == "reclaimed", "g1 to be reclaimed")
    reclaimed = ev.data["host"]
    assert reclaimed["vfs_reset"] == ["01:00.1"] and reclaimed["irtes"] >= 1, ev.data
    assert ev.data["fabric"]["known"] is True and ev.data["how"] == "SIGKILL"
    # the others are not disturbed: stop their run early by letting it finish a smaller one
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    report = await lab.run_workload(per_function=500, inflight=8)
    assert {r["os"] for r in report["functions"]} == {"host", "g2"}
    for r in report["functions"]:
        assert r["outcome"] == "delivered" and r["lost"] == 0 and r["sent"] == 500, r
    vms = await lab.call("host", "vms")
    assert vms["g1"]["state"] == "dead" and vms["g2"]["state"] == "running"
    irt = await lab.call("fabric", "irt")
    assert not any(line.split()[1] == "01:00.1" for line in irt[1:]), irt    # g1's IRTEs are gone
    stats = await lab.call("d0", "stats")
    vf = stats["functions"]["01:00.1"]
    assert vf["flrs"] == 1 and not vf["msix_enabled"] and not vf["bus_master"], vf


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
