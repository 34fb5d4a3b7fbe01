"""Hierarchical irq domains, irq descriptors and /proc/interrupts (Linux kernel/irq).

Theory of operation
===================

An interrupt that a device raises passes through a stack of *domains*, each a
translation layer that owns one piece of hardware state (reference digest §8)::

    VECTOR (CPU vector + APIC id)           root: composes compatibility MSIs
      └─ INTEL-IR-0 (IRTE index)            composes remappable MSIs, writes IRTEs
           └─ IR-PCI-MSIX-0000:00:14.0      stores the message in the device
               (MSI-X index)

A Linux virq ("irq" below) is the name the OS gives one such interrupt. For
each virq, every domain on the path from the allocating (outermost) domain to
the root holds one ``IrqData`` level: ``(domain, hwirq, chip, chip_data)``.
The levels are chained child -> parent through ``parent_data``; the
descriptor ``IrqDesc`` points at the outermost level (``desc.irq_data``), the
one /proc/interrupts shows.

Rule 1 (allocation goes top-down, work bottom-up). ``irq_domain_alloc_irqs``
allocates descriptors and the empty ``IrqData`` chain, then calls the
outermost domain's ``ops.alloc``. That domain first calls
``irq_domain_alloc_irqs_parent`` (so the vector exists before the IRTE that
names it) and then fills its own level with ``irq_domain_set_hwirq_and_chip``.
An ``alloc`` that fails must undo what it did, including its parent's
allocation (``irq_domain_free_irqs_parent``), and raise; the core then frees
the descriptors. ``ops.free`` is called per virq, outermost domain only, and
must free its parent the same way (``irq_domain_free_irqs_common`` does).

Rule 2 (activation is parent first, deactivation child first).
``irq_domain_activate_irq`` activates the root level first (the vector is
live), then each child (the IRTE is written, then the device's MSI-X entry).
If a level's ``activate`` raises, the levels below it that were already
activated are deactivated and the error propagates: nothing is left half on.

Rule 3 (chips delegate up). A chip callback that a level does not implement
is ``None`` (a NULL in Linux's ``struct irq_chip``). Helpers such as
``irq_chip_compose_msi_msg`` walk ``parent_data`` to the first level whose
chip implements the callback; ``irq_chip_ack_parent`` & co. forward one level.

Rule 4 (no global state). Descriptors and domains live in an ``IrqTable``,
one per OS instance (the host and every guest own one). Hardware side effects
(IRTE writes, MSI-X table writes) are done by chips/ops through interfaces
injected when the domain is built, so every layer can be tested with fakes.

Errors are the ``IrqError`` hierarchy; each carries the errno Linux would
return. Domain creation failure (``DomainCreationError``) is a result callers
are expected to handle ("IMS domain creation fails with a clear error").
"""

from __future__ import annotations

import errno as _errno
import enum
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# ------------------------------------------------------------------- errors


class IrqError(Exception):
    """Base of all irq-framework errors; ``errno`` is what Linux would return."""

    errno: int = _errno.EINVAL


class InvalidIrqError(IrqError):
    """Unknown irq, bad argument, or an operation the irq's state forbids (EINVAL)."""

    errno = _errno.EINVAL


class NoSpaceError(IrqError):
    """Exhausted resource: descriptors, CPU vectors, IRTEs, MSI-X/IMS entries (ENOSPC)."""

    errno = _errno.ENOSPC


class BusyError(IrqError):
    """The irq or hwirq is in use: requested, still mapped, domain has users (EBUSY)."""

    errno = _errno.EBUSY


class NotSupportedError(IrqError):
    """No level of the hierarchy implements the operation (ENOSYS)."""

    errno = _errno.ENOSYS


class DomainCreationError(IrqError):
    """An irq domain could not be created; ``reason`` says why in plain words."""

    errno = _errno.ENODEV

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"cannot create irq domain {name!r}: {reason}")
        self.name = name
        self.reason = reason


# ----------------------------------------------------------- value types


@dataclass(frozen=True)
class MsiMsg:
    """An MSI address/data pair (Linux ``struct msi_msg``); see digest §1 and §2."""

    address_lo: int
    address_hi: int
    data: int

    @property
    def address(self) -> int:
        return (self.address_hi << 32) | self.address_lo

    def __str__(self) -> str:
        return (f"MsiMsg(addr={self.address_hi:08x}:{self.address_lo:08x} "
                f"data={self.data:08x})")


