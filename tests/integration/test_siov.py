"""Scalable IOV with real processes: matrix rows 1 (IMS on bare metal), 3, 3-noplat, 4,
4-unsafe, 4-noemul and mangle (DESIGN.md §5), and the attack the thread is about: a guest
storing another guest's interrupt handle in its memory IMS slot."""

from __future__ import annotations

import io
import re

import pytest

from fabric.ir import compose_remappable

MEM = {"name": "m0", "kind": "siov", "adis": 2, "ims": "memory", "pasid_interrupts": True}
DEV = {"name": "v0", "kind": "siov", "adis": 2, "ims": "device", "pasid_interrupts": False}


def topo(devices, guests=(), **platform) -> dict:
    return {"device": list(devices), "guest": list(guests), "platform": platform}


def guest(name, *assign, **kw) -> dict:
    return {"name": name, "irq": "ims", "assign": list(assign), **kw}


def rows(report, os_name=None) -> list[dict]:
    return [r for r in report["functions"] if os_name is None or r["os"] == os_name]


def only(report, os_name) -> dict:
    (r,) = rows(report, os_name)
    return r


def rendered(report: dict, width: int = 240) -> str:
    """The text report exactly as ``launch.py run`` prints it (irqlab/report.py)."""
    from rich.console import Console

    from irqlab.report import render
    console = Console(record=True, width=width, file=io.StringIO())
    render(report, console)
    return console.export_text()


def adi_view(view: str) -> dict[tuple[str, int], tuple[str, int | None, list[str]]]:
    """The host's ``adis`` view parsed: (PF, ADI) -> (owner, PASID, the lines under it)."""
    out: dict = {}
    pf = key = None
    for line in view.splitlines():
        if not line.startswith(" "):
            pf = line.split(":", 2)[0] + ":" + line.split(":", 2)[1]     # "01:00.0"
        elif m := re.fullmatch(r"  ADI (\d+): owner (\S+), PASID (0x[0-9a-f]+|-), portal 0x[0-9a-f]+", line):
            key = (pf, int(m[1]))
            out[key] = (m[2], None if m[3] == "-" else int(m[3], 16), [])
        else:
            assert key is not None and line.startswith("    "), view
            out[key][2].append(line.strip())
    return out


async def handle_of(lab, vm: str) -> int:
    vms = await lab.call("host", "vms")
    (binding,) = vms[vm]["irte_bindings"]
    return binding["irte"]


async def test_row_1_host_drives_adis_with_both_ims_kinds(start_lab):
    lab = await start_lab(topo([MEM, DEV], pasid_ir=True))
    report = await lab.run_workload(per_function=300, inflight=8)
    adis = [r for r in rows(report, "host") if r["function"].startswith("adi")]
    assert {(r["function"], r["irq_mode"], r["phys"]) for r in adis} == {
        ("adi0 01:00.0", "ims-memory", "01:00.0 ADI 0"), ("adi1 01:00.0", "ims-memory", "01:00.0 ADI 1"),
        ("adi0 02:00.0", "ims", "02:00.0 ADI 0"), ("adi1 02:00.0", "ims", "02:00.0 ADI 1")}
    for r in rows(report):
        assert r["outcome"] == "delivered" and r["sent"] == r["interrupts"] == 300, r
    views = await lab.call("host", "views")
    for name in ("IR-IMS-MEM-0000:01:00.0.adi0", "IR-IMS-0000:02:00.0.adi1"):
        assert name in views["domains"], views["domains"]
    assert "Process Address Space ID (PASID)" in views["lspci"] and "Designated Vendor-Specific" in views["lspci"]
    # the memory-kind ADIs' IRTEs are bound to their PASIDs (their messages are tagged)
    irt = await lab.call("fabric", "irt")
    bound = [line for line in irt[1:] if line.split()[-1] != "-"]
    assert len(bound) == 2 and all(line.split()[1] == "01:00.0" for line in bound), irt
    # the host's ADI view: each ADI's PASID, IMS kind and IRTE -- bound to the PASID exactly
    # where the IRT says so (the tagging device's memory-IMS ADIs)
    irt_pasid = {int(line.split()[0]): line.split()[-1] for line in irt[1:]}
    seen = adi_view(views["adis"])
    assert sorted(seen) == [("01:00.0", 0), ("01:00.0", 1), ("02:00.0", 0), ("02:00.0", 1)], views["adis"]
    for (pf, adi), (owner, pasid, lines) in seen.items():
        assert owner == "host" and pasid is not None, views["adis"]
        kind, checks = (("memory", f"RID {pf} + PASID 0x{pasid:x}") if pf == "01:00.0"
                        else ("device", f"RID {pf} only"))
        (line,) = lines
        m = re.fullmatch(rf"{kind} IMS slot 0: IRTE (\d+) checks {re.escape(checks)}, remapped vector 0x[0-9a-f]+",
                         line)
        assert m, (line, views["adis"])
        assert irt_pasid[int(m[1])] == (f"0x{pasid:x}" if kind == "memory" else "-"), (line, irt)


