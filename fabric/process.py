"""The fabric process shell: one ROUTER socket around ``fabric.bus.Fabric``.

Run as ``python -m fabric --runtime DIR``; ``DIR/fabric.json`` (written by the
launcher, mode 0600) holds the endpoint, the token table and the platform.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

import zmq

from fabric import wire
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


def load_config(path: str) -> tuple[str, dict[str, PeerSpec], Platform]:
    with open(path) as f:
        cfg = json.load(f)
    specs = {tok: PeerSpec(s["name"], s["role"], tuple(s["buses"]) if s.get("buses") else None)
             for tok, s in cfg["tokens"].items()}
    plat = Platform(**cfg.get("platform", {}))
    return cfg["endpoint"], specs, plat


async def serve(endpoint: str, specs: dict[str, PeerSpec], platform: Platform) -> None:
    loop = asyncio.get_running_loop()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 200_000)
    sock.setsockopt(zmq.RCVHWM, 200_000)
    sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_CONTROL_FRAME + 64)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.bind(endpoint)

    limit = _RateLimit()

    def on_fault(rec: FaultRecord) -> None:
        if limit(time.monotonic_ns()):
            print(rec.line(), file=sys.stderr, flush=True)

    fabric: Fabric
    sender = QueuedSender(loop, sock, router=True,
                          on_unroutable=lambda ident: fabric.counters.update(["drop:unroutable"]))
    fabric = Fabric(specs, platform, send=sender.send, on_fault=on_fault)
    done = loop.create_future()

    def on_message(parts: list[bytes]) -> None:
        fabric.on_multipart(parts)
        if fabric.gone_identities:
            for ident in fabric.gone_identities:
                sender.drop(ident)
            fabric.gone_identities.clear()
        if fabric.shutdown_requested and not done.done():
            done.set_result("shutdown requested")

    reader = SocketReader(loop, sock, on_message)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: done.done() or done.set_result(signal.Signals(s).name))
    print(f"fabric: listening on {endpoint} ({len(specs)} tokens issued)", file=sys.stderr, flush=True)
    why = await done
    # Let the shutdown reply and anything queued leave before closing.
    for _ in range(200):
        if not sender.backlog():
            break
        await asyncio.sleep(0.005)
    reader.close()
    sock.close(linger=500)
    ctx.term()
    print(f"fabric: stopped ({why}); {fabric.tlps} TLPs, {fabric.irqs_delivered} interrupts delivered",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fabric", description="irqlab fabric: PCIe bus, IOMMU and IR unit")
    ap.add_argument("--runtime", required=True, help="runtime directory written by launch.py")
    args = ap.parse_args(argv)
    die_with_parent()
    endpoint, specs, platform = load_config(os.path.join(args.runtime, "fabric.json"))
    run(serve(endpoint, specs, platform))
    return 0
