"""The benchmarks at their smoke sizes: well-formed tables, the PyTorch agreement check (where the PyTorch
environment exists) and its refusal to time implementations that disagree, the numpy samplers' shapes."""

import contextlib
import dataclasses
import glob
import hashlib
import importlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
import types

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import __main__ as runner
from benchmarks import output, sampler_throughput, vs_torch
from jaxicl.models.gpt import SPLIT_FROM
from jaxicl.prng import PRNG_IMPLS
from jaxicl.tasks import linear_regression as lr
from jaxicl.tasks import sample_batch
from jaxicl.tasks.batching import takes_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = os.path.exists(vs_torch.TORCH_PYTHON)


def no_constant(name: str):
    """json.loads' parse_constant: standard JSON has no NaN, Infinity or -Infinity."""
    raise ValueError(f"{name} is not standard JSON")


def rows(path) -> list[dict]:
    data = json.loads(open(path).read(), parse_constant=no_constant)
    assert data["environment"]["backend"] == "cpu"
    return data["rows"]


def committed_results() -> dict[str, str]:
    """The sha256 of every file under the tree's benchmarks/results, by its path there."""
    paths = [os.path.join(d, f) for d, _, files in os.walk(output.RESULTS) for f in files]
    return {os.path.relpath(p, output.RESULTS): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


@pytest.fixture(autouse=True)
def smoke_runs_write_under_tmp_path(tmp_path, monkeypatch):
    """A smoke run without --out makes its temporary directory under tmp_path (in this process and in the benchmarks
    it starts), and no test changes, adds or removes a file under the tree's benchmarks/results."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    before = committed_results()
    yield
    assert committed_results() == before


def smoke_dir(tmp_path, printed: str):
    """The one directory that smoke runs without --out made (under tmp_path, by the fixture above), as they said."""
    (made,) = tmp_path.glob("jaxicl-benchmarks-smoke-*")
    assert f"--smoke without --out: writing into {made} (not {output.RESULTS})\n" in printed
    return made


def assert_smoke(directory, name: str) -> None:
    """NAME.json and NAME.md in directory say they are a smoke run's."""
    assert json.loads((directory / f"{name}.json").read_text())["smoke"] is True
    assert (directory / f"{name}.md").read_text().splitlines()[0] == f"# {name} ({output.SMOKE_NOTE})"


def test_smoke_gpt_prompts_take_the_attention_path_the_timed_sizes_take():
    """Prompts shorter than SPLIT_FROM skip the split causal attention: a smoke run would check the agreement, FLOPs
    and memory of another attention than the CPU and GPU tables time."""
    for sizes in (vs_torch.SMOKE, vs_torch.WORKLOADS, vs_torch.GPU):
        assert all(w.task.seq_len >= SPLIT_FROM for w in sizes.values() if w.kind == "gpt")


@pytest.mark.skipif(not HAS_TORCH, reason=f"no PyTorch environment at {vs_torch.TORCH_PYTHON} "
                    "(make benchmarks/.venv-torch)")
@pytest.mark.parametrize("name", list(vs_torch.SMOKE))
def test_torch_reference_computes_jaxicl_loss_gradients_parameters_and_flops(name):
    w = vs_torch.SMOKE[name]
    graphdef, params = nnx.split(w.model())
    batch = sample_batch(lr.sample, w.task, jax.random.key(1), w.batch, axis=None)
    with vs_torch.torch_reference(w, params, batch, vs_torch.TORCH_PYTHON, "cpu") as (out, timed):
        assert timed is not None, out
        assert [timed() > 0 for _ in range(2)] == [True, True]  # one timed run of the workload's steps per call
    jaxicl_out, xla_flops = vs_torch.jaxicl_outputs(graphdef, params, batch)
    agreed = vs_torch.agreement(w, jaxicl_out, out)
    assert agreed["loss_rel_diff"] < 1e-5 and agreed["grad_rel_diff"] < 1e-5  # float32, different summation order
    if w.kind == "gpt":
        assert xla_flops >= vs_torch.matmul_flops(w)  # XLA counts the elementwise work too
    else:  # SelfAttention multiplies through Wq Wk^T and Wv Wo: fewer FLOPs than the model as written
        assert xla_flops < vs_torch.matmul_flops(w)
    assert_agreement_refuses(w, jaxicl_out, out)


@pytest.mark.skipif(not HAS_TORCH, reason=f"no PyTorch environment at {vs_torch.TORCH_PYTHON} "
                    "(make benchmarks/.venv-torch)")
@pytest.mark.parametrize("name,written,mutated", [
    ("gpt_small", 'F.gelu(m, approximate="tanh")', 'F.gelu(m, approximate="none")'),
    ("lsa", "k.transpose(-1, -2) / (t - 1)", "k.transpose(-1, -2) / t")])
def test_the_agreement_check_refuses_a_reference_that_computes_another_model(name, written, mutated, tmp_path,
                                                                               monkeypatch):
    """At the initial weights these references agree with jaxicl to float32 tolerance (the GPT's GELU inputs are too
    small to tell erf from tanh; the lsa attention adds ~1e-11 to its output); at the probe weights they do not."""
    source = open(os.path.join(ROOT, "benchmarks", "torch_reference.py")).read()
    assert source.count(written) == 1
    (tmp_path / "torch_reference.py").write_text(source.replace(written, mutated))
    monkeypatch.setattr(vs_torch, "HERE", str(tmp_path))
    w = vs_torch.SMOKE[name]
    graphdef, params = nnx.split(w.model())
    batch = sample_batch(lr.sample, w.task, jax.random.key(1), w.batch, axis=None)
    with vs_torch.torch_reference(w, params, batch, vs_torch.TORCH_PYTHON, "cpu") as (out, _):
        jaxicl_out = vs_torch.jaxicl_outputs(graphdef, params, batch)[0]
        with pytest.raises(vs_torch.Disagreement, match="disagree"):
            vs_torch.agreement(w, jaxicl_out, out)


@pytest.mark.skipif(not HAS_TORCH, reason=f"no PyTorch environment at {vs_torch.TORCH_PYTHON} "
                    "(make benchmarks/.venv-torch)")
def test_a_reference_that_skips_a_parameter_counts_fewer(tmp_path, monkeypatch):
    """The reference counted the weights it was given, jaxicl's own arrays, so the parameter-count check could not
    fail; it now counts those its loss reaches (a GPT without its output bias: 1 fewer, and that gradient is 0)."""
    written = '(layer_norm(h, p, "ln_final") @ p["unembed"] + p["unembed_bias"])'
    source = open(os.path.join(ROOT, "benchmarks", "torch_reference.py")).read()
    assert source.count(written) == 1
    skipping = source.replace(written, '(layer_norm(h, p, "ln_final") @ p["unembed"])')
    (tmp_path / "torch_reference.py").write_text(skipping)
    monkeypatch.setattr(vs_torch, "HERE", str(tmp_path))
    w = vs_torch.SMOKE["gpt_small"]
    graphdef, params = nnx.split(w.model())
    batch = sample_batch(lr.sample, w.task, jax.random.key(1), w.batch, axis=None)
    with vs_torch.torch_reference(w, params, batch, vs_torch.TORCH_PYTHON, "cpu") as (out, _):
        jaxicl_out = vs_torch.jaxicl_outputs(graphdef, params, batch)[0]
    n = sum(g.size for g in jaxicl_out[""][1].values())
    assert int(out["n_params"]) == n - 1
    np.testing.assert_array_equal(out["grad/unembed_bias"], 0.0)
    with pytest.raises(vs_torch.Disagreement, match=rf"parameter counts differ: torch {n - 1}, jaxicl {n}"):
        vs_torch.agreement(w, jaxicl_out, out)


def assert_agreement_refuses(w, jaxicl_out: dict, out: dict) -> None:
    """The agreement check, which admits jaxicl_out against the reference's outputs `out`, refuses a gradient 1% off
    (at either set of weights), a NaN gradient (first or last: max() keeps a leading NaN, which then fails no
    comparison, and drops a later one) and a NaN loss on either side."""
    names = [k for k in out if k.startswith("grad/")]
    nan = lambda a: np.full_like(a, np.nan)  # noqa: E731
    probe = "probe_" + names[-1]
    no_loss = jaxicl_out | {"": (float("nan"), jaxicl_out[""][1])}
    wrongs = [(out | {names[0]: out[names[0]] * 1.01}, jaxicl_out), (out | {probe: out[probe] * 1.01}, jaxicl_out),
              (out | {names[0]: nan(out[names[0]])}, jaxicl_out), (out | {names[-1]: nan(out[names[-1]])}, jaxicl_out),
              (out | {"loss": np.nan}, jaxicl_out), (out | {"probe_loss": np.nan}, jaxicl_out), (out, no_loss)]
    for wrong, jaxicl in wrongs:
        with pytest.raises(vs_torch.Disagreement, match="disagree"):
            vs_torch.agreement(w, jaxicl, wrong)


@pytest.mark.parametrize("name", list(vs_torch.SMOKE))
def test_the_agreement_check_refuses_a_gradient_or_loss_that_is_off_or_nan(name):
    """Against jaxicl's own outputs as the reference (no PyTorch needed): admitted exactly, refused when perturbed."""
    w = vs_torch.SMOKE[name]
    graphdef, params = nnx.split(w.model())
    jaxicl_out = vs_torch.jaxicl_outputs(graphdef, params, sample_batch(lr.sample, w.task, jax.random.key(1),
                                                                        w.batch, axis=None))[0]
    (loss, grads), (probe_loss, probe_grads) = jaxicl_out[""], jaxicl_out["probe_"]
    out = {"loss": loss, "loss_explicit": loss, "probe_loss": probe_loss, "n_params": sum(g.size for g in grads.values()),
           "flops_per_step": vs_torch.matmul_flops(w), **{f"grad/{n}": g for n, g in grads.items()},
           **{f"probe_grad/{n}": g for n, g in probe_grads.items()}}
    assert vs_torch.agreement(w, jaxicl_out, out) == {"loss_rel_diff": 0.0, "grad_rel_diff": 0.0}
    assert_agreement_refuses(w, jaxicl_out, out)


def test_jaxicl_side_compiles_once_and_a_backend_without_a_flop_count_leaves_it_empty(monkeypatch):
    """Both weights run through one compiled program (a GPU compiles slowly; the check has minutes); the FLOP count
    is run.json's, None where the backend gives none (as JAX's GPU cost analysis has, before and after compiling),
    and then the row's ratio is empty instead of the workload failing."""
    w = vs_torch.SMOKE["lsa"]
    graphdef, params = nnx.split(w.model())
    batch = sample_batch(lr.sample, w.task, jax.random.key(1), w.batch, axis=None)
    compiles, compile = [], jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self, *a: compiles.append(1) or compile(self, *a))
    out, flops = vs_torch.jaxicl_outputs(graphdef, params, batch)
    loss_and_grad = jax.jit(jax.value_and_grad(vs_torch.regression_loss(graphdef), has_aux=True))
    assert len(compiles) == 1 and flops == loss_and_grad.lower(params, batch).cost_analysis()["flops"]
    assert out["probe_"][0] != out[""][0]  # the probe weights' own loss
    for stage in (jax.stages.Lowered, jax.stages.Compiled):
        monkeypatch.setattr(stage, "cost_analysis", lambda self: None)
    none_out, none_flops = vs_torch.jaxicl_outputs(graphdef, params, batch)
    assert none_flops is None and none_out[""][0] == out[""][0]


