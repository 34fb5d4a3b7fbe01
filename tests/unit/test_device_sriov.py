"""SR-IOV: NumVFs / VF Enable, VF RIDs, VF identity, VF BARs, VF MSE, locks, page size."""

from __future__ import annotations

import pytest

from device.caps.sriov import (
    PCI_SRIOV_BAR,
    PCI_SRIOV_CTRL,
    PCI_SRIOV_CTRL_MSE,
    PCI_SRIOV_CTRL_VFE,
    PCI_SRIOV_INITIAL_VF,
    PCI_SRIOV_NUM_VF,
    PCI_SRIOV_SUP_PGSIZE,
    PCI_SRIOV_SYS_PGSIZE,
    PCI_SRIOV_TOTAL_VF,
    PCI_SRIOV_VF_DID,
    PCI_SRIOV_VF_OFFSET,
)
from device.engine import ENGINE_MAGIC
from device.sriov_device import SriovDevice
from fabric.tlp import CplStatus, Tlp

SRIOV = 0x100
VF_BAR = 0x8000_0000


class Host:
    """Just enough of a root complex to drive the device with TLPs."""

    def __init__(self, dev: SriovDevice, bus: int = 1) -> None:
        self.dev, self.pf = dev, bus << 8

    def rd(self, target: int, reg: int) -> int:
        (emit,) = self.dev.handle_tlp(Tlp.cfg_read(target, reg))
        assert emit.tlp.status == CplStatus.SC, f"CfgRd {target:#x} {reg:#x}: {emit.tlp}"
        return int.from_bytes(emit.tlp.data, "little")

    def wr(self, target: int, reg: int, value: int, be: int = 0xF) -> None:
        (emit,) = self.dev.handle_tlp(Tlp.cfg_write(target, reg, value, first_be=be))
        assert emit.tlp.status == CplStatus.SC

    def rd16(self, target: int, off: int) -> int:
        return self.rd(target, off & ~3) >> (off & 2) * 8 & 0xFFFF

    def wr16(self, target: int, off: int, value: int) -> None:
        self.wr(target, off & ~3, value << (off & 2) * 8, 0x3 << (off & 2))

    def enable_vfs(self, n: int, *, mse: bool = True, bar: int | None = VF_BAR) -> None:
        if bar is not None:
            self.wr(self.pf, SRIOV + PCI_SRIOV_BAR, bar)
        self.wr16(self.pf, SRIOV + PCI_SRIOV_NUM_VF, n)
        self.wr16(self.pf, SRIOV + PCI_SRIOV_CTRL, PCI_SRIOV_CTRL_VFE | (PCI_SRIOV_CTRL_MSE if mse else 0))

    def mrd(self, addr: int, nbytes: int = 4):
        (emit,) = self.dev.handle_tlp(Tlp.mem_read(addr, nbytes, requester_id=0))
        return emit.tlp


def test_sriov_capability_registers() -> None:
    h = Host(SriovDevice(total_vfs=4))
    assert h.rd(h.pf, SRIOV) & 0xFFFF == 0x10
    assert h.rd16(h.pf, SRIOV + PCI_SRIOV_INITIAL_VF) == 4
    assert h.rd16(h.pf, SRIOV + PCI_SRIOV_TOTAL_VF) == 4
    assert h.rd16(h.pf, SRIOV + PCI_SRIOV_NUM_VF) == 0
    assert h.rd(h.pf, SRIOV + PCI_SRIOV_VF_OFFSET) == 0x0001_0001  # stride << 16 | offset
    assert h.rd16(h.pf, SRIOV + PCI_SRIOV_VF_DID) == 0x11A1
    assert h.rd(h.pf, SRIOV + PCI_SRIOV_SUP_PGSIZE) & 1
    assert h.rd(h.pf, SRIOV + PCI_SRIOV_SYS_PGSIZE) == 1
    # TotalVFs / offset / stride / VF DID are read-only
    for reg in (0x0C, 0x14, 0x18, 0x1C):
        before = h.rd(h.pf, SRIOV + reg)
        h.wr(h.pf, SRIOV + reg, 0xFFFF_FFFF)
        assert h.rd(h.pf, SRIOV + reg) == before


