"""python -m experiments {list | all | NAME} [--preset P] [--out DIR] [field=value ...] [--sweep AXIS ...]
   python -m experiments list NAME [--preset P] [field=value ...]
   python -m experiments sweep-report DIR

`all --jobs N` runs N experiments at a time, each in its own process (experiments.common.parallel).

`list NAME` prints every field of NAME's config (dotted paths, as overrides and sweep axes name them) with its
value under the preset and the overrides, without running anything.

--sweep trains a grid of members in one vmapped program (experiments with a run_sweep); each AXIS
is field=v1,v2 | field=start:stop[:step] | field=log:lo:hi:n | field=lin:lo:hi:n, e.g.
`python -m experiments gd_equivalence train.steps=500 --sweep lr=1e-4,3e-4,1e-3 seed=0:8`
(overrides go before --sweep). sweep-report regenerates the tables and plots of every sweep under DIR."""

import argparse
import os
import sys
import traceback

import jax

from experiments import registry
from experiments.common import parallel
from experiments.common.report import print_checks, write_report
from experiments.common.runner import (MATMUL_PRECISIONS, RunInterrupted, check_out_dir, interrupt_message,
                                       resolve_config, run_experiment, sweep_axes)
from experiments.common.sweep_report import find_sweeps, write_sweep_report
from jaxicl import distributed
from jaxicl.config_paths import leaf_paths, value_at
from jaxicl.train.sweep_spec import parse_axes
from jaxicl.validation import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="an experiment name, 'all' (every experiment, then report.md), 'list' [NAME] or "
                               "'sweep-report' DIR")
    p.add_argument("overrides", nargs="*", help="config overrides field=value; nested: train.lr=1e-3")
    p.add_argument("--preset", default="quick", choices=registry.PRESET_NAMES)
    p.add_argument("--out", default="results", help="output directory (default: results)")
    p.add_argument("--matmul-precision", default="float32", choices=MATMUL_PRECISIONS,
                   help="float32 matmuls computed in float32 (default), TF32 (GPU) or JAX's default for the backend "
                        "(TF32 on recent NVIDIA GPUs, one bfloat16 pass on TPUs); bfloat16 is that same default "
                        "(lax.Precision.DEFAULT: TF32, not bfloat16, on a GPU); on a CPU, XLA computed float32 under "
                        "each")
    p.add_argument("--jobs", type=int, default=1,
                   help="with 'all': run this many experiments at a time, each in its own process printing to "
                        "OUT/logs/NAME.log (default 1: one after another, in this process); for CPUs")
    distributed.add_arguments(p)
    p.add_argument("--sweep", nargs="+", action="extend", default=[], metavar="AXIS",
                   help="sweep axes field=values (lists a,b | ranges 0:8 | log:lo:hi:n | lin:lo:hi:n)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # overrides may follow options; --sweep takes the rest
    if error := _jobs_error(args):  # before --distributed's initialisation, which --jobs cannot run under
        print(f"error: {error}", file=sys.stderr)
        return 2
    distributed.initialize(args)  # before any other JAX work
    if args.name == "list":
        if args.sweep:  # was ignored: the config listed without its axes
            print("error: list shows one config; --sweep runs one member per value (list NAME with overrides shows a "
                  "member's config)", file=sys.stderr)
            return 2
        return _list(args.overrides, args.preset)
    if args.name == "sweep-report":
        return _sweep_report(args.overrides)
    names = list(registry.EXPERIMENTS) if args.name == "all" else [args.name]
    try:
        if args.sweep and args.name == "all":
            raise ConfigError("--sweep needs one experiment name, not 'all'")
        if args.overrides and args.name == "all":  # the experiments' configs have different fields
            raise ConfigError(f"overrides {args.overrides} need one experiment name, not 'all'")
        for name in names:  # fail on a bad name, preset, override, sweep axis or --out before running anything
            _, cfg = resolve_config(name, args.preset, args.overrides)
            if args.sweep:
                sweep_axes(name, cfg, args.sweep, args.overrides)
            check_out_dir(os.path.join(args.out, name), args.sweep)
    except (ConfigError, KeyError) as e:
        print(f"error: {e.args[0]}{_one_value_hint(args.sweep)}", file=sys.stderr)
        return 2
    if args.jobs > 1:
        results, errors, interrupted = parallel.run_all(names, args.preset, args.out, args.matmul_precision, args.jobs)
        if interrupted:
            return 130
        print(f"report: {write_report(args.out, args.preset, results, errors, args.jobs)}")
        return 1 if errors else 0
    results, errors = [], {}
    for name in names:
        print(f"== {name} ({args.preset})", flush=True)
        try:
            result = run_experiment(name, args.preset, args.out, args.overrides, sweep=args.sweep,
                                    matmul_precision=args.matmul_precision)
        except KeyboardInterrupt as e:  # RunInterrupted where run_experiment's run was stopped
            how = (e.restored, e.continued, e.changed) if isinstance(e, RunInterrupted) else (False,)
            print(f"\ninterrupted: {interrupt_message(name, args.out, *how)}", file=sys.stderr)
            return 130
        except ConfigError as e:  # e.g. a swept field the experiment's sampler or model cannot vary
            print(f"error: {e.args[0]}{_one_value_hint(args.sweep)}", file=sys.stderr)
            if args.name != "all":
                return 2
            errors[name] = traceback.format_exc()
            continue
        except Exception:  # noqa: BLE001 - one failing experiment must not hide the others' results
            if args.name != "all":
                raise
            errors[name] = traceback.format_exc()
            print(errors[name], file=sys.stderr)
            continue
        results.append(result)
        print_checks(result, args.out)
    if args.name == "all" and jax.process_index() == 0:
        print(f"report: {write_report(args.out, args.preset, results, errors)}")
    return 1 if errors else 0


def _jobs_error(args) -> str | None:
    """What is wrong with --jobs: not a positive count, or above 1 with one experiment or under --distributed."""
    if args.jobs < 1:
        return f"--jobs must be >= 1, got {args.jobs}"
    if args.jobs > 1 and args.name != "all":
        return f"--jobs {args.jobs} runs several experiments at a time: it needs 'all', not {args.name!r}"
    if args.jobs > 1 and args.distributed:
        return (f"--jobs {args.jobs} starts its own processes on this host: it cannot run under --distributed "
                "(use --jobs 1)")
    return None


def _one_value_hint(specs: list[str]) -> str:
    """For an error of a command with one-value sweep axes: they may be overrides typed after --sweep."""
    try:
        single = [spec for spec, axis in zip(specs, parse_axes(specs)) if len(axis.values) == 1]
    except ConfigError:
        return ""
    return f" ({' '.join(single)}: one value; overrides go before --sweep)" if single else ""


def _list(argv: list[str], preset: str) -> int:
    """Every experiment with its summary line; with a name (argv[0]), that experiment's config fields and values
    under the preset and the overrides argv[1:]."""
    if not argv:
        for name in registry.EXPERIMENTS:
            doc = (registry.load(name).__doc__ or "").strip().splitlines()
            print(f"{name:28s} {doc[0] if doc else ''}")
        return 0
    try:
        _, cfg = resolve_config(argv[0], preset, argv[1:])
    except (ConfigError, KeyError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    print(f"{argv[0]} --preset {preset}{''.join(' ' + a for a in argv[1:])}:")
    for path in leaf_paths(cfg):
        print(f"  {path} = {value_at(cfg, path)!r}")
    return 0


def _sweep_report(dirs: list[str]) -> int:
    if len(dirs) != 1:
        print("error: usage: python -m experiments sweep-report DIR", file=sys.stderr)
        return 2
    if not os.path.isdir(dirs[0]):
        print(f"error: {dirs[0]} is not a directory", file=sys.stderr)
        return 2
    found = find_sweeps(dirs[0])
    if not found:
        print(f"error: no sweep.json under {dirs[0]}", file=sys.stderr)
        return 2
    for d in found:
        files = write_sweep_report(d)
        print(f"{d}: {', '.join(files)}")
    return 0
