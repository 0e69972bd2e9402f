"""The optimizer base: slots co-located with their variables, updates on the variable's device.

TF's rule: the parameter update operations of an optimizer run on the variable's device,
whatever ``gv.device`` scope encloses them. Each optimizer states its update twice, as
the one rule in array math (:meth:`Optimizer._rule`, also the JAX kernel, jitted over all
variables of a device) and as an in-place numpy kernel (``out=`` ufuncs, one scratch
buffer); CuPy runs one ``ElementwiseKernel`` per variable (:mod:`gpuvars.optim._cupy`).

Slots are ``gv.Variable``s named ``<primary>/<optimizer>/<slot>``, ``trainable=False``, on
the primary's device, created deferred (a restore fills them; the first update runs their
initializer otherwise): a mirrored primary gets a mirrored slot, a sharded one a sharded
slot with the same shard rows. ``iterations`` is an integer variable named
``<optimizer>/iterations`` on the first variable's device. A Saver made after
:meth:`Optimizer.build` (or after the first step) saves them by name.

Every kernel writes under the variable's lock after the write barrier
(:func:`gpuvars.variable.writable`), so an asynchronous save in flight keeps the values
of its call.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from gpuvars import _shapes, _transfer
from gpuvars._backend_errors import backend_errors
from gpuvars._creator import plain_variables
from gpuvars.distribute import MirroredVariable, ShardedVariable, SyncOnReadVariable
from gpuvars.distribute._context import get_replica_context
from gpuvars.distribute import ReduceOp
from gpuvars.errors import InvalidArgumentError
from gpuvars.initializers import Constant, Zeros
from gpuvars.placement import PhysicalDevice
from gpuvars.variable import Variable, VariableAggregation, VariableSynchronization, adopt, exclusive, writable

__all__ = ["Optimizer", "clip_by_global_norm"]

LearningRate = float | Callable[[int], float]


def _number(value: Any, what: str, *, low: float | None = None, high: float | None = None,
            open_low: bool = False, open_high: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.floating, np.integer))
    if ok:
        value = float(value)
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if open_low else value >= low
        if ok and high is not None:
            ok = value < high if open_high else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if open_low else '>='} {low}"
        hi = "" if high is None else f"{'<' if open_high else '<='} {high}"
        raise InvalidArgumentError(f"{what} must be a finite number {' and '.join(b for b in (lo, hi) if b)}, got {value!r}")
    return float(value)


class _Leaf:
    """One plain variable an update writes, with its slots (plain variables too)."""

    __slots__ = ("var", "slots", "rows", "replica")

    def __init__(self, var: Variable, slots: dict[str, Variable], rows: tuple[int, int] | None, replica: int | None):
        self.var, self.slots, self.rows, self.replica = var, slots, rows, replica


class _Entry:
    """A trained variable (plain, mirrored or sharded), its logical slots and its leaves."""

    __slots__ = ("var", "slots", "leaves")

    def __init__(self, var: Any, slots: dict[str, Any], leaves: list[_Leaf]) -> None:
        self.var, self.slots, self.leaves = var, slots, leaves


class Optimizer:
    """Base class of gpuvars optimizers (Keras 3's API on TF's placement rule).

    Subclasses set ``slot_names`` and implement ``_hyper``, ``_rule`` and ``_numpy``.

    Args:
        learning_rate: a float, or a callable of the step (``iterations`` before the update),
            e.g. :class:`gpuvars.optim.ExponentialDecay`.
        name: the prefix of the slots' and ``iterations``' names.
    """

    slot_names: tuple[str, ...] = ()  #: set by each optimizer from its configuration
    _slot_init: dict[str, float] = {}  # noqa: RUF012  (a read-only default; subclasses assign their own)

    def __init__(self, learning_rate: LearningRate, name: str) -> None:
        if callable(learning_rate):
            self._lr: LearningRate = learning_rate
        else:
            self._lr = _number(learning_rate, f"{type(self).__name__}: learning_rate", low=0.0)
        if not isinstance(name, str) or not name or "/" in name:
            raise InvalidArgumentError(f"{type(self).__name__}: name must be a non-empty str without '/', got {name!r}")
        self.name = name
        self._entries: dict[int, _Entry] = {}
        self._iterations: Variable | None = None
        self._lock = threading.RLock()
        self._jitted: dict[tuple[Any, ...], Any] = {}

    def __repr__(self) -> str:
        return f"<gpuvars.optim.{type(self).__name__} '{self.name}' {len(self._entries)} variables>"

    # --- state ------------------------------------------------------------------------------

    @property
    def learning_rate(self) -> LearningRate:
        """The learning rate: a float or a schedule (a callable of the step)."""
        return self._lr

    @property
    def iterations(self) -> Variable:
        """How many steps were applied (an integer variable, saved with the slots).

        Raises:
            InvalidArgumentError: before :meth:`build` or the first step (its device is the
                first variable's).
        """
        if self._iterations is None:
            raise InvalidArgumentError(
                f"optimizer '{self.name}' has no iterations yet: call build(var_list) or apply_gradients first"
            )
        return self._iterations

    def get_slot_names(self) -> list[str]:
        """The names of the slots this optimizer keeps per variable."""
        return list(self.slot_names)

    def get_slot(self, var: Any, slot_name: str) -> Any:
        """The slot ``slot_name`` of ``var`` (a Variable; mirrored / sharded like ``var``).

        Raises:
            InvalidArgumentError: an unknown slot name, or a variable this optimizer has not built.
        """
        if slot_name not in self.slot_names:
            raise InvalidArgumentError(
                f"optimizer '{self.name}' has no slot {slot_name!r}; its slots are {list(self.slot_names)}"
            )
        entry = self._entries.get(id(var))
        if entry is None:
            raise InvalidArgumentError(
                f"optimizer '{self.name}' has no slots for variable '{getattr(var, 'name', var)}': "
                "call build([var]) or apply a gradient to it first"
            )
        return entry.slots[slot_name]

    def variables(self) -> list[Any]:
        """``iterations`` and every slot, in build order (what a Saver needs to resume)."""
        out: list[Any] = [] if self._iterations is None else [self._iterations]
        for entry in self._entries.values():
            out.extend(entry.slots[s] for s in self.slot_names)
        return out

    # --- building slots ---------------------------------------------------------------------

    def build(self, var_list: Iterable[Any]) -> None:
        """Create the slots of every variable in ``var_list`` (deferred: a restore fills them)
        and ``iterations``. Idempotent per variable.

        Raises:
            InvalidArgumentError: not a variable, a sync-on-read variable (cannot be trained),
                or a variable whose dtype is not floating point.
        """
        if isinstance(var_list, (Variable, ShardedVariable)):
            var_list = [var_list]
        with self._lock:
            for var in var_list:
                self._entry(var)

    def _check_trainable(self, var: Any) -> None:
        if not isinstance(var, (Variable, ShardedVariable)):
            raise InvalidArgumentError(
                f"optimizer '{self.name}': expected gv.Variable or gv.ShardedVariable, got {type(var).__name__}"
            )
        if isinstance(var, SyncOnReadVariable) or getattr(var, "synchronization", None) is VariableSynchronization.ON_READ:
            raise InvalidArgumentError(
                f"optimizer '{self.name}': variable '{var.name}' is synchronization=ON_READ (a metric "
                "aggregated on read); it cannot be trained"
            )
        dtype = var._known_dtype()
        if dtype is None or dtype.kind not in "fc" and dtype.name != "bfloat16":
            raise InvalidArgumentError(
                f"optimizer '{self.name}': variable '{var.name}' has dtype {dtype}; only floating-point "
                "variables can be trained"
            )

    def _entry(self, var: Any) -> _Entry:
        entry = self._entries.get(id(var))
        if entry is not None:
            return entry
        self._check_trainable(var)
        if isinstance(var, ShardedVariable):
            slot_shards = {s: [self._plain_slot(shard, f"{var.name}/part_{k}", s, register=False)
                               for k, shard in enumerate(var.variables)] for s in self.slot_names}
            slots: dict[str, Any] = {
                s: ShardedVariable._from_shards(f"{var.name}/{self.name}/{s}", shards, trainable=False)
                for s, shards in slot_shards.items()
            }
            leaves = [
                _Leaf(shard, {s: slot_shards[s][k] for s in self.slot_names}, (off, int(shard.shape[0])), None)
                for k, (shard, off) in enumerate(zip(var.variables, var.offsets))
            ]
        elif isinstance(var, MirroredVariable):
            slots = {s: self._mirrored_slot(var, s) for s in self.slot_names}
            leaves = [_Leaf(c, {s: slots[s].values[k] for s in self.slot_names}, None, k)
                      for k, c in enumerate(var.values)]
        else:
            slots = {s: self._plain_slot(var, var.name, s, register=True) for s in self.slot_names}
            leaves = [_Leaf(var, dict(slots), None, None)]
        if self._iterations is None:
            first = leaves[0].var
            self._iterations = self._counter(first.physical_device)
        entry = self._entries[id(var)] = _Entry(var, slots, leaves)
        return entry

    def _initializer(self, slot: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        fill = self._slot_init.get(slot, 0.0)
        return Zeros(shape, dtype) if fill == 0.0 else Constant(fill, shape, dtype)

    def _plain_slot(self, primary: Variable, base: str, slot: str, register: bool) -> Variable:
        shape, dtype = tuple(primary.shape), np.dtype(primary.dtype)
        with plain_variables(), contextlib.ExitStack() as stack:
            if not register:
                from gpuvars.registry import Registry

                stack.enter_context(Registry())  # shards of a sharded slot register through it
            return Variable(
                self._initializer(slot, shape, dtype), name=f"{base}/{self.name}/{slot}", trainable=False,
                device=primary.physical_device.name,
            )

    def _mirrored_slot(self, primary: MirroredVariable, slot: str) -> MirroredVariable:
        from gpuvars.distribute.strategy import build_components

        shape, dtype = tuple(primary.shape), np.dtype(primary.dtype)
        name = f"{primary.name}/{self.name}/{slot}"
        parts = build_components(name, [c.physical_device for c in primary.values],
                                 self._initializer(slot, shape, dtype), trainable=False)
        built = MirroredVariable._build(
            name, parts, strategy=primary._strategy, trainable=False,
            synchronization=VariableSynchronization.ON_WRITE, aggregation=VariableAggregation.ONLY_FIRST_REPLICA,
        )
        assert isinstance(built, MirroredVariable)
        return built

    def _counter(self, device: PhysicalDevice) -> Variable:
        dtype: np.dtype[Any] = np.dtype(np.int64)
        try:
            device.backend.check_dtype(dtype)
        except TypeError:  # JAX without jax_enable_x64 holds no int64
            dtype = np.dtype(np.int32)
        with plain_variables():
            return Variable(np.zeros((), dtype), name=f"{self.name}/iterations", trainable=False, device=device.name)

    # --- the step ---------------------------------------------------------------------------

    def _learning_rate_at(self, step: int) -> float:
        lr = self._lr
        if callable(lr):
            value = lr(step)
            return _number(value, f"optimizer '{self.name}': the learning-rate schedule's value at step {step}")
        return lr

    def _pairs(self, grads_and_vars: Iterable[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        try:
            pairs = list(grads_and_vars)
        except TypeError:
            raise InvalidArgumentError(
                f"optimizer '{self.name}': grads_and_vars must be a list of (gradient, variable) pairs"
            ) from None
        out: list[tuple[Any, Any]] = []
        seen: set[int] = set()
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InvalidArgumentError(
                    f"optimizer '{self.name}': grads_and_vars must hold (gradient, variable) pairs, got {pair!r:.80}"
                )
            g, var = pair
            if id(var) not in self._entries:  # checked once, when its slots are built
                self._check_trainable(var)
            if id(var) in seen:
                raise InvalidArgumentError(f"optimizer '{self.name}': variable '{var.name}' appears twice")
            seen.add(id(var))
            if g is None:
                continue  # TF and Keras skip variables without a gradient
            out.append((g, var))
        return out

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Any]]) -> None:
        """Apply one step: ``grads_and_vars`` is a list of ``(gradient, variable)``.

        Gradients may be numpy, CuPy or JAX arrays (or DLPack objects) on any device; one on
        another device than its variable is an implicit transfer (the transfer guard
        judges it). Each update runs on its variable's device (a mirrored variable: on every
        component; a sharded one: per shard, locally), whatever ``gv.device`` scope encloses
        the call. Inside ``strategy.run`` every replica passes its own gradients of mirrored
        variables; they are summed across replicas once (TF's rule: scale the loss by the
        global batch size) and every component applies the same update.

        Raises:
            InvalidArgumentError: a bad pair, a gradient of the wrong shape or dtype, a
                sync-on-read or non-floating variable, or a plain variable in replica context.
            TransferGuardError: a gradient on another device under ``transfer_guard("disallow")``.
        """
        pairs = self._pairs(grads_and_vars)
        ctx = get_replica_context()
        if ctx is None:
            with self._lock:
                entries = self._prepare([var for _, var in pairs])
                step = int(self.iterations.numpy())
                hyper = self._hyper(step + 1, self._learning_rate_at(step))
                work: list[tuple[_Leaf, Any]] = []
                for (g, var), entry in zip(pairs, entries):
                    leaves = entry.leaves
                    if type(g) is np.ndarray and len(leaves) == 1 and leaves[0].rows is None and leaves[0].var.physical_device.backend.host:
                        current = leaves[0].var.value()  # the host fast path: a numpy gradient of a numpy variable
                        if g.dtype == current.dtype and g.shape == current.shape:
                            work.append((leaves[0], g))
                            continue
                    what = f"the gradient of variable '{var.name}'"
                    located = _transfer.admit(g, [leaf.var.physical_device for leaf in leaves], what)
                    work.extend((leaf, self._gradient(leaf, located, what)) for leaf in leaves)
                self._run(work, hyper)
                self._bump()
            return
        for _, var in pairs:
            if not isinstance(var, MirroredVariable):
                raise InvalidArgumentError(
                    f"optimizer '{self.name}': in replica context (strategy.run) only mirrored variables can be "
                    f"trained; '{var.name}' is a {type(var).__name__}: create it inside strategy.scope(), or apply "
                    "its gradient outside strategy.run"
                )
        rid = ctx._local_id  # this process's replica: its component (a multi-process strategy numbers them per process)
        strategy = ctx.strategy
        alone = strategy.num_replicas_in_sync == 1

        def combine(everyone: list[list[Any]]) -> tuple[list[Any], tuple[float, ...]]:
            """Run once, by one replica: build, sum each gradient, take the step."""
            with self._lock:
                entries = self._prepare([var for _, var in pairs])
                step = int(self.iterations.numpy())
                hyper = self._hyper(step + 1, self._learning_rate_at(step))
                sums = []
                for i, entry in enumerate(entries):
                    dest = entry.leaves[0].var.physical_device
                    grads = [_transfer.on_device(_to_array(g[i]), dest) for g in everyone]
                    # every replica's gradient, those of other processes too (replica 0's device is dest)
                    sums.append(grads[0] if alone else strategy._reduce_to(ReduceOp.SUM, grads, 0))
                self._bump()
                return sums, hyper

        for g, var in pairs:  # each replica's gradient is judged where it goes: its own component
            _transfer.admit(g, [var.values[rid].physical_device], f"the gradient of variable '{var.name}'")
        sums, hyper = ctx._exchange([g for g, _ in pairs], combine)
        local: list[tuple[_Leaf, Any]] = []
        for (_, var), total in zip(pairs, sums):
            leaf = self._entries[id(var)].leaves[rid]
            what = f"the gradient of variable '{var.name}'"
            located = _transfer.locate(_transfer.on_device(total, leaf.var.physical_device))
            local.append((leaf, self._gradient(leaf, located, what)))
        self._run(local, hyper)

    def _prepare(self, var_list: Sequence[Any]) -> list[_Entry]:
        """The entries of ``var_list`` (built when missing), with every slot and
        ``iterations`` initialized (a restore may have filled them already)."""
        entries = [self._entry(var) for var in var_list]
        it = self.iterations
        if not it.initialized:
            it.initializer()
        for entry in entries:
            for slot in entry.slots.values():
                if not slot.initialized:
                    slot.initializer()
        return entries

    def _bump(self) -> None:
        it = self.iterations
        it.assign(np.asarray(int(it.numpy()) + 1, dtype=it.dtype))

    def _run(self, work: list[tuple[_Leaf, Any]], hyper: tuple[float, ...]) -> None:
        """Update every leaf, grouped by device: JAX once per device (one jit), CuPy one kernel
        per variable, numpy through :meth:`_numpy_step`."""
        by_jax: dict[PhysicalDevice, list[tuple[_Leaf, Any]]] = {}
        host: list[tuple[_Leaf, Any]] = []
        for leaf, grad in work:
            device = leaf.var.physical_device
            name = device.backend.name
            if name == "jax":
                by_jax.setdefault(device, []).append((leaf, grad))
            elif name == "cupy":
                self._cupy_task(leaf, grad, hyper)
            else:
                host.append((leaf, grad))
        if host:
            self._numpy_step(host, hyper)
        for device, items in by_jax.items():
            self._jax_step(device, items, hyper)

    def _numpy_step(self, items: list[tuple[_Leaf, Any]], hyper: tuple[float, ...]) -> None:
        """numpy: small variables of one dtype are updated together (packed into one flat run,
        one kernel call, unpacked: a dozen ufunc calls per group, not per variable); large ones
        block by block; the tasks are shared among threads when there is enough work."""
        groups: dict[np.dtype[Any], list[tuple[_Leaf, Any]]] = {}
        tasks: list[tuple[int, Callable[[], None]]] = []  # large variables: ufunc-bound, shared among threads
        packed: list[Callable[[], None]] = []
        for leaf, grad in items:
            p = leaf.var.value()
            if p.size <= PACK:
                groups.setdefault(p.dtype, []).append((leaf, grad))
            else:
                tasks.append((p.size, functools.partial(self._blocked_task, leaf, grad, hyper)))
        for group in groups.values():
            for lo in range(0, len(group), PACK_COUNT):
                part = group[lo : lo + PACK_COUNT]
                size = sum(leaf.var.value().size for leaf, _ in part)
                packed.append(functools.partial(self._packed_task, part, hyper))
        for task in packed:  # Python-heavy (pack, unpack): threads would only fight over the GIL
            task()
        total = sum(size for size, _ in tasks)
        if total < PARALLEL or len(tasks) < 2:
            for _, task in tasks:
                task()
            return
        pool = _threads()
        if _workers < 2:
            for _, task in tasks:
                task()
            return
        shares: list[list[Callable[[], None]]] = [[] for _ in range(_workers)]
        loads = [0] * _workers
        for size, task in sorted(tasks, key=lambda t: -t[0]):  # largest first onto the least loaded
            k = loads.index(min(loads))
            shares[k].append(task)
            loads[k] += size
        futures = [pool.submit(_run_all, share) for share in shares[1:] if share]
        for t in shares[0]:
            t()
        for f in futures:
            f.result()

    def _gradient(self, leaf: _Leaf, located: Any, what: str) -> Any:
        """The located gradient (rows of it for a shard) as an array on the leaf's device with
        the variable's dtype, its shape checked (the transfer guard has judged it)."""
        var = leaf.var
        device = var.physical_device
        array = located[0]
        if leaf.rows is not None:
            off, rows = leaf.rows
            array = array[off : off + rows]
            located = (array, located[1], located[2])
        dtype = np.dtype(var.dtype)
        if tuple(array.shape) != tuple(var.shape):
            raise InvalidArgumentError(
                f"{what} has shape {tuple(array.shape)}, the variable {tuple(var.shape)}"
            )
        _shapes.check_cast(np.dtype(array.dtype), dtype, what)
        return _transfer.move(located, device, dtype, private=False, what=what)

    def _cupy_task(self, leaf: _Leaf, grad: Any, hyper: tuple[float, ...]) -> None:
        from gpuvars.optim import _cupy

        device = leaf.var.physical_device

        def kernel(ps: list[Any], ss: list[dict[str, Any]]) -> None:
            _cupy.update(self, ps[0], grad, ss[0], hyper, device)

        self._locked([leaf], kernel)

    def _blocked_task(self, leaf: _Leaf, grad: Any, hyper: tuple[float, ...]) -> None:
        def kernel(ps: list[Any], ss: list[dict[str, Any]]) -> None:
            _blocked(self._numpy, ps[0], grad, ss[0], hyper)

        self._locked([leaf], kernel)

    def _packed_task(self, part: list[tuple[_Leaf, Any]], hyper: tuple[float, ...]) -> None:
        def kernel(ps: list[Any], ss: list[dict[str, Any]]) -> None:
            _packed(self._numpy, ps, [g for _, g in part], ss, hyper)

        self._locked([leaf for leaf, _ in part], kernel)

    def _locked(self, leaves: list[_Leaf], kernel: Callable[[list[Any], list[dict[str, Any]]], None]) -> None:
        """Run an in-place kernel over the leaves' storages and slots, each under its lock,
        after the write barrier."""
        locks = []
        try:
            for leaf in leaves:
                for var in (leaf.var, *leaf.slots.values()):
                    lock = exclusive(var)
                    lock.__enter__()
                    locks.append(lock)
            ps = [writable(leaf.var) for leaf in leaves]
            ss = [{name: writable(s) for name, s in leaf.slots.items()} for leaf in leaves]
            first = leaves[0].var
            with backend_errors(first.physical_device, f"optimizer '{self.name}' updating '{first.name}'"
                                + (f" and {len(leaves) - 1} more" if len(leaves) > 1 else "")):
                kernel(ps, ss)
        finally:
            for lock in reversed(locks):
                lock.__exit__(None, None, None)

    def _jax_step(self, device: PhysicalDevice, items: list[tuple[_Leaf, Any]], hyper: tuple[float, ...]) -> None:
        """One jitted call updates every variable of ``device`` (a rebinding backend: the new
        arrays are adopted).

        No buffer donation, on any platform: a variable's array may also be the caller's
        (``gv.Variable(x)`` and ``assign(x)`` adopt a JAX array without copying it), another
        variable's (``v2.assign(v1.value())``), a ``value()`` the user kept, or a snapshot's;
        donating would delete it under its holder (or fail: one buffer donated twice). The
        price is one step's new arrays beside the old ones at the peak."""
        backend: Any = device.backend
        xp = backend.xp
        key = (len(self.slot_names),)
        fn = self._jitted.get(key)
        if fn is None:
            names = self.slot_names

            def step(params: list[Any], grads: list[Any], slots: list[list[Any]], hp: Any) -> Any:
                out_p, out_s = [], []
                for p, g, s in zip(params, grads, slots):
                    new_p, new_s = self._rule(xp, p, g, dict(zip(names, s)), hp)
                    out_p.append(new_p.astype(p.dtype))
                    out_s.append([new_s[n].astype(p.dtype) for n in names])
                return out_p, out_s

            fn = self._jitted[key] = backend.jit(step)
        what = f"optimizer '{self.name}' updating {len(items)} variable(s) on {device.name}"
        locks = []
        try:
            for leaf, _ in items:
                for var in (leaf.var, *leaf.slots.values()):
                    lock = exclusive(var)
                    lock.__enter__()
                    locks.append(lock)
            params = [leaf.var.value() for leaf, _ in items]
            slots = [[leaf.slots[n].value() for n in self.slot_names] for leaf, _ in items]
            wide = any(p.dtype == np.float64 for p in params)
            with backend_errors(device, what):
                hp = backend.asarray(np.asarray(hyper, np.float64 if wide else np.float32),
                                     np.dtype(np.float64 if wide else np.float32), device.backend_index)
                new_p, new_s = fn(params, [g for _, g in items], slots, hp)
            for (leaf, _), p, s in zip(items, new_p, new_s):
                adopt(leaf.var, p)
                for n, arr in zip(self.slot_names, s):
                    adopt(leaf.slots[n], arr)
        finally:
            for lock in reversed(locks):
                lock.__exit__(None, None, None)

    # --- what each optimizer defines ----------------------------------------------------------

    def _hyper(self, step: int, lr: float) -> tuple[float, ...]:
        """The step's scalars (computed on the host in float64): ``step`` counts from 1."""
        raise NotImplementedError

    def _rule(self, xp: Any, p: Any, g: Any, slots: dict[str, Any], hp: Any) -> tuple[Any, dict[str, Any]]:
        """The update in array math (``xp``: jax.numpy or numpy), functional: returns the new
        parameter and slots. ``hp[i]`` are the scalars of :meth:`_hyper`."""
        raise NotImplementedError

    def _numpy(self, p: Any, g: Any, slots: dict[str, Any], hp: tuple[float, ...]) -> None:
        """The same update in place on numpy arrays."""
        raise NotImplementedError

    def _cuda(self) -> str:
        """The same update as the body of a CuPy ``ElementwiseKernel`` over ``g``, the scalars
        ``h0, h1, ...`` of :meth:`_hyper` (inputs) and ``p`` and the slots (in-place outputs)."""
        raise NotImplementedError


