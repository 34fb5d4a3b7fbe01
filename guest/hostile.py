"""Misbehaviours a guest can be told to commit (the lab's attacker inside a VM).

Each is something a real guest kernel (or root in it) can do with what it
controls: its CPU's loads and stores, its device's registers, its hypercalls.
They run inside the guest process and go through exactly the same paths as
the guest's normal traffic, so what stops them is the fabric and the host,
never the guest's good will.  ``ACTIONS`` maps a name to (help, coroutine).
"""

from __future__ import annotations

import struct

from fabric import hypercall as hc
from guest.drivers.engine import (CMPL_BASE_HI, CMPL_BASE_LO, CMPL_FORMAT, CMPL_HEAD, CMPL_RING_ENTRIES, COMPLETED,
                                  DOORBELL, IMS_OFFSET)


async def mmio_outside_ept(shell, args: dict) -> dict:
    """Store to (and load from) a guest-physical address the VMM never mapped for this VM."""
    addr = int(args.get("addr", 0xF000_0000)) & ~3
    shell.hw.mmio_write(addr, struct.pack("<I", 0xDEADBEEF))
    data = await shell.hw.mmio_read(addr, 4)
    return {"addr": addr, "read": None if data is None else data.hex()}


async def dma_outside_memory(shell, args: dict) -> dict:
    """Point the assigned function's completion ring outside guest RAM and ring it."""
    inst = _engine(shell)
    target = int(args.get("addr", shell.kernel.ram.size + 0x10_0000)) & ~0xF
    await _aim_record(shell, inst, target, dword=False)
    shell.hw.mmio_write(inst.bar0 + DOORBELL, struct.pack("<I", 0xBAD))
    _restore_ring(shell, inst)              # put the ring back so the driver keeps working
    # That work item's record went elsewhere (or nowhere): its sequence number is spent.
    inst.completed += 1
    return {"dma_target": target}


async def compose_foreign(shell, args: dict) -> dict:
    """Ask the hypervisor to compose an interrupt for a function this VM does not own."""
    dev = int(args.get("dev", 0x0100))    # by default the host's own PF, 01:00.0
    try:
        v = await shell.hw.hypercall(hc.HC_MSI_COMPOSE, dev, 0x40, 0, 0)
        return {"ret": 0, "values": v}
    except hc.HypercallError as exc:
        return {"ret": exc.ret, "error": str(exc)}


async def dma_into_interrupt_range(shell, args: dict) -> dict:
    """Make the assigned device DMA-write into 0xFEE0_0000-0xFEEF_FFFF: forged interrupt requests.

    Two work items whose completion records the device writes where the guest aimed its ring
    (on the bus: a MemWr to the interrupt range with the device's RID):

    1. the usual 16-byte record at 0xFEE0_0000 -- four DWs are no interrupt request: fault
       0x20 (``"record": false`` skips it);
    2. with DWORD records (the engine's CMPL_FORMAT) one DW of the guest's choosing: a
       remappable message naming IRTE ``handle`` (default 0) + ``subhandle`` (default 0, in
       the data), or exactly ``addr``/``data`` when given.  Now the IR unit's IRTE checks
       decide: 0x26 for someone else's entry (source-id), 0x22 for a free one, 0x21 past the
       table, 0x25 for a compatibility-format ``addr``.

    Returns once the IR unit has ruled on both (a read of its own registers comes back after
    the device's writes have reached the fabric).
    """
    from fabric.ir import compose_remappable
    inst = _engine(shell)
    w = shell.hw.mmio_write
    writes = []
    if args.get("record", True):
        await _aim_record(shell, inst, 0xFEE0_0000, dword=False)
        w(inst.bar0 + DOORBELL, struct.pack("<I", int(args.get("cookie", 0x21)) & 0xFFFF_FFFF))
        inst.completed += 1               # its record goes elsewhere (before its interrupt comes in)
        writes.append({"addr": 0xFEE0_0000, "bytes": 16})
    if "addr" in args:
        addr, data = int(args["addr"]) & 0xFFFF_FFFC, int(args.get("data", 0)) & 0xFFFF_FFFF
    else:
        addr, _hi, data = compose_remappable(int(args.get("handle", 0)), int(args.get("subhandle", 0)), shv=True)
    await _aim_record(shell, inst, addr, dword=True)
    w(inst.bar0 + DOORBELL, struct.pack("<I", data))
    inst.completed += 1
    writes.append({"addr": addr, "data": data, "bytes": 4})
    _restore_ring(shell, inst)
    await shell.hw.mmio_read(inst.bar0 + COMPLETED, 4)
    return {"writes": writes}


