"""fabric.bus: the pure fabric model driven frame by frame (no sockets, no processes, no loop).

Topology used throughout (see ``Bench``):

    host  (role host)                       identity HOST
    d0    (role device, buses 1..1)         identity D0, functions 01:xx.x
    d1    (role device, buses 2..3)         identity D1, functions 02:xx.x and 03:xx.x
    g1    (role guest)                      identity G1
    ctl   (role control)                    identity CTL

The virtual-machine tests (end of file) add g2 (role guest, identity G2) and an EPT, RAM window
and IOMMU domain for g1 (see ``vm_bench``).
"""

from __future__ import annotations

import re

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric import tlp as T
from fabric import wire
from fabric.bus import CREDIT_WINDOW, RC_TAGS, Fabric, PeerSpec, Platform
from fabric.dmar import FaultReason, FaultRecord, reason_string
from fabric.ir import Irte, compose_compat, compose_remappable
from fabric.tlp import CplStatus, Tlp, TlpType

HOST, D0, D1, G1, CTL = b"\x00host", b"\x00d0", b"\x00d1", b"\x00g1", b"\x00ctl"
STRANGER = b"\x00stranger"
IDENT = {"host": HOST, "d0": D0, "d1": D1, "g1": G1, "ctl": CTL}
TOKEN = {name: f"tok-{name}" for name in IDENT}
ROLE = {"host": "host", "d0": "device", "d1": "device", "g1": "guest", "ctl": "control"}
D0_RID = 0x0100          # 01:00.0
D0_VF = 0x0181           # 01:10.1, same port
D1_RID = 0x0200          # 02:00.0
D1_RID2 = 0x0300         # 03:00.0, d1's subordinate bus
RAM_SIZE = 1 << 30
BAR = 0xFE00_0000
BAR_SIZE = 0x1000
MASK64 = (1 << 64) - 1


def specs() -> dict[str, PeerSpec]:
    return {
        TOKEN["host"]: PeerSpec("host", "host"),
        TOKEN["d0"]: PeerSpec("d0", "device", (1, 1)),
        TOKEN["d1"]: PeerSpec("d1", "device", (2, 3)),
        TOKEN["g1"]: PeerSpec("g1", "guest"),
        TOKEN["ctl"]: PeerSpec("ctl", "control"),
    }


class Bench:
    """A Fabric with a list as its send function; every emitted frame is decoded on the spot."""

    def __init__(self, platform: Platform | None = None, *,
                 register: tuple[str, ...] = ("ctl", "host", "d0", "d1", "g1"),
                 peer_specs: dict[str, PeerSpec] | None = None) -> None:
        self.sent: list[tuple[bytes, list]] = []
        self.faults: list[FaultRecord] = []
        self.f = Fabric(peer_specs if peer_specs is not None else specs(), platform or Platform(),
                        send=self._send, clock=lambda: 42, on_fault=self.faults.append)
        self._seq = 0
        for name in register:
            self.frame(IDENT[name], wire.hello(TOKEN[name], name))
            ident, msg = self.sent[0]
            assert ident == IDENT[name] and msg[0] == wire.WELCOME, self.sent
            self.sent.clear()

    def _send(self, identity: bytes, frame: bytes) -> None:
        assert type(identity) is bytes and type(frame) is bytes
        assert len(frame) <= wire.MAX_CONTROL_FRAME
        self.sent.append((identity, wire.decode(frame)))  # everything the fabric emits decodes

    # -- driving --------------------------------------------------------------------------------

    def frame(self, identity: bytes, frame: bytes) -> None:
        self.f.on_frame(identity, frame)

    def raw(self, identity: bytes, value) -> None:
        self.frame(identity, msgpack.packb(value, use_bin_type=True))

    def tlp(self, identity: bytes, tlp: Tlp | bytes, origin=None, t_ns: int = 0) -> None:
        raw = tlp.pack() if isinstance(tlp, Tlp) else tlp
        self.frame(identity, wire.tlp(raw, origin, t_ns))

    def take(self) -> list[tuple[bytes, list]]:
        out, self.sent = self.sent, []
        return out

    def one(self, identity: bytes | None = None) -> list:
        """Exactly one frame was sent (to ``identity``): return its message."""
        out = self.take()
        assert len(out) == 1, out
        if identity is not None:
            assert out[0][0] == identity, out
        return out[0][1]

    def one_tlp(self, identity: bytes) -> Tlp:
        msg = self.one(identity)
        assert msg[0] == wire.TLP, msg
        return Tlp.unpack(msg[1])

    def reg(self, op: str, args: dict) -> list:
        self._seq += 1
        self.frame(HOST, wire.reg(self._seq, op, args))
        ack = self.one(HOST)
        assert ack[0] == wire.REG_ACK and ack[1] == self._seq, ack
        return ack

    def reg_ok(self, op: str, args: dict):
        ack = self.reg(op, args)
        assert ack[2] is True, ack
        return ack[3]

    def ctl(self, op: str, args: dict | None = None, peer: str = "fabric", req_id: int = 7) -> list:
        self.frame(CTL, wire.ctl(req_id, peer, op, args or {}))
        return self.one(CTL)

    def dropped(self, identity: bytes, reason: str, count: int = 1) -> None:
        """The last frame was dropped for ``reason`` and the sender told (count ``count``)."""
        assert self.one(identity) == [wire.DROPPED, reason, count]

    @property
    def c(self):
        return self.f.counters

    def peer(self, name: str):
        return self.f.by_name[name]

    # -- programming ----------------------------------------------------------------------------

    def program_ir(self, entries: int = 256, cfi: bool = False, apics=(0, 1, 2, 3)) -> None:
        self.reg_ok("ir.table", {"entries": entries})
        self.reg_ok("ir.enable", {"on": True})
        self.reg_ok("ir.cfi", {"on": cfi})
        self.reg_ok("cpus.bind", {"apic_ids": list(apics)})

    def write_irte(self, index: int, entry: Irte | int) -> None:
        raw = entry.pack() if isinstance(entry, Irte) else entry
        self.reg_ok("irte.write", {"index": index, "lo": raw & MASK64, "hi": raw >> 64})

    def program_dma(self, mode: str | None = "pt", rid: int = D0_RID) -> None:
        self.reg_ok("ram.set", {"base": 0, "size": RAM_SIZE})
        if mode is not None:
            self.reg_ok("context.set", {"rid": rid, "mode": mode})


def msi(rid: int, handle: int, sub: int = 0, *, shv: bool = True, pasid: int | None = None) -> Tlp:
    """The remappable-format interrupt MWr a device sends for IRTE ``handle`` (+ ``sub``)."""
    lo, hi, data = compose_remappable(handle, sub, shv)
    assert hi == 0
    return Tlp.mem_write(lo, data.to_bytes(4, "little"), rid, pasid=pasid)


def msi_raw(rid: int, addr: int, data: int) -> Tlp:
    return Tlp.mem_write(addr, data.to_bytes(4, "little"), rid)


def compat(rid: int, apic: int, vector: int) -> Tlp:
    lo, hi, data = compose_compat(apic, vector)
    return msi_raw(rid, lo, data)


# ---------------------------------------------------------------------------------------------
# Registration


def test_device_welcome_carries_its_bus_range() -> None:
    b = Bench(register=())
    b.frame(D1, wire.hello(TOKEN["d1"], "d1"))
    assert b.one(D1) == [wire.WELCOME, wire.PROTOCOL_VERSION, "d1",
                         {"role": "device", "name": "d1", "buses": [2, 3]}]
    assert b.f.bus_owner[2] is b.f.bus_owner[3] is b.peer("d1")
    assert b.f.bus_owner[1] is None and b.f.bus_owner[4] is None
    assert b.c["registered"] == 1


def test_host_welcome_carries_platform_info() -> None:
    b = Bench(Platform(max_bus=8, ir=False, ir_entries=256, pasid_interrupts=False), register=())
    b.frame(HOST, wire.hello(TOKEN["host"], "host"))
    assert b.one(HOST) == [wire.WELCOME, 1, "host", {"role": "host", "name": "host", "max_bus": 8,
                                                       "ir": False, "ir_entries": 256, "pasid_ir": False,
                                                       "posted": False, "pasid_interrupts": False}]
    b = Bench(register=())
    b.frame(HOST, wire.hello(TOKEN["host"], "host"))
    assert b.one(HOST)[3] == {"role": "host", "name": "host", "max_bus": 32, "ir": True,
                              "ir_entries": 65536, "pasid_ir": False, "posted": False,
                              "pasid_interrupts": True}


def test_guest_and_control_welcome() -> None:
    b = Bench(register=())
    b.frame(G1, wire.hello(TOKEN["g1"], "g1"))
    assert b.one(G1) == [wire.WELCOME, 1, "g1", {"role": "guest", "name": "g1", "credit_window": CREDIT_WINDOW}]
    b.frame(CTL, wire.hello(TOKEN["ctl"], "ctl"))
    out = b.take()
    assert out[0] == (CTL, [wire.WELCOME, 1, "ctl", {"role": "control", "name": "ctl"}])
    # A control peer is told about its own registration too.
    assert out[1:] == [(CTL, [wire.EVENT, "fabric", "registered", {"peer": "ctl", "role": "control"}])]


def test_control_peers_get_a_registered_event_for_every_later_peer() -> None:
    b = Bench(register=("ctl",))
    for name in ("host", "d0", "g1"):
        b.frame(IDENT[name], wire.hello(TOKEN[name], name))
        out = b.take()
        assert out[0][0] == IDENT[name] and out[0][1][0] == wire.WELCOME
        assert out[1:] == [(CTL, [wire.EVENT, "fabric", "registered", {"peer": name, "role": ROLE[name]}])]
    # Without a control peer nothing is broadcast.
    b = Bench(register=())
    b.frame(D0, wire.hello(TOKEN["d0"], "d0"))
    assert [m[0] for _, m in b.take()] == [wire.WELCOME]


@pytest.mark.parametrize("spec", [
    PeerSpec("x", "vmm"), PeerSpec("x", "fabric"), PeerSpec("x", "device", (250, 300)),
    PeerSpec("x", "device", (-1, 2)), PeerSpec("x", "device", (3, 2)), PeerSpec("x", "device", (1, 2, 3)),
    PeerSpec("x", "guest", (1, 1)),
])
def test_bad_launcher_table_fails_at_construction(spec: PeerSpec) -> None:
    # ... rather than as an exception out of on_frame when that peer registers or speaks.
    with pytest.raises(ValueError):
        Fabric({"tok": spec})


def test_unknown_token_refused() -> None:
    b = Bench(register=())
    b.frame(STRANGER, wire.hello("tok-guessed", "d0"))
    msg = b.one(STRANGER)
    assert msg[0] == wire.REFUSED and "token" in msg[1]
    assert b.c["refused:token"] == 1 and STRANGER not in b.f.peers and not b.f.by_name


def test_reused_token_refused() -> None:
    b = Bench(register=("d0",))
    b.frame(STRANGER, wire.hello(TOKEN["d0"], "d0"))
    assert b.one(STRANGER)[0] == wire.REFUSED
    assert b.c["refused:token"] == 1
    assert b.f.bus_owner[1] is b.peer("d0") and b.peer("d0").identity == D0


def test_name_mismatch_refused_and_token_not_consumed() -> None:
    b = Bench(register=())
    b.frame(D0, wire.hello(TOKEN["d0"], "d1"))
    assert b.one(D0)[0] == wire.REFUSED
    assert b.c["refused:token"] == 1 and D0 not in b.f.peers
    b.frame(D0, wire.hello(TOKEN["d0"], "d0"))
    assert b.one(D0)[0] == wire.WELCOME


def test_wrong_protocol_version_refused_and_token_not_consumed() -> None:
    b = Bench(register=())
    b.raw(D0, [wire.HELLO, wire.PROTOCOL_VERSION + 1, TOKEN["d0"], "d0"])
    msg = b.one(D0)
    assert msg[0] == wire.REFUSED and "version" in msg[1]
    assert b.c["refused:version"] == 1 and not b.f.peers
    b.frame(D0, wire.hello(TOKEN["d0"], "d0"))
    assert b.one(D0)[0] == wire.WELCOME


@pytest.mark.parametrize("frame", [
    wire.tlp(Tlp.cfg_read(0x0100, 0).pack()),
    wire.reg(1, "ir.enable", {"on": True}),
    wire.ctl(1, "fabric", "shutdown", {}),
    wire.event("host", "x", {}),
    wire.ctl_rep(1, True, None),
    wire.welcome("d0", {}),
    b"",
    b"\xc1 garbage",
    msgpack.packb({"type": "HELLO"}),
    msgpack.packb([wire.HELLO, 1, 5, "d0"]),          # HELLO with wrong field types
    msgpack.packb([wire.HELLO, True, TOKEN["d0"], "d0"]),
    msgpack.packb([wire.HELLO, 1, TOKEN["d0"]]),       # wrong arity
], ids=lambda f: f[:6].hex() or "empty")
def test_anything_but_hello_from_unregistered_is_refused(frame: bytes) -> None:
    b = Bench(register=("ctl",))
    b.frame(STRANGER, frame)
    msg = b.one(STRANGER)
    assert msg[0] == wire.REFUSED
    assert b.c["drop:unregistered"] == 1 and STRANGER not in b.f.peers
    assert not b.f.shutdown_requested and not b.f.ir.enabled
    # The token it might have carried was not consumed.
    b.frame(D0, wire.hello(TOKEN["d0"], "d0"))
    assert b.take()[0][1][0] == wire.WELCOME


def test_big_frame_from_unregistered_is_counted_without_reply() -> None:
    b = Bench(register=())
    b.frame(STRANGER, wire.hello(TOKEN["d0"], "d0" + "x" * 5000))
    assert b.take() == [] and b.c["drop:unregistered"] == 1


def test_second_hello_from_a_registered_peer_is_unauthorized() -> None:
    b = Bench()
    b.frame(D0, wire.hello(TOKEN["d0"], "d0"))
    b.dropped(D0, "unauthorized")
    # Trying to grab another role's token from an existing port neither works nor burns the token.
    b = Bench(register=("host", "d0"))
    b.frame(D0, wire.hello(TOKEN["ctl"], "ctl"))
    b.dropped(D0, "unauthorized")
    assert b.peer("d0").role == "device" and "ctl" not in b.f.by_name and not b.f.controls
    b.frame(CTL, wire.hello(TOKEN["ctl"], "ctl"))
    assert b.take()[0][1][0] == wire.WELCOME
    assert b.c["drop:unauthorized"] == 1


# ---------------------------------------------------------------------------------------------
# Robustness: malformed frames are dropped and counted, never raised


@pytest.mark.parametrize("name", list(IDENT))
@pytest.mark.parametrize("frame", [
    b"",
    b"\xc1",
    b"\x00\x01\x02 definitely not msgpack \xff",
    msgpack.packb(None),
    msgpack.packb(12),
    msgpack.packb("TLP"),
    msgpack.packb(b"\x0a"),
    msgpack.packb({"0": 10}),
    msgpack.packb([]),
    msgpack.packb([99, 1, 2]),
    msgpack.packb([-5]),
    msgpack.packb(["TLP", b"", None, 0]),
    msgpack.packb([wire.TLP, b"\x00" * 12]),                # wrong arity
    msgpack.packb([wire.TLP, b"\x00" * 12, None, 0, 1]),
    msgpack.packb([wire.CTL, 1, "fabric", "counters"]),
    msgpack.packb([wire.REG, 1, "ir.enable"]),
    msgpack.packb([wire.EVENT, "x", "y", {}]) + b"\x00",      # trailing byte
], ids=lambda f: f[:8].hex() or "empty")
def test_malformed_frames_dropped(name: str, frame: bytes) -> None:
    b = Bench()
    ident = IDENT[name]
    b.frame(ident, frame)
    b.dropped(ident, "malformed")
    assert b.c["drop:malformed"] == 1
    assert b.peer(name).drops == {"malformed": 1} and b.peer(name).rx == 1


@pytest.mark.parametrize("name, frame", [
    ("d0", msgpack.packb([wire.TLP, "not bytes", None, 0])),
    ("d0", msgpack.packb([wire.TLP, None, None, 0])),
    ("d0", msgpack.packb([wire.TLP, [1, 2], None, 0])),
    ("host", msgpack.packb([wire.TLP, 1234, None, 0])),
    ("host", msgpack.packb([wire.REG, "1", "ir.enable", {"on": True}])),
    ("host", msgpack.packb([wire.REG, 1, b"ir.enable", {"on": True}], use_bin_type=True)),
    ("host", msgpack.packb([wire.REG, 1, "ir.enable", [["on", True]]])),
    ("host", msgpack.packb([wire.REG, True, "ir.enable", {"on": True}])),
    ("ctl", msgpack.packb([wire.CTL, "1", "fabric", "counters", {}])),
    ("ctl", msgpack.packb([wire.CTL, 1, 5, "counters", {}])),
    ("ctl", msgpack.packb([wire.CTL, 1, "fabric", "counters", None])),
    ("d0", msgpack.packb([wire.EVENT, "d0", 5, {}])),
    ("g1", msgpack.packb([wire.EVENT, "g1", "kind", ["not", "a", "map"]])),
    ("host", msgpack.packb([wire.EVENT, "host", None, {}])),
])
def test_wrong_field_types_dropped(name: str, frame: bytes) -> None:
    b = Bench()
    b.frame(IDENT[name], frame)
    b.dropped(IDENT[name], "malformed")
    assert b.c["drop:malformed"] == 1 and b.f.tlps == 0
    assert not b.f.ir.enabled and not b.f.shutdown_requested


