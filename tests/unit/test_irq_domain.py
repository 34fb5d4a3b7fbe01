"""The irq-domain framework, driven through fake ops and chips (Linux kernel/irq/irq_test.c)."""

import pytest

from guest.irq.domain import (
    BusyError,
    DomainBusToken,
    DomainCreationError,
    InvalidIrqError,
    IrqAllocInfo,
    IrqChip,
    IrqDomain,
    IrqDomainFlags,
    IrqDomainOps,
    IrqError,
    IrqSetMask,
    IrqTable,
    MsiMsg,
    NoSpaceError,
    NotSupportedError,
    irq_chip_ack_parent,
    irq_chip_compose_msi_msg,
    irq_chip_mask_parent,
    irq_chip_set_affinity_parent,
    irq_chip_unmask_parent,
    irq_chip_write_msi_msg,
    irq_domain_activate_irq,
    irq_domain_alloc_irqs,
    irq_domain_alloc_irqs_parent,
    irq_domain_deactivate_irq,
    irq_domain_free_irqs,
    irq_domain_free_irqs_common,
    irq_domain_free_irqs_parent,
    irq_domain_get_irq_data,
    irq_domain_remove,
    irq_domain_set_hwirq_and_chip,
    irq_find_mapping,
)
from guest.irq.vector import VectorDomain, irqd_cfg

# ------------------------------------------------------------------ fakes


class FakeChip(IrqChip):
    """A chip that only records what the core asks of it."""

    def __init__(self, name, log):
        super().__init__(name)
        self.log = log

    def irq_mask(self, d):
        self.log.append(("mask", self.name, d.irq))

    def irq_unmask(self, d):
        self.log.append(("unmask", self.name, d.irq))

    def irq_ack(self, d):
        self.log.append(("ack", self.name, d.irq))


class FakeOps(IrqDomainOps):
    """Allocates from the parent, then sets hwirq = index from the table start."""

    def __init__(self, log, fail_alloc=False, fail_activate=False, set_chip=True):
        self.log = log
        self.fail_alloc = fail_alloc
        self.fail_activate = fail_activate
        self.set_chip = set_chip

    def alloc(self, domain, virq, nr, arg):
        if domain.parent is not None:
            irq_domain_alloc_irqs_parent(domain, virq, nr, arg)
        if self.fail_alloc:
            irq_domain_free_irqs_parent(domain, virq, nr)  # undo our part, as Linux ops do
            raise NoSpaceError(f"{domain.name}: full")
        for irq in range(virq, virq + nr):
            if self.set_chip:
                irq_domain_set_hwirq_and_chip(domain, irq, irq - domain.table.first_irq,
                                              FakeChip(domain.name, self.log))
        self.log.append(("alloc", domain.name, virq, nr))

    def free(self, domain, virq, nr):
        self.log.append(("free", domain.name, virq, nr))
        irq_domain_free_irqs_common(domain, virq, nr)

    def activate(self, domain, d):
        self.log.append(("activate", domain.name, d.irq))
        if self.fail_activate:
            raise IrqError(f"{domain.name}: cannot activate")

    def deactivate(self, domain, d):
        self.log.append(("deactivate", domain.name, d.irq))


def build(log, table=None, **leaf_kw):
    """root <- mid <- leaf, all with FakeOps; leaf_kw/mid_kw configure failures."""
    table = table or IrqTable()
    mid_kw = leaf_kw.pop("mid_kw", {})
    root = IrqDomain("root", FakeOps(log), table=table)
    mid = IrqDomain("mid", FakeOps(log, **mid_kw), parent=root)
    leaf = IrqDomain("leaf", FakeOps(log, **leaf_kw), parent=mid)
    return table, root, mid, leaf


@pytest.fixture
def log():
    return []


# ------------------------------------------------------- alloc and free