async def test_row_3_adi_memory_ims_pasid_checked(start_lab):
    lab = await start_lab(topo([MEM], [guest("g1", "m0.adi0"), guest("g2", "m0.adi1")], pasid_ir=True))
    report = await lab.run_workload(per_function=300, inflight=8)
    for vm in ("g1", "g2"):
        r = only(report, vm)
        assert r["irq_mode"] == "ims-memory" and r["outcome"] == "delivered" and r["lost"] == 0, r
    vms = await lab.call("host", "vms")
    assert vms["g1"]["pasids"] == {"00:03.0": vms["g1"]["irte_bindings"][0]["pasid"]}
    assert vms["g1"]["pasids"]["00:03.0"] != vms["g2"]["pasids"]["00:03.0"]
    views = await lab.call("g1", "views")
    assert "HCALL-IMS-MEM-0000:00:03.0" in views["domains"], views["domains"]
    assert vms["g1"]["paths"]["00:03.0"] == {"path": "HCALL compose (generic hypercall)",
                                             "device_specific_lines": 0}
    # the text report: each VM's ADI, its PASID and the IRTE its pair names, which checks that PASID
    text = rendered(report)
    adis = adi_view((await lab.call("host", "views"))["adis"])
    for vm, adi in (("g1", 0), ("g2", 1)):
        (b,) = vms[vm]["irte_bindings"]
        pasid = vms[vm]["pasids"]["00:03.0"]
        assert b["pasid"] == pasid and b["kind"] == "remapped", b
        assert (f"  {vm}: 00:03.0 = 01:00.0 ADI {adi}, PASID 0x{pasid:x}; HCALL compose (generic hypercall); "
                f"IRTE {b['irte']} (remapped pair, checks PASID 0x{pasid:x}) -> vCPU{b['vcpu']} "
                f"vector 0x{b['vector']:02x}") in text.splitlines(), text
        assert re.search(rf"^  {vm} +ADI 00:03\.0 \(= 01:00\.0 ADI {adi}\) +IMS-MEM +300 +300 +0 ", text, re.M), text
        # the host's view of the same ADI: owner, PASID, and the IRTE bound to (RID, PASID)
        owner, view_pasid, lines = adis[("01:00.0", adi)]
        assert (owner, view_pasid) == (vm, pasid), adis
        (line,) = lines
        assert line.startswith(f"{vm} 00:03.0 compose handle {b['handle']}: real pair stored by the guest; "
                               f"IRTE {b['irte']} checks RID 01:00.0 + PASID 0x{pasid:x}, remapped vector "), line
    # the attack: g1 stores g2's handle in its own memory slot; the PASID check blocks it
    victim = await handle_of(lab, "g2")
    await lab.call("g1", "hostile", {"action": "ims-redirect", "handle": victim})
    report = await lab.run_workload(per_function=200, inflight=4)
    assert all(o["breaches"] == 0 for o in report["oses"].values()), report["oses"]
    assert all(r["outcome"] == "delivered" for r in rows(report)), rows(report)
    lines = report["faults"]["lines"]
    assert any(f"fault index 0x{victim:x} [fault reason 0x26]" in line for line in lines), lines


async def test_row_3_noplat_compose_refused_falls_back_to_emulated_ims(start_lab):
    lab = await start_lab(topo([{**MEM, "adis": 1}], [guest("g1", "m0.adi0")], pasid_ir=True,
                               pasid_interrupts=False))
    report = await lab.run_workload(per_function=300, inflight=8)
    r = only(report, "g1")
    assert r["outcome"] == "clean error" and r["irq_mode"] == "ims", r
    assert "memory IMS: hypercall MSI_COMPOSE failed: -EOPNOTSUPP" in r["ims_error"]
    assert r["sent"] == r["interrupts"] == 300
    vms = await lab.call("host", "vms")
    assert any("cannot receive PASID-tagged interrupts" in x for x in vms["g1"]["refused"])
    assert [b["kind"] for b in vms["g1"]["irte_bindings"]] == ["fake"]


