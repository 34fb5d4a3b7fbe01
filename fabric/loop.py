"""Driving plain pyzmq sockets from an asyncio (uvloop) loop without ``zmq.asyncio``.

``zmq.asyncio`` costs ~15 µs of receiver CPU per message (DESIGN.md §3a).  We
instead register the socket's ``zmq.FD`` with the loop and drain with
``NOBLOCK`` until ``zmq.Again``.  The FD is edge-triggered and is also consumed
by sends, so after draining we re-check ``zmq.EVENTS`` before going back to
sleep; a wake-up that finds nothing is harmless.

This module and the process shells are the only places that own sockets.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import signal
import sys
from typing import Callable

import zmq

from fabric.wire import BATCH_MAX
from fabric.wire import batch as batch_frame
from fabric.wire import frames_in

#: Coalescing on (the default) or off (``IRQLAB_COALESCE=0`` in the environment, inherited by
#: every process a Lab starts: bench/ compares both).
COALESCE = os.environ.get("IRQLAB_COALESCE", "1") != "0"

#: How many frames one wake-up drains before yielding to other callbacks (a message part
#: counts one, a BATCH the frames it carries) -- and, with coalescing, the most a frame sent
#: during a drain waits for the drain's flush.
DRAIN_BATCH = 512


# pyzmq 27 flags are enum members: OR-ing them builds a new object per call.  The hot
# paths use these precomputed plain ints instead.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_SNDMORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)


class SocketReader:
    """Calls ``on_message(parts)`` for every multipart message a socket receives.

    With a ``sender`` (the ``QueuedSender`` of the same process), everything the handlers
    send while one wake-up drains is coalesced: the sender is corked before the first
    message and flushed after the last, so a deep queue leaves as few, larger messages and
    a lone message (an idle system) leaves at once, as before.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket,
                 on_message: Callable[[list[bytes]], None], sender: "QueuedSender | None" = None):
        self._loop = loop
        self._sock = sock
        self._on_message = on_message
        self._sender = sender if COALESCE else None
        self._fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        loop.add_reader(self._fd, self._wake)
        # Messages may already be queued before the first edge.
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _wake(self) -> None:
        self._schedule()

    def _drain(self) -> None:
        self._scheduled = False
        sock = self._sock
        on_message = self._on_message
        recv = sock.recv_multipart
        sender = self._sender
        if sender is not None:
            sender.cork()
        try:
            budget = DRAIN_BATCH              # frames, not messages: a BATCH counts its frames
            while budget > 0:
                try:
                    parts = recv(_NOBLOCK)
                except zmq.Again:
                    break
                budget -= len(parts) - 1 + frames_in(parts[-1])
                on_message(parts)
            else:
                if sender is not None:
                    sender.flush()
                self._schedule()  # more may be queued: yield, then continue
                return
            if sender is not None:
                sender.flush()
            if sock.getsockopt(_EVENTS) & _POLLIN:
                self._schedule()
        except zmq.ZMQError:
            if not sock.closed:
                raise
        finally:
            if sender is not None and sender.corked:
                sender.flush()    # a handler raised: still never hold frames back

    def kick(self) -> None:
        """Re-check the socket (call after sending: a send can eat the read edge)."""
        self._schedule()

    def close(self) -> None:
        try:
            self._loop.remove_reader(self._fd)
        except (ValueError, OSError):
            pass


