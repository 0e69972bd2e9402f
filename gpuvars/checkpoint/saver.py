"""gv.Saver: TF's tf.train.Saver on safetensors, the manager of a run's checkpoints.

The Saver decides what is saved (``var_list``), under which prefix (``global_step``), how
many checkpoints stay (``max_to_keep``, ``keep_checkpoint_every_n_hours``) and keeps the
folder's state file (``latest_checkpoint``). The work is done a floor below: ``_write``
writes and commits (index last: its atomic rename is the commit; a prefix without its
index does not exist for readers), ``_restore`` validates everything structural before
writing a byte and streams each tensor into the variable's storage where it already
lives, and ``_saveable`` is the only way to the variables. The state file and retention
change only after a commit (G2): a crash at any point leaves the previous checkpoint
loadable.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
import os
import threading
import time
from typing import Any, Callable, Iterable, Literal, Mapping, overload

import numpy as np

from gpuvars.checkpoint import _async, _collective, _format, _saveable, _state
from gpuvars.checkpoint._async import SaveFuture
from gpuvars.checkpoint._restore import RestoreResult, restore_variables
from gpuvars.checkpoint._saveable import Saveable
from gpuvars.checkpoint._write import SavePlan, delete_checkpoint, prepare_save, write_checkpoint, write_error
from gpuvars.checkpoint.policy import SaveOptions
from gpuvars.errors import CheckpointError, InvalidArgumentError
from gpuvars.registry import current_registry
from gpuvars.variable import Variable

_log = logging.getLogger("gpuvars")

__all__ = ["CheckpointState", "RestoreResult", "SaveFuture", "Saver", "get_checkpoint_state", "latest_checkpoint"]


def _saveables(var_map: Mapping[str, Any]) -> dict[str, Saveable]:
    return {key: _saveable.saveable_for(var) for key, var in var_map.items()}


def _var_map(var_list: Any, allow_empty: bool) -> dict[str, Variable]:
    """``{checkpoint key: variable}`` from None (the registry now), a list or a dict."""
    items: list[tuple[Any, Any]]
    if var_list is None:
        items = [(v.name, v) for v in current_registry().variables()]
    elif isinstance(var_list, Mapping):
        items = list(var_list.items())
    elif _saveable.is_saveable(var_list):
        items = [(var_list.name, var_list)]
    else:
        try:
            items = [(getattr(v, "name", None), v) for v in var_list]
        except TypeError:
            raise InvalidArgumentError(f"var_list must be None, a list or a dict of Variables, got {type(var_list).__name__}") from None
    out: dict[str, Variable] = {}
    seen: dict[int, str] = {}
    for key, var in items:
        if not _saveable.is_saveable(var):
            raise InvalidArgumentError(
                f"var_list entry {key!r} is a {type(var).__name__}, not a gv.Variable or gv.ShardedVariable"
            )
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise InvalidArgumentError(f"checkpoint key {key!r} for variable '{var.name}' must be a non-empty string")
        if key in out:
            raise InvalidArgumentError(f"At least two variables have the same name: {key}")
        if id(var) in seen:
            raise InvalidArgumentError(f"variable '{var.name}' appears twice in var_list (as {seen[id(var)]!r} and {key!r})")
        seen[id(var)] = key
        out[key] = var
    if not out and not allow_empty:
        if var_list is None:
            raise InvalidArgumentError(
                "No variables to save: the current registry holds no live variable. The registry holds "
                "variables weakly, so a variable nobody references (the result of a gv.Variable(...) call "
                "that was not kept) has already left it: keep a reference to your variables, or pass var_list"
            )
        raise InvalidArgumentError("No variables to save")
    return out


def _step_number(global_step: Any) -> int:
    """The int of ``global_step``: an int (numpy ints too) or an initialized integer Variable."""
    value = global_step
    if isinstance(global_step, Variable):
        dtype, shape = global_step._known_dtype(), global_step._known_shape()
        if dtype is None or dtype.kind not in "iu" or shape != ():
            raise InvalidArgumentError(
                f"global_step variable '{global_step.name}' must be a scalar integer variable, "
                f"got dtype {dtype} shape {shape}"
            )
        value = global_step.numpy()
    if isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"global_step must be an int or an int Variable, got {global_step!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"global_step must be an int or an int Variable, got {global_step!r}") from None


@dataclasses.dataclass(frozen=True)
class CheckpointState:
    """The folder's ``checkpoint`` file: the latest prefix and those kept (oldest first)."""

    model_checkpoint_path: str | None
    all_model_checkpoint_paths: list[str]
    all_model_checkpoint_timestamps: list[float]
    last_preserved_timestamp: float