async def _aim_record(shell, inst, target: int, *, dword: bool) -> int:
    """Make the engine's next completion record land at bus address ``target``, as a guest can:
    read COMPLETED (the next record's sequence number) and place the ring so that its slot is
    ``target``; with ``dword`` the record is the 4-byte cookie alone (CMPL_FORMAT).  Returns
    the sequence number."""
    raw = await shell.hw.mmio_read(inst.bar0 + COMPLETED, 4)
    seq = int.from_bytes(raw, "little") if raw else 0
    base = (target - (seq % inst.entries) * (4 if dword else 16)) & (1 << 64) - 1
    w = shell.hw.mmio_write
    w(inst.bar0 + CMPL_FORMAT, struct.pack("<I", int(dword)))
    w(inst.bar0 + CMPL_BASE_LO, struct.pack("<I", base & 0xFFFF_FFFF))
    w(inst.bar0 + CMPL_BASE_HI, struct.pack("<I", base >> 32))
    return seq


def _restore_ring(shell, inst) -> None:
    """The driver's own ring and 16-byte records again."""
    w = shell.hw.mmio_write
    w(inst.bar0 + CMPL_FORMAT, struct.pack("<I", 0))
    w(inst.bar0 + CMPL_BASE_LO, struct.pack("<I", inst.ring & 0xFFFF_FFFF))
    w(inst.bar0 + CMPL_BASE_HI, struct.pack("<I", inst.ring >> 32))
    w(inst.bar0 + CMPL_RING_ENTRIES, struct.pack("<I", inst.entries))


async def ims_steal_device(shell, args: dict) -> dict:
    """Write IRTE ``handle`` (someone else's) into this VM's device-kind IMS slot, ring the doorbell.

    Where the slot page is passed through (a VF's IMS), the device sends it with the VF's
    RID: the IRTE's source-id check must catch it (fault 0x26 at that IRTE's index).  Where it
    is trapped (case 4), the VMM sees a pair it did not compose and keeps the real slot masked:
    the doorbell's interrupt waits there, pending.  Then our own message is put back (unless
    ``"restore": false``, which leaves the forged pair -- and, in case 4, the masked real
    slot -- to be inspected).  Returns once the doorbell's interrupt has been sent or pended.
    """
    from fabric.ir import compose_remappable
    inst = _engine(shell)
    if inst.irq_mode != "ims":
        raise RuntimeError(f"{inst.name} does not use device IMS (it uses {inst.irq_mode})")
    slot = shell.kernel.irq.irq_get_irq_data(inst.irq).hwirq
    addr = inst.bar0 + IMS_OFFSET + slot * 16
    handle = _target_handle(shell, inst, args)
    lo, hi, data = compose_remappable(handle, 0, shv=True)
    shell.hw.mmio_write(addr, struct.pack("<III", lo, hi, data))
    shell.hw.mmio_write(inst.bar0 + DOORBELL, struct.pack("<I", 0x57EA1))
    inst.completed += 1
    # the device raised (or pended) the doorbell's interrupt before it answers this read
    await shell.hw.mmio_read(inst.bar0 + COMPLETED, 4)
    restore = bool(args.get("restore", True))
    own = shell.kernel.irq.irq_get_irq_data(inst.irq).chip_data
    if restore and own.msg is not None:
        # put our own message back
        shell.hw.mmio_write(addr, struct.pack("<III", own.msg.address_lo, own.msg.address_hi, own.msg.data))
        shell.hw.mmio_write(addr + 12, struct.pack("<I", own.ctrl))
    return {"slot": slot, "handle": handle, "restored": restore}