class QueuedSender:
    """Non-blocking sends that never lose a message, coalesced under load.

    On ``zmq.Again`` (the peer's queue is at its high-water mark) the frame is
    queued and retried, and every later frame for the same destination waits
    behind it, so per-destination order is preserved.  ``key`` is the routing
    identity for a ROUTER, ``None`` for a DEALER.

    *Coalescing.*  Between ``cork()`` and ``flush()`` (``SocketReader`` brackets each
    drain with them) frames are collected per destination and leave as one BATCH frame
    per destination (``fabric.wire.batch``: the frames in order, at most ``BATCH_MAX``).
    One peer's messages stay in order, so per-source ordering holds across batches.
    Receivers handle every frame of a BATCH as a frame of its own.
    """

    RETRY_S = 0.0005

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket, router: bool,
                 on_unroutable: Callable[[bytes | None], None] | None = None):
        self._loop = loop
        self._sock = sock
        self._router = router
        # each queued item is one message: a frame or a BATCH of frames (bytes)
        self._pending: dict[bytes | None, collections.deque] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._on_unroutable = on_unroutable
        self._batch: dict[bytes | None, list[bytes]] | None = None
        self.queued = 0  # messages that ever had to wait
        self.batches = 0  # messages that carried more than one frame
        self.batched_frames = 0
        self.messages = 0  # messages sent (or queued), a BATCH counting one

    @property
    def corked(self) -> bool:
        return self._batch is not None

    def cork(self) -> None:
        """Collect frames from now on; ``flush`` sends them."""
        if self._batch is None:
            self._batch = {}

    def flush(self) -> None:
        """Send what was collected since ``cork`` (one message per destination) and uncork."""
        batch, self._batch = self._batch, None
        if not batch:
            return
        for key, frames in batch.items():     # fewer than BATCH_MAX each: send() sent full ones
            self._send_collected(key, frames)

    def send(self, key: bytes | None, frame: bytes) -> None:
        batch = self._batch
        if batch is not None:
            frames = batch.get(key)
            if frames is None:
                batch[key] = [frame]
            else:
                frames.append(frame)
                if len(frames) >= BATCH_MAX:
                    # a full BATCH leaves now (flush would send this very one): the receiver
                    # starts on it while we go on, instead of the stages taking turns
                    del batch[key]
                    self._send_collected(key, frames)
            return
        self._send_msg(key, frame)

    def _send_collected(self, key: bytes | None, frames: list[bytes]) -> None:
        """One message for 1..BATCH_MAX collected frames: a lone frame as itself, else a BATCH."""
        if len(frames) == 1:
            self._send_msg(key, frames[0])
            return
        self.batches += 1
        self.batched_frames += len(frames)
        self._send_msg(key, batch_frame(frames))

    def _send_msg(self, key: bytes | None, msg: bytes) -> None:
        self.messages += 1
        q = self._pending.get(key)
        if q is not None:
            q.append(msg)
            return
        if not self._try(key, msg):
            self._pending[key] = collections.deque([msg])
            self.queued += 1
            self._arm()

    def _try(self, key: bytes | None, msg: bytes) -> bool:
        sock = self._sock
        try:
            if self._router:
                sock.send(key, _NOBLOCK_SNDMORE)   # once accepted, the frame part is too
            sock.send(msg, _NOBLOCK)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                if self._on_unroutable:
                    self._on_unroutable(key)
                return True  # the destination is gone: nothing will ever take it
            raise

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(self.RETRY_S, self._retry)

    def _retry(self) -> None:
        self._timer = None
        for key in list(self._pending):
            q = self._pending[key]
            while q:
                if not self._try(key, q[0]):
                    break
                q.popleft()
            if not q:
                del self._pending[key]
        if self._pending:
            self._arm()

    def backlog(self) -> int:
        """Messages waiting (queued on back-pressure, a BATCH counting one) and frames collected
        and not yet flushed."""
        n = sum(len(q) for q in self._pending.values())
        if self._batch:
            n += sum(len(f) for f in self._batch.values())
        return n

    def drop(self, key: bytes | None) -> int:
        """Forget everything queued for ``key`` (the peer is gone); returns how many messages
        (a BATCH counting one) and collected frames."""
        q = self._pending.pop(key, None)
        n = len(q) if q else 0
        if self._batch:
            n += len(self._batch.pop(key, ()))
        return n


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop in the process shells; tests may run the models on any loop."""
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a hard dependency
        return asyncio.new_event_loop()


def run(main) -> None:
    """Run a process shell's ``main()`` coroutine on uvloop."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the launcher dies (Linux), then check it has not already.

    Like ipykernel's ParentPollerUnix, but enforced by the kernel, so a launcher
    killed with SIGKILL still takes its topology with it.
    """
    expected = os.environ.get("IRQLAB_PARENT_PID")
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except OSError:
            pass
    if expected and os.getppid() != int(expected):
        os._exit(70)
