"""The fabric process shell: one ROUTER socket around ``fabric.bus.Fabric``.

Run as ``python -m fabric --runtime DIR``; ``DIR/fabric.json`` (written by the
launcher, mode 0600) holds the endpoint, the token table and the platform; over
tcp also the fabric's CURVE keypair and the public key of every client the
launcher issued one to, and optionally a second (ipc) endpoint for a local
controller (docs/multihost.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from typing import Callable

import zmq
import zmq.auth.thread
from zmq.utils.monitor import parse_monitor_message

from fabric import trace, wire
from fabric.bus import Fabric, PeerSpec, Platform
from fabric.dmar import FaultRecord
from fabric.loop import QueuedSender, SocketReader, die_with_parent, run

#: printk_ratelimited defaults: at most 10 fault lines per 5 s.
RATELIMIT_BURST = 10
RATELIMIT_INTERVAL_NS = 5_000_000_000


class _RateLimit:
    def __init__(self) -> None:
        self.begin = 0
        self.printed = 0
        self.missed = 0

    def __call__(self, now: int) -> bool:
        if now - self.begin > RATELIMIT_INTERVAL_NS:
            if self.missed:
                print(f"fabric: {self.missed} fault lines suppressed", file=sys.stderr, flush=True)
            self.begin, self.printed, self.missed = now, 0, 0
        if self.printed < RATELIMIT_BURST:
            self.printed += 1
            return True
        self.missed += 1
        return False


def load_config(path: str) -> tuple[str, dict[str, PeerSpec], Platform, dict | None, str | None]:
    """``fabric.json``: the endpoint, the token table, the platform, and over tcp the CURVE
    section (``public``, ``secret``, ``clients``: name -> public key) and the optional local
    endpoint (both ``None`` for a plain ipc fabric)."""
    with open(path) as f:
        cfg = json.load(f)
    specs = {tok: PeerSpec(s["name"], s["role"], tuple(s["buses"]) if s.get("buses") else None)
             for tok, s in cfg["tokens"].items()}
    plat = Platform(**cfg.get("platform", {}))
    return cfg["endpoint"], specs, plat, cfg.get("curve"), cfg.get("local_endpoint")


#: The ZAP domain of the fabric's socket (setting one makes ZAP mandatory: no handler, no peer).
ZAP_DOMAIN = "irqlab"

_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class _CurveGate:
    """ZAP for CURVE: admit exactly the client public keys the launcher issued, count the rest.

    ``callback`` runs on the authenticator's thread; counting is handed to the loop.  The
    socket monitor adds the refusals ZAP never sees.  Counters: ``zap:refused`` (all), and
    ``zap:refused:unknown_key`` (a key the launcher did not issue), ``:no_curve`` (the client
    offered another mechanism), ``:handshake`` (a CURVE handshake that failed, e.g. the client
    does not know the server key, or a peer that hung up mid-handshake -- a client without
    CURVE sees the mismatch too and often drops the connection before the fabric reads its
    greeting, so it lands here about as often as under ``no_curve``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, clients: dict[str, str],
                 count: Callable[[str], None]):
        self._loop = loop
        self._allowed = {k.encode("ascii") for k in clients.values()}
        self._count = count
        self._limit = _RateLimit()

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            if key in self._allowed:
                return True
            self._loop.call_soon_threadsafe(self.refused, "unknown_key", key.decode("ascii", "replace"))
        except Exception:  # noqa: BLE001 - the ZAP thread must never die (it would stall every handshake)
            pass
        return False

    def refused(self, why: str, detail: str = "") -> None:
        self._count(why)
        if self._limit(time.monotonic_ns()):
            print(f"fabric: refused a client ({why}{': ' + detail if detail else ''})", file=sys.stderr, flush=True)

    def on_monitor(self, parts: list[bytes]) -> None:
        try:
            ev = parse_monitor_message(parts)
        except Exception:  # noqa: BLE001
            return
        if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if ev["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                self.refused("no_curve", "it did not offer CURVE")
            else:
                self.refused("handshake", f"CURVE handshake failed, protocol error 0x{ev['value']:x}")
        elif ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self.refused("handshake", f"the handshake did not complete (errno {ev['value']})")
        # EVENT_HANDSHAKE_FAILED_AUTH is ZAP's refusal, already counted by ``callback``


async def serve(endpoint: str, specs: dict[str, PeerSpec], platform: Platform,
                curve: dict | None = None, local_endpoint: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 200_000)
    sock.setsockopt(zmq.RCVHWM, 200_000)
    sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_CONTROL_FRAME + 64)
    sock.setsockopt(zmq.LINGER, 1000)
    fabric: Fabric | None = None
    auth = monitor = monitor_reader = gate = None

    def count_refusal(why: str) -> None:
        if fabric is not None:
            fabric.counters.update(["zap:refused", f"zap:refused:{why}"])

    if curve:
        # A CURVE server whose ZAP handler admits only the issued client keys.  The options are
        # per socket, so the local endpoint (if any) is CURVE too: its controller has a key.
        gate = _CurveGate(loop, curve["clients"], count_refusal)
        auth = zmq.auth.thread.ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=gate)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)   # no ZAP handler answering: nobody gets in
        sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve["secret"].encode("ascii"))
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve["public"].encode("ascii"))
        monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
    sock.bind(endpoint)
    if local_endpoint:
        sock.bind(local_endpoint)

    limit = _RateLimit()

    def on_fault(rec: FaultRecord) -> None:
        if limit(time.monotonic_ns()):
            print(rec.line(), file=sys.stderr, flush=True)

    sender = QueuedSender(loop, sock, router=True,
                          on_unroutable=lambda ident: fabric.counters.update(["drop:unroutable"]))
    fabric = Fabric(specs, platform, send=sender.send, on_fault=on_fault)
    fabric.tracer.on = trace.requested()      # launch.py --trace: from the first frame
    done = loop.create_future()

    wake_timer: list = [None, 0]          # the release timer (asyncio handle) and when it is due

    def arm_release() -> None:
        """Throttled guests (``Fabric.wake_ns``): one timer, at the earliest wake-up."""
        due = fabric.wake_ns
        if due is None or (wake_timer[0] is not None and wake_timer[1] <= due):
            return
        if wake_timer[0] is not None:
            wake_timer[0].cancel()
        wake_timer[1] = due
        # uvloop's timers tick in milliseconds: never fire before the budget is back
        wake_timer[0] = loop.call_later(max(0.0, (due - time.monotonic_ns()) / 1e9) + 0.001, on_wake)

    def on_wake() -> None:
        wake_timer[0] = None
        fabric.release(time.monotonic_ns())
        reader.kick()          # sends outside a drain can eat the socket's read edge
        arm_release()

    def on_message(parts: list[bytes]) -> None:
        fabric.on_multipart(parts)
        if fabric.wake_ns is not None:
            arm_release()
        if fabric.gone_identities:
            for ident in fabric.gone_identities:
                sender.drop(ident)
            fabric.gone_identities.clear()
        if fabric.shutdown_requested and not done.done():
            done.set_result("shutdown requested")

    reader = SocketReader(loop, sock, on_message, sender=sender)
    if monitor is not None:
        monitor_reader = SocketReader(loop, monitor, gate.on_monitor)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: done.done() or done.set_result(signal.Signals(s).name))
    print(f"fabric: listening on {endpoint}" + (f" and {local_endpoint}" if local_endpoint else "")
          + f" ({len(specs)} tokens issued"
          + (f"; CURVE, ZAP admits {len(curve['clients'])} client keys)" if curve else ")"),
          file=sys.stderr, flush=True)
    why = await done
    # Let the shutdown reply and anything queued leave before closing.
    for _ in range(200):
        if not sender.backlog():
            break
        await asyncio.sleep(0.005)
    reader.close()
    if monitor is not None:
        monitor_reader.close()
        sock.disable_monitor()
        monitor.close(linger=0)
    sock.close(linger=500)
    if auth is not None:
        auth.stop()
    ctx.term()
    frames = sender.messages - sender.batches + sender.batched_frames
    print(f"fabric: stopped ({why}); {fabric.tlps} TLPs, {fabric.irqs_delivered} interrupts delivered; "
          f"sent {frames} frames in {sender.messages} messages ({sender.batches} batches; "
          f"{sender.queued} waited for a full peer queue)",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fabric", description="irqlab fabric: PCIe bus, IOMMU and IR unit")
    ap.add_argument("--runtime", required=True, help="runtime directory written by launch.py")
    args = ap.parse_args(argv)
    die_with_parent()
    path = os.path.join(args.runtime, "fabric.json")
    endpoint, specs, platform, curve, local_endpoint = load_config(path)
    run(serve(endpoint, specs, platform, curve=curve, local_endpoint=local_endpoint))
    return 0
