"""vfio-pci's emulation of an assigned VF (``host/vfio.py``), driven as a pure model.

What the guest sees: a virtual config header (IDs, Command, BAR0 with emulated
sizing, MSI-X Message Control with virtual Enable / Function Mask), a trapped
MSI-X table and PBA, and the forwarding decision ``deliverable()``.  Entries
that fired while not deliverable are replayed once, with their provenance,
when they become deliverable (QEMU's "masked vector sets its PBA bit, and
unmasking replays it").
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guest.pci import regs as R
from host.vfio import MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, VEntry, VirtualFunction

# ------------------------------------------------------------------ fixture

HOST_RID = 0x0101          # 01:00.1, the real VF
GUEST_RID = 0x0018         # 00:03.0 in the VM
VENDOR, DEVICE = 0x8086, 0x1234
MSIX_POS = 0x70
TABLE_SIZE = 8
BAR0_SIZE = 0x4000         # page 0-1 pass-through, page 2 table, page 3 PBA
BAR0_HPA = 0xF000_0000
STATUS = R.PCI_STATUS_CAP_LIST

ORIGIN, T_NS = 0x0101, 123_456


def snapshot(msix_size: int = TABLE_SIZE) -> bytearray:
    """256 bytes of the real VF's config space as vfio reads it at assignment."""
    cfg = bytearray(256)
    struct.pack_into("<HH", cfg, R.PCI_VENDOR_ID, 0xFFFF, 0xFFFF)       # a VF's IDs read all ones
    struct.pack_into("<HH", cfg, R.PCI_COMMAND, R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER, STATUS)
    struct.pack_into("<I", cfg, R.PCI_BASE_ADDRESS_0, BAR0_HPA | R.PCI_BASE_ADDRESS_MEM_TYPE_64)
    struct.pack_into("<I", cfg, R.PCI_BASE_ADDRESS_0 + 4, 0x1)          # upper half of the HPA
    struct.pack_into("<I", cfg, R.PCI_BASE_ADDRESS_0 + 8, 0xDEAD_BEE0)  # junk the guest must not see
    cfg[R.PCI_CAPABILITY_LIST] = MSIX_POS
    # MSI-X: the host has the real function enabled; the guest must not see that.
    ctrl = (msix_size - 1) | R.PCI_MSIX_FLAGS_ENABLE
    struct.pack_into("<BBHII", cfg, MSIX_POS, R.PCI_CAP_ID_MSIX, 0x00, ctrl,
                     MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET)
    return cfg


def make_vf(msix_size: int = TABLE_SIZE) -> VirtualFunction:
    return VirtualFunction(HOST_RID, GUEST_RID, snapshot(msix_size), BAR0_SIZE, BAR0_HPA,
                           VENDOR, DEVICE, MSIX_POS, msix_size)


def write16(vf: VirtualFunction, reg: int, value: int) -> list[tuple]:
    """A guest ``pci_write_config_word``: the CfgWr0 TLP's dword address and byte enables."""
    sh = reg & 2
    return vf.cfg_write(reg & ~3, (value & 0xFFFF) << (8 * sh), 0x3 << sh)


def read16(vf: VirtualFunction, reg: int) -> int:
    return vf.cfg_read(reg & ~3) >> (8 * (reg & 2)) & 0xFFFF


def msix_ctrl(vf: VirtualFunction, value: int) -> list[tuple]:
    return write16(vf, MSIX_POS + R.PCI_MSIX_FLAGS, value)


def entry(i: int, field: int = 0) -> int:
    return MSIX_TABLE_OFFSET + i * R.PCI_MSIX_ENTRY_SIZE + field


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def compat(apic: int) -> int:
    """Compatibility-format MSI address for ``apic`` (physical, fixed)."""
    return 0xFEE0_0000 | apic << 12


