"""Posted interrupts with real processes (issue 7, item 2): the IR unit posts an assigned VF's
interrupts straight into its VM's vCPU descriptor, without the host on the path; SN holds them
in PIR while the vCPU is descheduled; injection stays available per VM on the same platform."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal

import pytest

from irqlab.lab import LabError
from tests.integration.launcher import run_launch, start_held

#: the default topology (host drives the PF; g1, 2 vCPUs, has d0.vf0; g2 has d0.vf1) on a
#: platform with posted interrupts: both guests default to posted delivery
POSTED = {"platform": {"posted": True}}
N = 400


def row_of(report: dict, os_name: str) -> dict:
    rows = [r for r in report["functions"] if r["os"] == os_name]
    assert len(rows) == 1, report["functions"]
    return rows[0]


def descriptors(pids: dict, vm: str) -> list[dict]:
    return [d for d in pids.values() if d["vm"] == vm]


def rendered(report: dict) -> str:
    from rich.console import Console

    from irqlab.report import render
    console = Console(file=io.StringIO(), width=200)
    render(report, console)
    return console.file.getvalue()


async def test_posted_delivery_reaches_every_guest_without_the_host(start_lab):
    lab = await start_lab(POSTED)
    vms = await lab.call("host", "vms")
    assert {n: (v["delivery"], len(v["posted_descriptors"])) for n, v in vms.items()} == {
        "g1": ("posted", 2), "g2": ("posted", 1)}, vms
    report = await lab.run_workload(per_function=N, inflight=8)
    for name in ("g1", "g2"):
        r = row_of(report, name)
        assert r["outcome"] == "delivered" and r["sent"] == r["interrupts"] == N and r["lost"] == 0, r
        assert r["record_missing"] == 0, r          # every completion record landed before its interrupt
        vm = report["vms"][name]
        # the host is not on the path: it injected nothing, and its VF's IRTE is in posted format
        assert vm["delivery"] == "posted" and vm["injected"] == 0 and vm["posted_irtes"] == 1, vm
    fabric = report["fabric"]
    assert fabric.get("injected", 0) == 0, fabric
    assert fabric["irq:posted"] == 2 * N, fabric
    # the host took only its own PF's interrupts: none of the guests' passed through its CPUs
    host = row_of(report, "host")
    assert host["outcome"] == "delivered" and report["oses"]["host"]["irqs_received"] == host["interrupts"] == N
    assert sum(o["breaches"] for o in report["oses"].values()) == 0
    pids = await lab.call("fabric", "pids")
    for name in ("g1", "g2"):
        mine = descriptors(pids, name)
        assert sum(d["posted"] for d in mine) == N, mine
        assert all(not d["sn"] and not d["on"] and d["pir"] == [] for d in mine), mine
    # the IRT shows the guests' VF entries in posted format, the host's PF entries remapped
    irt = await lab.call("fabric", "irt")
    modes = {(line.split()[1], line.split()[9]) for line in irt[1:]}
    assert ("01:00.1", "posted") in modes and ("01:00.2", "posted") in modes, irt
    assert ("01:00.0", "remapped") in modes and ("01:00.0", "posted") not in modes, irt
    # the report and the host's views say how each VM gets its interrupts
    text = rendered(report)
    assert "g1: interrupt delivery posted (IR unit -> vCPU descriptors, the host not on the path); 0 injected" \
        in text, text
    views = await lab.call("host", "views")
    assert "g2: running, 1 vCPUs, interrupt delivery posted (1 IRTEs posted into descriptors vCPU0" \
        in views["vms"], views["vms"]
    assert "kvm g1: posted interrupts, descriptors vCPU0 0x" in views["dmesg"], views["dmesg"]


async def test_descheduled_vcpu_holds_posted_interrupts_in_pir_until_it_runs(start_lab):
    lab = await start_lab(POSTED)
    inflight = 8
    res = await lab.call("host", "vcpu.deschedule", {"vm": "g1"})          # both of g1's vCPUs
    empty = {"pending": 0, "pir": [], "held": 0}
    assert res == {"vm": "g1", "running": False, "vcpus": {"0": empty, "1": empty}}, res
    before = (await lab.call("g1", "stats"))["os"]["irqs_received"]
    # g1 rings `inflight` doorbells; each completes with a DMA record and a posted interrupt
    # that SN holds in PIR.  stall_s: the guest must not give up while it is descheduled.
    run = asyncio.ensure_future(lab.run_workload(per_function=N, inflight=inflight, oses=["g1"],
                                                 stall_s=120))
    try:
        ev = await lab.wait_event(
            lambda e: e.name == "fabric" and e.kind == "posted-held" and e.data["vm"] == "g1"
            and e.data["held"] == inflight,
            f"the fabric to hold all {inflight} postings for g1's descheduled vCPU", timeout=120)
        vcpu, vector = ev.data["vcpu"], ev.data["pir"][0]
        assert ev.data["pir"] == [vector], ev.data                        # one vector, one PIR bit
        # nothing was delivered: g1 took no interrupt, consumed no completion
        stats = await lab.call("g1", "stats")
        assert stats["os"]["irqs_received"] == before, stats["os"]
        (fn,) = stats["functions"].values()
        assert fn["doorbells"] == inflight and fn["completed"] == 0 and fn["interrupts"] == 0, fn
        (pid,) = [d for d in descriptors(await lab.call("fabric", "pids"), "g1") if d["vcpu"] == vcpu]
        assert pid["sn"] and not pid["on"] and pid["pir"] == [vector], pid
        assert (pid["posted"], pid["suppressed"], pid["merged"], pid["notified"]) == (
            inflight, inflight, inflight - 1, 0), pid
        assert not run.done()
        # the vCPU runs again: one notification carries the bit that absorbed the postings
        res = await lab.call("host", "vcpu.schedule", {"vm": "g1"})
        assert res["vcpus"][str(vcpu)] == {"pending": 1, "pir": [vector], "held": inflight}, res
        async with asyncio.timeout(180):
            report = await run
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    r = row_of(report, "g1")
    # all delivered, none lost, completions in order (each record visible before its interrupt)
    assert r["outcome"] == "delivered" and r["sent"] == r["interrupts"] == r["delivered"] == N, r
    assert r["lost"] == 0 and r["record_missing"] == 0, r
    # the held postings were taken as one interrupt: inflight - 1 of them coalesced, not lost.
    # Running, postings that reach the fabric in one bus message are coalesced the same way (one
    # notification per message): every posting is an interrupt taken or one coalesced into it.
    g1 = report["oses"]["g1"]
    assert g1["posted_coalesced"] >= inflight - 1, g1
    assert g1["irqs_received"] - before + g1["posted_coalesced"] == N, (before, g1)
    assert report["vms"]["g1"]["injected"] == 0 and report["vms"]["g1"]["descheduled"] == []
    (pid,) = [d for d in descriptors(await lab.call("fabric", "pids"), "g1") if d["vcpu"] == vcpu]
    assert not pid["sn"] and pid["pir"] == [] and pid["posted"] == N and pid["suppressed"] == inflight, pid
    views = await lab.call("host", "views")
    assert "kvm g1: vCPU 0, 1 descheduled (SN set)" in views["dmesg"], views["dmesg"]
    assert "kvm g1: vCPU 0, 1 scheduled (SN clear)" in views["dmesg"], views["dmesg"]


async def test_injection_stays_available_per_vm_on_a_posted_platform(start_lab):
    lab = await start_lab({**POSTED, "guest": [
        {"name": "g1", "cpus": 2, "assign": ["d0.vf0"], "delivery": "injection"},
        {"name": "g2", "assign": ["d0.vf1"]}]})                           # g2: posted (the default)
    report = await lab.run_workload(per_function=N, inflight=8, oses=["g1", "g2"])
    for name in ("g1", "g2"):
        r = row_of(report, name)
        assert r["outcome"] == "delivered" and r["sent"] == r["interrupts"] == N and r["lost"] == 0, r
        assert r["record_missing"] == 0, r
    vms = report["vms"]
    assert (vms["g1"]["delivery"], vms["g1"]["injected"], vms["g1"]["posted_descriptors"]) == ("injection", N, {})
    assert (vms["g2"]["delivery"], vms["g2"]["injected"]) == ("posted", 0), vms["g2"]
    assert report["fabric"]["injected"] == N and report["fabric"]["irq:posted"] == N, report["fabric"]
    assert [d["vm"] for d in (await lab.call("fabric", "pids")).values()] == ["g2"]
    text = rendered(report)
    assert f"g1: interrupt delivery injection (host vector -> injected by the VMM); {N} injected" in text, text
    # (de)scheduling is about posted descriptors: refused, one line each, for what does not apply
    for args, why in (({"vm": "g1"}, "g1 uses injection delivery"),
                      ({"vm": "g9"}, "no VM named 'g9' (VMs: g1, g2)"),
                      ({"vm": "g2", "vcpu": 1}, "g2 has no vCPU 1 (vCPUs 0..0)"),
                      ({"vm": "g2", "vcpu": True}, "g2 has no vCPU True")):
        with pytest.raises(LabError) as info:
            await lab.call("host", "vcpu.deschedule", args)
        assert why in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert (await lab.call("host", "vms"))["g2"]["descheduled"] == []


async def test_interrupt_generator_delivers_every_interrupt_on_each_path(start_lab):
    """The engine's interrupt generator (workload ``burst``, IRQ_BURST): every completion raises
    its interrupt B times.  Each path delivers all of them -- the host's PF (case 1), g1 by
    injection, g2 posted -- after their records; a later run at burst 1 keeps the record check."""
    lab = await start_lab({**POSTED, "device": [{"name": "d0", "vfs": 2, "irq_generator": True}], "guest": [
        {"name": "g1", "cpus": 2, "assign": ["d0.vf0"], "delivery": "injection"},
        {"name": "g2", "assign": ["d0.vf1"]}]})
    items, burst = 60, 16
    report = await lab.run_workload(per_function=items, inflight=4, burst=burst)
    for name in ("host", "g1", "g2"):
        r = row_of(report, name)
        assert r["outcome"] == "delivered" and r["burst"] == burst, r
        assert r["sent"] == r["interrupts"] == items * burst and r["delivered"] == items and r["lost"] == 0, r
        assert r["record_missing"] == 0, r
    assert report["vms"]["g1"]["injected"] == items * burst, report["vms"]["g1"]
    assert report["vms"]["g2"]["injected"] == 0 and report["fabric"]["irq:posted"] == items * burst
    # injection runs the handler once per interrupt; postings that find their PIR bit set (or
    # arrive in one message) merge into one run that consumes their work
    assert row_of(report, "g1")["handled"] == items * burst
    assert 1 <= row_of(report, "g2")["handled"] <= items * burst
    assert report["oses"]["g2"]["posted_coalesced"] == items * burst - row_of(report, "g2")["handled"]
    report = await lab.run_workload(per_function=50, inflight=4)
    for name in ("host", "g1", "g2"):
        r = row_of(report, name)
        assert r["outcome"] == "delivered" and r["burst"] == 1 and r["sent"] == r["interrupts"] == 50, r
        assert r["record_missing"] == 0, r


async def test_adis_post_too_cases_3_and_4(start_lab):
    """Messages composed by hypercall post as well: case 3 (memory IMS, PASID-checked IRTE) and
    case 4 (device IMS, the VMM's fake pair translated into the trapped slot)."""
    from irqlab.topology import Topology, load
    d = load(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "siov.toml")).to_dict()
    d["platform"]["posted"] = True
    d["guest"] = d["guest"][:2]                          # g1, g2: one ADI of each device each
    lab = await start_lab(Topology.from_dict(d, source="siov, posted"))
    report = await lab.run_workload(per_function=200, inflight=8, oses=["g1", "g2"])
    rows = [r for r in report["functions"] if r["os"] in ("g1", "g2")]
    assert sorted(r["irq_mode"] for r in rows) == ["ims", "ims", "ims-memory", "ims-memory"], rows
    for r in rows:
        assert r["outcome"] == "delivered" and r["sent"] == r["interrupts"] == 200 and r["lost"] == 0, r
        assert r["record_missing"] == 0 and r["breaches"] == 0, r
    for name in ("g1", "g2"):
        vm = report["vms"][name]
        assert (vm["delivery"], vm["injected"], vm["posted_irtes"]) == ("posted", 0, 2), vm
        assert sorted(b["kind"] for b in vm["irte_bindings"]) == ["fake", "remapped"], vm["irte_bindings"]
    assert report["fabric"]["irq:posted"] == 800 and report["fabric"].get("injected", 0) == 0


