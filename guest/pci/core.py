"""The PCI core: enumeration, capability lists, BAR sizing and assignment, SR-IOV.

Linux names: ``pci_scan_bus``, ``pci_find_capability``, ``pci_find_ext_capability``,
``__pci_read_base`` (BAR sizing), ``pci_enable_device``, ``pci_set_master``,
``sriov_enable`` / ``pci_iov_virtfn_bus``.

The core reaches config space only through ``PciOps``, an injected accessor
whose ``cfg_read`` / ``cfg_write`` are awaitables (on the host they are CfgRd0 /
CfgWr0 TLPs over the fabric; in tests an in-memory device).  It keeps no I/O of
its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fabric.bdf import rid_str
from guest.pci import regs as R


class PciOps(Protocol):
    async def cfg_read(self, rid: int, reg: int) -> int | None:
        """Read the config DW at ``reg`` (DW aligned); None means the request got UR."""

    async def cfg_write(self, rid: int, reg: int, value: int, first_be: int = 0xF) -> None:
        """Write (the BE-selected bytes of) one config DW and wait for its completion."""


class PciError(RuntimeError):
    pass


@dataclass
class Bar:
    index: int
    base: int
    size: int
    is64: bool
    prefetch: bool

    def __str__(self) -> str:
        bits = "64-bit" if self.is64 else "32-bit"
        pf = "prefetchable" if self.prefetch else "non-prefetchable"
        return f"Memory at {self.base:08x} ({bits}, {pf}) [size={_size_str(self.size)}]"


def _size_str(size: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


@dataclass
class PciDev:
    """What the OS knows about one function (Linux ``struct pci_dev``)."""

    rid: int
    vendor: int
    device: int
    class_rev: int
    header_type: int
    caps: dict[int, int] = field(default_factory=dict)       # cap ID -> offset (first of each)
    ext_caps: dict[int, int] = field(default_factory=dict)
    cap_list: list[tuple[int, int]] = field(default_factory=list)       # (offset, id) in list order
    ext_cap_list: list[tuple[int, int, int]] = field(default_factory=list)  # (offset, id, version)
    bars: dict[int, Bar] = field(default_factory=dict)
    is_virtfn: bool = False
    physfn: "PciDev | None" = None
    virtfns: list["PciDev"] = field(default_factory=list)
    vf_index: int | None = None
    driver: object | None = None
    msix_enabled: bool = False
    irq_domain: object | None = None    # the per-device MSI-X domain once created
    msi_irqs: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"0000:{rid_str(self.rid)}"

    def __str__(self) -> str:
        return rid_str(self.rid)


class PciBus:
    """One OS instance's view of the PCI hierarchy (a flat root complex)."""

    def __init__(self, ops: PciOps, mmio_base: int = 0xE000_0000, mmio_limit: int = 0xFEBF_FFFF):
        self.ops = ops
        self.devices: dict[int, PciDev] = {}
        self._mmio_next = mmio_base
        self._mmio_limit = mmio_limit

    # -- config accessors (Linux pci_read_config_*) --------------------------

    async def read32(self, rid: int, reg: int) -> int:
        v = await self.ops.cfg_read(rid, reg & ~3)
        return 0xFFFF_FFFF if v is None else v

    async def read16(self, rid: int, reg: int) -> int:
        return (await self.read32(rid, reg)) >> (8 * (reg & 2)) & 0xFFFF

    async def read8(self, rid: int, reg: int) -> int:
        return (await self.read32(rid, reg)) >> (8 * (reg & 3)) & 0xFF

    async def write32(self, rid: int, reg: int, value: int) -> None:
        await self.ops.cfg_write(rid, reg & ~3, value & 0xFFFF_FFFF, 0xF)

    async def write16(self, rid: int, reg: int, value: int) -> None:
        sh = reg & 2
        await self.ops.cfg_write(rid, reg & ~3, (value & 0xFFFF) << (8 * sh), 0x3 << sh)

    async def write8(self, rid: int, reg: int, value: int) -> None:
        sh = reg & 3
        await self.ops.cfg_write(rid, reg & ~3, (value & 0xFF) << (8 * sh), 0x1 << sh)

    # -- enumeration ----------------------------------------------------------

    async def scan(self, buses: range, slots: range = range(1)) -> list[PciDev]:
        """``pci_scan_bus``: the given device slots of every bus (a flat root complex has one
        device per bus behind each root port; a VM's virtual bus 0 has many), all functions."""
        found = []
        for bus in buses:
            for slot in slots:
                rid = bus << 8 | slot << 3
                dev = await self.probe_function(rid)
                if dev is None:
                    continue
                found.append(dev)
                if dev.header_type & R.PCI_HEADER_TYPE_MFD:
                    for fn in range(1, 8):
                        sub = await self.probe_function(rid | fn)
                        if sub is not None:
                            found.append(sub)
        return found

    async def probe_function(self, rid: int, *, virtfn_of: PciDev | None = None) -> PciDev | None:
        idw = await self.read32(rid, R.PCI_VENDOR_ID)
        vendor, device = idw & 0xFFFF, idw >> 16
        if virtfn_of is None and vendor in (0xFFFF, 0x0000):
            return None
        if virtfn_of is not None:
            # A VF reads its IDs as 0xFFFF; Linux takes them from the PF (pci_iov_add_virtfn).
            vendor = virtfn_of.vendor
            device = await self.read16(virtfn_of.rid, virtfn_of.ext_caps[R.PCI_EXT_CAP_ID_SRIOV] + R.PCI_SRIOV_VF_DID)
        dev = PciDev(rid=rid, vendor=vendor, device=device,
                     class_rev=await self.read32(rid, R.PCI_CLASS_REVISION),
                     header_type=await self.read8(rid, R.PCI_HEADER_TYPE),
                     is_virtfn=virtfn_of is not None, physfn=virtfn_of)
        await self._read_caps(dev)
        if virtfn_of is None:
            await self._size_bars(dev)
        self.devices[rid] = dev
        return dev

    async def _read_caps(self, dev: PciDev) -> None:
        status = await self.read16(dev.rid, R.PCI_STATUS)
        if status & R.PCI_STATUS_CAP_LIST:
            pos = await self.read8(dev.rid, R.PCI_CAPABILITY_LIST) & ~3
            seen = 0
            while pos >= 0x40 and seen < 48:  # PCI_FIND_CAP_TTL
                hdr = await self.read16(dev.rid, pos)
                cap_id, nxt = hdr & 0xFF, hdr >> 8
                if cap_id == 0xFF:
                    break
                dev.cap_list.append((pos, cap_id))
                dev.caps.setdefault(cap_id, pos)
                pos = nxt & ~3
                seen += 1
        if R.PCI_CAP_ID_EXP not in dev.caps:
            return
        pos, seen = 0x100, 0
        while pos and seen < (4096 - 256) // 8:
            hdr = await self.read32(dev.rid, pos)
            if hdr in (0, 0xFFFF_FFFF):
                break
            cap_id, ver, nxt = hdr & 0xFFFF, (hdr >> 16) & 0xF, (hdr >> 20) & 0xFFC
            dev.ext_cap_list.append((pos, cap_id, ver))
            dev.ext_caps.setdefault(cap_id, pos)
            if nxt and nxt < 0x100:
                break
            pos = nxt
            seen += 1

    async def _size_bar_regs(self, rid: int, reg: int) -> tuple[int, bool, bool, int] | None:
        """Size the BAR at ``reg`` by the all-ones write; returns (size, is64, prefetch, regs used)."""
        orig = await self.read32(rid, reg)
        if orig & R.PCI_BASE_ADDRESS_SPACE_IO:
            return None  # I/O BARs are not modelled
        is64 = (orig & R.PCI_BASE_ADDRESS_MEM_TYPE_MASK) == R.PCI_BASE_ADDRESS_MEM_TYPE_64
        await self.write32(rid, reg, 0xFFFF_FFFF)
        lo = await self.read32(rid, reg)
        await self.write32(rid, reg, orig)
        mask = lo & R.PCI_BASE_ADDRESS_MEM_MASK
        if is64:
            orig_hi = await self.read32(rid, reg + 4)
            await self.write32(rid, reg + 4, 0xFFFF_FFFF)
            hi = await self.read32(rid, reg + 4)
            await self.write32(rid, reg + 4, orig_hi)
            mask |= hi << 32
            size = ((~mask) & 0xFFFF_FFFF_FFFF_FFFF) + 1 if mask else 0
        else:
            size = ((~mask) & 0xFFFF_FFFF) + 1 if mask else 0
        if size == 0:
            return None
        return size, is64, bool(orig & R.PCI_BASE_ADDRESS_MEM_PREFETCH), 2 if is64 else 1

    async def _size_bars(self, dev: PciDev) -> None:
        cmd = await self.read16(dev.rid, R.PCI_COMMAND)
        # Linux turns decoding off while it sizes BARs.
        await self.write16(dev.rid, R.PCI_COMMAND, cmd & ~R.PCI_COMMAND_MEMORY)
        i = 0
        while i < 6:
            reg = R.PCI_BASE_ADDRESS_0 + 4 * i
            res = await self._size_bar_regs(dev.rid, reg)
            if res is None:
                i += 1
                continue
            size, is64, prefetch, used = res
            dev.bars[i] = Bar(i, 0, size, is64, prefetch)
            i += used
        await self.write16(dev.rid, R.PCI_COMMAND, cmd)

    # -- resources ------------------------------------------------------------

    def _alloc_mmio(self, size: int) -> int:
        base = (self._mmio_next + size - 1) & ~(size - 1)
        if base + size - 1 > self._mmio_limit:
            raise PciError(f"MMIO window exhausted allocating 0x{size:x} bytes")
        self._mmio_next = base + size
        return base

    async def assign_resources(self, dev: PciDev) -> list[Bar]:
        """Give every memory BAR an address (``pci_assign_resource``)."""
        for bar in dev.bars.values():
            bar.base = self._alloc_mmio(bar.size)
            reg = R.PCI_BASE_ADDRESS_0 + 4 * bar.index
            orig = await self.read32(dev.rid, reg)
            await self.write32(dev.rid, reg, (bar.base & 0xFFFF_FFF0) | (orig & 0xF))
            if bar.is64:
                await self.write32(dev.rid, reg + 4, bar.base >> 32)
        return list(dev.bars.values())

    async def enable_device(self, dev: PciDev, master: bool = True) -> None:
        """``pci_enable_device`` + ``pci_set_master``: Command.MSE (PFs) and BME."""
        cmd = await self.read16(dev.rid, R.PCI_COMMAND)
        cmd |= R.PCI_COMMAND_MASTER if master else 0
        if not dev.is_virtfn:
            cmd |= R.PCI_COMMAND_MEMORY
        await self.write16(dev.rid, R.PCI_COMMAND, cmd)

    # -- SR-IOV ---------------------------------------------------------------

    async def sriov_enable(self, pf: PciDev, nr_virtfn: int) -> list[PciDev]:
        """``sriov_enable``: NumVFs, VF BAR assignment, VF Enable + VF MSE, then probe the VFs."""
        pos = pf.ext_caps.get(R.PCI_EXT_CAP_ID_SRIOV)
        if pos is None:
            raise PciError(f"{pf}: no SR-IOV capability")
        total = await self.read16(pf.rid, pos + R.PCI_SRIOV_TOTAL_VF)
        if not 0 < nr_virtfn <= total:
            raise PciError(f"{pf}: {nr_virtfn} VFs requested, TotalVFs is {total}")
        await self.write16(pf.rid, pos + R.PCI_SRIOV_NUM_VF, nr_virtfn)
        offset = await self.read16(pf.rid, pos + R.PCI_SRIOV_VF_OFFSET)
        stride = await self.read16(pf.rid, pos + R.PCI_SRIOV_VF_STRIDE)
        vf_bars: dict[int, Bar] = {}
        i = 0
        while i < 6:
            res = await self._size_bar_regs(pf.rid, pos + R.PCI_SRIOV_BAR + 4 * i)
            if res is None:
                i += 1
                continue
            size, is64, prefetch, used = res
            base = self._alloc_mmio(size * nr_virtfn)
            reg = pos + R.PCI_SRIOV_BAR + 4 * i
            orig = await self.read32(pf.rid, reg)
            await self.write32(pf.rid, reg, (base & 0xFFFF_FFF0) | (orig & 0xF))
            if is64:
                await self.write32(pf.rid, reg + 4, base >> 32)
            vf_bars[i] = Bar(i, base, size, is64, prefetch)
            i += used
        ctrl = await self.read16(pf.rid, pos + R.PCI_SRIOV_CTRL)
        await self.write16(pf.rid, pos + R.PCI_SRIOV_CTRL, ctrl | R.PCI_SRIOV_CTRL_VFE | R.PCI_SRIOV_CTRL_MSE)
        vfs = []
        for n in range(nr_virtfn):
            rid = (pf.rid + offset + n * stride) & 0xFFFF
            vf = await self.probe_function(rid, virtfn_of=pf)
            vf.vf_index = n
            for idx, b in vf_bars.items():
                vf.bars[idx] = Bar(idx, b.base + n * b.size, b.size, b.is64, b.prefetch)
            pf.virtfns.append(vf)
            vfs.append(vf)
        return vfs

    # -- capability detection (the 2020 series: "PCI: add SIOV and IMS capability detection") --

    async def find_dvsec_capability(self, dev: PciDev, vendor: int, dvsec_id: int) -> int:
        """``pci_find_dvsec_capability``: offset of the DVSEC (vendor, ID), or 0 if absent."""
        for pos, cap_id, _ver in dev.ext_cap_list:
            if cap_id != R.PCI_EXT_CAP_ID_DVSEC:
                continue
            h1 = await self.read32(dev.rid, pos + R.PCI_DVSEC_HEADER1)
            h2 = await self.read16(dev.rid, pos + R.PCI_DVSEC_HEADER2)
            if h1 & 0xFFFF == vendor and h2 == dvsec_id:
                return pos
        return 0

    async def siov_supported(self, dev: PciDev) -> bool:
        """``pci_siov_supported``: the Intel SIOV DVSEC is present."""
        return bool(await self.find_dvsec_capability(dev, R.PCI_VENDOR_ID_INTEL, R.PCI_DVSEC_ID_INTEL_SIOV))

    async def ims_supported(self, dev: PciDev) -> bool:
        """``pci_ims_supported``: the SIOV DVSEC's Capabilities register has the IMS bit."""
        pos = await self.find_dvsec_capability(dev, R.PCI_VENDOR_ID_INTEL, R.PCI_DVSEC_ID_INTEL_SIOV)
        if not pos:
            return False
        return bool(await self.read32(dev.rid, pos + R.PCI_DVSEC_INTEL_SIOV_CAP) & R.PCI_DVSEC_INTEL_SIOV_CAP_IMS)

    async def enable_pasid(self, dev: PciDev) -> bool:
        """``pci_enable_pasid``: set PASID Enable if the function has the capability."""
        pos = dev.ext_caps.get(R.PCI_EXT_CAP_ID_PASID)
        if not pos:
            return False
        ctrl = await self.read16(dev.rid, pos + R.PCI_PASID_CTRL)
        await self.write16(dev.rid, pos + R.PCI_PASID_CTRL, ctrl | R.PCI_PASID_CTRL_ENABLE)
        return True

    # -- function-level reset -------------------------------------------------

    async def function_reset(self, dev: PciDev) -> None:
        """``pcie_flr``: set Initiate FLR in Device Control (if the function is FLR capable)."""
        pos = dev.caps.get(R.PCI_CAP_ID_EXP)
        if pos is None:
            raise PciError(f"{dev}: no PCI Express capability, no FLR")
        devcap = await self.read32(dev.rid, pos + R.PCI_EXP_DEVCAP)
        if not devcap & R.PCI_EXP_DEVCAP_FLR:
            raise PciError(f"{dev}: not FLR capable")
        ctl = await self.read16(dev.rid, pos + R.PCI_EXP_DEVCTL)
        await self.write16(dev.rid, pos + R.PCI_EXP_DEVCTL, ctl | R.PCI_EXP_DEVCTL_BCR_FLR)