def program(vf: VirtualFunction, i: int, apic: int, vector: int, *, unmask: bool) -> list[tuple]:
    """What Linux does: message first (12-byte store), then the vector control."""
    actions = vf.mmio_write(entry(i), struct.pack("<III", compat(apic), 0, vector))
    if unmask:
        actions += vf.mmio_write(entry(i, R.PCI_MSIX_ENTRY_VECTOR_CTRL), u32(0))
    return actions


def enable(vf: VirtualFunction, maskall: bool = False) -> list[tuple]:
    qsize = read16(vf, MSIX_POS + R.PCI_MSIX_FLAGS) & R.PCI_MSIX_FLAGS_QSIZE
    flags = R.PCI_MSIX_FLAGS_ENABLE | (R.PCI_MSIX_FLAGS_MASKALL if maskall else 0)
    return msix_ctrl(vf, qsize | flags)


def fires(actions: list[tuple]) -> list[tuple]:
    return [a for a in actions if a[0] == "fire"]


# ------------------------------------------------------------- config space


def test_ids_are_the_pf_vendor_and_the_vf_device_id():
    vf = make_vf()
    assert vf.cfg_read(R.PCI_VENDOR_ID) == VENDOR | DEVICE << 16
    # Byte offsets inside the dword read the same dword (reg & 0xFFC).
    assert vf.cfg_read(R.PCI_DEVICE_ID) == VENDOR | DEVICE << 16
    assert read16(vf, R.PCI_DEVICE_ID) == DEVICE


def test_id_writes_are_ignored():
    vf = make_vf()
    assert vf.cfg_write(R.PCI_VENDOR_ID, 0x5555_AAAA, 0xF) == []
    assert vf.cfg_read(R.PCI_VENDOR_ID) == VENDOR | DEVICE << 16


def test_command_starts_clear_and_status_comes_from_the_snapshot():
    vf = make_vf()
    assert vf.cfg_read(R.PCI_COMMAND) == STATUS << 16   # the real function's Command is not shown


def test_command_keeps_only_its_virtual_bits():
    vf = make_vf()
    assert write16(vf, R.PCI_COMMAND, 0xFFFF) == []
    virtual = R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER | R.PCI_COMMAND_INTX_DISABLE
    assert vf.command == virtual
    assert vf.cfg_read(R.PCI_COMMAND) == virtual | STATUS << 16
    write16(vf, R.PCI_COMMAND, R.PCI_COMMAND_MASTER)
    assert read16(vf, R.PCI_COMMAND) == R.PCI_COMMAND_MASTER


def test_status_write_does_not_change_status():
    vf = make_vf()
    write16(vf, R.PCI_STATUS, 0xFFFF)
    assert read16(vf, R.PCI_STATUS) == STATUS


def test_bar0_sizing_reads_back_the_size_mask():
    vf = make_vf()
    assert vf.cfg_read(R.PCI_BASE_ADDRESS_0) == 0          # unprogrammed
    assert vf.cfg_write(R.PCI_BASE_ADDRESS_0, 0xFFFF_FFFF, 0xF) == []
    mask = vf.cfg_read(R.PCI_BASE_ADDRESS_0)
    assert mask == 0xFFFF_C000
    # Linux's computation (pci_size) yields the VF's real BAR size.
    assert ((~(mask & R.PCI_BASE_ADDRESS_MEM_MASK)) & 0xFFFF_FFFF) + 1 == BAR0_SIZE
    # Restoring the original value ends sizing without programming anything.
    assert vf.cfg_write(R.PCI_BASE_ADDRESS_0, 0, 0xF) == []
    assert vf.cfg_read(R.PCI_BASE_ADDRESS_0) == 0


def test_bar0_shows_no_host_address_or_64bit_type():
    vf = make_vf()
    # The snapshot holds the HPA and the 64-bit type; the guest sees a clean 32-bit BAR.
    assert vf.cfg_read(R.PCI_BASE_ADDRESS_0) & ~0xF == 0
    vf.cfg_write(R.PCI_BASE_ADDRESS_0, 0xFFFF_FFFF, 0xF)
    assert vf.cfg_read(R.PCI_BASE_ADDRESS_0) & R.PCI_BASE_ADDRESS_MEM_TYPE_MASK == 0


