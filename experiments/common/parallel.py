"""`python -m experiments all --jobs N`: N experiments at a time, each in its own process (the CLI on one name).

On a CPU, one experiment keeps both cores of a 2-core machine busy only part of the time (compilation is
single-threaded, and so is much of an analysis), so two at a time finish the quick reproduction sooner. Each child
writes what it prints to OUT/logs/NAME.log; this process prints when each starts and, when it ends, its checks as
the sequential run does, then writes report.md in the registry's order. The longest start first (LONGEST_FIRST), the
others follow in the registry's order; experiments whose runs write the same folders (their own and their SHARES, e.g.
the abstractions analyses and the model they share) run one after another, in that order. Ctrl-C reaches every
child (one process group): each stops as a lone run does, and once all have exited their "interrupted:" lines (where
the same command resumes) are printed here. Meant for CPUs: on a GPU each process would reserve most of the device's
memory.
"""

import json
import os
import subprocess
import sys
from time import sleep

from experiments import registry
from experiments.common.report import print_checks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the folder of `experiments`
POLL_SECONDS = 0.2
# started before the others, which follow in the registry's order: the longest quick runs (438 and 250 s of the
# quick reproduction's 1,357 on a 2-core AMD EPYC, Zen 3), which in the registry's order started last, after 11
# minutes, and ran on alone at the end. make reproduce took 22:07 so, 20:15 with these first, 23:21 one at a time
LONGEST_FIRST = ("abstractions_lea", "abstractions_training")


def start_order(names: list[str]) -> list[str]:
    """names with those in LONGEST_FIRST first (in its order), the others after them in their order."""
    first = [n for n in LONGEST_FIRST if n in names]
    return first + [n for n in names if n not in first]


def folders(name: str) -> set[str]:
    """The folders under --out that experiment `name`'s run writes: its own and its SHARES."""
    return {name, *getattr(registry.load(name), "SHARES", ())}


def next_runnable(pending: list[str], running: set[str]) -> str | None:
    """The first of `pending` (in order) that writes no folder an earlier pending or a running experiment writes."""
    taken = set().union(*(folders(n) for n in running))
    for name in pending:
        if not folders(name) & taken:
            return name
        taken |= folders(name)  # a later one sharing its folders waits for it: the registry's order holds
    return None


def child_command(name: str, preset: str, out: str, matmul_precision: str) -> list[str]:
    """The command that runs experiment `name` alone."""
    return [sys.executable, "-m", "experiments", name, "--preset", preset, "--out", out,
            "--matmul-precision", matmul_precision]


def child_env(jobs: int) -> dict[str, str]:
    """This environment, with `experiments` importable from ROOT, progress bars redrawn every 30 s (in a log) and,
    unless set, numpy's OpenBLAS on this process's cores over `jobs` threads (at least 1). OpenBLAS's threads wait
    for work spinning: abstractions_geometry's quick run, beside a 2-thread XLA loop on 2 cores, took 114 s with its
    default 2 threads and 81 s with 1 (alone: 64 and 57 s)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = str(max(1, cores // jobs))
    return {"OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, **os.environ, "PYTHONPATH": path,
            "TQDM_MININTERVAL": "30"}


def _interrupted_lines(log: str) -> list[str]:
    """The "interrupted: ..." lines a child printed before exiting on Ctrl-C."""
    with open(log) as f:
        return [line.rstrip("\n") for line in f if line.startswith("interrupted:")]


def run_all(names: list[str], preset: str, out: str, matmul_precision: str,
            jobs: int) -> tuple[list[dict], dict[str, str], bool]:
    """Runs `names` (registry order) `jobs` at a time. Returns the result dicts in `names`' order, {name: its log's
    tail} for those that failed, and whether Ctrl-C stopped the run (after every running child exited)."""
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    pending, running, results, errors = start_order(names), {}, {}, {}
    try:
        while pending or running:
            while len(running) < jobs and (name := next_runnable(pending, set(running))) is not None:
                pending.remove(name)
                log = os.path.join(logs, f"{name}.log")
                with open(log, "w") as f:
                    running[name] = subprocess.Popen(child_command(name, preset, out, matmul_precision),
                                                     env=child_env(jobs), stdout=f, stderr=subprocess.STDOUT)
                print(f"== {name} ({preset}) started: {log}", flush=True)
            sleep(POLL_SECONDS)
            for name, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    done = f"{len(results) + len(errors) + 1}/{len(names)}"
                    if proc.returncode == 0:
                        results[name] = _read_result(out, name)
                        print(f"== {name} done ({done})", flush=True)
                        print_checks(results[name], out)
                    else:
                        errors[name] = _tail(os.path.join(logs, f"{name}.log"))
                        print(f"== {name} failed (exit code {proc.returncode}; {done}):\n{errors[name]}",
                              file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        for name, proc in running.items():  # each got the Ctrl-C too: it saves where it is and exits
            _wait_through_interrupts(proc)
            for line in _interrupted_lines(os.path.join(logs, f"{name}.log")):
                print(f"\n{line}", file=sys.stderr)
        return [], {}, True
    return [results[n] for n in names if n in results], {n: errors[n] for n in names if n in errors}, False


def _wait_through_interrupts(proc: subprocess.Popen) -> None:
    """Waits for proc to exit; a second Ctrl-C reaches it too (as it does a lone run) and this goes on waiting."""
    while True:
        try:
            proc.wait()
            return
        except KeyboardInterrupt:
            continue


def _read_result(out: str, name: str) -> dict:
    with open(os.path.join(out, name, "result.json")) as f:
        return json.load(f)


def _tail(log: str, lines: int = 40) -> str:
    """The last `lines` lines of a child's log (a traceback's end)."""
    with open(log, errors="replace") as f:
        return "".join(f.readlines()[-lines:])