@pytest.mark.parametrize("raw", [
    b"", b"\x00", bytes(11),                          # truncated
    bytes(13),                                        # MRd32 header + stray byte
    bytes([0x40, 0, 0, 2]) + bytes(8 + 4),            # MWr32 says 2 DW, carries 1
    bytes([0x30]) + bytes(11),                        # Msg: unsupported type
    bytes([0x91, 0, 0, 1]) + bytes([0x04]) + bytes(11),   # PASID prefix on a CfgRd
    bytes([0x90, 0, 0, 1]) + bytes(12),               # TPH prefix
    bytes([0x91, 0x30, 0, 0]) + bytes(12),            # PASID prefix with reserved bits
])
@pytest.mark.parametrize("name", ["host", "d0"])
def test_tlp_failing_peek_dropped(name: str, raw: bytes) -> None:
    b = Bench()
    b.tlp(IDENT[name], raw)
    b.dropped(IDENT[name], "malformed")
    assert b.f.tlps == 0


def test_tlp_that_peeks_but_does_not_unpack_is_dropped_when_a_reply_needs_it() -> None:
    # CfgRd with a nonzero Last DW BE (reserved) to an empty bus: the UR completion needs a Tlp.
    b = Bench()
    raw = bytearray(Tlp.cfg_read(0x0900, 0).pack())
    raw[7] = 0xFF
    b.tlp(HOST, bytes(raw))
    b.dropped(HOST, "malformed")


@pytest.mark.parametrize("name", ["d0", "g1"])
def test_oversized_data_frames_dropped(name: str) -> None:
    b = Bench()
    filler = "x" * wire.MAX_DATA_FRAME
    b.frame(IDENT[name], wire.event(name, "big", {"x": filler}))
    b.dropped(IDENT[name], "oversized")
    assert b.c["drop:oversized"] == 1 and b.peer(name).drops["oversized"] == 1


def test_data_frame_limit_is_inclusive() -> None:
    b = Bench()
    frame = wire.event("d0", "k", {"x": ""})
    pad = wire.MAX_DATA_FRAME - len(frame)
    frame = wire.event("d0", "k", {"x": "y" * pad})
    frame = wire.event("d0", "k", {"x": "y" * (pad - (len(frame) - wire.MAX_DATA_FRAME))})
    assert len(frame) == wire.MAX_DATA_FRAME
    b.frame(D0, frame)
    assert b.one(CTL)[2] == "k"
    b.frame(D0, frame[:-1] + b"yy")  # one byte too long (and no longer valid msgpack either)
    b.dropped(D0, "oversized")


def test_host_and_control_may_send_bigger_frames() -> None:
    b = Bench()
    big = "x" * (4 * wire.MAX_DATA_FRAME)
    b.frame(HOST, wire.event("host", "report", {"x": big}))
    assert b.one(CTL) == [wire.EVENT, "host", "report", {"x": big}]
    b.frame(HOST, bytes(wire.MAX_CONTROL_FRAME + 1))
    b.dropped(HOST, "oversized")
    b.frame(CTL, bytes(wire.MAX_CONTROL_FRAME + 1))
    b.dropped(CTL, "oversized")


def test_multipart_frames_dropped() -> None:
    b = Bench()
    ok = wire.event("d0", "k", {})
    b.f.on_multipart([D0] + [ok] * (wire.BATCH_MAX + 1))      # more than a batch may carry
    b.dropped(D0, "multipart")
    b.f.on_multipart([D0])
    b.dropped(D0, "multipart", 2)
    assert b.c["drop:multipart"] == 2 and b.peer("d0").drops == {"multipart": 2}
    b.f.on_multipart([STRANGER] + [ok] * (wire.BATCH_MAX + 1))
    b.f.on_multipart([])
    assert b.take() == [] and b.c["drop:unregistered"] == 2
    # The normal two-part message is one frame.
    b.f.on_multipart([D0, ok])
    assert b.one(CTL) == [wire.EVENT, "d0", "k", {}]


def test_coalesced_frames_are_handled_in_order_each_on_its_own() -> None:
    """A batch (wire.BATCH_MAX frames at most) is the same as its frames one by one: each is
    checked, counted and routed on its own, in order, and a bad one spoils only itself."""
    b = Bench()
    frames = [wire.event("d0", f"k{i}", {"i": i}) for i in range(wire.BATCH_MAX)]
    frames[3] = b"\xc1 not msgpack"
    b.f.on_multipart([D0] + frames)
    got = b.take()
    assert [m for ident, m in got if ident == CTL] == \
        [[wire.EVENT, "d0", f"k{i}", {"i": i}] for i in range(wire.BATCH_MAX) if i != 3]
    assert [m for ident, m in got if ident == D0] == [[wire.DROPPED, "malformed", 1]]
    assert b.peer("d0").drops == {"malformed": 1} and b.c["drop:multipart"] == 0


def test_a_batch_frame_is_its_frames_one_by_one_and_a_bad_batch_is_dropped_whole() -> None:
    b = Bench()
    frames = [wire.event("d0", f"k{i}", {"i": i}) for i in range(wire.BATCH_MAX)]
    frames[5] = b"\xc1 not msgpack"
    b.f.on_multipart([D0, wire.batch(frames)])
    got = b.take()
    assert [m for ident, m in got if ident == CTL] == \
        [[wire.EVENT, "d0", f"k{i}", {"i": i}] for i in range(wire.BATCH_MAX) if i != 5]
    assert [m for ident, m in got if ident == D0] == [[wire.DROPPED, "malformed", 1]]
    assert b.peer("d0").rx == wire.BATCH_MAX
    for bad in (wire._packb([wire.BATCH, frames + frames[:1]]),          # 65 frames
                wire._packb([wire.BATCH, [frames[0], wire.batch(frames[:2])]]),   # nested
                wire.BATCH_PREFIX + b"\xff"):                             # not msgpack
        b.f.on_multipart([D0, bad])
        assert [m for ident, m in b.take() if ident == CTL] == []       # nothing of it ran
    assert b.peer("d0").drops["malformed"] == 4
    # a guest's batch may not exceed BATCH_MAX data frames in bytes either
    big = wire._packb([wire.BATCH, [bytes(wire.MAX_DATA_FRAME)] * 2]) + bytes(wire.MAX_BATCH_FRAME)
    b.f.on_multipart([G1, big])
    assert b.peer("g1").drops["malformed"] == 1
    b.f.on_multipart([STRANGER, wire.batch(frames[:2])])
    assert b.c["drop:unregistered"] == 1


def test_dropped_notices_are_exponentially_spaced_per_reason() -> None:
    b = Bench()
    notices = []
    for _ in range(40):
        b.frame(D0, b"\xc1")
        notices += [m for ident, m in b.take() if ident == D0]
    assert notices == [[wire.DROPPED, "malformed", n] for n in (1, 2, 4, 8, 16, 32)]
    b.frame(D0, msgpack.packb([wire.REG, 1, "x", {}]))
    assert b.one(D0) == [wire.DROPPED, "unauthorized", 1]  # a new reason starts at 1
    assert b.c["drop:malformed"] == 40 and b.c["drop:unauthorized"] == 1
    peers = b.f.control("peers", {})
    assert peers["d0"] == {"role": "device", "rx": 41, "drops": {"malformed": 40, "unauthorized": 1}}
    assert peers["d1"] == {"role": "device", "rx": 0, "drops": {}}


# -- property: nothing a registered peer sends raises, and the bus keeps working -----------------

_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
         | st.text(max_size=12) | st.binary(max_size=24))
_value = st.recursive(_leaf, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), c, max_size=4),
                      max_leaves=10)


def _templates() -> list[bytes]:
    """Valid TLPs of every kind that peers send, as seeds to mutate."""
    rd = Tlp.mem_read(0x1000, 8, D0_RID, tag=3)
    return [
        Tlp.cfg_read(0x0100, 0x10, tag=1).pack(),
        Tlp.cfg_write(0x0200, 0x04, 6, tag=2).pack(),
        rd.pack(),
        Tlp.mem_read(0x1_0000_0000, 4, D0_RID, pasid=5).pack(),
        Tlp.mem_write(0x2000, b"abcd", D0_RID).pack(),
        Tlp.mem_write(BAR + 8, b"\x01\x02\x03\x04", 0).pack(),
        msi(D0_RID, 5).pack(),
        msi(D0_RID, 5, pasid=9).pack(),
        compat(D0_RID, 1, 0x30).pack(),
        Tlp.completion(rd, 0, CplStatus.SC, bytes(8)).pack(),
        Tlp.completion(Tlp.cfg_read(0x0100, 0, tag=0), 0x0100, CplStatus.SC, bytes(4)).pack(),
        Tlp.completion(Tlp.cfg_read(0x0100, 0, tag=0), 0x0100, CplStatus.UR).pack(),
    ]


@st.composite
def _mutated_tlp(draw) -> bytes:
    raw = bytearray(draw(st.sampled_from(_templates())))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] = draw(st.integers(0, 255))
    return bytes(raw)


_frames = st.one_of(
    st.binary(max_size=64),
    _value.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    st.tuples(st.sampled_from(sorted(wire._ARITY)), st.lists(_value, max_size=5)).map(
        lambda t: msgpack.packb([t[0], *t[1]], use_bin_type=True)),
    # right type and arity, random fields: gets past decode into the handlers
    st.sampled_from(sorted(wire._ARITY)).flatmap(lambda k: st.lists(
        _value, min_size=wire._ARITY[k] - 1, max_size=wire._ARITY[k] - 1).map(
        lambda rest: msgpack.packb([k, *rest], use_bin_type=True))),
    st.tuples(_mutated_tlp(), st.none() | st.integers(-1, 2**40) | _leaf, _leaf).map(
        lambda t: msgpack.packb([wire.TLP, *t], use_bin_type=True)),
    st.tuples(st.integers(0, 2**31), st.sampled_from(["d0", "d1", "g1", "host", "fabric", "ctl", "zz"]),
              st.sampled_from(["counters", "faults", "irt", "peers", "status", "x"]),
              st.dictionaries(st.text(max_size=4), _leaf, max_size=2)).map(lambda t: wire.ctl(*t)),
    st.tuples(st.integers(-3, 40), st.booleans(), _value).map(lambda t: wire.ctl_rep(*t)),
    st.tuples(st.text(max_size=8), st.text(max_size=8), st.dictionaries(st.text(max_size=4), _value,
                                                                         max_size=3)).map(lambda t: wire.event(*t)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([HOST, D0, D1, G1, CTL, STRANGER]), _frames), min_size=1, max_size=12))
def test_random_frames_never_raise_and_interrupts_still_flow(frames) -> None:
    b = Bench()
    b.program_ir()
    b.write_irte(5, Irte.remapped(0x41, 2, D0_RID))
    for identity, frame in frames:
        b.frame(identity, frame)         # must not raise
        b.f.on_multipart([identity, frame, frame])
    b.take()
    # Every counted drop is also attributed to a registered peer (or to "unregistered").
    # A guest's EPT violations are in its per-peer counts too, but they are VM exits to the
    # host, not drops: they are counted as "ept:violation".
    per_peer = sum(n for p in b.f.peers.values() for r, n in p.drops.items() if r != "ept_violation")
    counted = sum(v for k, v in b.c.items() if k.startswith("drop:") and k != "drop:unregistered")
    assert per_peer == counted
    assert sum(p.drops["ept_violation"] for p in b.f.peers.values()) == b.c["ept:violation"]
    assert all(p.role == "guest" for p in b.f.peers.values() if p.drops["ept_violation"])
    # The bus still works: d0's interrupt reaches the host.
    b.tlp(D0, msi(D0_RID, 5), origin=D0_RID, t_ns=99)
    assert b.take() == [(HOST, [wire.IRQ, 2, 0x41, D0_RID, 99, 5])]


def test_last_resort_net_counts_unexpected_handler_errors(monkeypatch) -> None:
    # Should a handler ever raise on a value that slipped past the type checks, the frame is
    # dropped as "invalid" and the bus goes on.
    b = Bench()
    for exc in (ValueError, TypeError, KeyError, IndexError, OverflowError):
        def boom(peer, msg, exc=exc):
            raise exc("hostile")
        monkeypatch.setitem(b.f._by_role["device"], wire.EVENT, boom)
        b.frame(D0, wire.event("d0", "k", {}))
        b.take()
        assert b.c[f"rejected:{exc.__name__}"] == 1
    assert b.c["drop:invalid"] == 5 and b.peer("d0").drops == {"invalid": 5}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=8), st.sampled_from(list(IDENT)))
def test_random_bytes_from_any_role_are_counted(frames: list[bytes], name: str) -> None:
    b = Bench()
    b.program_ir()
    b.write_irte(5, Irte.remapped(0x41, 2, D0_RID))
    before = sum(b.peer(name).drops.values())
    for frame in frames:
        b.frame(IDENT[name], frame)
    b.take()
    ok = 0
    for frame in frames:
        try:
            msg = wire.decode(frame)
        except wire.WireError:
            continue
        ok += 1
    assert sum(b.peer(name).drops.values()) - before >= len(frames) - ok
    b.tlp(D0, msi(D0_RID, 5), origin=1, t_ns=2)
    assert b.one(HOST) == [wire.IRQ, 2, 0x41, 1, 2, 5]


REG_KEYS = {
    "window.set": ("base", "size", "rid"), "window.clear": ("base",), "cpus.bind": ("apic_ids",),
    "ram.set": ("base", "size"), "context.set": ("rid", "mode", "domain"),
    "irte.write": ("index", "lo", "hi"),
    "irte.clear": ("index",), "ir.table": ("entries",), "ir.enable": ("on",), "ir.cfi": ("on",),
    "faults.drain": (), "nope": ("x",),
    "mem.map": ("owner", "hpa", "size", "local"), "mem.unmap": ("owner",),
    "iommu.domain": ("domain", "op"), "iommu.map": ("domain", "iova", "hpa", "size", "read", "write"),
    "iommu.unmap": ("domain", "iova", "size"), "ept.map": ("vm", "gpa", "size", "kind", "hpa"),
    "ept.unmap": ("vm", "gpa", "size"),
}
_arg = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, 2, 5, 256, 0x0100, 4096, 65536, BAR, 1 << 40, float("inf"), float("-inf"),
                     float("nan"), "pt", "block", "domain", "clear", "create", "destroy", "mmio", "trap",
                     "g1", "host", "", True, None]),
    st.lists(st.integers(-3, 300) | st.floats(), max_size=3),
    _value,
)


@st.composite
def _reg_call(draw) -> tuple[str, dict]:
    op = draw(st.sampled_from(sorted(REG_KEYS)))
    args = draw(st.fixed_dictionaries({}, optional={k: _arg for k in REG_KEYS[op]}))
    args.update(draw(st.dictionaries(st.text(max_size=4), _value, max_size=2)))
    return op, args


@settings(max_examples=600, deadline=None)
@given(st.lists(_reg_call(), min_size=1, max_size=4))
def test_every_reg_gets_exactly_one_ack(calls) -> None:
    b = Bench()
    for seq, (op, args) in enumerate(calls):
        b.frame(HOST, wire.reg(seq, op, args))
        out = b.take()
        assert len(out) == 1 and out[0][0] == HOST, out
        assert out[0][1][:2] == [wire.REG_ACK, seq]
        assert type(out[0][1][2]) is bool
    assert not b.c["drop:invalid"]


# ---------------------------------------------------------------------------------------------
# Authorization

SAMPLE = {
    wire.HELLO: wire.hello("tok-x", "x"),
    wire.WELCOME: wire.welcome("x", {}),
    wire.REFUSED: wire.refused("x"),
    wire.TLP: wire.tlp(Tlp.mem_read(0x5000_0000, 4).pack()),   # a read every role could try
    wire.IRQ: wire.irq(0, 0x30, None, 0),
    wire.REG: wire.reg(1, "ir.cfi", {"on": True}),
    wire.REG_ACK: wire.reg_ack(1, True, None),
    wire.CTL: wire.ctl(1, "fabric", "shutdown", {}),
    wire.CTL_REP: wire.ctl_rep(1, True, None),
    wire.EVENT: wire.event("x", "k", {}),
    wire.DROPPED: wire.dropped("x", 1),
    wire.VMEXIT: wire.vmexit("g1", 1, "cpuid", {"leaf": 0}),
    wire.VMENTRY: wire.vmentry("g1", 1, True, None),
    wire.INJECT: wire.inject("g1", 0, 0x30, None, 0),
}
ALLOWED = {
    "host": {wire.TLP, wire.REG, wire.EVENT, wire.CTL_REP, wire.VMENTRY, wire.INJECT},
    "d0": {wire.TLP, wire.EVENT, wire.CTL_REP},
    "g1": {wire.TLP, wire.VMEXIT, wire.EVENT, wire.CTL_REP},   # memory TLPs through its EPT
    "ctl": {wire.CTL},
}


