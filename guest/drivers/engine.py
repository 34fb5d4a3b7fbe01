"""Driver for the irqlab work engine (PF 1b36:11a0, VF 1b36:11a1).

The driver's own copy of the register map (like a Linux driver's
``registers.h``; the OS never imports the device model)::

    BAR0 + 0x00  ENGINE_ID          RO  "IRQL"
    BAR0 + 0x08  CMPL_BASE_LO       RW  completion ring bus address
    BAR0 + 0x0C  CMPL_BASE_HI       RW
    BAR0 + 0x10  CMPL_RING_ENTRIES  RW  power of two
    BAR0 + 0x14  IRQ_VECTOR         RW  MSI-X entry raised on completion
    BAR0 + 0x18  DOORBELL           WO  cookie: one work item
    BAR0 + 0x1C  COMPLETED          RO  work items completed (= the next record's sequence number)
    BAR0 + 0x28  IRQ_MODE           RW  0 = raise MSI-X entry IRQ_VECTOR, 1 = IMS slot IRQ_VECTOR,
                                        2 = memory IMS slot IRQ_VECTOR (ADIs)
    BAR0 + 0x2C  IMS_CAP            RO  number of device-kind IMS slots (0: no IMS)
    BAR0 + 0x38  QCTX_BASE_LO/HI    RW  (ADIs) queue context: memory-kind IMS slots, 16 B each
    BAR0 + 0x40  IMS_MEM_SLOTS      RO  (ADIs) memory-kind IMS slots the queue context holds
    BAR0 + 0x60  CMPL_FORMAT        RW  1 = DWORD records (the cookie alone); the driver keeps 0
    BAR0 + 0x44  CMPL_HEAD          RW  records consumed: frees work-queue room
    BAR0 + 0x48  WQ_DEPTH           RO  work items the engine takes beyond CMPL_HEAD
    BAR0 + 0x4C  IRQ_BURST          RW  interrupts raised per completion, 1..256 (an interrupt
                                        generator; memory-kind IMS raises one whatever it says)
    BAR0 + 0x1000 IMS slots, 16 B each (addr lo, addr hi, data, ctrl)
    completion record (16 B): u32 cookie | u32 status (1 = done) | u64 seq

With ``irq_mode="ims"`` the driver asks the kernel for an IMS domain on its
function (``pci_create_ims_domain``).  If the kernel refuses — a modern guest
kernel in a VM whose hypervisor cannot compose — the driver records the error
and falls back to MSI-X, as real drivers do.

The interrupt handler runs only after the device's DMA write of the record
(same source, posted ordering), so the record for every interrupt must already
be in memory: the handler checks it and counts ``record_missing`` if not —
the lab's check of PCIe ordering end to end.
"""

from __future__ import annotations

import collections
import struct
import time
from typing import Callable

from guest.pci import regs as R
from guest.pci.core import PciDev

PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1B36
ENGINE_PF_ID = 0x11A0
ENGINE_VF_ID = 0x11A1

ENGINE_ID = 0x00
CMPL_BASE_LO = 0x08
CMPL_BASE_HI = 0x0C
CMPL_RING_ENTRIES = 0x10
IRQ_VECTOR = 0x14
DOORBELL = 0x18
COMPLETED = 0x1C
IRQ_MODE = 0x28
IMS_CAP = 0x2C
QCTX_BASE_LO = 0x38
QCTX_BASE_HI = 0x3C
IMS_MEM_SLOTS = 0x40
CMPL_FORMAT = 0x60
CMPL_HEAD = 0x44
WQ_DEPTH = 0x48
IRQ_BURST = 0x4C
IRQ_BURST_MAX = 256
IMS_OFFSET = 0x1000
IMS_SLOT_SIZE = 16
IRQ_MODE_MSIX, IRQ_MODE_IMS, IRQ_MODE_IMS_MEMORY = 0, 1, 2
ADI_DEVICE_ID = 0x11A3
PAGE_SIZE = 4096
CMPL_STATUS_DONE = 1
RING_ENTRIES = 1024

_RECORD = struct.Struct("<IIQ")
_U32 = struct.Struct("<I")