def test_alloc_builds_one_level_per_domain(log):
    table, root, mid, leaf = build(log)
    virq = irq_domain_alloc_irqs(leaf, 2)
    assert virq == table.first_irq == 24
    assert log == [("alloc", "root", 24, 2), ("alloc", "mid", 24, 2), ("alloc", "leaf", 24, 2)]
    desc = table.irq_to_desc(25)
    assert [d.domain for d in desc.irq_data.levels()] == [leaf, mid, root]
    assert all(d.irq == 25 and d.hwirq == 1 and d.desc is desc for d in desc.irq_data.levels())
    assert desc.masked and not desc.activated and desc.name == "edge"
    assert irq_domain_get_irq_data(mid, 25) is desc.irq_data.parent_data
    assert irq_find_mapping(root, 1) == irq_find_mapping(leaf, 1) == 25
    assert (root.mapcount, mid.mapcount, leaf.mapcount) == (2, 2, 2)


def test_alloc_is_contiguous_and_reuses_freed_numbers(log):
    table, root, mid, leaf = build(log)
    a = irq_domain_alloc_irqs(leaf, 1)
    b = irq_domain_alloc_irqs(leaf, 3)
    assert (a, b) == (24, 25)
    irq_domain_free_irqs(leaf, a, 1)
    assert irq_domain_alloc_irqs(leaf, 2) == 28  # the 1-wide hole at 24 is too small
    assert irq_domain_alloc_irqs(leaf, 1) == 24


def test_alloc_failure_leaves_nothing_behind(log):
    table, root, mid, leaf = build(log, fail_alloc=True)
    with pytest.raises(NoSpaceError, match="leaf: full"):
        irq_domain_alloc_irqs(leaf, 2)
    assert table.descs == {}
    assert root.revmap == mid.revmap == leaf.revmap == {}
    # the failing leaf released what its parents had allocated, per irq, parent chained
    assert ("free", "mid", 24, 1) in log and ("free", "root", 25, 1) in log


def test_alloc_failure_in_the_middle(log):
    table, root, mid, leaf = build(log, mid_kw={"fail_alloc": True})
    with pytest.raises(NoSpaceError, match="mid: full"):
        irq_domain_alloc_irqs(leaf, 1)
    assert table.descs == {} and ("free", "root", 24, 1) in log


def test_alloc_that_sets_no_chip_is_reported_and_unwound(log):
    table, root, mid, leaf = build(log, set_chip=False)
    with pytest.raises(IrqError, match="'leaf' set no chip for irq 24"):
        irq_domain_alloc_irqs(leaf, 1)
    assert table.descs == {}
    assert log[-3:] == [("free", "leaf", 24, 1), ("free", "mid", 24, 1), ("free", "root", 24, 1)]


def test_alloc_zero_irqs_is_invalid(log):
    _, _, _, leaf = build(log)
    with pytest.raises(InvalidIrqError):
        irq_domain_alloc_irqs(leaf, 0)


def test_root_has_no_parent_to_allocate_from(log):
    _, root, _, _ = build(log)
    with pytest.raises(NotSupportedError, match="no parent"):
        irq_domain_alloc_irqs_parent(root, 24, 1, None)


def test_descriptor_exhaustion():
    log = []
    table, _, _, leaf = build(log, table=IrqTable(nr_irqs=30, first_irq=24))
    assert irq_domain_alloc_irqs(leaf, 6) == 24
    with pytest.raises(NoSpaceError, match="nr_irqs=30"):
        irq_domain_alloc_irqs(leaf, 1)


def test_free_irqs_calls_free_per_irq_outermost_first_and_clears_maps(log):
    table, root, mid, leaf = build(log)
    virq = irq_domain_alloc_irqs(leaf, 2)
    log.clear()
    irq_domain_free_irqs(leaf, virq, 2)
    assert log == [("free", "leaf", 24, 1), ("free", "mid", 24, 1), ("free", "root", 24, 1),
                   ("free", "leaf", 25, 1), ("free", "mid", 25, 1), ("free", "root", 25, 1)]
    assert table.descs == {} and root.revmap == mid.revmap == leaf.revmap == {}


