"""fabric.loop: the socket shell every process uses -- coalescing, ordering, back-pressure.

Real ZeroMQ sockets over inproc:// (no processes): a ROUTER and a DEALER in this process.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import zmq

from fabric.loop import QueuedSender, SocketReader
from fabric.wire import BATCH_MAX, BATCH_PREFIX, frames_in, unbatch
from fabric.wire import batch as batch_frame

WAIT_MS = 5000


@pytest.fixture(params=[None])
def pair(request):
    """(router, dealer) connected over a unique inproc endpoint; ``request.param``: a small
    high-water mark for both, set before connecting (it applies to pipes made later)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    hwm = request.param
    router.setsockopt(zmq.RCVTIMEO, WAIT_MS)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"d1")
    dealer.setsockopt(zmq.RCVTIMEO, WAIT_MS)
    if hwm:
        for sock in (router, dealer):
            sock.setsockopt(zmq.SNDHWM, hwm)
            sock.setsockopt(zmq.RCVHWM, hwm)
    endpoint = f"inproc://loop-{uuid.uuid4().hex}"
    router.bind(endpoint)
    dealer.connect(endpoint)
    dealer.send(b"hello")                        # the router learns the dealer's identity
    assert router.recv_multipart() == [b"d1", b"hello"]
    yield router, dealer
    router.close(linger=0)
    dealer.close(linger=0)
    ctx.term()


async def test_uncorked_sends_leave_one_frame_per_message(pair):
    router, dealer = pair
    qs = QueuedSender(asyncio.get_running_loop(), router, router=True)
    for i in range(3):
        qs.send(b"d1", b"f%d" % i)
    assert [dealer.recv_multipart() for _ in range(3)] == [[b"f0"], [b"f1"], [b"f2"]]
    assert qs.batches == 0


async def test_corked_sends_coalesce_per_destination_in_order(pair):
    router, dealer = pair
    qs = QueuedSender(asyncio.get_running_loop(), router, router=True)
    qs.cork()
    frames = [b"f%d" % i for i in range(BATCH_MAX + 5)]
    for f in frames[:BATCH_MAX - 1]:
        qs.send(b"d1", f)
    assert qs.backlog() == BATCH_MAX - 1, "collected, not sent, until flush"
    qs.send(b"d1", frames[BATCH_MAX - 1])
    (first,) = dealer.recv_multipart()                # a full BATCH leaves at once
    for f in frames[BATCH_MAX:]:
        qs.send(b"d1", f)
    assert qs.backlog() == 5
    qs.flush()
    assert not qs.corked and qs.backlog() == 0
    (second,) = dealer.recv_multipart()
    # one BATCH frame per message: the frames, in order, at most BATCH_MAX in each
    assert first[:2] == second[:2] == BATCH_PREFIX
    assert unbatch(first) == frames[:BATCH_MAX] and unbatch(second) == frames[BATCH_MAX:]
    assert qs.batches == 2 and qs.batched_frames == len(frames)


async def test_a_lone_frame_in_a_drain_is_not_a_batch(pair):
    router, dealer = pair
    qs = QueuedSender(asyncio.get_running_loop(), dealer, router=False)
    qs.cork()
    qs.send(None, b"only")
    qs.flush()
    assert router.recv_multipart() == [b"d1", b"only"] and qs.batches == 0


async def test_reader_corks_its_sender_for_one_drain(pair):
    """Every frame the handler sends while one wake-up drains leaves in one message, after the
    drain; a later, lone message is answered by a lone frame (no added latency when idle)."""
    router, dealer = pair
    loop = asyncio.get_running_loop()
    qs = QueuedSender(loop, router, router=True)
    got: list[list[bytes]] = []
    done = asyncio.Event()

    def on_message(parts: list[bytes]) -> None:
        got.append(parts)
        qs.send(parts[0], b"echo:" + parts[1])
        if len(got) in (5, 6):
            done.set()

    for i in range(5):                       # queued before the reader's first drain
        dealer.send(b"m%d" % i)
    reader = SocketReader(loop, router, on_message, sender=qs)
    try:
        async with asyncio.timeout(WAIT_MS / 1000):
            await done.wait()
        (batch,) = dealer.recv_multipart()
        assert unbatch(batch) == [b"echo:m%d" % i for i in range(5)]
        done.clear()
        dealer.send(b"late")
        reader.kick()
        async with asyncio.timeout(WAIT_MS / 1000):
            await done.wait()
        assert dealer.recv_multipart() == [b"echo:late"]
    finally:
        reader.close()