async def ims_redirect(shell, args: dict) -> dict:
    """Point this VM's memory-IMS slot at IRTE ``handle`` (someone else's), ring the doorbell.

    The store is guest RAM: no VMM can trap it.  Whether the message reaches the other
    VM's vector depends only on what the IR unit can check: the requester ID (the same
    PF for every ADI) and, if the platform can, the PASID.
    """
    from fabric.ir import compose_remappable
    inst = _engine(shell)
    if inst.irq_mode != "ims-memory":
        raise RuntimeError(f"{inst.name} does not use memory IMS (it uses {inst.irq_mode})")
    slot = shell.kernel.irq.irq_get_irq_data(inst.irq).hwirq
    addr = inst.qctx + slot * 16
    saved = shell.kernel.ram.read(addr, 16)
    handle = _target_handle(shell, inst, args)
    lo, hi, data = compose_remappable(handle, 0, shv=True)
    shell.kernel.ram.write(addr, struct.pack("<IIII", lo, hi, data, 0))
    shell.hw.mmio_write(inst.bar0 + DOORBELL, struct.pack("<I", 0x57EA1))
    inst.completed += 1          # that work item's interrupt is meant to go elsewhere
    restore = args.get("restore", True)
    if restore:
        # put our own message back once the device has fetched the forged one: a store and a
        # read-back of our own register page keep the order (posted writes, then a read)
        await shell.hw.mmio_read(inst.bar0, 4)
        shell.kernel.ram.write(addr, saved)
    return {"slot": slot, "handle": handle, "restored": bool(restore)}


async def hypercall_raw(shell, args: dict) -> dict:
    """Issue a hypercall exactly as given (any number, any arguments, even malformed ones)."""
    result = await shell.hw.vmexit("hypercall", {"nr": args.get("nr"), "a": args.get("a", [])})
    return result if isinstance(result, dict) else {"result": result}


async def malformed_frames(shell, args: dict) -> dict:
    """Put junk on the socket: not msgpack, wrong shapes, unknown types, oversized, too many parts."""
    import msgpack
    import zmq
    n = int(args.get("count", 8))
    frames = [b"\xc1" * 7, msgpack.packb({"not": "an array"}), msgpack.packb([999, 1, 2]),
              msgpack.packb([10]), msgpack.packb([10, "not bytes", None, 0]), b"\x00" * 9000,
              msgpack.packb([10, b"\x60\x00", None, 0]), msgpack.packb([50, "g2", "x", "cpuid", {}])]
    sent = 0
    for i in range(n):
        shell.port.send(frames[i % len(frames)])
        sent += 1
    try:
        # more parts than a coalesced message may carry (wire.BATCH_MAX): dropped whole
        from fabric.wire import BATCH_MAX
        shell.port.sock.send_multipart([b"part"] * (BATCH_MAX + 1), zmq.NOBLOCK)
        sent += 1
    except zmq.ZMQError:
        pass
    return {"sent": sent}


async def spoof_identity(shell, args: dict) -> dict:
    """Claim to be someone else: another VM's name, another device's RID, the host's messages."""
    from fabric import wire
    from fabric.tlp import Tlp
    sent = []
    # a second HELLO with a made-up token, as "g2"
    shell.port.send(wire.hello("0" * 32, "g2")); sent.append("hello-as-g2")
    # a VM exit that says it comes from g2 (the fabric stamps the real name)
    shell.port.send(wire.vmexit("g2", 0, "hypercall", {"nr": 0, "a": []})); sent.append("vmexit-as-g2")
    # an interrupt request with another device's RID (CPU TLPs are stamped 00:00.0)
    lo = 0xFEE0_0018
    shell.port.send(wire.tlp(Tlp.mem_write(lo, b"\0\0\0\0", requester_id=0x0102).pack(), 0x0102, 1))
    sent.append("msi-with-rid-01:00.2")
    # host-only messages: injection into another VM, privileged register writes, VM entries
    shell.port.send(wire.inject("g2", 0, 0x41, None, 0)); sent.append("inject-into-g2")
    shell.port.send(wire.reg(1, "irte.write", {"index": 0, "lo": 0, "hi": 0})); sent.append("reg-irte-write")
    shell.port.send(wire.vmentry("g2", 1, True, None)); sent.append("vmentry-to-g2")
    shell.port.send(wire.ctl(1, "host", "shutdown", {})); sent.append("ctl-host-shutdown")
    # a config request straight to a device
    shell.port.send(wire.tlp(Tlp.cfg_read(0x0100, 0).pack())); sent.append("cfg-read-01:00.0")
    return {"sent": sent}