def test_free_irqs_checks_owner_and_handlers(log):
    table, root, mid, leaf = build(log)
    virq = irq_domain_alloc_irqs(leaf, 1)
    with pytest.raises(InvalidIrqError, match="not allocated from domain 'mid'"):
        irq_domain_free_irqs(mid, virq, 1)
    table.request_irq(virq, lambda irq, cpu: None, "dev")
    with pytest.raises(BusyError, match=r"\['dev'\]; free_irq first"):
        irq_domain_free_irqs(leaf, virq, 1)
    table.free_irq(virq)
    irq_domain_free_irqs(leaf, virq, 1)


def test_free_deactivates_an_active_irq(log):
    table, root, mid, leaf = build(log)
    virq = irq_domain_alloc_irqs(leaf, 1)
    irq_domain_activate_irq(table.irq_get_irq_data(virq))
    log.clear()
    irq_domain_free_irqs(leaf, virq, 1)
    assert [e[:2] for e in log[:3]] == [("deactivate", "leaf"), ("deactivate", "mid"),
                                        ("deactivate", "root")]


def test_set_hwirq_checks_size_and_collisions(log):
    table = IrqTable()
    root = IrqDomain("root", FakeOps(log), size=4, table=table)
    virq = irq_domain_alloc_irqs(root, 1)  # hwirq 0
    with pytest.raises(InvalidIrqError, match="out of range"):
        irq_domain_set_hwirq_and_chip(root, virq, 4, FakeChip("x", log))
    other = irq_domain_alloc_irqs(root, 1)
    with pytest.raises(BusyError, match="already mapped to irq 24"):
        irq_domain_set_hwirq_and_chip(root, other, 0, FakeChip("x", log))
    with pytest.raises(InvalidIrqError, match="no level"):
        irq_domain_set_hwirq_and_chip(root, 99, 1, FakeChip("x", log))


# ----------------------------------------------- activate / deactivate


def test_activation_is_parent_first_and_deactivation_child_first(log):
    table, root, mid, leaf = build(log)
    virq = irq_domain_alloc_irqs(leaf, 1)
    data = table.irq_get_irq_data(virq)
    log.clear()
    irq_domain_activate_irq(data)
    irq_domain_activate_irq(data)  # already active: no second round
    assert log == [("activate", "root", 24), ("activate", "mid", 24), ("activate", "leaf", 24)]
    assert table.irq_to_desc(virq).activated
    log.clear()
    irq_domain_deactivate_irq(data)
    irq_domain_deactivate_irq(data)
    assert log == [("deactivate", "leaf", 24), ("deactivate", "mid", 24),
                   ("deactivate", "root", 24)]
    assert not table.irq_to_desc(virq).activated


@pytest.mark.parametrize("failing, expected", [
    ("leaf", [("activate", "root", 24), ("activate", "mid", 24), ("activate", "leaf", 24),
              ("deactivate", "mid", 24), ("deactivate", "root", 24)]),
    ("mid", [("activate", "root", 24), ("activate", "mid", 24), ("deactivate", "root", 24)]),
])
def test_activation_failure_unwinds_levels_below(log, failing, expected):
    kw = {"fail_activate": True} if failing == "leaf" else {"mid_kw": {"fail_activate": True}}
    table, root, mid, leaf = build(log, **kw)
    virq = irq_domain_alloc_irqs(leaf, 1)
    log.clear()
    with pytest.raises(IrqError, match=f"{failing}: cannot activate"):
        table.request_irq(virq, lambda irq, cpu: None, "dev")
    assert log == expected
    desc = table.irq_to_desc(virq)
    assert not desc.activated and desc.masked and desc.actions == []


# -------------------------------------------- request / handle / free


