"""The device process shell: one physical device model behind one port.

Run as ``python -m device --runtime DIR --name d0`` with the registration token
in ``IRQLAB_TOKEN``.  Every TLP from the link goes to ``handle_tlp``; what the
model returns is sent in list order on the one socket, which is what keeps a
completion record's DMA write ahead of the interrupt that announces it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from device.sriov_device import SriovDevice
from fabric import wire
from fabric.loop import die_with_parent, run
from fabric.port import Port
from fabric.tlp import Tlp, TlpError, TlpType, peek
from fabric.trace import TLP_NAMES, Tracer, chunk_budget, flow_id, requested


#: trace argument names (fabric.trace.Tracer.rec)
_TK_TLP = ("dir", "rid", "key")
_TK_IRQ = ("origin", "rid", "addr", "data", "pasid")


class DeviceShell:
    def __init__(self, cfg: dict, port: Port):
        self.port = port
        if cfg.get("kind") == "siov":
            from device.siov_device import SiovDevice
            self.model = SiovDevice(adis=int(cfg.get("adis", 4)), adi_ims_slots=int(cfg.get("adi_ims_slots", 8)),
                                    pf_vectors=int(cfg.get("pf_vectors", 8)),
                                    pf_ims_slots=int(cfg.get("pf_ims_slots", 0)),
                                    pasid_interrupts=bool(cfg.get("pasid_interrupts", True)),
                                    irq_generator=bool(cfg.get("irq_generator", False)))
        else:
            self.model = SriovDevice(total_vfs=int(cfg.get("total_vfs", 4)),
                                     pf_vectors=int(cfg.get("pf_vectors", 8)),
                                     vf_vectors=int(cfg.get("vf_vectors", 4)),
                                     pf_ims_slots=int(cfg.get("pf_ims_slots", 0)),
                                     vf_ims_slots=int(cfg.get("vf_ims_slots", 0)),
                                     pasid_interrupts=bool(cfg.get("pasid_interrupts", True)),
                                     irq_generator=bool(cfg.get("irq_generator", False)))
        self.bad_tlps = 0
        self._wasted: dict[int, int] = {}           # guest link -> refused stores not yet reported
        self.stop = asyncio.get_running_loop().create_future()
        self._ops = {"stats": self.op_stats, "flr": self.op_flr, "shutdown": self.op_shutdown,
                     "trace.start": lambda a: self.tracer.start(a.get("max_events")),
                     "trace.dump": lambda a: self.tracer.dump_chunk(a.get("offset", 0), chunk_budget("device"))}
        self.tracer = Tracer(port.name, on=requested())

    def on_message(self, msg: list) -> None:
        kind = msg[0]
        if kind == wire.TLP:
            try:
                tlp = Tlp.unpack(msg[1])
            except TlpError:
                self.bad_tlps += 1
                return
            tr = self.tracer
            if tr.on:
                self._trace_tlp("rx", msg[1])
            link = msg[2]
            if link is None:
                emits = self.model.handle_tlp(tlp)
            else:
                # a guest's store (the fabric stamped its link): did it ring a full work queue?
                engines = self.model.engines
                refused = engines.refused
                emits = self.model.handle_tlp(tlp)
                if engines.refused != refused and type(link) is int:
                    self._waste(link, engines.refused - refused)
            if emits:
                send = self.port.send
                prev = packed = None
                for e in emits:
                    raw = e.raw
                    if raw is None:
                        if e is not prev:       # an IRQ_BURST repeats one Emit: pack it once
                            prev, packed = e, e.tlp.pack()
                        raw = packed
                    if e.origin is None:
                        send(wire.tlp(raw))
                        if tr.on:
                            self._trace_tx(e.tlp)
                    else:
                        t = time.monotonic_ns()
                        send(wire.tlp(raw, e.origin, t))
                        if tr.on:
                            self._trace_irq(e, t)
        elif kind == wire.CTL:
            try:
                c = wire.as_ctl(msg)
            except wire.WireError:
                return
            op = self._ops.get(c.op)
            if op is None:
                self.port.reply(c.req_id, False, f"device: unknown op {c.op!r} (known: {sorted(self._ops)})")
                return
            try:
                self.port.reply(c.req_id, True, op(c.args))
            except (KeyError, ValueError, TypeError) as exc:
                self.port.reply(c.req_id, False, f"device: {c.op}: {exc}")

    def _waste(self, link: int, n: int) -> None:
        """Count refused stores per guest link; one WASTED per link leaves after this wake-up."""
        pending = self._wasted
        if not pending:
            asyncio.get_running_loop().call_soon(self._flush_waste)
        pending[link] = pending.get(link, 0) + n

    def _flush_waste(self) -> None:
        pending, self._wasted = self._wasted, {}
        for link, n in pending.items():
            self.port.send(wire.wasted(link, n))

    def _trace_tlp(self, direction: str, raw: bytes) -> None:
        ftype, _, rid, key = peek(raw)
        self.tracer.rec("i", TLP_NAMES.get(ftype, "TLP"), "tlp", None, _TK_TLP, direction, rid, key)

    def _trace_tx(self, tlp: Tlp) -> None:
        t = tlp.type
        key = tlp.completer_id if t == TlpType.CPL or t == TlpType.CPL_DATA else tlp.address
        self.tracer.rec("i", TLP_NAMES.get(t, "TLP"), "tlp", None, _TK_TLP, "tx", tlp.requester_id, key)

    def _trace_irq(self, e, t_ns: int) -> None:
        """An interrupt MWr starts its flow, at the very time stamped beside it on the wire."""
        tlp = e.tlp
        self.tracer.rec_at(t_ns, "s", "interrupt MWr", "irq", flow_id(e.origin, t_ns), _TK_IRQ, e.origin,
                           tlp.requester_id, tlp.address, int.from_bytes(tlp.data[:4], "little"), tlp.pasid)

    def op_stats(self, args: dict) -> dict:
        snap = self.model.snapshot()
        snap["shell"] = {"bad_tlps": self.bad_tlps, "port_malformed": self.port.malformed}
        return snap

    def op_flr(self, args: dict) -> bool:
        return self.model.function_level_reset(int(args["rid"]))

    def op_shutdown(self, args: dict) -> bool:
        asyncio.get_running_loop().call_soon(lambda: self.stop.done() or self.stop.set_result("shutdown"))
        return True


async def main_async(cfg: dict, token: str, name: str) -> int:
    shell: DeviceShell | None = None
    port = Port(cfg["endpoint"], token or cfg.get("token", ""), name,
                on_message=lambda m: shell.on_message(m) if shell else None, curve=cfg.get("curve"))
    await port.connect()
    shell = DeviceShell(cfg, port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: shell.stop.done() or shell.stop.set_result(signal.Signals(s).name))
    port.event("ready", {"buses": port.info.get("buses")})
    why = await shell.stop
    await asyncio.sleep(0.05)
    port.close()
    print(f"device {name}: stopped ({why})", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m device", description="irqlab device: one PCIe device model")
    ap.add_argument("--runtime", required=True, help="runtime directory written by launch.py")
    ap.add_argument("--name", required=True)
    args = ap.parse_args(argv)
    die_with_parent()
    with open(os.path.join(args.runtime, f"{args.name}.json")) as f:
        cfg = json.load(f)
    rc = 0

    async def go():
        nonlocal rc
        rc = await main_async(cfg, os.environ.get("IRQLAB_TOKEN", ""), args.name)

    run(go())
    return rc