def test_bar0_programming_returns_a_bar0_action():
    vf = make_vf()
    vf.cfg_write(R.PCI_BASE_ADDRESS_0, 0xFFFF_FFFF, 0xF)
    vf.cfg_write(R.PCI_BASE_ADDRESS_0, 0, 0xF)
    assert vf.cfg_write(R.PCI_BASE_ADDRESS_0, 0xE000_0000, 0xF) == [("bar0", 0, 0xE000_0000)]
    assert vf.bar0_gpa == 0xE000_0000
    assert vf.cfg_read(R.PCI_BASE_ADDRESS_0) == 0xE000_0000


def test_bar0_reprogramming_reports_old_and_new():
    vf = make_vf()
    vf.cfg_write(R.PCI_BASE_ADDRESS_0, 0xE000_0000, 0xF)
    assert vf.cfg_write(R.PCI_BASE_ADDRESS_0, 0xE010_0000, 0xF) == [("bar0", 0xE000_0000, 0xE010_0000)]
    assert vf.cfg_write(R.PCI_BASE_ADDRESS_0, 0xE010_0000, 0xF) == []   # same address: nothing to do


def test_bar0_address_is_aligned_to_the_bar_size():
    vf = make_vf()
    assert vf.cfg_write(R.PCI_BASE_ADDRESS_0, 0xE000_3ABC, 0xF) == [("bar0", 0, 0xE000_0000)]


def test_bar0_sizing_during_programming_keeps_the_address():
    vf = make_vf()
    vf.cfg_write(R.PCI_BASE_ADDRESS_0, 0xE000_0000, 0xF)
    assert vf.cfg_write(R.PCI_BASE_ADDRESS_0, 0xFFFF_FFFF, 0xF) == []
    assert vf.bar0_gpa == 0xE000_0000
    assert vf.cfg_write(R.PCI_BASE_ADDRESS_0, 0xE000_0000, 0xF) == []
    assert vf.cfg_read(R.PCI_BASE_ADDRESS_0) == 0xE000_0000


@pytest.mark.parametrize("bar", range(1, 6))
def test_other_bars_read_zero(bar):
    vf = make_vf()
    reg = R.PCI_BASE_ADDRESS_0 + 4 * bar
    assert vf.cfg_read(reg) == 0
    assert vf.cfg_write(reg, 0xFFFF_FFFF, 0xF) == []
    assert vf.cfg_read(reg) == 0        # sizing them finds nothing


def test_reads_beyond_the_snapshot_are_zero():
    vf = make_vf()
    assert vf.cfg_read(0x100) == 0
    assert vf.cfg_read(0xFFC) == 0
    assert vf.cfg_write(0x100, 0xFFFF_FFFF, 0xF) == []


# ---------------------------------------------------- MSI-X Message Control


def test_msix_capability_reads_through_with_virtual_control():
    vf = make_vf()
    dw = vf.cfg_read(MSIX_POS)
    assert dw & 0xFF == R.PCI_CAP_ID_MSIX
    assert dw >> 8 & 0xFF == 0
    # Table size preserved; the real function's Enable is hidden.
    assert dw >> 16 == TABLE_SIZE - 1
    assert vf.cfg_read(MSIX_POS + R.PCI_MSIX_TABLE) == MSIX_TABLE_OFFSET
    assert vf.cfg_read(MSIX_POS + R.PCI_MSIX_PBA) == MSIX_PBA_OFFSET


def test_msix_enable_and_function_mask_are_virtual():
    vf = make_vf()
    flags = R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL
    assert msix_ctrl(vf, (TABLE_SIZE - 1) | flags) == [("msix_ctrl", True, True)]
    assert (vf.msix_enable, vf.msix_maskall) == (True, True)
    assert read16(vf, MSIX_POS + R.PCI_MSIX_FLAGS) == (TABLE_SIZE - 1) | flags
    assert msix_ctrl(vf, (TABLE_SIZE - 1) | R.PCI_MSIX_FLAGS_ENABLE) == [("msix_ctrl", True, False)]
    assert msix_ctrl(vf, TABLE_SIZE - 1) == [("msix_ctrl", False, False)]
    assert read16(vf, MSIX_POS + R.PCI_MSIX_FLAGS) == TABLE_SIZE - 1