class DomainBusToken(enum.Enum):
    """What a domain serves (Linux ``enum irq_domain_bus_token``, printed as DOMAIN_BUS_*)."""

    ANY = enum.auto()
    WIRED = enum.auto()
    GENERIC_MSI = enum.auto()
    PCI_MSI = enum.auto()
    NEXUS = enum.auto()
    IPI = enum.auto()
    PCI_DEVICE_MSI = enum.auto()
    PCI_DEVICE_MSIX = enum.auto()
    DMAR = enum.auto()
    PCI_DEVICE_IMS = enum.auto()
    HCALL = enum.auto()  # irqlab: hypercall-composing guest domain, no Linux equivalent

    def __str__(self) -> str:
        return f"DOMAIN_BUS_{self.name}"


class IrqDomainFlags(enum.Flag):
    """Linux ``IRQ_DOMAIN_FLAG_*`` that the model uses."""

    NONE = 0
    HIERARCHY = enum.auto()
    MSI = enum.auto()
    MSI_PARENT = enum.auto()
    MSI_DEVICE = enum.auto()
    ISOLATED_MSI = enum.auto()


class IrqSetMask(enum.Enum):
    """Return of ``irq_set_affinity`` callbacks (Linux ``IRQ_SET_MASK_OK*``)."""

    OK = 0          # done; MSI-type children must re-compose and re-write the message
    OK_NOCOPY = 1   # done, effective affinity already updated by the chip
    OK_DONE = 2     # done and nothing to propagate (IR: the IRTE changed, not the message)


@dataclass
class IrqAllocInfo:
    """Allocation argument passed unchanged through the hierarchy.

    Mirrors x86 ``struct irq_alloc_info`` / ``msi_alloc_info_t``. Every layer
    reads what it needs and ignores the rest; ``extra`` holds layer-private
    items (for example the IR layer's source-id or PASID). Domains must accept
    any object as ``arg`` and read it with ``getattr`` defaults.
    """

    cpu: int | None = None        # requested target CPU; None = least loaded
    dev: Any = None               # the device (PCI function, ADI) the irqs belong to
    hwirq: int | None = None      # first bus-level index (MSI-X entry, IMS slot)
    flags: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------- chips and ops


class IrqChip:
    """Hardware interrupt-chip callbacks (Linux ``struct irq_chip``).

    A callback a chip does not implement stays ``None``; the core and the
    ``*_parent`` helpers test for that, exactly like a NULL pointer in Linux.
    Subclasses define the ones they have as methods::

        irq_mask(irq_data)                     mask at the source
        irq_unmask(irq_data)
        irq_ack(irq_data)                      edge flow: ack before the handler
        irq_compose_msi_msg(irq_data) -> MsiMsg | None
                                               None = nothing to add here, ask the parent
        irq_write_msi_msg(irq_data, msg)       store the message (MSI-X table, IMS slot)
        irq_set_affinity(irq_data, cpu) -> IrqSetMask
        irq_set_vcpu_affinity(irq_data, vcpu_info)   posted interrupts
        irq_bus_lock(irq_data) / irq_bus_sync_unlock(irq_data)
                                               bracket slow-bus updates (IMS in memory)

    Per-irq state is in ``irq_data.chip_data``; per-domain state in
    ``irq_data.domain.host_data``.
    """

    name: str = ""
    irq_mask: Callable[[IrqData], None] | None = None
    irq_unmask: Callable[[IrqData], None] | None = None
    irq_ack: Callable[[IrqData], None] | None = None
    irq_compose_msi_msg: Callable[[IrqData], MsiMsg | None] | None = None
    irq_write_msi_msg: Callable[[IrqData, MsiMsg], None] | None = None
    irq_set_affinity: Callable[[IrqData, int], IrqSetMask] | None = None
    irq_set_vcpu_affinity: Callable[[IrqData, Any], None] | None = None
    irq_bus_lock: Callable[[IrqData], None] | None = None
    irq_bus_sync_unlock: Callable[[IrqData], None] | None = None

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class IrqDomainOps:
    """Domain callbacks (Linux ``struct irq_domain_ops``, hierarchy part).

    ``alloc(domain, virq, nr, arg)``: set up ``nr`` levels starting at ``virq``
    (usually: allocate from the parent, then ``irq_domain_set_hwirq_and_chip``);
    raise an ``IrqError`` after undoing partial work.
    ``free(domain, virq, nr)``: release them, then free the parent's.
    ``activate(domain, irq_data)`` / ``deactivate(domain, irq_data)``:
    optional (``None``): program / clear the hardware for one level.
    """

    def alloc(self, domain: IrqDomain, virq: int, nr: int, arg: Any) -> None:
        raise NotImplementedError

    def free(self, domain: IrqDomain, virq: int, nr: int) -> None:
        raise NotImplementedError

    activate: Callable[[IrqDomain, IrqData], None] | None = None
    deactivate: Callable[[IrqDomain, IrqData], None] | None = None