async def replay_frames(shell, args: dict) -> dict:
    """Send again the last frames this guest sent (old VM exits, doorbells, table writes)."""
    frames = list(getattr(shell.port, "recent", []))[-int(args.get("count", 16)):]
    for f in frames:
        shell.port.send(f)
    return {"replayed": len(frames)}


async def storm(shell, args: dict) -> dict:
    """An interrupt storm: ring the assigned function's doorbell as fast as possible for a while."""
    import asyncio
    import time
    inst = _engine(shell)
    seconds = float(args.get("seconds", 2.0))
    batch = int(args.get("batch", 64))
    rate = float(args.get("rate", 0) or 0)   # doorbells/s; 0: as fast as it can
    t0 = time.monotonic()
    end = t0 + seconds
    rung = 0
    w = shell.hw.mmio_write
    bell = inst.bar0 + DOORBELL
    port = shell.port
    stalls, stalled_s = port.stalls, port.stalled_s
    while (now := time.monotonic()) < end:
        if port.holding:             # no credits (the fabric throttles us): a stalled vCPU stores nothing
            await port.until_released()
            continue
        for _ in range(batch):
            w(bell, struct.pack("<I", rung & 0xFFFF_FFFF))
            rung += 1
        ahead = rung / rate - (now - t0) if rate else 0.0
        await asyncio.sleep(ahead if ahead > 0 else 0)   # let the interrupts in between
    return {"doorbells": rung, "seconds": seconds, "stalls": port.stalls - stalls,
            "stalled_s": round(port.stalled_s - stalled_s, 3)}