def test_request_handle_free(log):
    table, root, mid, leaf = build(log)
    virq = irq_domain_alloc_irqs(leaf, 1)
    calls = []
    log.clear()
    table.request_irq(virq, lambda irq, cpu: calls.append((irq, cpu)), "dev")
    desc = table.irq_to_desc(virq)
    assert desc.activated and not desc.masked
    assert log[-1] == ("unmask", "leaf", 24)
    assert table.handle_irq(virq, 1) and table.handle_irq(virq, 1) and table.handle_irq(virq, 0)
    assert calls == [(24, 1), (24, 1), (24, 0)]
    assert (desc.count(0), desc.count(1), desc.total) == (1, 2, 3)
    assert log.count(("ack", "leaf", 24)) == 3
    log.clear()
    table.free_irq(virq, "dev")
    assert log == [("mask", "leaf", 24), ("deactivate", "leaf", 24), ("deactivate", "mid", 24),
                   ("deactivate", "root", 24)]
    assert desc.masked and not desc.activated


def test_interrupt_without_handler_is_pending_not_counted(log):
    table, _, _, leaf = build(log)
    virq = irq_domain_alloc_irqs(leaf, 1)
    assert table.handle_irq(virq, 0) is False
    desc = table.irq_to_desc(virq)
    assert desc.pending and desc.total == 0
    with pytest.raises(InvalidIrqError, match="irq 99 is not allocated"):
        table.handle_irq(99, 0)


def test_shared_and_exclusive_handlers(log):
    table, _, _, leaf = build(log)
    virq = irq_domain_alloc_irqs(leaf, 1)
    seen = []
    table.request_irq(virq, lambda i, c: seen.append("a"), "a", shared=True)
    with pytest.raises(BusyError, match="not shared"):
        table.request_irq(virq, lambda i, c: seen.append("x"), "x")
    table.request_irq(virq, lambda i, c: seen.append("b"), "b", shared=True)
    table.handle_irq(virq, 0)
    assert seen == ["a", "b"]
    with pytest.raises(InvalidIrqError, match="no single handler"):
        table.free_irq(virq)
    table.free_irq(virq, "a")
    assert table.irq_to_desc(virq).activated  # "b" still holds it
    with pytest.raises(InvalidIrqError):
        table.free_irq(virq, "a")


def test_mask_unmask_go_to_the_outermost_chip(log):
    table, _, _, leaf = build(log)
    virq = irq_domain_alloc_irqs(leaf, 1)
    table.unmask_irq(virq)
    table.mask_irq(virq)
    assert log[-2:] == [("unmask", "leaf", 24), ("mask", "leaf", 24)]
    assert table.irq_to_desc(virq).masked


def test_bus_lock_brackets_slow_bus_updates(log):
    class BusChip(FakeChip):
        def irq_bus_lock(self, d):
            self.log.append(("lock", d.irq))

        def irq_bus_sync_unlock(self, d):
            self.log.append(("sync", d.irq))

    class BusOps(FakeOps):
        def alloc(self, domain, virq, nr, arg):
            irq_domain_alloc_irqs_parent(domain, virq, nr, arg)
            irq_domain_set_hwirq_and_chip(domain, virq, 0, BusChip("ims", self.log))

    table = IrqTable()
    root = IrqDomain("root", FakeOps(log), table=table)
    ims = IrqDomain("ims", BusOps(log), parent=root)
    virq = irq_domain_alloc_irqs(ims, 1)
    log.clear()
    table.request_irq(virq, lambda i, c: None, "q0")
    assert log[0] == ("lock", 24) and log[-1] == ("sync", 24)
    assert ("unmask", "ims", 24) in log


# ------------------------------------------------------- chip helpers


class ComposeChip(IrqChip):
    def __init__(self, name, msg):
        super().__init__(name)
        self.msg = msg

    def irq_compose_msi_msg(self, d):
        return self.msg


def test_compose_walks_to_first_chip_that_composes(log):
    table, root, mid, leaf = build(log)
    virq = irq_domain_alloc_irqs(leaf, 1)
    data = table.irq_get_irq_data(virq)
    with pytest.raises(NotSupportedError, match="no chip composes"):
        irq_chip_compose_msi_msg(data)
    msg = MsiMsg(0xFEE00000, 0, 0x41)
    data.parent_data.chip = ComposeChip("passes", None)   # None: "ask my parent"
    data.parent_data.parent_data.chip = ComposeChip("root", msg)
    assert irq_chip_compose_msi_msg(data) is msg
    data.parent_data.chip = ComposeChip("mid", MsiMsg(0xFEE00010, 0, 7))
    assert irq_chip_compose_msi_msg(data).address_lo == 0xFEE00010
    with pytest.raises(NotSupportedError, match="cannot store"):
        irq_chip_write_msi_msg(data, msg)


