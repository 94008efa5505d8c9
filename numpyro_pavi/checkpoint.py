"""Crash-safe checkpoints of an SVI run, and a resumable replacement for ``svi.run``.

A checkpoint holds everything needed to continue an SVI run exactly where it stopped: the
full :class:`~numpyro.infer.svi.SVIState` (optimizer state, mutable state, PRNG key), the loss
history so far and a small user ``metadata`` dict (:func:`fit` puts the step count there).

Guarantees
----------
* **Atomic writes.** :func:`save_checkpoint` writes to a temporary file in the target
  directory, flushes and ``fsync``\\ s it, then ``os.replace``\\ s it over the target and
  ``fsync``\\ s the directory. A crash at any moment leaves either the previous checkpoint or
  the new one on disk, never a torn file. A write that fails with an exception removes its
  temporary file; one killed outright (``SIGKILL``, power loss) can leave a hidden
  ``.{name}.*.tmp`` beside the target, which is never loaded. A ``checkpoint_path`` that is a
  symlink has its target replaced.
* **Exact resume.** Arrays are stored as host numpy copies with their dtypes, JAX weak-type
  flags and pytree structure; new-style typed PRNG keys (``jax.random.key``) are stored as
  their raw key data plus the PRNG implementation name. :func:`fit` steps with one jitted
  update, so ``N`` steps, a kill and a resume for ``N`` more give bit-identical parameters
  and losses to ``2N`` uninterrupted steps. Across processes this needs the same
  ``PYTHONHASHSEED`` in both (NumPyro's ``Trace_ELBO`` sums its terms in the order of a
  ``set`` of site names): :func:`fit` records the writer's string hashing and warns when a
  resuming process differs.

File format (version :data:`FORMAT_VERSION`) is a pickled ``dict``::

    {"format": "numpyro-pavi-checkpoint", "format_version": 1, "step": int,
     "skeleton": SVIState with leaf i replaced by the int i,
     "leaves": [("jax", ndarray, weak_type) | ("key", key_data, impl) | ("numpy", ndarray)
                | ("object", value), ...],
     "losses": ndarray (step,), "metadata": dict}

Leaves are encoded with plain tuples (not classes of this module) so a checkpoint does not
depend on this module's import path. The skeleton still pickles the pytree node classes of
the state (e.g. optax's ``ScaleByAdamState``), which must be importable when loading.

.. warning:: Checkpoints are pickles: only load files you trust.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from numpyro.infer.svi import SVI, SVIRunResult, SVIState

from .compiling import as_inputs, jit
from .sharding import string_hash_probe
from .monitor import _worse, check_losses, explain_divergence, warn_divergence

__all__ = ["FORMAT_VERSION", "Checkpoint", "fit", "load_checkpoint", "save_checkpoint"]

#: Version of the on-disk format written by :func:`save_checkpoint`; :func:`load_checkpoint`
#: refuses any other version rather than guess at its layout.
FORMAT_VERSION: int = 1

_FORMAT_TAG = "numpyro-pavi-checkpoint"

PathLike = str | os.PathLike


class Checkpoint(NamedTuple):
    """The content of a checkpoint file, as returned by :func:`load_checkpoint`.

    :param svi_state: the restored :class:`~numpyro.infer.svi.SVIState` (jax arrays on the
        default device, original dtypes, weak types and pytree structure).
    :param losses: loss history, shape ``(n,)`` (``n == step`` for checkpoints written by
        :func:`fit`); an empty float32 array when none was saved.
    :param metadata: the user metadata dict (a fresh copy).
    :param step: number of SVI steps the state has taken.
    """

    svi_state: SVIState
    losses: np.ndarray
    metadata: dict
    step: int


# ---------------------------------------------------------------------------------------------
# Leaf encoding
# ---------------------------------------------------------------------------------------------


def _is_key_array(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _encode_leaves(leaves: list) -> list[tuple]:
    """Host-side records for the flattened state leaves (see the module docstring)."""
    # One device_get for all arrays: a transfer per leaf would synchronise once per leaf.
    host = jax.device_get([jax.random.key_data(x) if _is_key_array(x) else x for x in leaves])
    records: list[tuple] = []
    for x, h in zip(leaves, host):
        if _is_key_array(x):
            # Typed key arrays have no numpy equivalent; their raw uint32 data plus the impl
            # name is exactly what ``wrap_key_data`` needs to rebuild the same key.
            records.append(("key", np.asarray(h), str(jax.random.key_impl(x))))
        elif isinstance(x, jax.Array):
            # Weak types matter for dtype promotion and for jit cache hits (numpyro's step
            # counter is a weak int32), so a resumed state must carry them as the original did.
            records.append(("jax", np.asarray(h), bool(getattr(x, "weak_type", False))))
        elif isinstance(x, np.ndarray):
            records.append(("numpy", x.copy()))
        else:
            records.append(("object", x))
    return records


def _make_weak(x: np.ndarray) -> jax.Array:
    try:
        from jax._src.lax.lax import _convert_element_type  # no public API sets weak_type

        return _convert_element_type(x, x.dtype, weak_type=True)
    except (ImportError, TypeError):  # pragma: no cover - private API moved; lose only the flag
        return jnp.asarray(x)


def _decode_leaf(rec: tuple) -> Any:
    kind = rec[0]
    if kind == "key":
        return jax.random.wrap_key_data(jnp.asarray(rec[1]), impl=rec[2])
    if kind == "jax":
        return _make_weak(rec[1]) if rec[2] else jnp.asarray(rec[1])
    if kind == "numpy":
        return np.array(rec[1])
    if kind == "object":
        return rec[1]
    raise ValueError(f"unknown leaf kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def _fsync_dir(dirname: str) -> None:
    # Makes the rename itself durable; directories cannot be opened/fsynced on some platforms
    # (Windows) and file systems, where the replace is as durable as the OS makes it anyway.
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    path: PathLike,
    svi_state: SVIState,
    *,
    losses: Any = None,
    metadata: dict | None = None,
) -> None:
    """Atomically write an SVI state, its loss history and user metadata to ``path``.

    The payload goes to a temporary file in the same directory (so the final rename never
    crosses file systems), which is flushed and ``fsync``\\ ed, then ``os.replace``\\ d over
    ``path``; the directory is ``fsync``\\ ed where supported. If anything fails, the temporary
    file is removed and the previous ``path`` (if any) is left untouched. An existing file's
    permission bits are kept.

    :param path: destination file.
    :param svi_state: state to store; leaves may be jax arrays (incl. typed PRNG key arrays),
        numpy arrays or picklable Python objects.
    :param losses: loss history, anything ``np.asarray`` accepts, shape ``(n,)``; ``None``
        stores an empty float32 array.
    :param metadata: picklable user dict. If it has an int ``"step"`` entry that is the
        checkpoint's step, else ``len(losses)``.
    """
    path = os.fspath(path)
    metadata = dict(metadata) if metadata is not None else {}
    losses_np = np.zeros((0,), np.float32) if losses is None else np.asarray(jax.device_get(losses))
    if losses_np.ndim != 1:
        raise ValueError(f"losses must be 1-d, got shape {losses_np.shape}")
    step = int(metadata["step"]) if "step" in metadata else int(losses_np.shape[0])

    leaves, treedef = jax.tree_util.tree_flatten(svi_state)
    payload = {
        "format": _FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "step": step,
        # Leaf positions in place of leaves: keeps the (picklable) pytree node classes while
        # the leaves themselves get a representation that survives without a device.
        "skeleton": jax.tree_util.tree_unflatten(treedef, list(range(len(leaves)))),
        "leaves": _encode_leaves(leaves),
        "losses": losses_np,
        "metadata": metadata,
    }

    dirname = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=dirname
    )
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except OSError:
            pass  # no previous file: keep mkstemp's private 0600
        os.replace(tmp, path)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-write must not leave a stray temp file.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(dirname)


def load_checkpoint(path: PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    :param path: checkpoint file.
    :return: :class:`Checkpoint` ``(svi_state, losses, metadata, step)``.
    :raises FileNotFoundError: if ``path`` does not exist.
    :raises ValueError: if the file is corrupt, not a numpyro-pavi checkpoint, or of another
        format version (the message names ``path``).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    try:
        with open(path, "rb") as f:
            payload = pickle.load(f)
    except Exception as e:  # truncated/garbled pickles raise many different types
        raise ValueError(
            f"checkpoint {path!r} is corrupt or not a pickle ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT_TAG:
        raise ValueError(f"{path!r} is not a numpyro-pavi checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path!r} has format version {version!r}; this numpyro-pavi reads "
            f"format version {FORMAT_VERSION}"
        )
    try:
        records = payload["leaves"]
        svi_state = jax.tree_util.tree_map(lambda i: _decode_leaf(records[i]), payload["skeleton"])
        losses = np.asarray(payload["losses"])
        metadata = dict(payload["metadata"])
        step = int(payload["step"])
    except Exception as e:
        raise ValueError(f"checkpoint {path!r} is corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(svi_state, SVIState):
        raise ValueError(f"checkpoint {path!r} is corrupt: stored state is not an SVIState")  # noqa: TRY004
    return Checkpoint(svi_state, losses, metadata, step)


# ---------------------------------------------------------------------------------------------
# Resumable SVI loop
# ---------------------------------------------------------------------------------------------


def _check_compatible(path: str, loaded: SVIState, expected: SVIState) -> None:
    # A checkpoint from another guide/optimizer would otherwise fail deep inside jit, or worse,
    # silently run with mismatched state. The rng key is excluded: the stored one is used.
    # NumPyro drops the mutable state from the steps of a Trace_ELBO(num_particles > 1) (it
    # keeps the one svi.init made): a checkpoint without one, where svi.init makes one, is that
    def parts(state: SVIState) -> tuple:
        return (state.optim_state, None if loaded.mutable_state is None else state.mutable_state)

    def sig(tree) -> list:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return [
            (jax.tree_util.keystr(p), tuple(np.shape(x)), np.dtype(x.dtype) if hasattr(x, "dtype") else type(x))
            for p, x in leaves
        ]

    got, want = sig(parts(loaded)), sig(parts(expected))
    if got != want:
        diff = [(g, w) for g, w in zip(got, want) if g != w]
        first = (
            f"{diff[0][0][0]}: {diff[0][0][1:]} in the checkpoint, {diff[0][1][1:]} expected"
            if diff
            else f"{len(got)} leaves in the checkpoint, {len(want)} expected"
        )
        raise ValueError(
            f"checkpoint {path!r} does not match this SVI problem (different guide, optimizer, "
            f"data shapes, or an earlier numpyro-pavi version?): {first} ({max(len(diff), 1)} "
            "differences; optimizer state, then mutable state)"
        )


def _run_segment(
    step_fn: Callable[[SVIState], tuple[SVIState, jax.Array]],
    state: SVIState,
    n: int,
    bar: Any,
    stable_update: bool,
    done: int = 0,
    history: list | None = None,
    on_step: Callable | None = None,
) -> tuple[SVIState, np.ndarray]:
    """Take ``n`` steps; returns the new state and the ``(n,)`` host losses.

    ``on_step(step, state, last_losses)`` runs after each step (``step`` counts all steps done;
    ``last_losses(k)`` returns the last ``k`` host losses up to it, earlier segments included).
    """
    losses: list = []
    batch = None if bar is None else max(bar.total // 20, 1)
    tail = np.concatenate(history) if history else np.zeros(0, np.float32)
    pulled = 0  # losses of this segment already on the host (in `tail`)

    def last_losses(k: int) -> np.ndarray:
        # one transfer of only the losses not yet on the host (a stride's worth), not of k
        nonlocal tail, pulled
        if pulled < len(losses):
            tail = np.concatenate([tail, np.asarray(jax.device_get(losses[pulled:]))])[-k:]
            pulled = len(losses)
        return tail[-k:]

    for j in range(n):
        state, loss = step_fn(state)
        losses.append(loss)
        if on_step is not None:
            on_step(done + j + 1, state, last_losses)
        if bar is not None:
            bar.update(1)
            i = bar.n
            if i % batch == 0:
                # Only pull losses to the host every ``batch`` steps (as numpyro does) so the
                # device is not synchronised at each step.
                k = min(batch, len(losses))
                recent = np.asarray(jax.device_get(losses[-k:]))
                if stable_update:
                    recent = recent[np.isfinite(recent)]
                avg = float(recent.mean()) if recent.size else float("nan")
                bar.set_postfix_str(f"avg. loss [{i - k + 1}-{i}]: {avg:.4f}", refresh=False)
    return state, np.asarray(jax.device_get(losses))


def fit(
    svi: SVI,
    rng_key: jax.Array,
    num_steps: int,
    *args: Any,
    checkpoint_path: PathLike | None = None,
    checkpoint_every: int = 1000,
    progress_bar: bool = True,
    stable_update: bool = False,
    forward_mode_differentiation: bool = False,
    init_params: dict | None = None,
    keep_best: bool = True,
    window: int = 100,
    rtol: float = 0.05,
    **kwargs: Any,
) -> SVIRunResult:
    """Like :meth:`SVI.run`, but resumable from a checkpoint file.

    If ``checkpoint_path`` exists, the run continues from the step stored there (``rng_key``
    and ``init_params`` are then unused: the stored state carries its own key); otherwise it
    starts from ``svi.init(rng_key, *args, init_params=init_params, **kwargs)``. The remaining
    steps run in segments of ``checkpoint_every``, and a checkpoint (metadata ``step`` and
    ``num_steps``, plus any metadata already in the file) is saved after each segment.

    Every step is one call to a single ``jax.jit``-compiled update built once per call of
    ``fit`` (``svi.run`` would recompile its body for every segment). Hence segmentation
    cannot change the numerics: ``fit(N)``, kill, ``fit(2N)`` is bit-identical to
    ``fit(2N)``. The model's arguments are closed over, as ``svi.run(..., progress_bar=True)``
    does (and ``fit`` then equals it bit for bit), except numeric arrays of more than
    :data:`~numpyro_pavi.compiling.SMALL_DATA` elements in all, which are inputs of the
    update rather than constants of it (their compilation is then several times faster),
    unless the model reads their values on the host (``int(x.max())``). A run killed
    mid-segment resumes from its last checkpoint and redoes those steps, with the same result.

    :param svi: the :class:`~numpyro.infer.SVI` instance.
    :param rng_key: PRNG key for ``svi.init`` (legacy uint32 or typed key).
    :param num_steps: total number of steps the run should reach (including steps already in
        the checkpoint).
    :param args: model/guide positional arguments.
    :param checkpoint_path: checkpoint file; ``None`` disables checkpointing.
    :param checkpoint_every: steps per segment between checkpoints.
    :param progress_bar: show a tqdm progress bar (numpyro style) over all remaining steps.
    :param stable_update: use :meth:`SVI.stable_update` (skips non-finite updates).
    :param forward_mode_differentiation: forwarded to the update, as in ``svi.run``.
    :param init_params: initial values of ``numpyro.param`` sites for a fresh start.
    :param keep_best: track the parameters with the best ``window``-step running mean of the
        loss (checked every ``window // 10`` steps, kept in the checkpoint's metadata so a
        resumed run tracks identically). When the last running mean is worse than the best
        by more than ``rtol * max(|best|, 1)`` (the fit left its optimum, or its loss became
        non-finite), a :class:`~numpyro_pavi.monitor.DivergenceWarning` names the latent site
        whose posterior moved most (:func:`~numpyro_pavi.monitor.explain_divergence`), and
        ``params`` are the best ones (``state`` stays the last, so the run can continue);
        where the guide keeps a mutable state (stored Laplace bases), the best params carry
        that step's: pass them to the posterior methods as they are, not merged with
        ``state.mutable_state`` (the last step's). With
        ``keep_best=False`` the warning is still given, the last parameters are returned, and
        a best record in the checkpoint is dropped (one kept over another ``window`` restarts).
    :param window: running-mean window (steps).
    :param rtol: relative tolerance of the divergence check.
    :param kwargs: model/guide keyword arguments.
    :return: ``SVIRunResult(params, state, losses)`` with ``losses`` of shape ``(num_steps,)``:
        the full history, previous segments and runs included.
    :raises ValueError: for ``num_steps``, ``checkpoint_every`` or ``window`` not a positive integer, a
        checkpoint directory that does not exist or is not writable (before any step), a
        checkpoint that has already gone past ``num_steps``, or one that does not match this SVI
        problem (naming the first state leaf that differs).
    """
    for name, value in (("num_steps", num_steps), ("checkpoint_every", checkpoint_every), ("window", window)):
        if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    num_steps, checkpoint_every, window = int(num_steps), int(checkpoint_every), int(window)
    if checkpoint_path is not None:
        # a symlink's target is what a resume reads: replace that, not the link
        checkpoint_path = os.path.realpath(os.fspath(checkpoint_path))
        folder = os.path.dirname(checkpoint_path)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            # found now, not after the first segment's steps
            raise ValueError(
                f"checkpoint_path {checkpoint_path!r}: its directory {folder!r} does not exist or is "
                "not writable; create it or pass another path."
            )

    def init_fn(key: jax.Array) -> SVIState:
        return svi.init(key, *args, init_params=init_params, **kwargs)

    metadata: dict = {}
    if checkpoint_path is not None and os.path.exists(checkpoint_path):
        ckpt = load_checkpoint(checkpoint_path)
        state, start, metadata = ckpt.svi_state, ckpt.step, ckpt.metadata
        if ckpt.losses.shape != (start,):
            raise ValueError(
                f"checkpoint {os.fspath(checkpoint_path)!r} holds {ckpt.losses.shape} losses for "
                f"step {start}; fit needs the full loss history"
            )
        if start > num_steps:
            raise ValueError(
                f"checkpoint {os.fspath(checkpoint_path)!r} is at step {start}, past "
                f"num_steps={num_steps}; pass num_steps >= {start}"
            )
        if getattr(svi.guide, "prototype_trace", None) is None:
            # A guide not set up yet (a new process) must be set up on concrete values: an
            # abstract init would leave tracers in its setup state (data statistics, initial
            # values), and autoguides set up only once.
            expected = init_fn(rng_key)
        else:
            try:
                # Abstract init only (no compute): enough to catch a checkpoint of another problem.
                expected = jax.eval_shape(init_fn, rng_key)
            except Exception:  # noqa: BLE001
                # Guides that need concrete values at init cannot be traced; pay for a real init.
                expected = init_fn(rng_key)
        _check_compatible(os.fspath(checkpoint_path), state, expected)
        if metadata.get("hash_probe", string_hash_probe()) != string_hash_probe():
            warnings.warn(
                f"Resuming {os.fspath(checkpoint_path)!r} in a process that hashes strings differently "
                "from the one that wrote it: NumPyro's Trace_ELBO sums its terms in the order of a set "
                "of site names, so the steps from here differ from an uninterrupted run's in round-off. "
                "Start every process of a run with the same PYTHONHASHSEED (e.g. PYTHONHASHSEED=0) "
                "for an exact resume.",
                stacklevel=2,
            )
        history = [ckpt.losses]
    else:
        state, start, history = init_fn(rng_key), 0, []

    update = svi.stable_update if stable_update else svi.update

    # Large data are the step's inputs; svi.run (with its bar) closes over them, which makes
    # them constants of the program: compiling the step on 2e6 rows of a crossed table then
    # took 14.6 s against 4.0 s. Small data, other arguments (sizes, flags) and the arrays
    # of a model that reads their values on the host stay closed over (see as_inputs).
    def make_step(rebuild: Callable[[list], Any]) -> Callable:
        @jit
        def step(s: SVIState, data: list) -> tuple[SVIState, jax.Array]:
            a, kw = rebuild(data)
            return update(s, *a, forward_mode_differentiation=forward_mode_differentiation, **kw)

        return step

    steps = {}  # the step is traced once: as_inputs's check is its first trace, which jit caches

    def check(rebuild, data):
        steps["step"] = make_step(rebuild)
        steps["step"].trace(state, data)

    data, rebuild = as_inputs((args, kwargs), check)
    step = steps["step"] if data else make_step(rebuild)

    def step_fn(s: SVIState) -> tuple[SVIState, jax.Array]:
        return step(s, data)

    # Best-so-far tracking: host-side, every `stride` steps, on the full loss history; its
    # record lives in the checkpoint's metadata so a resumed run tracks exactly as one run.
    stride = max(window // 10, 1)
    stored_best = metadata.pop("best", None) if not keep_best else metadata.get("best")
    if not (stored_best and stored_best.get("window", window) == window):
        stored_best = None  # none, or a running mean over another window: start over
    best = dict(stored_best or {"mean": math.inf, "step": -1, "params": None, "window": window})

    def on_step(step: int, s: SVIState, recent_losses: Callable[[int], np.ndarray]) -> None:
        if not keep_best or step % stride or step < window:
            return
        recent = recent_losses(window)
        mean = float(np.mean(np.where(np.isfinite(recent), recent, np.inf)))
        if mean < best["mean"]:
            params = svi.get_params(s)
            if s.mutable_state:
                # stored bases refreshed at these params' globals, not the last step's
                params = {**s.mutable_state, **params}
            best.update(mean=mean, step=step - 1, params=params, window=window)

    bar = None
    if progress_bar and start < num_steps:
        bar = tqdm.tqdm(total=num_steps, initial=start)
    try:
        done = start
        while done < num_steps:
            n = min(checkpoint_every, num_steps - done)
            state, seg_losses = _run_segment(step_fn, state, n, bar, stable_update, done, history, on_step)
            # One array: the save and the final result reuse it rather than re-joining segments.
            history = [np.concatenate(history + [seg_losses])]
            done += n
            if checkpoint_path is not None:
                metadata.update(step=done, num_steps=num_steps, hash_probe=string_hash_probe())
                if keep_best:
                    metadata["best"] = {**best, "params": jax.device_get(best["params"])}
                save_checkpoint(checkpoint_path, state, losses=history[0], metadata=metadata)
    finally:
        if bar is not None:
            bar.close()

    params = svi.get_params(state)
    losses = history[0]
    report = check_losses(losses, window=window, rtol=rtol, burn_in=0)
    reference = best["params"]
    if reference is not None:
        report = dataclasses.replace(report, best=float(best["mean"]), best_step=int(best["step"]))
    if _worse(report.last, report.best, rtol):
        site_msg = None
        if reference is not None:
            try:
                # the last params with their own stored bases, as the best carry theirs
                last = {**(state.mutable_state or {}), **params}
                _, site_msg = explain_divergence(svi.model, svi.guide, reference, last, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 - the warning must not fail the fit
                site_msg = f"(could not compare sites: {type(err).__name__}: {err})"
        if reference is not None:
            params = jax.tree.map(jnp.asarray, reference)
        warn_divergence(report, site_msg, kept_best=reference is not None)
    return SVIRunResult(params, state, jnp.asarray(losses))