def test_msix_table_size_is_read_only():
    vf = make_vf()
    msix_ctrl(vf, R.PCI_MSIX_FLAGS_QSIZE | R.PCI_MSIX_FLAGS_ENABLE)
    assert read16(vf, MSIX_POS + R.PCI_MSIX_FLAGS) == (TABLE_SIZE - 1) | R.PCI_MSIX_FLAGS_ENABLE
    assert vf.cfg_read(MSIX_POS) & 0xFFFF == R.PCI_CAP_ID_MSIX   # ID and next pointer untouched


def test_msix_control_write_without_change_has_no_action():
    vf = make_vf()
    assert msix_ctrl(vf, TABLE_SIZE - 1) == []
    enable(vf)
    assert enable(vf) == []


def test_msix_write_to_cap_header_bytes_only_changes_nothing():
    vf = make_vf()
    assert vf.cfg_write(MSIX_POS, 0xFFFF_FFFF, 0x3) == []
    assert (vf.msix_enable, vf.msix_maskall) == (False, False)
    assert vf.cfg_read(MSIX_POS) == R.PCI_CAP_ID_MSIX | (TABLE_SIZE - 1) << 16


def test_msix_control_through_a_dword_write():
    vf = make_vf()
    acts = vf.cfg_write(MSIX_POS, (R.PCI_MSIX_FLAGS_ENABLE << 16) | 0xFFFF, 0xF)
    assert acts == [("msix_ctrl", True, False)]


# ------------------------------------------------------- trapped MSI-X table


def test_table_entries_start_masked_and_zero():
    vf = make_vf()
    assert [e.masked for e in vf.table] == [True] * TABLE_SIZE
    assert vf.mmio_read(entry(0), 16) == struct.pack("<IIII", 0, 0, 0, 1)


@pytest.mark.parametrize("field, attr", [(R.PCI_MSIX_ENTRY_LOWER_ADDR, "addr_lo"),
                                         (R.PCI_MSIX_ENTRY_UPPER_ADDR, "addr_hi"),
                                         (R.PCI_MSIX_ENTRY_DATA, "data")])
def test_four_byte_field_writes(field, attr):
    vf = make_vf()
    assert vf.mmio_write(entry(3, field), u32(0x1234_5678)) == [("entry", 3)]
    assert getattr(vf.table[3], attr) == 0x1234_5678
    assert vf.mmio_read(entry(3, field), 4) == u32(0x1234_5678)
    assert all(getattr(e, attr) == 0 for i, e in enumerate(vf.table) if i != 3)


def test_twelve_byte_write_sets_the_message_and_leaves_the_mask():
    vf = make_vf()
    acts = vf.mmio_write(entry(5), struct.pack("<III", compat(1), 0, 0x41))
    assert acts == [("entry", 5)] * 3
    e = vf.table[5]
    assert (e.addr_lo, e.addr_hi, e.data, e.masked) == (compat(1), 0, 0x41, True)
    assert vf.mmio_read(entry(5), 16) == struct.pack("<IIII", compat(1), 0, 0x41, 1)


def test_vector_control_keeps_only_the_mask_bit():
    vf = make_vf()
    vf.mmio_write(entry(2, R.PCI_MSIX_ENTRY_VECTOR_CTRL), u32(0xFFFF_FFFE))
    assert vf.table[2].ctrl == 0 and not vf.table[2].masked
    vf.mmio_write(entry(2, R.PCI_MSIX_ENTRY_VECTOR_CTRL), u32(0xFFFF_FFFF))
    assert vf.mmio_read(entry(2, R.PCI_MSIX_ENTRY_VECTOR_CTRL), 4) == u32(1)


