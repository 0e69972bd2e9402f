"""A fork server for the fault tests (tests/test_checkpoint_crash.py, test_checkpoint_faults.py).

Run as a script, it imports numpy and gpuvars once, then forks one child per command, so a
case costs a fork instead of an interpreter start (about 1.7 s here, most of it ml_dtypes),
and the tests can afford many cases. A child is an ordinary process writing an ordinary
checkpoint, with its own resource limits and user: the test SIGKILLs it by pid or lets it
end, then asks the server to reap it, so the dead pid is gone (not a zombie) when the next
save sweeps stale temporary files. Imported, this module is the test side:
:class:`ForkServer`.

Lines on stdin / stdout::

    run <json>   a saving child starts; it prints "ready <pid>", then "<step>" after each
                 commit (for ``blocking=False``: from the done callback, once ``result()``
                 returned)
    exec <json>  a child runs ``{"code": ..., "argv": [...]}`` (``argv`` and :func:`say` are
                 globals there) and exits 0; the server prints "forked <pid>"
    reap <pid>   -> "reaped <pid> <wait status>" once the child is reaped
    quit

A child that fails prints "error <text>" and exits with status 2 (3 from a done callback):
the test sees that status instead of SIGKILL's.

The values make every checkpoint checkable: at save ``s`` every element of every variable
is ``s``; with ``mutate_after``, every variable is assigned ``-s`` right after a
``blocking=False`` call returns (its file must hold ``s``: the value at the call).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

import gpuvars as gv


def say(line: str) -> None:
    """One line on the shared pipe: a single write() of under PIPE_BUF bytes is atomic."""
    os.write(1, (line[:3000] + "\n").encode())


def child(folder: str, start: int, mode: str, pause: float, blocking: bool, n: int, mutate_after: bool) -> None:
    # an explicit CPU device: placing on the default device would probe (import) the GPU libraries
    vs = [gv.Variable(np.zeros(n, np.float32), name=f"v{i}", device="/cpu:0") for i in range(4)]
    opts = gv.SaveOptions(experimental_variable_policy="save_variable_devices")
    saver = gv.Saver(vs, max_to_keep=3, options=opts)
    target = os.path.join(folder, "model.ckpt" if mode == "steps" else "same")

    def committed(fut: Any, step: int) -> None:
        try:
            fut.result(0)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            say(f"error in the save of step {step}: {type(exc).__name__}: {exc}")
            os._exit(3)
        say(str(step))

    say(f"ready {os.getpid()}")
    step = start
    while True:
        for v in vs:
            v.assign(np.full(n, step, np.float32))
        global_step = step if mode == "steps" else None
        if blocking:
            saver.save(target, global_step=global_step)
            say(str(step))
        else:
            fut = saver.save(target, global_step=global_step, blocking=False)
            fut.add_done_callback(lambda f, s=step: committed(f, s))
            if mutate_after:  # at once: the bytes of this save must still be step's
                for v in vs:
                    v.assign(np.full(n, -step, np.float32))
        step += 1
        time.sleep(pause)  # "training" between saves


def main() -> None:
    say("up")
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "run":
            args = json.loads(arg)
            pid = os.fork()
            if pid == 0:
                try:
                    child(**args)
                except BaseException:  # noqa: BLE001 - reported to the test
                    say("error " + traceback.format_exc().replace("\n", " | "))
                os._exit(2)
        elif cmd == "exec":
            job = json.loads(arg)
            pid = os.fork()
            if pid == 0:
                try:
                    exec(job["code"], {"__name__": "__child__", "argv": job["argv"], "say": say})
                except BaseException:  # noqa: BLE001 - reported to the test
                    say("error " + traceback.format_exc().replace("\n", " | "))
                    os._exit(2)
                os._exit(0)
            say(f"forked {pid}")
        elif cmd == "reap":
            pid = int(arg)
            _, status = os.waitpid(pid, 0)
            say(f"reaped {pid} {status}")
        elif cmd == "quit":
            return


# --- the test side -------------------------------------------------------------------------------

#: the server imports the gpuvars this process imported: same interpreter, environment and folder
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(Path(gv.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}


class ForkServer:
    """This file running as a script; forks children for :meth:`run_and_kill` and :meth:`exec`."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=ENV)
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()
        assert self.next_line() == "up"

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("EOF")

    def next_line(self, timeout: float = 60.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the fork server said nothing for {timeout} s") from None

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def reap(self, pid: int, timeout: float = 60.0) -> tuple[int, list[str]]:
        """Wait for child ``pid`` to end: (its wait status, the lines it printed)."""
        self.send(f"reap {pid}")
        lines = []
        while not (line := self.next_line(timeout)).startswith(f"reaped {pid} "):
            assert line != "EOF", "the fork server died"
            lines.append(line)
        return int(line.split()[2]), lines

    def run_and_kill(self, folder: Path, start: int, mode: str, delay: float, *, n: int, pause: float = 0.0,
                     blocking: bool = True, mutate_after: bool = False) -> tuple[int, list[int]]:
        """Fork a saving child, SIGKILL it ``delay`` seconds after it is ready; (pid, steps it committed)."""
        args = dict(folder=str(folder), start=start, mode=mode, pause=pause, blocking=blocking, n=n,
                    mutate_after=mutate_after)
        self.send("run " + json.dumps(args))
        ready = self.next_line()
        assert ready.startswith("ready "), ready
        pid = int(ready.split()[1])
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it died by itself: its status says how
        status, lines = self.reap(pid)
        errors = [x for x in lines if x.startswith("error")]
        assert not errors and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (status, errors)
        return pid, [int(x) for x in lines]

    def exec(self, code: str, *argv: str, timeout: float = 60.0) -> list[str]:
        """Run ``code`` in a forked child (``argv`` a global there); the lines it printed with
        :func:`say`. Fails the test if it raised or did not exit 0 in time."""
        self.send("exec " + json.dumps({"code": code, "argv": list(argv)}))
        forked = self.next_line()
        assert forked.startswith("forked "), forked
        status, lines = self.reap(int(forked.split()[1]), timeout)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, lines)
        return lines

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.send("quit")
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.reader.join(timeout=30)
        self.proc.stdout.close()


if __name__ == "__main__":
    main()
