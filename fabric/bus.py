"""The fabric model: root complex, switch ports, IOMMU and IR unit of one machine.

Pure and synchronous: ``Fabric.on_frame(identity, frame)`` takes one frame as the
ROUTER received it and calls ``send(identity, frame)`` for every frame it emits.
The process shell (``fabric.process``) owns the socket; tests drive this class
directly with a list as the send function.

Theory of operation
-------------------
*Ports.*  Every process registers with a one-time token the launcher issued for
its role; the token table says which name and role it gets and, for a device,
which bus range sits behind its port (the port's secondary..subordinate buses).
From then on a frame's sender is its ZeroMQ routing identity, never anything the
frame says.

*Stamping.*  A TLP from a CPU-side port (the host) is a root-complex request:
the fabric overwrites its requester ID with 00:00.0 and, for non-posted
requests, replaces its tag with a root-complex tag so that the completion can be
routed back to the port that asked.  A TLP from a device port must carry a
requester (or completer) ID inside the port's bus range — PCIe ACS Source
Validation; anything else is dropped and counted as ``spoofed_rid``.

*Routing.*
  - CfgRd0/CfgWr0 by the target's bus to the device port owning it; no such port
    gives the root complex's UR completion.
  - Memory requests from a CPU port by address through the BAR windows the host
    programmed (``window.set``); a miss is a master abort (UR for reads).
  - Completions by requester ID: 00:00.0 through the root-complex tag table,
    anything else to the device port owning that bus.
  - Memory requests from a device port: a DWORD MWr to 0xFEE0_0000-0xFEEF_FFFF is an
    interrupt request and goes to the IR unit, which delivers it to the CPU port
    owning the destination APIC ID (``IRQ`` frame) or records a fault; any other
    address is DMA and goes through the IOMMU context of the requester (pass-through
    to the host's RAM, or blocked with a DMA fault).

*Robustness.*  Nothing a peer sends can raise out of ``on_frame``: malformed,
oversized, unauthorized and spoofed frames are dropped and counted per reason,
and the sender is told with a ``DROPPED`` frame at exponentially spaced counts.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from fabric import tlp as T
from fabric import wire
from fabric.bdf import rid_str
from fabric.dmar import FaultLog, FaultReason, FaultRecord
from fabric.ept import Ept, EptHit
from fabric.iommu import DmaFault, Iommu, MemoryMap, Translation
from fabric.ir import Irte, InterruptRemapper, IrFault, Passthrough, Posted, Remapped
from fabric.trace import TLP_NAMES as _TLP_NAMES, Tracer, chunk_budget, flow_id

MSI_LO = 0xFEE0_0000
MSI_HI = 0xFEEF_FFFF

ROLES = ("host", "device", "guest", "control")

_MWR = (T.TlpType.MEM_WRITE, T.TlpType.MEM_WRITE_64)
_MRD = (T.TlpType.MEM_READ, T.TlpType.MEM_READ_64)
_CFG = (T.TlpType.CFG_READ_0, T.TlpType.CFG_WRITE_0)
_CPL = (T.TlpType.CPL, T.TlpType.CPL_DATA)
_MWR32, _MWR64 = int(T.TlpType.MEM_WRITE), int(T.TlpType.MEM_WRITE_64)
_MRD32, _MRD64 = int(T.TlpType.MEM_READ), int(T.TlpType.MEM_READ_64)
_CFGRD, _CFGWR = int(T.TlpType.CFG_READ_0), int(T.TlpType.CFG_WRITE_0)
_CPLT, _CPLD = int(T.TlpType.CPL), int(T.TlpType.CPL_DATA)

#: trace argument names of the hot-path events (fabric.trace.Tracer.rec)
_TK_DEVICE = ("src", "rid", "key")

# hot path: module globals, not attribute lookups per frame
_peek = T.peek
_decode = wire.decode
_INF = float("inf")
_TK_CPU = ("src", "key")
_TK_REMAP = ("sid", "addr", "data", "pasid", "irte", "apic", "vector")
_TK_PASSTHROUGH = ("sid", "addr", "data", "pasid", "apic", "vector")
_TK_POSTED = ("sid", "addr", "data", "pasid", "irte", "vector", "vm", "vcpu")
_TK_INJECT = ("vm", "apic", "vector")

ROOT_COMPLEX_RID = 0x0000
RC_TAGS = 256
#: frames a stalled guest may queue while its trapped store is being emulated (a stalled
#: vCPU issues nothing; this only bounds what a hostile guest process can pile up: 32 MiB)
STALL_BACKLOG = 4096
#: ``Peer.stalled`` of a guest over its frame budget (trapped stores use negative sequence numbers)
THROTTLED = 1
#: the deepest a VM's frame budget can go into debt through WASTED penalties: this many
#: seconds of its rate (so a storm that stops is back at full rate within a second)
MAX_DEBT_S = 1.0
#: Credits: a guest keeps at most CREDIT_WINDOW frames in flight beyond the fabric's latest
#: CREDIT (how many of its frames the fabric has taken), which it gets every CREDIT_BATCH.
#: A throttled VM's frames are not taken (they wait in its backlog), so no CREDIT comes and
#: its vCPU stalls: what the fabric must hold is bounded by the window, well below STALL_BACKLOG.
CREDIT_WINDOW = 1024
CREDIT_BATCH = CREDIT_WINDOW // 4
#: frames a throttled VM may still send (they never wait): replies and events, the lab's
#: instrumentation (msgpack: fixarray byte, then the type as a positive fixint)
_OOB_TYPES = frozenset({bytes([wire.CTL_REP]), bytes([wire.EVENT])})
_BATCH_PREFIX = wire.BATCH_PREFIX
#: VM exit reasons only the fabric generates (EPT traps and violations); a guest may not claim them
_FABRIC_EXITS = frozenset({"mmio", "ept_violation"})


# In-place header edits for the routing hot path.  ``peek`` has already checked
# framing, so these touch known byte offsets (tlp.py's layout map): DW0 byte 1
# holds T9 (bit 7) and T8 (bit 3); a request's DW1 is Requester ID | Tag[7:0];
# a completion's DW1 is Completer ID, its DW2 Requester ID | Tag[7:0].

def _request_tag(raw: bytes, off: int) -> int:
    b1 = raw[off + 1]
    return ((b1 & 0x80) << 2) | ((b1 & 0x08) << 5) | raw[off + 6]


def _stamp_request(raw: bytes, off: int, rid: int, tag: int) -> bytes:
    """Set requester ID and an 8-bit tag (T8/T9 cleared)."""
    out = bytearray(raw)
    out[off + 1] &= 0x77
    out[off + 4] = rid >> 8
    out[off + 5] = rid & 0xFF
    out[off + 6] = tag
    return bytes(out)


def _completion_tag(raw: bytes) -> int:
    """A completion's 10-bit tag (completions carry no prefix)."""
    b1 = raw[1]
    return ((b1 & 0x80) << 2) | ((b1 & 0x08) << 5) | raw[10]


def _stamp_completion_tag(raw: bytes, tag: int) -> bytes:
    """Restore a completion's 10-bit tag (completions carry no prefix)."""
    out = bytearray(raw)
    out[1] = (out[1] & 0x77) | ((tag >> 2) & 0x80) | ((tag >> 5) & 0x08)
    out[10] = tag & 0xFF
    return bytes(out)


def _stamp_completer(raw: bytes, cid: int) -> bytes:
    out = bytearray(raw)
    out[4] = cid >> 8
    out[5] = cid & 0xFF
    return bytes(out)


def _ur_for_tag(tag: int) -> bytes:
    """An Unsupported Request completion from the root complex for a CPU request with ``tag``
    (requester 00:00.0), used when the device it went to disappeared."""
    cpl = T.Tlp(T.TlpType.CPL, requester_id=ROOT_COMPLEX_RID, tag=tag, completer_id=ROOT_COMPLEX_RID,
                status=T.CplStatus.UR, byte_count=4)
    return cpl.pack()


def _request_bytes(raw: bytes, off: int) -> int:
    """Bytes a read request asks for (Length DWs; 0 encodes 1024)."""
    n = ((raw[off + 2] & 0x3) << 8 | raw[off + 3]) or 1024
    return n * 4