def test_sixteen_byte_write_covers_all_four_fields():
    vf = make_vf()
    vf.mmio_write(entry(1), struct.pack("<IIII", compat(2), 0, 0x50, 0))
    e = vf.table[1]
    assert (e.addr_lo, e.addr_hi, e.data, e.ctrl) == (compat(2), 0, 0x50, 0)


def test_write_spanning_the_table_end_stops_at_the_last_entry():
    vf = make_vf()
    last = TABLE_SIZE - 1
    acts = vf.mmio_write(entry(last, R.PCI_MSIX_ENTRY_DATA), struct.pack("<IIII", 0x42, 0, 7, 7))
    assert acts == [("entry", last), ("entry", last)]
    assert (vf.table[last].data, vf.table[last].ctrl) == (0x42, 0)


@pytest.mark.parametrize("offset", [0, 0x1000, MSIX_TABLE_OFFSET - 4, entry(TABLE_SIZE),
                                    MSIX_PBA_OFFSET, BAR0_SIZE - 4])
def test_writes_outside_the_table_are_ignored(offset):
    vf = make_vf()
    before = [VEntry(e.addr_lo, e.addr_hi, e.data, e.ctrl) for e in vf.table]
    assert vf.mmio_write(offset, u32(0)) == []
    assert vf.table == before


def test_short_writes_are_ignored():
    vf = make_vf()
    assert vf.mmio_write(entry(0, R.PCI_MSIX_ENTRY_VECTOR_CTRL), b"\x00\x00") == []
    assert vf.table[0].masked


def test_sub_dword_reads_slice_the_dword():
    vf = make_vf()
    vf.mmio_write(entry(0), u32(0xAABB_CCDD))
    assert vf.mmio_read(entry(0) + 1, 2) == bytes([0xCC, 0xBB])
    assert vf.mmio_read(entry(0) + 3, 1) == bytes([0xAA])


def test_reads_outside_table_and_pba_are_zero():
    vf = make_vf()
    assert vf.mmio_read(0, 8) == bytes(8)
    assert vf.mmio_read(entry(TABLE_SIZE), 4) == bytes(4)


# ---------------------------------------------------------------- the PBA


def test_pba_reflects_pending():
    vf = make_vf()
    assert vf.mmio_read(MSIX_PBA_OFFSET, 8) == bytes(8)
    vf.pending = {0: (ORIGIN, 1), 3: (ORIGIN, 2)}
    assert vf.mmio_read(MSIX_PBA_OFFSET, 4) == u32(0b1001)


def test_pba_bits_above_31_are_in_the_next_dword():
    vf = make_vf(msix_size=40)
    vf.pending = {1: (None, 0), 33: (None, 0), 39: (None, 0)}
    assert vf.mmio_read(MSIX_PBA_OFFSET, 8) == struct.pack("<II", 1 << 1, (1 << 1) | (1 << 7))
    assert vf.mmio_read(MSIX_PBA_OFFSET + 4, 4) == u32((1 << 1) | (1 << 7))


def test_pba_is_read_only():
    vf = make_vf()
    assert vf.mmio_write(MSIX_PBA_OFFSET, u32(0xFF)) == []
    assert vf.pending == {}


def test_pba_clears_when_a_pending_entry_fires():
    vf = make_vf()
    enable(vf)
    program(vf, 0, apic=0, vector=0x41, unmask=False)
    vf.pending[0] = (ORIGIN, T_NS)
    assert vf.mmio_read(MSIX_PBA_OFFSET, 4) == u32(1)
    vf.mmio_write(entry(0, R.PCI_MSIX_ENTRY_VECTOR_CTRL), u32(0))
    assert vf.mmio_read(MSIX_PBA_OFFSET, 4) == u32(0)


# ------------------------------------------------------------ deliverable()


def test_deliverable_compat_message():
    vf = make_vf()
    enable(vf)
    program(vf, 4, apic=2, vector=0x41, unmask=True)
    assert vf.deliverable(4) == (2, 0x41)