# ----------------------------------------------------- per-irq structures


@dataclass(eq=False)
class IrqData:
    """One domain's view of one virq (Linux ``struct irq_data``)."""

    domain: IrqDomain | None
    hwirq: int = 0
    chip: IrqChip | None = None
    chip_data: Any = None
    parent_data: IrqData | None = None
    irq: int = 0
    desc: IrqDesc | None = field(default=None, repr=False)

    def levels(self) -> Iterator[IrqData]:
        """This level, then each parent level down to the root."""
        data: IrqData | None = self
        while data is not None:
            yield data
            data = data.parent_data


@dataclass(frozen=True)
class IrqAction:
    """A requested handler (Linux ``struct irqaction``): called as ``handler(irq, cpu)``."""

    name: str
    handler: Callable[[int, int], object]
    shared: bool = False


@dataclass(eq=False)
class IrqDesc:
    """The per-virq descriptor (Linux ``struct irq_desc``).

    ``kstat`` holds per-CPU delivery counts; ``name`` is the flow handler's
    name ("edge": every MSI is edge-triggered). Like Linux, a fresh descriptor
    is masked and not activated. ``pending`` records an edge that arrived with
    no handler (IRQS_PENDING). ``msi_desc`` is for the bus domain (which
    MSI-X entry / IMS slot backs this irq).
    """

    irq: int
    irq_data: IrqData
    actions: list[IrqAction] = field(default_factory=list)
    kstat: dict[int, int] = field(default_factory=dict)
    name: str = "edge"
    masked: bool = True
    activated: bool = False
    pending: bool = False
    msi_desc: Any = None

    def count(self, cpu: int) -> int:
        return self.kstat.get(cpu, 0)

    @property
    def total(self) -> int:
        return sum(self.kstat.values())


# ------------------------------------------------------------------ domains


class IrqDomain:
    """A level of the interrupt hierarchy (Linux ``struct irq_domain``).

    ``IrqDomain(name, ops, parent=None, size=None, bus_token=ANY, *, table=None,
    flags=NONE, host_data=None)``. A root domain needs ``table``; a child uses
    its parent's. ``size`` bounds the hwirq space (0/None = unbounded, shown as
    0 like Linux's tree domains). ``revmap`` maps hwirq -> virq for allocated
    irqs (``irq_find_mapping``). Raises ``DomainCreationError``.
    """

    def __init__(self, name: str, ops: IrqDomainOps, parent: IrqDomain | None = None,
                 size: int | None = None, bus_token: DomainBusToken = DomainBusToken.ANY,
                 *, table: IrqTable | None = None,
                 flags: IrqDomainFlags = IrqDomainFlags.NONE, host_data: Any = None) -> None:
        if not name:
            raise DomainCreationError(name, "a domain needs a name")
        if not callable(getattr(ops, "alloc", None)) or not callable(getattr(ops, "free", None)):
            raise DomainCreationError(name, "ops must implement alloc and free")
        if size is not None and size < 0:
            raise DomainCreationError(name, f"size must be >= 0, got {size}")
        if parent is not None:
            if table is not None and table is not parent.table:
                raise DomainCreationError(
                    name, f"parent {parent.name!r} belongs to another IrqTable")
            table = parent.table
            if parent not in table.domains:
                raise DomainCreationError(name, f"parent {parent.name!r} has been removed")
        if table is None:
            raise DomainCreationError(name, "a root domain needs table=IrqTable")
        if any(d.name == name for d in table.domains):
            raise DomainCreationError(name, "a domain with this name already exists")
        self.name = name
        self.ops = ops
        self.parent = parent
        self.size = size or 0
        self.bus_token = bus_token
        self.flags = flags | IrqDomainFlags.HIERARCHY
        self.host_data = host_data
        self.table = table
        self.revmap: dict[int, int] = {}
        table.domains.append(self)

    def __repr__(self) -> str:
        return f"IrqDomain({self.name!r})"

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1

    @property
    def mapcount(self) -> int:
        return len(self.revmap)