@pytest.mark.parametrize(("offset", "stride", "n"), [(1, 1, 4), (2, 2, 3), (8, 4, 2)])
def test_vf_enable_creates_vfs_at_rid_arithmetic(offset: int, stride: int, n: int) -> None:
    dev = SriovDevice(total_vfs=4, first_vf_offset=offset, vf_stride=stride)
    h = Host(dev)
    h.rd(h.pf, 0)  # learn bus 1
    h.enable_vfs(n)
    rids = [h.pf + offset + i * stride for i in range(n)]
    assert list(dev.functions()) == [h.pf, *rids]
    for i, rid in enumerate(rids):
        fn = dev.functions()[rid]
        assert fn.is_vf and fn.vf_index == i and fn.msix.requester_id == rid
        assert h.rd(rid, 0x00) == 0xFFFF_FFFF  # VF Vendor/Device ID read 0xFFFF
        assert h.rd(rid, 0x08) == h.rd(h.pf, 0x08)  # class/revision as the PF
        (emit,) = dev.handle_tlp(Tlp.cfg_read(rid, 0))
        assert emit.tlp.completer_id == rid


def test_vf_rids_carry_into_next_bus() -> None:
    dev = SriovDevice(total_vfs=4, first_vf_offset=0x80, vf_stride=0x40)
    h = Host(dev, bus=5)
    h.rd(h.pf, 0)
    h.enable_vfs(4)
    assert list(dev.functions()) == [0x0500, 0x0580, 0x05C0, 0x0600, 0x0640]
    assert h.rd(0x0600, 0x00) == 0xFFFF_FFFF  # bus 6, devfn 0 is VF2, not a PF on a new bus
    assert dev.bus == 5


def test_vf_header_bars_read_zero_and_vf_config_only_for_existing_vfs() -> None:
    dev = SriovDevice()
    h = Host(dev)
    h.rd(h.pf, 0)
    (emit,) = dev.handle_tlp(Tlp.cfg_read(h.pf + 1, 0))
    assert emit.tlp.status == CplStatus.UR  # no VFs yet
    h.enable_vfs(2)
    for reg in range(0x10, 0x28, 4):
        h.wr(h.pf + 1, reg, 0xFFFF_FFFF)
        assert h.rd(h.pf + 1, reg) == 0
    (emit,) = dev.handle_tlp(Tlp.cfg_read(h.pf + 3, 0))
    assert emit.tlp.status == CplStatus.UR and emit.tlp.completer_id == h.pf
    assert dev.cfg_ur == 2


def test_vf_bar_sizing_reports_one_vf() -> None:
    h = Host(SriovDevice())
    reg = SRIOV + PCI_SRIOV_BAR
    h.wr(h.pf, reg, VF_BAR)
    orig = h.rd(h.pf, reg)
    h.wr(h.pf, reg, 0xFFFF_FFFF)
    sized = h.rd(h.pf, reg)
    assert sized == 0xFFFF_C000
    assert (~(sized & ~0xF) & 0xFFFF_FFFF) + 1 == 0x4000
    h.wr(h.pf, reg, orig)
    assert h.rd(h.pf, reg) == VF_BAR
    for i in range(1, 6):  # VF BAR1..5 not implemented
        h.wr(h.pf, reg + 4 * i, 0xFFFF_FFFF)
        assert h.rd(h.pf, reg + 4 * i) == 0


def test_system_page_size_rounds_vf_bar_and_rejects_bad_values() -> None:
    dev = SriovDevice()
    h = Host(dev)
    pgsz, bar = SRIOV + PCI_SRIOV_SYS_PGSIZE, SRIOV + PCI_SRIOV_BAR
    h.wr(h.pf, pgsz, 0x3)  # two bits: refused
    assert h.rd(h.pf, pgsz) == 0x1
    h.wr(h.pf, pgsz, 0x4)  # 16 KiB: not in Supported Page Sizes (0x553)
    assert h.rd(h.pf, pgsz) == 0x1
    h.wr(h.pf, pgsz, 0x10)  # 64 KiB
    assert h.rd(h.pf, pgsz) == 0x10
    h.wr(h.pf, bar, 0xFFFF_FFFF)
    assert h.rd(h.pf, bar) == 0xFFFF_0000
    assert dev.sriov.vf_bar_size(0) == 0x10000
    h.wr(h.pf, bar, 0x9000_0000)
    h.enable_vfs(2, bar=None)
    assert h.mrd(0x9000_0000 + 0x10000).status == CplStatus.SC  # VF1 starts one 64K page later
    assert h.mrd(0x9000_4000).data == bytes(4)  # beyond VF0's 16 KiB of registers: reads 0
    h.wr(h.pf, pgsz, 0x1)  # locked while VF Enable is set
    assert h.rd(h.pf, pgsz) == 0x10


