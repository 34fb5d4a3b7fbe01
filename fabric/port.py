"""A process's port on the bus: one DEALER connected to the fabric's ROUTER.

Used by every process shell (device, host, guest) and by the launcher's control
client, so the registration handshake, request/reply bookkeeping and shutdown
handshake exist once.  ``Port`` owns its socket; the caller supplies a handler
that receives every decoded message that is not a reply to one of its own
requests.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from typing import Any, Callable

import zmq

from fabric import wire
from fabric.loop import QueuedSender, SocketReader


_BATCH_PREFIX = wire.BATCH_PREFIX


class PortError(RuntimeError):
    """The bus refused or failed a request of ours (registration, REG, CTL)."""


def _z85(key: str | bytes) -> bytes:
    return key.encode("ascii") if isinstance(key, str) else key


class Port:
    """A registered connection to the fabric.

    Parameters
    ----------
    endpoint:
        The fabric's address (``ipc://...`` or ``tcp://...``).
    token, name:
        The one-time registration token the launcher issued for this role, and
        the name it was issued for.
    on_message:
        ``on_message(msg: list)`` for every incoming message except WELCOME,
        REG_ACK and CTL_REP answers to our own requests.  It runs on the loop
        and must not block.
    curve:
        Over tcp, the CURVE keys the launcher issued: ``{"server": fabric public key,
        "public": ours, "secret": ours}`` (Z85 strings).  The port connects as a CURVE
        client; the fabric's ZAP handler admits only issued keys (docs/multihost.md).
        ``None``: no encryption (ipc:// in the 0700 runtime directory).
    """

    def __init__(self, endpoint: str, token: str, name: str,
                 on_message: Callable[[list], None] | None = None,
                 ctx: zmq.Context | None = None, hwm: int = 200_000, curve: dict | None = None):
        self.endpoint = endpoint
        self.name = name
        self._token = token
        self._ctx = ctx or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.IMMEDIATE, 0)
        if curve:
            self.sock.setsockopt(zmq.CURVE_SERVERKEY, _z85(curve["server"]))
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, _z85(curve["public"]))
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, _z85(curve["secret"]))
        self.on_message = on_message or (lambda msg: None)
        self._welcome: asyncio.Future | None = None
        self._reg_waiters: dict[int, asyncio.Future] = {}
        self._ctl_waiters: dict[int, asyncio.Future] = {}
        self._seq = itertools.count(1)
        self._reader: SocketReader | None = None
        self._sender: QueuedSender | None = None
        self.info: dict = {}
        self.malformed = 0
        self.dropped_notices: dict[str, int] = {}
        #: the last frames sent, when a misbehaving guest wants to replay them (off by default)
        self.recent: collections.deque | None = None
        # Credits (guests): the fabric said in WELCOME how many frames we may have in flight
        # (``credit_window``) and tells us with CREDIT how many it has taken so far.  Beyond
        # the window what we send waits here, in order: a vCPU whose stores the bus does not
        # take stalls; nothing is lost.  (The fabric stops taking a VM's frames while it is over
        # its frame budget, which is how its rate limit reaches the vCPU.)
        self._window = 0               # 0: no credits (every other role)
        self._sent = 0                 # frames sent that count against the window
        self._credited = 0             # the fabric's latest CREDIT
        self._held: collections.deque | None = None
        self._held_since = 0.0
        self._release: asyncio.Future | None = None
        self.stalls = 0                # times the window filled
        self.stalled_s = 0.0           # time spent with a full window, in total

    # -- lifecycle ---------------------------------------------------------

    async def connect(self, timeout: float = 30.0) -> dict:
        """Connect, register with our token, and return the fabric's WELCOME info."""
        loop = asyncio.get_running_loop()
        self.sock.connect(self.endpoint)
        self._sender = QueuedSender(loop, self.sock, router=False)
        self._welcome = loop.create_future()
        self._reader = SocketReader(loop, self.sock, self._dispatch, sender=self._sender)
        self.send(wire.hello(self._token, self.name))
        try:
            async with asyncio.timeout(timeout):
                self.info = await self._welcome
            window = self.info.get("credit_window") if isinstance(self.info, dict) else None
            if type(window) is int and window > 0:
                self._window = window
        except TimeoutError:
            raise PortError(f"{self.name}: no WELCOME from the fabric at {self.endpoint} "
                            f"within {timeout:.0f} s"
                            + (" (CURVE: is our key one the launcher issued for this fabric?)"
                               if self.sock.getsockopt(zmq.MECHANISM) == zmq.CURVE else "")) from None
        return self.info

    def close(self, linger_ms: int = 1000) -> None:
        if self._sender is not None and self._sender.corked:
            self._sender.flush()          # closing from inside a handler: let its sends out
        if self._reader:
            self._reader.close()
        if not self.sock.closed:
            self.sock.close(linger=linger_ms)
        for fut in itertools.chain(self._reg_waiters.values(), self._ctl_waiters.values()):
            if not fut.done():
                fut.set_exception(PortError(f"{self.name}: port closed"))

    # -- sending -----------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Send one frame; never blocks, never loses it (queued on back-pressure; with a full
        credit window, held until the fabric has taken more)."""
        if self._window:
            if self._held is not None or self._sent - self._credited >= self._window:
                self._hold(frame)
                return
            self._sent += 1
        self._sender.send(None, frame)
        self._reader.kick()
        if self.recent is not None:
            self.recent.append(frame)

    def backlog(self) -> int:
        return (self._sender.backlog() if self._sender else 0) + (len(self._held) if self._held else 0)

    @property
    def holding(self) -> bool:
        """The credit window is full: what we send now waits (a vCPU that keeps storing should
        ``await until_released()`` instead of piling frames up)."""
        return self._held is not None

    async def until_released(self) -> None:
        if self._held is not None:
            if self._release is None:
                self._release = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._release)

    def _hold(self, frame: bytes) -> None:
        if self._held is None:
            self._held = collections.deque()
            self._held_since = asyncio.get_running_loop().time()
            self.stalls += 1
        self._held.append(frame)

    def _on_credit(self, taken: int) -> None:
        """CREDIT: the fabric has taken ``taken`` of our frames; send what the window allows."""
        if taken <= self._credited:
            return
        self._credited = taken
        held = self._held
        if held is None:
            return
        room = self._window - (self._sent - taken)
        sender = self._sender
        if room > 0 and sender is not None and not self.sock.closed:
            n = min(room, len(held))
            self._sent += n
            corked = sender.corked              # inside a drain: its flush sends them
            if not corked:
                sender.cork()
            for _ in range(n):
                sender.send(None, held.popleft())
            if not corked:
                sender.flush()
                self._reader.kick()
        if held:
            return
        self._held = None
        self.stalled_s += asyncio.get_running_loop().time() - self._held_since
        if self._release is not None:
            if not self._release.done():
                self._release.set_result(None)
            self._release = None

    async def reg(self, op: str, args: dict | None = None, timeout: float = 30.0) -> Any:
        """A privileged register operation on the fabric (host only); returns its result."""
        seq = next(self._seq)
        fut = asyncio.get_running_loop().create_future()
        self._reg_waiters[seq] = fut
        self.send(wire.reg(seq, op, args or {}))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise PortError(f"{self.name}: fabric did not acknowledge REG {op} within {timeout:.0f} s") from None
        finally:
            self._reg_waiters.pop(seq, None)

    def reg_nowait(self, op: str, args: dict) -> int:
        """Fire a REG whose ack nobody awaits (ordering on the wire is what matters)."""
        seq = next(self._seq)
        self.send(wire.reg(seq, op, args))
        return seq

    async def call(self, peer: str, op: str, args: dict | None = None, timeout: float = 60.0) -> Any:
        """A control request to ``peer`` (through the fabric); returns its result or raises PortError."""
        req_id = next(self._seq)
        fut = asyncio.get_running_loop().create_future()
        self._ctl_waiters[req_id] = fut
        self.send(wire.ctl(req_id, peer, op, args or {}))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise PortError(f"no answer from {peer} to {op!r} within {timeout:.0f} s") from None
        finally:
            self._ctl_waiters.pop(req_id, None)

    def reply(self, req_id: int, ok: bool, result: Any) -> None:
        self._send_oob(wire.ctl_rep(req_id, ok, result))

    def event(self, kind: str, data: dict | None = None) -> None:
        self._send_oob(wire.event(self.name, kind, data or {}))

    def _send_oob(self, frame: bytes) -> None:
        """Replies and events are the lab's instrumentation, not the vCPU's work: they never
        wait for credits (the fabric passes them while it holds a throttled VM's frames)."""
        if self._window:
            self._sent += 1
        self._sender.send(None, frame)
        self._reader.kick()

    # -- receiving ---------------------------------------------------------

    def _dispatch(self, parts: list[bytes]) -> None:
        """One message: a frame, a BATCH of frames coalesced by the fabric, or (the older
        form) up to ``BATCH_MAX`` frames as its parts."""
        if len(parts) == 1:
            frame = parts[0]
            if frame[:2] == _BATCH_PREFIX:
                try:
                    frames = wire.unbatch(frame)
                except wire.WireError:
                    self.malformed += 1
                    return
                for f in frames:
                    self._dispatch_frame(f)
            else:
                self._dispatch_frame(frame)
        elif len(parts) <= wire.BATCH_MAX:
            for frame in parts:
                self._dispatch_frame(frame)
        else:
            self.malformed += 1

    def _dispatch_frame(self, frame: bytes) -> None:
        try:
            msg = wire.decode(frame)
        except wire.WireError:
            self.malformed += 1
            return
        kind = msg[0]
        if kind == wire.REG_ACK:
            fut = self._reg_waiters.get(msg[1])
            if fut is not None and not fut.done():
                if msg[2]:
                    fut.set_result(msg[3])
                else:
                    fut.set_exception(PortError(f"fabric refused REG: {msg[3]}"))
            return
        if kind == wire.CTL_REP:
            fut = self._ctl_waiters.get(msg[1])
            if fut is not None and not fut.done():
                if msg[2]:
                    fut.set_result(msg[3])
                else:
                    fut.set_exception(PortError(str(msg[3])))
            return
        if kind == wire.WELCOME:
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_result(msg[3])
            return
        if kind == wire.REFUSED:
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(PortError(f"{self.name}: fabric refused registration: {msg[1]}"))
            return
        if kind == wire.DROPPED:
            self.dropped_notices[msg[1]] = self.dropped_notices.get(msg[1], 0) + 1
            return
        if kind == wire.CREDIT:
            if type(msg[1]) is int and self._window:
                self._on_credit(msg[1])
            else:
                self.malformed += 1
            return
        self.on_message(msg)