def irq_domain_remove(domain: IrqDomain) -> None:
    """irq_domain_remove - Remove a domain that has no irqs and no children.

    Raises ``BusyError`` otherwise.
    """
    children = [d.name for d in domain.table.domains if d.parent is domain]
    if children:
        raise BusyError(f"domain {domain.name!r} still has child domains {children}")
    if domain.revmap:
        raise BusyError(f"domain {domain.name!r} still maps {len(domain.revmap)} irq(s)")
    domain.table.domains.remove(domain)


def irq_find_mapping(domain: IrqDomain, hwirq: int) -> int | None:
    """irq_find_mapping - The virq that ``hwirq`` of ``domain`` is mapped to, or None."""
    return domain.revmap.get(hwirq)


def irq_domain_get_irq_data(domain: IrqDomain, virq: int) -> IrqData | None:
    """irq_domain_get_irq_data - The level of ``virq`` that belongs to ``domain``."""
    desc = domain.table.irq_to_desc(virq)
    if desc is None:
        return None
    for data in desc.irq_data.levels():
        if data.domain is domain:
            return data
    return None


def irq_domain_set_hwirq_and_chip(domain: IrqDomain, virq: int, hwirq: int,
                                  chip: IrqChip, chip_data: Any = None) -> IrqData:
    """irq_domain_set_hwirq_and_chip - Fill ``domain``'s level of ``virq``.

    Called from ``ops.alloc``. Raises ``InvalidIrqError`` if ``virq`` has no
    level in ``domain`` or ``hwirq`` exceeds the domain size, ``BusyError``
    if ``hwirq`` is already mapped in ``domain``.
    """
    data = irq_domain_get_irq_data(domain, virq)
    if data is None:
        raise InvalidIrqError(f"irq {virq} has no level in domain {domain.name!r}")
    if domain.size and not 0 <= hwirq < domain.size:
        raise InvalidIrqError(f"hwirq {hwirq} out of range for domain {domain.name!r} "
                              f"(size {domain.size})")
    if domain.revmap.get(hwirq, virq) != virq:
        raise BusyError(f"hwirq {hwirq} of domain {domain.name!r} already mapped to irq "
                        f"{domain.revmap[hwirq]}")
    data.hwirq, data.chip, data.chip_data = hwirq, chip, chip_data
    return data


def irq_domain_reset_irq_data(irq_data: IrqData) -> None:
    """irq_domain_reset_irq_data - Clear a level's hwirq, chip and chip_data."""
    irq_data.hwirq, irq_data.chip, irq_data.chip_data = 0, None, None


# ------------------------------------------------ hierarchy: alloc / free


def irq_domain_alloc_irqs(domain: IrqDomain, nr: int = 1, arg: Any = None) -> int:
    """irq_domain_alloc_irqs - Allocate ``nr`` contiguous irqs from ``domain``.

    Allocates descriptors and the ``IrqData`` chain down to the root, then
    calls ``domain.ops.alloc``. Returns the first virq. On failure nothing is
    left allocated and the domain's ``IrqError`` (e.g. ``NoSpaceError``)
    propagates.
    """
    if nr < 1:
        raise InvalidIrqError(f"cannot allocate {nr} irqs")
    table = domain.table
    virq = table.irq_alloc_descs(nr)
    for irq in range(virq, virq + nr):
        top = IrqData(domain, irq=irq)
        data = top
        for parent in _ancestors(domain):
            data.parent_data = IrqData(parent, irq=irq)
            data = data.parent_data
        desc = IrqDesc(irq, top)
        for level in top.levels():
            level.desc = desc
        table.descs[irq] = desc
    try:
        domain.ops.alloc(domain, virq, nr, arg)
    except BaseException:
        table.irq_free_descs(virq, nr)
        raise
    unset = [(irq, level.domain.name) for irq in range(virq, virq + nr)
             for level in table.descs[irq].irq_data.levels() if level.chip is None]
    if unset:
        _free_hierarchy(domain, virq, nr)
        table.irq_free_descs(virq, nr)
        irq, name = unset[0]
        raise IrqError(f"domain {name!r} set no chip for irq {irq} "
                       "(irq_domain_set_hwirq_and_chip missing in its alloc?)")
    for irq in range(virq, virq + nr):
        for level in table.descs[irq].irq_data.levels():
            level.domain.revmap[level.hwirq] = irq
    return virq


