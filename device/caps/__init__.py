"""Capability structures of the configuration space, one module per capability.

``common`` holds the IDs and the base classes; ``pcie``, ``msix`` and ``sriov``
the structures this lab's devices implement.
"""

from device.caps.common import PciCap, PciCapId, PciExtCap, PciExtCapId

__all__ = ["PciCap", "PciCapId", "PciExtCap", "PciExtCapId"]