def test_vs_torch_writes_a_table_with_the_ratio_or_says_why_not(tmp_path, monkeypatch, capsys):
    precisions, runs = [], []  # what jaxicl's timed chunks are traced under: float32 (JAX's GPU default is TF32)
    devices = set()  # where they ran: one of the tests' 4 CPU devices, as PyTorch runs on one
    compiled, reference = vs_torch.compiled_chunk, vs_torch.torch_reference

    def chunk(*a, **kw):
        precisions.append(jax.config.jax_default_matmul_precision)
        run, compile_s = compiled(*a, **kw)

        def timed():
            runs.append("jaxicl")
            state = run()
            devices.update(d for leaf in jax.tree.leaves(state) for d in leaf.devices())
            return state
        return timed, compile_s

    @contextlib.contextmanager
    def torch_side(*a):
        with reference(*a) as (out, timed):
            yield out, timed and (lambda: runs.append("torch") or timed())

    monkeypatch.setattr(vs_torch, "compiled_chunk", chunk)
    monkeypatch.setattr(vs_torch, "torch_reference", torch_side)
    vs_torch.main(["--smoke", "--workloads", "lsa"])
    out = smoke_dir(tmp_path, capsys.readouterr().out)
    assert precisions == ["float32"]
    assert runs == (["torch", "jaxicl"] if HAS_TORCH else ["jaxicl"]) * 2  # alternating; the first pair warms up
    assert jax.device_count() == 4 and devices == {jax.devices()[0]}
    assert_smoke(out, "vs_torch")
    assert json.loads((out / "vs_torch.json").read_text())["notes"].startswith("jaxicl on 1 of 4 cpu device(s); ")
    (row,) = rows(out / "vs_torch.json")
    assert row["workload"] == "lsa" and row["jaxicl_steps_per_s"] > 0 and row["n_params"] == 4 * 4 * 4
    # the tiny step fits the smoke runs' 1 MB budget many times over; the fraction of the measured matmul peak is a
    # fraction
    assert 0 < row["step_memory_mb"] < 1 and row["largest_batch_in_budget"] > row["batch"]
    assert "; the largest batch in a 1 MB budget" in json.loads((out / "vs_torch.json").read_text())["notes"]
    assert 0 < row["fraction_of_matmul_peak"] < 1
    table = (out / "vs_torch.md").read_text()
    assert ("jaxicl_over_torch" in row) == HAS_TORCH
    assert HAS_TORCH or "PyTorch not timed" in table
    with pytest.raises(SystemExit, match="unknown"):
        vs_torch.main(["--smoke", "--workloads", "gpt_huge"])
    assert list(tmp_path.glob("jaxicl-benchmarks-smoke-*")) == [out]  # refused before it made another directory


