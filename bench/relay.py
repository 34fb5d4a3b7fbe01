"""The raw baseline: DEALER -> ROUTER -> DEALER in three processes, the relay doing no work.

Same transport and socket strategy as the lab (DESIGN.md §3a): ipc:// in a temp
dir, uvloop, plain pyzmq sockets driven by ``fabric.loop.SocketReader`` and
``QueuedSender``, the fabric's ROUTER options (ROUTER_MANDATORY, HWM 200k) and
the ports' DEALER options.  The frame is a real ``wire.tlp`` frame (a 20-byte
TLP with origin and a timestamp, 36 bytes of msgpack), encoded by the sender and
decoded by the receiver, as the device and the host do; the relay forwards it
unread.

Two measurements, each in fresh processes:

* ``throughput(n)``: the sender blasts ``n`` frames; the receiver times first to last.
* ``latency(rate, seconds)``: the sender paces frames at ``rate``/s stamped with
  ``time.monotonic_ns()`` (system-wide, so comparable across processes); the
  receiver records now - stamp in an hdrh histogram.

Control frames are single bytes (R/S register the receiver/sender, Q ends the
run); data frames are longer, so the relay tells them apart by length alone.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import shutil
import tempfile
import time

import zmq
from hdrh.histogram import HdrHistogram

from fabric import wire
from fabric.loop import QueuedSender, SocketReader, die_with_parent, run

HWM = 200_000
TLP_RAW = bytes(range(20))       # a 4DW-header MWr with one DW of data
ORIGIN = 0x0100
WARMUP = 200                     # latency mode: the first frames are not recorded
HIST_ARGS = (1_000, 60_000_000_000, 3)   # as host/workload.py: 1 µs .. 60 s, 3 digits


def frame_size() -> int:
    return len(wire.tlp(TLP_RAW, ORIGIN, time.monotonic_ns()))


def _dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A DEALER with fabric.port.Port's options."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.SNDHWM, HWM)
    s.setsockopt(zmq.RCVHWM, HWM)
    s.setsockopt(zmq.LINGER, 2000)
    s.setsockopt(zmq.IMMEDIATE, 0)
    s.connect(endpoint)
    return s


# ---------------------------------------------------------------------------
# the three processes

async def _relay(endpoint: str, conn) -> None:
    cpu0 = time.process_time()
    loop = asyncio.get_running_loop()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)          # fabric.process.serve's options
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_CONTROL_FRAME + 64)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.bind(endpoint)
    sender = QueuedSender(loop, sock, router=True)
    send = sender.send
    peers: dict[bytes, bytes] = {}
    rx = b""
    forwarded = 0
    done = loop.create_future()

    def on_message(parts: list[bytes]) -> None:
        nonlocal rx, forwarded
        ident, frame = parts
        if len(frame) > 1:                 # the hot path: forward unread
            send(rx, frame)
            forwarded += 1
            return
        peers[frame] = ident
        if frame == b"R":
            rx = ident
            send(ident, b"k")
        elif frame == b"S":
            send(ident, b"k")
        elif frame == b"Q":
            if b"S" in peers:
                send(peers[b"S"], b"Q")
            done.done() or done.set_result(None)

    reader = SocketReader(loop, sock, on_message)
    conn.send("ready")
    await done
    for _ in range(400):
        if not sender.backlog():
            break
        await asyncio.sleep(0.005)
    reader.close()
    sock.close(linger=500)
    ctx.term()
    conn.send({"forwarded": forwarded, "queued": sender.queued, "cpu_s": time.process_time() - cpu0})


async def _register(sock: zmq.Socket, what: bytes, handler) -> tuple[SocketReader, QueuedSender]:
    loop = asyncio.get_running_loop()
    ok = loop.create_future()

    def on_message(parts: list[bytes]) -> None:
        frame = parts[0]
        if len(frame) == 1:
            if not ok.done():
                ok.set_result(frame)
            elif handler is not None:
                handler(frame)
            return
        handler(frame)

    reader = SocketReader(loop, sock, on_message)
    qs = QueuedSender(loop, sock, router=False)
    qs.send(None, what)
    reader.kick()
    async with asyncio.timeout(30):
        await ok
    return reader, qs


async def _receiver(endpoint: str, conn, n: int, record: bool, timeout_s: float) -> None:
    cpu0 = time.process_time()
    loop = asyncio.get_running_loop()
    ctx = zmq.Context()
    sock = _dealer(ctx, endpoint)
    hist = HdrHistogram(*HIST_ARGS)
    lo, hi = HIST_ARGS[0], HIST_ARGS[1]
    count = 0
    t_first = t_last = 0
    done = loop.create_future()
    decode = wire.decode
    clock = time.monotonic_ns

    def on_frame(frame: bytes) -> None:
        nonlocal count, t_first, t_last
        if len(frame) == 1:
            return
        msg = decode(frame)
        now = clock()
        count += 1
        if count == 1:
            t_first = now
        if record and count > WARMUP:
            hist.record_value(min(max(now - msg[3], lo), hi))
        if count == n:
            t_last = now
            done.done() or done.set_result(None)

    reader, qs = await _register(sock, b"R", on_frame)
    conn.send("ready")
    timed_out = False
    try:
        async with asyncio.timeout(timeout_s):
            await done
    except TimeoutError:
        timed_out = True
        t_last = clock()
    qs.send(None, b"Q")
    reader.kick()
    await asyncio.sleep(0.05)
    reader.close()
    sock.close(linger=1000)
    ctx.term()
    span = (t_last - t_first) / 1e9
    conn.send({"received": count, "timed_out": timed_out, "span_s": span, "cpu_s": time.process_time() - cpu0,
               "rate_per_s": (count - 1) / span if span > 0 else None,
               "hist": hist.encode().decode() if hist.get_total_count() else ""})


async def _sender(endpoint: str, conn, n: int, rate: float) -> None:
    cpu0 = time.process_time()
    loop = asyncio.get_running_loop()
    ctx = zmq.Context()
    sock = _dealer(ctx, endpoint)
    quit_ = loop.create_future()
    reader, qs = await _register(sock, b"S", lambda f: f == b"Q" and not quit_.done() and quit_.set_result(None))
    send, kick, tlp, clock = qs.send, reader.kick, wire.tlp, time.monotonic_ns
    t0 = time.monotonic()
    for i in range(n):
        if rate:
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        elif i % 1024 == 0:
            await asyncio.sleep(0)         # let the loop run (retries, reads) as a device would
        send(None, tlp(TLP_RAW, ORIGIN, clock()))
        kick()
    await quit_                            # the receiver has everything (or gave up)
    reader.close()
    sock.close(linger=1000)
    ctx.term()
    conn.send({"sent": n, "queued": qs.queued, "cpu_s": time.process_time() - cpu0})


def _child(role: str, endpoint: str, conn, *args) -> None:
    die_with_parent()
    main = {"relay": _relay, "receiver": _receiver, "sender": _sender}[role]
    try:
        run(main(endpoint, conn, *args))
    except KeyboardInterrupt:          # Ctrl-C reaches the whole process group; the parent reports it
        pass
    except BaseException as exc:
        conn.send({"error": f"{role}: {type(exc).__name__}: {exc}"})
        raise


# ---------------------------------------------------------------------------
# the parent

def _recv(conn, proc, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while not conn.poll(0.2):
        if not proc.is_alive() and not conn.poll(0):
            raise RuntimeError(f"{what}: process exited with status {proc.exitcode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no answer within {timeout:.0f} s")
    try:
        out = conn.recv()
    except EOFError:
        proc.join(2)
        raise RuntimeError(f"{what}: process exited with status {proc.exitcode}") from None
    if isinstance(out, dict) and "error" in out:
        raise RuntimeError(out["error"])
    return out


def _run(n: int, rate: float, record: bool, timeout_s: float) -> dict:
    mpc = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="irqlab-bench-")
    endpoint = f"ipc://{tmp}/relay.sock"
    procs: dict[str, tuple] = {}

    def start(role: str, *args):
        parent, child = mpc.Pipe()
        p = mpc.Process(target=_child, args=(role, endpoint, child, *args), name=f"bench-{role}", daemon=True)
        p.start()
        child.close()
        procs[role] = (p, parent)
        return p, parent

    try:
        p, c = start("relay")
        _recv(c, p, "relay start", 30)
        p, c = start("receiver", n, record, timeout_s)
        _recv(c, p, "receiver start", 30)
        start("sender", n, rate)
        res = _recv(procs["receiver"][1], procs["receiver"][0], "receiver", timeout_s + 30)
        res["sender"] = _recv(procs["sender"][1], procs["sender"][0], "sender", 30)
        res["relay"] = _recv(procs["relay"][1], procs["relay"][0], "relay", 30)
        for p, _ in procs.values():
            p.join(10)
        return res
    finally:
        for p, conn in procs.values():
            if p.is_alive():
                p.terminate()
                p.join(3)
            if p.is_alive():
                p.kill()
                p.join(3)
            conn.close()
        shutil.rmtree(tmp, ignore_errors=True)


def throughput(n: int = 500_000, timeout_s: float = 120.0) -> dict:
    """Saturation: msg/s at the receiver, first to last of ``n``."""
    res = _run(n, 0.0, False, timeout_s)
    res.pop("hist", None)
    res["cpu_us_per_msg"] = {"sender": res["sender"]["cpu_s"] / n * 1e6, "relay": res["relay"]["cpu_s"] / n * 1e6,
                             "receiver": res["cpu_s"] / n * 1e6}
    return res


def latency(rate: float = 2000.0, seconds: float = 5.0, timeout_s: float = 120.0) -> dict:
    """One-way latency sender -> relay -> receiver at a fixed rate; summary plus the hdrh histogram."""
    n = WARMUP + int(rate * seconds)
    res = _run(n, rate, True, timeout_s)
    res["offered_rate_per_s"] = rate
    res["latency"] = summary(decode_hist(res["hist"]) if res["hist"] else None)
    return res


def decode_hist(hist: str) -> HdrHistogram:
    """The ``hist`` field of a lab report row (and of ours): ``HdrHistogram.encode()`` as text
    (already base64 of the compressed histogram)."""
    return HdrHistogram.decode(hist.encode() if isinstance(hist, str) else hist)


def merged_latency(report: dict, oses: set[str] | None = None) -> dict:
    """One latency summary for a lab report: every function's histogram (of ``oses`` only, if
    given) merged."""
    h = HdrHistogram(*HIST_ARGS)
    for r in report["functions"]:
        if r["hist"] and (oses is None or r["os"] in oses):
            h.add(decode_hist(r["hist"]))
    return summary(h)


def summary(h: HdrHistogram | None) -> dict:
    if h is None or h.get_total_count() == 0:
        return {"count": 0, "p50_us": None, "p99_us": None, "p999_us": None, "max_us": None}
    return {"count": h.get_total_count(),
            "p50_us": h.get_value_at_percentile(50) / 1000,
            "p99_us": h.get_value_at_percentile(99) / 1000,
            "p999_us": h.get_value_at_percentile(99.9) / 1000,
            "max_us": h.get_max_value() / 1000}