class EngineDriver:
    """The driver (``struct pci_driver``): matches and probes functions."""

    name = "irqlab-engine"

    def __init__(self, irq_mode: str = "msix", ims_kind: "str | dict[int, str]" = "device"):
        """``ims_kind``: the IMS kind to try first, for every function or per RID (others: device)."""
        if irq_mode not in ("msix", "ims"):
            raise ValueError(f"irq_mode {irq_mode!r} (expected 'msix' or 'ims')")
        kinds = ims_kind.values() if isinstance(ims_kind, dict) else [ims_kind]
        if any(k not in ("device", "memory") for k in kinds):
            raise ValueError(f"ims_kind {ims_kind!r} (expected 'device' or 'memory')")
        self.irq_mode = irq_mode
        self.ims_kind = ims_kind

    def match(self, dev: PciDev) -> bool:
        return dev.vendor == PCI_VENDOR_ID_REDHAT_QUMRANET and dev.device in (
            ENGINE_PF_ID, ENGINE_VF_ID, ADI_DEVICE_ID)

    async def probe(self, kernel, dev: PciDev) -> "EngineInstance":
        await kernel.pci.enable_device(dev)
        kind = self.ims_kind.get(dev.rid, "device") if isinstance(self.ims_kind, dict) else self.ims_kind
        inst = EngineInstance(kernel, dev, self.irq_mode, ims_kind=kind)
        await inst.setup()
        return inst


class DriverError(RuntimeError):
    """Probe failed: the function cannot be used (e.g. no interrupt the platform allows)."""