async def campaign(shell, args: dict) -> dict:
    """``count`` random misbehaviours in a row, fast (no waiting between them), for the bench.

    Kinds: forged messages in its IMS storage (random handles and data), DMA into the
    interrupt range (a 16-byte record, or -- with DWORD records -- one forged remappable or
    compatibility-format message with random handle and data, which reaches the IRTE checks)
    and outside its memory, stores outside its EPT, malformed and spoofed frames, and every
    ``hypercall_every``-th action a random hypercall (those wait for their answer; so does
    the read of COMPLETED that aims each DMA).  It tells its device every record was
    consumed (CMPL_HEAD), so its work queue never fills.  Returns how many of each it tried.
    Legitimate work of the same guest is not expected to survive it; everyone else's is.
    """
    import asyncio
    import random

    from fabric import wire
    from fabric.ir import compose_remappable
    from fabric.tlp import Tlp
    rng = random.Random(int(args.get("seed", 1)))
    count = int(args.get("count", 1000))
    max_handle = int(args.get("max_handle", 64))
    hc_every = int(args.get("hypercall_every", 200))
    inst = _engine(shell)
    w = shell.hw.mmio_write
    k = shell.kernel
    tried: dict[str, int] = {}
    slot = k.irq.irq_get_irq_data(inst.irq).hwirq if inst.irq >= 0 else 0
    kinds = ["dma-irq-range", "dma-outside", "mmio-outside", "frame-junk", "frame-spoof"]
    if inst.irq_mode == "ims-memory":
        kinds += ["ims-memory"] * 4
    elif inst.irq_mode == "ims":
        kinds += ["ims-device"] * 2
    for i in range(count):
        if hc_every and i % hc_every == hc_every - 1:
            kind = "hypercall"
            nr = rng.choice([0, 1, 2, rng.randrange(1 << 16)])
            a = [rng.choice([0x18, 0x20, 0x100, rng.randrange(1 << 16)]), rng.randrange(256), rng.randrange(8),
                 rng.randrange(1 << 17)][:rng.randrange(5)]
            try:
                await shell.hw.vmexit("hypercall", {"nr": nr, "a": a})
            except Exception:
                pass
        else:
            kind = rng.choice(kinds)
            if kind == "ims-memory":
                lo, hi, data = compose_remappable(rng.randrange(max_handle), rng.randrange(4), shv=rng.random() < 0.8)
                k.ram.write(inst.qctx + slot * 16, struct.pack("<IIII", lo, hi, data, 0))
                w(inst.bar0 + DOORBELL, struct.pack("<I", i))
                # a read of our own portal returns after the device's slot fetch has been
                # answered from RAM (same path, in order): the forged value is what it read
                done = await shell.hw.mmio_read(inst.bar0 + COMPLETED, 4)
                if done:
                    w(inst.bar0 + CMPL_HEAD, done)   # "all consumed": its work queue never fills
            elif kind == "ims-device":
                lo, hi, data = compose_remappable(rng.randrange(max_handle), 0, shv=True)
                w(inst.bar0 + IMS_OFFSET + slot * 16, struct.pack("<III", lo, hi, data))
                w(inst.bar0 + DOORBELL, struct.pack("<I", i))
            elif kind == "dma-irq-range":
                r = rng.random()
                if r < 0.25:        # a 16-byte record: no interrupt request at all (0x20)
                    target, dword, cookie = 0xFEE0_0000 | rng.randrange(1 << 20) & ~0xF, False, i
                elif r < 0.35:      # one DWORD in compatibility format (0x25 with IR on)
                    target, dword, cookie = 0xFEE0_0000 | rng.randrange(1 << 20) & ~0x13, True, rng.randrange(1 << 32)
                else:               # one DWORD naming a random IRTE (0x21 / 0x22 / 0x26 ...)
                    target, _, cookie = compose_remappable(rng.randrange(max_handle), rng.randrange(4),
                                                           shv=rng.random() < 0.8)
                    dword = True
                    if rng.random() < 0.1:
                        cookie = rng.randrange(1 << 32)      # reserved data bits
                seq = await _aim_record(shell, inst, target, dword=dword)
                w(inst.bar0 + CMPL_HEAD, struct.pack("<I", seq & 0xFFFF_FFFF))
                w(inst.bar0 + DOORBELL, struct.pack("<I", cookie))
            elif kind == "dma-outside":
                seq = await _aim_record(shell, inst, (k.ram.size + rng.randrange(1 << 24)) & ~0xF, dword=False)
                w(inst.bar0 + CMPL_HEAD, struct.pack("<I", seq & 0xFFFF_FFFF))
                w(inst.bar0 + DOORBELL, struct.pack("<I", i))
            elif kind == "mmio-outside":
                w(0xF000_0000 + rng.randrange(1 << 20) * 4, struct.pack("<I", rng.randrange(1 << 32)))
            elif kind == "frame-junk":
                shell.port.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))))
            else:  # frame-spoof
                shell.port.send(rng.choice([
                    wire.inject("g2", 0, rng.randrange(256), None, 0),
                    wire.reg(i, "irte.write", {"index": rng.randrange(64), "lo": 0, "hi": 0}),
                    wire.tlp(Tlp.cfg_read(rng.randrange(1 << 16), 0).pack()),
                    wire.vmentry("g2", rng.randrange(1, 1000), True, None)]))
        tried[kind] = tried.get(kind, 0) + 1
        if i % 256 == 255:
            await asyncio.sleep(0)        # let the answers in
    # restore the ring and our own slot so the guest itself can go on
    _restore_ring(shell, inst)
    own = k.irq.irq_get_irq_data(inst.irq).chip_data if inst.irq >= 0 else None
    if own is not None and getattr(own, "msg", None) is not None:
        m = own.msg
        if inst.irq_mode == "ims-memory":
            k.ram.write(inst.qctx + slot * 16, struct.pack("<IIII", m.address_lo, m.address_hi, m.data, 0))
        elif inst.irq_mode == "ims":
            w(inst.bar0 + IMS_OFFSET + slot * 16, struct.pack("<III", m.address_lo, m.address_hi, m.data))
    return {"tried": tried, "total": count}