def test_the_largest_batch_in_a_budget_is_measured_to_fit():
    """The line through the step's memory at batch and 2 x batch overshoots: the linear attention's memory per prompt
    falls with the batch, so the line's batch (434,960 in 1 GiB at the timed size, a compile of memory analysis
    only) needed 19% more than the budget. The reported batch's compiled step fits (the search steps down from the
    line; a compiled program's memory need not grow monotonically with the batch, so "the next batch does not fit"
    is not asserted)."""
    w = vs_torch.WORKLOADS["lsa"]
    graphdef, params = nnx.split(w.model())
    budget = 2.0**30
    largest = vs_torch.step_memory(w, graphdef, params, budget, "xla")["largest_batch_in_budget"]
    assert largest > w.batch and largest % w.batch == 0
    assert vs_torch.step_bytes(w, graphdef, params, largest, "xla") <= budget


def test_vs_torch_records_a_failed_workload_in_its_row_runs_the_others_and_exits_nonzero(tmp_path, monkeypatch):
    """--gpu: a PyTorch reference that does not start is a failure (jaxicl is still timed); a workload that raises
    (here gpt_small, as on a disagreement) gets its reason in its row and the next one runs; each row is on disk
    before the next workload starts. --workloads sets the order: the workload that runs is the cheap lsa (the
    GPU check's rehearsal runs gpt_small under --gpu)."""
    monkeypatch.setattr(vs_torch, "GPU", vs_torch.SMOKE)  # the --gpu code path at the tests' sizes
    bench, on_disk = vs_torch.bench, []

    def failing_gpt(name, *a):
        on_disk.append([r["workload"] for r in rows(tmp_path / "vs_torch.json")] if on_disk else [])
        if name == "gpt_small":
            raise vs_torch.Disagreement("gpt_small: PyTorch and jaxicl disagree, not timing them: (a test)")
        return bench(name, *a)

    monkeypatch.setattr(vs_torch, "bench", failing_gpt)
    with pytest.raises(SystemExit, match=r"\['gpt_small', 'lsa'\] failed"):
        vs_torch.main(["--gpu", "--workloads", "gpt_small", "lsa", "--repeats", "1", "--memory-budget-mb", "1",
                       "--torch-python", str(tmp_path / "no-torch"), "--out", str(tmp_path)])
    assert on_disk == [[], ["gpt_small"]]
    gpt, lsa = rows(tmp_path / "vs_torch.json")
    assert gpt == {"workload": "gpt_small", "failed": "Disagreement: gpt_small: PyTorch and jaxicl disagree, not "
                   "timing them: (a test)"}
    assert lsa["failed"].startswith("PyTorch not timed: no environment at") and "jaxicl_over_torch" not in lsa
    assert lsa["jaxicl_steps_per_s"] > 0
    table = (tmp_path / "vs_torch.md").read_text().splitlines()
    assert table[-4].startswith("| workload | failed | batch |")
    assert table[-2].startswith("| gpt_small | Disagreement: ")