@pytest.mark.parametrize("kind", sorted(SAMPLE), ids=lambda k: wire.MESSAGE_NAMES[k])
@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_authorization_matrix(name: str, kind: int) -> None:
    b = Bench()
    b.frame(IDENT[name], SAMPLE[kind])
    out = b.take()
    if kind in ALLOWED[name]:
        assert b.c["drop:unauthorized"] == 0
    else:
        assert out == [(IDENT[name], [wire.DROPPED, "unauthorized", 1])]
        assert b.c["drop:unauthorized"] == 1 and b.peer(name).drops == {"unauthorized": 1}
    # Only the control peer can shut the fabric down, only the host can program the IR unit.
    assert b.f.shutdown_requested == (name == "ctl" and kind == wire.CTL)
    assert b.f.ir.cfi == (name == "host" and kind == wire.REG)
    # Only the host reaches a guest with VMENTRY/INJECT, only a guest reaches the host with VMEXIT.
    to_g1 = [m[0] for ident, m in out if ident == G1 and m[0] != wire.DROPPED]
    if name == "host":
        assert to_g1 == {wire.VMENTRY: [wire.VMENTRY], wire.INJECT: [wire.IRQ]}.get(kind, [])
    elif name == "g1" and kind == wire.TLP:      # its own read, completed with UR
        assert to_g1 == [wire.TLP]
    else:
        assert to_g1 == []
    exits = [m for ident, m in out if ident == HOST and m[0] == wire.VMEXIT]
    if name == "g1" and kind == wire.VMEXIT:
        assert exits == [[wire.VMEXIT, "g1", 1, "cpuid", {"leaf": 0}]]
    elif name == "g1" and kind == wire.TLP:      # nothing mapped there: EPT violation
        assert exits == [[wire.VMEXIT, "g1", 0, "ept_violation", {"gpa": 0x5000_0000, "size": 4,
                                                                  "write": False}]]
    else:
        assert exits == []


def test_device_cannot_program_the_iommu() -> None:
    b = Bench()
    b.frame(D0, wire.reg(1, "context.set", {"rid": D0_RID, "mode": "pt"}))
    b.dropped(D0, "unauthorized")
    b.frame(G1, wire.reg(1, "context.set", {"rid": D0_RID, "mode": "pt"}))
    b.dropped(G1, "unauthorized")
    assert b.f.iommu.contexts() == {} and b.f.iommu.context(D0_RID) is None


def test_guest_tlps_without_ept_are_violations_and_config_tlps_unauthorized() -> None:
    # A guest's memory TLPs go through its EPT; with none, a store is an EPT violation the host
    # hears about (the guest hears nothing) -- never DMA, whatever context its address has.
    b = Bench()
    b.program_dma("pt")
    b.tlp(G1, Tlp.mem_write(0x1000, b"evil", 0))
    assert b.one(HOST) == [wire.VMEXIT, "g1", 0, "ept_violation", {"gpa": 0x1000, "size": 4, "write": True}]
    assert b.f.dma_tlps == 0 and b.c["ept:violation"] == 1
    # Config space is reached through VM exits only.
    b.tlp(G1, Tlp.cfg_read(0x0100, 0))
    b.dropped(G1, "unauthorized")
    b.tlp(G1, Tlp.cfg_write(0x0100, 0x04, 6))
    b.dropped(G1, "unauthorized", 2)
    assert b.c["drop:unauthorized"] == 2 and b.f.dma_tlps == 0
    assert b.f.snapshot()["rc_tags_in_use"] == 0


# ---------------------------------------------------------------------------------------------
# Stamping and ACS source validation


@pytest.mark.parametrize("tlp", [
    Tlp.mem_write(0x1000, b"data", D1_RID),                    # DMA write with d1's RID
    Tlp.mem_read(0x1000, 4, 0x0000),                           # pretending to be the root complex
    msi(D1_RID, 5),                                            # someone else's interrupt
    msi(0x0200 | D0_RID & 0xFF, 5),
    Tlp.mem_write(0x1000, b"data", 0xFF00),
], ids=["dma-write", "rc-rid", "msi", "msi-bus2", "bus-ff"])
def test_device_requester_outside_its_buses_is_spoofed(tlp: Tlp) -> None:
    b = Bench()
    b.program_dma("pt", rid=D1_RID)
    b.program_ir()
    b.write_irte(5, Irte.remapped(0x41, 2, D1_RID))
    b.tlp(D0, tlp)
    b.dropped(D0, "spoofed_rid")
    assert b.c["drop:spoofed_rid"] == 1 and b.f.tlps == 0 and b.f.dma_tlps == 0
    assert b.f.fault_log.recorded == 0 and b.faults == []


def test_device_with_several_buses_may_use_all_of_them() -> None:
    b = Bench()
    b.program_dma("pt", rid=D1_RID2)
    b.tlp(D1, Tlp.mem_write(0x1000, b"data", D1_RID2))
    assert b.one_tlp(HOST).requester_id == D1_RID2
    b.tlp(D1, Tlp.mem_write(0x1000, b"data", 0x0400))
    b.dropped(D1, "spoofed_rid")
    # Any function on its own bus passes ACS (this one then has no IOMMU context: a DMA fault).
    b.tlp(D0, Tlp.mem_write(0x1000, b"data", D0_VF))
    assert b.take() == [] and b.c["drop:spoofed_rid"] == 1 and b.c["dma:fault:0x02"] == 1


def test_device_port_without_buses_can_send_nothing() -> None:
    sp = specs()
    sp["tok-dx"] = PeerSpec("dx", "device")
    b = Bench(register=("host",), peer_specs=sp)
    b.frame(b"dx", wire.hello("tok-dx", "dx"))
    assert b.one(b"dx")[3] == {"role": "device", "name": "dx"}
    b.tlp(b"dx", Tlp.mem_write(0x1000, b"data", 0))
    b.dropped(b"dx", "spoofed_rid")


def test_device_completion_is_validated_on_its_completer_id() -> None:
    b = Bench()
    req = Tlp.cfg_read(0x0100, 0, tag=4)
    # Completer ID in d0's range, destination elsewhere: passes ACS (and goes to d1's port).
    b.tlp(D0, Tlp.completion(Tlp.mem_read(0x10, 4, D1_RID, tag=9), D0_RID, CplStatus.UR))
    cpl = b.one_tlp(D1)
    assert cpl.requester_id == D1_RID and cpl.tag == 9 and cpl.completer_id == D0_RID
    # Completer ID outside d0's range: spoofed, whatever the destination.
    b.tlp(D0, Tlp.completion(Tlp.mem_read(0x10, 4, D1_RID, tag=9), D1_RID, CplStatus.UR))
    b.dropped(D0, "spoofed_rid")
    b.tlp(D0, Tlp.completion(req, 0x0000, CplStatus.SC, bytes(4)))
    b.dropped(D0, "spoofed_rid", 2)


def _host_cfg_read(b: Bench, target: int, tag: int, requester: int = 0x1234) -> tuple[Tlp, Tlp]:
    """Host sends CfgRd0 with ``tag``; return (sent, what the device port received)."""
    sent = Tlp.cfg_read(target, 0x08, requester, tag=tag)
    b.tlp(HOST, sent)
    dest = b.f.bus_owner[target >> 8].identity
    return sent, b.one_tlp(dest)


def test_host_request_stamped_with_root_complex_rid_and_rc_tag() -> None:
    b = Bench()
    sent, got = _host_cfg_read(b, 0x0100, tag=0x3AB)
    assert got.requester_id == 0x0000
    assert 0 <= got.tag < RC_TAGS                      # 8-bit: T8/T9 cleared
    assert got.completer_id == 0x0100 and got.address == 0x08 and got.first_be == 0xF
    # Nothing else changed.
    a, z = sent.pack(), got.pack()
    assert [i for i in range(len(a)) if a[i] != z[i]] and all(
        a[i] == z[i] for i in range(len(a)) if i not in (1, 4, 5, 6))
    assert b.f.snapshot()["rc_tags_in_use"] == 1


@pytest.mark.parametrize("host_tag", [0, 0x7F, 0xFF, 0x100, 0x200, 0x3AB, 0x3FF])
def test_completion_returns_to_requesting_port_with_original_tag(host_tag: int) -> None:
    b = Bench()
    _sent, got = _host_cfg_read(b, 0x0100, tag=host_tag)
    cpl = Tlp.completion(got, 0x0100, CplStatus.SC, b"\x86\x80\x10\x15")
    b.tlp(D0, cpl)
    back = b.one_tlp(HOST)
    assert back.tag == host_tag
    assert back.data == b"\x86\x80\x10\x15" and back.status == CplStatus.SC
    assert back.requester_id == 0x0000 and back.completer_id == 0x0100
    assert b.f.snapshot()["rc_tags_in_use"] == 0


def test_concurrent_requests_get_distinct_rc_tags() -> None:
    b = Bench()
    got = [_host_cfg_read(b, 0x0100, tag=t)[1] for t in (5, 5, 0x205)]   # the host may reuse tags
    assert len({g.tag for g in got}) == 3
    for g, host_tag in reversed(list(zip(got, (5, 5, 0x205)))):
        b.tlp(D0, Tlp.completion(g, 0x0100, CplStatus.SC, bytes(4)))
        assert b.one_tlp(HOST).tag == host_tag


def test_unexpected_completion_dropped() -> None:
    b = Bench()
    b.tlp(D0, Tlp.completion(Tlp.cfg_read(0x0100, 0, tag=17), 0x0100, CplStatus.SC, bytes(4)))
    b.dropped(D0, "unexpected_completion")
    # A completion is consumed once: a duplicate is unexpected.
    _s, got = _host_cfg_read(b, 0x0100, tag=1)
    cpl = Tlp.completion(got, 0x0100, CplStatus.SC, bytes(4))
    b.tlp(D0, cpl)
    b.one_tlp(HOST)
    b.tlp(D0, cpl)
    b.dropped(D0, "unexpected_completion", 2)


def test_completion_only_accepted_from_the_port_the_request_went_to() -> None:
    b = Bench()
    _s, got = _host_cfg_read(b, 0x0100, tag=0x21)
    # d1 races to answer d0's config read with data of its own choosing.
    forged = Tlp.completion(got, D1_RID, CplStatus.SC, b"EVIL")
    b.tlp(D1, forged)
    b.dropped(D1, "unexpected_completion")
    real = Tlp.completion(got, 0x0100, CplStatus.SC, b"GOOD")
    b.tlp(D0, real)
    back = b.one_tlp(HOST)
    assert back.data == b"GOOD" and back.tag == 0x21


def test_rc_tag_exhaustion() -> None:
    b = Bench()
    outstanding = [_host_cfg_read(b, 0x0100, tag=i & 0x3FF)[1] for i in range(RC_TAGS)]
    assert len({t.tag for t in outstanding}) == RC_TAGS
    assert b.f.snapshot()["rc_tags_in_use"] == RC_TAGS
    b.tlp(HOST, Tlp.cfg_read(0x0100, 0, tag=1))
    b.dropped(HOST, "rc_tags_exhausted")
    b.reg_ok("window.set", {"base": BAR, "size": BAR_SIZE, "rid": D0_RID})
    b.tlp(HOST, Tlp.mem_read(BAR, 4, tag=1))       # MMIO reads that hit need a tag too
    out = b.take()
    assert out[-1] == (HOST, [wire.DROPPED, "rc_tags_exhausted", 2])
    # Requests that need no RC tag still flow: UR for an empty bus, posted writes.
    b.tlp(HOST, Tlp.cfg_read(0x0900, 0, tag=2))
    assert b.one_tlp(HOST).status == CplStatus.UR
    b.tlp(HOST, Tlp.mem_write(BAR, b"abcd"))
    assert b.one_tlp(D0).type == TlpType.MEM_WRITE
    # One completion frees one tag.
    b.tlp(D0, Tlp.completion(outstanding[100], 0x0100, CplStatus.SC, bytes(4)))
    assert b.one_tlp(HOST).tag == 100
    _s, got = _host_cfg_read(b, 0x0100, tag=3)
    assert got.tag == outstanding[100].tag
    assert b.c["drop:rc_tags_exhausted"] == 2


# ---------------------------------------------------------------------------------------------
# Routing


@pytest.mark.parametrize("target, port", [(0x0100, D0), (0x01F8 | 7, D0), (0x0200, D1), (0x0310, D1)])
def test_config_requests_routed_by_bus(target: int, port: bytes) -> None:
    b = Bench()
    b.tlp(HOST, Tlp.cfg_read(target, 0x40, tag=1))
    assert b.one_tlp(port).completer_id == target
    b.tlp(HOST, Tlp.cfg_write(target, 0x04, 0x6, tag=2))
    t = b.one_tlp(port)
    assert t.type == TlpType.CFG_WRITE_0 and t.data == (6).to_bytes(4, "little") and t.requester_id == 0
    b.tlp(port, Tlp.completion(t, target, CplStatus.SC))
    back = b.one_tlp(HOST)
    assert back.type == TlpType.CPL and back.tag == 2


@pytest.mark.parametrize("target", [0x0000, 0x0400, 0x0900, 0xFF00])
def test_config_request_to_empty_bus_gets_ur_with_host_tag(target: int) -> None:
    b = Bench()
    b.tlp(HOST, Tlp.cfg_read(target, 0, tag=0x2C5))
    cpl = b.one_tlp(HOST)
    assert cpl.type == TlpType.CPL and cpl.status == CplStatus.UR and cpl.tag == 0x2C5
    assert cpl.completer_id == 0x0000
    assert b.c["rc:ur"] == 1 and b.f.snapshot()["rc_tags_in_use"] == 0
    b.tlp(HOST, Tlp.cfg_write(target, 4, 1, tag=3))
    assert b.one_tlp(HOST).status == CplStatus.UR


def test_mmio_write_and_read_through_a_window() -> None:
    b = Bench()
    assert b.reg_ok("window.set", {"base": BAR, "size": BAR_SIZE, "rid": D0_RID}) is None
    b.tlp(HOST, Tlp.mem_write(BAR + 0x10, b"\x01\x00\x00\x00", 0x5555))
    w = b.one_tlp(D0)
    assert w.address == BAR + 0x10 and w.requester_id == 0 and w.data == b"\x01\x00\x00\x00"
    b.tlp(HOST, Tlp.mem_read(BAR + 0x20, 8, 0x5555, tag=0x155))
    r = b.one_tlp(D0)
    assert r.requester_id == 0 and r.tag < RC_TAGS and r.address == BAR + 0x20
    b.tlp(D0, Tlp.completion(r, D0_RID, CplStatus.SC, b"12345678"))
    c = b.one_tlp(HOST)
    assert c.tag == 0x155 and c.data == b"12345678"


def test_mmio_read_with_pasid_prefix_stamped_behind_the_prefix() -> None:
    b = Bench()
    b.reg_ok("window.set", {"base": BAR, "size": BAR_SIZE, "rid": D0_RID})
    sent = Tlp.mem_read(BAR + 0x40, 4, 0x4321, tag=0x2A5, pasid=0x7777, pmr=True)
    b.tlp(HOST, sent)
    got = b.one_tlp(D0)
    assert got.pasid == 0x7777 and got.pmr and got.requester_id == 0 and got.tag < RC_TAGS
    assert got.address == BAR + 0x40
    b.tlp(D0, Tlp.completion(got, D0_RID, CplStatus.SC, b"wxyz"))
    back = b.one_tlp(HOST)
    assert back.tag == 0x2A5 and back.data == b"wxyz"
    b.tlp(HOST, Tlp.mem_write(BAR, b"abcd", 0x4321, pasid=0x11))
    w = b.one_tlp(D0)
    assert w.pasid == 0x11 and w.requester_id == 0 and w.data == b"abcd"


def test_window_bounds() -> None:
    b = Bench()
    b.reg_ok("window.set", {"base": BAR, "size": BAR_SIZE, "rid": D0_RID})
    b.reg_ok("window.set", {"base": BAR + 0x10000, "size": 0x4000, "rid": D1_RID2})
    b.reg_ok("window.set", {"base": 0x40_0000_0000, "size": 0x10000, "rid": D1_RID})
    for addr, port in [(BAR, D0), (BAR + BAR_SIZE - 4, D0), (BAR + 0x10000, D1), (BAR + 0x13FFC, D1),
                       (0x40_0000_0000, D1), (0x40_0000_FFFC, D1)]:
        b.tlp(HOST, Tlp.mem_write(addr, b"abcd"))
        assert b.one_tlp(port).address == addr
    for addr in (BAR - 4, BAR + BAR_SIZE, BAR + 0x14000, 0x40_0001_0000, 0, 0xFEE0_0000):
        b.tlp(HOST, Tlp.mem_write(addr, b"abcd"))
        assert b.take() == []
    assert b.c["mmio:master_abort"] == 6


