"""Running ``launch.py`` as a user does, for the integration tests: one copy of the helpers
(a command to completion, a held topology, waiting for a process that is not our child)."""

from __future__ import annotations

import asyncio
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = [sys.executable, os.path.join(ROOT, "launch.py")]
HOLDING = "holding the topology; runtime "


async def run_launch(*args: str, timeout: float = 240, pid: list[int] | None = None) -> tuple[int, str, str]:
    """Run launch.py with ``args``; (exit status, stdout, stderr).  ``pid`` receives its pid."""
    proc = await asyncio.create_subprocess_exec(*LAUNCH, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    if pid is not None:
        pid.append(proc.pid)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"launch.py {' '.join(args)} did not finish within {timeout} s") from None
    return proc.returncode, out.decode(), err.decode()


async def wait_stderr(proc, marker: str, timeout: float = 120) -> list[str]:
    """Read the launcher's stderr until a line contains ``marker``; return the lines read."""
    seen: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            while not seen or marker not in seen[-1]:
                line = (await proc.stderr.readline()).decode()
                assert line, f"launch.py ended before printing {marker!r}; its stderr:\n" + "".join(seen)
                seen.append(line)
    except TimeoutError:
        raise AssertionError(f"no {marker!r} from launch.py within {timeout} s; its stderr:\n"
                             + "".join(seen)) from None
    return seen


async def start_held(*args: str, timeout: float = 120):
    """``launch.py run --hold ARGS``: (the launcher process, its runtime directory, the stderr
    lines read until it said it holds the topology).  The caller stops it (SIGINT)."""
    proc = await asyncio.create_subprocess_exec(*LAUNCH, "run", "--hold", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        seen = await wait_stderr(proc, HOLDING, timeout)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, seen[-1].rsplit(" ", 1)[1].strip(), seen


async def wait_exit(pid: int, timeout: float = 120, why: str = "") -> None:
    """Await the death of a process that is not our child (a pidfd becomes readable on exit);
    on expiry fail saying ``why`` it should have died."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        async with asyncio.timeout(timeout):
            await gone
    except TimeoutError:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = "?"
        raise AssertionError(f"process {pid} ({cmd}) still alive {timeout} s after {why or 'it should have died'}") \
            from None
    finally:
        loop.remove_reader(fd)
        os.close(fd)