def test_deliverable_ignores_data_bits_above_the_vector():
    vf = make_vf()
    enable(vf)
    # Linux < 5.11 sets bit 14 (level assert); the vector is data[7:0].
    vf.mmio_write(entry(0), struct.pack("<IIII", compat(7), 0, 0x4000 | 0xEB, 0))
    assert vf.deliverable(0) == (7, 0xEB)


def test_deliverable_lowest_legal_vector():
    vf = make_vf()
    enable(vf)
    vf.mmio_write(entry(0), struct.pack("<IIII", compat(0), 0, 0x10, 0))
    assert vf.deliverable(0) == (0, 0x10)


@pytest.mark.parametrize("addr_lo, addr_hi, data", [
    (0xFEE0_0018 | 5 << 5, 0, 0),        # remappable format (bit 4), IRTE handle 5, SHV
    (0xFEE0_0010, 0, 0x41),              # remappable format with a plausible vector in data
    (0xDEAD_BEEF, 0, 0x41),              # garbage address
    (0x0000_0000, 0, 0x41),              # never written
    (0xFED0_0000, 0, 0x41),              # outside the interrupt range
    (compat(1), 1, 0x41),                # above 4 GiB
    (compat(1), 0, 0x0F),                # vector in the exception range
    (compat(1), 0, 0x00),
])
def test_unusable_messages_are_not_deliverable(addr_lo, addr_hi, data):
    vf = make_vf()
    enable(vf)
    vf.mmio_write(entry(0), struct.pack("<IIII", addr_lo, addr_hi, data, 0))
    assert vf.deliverable(0) is None


def test_masked_entry_is_not_deliverable():
    vf = make_vf()
    enable(vf)
    program(vf, 0, apic=1, vector=0x41, unmask=False)
    assert vf.deliverable(0) is None


def test_function_mask_blocks_every_entry():
    vf = make_vf()
    enable(vf, maskall=True)
    program(vf, 0, apic=1, vector=0x41, unmask=True)
    assert vf.deliverable(0) is None


def test_disabled_msix_blocks_every_entry():
    vf = make_vf()
    program(vf, 0, apic=1, vector=0x41, unmask=True)
    assert vf.deliverable(0) is None


# ------------------------------------------------------------------ replay


def test_unmasking_replays_a_pending_entry_once():
    vf = make_vf()
    enable(vf)
    program(vf, 2, apic=1, vector=0x41, unmask=False)
    vf.pending[2] = (ORIGIN, T_NS)
    acts = vf.mmio_write(entry(2, R.PCI_MSIX_ENTRY_VECTOR_CTRL), u32(0))
    assert acts == [("entry", 2), ("fire", 2, ORIGIN, T_NS)]
    assert vf.pending == {}
    # Nothing fires a second time.
    assert fires(vf.mmio_write(entry(2, R.PCI_MSIX_ENTRY_VECTOR_CTRL), u32(0))) == []
    assert fires(vf.mmio_write(entry(2, R.PCI_MSIX_ENTRY_DATA), u32(0x42))) == []


def test_clearing_the_function_mask_replays():
    vf = make_vf()
    enable(vf, maskall=True)
    program(vf, 1, apic=0, vector=0x50, unmask=True)
    assert fires(program(vf, 6, apic=0, vector=0x51, unmask=True)) == []
    vf.pending = {6: (0x0202, 9), 1: (ORIGIN, T_NS)}
    acts = enable(vf, maskall=False)
    # Sorted by entry index, after the control change.
    assert acts == [("msix_ctrl", True, False), ("fire", 1, ORIGIN, T_NS), ("fire", 6, 0x0202, 9)]
    assert vf.pending == {}


def test_enabling_msix_replays():
    vf = make_vf()
    program(vf, 0, apic=3, vector=0x60, unmask=True)
    vf.pending[0] = (None, 7)
    assert enable(vf) == [("msix_ctrl", True, False), ("fire", 0, None, 7)]


