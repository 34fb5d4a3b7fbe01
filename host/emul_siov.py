"""Device-specific VMM code for the irqlab SIOV engine: everything here knows this device.

The thread's argument, made countable: with the HCALL domain (case 3) the VMM
needs no code of this kind — the guest composes through a generic hypercall and
stores the message itself.  Emulating IMS (case 4) and Intel's capability-mangling
path both need the VMM to know the device's IMS slot layout and how its interrupts
are selected, and that knowledge is this module ("special KVM level support for
*every* device ... Forever").  ``launch.py`` reports its size beside each row.

Device facts used (the engine's portal, ``device/engine.py``): IMS_CAP at 0x2C,
IRQ_MODE 0 on an ADI raises device IMS slot IRQ_VECTOR, slots in portal page 1,
16 bytes each (addr lo, addr hi, data, ctrl bit 0 = mask).
"""

from __future__ import annotations

import struct

from fabric.bdf import rid_str
from fabric.provenance import adi_origin
from guest.irq.domain import IrqAllocInfo, IrqError, irq_chip_compose_msi_msg, irq_domain_alloc_irqs

IMS_CAP = 0x2C
IMS_PAGE = 0x1000
IMS_SLOT = 16
_MSG = struct.Struct("<III")
_U32 = struct.Struct("<I")


def _slot_hpa(vadi, idx: int) -> int:
    return vadi.portal_hpa + IMS_PAGE + idx * IMS_SLOT


def translate_slot(vmm, vm, vadi, idx: int) -> None:
    """Case 4: the guest stored into a trapped IMS slot; write the real slot ourselves.

    Only a fake pair this VMM composed for this ADI becomes a real message; anything else
    leaves the real slot masked (and is logged).  The guest never writes real hardware.
    """
    from host.vmm import FAKE_ADDR_HI, fake_pair
    slot = vadi.slots[idx]
    w = vmm.kernel.hw.mmio_write
    real = None
    if slot.addr_hi == FAKE_ADDR_HI and slot.addr_lo >> 20 == 0xFEE:
        # exactly a pair handed out for this ADI: the handle field is 16 bits (addr[2] = bit 15)
        stored = (slot.addr_lo, slot.addr_hi, slot.data)
        c = next((c for c in vm.composes.values()
                  if c.vf is vadi and c.kind == "fake" and fake_pair(c.handle) == stored), None)
        if c is not None:
            real = c.real
    masked = bool(slot.ctrl & 1)
    if real is None:
        if slot.addr_lo or slot.addr_hi or slot.data:
            vm.refuse(f"IMS slot {idx} of {rid_str(vadi.guest_rid)}: a pair the VMM did not compose "
                      f"(0x{slot.addr_hi:x}_{slot.addr_lo:08x}/0x{slot.data:x}); the real slot stays masked")
        w(_slot_hpa(vadi, idx) + 0xC, _U32.pack(1))
        vadi.real_handles.pop(idx, None)
        return
    w(_slot_hpa(vadi, idx), _MSG.pack(*real))
    w(_slot_hpa(vadi, idx) + 0xC, _U32.pack(1 if masked else 0))
    vadi.real_handles[idx] = c.handle


def retire_handle(vmm, vadi, handle: int) -> int:
    """The guest freed fake pair ``handle``: mask and clear every real slot we filled from it.

    Its IRTE is about to be freed and reused (by another VM, or the host); a real slot still
    holding the old pair would let this ADI's doorbell reach the new owner.  Returns the
    number of slots retired."""
    w = vmm.kernel.hw.mmio_write
    n = 0
    for idx in [i for i, h in vadi.real_handles.items() if h == handle]:
        w(_slot_hpa(vadi, idx) + 0xC, _U32.pack(1))        # mask first, then clear the message
        w(_slot_hpa(vadi, idx), _MSG.pack(0, 0, 0))
        del vadi.real_handles[idx]
        n += 1
    return n


def mangle_update(vmm, vm, vadi) -> None:
    """Intel's path: back the guest's emulated MSI-X vector 0 with the ADI's real IMS slot 0.

    On the first enable the VMM composes a host interrupt for the ADI (source-id = the PF)
    and writes it into real slot 0 itself, untagged; the guest's
    driver selects "its MSI-X vector 0" (IRQ_MODE 0 / IRQ_VECTOR 0, pass-through page), which
    on this device raises IMS slot 0.  Real interrupts are then forwarded like vfio's MSI-X.
    """
    if not vadi.msix_enable or getattr(vadi, "backing_virq", None) is not None:
        for action in vadi._replay():
            if action[0] == "fire":
                _, i, origin, t_ns = action
                target = vadi.deliverable(i)
                if target is not None:
                    vmm._inject(vm, *target, origin, t_ns)
        return
    k = vmm.kernel
    extra = {"sid": vadi.pf_rid}     # the VMM writes slot 0 untagged (ctrl PASID-enable clear)
    try:
        virq = irq_domain_alloc_irqs(k.ir, 1, IrqAllocInfo(extra=extra))
    except IrqError as exc:
        vm.refuse(f"mangle: no host interrupt for {rid_str(vadi.guest_rid)}: {exc}")
        return
    vadi.backing_virq = virq
    k.irq_owner[virq] = adi_origin(vadi.pf_rid, vadi.adi)

    def handler(irq: int, cpu: int) -> None:
        target = vadi.deliverable(0)
        if target is None:
            vadi.pending.setdefault(0, (k.cur_origin, k.cur_t_ns))
            return
        vmm._inject(vm, *target, k.cur_origin, k.cur_t_ns)

    k.irq.request_irq(virq, handler, f"vdcm-msix[0]({rid_str(vadi.guest_rid)})")
    msg = irq_chip_compose_msi_msg(k.irq.irq_get_irq_data(virq))
    k.hw.mmio_write(_slot_hpa(vadi, 0), _MSG.pack(msg.address_lo, msg.address_hi, msg.data))
    k.hw.mmio_write(_slot_hpa(vadi, 0) + 0xC, _U32.pack(0))


def _code_lines(fn) -> int:
    """Lines of code of ``fn`` (no blank lines, comments or docstring): what the report counts."""
    import inspect
    import io
    import textwrap
    import tokenize
    src = textwrap.dedent(inspect.getsource(fn))
    code: set[int] = set()
    doc = None
    prev = None
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.STRING and prev is not None and prev.type == tokenize.INDENT and doc is None:
            doc = range(tok.start[0], tok.end[0] + 1)
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                            tokenize.DEDENT, tokenize.ENDMARKER):
            code.update(range(tok.start[0], tok.end[0] + 1))
        prev = tok
    return len(code - set(doc or ()))


#: device-specific VMM code per path, in lines (the report prints them beside the rows)
DEVICE_SPECIFIC_LINES = {"case 4 (IMS emulation)": _code_lines(translate_slot) + _code_lines(retire_handle),
                         "mangle (capability hidden, MSI-X emulated on IMS)": _code_lines(mangle_update)}