def test_overlapping_window_refused_and_clear() -> None:
    b = Bench()
    b.reg_ok("window.set", {"base": BAR, "size": BAR_SIZE, "rid": D0_RID})
    for base, size in [(BAR, 2 * BAR_SIZE), (BAR - 0x1000, 0x1001), (BAR + 0xFFF, 1), (BAR + 4, 4),
                       (BAR - 0x10000, 0x20000)]:
        ack = b.reg("window.set", {"base": base, "size": size, "rid": D1_RID})
        assert ack[2] is False and "overlaps" in ack[3]
    # Adjacent is fine; the identical window again is an idempotent re-program (may move ports).
    b.reg_ok("window.set", {"base": BAR + BAR_SIZE, "size": BAR_SIZE, "rid": D1_RID})
    b.reg_ok("window.set", {"base": BAR, "size": BAR_SIZE, "rid": D1_RID})
    b.tlp(HOST, Tlp.mem_write(BAR, b"abcd"))
    b.one_tlp(D1)
    assert b.reg_ok("window.clear", {"base": BAR}) is True
    assert b.reg_ok("window.clear", {"base": BAR}) is False
    b.tlp(HOST, Tlp.mem_write(BAR, b"abcd"))
    assert b.take() == [] and b.c["mmio:master_abort"] == 1
    b.reg_ok("window.set", {"base": BAR, "size": 16, "rid": D0_RID})   # the space is free again


@pytest.mark.parametrize("args", [
    {"base": BAR, "size": 0, "rid": D0_RID},
    {"base": BAR, "size": -1, "rid": D0_RID},
    {"base": -4096, "size": 4096, "rid": D0_RID},
    {"base": (1 << 64) - 4096, "size": 4097, "rid": D0_RID},
    {"base": BAR, "size": 4096, "rid": 0x0900},         # nobody owns bus 9
    {"base": BAR, "size": 4096},
    {"base": "x", "size": 4096, "rid": D0_RID},
    {"base": None, "size": 4096, "rid": D0_RID},
])
def test_bad_window_refused(args: dict) -> None:
    b = Bench()
    ack = b.reg("window.set", args)
    assert ack[2] is False and isinstance(ack[3], str) and ack[3].startswith("window.set")
    assert b.f._win == []


def test_mmio_read_miss_is_ur_and_write_miss_a_master_abort() -> None:
    b = Bench()
    b.tlp(HOST, Tlp.mem_read(BAR, 4, tag=0x1C0))
    cpl = b.one_tlp(HOST)
    assert cpl.status == CplStatus.UR and cpl.tag == 0x1C0 and cpl.type == TlpType.CPL
    assert b.c["mmio:master_abort"] == 1 and b.c["rc:ur"] == 1
    b.tlp(HOST, Tlp.mem_write(BAR, b"abcd"))
    assert b.take() == [] and b.c["mmio:master_abort"] == 2


def test_host_completion_routed_by_requester_bus() -> None:
    b = Bench()
    for rid, port in [(D0_RID, D0), (D0_VF, D0), (D1_RID, D1), (D1_RID2, D1)]:
        rd = Tlp.mem_read(0x8000, 4, rid, tag=0x42)
        b.tlp(HOST, Tlp.completion(rd, 0xABCD, CplStatus.SC, b"DATA"))
        cpl = b.one_tlp(port)
        assert cpl.requester_id == rid and cpl.tag == 0x42 and cpl.data == b"DATA"
        assert cpl.completer_id == 0x0000          # stamped: the root complex answered
    b.tlp(HOST, Tlp.completion(Tlp.mem_read(0x8000, 4, 0x0900), 0, CplStatus.UR))
    b.dropped(HOST, "unroutable_completion")


def test_device_completion_to_another_bus_routed_and_to_nowhere_dropped() -> None:
    b = Bench()
    b.tlp(D1, Tlp.completion(Tlp.mem_read(0x8000, 4, D0_RID, tag=3), D1_RID2, CplStatus.UR))
    assert b.one_tlp(D0).completer_id == D1_RID2
    b.tlp(D1, Tlp.completion(Tlp.mem_read(0x8000, 4, 0x0800, tag=3), D1_RID2, CplStatus.UR))
    b.dropped(D1, "unroutable_completion")


def test_device_config_request_unsupported() -> None:
    b = Bench()
    b.tlp(D0, Tlp.cfg_read(0x0200, 0, D0_RID))
    b.dropped(D0, "unsupported_tlp")


# ---------------------------------------------------------------------------------------------
# Interrupts


def test_remapped_interrupt_delivered_to_host() -> None:
    b = Bench()
    b.program_ir()
    b.write_irte(5, Irte.remapped(0x41, 2, D0_RID))
    b.tlp(D0, msi(D0_RID, 5), origin=0x0100, t_ns=123456)
    assert b.one(HOST) == [wire.IRQ, 2, 0x41, 0x0100, 123456, 5]
    # sub-handle: handle 4 + 1 selects entry 5
    b.tlp(D0, msi(D0_RID, 4, 1), origin=7, t_ns=8)
    assert b.one(HOST) == [wire.IRQ, 2, 0x41, 7, 8, 5]
    assert b.f.irqs_delivered == 2 and b.f.tlps == 2 and b.faults == [] and b.f.fault_lines() == []


def test_interrupt_provenance_is_sanitised_not_trusted() -> None:
    b = Bench()
    b.program_ir()
    b.write_irte(5, Irte.remapped(0x41, 2, D0_RID))
    for origin, t_ns in [(True, 5), ("d1", "now"), (None, None), ([1], 2.5), (b"x", {})]:
        b.raw(D0, [wire.TLP, msi(D0_RID, 5).pack(), origin, t_ns])
        assert b.one(HOST) == [wire.IRQ, 2, 0x41, None, 5 if t_ns == 5 else 0, 5]


def test_interrupt_with_pasid_prefix_needs_an_entry_bound_to_its_pasid() -> None:
    """A PASID-tagged interrupt request is delivered only through an IRTE bound to that PASID
    (platform ``pasid_ir``); a RID-only entry refuses it (0x26), and without ``pasid_ir`` no
    entry can take it -- else an ADI's DMA, tagged with its PASID, could use any entry of the
    RID it shares with its PF."""
    b = Bench(Platform(pasid_ir=True))
    b.program_ir()
    b.reg_ok("irte.write", {"index": 9, "lo": Irte.remapped(0x51, 1, D0_RID).pack() & MASK64, "hi": 0,
                            "pasid": 0x1234})
    b.write_irte(10, Irte.remapped(0x52, 1, D0_RID))
    b.tlp(D0, msi(D0_RID, 9, pasid=0x1234), origin=1, t_ns=2)
    assert b.one(HOST) == [wire.IRQ, 1, 0x51, 1, 2, 9]
    b.tlp(D0, msi(D0_RID, 10, pasid=0x1234))
    assert b.take() == [] and b.c["irq:fault:0x26"] == 1
    b.tlp(D0, msi(D0_RID, 10))                     # untagged: the RID-only entry takes it
    assert b.one(HOST)[1:3] == [1, 0x52]
    plain = Bench()                                 # no pasid_ir: every tagged request faults
    plain.program_ir()
    plain.write_irte(9, Irte.remapped(0x51, 1, D0_RID))
    plain.tlp(D0, msi(D0_RID, 9, pasid=0x1234))
    assert plain.take() == [] and plain.c["irq:fault:0x26"] == 1


def test_interrupt_from_any_function_of_the_port_validated_by_irte_sid() -> None:
    b = Bench()
    b.program_ir()
    b.write_irte(6, Irte.remapped(0x60, 3, D0_VF))
    b.tlp(D0, msi(D0_VF, 6))
    assert b.one(HOST)[1:3] == [3, 0x60]
    b.tlp(D0, msi(D0_RID, 6))                  # the PF using the VF's entry: SID check
    assert b.take() == [] and b.c["irq:fault:0x26"] == 1


def test_interrupt_to_an_apic_nobody_owns() -> None:
    b = Bench()
    b.program_ir(apics=(0, 1))
    b.write_irte(5, Irte.remapped(0x41, 7, D0_RID))
    b.tlp(D0, msi(D0_RID, 5))
    assert b.take() == [] and b.c["irq:no_cpu"] == 1 and b.f.irqs_delivered == 0


def test_ir_disabled_passes_compat_messages_through() -> None:
    b = Bench()
    b.reg_ok("cpus.bind", {"apic_ids": [0, 1]})
    b.tlp(D0, compat(D0_RID, 1, 0x33), origin=4, t_ns=5)
    assert b.one(HOST) == [wire.IRQ, 1, 0x33, 4, 5, -1]
    # Disabling IR after enabling it returns to pass-through.
    b.program_ir(apics=(0, 1))
    b.reg_ok("ir.enable", {"on": False})
    b.tlp(D0, compat(D0_RID, 0, 0x34))
    assert b.one(HOST)[1:3] == [0, 0x34]


def test_cfi_lets_compat_through_with_ir_enabled() -> None:
    b = Bench()
    b.program_ir(cfi=True)
    b.tlp(D0, compat(D0_RID, 3, 0x99))
    assert b.one(HOST) == [wire.IRQ, 3, 0x99, None, 0, -1]


def test_platform_without_ir_unit() -> None:
    b = Bench(Platform(ir=False))
    assert b.reg("ir.enable", {"on": True})[2] is False
    assert b.reg("ir.table", {"entries": 256})[2] is False
    b.reg_ok("ir.enable", {"on": False})
    b.reg_ok("cpus.bind", {"apic_ids": [0]})
    b.tlp(D0, compat(D0_RID, 0, 0x40))
    assert b.one(HOST)[1:3] == [0, 0x40]


@pytest.mark.parametrize("entries, ok", [(2, True), (256, True), (65536, True), (3, False), (0, False),
                                         (1, False), (131072, False), ("x", False), (None, False)])
def test_ir_table_sizes(entries, ok: bool) -> None:
    b = Bench()
    assert b.reg("ir.table", {"entries": entries})[2] is ok
    b = Bench(Platform(ir_entries=256))
    assert b.reg("ir.table", {"entries": 512})[2] is False


def _fault_setup_sid(b: Bench) -> Tlp:
    b.write_irte(5, Irte.remapped(0x41, 2, D1_RID))
    return msi(D0_RID, 5)


def _fault_setup_rsvd(b: Bench) -> Tlp:
    b.write_irte(5, Irte.remapped(0x41, 2, D0_RID).pack() | 1 << 12)   # reserved bit 12
    return msi(D0_RID, 5)


FAULTS = {
    "0x20-shv-data": (0x20, True, lambda b: msi_raw(D0_RID, compose_remappable(5)[0], 0x0001_0000), 0),
    "0x20-partial-be": (0x20, True, lambda b: Tlp.mem_write(compose_remappable(5)[0] + 1, b"\x00\x00",
                                                            D0_RID), 0),
    "0x20-two-dwords": (0x20, True, lambda b: Tlp.mem_write(compose_remappable(5)[0], bytes(8), D0_RID), 0),
    "0x20-word": (0x20, True, lambda b: Tlp.mem_write(compose_remappable(5)[0], b"\x05\x00", D0_RID), 0),
    "0x21": (0x21, True, lambda b: msi(D0_RID, 300), 300),
    "0x22": (0x22, True, lambda b: msi(D0_RID, 7), 7),
    "0x23": (0x23, False, lambda b: msi(D0_RID, 5), 5),
    "0x24": (0x24, True, _fault_setup_rsvd, 5),
    "0x25": (0x25, True, lambda b: compat(D0_RID, 1, 0x33), 0),
    "0x26": (0x26, True, _fault_setup_sid, 5),
}


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_ir_fault_reasons(case: str) -> None:
    reason, with_table, make, index = FAULTS[case]
    b = Bench()
    if with_table:
        b.program_ir(entries=256)
    else:  # 0x23: IR enabled but the IRT address was never programmed
        b.reg_ok("ir.enable", {"on": True})
        b.reg_ok("cpus.bind", {"apic_ids": [0, 1, 2, 3]})
    b.write_irte(6, Irte.remapped(0x41, 2, D0_RID))   # a valid entry elsewhere changes nothing
    tlp = make(b)
    b.tlp(D0, tlp, origin=1, t_ns=2)
    assert b.take() == [], "nothing may be delivered"
    assert b.f.irqs_delivered == 0
    assert b.c[f"irq:fault:0x{reason:02x}"] == 1
    assert sum(v for k, v in b.c.items() if k.startswith("irq:")) == 1
    # The shell is told once, with a record that names the reason, source and index.
    assert len(b.faults) == 1
    rec = b.faults[0]
    assert int(rec.reason) == reason and rec.source_id == D0_RID and rec.kind == "intr"
    assert rec.index == index
    line = (f"DMAR: [INTR-REMAP] Request device [01:00.0] fault index 0x{index:x} "
            f"[fault reason 0x{reason:02x}] {reason_string(reason)}")
    assert rec.line() == line
    assert b.f.fault_lines() == [line]
    faults = b.ctl("faults")
    assert faults == [wire.CTL_REP, 7, True, {"lines": [line], "totals": {f"0x{reason:02x}": 1},
                                             "overflow": 0,
                                             "by_source": {"01:00.0": {f"0x{reason:02x}": 1}}}]
    snap = b.f.snapshot()
    assert snap["ir_faults_total"] == 1 and snap["dma_faults_total"] == 0
    # Draining the log (the host's fault handler) returns the lines once.
    assert b.reg_ok("faults.drain", {}) == [line]
    assert b.reg_ok("faults.drain", {}) == [] and b.f.fault_lines() == []


def test_posted_irte_is_not_delivered_on_a_platform_without_posting() -> None:
    b = Bench()
    b.program_ir()
    b.write_irte(5, Irte.posted(0x41, 0x1000_0040, D0_RID))
    b.tlp(D0, msi(D0_RID, 5))
    assert b.take() == [] and b.c["irq:posted_no_descriptor"] == 1
    assert b.f.irqs_delivered == 0 and b.faults == [] and b.f.fault_lines() == []
    with pytest.raises(ValueError, match="no posted interrupts"):
        b.f._reg_pid_set(None, {"pda": 0x1000_0040, "vm": "g1", "vcpu": 0})


def test_posted_interrupt_reaches_the_vcpu_without_the_host() -> None:
    b = Bench(Platform(posted=True))
    b.program_ir()
    pda = 0x1000_0040
    b.reg_ok("pid.set", {"pda": pda, "vm": "g1", "vcpu": 1})
    b.write_irte(5, Irte.posted(0x41, pda, D0_RID))
    b.tlp(D0, msi(D0_RID, 5), origin=D0_RID, t_ns=77)
    out = b.take()
    assert out == [(G1, [wire.POSTED, 1, [[0x41, D0_RID, 77, 1]]])], out     # straight to g1: no host hop
    assert b.f.irqs_delivered == 1
    # SN set (vCPU descheduled): PIR accumulates, no notification; clearing SN delivers it
    assert b.reg_ok("pid.sn", {"pda": pda, "on": True}) == {"pending": 0, "pir": [], "held": 0}
    b.write_irte(6, Irte.posted(0x42, pda, D0_RID))
    b.tlp(D0, msi(D0_RID, 5), origin=D0_RID, t_ns=78)
    b.tlp(D0, msi(D0_RID, 6), origin=D0_RID, t_ns=79)
    b.tlp(D0, msi(D0_RID, 5), origin=D0_RID, t_ns=80)        # merges with the pending 0x41
    # the controller hears of the 1st and 2nd held postings (then the 4th, 8th ...), never the 3rd
    held = [m[3] for _, m in b.take() if m[0] == wire.EVENT and m[2] == "posted-held"]
    assert held == [{"vm": "g1", "vcpu": 1, "held": 1, "pir": [0x41]},
                    {"vm": "g1", "vcpu": 1, "held": 2, "pir": [0x41, 0x42]}], held
    pids = b.f.control("pids", {})[f"0x{pda:x}"]
    assert pids["pir"] == [0x41, 0x42] and pids["suppressed"] == 3 and pids["sn"] is True
    assert pids["merged"] == 1 and pids["held"] == 3
    b.frame(HOST, wire.reg(9, "pid.sn", {"pda": pda, "on": False}))
    # one notification; the 0x41 bit absorbed two postings (the latest's provenance travels)
    assert b.take() == [(G1, [wire.POSTED, 1, [[0x41, D0_RID, 80, 2], [0x42, D0_RID, 79, 1]]]),
                        (HOST, [wire.REG_ACK, 9, True, {"pending": 2, "pir": [0x41, 0x42], "held": 3}])]
    # a descriptor of a VM that is gone keeps its bits
    b.reg_ok("pid.clear", {"pda": pda})
    b.tlp(D0, msi(D0_RID, 5))
    assert b.take() == [] and b.c["irq:posted_no_descriptor"] == 1


