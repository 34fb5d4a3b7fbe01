"""The wire: one encoder/decoder pair per inter-process message.

Every frame on the bus is a single ZeroMQ frame holding one msgpack array whose
first element is the message type.  Sockets only ever see ``bytes``; everything
that builds or parses a frame lives here, so the fabric, the host, the guests,
the devices and the launcher cannot disagree about a layout.

Theory of operation
-------------------
A process connects a DEALER to the fabric's ROUTER and sends ``HELLO`` with the
one-time token the launcher issued for its role.  The fabric answers ``WELCOME``
(or ``REFUSED``) and from then on knows the peer only by its ZeroMQ routing
identity, which the peer cannot choose for another connection.  Whatever a frame
*says* about its sender is ignored: the fabric stamps it.

The protocol version is checked once, in ``HELLO``; per-message frames carry no
version so the hot path (``TLP`` and ``IRQ``) pays for nothing but its fields.

Frame layouts (msgpack arrays)::

    HELLO     [1, version, token:str, name:str]
    WELCOME   [2, version, name:str, info:map]
    REFUSED   [3, reason:str]
    TLP       [10, tlp:bin, origin:int|nil, t_ns:int]      origin/t_ns: out-of-band provenance
                                                            of an interrupt MWr (device -> fabric
                                                            -> receiver); the bus never reads them.
                                                            fabric -> device: a guest's store
                                                            carries the guest's link number as
                                                            origin (for WASTED), else nil
    IRQ       [11, apic_id:int, vector:int, origin:int|nil, t_ns:int, handle:int]
    REG       [20, seq:int, op:str, args:map]              privileged register write (host only)
    REG_ACK   [21, seq:int, ok:bool, result:any]
    CTL       [30, id:int, peer:str, op:str, args:map]     control request; ``peer`` is the
                                                            target on the way in, the sender on
                                                            the way out
    CTL_REP   [31, id:int, ok:bool, result:any]
    EVENT     [32, name:str, kind:str, data:map]           a process tells the controller
    VMEXIT    [50, vm:str, seq:int, reason:str, args:map]  guest -> fabric -> host (``vm`` stamped
                                                            by the fabric); seq 0 = no answer wanted
    VMENTRY   [51, vm:str, seq:int, ok:bool, result:any]   host -> fabric -> guest ``vm``
    INJECT    [52, vm:str, apic_id:int, vector:int, origin:int|nil, t_ns:int]
                                                            host -> fabric; reaches the guest as IRQ
    POSTED    [53, apic_id:int, entries:[[vector, origin, t_ns, postings], ...]]
                                                            fabric (IR unit) -> guest: a posted-
                                                            interrupt notification carrying the
                                                            PIR bits it transfers to the vCPU
                                                            (postings: how many merged into the
                                                            bit, out of band like origin)
    BATCH     [60, frames:[bin, ...]]                      2..BATCH_MAX frames coalesced into one,
                                                            each handled as if it came alone
    DROPPED   [40, reason:str, count:int]                  the fabric tells a sender it dropped
                                                            one of its frames
    CREDIT    [41, taken:int]                              fabric -> guest: the fabric has taken
                                                            ``taken`` frames from it so far; a guest
                                                            keeps at most ``credit_window`` (WELCOME)
                                                            frames in flight beyond that
    WASTED    [42, link:int, count:int]                    device -> fabric: ``count`` stores that
                                                            came in a TLP message whose origin was
                                                            ``link`` (a guest's, stamped by the
                                                            fabric) rang a full work queue
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

PROTOCOL_VERSION = 1

HELLO = 1
WELCOME = 2
REFUSED = 3
TLP = 10
IRQ = 11
REG = 20
REG_ACK = 21
CTL = 30
CTL_REP = 31
EVENT = 32
DROPPED = 40
CREDIT = 41
WASTED = 42
VMEXIT = 50
VMENTRY = 51
INJECT = 52
POSTED = 53
BATCH = 60

MESSAGE_NAMES = {
    HELLO: "HELLO", WELCOME: "WELCOME", REFUSED: "REFUSED", TLP: "TLP", IRQ: "IRQ",
    REG: "REG", REG_ACK: "REG_ACK", CTL: "CTL", CTL_REP: "CTL_REP", EVENT: "EVENT",
    DROPPED: "DROPPED", CREDIT: "CREDIT", WASTED: "WASTED", VMEXIT: "VMEXIT", VMENTRY: "VMENTRY",
    INJECT: "INJECT", POSTED: "POSTED", BATCH: "BATCH",
}

# Arity of each message (number of array elements including the type).
_ARITY = {HELLO: 4, WELCOME: 4, REFUSED: 2, TLP: 4, IRQ: 6, REG: 4, REG_ACK: 4,
          CTL: 5, CTL_REP: 4, EVENT: 4, DROPPED: 3, CREDIT: 2, WASTED: 3, VMEXIT: 5, VMENTRY: 5, INJECT: 6,
          POSTED: 3, BATCH: 2}

#: Frames larger than this are dropped unread by the fabric (a TLP is at most
#: 4 KiB payload + 20 bytes of header and prefix; control replies are larger).
MAX_DATA_FRAME = 8 * 1024
MAX_CONTROL_FRAME = 4 * 1024 * 1024

#: Coalescing: under load senders coalesce what they produce while draining one wake-up
#: (``fabric.loop``) into one BATCH frame per destination holding 2..BATCH_MAX frames, handled
#: in order as if they had come one by one.  (One ZeroMQ frame, not one part per frame: pyzmq
#: costs ~2.5 µs per part sent and received, a BATCH ~0.25 µs per frame inside it.)  A BATCH
#: inside a BATCH, or one with more frames, is dropped whole.  Receivers still take the older
#: form, a message whose parts are the frames (at most BATCH_MAX).
BATCH_MAX = 64
#: the largest BATCH a device or guest may send: BATCH_MAX data frames
MAX_BATCH_FRAME = BATCH_MAX * MAX_DATA_FRAME + 16
#: the first two bytes of every BATCH frame (a 2-element msgpack array, then the type)
BATCH_PREFIX = bytes([0x92, 60])

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_unpackb = msgpack.unpackb
#: decode's array and map length limit, and the frame size up to which msgpack's defaults
#: (the buffer's length) are no looser than decode's limits
_SMALL = 1 << 16


class WireError(ValueError):
    """A frame that does not decode to a known, well-formed message (a peer's fault)."""


def decode(frame: bytes) -> list:
    """Decode one frame to its msgpack array, checking type and arity.

    Raises WireError; never anything else, whatever the bytes.
    """
    try:
        if len(frame) <= _SMALL:
            # msgpack's own limits are the buffer's length, here no more than the ones below:
            # the same result, without parsing six keyword arguments per frame (the hot path)
            msg = _unpackb(frame, strict_map_key=False)
        else:
            msg = _unpackb(frame, raw=False, use_list=True, strict_map_key=False,
                           max_bin_len=MAX_CONTROL_FRAME, max_str_len=MAX_CONTROL_FRAME,
                           max_array_len=_SMALL, max_map_len=_SMALL)
    except Exception as exc:  # msgpack raises a zoo of exception types on junk
        raise WireError(f"not msgpack: {type(exc).__name__}") from None
    if type(msg) is not list or not msg:
        raise WireError("frame is not a non-empty msgpack array")
    kind = msg[0]
    arity = _ARITY.get(kind) if type(kind) is int else None
    if arity is None:
        raise WireError(f"unknown message type {kind!r}")
    if len(msg) != arity:
        raise WireError(f"{MESSAGE_NAMES[kind]} has {len(msg)} fields, expected {arity}")
    return msg


# ---------------------------------------------------------------------------
# encoders (one per message)

def hello(token: str, name: str) -> bytes:
    return _packb([HELLO, PROTOCOL_VERSION, token, name])


def welcome(name: str, info: dict) -> bytes:
    return _packb([WELCOME, PROTOCOL_VERSION, name, info])


def refused(reason: str) -> bytes:
    return _packb([REFUSED, reason])


def tlp(raw: bytes, origin: int | None = None, t_ns: int = 0) -> bytes:
    return _packb([TLP, raw, origin, t_ns])


def irq(apic_id: int, vector: int, origin: int | None, t_ns: int, handle: int = -1) -> bytes:
    return _packb([IRQ, apic_id, vector, origin, t_ns, handle])


def reg(seq: int, op: str, args: dict) -> bytes:
    return _packb([REG, seq, op, args])


def reg_ack(seq: int, ok: bool, result: Any) -> bytes:
    return _packb([REG_ACK, seq, ok, result])


def ctl(req_id: int, peer: str, op: str, args: dict) -> bytes:
    return _packb([CTL, req_id, peer, op, args])


def ctl_rep(req_id: int, ok: bool, result: Any) -> bytes:
    return _packb([CTL_REP, req_id, ok, result])


def event(name: str, kind: str, data: dict) -> bytes:
    return _packb([EVENT, name, kind, data])


def dropped(reason: str, count: int) -> bytes:
    return _packb([DROPPED, reason, count])


def credit(taken: int) -> bytes:
    return _packb([CREDIT, taken])


def wasted(link: int, count: int) -> bytes:
    return _packb([WASTED, link, count])


def vmexit(vm: str, seq: int, reason: str, args: dict) -> bytes:
    return _packb([VMEXIT, vm, seq, reason, args])


def vmentry(vm: str, seq: int, ok: bool, result: Any) -> bytes:
    return _packb([VMENTRY, vm, seq, ok, result])


def inject(vm: str, apic_id: int, vector: int, origin: int | None, t_ns: int) -> bytes:
    return _packb([INJECT, vm, apic_id, vector, origin, t_ns])


def posted(apic_id: int, entries: list) -> bytes:
    return _packb([POSTED, apic_id, entries])


def batch(frames: list[bytes]) -> bytes:
    return _packb([BATCH, frames])


def frames_in(frame: bytes) -> int:
    """How many frames one message frame carries, for drain budgets: a BATCH's count as its
    header says, but at least 1 and no more than BATCH_MAX or the frame's bytes can hold (2
    bytes each at least); else 1.  Only an estimate for a hostile header: ``unbatch`` checks."""
    if frame[:2] != BATCH_PREFIX or len(frame) < 3:
        return 1
    b = frame[2]
    if 0x90 <= b <= 0x9F:                   # fixarray
        n, body = b & 0x0F, len(frame) - 3
    elif b == 0xDC and len(frame) >= 5:     # array 16
        n, body = int.from_bytes(frame[3:5], "big"), len(frame) - 5
    else:
        return 1
    return max(1, min(n, BATCH_MAX, body >> 1))


def unbatch(frame: bytes) -> list[bytes]:
    """The frames of a BATCH (``frame`` starts with BATCH_PREFIX); WireError for anything but
    2..BATCH_MAX byte strings, none of them a BATCH itself."""
    msg = decode(frame)
    frames = msg[1] if msg[0] == BATCH else None
    if type(frames) is not list or not 2 <= len(frames) <= BATCH_MAX:
        raise WireError("BATCH holds 2..BATCH_MAX frames")
    for f in frames:
        if type(f) is not bytes or f[:2] == BATCH_PREFIX:
            raise WireError("BATCH holds frames (bytes), never another BATCH")
    return frames


# ---------------------------------------------------------------------------
# typed views of the decoded arrays, for readers that want names

class Hello(NamedTuple):
    version: int
    token: str
    name: str


def as_hello(msg: list) -> Hello:
    _, version, token, name = msg
    if type(version) is not int or type(token) is not str or type(name) is not str:
        raise WireError("HELLO fields have the wrong types")
    return Hello(version, token, name)


class Ctl(NamedTuple):
    req_id: int
    peer: str
    op: str
    args: dict


def as_ctl(msg: list) -> Ctl:
    _, req_id, peer, op, args = msg
    if type(req_id) is not int or type(peer) is not str or type(op) is not str or type(args) is not dict:
        raise WireError("CTL fields have the wrong types")
    return Ctl(req_id, peer, op, args)


class Reg(NamedTuple):
    seq: int
    op: str
    args: dict


def as_reg(msg: list) -> Reg:
    _, seq, op, args = msg
    if type(seq) is not int or type(op) is not str or type(args) is not dict:
        raise WireError("REG fields have the wrong types")
    return Reg(seq, op, args)


def check_tlp(msg: list) -> tuple[bytes, int | None, int]:
    """Field types of a decoded TLP message: (raw, origin, t_ns)."""
    _, raw, origin, t_ns = msg
    if type(raw) is not bytes or (origin is not None and type(origin) is not int) or type(t_ns) is not int:
        raise WireError("TLP fields have the wrong types")
    return raw, origin, t_ns