def test_the_reference_must_run_under_gpu_and_the_rehearsal_uses_the_cpu_environment(tmp_path):
    """On the GPU machine the check's own Python has torch with CUDA; the rehearsal (--gpu --smoke) runs the
    benchmarks' PyTorch environment where it exists (the CPU build of torch: on the CPU), and requires it there."""
    assert vs_torch.reference(False, False, None) == (vs_torch.TORCH_PYTHON, "cpu", False)
    assert vs_torch.reference(True, False, None) == (sys.executable, "cuda", True)
    assert vs_torch.reference(True, False, "/x/python") == ("/x/python", "cuda", True)
    assert vs_torch.torch_device(str(tmp_path / "no-python")) is None
    assert vs_torch.reference(True, True, str(tmp_path / "no-python")) == (str(tmp_path / "no-python"), "cpu", False)
    if HAS_TORCH:
        assert vs_torch.reference(True, True, None) == (vs_torch.TORCH_PYTHON, "cpu", True)
    else:
        assert vs_torch.reference(True, True, None)[0] == sys.executable


def test_numpy_samplers_give_the_device_samplers_shapes_and_moments():
    families = sampler_throughput.families(smoke=True)
    rng = np.random.default_rng(0)
    for name, (sample, cfg, host_sample, host_arg) in families.items():
        device = sample_batch(sample, cfg, jax.random.key(0), 4, axis=None,
                              **({"step": 0} if takes_step(sample) else {}))
        host = host_sample(host_arg, rng, 4)
        assert [a.shape for a in host] == [device.inputs.shape, device.targets.shape, device.mask.shape], name
    x, y, _ = sampler_throughput.numpy_linear_regression(lr.LinearRegression(), rng, 4096)
    np.testing.assert_allclose(np.var(x[..., :-1]), 1.0, atol=0.02)  # 450k N(0, 1) draws: sd of the var 0.002
    np.testing.assert_allclose(np.var(y), 10.0, atol=0.5)  # y = <w, x>, w, x ~ N(0, I_10): var 10
    # boards: a placement row per prompt (it was one per type for the whole batch: 3 distinct boards)
    _, boards, _ = sampler_throughput.numpy_boards(families["boards"][3], rng, 256)
    assert len(np.unique(boards, axis=0)) > 200  # 256 draws from 2,000 rows per type (smoke tables)
    # the benchmark's own run and table are tested by the GPU check's rehearsal (below), at these sizes