def test_postings_in_one_bus_message_leave_as_one_notification() -> None:
    """A device's coalesced message of interrupt MWrs: PIR collects them (ON set) and the vCPU
    gets one POSTED at the end of the message, each bit with the postings it absorbed; a lone
    frame is notified at once; a descheduled vCPU (SN) still holds them."""
    b = Bench(Platform(posted=True))
    b.program_ir()
    pda = 0x1000_0040
    b.reg_ok("pid.set", {"pda": pda, "vm": "g1", "vcpu": 1})
    b.write_irte(5, Irte.posted(0x41, pda, D0_RID))
    b.write_irte(6, Irte.posted(0x42, pda, D0_RID))
    frames = [wire.tlp(msi(D0_RID, i).pack(), D0_RID, t) for i, t in ((5, 1), (6, 2), (5, 3), (5, 4))]
    b.f.on_multipart([D0, *frames])
    assert b.take() == [(G1, [wire.POSTED, 1, [[0x41, D0_RID, 4, 3], [0x42, D0_RID, 2, 1]]])]
    pid = b.f.control("pids", {})[f"0x{pda:x}"]
    assert (pid["posted"], pid["merged"], pid["notified"], pid["on"], pid["pir"]) == (4, 2, 1, False, [])
    b.f.on_multipart([D0, frames[0]])                      # one frame: notified at once
    assert b.take() == [(G1, [wire.POSTED, 1, [[0x41, D0_RID, 1, 1]]])]
    b.reg_ok("pid.sn", {"pda": pda, "on": True})
    b.f.on_multipart([D0, *frames])
    assert [m for _, m in b.take() if m[0] == wire.POSTED] == []
    assert b.f.control("pids", {})[f"0x{pda:x}"]["pir"] == [0x41, 0x42]


def test_fpd_suppresses_the_report_but_still_blocks() -> None:
    b = Bench()
    b.program_ir()
    b.write_irte(5, Irte.remapped(0x41, 2, D1_RID, fpd=True))
    b.tlp(D0, msi(D0_RID, 5))
    assert b.take() == [] and b.f.irqs_delivered == 0
    assert b.c["irq:fault:0x26"] == 1
    assert b.faults == [] and b.f.fault_lines() == [] and b.f.fault_log.suppressed[0x26] == 1
    # Not-present with FPD: suppressed too.
    b.write_irte(8, Irte(fpd=True))
    b.tlp(D0, msi(D0_RID, 8))
    assert b.take() == [] and b.faults == [] and b.f.fault_log.suppressed[0x22] == 1
    # The next unsuppressed fault is announced normally.
    b.tlp(D0, msi(D0_RID, 9))
    assert len(b.faults) == 1 and int(b.faults[0].reason) == 0x22


def test_fault_log_overflow_reported_in_faults() -> None:
    b = Bench()
    b.program_ir()
    for i in range(10):
        b.tlp(D0, msi(D0_RID, 100 + i))
    assert b.take() == []
    faults = b.f.control("faults", {})
    assert len(faults["lines"]) == 8 and faults["overflow"] == 2 and faults["totals"] == {"0x22": 10}
    assert [ln.split("fault index ")[1].split()[0] for ln in faults["lines"]] == [
        hex(100 + i) for i in range(8)]


def test_irte_clear_and_irt_dump() -> None:
    b = Bench()
    b.program_ir()
    b.write_irte(5, Irte.remapped(0x41, 2, D0_RID))
    dump = b.f.control("irt", {})
    assert len(dump) == 2 and dump[0].startswith("Entry SrcID   DstID    Vct IRTE_high")
    idx, sid, dst, vct, hi, lo, sq, svt, p, mode, pasid = dump[1].split()
    raw = Irte.remapped(0x41, 2, D0_RID).pack()
    assert (idx, sid, dst, vct) == ("5", "01:00.0", "00000200", "41")        # xAPIC: APIC ID in dest[15:8]
    assert (int(hi, 16), int(lo, 16)) == (raw >> 64, raw & (1 << 64) - 1)
    assert (sq, svt, p, mode, pasid) == ("0", "1", "1", "remapped", "-")
    assert b.ctl("irt")[3] == dump
    b.reg_ok("irte.clear", {"index": 5})
    assert b.f.control("irt", {}) == dump[:1]
    b.tlp(D0, msi(D0_RID, 5))
    assert b.take() == [] and b.c["irq:fault:0x22"] == 1


@pytest.mark.parametrize("args", [
    {"index": 70000, "lo": 1, "hi": 0},
    {"index": -1, "lo": 1, "hi": 0},
    {"index": 5, "lo": -1, "hi": 0},
    {"index": 5, "lo": 1, "hi": -1},
    {"index": 5, "lo": 1},
    {"index": "five", "lo": 1, "hi": 0},
    {"index": float("inf"), "lo": 1, "hi": 0},
    {"index": 5, "lo": float("nan"), "hi": 0},
    {"index": 5, "lo": 1, "hi": float("-inf")},
])
def test_bad_irte_write_refused(args: dict) -> None:
    b = Bench()
    ack = b.reg("irte.write", args)
    assert ack[2] is False and ack[3].startswith("irte.write")
    assert dict(b.f.ir.table) == {}


def test_unknown_reg_op() -> None:
    b = Bench()
    ack = b.reg("iommu.disable", {})
    assert ack[2] is False and "unknown register op" in ack[3]


@pytest.mark.parametrize("op, args", [
    ("cpus.bind", {"apic_ids": 5}), ("cpus.bind", {"apic_ids": ["x"]}), ("cpus.bind", {}),
    ("ram.set", {"base": 0}), ("context.set", {"rid": 1}), ("ir.enable", {}), ("ir.cfi", {}),
    ("irte.clear", {}), ("window.clear", {}), ("ram.set", {"base": float("inf"), "size": 1}),
    ("window.set", {"base": float("inf"), "size": 1, "rid": D0_RID}),
    ("cpus.bind", {"apic_ids": [float("inf")]}),
])
def test_bad_reg_args_get_a_negative_ack(op: str, args: dict) -> None:
    b = Bench()
    ack = b.reg(op, args)
    assert ack[2] is False and ack[3].startswith(op)


# ---------------------------------------------------------------------------------------------
# DMA


def test_dma_write_with_passthrough_context_reaches_host_ram() -> None:
    b = Bench()
    b.program_dma("pt")
    w = Tlp.mem_write(0x1000, b"payload!", D0_RID)
    b.tlp(D0, w, origin=3, t_ns=4)
    msg = b.one(HOST)
    assert msg == [wire.TLP, w.pack(), None, 0]      # forwarded as sent (RID already validated)
    assert b.f.dma_tlps == 1 and b.faults == []


def test_dma_read_round_trip() -> None:
    b = Bench()
    b.program_dma("pt")
    rd = Tlp.mem_read(0x2004, 8, D0_RID, tag=0x2F0)
    b.tlp(D0, rd)
    assert b.one_tlp(HOST) == rd
    b.tlp(HOST, Tlp.completion(rd, 0, CplStatus.SC, b"ABCDEFGH"))
    cpl = b.one_tlp(D0)
    assert cpl.tag == 0x2F0 and cpl.data == b"ABCDEFGH" and cpl.requester_id == D0_RID


def test_dma_data_is_not_overtaken_by_the_interrupt_that_follows() -> None:
    # DESIGN section 3: posted-write ordering per (source, destination).
    b = Bench()
    b.program_dma("pt")
    b.program_ir()
    b.write_irte(5, Irte.remapped(0x41, 0, D0_RID))
    for i in range(20):
        b.tlp(D0, Tlp.mem_write(0x1000 + 64 * i, i.to_bytes(4, "little"), D0_RID))
        b.tlp(D0, msi(D0_RID, 5), origin=i)
    kinds = [(m[0], m[3] if m[0] == wire.IRQ else Tlp.unpack(m[1]).data) for ident, m in b.take()
             if ident == HOST]
    assert kinds == [k for i in range(20) for k in ((wire.TLP, i.to_bytes(4, "little")), (wire.IRQ, i))]


def test_dma_without_context_faults_0x02() -> None:
    b = Bench()
    b.program_dma(None)
    b.tlp(D0, Tlp.mem_write(0x1234, b"xxxx", D0_RID))
    assert b.take() == []
    line = ("DMAR: [DMA Write NO_PASID] Request device [01:00.0] fault addr 0x1000 "
            "[fault reason 0x02] Present bit in context entry is clear")
    assert b.f.fault_lines() == [line]
    assert b.c["dma:fault:0x02"] == 1 and b.f.dma_tlps == 1
    assert [f.line() for f in b.faults] == [line]
    snap = b.f.snapshot()
    assert snap["dma_faults_total"] == 1 and snap["ir_faults_total"] == 0


def test_dma_blocked_context_faults_0x0d() -> None:
    b = Bench()
    b.program_dma("block")
    b.tlp(D0, Tlp.mem_write(0x5000, b"xxxx", D0_RID))
    assert b.take() == []
    blocked = ("DMAR: [DMA Write NO_PASID] Request device [01:00.0] fault addr 0x5000 "
               "[fault reason 0x0d] PCE for translation request specifies blocking")
    assert b.f.fault_lines() == [blocked]
    assert b.c["dma:fault:0x0d"] == 1 and len(b.faults) == 1 and b.faults[0].line() == blocked
    # With a PASID prefix the RID's PASID table decides first (fabric/iommu.py rule 1): a RID
    # without one is in legacy mode, so the request faults 0x31 before the context is read.
    b.tlp(D0, Tlp.mem_write(0x5000, b"xxxx", D0_RID, pasid=0x42))
    assert b.take() == []
    ttm0 = ("DMAR: [DMA Write PASID 0x42] Request device [01:00.0] fault addr 0x5000 "
            "[fault reason 0x31] SM: TTM 0 for request with PASID")
    assert b.f.fault_lines() == [blocked, ttm0]
    assert b.c["dma:fault:0x31"] == 1 and b.c["dma:fault:0x0d"] == 1
    assert [f.line() for f in b.faults] == [blocked, ttm0]
    assert b.f.control("faults", {})["by_source"] == {"01:00.0": {"0x0d": 1, "0x31": 1}}


def test_dma_read_without_context_faults_and_gets_ur() -> None:
    b = Bench()
    b.program_dma(None)
    rd = Tlp.mem_read(0x3000, 4, D0_RID, tag=0x99)
    b.tlp(D0, rd)
    cpl = b.one_tlp(D0)
    assert cpl.type == TlpType.CPL and cpl.status == CplStatus.UR
    assert cpl.requester_id == D0_RID and cpl.tag == 0x99
    assert b.f.fault_lines() == [
        "DMAR: [DMA Read NO_PASID] Request device [01:00.0] fault addr 0x3000 "
        "[fault reason 0x02] Present bit in context entry is clear"]
    assert b.faults[0].is_read


def test_context_is_per_rid() -> None:
    b = Bench()
    b.program_dma("pt", rid=D0_RID)
    b.tlp(D0, Tlp.mem_write(0x1000, b"xxxx", D0_VF))
    assert b.take() == [] and b.c["dma:fault:0x02"] == 1
    assert "[01:10.1]" in b.f.fault_lines()[0]
    b.reg_ok("context.set", {"rid": D0_RID, "mode": "block"})
    b.tlp(D0, Tlp.mem_write(0x1000, b"xxxx", D0_RID))
    assert b.take() == [] and b.c["dma:fault:0x0d"] == 1


def test_dma_outside_ram_is_unmapped() -> None:
    b = Bench()
    b.program_dma("pt")
    b.tlp(D0, Tlp.mem_write(RAM_SIZE, b"xxxx", D0_RID))
    assert b.take() == [] and b.c["dma:unmapped"] == 1
    b.tlp(D0, Tlp.mem_read(0x1_0000_0000, 4, D0_RID, tag=6))
    cpl = b.one_tlp(D0)
    assert cpl.status == CplStatus.UR and cpl.tag == 6
    assert b.c["dma:unmapped"] == 2 and b.f.fault_lines() == []
    b.tlp(D0, Tlp.mem_write(RAM_SIZE - 4, b"xxxx", D0_RID))    # last DW of RAM
    assert b.one(HOST)[0] == wire.TLP


def test_no_ram_programmed_is_unmapped() -> None:
    b = Bench()
    b.reg_ok("context.set", {"rid": D0_RID, "mode": "pt"})
    b.tlp(D0, Tlp.mem_write(0, b"xxxx", D0_RID))
    assert b.take() == [] and b.c["dma:unmapped"] == 1


@pytest.mark.parametrize("args", [{"rid": D0_RID, "mode": "nested"}, {"rid": -1, "mode": "pt"},
                                  {"rid": 0x10000, "mode": "pt"}, {"rid": D0_RID}])
def test_bad_context_refused(args: dict) -> None:
    b = Bench()
    assert b.reg("context.set", args)[2] is False
    assert b.f.iommu.contexts() == {}


def test_dma_into_interrupt_range_goes_to_ir_not_ram() -> None:
    b = Bench()
    b.program_dma("pt")
    b.program_ir()
    b.tlp(D0, msi(D0_RID, 5))
    assert b.take() == [] and b.c["irq:fault:0x22"] == 1 and b.f.dma_tlps == 0
    # just below and just above the window: DMA
    b.tlp(D0, Tlp.mem_write(0xFEDF_FFFC, b"xxxx", D0_RID))
    b.tlp(D0, Tlp.mem_write(0xFEF0_0000, b"xxxx", D0_RID))
    assert b.f.dma_tlps == 2 and b.c["dma:unmapped"] == 2


# ---------------------------------------------------------------------------------------------
# Control plane


def test_ctl_forwarded_with_fabric_id_and_reply_returned_with_original_id() -> None:
    b = Bench()
    b.frame(CTL, wire.ctl(1000, "d0", "status", {"verbose": True}))
    fwd = b.one(D0)
    assert fwd[0] == wire.CTL and fwd[2:] == ["ctl", "status", {"verbose": True}]
    fabric_id = fwd[1]
    b.frame(D0, wire.ctl_rep(fabric_id, True, {"state": "ok"}))
    assert b.one(CTL) == [wire.CTL_REP, 1000, True, {"state": "ok"}]
    # The route is used once.
    b.frame(D0, wire.ctl_rep(fabric_id, True, {"state": "again"}))
    b.dropped(D0, "unexpected_reply")


def test_ctl_ids_from_two_controllers_do_not_collide() -> None:
    sp = specs()
    sp["tok-ctl2"] = PeerSpec("ctl2", "control")
    b = Bench(peer_specs=sp)
    b.frame(b"ctl2", wire.hello("tok-ctl2", "ctl2"))
    b.take()
    b.frame(CTL, wire.ctl(1, "host", "a", {}))
    b.frame(b"ctl2", wire.ctl(1, "host", "b", {}))
    (i1, m1), (i2, m2) = b.take()
    assert m1[1] != m2[1] and m1[2] == "ctl" and m2[2] == "ctl2"
    b.frame(HOST, wire.ctl_rep(m2[1], False, "no"))
    assert b.one(b"ctl2") == [wire.CTL_REP, 1, False, "no"]
    b.frame(HOST, wire.ctl_rep(m1[1], True, "yes"))
    assert b.one(CTL) == [wire.CTL_REP, 1, True, "yes"]


def test_ctl_reply_only_accepted_from_the_peer_asked() -> None:
    b = Bench()
    b.frame(CTL, wire.ctl(55, "d0", "status", {}))
    fabric_id = b.one(D0)[1]
    # The guest guesses the id and forges d0's answer.
    b.frame(G1, wire.ctl_rep(fabric_id, True, {"state": "forged"}))
    b.dropped(G1, "unexpected_reply")
    b.frame(D1, wire.ctl_rep(fabric_id, False, "forged"))
    b.dropped(D1, "unexpected_reply")
    b.frame(D0, wire.ctl_rep(fabric_id, True, {"state": "real"}))
    assert b.one(CTL) == [wire.CTL_REP, 55, True, {"state": "real"}]


def test_ctl_to_guest_and_host() -> None:
    b = Bench()
    for name in ("g1", "host", "d1"):
        b.frame(CTL, wire.ctl(3, name, "ping", {}))
        fwd = b.one(IDENT[name])
        b.frame(IDENT[name], wire.ctl_rep(fwd[1], True, name))
        assert b.one(CTL) == [wire.CTL_REP, 3, True, name]


