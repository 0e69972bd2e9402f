"""A fork server for the SIGKILL tests (tests/test_checkpoint_crash.py).

It imports numpy and gpuvars once, then forks one saving child per command, so a kill case
costs a fork instead of an interpreter start (about a second here), and the tests can
afford many cases. The child is an ordinary process writing an ordinary checkpoint: the
test SIGKILLs it by pid, then asks this server to reap it, so the dead pid is gone (not a
zombie) when the next save sweeps stale temporary files.

Lines on stdin / stdout::

    run <json>   a child starts; it prints "ready <pid>", then "<step>" after each commit
                 (for ``blocking=False``: from the done callback, once ``result()`` returned)
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
import sys
import time
import traceback
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
        elif cmd == "reap":
            pid = int(arg)
            _, status = os.waitpid(pid, 0)
            say(f"reaped {pid} {status}")
        elif cmd == "quit":
            return


if __name__ == "__main__":
    main()
