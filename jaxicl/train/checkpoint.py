"""Orbax checkpoints of a TrainState (all orbax calls of jaxicl live here).

Each checkpoint holds params, optimiser state, step, the raw key data and the buffers (if any); the run config is
root metadata, and each checkpoint's own metadata holds the train.steps of the run that wrote it (a resume may extend
a run with a constant schedule). Restoring always goes through an abstract target carrying the shardings wanted
now, so a checkpoint saved on 4 devices loads onto 1 (or onto another mesh). Every process of a
multi-host run must call save and restore; orbax writes from the primary host.
"""

import contextlib
import json
import os
import shutil
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from orbax.checkpoint import v1 as ocp

from jaxicl import outputs
from jaxicl.train.state import TrainState
from jaxicl.validation import ConfigError


def remove_checkpoints(directory: str) -> None:
    """Deletes `directory` (checkpoints and their stored config), so a new run there starts fresh and a later resume
    finds only the new run. Every process calls it: process 0 deletes, the others wait until it has."""
    if outputs.is_primary():
        shutil.rmtree(directory, ignore_errors=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxicl.remove_checkpoints:{os.path.abspath(directory)}")


_CONTINUING: list[set[str]] = []  # the sets of the open continuing() blocks


@contextlib.contextmanager
def continuing() -> Iterator[set[str]]:
    """A set that gathers, while the block runs, the checkpoint directories (absolute) a run can go on from: those
    whose latest checkpoint passed its resume check (check_resumable) and those it saved a checkpoint in. The same
    run started again resumes them (experiments.common.runner says so of a run stopped by Ctrl-C)."""
    found = set()
    _CONTINUING.append(found)
    try:
        yield found
    finally:
        _CONTINUING.remove(found)


def _continues(directory: str) -> None:
    for found in _CONTINUING:
        found.add(directory)


def _to_tree(state: TrainState) -> dict:
    tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "key_data": jax.random.key_data(state.key)}
    return tree if state.buffers is None else {**tree, "buffers": state.buffers}