BLOCK = 1 << 14  # elements: a block of p, g, every slot and the scratch stays in the L2 cache
PARALLEL = 1 << 20  # elements from which the work is shared among threads (ufuncs release the GIL)
PACK = 1 << 14  # variables of at most this many elements are updated packed together
PACK_COUNT = 512  # variables per packed run
_pool: Any = None
_workers = 0
_pool_lock = threading.Lock()


def _threads() -> Any:
    global _pool, _workers
    with _pool_lock:
        if _pool is None:
            import concurrent.futures
            import os

            _workers = min(4, os.cpu_count() or 1)
            _pool = concurrent.futures.ThreadPoolExecutor(_workers, thread_name_prefix="gpuvars-optim")
        return _pool


def _blocked(kernel: Callable[..., None], p: Any, g: Any, slots: dict[str, Any], hp: tuple[float, ...]) -> None:
    """Run a numpy kernel block by block, so its dozen passes over memory hit the cache: one
    pass over memory per variable per step, not one per ufunc; large variables on threads."""
    n = p.size
    if n <= BLOCK:
        kernel(p, g, slots, hp)
        return
    pf, gf = p.reshape(-1), np.ascontiguousarray(g).reshape(-1)
    sf = {k: v.reshape(-1) for k, v in slots.items()}

    def run(a: int, b: int) -> None:
        for lo in range(a, b, BLOCK):
            hi = min(lo + BLOCK, b)
            kernel(pf[lo:hi], gf[lo:hi], {k: v[lo:hi] for k, v in sf.items()}, hp)

    pool = _threads() if n >= PARALLEL and not _in_pool() else None
    if pool is None or _workers < 2:
        run(0, n)
        return
    parts = _workers
    per = -(-n // parts // BLOCK) * BLOCK
    futures = [pool.submit(run, lo, min(lo + per, n)) for lo in range(per, n, per)]
    run(0, min(per, n))
    for f in futures:
        f.result()


def _run_all(tasks: list[Callable[[], None]]) -> None:
    for task in tasks:
        task()


def _in_pool() -> bool:
    return threading.current_thread().name.startswith("gpuvars-optim")


_arena = threading.local()


def _packed(kernel: Callable[..., None], ps: list[Any], gs: list[Any], ss: list[dict[str, Any]],
            hp: tuple[float, ...]) -> None:
    """One kernel call over many small variables: packed into flat runs (buffers kept per
    thread: memory already touched), updated, unpacked."""
    names = list(ss[0])
    total = sum(p.size for p in ps)
    dtype = ps[0].dtype
    key = (dtype, total, len(names))
    cache = getattr(_arena, "cache", None)
    if cache is None:
        cache = _arena.cache = {}
    bufs = cache.get(key)
    if bufs is None:
        if len(cache) >= 8:  # a few layouts per optimizer step (full runs and the last one)
            cache.clear()
        bufs = cache[key] = [np.empty(total, dtype) for _ in range(len(names) + 2)]
    flat, grad, *runs = bufs
    at = 0
    for i, p in enumerate(ps):  # slice assignment: ~0.5 us per array, np.concatenate ~2.7 us
        n = p.size
        hi = at + n
        flat[at:hi] = p.reshape(-1)
        grad[at:hi] = gs[i].reshape(-1)
        for run, name in zip(runs, names):
            run[at:hi] = ss[i][name].reshape(-1)
        at = hi
    kernel_slots = dict(zip(names, runs))
    _blocked(kernel, flat, grad, kernel_slots, hp)
    at = 0
    for i, p in enumerate(ps):
        n = p.size
        hi = at + n
        p.reshape(-1)[...] = flat[at:hi]
        for run, name in zip(runs, names):
            ss[i][name].reshape(-1)[...] = run[at:hi]
        at = hi


def _to_array(g: Any) -> Any:
    return _transfer.locate(g)[0]


def clip_by_global_norm(grads: Sequence[Any], clip_norm: float) -> tuple[list[Any], float]:
    """Scale ``grads`` so their global L2 norm is at most ``clip_norm`` (TF's
    ``tf.clip_by_global_norm``); returns ``(clipped, global_norm)``. ``None`` entries stay None.

    Each gradient stays on its device and library; the norm is accumulated on the host.

    Example:
        >>> import numpy as np
        >>> from gpuvars.optim import clip_by_global_norm
        >>> clipped, norm = clip_by_global_norm([np.array([3.0]), np.array([4.0])], 1.0)
        >>> norm, [round(float(c[0]), 6) for c in clipped]
        (5.0, [0.6, 0.8])
    """
    clip = _number(clip_norm, "clip_by_global_norm: clip_norm", low=0.0, open_low=True)
    total = 0.0
    arrays: list[Any] = []
    for g in grads:
        if g is None:
            arrays.append(None)
            continue
        array = _to_array(g)
        arrays.append(array)
        total += float((array * array).sum())  # reduced where it lives; one scalar crosses to the host
    norm = math.sqrt(total)
    if not math.isfinite(norm):
        raise InvalidArgumentError(f"clip_by_global_norm: the global norm is {norm} (a gradient holds inf or nan)")
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return [None if a is None else (a * scale if scale != 1.0 else a) for a in arrays], norm
