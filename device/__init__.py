"""device: the lab's PCIe hardware models (pure, synchronous, sans-I/O).

Imports only ``fabric`` (wire formats).  One module per hardware block:

    config.py         type-0 configuration space: masks, RW1C, BARs, capability lists, hooks
    caps/common.py    capability IDs and base classes
    caps/pcie.py      PCI Express capability v2 (FLR)
    caps/msix.py      MSI-X capability (Message Control, table/PBA locators)
    caps/sriov.py     SR-IOV extended capability (NumVFs, VF RID arithmetic, VF BARs)
    msix.py           MSI-X table + PBA (mask / pending / replay)
    ims.py            IMS of kind ``device``: IDXD-layout slots in BAR0 (mask / pending / replay, PASID)
    engine.py         the work engine (doorbell -> DMA completion record -> MSI-X or IMS)
    function.py       a PF or VF: config space + BAR0 (engine, IMS, MSI-X table, PBA)
    sriov_device.py   SriovDevice: PF + VFs, ``handle_tlp(tlp) -> list[Emit]``
    emit.py           Emit(tlp, origin): what a model hands its process shell

The process shell (``device.process``) feeds decoded TLPs in and sends what
comes out, in list order.
"""