def test_parent_helpers_forward_one_level(log):
    table, root, mid, leaf = build(log)
    virq = irq_domain_alloc_irqs(leaf, 1)
    data = table.irq_get_irq_data(virq)
    irq_chip_ack_parent(data)
    irq_chip_mask_parent(data)
    irq_chip_unmask_parent(data)
    assert log[-3:] == [("ack", "mid", 24), ("mask", "mid", 24), ("unmask", "mid", 24)]
    with pytest.raises(NotSupportedError, match="has no irq_set_affinity"):
        irq_chip_set_affinity_parent(data, 1)
    root_data = data.parent_data.parent_data
    with pytest.raises(NotSupportedError):
        irq_chip_ack_parent(root_data)


def test_affinity_and_vcpu_affinity_need_a_chip_that_supports_them(log):
    table, root, mid, leaf = build(log)
    virq = irq_domain_alloc_irqs(leaf, 1)
    with pytest.raises(NotSupportedError, match="cannot set affinity"):
        table.irq_set_affinity(virq, 1)
    with pytest.raises(NotSupportedError, match="vcpu affinity"):
        table.irq_set_vcpu_affinity(virq, object())

    class PostedChip(FakeChip):
        def irq_set_vcpu_affinity(self, d, info):
            self.log.append(("vcpu", self.name, info))

    table.irq_get_irq_data(virq).parent_data.chip = PostedChip("mid", log)
    table.irq_set_vcpu_affinity(virq, "pi-desc")
    assert log[-1] == ("vcpu", "mid", "pi-desc")


# ---------------------------------------------------- domain creation


@pytest.mark.parametrize("make, reason", [
    (lambda t, r: IrqDomain("orphan", FakeOps([])), "a root domain needs table=IrqTable"),
    (lambda t, r: IrqDomain("root", FakeOps([]), table=t), "already exists"),
    (lambda t, r: IrqDomain("x", object(), table=t), "ops must implement alloc and free"),
    (lambda t, r: IrqDomain("", FakeOps([]), table=t), "needs a name"),
    (lambda t, r: IrqDomain("x", FakeOps([]), parent=r, table=IrqTable()),
     "belongs to another IrqTable"),
    (lambda t, r: IrqDomain("x", FakeOps([]), size=-1, table=t), "size must be >= 0"),
])
def test_domain_creation_failure_is_a_clear_error(make, reason):
    table = IrqTable()
    root = IrqDomain("root", FakeOps([]), table=table)
    with pytest.raises(DomainCreationError) as exc:
        make(table, root)
    assert reason in exc.value.reason
    assert str(exc.value).startswith("cannot create irq domain")
    assert exc.value.errno != 0 and isinstance(exc.value, IrqError)
    assert table.domains == [root]


def test_domain_remove(log):
    table, root, mid, leaf = build(log)
    virq = irq_domain_alloc_irqs(leaf, 1)
    with pytest.raises(BusyError, match="child domains"):
        irq_domain_remove(mid)
    with pytest.raises(BusyError, match="still maps 1 irq"):
        irq_domain_remove(leaf)
    irq_domain_free_irqs(leaf, virq, 1)
    irq_domain_remove(leaf)
    assert table.domains == [root, mid]
    with pytest.raises(DomainCreationError, match="has been removed"):
        IrqDomain("late", FakeOps(log), parent=leaf)
    IrqDomain("leaf", FakeOps(log), parent=mid)  # the name is free again


# ------------------------------------------- two levels: VECTOR + MSI-X


