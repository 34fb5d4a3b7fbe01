"""A pre-imported parent that forks guest processes (``python -m irqlab.zygote``).

Starting a guest with ``python -m guest`` costs a new interpreter and the import
of asyncio, uvloop, pyzmq, msgpack and the OS model: about 0.2 s of CPU each,
which for 64 VMs on 2 cores is most of the boot.  The zygote (Android's name for
the same trick) imports all that once, then forks one child per guest.  A child
is exactly what ``python -m guest --runtime DIR --name NAME`` would be -- the same
``guest.process.main`` with the same arguments and environment -- minus the
start-up; it shares the zygote's imported code pages until it writes them.

Protocol, one JSON object per line.  The launcher writes requests on stdin::

    {"name": "g1", "module": "guest", "argv": [...], "env": {...}, "log": PATH, "cwd": DIR}

and reads on stdout ``{"ready": true}`` (imports done), then per request
``{"spawned": NAME, "pid": PID}`` or ``{"failed": NAME, "error": "..."}``, and
for every child that ends ``{"exited": PID, "status": S}`` (S as
``asyncio.subprocess.Process.returncode``: the exit code, or -signal).

Lifetime.  The zygote asks the kernel to SIGKILL it when the launcher dies
(``PR_SET_PDEATHSIG``); each child does the same with the zygote as its parent
(``fabric.loop.die_with_parent``), so nothing outlives the launcher.  EOF on stdin
ends the zygote; the launcher stops every child first.  A child runs in its own
session (process group = its pid), logs to its own file, like an exec'd one.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import selectors
import signal
import sys
import traceback

#: modules a child may run (each has ``main(argv) -> int``)
MODULES = ("guest",)


def _write(obj: dict) -> None:
    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(1, data):]


def _child(req: dict, mains: dict, keep: tuple[int, ...]) -> None:
    """In the forked child: become the process ``python -m MODULE ARGV`` would be; never return."""
    rc = 1
    try:
        os.setsid()
        for fd in keep:
            os.close(fd)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        os.environ["IRQLAB_PARENT_PID"] = str(os.getppid())   # die_with_parent() checks its parent
        sys.argv = [f"-m {req['module']}"] + list(req["argv"])
        rc = mains[req["module"]](list(req["argv"]))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:                     # noqa: BLE001 - reported in the child's log
        traceback.print_exc()
        rc = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc if isinstance(rc, int) else 1)


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _write({"exited": pid, "status": -os.WTERMSIG(status) if os.WIFSIGNALED(status)
                else os.WEXITSTATUS(status)})


def main() -> int:
    from fabric.loop import die_with_parent
    die_with_parent()
    mains = {}
    for name in MODULES:
        mains[name] = importlib.import_module(f"{name}.process").main
    importlib.import_module("guest.hostile")          # imported lazily by guests; warm it too
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)   # wakes the selector via the wakeup fd
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "req")
    sel.register(rfd, selectors.EVENT_READ, "sig")
    _write({"ready": True})
    pending = b""
    while True:
        for key, _ in sel.select():
            if key.data == "sig":
                try:
                    while os.read(rfd, 512):
                        pass
                except BlockingIOError:
                    pass
                _reap()
                continue
            chunk = os.read(0, 65536)
            if not chunk:                             # the launcher is done with us
                return 0
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                req = None
                try:
                    req = json.loads(line)
                    if req.get("module") not in mains:
                        raise ValueError(f"unknown module {req.get('module')!r}")
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                except Exception as exc:              # noqa: BLE001 - told to the launcher
                    _write({"failed": str(req.get("name") if isinstance(req, dict) else "?"),
                            "error": f"{type(exc).__name__}: {exc}"})
                    continue
                if pid == 0:
                    _child(req, mains, (rfd, wfd, sel.fileno()))
                _write({"spawned": req["name"], "pid": pid})
            _reap()


# ---------------------------------------------------------------------------------------------
# The launcher's side (``irqlab.lab.Lab``); imports nothing of guest/


class ForkedProcess:
    """What the launcher needs of a child (``asyncio.subprocess.Process``'s ``pid``,
    ``returncode`` and ``wait()``) for one forked by the zygote, whose exit the zygote reports."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._done = asyncio.get_running_loop().create_future()
        self._pidfd: int | None = None

    async def wait(self) -> int:
        await asyncio.shield(self._done)
        return self.returncode

    def _exited(self, status: int) -> None:
        if self.returncode is None:
            self.returncode = status
            self._done.set_result(status)
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._pidfd)
            except (RuntimeError, ValueError):
                pass
            os.close(self._pidfd)
            self._pidfd = None

    def _orphaned(self) -> None:
        """The zygote is gone, so nobody reports this child's exit: the kernel SIGKILLs it
        (its parent-death signal); wait for that on a pidfd, then record it."""
        if self.returncode is not None:
            return
        try:
            fd = os.pidfd_open(self.pid) if self._pidfd is None else self._pidfd
        except (OSError, AttributeError):
            self._exited(-signal.SIGKILL)     # already gone (or no pidfd: it gets SIGKILL anyway)
            return
        self._pidfd = fd
        asyncio.get_running_loop().add_reader(fd, self._exited, -signal.SIGKILL)


