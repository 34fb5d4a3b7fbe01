"""device.config + device.caps: masks, RW1C, byte enables, BARs, capability lists."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.caps.common import PciCap, PciCapId, PciExtCap, PciExtCapId
from device.caps.msix import PCI_MSIX_FLAGS_QSIZE
from device.caps.pcie import PCI_EXP_DEVCAP, PCI_EXP_DEVCAP_FLR, PCI_EXP_DEVCTL, PCI_EXP_DEVSTA
from device.config import (
    PCI_BASE_ADDRESS_0,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    ConfigSpace,
)
from device.sriov_device import SriovDevice
from fabric.tlp import CplStatus, Tlp

BUS = 1
PF = BUS << 8


# ---- helpers ------------------------------------------------------------------------------------


def cfg_read(dev: SriovDevice, target: int, reg: int) -> int:
    (emit,) = dev.handle_tlp(Tlp.cfg_read(target, reg))
    assert emit.tlp.status == CplStatus.SC
    assert emit.origin is None
    return int.from_bytes(emit.tlp.data, "little")


def cfg_write(dev: SriovDevice, target: int, reg: int, value: int, first_be: int = 0xF) -> list:
    cpl, *rest = dev.handle_tlp(Tlp.cfg_write(target, reg, value, first_be=first_be))
    assert cpl.tlp.status == CplStatus.SC and not cpl.tlp.data
    return rest


def cfg_write16(dev: SriovDevice, target: int, off: int, value: int) -> list:
    shift = (off & 2) * 8
    return cfg_write(dev, target, off & ~3, value << shift, 0x3 << (off & 2))


def walk_std(read) -> list[tuple[int, int]]:
    """Linux-style walk of the standard list with a loop guard (PCI_FIND_CAP_TTL = 48)."""
    if not read(PCI_STATUS & ~3) >> 16 & PCI_STATUS_CAP_LIST:
        return []
    out, pos, ttl = [], read(PCI_CAPABILITY_LIST) & 0xFC, 48
    while pos and ttl:
        assert pos >= 0x40, f"capability pointer 0x{pos:x} inside the header"
        dw = read(pos)
        out.append((pos, dw & 0xFF))
        pos = dw >> 8 & 0xFC
        ttl -= 1
    assert ttl, "capability list loops"
    return out


def walk_ext(read) -> list[tuple[int, int, int]]:
    out, pos, ttl = [], 0x100, (0x1000 - 0x100) // 8
    while ttl:
        hdr = read(pos)
        if hdr == 0 or hdr == 0xFFFFFFFF:
            break
        out.append((pos, hdr & 0xFFFF, hdr >> 16 & 0xF))
        pos = hdr >> 20 & 0xFFC
        if pos < 0x100:
            break
        ttl -= 1
    assert ttl, "extended capability list loops"
    return out


def enabled_device(num_vfs: int = 2) -> SriovDevice:
    dev = SriovDevice()
    cfg_write16(dev, PF, 0x100 + 0x10, num_vfs)
    cfg_write16(dev, PF, 0x100 + 0x08, 0x1)
    return dev


# ---- header -------------------------------------------------------------------------------------


def test_pf_header_identity() -> None:
    dev = SriovDevice()
    assert cfg_read(dev, PF, 0x00) == 0x11A0_1B36
    assert cfg_read(dev, PF, 0x08) >> 8 == 0x088000
    assert cfg_read(dev, PF, 0x0C) >> 16 & 0xFF == 0x00  # header type 0, single function
    assert cfg_read(dev, PF, 0x2C) & 0xFFFF == 0x1B36
    assert cfg_read(dev, PF, 0x3C) >> 8 & 0xFF == 0  # no INTx pin


def test_bus_learned_from_type0_target() -> None:
    dev = SriovDevice()
    cfg_read(dev, 0x0300, 0)
    assert dev.bus == 3 and dev.pf.rid == 0x0300
    (emit,) = dev.handle_tlp(Tlp.cfg_read(0x0300, 0))
    assert emit.tlp.completer_id == 0x0300


def test_command_bits_pf_and_vf() -> None:
    dev = enabled_device(1)
    cfg_write(dev, PF, PCI_COMMAND, 0xFFFF)  # Status half: writing 1s to RW1C bits that are clear
    assert cfg_read(dev, PF, PCI_COMMAND) & 0xFFFF == 0x0546  # MSE BME PERR SERR INTxDis; no IO
    assert dev.pf.cfg.memory_space_enabled and dev.pf.cfg.bus_master_enabled
    cfg_write(dev, PF, PCI_COMMAND, 0)
    assert cfg_read(dev, PF, PCI_COMMAND) & 0xFFFF == 0
    vf = PF + 1
    cfg_write(dev, vf, PCI_COMMAND, 0xFFFF)
    assert cfg_read(dev, vf, PCI_COMMAND) & 0xFFFF == 0x0004  # VF: only BME; MSE is the PF's VF MSE


def test_byte_enables_touch_only_enabled_bytes() -> None:
    dev = SriovDevice()
    cfg_write(dev, PF, 0x3C, 0xFFFF_FF5A, first_be=0x1)
    assert cfg_read(dev, PF, 0x3C) & 0xFF == 0x5A
    cfg_write(dev, PF, 0x3C, 0x0000_0000, first_be=0x2)  # pin byte: RO, line untouched
    assert cfg_read(dev, PF, 0x3C) & 0xFF == 0x5A
    cfg_write(dev, PF, 0x04, 0x0000_0006, first_be=0x2)  # byte 1 only: MSE/BME are in byte 0
    assert cfg_read(dev, PF, 0x04) & 0xFFFF == 0


def test_rw1c_status_bits() -> None:
    dev = SriovDevice()
    cfg = dev.pf.cfg
    cfg.set16(PCI_STATUS, cfg.get16(PCI_STATUS) | 0x2000 | 0x0800)  # received master abort, sig. TA
    cfg_write(dev, PF, PCI_COMMAND, 0x0000_0000)  # writing 0 clears nothing
    assert cfg_read(dev, PF, PCI_COMMAND) >> 16 == 0x2810
    cfg_write(dev, PF, PCI_COMMAND, 0x2000_0000)  # 1 clears just that bit
    assert cfg_read(dev, PF, PCI_COMMAND) >> 16 == 0x0810
    cfg_write(dev, PF, PCI_COMMAND, 0xFFFF_0000)  # cap-list bit is RO, stays
    assert cfg_read(dev, PF, PCI_COMMAND) >> 16 == PCI_STATUS_CAP_LIST
    # PCIe Device Status error bits are RW1C as well
    devsta = 0x40 + PCI_EXP_DEVSTA
    cfg.set16(devsta, 0x000F)
    cfg_write(dev, PF, devsta & ~3, 0x0005_0000, first_be=0xC)
    assert cfg.get16(devsta) == 0x000A


# ---- capability lists ----------------------------------------------------------------------------


def test_pf_capability_lists() -> None:
    dev = SriovDevice()
    read = lambda reg: cfg_read(dev, PF, reg)  # noqa: E731
    assert walk_std(read) == [(0x40, PciCapId.EXP), (0x7C, PciCapId.MSIX)]
    assert walk_ext(read) == [(0x100, PciExtCapId.SRIOV, 1)]
    assert read(0x40) >> 16 & 0xF == 2  # PCIe cap version 2, endpoint
    assert read(0x40) >> 20 & 0xF == 0
    assert read(0x40 + PCI_EXP_DEVCAP) & PCI_EXP_DEVCAP_FLR
    assert (read(0x7C) >> 16 & PCI_MSIX_FLAGS_QSIZE) + 1 == 8
    assert read(0x7C + 4) == 0x2000  # table: BAR0 + 0x2000
    assert read(0x7C + 8) == 0x3000  # PBA:   BAR0 + 0x3000


def test_vf_capability_lists() -> None:
    dev = enabled_device(1)
    read = lambda reg: cfg_read(dev, PF + 1, reg)  # noqa: E731
    assert walk_std(read) == [(0x40, PciCapId.EXP), (0x7C, PciCapId.MSIX)]
    assert walk_ext(read) == []  # VF: no extended capabilities (header DW 0)
    assert (read(0x7C) >> 16 & PCI_MSIX_FLAGS_QSIZE) + 1 == 4
    assert read(0x40 + PCI_EXP_DEVCAP) & PCI_EXP_DEVCAP_FLR


class _Dummy(PciCap):
    cap_id = PciCapId.VNDR
    length = 8


class _DummyExt(PciExtCap):
    cap_id = PciExtCapId.DVSEC
    version = 1
    length = 0x18


def test_list_builder_links_and_rejects_overlap() -> None:
    cfg = ConfigSpace()
    assert cfg.add_capability(_Dummy()) == 0x40
    assert cfg.add_capability(_Dummy(), 0xA0) == 0xA0
    assert cfg.add_capability(_Dummy()) == 0xA8
    assert walk_std(cfg.read) == [(0x40, 9), (0xA0, 9), (0xA8, 9)]
    with pytest.raises(ValueError):
        cfg.add_capability(_Dummy(), 0x44)
    with pytest.raises(ValueError):
        cfg.add_capability(_Dummy(), 0xFC)
    with pytest.raises(ValueError):
        cfg.add_ext_capability(_DummyExt(), 0x200)  # first one must be at 0x100
    cfg.add_ext_capability(_DummyExt())
    cfg.add_ext_capability(_DummyExt(), 0x400)
    assert walk_ext(cfg.read) == [(0x100, 0x23, 1), (0x400, 0x23, 1)]
    # headers are read-only
    before = bytes(cfg.data)
    for reg in (0x34, 0x40, 0xA0, 0x100, 0x400):
        cfg.write(reg, 0xFFFF_FFFF)
        cfg.write(reg, 0)
    assert bytes(cfg.data) == before


# ---- BARs ---------------------------------------------------------------------------------------


def test_bar_sizing_32bit_and_restore() -> None:
    dev = SriovDevice()
    cfg_write(dev, PF, PCI_BASE_ADDRESS_0, 0xFEB0_0000)
    orig = cfg_read(dev, PF, PCI_BASE_ADDRESS_0)
    assert orig == 0xFEB0_0000  # 32-bit, non-prefetchable: type bits 0
    cfg_write(dev, PF, PCI_BASE_ADDRESS_0, 0xFFFF_FFFF)
    sized = cfg_read(dev, PF, PCI_BASE_ADDRESS_0)
    assert sized == 0xFFFF_C000
    assert (~(sized & 0xFFFF_FFF0) & 0xFFFF_FFFF) + 1 == 0x4000
    cfg_write(dev, PF, PCI_BASE_ADDRESS_0, orig)
    assert cfg_read(dev, PF, PCI_BASE_ADDRESS_0) == orig
    assert dev.pf.bar0_address == 0xFEB0_0000
    for reg in range(0x14, 0x28, 4):  # unimplemented BARs read 0 even after all-ones
        cfg_write(dev, PF, reg, 0xFFFF_FFFF)
        assert cfg_read(dev, PF, reg) == 0
    cfg_write(dev, PF, PCI_BASE_ADDRESS_0, 0xFEB0_1234)  # low bits are not decoded
    assert cfg_read(dev, PF, PCI_BASE_ADDRESS_0) == 0xFEB0_0000


@pytest.mark.parametrize(
    ("size", "hi_sized"),
    [(1 << 20, 0xFFFF_FFFF), (1 << 33, 0xFFFF_FFFE)],
)
def test_bar_sizing_64bit_and_restore(size: int, hi_sized: int) -> None:
    cfg = ConfigSpace()
    cfg.add_bar(2, size, is64=True, prefetchable=True)
    lo_reg, hi_reg = 0x18, 0x1C
    assert cfg.read(lo_reg) == 0x0C  # 64-bit | prefetchable
    cfg.write(lo_reg, 0xFFFF_FFFF)
    cfg.write(hi_reg, 0xFFFF_FFFF)
    lo, hi = cfg.read(lo_reg), cfg.read(hi_reg)
    assert lo & 0xF == 0x0C and hi == hi_sized
    combined = hi << 32 | (lo & 0xFFFF_FFF0)
    assert (~combined & (1 << 64) - 1) + 1 == size
    cfg.write(lo_reg, 0x0000_000C)  # restore, then program a real address above 4 GiB
    cfg.write(hi_reg, 0)
    assert cfg.bar_address(lo_reg) == 0
    cfg.write(lo_reg, 0)
    cfg.write(hi_reg, 0x0000_0004)
    assert cfg.bar_address(lo_reg) == 0x4_0000_0000
    with pytest.raises(ValueError):
        cfg.add_bar(5, 4096, is64=True)
    with pytest.raises(ValueError):
        cfg.add_bar(0, 3000)


# ---- FLR through the PCIe capability --------------------------------------------------------------


def test_initiate_flr_reads_zero_and_resets_registers() -> None:
    dev = SriovDevice()
    cfg_write(dev, PF, PCI_BASE_ADDRESS_0, 0xFEB0_0000)
    cfg_write(dev, PF, PCI_COMMAND, 0x6)
    devctl = 0x40 + PCI_EXP_DEVCTL
    cfg_write(dev, PF, devctl, cfg_read(dev, PF, devctl) & 0xFFFF | 0x8000, first_be=0x3)
    assert cfg_read(dev, PF, devctl) & 0x8000 == 0
    assert cfg_read(dev, PF, PCI_COMMAND) & 0xFFFF == 0
    assert cfg_read(dev, PF, PCI_BASE_ADDRESS_0) == 0
    assert dev.pf.flrs == 1
    assert bytes(dev.pf.cfg.data) == dev.pf.cfg.reset_image


# ---- properties -----------------------------------------------------------------------------------

_INTERESTING = [0x04, 0x08, 0x0C, 0x10, 0x14, 0x2C, 0x34, 0x3C, 0x40, 0x44, 0x48, 0x50, 0x68, 0x70,
                0x7C, 0x80, 0x84, 0x100, 0x104, 0x108, 0x10C, 0x110, 0x114, 0x118, 0x11C, 0x120,
                0x124, 0x128, 0x13C]
_regs = st.one_of(st.sampled_from(_INTERESTING), st.integers(0, 0x3FF).map(lambda i: i * 4))
_writes = st.lists(
    st.tuples(_regs, st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xF)), min_size=1, max_size=40
)


def _ro_bits_unchanged(cfg: ConfigSpace) -> None:
    image, wmask0, w1c0 = cfg._image  # type: ignore[misc]
    for off in range(len(image)):
        ro = ~(wmask0[off] | w1c0[off]) & 0xFF
        assert (cfg.data[off] ^ image[off]) & ro == 0, f"RO bit changed at 0x{off:03x}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes=_writes)
def test_cfgwr_never_changes_read_only_bits(writes: list[tuple[int, int, int]]) -> None:
    """Any CfgWr sequence (including ones that enable VFs, FLR, resize VF BARs) leaves every
    bit that is read-only in the power-on image at its power-on value, on the PF and a VF."""
    dev = enabled_device(2)
    vf = dev.functions()[PF + 1]
    for reg, value, be in writes:
        dev.handle_tlp(Tlp.cfg_write(PF, reg, value, first_be=be))
        _ro_bits_unchanged(dev.pf.cfg)
    dev = enabled_device(2)
    vf = dev.functions()[PF + 1]
    for reg, value, be in writes:
        dev.handle_tlp(Tlp.cfg_write(PF + 1, reg, value, first_be=be))
        _ro_bits_unchanged(vf.cfg)
    assert cfg_read(dev, PF + 1, 0) == 0xFFFF_FFFF


@settings(max_examples=200, deadline=None)
@given(
    masks=st.binary(min_size=16, max_size=16),
    w1c=st.binary(min_size=16, max_size=16),
    init=st.binary(min_size=16, max_size=16),
    writes=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xF)),
                    max_size=20),
)
def test_write_matches_bytewise_reference(masks: bytes, w1c: bytes, init: bytes, writes) -> None:
    """The DW-wide write equals QEMU's per-byte rule: keep ~wmask, take wmask, then clear w1c&val."""
    cfg = ConfigSpace()
    base = 0x200
    cfg.data[base:base + 16] = init
    cfg.wmask[base:base + 16] = masks
    w1c = bytes(b & ~m & 0xFF for b, m in zip(w1c, masks))  # QEMU keeps the two masks disjoint
    cfg.w1cmask[base:base + 16] = w1c
    model = bytearray(init)
    for dw, value, be in writes:
        cfg.write(base + 4 * dw, value, be)
        for i in range(4):
            if be >> i & 1:
                o, v = 4 * dw + i, value >> 8 * i & 0xFF
                model[o] = ((model[o] & ~masks[o]) | (v & masks[o])) & ~(v & w1c[o]) & 0xFF
    assert bytes(cfg.data[base:base + 16]) == bytes(model)
