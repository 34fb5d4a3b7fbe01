"""The whole machine in one process: the real fabric model, device model and host shell
joined in memory (h11's ConnectionPair idea, one level up).

``MemPort`` stands in for ``fabric.port.Port``: frames go through the real
``wire`` codec into a real ``fabric.bus.Fabric`` whose ``send`` puts them on a
queue that is drained on the event loop, so nothing recurses and ordering is
exactly per-source FIFO as on the sockets.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from typing import Any

from device.sriov_device import SriovDevice
from fabric import wire
from fabric.bus import Fabric, PeerSpec, Platform
from fabric.tlp import Tlp


class MemNet:
    def __init__(self, platform: Platform | None = None):
        self.specs: dict[str, PeerSpec] = {}
        self.ports: dict[bytes, "MemPort"] = {}
        self.fabric = Fabric(self.specs, platform or Platform(), send=self._from_fabric)
        self._q: collections.deque = collections.deque()
        self._scheduled = False
        self._ids = itertools.count(1)

    def port(self, name: str, role: str, buses: tuple[int, int] | None = None) -> "MemPort":
        token = f"tok-{name}"
        self.fabric._tokens[token] = PeerSpec(name, role, buses)  # what the launcher issues
        p = MemPort(self, name, token, b"\0" + next(self._ids).to_bytes(4, "big"))
        self.ports[p.identity] = p
        return p

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)

    def to_fabric(self, identity: bytes, frame: bytes) -> None:
        self._q.append((True, identity, frame))
        self._schedule()

    def _from_fabric(self, identity: bytes, frame: bytes) -> None:
        self._q.append((False, identity, frame))
        self._schedule()

    def _drain(self) -> None:
        self._scheduled = False
        q = self._q
        for _ in range(4096):
            if not q:
                return
            inbound, identity, frame = q.popleft()
            if inbound:
                self.fabric.on_frame(identity, frame)
            else:
                self.ports[identity].deliver(frame)
        self._schedule()


class MemPort:
    """The subset of ``fabric.port.Port`` the process shells use."""

    def __init__(self, net: MemNet, name: str, token: str, identity: bytes):
        self.net, self.name, self._token, self.identity = net, name, token, identity
        self.info: dict = {}
        self.on_message = lambda msg: None
        self._welcome: asyncio.Future | None = None
        self._waiters: dict[int, asyncio.Future] = {}
        self._seq = itertools.count(1)

    async def connect(self, timeout: float = 10.0) -> dict:
        self._welcome = asyncio.get_running_loop().create_future()
        self.send(wire.hello(self._token, self.name))
        async with asyncio.timeout(timeout):
            self.info = await self._welcome
        return self.info

    def send(self, frame: bytes) -> None:
        self.net.to_fabric(self.identity, frame)

    def deliver(self, frame: bytes) -> None:
        msg = wire.decode(frame)
        if msg[0] == wire.WELCOME:
            self._welcome.set_result(msg[3])
        elif msg[0] in (wire.REG_ACK, wire.CTL_REP):
            fut = self._waiters.pop(msg[1], None)
            if fut is not None and not fut.done():
                fut.set_result(msg[3]) if msg[2] else fut.set_exception(RuntimeError(msg[3]))
        else:
            self.on_message(msg)

    async def reg(self, op: str, args: dict | None = None, timeout: float = 10.0) -> Any:
        seq = next(self._seq)
        fut = self._waiters[seq] = asyncio.get_running_loop().create_future()
        self.send(wire.reg(seq, op, args or {}))
        async with asyncio.timeout(timeout):
            return await fut

    def reg_nowait(self, op: str, args: dict) -> int:
        seq = next(self._seq)
        self.send(wire.reg(seq, op, args))
        return seq

    async def call(self, peer: str, op: str, args: dict | None = None, timeout: float = 30.0) -> Any:
        seq = next(self._seq)
        fut = self._waiters[seq] = asyncio.get_running_loop().create_future()
        self.send(wire.ctl(seq, peer, op, args or {}))
        async with asyncio.timeout(timeout):
            return await fut

    def reply(self, req_id: int, ok: bool, result: Any) -> None:
        self.send(wire.ctl_rep(req_id, ok, result))

    def event(self, kind: str, data: dict | None = None) -> None:
        self.send(wire.event(self.name, kind, data or {}))

    def close(self, linger_ms: int = 0) -> None:
        pass


class MemDevice:
    """A device model behind a MemPort, as ``device.process.DeviceShell`` drives it."""

    def __init__(self, port: MemPort, model: SriovDevice):
        self.port, self.model = port, model
        port.on_message = self.on_message

    def on_message(self, msg: list) -> None:
        if msg[0] == wire.TLP:
            for e in self.model.handle_tlp(Tlp.unpack(msg[1])):
                self.port.send(wire.tlp(e.tlp.pack(), e.origin, time.monotonic_ns() if e.origin is not None else 0))