@pytest.mark.parametrize("peer", ["nobody", "ctl", "", "d2"])
def test_ctl_to_unknown_peer_errors(peer: str) -> None:
    b = Bench(register=("ctl", "host", "d0"))
    rep = b.ctl("status", peer=peer, req_id=12)
    assert rep[:3] == [wire.CTL_REP, 12, False] and "no such peer" in rep[3]


def test_ctl_to_a_peer_not_yet_registered_errors() -> None:
    b = Bench(register=("ctl",))
    rep = b.ctl("status", peer="d0")
    assert rep[2] is False


def test_ctl_reply_with_bad_id_dropped() -> None:
    b = Bench()
    b.raw(D0, [wire.CTL_REP, "1", True, None])
    b.dropped(D0, "unexpected_reply")
    b.frame(D0, wire.ctl_rep(12345, True, None))
    b.dropped(D0, "unexpected_reply", 2)


def test_fabric_control_ops() -> None:
    b = Bench()
    b.program_ir()
    b.write_irte(5, Irte.remapped(0x41, 2, D0_RID))
    b.tlp(D0, msi(D0_RID, 5))
    b.take()
    b.frame(D0, b"junk")
    b.take()
    rep = b.ctl("counters")
    assert rep[:3] == [wire.CTL_REP, 7, True]
    counters = rep[3]
    assert counters["tlps"] == 1 and counters["irqs_delivered"] == 1 and counters["registered"] == 5
    assert counters["drop:malformed"] == 1 and counters["rc_tags_in_use"] == 0
    assert counters["ir_faults_total"] == 0 and counters["dma_tlps"] == 0
    peers = b.ctl("peers")[3]
    assert {n: p["role"] for n, p in peers.items()} == ROLE
    assert peers["d0"]["drops"] == {"malformed": 1}
    irt = b.ctl("irt")[3]                                   # debugfs ir_translation_struct: header + 1 IRTE
    assert len(irt) == 2 and irt[0].startswith("Entry SrcID") and irt == b.f.irt_dump()
    assert irt[1].split()[:4] == ["5", "01:00.0", "00000200", "41"]
    assert b.ctl("faults")[3] == {"lines": [], "totals": {}, "overflow": 0, "by_source": {}}
    assert not b.f.shutdown_requested
    assert b.ctl("shutdown") == [wire.CTL_REP, 7, True, True]
    assert b.f.shutdown_requested


def test_fabric_control_unknown_op() -> None:
    b = Bench()
    rep = b.ctl("reboot")
    assert rep[:3] == [wire.CTL_REP, 7, False] and "unknown op" in rep[3]
    with pytest.raises(KeyError):
        b.f.control("reboot", {})


def test_events_are_stamped_with_the_sender_name() -> None:
    b = Bench()
    b.frame(G1, wire.event("host", "breach", {"vector": 0x41}))    # a guest claiming to be the host
    assert b.one(CTL) == [wire.EVENT, "g1", "breach", {"vector": 0x41}]
    b.frame(D0, wire.event("", "fault", {}))
    assert b.one(CTL) == [wire.EVENT, "d0", "fault", {}]


# ---------------------------------------------------------------------------------------------
# Virtual machines: guest CPU accesses through the EPT, VM exits and entries, injection, DMA
# into a guest's RAM through an IOMMU domain
#
# vm_bench(): d0's VF 01:10.1 has its BAR at HPA VF_BAR (4 pages, window to d0).  g1's EPT maps
# GPA GBAR: pages 0-1 pass through to VF_BAR, pages 2-3 (GTRAP) trap to the host.  g1's RAM is
# the HPA window GHPA..GHPA+GRAM (its GPA 0..GRAM), and the VF's context points at domain DOM,
# which maps IOVA = GPA onto that window (what host/vmm.py programs).

G2 = b"\x00g2"
VF_BAR = 0xFD00_0000
GBAR = 0xC000_0000
GTRAP = GBAR + 0x2000
GHPA = 1 << 40
GRAM = 16 << 20
DOM = 1


def vm_bench(*, g2: bool = False, dma: bool = True) -> Bench:
    sp = specs()
    sp["tok-g2"] = PeerSpec("g2", "guest")
    b = Bench(peer_specs=sp)
    if g2:
        b.frame(G2, wire.hello("tok-g2", "g2"))
        assert b.take()[0] == (G2, [wire.WELCOME, 1, "g2", {"role": "guest", "name": "g2",
                                                             "credit_window": CREDIT_WINDOW}])
    b.reg_ok("window.set", {"base": VF_BAR, "size": 0x4000, "rid": D0_VF})
    b.reg_ok("ept.map", {"vm": "g1", "gpa": GBAR, "size": 0x2000, "kind": "mmio", "hpa": VF_BAR})
    b.reg_ok("ept.map", {"vm": "g1", "gpa": GTRAP, "size": 0x2000, "kind": "trap"})
    if dma:
        b.reg_ok("mem.map", {"owner": "g1", "hpa": GHPA, "size": GRAM, "local": 0})
        b.reg_ok("iommu.domain", {"domain": DOM, "op": "create"})
        b.reg_ok("iommu.map", {"domain": DOM, "iova": 0, "hpa": GHPA, "size": GRAM,
                               "read": True, "write": True})
        b.reg_ok("context.set", {"rid": D0_VF, "mode": "domain", "domain": DOM})
    return b


def _unparseable_read(addr: int, tag: int = 3) -> bytes:
    """An MRd that frames correctly (``peek`` passes) but breaks the BE rules (``unpack`` fails)."""
    raw = bytearray(Tlp.mem_read(addr, 4, 0, tag=tag).pack())
    raw[7] = 0xFF                     # Last DW BE must be 0 for a 1-DW request
    return bytes(raw)


# -- EPT pass-through ---------------------------------------------------------------------------


def test_guest_passthrough_write_goes_to_the_hpa_stamped_by_the_root_complex() -> None:
    b = vm_bench()
    for off in (0x10, 0x1FFC):        # both pass-through pages
        sent = Tlp.mem_write(GBAR + off, b"\x01\x02\x03\x04", 0x4321)
        b.tlp(G1, sent, origin=5, t_ns=6)
        msg = b.one(D0)
        expect = Tlp.mem_write(VF_BAR + off, b"\x01\x02\x03\x04", 0x0000)
        # the guest's claimed provenance is not passed on: the origin is the fabric's link number
        # for g1 (what a device's WASTED names), never what the guest wrote there
        assert msg == [wire.TLP, expect.pack(), b.f.peers[G1].link, 0] and b.f.peers[G1].link != 5
        # Only the requester ID and the address changed.
        a, z = sent.pack(), msg[1]
        assert [i for i in range(len(a)) if a[i] != z[i]] and all(
            a[i] == z[i] for i in range(len(a)) if i not in (4, 5, 8, 9, 10, 11))
    assert b.f.epts["g1"].mmio_hits == 2 and b.f.epts["g1"].trap_hits == 0
    assert b.c["vmexit"] == 0 and b.c["ept:trap"] == 0 and b.c["ept:violation"] == 0
    assert b.f.dma_tlps == 0 and b.f.snapshot()["rc_tags_in_use"] == 0


@pytest.mark.parametrize("tag", [0, 0x7F, 0xFF, 0x100, 0x2A5, 0x3FF])
def test_guest_passthrough_read_completes_back_to_the_guest_with_its_tag(tag: int) -> None:
    b = vm_bench()
    b.tlp(G1, Tlp.mem_read(GBAR + 0x20, 8, 0x4321, tag=tag))
    r = b.one_tlp(D0)
    assert r.type == TlpType.MEM_READ and r.address == VF_BAR + 0x20 and r.length == 2
    assert r.requester_id == 0x0000 and 0 <= r.tag < RC_TAGS
    assert b.f.snapshot()["rc_tags_in_use"] == 1
    # Another port cannot complete it; the device it went to can.
    b.tlp(D1, Tlp.completion(r, D1_RID, CplStatus.SC, b"EVILEVIL"))
    b.dropped(D1, "unexpected_completion")
    b.tlp(D0, Tlp.completion(r, D0_VF, CplStatus.SC, b"12345678"))
    c = b.one_tlp(G1)
    assert c.type == TlpType.CPL_DATA and c.tag == tag and c.data == b"12345678"
    assert c.requester_id == 0x0000 and c.completer_id == D0_VF and c.status == CplStatus.SC
    assert b.f.snapshot()["rc_tags_in_use"] == 0
    # Consumed once.
    b.tlp(D0, Tlp.completion(r, D0_VF, CplStatus.SC, b"12345678"))
    b.dropped(D0, "unexpected_completion")


@pytest.mark.parametrize("gpa, hpa", [
    (0x1_0000_0000, VF_BAR),            # 4DW at the guest, 3DW at the device
    (0xD000_0000, 0x40_0000_0000),      # 3DW at the guest, 4DW at the device
    (0x2_0000_0000, 0x40_0000_0000),    # 4DW both sides
], ids=["4dw-to-3dw", "3dw-to-4dw", "4dw-to-4dw"])
def test_guest_passthrough_form_follows_the_new_address(gpa: int, hpa: int) -> None:
    b = vm_bench(dma=False)
    dest, cid = D0, D0_VF
    if hpa != VF_BAR:
        b.reg_ok("window.set", {"base": hpa, "size": 0x1000, "rid": D1_RID})
        dest, cid = D1, D1_RID
    b.reg_ok("ept.map", {"vm": "g1", "gpa": gpa, "size": 0x1000, "kind": "mmio", "hpa": hpa})
    b.tlp(G1, Tlp.mem_write(gpa + 0x25, b"abc", 0x77))          # partial BEs survive
    w = b.one_tlp(dest)
    assert w == Tlp.mem_write(hpa + 0x25, b"abc", 0x0000)
    assert w.type == (TlpType.MEM_WRITE_64 if hpa >> 32 else TlpType.MEM_WRITE)
    b.tlp(G1, Tlp.mem_read(gpa + 0x30, 8, 0x77, tag=0x1A5))
    r = b.one_tlp(dest)
    assert r.type == (TlpType.MEM_READ_64 if hpa >> 32 else TlpType.MEM_READ)
    assert r.address == hpa + 0x30 and r.length == 2 and r.requester_id == 0 and r.tag < RC_TAGS
    b.tlp(dest, Tlp.completion(r, cid, CplStatus.SC, b"12345678"))
    c = b.one_tlp(G1)
    assert c.tag == 0x1A5 and c.data == b"12345678"


def test_guest_passthrough_to_an_hpa_nobody_decodes_is_a_master_abort() -> None:
    b = vm_bench()
    b.reg_ok("ept.map", {"vm": "g1", "gpa": 0xE000_0000, "size": 0x1000, "kind": "mmio", "hpa": 0xFB00_0000})
    b.tlp(G1, Tlp.mem_write(0xE000_0010, b"abcd"))
    assert b.take() == [] and b.c["mmio:master_abort"] == 1
    b.tlp(G1, Tlp.mem_read(0xE000_0010, 4, tag=0x1C0))
    cpl = b.one_tlp(G1)
    assert cpl.type == TlpType.CPL and cpl.status == CplStatus.UR and cpl.tag == 0x1C0
    assert cpl.completer_id == 0x0000
    assert b.c["mmio:master_abort"] == 2 and b.c["rc:ur"] == 1
    assert b.c["vmexit"] == 0 and b.c["ept:violation"] == 0 and b.f.snapshot()["rc_tags_in_use"] == 0


def test_guest_with_pasid_prefix_is_unauthorized() -> None:
    b = vm_bench()
    b.tlp(G1, Tlp.mem_write(GBAR, b"abcd", pasid=5))
    b.dropped(G1, "unauthorized")
    b.tlp(G1, Tlp.mem_read(GBAR, 4, pasid=5))
    b.dropped(G1, "unauthorized", 2)
    assert b.f.epts["g1"].mmio_hits == 0 and b.f.snapshot()["rc_tags_in_use"] == 0


# -- trapped pages --------------------------------------------------------------------------------


def _trapped_store(b: Bench, off: int = 8, data: bytes = b"\x11\x22\x33\x44") -> int:
    """g1 stores to a trapped page; check the host's VM exit and return its (negative) seq."""
    b.tlp(G1, Tlp.mem_write(GTRAP + off, data, 0x4321))
    ex = b.one(HOST)
    assert ex[:2] == [wire.VMEXIT, "g1"] and ex[3] == "mmio" and list(ex[4]) == ["tlp"]
    seq = ex[2]
    assert type(seq) is int and seq < 0
    t = Tlp.unpack(ex[4]["tlp"])
    # The host emulates the store at its guest-physical address.
    assert t.type == TlpType.MEM_WRITE and t.byte_address() == GTRAP + off and t.payload_bytes() == data
    assert b.peer("g1").stalled == seq
    return seq


def test_trapped_store_exits_to_the_host_and_stalls_the_guest_until_vm_entry() -> None:
    b = vm_bench(g2=True)
    seq = _trapped_store(b)
    assert b.c["ept:trap"] == 1 and b.f.epts["g1"].trap_hits == 1
    rx = b.peer("g1").rx
    # While stalled, nothing the guest sends is processed: it waits, in order.
    later = [wire.tlp(Tlp.mem_write(GBAR + 0x40, b"AAAA").pack()),
             wire.event("g1", "progress", {"n": 1}),
             wire.tlp(Tlp.mem_write(GBAR + 0x44, b"BBBB").pack()),
             wire.vmentry("g1", seq, True, None)]          # a guest cannot end its own exit
    for frame in later:
        b.frame(G1, frame)
    assert b.take() == [] and list(b.peer("g1").backlog) == later and b.peer("g1").rx == rx
    # Entries that are not the one for this exit change nothing.
    b.frame(HOST, wire.vmentry("g1", seq - 1, True, None))
    assert b.take() == []
    b.frame(HOST, wire.vmentry("g2", seq, True, None))
    assert b.take() == []
    b.frame(HOST, wire.vmentry("g1", 7, True, "cpuid answer"))   # an answer to an explicit exit
    assert b.one(G1) == [wire.VMENTRY, "g1", 7, True, "cpuid answer"]
    assert b.peer("g1").stalled == seq and len(b.peer("g1").backlog) == 4
    assert b.peer("g2").stalled == 0
    # The entry for this exit: consumed by the fabric (the guest is not told), the vCPU resumes
    # and its queued frames run in the order it sent them.
    b.frame(HOST, wire.vmentry("g1", seq, True, None))
    out = b.take()
    assert [(ident, m[0]) for ident, m in out] == [(D0, wire.TLP), (CTL, wire.EVENT), (D0, wire.TLP),
                                                   (G1, wire.DROPPED)]
    assert Tlp.unpack(out[0][1][1]).data == b"AAAA" and Tlp.unpack(out[2][1][1]).data == b"BBBB"
    assert out[1][1] == [wire.EVENT, "g1", "progress", {"n": 1}]
    assert out[3][1] == [wire.DROPPED, "unauthorized", 1]
    assert b.peer("g1").stalled == 0 and not b.peer("g1").backlog and b.peer("g1").rx == rx + 4
    # The same entry again does nothing, and the guest runs freely.
    b.frame(HOST, wire.vmentry("g1", seq, True, None))
    assert b.take() == []
    b.tlp(G1, Tlp.mem_write(GBAR, b"CCCC"))
    assert b.one_tlp(D0).data == b"CCCC"


def test_trapped_store_in_the_backlog_stalls_again() -> None:
    b = vm_bench()
    seq1 = _trapped_store(b)
    b.tlp(G1, Tlp.mem_write(GBAR, b"AAAA"))
    b.tlp(G1, Tlp.mem_write(GTRAP + 0x10, b"SSSS"))      # a second trapped store, queued
    b.tlp(G1, Tlp.mem_write(GBAR, b"CCCC"))
    assert b.take() == []
    b.frame(HOST, wire.vmentry("g1", seq1, True, None))
    out = b.take()
    assert [(ident, m[0]) for ident, m in out] == [(D0, wire.TLP), (HOST, wire.VMEXIT)]
    assert Tlp.unpack(out[0][1][1]).data == b"AAAA"
    seq2 = out[1][1][2]
    assert out[1][1][:2] == [wire.VMEXIT, "g1"] and seq2 < 0 and seq2 != seq1
    assert Tlp.unpack(out[1][1][4]["tlp"]).payload_bytes() == b"SSSS"
    assert b.peer("g1").stalled == seq2 and len(b.peer("g1").backlog) == 1
    b.frame(HOST, wire.vmentry("g1", seq1, True, None))   # the old entry: stale
    assert b.take() == []
    b.frame(HOST, wire.vmentry("g1", seq2, False, "emulation failed"))   # ok=False resumes too
    assert b.one_tlp(D0).data == b"CCCC"
    assert b.peer("g1").stalled == 0 and b.c["ept:trap"] == 2