def irq_domain_alloc_irqs_parent(domain: IrqDomain, virq: int, nr: int, arg: Any) -> None:
    """irq_domain_alloc_irqs_parent - Allocate interrupts from parent domain.

    Raises ``NotSupportedError`` if ``domain`` is a root.
    """
    if domain.parent is None:
        raise NotSupportedError(f"domain {domain.name!r} has no parent to allocate from")
    domain.parent.ops.alloc(domain.parent, virq, nr, arg)


def _free_hierarchy(domain: IrqDomain, virq: int, nr: int) -> None:
    for irq in range(virq, virq + nr):
        if irq_domain_get_irq_data(domain, irq) is not None:
            domain.ops.free(domain, irq, 1)


def irq_domain_free_irqs_parent(domain: IrqDomain, virq: int, nr: int) -> None:
    """irq_domain_free_irqs_parent - Free interrupts from parent domain (no-op at the root)."""
    if domain.parent is not None:
        _free_hierarchy(domain.parent, virq, nr)


def irq_domain_free_irqs_common(domain: IrqDomain, virq: int, nr: int) -> None:
    """irq_domain_free_irqs_common - Reset this domain's levels, then free the parent's.

    A ready-made ``ops.free`` for domains with no per-irq resources of their own.
    """
    for irq in range(virq, virq + nr):
        data = irq_domain_get_irq_data(domain, irq)
        if data is not None:
            irq_domain_reset_irq_data(data)
    irq_domain_free_irqs_parent(domain, virq, nr)


def irq_domain_free_irqs(domain: IrqDomain, virq: int, nr: int = 1) -> None:
    """irq_domain_free_irqs - Free irqs allocated with ``irq_domain_alloc_irqs``.

    Deactivates irqs that are still active, calls ``ops.free`` (which frees
    the parents), then releases the descriptors. Raises ``InvalidIrqError``
    if an irq was not allocated from ``domain`` and ``BusyError`` if a
    handler is still requested (``free_irq`` first).
    """
    table = domain.table
    descs = [table.irq_to_desc(irq) for irq in range(virq, virq + nr)]
    for irq, desc in zip(range(virq, virq + nr), descs):
        if desc is None or desc.irq_data.domain is not domain:
            raise InvalidIrqError(f"irq {irq} was not allocated from domain {domain.name!r}")
        if desc.actions:
            raise BusyError(f"irq {irq} still has handler(s) "
                            f"{[a.name for a in desc.actions]}; free_irq first")
    for desc in descs:
        if desc.activated:
            irq_domain_deactivate_irq(desc.irq_data)
        for level in desc.irq_data.levels():
            if level.domain is not None and level.domain.revmap.get(level.hwirq) == desc.irq:
                del level.domain.revmap[level.hwirq]
    _free_hierarchy(domain, virq, nr)
    table.irq_free_descs(virq, nr)


def _ancestors(domain: IrqDomain) -> Iterator[IrqDomain]:
    parent = domain.parent
    while parent is not None:
        yield parent
        parent = parent.parent


# ---------------------------------------- hierarchy: activate / deactivate


def _activate(data: IrqData) -> None:
    if data.domain is None:
        return
    if data.parent_data is not None:
        _activate(data.parent_data)
    activate = getattr(data.domain.ops, "activate", None)
    if activate is not None:
        try:
            activate(data.domain, data)
        except BaseException:
            if data.parent_data is not None:
                _deactivate(data.parent_data)
            raise


def _deactivate(data: IrqData) -> None:
    if data.domain is None:
        return
    deactivate = getattr(data.domain.ops, "deactivate", None)
    if deactivate is not None:
        deactivate(data.domain, data)
    if data.parent_data is not None:
        _deactivate(data.parent_data)


