"""Kernel-style views of an OS instance: ``lspci -vv``.

(``/proc/interrupts`` and the domain hierarchy are rendered by ``IrqTable``.)
The capability dump reads live config space through the PCI core, as lspci
reads sysfs ``config``.
"""

from __future__ import annotations

from guest.pci import regs as R
from guest.pci.core import PciBus, PciDev


def _pm(flag: int) -> str:
    return "+" if flag else "-"


async def lspci(bus: PciBus) -> str:
    out: list[str] = []
    for rid in sorted(bus.devices):
        out.extend(await lspci_dev(bus, bus.devices[rid]))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


async def lspci_dev(bus: PciBus, dev: PciDev) -> list[str]:
    rid = dev.rid
    cls = dev.class_rev >> 8
    lines = [f"{dev} Class [{cls >> 8:04x}]: Device {dev.vendor:04x}:{dev.device:04x} (rev {dev.class_rev & 0xFF:02x})"
             + (" (virtual function)" if dev.is_virtfn else "")]
    cmd = await bus.read16(rid, R.PCI_COMMAND)
    lines.append(f"\tControl: I/O- Mem{_pm(cmd & R.PCI_COMMAND_MEMORY)} BusMaster{_pm(cmd & R.PCI_COMMAND_MASTER)} "
                 f"DisINTx{_pm(cmd & R.PCI_COMMAND_INTX_DISABLE)}")
    for bar in dev.bars.values():
        lines.append(f"\tRegion {bar.index}: {bar}")
    for pos, cap in dev.cap_list:
        if cap == R.PCI_CAP_ID_MSIX:
            ctrl = await bus.read16(rid, pos + R.PCI_MSIX_FLAGS)
            table = await bus.read32(rid, pos + R.PCI_MSIX_TABLE)
            pba = await bus.read32(rid, pos + R.PCI_MSIX_PBA)
            lines.append(f"\tCapabilities: [{pos:02x}] MSI-X: Enable{_pm(ctrl & R.PCI_MSIX_FLAGS_ENABLE)} "
                         f"Count={(ctrl & R.PCI_MSIX_FLAGS_QSIZE) + 1} Masked{_pm(ctrl & R.PCI_MSIX_FLAGS_MASKALL)}")
            lines.append(f"\t\tVector table: BAR={table & 7} offset={table & ~7:08x}")
            lines.append(f"\t\tPBA: BAR={pba & 7} offset={pba & ~7:08x}")
        elif cap == R.PCI_CAP_ID_EXP:
            flags = await bus.read16(rid, pos + R.PCI_EXP_FLAGS)
            devcap = await bus.read32(rid, pos + R.PCI_EXP_DEVCAP)
            kinds = {0: "Endpoint", 1: "Legacy Endpoint", 9: "Root Complex Integrated Endpoint"}
            lines.append(f"\tCapabilities: [{pos:02x}] Express (v{flags & 0xF}) {kinds.get((flags >> 4) & 0xF, 'Unknown type')}")
            lines.append(f"\t\tDevCap: FLReset{_pm(devcap & R.PCI_EXP_DEVCAP_FLR)}")
        else:
            lines.append(f"\tCapabilities: [{pos:02x}] {R.CAP_NAMES.get(cap, f'Unknown {cap:02x}')}")
    for pos, cap, ver in dev.ext_cap_list:
        name = R.EXT_CAP_NAMES.get(cap, f"Unknown {cap:04x}")
        lines.append(f"\tCapabilities: [{pos:03x} v{ver}] {name}")
        if cap == R.PCI_EXT_CAP_ID_SRIOV:
            ctrl = await bus.read16(rid, pos + R.PCI_SRIOV_CTRL)
            initial = await bus.read16(rid, pos + R.PCI_SRIOV_INITIAL_VF)
            total = await bus.read16(rid, pos + R.PCI_SRIOV_TOTAL_VF)
            num = await bus.read16(rid, pos + R.PCI_SRIOV_NUM_VF)
            off = await bus.read16(rid, pos + R.PCI_SRIOV_VF_OFFSET)
            stride = await bus.read16(rid, pos + R.PCI_SRIOV_VF_STRIDE)
            did = await bus.read16(rid, pos + R.PCI_SRIOV_VF_DID)
            lines.append(f"\t\tIOVCtl: Enable{_pm(ctrl & R.PCI_SRIOV_CTRL_VFE)} Migration- Interrupt- "
                         f"MSE{_pm(ctrl & R.PCI_SRIOV_CTRL_MSE)} ARIHierarchy-")
            lines.append(f"\t\tInitial VFs: {initial}, Total VFs: {total}, Number of VFs: {num}")
            lines.append(f"\t\tVF offset: {off}, stride: {stride}, Device ID: {did:04x}")
        elif cap == R.PCI_EXT_CAP_ID_PASID:
            pcap = await bus.read16(rid, pos + R.PCI_PASID_CAP)
            pctl = await bus.read16(rid, pos + R.PCI_PASID_CTRL)
            lines.append(f"\t\tPASIDCap: Exec{_pm(pcap & 2)} Priv{_pm(pcap & 4)}, Max PASID Width: {(pcap >> 8) & 0x1F:02x}")
            lines.append(f"\t\tPASIDCtl: Enable{_pm(pctl & R.PCI_PASID_CTRL_ENABLE)} Exec- Priv-")
        elif cap == R.PCI_EXT_CAP_ID_DVSEC:
            h1 = await bus.read32(rid, pos + R.PCI_DVSEC_HEADER1)
            h2 = await bus.read16(rid, pos + R.PCI_DVSEC_HEADER2)
            desc = f"\t\tDVSEC Vendor={h1 & 0xFFFF:04x} ID={h2:04x} Rev={(h1 >> 16) & 0xF} Len={h1 >> 20}"
            if h1 & 0xFFFF == R.PCI_VENDOR_ID_INTEL and h2 == R.PCI_DVSEC_ID_INTEL_SIOV:
                sc = await bus.read32(rid, pos + R.PCI_DVSEC_INTEL_SIOV_CAP)
                desc += f": Intel Scalable IOV, IMS{_pm(sc & R.PCI_DVSEC_INTEL_SIOV_CAP_IMS)}"
            lines.append(desc)
    if dev.driver is not None:
        lines.append(f"\tKernel driver in use: {getattr(dev.driver, 'driver_name', 'irqlab-engine')}")
    return lines