def test_stalled_guest_backlog_is_bounded(monkeypatch) -> None:
    import fabric.bus as bus
    monkeypatch.setattr(bus, "STALL_BACKLOG", 3)
    b = vm_bench()
    seq = _trapped_store(b)
    for i in range(5):
        b.tlp(G1, Tlp.mem_write(GBAR, bytes([i]) * 4))
    assert b.take() == [(G1, [wire.DROPPED, "stall_backlog_full", 1]),
                        (G1, [wire.DROPPED, "stall_backlog_full", 2])]
    assert len(b.peer("g1").backlog) == 3 and b.c["drop:stall_backlog_full"] == 2
    b.frame(HOST, wire.vmentry("g1", seq, True, None))
    assert [Tlp.unpack(m[1]).data for _, m in b.take()] == [bytes([i]) * 4 for i in range(3)]


def test_stalled_guest_oversized_frame_is_dropped_not_queued() -> None:
    # The backlog holds frames a guest may send: an oversized one (up to the socket's 4 MiB
    # limit) is dropped at once, as it would be unstalled, rather than held in memory.
    b = vm_bench()
    seq = _trapped_store(b)
    big = wire.event("g1", "big", {"x": "x" * wire.MAX_DATA_FRAME})
    b.frame(G1, big)
    b.dropped(G1, "oversized")
    assert not b.peer("g1").backlog and b.peer("g1").drops == {"oversized": 1}
    b.frame(G1, wire.event("g1", "small", {}))
    assert b.take() == [] and len(b.peer("g1").backlog) == 1
    b.frame(HOST, wire.vmentry("g1", seq, True, None))
    assert b.one(CTL) == [wire.EVENT, "g1", "small", {}]
    assert b.c["drop:oversized"] == 1 and b.peer("g1").rx == 3


def test_trapped_read_exits_with_a_stamped_tlp_and_the_host_completes_it() -> None:
    b = vm_bench(g2=True)
    b.tlp(G1, Tlp.mem_read(GTRAP + 0x10, 4, 0x4321, tag=0x2C5))
    ex = b.one(HOST)
    # Seq 0: the host answers with a completion, not a VM entry; the vCPU does not stall.
    assert ex[:4] == [wire.VMEXIT, "g1", 0, "mmio"] and list(ex[4]) == ["tlp"]
    t = Tlp.unpack(ex[4]["tlp"])
    assert t.type == TlpType.MEM_READ and t.address == GTRAP + 0x10 and t.length == 1
    assert t.requester_id == 0x0000 and 0 <= t.tag < RC_TAGS          # requester 00:00.0 + RC tag
    assert b.peer("g1").stalled == 0 and b.f.snapshot()["rc_tags_in_use"] == 1
    assert b.c["ept:trap"] == 1 and b.f.epts["g1"].trap_hits == 1
    b.tlp(G1, Tlp.mem_write(GBAR, b"next"))      # not stalled: goes at once
    assert b.one_tlp(D0).data == b"next"
    # Only the host, which the request went to, can complete it.
    for port, cid in ((D0, D0_VF), (G2, 0x0000), (G1, 0x0000)):
        b.tlp(port, Tlp.completion(t, cid, CplStatus.SC, b"EVIL"))
        assert b.take()[-1] == (port, [wire.DROPPED, "unexpected_completion", 1])
    b.tlp(HOST, Tlp.completion(t, 0x0000, CplStatus.SC, b"\x78\x56\x34\x12"))
    c = b.one_tlp(G1)
    assert c.type == TlpType.CPL_DATA and c.tag == 0x2C5 and c.data == b"\x78\x56\x34\x12"
    assert c.requester_id == 0x0000 and c.status == CplStatus.SC
    assert b.f.snapshot()["rc_tags_in_use"] == 0
    b.tlp(HOST, Tlp.completion(t, 0x0000, CplStatus.SC, b"\x78\x56\x34\x12"))
    b.dropped(HOST, "unexpected_completion")


# -- EPT violations -------------------------------------------------------------------------------


@pytest.mark.parametrize("gpa", [0x1000, GBAR - 4, GTRAP + 0x2000, 0x1_0000_0000 + GBAR, VF_BAR])
def test_ept_violation_exits_to_the_host_and_reads_get_ur(gpa: int) -> None:
    # VF_BAR: the host-physical address is not a guest-physical one.
    b = vm_bench()
    b.tlp(G1, Tlp.mem_write(gpa, b"evil", 0x4321))
    assert b.one(HOST) == [wire.VMEXIT, "g1", 0, "ept_violation", {"gpa": gpa, "size": 4, "write": True}]
    b.tlp(G1, Tlp.mem_read(gpa, 8 if gpa & 0xFFF != 0xFFC else 4, 0x4321, tag=0x3C))
    n = 8 if gpa & 0xFFF != 0xFFC else 4
    out = b.take()
    assert out[0] == (HOST, [wire.VMEXIT, "g1", 0, "ept_violation", {"gpa": gpa, "size": n, "write": False}])
    assert len(out) == 2 and out[1][0] == G1
    cpl = Tlp.unpack(out[1][1][1])
    assert cpl.type == TlpType.CPL and cpl.status == CplStatus.UR and cpl.tag == 0x3C
    assert cpl.completer_id == 0x0000
    # Counted, per guest too; the guest itself is not told (no DROPPED notice), nothing is stalled.
    assert b.c["ept:violation"] == 2 and b.peer("g1").drops == {"ept_violation": 2}
    assert b.f.epts["g1"].counters()["violations"] == {"not mapped": 2}
    assert b.c["rc:ur"] == 1 and b.peer("g1").stalled == 0
    assert b.f.snapshot()["rc_tags_in_use"] == 0 and b.f.dma_tlps == 0
    assert b.f.control("peers", {})["g1"]["drops"] == {"ept_violation": 2}


def test_ept_violation_for_a_guest_without_any_ept() -> None:
    b = vm_bench(g2=True)
    b.tlp(G2, Tlp.mem_write(GBAR, b"evil"))          # g1's mapping is not g2's
    assert b.one(HOST) == [wire.VMEXIT, "g2", 0, "ept_violation", {"gpa": GBAR, "size": 4, "write": True}]
    assert "g2" not in b.f.epts and b.peer("g2").drops == {"ept_violation": 1}


def test_guest_memory_tlp_without_a_host_is_dropped() -> None:
    sp = specs()
    b = Bench(register=("ctl", "d0", "g1"), peer_specs=sp)
    b.tlp(G1, Tlp.mem_write(GBAR, b"abcd"))
    b.dropped(G1, "no_host")
    b.frame(G1, wire.vmexit("g1", 1, "cpuid", {}))
    b.dropped(G1, "no_host", 2)


# -- VM exits, entries and injection --------------------------------------------------------------


@pytest.mark.parametrize("claimed", ["g1", "g2", "host", "", "d0", "fabric"])
def test_guest_vmexit_is_stamped_with_the_guest_name(claimed: str) -> None:
    b = vm_bench(g2=True)
    b.frame(G1, wire.vmexit(claimed, 9, "cpuid", {"leaf": 1, "subleaf": 0}))
    assert b.one(HOST) == [wire.VMEXIT, "g1", 9, "cpuid", {"leaf": 1, "subleaf": 0}]
    b.frame(G2, wire.vmexit(claimed, 0, "hypercall", {"nr": 1}))
    assert b.one(HOST) == [wire.VMEXIT, "g2", 0, "hypercall", {"nr": 1}]
    assert b.c["vmexit"] == 2


@pytest.mark.parametrize("fields", [["g1", "9", "cpuid", {}], ["g1", 9, 5, {}], ["g1", 9, "cpuid", []],
                                    ["g1", 9, "cpuid", None], ["g1", 1.5, "cpuid", {}]])
def test_guest_vmexit_with_wrong_field_types_is_malformed(fields: list) -> None:
    b = vm_bench()
    b.raw(G1, [wire.VMEXIT, *fields])
    b.dropped(G1, "malformed")
    assert b.c["vmexit"] == 0


def test_vmentry_reaches_only_the_named_guest() -> None:
    b = vm_bench(g2=True)
    b.frame(HOST, wire.vmentry("g2", 4, True, {"a": [1, 2]}))
    assert b.one(G2) == [wire.VMENTRY, "g2", 4, True, {"a": [1, 2]}]
    b.raw(HOST, [wire.VMENTRY, "g1", 5, 1, "x"])             # ok is coerced to a bool
    assert b.one(G1) == [wire.VMENTRY, "g1", 5, True, "x"]
    b.raw(HOST, [wire.VMENTRY, "g1", 6, None, None])
    assert b.one(G1) == [wire.VMENTRY, "g1", 6, False, None]


@pytest.mark.parametrize("vm, seq", [("nobody", 1), ("d0", 1), ("host", 1), ("ctl", 1), ("", 1),
                                     (5, 1), (None, 1), (["g1"], 1), ("g1", "1"), ("g1", None)])
def test_vmentry_to_an_unknown_vm_is_dropped(vm, seq) -> None:
    b = vm_bench(g2=True)
    b.raw(HOST, [wire.VMENTRY, vm, seq, True, None])
    b.dropped(HOST, "unknown_vm")
    assert b.c["drop:unknown_vm"] == 1


def test_inject_becomes_an_irq_at_the_named_guest_only() -> None:
    b = vm_bench(g2=True)
    b.frame(HOST, wire.inject("g1", 1, 0x31, 77, 1234))
    assert b.one(G1) == [wire.IRQ, 1, 0x31, 77, 1234, -2]
    b.frame(HOST, wire.inject("g2", 0, 0xEC, None, 5))
    assert b.one(G2) == [wire.IRQ, 0, 0xEC, None, 5, -2]
    # Provenance is sanitised, as for device interrupts.
    for origin, t_ns in [(True, 5), ("d1", "now"), ([1], 2.5), (b"x", {})]:
        b.raw(HOST, [wire.INJECT, "g1", 1, 0x31, origin, t_ns])
        assert b.one(G1) == [wire.IRQ, 1, 0x31, None, 5 if t_ns == 5 else 0, -2]
    assert b.c["injected"] == 6 and b.f.irqs_delivered == 0


@pytest.mark.parametrize("vm, apic, vector", [("nobody", 0, 0x30), ("d0", 0, 0x30), ("host", 0, 0x30),
                                              (3, 0, 0x30), ("g1", "0", 0x30), ("g1", 0, None),
                                              ("g1", True, 0x30), ("g1", 0, 1.0)])
def test_inject_to_an_unknown_vm_or_with_bad_fields_is_dropped(vm, apic, vector) -> None:
    b = vm_bench(g2=True)
    b.raw(HOST, [wire.INJECT, vm, apic, vector, None, 0])
    b.dropped(HOST, "unknown_vm")
    assert b.c["injected"] == 0


def test_guest_cannot_program_the_fabric_or_speak_for_the_host() -> None:
    b = vm_bench(g2=True)
    epts = {vm: e.mappings() for vm, e in b.f.epts.items()}
    n = 0
    for frame in [
        wire.reg(1, "ept.map", {"vm": "g1", "gpa": 0, "size": 0x1000, "kind": "mmio", "hpa": VF_BAR}),
        wire.reg(2, "mem.map", {"owner": "g1", "hpa": 0, "size": RAM_SIZE, "local": 0}),
        wire.reg(3, "context.set", {"rid": D0_VF, "mode": "pt"}),
        wire.reg(4, "iommu.map", {"domain": DOM, "iova": GRAM, "hpa": 0, "size": 0x1000}),
        wire.inject("g2", 0, 0x30, None, 0),
        wire.inject("g1", 0, 0x30, None, 0),
        wire.vmentry("g2", 1, True, None),
        wire.irq(0, 0x30, None, 0),
        wire.tlp(Tlp.cfg_read(D0_VF, 0, tag=1).pack()),
        wire.tlp(Tlp.cfg_write(D0_VF, 0x04, 0x6, tag=2).pack()),
        wire.ctl(1, "fabric", "shutdown", {}),
    ]:
        n += 1
        b.frame(G1, frame)
        out = b.take()
        assert all(ident == G1 and m[0] == wire.DROPPED and m[1] == "unauthorized" for ident, m in out), out
    assert b.c["drop:unauthorized"] == n and b.peer("g1").drops == {"unauthorized": n}
    assert {vm: e.mappings() for vm, e in b.f.epts.items()} == epts
    assert len(b.f.memmap) == 1 and b.f.iommu.context(D0_VF) == ("domain", DOM)
    assert b.f.iommu.domain_mappings(DOM) == [{"iova": 0, "hpa": GHPA, "size": GRAM, "read": True,
                                               "write": True}]
    assert not b.f.shutdown_requested and b.f.snapshot()["rc_tags_in_use"] == 0


# -- DMA into a guest's RAM -----------------------------------------------------------------------


def test_dma_through_a_domain_lands_in_the_guest_at_its_gpa() -> None:
    b = vm_bench(g2=True)
    w = Tlp.mem_write(0x2000, b"payload!", D0_VF)
    b.tlp(D0, w, origin=3, t_ns=4)
    # IOVA 0x2000 -> HPA GHPA+0x2000 -> g1's RAM at GPA 0x2000: unchanged on the wire.
    assert b.one(G1) == [wire.TLP, w.pack(), None, 0]
    assert b.f.dma_tlps == 1 and b.faults == [] and b.f.iommu.translations == 1
    # Last DW of the guest's RAM.
    b.tlp(D0, Tlp.mem_write(GRAM - 4, b"last", D0_VF))
    assert b.one_tlp(G1).address == GRAM - 4


def test_dma_readdressed_to_the_gpa_picks_the_header_form() -> None:
    b = vm_bench()
    # IOVA above 4 GiB onto low guest RAM, and low IOVA onto guest RAM above 4 GiB.
    b.reg_ok("iommu.map", {"domain": DOM, "iova": 0x1_0000_0000, "hpa": GHPA + 0x3000, "size": 0x1000})
    b.reg_ok("mem.map", {"owner": "g1", "hpa": GHPA + GRAM, "size": 0x1000, "local": 0x1_0000_0000})
    b.reg_ok("iommu.map", {"domain": DOM, "iova": 0x5000_0000, "hpa": GHPA + GRAM, "size": 0x1000})
    b.tlp(D0, Tlp.mem_write(0x1_0000_0011, b"abcde", D0_VF))
    w = b.one_tlp(G1)
    assert w == Tlp.mem_write(0x3011, b"abcde", D0_VF) and w.type == TlpType.MEM_WRITE
    b.tlp(D0, Tlp.mem_write(0x5000_0008, b"wxyz", D0_VF))
    w = b.one_tlp(G1)
    assert w == Tlp.mem_write(0x1_0000_0008, b"wxyz", D0_VF) and w.type == TlpType.MEM_WRITE_64
    # A DMA read, re-addressed the same way; the guest's RAM answers it.
    rd = Tlp.mem_read(0x1_0000_0040, 8, D0_VF, tag=0x2F0)
    b.tlp(D0, rd)
    got = b.one_tlp(G1)
    assert got == Tlp.mem_read(0x3040, 8, D0_VF, tag=0x2F0) and got.type == TlpType.MEM_READ
    b.tlp(G1, Tlp.completion(got, 0x0000, CplStatus.SC, b"ABCDEFGH"))
    cpl = b.one_tlp(D0)
    assert cpl.tag == 0x2F0 and cpl.data == b"ABCDEFGH" and cpl.requester_id == D0_VF
    assert cpl.completer_id == 0x0000 and cpl.status == CplStatus.SC
    assert b.f.dma_tlps == 3 and b.faults == []


@pytest.mark.parametrize("write", [True, False], ids=["write", "read"])
def test_dma_outside_the_domain_faults_and_reaches_nobody(write: bool) -> None:
    b = vm_bench(g2=True)
    b.reg_ok("ram.set", {"base": 0, "size": RAM_SIZE})          # host RAM exists at HPA 0..
    rw = "Write" if write else "Read"
    code = 0x05 if write else 0x06
    text = "PTE Write access is not set" if write else "PTE Read access is not set"
    lines = []
    for iova in (GRAM, GRAM + 0x1234, 0x4000_0000):             # past the guest's RAM; host-RAM IOVAs
        tlp = (Tlp.mem_write(iova, b"evil", D0_VF) if write else Tlp.mem_read(iova, 4, D0_VF, tag=9))
        b.tlp(D0, tlp)
        out = b.take()
        if write:
            assert out == []
        else:
            assert len(out) == 1 and out[0][0] == D0
            cpl = Tlp.unpack(out[0][1][1])
            assert cpl.status == CplStatus.UR and cpl.tag == 9 and cpl.requester_id == D0_VF
        lines.append(f"DMAR: [DMA {rw} NO_PASID] Request device [01:10.1] fault addr 0x{iova & ~0xFFF:x} "
                     f"[fault reason 0x{code:02x}] {text}")
    assert b.f.fault_lines() == lines and [f.line() for f in b.faults] == lines
    assert b.c[f"dma:fault:0x{code:02x}"] == 3 and b.f.dma_tlps == 3
    faults = b.f.control("faults", {})
    assert faults["by_source"] == {"01:10.1": {f"0x{code:02x}": 3}}
    assert faults["totals"] == {f"0x{code:02x}": 3}
    assert b.f.snapshot()["dma_faults_total"] == 3


