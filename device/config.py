"""Type-0 configuration space of one PCIe function (PCIe Base 7.5.1, PCI LB 3.0 ch. 6).

Type-0 header (all fields little-endian)::

     31            24 23            16 15             8 7              0
    +----------------+----------------+----------------+----------------+
    |            Device ID            |            Vendor ID            | 0x00
    +---------------------------------+---------------------------------+
    |             Status              |             Command             | 0x04
    +---------------------------------+----------------+----------------+
    |                    Class Code                    |  Revision ID   | 0x08
    +----------------+----------------+----------------+----------------+
    |      BIST      |  Header Type   | Latency Timer  |Cache Line Size | 0x0C
    +----------------+----------------+----------------+----------------+
    |                        BAR0 .. BAR5 (6 x 32)                      | 0x10-0x24
    |                        CardBus CIS Pointer                        | 0x28
    |          Subsystem ID           |       Subsystem Vendor ID       | 0x2C
    |                    Expansion ROM Base Address                     | 0x30
    |                     Reserved                     |  Cap Pointer   | 0x34
    |                             Reserved                              | 0x38
    |    Max_Lat     |    Min_Gnt     | Interrupt Pin  | Interrupt Line | 0x3C
    +-------------------------------------------------------------------+
    0x040-0x0FF  standard capability list (8-bit links, starts at [0x34])
    0x100-0xFFF  extended capability list (header DW at 0x100)

    Command  bit1 Memory Space (MSE)  bit2 Bus Master (BME)  bit10 INTx Disable
    Status   bit4 Capabilities List   bits 8,11-15 error bits (RW1C)

    Memory BAR:   31 .............. 4 | 3 prefetchable | 2:1 type (00 32-bit, 10 64-bit) | 0 = 0

Theory of operation
-------------------
Three parallel byte arrays, as in QEMU's ``PCIDevice``: ``data`` (the current
value), ``wmask`` (bits software may write) and ``w1cmask`` (bits that a 1
clears).  A config write with byte enables touches only enabled bytes::

    new = (old & ~(wmask & be)) | (value & wmask & be)
    new &= ~(value & w1cmask & be)

so read-only bits can never change from a CfgWr, whatever the value.  BAR
sizing falls out of the masks: a memory BAR of size S has wmask ``~(S-1)``
above the type bits, so writing all-ones reads back the decoded bits plus the
(read-only) type bits.

Capability structures install their register values and masks and may hook DW
offsets: after a write lands, ``hook(reg, old_dw, new_dw)`` runs and may change
state or return output (e.g. MSI-X messages replayed when a mask is lifted);
``write`` returns everything the hooks returned, in order.

``seal()`` records the power-on image (data and both masks); ``reset()``
restores it (what an FLR does to the function's registers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from device.caps.common import PciCap, PciExtCap

CONFIG_SPACE_SIZE = 0x1000

# ---- header offsets (Linux pci_regs.h names) --------------------------------------------------
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CACHE_LINE_SIZE = 0x0C
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_STD_HEADER_SIZEOF = 0x40
PCI_CFG_SPACE_SIZE = 0x100
PCI_EXT_CAP_START = 0x100

# ---- Command / Status bits --------------------------------------------------------------------
PCI_COMMAND_IO = 0x0001
PCI_COMMAND_MEMORY = 0x0002
PCI_COMMAND_MASTER = 0x0004
PCI_COMMAND_PARITY = 0x0040
PCI_COMMAND_SERR = 0x0100
PCI_COMMAND_INTX_DISABLE = 0x0400

PCI_STATUS_INTERRUPT = 0x0008
PCI_STATUS_CAP_LIST = 0x0010
PCI_STATUS_PARITY = 0x0100
PCI_STATUS_SIG_TARGET_ABORT = 0x0800
PCI_STATUS_REC_TARGET_ABORT = 0x1000
PCI_STATUS_REC_MASTER_ABORT = 0x2000
PCI_STATUS_SIG_SYSTEM_ERROR = 0x4000
PCI_STATUS_DETECTED_PARITY = 0x8000
PCI_STATUS_ERROR_BITS = 0xF900  # RW1C

# ---- BAR encoding -----------------------------------------------------------------------------
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_BASE_ADDRESS_MEM_MASK = 0xFFFFFFF0

# Expand a 4-bit byte-enable into a 32-bit mask.
BE_MASK = tuple(
    sum(0xFF << (8 * i) for i in range(4) if be >> i & 1) for be in range(16)
)

ConfigHook = Callable[[int, int, int], "Iterable[Any] | None"]


class ConfigSpace:
    """4 KiB type-0 configuration space with write masks, RW1C masks and write hooks."""

    __slots__ = (
        "data", "wmask", "w1cmask", "_hooks", "caps", "ext_caps", "bars",
        "_std_free", "_ext_free", "_image",
    )

    def __init__(self) -> None:
        self.data = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(CONFIG_SPACE_SIZE)
        self._hooks: dict[int, list[ConfigHook]] = {}
        self.caps: list[PciCap] = []
        self.ext_caps: list[PciExtCap] = []
        self.bars: dict[int, tuple[int, bool]] = {}  # BAR register offset -> (size, is64)
        self._std_free = PCI_STD_HEADER_SIZEOF
        self._ext_free = PCI_EXT_CAP_START
        self._image: tuple[bytes, bytes, bytes] | None = None

    # ---- raw little-endian accessors (no masks, no hooks: for the models) ----------------------

    def get8(self, off: int) -> int:
        return self.data[off]

    def get16(self, off: int) -> int:
        return self.data[off] | self.data[off + 1] << 8

    def get32(self, off: int) -> int:
        return int.from_bytes(self.data[off:off + 4], "little")

    def set8(self, off: int, value: int) -> None:
        self.data[off] = value & 0xFF

    def set16(self, off: int, value: int) -> None:
        self.data[off:off + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def set32(self, off: int, value: int) -> None:
        self.data[off:off + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")

    def set_wmask(self, off: int, mask: int, width: int = 4) -> None:
        self.wmask[off:off + width] = (mask & ((1 << 8 * width) - 1)).to_bytes(width, "little")

    def set_w1cmask(self, off: int, mask: int, width: int = 4) -> None:
        self.w1cmask[off:off + width] = (mask & ((1 << 8 * width) - 1)).to_bytes(width, "little")

    def wmask32(self, off: int) -> int:
        return int.from_bytes(self.wmask[off:off + 4], "little")

    # ---- CfgRd / CfgWr ---------------------------------------------------------------------------

    def read(self, reg: int, first_be: int = 0xF) -> int:
        """CfgRd: the DW at ``reg & 0xFFC``.

        The whole DW is returned whatever ``first_be`` says (reads have no side
        effects here, and a completer may return all four bytes).
        """
        reg &= 0xFFC
        return int.from_bytes(self.data[reg:reg + 4], "little")

    def write(self, reg: int, value: int, first_be: int = 0xF) -> list[Any]:
        """CfgWr: merge the enabled bytes of ``value`` through the masks, then run hooks.

        Returns whatever the hooks of that DW returned (usually nothing).
        """
        reg &= 0xFFC
        be = BE_MASK[first_be & 0xF]
        data = self.data
        old = int.from_bytes(data[reg:reg + 4], "little")
        wm = int.from_bytes(self.wmask[reg:reg + 4], "little") & be
        w1c = int.from_bytes(self.w1cmask[reg:reg + 4], "little") & be
        new = ((old & ~wm) | (value & wm)) & ~(value & w1c) & 0xFFFFFFFF
        if new != old:
            data[reg:reg + 4] = new.to_bytes(4, "little")
        hooks = self._hooks.get(reg)
        if hooks is None:
            return []
        out: list[Any] = []
        for hook in hooks:
            result = hook(reg, old, new)
            if result:
                out.extend(result)
        return out

    def add_hook(self, off: int, length: int, hook: ConfigHook) -> None:
        """Call ``hook(reg, old_dw, new_dw)`` after any write to a DW overlapping [off, off+length)."""
        for reg in range(off & ~3, off + length, 4):
            self._hooks.setdefault(reg, []).append(hook)

    # ---- header ----------------------------------------------------------------------------------

    def init_header(
        self,
        vendor_id: int,
        device_id: int,
        *,
        revision: int = 0,
        class_code: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        header_type: int = 0,
        command_wmask: int = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY
        | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE,
    ) -> None:
        """Fill the fixed type-0 header fields; only Command, Status errors,
        cache line size and interrupt line are writable."""
        self.set16(PCI_VENDOR_ID, vendor_id)
        self.set16(PCI_DEVICE_ID, device_id)
        self.set8(PCI_REVISION_ID, revision)
        self.data[PCI_CLASS_PROG:PCI_CLASS_PROG + 3] = (class_code & 0xFFFFFF).to_bytes(3, "little")
        self.set8(PCI_HEADER_TYPE, header_type)
        self.set16(PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self.set16(PCI_SUBSYSTEM_ID, subsystem_id)
        self.set_wmask(PCI_COMMAND, command_wmask, 2)
        self.set_w1cmask(PCI_STATUS, PCI_STATUS_ERROR_BITS, 2)
        self.set_wmask(PCI_CACHE_LINE_SIZE, 0xFF, 1)
        self.set_wmask(PCI_INTERRUPT_LINE, 0xFF, 1)

    @property
    def command(self) -> int:
        return self.data[PCI_COMMAND] | self.data[PCI_COMMAND + 1] << 8

    @property
    def memory_space_enabled(self) -> bool:
        return bool(self.data[PCI_COMMAND] & PCI_COMMAND_MEMORY)

    @property
    def bus_master_enabled(self) -> bool:
        return bool(self.data[PCI_COMMAND] & PCI_COMMAND_MASTER)

    # ---- BARs (also used for the SR-IOV VF BARs, which share the encoding) -------------------------

    def define_bar(self, off: int, size: int, *, is64: bool = False, prefetchable: bool = False) -> None:
        """Make the DW at ``off`` (and ``off+4`` if 64-bit) a memory BAR decoding ``size`` bytes.

        ``size`` must be a power of two >= 16.  Address bits below ``size`` read
        as 0; the type bits are read-only.  Redefining keeps the address bits
        that the new size still decodes.
        """
        if size < 16 or size & (size - 1):
            raise ValueError(f"BAR size 0x{size:x} is not a power of two >= 16")
        if not is64 and size > 1 << 31:
            raise ValueError("32-bit BAR larger than 2 GiB")
        type_bits = (PCI_BASE_ADDRESS_MEM_TYPE_64 if is64 else 0) | (
            PCI_BASE_ADDRESS_MEM_PREFETCH if prefetchable else 0
        )
        mask = ~(size - 1) & ((1 << 64) - 1 if is64 else 0xFFFFFFFF)
        lo_mask = mask & PCI_BASE_ADDRESS_MEM_MASK
        self.set_wmask(off, lo_mask)
        self.set32(off, (self.get32(off) & lo_mask) | type_bits)
        if is64:
            hi_mask = mask >> 32
            self.set_wmask(off + 4, hi_mask)
            self.set32(off + 4, self.get32(off + 4) & hi_mask)
        self.bars[off] = (size, is64)

    def add_bar(self, index: int, size: int, *, is64: bool = False, prefetchable: bool = False) -> None:
        """Implement header BAR ``index`` (0-5); a 64-bit BAR also takes ``index + 1``."""
        if not 0 <= index <= (4 if is64 else 5):
            raise ValueError(f"no room for BAR{index}")
        self.define_bar(PCI_BASE_ADDRESS_0 + 4 * index, size, is64=is64, prefetchable=prefetchable)

    def bar_address(self, off: int) -> int:
        """Base address programmed into the memory BAR whose register is at ``off``."""
        lo = self.get32(off)
        addr = lo & PCI_BASE_ADDRESS_MEM_MASK
        if lo & 0x6 == PCI_BASE_ADDRESS_MEM_TYPE_64:
            addr |= self.get32(off + 4) << 32
        return addr

    # ---- capability lists ------------------------------------------------------------------------

    def add_capability(self, cap: "PciCap", offset: int | None = None) -> int:
        """Link ``cap`` at the end of the standard list (0x40-0xFF) and install it.

        The first capability sets the Capabilities Pointer (0x34) and Status
        bit 4.  Returns the capability's byte offset.
        """
        if offset is None:
            offset = (self._std_free + 3) & ~3
        if offset < PCI_STD_HEADER_SIZEOF or offset & 3 or offset + cap.length > PCI_CFG_SPACE_SIZE:
            raise ValueError(f"capability 0x{cap.cap_id:02x} does not fit at 0x{offset:x}")
        self._check_free(offset, cap.length)
        self.data[offset] = cap.cap_id
        self.data[offset + 1] = 0
        if self.caps:
            self.data[self.caps[-1].offset + 1] = offset
        else:
            self.data[PCI_CAPABILITY_LIST] = offset
            self.set16(PCI_STATUS, self.get16(PCI_STATUS) | PCI_STATUS_CAP_LIST)
        self.caps.append(cap)
        self._std_free = max(self._std_free, offset + cap.length)
        cap.install(self, offset)
        return offset

    def add_ext_capability(self, cap: "PciExtCap", offset: int | None = None) -> int:
        """Link ``cap`` at the end of the extended list (first one at 0x100) and install it.

        Header DW: ID[15:0] | Version[19:16] | Next[31:20].
        """
        if offset is None:
            offset = (self._ext_free + 3) & ~3
        if not self.ext_caps and offset != PCI_EXT_CAP_START:
            raise ValueError("the first extended capability must sit at 0x100")
        if offset < PCI_EXT_CAP_START or offset & 3 or offset + cap.length > CONFIG_SPACE_SIZE:
            raise ValueError(f"extended capability 0x{cap.cap_id:04x} does not fit at 0x{offset:x}")
        self._check_free(offset, cap.length)
        self.set32(offset, cap.cap_id | cap.version << 16)
        if self.ext_caps:
            prev = self.ext_caps[-1].offset
            self.set32(prev, (self.get32(prev) & 0x000FFFFF) | offset << 20)
        self.ext_caps.append(cap)
        self._ext_free = max(self._ext_free, offset + cap.length)
        cap.install(self, offset)
        return offset

    def _check_free(self, offset: int, length: int) -> None:
        for other in (*self.caps, *self.ext_caps):
            if offset < other.offset + other.length and other.offset < offset + length:
                raise ValueError(f"capability at 0x{offset:x} overlaps one at 0x{other.offset:x}")

    # ---- reset -----------------------------------------------------------------------------------

    def seal(self) -> None:
        """Record the current contents and masks as the power-on / FLR image."""
        self._image = (bytes(self.data), bytes(self.wmask), bytes(self.w1cmask))

    def reset(self) -> None:
        """Return every register (and every mask) to the sealed image."""
        if self._image is None:
            raise RuntimeError("ConfigSpace.reset() before seal()")
        data, wmask, w1cmask = self._image
        self.data[:] = data
        self.wmask[:] = wmask
        self.w1cmask[:] = w1cmask

    @property
    def reset_image(self) -> bytes:
        if self._image is None:
            raise RuntimeError("ConfigSpace not sealed")
        return self._image[0]