async def test_row_4_device_ims_trapped_with_fake_pairs(start_lab):
    lab = await start_lab(topo([{**DEV, "adis": 1}], [guest("g1", "v0.adi0")]))
    report = await lab.run_workload(per_function=300, inflight=8)
    r = only(report, "g1")
    assert r["outcome"] == "delivered" and r["irq_mode"] == "ims" and r["sent"] == r["interrupts"] == 300, r
    vms = await lab.call("host", "vms")
    (b,) = vms["g1"]["irte_bindings"]
    assert b["kind"] == "fake" and b["pasid"] is None
    assert vms["g1"]["paths"]["00:03.0"]["device_specific_lines"] > 5
    views = await lab.call("g1", "views")
    assert "HCALL-IMS-0000:00:03.0" in views["domains"]
    # the text report names the path, its device-specific cost and the fake pair's IRTE
    lines = vms["g1"]["paths"]["00:03.0"]["device_specific_lines"]
    assert (f"  g1: 00:03.0 = 01:00.0 ADI 0, PASID 0x{vms['g1']['pasids']['00:03.0']:x}; case 4 (IMS emulation) "
            f"[{lines} lines of device-specific VMM code]; IRTE {b['irte']} (fake pair, checks the RID only) "
            f"-> vCPU{b['vcpu']} vector 0x{b['vector']:02x}") in rendered(report, 100).splitlines(), \
        rendered(report, 100)           # one line, even on a console narrower than it
    (owner, _, (line,)) = adi_view((await lab.call("host", "views"))["adis"])[("01:00.0", 0)]
    assert owner == "g1" and line.startswith(
        f"g1 00:03.0 compose handle {b['handle']}: fake pair (case 4: the VMM writes the real slot); "
        f"IRTE {b['irte']} checks RID 01:00.0 only, remapped vector "), line

    # The guest cannot write the real slot.  Before: the VMM wrote the real pair (naming the
    # fake pair's IRTE) and unmasked it.
    def real_slot(stats: dict) -> dict:
        (adi,) = stats["adis"]
        (slot,) = [s for s in adi["ims"] if s["slot"] == 0]
        return slot
    real = real_slot(await lab.call("v0", "stats"))
    assert not real["masked"] and not real["pending"], real
    assert (real["address"] >> 5) & 0x7FFF == b["irte"], real
    # g1 stores a pair nobody composed (naming someone else's IRTE), rings its doorbell and
    # leaves the pair there
    res = await lab.call("g1", "hostile", {"action": "ims-steal-device", "handle": b["irte"] + 1,
                                           "restore": False})
    assert res == {"slot": 0, "handle": b["irte"] + 1, "restored": False}, res
    lo, hi, data = compose_remappable(b["irte"] + 1, 0, shv=True)
    vms = await lab.call("host", "vms")
    assert [x for x in vms["g1"]["refused"] if "a pair the VMM did not compose" in x] == [
        f"IMS slot 0 of 00:03.0: a pair the VMM did not compose (0x{hi:x}_{lo:08x}/0x{data:x}); "
        f"the real slot stays masked"], vms["g1"]["refused"]
    # the real slot: still the VMM's pair, now masked; the doorbell's interrupt is held pending
    # there (the action returns once the device has sent or pended it)
    forged = real_slot(await lab.call("v0", "stats"))
    assert forged == {**real, "masked": True, "pending": True}, (real, forged)
    assert (await lab.call("fabric", "faults"))["by_source"] == {}      # nothing reached the IR unit