async def test_launch_ctl_deschedules_and_schedules_a_vcpu(tmp_path):
    """The same control ops from a shell: ``launch.py run --hold`` then ``launch.py ctl``."""
    async def ctl(*args: str) -> tuple[int, str, str]:
        return await run_launch(*args, timeout=60)

    topo = tmp_path / "posted.toml"
    topo.write_text('[platform]\nposted = true\n[[device]]\nname = "d0"\n'
                    '[[guest]]\nname = "g1"\nassign = ["d0.vf0"]\n')
    proc, runtime, _ = await start_held(str(topo), "--per-function", "100")
    try:
        rc, out, err = await ctl("ctl", "--runtime", runtime, "host", "vcpu.deschedule", '{"vm": "g1"}')
        assert rc == 0 and json.loads(out)["vcpus"] == {"0": {"pending": 0, "pir": [], "held": 0}}, (out, err)
        rc, out, err = await ctl("ctl", "--runtime", runtime, "fabric", "pids")
        (pid,) = json.loads(out).values()
        assert rc == 0 and pid["vm"] == "g1" and pid["sn"] is True and pid["posted"] == 100, (out, err)
        rc, out, err = await ctl("views", "--runtime", runtime, "host", "--only", "vms")
        assert rc == 0 and "g1: running, 1 vCPUs, interrupt delivery posted" in out, (out, err)
        assert "vCPU0 0x7f000000 [descheduled: SN]" in out, out
        rc, out, err = await ctl("ctl", "--runtime", runtime, "host", "vcpu.schedule", '{"vm": "g1", "vcpu": 0}')
        assert rc == 0 and json.loads(out)["running"] is True, (out, err)
        rc, out, err = await ctl("ctl", "--runtime", runtime, "host", "vcpu.deschedule", '{"vm": "g7"}')
        assert rc == 3 and err.strip().count("\n") == 0 and "no VM named 'g7' (VMs: g1)" in err, err
        assert "Traceback" not in err
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(60):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError("launch.py still running 60 s after SIGINT") from None
    assert proc.returncode == 0 and not os.path.exists(runtime), (proc.returncode, runtime)