class ZygoteClient:
    """Starts ``python -m irqlab.zygote`` and asks it for guests."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None
        self._pending: dict[str, asyncio.Future] = {}
        self._procs: dict[int, ForkedProcess] = {}
        self._early_exits: dict[int, int] = {}
        self.error: str | None = None

    async def start(self, env: dict, cwd: str, log_path: str) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        with open(log_path, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "irqlab.zygote", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log, env=env, cwd=cwd, start_new_session=True)
        self._reader = loop.create_task(self._read())

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self.error is None

    async def ready(self) -> None:
        await asyncio.shield(self._ready)

    async def _read(self) -> None:
        try:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "exited" in msg:
                    pid, status = int(msg["exited"]), int(msg["status"])
                    p = self._procs.get(pid)
                    if p is None:
                        self._early_exits[pid] = status
                    else:
                        p._exited(status)
                elif "spawned" in msg:
                    fut = self._pending.pop(msg["spawned"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(int(msg["pid"]))
                elif "failed" in msg:
                    fut = self._pending.pop(msg["failed"], None)
                    if fut is not None and not fut.done():
                        fut.set_exception(RuntimeError(msg.get("error", "fork failed")))
                elif msg.get("ready") and not self._ready.done():
                    self._ready.set_result(True)
        finally:
            self.error = self.error or "the guest zygote exited"
            for fut in [self._ready, *self._pending.values()]:
                if not fut.done():
                    fut.set_exception(RuntimeError(self.error))
            self._pending.clear()
            for p in self._procs.values():
                p._orphaned()

    async def spawn(self, name: str, module: str, argv: list[str], env: dict, log_path: str,
                    cwd: str) -> ForkedProcess:
        if not self.alive:
            raise RuntimeError(self.error or "the guest zygote is not running")
        fut = asyncio.get_running_loop().create_future()
        self._pending[name] = fut
        req = {"name": name, "module": module, "argv": argv, "env": env, "log": log_path, "cwd": cwd}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        pid = await fut
        p = ForkedProcess(pid)
        self._procs[pid] = p
        if pid in self._early_exits:
            p._exited(self._early_exits.pop(pid))
        else:
            try:
                p._pidfd = os.pidfd_open(pid)
            except (OSError, AttributeError):
                pass
        return p

    async def close(self, grace: float = 5.0) -> None:
        """EOF to the zygote (it exits), then SIGKILL if it has not within ``grace``."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            try:
                proc.stdin.close()
            except (OSError, RuntimeError):
                pass
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                await proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        for p in self._procs.values():
            p._close_pidfd()


if __name__ == "__main__":
    sys.exit(main())