def irq_domain_activate_irq(irq_data: IrqData) -> None:
    """irq_domain_activate_irq - Call ``ops.activate`` on every level, root first.

    No-op if already activated. If a level raises, the levels already
    activated beneath it are deactivated (child first) and the error
    propagates with the irq left inactive.
    """
    desc = irq_data.desc
    if desc is not None and desc.activated:
        return
    _activate(irq_data)
    if desc is not None:
        desc.activated = True


def irq_domain_deactivate_irq(irq_data: IrqData) -> None:
    """irq_domain_deactivate_irq - Call ``ops.deactivate`` on every level, outermost first."""
    desc = irq_data.desc
    if desc is not None and not desc.activated:
        return
    _deactivate(irq_data)
    if desc is not None:
        desc.activated = False


# ------------------------------------------------------------ chip helpers


def irq_chip_compose_msi_msg(irq_data: IrqData) -> MsiMsg:
    """irq_chip_compose_msi_msg - Compose the MSI message for ``irq_data``.

    Walks from ``irq_data`` towards the root and asks the first chip that
    implements ``irq_compose_msi_msg`` (a chip returning None passes the
    question on to its parent). Raises ``NotSupportedError`` if no level
    composes; a composing chip may raise its own ``IrqError``.
    """
    for data in irq_data.levels():
        compose = getattr(data.chip, "irq_compose_msi_msg", None)
        if compose is not None:
            msg = compose(data)
            if msg is not None:
                return msg
    raise NotSupportedError(f"no chip composes an MSI message for irq {irq_data.irq}")


def irq_chip_write_msi_msg(irq_data: IrqData, msg: MsiMsg) -> None:
    """irq_chip_write_msi_msg - Store ``msg`` through this level's chip."""
    write = getattr(irq_data.chip, "irq_write_msi_msg", None)
    if write is None:
        raise NotSupportedError(f"chip {irq_data.chip!r} cannot store MSI messages")
    write(irq_data, msg)


def _parent(irq_data: IrqData, callback: str) -> tuple[IrqData, Callable[..., Any]]:
    parent = irq_data.parent_data
    fn = getattr(parent.chip, callback, None) if parent is not None else None
    if fn is None:
        raise NotSupportedError(f"parent of irq {irq_data.irq} level "
                                f"{getattr(irq_data.domain, 'name', None)!r} has no {callback}")
    return parent, fn


def irq_chip_ack_parent(irq_data: IrqData) -> None:
    """irq_chip_ack_parent - Acknowledge the parent interrupt."""
    parent, fn = _parent(irq_data, "irq_ack")
    fn(parent)


def irq_chip_mask_parent(irq_data: IrqData) -> None:
    """irq_chip_mask_parent - Mask the parent interrupt."""
    parent, fn = _parent(irq_data, "irq_mask")
    fn(parent)


def irq_chip_unmask_parent(irq_data: IrqData) -> None:
    """irq_chip_unmask_parent - Unmask the parent interrupt."""
    parent, fn = _parent(irq_data, "irq_unmask")
    fn(parent)


def irq_chip_set_affinity_parent(irq_data: IrqData, cpu: int) -> IrqSetMask:
    """irq_chip_set_affinity_parent - Set the affinity on the parent interrupt."""
    parent, fn = _parent(irq_data, "irq_set_affinity")
    return fn(parent, cpu)


# -------------------------------------------------------------- the table