class CheckpointStore:
    """The checkpoints under `directory`, keeping the latest `keep`."""

    def __init__(self, directory: str, *, keep: int = 3, config: dict | None = None):
        self.directory = os.path.abspath(directory)
        config = normalise_config(config or {})  # as JSON stores it: a numpy scalar (steps=np.int64(100)) its number
        self._steps = config.get("train", {}).get("steps")
        self._ckptr = self._open(keep, config)
        # orbax writes the config when a store first opens a directory and never rewrites it: a run that stopped
        # before its first checkpoint left its own config here, under which this run's checkpoints would be stored
        # (and another config's rerun would resume them); with no checkpoint there is nothing to keep. Process 0
        # decides: another process may read the directory before process 0 has written this run's config.
        stale = not self._ckptr.checkpoints and _root_config(self._ckptr) != config
        if jax.process_count() > 1:
            stale = bool(multihost_utils.broadcast_one_to_all(np.asarray(stale)))
        if stale:
            self._ckptr.close()
            remove_checkpoints(self.directory)
            self._ckptr = self._open(keep, config)

    def _open(self, keep: int, config: dict | None):
        return ocp.training.Checkpointer(self.directory,
                                         preservation_policy=ocp.training.preservation_policies.LatestN(keep),
                                         custom_metadata=config or {})

    def save(self, state: TrainState, step: int | None = None) -> None:
        """Blocks until the checkpoint at `step` (default state.step) is committed.

        A sweep's stacked state has one step per member, so it passes the sweep's step.
        """
        step = int(state.step) if step is None else step
        written_by = None if self._steps is None else {"train.steps": self._steps}
        self._ckptr.save(step, _to_tree(state), force=True, overwrite=True, custom_metadata=written_by)
        self._ckptr.wait()
        _continues(self.directory)

    def steps(self) -> list[int]:
        return [c.step for c in self._ckptr.checkpoints]

    def config(self) -> dict:
        """The run config of the latest checkpoint ({} if none stored): the config stored when the directory was
        first opened, with the train.steps of the run that wrote that checkpoint (an extended run's, not the first
        run's)."""
        return _latest_config(self._ckptr)

    def restore(self, like: TrainState, sharding: NamedSharding, step: int | None = None,
                members: int | None = None) -> TrainState:
        """The checkpoint at `step` (latest if None), shaped like `like` and placed with `sharding`.

        `sharding` applies to every leaf (e.g. P() replicated, or P("members") for a sweep's stack). `like.key` must
        be of the PRNG implementation the run drew its batches with (checked against the stored config: raw key data
        of one shape may belong to several implementations). members: `like` is a sweep's stack [S, ...] of that
        many members padded with copies of the last to S rows (a multiple of the mesh's member devices); the stored
        stack may be padded to another S (another mesh): its first `members` rows are restored, padded likewise.
        """
        made_with, wanted = self.config().get("train", {}).get("prng_impl"), str(jax.random.key_impl(like.key))
        if made_with is not None and made_with != wanted:
            raise ConfigError(f"cannot restore: the checkpoint's run drew its batches with train.prng_impl="
                              f"{made_with!r}, the state to restore into has {wanted!r} keys; build it with "
                              f"init_state(..., prng_impl={made_with!r})")
        # read as numpy, then placed from this thread: orbax reads in threads of its own, which a float64 run's
        # jax.enable_x64 context does not reach, so arrays made there came back float32 (and the run resumed rounded)
        host = jax.tree.map(lambda x: np.empty(x.shape, x.dtype), jax.eval_shape(_to_tree, like))
        step = self.steps()[-1] if step is None else step
        saved = self._ckptr.metadata(step).metadata
        if members is not None:  # the stored stack's rows
            rows = _leaf_specs(saved)[("step",)][0][0]
            host = jax.tree.map(lambda x: np.empty((rows, *x.shape[1:]), x.dtype), host)
        _check_like(saved, host)
        tree = self._ckptr.load(step, host)
        if members is not None:
            tree = jax.tree.map(lambda x: pad_rows(x[:members], like.step.shape[0]), tree)
        tree = jax.device_put(tree, sharding)
        key = jax.random.wrap_key_data(tree["key_data"], impl=jax.random.key_impl(like.key))
        return TrainState(tree["params"], tree["opt_state"], tree["step"], key, tree.get("buffers"))

    def close(self) -> None:
        self._ckptr.close()


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """x [n, ...] padded to [size, ...] (size >= n >= 1) with copies of its last row."""
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def _leaf_specs(tree) -> dict:
    """{leaf path as names: (shape, dtype)} of a tree of arrays or of orbax's ArrayMetadata (which stores a
    namedtuple as a dict and every key as a string: paths are compared by their names as strings, not by how each
    level is indexed)."""
    def name(k):
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))

    return {tuple(name(k) for k in path): (tuple(x.shape), np.dtype(x.dtype))
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _check_like(saved, like: dict) -> None:
    """ConfigError naming the first leaf (params first) that the checkpoint (saved: its ArrayMetadata tree) holds
    and like lacks, or the reverse, or that differs in shape or dtype: orbax loads what was saved, cast to like's
    dtypes, so another model (an API run stores its train and task settings, not the model's) or a float32 run
    under x64 would have been resumed in place of the one given."""
    got, want = _leaf_specs(saved), _leaf_specs(like)
    advice = ("the model or its dtype differs from the run that wrote the checkpoint; train into another out_dir, or "
              "remove its checkpoints to start afresh")
    for path in sorted(got.keys() | want.keys(), key=lambda p: (p[0] != "params", str(p))):
        where = "".join(f"[{k!r}]" for k in path)
        if got.get(path) != want.get(path):
            def spec(s):
                return "nothing" if s is None else f"{s[1]} {list(s[0])}"
            raise ConfigError(f"cannot restore: the checkpoint holds {spec(got.get(path))} at {where}, the state to "
                              f"restore into has {spec(want.get(path))}: {advice}")


def _root_config(ckptr) -> dict:
    """The config stored when the directory was first opened, normalised: one orbax has just written reads back as
    given (tuples), not as stored (lists), and would differ from itself (a sweep's chunk directories, which hold no
    config of the directory above them, were taken for a stale run's and deleted)."""
    meta = ckptr.root_metadata()
    return normalise_config(dict(meta.custom_metadata or {})) if meta is not None else {}


def _latest_config(ckptr) -> dict:
    """CheckpointStore.config of the checkpoints `ckptr` holds."""
    config = _root_config(ckptr)
    written_by = ckptr.checkpointables_metadata().custom_metadata if ckptr.checkpoints else None
    if written_by and "train" in config:
        config = {**config, "train": {**config["train"], "steps": written_by["train.steps"]}}
    return config


def latest_checkpoint(directory: str) -> tuple[dict, int] | None:
    """(CheckpointStore.config, step) of the latest checkpoint in `directory`, None where it holds none; reads only
    (it creates no directory and writes no config)."""
    if not os.path.isdir(directory):  # opening a checkpointer would create it
        return None
    # no custom_metadata: opening an existing directory writes none; absolute, as in CheckpointStore: orbax logs
    # "Checkpoint path should be absolute" for every checkpoint's metadata it reads under a relative path
    ckptr = ocp.training.Checkpointer(os.path.abspath(directory))
    try:
        return (_latest_config(ckptr), ckptr.checkpoints[-1].step) if ckptr.checkpoints else None
    finally:
        ckptr.close()


def check_all_resumable(directories: list[str], config: dict) -> list[int]:
    """Raises check_resumable's ConfigError for the first of `directories` whose latest checkpoint cannot continue
    into the run `config`; writes nothing, so a run with several stores (a sweep's chunks) can check them all before
    it writes to any. Every process calls it; process 0 decides, and none goes on before every one has read.
    Returns the indices of the directories holding a checkpoint (which the run then resumes)."""
    refused, error, held = -1, None, []
    for k, directory in enumerate(directories):
        latest = latest_checkpoint(directory)
        if latest is None:
            continue
        stored, step = latest
        try:
            check_resumable(stored, config, step, os.path.abspath(directory))
            held.append(k)
        except ConfigError as e:
            refused, error = k, e
            break
    if jax.process_count() > 1:
        refused = int(multihost_utils.broadcast_one_to_all(np.asarray(refused)))
    if refused >= 0:
        raise error or ConfigError(f"cannot resume: process 0 found the checkpoint in {directories[refused]} made "
                                   f"with another config")
    return held


def normalise_config(cfg: dict) -> dict:
    """cfg as JSON stores it: tuples as lists, numpy scalars as the Python numbers they hold (outputs.json_default),
    numeric arrays (numpy or JAX) as nested lists of them, so a resume compares an array field by its values.
    ConfigError naming the field (its dotted path, e.g. task.w_mean) of a value JSON cannot store."""
    return json.loads(json.dumps(_storable(cfg, "")))


def _storable(value, path: str):
    """value (at `path` in the config) as json.dumps takes it."""
    if isinstance(value, dict):
        return {k: _storable(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.ndarray, jax.Array)):
        value = np.asarray(value)
        # jax.numpy's issubdtype: a bfloat16 array is floating there, not in numpy's
        if not any(jax.numpy.issubdtype(value.dtype, kind) for kind in (np.bool_, np.integer, np.floating)):
            raise ConfigError(f"{path}: an array in the run's config is stored as nested lists of its numbers (a "
                              f"resume compares them), so its dtype must be bool, integer or floating, got "
                              f"{value.dtype}")
        return outputs.json_default(value[()]) if value.ndim == 0 else [_storable(row, path) for row in value]
    if isinstance(value, np.generic):
        return outputs.json_default(value)
    if value is None or isinstance(value, (str, int, float)):
        return value
    raise ConfigError(f"{path}: the run's config is stored as JSON with its checkpoints (a resume compares it), which "
                      f"holds numbers, strings, None, lists, dicts and numeric arrays, not a {type(value).__name__}")


def check_resumable(stored: dict, current: dict, checkpoint_step: int, directory: str) -> None:
    """Raises ConfigError, naming `directory` (the checkpoints'), when a checkpoint at checkpoint_step cannot
    continue into the run `current`.

    Every entry and section field must match, except that train.steps may change when the schedule is constant
    (then the resumed run equals an uninterrupted run of the new length) and the checkpoint is before its end.
    A warmup-cosine schedule decays to 0 at train.steps, so a run resumed with other steps would
    follow a schedule that neither the old nor the new uninterrupted run has: refused.
    """
    stored, current = normalise_config(stored), normalise_config(current)
    if not stored:
        _continues(directory)
        return
    refused = f"cannot resume from {directory}:"
    diffs = config_differences(stored, current, "checkpoint", ignore=("train.steps",))
    if diffs:
        raise ConfigError(f"{refused} the checkpoint was made with another config: " + "; ".join(diffs)
                          + "; train into a new output directory, or keep the checkpoint's config")
    before, now = stored["train"]["steps"], current["train"]["steps"]
    if before != now and current["train"]["schedule"] != "constant":
        raise ConfigError(f"{refused} train.steps: checkpoint {before} vs now {now}, and "
                          f"train.schedule={current['train']['schedule']!r} depends on train.steps (it decays to 0 "
                          f"there), so the resumed run would follow neither run's schedule; keep train.steps={before} "
                          f"or train into a new output directory")
    fix = f"use train.steps={before} (the checkpoint's run) or more than {checkpoint_step}, or a new output directory"
    if checkpoint_step > now:
        raise ConfigError(f"{refused} the checkpoint is at step {checkpoint_step}, past train.steps={now}; {fix}")
    if checkpoint_step == now != before:
        raise ConfigError(f"{refused} the checkpoint is at step {checkpoint_step} of a run of train.steps="
                          f"{before}; a run of train.steps={now} would end there without the rows of its last step "
                          f"and its final evaluation; {fix}")
    _continues(directory)


def config_differences(before: dict, now: dict, label: str, ignore: tuple[str, ...] = ()) -> list[str]:
    """"path: {label} value vs now value" for every entry of the configs (as JSON stores them) that differs, at any
    depth (dotted paths, e.g. "config.model.d_model"), but the paths in `ignore`."""
    return [f"{path}: {label} {_short(a)} vs now {_short(b)}"
            for path, a, b in _differences(normalise_config(before), normalise_config(now)) if path not in ignore]


def _differences(stored: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted path, stored value, current value) for every entry that differs, at any depth (an experiment's
    "config.model.d_model"); a field missing on one side counts as None there."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((prefix + key, a, b))
    return out


def _short(value: object, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
