"""The matrix of DESIGN.md §5: every row run with real processes, quiet and under attack.

Each ``Row`` is a topology, the OS whose functions the row is about (the *subject*), and
the outcome the thread predicts.  ``run_row`` starts the topology, runs the workload, and
classifies what the lab *observed* — never what the guest was told:

    delivered              every interrupt the device sent reached the subject's vector
    clean error            the subject's kernel or driver refused IMS with a reason (and fell
                           back, or reported)
    silent loss detected   the device sent, nothing arrived, nobody told the driver; the lab
                           names the IR fault that ate them
    breach                 an interrupt reached a vector its emitter does not own

The hostile variant adds a VM ``evil`` sharing the subject's device and commits every
misbehaviour that applies (stolen handles in its IMS/MSI-X storage, DMA into the interrupt
range -- a forged DWORD naming the subject's IRTE --, DMA and MMIO outside its mappings,
hostile hypercalls) before the same workload.  In a secure row the subject's outcome must
not change and no breach may occur; each attack is reported with what stopped it (a fault
reason, a refusal).  In row 4-unsafe the attack is expected to succeed.

A row that does not run to a verdict is never passing: ``run_row_reported`` turns whatever
it raises into a row observed "lab failed", "not implemented" or "error", with the reason.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from irqlab.lab import Lab, LabError
from irqlab.topology import Topology

OUTCOMES = ("delivered", "clean error", "silent loss detected", "breach")

SRIOV = {"name": "d0", "kind": "sriov", "total_vfs": 4, "vfs": 2}
SRIOV_IMS = {**SRIOV, "vf_ims_slots": 8}
MEM = {"name": "m0", "kind": "siov", "adis": 2, "ims": "memory", "pasid_interrupts": True}
MEM_UNTAGGED = {**MEM, "pasid_interrupts": False}
DEV = {"name": "v0", "kind": "siov", "adis": 2, "ims": "device", "pasid_interrupts": False}


def _guest(name: str, assign: str, irq: str = "ims", **kw) -> dict:
    return {"name": name, "irq": irq, "assign": [assign], **kw}


@dataclass(frozen=True)
class Row:
    id: str
    title: str
    devices: tuple
    subject_guest: dict | None          # None: the row is about the host (bare metal)
    expected: str
    expected_hostile: str
    evil_assign: str | None             # what the hostile VM gets
    evil_irq: str = "ims"
    platform: dict = field(default_factory=dict)
    why: str = ""

    def topology(self, hostile: bool) -> Topology:
        guests = [self.subject_guest] if self.subject_guest else []
        if hostile and self.evil_assign:
            guests.append(_guest("evil", self.evil_assign, self.evil_irq))
        return Topology.from_dict({"name": f"matrix-{self.id}{'-hostile' if hostile else ''}",
                                   "device": [dict(d) for d in self.devices], "guest": guests,
                                   "platform": dict(self.platform),
                                   "workload": {"per_function": 300, "inflight": 8}},
                                  source=f"<matrix {self.id}>")

    @property
    def subject(self) -> str:
        return self.subject_guest["name"] if self.subject_guest else "host"


ROWS: tuple[Row, ...] = (
    Row("1", "PF, VFs and ADIs on bare metal (both IMS kinds)", (SRIOV, MEM, DEV), None,
        "delivered", "delivered", "d0.vf1", "msix", {"pasid_ir": True},
        "the host composes everything through its own IR domain"),
    Row("2", "VF in a guest, MSI-X trapped and emulated by the VMM", (SRIOV,),
        _guest("g1", "d0.vf0", "msix"), "delivered", "delivered", "d0.vf1", "msix"),
    Row("2-ims", "VF in a guest, IMS on the VF, HCALL compose", (SRIOV_IMS,),
        _guest("g1", "d0.vf0"), "delivered", "delivered", "d0.vf1"),
    Row("2-oldkvm", "same, hypervisor without the compose hypercall", (SRIOV_IMS,),
        _guest("g1", "d0.vf0", cpuid="oldkvm"), "clean error", "clean error", "d0.vf1"),
    Row("2-hidden", "same, hypervisor bit hidden from the guest", (SRIOV_IMS,),
        _guest("g1", "d0.vf0", cpuid="hidden"), "silent loss detected", "silent loss detected", "d0.vf1"),
    Row("2-legacy", "same, guest kernel without the HCALL domain (2020)", (SRIOV_IMS,),
        _guest("g1", "d0.vf0", kernel="legacy2020"), "silent loss detected", "silent loss detected", "d0.vf1"),
    Row("3", "ADI in a guest, IMS in guest memory, RID + PASID", (MEM,),
        _guest("g1", "m0.adi0"), "delivered", "delivered", "m0.adi1", platform={"pasid_ir": True}),
    Row("3-noplat", "same, platform cannot receive PASID-tagged interrupts", (MEM,),
        _guest("g1", "m0.adi0"), "clean error", "clean error", "m0.adi1",
        platform={"pasid_ir": True, "pasid_interrupts": False}),
    Row("4", "ADI in a guest, device IMS trapped, fake pairs", (DEV,),
        _guest("g1", "v0.adi0"), "delivered", "delivered", "v0.adi1"),
    Row("4-unsafe", "ADI in a guest, IMS in memory, RID only (naive VMM)", (MEM_UNTAGGED,),
        _guest("g1", "m0.adi0"), "delivered", "breach", "m0.adi1", platform={"vmm_unsafe_ims": True},
        why="INSECURE: another guest's handle in a memory slot passes the RID check"),
    Row("4-noemul", "ADI in a guest, device IMS, VMM without IMS emulation", ({**DEV, "vmm_emulation": False},),
        _guest("g1", "v0.adi0"), "clean error", "clean error", "v0.adi1"),
    Row("mangle", "Intel's path: the VMM hides the IMS flag", ({**DEV, "mangle": True},),
        _guest("g1", "v0.adi0"), "clean error", "clean error", "v0.adi1"),
)


def observed(report: dict, subject: str) -> tuple[str, str]:
    """The subject's outcome (the worst of its functions) and a one-line explanation."""
    rows = [r for r in report["functions"] if r["os"] == subject]
    if not rows:
        return "no functions", f"{subject} ran no workload"
    order = {"breach": 0, "ordering violated": 1, "lost": 2, "incomplete": 2, "silent loss detected": 3,
             "clean error": 4, "delivered": 5}
    worst = min(rows, key=lambda r: order.get(r["outcome"], 0))
    return worst["outcome"], worst["why"] or f"{worst['sent']} sent, {worst['interrupts']} delivered"


