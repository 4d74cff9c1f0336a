"""Which fields of a sweep may vary per member, how they enter the program, and how a sweep's config names them.

A member is {path: value}: `train.<f>` (seed and the optimiser hyperparameters), `task.<f>` (array
keywords of the sampler) or `<f>` (keywords of init). Everything else changes shapes or code paths.
A train or task field may also be given by the last part of its path where that is unique (`lr`),
as on the command line (jaxicl.config_paths); sweep_members names every field in full.
"""

import dataclasses
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl import config_paths
from jaxicl.prng import seed_key
from jaxicl.tasks.batching import Sampler, takes_step
from jaxicl.traced import trace
from jaxicl.train.checkpoint import normalise_config
from jaxicl.train.config import TrainConfig
from jaxicl.train.optim import SWEEPABLE_OPTIMIZER_FIELDS
from jaxicl.train.sweep_spec import member_config
from jaxicl.validation import ConfigError

SWEEPABLE_TRAIN_FIELDS = ("seed",) + SWEEPABLE_OPTIMIZER_FIELDS


def keywords(fn, leading: int = 1) -> tuple[str, ...]:
    """The parameters of fn a sweep can pass by keyword: every positional-or-keyword or keyword-only one after the
    `leading` ones it passes by position (init's key, evaluate's params; the sampler's cfg and key), with or without
    a default. **kwargs is not counted."""
    params = list(inspect.signature(fn).parameters.values())[leading:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _name(fn) -> str:
    """module.qualname of a function (a lambda or a nested one included); repr for other callables (a partial)."""
    qualname = getattr(fn, "__qualname__", None)
    return f"{fn.__module__}.{qualname}" if qualname else repr(fn)


def _task_keywords(sample: Sampler | None) -> tuple[str, ...]:
    """The task fields a sweep can pass the sampler as arrays: its keywords after cfg and key (none without one)."""
    return () if sample is None else keywords(sample, leading=2)


def _group(path: str, init_ok: tuple[str, ...]) -> str | None:
    """The group of a swept field: "train" or "task" by the head of its path, "init" for a keyword of init (init_ok),
    None for neither (refused by split_fields)."""
    head = path.partition(".")[0]
    return head if head in ("train", "task") else "init" if path in init_ok else None


def sweep_members(members: list[dict], sample: Sampler | None, cfg: TrainConfig, task_cfg,
                  init: Callable) -> list[dict]:
    """The members with every field by its full name, and numpy scalars (np.arange(4) as seeds) as the Python numbers
    they hold. A field is a dotted path (train.lr, task.noise_std), a keyword of init (init_scale), or the last part of
    the path of one train or task field (lr: train.lr), the rule of config_paths.resolve with init's keywords as the
    top-level names. Raises ConfigError for a name of several fields, a dotted path of no field (naming the sweepable
    ones), or a member naming one field twice; other names are split_fields' to refuse."""
    run, init_ok = _Run(cfg, task_cfg), keywords(init)
    paths = config_paths.leaf_paths(run)
    full = {}
    for name in dict.fromkeys(n for m in members for n in m):
        group = _group(name, init_ok)
        if "." not in name and name not in init_ok and any(p.endswith(f".{name}") for p in paths):
            full[name] = config_paths.resolve(run, name)  # unique, or refused as ambiguous
        elif group in ("train", "task") and dataclasses.is_dataclass(getattr(run, group)) and name not in paths:
            sweepable = SWEEPABLE_TRAIN_FIELDS if group == "train" else _task_keywords(sample)
            raise ConfigError(f"{name}: {type(getattr(run, group)).__name__} has no field "
                              f"{name.partition('.')[2]!r}; sweepable {group} fields: {sweepable}")
        else:
            full[name] = name
    for m in members:
        if len({full[n] for n in m}) < len(m):
            twice = sorted(n for n in m if sum(full[o] == full[n] for o in m) > 1)
            raise ConfigError(f"a sweep member names a field twice: {twice}")
    return [{full[n]: v.item() if isinstance(v, np.generic) else v for n, v in m.items()} for m in members]


def split_fields(paths, sample: Sampler | None, init: Callable) -> dict[str, list[str]]:
    """Sorts swept paths into train / task / init groups; raises ConfigError naming unsweepable fields. sample=None
    (a loss with no batch): no task field is sweepable."""
    groups = {"train": [], "task": [], "init": []}
    task_ok, init_ok = _task_keywords(sample), keywords(init)
    for path in paths:
        group, name = _group(path, init_ok), path.partition(".")[2]
        if group == "train":
            if name not in SWEEPABLE_TRAIN_FIELDS:
                raise ConfigError(f"train.{name} cannot be swept (it changes shapes, the loop or the optimiser's code); "
                                  f"sweepable train fields: {SWEEPABLE_TRAIN_FIELDS}")
            groups["train"].append(name)
        elif group == "task":
            if sample is None:
                raise ConfigError(f"task.{name} cannot be swept: there is no sampler (sample=None), so no task field "
                                  f"reaches the loss")
            if name not in task_ok:
                raise ConfigError(f"task.{name} cannot be swept: the sampler {_name(sample)} does not take it as an "
                                  f"array keyword (it changes shapes or the sampling code); sweepable task fields: "
                                  f"{task_ok}")
            groups["task"].append(name)
        elif group == "init":
            groups["init"].append(path)
        else:
            raise ConfigError(f"{path} cannot be swept: it is neither a sweepable train field {SWEEPABLE_TRAIN_FIELDS}, "
                              f"a task field the sampler takes {task_ok}, nor a keyword of init {init_ok}")
    required = [p.name for p in list(inspect.signature(init).parameters.values())[1:]
                if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if unset := [n for n in required if n not in groups["init"]]:
        raise ConfigError(f"init's parameters {unset} have no default and no member sets them: give each member a "
                          f"value (e.g. {{{unset[0]!r}: ...}}) or init a default")
    return groups


def check_members(members: list[dict], cfg: TrainConfig, task_cfg) -> None:
    """Raises ConfigError unless every member sets the same fields to values its config accepts."""
    if not members:
        raise ConfigError("a sweep needs at least one member")
    if cfg.stop_loss:
        raise ConfigError(f"train.stop_loss={cfg.stop_loss}: stopping early is for single runs; a sweep trains "
                          "every member for train.steps (use stop_loss=0)")
    if any(set(m) != set(members[0]) for m in members):
        raise ConfigError(f"every sweep member must set the same fields, e.g. {sorted(members[0])}")
    task_paths = [p for p in members[0] if p.startswith("task.")]
    if task_paths and not dataclasses.is_dataclass(task_cfg):
        raise ConfigError(f"{task_paths[0]} cannot be swept: a swept task field needs a dataclass task_cfg (it is "
                          f"validated on it and sizes the batch from it), got {type(task_cfg).__name__}")
    for m in members:  # errors name the field; a path under neither train nor task is split_fields' to refuse
        member_config(_Run(cfg, task_cfg), {p: v for p, v in m.items() if p.partition(".")[0] in ("train", "task")})


def sampling_config(sample: Sampler, task_cfg, members: list[dict], task_arrays: dict[str, np.ndarray]):
    """The task config the sweep's sampler runs with; each member's values of the swept task fields reach it as array
    keywords (task_arrays: {field: [M] values}). A field takes its largest swept value where the config's value changes
    the sampler's traced program (a shape, a static branch, a constant: the context length, a pool's size), so that
    every member's value fits the shapes; any other field the first member's value, so that a config checking fields
    against each other (p + q <= 1) sees a combination a member has. Raises ConfigError where that config is invalid.
    """
    names = list(task_arrays)
    largest = [n for n in names if _changes_program(sample, task_cfg, members, n, task_arrays)]
    values = {n: max(m[f"task.{n}"] for m in members) if n in largest else members[0][f"task.{n}"] for n in names}
    try:
        return dataclasses.replace(task_cfg, **values)
    except ConfigError as e:
        raise ConfigError(f"the sweep samples with the task config's {values} (the largest swept value of {largest}, "
                          f"which change the sampler's program, the first member's of the others), which it refuses: "
                          f"{e}") from None


def _changes_program(sample: Sampler, task_cfg, members: list[dict], name: str, task_arrays: dict) -> bool:
    """Whether the config's value of the swept task field `name` changes the program the sampler traces to (or the
    arrays it closes over), the other fields and the keywords held: the config of a member with the largest value
    against that config with each other swept value it accepts. No such config to compare with: True."""
    top = max(m[f"task.{name}"] for m in members)
    member = next(m for m in members if m[f"task.{name}"] == top)
    base = dataclasses.replace(task_cfg, **{n: member[f"task.{n}"] for n in task_arrays})
    kwargs = {n: a[0] for n, a in task_arrays.items()} | ({"step": np.int32(0)} if takes_step(sample) else {})
    reference, others = _program(sample, base, kwargs), sorted({m[f"task.{name}"] for m in members} - {top})
    compared = False
    for value in others:
        try:
            other = dataclasses.replace(base, **{name: value})
        except ConfigError:
            continue
        if _program(sample, other, kwargs) != reference:
            return True
        compared = True
    return bool(others) and not compared


def _program(sample: Sampler, cfg, kwargs: dict) -> tuple:
    """The program sample(cfg, key, **kwargs) traces to and the values of the arrays it closes over (key data for
    PRNG keys), comparable with ==."""
    traced, consts = trace(lambda key, kw: sample(cfg, key, **kw), seed_key(0), kwargs)
    values = [np.asarray(jax.random.key_data(c) if jnp.issubdtype(c.dtype, jax.dtypes.prng_key) else c) for c in consts]
    return traced, tuple((v.shape, v.dtype.str, v.tobytes()) for v in values)


def check_init_fields(init: Callable, init_arrays: dict[str, np.ndarray]) -> None:
    """Raises ConfigError naming each swept keyword of init (init_arrays: {keyword: [M] values}) that init cannot
    take as a traced per-member scalar (a model size: a shape, a Python loop or branch), where it builds the first
    member's parameters from that member's values."""
    values, key = {n: a[0] for n, a in init_arrays.items()}, seed_key(0)
    for name in init_arrays:
        try:
            jax.eval_shape(lambda v: init(key, **(values | {name: v})), values[name])
        except (TypeError, ConfigError) as e:  # jax's concretization errors are TypeErrors; check_size refuses a tracer
            jax.eval_shape(lambda: init(key, **values))  # one that fails on the member's own values is init's own
            raise ConfigError(f"{name} cannot be swept: a sweep passes init each member's value as a traced array, "
                              f"and init needs a concrete one (for a shape, a Python loop or a branch: a model "
                              f"size); sweep keywords init computes with (e.g. init_scale), or run one sweep per "
                              f"value of {name}") from e


def check_takes_task_fields(evaluate: Callable, fields: list[str]) -> None:
    """Raises ConfigError unless evaluate takes every swept task field as a keyword (or **kwargs).

    A member is evaluated on its own task: evaluate(params, **{field: member's value}).
    """
    params = inspect.signature(evaluate).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    missing = [f for f in fields if f not in keywords(evaluate)]
    if missing:
        raise ConfigError(f"evaluate must take every swept task field as a keyword, so each member is evaluated on "
                          f"its own task; {getattr(evaluate, '__name__', evaluate)} does not take {missing} "
                          f"(add them, or **task_params, and pass them to the sampler)")


def member_arrays(members: list[dict], prefix: str, names: list[str]) -> dict[str, np.ndarray]:
    """{name: [M] values of member[prefix + name]}: int32 when every value is an int, else JAX's float (float64 under
    jax_enable_x64, where a lone run's Python floats are float64 too, else float32: the dtype the device holds, which
    a multi-process device_put compares across processes)."""
    out = {}
    for n in names:
        values = [m[f"{prefix}{n}"] for m in members]
        integers = all(isinstance(v, int) for v in values)
        if integers and not all(-2**31 <= v < 2**31 for v in values):
            raise ConfigError(f"{prefix}{n}: a swept integer must fit in int32 [-2**31, 2**31), got "
                              f"{[v for v in values if not -2**31 <= v < 2**31]}")
        out[n] = np.asarray(values, np.int32 if integers else jnp.result_type(float))
    return out


def swept_values(members: list[dict]) -> dict[str, list]:
    """{path: sorted distinct values} of the fields the members set."""
    return {path: sorted({m[path] for m in members}) for path in (members[0] if members else ())}


def mark_swept(config: dict, swept: dict[str, list]) -> dict:
    """A copy of a nested config dict where each swept dotted path holds {"swept": its values}.

    A sweep's stored config names what varies instead of passing one member's value off as the run's.
    """
    config = normalise_config(config)  # a copy as JSON stores it: numpy scalars as numbers
    for path, values in swept.items():
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = {"swept": list(values)}
    return config


@dataclasses.dataclass(frozen=True)
class _Run:
    train: TrainConfig
    task: object
