"""README.md is executed: every Python block as written, each print whose comment states a value showing that
value (print_mismatches), and every `python -m experiments` line a CPU runs in seconds (with the smoke preset), so a
README that drifts from the code fails CI."""

import ast
import builtins
import io
import json
import math
import re
import shlex
import sys
import tokenize
from collections import defaultdict
from decimal import Decimal
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


def is_number_literal(node: ast.expr) -> bool:
    """node is a number (possibly negative), or a tuple or list of such."""
    if isinstance(node, (ast.Tuple, ast.List)):
        return all(map(is_number_literal, node.elts))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def stated_values(source: str) -> dict[int, tuple[ast.expr, str]]:
    """The values a block's comments state for its prints, by line: (the value's syntax tree, its text). A print
    states one where the call fits on its line and the line's comment starts with a number, or a tuple or list of
    numbers, followed by ':' or nothing (`print(x.shape)  # (64, 4, 16, 16): heads`); any other comment states none."""
    comments = {tok.start[0]: tok.string[1:].split(":")[0].strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    prints = {node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Name) and node.func.id == "print" and node.lineno == node.end_lineno}
    stated = {}
    for line in sorted(prints & comments.keys()):
        try:
            value = ast.parse(comments[line], mode="eval").body
        except SyntaxError:
            continue
        if is_number_literal(value):
            stated[line] = value, comments[line]
    return stated


def run_block(source: str, name: str) -> dict[int, list[str]]:
    """Runs source as written, its prints printing; returns the text of each print's first argument (as print
    writes it), by the line of the block that printed it."""
    printed = defaultdict(list)

    def recording_print(*args, **kwargs):
        caller = sys._getframe(1)
        if caller.f_code.co_filename == name and args:
            printed[caller.f_lineno].append(str(args[0]))
        builtins.print(*args, **kwargs)

    exec(compile(source, name, "exec"), {"__name__": "__readme__", "print": recording_print})
    return printed


def agrees(stated: ast.expr, text: str, printed: ast.expr) -> bool:
    """The printed value (a syntax tree) has the stated one (a tree of the comment's `text`): tuples and lists element
    by element, an int exactly, a float to the digits the comment writes (within half a unit of its last digit: `1.0`
    takes 0.95 to 1.05), as the comment is the printed number rounded."""
    if isinstance(stated, (ast.Tuple, ast.List)):
        return (type(printed) is type(stated) and len(printed.elts) == len(stated.elts)
                and all(agrees(s, text, p) for s, p in zip(stated.elts, printed.elts)))
    want = ast.literal_eval(stated)
    try:
        got = ast.literal_eval(printed)
    except ValueError:
        return False
    if type(want) is int:
        return type(got) is int and got == want
    tolerance = Decimal(5).scaleb(Decimal(ast.get_source_segment(text, stated)).as_tuple().exponent - 1)
    return type(got) in (int, float) and abs(Decimal(repr(got)) - Decimal(repr(want))) <= tolerance


def print_mismatches(source: str, printed: dict[int, list[str]]) -> list[str]:
    """Every print of source whose stated value (stated_values) is not what it printed (run_block's `printed`): its
    first argument's text, read as a Python literal, must agree with the value (agrees), and the line must have
    printed exactly once (a print in a loop, or one not reached, states no single value)."""
    problems = []
    for line, (value, text) in stated_values(source).items():
        texts = printed.get(line, [])
        if len(texts) != 1:
            problems.append(f"line {line} printed {len(texts)} times; its comment states one value, {text}")
            continue
        try:
            shown = ast.parse(texts[0], mode="eval").body
        except SyntaxError:
            shown = None
        if shown is None or not agrees(value, text, shown):
            problems.append(f"line {line} printed {texts[0]}, its comment states {text}")
    return problems


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "python"])
def test_python_block_runs_as_written_and_prints_what_its_comments_state(index, tmp_path, monkeypatch, capsys):
    """The block runs, and each print whose comment states a value prints it. The rule (stated_values,
    print_mismatches): a print(...) on one line whose comment starts with a number, or a tuple or list of numbers,
    followed by ':' or nothing (`# (64, 4, 16, 16): heads`), prints that value as its first argument, exactly once
    (a print in a loop states no value); tuples, lists and ints agree exactly, a float to the digits the comment
    writes. Prints are found by their line in the block, not by their order in the output."""
    monkeypatch.chdir(tmp_path)  # the tour writes runs/ in the working directory
    source = BLOCKS[index][1]
    try:
        printed_by_line = run_block(source, f"README.md python block {index}")
    finally:
        # JAX 0.12's caches keep what the tour computes with trained (portable, Auto-mesh) parameters outside a mesh:
        # afterwards an eager broadcast of an unsharded [1] array under jax.set_mesh(data_mesh(4)) raised "context
        # mesh Explicit should match the aval mesh Auto", which failed a later test run in this worker (worksteal)
        jax.clear_caches()
    printed = capsys.readouterr().out
    assert stated_values(source), "every README python block states what one of its prints shows"
    assert print_mismatches(source, printed_by_line) == [], printed
    numbers = re.findall(r"[-+]?\d*\.\d+(?:e[-+]?\d+)?|\bnan\b|\binf\b", printed)
    assert all(math.isfinite(float(v)) for v in numbers), printed


def test_a_print_that_shows_another_value_than_its_comment_states_is_reported():
    source = ("import numpy as np\n"
              "print(np.zeros((2, 3)).shape)  # (3, 2): a wrong shape\n"
              "print(np.zeros((2, 3)).shape, 'x')  # (2, 3): the first argument's\n"
              "print(0.123456)  # 0.12: to two decimals\n"
              "print(0.126)  # 0.12\n"
              "print(-3)  # [-3]: a list is not a number\n"
              "print(np.arange(2))  # [0, 1]: numpy prints [0 1]\n"
              "for i in range(2):\n"
              "    print(i)  # 0: printed twice\n"
              "print(7)  # seven: states no value\n"
              "print(3)  # 3.0\n")
    assert list(stated_values(source)) == [2, 3, 4, 5, 6, 7, 9, 11]
    assert print_mismatches(source, run_block(source, "synthetic block")) == [
        "line 2 printed (2, 3), its comment states (3, 2)",
        "line 5 printed 0.126, its comment states 0.12",
        "line 6 printed -3, its comment states [-3]",
        "line 7 printed [0 1], its comment states [0, 1]",
        "line 9 printed 2 times; its comment states one value, 0",
    ]


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