async def attack(lab: Lab, row: Row) -> list[dict]:
    """Every misbehaviour of ``evil`` that applies; each result says how it was stopped."""
    results = []

    async def act(name: str, **args) -> dict:
        try:
            res = await lab.call("evil", "hostile", {"action": name, **args})
            entry = {"action": name, "result": res}
        except LabError as exc:
            entry = {"action": name, "error": str(exc)}
        results.append(entry)
        return entry

    vms = await lab.call("host", "vms")
    victim = [b["irte"] for b in vms.get(row.subject, {}).get("irte_bindings", []) if b.get("irte") is not None]
    if not victim:
        irt = await lab.call("fabric", "irt")
        victim = [int(line.split()[0]) for line in irt[1:]]
    status = await lab.call("evil", "status")
    modes = {f["irq_mode"] for f in status["functions"].values()}
    if victim and "ims-memory" in modes:
        await act("ims-redirect", handle=victim[0])
    if victim and "ims" in modes:
        await act("ims-steal-device", handle=victim[0])
    # a 16-byte record, then one DWORD naming the subject's IRTE (the IRTE checks must stop it)
    await act("dma-into-interrupt-range", **({"handle": victim[0]} if victim else {}))
    await act("dma-outside-memory")
    await act("mmio-outside-ept", addr=0xF000_0000)
    await act("compose-foreign", dev=0x0100)
    await act("hypercall-raw", nr=1, a=[0x18, 0x05, 99, 1 << 40])
    await act("hypercall-raw", nr=0x7FFF, a=[])
    return results


async def run_row(row: Row, hostile: bool, on_progress: Callable[[str], None] | None = None) -> dict:
    """Start the row's topology, run it (``observe_row``), stop it.  Raises what goes wrong;
    ``run_row_reported`` turns that into a row that says so."""
    t0 = time.monotonic()
    async with Lab(row.topology(hostile), on_progress=on_progress or (lambda m: None)) as lab:
        return await observe_row(lab, row, hostile, t0)


