"""`python -m experiments all --jobs N`: experiments in child processes, N at a time."""

import json
import os
import sys

import pytest

from experiments import registry
from experiments.cli import main
from experiments.common import parallel

CHEAP = ("ar_fig3_unitary", "ar_fig3_orthogonal")  # two smoke runs of a few seconds


def schedule(names: list[str], jobs: int) -> list[tuple[str, set[str]]]:
    """(experiment started, the experiments running beside it) in the order next_runnable starts them, where the
    running experiment that started first always ends first."""
    pending, running, started = parallel.start_order(names), [], []
    while pending or running:
        while len(running) < jobs and (name := parallel.next_runnable(pending, set(running))) is not None:
            pending.remove(name)
            started.append((name, set(running)))
            running.append(name)
        running.pop(0)
    return started


def test_the_longest_start_first_and_experiments_that_write_the_same_folders_run_one_after_another():
    names = list(registry.EXPERIMENTS)
    started = schedule(names, 2)
    assert sorted(n for n, _ in started) == sorted(names)
    assert [n for n, _ in started[:2]] == ["abstractions_lea", "abstractions_training"]
    for name, beside in started:  # never beside one that writes its folders (a brute-force check of the rule)
        assert all(not parallel.folders(name) & parallel.folders(other) for other in beside)
    shared = [n for n, _ in started if "abstractions_training" in parallel.folders(n)]
    assert shared == ["abstractions_training", "abstractions_geometry", "abstractions_manipulation"]
    assert parallel.start_order(names) == [*parallel.LONGEST_FIRST,
                                           *(n for n in names if n not in parallel.LONGEST_FIRST)]
    assert parallel.next_runnable(["abstractions_geometry", "abstractions_lea"], {"abstractions_training"}) == \
        "abstractions_lea"


def test_two_at_a_time_gives_the_results_one_after_another_gives_and_the_same_report(tmp_path, monkeypatch,
                                                                                       capsys):
    monkeypatch.setattr(registry, "EXPERIMENTS", {n: registry.EXPERIMENTS[n] for n in CHEAP})
    assert main(["all", "--preset", "smoke", "--out", str(tmp_path / "seq")]) == 0
    assert main(["all", "--preset", "smoke", "--out", str(tmp_path / "par"), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    for name in CHEAP:
        seq, par = (json.loads((tmp_path / d / name / "result.json").read_text()) for d in ("seq", "par"))
        assert [c["name"] for c in par["checks"]] == [c["name"] for c in seq["checks"]]
        assert [c["passed"] for c in par["checks"]] == [c["passed"] for c in seq["checks"]]
        # the same program on the same machine; 1e-5: float32 rounding, were XLA to split a reduction otherwise
        assert [c["value"] for c in par["checks"]] == pytest.approx([c["value"] for c in seq["checks"]], rel=1e-5)
        assert par["figures"] == seq["figures"]
        assert f"== {name} (smoke) started: {tmp_path / 'par' / 'logs' / name}.log" in printed
        assert f"{par['wall_seconds']:.0f} s -> {tmp_path / 'par'}/{name}/result.json" in printed
        for c in par["checks"]:
            assert f"[{'pass' if c['passed'] else 'FAIL'}] {c['name']} = {c['value']} (target {c['target']})" in printed
    report = (tmp_path / "par" / "report.md").read_text()
    assert report.index(f"## {CHEAP[0]}") < report.index(f"## {CHEAP[1]}")  # the registry's order
    checks = [c for name in CHEAP for c in json.loads((tmp_path / "par" / name / "result.json").read_text())["checks"]]
    assert (f"2 experiments ran, 0 raised; {sum(c['passed'] for c in checks)}/{len(checks)} checks passed. They ran "
            "2 at a time (--jobs), so their wall times overlap.") in report


def test_each_child_gets_its_share_of_the_cores_for_numpys_threads_unless_they_are_set(monkeypatch):
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(5)), raising=False)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    assert [parallel.child_env(jobs)["OPENBLAS_NUM_THREADS"] for jobs in (1, 2, 5, 8)] == ["5", "2", "1", "1"]
    assert parallel.child_env(2)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    env = parallel.child_env(2)
    assert env["OPENBLAS_NUM_THREADS"] == "3" and env["PYTHONPATH"].split(os.pathsep)[0] == parallel.ROOT


def fake_children(monkeypatch, scripts: dict[str, str]) -> None:
    """Each experiment's child runs the Python code scripts[name] instead of the experiment."""
    monkeypatch.setattr(registry, "EXPERIMENTS", {n: registry.EXPERIMENTS[n] for n in scripts})
    monkeypatch.setattr(parallel, "child_command", lambda name, *_: [sys.executable, "-c", scripts[name]])


def result_writer(out, name: str) -> str:
    """Code that writes a result.json with one passed check for `name` under out."""
    result = {"experiment": name, "preset": "smoke", "checks": [{"name": "c", "value": 1.0, "target": "> 0",
                                                                  "passed": True, "note": ""}],
              "figures": [], "wall_seconds": 0.5}
    return (f"import json, os; os.makedirs({str(out / name)!r}, exist_ok=True); "
            f"json.dump({result!r}, open({str(out / name / 'result.json')!r}, 'w'))")


def test_a_failing_experiment_is_reported_with_its_log_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    fake_children(monkeypatch, {"gd_equivalence": "print('training'); raise RuntimeError('boom')",
                                "ar_gd_step": result_writer(tmp_path, "ar_gd_step")})
    assert main(["all", "--preset", "smoke", "--out", str(tmp_path), "--jobs", "2"]) == 1
    err = capsys.readouterr().err
    assert "== gd_equivalence failed (exit code 1; " in err and "RuntimeError: boom" in err
    report = (tmp_path / "report.md").read_text()
    assert "1 experiments ran, 1 raised; 1/1 checks passed." in report
    assert "| gd_equivalence | raised | - |" in report and "training\n" in report and "RuntimeError: boom" in report


def test_ctrl_c_waits_for_the_children_and_prints_where_each_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C reaches the children too; each prints its "interrupted:" line (here: does so and exits at once)."""
    line = "interrupted: gd_equivalence resumes from its last checkpoint under x (the same command)"
    fake_children(monkeypatch, {"gd_equivalence": f"import sys; print({line!r}, file=sys.stderr); sys.exit(130)"})
    monkeypatch.setattr(parallel, "sleep", lambda s: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["all", "--preset", "smoke", "--out", str(tmp_path), "--jobs", "2"]) == 130
    assert f"\n{line}\n" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()