def _readdress(raw: bytes, off: int, ftype: int, addr: int) -> bytes:
    """The same memory request at another address (3DW below 4 GiB, 4DW above, as the spec wants)."""
    four = ftype == _MWR64 or ftype == _MRD64
    if four == (addr >= 1 << 32):
        out = bytearray(raw)
        if four:
            out[off + 8:off + 16] = (addr | (raw[off + 15] & 3)).to_bytes(8, "big")
        else:
            out[off + 8:off + 12] = (addr | (raw[off + 11] & 3)).to_bytes(4, "big")
        return bytes(out)
    tlp = T.Tlp.unpack(raw)
    write = ftype == _MWR32 or ftype == _MWR64
    if write:
        tlp.type = T.TlpType.MEM_WRITE_64 if addr >= 1 << 32 else T.TlpType.MEM_WRITE
    else:
        tlp.type = T.TlpType.MEM_READ_64 if addr >= 1 << 32 else T.TlpType.MEM_READ
    tlp.address = addr
    return tlp.pack()


def _stamp_requester(raw: bytes, off: int, rid: int) -> bytes:
    out = bytearray(raw)
    out[off + 4] = rid >> 8
    out[off + 5] = rid & 0xFF
    return bytes(out)


@dataclass
class PeerSpec:
    """What the launcher authorized for one token."""

    name: str
    role: str
    buses: tuple[int, int] | None = None  # device ports: (secondary, subordinate)


@dataclass(slots=True)
class Peer:
    identity: bytes
    spec: PeerSpec
    handlers: dict = field(default_factory=dict)   # message type -> handler, for its role
    limit: int = 0              # its largest frame (wire.MAX_CONTROL_FRAME or MAX_DATA_FRAME)
    bus_lo: int = 0             # a device's bus range (ACS source validation); empty otherwise
    bus_hi: int = -1
    rx: int = 0
    drops: Counter = field(default_factory=Counter)
    # A guest whose vCPU is in a VM exit for a trapped store: its later frames wait here
    # until the hypervisor's VM entry, as a real vCPU executes nothing meanwhile.
    stalled: int = 0
    backlog: deque | None = None
    # A guest's frame budget (token bucket, ``Platform.vm_frame_rate``): frames it may still
    # send now; every frame costs one, a store that rang a full work queue ``waste_penalty``
    # more.  Infinite for the other roles.
    tokens: float = float("inf")
    refill_ns: int = 0
    link: int = 0               # a guest's link number: the origin of its stores on the way to a device
    throttles: int = 0          # times it ran out of budget
    credit_at: float = float("inf")  # rx at which it gets its next CREDIT (guests)
    wasted: int = 0             # its stores that rang a full work queue (WASTED from devices)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def role(self) -> str:
        return self.spec.role


@dataclass
class PostedDescriptor:
    """A posted-interrupt descriptor (VT-d 9.12; Linux ``struct pi_desc``), one per vCPU::

         255                                                0   PIR: one bit per vector
         256 ON  outstanding notification
         257 SN  suppress notification (the vCPU is not running)
         279:272 NV   notification vector      319:288 NDST notification destination

    The IR unit sets PIR[vector] and, if ON was clear and SN is clear (or the IRTE is
    urgent), sets ON and notifies the vCPU.  Here the notification *is* the vCPU's
    posted-interrupt processing: the fabric sends the PIR bits it sets (with each
    vector's provenance) to the guest and clears ON, so a running vCPU gets every vector
    without the host on the path.  With SN set the bits wait; clearing SN (the host
    schedules the vCPU again) delivers what accumulated.

    PIR is a bitmap: postings of a vector whose bit is already set merge into it, and the
    vCPU takes that vector once.  Out of band, as with provenance, each bit also carries how
    many postings it absorbed, so the lab can tell coalescing (the handler consumes every
    completion) from loss.  ``held`` counts the postings SN suppressed since it was last set.
    """

    vm: str
    vcpu: int
    nv: int = 0xF2          # Linux's POSTED_INTR_VECTOR
    pir: dict = field(default_factory=dict)   # vector -> (origin, t_ns, postings) of its latest posting
    on: bool = False
    sn: bool = False
    posted: int = 0
    notified: int = 0
    suppressed: int = 0
    merged: int = 0                           # postings that found their PIR bit already set
    held: int = 0                             # postings suppressed since SN was last set


@dataclass
class Platform:
    """Platform capabilities (topology ``[platform]``)."""

    ir: bool = True                 # an interrupt-remapping unit exists
    ir_entries: int = 65536
    pasid_ir: bool = False          # IRTEs can also check the request's PASID (not in real VT-d)
    posted: bool = False            # posted-format IRTEs are honoured (VT-d posted interrupts)
    pasid_interrupts: bool = True   # the root complex accepts PASID-tagged interrupt requests
    fault_records: int = 8
    max_bus: int = 32               # buses the host scans
    # Per-VM frame budget (token bucket): a guest may send ``vm_frame_rate`` frames/s (0: no
    # limit) in bursts of ``vm_frame_burst``; a store that rings a full work queue costs
    # ``waste_penalty`` frames more.  Over budget, the VM is throttled: the fabric stops taking
    # its frames (they wait here, in order), so it gets no CREDIT and its vCPU stalls.
    vm_frame_rate: int = 50_000
    vm_frame_burst: int = 2_048
    waste_penalty: int = 50
    limits: dict = field(default_factory=dict)