def test_vf_mse_gates_vf_memory_decode() -> None:
    dev = SriovDevice()
    h = Host(dev)
    h.enable_vfs(2, mse=False)
    vf1 = VF_BAR + 0x4000
    ur = h.mrd(vf1)
    assert ur.status == CplStatus.UR and ur.completer_id == h.pf
    assert dev.handle_tlp(Tlp.mem_write(vf1 + 0x10, b"\x02\0\0\0")) == []
    assert dev.mwr_unmapped == 1
    h.wr16(h.pf, SRIOV + PCI_SRIOV_CTRL, PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE)
    cpl = h.mrd(vf1)
    assert cpl.status == CplStatus.SC and cpl.completer_id == h.pf + 2
    assert int.from_bytes(cpl.data, "little") == ENGINE_MAGIC
    assert h.mrd(VF_BAR).completer_id == h.pf + 1
    assert h.mrd(VF_BAR + 2 * 0x4000).status == CplStatus.UR  # past NumVFs
    # the PF's own Command.MSE does not gate VFs, and VF MSE does not open the PF BAR
    assert not dev.pf.cfg.memory_space_enabled
    h.wr16(h.pf, SRIOV + PCI_SRIOV_CTRL, PCI_SRIOV_CTRL_VFE)
    assert h.mrd(vf1).status == CplStatus.UR


def test_numvfs_refused_above_total_and_locked_while_enabled() -> None:
    dev = SriovDevice(total_vfs=4)
    h = Host(dev)
    num = SRIOV + PCI_SRIOV_NUM_VF
    h.wr16(h.pf, num, 5)
    assert h.rd16(h.pf, num) == 0
    h.wr16(h.pf, num, 3)
    h.wr16(h.pf, SRIOV + PCI_SRIOV_CTRL, PCI_SRIOV_CTRL_VFE)
    assert len(dev.vfs) == 3
    h.wr16(h.pf, num, 1)
    assert h.rd16(h.pf, num) == 3 and len(dev.vfs) == 3
    h.wr16(h.pf, SRIOV + PCI_SRIOV_CTRL, 0)
    assert dev.vfs == [] and list(dev.functions()) == [h.pf]
    h.wr16(h.pf, num, 1)
    assert h.rd16(h.pf, num) == 1


def test_vf_disable_then_enable_gives_fresh_vfs() -> None:
    dev = SriovDevice()
    h = Host(dev)
    h.enable_vfs(1)
    h.wr(h.pf + 1, 0x04, 0x4)
    assert dev.functions()[h.pf + 1].msix.bus_master
    h.wr16(h.pf, SRIOV + PCI_SRIOV_CTRL, 0)
    h.wr16(h.pf, SRIOV + PCI_SRIOV_CTRL, PCI_SRIOV_CTRL_VFE)
    assert h.rd(h.pf + 1, 0x04) & 0xFFFF == 0


def test_pf_flr_destroys_vfs() -> None:
    dev = SriovDevice()
    h = Host(dev)
    h.enable_vfs(2)
    assert dev.function_level_reset(h.pf)
    assert dev.vfs == [] and not dev.sriov.vf_enable
    assert h.rd16(h.pf, SRIOV + PCI_SRIOV_NUM_VF) == 0
    assert h.rd(h.pf, SRIOV + PCI_SRIOV_BAR) == 0
    assert not dev.function_level_reset(h.pf + 1)


def test_bus_sticks_while_vfs_exist() -> None:
    dev = SriovDevice(first_vf_offset=0x100, vf_stride=0x100, total_vfs=2)  # VFs on buses 2, 3
    h = Host(dev)
    h.rd(h.pf, 0)
    h.enable_vfs(2)
    assert list(dev.functions()) == [0x100, 0x200, 0x300]
    assert h.rd(0x200, 0) == 0xFFFF_FFFF
    assert dev.bus == 1