async def test_a_drain_budget_counts_the_frames_inside_batches(pair, monkeypatch):
    """DRAIN_BATCH is in frames: a BATCH of 64 counts 64, so a budget of 100 takes two such
    messages in one wake-up, flushes what they sent, and takes the third in the next."""
    import fabric.loop
    monkeypatch.setattr(fabric.loop, "DRAIN_BATCH", 100)
    router, dealer = pair
    loop = asyncio.get_running_loop()
    qs = QueuedSender(loop, router, router=True)
    got: list[int] = []
    done = asyncio.Event()

    def on_message(parts: list[bytes]) -> None:
        got.append(len(unbatch(parts[1])))
        qs.send(parts[0], b"seen %d" % len(got))
        if len(got) == 3:
            done.set()

    for _ in range(3):
        dealer.send(batch_frame([b"x"] * BATCH_MAX))
    reader = SocketReader(loop, router, on_message, sender=qs)
    try:
        async with asyncio.timeout(WAIT_MS / 1000):
            await done.wait()
        (first,) = dealer.recv_multipart()
        (second,) = dealer.recv_multipart()
        assert unbatch(first) == [b"seen 1", b"seen 2"] and second == b"seen 3", (first, second)
    finally:
        reader.close()


def test_frames_in_reads_a_batch_header():
    for n in (2, 15, 16, BATCH_MAX):
        assert frames_in(batch_frame([b"ab"] * n)) == n
    assert frames_in(b"\x94\x01") == 1 and frames_in(BATCH_PREFIX) == 1
    # a hostile header: at least 1, never more than BATCH_MAX or than its bytes can hold (2 each)
    assert frames_in(BATCH_PREFIX + b"\x90") == frames_in(BATCH_PREFIX + b"\x91") == 1
    assert frames_in(BATCH_PREFIX + b"\xdc\xff\xff") == 1
    assert frames_in(BATCH_PREFIX + b"\xdc\xff\xff" + bytes(1000)) == BATCH_MAX
    assert frames_in(BATCH_PREFIX + b"\xdc\xff") == frames_in(BATCH_PREFIX + b"\xdd\0\0\0\x05") == 1


@pytest.mark.parametrize("pair", [1], indirect=True)
async def test_a_full_batch_sent_early_waits_its_turn_and_drop_forgets_it(pair):
    """Behind a full peer, a BATCH that left early (it reached BATCH_MAX while corked) queues
    after what was already waiting, the rest of the drain's frames stay collected, and ``drop``
    (the peer is gone) forgets both."""
    router, dealer = pair
    qs = QueuedSender(asyncio.get_running_loop(), router, router=True)
    for i in range(50):
        qs.send(b"d1", b"lone %d" % i)              # until the high-water mark is reached
    assert qs.queued >= 1
    waiting = qs.backlog()
    qs.cork()
    for i in range(BATCH_MAX + 3):
        qs.send(b"d1", b"f%d" % i)
    assert qs.backlog() == waiting + 1 + 3 and qs.batches == 1      # one queued BATCH, 3 collected
    assert qs.drop(b"d1") == waiting + 1 + 3 and qs.backlog() == 0
    qs.flush()
    assert qs.backlog() == 0


@pytest.mark.parametrize("pair", [1], indirect=True)
async def test_back_pressure_queues_batches_and_keeps_order(pair):
    """A full peer (its high-water mark reached): batches and lone frames wait in order and
    none is lost."""
    router, dealer = pair
    qs = QueuedSender(asyncio.get_running_loop(), router, router=True)
    sent = []
    for round_ in range(40):
        qs.cork()
        for i in range(3):
            f = b"r%d-%d" % (round_, i)
            qs.send(b"d1", f)
            sent.append(f)
        qs.flush()
        f = b"r%d-lone" % round_
        qs.send(b"d1", f)
        sent.append(f)
    assert qs.queued >= 1, "the high-water mark should have been reached"
    received: list[bytes] = []
    all_in = asyncio.Event()

    def on_message(parts: list[bytes]) -> None:
        (frame,) = parts
        received.extend(unbatch(frame) if frame[:2] == BATCH_PREFIX else [frame])
        if len(received) >= len(sent):
            all_in.set()

    reader = SocketReader(asyncio.get_running_loop(), dealer, on_message)
    try:
        async with asyncio.timeout(WAIT_MS / 1000):
            await all_in.wait()
    except TimeoutError:
        raise AssertionError(f"waited for {len(sent)} frames, got {len(received)}; "
                             f"sender backlog {qs.backlog()}") from None
    finally:
        reader.close()
    assert received == sent and qs.backlog() == 0
