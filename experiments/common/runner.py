"""Runs one experiment into DIR/NAME/: config.json, metrics.jsonl, figures, result.json.

Matmul precision: JAX computes float32 matmuls in TF32 on recent NVIDIA GPUs and in one bfloat16 pass on TPUs
unless told otherwise; an experiment runs at float32 by default, since its checks compare trained models with closed
forms at float32 tolerances (gd_equivalence: Prop. 1's construction within 1e-4 of GD-1). On a CPU, XLA computed
float32 under every choice (an AMD EPYC: identical products and bitwise-identical training chunks).
"""

import dataclasses
import json
import os
import time

import jax

from experiments import registry
from jaxicl import outputs
from jaxicl.config_paths import apply_overrides, leaf_paths, resolve, value_at
from jaxicl.train.checkpoint import config_differences, continuing, latest_checkpoint
from jaxicl.train.sweep_fields import mark_swept
from jaxicl.train.sweep_spec import Axis, member_config, parse_axes, resolve_axes
from jaxicl.validation import ConfigError, check_choice

# "default": JAX's choice for the backend; "bfloat16" lowers to the same lax.Precision.DEFAULT as "default" (TF32 on
# recent NVIDIA GPUs, one bfloat16 pass on TPUs): config.json records the lowered precision beside the choice
MATMUL_PRECISIONS = ("float32", "tensorfloat32", "bfloat16", "default")


def resolve_config(name: str, preset: str, overrides: list[str]):
    """(the experiment's module, its config: the preset with the overrides); a stop at a loss (TrainConfig.stop_loss)
    only where the preset stops at one: the others train their train.steps, which their notes and checks state."""
    module = registry.load(name)
    if preset not in module.PRESETS:
        raise ConfigError(f"preset must be one of {tuple(module.PRESETS)}, got {preset!r}")
    cfg = apply_overrides(module.PRESETS[preset], overrides)
    for path in (p for p in leaf_paths(cfg) if p.rsplit(".", 1)[-1] == "stop_loss"):
        if value_at(cfg, path) and not value_at(module.PRESETS[preset], path):
            raise ConfigError(f"{path}={value_at(cfg, path)}: {name} trains for its train.steps (its notes and checks "
                              f"say so), not to a loss; leave {path}=0")
    return module, cfg


def sweep_axes(name: str, cfg, specs: list[str], overrides: list[str] = ()) -> tuple[Axis, ...]:
    """The --sweep axes resolved on the experiment's config, every field one it can sweep, set by no override (cfg's
    `overrides`, field=value), every value checked against its field (on the section the sweep trains), and no
    override of a field the sweep does not read (the module's SWEEP_IGNORES); ConfigError if it cannot sweep them."""
    module = registry.load(name)
    if not hasattr(module, "run_sweep"):
        raise ConfigError(f"experiment {name!r} does not support --sweep (its module has no run_sweep); "
                          f"sweepable: {[n for n in registry.EXPERIMENTS if hasattr(registry.load(n), 'run_sweep')]}")
    section = getattr(module, "SWEEP_SECTION", "")
    prefix = f"{section}." if section else ""
    base = value_at(cfg, section) if section else cfg
    sweepable = tuple(prefix + f for f in module.sweep_fields(base))
    axes = resolve_axes(cfg, parse_axes(specs))
    overridden = {resolve(cfg, o.partition("=")[0].strip()): o for o in overrides}
    for field, override in overridden.items():  # config.json would record the override, the sweep would ignore it
        for path, why in getattr(module, "SWEEP_IGNORES", {}).items():
            if field == path or field.startswith(f"{path}."):
                raise ConfigError(f"override {override} would be ignored: --sweep does not read {field} ({why}); "
                                  f"drop the override or run without --sweep")
    for spec, axis in zip(specs, axes):
        if axis.field in overridden:  # every member takes the axis' value: the override would be dropped
            raise ConfigError(f"override {overridden[axis.field]} and --sweep {spec} both set {axis.field}: the sweep "
                              f"would drop the override; give one of them")
        if axis.field not in sweepable:
            raise ConfigError(f"--sweep {spec}: {axis.field} cannot be swept by {name}; sweepable fields: {sweepable}")
        for value in axis.values:  # a member's own error does not say which axis set the value
            try:
                member_config(base, {axis.field.removeprefix(prefix): value})
            except ConfigError as e:
                raise ConfigError(f"--sweep {axis.field}={value}: {e.args[0]}") from None
    return axes