def test_replay_waits_until_the_message_is_valid():
    vf = make_vf()
    enable(vf)
    vf.pending[0] = (ORIGIN, T_NS)
    # Unmasked, but the message is still garbage: stays pending.
    assert fires(vf.mmio_write(entry(0, R.PCI_MSIX_ENTRY_VECTOR_CTRL), u32(0))) == []
    assert 0 in vf.pending
    assert fires(vf.mmio_write(entry(0, R.PCI_MSIX_ENTRY_DATA), u32(0x41))) == []   # addr still 0
    acts = vf.mmio_write(entry(0, R.PCI_MSIX_ENTRY_LOWER_ADDR), u32(compat(1)))
    assert fires(acts) == [("fire", 0, ORIGIN, T_NS)]
    assert vf.deliverable(0) == (1, 0x41)


def test_replay_only_fires_entries_that_became_deliverable():
    vf = make_vf()
    enable(vf)
    program(vf, 0, apic=0, vector=0x41, unmask=False)
    program(vf, 1, apic=0, vector=0x42, unmask=False)
    vf.pending = {0: (ORIGIN, 1), 1: (ORIGIN, 2)}
    acts = vf.mmio_write(entry(1, R.PCI_MSIX_ENTRY_VECTOR_CTRL), u32(0))
    assert fires(acts) == [("fire", 1, ORIGIN, 2)]
    assert vf.pending == {0: (ORIGIN, 1)}


def test_disabling_does_not_replay():
    vf = make_vf()
    enable(vf)
    program(vf, 0, apic=0, vector=0x41, unmask=False)
    vf.pending[0] = (ORIGIN, T_NS)
    assert msix_ctrl(vf, TABLE_SIZE - 1) == [("msix_ctrl", False, False)]
    assert 0 in vf.pending


# ---------------------------------------------------------------- property

_REGS = [R.PCI_VENDOR_ID, R.PCI_COMMAND, R.PCI_BASE_ADDRESS_0, R.PCI_BASE_ADDRESS_0 + 4,
         MSIX_POS, MSIX_POS + 4, MSIX_POS + 8]

_cfg_op = st.tuples(st.just("cfg"),
                    st.one_of(st.sampled_from(_REGS), st.integers(0, 0xFFF)),
                    st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xF))
# Message Control writes as Linux makes them (word at +2), any flag combination, any QSIZE.
_ctrl_op = st.tuples(st.just("cfg"), st.just(MSIX_POS),
                     st.integers(0, 0xFFFF).map(lambda v: v << 16), st.just(0xC))
_mmio_addr = st.one_of(st.integers(MSIX_TABLE_OFFSET - 8, entry(TABLE_SIZE) + 8),
                       st.integers(0, BAR0_SIZE + 16))
_dword = st.one_of(st.sampled_from([0, 1, 0xFFFF_FFFF, compat(0), compat(1), compat(0xFF),
                                    0xFEE0_0010, 0x0F, 0x10, 0x41, 0xFF]),
                   st.integers(0, 0xFFFF_FFFF))
_mmio_op = st.tuples(st.just("mmio"), _mmio_addr,
                     st.one_of(st.lists(_dword, max_size=5).map(lambda v: struct.pack(f"<{len(v)}I", *v)),
                               st.binary(max_size=24)))
# Aligned whole-field stores into the table: the writes that actually make entries deliverable.
_field_op = st.tuples(st.just("mmio"),
                      st.builds(entry, st.integers(0, TABLE_SIZE - 1), st.sampled_from([0, 4, 8, 12])),
                      st.one_of(_dword.map(u32), st.tuples(st.integers(0, 0xFF), st.integers(0, 0xFFFF))
                                .map(lambda av: struct.pack("<III", compat(av[0]), 0, av[1]))))
# What a driver does: enable / function-mask, write a valid message, mask / unmask an entry.
_flags = st.sampled_from([0, R.PCI_MSIX_FLAGS_ENABLE, R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL])


