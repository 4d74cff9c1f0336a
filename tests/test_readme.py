"""README.md is executed: every Python block as written, and every `python -m experiments` line a CPU
runs in seconds (with the smoke preset), so a README that drifts from the code fails CI."""

import json
import math
import re
import shlex
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import registry
from experiments.cli import main
from jaxicl.train.sweep_spec import grid, parse_axes

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README.read_text(), re.S)
ACCELERATOR_ONLY = ("--preset full", "--distributed", "python -m experiments all")


def cli_lines() -> list[str]:
    lines = [line.split("#")[0].strip() for lang, body in BLOCKS if lang == "sh" for line in body.splitlines()]
    return [line for line in lines if line.startswith("python -m experiments ")
            and not any(a in line for a in ACCELERATOR_ONLY)]


def smoke_argv(line: str) -> list[str]:
    """The line's arguments with the smoke preset in place of any other."""
    argv = shlex.split(line)[3:]
    if "--preset" in argv:
        argv[argv.index("--preset") + 1] = "smoke"
    else:
        argv += ["--preset", "smoke"]
    return argv


def test_the_readme_has_the_blocks_this_test_runs():
    assert sum(lang == "python" for lang, _ in BLOCKS) >= 1
    lines = cli_lines()
    assert any(line.split()[3] == "list" for line in lines)
    assert any("=" in line and "--sweep" not in line for line in lines)  # an override
    assert any("--sweep" in line for line in lines) and any("sweep-report" in line for line in lines)


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "python"])
def test_python_block_runs_as_written(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the tour writes runs/ in the working directory
    try:
        exec(compile(BLOCKS[index][1], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    finally:
        # JAX 0.12's caches keep what the tour computes with trained (portable, Auto-mesh) parameters outside a mesh:
        # afterwards an eager broadcast of an unsharded [1] array under jax.set_mesh(data_mesh(4)) raised "context
        # mesh Explicit should match the aval mesh Auto", which failed a later test run in this worker (worksteal)
        jax.clear_caches()
    printed = capsys.readouterr().out
    assert printed.strip()  # every block prints what it shows
    numbers = re.findall(r"[-+]?\d*\.\d+(?:e[-+]?\d+)?|\bnan\b|\binf\b", printed)
    assert all(math.isfinite(float(v)) for v in numbers), printed


def line_groups() -> list[list[str]]:
    """The CLI lines in groups that run on their own (in parallel under xdist): each line alone, except that a
    sweep-report line runs after the sweep lines before it, whose results it reads."""
    groups: list[list[str]] = []
    for line in cli_lines():
        if smoke_argv(line)[0] == "sweep-report":
            sweeps = [g for g in groups if "--sweep" in g[0]]
            groups = [g for g in groups if "--sweep" not in g[0]] + [[x for g in sweeps for x in g] + [line]]
        else:
            groups.append([line])
    return groups


def test_the_line_groups_hold_every_line_once():
    assert sorted(x for g in line_groups() for x in g) == sorted(cli_lines())


@pytest.mark.parametrize("lines", line_groups(), ids=lambda g: smoke_argv(g[-1])[0] + f"-{len(g)}")
def test_cli_lines_run_with_the_smoke_preset(lines, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for line in lines:
        argv = smoke_argv(line)
        assert main(argv) == 0, line
        out = capsys.readouterr().out
        name = argv[0]
        if name == "list" and argv[1] in registry.EXPERIMENTS:  # one experiment's fields and values
            assert out.splitlines()[0].startswith(f"{argv[1]} --preset smoke") and "  train.lr = " in out
        elif name == "list":
            assert [row.split()[0] for row in out.splitlines()] == list(registry.EXPERIMENTS)
        elif name == "sweep-report":
            assert "sweep_seeds.md" in out
        else:
            check_run(tmp_path / (argv[argv.index("--out") + 1] if "--out" in argv else "results") / name, argv)


def check_run(run_dir: Path, argv: list[str]) -> None:
    """The outputs of one experiment run: finite checks, the line's overrides in its config, PNG figures,
    the metrics; a plain smoke run (no overrides) passes every check, a sweep has every member of its grid."""
    result = json.loads((run_dir / "result.json").read_text())
    assert result["experiment"] == argv[0] and result["preset"] == "smoke" and result["checks"]
    assert set(result) == {"experiment", "preset", "checks", "figures", "wall_seconds"}
    assert all(isinstance(c["value"], (int, float)) and math.isfinite(c["value"]) for c in result["checks"])
    for fig in result["figures"]:
        assert (run_dir / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = argv[argv.index("--sweep") + 1:] if "--sweep" in argv else []
    sweep = [a for a in sweep[:sweep.index("--preset")] if "=" in a] if "--preset" in sweep else sweep
    overrides = [a for a in argv[1:] if "=" in a and a not in sweep]
    config = json.loads((run_dir / "config.json").read_text())["config"]
    for assignment in overrides:  # every override of the line reached the run's config
        path, value = assignment.split("=")
        node = config
        for part in path.split("."):
            node = node[part]
        assert np.isclose(float(node), float(value)), (argv, path, node)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "eval"}
    if sweep:
        members = json.loads((run_dir / "sweep.json").read_text())["members"]
        assert len(members) == len(grid(parse_axes(sweep)))
    elif not overrides:
        assert all(c["passed"] for c in result["checks"]), result["checks"]
