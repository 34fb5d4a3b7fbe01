"""Every IR fault reason the model implements, provoked through a real fabric process.

The test drives two ports itself: a stub *host* (programs the IR unit through the
privileged register interface and receives interrupts) and a stub *device* on bus 5
(sends crafted interrupt and DMA writes).  Per-source posted ordering is the barrier:
after each bad write the device sends a good interrupt, and once the host has that one
the fabric has handled the bad one.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fabric import wire
from fabric.ir import Irte, compose_compat, compose_remappable
from fabric.port import Port
from fabric.tlp import Tlp

DEV_RID = 0x0500            # 05:00.0
GOOD_INDEX, GOOD_VECTOR = 0, 0x40
WAIT_S = 30.0


class Stubs:
    def __init__(self, lab):
        self.lab = lab
        self.irqs: list[list] = []
        self._arrived = asyncio.Event()
        self.host = Port(lab.endpoint, lab.tokens["host"], "host", on_message=self._on_host)
        self.dev = Port(lab.endpoint, lab.tokens["rogue"], "rogue")

    def _on_host(self, msg: list) -> None:
        if msg[0] == wire.IRQ:
            self.irqs.append(msg)
            self._arrived.set()

    async def connect(self) -> None:
        await self.host.connect()
        await self.dev.connect()

    def close(self) -> None:
        self.host.close(0)
        self.dev.close(0)

    def mwr(self, addr: int, data: bytes, pasid: int | None = None) -> None:
        raw = Tlp.mem_write(addr, data, requester_id=DEV_RID, pasid=pasid).pack()
        self.dev.send(wire.tlp(raw, DEV_RID, time.monotonic_ns()))

    def interrupt(self, addr: int, data: int, pasid: int | None = None) -> None:
        self.mwr(addr, data.to_bytes(4, "little"), pasid)

    async def barrier(self) -> list:
        """Send a good interrupt and wait for it; returns every IRQ that arrived meanwhile."""
        before = len(self.irqs)
        lo, _, data = compose_remappable(GOOD_INDEX)
        self.interrupt(lo, data)
        async with asyncio.timeout(WAIT_S):
            while len(self.irqs) <= before or self.irqs[-1][2] != GOOD_VECTOR:
                self._arrived.clear()
                await self._arrived.wait()
        return self.irqs[before:]

    async def faults(self) -> list[str]:
        return await self.host.reg("faults.drain", {})


async def _stubs(start_lab, platform: dict | None = None):
    lab = await start_lab({"platform": platform or {}}, spawn=(), stubs={"rogue": ("device", (5, 5))})
    s = Stubs(lab)
    await s.connect()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
async def stubs(start_lab):
    async for s in _stubs(start_lab):
        yield s


@pytest.fixture
async def no_pasid_stubs(start_lab):
    """The root complex of this platform cannot receive PASID-tagged interrupt requests."""
    async for s in _stubs(start_lab, {"pasid_interrupts": False}):
        yield s


async def program(s: Stubs, entries: int = 256) -> None:
    await s.host.reg("cpus.bind", {"apic_ids": [0]})
    await s.host.reg("ram.set", {"base": 0, "size": 1 << 20})
    await s.host.reg("ir.table", {"entries": entries})
    await s.host.reg("ir.enable", {"on": True})
    await s.host.reg("ir.cfi", {"on": False})
    await write_irte(s, GOOD_INDEX, Irte.remapped(GOOD_VECTOR, 0, DEV_RID).pack())


async def write_irte(s: Stubs, index: int, raw: int) -> None:
    await s.host.reg("irte.write", {"index": index, "lo": raw & (1 << 64) - 1, "hi": raw >> 64})


async def expect_fault(s: Stubs, reason: int, text: str, index: int | None = None) -> None:
    got = await s.barrier()
    assert [m[2] for m in got] == [GOOD_VECTOR], f"only the good interrupt may arrive, got {got}"
    lines = await s.faults()
    assert len(lines) == 1, lines
    line = lines[0]
    assert f"[fault reason 0x{reason:02x}] {text}" in line, line
    assert "Request device [05:00.0]" in line, line
    if index is not None:
        assert f"fault index 0x{index:x} " in line, line


async def test_good_interrupt_is_delivered_with_provenance(stubs):
    await program(stubs)
    got = await stubs.barrier()
    assert len(got) == 1
    _, apic, vector, origin, t_ns, handle = got[0]
    assert (apic, vector, origin, handle) == (0, GOOD_VECTOR, DEV_RID, GOOD_INDEX)
    assert await stubs.faults() == []


async def test_0x20_reserved_field_subhandle_with_upper_data_bits(stubs):
    await program(stubs)
    lo, _, _ = compose_remappable(GOOD_INDEX, 0, shv=True)
    stubs.interrupt(lo, 0x1_0000)
    await expect_fault(stubs, 0x20, "Detected reserved fields in the decoded interrupt-remapped request")


async def test_0x20_reserved_field_partial_dword_write(stubs):
    await program(stubs)
    lo, _, _ = compose_remappable(GOOD_INDEX)
    stubs.mwr(lo, b"\x00\x00")          # two bytes: not an interrupt request
    await expect_fault(stubs, 0x20, "Detected reserved fields in the decoded interrupt-remapped request")


PASID = 0x4A5


async def test_0x20_pasid_tagged_request_on_a_platform_that_cannot_receive_them(no_pasid_stubs):
    """platform.pasid_interrupts = false (row 3-noplat's root complex): a PASID-tagged
    interrupt MWr faults 0x20 even though its IRTE is good; an untagged one still arrives."""
    s = no_pasid_stubs
    await program(s)
    before = await s.lab.call("fabric", "counters")
    lo, _, data = compose_remappable(GOOD_INDEX)
    s.interrupt(lo, data, pasid=PASID)       # the good IRTE's own handle, but tagged
    await expect_fault(s, 0x20, "Detected reserved fields in the decoded interrupt-remapped request",
                       index=0)
    after = await s.lab.call("fabric", "counters")
    assert after.get("irq:fault:0x20", 0) - before.get("irq:fault:0x20", 0) == 1, (before, after)
    # and the untagged barrier interrupt was delivered with its provenance (expect_fault checked
    # it was the only arrival): the platform refuses the tag, not the device
    assert s.irqs[-1][1:4] == [0, GOOD_VECTOR, DEV_RID], s.irqs[-1]


async def test_0x26_pasid_tagged_request_needs_an_irte_bound_to_its_pasid(stubs):
    """The contrast: a platform that accepts PASID-tagged interrupts but whose IRTEs cannot
    check PASIDs (no ``pasid_ir``, like real VT-d).  The tagged MWr names a good, RID-only IRTE
    and still faults 0x26: a RID-only entry takes only untagged requests, else an ADI (which
    shares its PF's RID and tags its DMA) could raise any entry of that RID."""
    await program(stubs)
    lo, _, data = compose_remappable(GOOD_INDEX)
    stubs.interrupt(lo, data, pasid=PASID)
    await expect_fault(stubs, 0x26, "Blocked an interrupt request due to source-id verification failure",
                       index=GOOD_INDEX)


@pytest.fixture
async def pasid_ir_stubs(start_lab):
    """IRTEs that can be bound to a PASID (the lab's ``pasid_ir`` platform capability)."""
    async for s in _stubs(start_lab, {"pasid_ir": True}):
        yield s


async def test_pasid_tagged_request_is_remapped_by_an_irte_bound_to_its_pasid(pasid_ir_stubs):
    s = pasid_ir_stubs
    await program(s)
    raw = Irte.remapped(0x44, 0, DEV_RID).pack()
    await s.host.reg("irte.write", {"index": 8, "lo": raw & (1 << 64) - 1, "hi": raw >> 64, "pasid": PASID})
    lo, _, data = compose_remappable(8)
    s.interrupt(lo, data, pasid=PASID)
    got = await s.barrier()                   # per-source order: the tagged one arrives first
    assert [m[2] for m in got] == [0x44, GOOD_VECTOR], got
    assert await s.faults() == []


async def test_0x21_index_beyond_table(stubs):
    await program(stubs, entries=256)
    lo, _, data = compose_remappable(300)
    stubs.interrupt(lo, data)
    await expect_fault(stubs, 0x21, "Interrupt index exceeded the interrupt-remapping table size", index=300)


async def test_0x22_irte_not_present(stubs):
    await program(stubs)
    lo, _, data = compose_remappable(5)
    stubs.interrupt(lo, data)
    await expect_fault(stubs, 0x22, "Present field in the IRTE entry is clear", index=5)


async def test_0x23_irt_pointer_not_programmed(stubs):
    await stubs.host.reg("cpus.bind", {"apic_ids": [0]})
    await stubs.host.reg("ir.enable", {"on": True})       # IR on, IRTA never programmed
    lo, _, data = compose_remappable(1)
    stubs.interrupt(lo, data)
    # The device's MWr and the host's REG travel from two ports, in no set order: wait until
    # the fabric has handled the MWr (its fault counted) before programming the table.
    deadline = time.monotonic() + WAIT_S
    while (c := await stubs.lab.call("fabric", "counters")).get("irq:fault:0x23", 0) < 1:
        if time.monotonic() > deadline:
            raise AssertionError(f"no fault 0x23 counted within {WAIT_S} s; IR counters: "
                                 f"{ {k: v for k, v in c.items() if k.startswith('irq:')} }")
        await asyncio.sleep(0.01)
    # the barrier interrupt faults too: program the table afterwards and look at the first line only
    await stubs.host.reg("ir.table", {"entries": 16})
    await write_irte(stubs, GOOD_INDEX, Irte.remapped(GOOD_VECTOR, 0, DEV_RID).pack())
    await stubs.barrier()
    lines = await stubs.faults()
    assert len(lines) == 1, lines
    assert "[fault reason 0x23] Error accessing interrupt-remapping table pointed by IRTA_REG" in lines[0]


async def test_0x24_reserved_bits_in_irte(stubs):
    await program(stubs)
    await write_irte(stubs, 6, Irte.remapped(0x41, 0, DEV_RID).pack() | (1 << 100))
    lo, _, data = compose_remappable(6)
    stubs.interrupt(lo, data)
    await expect_fault(stubs, 0x24, "Detected reserved fields in the IRTE entry", index=6)


async def test_0x25_compatibility_format_blocked(stubs):
    await program(stubs)
    lo, hi, data = compose_compat(0, 0x42)
    stubs.interrupt(lo, data)
    await expect_fault(stubs, 0x25, "Blocked a compatibility format interrupt request")


async def test_0x25_lifted_by_cfi(stubs):
    await program(stubs)
    await stubs.host.reg("ir.cfi", {"on": True})
    lo, hi, data = compose_compat(0, 0x42)
    stubs.interrupt(lo, data)
    got = await stubs.barrier()
    assert [m[2] for m in got] == [0x42, GOOD_VECTOR]
    assert await stubs.faults() == []


async def test_0x26_source_id_verification(stubs):
    await program(stubs)
    await write_irte(stubs, 7, Irte.remapped(0x43, 0, 0x0600).pack())   # belongs to 06:00.0
    lo, _, data = compose_remappable(7)
    stubs.interrupt(lo, data)
    await expect_fault(stubs, 0x26, "Blocked an interrupt request due to source-id verification failure", index=7)


async def test_dma_without_context_faults_0x02(stubs):
    await program(stubs)
    stubs.mwr(0x1000, b"\x11\x22\x33\x44")
    got = await stubs.barrier()
    assert [m[2] for m in got] == [GOOD_VECTOR]
    lines = await stubs.faults()
    assert lines == ["DMAR: [DMA Write NO_PASID] Request device [05:00.0] fault addr 0x1000 "
                     "[fault reason 0x02] Present bit in context entry is clear"], lines


async def test_dma_blocked_context_faults_0x0d(stubs):
    await program(stubs)
    await stubs.host.reg("context.set", {"rid": DEV_RID, "mode": "block"})
    stubs.mwr(0x2000, b"\x11\x22\x33\x44")
    await stubs.barrier()
    lines = await stubs.faults()
    assert len(lines) == 1 and "[fault reason 0x0d] PCE for translation request specifies blocking" in lines[0], lines