class RecordingMsixChip(IrqChip):
    """A PCI-MSIX-like device chip: stores messages in a fake MSI-X table."""

    def __init__(self, name):
        super().__init__(name)
        self.writes = []
        self.masked = set()

    def irq_write_msi_msg(self, d, msg):
        self.writes.append((d.hwirq, msg))

    def irq_mask(self, d):
        self.masked.add(d.hwirq)

    def irq_unmask(self, d):
        self.masked.discard(d.hwirq)

    def irq_ack(self, d):
        irq_chip_ack_parent(d)

    def irq_set_affinity(self, d, cpu):  # msi_domain_set_affinity
        ret = irq_chip_set_affinity_parent(d, cpu)
        if ret is IrqSetMask.OK:
            irq_chip_write_msi_msg(d, irq_chip_compose_msi_msg(d))
        return ret


class MsixOps(IrqDomainOps):
    def alloc(self, domain, virq, nr, arg):
        irq_domain_alloc_irqs_parent(domain, virq, nr, arg)
        for i in range(nr):
            irq_domain_set_hwirq_and_chip(domain, virq + i, arg.hwirq + i, domain.host_data)

    def free(self, domain, virq, nr):
        irq_domain_free_irqs_common(domain, virq, nr)

    def activate(self, domain, d):  # msi_domain_activate: compose from parents, store
        irq_chip_write_msi_msg(d, irq_chip_compose_msi_msg(d))

    def deactivate(self, domain, d):
        irq_chip_write_msi_msg(d, MsiMsg(0, 0, 0))


@pytest.fixture
def two_level():
    table = IrqTable()
    vector = VectorDomain(table, cpu_to_apicid=[0, 2])
    chip = RecordingMsixChip("PCI-MSIX-0000:00:03.0")
    msix = IrqDomain("PCI-MSIX-0000:00:03.0", MsixOps(), parent=vector, size=2048,
                     bus_token=DomainBusToken.PCI_DEVICE_MSIX, flags=IrqDomainFlags.MSI_DEVICE,
                     host_data=chip)
    return table, vector, msix, chip


def test_two_level_compose_store_use(two_level):
    table, vector, msix, chip = two_level
    virq = irq_domain_alloc_irqs(msix, 3, IrqAllocInfo(hwirq=0))
    cfgs = [irqd_cfg(table.irq_get_irq_data(virq + i)) for i in range(3)]
    assert [(c.cpu, c.vector, c.dest_apicid) for c in cfgs] == [(0, 0x21, 0), (1, 0x21, 2),
                                                               (0, 0x22, 0)]
    assert chip.writes == []  # allocated, not yet activated
    got = []
    table.request_irq(virq + 1, lambda irq, cpu: got.append((irq, cpu)), "eth0-rx")
    assert chip.writes == [(1, MsiMsg(0xFEE02000, 0, 0x21))]  # from the APIC chip's compose
    assert chip.masked == set()
    assert vector.handle_vector(1, 0x21) and got == [(virq + 1, 1)]
    assert not vector.handle_vector(1, 0x99) and vector.spurious == 1

    # Move to CPU 0: the vector changes, the device entry is rewritten.
    assert table.irq_set_affinity(virq + 1, 0) is IrqSetMask.OK
    assert chip.writes[-1] == (1, MsiMsg(0xFEE00000, 0, 0x23))
    assert not vector.matrix.is_allocated(1, 0x21)
    assert vector.irq_for_vector(0, 0x23) == virq + 1 and vector.irq_for_vector(1, 0x21) is None
    assert vector.handle_vector(0, 0x23)
    assert table.irq_to_desc(virq + 1).kstat == {1: 1, 0: 1}

    table.free_irq(virq + 1)
    assert chip.writes[-1] == (1, MsiMsg(0, 0, 0)) and chip.masked == {1}
    irq_domain_free_irqs(msix, virq, 3)
    assert vector.matrix.allocated(0) == vector.matrix.allocated(1) == 0
    assert vector.vector_irq == [{}, {}]
    assert table.descs == {} and msix.revmap == {} and vector.revmap == {}