def check_out_dir(out_dir: str, sweep: list[str]) -> None:
    """ConfigError where out_dir (--out/NAME) or --out is not a directory, or out_dir holds a sweep and this is a
    single run or the other way round (their checkpoints, metrics and figures would mix)."""
    for path in (os.path.dirname(out_dir), out_dir):  # --out, then its experiment's directory
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"--out: {path} is a file, not a directory")
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        return
    held = json.load(open(path)).get("sweep") or []
    if bool(held) != bool(sweep):
        kind = f"a sweep (--sweep {' '.join(held)})" if held else "a single run"
        raise ConfigError(f"--out: {out_dir} holds {kind}; a {'sweep' if sweep else 'single run'} cannot share its "
                          f"directory (their checkpoints, metrics and figures would mix): use another --out")


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C: `restored` where it had written nothing, so out_dir holds the earlier run as it was;
    `continued`: the checkpoint directories it could go on from (jaxicl.train.checkpoint.continuing); `changed`: what
    its config changes from the one out_dir held ("field: earlier a vs now b"; none where out_dir held none)."""

    def __init__(self, out_dir: str, restored: bool, continued: frozenset[str], changed: tuple[str, ...]):
        super().__init__(out_dir, restored)
        self.out_dir, self.restored, self.continued, self.changed = out_dir, restored, continued, changed


def _restore(out_dir: str, previous: str | None, previous_result: str | None) -> None:
    """out_dir's config.json and result.json as they were before this run (none: removed where this run wrote one,
    and out_dir if empty)."""
    config_path, result_path = os.path.join(out_dir, "config.json"), os.path.join(out_dir, "result.json")
    if previous is not None:
        outputs.write_text(config_path, previous)
    elif outputs.is_primary() and os.path.exists(config_path):  # or no run at all
        os.remove(config_path)
        if not os.listdir(out_dir):
            os.rmdir(out_dir)
    if previous_result is not None:
        outputs.write_text(result_path, previous_result)


def checkpoint_stores(directory: str) -> list[str]:
    """The checkpoint directories (absolute) holding a checkpoint anywhere under directory: runs' checkpoints/, a
    sweep's checkpoints/chunk{k}/."""
    found = []
    for root, dirs, _ in os.walk(directory):
        if os.path.basename(root) == "checkpoints":
            stores = [os.path.join(root, d) for d in dirs if d.startswith("chunk")] or [root]
            found += [os.path.abspath(store) for store in stores if latest_checkpoint(store)]
            dirs.clear()  # the checkpoints' own folders
    return found


def interrupt_message(name: str, out: str, restored: bool, continued: frozenset[str] = frozenset(),
                      changed: tuple[str, ...] = ()) -> str:
    """What the same command does after experiment `name`, run under `out`, was stopped; `restored` where the run had
    written nothing in its folder, which holds the earlier run again. Its training resumes from the checkpoints in its
    folder (not where restored: those are the earlier run's) and in the folders beside it that it writes (SHARES)
    that the run could go on from (`continued`, RunInterrupted's), and from an earlier run's others where this command
    changes nothing of the config its folder held (`changed`, RunInterrupted's); where it changes something, the same
    command is refused at those made with another config (check_resumable, when it reaches them)."""
    out_dir = os.path.join(out, name)
    shared = [os.path.join(out, s) for s in getattr(registry.load(name), "SHARES", ())]
    looked = shared if restored else [out_dir, *shared]
    stores = {d: checkpoint_stores(d) for d in looked}
    saved = [d for d, found in stores.items() if any(s in continued or not changed for s in found)]
    unchecked = sorted({s.rsplit(f"{os.sep}checkpoints", 1)[0] for found in stores.values() for s in found
                        if s not in continued and changed})  # their runs' folders
    if restored:
        resumes = f"; the same command resumes its training from the last checkpoint under {', '.join(saved)}"
        text = f"{name} wrote nothing under {out_dir}: it holds the earlier run as it was{resumes if saved else ''}"
    elif saved:
        text = f"{name} resumes from its last checkpoint under {', '.join(saved)} (the same command)"
    elif not unchecked:
        return f"{name} saved no checkpoint under {', '.join(looked)}: the same command restarts it from step 0"
    else:
        text = ""
    if not unchecked:
        return text
    doubt = (f"the checkpoints under {', '.join(unchecked)} are an earlier run's, which this run had not reached, and "
             f"this command changes the config {out_dir} held ({'; '.join(changed)}): the same command stops at them "
             f"(\"cannot resume ...\") where they were made with another config; to train this one, use another --out "
             f"or delete their checkpoints/")
    return f"{text}; {doubt}" if text else f"{name}: {doubt}"