class IrqTable:
    """The virq allocator and descriptor table of one OS instance.

    ``nr_irqs`` bounds the virq space (and sets the /proc/interrupts column
    width, as in Linux). ``first_irq`` is the lowest dynamically allocated
    virq: on x86, 0..15 are the legacy ISA irqs and 16..23 the IO-APIC GSIs,
    so MSI irqs start at 24.
    """

    def __init__(self, nr_irqs: int = 1024, first_irq: int = 24) -> None:
        if not 0 < first_irq < nr_irqs:
            raise ValueError(f"need 0 < first_irq < nr_irqs, got {first_irq}, {nr_irqs}")
        self.nr_irqs = nr_irqs
        self.first_irq = first_irq
        self.descs: dict[int, IrqDesc] = {}
        self.domains: list[IrqDomain] = []

    # ---- descriptors
    def irq_alloc_descs(self, nr: int) -> int:
        """irq_alloc_descs - Reserve the lowest free block of ``nr`` virqs (NoSpaceError)."""
        start = self.first_irq
        while start + nr <= self.nr_irqs:
            busy = [irq for irq in range(start, start + nr) if irq in self.descs]
            if not busy:
                return start
            start = busy[-1] + 1
        raise NoSpaceError(f"no {nr} free contiguous irq number(s) below nr_irqs={self.nr_irqs}")

    def irq_free_descs(self, virq: int, nr: int) -> None:
        """irq_free_descs - Drop the descriptors of ``virq .. virq+nr-1``."""
        for irq in range(virq, virq + nr):
            self.descs.pop(irq, None)

    def irq_to_desc(self, irq: int) -> IrqDesc | None:
        return self.descs.get(irq)

    def irq_get_irq_data(self, irq: int) -> IrqData | None:
        desc = self.descs.get(irq)
        return desc.irq_data if desc is not None else None

    def _desc(self, irq: int) -> IrqDesc:
        desc = self.descs.get(irq)
        if desc is None:
            raise InvalidIrqError(f"irq {irq} is not allocated")
        return desc

    @contextmanager
    def _bus_locked(self, desc: IrqDesc) -> Iterator[IrqData]:
        data, chip = desc.irq_data, desc.irq_data.chip
        if chip is not None and chip.irq_bus_lock is not None:
            chip.irq_bus_lock(data)
        try:
            yield data
        finally:
            if chip is not None and chip.irq_bus_sync_unlock is not None:
                chip.irq_bus_sync_unlock(data)

    # ---- handlers
    def request_irq(self, irq: int, handler: Callable[[int, int], object], name: str,
                    *, shared: bool = False) -> None:
        """request_irq - Install ``handler`` (called as ``handler(irq, cpu)``) on ``irq``.

        The first handler activates the irq (``irq_domain_activate_irq``: the
        message is composed and stored) and unmasks it. Raises
        ``InvalidIrqError`` for an unallocated irq, ``BusyError`` if the irq
        already has a handler and either side is not ``shared``, and whatever
        activation raises (then nothing is installed).
        """
        desc = self._desc(irq)
        if desc.actions and not (shared and all(a.shared for a in desc.actions)):
            raise BusyError(f"irq {irq} already requested by "
                            f"{[a.name for a in desc.actions]} and not shared")
        with self._bus_locked(desc) as data:
            if not desc.actions:
                irq_domain_activate_irq(data)
                self._unmask(desc)
            desc.actions.append(IrqAction(name, handler, shared))

    def free_irq(self, irq: int, name: str | None = None) -> None:
        """free_irq - Remove the handler called ``name`` (or the only one).

        Removing the last handler masks and deactivates the irq.
        """
        desc = self._desc(irq)
        matches = [a for a in desc.actions if name is None or a.name == name]
        if not matches or (name is None and len(desc.actions) > 1):
            raise InvalidIrqError(f"irq {irq}: no single handler named {name!r} to free")
        with self._bus_locked(desc) as data:
            desc.actions.remove(matches[0])
            if not desc.actions:
                self._mask(desc)
                irq_domain_deactivate_irq(data)

    def handle_irq(self, irq: int, cpu: int) -> bool:
        """handle_edge_irq - Run the flow for one interrupt of ``irq`` on ``cpu``.

        With handlers: count it in ``kstat[cpu]``, ack the chip, run every
        action; return True. Without: mark ``pending`` and return False (no
        count, as Linux). Raises ``InvalidIrqError`` for an unallocated irq.
        """
        desc = self._desc(irq)
        if not desc.actions:
            desc.pending = True
            return False
        desc.kstat[cpu] = desc.kstat.get(cpu, 0) + 1
        chip = desc.irq_data.chip
        if chip is not None and chip.irq_ack is not None:
            chip.irq_ack(desc.irq_data)
        for action in desc.actions:
            action.handler(irq, cpu)
        return True

    # ---- masking and affinity
    def _mask(self, desc: IrqDesc) -> None:
        chip = desc.irq_data.chip
        if chip is not None and chip.irq_mask is not None:
            chip.irq_mask(desc.irq_data)
        desc.masked = True

    def _unmask(self, desc: IrqDesc) -> None:
        chip = desc.irq_data.chip
        if chip is not None and chip.irq_unmask is not None:
            chip.irq_unmask(desc.irq_data)
        desc.masked = False

    def mask_irq(self, irq: int) -> None:
        """mask_irq - Mask ``irq`` at its outermost chip (e.g. the MSI-X vector control)."""
        desc = self._desc(irq)
        with self._bus_locked(desc):
            self._mask(desc)

    def unmask_irq(self, irq: int) -> None:
        """unmask_irq - Unmask ``irq`` at its outermost chip."""
        desc = self._desc(irq)
        with self._bus_locked(desc):
            self._unmask(desc)

    def irq_set_affinity(self, irq: int, cpu: int) -> IrqSetMask:
        """irq_set_affinity - Move ``irq`` to ``cpu`` through its outermost chip.

        Raises ``NotSupportedError`` if that chip has no ``irq_set_affinity``
        and the chip's ``IrqError`` (e.g. ``NoSpaceError``) if the move fails.
        """
        desc = self._desc(irq)
        chip = desc.irq_data.chip
        if chip is None or chip.irq_set_affinity is None:
            raise NotSupportedError(f"irq {irq}: chip {chip!r} cannot set affinity")
        with self._bus_locked(desc) as data:
            return chip.irq_set_affinity(data, cpu)

    def irq_set_vcpu_affinity(self, irq: int, vcpu_info: Any) -> None:
        """irq_set_vcpu_affinity - Hand ``vcpu_info`` to the first level that takes it.

        Used to switch an irq to posted delivery (the IR chip implements it).
        """
        desc = self._desc(irq)
        for data in desc.irq_data.levels():
            fn = getattr(data.chip, "irq_set_vcpu_affinity", None)
            if fn is not None:
                fn(data, vcpu_info)
                return
        raise NotSupportedError(f"irq {irq}: no chip supports vcpu affinity")

    # ---- views
    def proc_interrupts(self, ncpus: int) -> str:
        """show_interrupts - Render /proc/interrupts for CPUs ``0 .. ncpus-1``.

        Format of kernel/irq/proc.c before v6.13 (digest §8): a header of
        ``prec + 8`` spaces and ``CPU%-8d`` per CPU, then per irq that has a
        handler or a non-zero count: ``%*d: `` (prec = max(3, digits of
        nr_irqs)), ``%10u `` per CPU, chip name `` %8s``, hwirq `` %*lu``,
        ``-%-8s`` flow name, ``  name`` of the first action and ``, name`` of
        the others. (v6.13+ prints one space less before the chip name.)
        """
        prec, j = 3, 1000
        while prec < 10 and j <= self.nr_irqs:
            prec, j = prec + 1, j * 10
        lines = [" " * (prec + 8) + "".join(f"CPU{cpu:<8d}" for cpu in range(ncpus))]
        for irq in sorted(self.descs):
            desc = self.descs[irq]
            if not desc.actions and not desc.total:
                continue
            data = desc.irq_data
            line = f"{irq:>{prec}d}: " + "".join(f"{desc.count(c):>10d} " for c in range(ncpus))
            chip_name = "None" if data.chip is None else (data.chip.name or "-")
            line += f" {chip_name:>8s}"
            line += f" {data.hwirq:>{prec}d}" if data.domain is not None else " " * (prec + 1)
            if desc.name:
                line += f"-{desc.name:<8s}"
            if desc.actions:
                line += "  " + ", ".join(a.name for a in desc.actions)
            lines.append(line)
        return "\n".join(lines) + "\n"

    def domain_hierarchy(self) -> str:
        """Debugfs-like view: one line per domain, children indented under parents.

        ``<name>: size=<n> mapped=<n> bus=DOMAIN_BUS_<token> flags=<flags> parent=<name|->``
        """
        lines: list[str] = []

        def walk(parent: IrqDomain | None) -> None:
            for d in self.domains:
                if d.parent is parent:
                    flags = "|".join(f.name for f in IrqDomainFlags if f and f in d.flags)
                    lines.append(f"{'  ' * d.depth}{d.name}: size={d.size} mapped={d.mapcount} "
                                 f"bus={d.bus_token} flags={flags} "
                                 f"parent={d.parent.name if d.parent else '-'}")
                    walk(d)

        walk(None)
        return "\n".join(lines) + "\n"