class EngineInstance:
    """One bound work engine (a PCI function, or an ADI portal): its ring, its interrupt, counters.

    ``bar0`` is the engine's register page (a function's BAR0, or an ADI's portal
    page in its PF's BAR2); ``origin`` the out-of-band identity of what raises its
    interrupts (the isolation oracle's notion of the owner).
    """

    def __init__(self, kernel, dev: PciDev, irq_mode: str = "msix", *, bar0: int | None = None,
                 label: str | None = None, ims_kind: str = "device", origin: int | None = None,
                 msix: bool = True, domain_name: str | None = None, bind_pasid: int | None = None,
                 mem_ims: bool = True):
        self.kernel = kernel
        self.dev = dev
        self.want_mode = irq_mode
        self.ims_kind = ims_kind
        self.irq_mode = "msix"
        self.ims_error = ""      # why IMS (or a kind of it) was not used, when it was asked for
        self.ims_domain = None
        self.bar0 = dev.bars[0].base if bar0 is None else bar0
        self._label = label
        self.origin = kernel.provenance.get(dev.rid, dev.rid) if origin is None else origin
        self._msix = msix and R.PCI_CAP_ID_MSIX in dev.caps
        self._domain_name = domain_name or dev.name
        self._action = domain_name or str(dev)
        self.bind_pasid = bind_pasid   # bare metal: IRTEs also check this PASID
        self.mem_ims = mem_ims         # False: never memory-kind IMS (its messages would fault)
        self.ring = 0
        self.qctx = 0
        self.entries = RING_ENTRIES
        self.irq = -1
        self.doorbells = 0
        self.completed = 0          # records consumed by the handler
        self.wq_depth = 1           # read from the engine at setup
        self.head_written = 0       # the last CMPL_HEAD we wrote
        self.backlog: collections.deque[int] = collections.deque()   # cookies waiting for WQ room
        self.interrupts = 0
        self.record_missing = 0
        # IRQ_BURST as programmed, and the record check across its changes: (first work item,
        # interrupts announced by the records before it, burst from it on), one entry per change,
        # oldest first.  A work item completes at the burst in force when it was rung (the write
        # is ordered with the doorbells).
        self._bursts: list[tuple[int, int, int]] = [(0, 0, 1)]
        self.latencies_ns: list[int] = []
        self.on_complete: Callable[["EngineInstance", int], None] | None = None
        self.on_irq: Callable[["EngineInstance"], None] | None = None
        self.on_remove: Callable[["EngineInstance"], None] | None = None
        self.removed = ""             # why the function went away (surprise removal)
        self._ram = kernel.ram

    @property
    def name(self) -> str:
        if self._label:
            return self._label
        if self.dev.device == ADI_DEVICE_ID:
            return f"adi {self.dev}"
        # A VF assigned to a VM looks like an ordinary function there; its device ID still says VF.
        vf = self.dev.is_virtfn or self.dev.device == ENGINE_VF_ID
        return f"{'vf' if vf else 'pf'} {self.dev}"

    async def setup(self) -> None:
        k = self.kernel
        self.ring = k.ram.alloc(self.entries * _RECORD.size)
        index, mode = 0, IRQ_MODE_MSIX
        if self.want_mode == "ims":
            index, mode = await self._setup_ims()
        if self.irq_mode == "msix":
            if not self._msix:
                raise DriverError(f"{self.name}: no usable interrupt: {self.ims_error or 'no IMS'}; "
                                  "and no MSI-X capability to fall back to")
            (self.irq,) = await k.alloc_msix(self.dev, 1)
        k.irq.request_irq(self.irq, self.handle_irq, f"{EngineDriver.name}:{self._action}")
        w = k.hw.mmio_write
        w(self.bar0 + CMPL_BASE_LO, _U32.pack(self.ring & 0xFFFF_FFFF))
        w(self.bar0 + CMPL_BASE_HI, _U32.pack(self.ring >> 32))
        w(self.bar0 + CMPL_RING_ENTRIES, _U32.pack(self.entries))
        w(self.bar0 + IRQ_VECTOR, _U32.pack(index))
        w(self.bar0 + IRQ_MODE, _U32.pack(mode))
        raw = await k.hw.mmio_read(self.bar0 + WQ_DEPTH, 4)
        self.wq_depth = max(1, int.from_bytes(raw, "little") if raw else 0)

    async def _setup_ims(self) -> tuple[int, int]:
        """Try IMS, the preferred kind first, then the other; keep every refusal's reason.

        Returns (slot, IRQ_MODE).  When nothing works ``irq_mode`` stays "msix".
        """
        from fabric.hypercall import HypercallError
        from guest.irq.domain import IrqError
        k = self.kernel
        errors = []
        # Capability detection, as the 2020 series proposed: a function with the SIOV DVSEC
        # says in it whether it has IMS (a VMM may hide the bit); others are device-specific.
        if await k.pci.siov_supported(self.dev) and not await k.pci.ims_supported(self.dev):
            self.ims_error = "the device's SIOV capability does not offer IMS"
            return 0, IRQ_MODE_MSIX
        kinds = [self.ims_kind] + [x for x in ("device", "memory") if x != self.ims_kind]
        if not self.mem_ims:
            kinds.remove("memory")
        for kind in kinds:
            reg = IMS_CAP if kind == "device" else IMS_MEM_SLOTS
            raw = await k.hw.mmio_read(self.bar0 + reg, 4)
            slots = int.from_bytes(raw, "little") if raw else 0
            if not slots:
                continue
            domain = None
            try:
                if kind == "memory":
                    if not self.qctx:
                        self.qctx = k.ram.alloc(PAGE_SIZE)
                    qctx = self.qctx
                    domain = k.create_ims_domain(self.dev, slots, lambda i: qctx + i * IMS_SLOT_SIZE,
                                                 kind="memory", store=k.ram_store(), name=self._domain_name)
                else:
                    domain = k.create_ims_domain(self.dev, slots,
                                                 lambda i: self.bar0 + IMS_OFFSET + i * IMS_SLOT_SIZE,
                                                 name=self._domain_name)
                # Only memory-kind messages go out PASID-tagged (device-kind slots are written with
                # ctrl PASID-enable clear), so only they may be bound to the PASID.
                (self.irq,) = await k.alloc_ims(domain, self.dev, 1, owner=self.origin,
                                                pasid=self.bind_pasid if kind == "memory" else None)
            except (IrqError, HypercallError) as exc:
                errors.append(f"{kind} IMS: {exc}")
                if domain is not None:
                    k.remove_domain(domain)
                continue
            self.ims_domain = domain
            self.ims_error = "; ".join(errors)
            if kind == "memory":
                w = k.hw.mmio_write
                w(self.bar0 + QCTX_BASE_LO, _U32.pack(self.qctx & 0xFFFF_FFFF))
                w(self.bar0 + QCTX_BASE_HI, _U32.pack(self.qctx >> 32))
            self.irq_mode = "ims" if kind == "device" else "ims-memory"
            slot = k.irq.irq_get_irq_data(self.irq).hwirq
            return slot, (IRQ_MODE_IMS if kind == "device" else IRQ_MODE_IMS_MEMORY)
        self.ims_error = "; ".join(errors) or "the device reports no IMS slots"
        k.log.append(f"{EngineDriver.name} {self.name}: IMS unavailable: {self.ims_error}")
        return 0, IRQ_MODE_MSIX

    def remove(self, why: str) -> None:
        """The device is gone: stop (no more doorbells) and let whoever waits know why."""
        self.removed = why
        if self.on_remove is not None:
            self.on_remove(self)

    async def set_burst(self, n: int) -> int:
        """Program IRQ_BURST (clamped to 1..256): every work item rung after it raises its
        interrupt ``n`` times -- on a device with the interrupt generator; it reads back what
        the device took (1 without it).  Memory-kind IMS raises one whatever it says, so it
        stays 1 there.  Work already rung completes at the burst it was rung at, and the record
        check counts it so.  Returns the burst in force; never raises (a device that does not
        answer is taken to have taken ``n``)."""
        n = min(max(int(n), 1), IRQ_BURST_MAX)
        if self.irq_mode == "ims-memory":
            n = 1
        if n == self.burst or self.removed:
            return self.burst
        hw = self.kernel.hw
        at = self.doorbells                   # what the interrupt handler rings from now on is after it
        hw.mmio_write(self.bar0 + IRQ_BURST, _U32.pack(n))
        bursts = self._bursts
        while len(bursts) > 1 and bursts[1][0] <= self.completed:
            del bursts[0]                     # changes every consumed record is past
        base = self._allowance(at)
        bursts.append((at, base, n))
        entry = len(bursts) - 1               # (one set_burst at a time: the shell's workload.run)
        try:
            raw = await hw.mmio_read(self.bar0 + IRQ_BURST, 4)
        except RuntimeError:                  # no completion (VmExitError; CompletionTimeout on the host)
            raw = None if self.removed else _U32.pack(n)
        took = min(max(int.from_bytes(raw, "little") if raw else 1, 1), IRQ_BURST_MAX)
        if took != n:
            bursts[entry] = (at, base, took)
        return took

    @property
    def burst(self) -> int:
        """IRQ_BURST as programmed: interrupts per work item rung from now on."""
        return self._bursts[-1][2]

    @property
    def irqs_allowed(self) -> int:
        """Interrupts the records consumed so far announce: each at the burst its work item was
        rung at (``completed`` itself while it is 1)."""
        return self._allowance(self.completed)

    def _allowance(self, records: int) -> int:
        for start, base, burst in reversed(self._bursts):
            if records >= start:
                return base + (records - start) * burst
        return records                        # before every kept change: not reached

    def ring_doorbell(self, cookie: int) -> None:
        """Submit one work item; with the work queue full it waits in ``backlog`` (never dropped)."""
        if self.removed:
            return
        limit = self._limit
        if self.backlog or self.doorbells - self.head_written >= limit:
            self._write_head()                      # give back what we consumed, then retry
            if self.backlog or self.doorbells - self.completed >= limit:
                self.backlog.append(cookie)
                return
        self.doorbells += 1
        self.kernel.hw.mmio_write(self.bar0 + DOORBELL, _U32.pack(cookie & 0xFFFF_FFFF))

    @property
    def _limit(self) -> int:
        """Work items we keep in the device's queue beyond CMPL_HEAD: three quarters of it,
        the last quarter for work we could not see coming (records of replayed doorbells
        still on their way to us)."""
        return max(1, self.wq_depth - self.wq_depth // 4)

    def _write_head(self) -> None:
        if self.completed != self.head_written:
            self.head_written = self.completed
            self.kernel.hw.mmio_write(self.bar0 + CMPL_HEAD, _U32.pack(self.completed & 0xFFFF_FFFF))

    def handle_irq(self, irq: int, cpu: int) -> None:
        """The interrupt handler: consume every completed record, in order."""
        k = self.kernel
        self.interrupts += 1
        t = k.cur_t_ns
        if t:
            self.latencies_ns.append(time.monotonic_ns() - t)
        data = self._ram.data
        base = self.ring - self._ram.base
        seq = self.completed
        cookies = []
        while True:
            off = base + (seq % self.entries) * 16
            cookie, status, rseq = _RECORD.unpack_from(data, off)
            if status != CMPL_STATUS_DONE or rseq != seq:
                break
            data[off + 4:off + 8] = b"\0\0\0\0"  # consumed
            seq += 1
            cookies.append(cookie)
        # Account for everything consumed before anyone rings again: records for work we did
        # not submit (a doorbell frame replayed on our link) occupied the device's work queue
        # as ours do, and the room they free must be given back first.
        self.completed = seq
        if seq > self.doorbells:
            self.doorbells = seq
        if seq - self.head_written >= max(1, self.wq_depth // 4):
            self._write_head()
        if self.on_complete is not None:
            for cookie in cookies:
                self.on_complete(self, cookie)
        if self.irqs_allowed < self.interrupts:
            # Every interrupt is sent after its record: when the k-th arrives, the records
            # announcing k interrupts (IRQ_BURST each) must be in memory.  Fewer means an
            # interrupt overtook its completion record.
            self.record_missing += 1
        # Give the work queue back its room: in batches of a quarter of it (one MWr per
        # WQ_DEPTH/4 records), at once when work waits for it.
        if self.backlog:
            self._write_head()
            backlog = self.backlog
            while backlog and self.doorbells - self.completed < self._limit and not self.removed:
                self.doorbells += 1
                self.kernel.hw.mmio_write(self.bar0 + DOORBELL, _U32.pack(backlog.popleft() & 0xFFFF_FFFF))
        elif self.completed - self.head_written >= max(1, self.wq_depth // 4):
            self._write_head()
        if self.on_irq is not None:
            self.on_irq(self)