def _written_since(out_dir: str, since: float, besides: set[str]) -> bool:
    """Whether a file under out_dir (but those in `besides` and run locks) was modified at or after `since`."""
    for root, _, files in os.walk(out_dir):
        for f in files:
            path = os.path.join(root, f)
            if path not in besides and not f.startswith(".lock") and os.path.getmtime(path) >= since:
                return True
    return False


def _changes(previous: str | None, record: dict) -> tuple[str, ...]:
    """What config.json `record` changes from the one its folder held (`previous`, its text; None: none): in the
    config's fields and --matmul-precision, which the runs' checkpoints store."""
    if previous is None:
        return ()
    before = json.loads(previous)
    before = {"--matmul-precision": before.get("matmul_precision"), **before.get("config", {})}
    return tuple(config_differences(before, {"--matmul-precision": record["matmul_precision"], **record["config"]},
                                    "earlier"))


def run_experiment(name: str, preset: str, out: str, overrides: list[str] = (), sweep: list[str] = (),
                   matmul_precision: str = "float32") -> dict:
    """Runs experiment `name` with a preset and overrides; returns (and writes) its result dict.

    With sweep axes (strings field=values) it calls the module's run_sweep(cfg, axes, out_dir). Every matmul of the
    run is computed at `matmul_precision` (one of MATMUL_PRECISIONS); config.json records it and the
    lax.Precision its dots are lowered with ("matmul_lax_precision": HIGHEST, HIGH or DEFAULT).
    """
    check_choice("matmul_precision", matmul_precision, MATMUL_PRECISIONS)
    module, cfg = resolve_config(name, preset, list(overrides))
    axes = sweep_axes(name, cfg, list(sweep), list(overrides)) if sweep else ()
    out_dir = os.path.join(out, name)
    check_out_dir(out_dir, list(sweep))
    config = dataclasses.asdict(cfg)
    if axes:  # the swept fields hold {"swept": values}, not one member's value
        config = mark_swept(config, {a.field: list(a.values) for a in axes})
    config_path, result_path = os.path.join(out_dir, "config.json"), os.path.join(out_dir, "result.json")
    previous = open(config_path).read() if os.path.exists(config_path) else None
    # an earlier run's result.json is not this config's result: removed before config.json changes, since a run
    # killed by a signal Python does not see (SIGTERM, SIGKILL, the OOM killer) would leave it beside the new config
    previous_result = open(result_path).read() if os.path.exists(result_path) else None
    record = {"experiment": name, "preset": preset, "overrides": list(overrides), "sweep": list(sweep),
              "matmul_precision": matmul_precision, "matmul_lax_precision": jax.lax.Precision(matmul_precision).name,
              "config": config}
    if previous_result is not None and not checkpoint_stores(out_dir) and (changed := _changes(previous, record)):
        # a checkpoint of another config refuses a rerun (check_resumable); a run that saved none was replaced
        raise ConfigError(f"--out: {out_dir} holds a finished run of another config ({'; '.join(changed)}) and no "
                          f"checkpoint; this run would replace its result.json and figures: use another --out, or "
                          f"delete {out_dir} first")
    if previous_result is not None and outputs.is_primary():
        os.remove(result_path)
    written_from = time.time()  # this run's files are those written from here on (besides config.json and locks)
    try:
        outputs.write_json(config_path, record, indent=2)
    except BaseException:  # a value JSON cannot hold, a full disk, Ctrl-C: the earlier run's result.json goes back
        _restore(out_dir, previous, previous_result)
        raise
    start = time.perf_counter()
    with continuing() as continued:
        try:
            with jax.default_matmul_precision(matmul_precision):
                outcome = module.run_sweep(cfg, axes, out_dir) if axes else module.run(cfg, out_dir)
        except ConfigError:  # refused before training (a resume with another config): the directory holds the old run
            _restore(out_dir, previous, previous_result)
            raise
        except KeyboardInterrupt:  # before the run wrote anything (its resume check included), the directory is the
            # old run's: its config.json and result.json go back (a rerun with another config, stopped there, left
            # its own config.json beside the old run's checkpoints, and the same command was then refused)
            restored = not _written_since(out_dir, written_from, {config_path})
            if restored:
                _restore(out_dir, previous, previous_result)
            raise RunInterrupted(out_dir, restored, frozenset(continued), _changes(previous, record)) from None
    result = {"experiment": name, "preset": preset, "checks": [c.as_dict() for c in outcome.checks],
              "figures": outcome.figures, "wall_seconds": round(time.perf_counter() - start, 2)}
    outputs.write_json(result_path, result, indent=2)
    return result
