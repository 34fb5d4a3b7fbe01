"""fabric.bus: the pure fabric model driven frame by frame (no sockets, no processes, no loop).

Topology used throughout (see ``Bench``):

    host  (role host)                       identity HOST
    d0    (role device, buses 1..1)         identity D0, functions 01:xx.x
    d1    (role device, buses 2..3)         identity D1, functions 02:xx.x and 03:xx.x
    g1    (role guest)                      identity G1
    ctl   (role control)                    identity CTL
"""

from __future__ import annotations

import re

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric import wire
from fabric.bus import RC_TAGS, Fabric, PeerSpec, Platform
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
    b = Bench(Platform(max_bus=8, ir=False, ir_entries=256), register=())
    b.frame(HOST, wire.hello(TOKEN["host"], "host"))
    assert b.one(HOST) == [wire.WELCOME, 1, "host", {"role": "host", "name": "host", "max_bus": 8,
                                                       "ir": False, "ir_entries": 256}]
    b = Bench(register=())
    b.frame(HOST, wire.hello(TOKEN["host"], "host"))
    assert b.one(HOST)[3] == {"role": "host", "name": "host", "max_bus": 32, "ir": True,
                              "ir_entries": 65536}


def test_guest_and_control_welcome() -> None:
    b = Bench(register=())
    b.frame(G1, wire.hello(TOKEN["g1"], "g1"))
    assert b.one(G1) == [wire.WELCOME, 1, "g1", {"role": "guest", "name": "g1"}]
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
    b.f.on_multipart([D0, ok, ok])
    b.dropped(D0, "multipart")
    b.f.on_multipart([D0])
    b.dropped(D0, "multipart", 2)
    assert b.c["drop:multipart"] == 2 and b.peer("d0").drops == {"multipart": 2}
    b.f.on_multipart([STRANGER, ok, ok])
    b.f.on_multipart([])
    assert b.take() == [] and b.c["drop:unregistered"] == 2
    # The normal two-part message is one frame.
    b.f.on_multipart([D0, ok])
    assert b.one(CTL) == [wire.EVENT, "d0", "k", {}]


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
    per_peer = sum(sum(p.drops.values()) for p in b.f.peers.values())
    counted = sum(v for k, v in b.c.items() if k.startswith("drop:") and k != "drop:unregistered")
    assert per_peer == counted
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
    "ram.set": ("base", "size"), "context.set": ("rid", "mode"), "irte.write": ("index", "lo", "hi"),
    "irte.clear": ("index",), "ir.table": ("entries",), "ir.enable": ("on",), "ir.cfi": ("on",),
    "faults.drain": (), "nope": ("x",),
}
_arg = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, 2, 5, 256, 0x0100, 65536, BAR, float("inf"), float("-inf"), float("nan"),
                     "pt", "block", True, None]),
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
    wire.TLP: wire.tlp(Tlp.cfg_read(0x0500, 0).pack()),
    wire.IRQ: wire.irq(0, 0x30, None, 0),
    wire.REG: wire.reg(1, "ir.cfi", {"on": True}),
    wire.REG_ACK: wire.reg_ack(1, True, None),
    wire.CTL: wire.ctl(1, "fabric", "shutdown", {}),
    wire.CTL_REP: wire.ctl_rep(1, True, None),
    wire.EVENT: wire.event("x", "k", {}),
    wire.DROPPED: wire.dropped("x", 1),
}
ALLOWED = {
    "host": {wire.TLP, wire.REG, wire.EVENT, wire.CTL_REP},
    "d0": {wire.TLP, wire.EVENT, wire.CTL_REP},
    "g1": {wire.EVENT, wire.CTL_REP},          # a guest has no TLP path yet
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


def test_device_cannot_program_the_iommu() -> None:
    b = Bench()
    b.frame(D0, wire.reg(1, "context.set", {"rid": D0_RID, "mode": "pt"}))
    b.dropped(D0, "unauthorized")
    b.frame(G1, wire.reg(1, "context.set", {"rid": D0_RID, "mode": "pt"}))
    b.dropped(G1, "unauthorized")
    assert b.f.context == {}


def test_guest_cannot_send_tlps_yet() -> None:
    b = Bench()
    b.program_dma("pt")
    b.tlp(G1, Tlp.mem_write(0x1000, b"evil", 0))
    b.dropped(G1, "unauthorized")
    b.tlp(G1, Tlp.cfg_read(0x0100, 0))
    b.dropped(G1, "unauthorized", 2)
    assert b.f.tlps == 0


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


def test_interrupt_with_pasid_prefix_delivered() -> None:
    b = Bench()
    b.program_ir()
    b.write_irte(9, Irte.remapped(0x51, 1, D0_RID))
    b.tlp(D0, msi(D0_RID, 9, pasid=0x1234), origin=1, t_ns=2)
    assert b.one(HOST) == [wire.IRQ, 1, 0x51, 1, 2, 9]


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
                                             "overflow": 0}]
    snap = b.f.snapshot()
    assert snap["ir_faults_total"] == 1 and snap["dma_faults_total"] == 0
    # Draining the log (the host's fault handler) returns the lines once.
    assert b.reg_ok("faults.drain", {}) == [line]
    assert b.reg_ok("faults.drain", {}) == [] and b.f.fault_lines() == []


def test_posted_irte_is_not_delivered_on_this_platform() -> None:
    b = Bench()
    b.program_ir()
    b.write_irte(5, Irte.posted(0x41, 0x1000_0040, D0_RID))
    b.tlp(D0, msi(D0_RID, 5))
    assert b.take() == [] and b.c["irq:posted_unsupported"] == 1
    assert b.f.irqs_delivered == 0 and b.faults == [] and b.f.fault_lines() == []


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
    assert len(dump) == 1 and re.match(r"^\s+5: Irte\(present=True", dump[0]) and "vector=65" in dump[0]
    assert b.ctl("irt")[3] == dump
    b.reg_ok("irte.clear", {"index": 5})
    assert b.f.control("irt", {}) == []
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
    b.tlp(D0, Tlp.mem_write(0x5000, b"xxxx", D0_RID, pasid=0x42))
    assert b.take() == []
    assert b.f.fault_lines() == [
        "DMAR: [DMA Write PASID 0x42] Request device [01:00.0] fault addr 0x5000 "
        "[fault reason 0x0d] PCE for translation request specifies blocking"]
    assert b.c["dma:fault:0x0d"] == 1 and len(b.faults) == 1


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
    assert b.f.context == {}


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
    assert b.ctl("irt")[3][0].lstrip().startswith("5: Irte(")
    assert b.ctl("faults")[3] == {"lines": [], "totals": {}, "overflow": 0}
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
