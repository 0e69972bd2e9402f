"""``python -m gpuvars launch -n N [--port P] [--timeout S] script.py args...``: N local processes.

Each child runs ``script.py args...`` with this interpreter and the coordinator
environment :func:`gpuvars.distributed.initialize` reads (``GPUVARS_COORDINATOR``,
``GPUVARS_NUM_PROCESSES``, ``GPUVARS_PROCESS_ID``). Output is forwarded line by line
with a ``[k] `` prefix. The first child to fail ends the others (SIGTERM, then SIGKILL
after a grace period) and its exit status is the launcher's; past ``--timeout`` every
child is killed and the launcher exits 124. It never waits without a bound. It imports
no JAX: the children do.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

__all__ = ["launch", "main"]

GRACE_S = 5.0  # from SIGTERM to SIGKILL
TIMEOUT_EXIT = 124


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _forward(k: int, stream: IO[bytes], out: IO[str], lock: threading.Lock) -> None:
    prefix = f"[{k}] "
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        with lock:
            out.write(prefix + line + "\n")
            out.flush()
    stream.close()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own session (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every child still running, SIGKILL those alive after GRACE_S."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def launch(
    script: str,
    args: Sequence[str],
    num_processes: int,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    timeout: float | None = None,
    out: IO[str] | None = None,
) -> int:
    """Run ``script args`` in ``num_processes`` processes; the exit status of the group
    (0 when all succeeded, the first failure's status, or 124 past ``timeout``)."""
    sink = sys.stdout if out is None else out
    address = f"{host}:{port if port is not None else free_port()}"
    lock = threading.Lock()
    procs: list[subprocess.Popen[bytes]] = []
    readers: list[threading.Thread] = []
    started = time.monotonic()
    try:
        for k in range(num_processes):
            env = dict(os.environ)
            env.update(
                GPUVARS_COORDINATOR=address,
                GPUVARS_NUM_PROCESSES=str(num_processes),
                GPUVARS_PROCESS_ID=str(k),
                PYTHONUNBUFFERED="1",
            )
            proc = subprocess.Popen(
                [sys.executable, script, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            procs.append(proc)
            assert proc.stdout is not None
            t = threading.Thread(target=_forward, args=(k, proc.stdout, sink, lock), daemon=True)
            t.start()
            readers.append(t)
        status = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [(k, c) for k, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                k, status = failed[0]
                status = status if status > 0 else 128 - status  # killed by a signal: 128 + its number
                with lock:
                    sink.write(f"[launch] process {k} exited with status {codes[k]}; stopping the others\n")
                    sink.flush()
                break
            if all(c == 0 for c in codes):
                break
            if timeout is not None and time.monotonic() - started > timeout:
                late = [k for k, c in enumerate(codes) if c is None]
                with lock:
                    sink.write(
                        f"[launch] timed out after {timeout:g}s; process(es) {', '.join(map(str, late))} "
                        "still running: killing them\n"
                    )
                    sink.flush()
                status = TIMEOUT_EXIT
                break
            time.sleep(0.05)
    finally:
        _stop(procs)
        for t in readers:
            t.join(GRACE_S)  # a grandchild holding the pipe open must not hold the launcher
    return status


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpuvars launch",
        description="run a script in N local processes joined by gv.distributed.initialize()",
    )
    parser.add_argument("-n", "--num-processes", type=int, required=True, help="how many processes")
    parser.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--timeout", type=float, default=None, help="kill every process after this many seconds")
    parser.add_argument("script", help="the Python script each process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    ns = parser.parse_args(list(argv))
    if ns.num_processes < 1:
        parser.error(f"-n must be >= 1, got {ns.num_processes}")
    if ns.timeout is not None and not ns.timeout > 0:
        parser.error(f"--timeout must be > 0, got {ns.timeout}")
    # a SIGTERM to the launcher ends its children too (the finally of launch)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return launch(ns.script, ns.args, ns.num_processes, port=ns.port, timeout=ns.timeout)