async def observe_row(lab: Lab, row: Row, hostile: bool, t0: float | None = None) -> dict:
    """On a running topology of ``row``: the attacks (hostile variant), the workload, and what
    was observed against what the row expects."""
    t0 = time.monotonic() if t0 is None else t0
    attacks = await attack(lab, row) if hostile else []
    report = await lab.run_workload(per_function=300, inflight=8, stall_s=2.0)
    outcome, why = observed(report, row.subject)
    expected = row.expected_hostile if hostile else row.expected
    breaches = sum(o.get("breaches", 0) for o in report["oses"].values())
    faults = report["faults"].get("by_source", {})
    refused = {name: vm.get("refused_total", 0) for name, vm in report.get("vms", {}).items()}
    ok = outcome == expected and (breaches == 0 or expected == "breach")
    return {"row": row.id, "title": row.title, "hostile": hostile, "expected": expected, "observed": outcome,
            "why": why, "ok": ok, "breaches": breaches, "faults": faults, "refused": refused,
            "attacks": attacks, "seconds": round(time.monotonic() - t0, 2)}


#: what ``observed`` says for a row that did not run to a verdict (never as expected)
NOT_RUN = ("lab failed", "not implemented", "error")


async def run_row_reported(row: Row, hostile: bool, on_progress: Callable[[str], None] | None = None) -> dict:
    """``run_row``, but a row that raises anything is reported, never raised and never passing:
    observed "lab failed" (a process died or the topology could not start), "not implemented"
    (NotImplementedError), or "error" (anything else, with its type), and ``why`` its first line."""
    t0 = time.monotonic()
    try:
        return await run_row(row, hostile, on_progress)
    except asyncio.CancelledError:
        raise
    except Exception as exc:          # noqa: BLE001 -- the point: no row may crash the matrix
        if isinstance(exc, LabError):
            what, why = "lab failed", str(exc)
        elif isinstance(exc, NotImplementedError):
            what, why = "not implemented", str(exc) or f"row {row.id} is not implemented"
        else:
            what, why = "error", f"{type(exc).__name__}: {exc}"
        return {"row": row.id, "title": row.title, "hostile": hostile,
                "expected": row.expected_hostile if hostile else row.expected, "observed": what,
                "why": (why.splitlines() or [""])[0], "ok": False, "breaches": 0, "faults": {}, "refused": {},
                "attacks": [], "seconds": round(time.monotonic() - t0, 2)}


def how(result: dict) -> str:
    """The table's "how" column: why a row did not run, what stopped the attacks, or the
    explanation of the outcome."""
    if result["observed"] in NOT_RUN:
        return result["why"]
    return explain(result) if result["hostile"] else result["why"]


def select(ids: list[str] | None) -> list[Row]:
    if not ids:
        return list(ROWS)
    known = {r.id: r for r in ROWS}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(known)}")
    return [known[i] for i in ids]


def summarize_attacks(attacks: list[dict]) -> str:
    out = []
    for a in attacks:
        if "error" in a:
            out.append(f"{a['action']}: refused ({a['error'].split(': ')[-1][:60]})")
            continue
        res = a["result"]
        if a["action"] in ("compose-foreign", "hypercall-raw"):
            ret = res.get("ret")
            out.append(f"{a['action']}: {'ok' if ret == 0 else f'ret {ret}'}")
        elif a["action"] == "mmio-outside-ept":
            out.append(f"{a['action']}: {'UR' if res.get('read') is None else 'read ' + str(res['read'])}")
        else:
            out.append(a["action"])
    return "; ".join(out)


def explain(result: dict) -> str:
    """A short account of what stopped the attacks (fault reasons, refusals)."""
    parts = []
    faults = result["faults"]
    if faults:
        parts.append("faults " + ", ".join(f"{rid} {', '.join(f'{r} x{n}' for r, n in sorted(f.items()))}"
                                           for rid, f in sorted(faults.items())))
    refused = {k: v for k, v in result["refused"].items() if v}
    if refused:
        parts.append("refused " + ", ".join(f"{k} x{v}" for k, v in sorted(refused.items())))
    if result["breaches"]:
        parts.append(f"{result['breaches']} breach(es)")
    return "; ".join(parts)


def to_json(results: list[dict]) -> dict[str, Any]:
    return {"rows": results, "ok": all(r["ok"] for r in results),
            "mismatches": [f"{r['row']}{' (hostile)' if r['hostile'] else ''}" for r in results if not r["ok"]]}
