"""The real host shell, fabric model and device model joined in memory: boot, enumeration,
MSI-X through the IR unit, and the workload, with no sockets and no processes."""

from __future__ import annotations

import asyncio

import pytest

from device.sriov_device import SriovDevice
from fabric.bus import Platform
from host.process import Host
from tests.inproc import MemDevice, MemNet

HOST_CFG = {"cpus": 2, "memory_mib": 8, "ir": True, "ir_entries": 256, "sriov": {"1": 2}}


async def boot(platform=None, cfg=None):
    net = MemNet(platform or Platform(max_bus=2))
    dport = net.port("d0", "device", (1, 1))
    await dport.connect()
    MemDevice(dport, SriovDevice(total_vfs=4))
    hport = net.port("host", "host")
    await hport.connect()
    host = Host({**HOST_CFG, **(cfg or {})}, hport)
    hport.on_message = host.on_message
    summary = await host.boot()
    await hport.reg("faults.drain", {})  # a REG round trip: everything the host sent before is applied
    return net, host, summary


async def test_boot_enumerates_pf_and_vfs_and_builds_the_hierarchy():
    net, host, summary = await boot()
    assert summary["functions"] == ["01:00.0", "01:00.1", "01:00.2"]
    assert "bare metal" in summary["cpuid"]
    domains = host.kernel.domain_hierarchy()
    assert "INTEL-IR-0" in domains and "IR-PCI-MSIX-0000:01:00.2" in domains
    # three IRTEs, one per function, each source-checked against its own RID
    irt = net.fabric.ir.table
    assert len(irt) == 3
    sids = sorted(net.fabric.ir.irte(i).sid for i in irt)
    assert sids == [0x100, 0x101, 0x102]


async def test_workload_delivers_every_interrupt_after_its_record():
    net, host, _ = await boot()
    res = await host.op_workload_run({"per_function": 200, "inflight": 4, "timeout_s": 30})
    assert not res["timed_out"]
    for name, f in res["functions"].items():
        assert f["completed"] == 200 and f["interrupts"] == 200 and f["record_missing"] == 0, (name, f)
    assert res["os"]["breaches"] == 0
    assert net.fabric.irqs_delivered == 600


async def test_without_ir_the_device_stores_compatibility_messages():
    net, host, _ = await boot(Platform(ir=False, max_bus=2), {"ir": False})
    assert host.kernel.ir is None
    assert "INTEL-IR" not in host.kernel.domain_hierarchy()
    res = await host.op_workload_run({"per_function": 50, "inflight": 2, "timeout_s": 30})
    assert all(f["interrupts"] == 50 for f in res["functions"].values())
    assert net.fabric.ir.table == {}


async def test_affinity_change_rewrites_the_irte_not_the_device_entry():
    net, host, _ = await boot()
    k = host.kernel
    inst = next(i for i in host.engines() if i.dev.rid == 0x100)
    entry = k.irq.irq_get_irq_data(inst.irq).chip_data
    before_msg = entry.msg
    index = before_msg.address_lo >> 5 & 0x7FFF
    old_dest = net.fabric.ir.irte(index).dest_id
    target = 1 if (old_dest >> 8) == 0 else 0
    k.irq.irq_set_affinity(inst.irq, target)
    await host.port.reg("faults.drain", {})   # barrier: the IRTE write has reached the IR unit
    assert entry.msg == before_msg                     # the device's MSI-X entry is untouched
    assert net.fabric.ir.irte(index).apic_dest(False) == target
    res = await host.op_workload_run({"per_function": 20, "inflight": 1, "timeout_s": 30})
    assert res["functions"]["pf 01:00.0"]["interrupts"] == 20
    irq_desc = k.irq.irq_to_desc(inst.irq)
    assert irq_desc.count(target) == 20


async def test_without_ir_affinity_change_rewrites_the_device_entry():
    net, host, _ = await boot(Platform(ir=False, max_bus=2), {"ir": False})
    k = host.kernel
    inst = host.engines()[0]
    entry = k.irq.irq_get_irq_data(inst.irq).chip_data
    dest_before = entry.msg.address_lo >> 12 & 0xFF
    target = 1 - dest_before
    k.irq.irq_set_affinity(inst.irq, target)
    assert entry.msg.address_lo >> 12 & 0xFF == target     # compat format: the message itself moved
    res = await host.op_workload_run({"per_function": 20, "inflight": 1, "timeout_s": 30})
    assert res["functions"][inst.name]["interrupts"] == 20
    assert k.irq.irq_to_desc(inst.irq).count(target) == 20


async def test_paced_workload_rings_at_the_rate_and_never_exceeds_inflight():
    net, host, _ = await boot()
    res = await host.op_workload_run({"per_function": 50, "inflight": 2, "rate": 2000, "timeout_s": 30})
    assert not res["timed_out"]
    for f in res["functions"].values():
        assert f["completed"] == 50 and f["interrupts"] == 50
        # 50 doorbells at 2000/s take at least 49 intervals of 0.5 ms
        assert f["rate_per_s"] is not None and f["rate_per_s"] <= 2000 * 1.05, f
    wl = host.workload
    assert all(r.issued == 50 for r in wl.runs)
