"""Requester / routing IDs (PCIe Base spec 2.2.6.2): bus[15:8] device[7:3] function[2:0]."""

from __future__ import annotations

import re
from typing import NamedTuple

_BDF_RE = re.compile(r"^(?:[0-9a-fA-F]{4}:)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


class Bdf(NamedTuple):
    """A bus:device.function triple; ``int(bdf)`` is the 16-bit RID."""

    bus: int
    dev: int
    fn: int

    @classmethod
    def from_int(cls, rid: int) -> "Bdf":
        if not 0 <= rid <= 0xFFFF:
            raise ValueError(f"RID 0x{rid:x} does not fit in 16 bits")
        return cls((rid >> 8) & 0xFF, (rid >> 3) & 0x1F, rid & 0x7)

    @classmethod
    def parse(cls, text: str) -> "Bdf":
        """Parse ``"01:00.2"`` or ``"0000:01:00.2"``."""
        m = _BDF_RE.match(text.strip())
        if not m:
            raise ValueError(f"not a bus:device.function: {text!r}")
        bus, dev, fn = int(m.group(1), 16), int(m.group(2), 16), int(m.group(3))
        if dev > 0x1F:
            raise ValueError(f"device number 0x{dev:x} exceeds 0x1f in {text!r}")
        return cls(bus, dev, fn)

    def __int__(self) -> int:
        return (self.bus << 8) | (self.dev << 3) | self.fn

    def __index__(self) -> int:
        return int(self)

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.dev:02x}.{self.fn}"


def rid_str(rid: int) -> str:
    """Format a 16-bit RID the way Linux prints a BDF (``01:00.1``)."""
    return f"{(rid >> 8) & 0xFF:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 7}"
