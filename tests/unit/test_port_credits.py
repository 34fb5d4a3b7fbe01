"""fabric.port.Port's credit window, against a stand-in fabric (a ROUTER over inproc://).

A guest's port keeps at most ``credit_window`` (from WELCOME) frames in flight beyond the
fabric's latest CREDIT; the rest wait in order; replies and events never wait.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import zmq

from fabric import wire
from fabric.port import Port

WAIT_S = 5.0


@pytest.fixture
def fabric_and_endpoint():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVTIMEO, int(WAIT_S * 1000))
    endpoint = f"inproc://port-{uuid.uuid4().hex}"
    router.bind(endpoint)
    yield ctx, router, endpoint
    router.close(linger=0)
    ctx.term()


def _recv_frames(router: zmq.Socket, n: int) -> list[list]:
    """The next ``n`` frames the port sent (BATCH frames unwrapped), decoded."""
    out: list[list] = []
    while len(out) < n:
        _ident, frame = router.recv_multipart()
        frames = wire.unbatch(frame) if frame[:2] == wire.BATCH_PREFIX else [frame]
        out += [wire.decode(f) for f in frames]
    return out


def _nothing_more(router: zmq.Socket) -> bool:
    return not router.poll(50)


async def _connect(ctx, router, endpoint, window: int | None) -> Port:
    port = Port(endpoint, "tok", "g1", ctx=ctx)
    task = asyncio.ensure_future(port.connect(timeout=WAIT_S))
    loop = asyncio.get_running_loop()
    ident, hello = await loop.run_in_executor(None, router.recv_multipart)
    assert wire.decode(hello)[0] == wire.HELLO
    info = {"role": "guest", "name": "g1", **({"credit_window": window} if window else {})}
    router.send_multipart([ident, wire.welcome("g1", info)])
    await asyncio.wait_for(task, WAIT_S)
    port._test_ident = ident
    return port


async def _credit(router, port, taken: int) -> None:
    router.send_multipart([port._test_ident, wire.credit(taken)])
    async with asyncio.timeout(WAIT_S):          # the port's reader takes it on the loop
        while port._credited < taken:
            await asyncio.sleep(0)


async def test_a_full_window_holds_frames_in_order_until_credits_come(fabric_and_endpoint):
    ctx, router, endpoint = fabric_and_endpoint
    port = await _connect(ctx, router, endpoint, window=4)
    try:
        for i in range(10):
            port.send(wire.event("g1", "n", {"i": i}))   # (events through send() count like any frame)
        loop = asyncio.get_running_loop()
        got = await loop.run_in_executor(None, _recv_frames, router, 4)
        assert [m[3]["i"] for m in got] == [0, 1, 2, 3]
        assert port.holding and port.stalls == 1 and await loop.run_in_executor(None, _nothing_more, router)
        waiter = asyncio.ensure_future(port.until_released())
        await _credit(router, port, 2)                     # the fabric took 2 of them: 2 more may go
        got = await loop.run_in_executor(None, _recv_frames, router, 2)
        assert [m[3]["i"] for m in got] == [4, 5] and port.holding and not waiter.done()
        await _credit(router, port, 10)
        got = await loop.run_in_executor(None, _recv_frames, router, 4)
        assert [m[3]["i"] for m in got] == [6, 7, 8, 9]
        await asyncio.wait_for(waiter, WAIT_S)
        assert not port.holding and port.backlog() == 0
    finally:
        port.close(linger_ms=0)


async def test_replies_never_wait_for_credits(fabric_and_endpoint):
    ctx, router, endpoint = fabric_and_endpoint
    port = await _connect(ctx, router, endpoint, window=1)
    try:
        port.send(wire.event("g1", "first", {}))
        port.send(wire.event("g1", "held", {}))
        port.reply(7, True, "answer")
        loop = asyncio.get_running_loop()
        got = await loop.run_in_executor(None, _recv_frames, router, 2)
        assert [m[0] for m in got] == [wire.EVENT, wire.CTL_REP] and got[1][1:] == [7, True, "answer"]
        assert port.holding
    finally:
        port.close(linger_ms=0)


async def test_a_port_without_a_window_never_holds(fabric_and_endpoint):
    ctx, router, endpoint = fabric_and_endpoint
    port = await _connect(ctx, router, endpoint, window=None)   # the host, devices, controllers
    try:
        for i in range(3000):
            port.send(wire.event("g1", "n", {"i": i}))
        assert not port.holding
        got = await asyncio.get_running_loop().run_in_executor(None, _recv_frames, router, 3000)
        assert [m[3]["i"] for m in got] == list(range(3000))
    finally:
        port.close(linger_ms=0)
