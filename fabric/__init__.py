"""The bus: wire formats and the hardware of the PCIe fabric.

Models here (TLP codec, IR unit, IOMMU, routing tables) are pure and synchronous.
Only ``fabric.process`` owns sockets.  Nothing here imports host/, guest/ or device/.
"""