class Saver:
    """Save and restore variables as safetensors checkpoints (TF's tf.train.Saver).

    Args:
        var_list: None (every variable alive now in the current registry), a list
            (keyed by ``v.name``) or a dict ``{checkpoint key: variable}`` (renaming).
        max_to_keep: how many recent checkpoints to keep (None or 0 keeps all). The first save
            into a folder adopts the checkpoints its state file lists (those still there), so
            a restarted job's Saver keeps counting where the last one stopped (TF2's
            CheckpointManager); :meth:`recover_last_checkpoints` sets the list instead.
        keep_checkpoint_every_n_hours: additionally keep one checkpoint per this many hours.
        options: :class:`gpuvars.SaveOptions` (the VariablePolicy).
        allow_empty: allow a saver with no variables.

    Raises:
        InvalidArgumentError: a bad var_list (duplicate keys, non-variables, empty).

    Example:
        >>> import gpuvars as gv, numpy as np, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> with gv.Registry():
        ...     w = gv.Variable(np.arange(3.0), name="w")
        ...     saver = gv.Saver()
        ...     p = saver.save(os.path.join(d, "model.ckpt"), global_step=10)
        ...     _ = w.assign([0.0, 0.0, 0.0])
        ...     _ = saver.restore(p)
        ...     os.path.basename(p), w.numpy().tolist()
        ('model.ckpt-10', [0.0, 1.0, 2.0])
    """

    def __init__(
        self,
        var_list: Any = None,
        *,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float = 10000.0,
        options: SaveOptions | None = None,
        allow_empty: bool = False,
    ) -> None:
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or isinstance(max_to_keep, bool) or max_to_keep < 0):
            raise InvalidArgumentError(f"max_to_keep must be None or an int >= 0, got {max_to_keep!r}")
        if not isinstance(keep_checkpoint_every_n_hours, (int, float)) or keep_checkpoint_every_n_hours <= 0:
            raise InvalidArgumentError(
                f"keep_checkpoint_every_n_hours must be a positive number, got {keep_checkpoint_every_n_hours!r}"
            )
        if options is not None and not isinstance(options, SaveOptions):
            raise InvalidArgumentError(f"options must be a gv.SaveOptions, got {type(options).__name__}")
        self._vars = _var_map(var_list, allow_empty)
        self._saveables = _saveables(self._vars)
        self._max_to_keep = max_to_keep or None
        self._keep_every_s = float(keep_checkpoint_every_n_hours) * 3600.0
        self._options = options or SaveOptions()
        self._last: list[tuple[str, float]] = []  # (prefix path, timestamp), oldest first
        self._last_preserved = time.time()
        self._adopted: set[str] = set()  # folders whose state file this saver has taken over
        self._recovered = False  # recover_last_checkpoints set the list: adopt nothing
        self._turn = threading.Lock()  # one save starts at a time; it first waits for the one in flight
        self._in_flight: SaveFuture | None = None
        self._closed = False

    def __enter__(self) -> Saver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def last_checkpoints(self) -> list[str]:
        """The prefixes this saver keeps, oldest first."""
        return [p for p, _ in self._last]

    def recover_last_checkpoints(self, checkpoint_paths: Iterable[str | os.PathLike[str]]) -> None:
        """Take ``checkpoint_paths`` (oldest first) as the checkpoints this saver keeps, after a
        restart (TF1's name): ``max_to_keep`` then deletes the oldest of them first.

        Prefixes without a committed index are skipped (another process may be deleting
        them); each one's time is its index's modification time. The saver then adopts
        nothing from state files.

        Args:
            checkpoint_paths: prefixes, e.g. ``gv.get_checkpoint_state(d).all_model_checkpoint_paths``.

        Raises:
            InvalidArgumentError: ``checkpoint_paths`` is not a list of paths.

        Example:
            >>> import gpuvars as gv, numpy as np, tempfile, os
            >>> d = tempfile.mkdtemp()
            >>> w = gv.Variable(np.zeros(2), name="w")
            >>> _ = [gv.Saver([w]).save(os.path.join(d, "m"), global_step=s) for s in (1, 2)]
            >>> saver = gv.Saver([w], max_to_keep=2)
            >>> saver.recover_last_checkpoints(gv.get_checkpoint_state(d).all_model_checkpoint_paths)
            >>> [os.path.basename(p) for p in saver.last_checkpoints]
            ['m-1', 'm-2']
        """
        if isinstance(checkpoint_paths, (str, bytes, os.PathLike)):
            raise InvalidArgumentError(
                f"checkpoint_paths must be a list of checkpoint prefixes, got the single path {checkpoint_paths!r}"
            )
        recovered: list[tuple[str, float]] = []
        try:
            paths = [os.fspath(p) for p in checkpoint_paths]
        except TypeError:
            raise InvalidArgumentError(
                f"checkpoint_paths must be a list of checkpoint prefixes, got {checkpoint_paths!r:.100}"
            ) from None
        for path in paths:
            folder, base = os.path.split(path)
            try:
                mtime = os.stat(os.path.join(folder, _format.index_file(base))).st_mtime
            except (OSError, ValueError):
                continue
            recovered = [(p, t) for p, t in recovered if p != path] + [(path, mtime)]
        self._last = recovered
        self._recovered = True

    @property
    def var_map(self) -> dict[str, Variable]:
        """The ``{checkpoint key: variable}`` map this saver saves and restores."""
        return dict(self._vars)

    # --- save ---------------------------------------------------------------------------------

    @overload
    def save(self, save_path: str | os.PathLike[str], global_step: Any = None, options: SaveOptions | None = None,
             *, blocking: Literal[True] = True) -> str: ...

    @overload
    def save(self, save_path: str | os.PathLike[str], global_step: Any = None, options: SaveOptions | None = None,
             *, blocking: Literal[False]) -> SaveFuture: ...

    @overload
    def save(self, save_path: str | os.PathLike[str], global_step: Any = None, options: SaveOptions | None = None,
             *, blocking: bool) -> str | SaveFuture: ...

    def save(
        self,
        save_path: str | os.PathLike[str],
        global_step: Any = None,
        options: SaveOptions | None = None,
        *,
        blocking: bool = True,
    ) -> str | SaveFuture:
        """Write a checkpoint at ``save_path`` (``-<global_step>`` appended) of every variable's
        value at this call, and return its prefix (or, with ``blocking=False``, a
        :class:`gpuvars.SaveFuture` at once, while a thread writes).

        The checkpoint holds the values of the call even while other threads (or the caller,
        after ``blocking=False``) keep assigning: a variable mutated before the writer has read
        it is first copied (``SaveOptions.copy_on_write_bytes``), or the mutation waits for it.
        One save is in flight per Saver: a later save waits for it, and raises its error if it
        failed (an error already raised by ``SaveFuture.result()`` is not raised again).

        Raises:
            UninitializedVariableError: a variable has no value (nothing is written).
            InvalidArgumentError: a bad path, step or a dtype safetensors cannot hold.
            CheckpointWriteError: the file system failed (no space, no permission, ...), an
                OSError too; nothing of this save is visible, earlier checkpoints are untouched.
                With ``blocking=False`` this comes from ``result()``, the next ``save()``,
                :meth:`wait_until_finished` or :meth:`close`.
        """
        if not isinstance(blocking, bool):
            raise InvalidArgumentError(f"Saver.save: blocking must be a bool, got {blocking!r}")
        opts = options if options is not None else self._options
        if not isinstance(opts, SaveOptions):
            raise InvalidArgumentError(f"options must be a gv.SaveOptions, got {type(opts).__name__}")
        folder, base = _format.split_prefix(save_path, "Saver.save")
        step = None if global_step is None else _step_number(global_step)
        if step is not None:
            base = f"{base}-{step}"
        prefix = os.path.join(folder, base)
        with self._turn:
            if self._closed:
                raise InvalidArgumentError(f"Saver.save({prefix!r}): this saver was closed")
            self._wait_in_flight(None)
            progress = opts.progress if blocking else bool(opts.progress)
            if _collective.group_size() > 1:
                run, plan = self._save_across_processes(prefix, folder, step, opts, progress)
            else:
                plan = prepare_save(prefix, self._saveables, opts.policy, step, opts.copy_on_write_bytes,
                                    opts.shard_bytes)
                run = functools.partial(self._write, plan, folder, progress)

            if blocking:
                run()
                return prefix
            self._in_flight = _async.start(plan, run)
            return self._in_flight

    def _write(self, plan: SavePlan, folder: str, progress: bool | None) -> None:
        write_checkpoint(plan, progress=progress)
        self._after_commit(plan.prefix, folder)

    def _save_across_processes(self, prefix: str, folder: str, step: int | None, opts: SaveOptions,
                               progress: bool | None) -> tuple[Callable[[], None], SavePlan]:
        """A save every process of the group makes (``gv.distributed``): agree to start, pin,
        and the writing and commit to run (in this thread or the writer's)."""
        coll = _collective.Collective.start(prefix, self._saveables, opts.commit_timeout)
        error: BaseException | None = None
        plan: SavePlan | None = None
        try:
            plan = prepare_save(prefix, self._saveables, opts.policy, step, opts.copy_on_write_bytes,
                                opts.shard_bytes, logical=coll.primary, expand_sharded=False)
        except Exception as exc:  # after the start every process takes part in the commit round
            error = exc

        def run() -> None:
            coll.write(plan, error, progress, lambda: self._after_commit(prefix, folder, primary=coll.primary))

        if plan is None:  # nothing to do in the background: fail here, with every other process
            run()
            raise AssertionError("unreachable: a save whose preparation failed cannot commit")
        return run, plan

    def _wait_in_flight(self, timeout: float | None) -> None:
        """Wait for the save in flight; raise its error unless ``result()`` already did."""
        fut = self._in_flight
        if fut is None:
            return
        if not fut._finished.wait(timeout):
            raise TimeoutError(f"checkpoint {fut.prefix!r} is still being written after {timeout} s")
        self._in_flight = None
        if fut._error is not None and not fut._reported:
            fut._reported = True
            raise fut._error

    def wait_until_finished(self, timeout: float | None = None) -> None:
        """Wait for the save in flight, if any.

        Raises:
            TimeoutError: it is still running after ``timeout`` seconds.
            CheckpointError: it failed (unless ``SaveFuture.result()`` already raised it).
        """
        _async._check_timeout(timeout, "Saver.wait_until_finished")
        with self._turn:
            self._wait_in_flight(timeout)

    def close(self) -> None:
        """Wait for the save in flight and refuse later saves (restores still work).
        Idempotent; a Saver is also a context manager that closes on exit.

        Raises:
            CheckpointError: the save in flight failed (unless ``result()`` already raised it).
        """
        with self._turn:
            self._closed = True
            self._wait_in_flight(None)

    def _adopt(self, folder: str, now: float) -> None:
        """On the first save into ``folder``, take over the checkpoints its state file keeps
        (those whose index still exists) and its keep-every-n-hours clock."""
        where = os.path.abspath(folder or ".")
        if self._recovered or where in self._adopted:
            return
        self._adopted.add(where)
        try:
            state = _state.read_state(folder)
        except CheckpointError as exc:
            _log.warning("Saver: %s; the state file starts a new list with this save (the checkpoints it "
                         "listed stay on disk, max_to_keep does not count them)", exc)
            return
        if state is None:
            return
        if not self._last and state.last_preserved is not None:
            self._last_preserved = min(state.last_preserved, now)
        known = {p for p, _ in self._last}
        adopted = []
        for name, ts in state.entries:
            path = os.path.join(folder, name)
            if path not in known and os.path.isfile(os.path.join(folder, _format.index_file(name))):
                known.add(path)
                adopted.append((path, min(ts, now)))  # a clock that went back never makes one look new
        if adopted:
            self._last = sorted(adopted + self._last, key=lambda entry: entry[1])

    def _after_commit(self, prefix: str, folder: str, primary: bool = True) -> None:
        """Update the state file, then apply retention (deletes only committed-old prefixes).
        ``primary=False`` (a process other than 0 of a save across processes): only this
        saver's list; process 0 writes the state file and deletes."""
        now = time.time()
        self._adopt(folder, now)
        self._last = [(p, t) for p, t in self._last if p != prefix] + [(prefix, now)]
        doomed: list[str] = []
        while self._max_to_keep is not None and len(self._last) > self._max_to_keep:
            old, ts = self._last.pop(0)
            if ts - self._last_preserved >= self._keep_every_s:
                self._last_preserved = ts  # kept for good: leaves the rotation, not the disk
                continue
            doomed.append(old)
        if not primary:
            return
        try:
            _state.write_state(  # a folder's state lists only that folder's checkpoints (plain names)
                folder,
                os.path.basename(prefix),
                [(os.path.basename(p), t) for p, t in self._last if os.path.dirname(p) == folder],
                self._last_preserved,
            )
        except OSError as exc:
            raise write_error(
                prefix, f"replacing the checkpoint state file {_state.path_of(folder)!r}", exc,
                "it restores by its prefix, but latest_checkpoint() does not name it yet",
            ) from exc
        for old in doomed:
            try:
                delete_checkpoint(old)
            except OSError as exc:
                raise write_error(prefix, f"deleting the old checkpoint {old!r} (max_to_keep)", exc,
                                  f"the state file no longer lists {old!r}; some of its files may be left") from exc

    # --- restore ------------------------------------------------------------------------------

    def restore(
        self,
        save_path: str | os.PathLike[str] | None,
        *,
        verify_first: bool = False,
        var_list: Any = None,
        progress: bool | None = None,
    ) -> RestoreResult:
        """Fill this saver's variables (or ``var_list``, a subset) from ``save_path``, in place.

        Strict: every key must be in the checkpoint with the variable's dtype and a shape the
        variable accepts; otherwise nothing is written and the error lists each culprit.
        Initializes uninitialized variables without running their initializers.

        ``save_path`` is a checkpoint prefix, or a plain ``.safetensors`` file (written by
        ``safetensors.numpy.save_file``, ``safetensors.torch.save_file``, ...): its tensor
        names are the keys; it has no checksums, so only its structure is verified.

        Args:
            verify_first: check every checksum before writing anything (one extra read);
                without it a checksum failure marks the variables already written as
                uninitialized and names them.
            var_list: restore only these (list or dict, as in the constructor).
            progress: a progress bar on stderr (None: only on a terminal for >= 256 MiB; needs tqdm).

        Raises:
            CheckpointNotFoundError: no committed checkpoint at ``save_path``.
            CheckpointMismatchError: missing keys, or shape/dtype mismatches (listed).
            CheckpointCorruptError: damaged files (header, size, checksum).
        """
        if save_path is None:
            raise InvalidArgumentError("Can't load save_path when it is None.")
        targets = self._saveables if var_list is None else _saveables(_var_map(var_list, allow_empty=False))
        return restore_variables(os.fspath(save_path), targets, verify_first=verify_first, progress=progress)


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> str | None:
    """The newest committed prefix recorded in ``checkpoint_dir``, or None (also when its files are gone).

    Example:
        >>> import gpuvars as gv, tempfile
        >>> gv.latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    folder = os.fspath(checkpoint_dir)
    state = _state.read_state(folder)
    if state is None or state.latest is None:
        return None
    if not os.path.isfile(os.path.join(folder, _format.index_file(state.latest))):
        return None
    return os.path.join(folder, state.latest)


def get_checkpoint_state(checkpoint_dir: str | os.PathLike[str]) -> CheckpointState | None:
    """The folder's checkpoint state (paths joined onto the folder), or None if it has none."""
    folder = os.fspath(checkpoint_dir)
    state = _state.read_state(folder)
    if state is None:
        return None
    return CheckpointState(
        model_checkpoint_path=None if state.latest is None else os.path.join(folder, state.latest),
        all_model_checkpoint_paths=[os.path.join(folder, p) for p, _ in state.entries],
        all_model_checkpoint_timestamps=[t for _, t in state.entries],
        last_preserved_timestamp=0.0 if state.last_preserved is None else state.last_preserved,
    )