def test_dma_beyond_mgaw_and_to_a_read_only_mapping() -> None:
    b = vm_bench()
    b.reg_ok("iommu.map", {"domain": DOM, "iova": 0x2000_0000, "hpa": GHPA, "size": 0x1000,
                           "read": True, "write": False})
    b.tlp(D0, Tlp.mem_write(0x2000_0010, b"evil", D0_VF))
    assert b.take() == [] and b.c["dma:fault:0x05"] == 1
    b.tlp(D0, Tlp.mem_read(0x2000_0010, 4, D0_VF, tag=4))
    assert b.one_tlp(G1) == Tlp.mem_read(0x10, 4, D0_VF, tag=4)      # read allowed: GPA 0x10
    b.tlp(D0, Tlp.mem_write(1 << 48, b"evil", D0_VF))
    assert b.take() == [] and b.c["dma:fault:0x04"] == 1
    assert b.f.fault_lines() == [
        "DMAR: [DMA Write NO_PASID] Request device [01:10.1] fault addr 0x20000000 "
        "[fault reason 0x05] PTE Write access is not set",
        "DMAR: [DMA Write NO_PASID] Request device [01:10.1] fault addr 0x1000000000000 "
        "[fault reason 0x04] Access beyond MGAW"]
    assert b.f.control("faults", {})["by_source"] == {"01:10.1": {"0x04": 1, "0x05": 1}}


def test_dma_from_a_function_whose_context_is_another_domain_cannot_reach_the_guest() -> None:
    # The PF gets a domain of its own, mapping nothing of g1: its DMA to g1's IOVAs faults.
    b = vm_bench()
    b.reg_ok("iommu.domain", {"domain": 2, "op": "create"})
    b.reg_ok("context.set", {"rid": D0_RID, "mode": "domain", "domain": 2})
    b.tlp(D0, Tlp.mem_write(0x2000, b"evil", D0_RID))
    assert b.take() == [] and b.c["dma:fault:0x05"] == 1
    assert b.f.control("faults", {})["by_source"] == {"01:00.0": {"0x05": 1}}
    # Destroying g1's domain makes the VF's context not present (fault 0x02).
    b.reg_ok("iommu.domain", {"domain": DOM, "op": "destroy"})
    b.tlp(D0, Tlp.mem_write(0x2000, b"late", D0_VF))
    assert b.take() == [] and b.c["dma:fault:0x02"] == 1


def test_dma_to_a_guest_that_is_not_connected_is_unclaimed_by_anyone() -> None:
    b = vm_bench()                                   # g2 never registered
    b.reg_ok("mem.map", {"owner": "g2", "hpa": GHPA + (1 << 36), "size": 0x1000, "local": 0})
    b.reg_ok("iommu.map", {"domain": DOM, "iova": 0x3000_0000, "hpa": GHPA + (1 << 36), "size": 0x1000})
    b.tlp(D0, Tlp.mem_write(0x3000_0000, b"xxxx", D0_VF))
    assert b.take() == [] and b.c["dma:owner_absent"] == 1
    b.tlp(D0, Tlp.mem_read(0x3000_0000, 4, D0_VF, tag=2))
    cpl = b.one_tlp(D0)
    assert cpl.status == CplStatus.UR and cpl.tag == 2 and b.c["dma:owner_absent"] == 2


def test_dma_reads_waiting_on_a_guest_that_dies_are_completed_with_ur() -> None:
    """The device's reads of g1's RAM that g1 never answered (it was SIGKILLed): peer.gone
    completes each with UR from the root complex, so the device gets its tags back (an SIOV
    PF's fetch tags are shared by all its ADIs); a late answer from g1's identity is not routed."""
    b = vm_bench()
    reads = [Tlp.mem_read(0x2000, 16, D0_VF, tag=t) for t in (5, 5, 0x201)]
    for rd in reads:
        b.tlp(D0, rd)
        assert b.one_tlp(G1) == rd
    b.frame(CTL, wire.ctl(7, "fabric", "peer.gone", {"name": "g1"}))
    out = b.take()
    (gone,) = [msg for ident, msg in out if ident == CTL and msg[0] == wire.CTL_REP]
    assert gone[2] is True and gone[3]["requests_completed"] == 3, gone
    cpls = [(ident, Tlp.unpack(msg[1])) for ident, msg in out if msg[0] == wire.TLP]
    assert [(ident, c.type, c.status, c.requester_id, c.tag, c.completer_id) for ident, c in cpls] == [
        (D0, TlpType.CPL, CplStatus.UR, D0_VF, tag, 0) for tag in (5, 5, 0x201)], cpls
    b.tlp(G1, Tlp.completion(reads[0], 0, CplStatus.SC, b"late" * 4))
    assert [m for _, m in b.take() if m[0] == wire.TLP] == []


# -- what a hostile guest must not be able to do -------------------------------------------------


def test_guest_completion_only_answers_a_dma_read_of_its_own_ram() -> None:
    b = vm_bench(g2=True)
    b.program_dma("pt", rid=D1_RID)
    # Unsolicited completions, to the device assigned to it and to another one: dropped.
    for n, (rid, tag) in enumerate(((D0_VF, 7), (D1_RID, 0x155), (D0_RID, 0)), 1):
        b.tlp(G1, Tlp.completion(Tlp.mem_read(0x2000, 4, rid, tag=tag), 0, CplStatus.SC, b"EVIL"))
        assert b.take() == ([(G1, [wire.DROPPED, "unexpected_completion", n])] if n & (n - 1) == 0 else [])
    # d1's DMA read of host RAM: g1 cannot race the host's answer.
    rd = Tlp.mem_read(0x8000, 4, D1_RID, tag=0x55)
    b.tlp(D1, rd)
    assert b.one_tlp(HOST) == rd
    b.tlp(G1, Tlp.completion(rd, 0, CplStatus.SC, b"EVIL"))
    assert b.take() == [(G1, [wire.DROPPED, "unexpected_completion", 4])]
    b.tlp(HOST, Tlp.completion(rd, 0, CplStatus.SC, b"GOOD"))
    assert b.one_tlp(D1).data == b"GOOD"
    # A DMA read of g1's RAM is answered by g1 -- once, and not by g2.
    rd = Tlp.mem_read(0x2000, 4, D0_VF, tag=0x301)
    b.tlp(D0, rd)
    assert b.one_tlp(G1) == rd
    b.tlp(G2, Tlp.completion(rd, 0, CplStatus.SC, b"EVIL"))
    b.dropped(G2, "unexpected_completion")
    b.tlp(G1, Tlp.completion(Tlp.mem_read(0x2000, 4, D0_VF, tag=0x302), 0, CplStatus.SC, b"EVIL"))
    assert b.take() == []                               # wrong tag (5th drop: no notice)
    b.tlp(G1, Tlp.completion(rd, 0, CplStatus.SC, b"RAM!"))
    cpl = b.one_tlp(D0)
    assert cpl.data == b"RAM!" and cpl.tag == 0x301 and cpl.completer_id == 0x0000
    b.tlp(G1, Tlp.completion(rd, 0, CplStatus.SC, b"RAM!"))
    assert b.take() == [] and b.c["drop:unexpected_completion"] == 7


def test_guest_cannot_forge_the_exits_only_the_fabric_generates() -> None:
    # "mmio" and "ept_violation" exits, and negative seqs, are the fabric's: a guest claiming one
    # could answer another guest's trapped read (the host completes the RC tag it is shown) or
    # end its own trapped store before the host has emulated it.
    b = vm_bench(g2=True)
    b.reg_ok("ept.map", {"vm": "g2", "gpa": GTRAP, "size": 0x1000, "kind": "trap"})
    b.tlp(G2, Tlp.mem_read(GTRAP, 4, tag=1))
    stamped = b.one(HOST)[4]["tlp"]
    forged = [wire.vmexit("g1", 0, "mmio", {"tlp": stamped}),
              wire.vmexit("g2", 0, "ept_violation", {"gpa": 0, "size": 4, "write": True}),
              wire.vmexit("g1", -1, "cpuid", {"leaf": 0})]
    for n, frame in enumerate(forged, 1):
        b.frame(G1, frame)
        assert b.take() == ([(G1, [wire.DROPPED, "spoofed_exit", n])] if n & (n - 1) == 0 else [])
    assert b.c["vmexit"] == 0 and b.c["drop:spoofed_exit"] == 3
    # The host's answer to g2's exit reaches g2.
    b.tlp(HOST, Tlp.completion(Tlp.unpack(stamped), 0, CplStatus.SC, b"REAL"))
    c = b.one_tlp(G2)
    assert c.data == b"REAL" and c.tag == 1
    # A stalled guest cannot predict its exit's seq and have the host end it early.
    seq = _trapped_store(b)
    b.frame(HOST, wire.vmentry("g1", seq, True, None))
    b.frame(G1, wire.vmexit("g1", seq - 1, "cpuid", {}))
    b.dropped(G1, "spoofed_exit", 4)
    b.tlp(G1, Tlp.mem_write(GTRAP, b"next"))
    assert b.one(HOST)[2] == seq - 1 and b.peer("g1").stalled == seq - 1


@pytest.mark.parametrize("gpa", [GBAR + 0x10, GTRAP + 0x10, 0x1000], ids=["mmio", "trap", "unmapped"])
def test_guest_read_that_does_not_parse_is_malformed_and_takes_no_rc_tag(gpa: int) -> None:
    # The device (or the host's VMM) cannot parse it either, so it would never be completed and
    # its RC tag would leak: 256 of them and the host could no longer read config space.
    b = vm_bench()
    for _ in range(RC_TAGS + 1):
        b.tlp(G1, _unparseable_read(gpa))
    out = b.take()
    credits = [m for _, m in out if m[0] == wire.CREDIT]     # dropped frames were taken: credited
    assert credits == [[wire.CREDIT, 256]], credits
    out = [(ident, m) for ident, m in out if m[0] != wire.CREDIT]
    assert all(ident == G1 and m[:2] == [wire.DROPPED, "malformed"] for ident, m in out), out[:3]
    assert b.c["drop:malformed"] == RC_TAGS + 1 and b.f.snapshot()["rc_tags_in_use"] == 0
    assert b.c["vmexit"] == 0 and b.c["ept:violation"] == 0 and b.c["rc:ur"] == 0
    _sent, got = _host_cfg_read(b, 0x0100, tag=1)
    assert got.requester_id == 0


# -- property: whatever a guest sends, it reaches a device only through its EPT's mmio pages --


def _guest_templates() -> list[bytes]:
    return [
        Tlp.mem_write(GBAR + 8, b"abcd").pack(),
        Tlp.mem_read(GBAR + 0x10, 8, tag=5).pack(),
        Tlp.mem_write(GBAR + 0x1FFC, b"edge").pack(),
        Tlp.mem_write(GTRAP + 4, b"wxyz").pack(),
        Tlp.mem_read(GTRAP + 8, 4, tag=3).pack(),
        Tlp.mem_write(0x1000, b"ram?").pack(),
        Tlp.mem_read(0x1_0000_0000 + GBAR, 4).pack(),
        Tlp.mem_write(VF_BAR, b"hpa!").pack(),
        Tlp.mem_write(0xFEE0_0000, (0x41).to_bytes(4, "little")).pack(),
        Tlp.mem_read(GBAR, 4, pasid=3).pack(),
        Tlp.cfg_read(D0_VF, 0, tag=1).pack(),
        Tlp.cfg_write(D1_RID, 0x04, 6, tag=2).pack(),
        Tlp.completion(Tlp.mem_read(0x2000, 4, D0_VF, tag=7), 0, CplStatus.SC, bytes(4)).pack(),
        Tlp.completion(Tlp.mem_read(0x2000, 4, D1_RID, tag=7), 0, CplStatus.UR).pack(),
        Tlp.completion(Tlp.mem_read(0x2000, 4, 0, tag=0), 0, CplStatus.SC, bytes(4)).pack(),
    ]


@st.composite
def _mutated_guest_tlp(draw) -> bytes:
    raw = bytearray(draw(st.sampled_from(_guest_templates())))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] = draw(st.integers(0, 255))
    return bytes(raw)


_vm_names = st.sampled_from(["g1", "g2", "host", "d0", "", "fabric"])
_guest_frames = st.one_of(
    _frames,
    st.sampled_from(_guest_templates()).map(wire.tlp),           # as a guest sends them
    st.tuples(_mutated_guest_tlp(), st.none() | st.integers(-1, 2**40) | _leaf, _leaf).map(
        lambda t: msgpack.packb([wire.TLP, *t], use_bin_type=True)),
    st.tuples(_vm_names, st.integers(-3, 3) | _leaf,
              st.sampled_from(["cpuid", "cfg", "hypercall", "mmio", "ept_violation", "x"]),
              st.dictionaries(st.text(max_size=4), _value, max_size=2)).map(
        lambda t: msgpack.packb([wire.VMEXIT, *t], use_bin_type=True)),
    st.tuples(_vm_names, st.integers(-3, 3), _leaf, _leaf).map(
        lambda t: msgpack.packb([wire.VMENTRY, *t], use_bin_type=True)),
    st.tuples(_vm_names, st.integers(0, 3), st.integers(0, 255), _leaf, _leaf).map(
        lambda t: msgpack.packb([wire.INJECT, *t], use_bin_type=True)),
)
_UNSTALL = b"unstall"      # the host ends whatever trapped store stalls g1


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_guest_frames | st.just(_UNSTALL), min_size=1, max_size=16))
def test_random_guest_frames_reach_devices_only_through_ept_mmio(frames) -> None:
    b = vm_bench(g2=True)
    b.program_ir()
    b.write_irte(5, Irte.remapped(0x41, 2, D0_RID))
    out = []
    for frame in frames:
        if frame is _UNSTALL:
            if b.peer("g1").stalled:
                b.frame(HOST, wire.vmentry("g1", b.peer("g1").stalled, True, None))
        else:
            b.frame(G1, frame)           # must not raise
        out += b.take()
    ept = b.f.epts["g1"]
    to_devices = [m for ident, m in out if ident in (D0, D1)]
    # Only memory requests through a pass-through page: at the HPA, stamped 00:00.0, to d0.
    assert all(ident != D1 for ident, _ in out)
    assert len(to_devices) <= ept.mmio_hits
    for m in to_devices:
        ftype, off, rid, addr = T.peek(m[1])
        # a store carries g1's link number (for the device's WASTED), a read nothing
        write = ftype in (int(TlpType.MEM_WRITE), int(TlpType.MEM_WRITE_64))
        assert m[0] == wire.TLP and m[2:] == [b.peer("g1").link if write else None, 0], m
        assert ftype in (int(TlpType.MEM_WRITE), int(TlpType.MEM_WRITE_64), int(TlpType.MEM_READ),
                         int(TlpType.MEM_READ_64)) and off == 0
        assert rid == 0x0000 and VF_BAR <= addr < VF_BAR + 0x2000
    # The host hears only VM exits, all in g1's name; the fabric's own exits are real ones.
    for ident, m in out:
        if ident == HOST:
            assert m[0] == wire.VMEXIT and m[1] == "g1", m
            if m[3] == "mmio":
                ftype, off, rid, addr = T.peek(m[4]["tlp"])
                assert GTRAP <= addr < GTRAP + 0x2000 and (m[2] < 0) == (ftype in (0x40, 0x60))
            elif m[3] == "ept_violation":
                assert m[2] == 0
            else:
                assert m[2] >= 0
        else:
            assert ident in (G1, D0, CTL), (ident, m)      # nothing for g2, d1
    assert b.f.dma_tlps == 0 and b.f.irqs_delivered == 0 and b.f.fault_log.recorded == 0
    # Drops are accounted for (EPT violations are per-guest counts, not drops).
    per_peer = sum(n for p in b.f.peers.values() for r, n in p.drops.items() if r != "ept_violation")
    counted = sum(v for k, v in b.c.items() if k.startswith("drop:") and k != "drop:unregistered")
    assert per_peer == counted and b.peer("g1").drops["ept_violation"] == b.c["ept:violation"]
    # The machine still works once the guest is resumed.
    if b.peer("g1").stalled:
        b.frame(HOST, wire.vmentry("g1", b.peer("g1").stalled, True, None))
    b.take()
    if not b.peer("g1").stalled:
        b.tlp(G1, Tlp.mem_write(GBAR, b"live"))
        assert b.take()[-1] == (D0, [wire.TLP, Tlp.mem_write(VF_BAR, b"live").pack(), b.peer("g1").link, 0])
    b.tlp(D0, msi(D0_RID, 5), origin=D0_RID, t_ns=99)
    assert b.take() == [(HOST, [wire.IRQ, 2, 0x41, D0_RID, 99, 5])]
    _sent, got = _host_cfg_read(b, 0x0100, tag=1)
    assert got.requester_id == 0