def test_two_level_vector_exhaustion_propagates(two_level):
    table, vector, msix, chip = two_level
    per_cpu = len(vector.matrix.usable)
    irq_domain_alloc_irqs(msix, 2 * per_cpu - 1, IrqAllocInfo(hwirq=0))
    with pytest.raises(NoSpaceError, match="device vectors in use"):
        irq_domain_alloc_irqs(msix, 2, IrqAllocInfo(hwirq=2000))
    assert vector.matrix.allocated(0) + vector.matrix.allocated(1) == 2 * per_cpu - 1
    assert len(table.descs) == 2 * per_cpu - 1


# ------------------------------------------------------ text views


def test_proc_interrupts_exact_text():
    table = IrqTable(nr_irqs=1024, first_irq=45)
    vector = VectorDomain(table, cpu_to_apicid=[0, 1])
    chip = RecordingMsixChip("IR-PCI-MSIX-0000:00:14.0")
    msix = IrqDomain("msix", MsixOps(), parent=vector, host_data=chip)
    usb = irq_domain_alloc_irqs(msix, 1, IrqAllocInfo(hwirq=0))
    table.request_irq(usb, lambda i, c: None, "xhci_hcd")
    for _ in range(1234):
        table.handle_irq(usb, 1)
    timer = irq_domain_alloc_irqs(vector, 1)       # a bare vector-level irq (chip APIC)
    table.request_irq(timer, lambda i, c: None, "timer")
    for _ in range(7):
        table.handle_irq(timer, 0)
    irq_domain_alloc_irqs(vector, 1)                # no handler, no count: hidden
    gone = irq_domain_alloc_irqs(msix, 1, IrqAllocInfo(hwirq=5))
    table.request_irq(gone, lambda i, c: None, "old")
    table.handle_irq(gone, 0)
    table.free_irq(gone)                            # counts but no handler: still shown
    shared = irq_domain_alloc_irqs(msix, 1, IrqAllocInfo(hwirq=12))
    table.request_irq(shared, lambda i, c: None, "a", shared=True)
    table.request_irq(shared, lambda i, c: None, "b", shared=True)

    assert table.proc_interrupts(2) == (
        "            CPU0       CPU1       \n"
        "  45:          0       1234  IR-PCI-MSIX-0000:00:14.0    0-edge      xhci_hcd\n"
        "  46:          7          0      APIC   46-edge      timer\n"
        "  48:          1          0  IR-PCI-MSIX-0000:00:14.0    5-edge    \n"
        "  49:          0          0  IR-PCI-MSIX-0000:00:14.0   12-edge      a, b\n"
    )


def test_proc_interrupts_column_width_follows_nr_irqs():
    table = IrqTable(nr_irqs=100, first_irq=9)
    vector = VectorDomain(table, cpu_to_apicid=[0])
    virq = irq_domain_alloc_irqs(vector, 1)
    table.request_irq(virq, lambda i, c: None, "x")
    assert table.proc_interrupts(1) == (
        "           CPU0       \n"
        "  9:          0      APIC   9-edge      x\n"
    )


def test_domain_hierarchy_text(two_level):
    table, vector, msix, chip = two_level
    IrqDomain("PCI-MSIX-0000:00:04.0", MsixOps(), parent=vector, size=64,
              bus_token=DomainBusToken.PCI_DEVICE_MSIX, host_data=chip)
    irq_domain_alloc_irqs(msix, 2, IrqAllocInfo(hwirq=0))
    assert table.domain_hierarchy() == (
        "VECTOR: size=0 mapped=2 bus=DOMAIN_BUS_ANY flags=HIERARCHY|MSI_PARENT parent=-\n"
        "  PCI-MSIX-0000:00:03.0: size=2048 mapped=2 bus=DOMAIN_BUS_PCI_DEVICE_MSIX "
        "flags=HIERARCHY|MSI_DEVICE parent=VECTOR\n"
        "  PCI-MSIX-0000:00:04.0: size=64 mapped=0 bus=DOMAIN_BUS_PCI_DEVICE_MSIX "
        "flags=HIERARCHY parent=VECTOR\n"
    )