async def test_row_4_unsafe_breach_is_proven(start_lab):
    lab = await start_lab(topo([{**MEM, "pasid_interrupts": False}],
                               [guest("g1", "m0.adi0"), guest("g2", "m0.adi1")], vmm_unsafe_ims=True))
    report = await lab.run_workload(per_function=200, inflight=4)
    assert all(r["outcome"] == "delivered" for r in rows(report)), rows(report)
    assert {only(report, vm)["irq_mode"] for vm in ("g1", "g2")} == {"ims-memory"}
    victim = await handle_of(lab, "g2")
    await lab.call("g1", "hostile", {"action": "ims-redirect", "handle": victim})
    report = await lab.run_workload(per_function=200, inflight=4)
    r = only(report, "g2")
    assert r["outcome"] == "breach" and r["breaches"] == 1, r
    samples = report["oses"]["g2"]["breach_samples"]
    assert samples == ["CPU0 vector 0x21 (irq 24) belongs to 01:00.0 ADI 1 but was raised by 01:00.0 ADI 0; "
                       "injected by the hypervisor; handled by irqlab-engine:00:03.0"], samples
    # the host saw it first, with the IRTE the forged message named and where it went
    (host_sample,) = report["oses"]["host"]["breach_samples"]
    assert (f"belongs to 01:00.0 ADI 1 but was raised by 01:00.0 ADI 0; its message named IRTE {victim}; "
            "handled by vfio-ims:g2") in host_sample, host_sample
    assert report["faults"]["by_source"] == {}          # nothing on the platform noticed
    assert not report["ok"]


async def test_row_4_unsafe_refused_by_a_careful_vmm(start_lab):
    lab = await start_lab(topo([{**MEM, "adis": 1, "pasid_interrupts": False}], [guest("g1", "m0.adi0")]))
    report = await lab.run_workload(per_function=100, inflight=4)
    r = only(report, "g1")
    assert r["outcome"] == "clean error" and r["irq_mode"] == "ims", r   # fell back to emulated device IMS
    vms = await lab.call("host", "vms")
    assert any("does not tag interrupt messages" in x for x in vms["g1"]["refused"]), vms["g1"]["refused"]


async def test_row_4_noemul_compose_fails_clearly(start_lab):
    lab = await start_lab(topo([{**DEV, "adis": 1, "vmm_emulation": False}], [guest("g1", "v0.adi0")]))
    info = lab.guest_info["g1"]
    assert "00:03.0" in info["failed"], info
    err = info["failed"]["00:03.0"]["error"]
    assert "device IMS: hypercall MSI_COMPOSE failed: -EOPNOTSUPP" in err and "no MSI-X capability" in err, err
    report = await lab.run_workload(per_function=100, inflight=4)
    r = only(report, "g1")
    assert r["outcome"] == "clean error" and r["sent"] == 0, r
    vms = await lab.call("host", "vms")
    assert any("no IMS emulation" in x for x in vms["g1"]["refused"])


async def test_row_mangle_guest_sees_no_ims_and_uses_emulated_msix(start_lab):
    lab = await start_lab(topo([{**DEV, "adis": 1, "mangle": True}], [guest("g1", "v0.adi0")]))
    report = await lab.run_workload(per_function=300, inflight=8)
    r = only(report, "g1")
    assert r["outcome"] == "clean error" and r["irq_mode"] == "msix" and r["interrupts"] == 300, r
    assert "SIOV capability does not offer IMS" in r["ims_error"]
    views = await lab.call("g1", "views")
    assert "IMS" not in views["domains"] and "PCI-MSIX-0000:00:03.0" in views["domains"]
    vms = await lab.call("host", "vms")
    assert vms["g1"]["hypercalls"] == {}           # no compose: the VMM did it all, device-specifically
    path = vms["g1"]["paths"]["00:03.0"]
    assert path["path"].startswith("mangle") and path["device_specific_lines"] > 10, path


async def test_reference_topology_four_vms_two_adis_each(start_lab):
    """examples/siov.toml: a tagging memory-IMS device and a non-tagging device-IMS device,
    4 VMs with one ADI of each (the done-when topology, with fewer interrupts)."""
    import os
    from irqlab.topology import load
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lab = await start_lab(load(os.path.join(root, "examples", "siov.toml")))
    report = await lab.run_workload(per_function=1000, inflight=8)
    adi_rows = [r for r in rows(report) if r["os"] != "host"]
    assert len(adi_rows) == 8
    assert {r["irq_mode"] for r in adi_rows} == {"ims", "ims-memory"}
    for r in rows(report):
        assert r["outcome"] == "delivered" and r["sent"] == r["interrupts"] == 1000 and r["lost"] == 0, r
    assert all(o["breaches"] == 0 for o in report["oses"].values())
    assert report["ok"]