async def sigkill(shell, args: dict) -> dict:
    """Die by SIGKILL in the middle of its own operations (DESIGN.md §6: dying mid-operation).

    A process cannot answer a request after it is dead, so this answers at once (its pid and
    what it will do), then works from the event loop: ``after`` operations (default 64) on its
    assigned functions -- doorbells through its driver, and every 8th a compose hypercall for
    one of them (an IRTE and a host vector the host has to take back) -- then starts one more
    hypercall and rings one more doorbell and, with both in flight, sends itself SIGKILL from a
    loop callback.  Nothing answers after that: the launcher sees the process die, the fabric
    forgets its port and the host reclaims the VM (``reclaimed`` event, the report's ``deaths``).
    As a topology ``behaviours`` entry it is committed at the start of a workload run, so the
    guest dies in the middle of that run.
    """
    import asyncio
    import os
    import signal
    after = int(args.get("after", 64))
    if not 1 <= after <= 100_000:
        raise ValueError(f"after={after}: between 1 and 100000 operations")
    engines = [e for e in shell.engines() if not e.removed]
    loop = asyncio.get_running_loop()

    async def compose(i: int) -> None:
        if not engines:
            await shell.hw.hypercall(hc.HC_QUERY_FEATURES)
            return
        inst = engines[i // 8 % len(engines)]
        cookie = hc.COOKIE_MEMORY if inst.irq_mode == "ims-memory" else 0   # as its driver would ask
        try:
            await shell.hw.hypercall(hc.HC_MSI_COMPOSE, inst.dev.rid, hc.FIRST_VECTOR + 0x20 + i % 64, 0, cookie)
        except hc.HypercallError:
            pass                        # refused (quota, no compose in this VM): still an operation

    async def work() -> None:
        try:
            # one round trip first: the answer to whoever asked left this process before it
            await shell.hw.hypercall(hc.HC_QUERY_FEATURES)
            for i in range(after):
                if engines and i % 8 != 7:
                    engines[i % len(engines)].ring_doorbell(0x5161_0000 | i & 0xFFFF)
                else:
                    await compose(i)
                await asyncio.sleep(0)  # let the interrupts of the doorbells in
            loop.create_task(compose(after))          # a VM exit on its way to the host ...
            if engines:
                engines[0].ring_doorbell(0x5161_FFFF)  # ... and a work item in the device
        finally:
            loop.call_soon(os.kill, os.getpid(), signal.SIGKILL)

    shell.dying = loop.create_task(work())
    return {"pid": os.getpid(), "after": after, "functions": [e.name for e in engines],
            "then": "SIGKILL, with a hypercall and a doorbell in flight"}


def _target_handle(shell, inst, args: dict) -> int:
    """The IRTE handle to steal: as given, else the neighbour of our own (someone's, likely)."""
    if "handle" in args:
        return int(args["handle"])
    msg = shell.kernel.irq.irq_get_irq_data(inst.irq).chip_data.msg
    own = (msg.address_lo >> 5) & 0x7FFF if msg is not None else 0
    return own + 1


def _engine(shell):
    engines = shell.engines()
    if not engines:
        raise RuntimeError("this guest has no assigned function to misuse")
    return engines[0]


ACTIONS = {
    "mmio-outside-ept": ("store/load to a guest-physical address outside the VM's EPT", mmio_outside_ept),
    "dma-outside-memory": ("make the assigned device DMA outside the VM's memory", dma_outside_memory),
    "compose-foreign": ("hypercall: compose an interrupt for a device the VM does not own", compose_foreign),
    "hypercall-raw": ("issue a hypercall with arbitrary number and arguments", hypercall_raw),
    "ims-redirect": ("point the memory IMS slot at another IRTE handle and ring a doorbell", ims_redirect),
    "ims-steal-device": ("store another IRTE handle in the device IMS slot and ring a doorbell (then restore it "
                         "unless restore=false)", ims_steal_device),
    "dma-into-interrupt-range": ("make the assigned device DMA into 0xFEEx_xxxx: a 16-byte record, then one DWORD "
                                 "(a forged interrupt naming IRTE handle)", dma_into_interrupt_range),
    "malformed-frames": ("send junk frames on the socket (bad msgpack, shapes, types, sizes, multipart)",
                         malformed_frames),
    "spoof-identity": ("claim other identities: another VM's name, another device's RID, host-only messages",
                       spoof_identity),
    "replay-frames": ("send the guest's last frames again (old exits, doorbells, table writes)", replay_frames),
    "storm": ("ring the assigned function's doorbell as fast as possible (an interrupt storm)", storm),
    "campaign": ("many random misbehaviours in a row (bench/campaign.py)", campaign),
    "sigkill": ("answer, then ring doorbells and compose hypercalls and SIGKILL itself after `after` (64) of them, "
                "one of each still in flight", sigkill),
}