class Fabric:
    """Root complex + IOMMU + IR unit; see the module docstring."""

    def __init__(self, specs: dict[str, PeerSpec], platform: Platform | None = None,
                 send: Callable[[bytes, bytes], None] | None = None,
                 clock: Callable[[], int] = time.monotonic_ns,
                 on_fault: Callable[[FaultRecord], None] | None = None):
        self.platform = platform or Platform()
        for spec in specs.values():
            # A bad launcher table must fail here, not as an exception out of on_frame later.
            if spec.role not in ROLES:
                raise ValueError(f"peer {spec.name!r}: unknown role {spec.role!r} (expected one of {ROLES})")
            if spec.buses is not None and (spec.role != "device" or len(spec.buses) != 2
                                           or not 0 <= spec.buses[0] <= spec.buses[1] <= 255):
                raise ValueError(f"peer {spec.name!r}: bad bus range {spec.buses!r}")
        self._tokens = dict(specs)          # token -> spec; consumed on registration
        self.send = send or (lambda ident, frame: None)
        self.clock = clock
        self.on_fault = on_fault or (lambda rec: None)
        self.peers: dict[bytes, Peer] = {}
        self.by_name: dict[str, Peer] = {}
        self.controls: list[Peer] = []
        self.bus_owner: list[Peer | None] = [None] * 256
        # BAR windows: parallel sorted lists of base, (limit, peer)
        self._win_base: list[int] = []
        self._win: list[tuple[int, int, Peer]] = []
        self.apic_owner: dict[int, Peer] = {}
        self.fault_log = FaultLog(self.platform.fault_records)
        self.memmap = MemoryMap()                         # HPA -> RAM owner (host, guests)
        self.iommu = Iommu(self.fault_log, memory=self.memmap)  # DMA remapping: contexts, domains
        self.epts: dict[str, Ept] = {}                    # guest name -> its EPT
        self.pids: dict[int, PostedDescriptor] = {}       # descriptor address -> descriptor
        self.host: Peer | None = None
        # IRTA starts unprogrammed, as at reset: the host's IR driver programs it (``ir.table``).
        self.ir = InterruptRemapper(None, fault_log=self.fault_log, pasid_check=self.platform.pasid_ir)
        self._rc_free = list(range(RC_TAGS - 1, -1, -1))
        # RC tag -> (requesting port, its original tag, port the request went to)
        self._rc_tags: list[tuple[Peer, int, Peer] | None] = [None] * RC_TAGS
        # fabric CTL id -> (control peer, its request id, peer asked)
        self._ctl_routes: dict[int, tuple[Peer, int, Peer]] = {}
        self._ctl_seq = 0
        # Frame budgets: guest link number -> peer; throttled guests -> when to look again.
        # ``wake_ns`` is the earliest of those (None: nobody waits): the shell calls
        # ``release(now)`` then -- the model keeps no timers.
        self.links: dict[int, Peer] = {}
        self._link_seq = itertools.count(1)
        self._throttled: dict[bytes, int] = {}            # identity -> wake-up time
        self.wake_ns: int | None = None
        # posted descriptors with ON set while one multi-frame message is handled (see on_multipart)
        self._batching = False
        self._deferred: list[PostedDescriptor] = []
        self.counters: Counter = Counter()
        self.src_faults: Counter = Counter()              # (source RID, reason) -> count
        # DMA reads a guest's RAM owes a completion: (guest identity, requester RID, tag) -> count
        self._guest_reads: Counter = Counter()
        # hot counters as attributes
        self.tlps = 0
        self.irqs_delivered = 0
        self.irqs_posted = 0                              # counters' "irq:posted": postings into PIR
        self.dma_tlps = 0
        self.shutdown_requested = False
        self._faults_seen = 0
        self._trap_seq = itertools.count(1)
        self.gone_identities: list[bytes] = []   # the shell drops their queued frames
        self.tracer = Tracer("fabric")

        self._by_role = {
            "device": {wire.TLP: self._device_tlp, wire.EVENT: self._event, wire.CTL_REP: self._ctl_rep,
                       wire.WASTED: self._wasted},
            "host": {wire.TLP: self._cpu_tlp, wire.REG: self._reg, wire.EVENT: self._event,
                     wire.CTL_REP: self._ctl_rep, wire.VMENTRY: self._vmentry, wire.INJECT: self._inject},
            "guest": {wire.TLP: self._guest_tlp, wire.VMEXIT: self._vmexit, wire.EVENT: self._event,
                      wire.CTL_REP: self._ctl_rep},
            "control": {wire.CTL: self._ctl},
        }
        self._reg_ops: dict[str, Callable[[Peer, dict], Any]] = {
            "window.set": self._reg_window_set,
            "window.clear": self._reg_window_clear,
            "cpus.bind": self._reg_cpus_bind,
            "ram.set": self._reg_ram_set,
            "mem.map": self._reg_mem_map,
            "mem.unmap": self._reg_mem_unmap,
            "context.set": self._reg_context_set,
            "iommu.domain": self._reg_iommu_domain,
            "iommu.map": self._reg_iommu_map,
            "iommu.unmap": self._reg_iommu_unmap,
            "iommu.pasid": self._reg_iommu_pasid,
            "ept.map": self._reg_ept_map,
            "ept.unmap": self._reg_ept_unmap,
            "ept.destroy": self._reg_ept_destroy,
            "pid.set": self._reg_pid_set,
            "pid.clear": self._reg_pid_clear,
            "pid.sn": self._reg_pid_sn,
            "irte.write": self._reg_irte_write,
            "irte.clear": self._reg_irte_clear,
            "ir.table": self._reg_ir_table,
            "ir.enable": self._reg_ir_enable,
            "ir.cfi": self._reg_ir_cfi,
            "faults.drain": self._reg_faults_drain,
        }

    # ------------------------------------------------------------------
    # entry point

    def on_frame(self, identity: bytes, frame: bytes) -> None:
        """Handle one frame from ``identity``.  Never raises on peer input."""
        peer = self.peers.get(identity)
        if peer is None:
            self._unregistered(identity, frame)
            return
        if peer.stalled and (peer.stalled != THROTTLED or frame[1:2] not in _OOB_TYPES):
            if len(frame) > wire.MAX_DATA_FRAME:       # only guests stall: drop it now, not queue it
                peer.rx += 1
                self._drop(peer, "oversized")
            elif len(peer.backlog) >= STALL_BACKLOG:
                self._drop(peer, "stall_backlog_full")
            else:
                peer.backlog.append(frame)
            return
        tokens = peer.tokens - 1.0
        if tokens >= 0.0:
            peer.tokens = tokens
        elif not self._budget(peer, frame):
            return
        peer.rx += 1
        if peer.rx >= peer.credit_at:
            peer.credit_at = peer.rx + CREDIT_BATCH
            self.send(identity, wire.credit(peer.rx))
        if len(frame) > peer.limit:
            self._drop(peer, "oversized")
            return
        try:
            msg = _decode(frame)
        except wire.WireError:
            self._drop(peer, "malformed")
            return
        handler = peer.handlers.get(msg[0])
        if handler is None:
            self._drop(peer, "unauthorized")
            return
        try:
            handler(peer, msg)
        except (T.TlpError, wire.WireError):
            self._drop(peer, "malformed")
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
            # A hostile value that got past the type checks; never let it kill the bus.
            self.counters[f"rejected:{type(exc).__name__}"] += 1
            self._drop(peer, "invalid")

    def on_multipart(self, parts: list[bytes]) -> None:
        """Shell entry: a ROUTER message is [identity, frame, ...]: one frame, or up to
        ``BATCH_MAX`` coalesced frames handled in order; anything else is malformed."""
        n = len(parts)
        if n == 2:
            frame = parts[1]
            if frame[:2] != _BATCH_PREFIX:
                self.on_frame(parts[0], frame)
                return
            identity = parts[0]
            peer = self.peers.get(identity)
            if peer is None:
                self.counters["drop:unregistered"] += 1
                return
            limit = wire.MAX_CONTROL_FRAME if peer.spec.role in ("host", "control") else wire.MAX_BATCH_FRAME
            try:
                if len(frame) > limit:
                    raise wire.WireError("oversized")
                frames = wire.unbatch(frame)
            except wire.WireError:
                peer.rx += 1
                self._charge(peer, 1)          # a guest pays for it like one frame
                self._drop(peer, "malformed")
                return
            parts = [identity, *frames]
            n = len(parts)
        if 2 < n <= wire.BATCH_MAX + 1:
            identity = parts[0]
            on_frame = self.on_frame
            # Postings to a running vCPU while one message is handled collect in its PIR
            # (ON set) and leave as one notification at the end: the interrupts a device
            # coalesced into one message reach the vCPU in one posted-interrupt processing.
            self._batching = True
            try:
                for i in range(1, n):
                    on_frame(identity, parts[i])
            finally:
                self._batching = False
                if self._deferred:
                    self._notify_deferred()
            return
        peer = self.peers.get(parts[0]) if parts else None
        if peer is not None:
            self._drop(peer, "multipart")
        else:
            self.counters["drop:unregistered"] += 1

    # ------------------------------------------------------------------
    # registration

    def _unregistered(self, identity: bytes, frame: bytes) -> None:
        if len(frame) > 4096:
            self.counters["drop:unregistered"] += 1
            return
        try:
            msg = wire.decode(frame)
            if msg[0] != wire.HELLO:
                raise wire.WireError("not HELLO")
            hello = wire.as_hello(msg)
        except wire.WireError:
            self.counters["drop:unregistered"] += 1
            self.send(identity, wire.refused("register with HELLO and a token first"))
            return
        if hello.version != wire.PROTOCOL_VERSION:
            self.counters["refused:version"] += 1
            self.send(identity, wire.refused(f"protocol version {hello.version} != {wire.PROTOCOL_VERSION}"))
            return
        spec = self._tokens.get(hello.token)
        if spec is None or spec.name != hello.name:
            self.counters["refused:token"] += 1
            self.send(identity, wire.refused("unknown, used or mismatched token"))
            return
        del self._tokens[hello.token]
        peer = Peer(identity, spec, self._by_role[spec.role],
                    wire.MAX_CONTROL_FRAME if spec.role in ("host", "control") else wire.MAX_DATA_FRAME)
        if spec.role == "device" and spec.buses:
            peer.bus_lo, peer.bus_hi = spec.buses
        self.peers[identity] = peer
        self.by_name[spec.name] = peer
        info: dict[str, Any] = {"role": spec.role, "name": spec.name}
        if spec.role == "device" and spec.buses:
            lo, hi = spec.buses
            for b in range(lo, hi + 1):
                self.bus_owner[b] = peer
            info["buses"] = [lo, hi]
        elif spec.role == "host":
            self.host = peer
            info["max_bus"] = self.platform.max_bus
            info["ir"] = self.platform.ir
            info["ir_entries"] = self.platform.ir_entries
            info["pasid_ir"] = self.platform.pasid_ir
            info["posted"] = self.platform.posted
            info["pasid_interrupts"] = self.platform.pasid_interrupts
        elif spec.role == "control":
            self.controls.append(peer)
        elif spec.role == "guest":
            peer.link = next(self._link_seq)
            self.links[peer.link] = peer
            peer.credit_at = CREDIT_BATCH
            info["credit_window"] = CREDIT_WINDOW
            if self.platform.vm_frame_rate:
                peer.tokens = float(self.platform.vm_frame_burst)
                peer.refill_ns = self.clock()
        self.counters["registered"] += 1
        self.send(identity, wire.welcome(spec.name, info))
        self._broadcast_event("fabric", "registered", {"peer": spec.name, "role": spec.role})

    # ------------------------------------------------------------------
    # per-VM frame budgets

    def _refill(self, peer: Peer, now: int) -> None:
        rate = self.platform.vm_frame_rate
        peer.tokens = min(float(self.platform.vm_frame_burst), peer.tokens + (now - peer.refill_ns) * rate / 1e9)
        peer.refill_ns = now

    def _budget(self, peer: Peer, frame: bytes) -> bool:
        """A guest out of tokens (the slow path of ``on_frame``): refill by the time since the
        last refill; if that is still not one frame's worth, throttle it: this frame waits at
        the head of its backlog (a replayed frame goes back where it came from) and ``release``
        runs the backlog later.  Replies and events always pass (and are charged)."""
        now = self.clock()
        self._refill(peer, now)
        if peer.tokens >= 1.0 or frame[1:2] in _OOB_TYPES:
            peer.tokens -= 1.0
            return True
        wait_ns = self._until_one_frame(peer)
        peer.stalled = THROTTLED
        if peer.backlog is None:
            peer.backlog = deque()
        peer.backlog.appendleft(frame)
        peer.throttles += 1
        self.counters["throttled"] += 1
        wake = now + wait_ns
        self._throttled[peer.identity] = wake
        if self.wake_ns is None or wake < self.wake_ns:
            self.wake_ns = wake
        # Nothing is said: its frames are not taken, so no CREDIT comes and its vCPU stalls.
        return False

    def _until_one_frame(self, peer: Peer) -> int:
        """Nanoseconds until a throttled guest's budget is back to one frame."""
        return int((1.0 - peer.tokens) * 1e9 / self.platform.vm_frame_rate) + 1

    def _run_backlog(self, peer: Peer) -> None:
        """A stalled guest runs again: its held frames, in order, until it stalls again."""
        backlog = peer.backlog
        while backlog and not peer.stalled:
            self.on_frame(peer.identity, backlog.popleft())

    def release(self, now: int) -> None:
        """Shell timer (at ``wake_ns``): throttled guests whose budget is back run their
        backlog, in order, until it is empty or they run out again."""
        for identity, wake in list(self._throttled.items()):
            if wake > now:
                continue
            del self._throttled[identity]
            peer = self.peers.get(identity)
            if peer is None or peer.stalled != THROTTLED:
                continue                       # gone meanwhile
            self._refill(peer, now)
            if peer.tokens < 1.0:              # a penalty arrived meanwhile: wait for it too
                self._throttled[identity] = now + self._until_one_frame(peer)
                continue
            peer.stalled = 0
            self._run_backlog(peer)
        self.wake_ns = min(self._throttled.values()) if self._throttled else None

    def _wasted(self, peer: Peer, msg: list) -> None:
        """WASTED from a device: the guest on ``link`` rang full work queues ``count`` times;
        each costs it ``waste_penalty`` frames of budget (down to MAX_DEBT_S of its rate)."""
        _, link, count = msg
        guest = self.links.get(link) if type(link) is int else None
        if guest is None or type(count) is not int or count <= 0 or guest.spec.role != "guest":
            self._drop(peer, "invalid")
            return
        guest.wasted += count
        self.counters["wasted"] += count
        self._charge(guest, count * self.platform.waste_penalty)

    def _charge(self, peer: Peer, frames: int) -> None:
        """Take ``frames`` off a guest's budget beyond what ``on_frame`` takes, its debt capped at
        MAX_DEBT_S of its rate (a peer without a budget -- not a guest, or rate 0 -- pays nothing)."""
        if peer.tokens != _INF:
            peer.tokens = max(-self.platform.vm_frame_rate * MAX_DEBT_S, peer.tokens - frames)

    # ------------------------------------------------------------------
    # drops

    def _drop(self, peer: Peer, reason: str) -> None:
        peer.drops[reason] += 1
        self.counters[f"drop:{reason}"] += 1
        n = peer.drops[reason]
        if n & (n - 1) == 0:  # 1, 2, 4, 8, ... : tell the sender without amplifying a flood
            self.send(peer.identity, wire.dropped(reason, n))

    # ------------------------------------------------------------------
    # TLPs from device ports

    def _device_tlp(self, peer: Peer, msg: list) -> None:
        raw = msg[1]
        if type(raw) is not bytes:
            raise wire.WireError("TLP payload is not bytes")
        ftype, off, rid, addr = _peek(raw)
        if self.tracer.on:
            self.tracer.rec("i", _TLP_NAMES.get(ftype, "TLP"), "tlp", None, _TK_DEVICE, peer.name, rid, addr)
        # ACS Source Validation: a request's requester ID, a completion's completer ID.
        source = addr if (ftype == _CPLT or ftype == _CPLD) else rid
        if not peer.bus_lo <= (source >> 8) <= peer.bus_hi:
            self._drop(peer, "spoofed_rid")
            return
        self.tlps += 1
        if ftype == _MWR32 or ftype == _MWR64:
            if MSI_LO <= addr <= MSI_HI:
                self._interrupt(peer, raw, off, ftype, rid, addr, msg[2], msg[3])
            else:
                self._dma(peer, raw, off, ftype, rid, addr, True)
        elif ftype == _MRD32 or ftype == _MRD64:
            self._dma(peer, raw, off, ftype, rid, addr, False)
        elif ftype == _CPLT or ftype == _CPLD:
            self._completion(peer, raw, rid)
        else:
            self._drop(peer, "unsupported_tlp")

    def _interrupt(self, peer: Peer, raw: bytes, off: int, ftype: int, rid: int, addr: int,
                   origin: Any, t_ns: Any) -> None:
        end = off + (12 if ftype == _MWR32 else 16)
        if len(raw) != end + 4 or raw[off + 7] != 0x0F:
            # An interrupt request is exactly one DWORD with all bytes enabled.
            self._ir_fault(rid, FaultReason.IR_REQ_RSVD, 0, addr, 0, T.prefix_pasid(raw), "not a DWORD write")
            return
        data = int.from_bytes(raw[end:end + 4], "little")
        pasid = T.prefix_pasid(raw) if off else None
        if pasid is not None and not self.platform.pasid_interrupts:
            # The thread's case 4: "the platform cannot receive a PASID tagged interrupt message".
            self._ir_fault(rid, FaultReason.IR_REQ_RSVD, 0, addr, data, pasid,
                           "PASID-tagged interrupt request: this platform cannot receive them")
            return
        res = self.ir.remap(rid, addr, data, pasid)
        tr = self.tracer
        if tr.on:
            self._trace_remap(tr, res, rid, addr, data, pasid, origin, t_ns)
        kind = type(res)
        if kind is Remapped or kind is Passthrough:
            dest = self.apic_owner.get(res.dest_id)
            if dest is None:
                self.counters["irq:no_cpu"] += 1
                return
            self.irqs_delivered += 1
            self.send(dest.identity, wire.irq(res.dest_id, res.vector, origin if type(origin) is int else None,
                                              t_ns if type(t_ns) is int else 0,
                                              res.index if kind is Remapped else -1))
        elif kind is Posted:
            self._post(res, origin if type(origin) is int else None, t_ns if type(t_ns) is int else 0)
        else:
            self.counters[f"irq:fault:0x{int(res.reason):02x}"] += 1
            self.src_faults[(rid, int(res.reason))] += 1
            self._announce(FaultRecord(res.reason, rid, "intr", index=res.index & 0xFFFF))

    def _post(self, res: Posted, origin: int | None, t_ns: int) -> None:
        """A posted-format IRTE hit: set PIR, notify the running vCPU (see PostedDescriptor)."""
        pid = self.pids.get(res.pda)
        if pid is None or not self.platform.posted:
            self.counters["irq:posted_no_descriptor"] += 1
            return
        pid.posted += 1
        self.irqs_posted += 1
        pir = pid.pir
        if self._batching and not pid.sn:
            self._pir_set(pid, res.vector, origin, t_ns)
            if not pid.on:
                pid.on = True                  # the notification goes at the end of the message
                self._deferred.append(pid)
            return
        if not pir and not pid.sn and not pid.on and self._send_posted(pid, [[res.vector, origin, t_ns, 1]]):
            # the common case, a running vCPU with nothing pending: the bit goes into PIR and
            # the notification takes it at once (no PIR bookkeeping on the hot path)
            return
        self._pir_set(pid, res.vector, origin, t_ns)
        if pid.on:
            return
        if pid.sn and not res.urgent:
            pid.suppressed += 1
            held = pid.held = pid.held + 1
            if not held & (held - 1):
                # the 1st, 2nd, 4th, 8th ... posting held for a descheduled vCPU: the
                # controller can await the state it wants; a storm costs log2(n) events
                self._broadcast_event("fabric", "posted-held", {"vm": pid.vm, "vcpu": pid.vcpu, "held": held,
                                                                "pir": sorted(pir)})
            return
        self._notify(pid)

    @staticmethod
    def _pir_set(pid: PostedDescriptor, vector: int, origin: int | None, t_ns: int) -> None:
        """Set PIR[vector]; a bit already set absorbs the posting (the latest provenance wins)."""
        prev = pid.pir.get(vector)
        if prev is None:
            pid.pir[vector] = (origin, t_ns, 1)
        else:
            pid.pir[vector] = (origin, t_ns, prev[2] + 1)
            pid.merged += 1

    def _notify_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for pid in deferred:
            if pid.on:
                pid.on = False
                if pid.pir and not pid.sn:
                    self._notify(pid)

    def _notify(self, pid: PostedDescriptor) -> None:
        """Posted-interrupt processing: hand every PIR bit to the vCPU and clear ON (when its VM
        is gone, PIR keeps the bits until it is back)."""
        if self._send_posted(pid, [[v, o, t, n] for v, (o, t, n) in sorted(pid.pir.items())]):
            pid.pir.clear()
            pid.on = False

    def _send_posted(self, pid: PostedDescriptor, entries: list) -> bool:
        """The POSTED notification carrying ``entries`` to the vCPU; False if its VM is gone."""
        guest = self.by_name.get(pid.vm)
        if guest is None or guest.role != "guest":
            return False
        pid.notified += 1
        for e in entries:                   # every posting a bit absorbed was delivered with it
            self.irqs_delivered += e[3]
        if self.tracer.on:
            self.tracer.instant("POSTED notification", "irq", vm=pid.vm, vcpu=pid.vcpu, vectors=len(entries))
        self.send(guest.identity, wire.posted(pid.vcpu, entries))
        return True

    def _trace_remap(self, tr: Tracer, res, rid: int, addr: int, data: int, pasid, origin, t_ns) -> None:
        fid = flow_id(origin if type(origin) is int else None, t_ns if type(t_ns) is int else 0)
        if type(res) is Remapped:
            tr.rec("t", "IR remap", "ir", fid, _TK_REMAP, rid, addr, data, pasid, res.index, res.dest_id, res.vector)
        elif type(res) is Passthrough:
            tr.rec("t", "IR passthrough", "ir", fid, _TK_PASSTHROUGH, rid, addr, data, pasid, res.dest_id, res.vector)
        elif type(res) is IrFault:
            tr.flow("f", f"IR fault 0x{int(res.reason):02x}", "fault", fid, sid=rid, addr=addr, data=data,
                    pasid=pasid, index=res.index, why=res.detail)
        elif type(res) is Posted:
            pid = self.pids.get(res.pda)
            tr.rec("t", "IR posted", "ir", fid, _TK_POSTED, rid, addr, data, pasid, res.index, res.vector,
                   pid.vm if pid else None, pid.vcpu if pid else None)
            old = pid.pir.get(res.vector) if pid else None
            if old is not None:   # the PIR bit is already set: the earlier interrupt merges into this one
                tr.flow("f", "coalesced in PIR", "ir", flow_id(old[0], old[1] or 0), vector=res.vector)

    def _ir_fault(self, rid: int, reason: int, index: int, addr: int, data: int, pasid, detail: str) -> None:
        rec = FaultRecord(reason, rid, "intr", index=index, detail={"addr": addr, "data": data, "why": detail})
        self.fault_log.record(rec)
        self.counters[f"irq:fault:0x{int(reason):02x}"] += 1
        self.src_faults[(rid, int(reason))] += 1
        self._announce(rec)

    def _dma(self, peer: Peer, raw: bytes, off: int, ftype: int, rid: int, addr: int, write: bool) -> None:
        """Device DMA: translate through the requester's IOMMU context, then to the RAM owner."""
        self.dma_tlps += 1
        size = _request_bytes(raw, off) if not write else len(raw) - off - (16 if ftype == _MWR64 else 12)
        pasid = T.prefix_pasid(raw) if off else None
        res = self.iommu.translate(rid, addr, size or 4, write, pasid)
        if type(res) is Translation:
            owner = self.by_name.get(res.owner)
            if owner is None:
                self.counters["dma:owner_absent"] += 1
                if not write:
                    self._ur_to_device(peer, raw)
                return
            if not write and owner.spec.role == "guest":
                self._guest_reads[(owner.identity, rid, _request_tag(raw, off))] += 1
            if res.local_addr != addr:
                raw = _readdress(raw, off, ftype, res.local_addr)
            self.send(owner.identity, wire.tlp(raw))
            return
        if type(res) is DmaFault:
            self.counters[f"dma:fault:0x{int(res.reason):02x}"] += 1
            self.src_faults[(rid, int(res.reason))] += 1
            self._announce(FaultRecord(res.reason, rid, "dma-write" if write else "dma-read",
                                       addr=addr & 0xFFFF_FFFF_FFFF_FFFF, pasid=pasid))
        else:  # Unclaimed: translated to an address no RAM owner claims
            self.counters["dma:unmapped"] += 1
        if not write:
            self._ur_to_device(peer, raw)

    def _ur_to_device(self, peer: Peer, raw: bytes) -> None:
        req = T.Tlp.unpack(raw)
        cpl = T.Tlp.completion(req, ROOT_COMPLEX_RID, T.CplStatus.UR)
        self.send(peer.identity, wire.tlp(cpl.pack()))

    # ------------------------------------------------------------------
    # TLPs from CPU ports (the host)

    def _cpu_tlp(self, peer: Peer, msg: list) -> None:
        raw = msg[1]
        if type(raw) is not bytes:
            raise wire.WireError("TLP payload is not bytes")
        ftype, off, rid, addr = T.peek(raw)
        self.tlps += 1
        if self.tracer.on:
            self.tracer.rec("i", _TLP_NAMES.get(ftype, "TLP"), "tlp", None, _TK_CPU, peer.name, addr)
        if ftype == _CFGRD or ftype == _CFGWR:
            target = addr >> 16
            dest = self.bus_owner[target >> 8]
            if dest is None:
                self._rc_ur(peer, raw)
                return
            self._forward_nonposted(peer, dest, raw, off)
        elif ftype == _MWR32 or ftype == _MWR64:
            dest = self._window(addr)
            if dest is None:
                self.counters["mmio:master_abort"] += 1
                return
            self.send(dest.identity, wire.tlp(_stamp_requester(raw, off, ROOT_COMPLEX_RID)))
        elif ftype == _MRD32 or ftype == _MRD64:
            dest = self._window(addr)
            if dest is None:
                self.counters["mmio:master_abort"] += 1
                self._rc_ur(peer, raw)
                return
            self._forward_nonposted(peer, dest, raw, off)
        elif ftype == _CPLT or ftype == _CPLD:
            if rid == ROOT_COMPLEX_RID:
                # The VMM completing a guest's read of a trapped page.
                self._completion(peer, raw, rid)
                return
            # The host's memory answering a device's DMA read: route by requester ID.
            dest = self.bus_owner[(rid >> 8) & 0xFF]
            if dest is None:
                self._drop(peer, "unroutable_completion")
                return
            self.send(dest.identity, wire.tlp(_stamp_completer(raw, ROOT_COMPLEX_RID)))
        else:
            self._drop(peer, "unsupported_tlp")

    def _forward_nonposted(self, peer: Peer, dest: Peer, raw: bytes, off: int) -> None:
        if not self._rc_free:
            self._drop(peer, "rc_tags_exhausted")
            return
        tag = self._rc_free.pop()
        self._rc_tags[tag] = (peer, _request_tag(raw, off), dest)
        self.send(dest.identity, wire.tlp(_stamp_request(raw, off, ROOT_COMPLEX_RID, tag)))

    def _rc_ur(self, peer: Peer, raw: bytes) -> None:
        """The root complex completes a request nobody decodes with Unsupported Request."""
        req = T.Tlp.unpack(raw)
        cpl = T.Tlp.completion(req, ROOT_COMPLEX_RID, T.CplStatus.UR)
        self.counters["rc:ur"] += 1
        self.send(peer.identity, wire.tlp(cpl.pack()))

    def _completion(self, peer: Peer, raw: bytes, requester: int) -> None:
        if requester == ROOT_COMPLEX_RID:
            tag = raw[10]
            entry = self._rc_tags[tag] if tag < RC_TAGS else None
            if entry is None or entry[2] is not peer:
                # Only the port the request went down can complete it; anyone else guessing
                # an outstanding tag would hijack the host's read (and free the tag).
                self._drop(peer, "unexpected_completion")
                return
            dest, orig_tag, _ = entry
            self._rc_tags[tag] = None
            self._rc_free.append(tag)
            self.send(dest.identity, wire.tlp(_stamp_completion_tag(raw, orig_tag)))
            return
        dest = self.bus_owner[(requester >> 8) & 0xFF]
        if dest is None:
            self._drop(peer, "unroutable_completion")
            return
        self.send(dest.identity, wire.tlp(raw))

    def _window(self, addr: int) -> Peer | None:
        i = bisect.bisect_right(self._win_base, addr) - 1
        if i >= 0:
            base, limit, peer = self._win[i]
            if addr <= limit:
                return peer
        return None

    # ------------------------------------------------------------------
    # guests: CPU accesses through the EPT, VM exits, injection

    def _guest_tlp(self, peer: Peer, msg: list) -> None:
        raw = msg[1]
        if type(raw) is not bytes:
            raise wire.WireError("TLP payload is not bytes")
        ftype, off, rid, addr = T.peek(raw)
        self.tlps += 1
        if self.tracer.on:
            self.tracer.rec("i", _TLP_NAMES.get(ftype, "TLP"), "tlp", None, _TK_CPU, peer.name, addr)
        if ftype == _CPLT or ftype == _CPLD:
            # The guest's RAM answering a DMA read of its assigned device -- one that was sent to
            # this guest; anything else would let it forge data into another port's reads.
            key = (peer.identity, rid, _completion_tag(raw))
            pending = self._guest_reads.get(key)
            if not pending:
                self._drop(peer, "unexpected_completion")
                return
            if pending == 1:
                del self._guest_reads[key]
            else:
                self._guest_reads[key] = pending - 1
            dest = self.bus_owner[(rid >> 8) & 0xFF]
            if dest is None:
                self._drop(peer, "unroutable_completion")
                return
            self.send(dest.identity, wire.tlp(_stamp_completer(raw, ROOT_COMPLEX_RID)))
            return
        write = ftype == _MWR32 or ftype == _MWR64
        if not (write or ftype == _MRD32 or ftype == _MRD64) or off:
            self._drop(peer, "unauthorized")   # config space is reached through VM exits only
            return
        if not write:
            # A read nobody can parse is never completed: it would leak a root-complex tag.
            T.Tlp.unpack(raw)
        size = len(raw) - off - (16 if ftype == _MWR64 else 12) if write else _request_bytes(raw, off)
        ept = self.epts.get(peer.name)
        hit = ept.lookup(addr, size) if ept is not None else None
        if type(hit) is EptHit and hit.kind == "mmio":
            dest = self._window(hit.hpa)
            if dest is None:
                self.counters["mmio:master_abort"] += 1
                if not write:
                    self._rc_ur(peer, raw)
                return
            raw = _readdress(raw, off, ftype, hit.hpa)
            if write:
                self.send(dest.identity, wire.tlp(_stamp_requester(raw, off, ROOT_COMPLEX_RID), peer.link))
            else:
                self._forward_nonposted(peer, dest, raw, off)
            return
        host = self.host
        if host is None:
            self._drop(peer, "no_host")
            return
        if type(hit) is EptHit:   # trap: the hypervisor emulates the access
            self.counters["ept:trap"] += 1
            if self.tracer.on:
                self.tracer.instant("VM exit: mmio", "vmexit", vm=peer.name, addr=addr, write=write)
            if write:
                # The vCPU stops until the VMM has emulated the store (VM entry, below).
                seq = -next(self._trap_seq)
                peer.stalled = seq
                if peer.backlog is None:
                    peer.backlog = deque()
                stamped = _stamp_requester(raw, off, ROOT_COMPLEX_RID)
                self.send(host.identity, wire.vmexit(peer.name, seq, "mmio", {"tlp": stamped}))
            elif self._rc_free:
                tag = self._rc_free.pop()
                self._rc_tags[tag] = (peer, _request_tag(raw, off), host)
                stamped = _stamp_request(raw, off, ROOT_COMPLEX_RID, tag)
                self.send(host.identity, wire.vmexit(peer.name, 0, "mmio", {"tlp": stamped}))
            else:
                self._drop(peer, "rc_tags_exhausted")
            return
        # EPT violation: nothing mapped there for this guest.
        self.counters["ept:violation"] += 1
        peer.drops["ept_violation"] += 1
        if self.tracer.on:
            self.tracer.instant("VM exit: ept_violation", "vmexit", vm=peer.name, addr=addr, write=write)
        self.send(host.identity, wire.vmexit(peer.name, 0, "ept_violation",
                                             {"gpa": addr, "size": size, "write": write}))
        if not write:
            self._rc_ur(peer, raw)

    def _vmexit(self, peer: Peer, msg: list) -> None:
        _, _vm, seq, reason, args = msg
        if type(seq) is not int or type(reason) is not str or type(args) is not dict:
            raise wire.WireError("VMEXIT fields have the wrong types")
        if seq < 0 or reason in _FABRIC_EXITS:
            # Negative seqs and EPT exits are the fabric's: a forged "mmio" exit would get the
            # host to complete another guest's trapped read, a negative seq end a trapped store.
            self._drop(peer, "spoofed_exit")
            return
        if self.host is None:
            self._drop(peer, "no_host")
            return
        self.counters["vmexit"] += 1
        if self.tracer.on:
            self.tracer.instant(f"VM exit: {reason}", "vmexit", vm=peer.name, seq=seq)
        self.send(self.host.identity, wire.vmexit(peer.name, seq, reason, args))

    def _vmentry(self, peer: Peer, msg: list) -> None:
        _, vm, seq, ok, result = msg
        guest = self.by_name.get(vm) if type(vm) is str else None
        if guest is None or guest.role != "guest" or type(seq) is not int:
            self._drop(peer, "unknown_vm")
            return
        if self.tracer.on:
            self.tracer.instant("VM entry", "vmexit", vm=vm, seq=seq, ok=bool(ok))
        if seq < 0:
            # The end of a trapped store: the vCPU resumes, its queued frames run in order.
            if guest.stalled == seq:
                guest.stalled = 0
                self._run_backlog(guest)
            return
        self.send(guest.identity, wire.vmentry(vm, seq, bool(ok), result))

    def _inject(self, peer: Peer, msg: list) -> None:
        _, vm, apic, vector, origin, t_ns = msg
        guest = self.by_name.get(vm) if type(vm) is str else None
        if guest is None or guest.role != "guest" or type(apic) is not int or type(vector) is not int:
            self._drop(peer, "unknown_vm")
            return
        self.counters["injected"] += 1
        if self.tracer.on:
            self.tracer.rec("t", "INJECT", "irq", flow_id(origin if type(origin) is int else None,
                                                         t_ns if type(t_ns) is int else 0),
                            _TK_INJECT, vm, apic, vector)
        self.send(guest.identity, wire.irq(apic, vector, origin if type(origin) is int else None,
                                           t_ns if type(t_ns) is int else 0, -2))

    # ------------------------------------------------------------------
    # privileged register interface (host only)

    def _reg(self, peer: Peer, msg: list) -> None:
        r = wire.as_reg(msg)
        op = self._reg_ops.get(r.op)
        if op is None:
            self.send(peer.identity, wire.reg_ack(r.seq, False, f"unknown register op {r.op!r}"))
            return
        try:
            result = op(peer, r.args)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:  # int(inf): OverflowError
            self.send(peer.identity, wire.reg_ack(r.seq, False, f"{r.op}: {exc}"))
            return
        self.send(peer.identity, wire.reg_ack(r.seq, True, result))

    def _reg_window_set(self, peer: Peer, a: dict) -> None:
        base, size, rid = int(a["base"]), int(a["size"]), int(a["rid"])
        if size <= 0 or base < 0 or base + size > 1 << 64:
            raise ValueError(f"bad window base 0x{base:x} size 0x{size:x}")
        dest = self.bus_owner[(rid >> 8) & 0xFF]
        if dest is None:
            raise ValueError(f"no device port owns {rid_str(rid)}")
        limit = base + size - 1
        for b, lim, _ in self._win:
            if base <= lim and b <= limit:
                if b == base and lim == limit:
                    break
                raise ValueError(f"window 0x{base:x}-0x{limit:x} overlaps 0x{b:x}-0x{lim:x}")
        self._window_remove(base)
        i = bisect.bisect_left(self._win_base, base)
        self._win_base.insert(i, base)
        self._win.insert(i, (base, limit, dest))

    def _window_remove(self, base: int) -> bool:
        i = bisect.bisect_left(self._win_base, base)
        if i < len(self._win_base) and self._win_base[i] == base:
            del self._win_base[i]
            del self._win[i]
            return True
        return False

    def _reg_window_clear(self, peer: Peer, a: dict) -> bool:
        return self._window_remove(int(a["base"]))

    def _reg_cpus_bind(self, peer: Peer, a: dict) -> None:
        for apic in a["apic_ids"]:
            self.apic_owner[int(apic)] = peer

    def _reg_ram_set(self, peer: Peer, a: dict) -> None:
        """Shorthand: the calling port's own RAM at HPA ``base`` (identity local addresses)."""
        self._reg_mem_map(peer, {"owner": peer.name, "hpa": a["base"], "size": a["size"], "local": a["base"]})

    def _reg_mem_map(self, peer: Peer, a: dict) -> None:
        """HPA [hpa, hpa+size) is RAM of process ``owner`` at its local address ``local``."""
        self.memmap.map_range(int(a["hpa"]), int(a["size"]), str(a["owner"]), int(a.get("local", 0)))

    def _reg_mem_unmap(self, peer: Peer, a: dict) -> None:
        self.memmap.unmap_owner(str(a["owner"]))

    def _reg_context_set(self, peer: Peer, a: dict) -> None:
        rid, mode = int(a["rid"]), str(a["mode"])
        if not 0 <= rid <= 0xFFFF:
            raise ValueError(f"RID 0x{rid:x}")
        if mode == "domain":
            self.iommu.set_context(rid, ("domain", int(a["domain"])))
        elif mode in ("pt", "block"):
            self.iommu.set_context(rid, mode)
        elif mode == "clear":
            self.iommu.clear_context(rid)
        else:
            raise ValueError(f"context mode {mode!r} (expected 'pt', 'block', 'domain' or 'clear')")

    def _reg_iommu_domain(self, peer: Peer, a: dict) -> None:
        op, dom = str(a["op"]), int(a["domain"])
        if op == "create":
            self.iommu.create_domain(dom)
        elif op == "destroy":
            self.iommu.destroy_domain(dom)
        else:
            raise ValueError(f"iommu.domain op {op!r} (expected 'create' or 'destroy')")

    def _reg_iommu_map(self, peer: Peer, a: dict) -> None:
        self.iommu.map(int(a["domain"]), int(a["iova"]), int(a["hpa"]), int(a["size"]),
                       read=bool(a.get("read", True)), write=bool(a.get("write", True)))

    def _reg_iommu_unmap(self, peer: Peer, a: dict) -> None:
        self.iommu.unmap(int(a["domain"]), int(a["iova"]), int(a["size"]))

    def _reg_ept_map(self, peer: Peer, a: dict) -> None:
        kind = str(a["kind"])
        ept = self.epts.setdefault(str(a["vm"]), Ept())
        ept.map(int(a["gpa"]), int(a["size"]), kind, int(a["hpa"]) if a.get("hpa") is not None else None)

    def _reg_pid_set(self, peer: Peer, a: dict) -> None:
        """A posted-interrupt descriptor at ``pda`` (64-byte aligned) for vCPU ``vcpu`` of ``vm``."""
        pda = int(a["pda"])
        if pda & 0x3F or not 0 < pda < 1 << 64:
            raise ValueError(f"descriptor address 0x{pda:x} is not 64-byte aligned")
        if not self.platform.posted:
            raise ValueError("this platform has no posted interrupts")
        self.pids[pda] = PostedDescriptor(str(a["vm"]), int(a["vcpu"]), int(a.get("nv", 0xF2)))

    def _reg_pid_clear(self, peer: Peer, a: dict) -> None:
        self.pids.pop(int(a["pda"]), None)

    def _reg_pid_sn(self, peer: Peer, a: dict) -> dict:
        """Set or clear SN (the host deschedules / schedules the vCPU); clearing it delivers
        what PIR accumulated meanwhile.  Returns the vectors pending in PIR (``pir``, and their
        number, ``pending``) and ``held``: the postings SN suppressed in this descheduled
        period (0 when setting SN)."""
        pid = self.pids[int(a["pda"])]
        pid.sn = bool(a["on"])
        if pid.sn:
            pid.held = 0                 # a new descheduled period
        pending, held = sorted(pid.pir), pid.held
        if not pid.sn and pid.pir and not pid.on:
            self._notify(pid)
        return {"pending": len(pending), "pir": pending, "held": held}

    def _reg_ept_destroy(self, peer: Peer, a: dict) -> bool:
        """The VM is gone: its whole EPT with it."""
        return self.epts.pop(str(a["vm"]), None) is not None

    def _reg_ept_unmap(self, peer: Peer, a: dict) -> None:
        ept = self.epts.get(str(a["vm"]))
        if ept is not None:
            ept.unmap(int(a["gpa"]), int(a["size"]))

    def _reg_irte_write(self, peer: Peer, a: dict) -> None:
        """Write a raw IRTE; ``pasid`` binds it to one PASID (platform ``pasid_ir`` only)."""
        index = int(a["index"])
        raw = int(a["lo"]) | (int(a["hi"]) << 64)
        pasid = a.get("pasid")
        if pasid is not None and not self.platform.pasid_ir:
            raise ValueError("this platform's IRTEs cannot check a PASID (pasid_ir is off)")
        self.ir.write_irte(index, raw, pasid=None if pasid is None else int(pasid))

    def _reg_iommu_pasid(self, peer: Peer, a: dict) -> None:
        """Scalable mode: requests from ``rid`` tagged with ``pasid`` translate through ``domain``."""
        if a.get("domain") is None:
            self.iommu.clear_pasid(int(a["rid"]), int(a["pasid"]))
        else:
            self.iommu.set_pasid(int(a["rid"]), int(a["pasid"]), int(a["domain"]))

    def _reg_irte_clear(self, peer: Peer, a: dict) -> None:
        self.ir.clear_irte(int(a["index"]))

    def _reg_ir_table(self, peer: Peer, a: dict) -> None:
        """IRTA_REG + SIRTP: the table size (a power of two up to the platform's IRT size)."""
        entries = int(a["entries"])
        if not self.platform.ir:
            raise ValueError("this platform has no interrupt-remapping unit")
        if entries > self.platform.ir_entries:
            raise ValueError(f"{entries} entries exceed the platform's {self.platform.ir_entries}")
        self.ir.set_table(entries)

    def _reg_ir_enable(self, peer: Peer, a: dict) -> None:
        if a["on"] and not self.platform.ir:
            raise ValueError("this platform has no interrupt-remapping unit")
        self.ir.set_ir_enabled(bool(a["on"]))

    def _reg_ir_cfi(self, peer: Peer, a: dict) -> None:
        self.ir.set_cfi(bool(a["on"]))

    def _reg_faults_drain(self, peer: Peer, a: dict) -> list[str]:
        return [rec.line() for rec in self.fault_log.drain()]

    # ------------------------------------------------------------------
    # faults

    def _announce(self, rec: FaultRecord) -> None:
        """Tell the shell about a reported fault (not about FPD-suppressed ones)."""
        if self.tracer.on:
            self.tracer.instant("DMAR fault", "fault", line=rec.line())
        log = self.fault_log
        seen = log.recorded + log.overflow
        if seen != self._faults_seen:
            self._faults_seen = seen
            self.on_fault(rec)

    # ------------------------------------------------------------------
    # control plane

    def _ctl(self, peer: Peer, msg: list) -> None:
        c = wire.as_ctl(msg)
        if c.peer == "fabric":
            try:
                result = self.control(c.op, c.args)
                self.send(peer.identity, wire.ctl_rep(c.req_id, True, result))
            except (ValueError, KeyError, TypeError) as exc:
                self.send(peer.identity, wire.ctl_rep(c.req_id, False, f"fabric: {c.op}: {exc}"))
            return
        dest = self.by_name.get(c.peer)
        if dest is None or dest.role == "control":
            self.send(peer.identity, wire.ctl_rep(c.req_id, False, f"no such peer {c.peer!r}"))
            return
        self._ctl_seq += 1
        self._ctl_routes[self._ctl_seq] = (peer, c.req_id, dest)
        self.send(dest.identity, wire.ctl(self._ctl_seq, peer.name, c.op, c.args))

    def _ctl_rep(self, peer: Peer, msg: list) -> None:
        route = self._ctl_routes.get(msg[1]) if type(msg[1]) is int else None
        if route is None or route[2] is not peer:
            # Only the peer asked may answer (ids are sequential: easy to guess).
            self._drop(peer, "unexpected_reply")
            return
        del self._ctl_routes[msg[1]]
        ctl_peer, req_id, _ = route
        self.send(ctl_peer.identity, wire.ctl_rep(req_id, bool(msg[2]), msg[3]))

    def _event(self, peer: Peer, msg: list) -> None:
        kind, data = msg[2], msg[3]
        if type(kind) is not str or type(data) is not dict:
            raise wire.WireError("EVENT fields have the wrong types")
        self._broadcast_event(peer.name, kind, data)

    def _broadcast_event(self, name: str, kind: str, data: dict) -> None:
        if self.controls:
            frame = wire.event(name, kind, data)
            for c in self.controls:
                self.send(c.identity, frame)

    def control(self, op: str, args: dict) -> Any:
        """Operations the fabric itself answers on the control interface."""
        if op == "counters":
            return self.snapshot()
        if op == "faults":
            by_source: dict[str, dict[str, int]] = {}
            for (rid, reason), n in sorted(self.src_faults.items()):
                by_source.setdefault(rid_str(rid), {})[f"0x{reason:02x}"] = n
            return {"lines": self.fault_lines(), "totals": {f"0x{int(k):02x}": v for k, v in self.fault_log.totals.items()},
                    "overflow": self.fault_log.overflow, "by_source": by_source}
        if op == "irt":
            return self.irt_dump()
        if op == "pids":
            return {f"0x{pda:x}": {"vm": d.vm, "vcpu": d.vcpu, "on": d.on, "sn": d.sn, "pir": sorted(d.pir),
                                   "posted": d.posted, "notified": d.notified, "suppressed": d.suppressed,
                                   "merged": d.merged, "held": d.held}
                    for pda, d in sorted(self.pids.items())}
        if op == "peers":
            return {p.name: {"role": p.role, "rx": p.rx, "drops": dict(p.drops),
                             **({"throttles": p.throttles, "wasted": p.wasted, "throttled": p.stalled == THROTTLED}
                                if p.role == "guest" else {})}
                    for p in self.peers.values()}
        if op == "shutdown":
            self.shutdown_requested = True
            return True
        if op == "peer.gone":
            return self.peer_gone(str(args["name"]))
        if op == "trace.start":
            return self.tracer.start(args.get("max_events"))
        if op == "trace.dump":
            return self.tracer.dump_chunk(args.get("offset", 0), chunk_budget("fabric"))
        raise KeyError(f"unknown op {op!r}")

    def peer_gone(self, name: str) -> dict:
        """A process died (its supervisor says so): forget its port, and complete with
        Unsupported Request every request that was waiting for it, so nothing hangs (a
        surprise removal, as a root port reports one).  Returns what was cleaned up."""
        peer = self.by_name.pop(name, None)
        if peer is None:
            return {"known": False}
        self.peers.pop(peer.identity, None)
        self.gone_identities.append(peer.identity)
        buses = [b for b in range(256) if self.bus_owner[b] is peer]
        for b in buses:
            self.bus_owner[b] = None
        for apic in [a for a, p in self.apic_owner.items() if p is peer]:
            del self.apic_owner[apic]
        if peer in self.controls:
            self.controls.remove(peer)
        if self.host is peer:
            self.host = None
        windows = [i for i, (_, _, p) in enumerate(self._win) if p is peer]
        for i in reversed(windows):
            del self._win_base[i]
            del self._win[i]
        completed = 0
        for tag, entry in enumerate(self._rc_tags):
            if entry is None:
                continue
            requester, orig_tag, dest = entry
            if dest is peer or requester is peer:
                self._rc_tags[tag] = None
                self._rc_free.append(tag)
                if dest is peer and requester is not peer:
                    # answer the requester: the device is gone (UR, as a master abort)
                    self.send(requester.identity, wire.tlp(_ur_for_tag(orig_tag)))
                    completed += 1
        for key in [k for k in self._guest_reads if k[0] == peer.identity]:
            # a device's DMA read of the dead guest's RAM: nobody will answer it, so the root
            # complex does (UR) -- else the device's tag stays taken for good (an SIOV PF's
            # fetch tags are shared by all its ADIs: other guests' interrupts would stall)
            n = self._guest_reads.pop(key)
            _, rid, tag = key
            dest = self.bus_owner[(rid >> 8) & 0xFF]
            if dest is not None:
                ur = T.Tlp(T.TlpType.CPL, requester_id=rid, tag=tag, completer_id=ROOT_COMPLEX_RID,
                           status=T.CplStatus.UR, byte_count=4).pack()
                for _ in range(n):
                    self.send(dest.identity, wire.tlp(ur))
                completed += n
        for rid in [r for r, (_, _, p) in self._ctl_routes.items() if p is peer]:
            ctl_peer, req_id, _ = self._ctl_routes.pop(rid)
            self.send(ctl_peer.identity, wire.ctl_rep(req_id, False, f"{name} is gone"))
        peer.backlog = None
        peer.stalled = 0
        self._throttled.pop(peer.identity, None)
        self.links.pop(peer.link, None)
        self.counters["peers_gone"] += 1
        self._broadcast_event("fabric", "gone", {"peer": name, "role": peer.role})
        return {"known": True, "role": peer.role, "buses": buses, "requests_completed": completed}

    def fault_lines(self) -> list[str]:
        return [rec.line() for rec in self.fault_log.pending()]

    def irt_dump(self) -> list[str]:
        """The IRT as Linux's debugfs ``intel_iommu/ir_translation_struct`` prints it, plus the
        lab's PASID binding (``pasid_ir``) and the source-validation fields."""
        out = ["Entry SrcID   DstID    Vct IRTE_high        IRTE_low         SQ SVT P  Mode     PASID"]
        for index, raw in sorted(self.ir.table.items()):
            e = Irte.unpack(raw)
            pasid = self.ir.expected_pasid(index)
            mode = "posted" if e.mode else "remapped"
            out.append(f"{index:<5d} {rid_str(e.sid)} {e.dest_id:08x} {e.vector:<3x} {raw >> 64:016x} "
                       f"{raw & (1 << 64) - 1:016x} {e.sq}  {e.svt}   {int(e.present)}  {mode:<8} "
                       + (f"0x{pasid:x}" if pasid is not None else "-"))
        return out

    def snapshot(self) -> dict:
        c = dict(self.counters)
        if self.irqs_posted:
            c["irq:posted"] = self.irqs_posted
        c.update(tlps=self.tlps, irqs_delivered=self.irqs_delivered, dma_tlps=self.dma_tlps,
                 ir_faults_total=sum(v for k, v in self.fault_log.totals.items() if int(k) >= 0x20),
                 dma_faults_total=sum(v for k, v in self.fault_log.totals.items() if int(k) < 0x20),
                 rc_tags_in_use=RC_TAGS - len(self._rc_free))
        return c
