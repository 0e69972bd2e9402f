"""A checkpoint saved by every process of a group and committed once (DESIGN "Beyond one
machine": the commit protocol across processes).

Two rounds, each the same: every process publishes a report in the coordination
service's key-value store, process 0 reads every report (one deadline for all of them),
decides, and publishes its decision, which every process reads and acts on. Nothing
waits without a deadline, and every process raises the same error.

1. **Start** (at the call, before anything is pinned or written): each process reports
   whether its variables can be saved, with a signature of what it saves (keys, dtypes,
   shapes, kinds) and the prefix's name; process 0 first retires an old index of the same
   prefix. Decision: go, or a :class:`~gpuvars.errors.CheckpointCommitError` naming the
   processes that failed, differ from process 0 or are late.
2. **Commit** (after each process wrote and fsynced its own files: process 0 the data
   file, every process the replica files of its own replicas): each process reports its
   files with their sizes and checksums, or its error; process 0 writes the device map and
   the index (the commit) only if every report came in time and none failed, then the
   state file; otherwise it commits nothing. A process whose save did not commit removes
   the files it wrote.

The files live in one folder every process sees (a shared file system across hosts).
Process 0 saves the logical tensors; a plain variable is saved from process 0 only.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from typing import Any, Callable, Mapping

from gpuvars import devices as _devices
from gpuvars.checkpoint import _write
from gpuvars.checkpoint._saveable import Saveable
from gpuvars.checkpoint._write import LocalFiles, SavePlan, Step
from gpuvars.distributed import _runtime
from gpuvars.errors import CheckpointCommitError, CheckpointError, CheckpointWriteError, DistributedError, GpuvarsError

__all__ = ["Collective", "group_size"]

_numbers = itertools.count()  # the k-th save across processes of one process meets the k-th of the others
_numbers_lock = threading.Lock()


def group_size() -> int:
    """How many processes a save spans: the group's, after ``gv.distributed.initialize``."""
    return _runtime.num_processes() if _runtime.is_initialized() else 1


def signature(saveables: Mapping[str, Saveable]) -> str:
    """A digest of what is saved: every key with its kind, dtype and shape, in order."""
    h = hashlib.sha256()
    for key, sv in saveables.items():
        dtype = sv.dtype
        h.update(f"{key}\0{sv.kind}\0{'' if dtype is None else dtype.str}\0{sv.shape}\n".encode())
    return h.hexdigest()[:32]


def _on_task(device: str, process: int) -> str:
    """``device`` as the device of process ``process`` (``/job:worker/task:K/...``), unless it
    names a task already."""
    try:
        spec = _devices.DeviceSpec.from_string(device)
    except GpuvarsError:
        return device
    if spec.job is not None or spec.task is not None:
        return device
    return f"/job:worker/task:{process}{device}"


def _listed(processes: list[int]) -> str:
    return ", ".join(map(str, processes))