def test_sampler_throughput_has_each_family_on_disk_before_the_next_starts(tmp_path, monkeypatch, capsys):
    """The GPU check stops it at its time limit: the families done by then are kept."""
    bench, on_disk = sampler_throughput.bench, []

    def stopped_at_the_second(name, *a):
        if on_disk:
            raise KeyboardInterrupt  # as a kill would stop it
        on_disk.append(name)
        return bench(name, *a)

    monkeypatch.setattr(sampler_throughput, "bench", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        sampler_throughput.main(["--smoke"])
    out = smoke_dir(tmp_path, capsys.readouterr().out)
    assert [r["family"] for r in rows(out / "sampler_throughput.json")] == on_disk == ["linear_regression"]
    assert_smoke(out, "sampler_throughput")


def test_device_scaling_efficiency_is_per_device_against_the_first_count_run():
    """--devices 2 4: perfect weak scaling (4 devices, twice 2 devices' prompts/s) is 1, not 0.5."""
    from benchmarks.device_scaling import efficiency

    two, four = {"devices": 2, "prompts_per_s": 100.0}, {"devices": 4, "prompts_per_s": 200.0}
    assert [efficiency(r, two) for r in (two, four)] == [1.0, 1.0]
    assert efficiency({"devices": 4, "prompts_per_s": 150.0}, two) == 0.75  # 37.5 per device against 50
    assert efficiency({"devices": 8, "prompts_per_s": 200.0}, {"devices": 1, "prompts_per_s": 100.0}) == 0.25


def test_device_scaling_counts_give_every_process_the_same_number_of_devices():
    """On 2 hosts the default counts 1, 2, 4, 8 took host 0's first devices (data_mesh), and host 1 timed a mesh it
    held no device of."""
    from benchmarks.device_scaling import device_counts

    assert device_counts(None, 1, smoke=False) == [1, 2, 4, 8]
    assert device_counts(None, 2, smoke=False) == [2, 4, 8, 16]
    assert device_counts([1], 2, smoke=True) == [2, 4]  # --smoke replaces the GPU check's --devices 1
    assert device_counts([4, 6], 2, smoke=False) == [4, 6]
    message = ("--devices: in a run of 2 processes each count must be a multiple of 2 (every process gives the mesh "
               "the same number of devices), got [1, 3]")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        device_counts([1, 2, 3], 2, smoke=False)


def test_benchmark_results_are_written_by_process_0_only(tmp_path, monkeypatch):
    """Every process of a multi-host device_scaling run calls write_results: all wrote NAME.json.partial and renamed
    it into the same directory (the last rename won; another could find its .partial gone)."""
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    md = output.write_results("bench", [{"a": 1}], "notes", out_dir=str(tmp_path / "out"), smoke=True)
    assert md == str(tmp_path / "out" / "bench.md") and not (tmp_path / "out").exists()
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    output.write_results("bench", [{"a": 1}], "notes", out_dir=str(tmp_path / "out"), smoke=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "bench.md"]
    assert rows(tmp_path / "out" / "bench.json") == [{"a": 1}]


def test_a_non_finite_value_in_a_row_is_written_as_null_not_lost_with_the_run(tmp_path):
    """write_json refuses NaN and infinity (not JSON): a benchmark whose row held one (a ratio of a time too short to
    resolve) would raise after all its timings and write nothing; the value is null (a blank in the table) instead."""
    out = str(tmp_path)
    output.write_results("bench", [{"a": float("nan"), "b": float("inf"), "c": 1.5, "d": "x"}], "notes", out_dir=out,
                         smoke=True)
    assert rows(os.path.join(out, "bench.json")) == [{"a": None, "b": None, "c": 1.5, "d": "x"}]


def test_train_throughput_writes_its_table(tmp_path, capsys):
    from benchmarks import train_throughput

    train_throughput.main(["--smoke"])
    out = smoke_dir(tmp_path, capsys.readouterr().out)
    assert_smoke(out, "train_throughput")
    (row,) = rows(out / "train_throughput.json")
    assert row["steps_per_s"] > 0 and row["capture_all_over_none"] > 0


def test_train_throughput_records_an_engine_time_too_short_to_resolve_as_null_and_says_why(tmp_path, monkeypatch,
                                                                                           capsys):
    from benchmarks import train_throughput

    monkeypatch.setattr(train_throughput, "train", lambda *a, **kw: None)
    monkeypatch.setattr(train_throughput, "time", types.SimpleNamespace(perf_counter=lambda: 1.0))  # t(2n) = t(n)
    train_throughput.main(["--smoke"])
    (row,) = rows(smoke_dir(tmp_path, capsys.readouterr().out) / "train_throughput.json")
    assert row["engine_steps_per_s"] is None and row["engine_over_chunk"] is None
    assert row["engine_note"] == "not resolved: t(20 steps) - t(10) = 0 s <= 0; more --engine-steps"


def test_sweep_vs_loop_times_only_the_compiled_chunks_and_records_a_failed_stage(tmp_path, monkeypatch):
    """Steady state: between the clock's readings only the chunk runs (inputs and fresh states are built before);
    a stage that fails (here the memory estimate) is recorded after the earlier stages' results were written. On a
    device that reports its memory (a GPU, faked here) the vmapped way trains all members at once, without the
    memory measure train_sweep would compile to choose a chunk (one more compilation in its wall time)."""
    import jaxicl.train
    from benchmarks import sweep_vs_loop
    from jaxicl.train import sweep, sweep_program

    estimates, chunk_in_budget = [], sweep.chunk_in_budget
    monkeypatch.setattr(sweep, "device_budget", lambda mesh: 0.8 * 80e9)  # an 80 GB GPU
    monkeypatch.setattr(sweep, "chunk_in_budget", lambda *a: estimates.append(a) or chunk_in_budget(*a))

    events, on_disk, build = [], [], sweep_program.build_program

    def logged(name, fn):
        return lambda *a, **k: events.append(name) or fn(*a, **k)

    for method in ("inputs", "states"):
        monkeypatch.setattr(sweep_program.SweepProgram, method, logged(method, getattr(sweep_program.SweepProgram,
                                                                                        method)))
    def build_logged(*a):
        prog = build(*a)
        return dataclasses.replace(prog, run_chunk=logged("run", prog.run_chunk))

    monkeypatch.setattr(sweep_program, "build_program", build_logged)
    monkeypatch.setattr(sweep_vs_loop, "time", types.SimpleNamespace(perf_counter=logged("clock", time.perf_counter)))

    def no_estimate(*a, **k):
        on_disk.append(set(json.loads((tmp_path / "sweep_vs_loop.json").read_text())))
        raise RuntimeError("out of memory (a test)")

    monkeypatch.setattr(jaxicl.train, "estimate_memory", no_estimate)
    with pytest.raises(SystemExit, match=r"\['memory'\] failed"):
        sweep_vs_loop.main(["--smoke", "--train-loop-members", "0", "--out", str(tmp_path)])
    a, b, c, d = [i for i, e in enumerate(events) if e == "clock"][-4:]  # the steady state's two timed regions
    assert events[a + 1:b] == ["run"] and events[c + 1:d] == ["run"] * 4  # all 4 members, then one at a time
    assert {"vmapped", "loop", "steady"} <= on_disk[0]
    result = json.loads((tmp_path / "sweep_vs_loop.json").read_text())
    assert estimates == [] and result["vmapped"]["wall_s"] > 0
    assert result["failed"] == {"memory": "RuntimeError: out of memory (a test)"} and "memory" not in result
    assert result["steady"]["vmapped"]["member_steps_per_s"] > 0
    assert "failed: memory: RuntimeError" in (tmp_path / "sweep_vs_loop.md").read_text()


def test_the_patching_benchmark_checks_its_grid_against_the_loop_and_writes_a_table(tmp_path, capsys):
    from benchmarks.patching import main

    main(["--smoke", "--repeats", "1"])
    out = smoke_dir(tmp_path, capsys.readouterr().out)
    assert_smoke(out, "patching")
    table = (out / "patching.md").read_text()
    assert "loop_over_grid" in table and "grid_memory_mb" in table


def test_the_runner_lists_every_benchmark_module_and_the_gpu_check_ends_with_the_full_experiments(tmp_path):
    modules = {f[:-3] for f in os.listdir(os.path.join(ROOT, "benchmarks"))
               if f.endswith(".py") and not f.startswith("_")}
    helpers = {"output", "timing", "torch_reference", "tl_patching"}  # imported or run by the benchmarks
    assert set(runner.BENCHMARKS) == modules - helpers
    commands = runner.commands(list(runner.BENCHMARKS), True, str(tmp_path))
    assert all(c[-2:] == ["--out", str(tmp_path)] and "--smoke" in c for c in commands)
    steps = runner.gpu_commands(str(tmp_path))
    assert sum(limit for _, _, limit in steps) <= 8 * 60
    assert [(n, c[2:6]) for n, c, _ in steps[-2:]] == [(name, ["experiments", name, "--preset", "full"])
                                                      for name in ("gd_equivalence", "ar_fig7_non_augmented")]
    assert [n for n, c, _ in steps[:-2]] == [c[2].removeprefix("benchmarks.") for _, c, _ in steps[:-2]]


@pytest.mark.parametrize("name", ["__main__", *runner.BENCHMARKS])
def test_help_names_the_command_and_describes_it_by_the_docstrings_first_paragraph(name, capsys):
    """--help read `usage: __main__.py` or `patching.py`, and patching's description stopped mid-sentence (the
    docstring's first line)."""
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.startswith(f"usage: python -m {module.__name__.removesuffix('.__main__')} ")
    paragraph = " ".join(module.__doc__.split("\n\n")[0].split())
    assert paragraph.endswith(".") and f" {paragraph} " in printed


def test_a_smoke_run_without_out_gets_a_fresh_directory_and_a_full_size_run_the_committed_results(tmp_path,
                                                                                                  monkeypatch, capsys):
    """`python -m benchmarks all --smoke` hands every benchmark one fresh temporary directory, and each smoke run
    (here sweep_vs_loop's own) gets its own; at full size the default stays benchmarks/results."""
    from benchmarks import sweep_vs_loop

    ran = []
    monkeypatch.setattr(runner, "run", lambda command: ran.append(command) or {"command": "", "status": "ok",
                                                                               "wall_s": 0.0})
    runner.main(["all", "--smoke"])
    out = smoke_dir(tmp_path, capsys.readouterr().out)
    assert [c[-3:] for c in ran] == [["--smoke", "--out", str(out)]] * len(runner.BENCHMARKS)
    assert os.listdir(out) == []
    runner.main(["vs_torch"])
    assert ran[-1][-2:] == ["--out", output.RESULTS] and "--smoke" not in ran[-1]
    assert sweep_vs_loop._args([]).out == output.RESULTS
    own = sweep_vs_loop._args(["--smoke"]).out
    assert sorted(tmp_path.glob("jaxicl-benchmarks-smoke-*")) == sorted([out, tmp_path / os.path.basename(own)])
    assert f"writing into {own} (not {output.RESULTS})" in capsys.readouterr().out


def test_a_relative_out_given_from_another_directory_reaches_every_step_as_that_directory(tmp_path, monkeypatch):
    """The steps run from the repository root, the GPU check writes its logs and gpu_check.json from the caller's
    directory: a relative --out given outside the root names one directory for all of them."""
    ran = []

    def fake_run(command, cwd, **kw):
        ran.append((cwd, command[command.index("--out") + 1]))
        return types.SimpleNamespace(returncode=0)
    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "rel"
    runner.main(["gpu-check", "--out", "rel"])
    assert ran == ([(ROOT, str(out))] * len(runner.GPU_CHECK)
                   + [(ROOT, str(out / "experiments"))] * len(runner.GPU_EXPERIMENTS))
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "logs"]
    assert json.loads((out / "gpu_check.json").read_text())["steps"][0]["log"] == str(out / "logs" / "vs_torch.log")
    ran.clear()
    runner.main(["all", "--out", "rel"])
    assert ran == [(ROOT, str(out))] * len(runner.BENCHMARKS)