def _driver_ops(entries: int = TABLE_SIZE) -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.just("cfg"), st.just(MSIX_POS), _flags.map(lambda f: f << 16), st.just(0xC)),
        st.tuples(st.just("mmio"), st.builds(entry, st.integers(0, entries - 1)),
                  st.tuples(st.integers(0, 0xFF), st.integers(0, 0xFF))
                  .map(lambda av: struct.pack("<III", compat(av[0]), 0, av[1]))),
        st.tuples(st.just("mmio"),
                  st.builds(entry, st.integers(0, entries - 1), st.just(R.PCI_MSIX_ENTRY_VECTOR_CTRL)),
                  st.sampled_from([u32(0), u32(1)])))


def _fire_ops(entries: int = TABLE_SIZE) -> st.SearchStrategy:
    return st.tuples(st.just("fire"), st.integers(0, entries - 1), st.none(), st.none())


_driver_op = _driver_ops()
_fire_op = _fire_ops()
_ops = st.lists(st.one_of(_driver_op, _driver_op, _driver_op, _fire_op, _fire_op,
                          _cfg_op, _ctrl_op, _mmio_op, _field_op), min_size=20, max_size=60)


def _working_vf() -> VirtualFunction:
    """A VF whose driver is up: MSI-X enabled, every entry unmasked with a valid message."""
    vf = make_vf()
    enable(vf)
    for i in range(TABLE_SIZE):
        program(vf, i, apic=i, vector=0x40 + i, unmask=True)
    return vf


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), _ops)
def test_random_guest_writes_never_raise_or_deliver_illegal_vectors(working, ops):
    vf = _working_vf() if working else make_vf()
    for op in ops:
        if op[0] == "cfg":
            acts = vf.cfg_write(op[1], op[2], op[3])
        elif op[0] == "mmio":
            acts = vf.mmio_write(op[1], op[2])
            vf.mmio_read(op[1], 8)
        else:
            # a real interrupt of entry op[1] arrives: forwarded or left pending (as the VMM does)
            if vf.deliverable(op[1]) is None:
                vf.pending.setdefault(op[1], (ORIGIN, T_NS))
            acts = []
        for a in acts:
            assert a[0] in ("bar0", "msix_ctrl", "entry", "fire")
            if a[0] == "fire":
                assert vf.deliverable(a[1]) is not None    # replayed only when deliverable
                assert a[1] not in vf.pending
        for idx in range(TABLE_SIZE):
            target = vf.deliverable(idx)
            if target is not None:
                apic, vector = target
                assert 0x10 <= vector <= 0xFF
                assert 0 <= apic <= 0xFF
                assert idx not in vf.pending             # deliverable entries never stay pending
        ctrl = read16(vf, MSIX_POS + R.PCI_MSIX_FLAGS)
        assert ctrl & R.PCI_MSIX_FLAGS_QSIZE == TABLE_SIZE - 1
        assert vf.cfg_read(R.PCI_VENDOR_ID) == VENDOR | DEVICE << 16
        assert vf.bar0_gpa % BAR0_SIZE == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(st.one_of(_driver_ops(2), _fire_ops(2)), min_size=20, max_size=60))
def test_every_pending_interrupt_is_replayed_exactly_once(working, ops):
    """A model of the VMM's forwarding: each queued interrupt fires once, with its provenance."""
    vf = _working_vf() if working else make_vf()
    expected: dict[int, tuple[int, int]] = {}
    for n, op in enumerate(ops):
        if op[0] == "fire":
            idx = op[1]
            if vf.deliverable(idx) is None:
                expected.setdefault(idx, (n, 1000 + n))     # one pending bit per entry
                vf.pending.setdefault(idx, (n, 1000 + n))
            continue
        acts = vf.cfg_write(op[1], op[2], op[3]) if op[0] == "cfg" else vf.mmio_write(op[1], op[2])
        for _, idx, origin, t_ns in fires(acts):
            assert expected.pop(idx) == (origin, t_ns)
        assert vf.pending == expected
        assert all(vf.deliverable(idx) is None for idx in vf.pending)