class Collective:
    """One save across the group's processes; made by :meth:`start` on every process."""

    def __init__(self, prefix: str, timeout: float) -> None:
        with _numbers_lock:
            self.number = next(_numbers)
        self.prefix = prefix
        self.timeout = float(timeout)
        self.me = _runtime.process_id()
        self.n = _runtime.num_processes()
        self.old_files: list[str] = []

    @property
    def primary(self) -> bool:
        """Whether this process commits (process 0)."""
        return self.me == 0

    # --- the rounds -------------------------------------------------------------------------

    def _key(self, round_name: str, who: str) -> str:
        return f"checkpoint/{self.number}/{round_name}/{who}"

    def _round(self, name: str, report: dict[str, Any],
               decide: Callable[[dict[int, dict[str, Any]], list[int]], dict[str, Any]]) -> dict[str, Any]:
        """Publish ``report``; process 0 gathers every report (``timeout`` in all) and publishes
        ``decide(reports, late)``; every process returns that decision."""
        _runtime.kv_put(self._key(name, str(self.me)), report)
        if self.primary:
            reports: dict[int, dict[str, Any]] = {0: report}
            late: list[int] = []
            deadline = time.monotonic() + self.timeout
            for p in range(1, self.n):
                try:
                    reports[p] = _runtime.kv_get(self._key(name, str(p)), max(0.001, deadline - time.monotonic()))
                except DistributedError:
                    late.append(p)
            try:
                decision = decide(reports, late)
            except BaseException as exc:  # no process waits for a decision that never comes
                _runtime.kv_put(self._key(name, "decision"), {
                    "ok": False, "processes": [0],
                    "error": f"checkpoint {self.prefix!r} was not committed: process 0 failed: {type(exc).__name__}: {exc}",
                })
                raise
            _runtime.kv_put(self._key(name, "decision"), decision)
            return decision
        try:
            decision = _runtime.kv_get(self._key(name, "decision"), 2 * self.timeout)
        except DistributedError as exc:
            raise CheckpointCommitError(
                f"cannot save checkpoint {self.prefix!r} across {self.n} processes: process {self.me} had no "
                f"decision from process 0 within {2 * self.timeout:g}s ({name} round): {exc}; nothing of this "
                "save was committed by it", (0,),
            ) from exc
        assert isinstance(decision, dict)
        return decision

    def _failure(self, doing: str, reports: dict[int, dict[str, Any]], late: list[int],
                 odd: Mapping[int, str] = {}) -> dict[str, Any] | None:
        """The decision that nothing is committed, naming who failed, differs or is late;
        None when every report is fine."""
        causes = {p: f"failed: {r['error']}" for p, r in reports.items() if r.get("error")}
        causes.update({p: why for p, why in odd.items() if p not in causes})
        if not causes and not late:
            return None
        text = [f"process {p} {why}" for p, why in sorted(causes.items())]
        if late:
            text.append(f"process(es) {_listed(late)} did not report within {self.timeout:g}s (SaveOptions.commit_timeout)")
        message = (f"checkpoint {self.prefix!r} was not committed ({doing} across {self.n} processes): "
                   + "; ".join(text) + "; checkpoints at other prefixes are untouched")
        return {"ok": False, "error": message, "processes": sorted(set(causes) | set(late))}

    @staticmethod
    def _raise(decision: dict[str, Any]) -> None:
        raise CheckpointCommitError(str(decision["error"]), tuple(int(p) for p in decision.get("processes", ())))

    # --- round 1: start ---------------------------------------------------------------------

    @classmethod
    def start(cls, prefix: str, saveables: Mapping[str, Saveable], timeout: float) -> Collective:
        """Round 1 on this process: check what it saves, retire an old index (process 0),
        and agree with every process to go.

        Raises:
            CheckpointCommitError: some process cannot save, saves something else than
                process 0, or is late; nothing was written anywhere.
        """
        self = cls(prefix, timeout)
        error = None
        doing = Step("checking the variables")
        try:
            _write.check_saveable(saveables)
            if self.primary:
                self.old_files = _write.open_folder(prefix, doing)
        except GpuvarsError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"{doing.what} failed: {exc.strerror or exc}"
        report = {"error": error, "base": os.path.basename(prefix), "signature": signature(saveables)}

        def decide(reports: dict[int, dict[str, Any]], late: list[int]) -> dict[str, Any]:
            if not late and self.number > 0:  # every process has left the previous save: its keys can go
                _runtime.kv_delete(f"checkpoint/{self.number - 1}")
            mine = reports[0]
            odd = {
                p: (f"saved {r['base']!r}, not {mine['base']!r}" if r["base"] != mine["base"]
                    else "saved other variables than process 0 (keys, kinds, dtypes or shapes differ)")
                for p, r in reports.items() if (r["base"], r["signature"]) != (mine["base"], mine["signature"])
            }
            return self._failure("start", reports, late, odd) or {"ok": True}

        decision = self._round("start", report, decide)
        if not decision["ok"]:
            self._raise(decision)
        return self

    # --- round 2: write and commit ----------------------------------------------------------

    def write(self, plan: SavePlan | None, error: BaseException | None, progress: bool | None,
              after_commit: Callable[[], None]) -> None:
        """Write this process's files of ``plan`` (none when preparing it failed with
        ``error``), then round 2. Process 0 commits and runs ``after_commit`` (the state file
        and retention); every process runs it after a commit.

        Raises:
            CheckpointCommitError: some process failed or was late: nothing was committed.
            CheckpointWriteError: committed, but the state file or retention failed (every
                process raises it).
        """
        folder = os.path.dirname(self.prefix)
        written: list[str] = []
        local: LocalFiles | None = None
        report: dict[str, Any] = {"error": None}
        doing = Step("writing")
        try:
            if error is not None:
                raise error
            assert plan is not None
            replicas = len(plan.replicas)
            local = _write.write_local(plan, written, progress, doing, self.me * replicas, self.n * replicas)
            records = plan.device_records or {}
            report.update(
                files=local.files, components=local.components, replicas=replicas,
                devices={key: [{**c, "device": _on_task(c["device"], self.me)} for c in rec["components"]]
                         for key, rec in records.items() if key in local.components},
            )
        except GpuvarsError as exc:
            report["error"] = getattr(exc, "step", None) or str(exc)
        except OSError as exc:
            report["error"] = f"{doing.what} failed: {exc.strerror or exc}"
        except Exception as exc:  # reported like the others: every process must hear of it
            report["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if plan is not None:
                plan.snapshot.release()

        def decide(reports: dict[int, dict[str, Any]], late: list[int]) -> dict[str, Any]:
            counts = {p: r.get("replicas") for p, r in reports.items() if not r.get("error")}
            odd = {p: f"saved {c} replicas, process 0 {counts.get(0)}" for p, c in counts.items()
                   if 0 in counts and c != counts[0]}
            failure = self._failure("writing", reports, late, odd)
            if failure is not None:
                return failure
            assert plan is not None and local is not None
            return self._commit(plan, local, reports, written, after_commit)

        try:
            decision = self._round("commit", report, decide)
        except BaseException:
            _write.remove_written(folder, written)
            raise
        if not decision["ok"]:
            _write.remove_written(folder, written)
            self._raise(decision)
        if decision.get("after") is not None:
            raise CheckpointWriteError(str(decision["after"]))
        if not self.primary:
            after_commit()

    def _commit(self, plan: SavePlan, local: LocalFiles, reports: dict[int, dict[str, Any]],
                written: list[str], after_commit: Callable[[], None]) -> dict[str, Any]:
        """Process 0: every process's files into one index, committed; then the state file."""
        merged = LocalFiles(local.version)
        merged.checksums, merged.weight_map = local.checksums, local.weight_map
        records = None if plan.device_records is None else {k: dict(r) for k, r in plan.device_records.items()}
        for p in range(self.n):
            r = reports[p]
            merged.files.update(r["files"])
            for key, comps in r["components"].items():
                merged.components.setdefault(key, []).extend(comps)
            if records is not None:
                for key, devs in r["devices"].items():  # each component's device, process after process
                    records[key]["components"] = (records[key]["components"] if p else []) + devs
        doing = Step("committing")
        try:
            _write.commit(plan, merged, records, self.old_files, written, doing)
        except GpuvarsError as exc:
            return self._commit_failed(str(exc), written)
        except OSError as exc:
            return self._commit_failed(f"{doing.what} failed: {exc.strerror or exc}", written)
        after = None
        try:
            after_commit()
        except CheckpointError as exc:
            after = str(exc)
        return {"ok": True, "after": after}

    def _commit_failed(self, why: str, written: list[str]) -> dict[str, Any]:
        _write.remove_written(os.path.dirname(self.prefix), written)
        return {"ok": False, "processes": [0],
                "error": f"checkpoint {self.prefix!r} was not committed (committing across {self.n} processes): "
                         f"process 0 failed: {why}; checkpoints at other prefixes are untouched"}