def test_the_gpu_check_logs_each_step_records_it_as_it_ends_and_computes_float32_products(tmp_path, monkeypatch):
    """Each step's output goes to logs/NAME.log and gpu_check.json is rewritten after each step: a step that runs
    past its limit is recorded as such (with what it printed) and the next one still runs; an experiment's failed
    checks are listed. Every step runs with JAX's float32 products (JAX's default on a GPU is TF32)."""
    summary, result = tmp_path / "gpu_check.json", tmp_path / "experiments" / "gd_equivalence" / "result.json"
    experiment = (f"import json, os; print(len(json.load(open({str(summary)!r}))['steps'])); "
                  f"os.makedirs({str(result.parent)!r}); json.dump({{'checks': [{{'name': 'a', 'passed': True}}, "
                  f"{{'name': 'b', 'passed': False}}]}}, open({str(result)!r}, 'w'))")
    steps = [("vs_torch", "import jax; print(jax.config.jax_default_matmul_precision)", None),
             ("sampler_throughput", "print('started'); import time; time.sleep(60)", 2),
             ("gd_equivalence", experiment, None)]
    monkeypatch.setattr(runner, "gpu_commands", lambda out, smoke: [(name, [sys.executable, "-c", code], limit)
                                                                    for name, code, limit in steps])
    for var in ("JAX_DEFAULT_MATMUL_PRECISION", "PYTHONUNBUFFERED"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match="1 of 3 benchmarks failed"):
        runner.main(["gpu-check", "--out", str(tmp_path)])
    done = json.loads(summary.read_text())["steps"]
    assert [o["status"] for o in done] == ["ok", "timed out after 2 s", "ok"]
    assert [o.get("failed_checks") for o in done] == [None, None, ["b"]]
    logs = [(tmp_path / "logs" / f"{name}.log").read_text() for name, _, _ in steps]
    assert logs == ["float32\n", "started\n", "2\n"]  # the timed-out step's output survives; 2 steps on disk


def test_the_gpu_check_rehearsed_at_smoke_sizes_runs_every_step_and_writes_every_result(tmp_path, capsys):
    """Also the tests of sampler_throughput, device_scaling and sweep_vs_loop at their smoke sizes (--smoke
    replaces the GPU check's sizes), so the suite runs each once. Without --out, as README gives the command: into a
    fresh temporary directory, every result marked as a smoke run's, the committed results as they were."""
    before = committed_results()
    runner.main(["gpu-check", "--smoke"])  # raises SystemExit if any step fails
    out = smoke_dir(tmp_path, capsys.readouterr().out)
    assert committed_results() == before
    done = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert [o["status"] for o in done] == ["ok"] * len(runner.gpu_commands(str(out)))
    for name in ("vs_torch", "sampler_throughput", "device_scaling"):  # float32 products, as on a GPU
        assert json.loads((out / f"{name}.json").read_text())["environment"]["matmul_precision"] == "float32"
        assert_smoke(out, name)
    table = rows(out / "vs_torch.json")
    assert [r["workload"] for r in table] == list(vs_torch.SMOKE)
    assert [r.get("jaxicl_over_torch", 0) > 0 for r in table] == [HAS_TORCH] * len(table)  # PyTorch ran, on the CPU
    samplers = rows(out / "sampler_throughput.json")
    assert [r["family"] for r in samplers] == list(sampler_throughput.families(True))
    assert all(r[f"{impl}_prompts_per_s"] > 0 for r in samplers for impl in PRNG_IMPLS[1:])  # each other generator
    scaling = rows(out / "device_scaling.json")  # its process sets its own simulated device count
    assert [(r["devices"], r["batch"]) for r in scaling] == [(1, 4), (2, 8)] and scaling[0]["efficiency"] == 1.0
    sweep = json.loads((out / "sweep_vs_loop.json").read_text())
    assert sweep["smoke"] is True and sweep["members"] == 4 and sweep["max_abs_param_diff_vmapped_vs_loop"] < 1e-5
    assert sweep["matmul_precision"] == "float32"
    assert (out / "sweep_vs_loop.md").read_text().startswith(f"{output.SMOKE_NOTE}; 4 members x 4 steps")
    for name in ("gd_equivalence", "ar_fig7_non_augmented"):
        result = json.loads((out / "experiments" / name / "result.json").read_text())
        assert result["preset"] == "smoke" and result["checks"]


@pytest.mark.parametrize("text, cpu, simd", [
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n"
     "flags\t\t: fpu sse4_2 avx avx2 fma\n\nprocessor\t: 1\nmodel name\t: other\n",
     "AMD EPYC (family 25, model 1)", "avx2"),
    ("processor\t: 0\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
     "flags\t\t: avx2 avx512f avx512bw\n", "Intel(R) Xeon(R) Platinum 8488C (family 6, model 143)", "avx512f"),
    ("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm\nCPU part\t: 0xd0c\n", "0xd0c", "asimd"),
])
def test_host_cpu_reads_the_first_processor_of_cpuinfo(tmp_path, text, cpu, simd):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert output.host_cpu(str(path)) == {"cpu": cpu, "cpu_simd": simd}
    assert output.host_cpu(str(tmp_path / "missing"))["cpu_simd"] == "unknown"


def committed_ratios(runs: str, workload: str, column: str = "jaxicl_over_torch") -> list[float]:
    """`column` (default jaxicl / PyTorch steps/s) of `workload` in each committed vs_torch run (the folders under
    benchmarks/results that the glob `runs` matches; "" the top level's), in the folders' order."""
    paths = sorted(glob.glob(os.path.join(output.RESULTS, runs, "vs_torch.json"), recursive=True))
    return [r[column] for p in paths for r in json.load(open(p))["rows"] if r["workload"] == workload]


def test_the_performance_text_states_the_counts_and_ranges_of_the_committed_runs():
    """README's targets table and benchmarks/measurements.md against benchmarks/results, rounded as the text rounds
    (two decimals): the 12-layer GPT's parity over every committed run, the Zen 3's small GPT with the softmax's
    derivative written out (its lowest run 1.2149), and the Sapphire Rapids' single committed run."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    measurements = open(os.path.join(ROOT, "benchmarks", "measurements.md")).read()
    large = committed_ratios("**", "gpt_large")
    assert f"| no: {sum(r >= 1.0 for r in large)} runs of {len(large)}, all on Zen 4 |" in readme
    softmax = committed_ratios("amd-epyc-zen3/softmax-jvp-run*", "gpt_small")
    assert (f"with the softmax's derivative written out (below) {min(softmax):.2f}-{max(softmax):.2f}, median "
            f"{statistics.median(softmax):.2f} ({len(softmax)} runs)") in readme
    assert f"the small GPT {', '.join(f'{r:.2f}' for r in softmax[:-1])} and {softmax[-1]:.2f}x" in " ".join(
        measurements.split())
    flops = committed_ratios("**", "lsa", "xla_over_matmul_flops")  # 0.62: the run before that change (e874e9c)
    assert (f"XLA's FLOP count was 0.62x the analytic one, and is {min(flops):.3f}-{max(flops):.3f}x in every "
            "committed run since") in " ".join(measurements.split())
    (sapphire,) = committed_ratios("", "lsa")
    assert f"| 1-layer linear attention >= 1.5x PyTorch | {sapphire:.2f} (1 run committed; " in readme
