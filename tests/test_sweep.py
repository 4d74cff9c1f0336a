"""Vmapped sweeps: the same numbers as members trained alone, on any mesh, chunked or not, resumed or not."""

import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments.common.result import diverged_check
from experiments.common.sweep_report import aggregate, final_table
from frozen_features import FrozenFeatures
from jaxicl.models import SelfAttention
from jaxicl.models.attention import sweep_init
from jaxicl.prng import seed_key
from jaxicl.tasks import linear_regression as lr
from jaxicl.tasks import sample_batch
from jaxicl.train import sweep as sweep_module
from jaxicl.train import (CheckpointStore, TrainConfig, data_mesh, estimate_memory, eval_key, read_metrics,
                          regression_loss, sweep_mesh, train, train_sweep)
from jaxicl.train.checkpoint import latest_checkpoint
from jaxicl.train.chunks import lower_chunk
from jaxicl.train.mesh import MEMBER_AXIS
from jaxicl.train.sweep_fields import member_arrays, sampling_config, split_fields, sweep_members
from jaxicl.train.sweep_memory import largest_in_budget
from jaxicl.train.sweep_program import build_program, member_sharding
from jaxicl.train.sweep_spec import grid, member_config, parse_axes
from jaxicl.validation import ConfigError

TASK = lr.LinearRegression(dim=3, n_context=5)
GRAPHDEF = nnx.graphdef(SelfAttention(4, num_heads=2, rngs=nnx.Rngs(0)))
LOSS = regression_loss(GRAPHDEF)


def init(key, *, init_scale=0.1):
    return nnx.split(SelfAttention(4, num_heads=2, init_scale=init_scale, rngs=nnx.Rngs(key)))[1]


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 10, "batch_size": 16, "lr": 1e-2, "steps_per_call": 5, "log_every": 1, **kw})


@dataclasses.dataclass(frozen=True)
class _Run:
    train: TrainConfig
    task: lr.LinearRegression


def _alone(cfg: TrainConfig, member: dict):
    """The member trained by itself with train(): its own configs and its own init (from the key the sweep gives)."""
    run = member_config(_Run(cfg, TASK), {k: v for k, v in member.items() if "." in k})
    params = init(seed_key(run.train.seed), **{k: v for k, v in member.items() if "." not in k})
    return train(LOSS, lr.sample, run.task, run.train, params, progress=False)


def _member_losses(result, i: int) -> np.ndarray:
    return np.array([r["loss"] for r in result.train_rows if r["member"] == i])


def _assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_each_member_of_a_vmapped_sweep_equals_the_member_trained_alone():
    """Every kind of sweepable field at once: seed, lr, weight decay, warmup, noise, pool size, init scale."""
    cfg = _cfg(optimizer="adamw", schedule="warmup_cosine", warmup_steps=3)
    members = [
        {"train.seed": 0, "train.lr": 1e-2, "train.weight_decay": 0.0, "train.warmup_steps": 0,
         "task.noise_std": 0.0, "task.n_tasks": 0, "init_scale": 0.1},
        {"train.seed": 1, "train.lr": 3e-2, "train.weight_decay": 0.1, "train.warmup_steps": 5,
         "task.noise_std": 0.5, "task.n_tasks": 3, "init_scale": 0.2},
        {"train.seed": 2, "train.lr": 5e-3, "train.weight_decay": 0.01, "train.warmup_steps": 3,
         "task.noise_std": 0.2, "task.n_tasks": 8, "init_scale": 0.05}]
    swept = train_sweep(LOSS, lr.sample, TASK, cfg, init, members, progress=False)
    assert swept.diverged == {}
    for i, m in enumerate(members):
        alone = _alone(cfg, m)
        np.testing.assert_allclose(_member_losses(swept, i), [r["loss"] for r in alone.train_rows], rtol=2e-5)
        _assert_trees_close(swept.member_params(i), alone.state.params, rtol=2e-4, atol=1e-6)
        row = next(r for r in swept.train_rows if r["member"] == i)
        assert {k: row[k] for k in m} == m  # metrics rows carry the member's values


def test_under_x64_a_member_equals_its_lone_run_to_float64_rounding(x64):
    """The swept values reach the member in float64 like a lone run's Python floats: they were cast to float32
    first (lr 0.1 -> 0.10000000149), a 1e-9 relative difference in the parameters after 10 steps. A negative seed
    makes the same keys on both paths: the lone run's data key took the Python int -5 as int64 and differed from the
    member's (int32 seeds), whose losses were another run's."""
    cfg = _cfg(optimizer="adamw", schedule="warmup_cosine", warmup_steps=3)
    members = [{"train.seed": -5, "train.lr": 0.1, "train.weight_decay": 0.1, "task.noise_std": 0.3, "init_scale": 0.3},
               {"train.seed": 2, "train.lr": 0.07, "train.weight_decay": 0.01, "task.noise_std": 0.1,
                "init_scale": 0.2}]
    swept = train_sweep(LOSS, lr.sample, TASK, cfg, init, members, progress=False)
    for i, m in enumerate(members):
        alone = _alone(cfg, m)
        np.testing.assert_allclose([r["lr"] for r in swept.train_rows if r["member"] == i],
                                   [r["lr"] for r in alone.train_rows], rtol=1e-14)  # float32 lr: 1.5e-8
        # two XLA programs (vmapped and lone) in float64: rounding differences of ~1e-15 grow little in 10 steps
        _assert_trees_close(swept.member_params(i), alone.state.params, rtol=1e-12, atol=1e-14)


def test_member_axis_sharded_over_four_devices_gives_the_one_device_results():
    members = grid(parse_axes(["seed=0:2", "lr=1e-2,3e-2"]))
    members = [{f"train.{k}": v for k, v in m.items()} for m in members]
    one = train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members, mesh=sweep_mesh(1, 1), progress=False)
    assert len({r["loss"] for r in one.train_rows if r["step"] == 9}) == 4  # the members really differ
    for shape in [(4, 1), (2, 2)]:  # 4 devices on the member axis; 2 members x 2 data devices
        many = train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members, mesh=sweep_mesh(*shape), progress=False)
        for i in range(4):
            np.testing.assert_allclose(_member_losses(many, i), _member_losses(one, i), rtol=2e-5)
        _assert_trees_close(many.params, one.params, rtol=2e-4, atol=1e-6)


def _rbg_runs():
    """On 4 devices: a sweep's member losses and evaluations [2 members, 4 steps + 2 evaluations], a lone run's
    losses and evaluations [4 + 2] with evaluation prompts from eval_key on a 4-device data mesh, a task pool [4, 3]."""
    cfg, members = _cfg(steps=4, steps_per_call=4), [{"train.seed": 0}, {"train.seed": 1}]

    def evaluate(params):
        return {"loss": LOSS(params, sample_batch(lr.sample, TASK, eval_key(0), 16))[0]}

    swept = train_sweep(LOSS, lr.sample, TASK, cfg, init, members, mesh=sweep_mesh(2, 2), evaluate=evaluate,
                        progress=False)
    alone = train(LOSS, lr.sample, TASK, cfg, init(seed_key(0)), mesh=data_mesh(4), evaluate=evaluate, progress=False)
    return ([[r["loss"] for r in swept.train_rows + swept.eval_rows if r["member"] == i] for i in range(2)],
            [r["loss"] for r in alone.train_rows + alone.eval_rows],
            np.asarray(lr.task_pool(dataclasses.replace(TASK, n_tasks=4))))


def test_jax_default_prng_impl_rbg_changes_no_key_of_the_library():
    """Keys from seeds (data, evaluation, a member's init key, task pools) took JAX's global default implementation:
    with it set to rbg, a sweep (its init keys vmapped) and evaluation on several devices failed with
    ShardingTypeErrors. They are threefry2x32 now, whatever the global default: the same programs on the same keys,
    so the same numbers exactly."""
    before = jax.config.jax_default_prng_impl
    default = _rbg_runs()
    jax.config.update("jax_default_prng_impl", "rbg")  # a common TPU setting
    try:
        rbg = _rbg_runs()
    finally:
        jax.config.update("jax_default_prng_impl", before)
    assert rbg[:2] == default[:2]
    np.testing.assert_array_equal(rbg[2], default[2])


def test_chunked_sweep_agrees_with_unchunked_and_compiles_its_chunk_program_once(chunk_compiles):
    members = [{"train.seed": s, "task.noise_std": n} for s, n in [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]]
    mesh = sweep_mesh(1)
    whole = train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members, mesh=mesh, progress=False)
    est = estimate_memory(LOSS, lr.sample, TASK, _cfg(), init, members, mesh=mesh)
    assert est.per_member > 0 and est.largest_stack(est.bytes_for(2)) == 2
    # chunk_compiles counts the training's chunk programs (ChunkPrograms), not the budget search's measures (each
    # train_sweep compiles its sizes afresh: 5, 2 and 3 members, 3 compilations): a chunk program per chunk (3 here)
    # or per trip count would count more than 1
    before = len(chunk_compiles)
    chunked = train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members, mesh=mesh, memory_budget=est.bytes_for(2),
                          progress=False)
    assert chunked.chunk_size == 2
    assert len(chunk_compiles) - before == 1  # the chunk program once for its 3 chunks
    # a stack of 2 and one of 5 are two compiled programs (other fusions and reduction orders): float32 rounding
    # differences grow over 10 Adam steps, so the tolerances of the suite's other cross-program comparisons
    for i in range(5):
        np.testing.assert_allclose(_member_losses(chunked, i), _member_losses(whole, i), rtol=2e-5)
    _assert_trees_close(chunked.params, whole.params, rtol=2e-4, atol=1e-6)


def _compiled_bytes(prog, cfg: TrainConfig, c: int) -> tuple[int, int | None]:
    """XLA's memory analysis (arguments + outputs + temporaries - donated) of the training and evaluation programs of a
    chunk of c members on one device, each compiled as train_sweep runs it (evaluation: None without evaluate)."""
    def total(m):
        return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes

    mesh = sweep_mesh(1)
    with jax.set_mesh(mesh):
        sharding = member_sharding(mesh, c)
        a = prog.inputs(np.zeros(c, int), sharding)
        state = prog.states(a, sharding)
        train_bytes = total(lower_chunk(prog.run_chunk, state, a["task"]).compile().memory_analysis())
        return train_bytes, prog.eval_chunk and total(prog.eval_chunk.lower(state.params, a["task"]).compile()
                                                      .memory_analysis())


def test_a_memory_budget_sizes_the_chunk_for_its_evaluation_too():
    """An evaluate on many prompts needs far more memory per member than training (experiments evaluate on 10k-16k
    prompts; here 4096 prompts of 16 training ones): sized from the training program alone, all 8 members were one
    chunk, whose evaluation needed about twice the budget."""
    cfg = _cfg(steps=2, steps_per_call=2)
    members = [{"train.seed": s} for s in range(8)]

    def evaluate(params):
        return {"loss": LOSS(params, sample_batch(lr.sample, TASK, eval_key(0), 4096))[0]}

    prog = build_program(LOSS, lr.sample, TASK, cfg, init, members, evaluate)
    (train_3, eval_3), (_, eval_4) = _compiled_bytes(prog, cfg, 3), _compiled_bytes(prog, cfg, 4)
    assert _compiled_bytes(prog, cfg, 8)[0] < eval_3  # training alone: every member fits
    # between 3 and 4 members' evaluation (it grows by 2.4 MB a member; the training state it holds is 17 kB)
    budget = (eval_3 + eval_4) / 2
    swept = train_sweep(LOSS, lr.sample, TASK, cfg, init, members, mesh=sweep_mesh(1), memory_budget=budget,
                        evaluate=evaluate, progress=False)
    assert swept.chunk_size == 3 and max(train_3, eval_3) <= budget
    assert len(swept.eval_rows) == 2 * 8  # steps 0 and 2 of every member


@pytest.mark.parametrize("dim,n_context,batch,model,fits", [
    (8, 20, 64, {"kind": "softmax", "num_layers": 2, "num_heads": 2}, 12),  # the reviewer's softmax adamw sweep
    (3, 6, 512, {}, 6)])  # gd_equivalence's smoke shapes
def test_a_memory_budget_picks_the_largest_chunk_whose_compiled_programs_fit(dim, n_context, batch, model, fits):
    """A budget between the compiled memories of `fits` and `fits` + 1 members gives chunks of `fits`. A fit from 1
    and 2 members (the 1-member program is cheaper per member) chose 15 and 7, 1.2x and 1.08x over the budget."""
    task = lr.LinearRegression(dim=dim, n_context=n_context)
    member_init, graphdef = sweep_init(dim + 1, **model)
    loss = regression_loss(graphdef)
    cfg = _cfg(steps=2, steps_per_call=2, batch_size=batch, optimizer="adamw", weight_decay=0.1)
    members = [{"train.seed": s} for s in range(16)]
    prog = build_program(loss, lr.sample, task, cfg, member_init, members, None)
    chosen, more = _compiled_bytes(prog, cfg, fits)[0], _compiled_bytes(prog, cfg, fits + 1)[0]
    budget = (chosen + more) / 2
    swept = train_sweep(loss, lr.sample, task, cfg, member_init, members, mesh=sweep_mesh(1), memory_budget=budget,
                        progress=False)
    assert swept.chunk_size == fits and chosen <= budget < more


@pytest.mark.parametrize("memory,linear", [
    pytest.param(lambda n: 1000 + 37 * n, True, id="linear"), pytest.param(lambda n: n * n, False, id="quadratic"),
    pytest.param(lambda n: 100 * math.sqrt(n), False, id="concave"),
    pytest.param(lambda n: 10 if n <= 148 else 10**6, False, id="step")])
def test_largest_in_budget_finds_the_largest_fitting_multiple_of_the_unit_in_few_measures(memory, linear):
    """For every budget (each multiple's memory, just above it, and one below the unit's), the multiple of unit that
    a scan of all of them finds; each size measured once: 1 size where start fits, else at most
    2 + 2 ceil(log2(start / unit)) (5 where memory is linear)."""
    for unit, start in [(1, 1), (1, 2), (3, 3), (1, 100), (4, 400), (1, 1024), (8, 1000)]:
        sizes = range(unit, start + 1, unit)
        for budget in sorted({memory(n) + d for n in sizes for d in (0, 0.5)} | {memory(unit) - 1}):
            calls = []
            found = largest_in_budget(lambda n: calls.append(n) or memory(n), budget, start, unit)
            assert found == max((n for n in sizes if memory(n) <= budget), default=None), (unit, start, budget)
            bound = min(2 + 2 * math.ceil(math.log2(start / unit)), 5 if linear else math.inf)
            most = 1 if found == start else bound
            assert len(calls) == len(set(calls)) <= most, (unit, start, budget, calls)


def test_largest_in_budget_searches_above_the_first_fit_where_memory_grows_faster_than_linearly():
    """n^2 bytes, 2500 fit: the line through 2 and 100 members crosses the budget at 26; searching only below the
    sizes that did not fit returned 26 where 50 fits."""
    calls = []
    assert largest_in_budget(lambda n: calls.append(n) or n * n, 2500, 100, 1) == 50
    assert calls == [100, 2, 26, 63, 46, 54, 49, 51, 50]


def test_a_memory_budget_below_the_chunk_of_one_member_is_refused_with_its_compiled_bytes():
    members = [{"train.seed": s} for s in range(3)]
    need = _compiled_bytes(build_program(LOSS, lr.sample, TASK, _cfg(), init, members, None), _cfg(), 1)[0]
    message = f"memory_budget={need // 2:.3g} bytes holds no chunk: 1 member(s) need {need:.3g} bytes"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members, mesh=sweep_mesh(1), memory_budget=need // 2,
                    progress=False)


def test_a_chunk_size_or_memory_budget_that_is_not_a_positive_number_is_refused_naming_it():
    """chunk_size -1 crashed (UnboundLocalError: no chunk), 0 trained every member at once, True was stored as the
    chunk size; memory_budget 0 meant none given."""
    members = [{"train.seed": s} for s in range(3)]
    for kw, message in (({"chunk_size": -1}, "chunk_size must be > 0, got -1"),
                        ({"chunk_size": 0}, "chunk_size must be > 0, got 0"),
                        ({"chunk_size": True}, "chunk_size must be an integer, got True"),
                        ({"chunk_size": 2.5}, "chunk_size must be an integer, got 2.5"),
                        ({"memory_budget": 0}, "memory_budget must be > 0, got 0")):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members, progress=False, **kw)


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_a_sweep_of_one_dimensional_tokens_in_stacks_of_one_member_equals_the_members_trained_alone(chunk_size):
    """dim=1: the sampler reshapes x to [n, 1]. A stack of one member (1 member, or chunks of 1 on one member device),
    sharded over "members", failed with a ShardingTypeError (JAX drops the member sharding of a size-1 axis in that
    reshape): training and evaluation. Such a stack is unsharded (member_sharding)."""
    task = lr.LinearRegression(dim=1, n_context=3)
    member_init, graphdef = sweep_init(2)
    loss = regression_loss(graphdef)
    cfg = _cfg(steps=4, steps_per_call=2, batch_size=4)

    def evaluate(params):
        return {"loss": loss(params, sample_batch(lr.sample, task, eval_key(0), 8))[0]}

    members = [{"train.seed": s} for s in range(1 if chunk_size is None else 2)]
    swept = train_sweep(loss, lr.sample, task, cfg, member_init, members, mesh=sweep_mesh(1), chunk_size=chunk_size,
                        evaluate=evaluate, progress=False)
    assert swept.chunk_size == 1 and len(swept.eval_rows) == 2 * len(members)  # steps 0 and 4
    for i, m in enumerate(members):
        run = dataclasses.replace(cfg, seed=m["train.seed"])
        alone = train(loss, lr.sample, task, run, member_init(seed_key(run.seed)), evaluate=evaluate, progress=False)
        # float32, vmapped vs alone: the tolerances of the member-equals-alone test above
        np.testing.assert_allclose([r["loss"] for r in swept.train_rows + swept.eval_rows if r["member"] == i],
                                   [r["loss"] for r in alone.train_rows + alone.eval_rows], rtol=2e-5)
        _assert_trees_close(swept.member_params(i), alone.state.params, rtol=2e-4, atol=1e-6)


def test_the_progress_bar_shows_the_median_final_loss_of_the_members_still_training(capsys):
    cfg = _cfg(optimizer="sgd")
    members = [{"train.lr": 1e-2}, {"train.lr": 3e3}, {"train.lr": 2e-2}]  # member 1 diverges
    swept = train_sweep(LOSS, lr.sample, TASK, cfg, init, members)
    last = [r["loss"] for r in swept.train_rows if r["step"] == cfg.steps - 1]
    assert len(last) == 2  # members 0 and 2
    assert f"median_loss={np.median(last):.4g}" in capsys.readouterr().err.split("\r")[-1]


def test_a_diverging_member_is_frozen_and_reported_while_the_others_continue_unchanged(tmp_path):
    cfg = _cfg(optimizer="sgd")
    members = [{"train.lr": 1e-2}, {"train.lr": 3e3}, {"train.lr": 2e-2}]
    swept = train_sweep(LOSS, lr.sample, TASK, cfg, init, members, out_dir=str(tmp_path), progress=False)
    assert list(swept.diverged) == [1]
    d = swept.diverged[1]
    assert 0 <= d < cfg.steps
    # the report's round trip: sweep.json -> final_table -> diverged_at per member -> the experiments' check
    _, table = final_table(str(tmp_path))
    assert [r["diverged_at"] for r in table] == [None, d, None]
    check = diverged_check({r["member"]: r["diverged_at"] for r in table if r["diverged_at"] is not None})
    assert (check.value, check.passed) == (1, False) and f"{{1: {d}}}" in check.note
    assert [r["step"] for r in swept.train_rows if r["member"] == 1] == list(range(d))
    assert all(np.isfinite(r["loss"]) for r in swept.train_rows)
    leaves = jax.tree.leaves(swept.member_params(1))
    assert all(np.isfinite(x).all() for x in leaves)
    # the frozen member holds exactly its state after d steps alone: its last finite one
    at_d = _alone(_cfg(optimizer="sgd", steps=d, steps_per_call=1), members[1]) if d else None
    if at_d is not None:
        _assert_trees_close(swept.member_params(1), at_d.state.params, rtol=2e-4, atol=1e-5)
    for i in (0, 2):
        alone = _alone(cfg, members[i])
        np.testing.assert_allclose(_member_losses(swept, i), [r["loss"] for r in alone.train_rows], rtol=2e-5)
        _assert_trees_close(swept.member_params(i), alone.state.params, rtol=2e-4, atol=1e-6)


def test_a_context_length_axis_pads_each_member_and_evaluates_it_at_its_own_length():
    """Members with k < n_context context pairs train on front-padded prompts with a loss mask: each equals a
    run of the padded sampler alone, and evaluate receives the member's n_context."""
    task = dataclasses.replace(TASK, format="interleaved", loss_on="all")
    members = [{"task.n_context": k} for k in (2, 5, 4)]

    def evaluate(params, *, n_context):
        batch = lr_batch(task, n_context)
        return {"loss": LOSS(params, batch)[0], "real_pairs": batch.mask.sum() / batch.mask.shape[0]}

    swept = train_sweep(LOSS, lr.sample, task, _cfg(), init, members, evaluate=evaluate, progress=False)
    for i, m in enumerate(members):
        k = m["task.n_context"]
        alone = train(LOSS, functools.partial(lr.sample, n_context=k), task, _cfg(), init(jax.random.key(0)),
                      progress=False)
        np.testing.assert_allclose(_member_losses(swept, i), [r["loss"] for r in alone.train_rows], rtol=2e-5)
        _assert_trees_close(swept.member_params(i), alone.state.params, rtol=2e-4, atol=1e-6)
        final = [r for r in swept.eval_rows if r["member"] == i][-1]
        assert final["real_pairs"] == k + 1  # k context pairs and the query carry loss weight
        np.testing.assert_allclose(final["loss"], LOSS(alone.state.params, lr_batch(task, k))[0], rtol=2e-4)


@dataclasses.dataclass(frozen=True)
class _SignMix:
    """Linear regression y = s <w, x> whose sign s is -1 with probability p_flip, 0 with probability p_zero: a config
    that checks two sweepable fields against each other."""
    p_flip: float = 0.0
    p_zero: float = 0.0
    n_context: int = 5

    def __post_init__(self):
        if self.p_flip + self.p_zero > 1:
            raise ConfigError(f"p_flip + p_zero must be <= 1, got {self.p_flip} + {self.p_zero}")


def _sign_mix(cfg: _SignMix, key, *, p_flip=None, p_zero=None, n_context=None):
    p_flip = cfg.p_flip if p_flip is None else p_flip
    p_zero = cfg.p_zero if p_zero is None else p_zero
    prompt = lr.sample(dataclasses.replace(TASK, n_context=cfg.n_context), key, n_context=n_context)
    u = jax.random.uniform(jax.random.fold_in(key, 3))
    sign = jnp.where(u < p_flip, -1.0, jnp.where(u < p_flip + p_zero, 0.0, 1.0))
    return dataclasses.replace(prompt, inputs=prompt.inputs.at[:, -1].multiply(sign), targets=sign * prompt.targets)


def test_task_fields_that_do_not_set_the_samplers_program_keep_a_members_values_not_the_largest():
    """The sweep sampled with the largest value of every swept task field, so members (0.8, 0.1) and (0.1, 0.8), each
    valid, were refused: "p_flip + p_zero must be <= 1, got 0.8 + 0.8". A field that sets the sampler's program
    (n_context: the prompts' shape) still takes the largest value; the others take the first member's."""
    members = [{"task.p_flip": 0.8, "task.p_zero": 0.1, "task.n_context": 3},
               {"task.p_flip": 0.1, "task.p_zero": 0.8, "task.n_context": 5}]
    arrays = member_arrays(members, "task.", ["p_flip", "p_zero", "n_context"])
    assert sampling_config(_sign_mix, _SignMix(), members, arrays) == _SignMix(p_flip=0.8, p_zero=0.1, n_context=5)
    swept = train_sweep(LOSS, _sign_mix, _SignMix(), _cfg(), init, members, progress=False)
    for i, m in enumerate(members):
        task = _SignMix(m["task.p_flip"], m["task.p_zero"], n_context=5)
        alone = train(LOSS, functools.partial(_sign_mix, n_context=m["task.n_context"]), task, _cfg(),
                      init(jax.random.key(0)), progress=False)
        # float32, vmapped vs alone: the tolerances of the member-equals-alone test above
        np.testing.assert_allclose(_member_losses(swept, i), [r["loss"] for r in alone.train_rows], rtol=2e-5)
        _assert_trees_close(swept.member_params(i), alone.state.params, rtol=2e-4, atol=1e-6)


@dataclasses.dataclass(frozen=True)
class _Pooled:
    n_tasks: int = 0  # > 0: the target scaled by a row of a table of n_tasks rows (its shape), below the member's value
    scale: float = 1.0
    n_context: int = 1

    def __post_init__(self):
        if self.n_context + self.scale > 10:  # a shape field checked against a free one
            raise ConfigError(f"n_context + scale must be <= 10, got {self.n_context} + {self.scale}")


def _pooled(cfg: _Pooled, key, *, n_tasks=None, scale=None, n_context=None):
    prompt = lr.sample(dataclasses.replace(TASK, n_context=cfg.n_context), key, n_context=n_context)
    if cfg.n_tasks > 0:  # a static branch on the config's value, and a table of its shape
        row = jax.random.randint(jax.random.fold_in(key, 3), (), 0, n_tasks)
        prompt = dataclasses.replace(prompt, targets=prompt.targets * jnp.arange(1.0, cfg.n_tasks + 1)[row])
    return dataclasses.replace(prompt, targets=scale * prompt.targets)


@pytest.mark.parametrize("pools", [(2, 3), (0, 3)])  # the table's shape; the branch too
def test_a_task_field_whose_config_value_sets_a_table_or_a_branch_takes_the_largest_swept_value(pools):
    """The output's shape does not depend on n_tasks, the sampler's program does: the largest value, as every
    member's row must be in the table; scale, read as the keyword only, takes the first member's value."""
    members = [{"task.n_tasks": n, "task.scale": s} for n, s in zip(pools, (5.0, 2.0))]
    arrays = member_arrays(members, "task.", ["n_tasks", "scale"])
    assert sampling_config(_pooled, _Pooled(), members, arrays) == _Pooled(n_tasks=3, scale=5.0)


def test_a_sampling_config_the_task_refuses_is_refused_naming_where_its_values_come_from():
    members = [{"task.n_context": 2, "task.scale": 7.0}, {"task.n_context": 6, "task.scale": 1.0}]
    with pytest.raises(ConfigError, match=re.escape(
            "the sweep samples with the task config's {'n_context': 6, 'scale': 7.0} (the largest swept value of "
            "['n_context'], which change the sampler's program, the first member's of the others), which it refuses: "
            "n_context + scale must be <= 10, got 6 + 7.0")):
        train_sweep(LOSS, _pooled, _Pooled(), _cfg(), init, members, progress=False)


def lr_batch(task, n_context):
    return sample_batch(lr.sample, task, jax.random.key(9), 64, task_params={"n_context": n_context})


def _rows(result):
    return sorted(result.train_rows + result.eval_rows, key=lambda r: (r["member"], r["split"], r["step"]))


def test_a_rerun_on_a_device_with_more_memory_resumes_the_chunks_of_its_checkpoints(tmp_path, monkeypatch):
    """Without chunk_size the chunk comes from the memory a GPU or TPU reports (memory_stats()["bytes_limit"], faked
    here; None on CPU): the same command rerun on a device with more memory chose chunks of 4 and refused its own
    checkpoints ("sweep.chunk_size: checkpoint 2 vs now 4"); now it resumes them in chunks of 2."""
    cfg = _cfg(steps=4, steps_per_call=2)
    members = [{"train.seed": s} for s in range(4)]
    prog = build_program(LOSS, lr.sample, TASK, cfg, init, members, None)
    two, three, four = (_compiled_bytes(prog, cfg, c)[0] for c in (2, 3, 4))

    def run(cfg, bytes_limit, out_dir):
        monkeypatch.setattr(type(jax.devices()[0]), "memory_stats", lambda d: {"bytes_limit": bytes_limit})
        return train_sweep(LOSS, lr.sample, TASK, cfg, init, members, mesh=sweep_mesh(1), out_dir=out_dir,
                           progress=False)

    small, large = (two + three) / 2 / 0.8, 2 * four / 0.8  # device_budget is 80% of bytes_limit
    assert run(dataclasses.replace(cfg, steps=2), small, str(tmp_path)).chunk_size == 2
    resumed, fresh = run(cfg, large, str(tmp_path)), run(cfg, large, None)
    assert (resumed.chunk_size, fresh.chunk_size) == (2, 4)
    assert [r["step"] for r in resumed.train_rows if r["member"] == 3] == [0, 1, 2, 3]
    # each member's program vmapped over 2 or 4 members: XLA may order its float32 sums otherwise
    _assert_trees_close(resumed.params, fresh.params, rtol=1e-6, atol=1e-7)


def test_a_rerun_whose_checkpointed_chunks_exceed_the_memory_is_refused_before_it_trains(tmp_path, monkeypatch):
    """A rerun keeps its checkpoints' chunk size; on a device with less memory (or with a memory_budget below it) it
    compiled those chunks and ran out of memory, or trained past the budget it was given; now it is refused up front,
    with the bytes the chunks need, and out_dir is left as it was."""
    cfg = _cfg(steps=4, steps_per_call=2)
    members = [{"train.seed": s} for s in range(4)]
    need = _compiled_bytes(build_program(LOSS, lr.sample, TASK, cfg, init, members, None), cfg, 4)[0]
    train_sweep(LOSS, lr.sample, TASK, dataclasses.replace(cfg, steps=2), init, members, mesh=sweep_mesh(1),
                out_dir=str(tmp_path), progress=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    message = (f"{tmp_path}: its checkpoints hold chunks of 4 members (sweep.chunk_size), whose programs need "
               f"{need:.3g} bytes per device, more than {need - 1:.3g} (memory_budget")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        train_sweep(LOSS, lr.sample, TASK, cfg, init, members, mesh=sweep_mesh(1), out_dir=str(tmp_path),
                    memory_budget=need - 1, progress=False)
    monkeypatch.setattr(type(jax.devices()[0]), "memory_stats", lambda d: {"bytes_limit": need - 1})
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):  # the whole device (not 80% of it): too small
        train_sweep(LOSS, lr.sample, TASK, cfg, init, members, mesh=sweep_mesh(1), out_dir=str(tmp_path),
                    progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    monkeypatch.setattr(type(jax.devices()[0]), "memory_stats", lambda d: {"bytes_limit": need})  # fits exactly
    resumed = train_sweep(LOSS, lr.sample, TASK, cfg, init, members, mesh=sweep_mesh(1), out_dir=str(tmp_path),
                          progress=False)
    assert resumed.chunk_size == 4 and [r["step"] for r in resumed.train_rows if r["member"] == 3] == [0, 1, 2, 3]


def test_a_sweep_resumes_on_a_mesh_with_other_member_devices(tmp_path):
    """Four members in chunks of 3 on 1 device, resumed on 4 and on 2 x 2: the chunk was stored padded to a multiple
    of the new mesh's member devices (3 -> 4), and the rerun was refused ("sweep.chunk_size: checkpoint 3 vs now 4")
    though nothing had changed. The chunks keep their members, and the restored stack is padded for the new mesh."""
    members = [{"train.seed": s} for s in range(4)]
    cfg, out = _cfg(steps=4, steps_per_call=2), str(tmp_path)
    first = train_sweep(LOSS, lr.sample, TASK, cfg, init, members, mesh=sweep_mesh(1), chunk_size=3, out_dir=out,
                        progress=False)
    again = train_sweep(LOSS, lr.sample, TASK, cfg, init, members, mesh=sweep_mesh(4), out_dir=out, progress=False)
    assert (first.chunk_size, again.chunk_size) == (3, 3)
    _assert_trees_close(again.params, first.params, rtol=0, atol=0)  # nothing left to train: the restored states
    longer = dataclasses.replace(cfg, steps=6)
    resumed = train_sweep(LOSS, lr.sample, TASK, longer, init, members, mesh=sweep_mesh(2, 2), chunk_size=3,
                          out_dir=out, progress=False)
    straight = train_sweep(LOSS, lr.sample, TASK, longer, init, members, mesh=sweep_mesh(1), chunk_size=3,
                           progress=False)
    assert resumed.chunk_size == 3 and json.loads((tmp_path / "sweep.json").read_text())["chunk_size"] == 3
    for i in range(4):
        assert [r["step"] for r in resumed.train_rows if r["member"] == i] == list(range(6))
        # steps 4, 5 ran in a stack of 4 on 2 x 2 devices, another program than the straight run's: float32 rounding,
        # the tolerances of the suite's other comparisons across meshes
        np.testing.assert_allclose(_member_losses(resumed, i), _member_losses(straight, i), rtol=2e-5)
    _assert_trees_close(resumed.params, straight.params, rtol=2e-4, atol=1e-6)


def test_sweep_resume_is_exact_across_chunks(tmp_path):
    members = [{"train.seed": s, "train.lr": v} for s, v in [(0, 1e-2), (1, 2e-2), (2, 3e-2)]]
    kw = dict(chunk_size=2, mesh=sweep_mesh(2), progress=False,
              evaluate=lambda p: {"w_norm": optax_norm(p)}, eval_every=5)
    straight = train_sweep(LOSS, lr.sample, TASK, _cfg(checkpoint_every=5), init, members,
                           out_dir=str(tmp_path / "a"), **kw)
    train_sweep(LOSS, lr.sample, TASK, _cfg(steps=5, checkpoint_every=5), init, members, out_dir=str(tmp_path / "b"),
                **kw)
    resumed = train_sweep(LOSS, lr.sample, TASK, _cfg(checkpoint_every=5), init, members,
                          out_dir=str(tmp_path / "b"), **kw)
    # exact: every chunk of both sweeps is the same compiled 5-step program applied to the same states
    _assert_trees_close(resumed.params, straight.params, rtol=0, atol=0)
    assert _rows(resumed) == _rows(straight)
    assert [r["step"] for r in resumed.train_rows if r["member"] == 2] == list(range(10))
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["chunk0", "chunk1"]
    stored = CheckpointStore(str(tmp_path / "b" / "checkpoints" / "chunk0")).config()  # names what varies; the
    # steps of the run that wrote the latest checkpoint (the 10-step run that resumed the 5-step one)
    assert stored["train"]["seed"] == {"swept": [0, 1, 2]} and stored["train"]["lr"] == {"swept": [1e-2, 2e-2, 3e-2]}
    assert stored["train"]["steps"] == 10 and stored["task"] == json.loads(json.dumps(dataclasses.asdict(TASK)))
    with pytest.raises(ConfigError, match="cannot resume"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(checkpoint_every=5), init, members[:2], out_dir=str(tmp_path / "b"),
                    **kw)
    # the same swept values paired otherwise (or in another order): chunk k would hold other members' states
    swapped = [{"train.seed": s, "train.lr": v} for s, v in [(1, 1e-2), (0, 2e-2), (2, 3e-2)]]
    with pytest.raises(ConfigError, match=r"cannot resume.*sweep\.members"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(checkpoint_every=5), init, swapped, out_dir=str(tmp_path / "b"), **kw)


def test_an_extended_sweep_stopped_between_chunks_resumes_to_the_straight_sweep(tmp_path, monkeypatch):
    """Two members in chunks of one, 5 steps, extended to 10 and stopped once chunk 0 is done: chunk 0's checkpoint
    was written by the 10-step sweep, so the same command resumes (it was refused: "step 10 of a run of
    train.steps=5") and equals a straight 10-step sweep. Stopped earlier, as chunk 0 saved its first checkpoint, the
    extension keeps the 5-step sweep's last train rows (step 4, not a row of the 10-step sweep, log_every=3), which it
    had deleted: the 5-step command still finds that sweep finished."""
    members = [{"train.seed": s} for s in range(2)]
    kw = dict(chunk_size=1, progress=False)
    long, short = _cfg(log_every=3), _cfg(steps=5, log_every=3)
    straight = train_sweep(LOSS, lr.sample, TASK, long, init, members, out_dir=str(tmp_path / "a"), **kw)
    out = str(tmp_path / "b")
    first = train_sweep(LOSS, lr.sample, TASK, short, init, members, out_dir=out, **kw)
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(CheckpointStore, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        train_sweep(LOSS, lr.sample, TASK, long, init, members, out_dir=out, **kw)
    assert _rows(train_sweep(LOSS, lr.sample, TASK, short, init, members, out_dir=out, **kw)) == _rows(first)

    class StopAtChunk1(CheckpointStore):
        def __init__(self, directory, **store_kw):
            if directory.endswith("chunk1"):
                raise KeyboardInterrupt
            super().__init__(directory, **store_kw)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(sweep_module, "CheckpointStore", StopAtChunk1)
        train_sweep(LOSS, lr.sample, TASK, long, init, members, out_dir=out, **kw)
    assert [CheckpointStore(f"{out}/checkpoints/chunk{k}").steps()[-1] for k in (0, 1)] == [10, 5]
    resumed = train_sweep(LOSS, lr.sample, TASK, long, init, members, out_dir=out, **kw)
    _assert_trees_close(resumed.params, straight.params, rtol=0, atol=0)
    assert _rows(resumed) == _rows(straight)


def test_an_interrupted_rerun_of_a_finished_sweep_keeps_its_diverged_members_in_sweep_json(tmp_path, monkeypatch):
    """sweep.json was written with diverged {} when any run started, a resume of a finished sweep too: a rerun
    interrupted before it rewrote the map left members 1 and 3 (lr 1e20) reported as healthy. Kept now for the
    chunks whose checkpoints the rerun resumes: both, then only member 1 once chunk 1's checkpoints are gone."""
    members = [{"train.lr": lr_} for lr_ in (1e-2, 1e20, 2e-2, 1e20)]
    kw = dict(chunk_size=2, mesh=sweep_mesh(2), out_dir=str(tmp_path), progress=False)
    cfg = _cfg(optimizer="sgd")
    finished = train_sweep(LOSS, lr.sample, TASK, cfg, init, members, **kw)
    assert finished.diverged == {1: 0, 3: 0}  # the first update makes the parameters non-finite

    def interrupted_rerun():
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):  # stopped after sweep.json is written
            m.setattr(sweep_module, "CheckpointStore", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
            train_sweep(LOSS, lr.sample, TASK, cfg, init, members, **kw)
        return json.loads((tmp_path / "sweep.json").read_text())["diverged"]

    assert interrupted_rerun() == {"1": 0, "3": 0}
    shutil.rmtree(tmp_path / "checkpoints" / "chunk1")  # members 2, 3 train again: their old record does not hold
    assert interrupted_rerun() == {"1": 0}
    assert train_sweep(LOSS, lr.sample, TASK, cfg, init, members, **kw).diverged == {1: 0, 3: 0}
    assert json.loads((tmp_path / "sweep.json").read_text())["diverged"] == {"1": 0, "3": 0}


def test_a_sweep_keeps_no_rows_of_another_sweep_stopped_before_its_first_checkpoint(tmp_path, monkeypatch):
    """Seeds 0-3 stopped in their first save leave rows and no checkpoint; seeds 10, 11 in the same directory (in
    chunks of one or at once) return and leave only their own rows (they returned members 2 and 3 of seeds 2, 3)."""
    for chunk_size in (1, None):
        out = tmp_path / str(chunk_size)
        kw = dict(out_dir=str(out), progress=False)
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            m.setattr(CheckpointStore, "save", lambda self, state, step=None: (_ for _ in ()).throw(KeyboardInterrupt))
            train_sweep(LOSS, lr.sample, TASK, _cfg(steps=4), init, [{"train.seed": s} for s in range(4)], **kw)
        assert {r["member"] for r in read_metrics(str(out / "metrics.jsonl"))} == {0, 1, 2, 3}
        result = train_sweep(LOSS, lr.sample, TASK, _cfg(steps=4), init, [{"train.seed": 10}, {"train.seed": 11}],
                             chunk_size=chunk_size, **kw)
        assert sorted({(r["member"], r["train.seed"]) for r in result.train_rows}) == [(0, 10), (1, 11)]
        assert [r["step"] for r in result.train_rows if r["member"] == 1] == [0, 1, 2, 3]
        assert _rows(result) == sorted(read_metrics(str(out / "metrics.jsonl")),
                                       key=lambda r: (r["member"], r["split"], r["step"]))


def test_a_sweep_resumed_from_a_relative_out_dir_reads_its_checkpoints_without_orbax_warnings(tmp_path, monkeypatch,
                                                                                              caplog):
    """latest_checkpoint opened orbax's Checkpointer with the path as given (CheckpointStore made it absolute): from a
    relative --out, orbax logged "Failed to get metadata ... Error details: Checkpoint path should be absolute" for
    every checkpoint the resume checks read."""
    monkeypatch.chdir(tmp_path)
    members, chunk0 = [{"train.seed": s} for s in range(2)], os.path.join("rel sw", "checkpoints", "chunk0")
    train_sweep(LOSS, lr.sample, TASK, _cfg(steps=5), init, members, out_dir="rel sw", progress=False)
    with caplog.at_level(logging.WARNING):
        found = latest_checkpoint(chunk0)
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members, out_dir="rel sw", progress=False)  # resumes it
        extended = latest_checkpoint(chunk0)
    assert [r.getMessage() for r in caplog.records] == []
    assert (found[1], found[0]["train"]["steps"], extended[1], extended[0]["train"]["steps"]) == (5, 5, 10, 10)


def test_a_sweep_with_resume_false_replaces_the_old_checkpoints_and_config(tmp_path):
    """Three members in chunks of two at lr 1e-2, then two members at lr 3e-2 with resume=False: only the new
    sweep's chunk remains, and resuming at lr 1e-2 is refused instead of restoring the other sweep's state; the rerun
    that trains nothing keeps run.json's flops_per_step."""
    members = [{"train.seed": s} for s in range(3)]
    kw = dict(chunk_size=2, mesh=sweep_mesh(2), out_dir=str(tmp_path), progress=False)
    train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members, **kw)
    second = train_sweep(LOSS, lr.sample, TASK, _cfg(lr=3e-2), init, members[:2], resume=False, **kw)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["chunk0"]
    assert CheckpointStore(str(tmp_path / "checkpoints" / "chunk0")).config()["train"]["lr"] == 3e-2
    with pytest.raises(ConfigError, match=r"train\.lr: checkpoint 0.03 vs now 0.01"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members[:2], **kw)
    again = train_sweep(LOSS, lr.sample, TASK, _cfg(lr=3e-2), init, members[:2], **kw)
    _assert_trees_close(again.params, second.params, rtol=0, atol=0)
    # the rerun compiled no chunk: run.json keeps the per-member flops count
    assert second.info["flops_per_step"] > 0 and again.info == second.info
    assert json.loads((tmp_path / "run.json").read_text()) == second.info


def test_a_rerun_of_a_sweep_that_lost_its_run_json_writes_the_flops_per_step_again(tmp_path, chunk_compiles):
    """A sweep stopped between its last chunk's final checkpoint and run.json (here: run.json deleted) left no FLOP
    count, and its rerun, which trains nothing, wrote flops_per_step None; it lowers the chunk (no compile) and writes
    the per-member count of the sweep that trained."""
    members = [{"train.seed": s} for s in range(3)]
    kw = dict(chunk_size=2, mesh=sweep_mesh(2), out_dir=str(tmp_path), progress=False)
    first = train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members, **kw)
    (tmp_path / "run.json").unlink()
    again = train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members, **kw)
    assert len(chunk_compiles) == 1  # the first sweep's
    assert first.info["flops_per_step"] > 0 and again.info == first.info
    assert json.loads((tmp_path / "run.json").read_text()) == first.info


def test_a_rerun_refused_at_a_later_chunk_leaves_out_dir_as_it_was(tmp_path):
    """Four members in chunks of two, finished, then chunk 0's checkpoints deleted: a rerun at another lr is refused
    by chunk 1's checkpoint before chunk 0 trains, so every file (metrics.jsonl, sweep.json, chunk 1's checkpoint) is
    unchanged and chunk 0 has none (chunk 0 was retrained and metrics.jsonl rewritten before chunk 1 refused)."""
    members = [{"train.seed": s} for s in range(4)]
    kw = dict(chunk_size=2, mesh=sweep_mesh(2), out_dir=str(tmp_path), progress=False)
    train_sweep(LOSS, lr.sample, TASK, _cfg(steps=5), init, members, **kw)
    shutil.rmtree(tmp_path / "checkpoints" / "chunk0")

    def snapshot():
        return {str(p.relative_to(tmp_path)): p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}

    before = snapshot()
    assert CheckpointStore(str(tmp_path / "checkpoints" / "chunk1")).steps() == [5]
    assert snapshot() == before  # a store opened on a directory with checkpoints writes nothing
    with pytest.raises(ConfigError) as refused:
        train_sweep(LOSS, lr.sample, TASK, _cfg(steps=5, lr=3e-2), init, members, **kw)
    assert str(refused.value).startswith(f"cannot resume from {tmp_path / 'checkpoints' / 'chunk1'}: the checkpoint "
                                         f"was made with another config: train.lr: checkpoint 0.01 vs now 0.03; ")
    assert snapshot() == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["chunk1"]
    assert {r["member"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))} == {0, 1, 2, 3}


def optax_norm(params):
    import optax

    return optax.tree.norm(params)


@pytest.mark.parametrize("path,match", [
    ("train.batch_size", r"train\.batch_size cannot be swept.*sweepable train fields: \('seed', 'lr'"),
    ("train.optimizer", "train.optimizer cannot be swept"),
    ("task.dim", r"task\.dim cannot be swept: the sampler jaxicl\.tasks\.linear_regression\.sample does not take it.*"
                 r"sweepable task fields: \('noise_std', 'n_tasks', 'n_context'\)"),
    ("task.format", "task.format cannot be swept"),
    ("num_heads", r"num_heads cannot be swept.*keyword of init \('init_scale',\)")])
def test_unsweepable_fields_are_named_with_the_allowed_ones(path, match):
    with pytest.raises(ConfigError, match=match):
        split_fields([path], lr.sample, init)


def test_a_sweep_field_may_be_the_last_part_of_its_path_as_on_the_command_line():
    """grid(parse_axes(["seed=0:2"])) gives {"seed": 0}: refused as "neither a sweepable train field ('seed', ...)"
    although the sweep_spec docstring promises the short name. It trains as the full names do, which the result and
    its metrics carry."""
    short = [m | {"lr": 1e-2 * (1 + m["seed"]), "init_scale": 0.2}
             for m in grid(parse_axes(["seed=0:2", "noise_std=0.0,0.5"]))]
    full = [{"train.seed": m["seed"], "task.noise_std": m["noise_std"], "train.lr": m["lr"], "init_scale": 0.2}
            for m in short]
    cfg = _cfg(steps=3, steps_per_call=3)
    by_short = train_sweep(LOSS, lr.sample, TASK, cfg, init, short, progress=False)
    by_full = train_sweep(LOSS, lr.sample, TASK, cfg, init, full, progress=False)
    assert by_short.members == full and len({m["task.noise_std"] for m in by_short.members}) == 2
    assert [{k: r[k] for k in full[0]} for r in by_short.train_rows] == [{k: r[k] for k in full[0]}
                                                                         for r in by_full.train_rows]
    _assert_trees_close(by_short.params, by_full.params, rtol=1e-6, atol=1e-7)  # the same program on the same inputs


@dataclasses.dataclass(frozen=True)
class _SeededTask:  # a task with a field of TrainConfig's name
    seed: int = 0
    noise_std: float = 0.0


def test_sweep_members_resolve_short_names_by_the_rule_of_command_line_overrides():
    """A unique last part is that field; init's keywords are the top-level names, so one of them is init's even where
    a field's path ends in it; a name of two fields, or one field given twice, is refused naming them."""
    cfg = _cfg()

    def init_with_lr(key, *, lr=0.1):
        return init(key, init_scale=lr)

    assert sweep_members([{"seed": np.int64(3), "n_tasks": 4}], lr.sample, cfg, TASK, init) == [
        {"train.seed": 3, "task.n_tasks": 4}]
    assert type(sweep_members([{"seed": np.int64(3)}], lr.sample, cfg, TASK, init)[0]["train.seed"]) is int
    assert sweep_members([{"lr": 0.2, "task.noise_std": 0.1}], lr.sample, cfg, TASK, init_with_lr) == [
        {"lr": 0.2, "task.noise_std": 0.1}]
    assert sweep_members([{"noise_std": 0.1, "train.seed": 1}], lr.sample, cfg, _SeededTask(), init) == [
        {"task.noise_std": 0.1, "train.seed": 1}]
    with pytest.raises(ConfigError, match=r"^field 'seed' is ambiguous: it could be any of \['train\.seed', "
                                          r"'task\.seed'\]; give the full path$"):
        sweep_members([{"seed": 0}], lr.sample, cfg, _SeededTask(), init)
    with pytest.raises(ConfigError, match=r"^a sweep member names a field twice: \['seed', 'train\.seed'\]$"):
        sweep_members([{"seed": 0, "train.seed": 1}], lr.sample, cfg, TASK, init)


@pytest.mark.parametrize("member,message", [
    ({"train.sed": 0}, "train.sed: TrainConfig has no field 'sed'; sweepable train fields: ('seed', 'lr', "
                       "'weight_decay', 'warmup_steps')"),
    ({"task.noise": 0.1}, "task.noise: LinearRegression has no field 'noise'; sweepable task fields: ('noise_std', "
                          "'n_tasks', 'n_context')"),
    ({"sed": 0}, "sed cannot be swept: it is neither a sweepable train field ('seed', 'lr', 'weight_decay', "
                 "'warmup_steps'), a task field the sampler takes ('noise_std', 'n_tasks', 'n_context'), nor a "
                 "keyword of init ('init_scale',)")])
def test_a_misspelt_sweep_field_is_refused_naming_the_sweepable_ones(member, message):
    """A dotted path of no field raised dataclasses.replace's TypeError ("unexpected keyword argument 'sed'")."""
    members = [member, {p: v + 1 for p, v in member.items()}]
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members, progress=False)


def test_the_refusal_of_a_task_field_names_the_users_sampler():
    """It named `<module>.sample` whatever the sampler was called: a user's draw_prompt in their script read as
    __main__.sample, a function that does not exist."""
    def draw_prompt(cfg, key, noise_std=0.0):
        return lr.sample(cfg, key, noise_std=noise_std)

    with pytest.raises(ConfigError, match=r"the sampler test_sweep\.test_the_refusal_of_a_task_field_names_the_users_"
                                          r"sampler\.<locals>\.draw_prompt does not take it"):
        split_fields(["task.dim"], draw_prompt, init)
    with pytest.raises(ConfigError, match=r"the sampler functools\.partial\(<function .*draw_prompt at "):
        split_fields(["task.dim"], functools.partial(draw_prompt, noise_std=0.0), init)


def test_parameters_without_a_default_are_keywords_a_sweep_can_pass():
    """The sweep passes init fields and evaluate's task fields by keyword, so init(key, init_scale) and
    evaluate(params, noise_std) take them (they were refused: only keyword-only or defaulted parameters counted);
    the parameters passed by position (init's key, evaluate's params, the sampler's cfg and key) are not fields."""
    def positional_init(key, init_scale):
        return init(key, init_scale=init_scale)

    def evaluate(params, noise_std):
        return {"noise_std": noise_std * 1.0}

    assert split_fields(["task.noise_std", "init_scale"], lr.sample, positional_init) == {
        "train": [], "task": ["noise_std"], "init": ["init_scale"]}
    with pytest.raises(ConfigError, match=r"key cannot be swept: .*nor a keyword of init \('init_scale',\)"):
        split_fields(["key"], lr.sample, positional_init)
    # init's parameter without a default, not swept: refused up front (it was a TypeError from inside the program)
    with pytest.raises(ConfigError, match=r"init's parameters \['init_scale'\] have no default and no member sets"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(steps=3), positional_init, [{"train.seed": 0}, {"train.seed": 1}],
                    progress=False)
    members = [{"task.noise_std": v, "init_scale": s} for v, s in ((0.0, 0.1), (0.5, 0.2))]
    swept = train_sweep(LOSS, lr.sample, TASK, _cfg(steps=3), positional_init, members, evaluate=evaluate,
                        progress=False)
    reference = train_sweep(LOSS, lr.sample, TASK, _cfg(steps=3), init, members, progress=False)
    _assert_trees_close(swept.params, reference.params, rtol=1e-6, atol=1e-7)  # the same program on the same inputs
    # float32 member arrays: 0.5 is exact
    assert [(r["member"], r["noise_std"]) for r in swept.eval_rows if r["step"] == 3] == [(0, 0.0), (1, 0.5)]


def test_a_seeds_only_sweep_of_sweep_init_members_starts_from_self_attentions_default_init_scale():
    """sweep_init's init_scale had no default, so a sweep that did not set it crashed inside the program; each member
    now trains as SelfAttention with its default init_scale (0.02) trained alone."""
    from jaxicl.models.attention import sweep_init

    init_fn, graphdef = sweep_init(TASK.dim + 1)
    cfg = _cfg(steps=3)
    swept = train_sweep(regression_loss(graphdef), lr.sample, TASK, cfg, init_fn, [{"train.seed": s} for s in (0, 1)],
                        progress=False)
    for i in range(2):
        params = nnx.split(SelfAttention(TASK.dim + 1, rngs=nnx.Rngs(jax.random.key(i))))[1]
        alone = train(regression_loss(graphdef), lr.sample, TASK, dataclasses.replace(cfg, seed=i), params,
                      progress=False)
        # float32, vmapped vs alone: the tolerances of the member-equals-alone test above
        np.testing.assert_allclose(_member_losses(swept, i), [r["loss"] for r in alone.train_rows], rtol=2e-5)
        _assert_trees_close(swept.member_params(i), alone.state.params, rtol=2e-4, atol=1e-6)


def test_a_model_size_keyword_of_init_is_refused_naming_it():
    """init(key, num_heads=<a traced per-member value>) raised JAX's "Shapes must be 1D sequences of concrete values"
    from inside the vmapped init; an init that fails on the member's own values raises its own error."""
    def sized(key, *, num_heads=2, init_scale=0.1):
        return nnx.split(SelfAttention(4, num_heads=num_heads, init_scale=init_scale, rngs=nnx.Rngs(key)))[1]

    members = [{"num_heads": h, "init_scale": 0.1} for h in (1, 2)]
    with pytest.raises(ConfigError, match=re.escape(
            "num_heads cannot be swept: a sweep passes init each member's value as a traced array, and init needs a "
            "concrete one (for a shape, a Python loop or a branch: a model size); sweep keywords init computes with "
            "(e.g. init_scale), or run one sweep per value of num_heads")):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), sized, members, progress=False)

    def broken(key, *, init_scale=0.1):
        return init(key, init_scale=init_scale) + 1  # a TypeError of init's own, whatever the value

    with pytest.raises(TypeError, match="unsupported operand"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), broken, [{"init_scale": 0.1}], progress=False)


def test_invalid_member_values_fail_before_training_naming_the_field():
    with pytest.raises(ValueError, match="lr"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, [{"train.lr": 1e-2}, {"train.lr": -1.0}], progress=False)
    with pytest.raises(ValueError, match="weight_decay"):  # adam has no weight decay
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, [{"train.weight_decay": 0.1}], progress=False)
    with pytest.raises(ConfigError, match=r"evaluate must take every swept task field.*\['noise_std'\]"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, [{"task.noise_std": 0.0}, {"task.noise_std": 1.0}],
                    evaluate=lambda params: {"norm": 0.0}, progress=False)
    with pytest.raises(ConfigError, match=r"seed must be in \[-2147483648, 2147483647\], got 2147483648"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, [{"train.seed": 0}, {"train.seed": 2**31}], progress=False)
    with pytest.raises(ConfigError, match="mesh: a sweep needs a mesh with a 'members' axis"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, [{"train.seed": 0}], mesh=data_mesh(), progress=False)
    auto = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), (MEMBER_AXIS, "data"))  # JAX's reshard raised
    with pytest.raises(ConfigError, match=r"sampling a batch sharded over mesh axis 'data' needs it of type Explicit"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, [{"train.seed": 0}], mesh=auto, progress=False)
    with pytest.raises(ConfigError, match=r"every sweep member must set the same fields, e\.g\. \['train\.lr'\]"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, [{"train.lr": 1e-2}, {"train.seed": 1}], progress=False)
    # a path under another config (sweep_lr_seeds' diversity.train.lr) raised AttributeError looking it up on train
    with pytest.raises(ConfigError, match=r"^diversity\.train\.lr cannot be swept: it is neither a sweepable train "
                                          r"field \('seed', 'lr', 'weight_decay', 'warmup_steps'\), a task field the "
                                          r"sampler takes \('noise_std', 'n_tasks', 'n_context'\), nor a keyword of "
                                          r"init \('init_scale',\)$"):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, [{"diversity.train.lr": 1e-3}], progress=False)


def test_a_sweep_takes_a_dict_or_no_task_config_as_train_does():
    """With no task field swept the sweep replaced fields on task_cfg anyway, so a dict or None config (both of which
    train takes) failed; each now trains as the dataclass config it stands for. A swept task field still needs a
    dataclass config (it is validated on it and sizes the batch), and is refused naming the field otherwise."""
    cfg, members = _cfg(steps=3), [{"train.seed": s} for s in (0, 1)]
    noisy = dataclasses.replace(TASK, noise_std=0.5)
    reference = train_sweep(LOSS, lr.sample, noisy, cfg, init, members, progress=False)
    from_dict = train_sweep(LOSS, lambda c, key: lr.sample(dataclasses.replace(TASK, **c), key), {"noise_std": 0.5},
                            cfg, init, members, progress=False)
    from_none = train_sweep(LOSS, lambda c, key: lr.sample(noisy, key), None, cfg, init, members, progress=False)
    for i in range(2):  # the same program on the same inputs
        np.testing.assert_allclose(_member_losses(from_dict, i), _member_losses(reference, i), rtol=1e-6)
        np.testing.assert_allclose(_member_losses(from_none, i), _member_losses(reference, i), rtol=1e-6)
    with pytest.raises(ConfigError, match=r"task\.noise_std cannot be swept: a swept task field needs a dataclass "
                                          r"task_cfg \(it is validated on it and sizes the batch from it\), got dict"):
        train_sweep(LOSS, lr.sample, {"noise_std": 0.5}, cfg, init, [{"task.noise_std": v} for v in (0.0, 0.5)],
                    progress=False)


def test_a_sweep_of_a_loss_with_no_batch_equals_its_members_trained_alone():
    """train takes sample=None (a loss with no batch); train_sweep crashed reading the signature of None. Its members
    train as they do alone, with a batch_size the mesh's data axis does not divide (no batch is drawn), and a swept
    task field is refused naming the missing sampler."""
    target = jax.numpy.array([1.0, -2.0, 3.0])

    def loss_fn(p, batch):  # [3] parameters, no batch: a smooth non-quadratic bowl
        return jax.numpy.sum(jax.numpy.log(jax.numpy.cosh(p["x"] - target))), {}

    def start(key, *, scale=1.0):
        return {"x": scale * jax.random.normal(key, (3,))}

    cfg = _cfg(batch_size=3, optimizer="adam", schedule="warmup_cosine", warmup_steps=3)
    members = [{"train.seed": 0, "train.lr": 0.1, "scale": 1.0}, {"train.seed": 1, "train.lr": 0.3, "scale": 2.0}]
    swept = train_sweep(loss_fn, None, None, cfg, start, members, mesh=sweep_mesh(2, 2), progress=False)
    for i, m in enumerate(members):
        run = dataclasses.replace(cfg, seed=m["train.seed"], lr=m["train.lr"])
        alone = train(loss_fn, None, None, run, start(jax.random.key(run.seed), scale=m["scale"]), progress=False)
        # float32, two programs (vmapped and alone) of a few elementwise ops: a rounding or two apart (1e-7 seen)
        np.testing.assert_allclose(_member_losses(swept, i), [r["loss"] for r in alone.train_rows], rtol=1e-6)
        _assert_trees_close(swept.member_params(i), alone.state.params, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match=r"^task\.dim cannot be swept: there is no sampler \(sample=None\), so no "
                                          r"task field reaches the loss$"):
        split_fields(["task.dim"], None, start)


def test_a_sweep_leaves_each_members_non_param_variable_as_its_init_drew_it():
    """train_sweep's optimiser leaves a frozen nnx.Variable of the parameters as it is, as train's does, and each
    member's lr and weight decay, held in the optimiser state around it, still reach the member: it trains as alone."""
    def start(key):
        return nnx.split(FrozenFeatures(nnx.Rngs(key)))[1]

    graphdef = nnx.graphdef(FrozenFeatures(nnx.Rngs(0)))
    cfg = _cfg(optimizer="adamw", clip_norm=0.5)
    members = [{"train.seed": 0, "train.lr": 1e-2, "train.weight_decay": 0.1},
               {"train.seed": 1, "train.lr": 3e-2, "train.weight_decay": 0.0}]
    swept = train_sweep(regression_loss(graphdef), lr.sample, TASK, cfg, start, members, progress=False)
    for i, m in enumerate(members):
        first = start(jax.random.key(m["train.seed"]))
        # the sweep's vmapped init and this lone one are two programs (rounding 1 ulp apart is allowed); one Adam step
        # would move each entry by about lr (1e-2, 3e-2)
        np.testing.assert_allclose(swept.member_params(i)["proj"][...], first["proj"][...], rtol=1e-6, atol=1e-7)
        run = dataclasses.replace(cfg, seed=m["train.seed"], lr=m["train.lr"], weight_decay=m["train.weight_decay"])
        alone = train(regression_loss(graphdef), lr.sample, TASK, run, first, progress=False)
        # the tolerance of test_each_member_of_a_vmapped_sweep_equals_the_member_trained_alone: two programs
        np.testing.assert_allclose(_member_losses(swept, i), [r["loss"] for r in alone.train_rows], rtol=2e-5)
        _assert_trees_close(swept.member_params(i), alone.state.params, rtol=2e-4, atol=1e-6)


def test_a_sweep_refuses_an_aux_value_or_evaluation_its_rows_would_lose_before_it_trains(tmp_path):
    """The sweep's "ok" flag replaced an aux value of that name; an evaluation named "member" replaced the row's
    member index, and one that is not a scalar raised numpy's TypeError naming no metric."""
    members = [{"train.lr": 1e-2}, {"train.lr": 2e-2}]
    with pytest.raises(ConfigError, match=re.escape("loss_fn's aux values: 'ok' is a name the engine logs its own "
                                                    "values under; rename it (reserved: loss, grad_norm, grad_rms, "
                                                    "param_rms, update_rms, update_ratio, lr, stopped, ok, step, "
                                                    "split, member)")):
        train_sweep(lambda p, batch: (LOSS(p, batch)[0], {"ok": 1.0}), lr.sample, TASK, _cfg(), init, members,
                    progress=False)
    with pytest.raises(ConfigError, match=re.escape("evaluate: 'member' is a name the engine logs its own values "
                                                    "under; rename it (reserved: step, split, member)")):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members, evaluate=lambda p: {"member": 0.0}, progress=False)
    with pytest.raises(ConfigError, match=re.escape("evaluate: 'w' has shape (3,), but each metric is a scalar")):
        train_sweep(LOSS, lr.sample, TASK, _cfg(), init, members, evaluate=lambda p: {"w": jax.numpy.zeros(3)},
                    out_dir=str(tmp_path), progress=False)
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == []  # refused at step 0, before any step ran


def test_the_stored_config_names_each_swept_field_with_its_sorted_distinct_values():
    from jaxicl.train.sweep_fields import mark_swept, swept_values

    swept = swept_values([{"train.lr": 0.1, "init_scale": 2}, {"train.lr": 0.01, "init_scale": 2},
                          {"train.lr": 0.1, "init_scale": 1}])
    assert swept == {"train.lr": [0.01, 0.1], "init_scale": [1, 2]}
    config = {"train": {"lr": 0.1, "steps": 5}, "task": {"dim": 3}}
    assert mark_swept(config, swept) == {"train": {"lr": {"swept": [0.01, 0.1]}, "steps": 5}, "task": {"dim": 3},
                                         "init_scale": {"swept": [1, 2]}}
    assert config["train"]["lr"] == 0.1  # a copy: the caller's dict is left as it was


def test_an_extended_sweep_equals_a_straight_one_bit_for_bit_through_one_compiled_chunk_program(tmp_path,
                                                                                                chunk_compiles):
    """Evaluations after steps 1 and 3 and chunks of at most 4 steps: 10 steps in chunks of 1, 2, 1, 4, 2 against 5
    steps (1, 2, 1, 1) extended to 10 (3, 2). One compiled chunk program per sweep runs every chunk; compiled per
    length (a lax.scan), the 1-step chunk rounded otherwise."""
    members = [{"train.seed": s, "train.lr": v} for s, v in [(0, 1e-2), (1, 3e-2)]]
    cfg = _cfg(optimizer="adam", steps_per_call=4)
    kw = dict(mesh=sweep_mesh(2), progress=False, evaluate=lambda p: {"w_norm": optax_norm(p)}, eval_every=(1, 3))
    straight = train_sweep(LOSS, lr.sample, TASK, cfg, init, members, out_dir=str(tmp_path / "a"), **kw)
    train_sweep(LOSS, lr.sample, TASK, dataclasses.replace(cfg, steps=5), init, members, out_dir=str(tmp_path / "b"),
                **kw)
    extended = train_sweep(LOSS, lr.sample, TASK, cfg, init, members, out_dir=str(tmp_path / "b"), **kw)
    _assert_trees_close(extended.params, straight.params, rtol=0, atol=0)
    assert _rows(extended) == _rows(straight)
    assert [r["step"] for r in extended.eval_rows if r["member"] == 1] == [0, 1, 3, 10]
    assert len(chunk_compiles) == 3  # one per sweep


def test_numpy_member_values_train_like_the_python_numbers_they_hold():
    cfg = _cfg(steps=3)
    plain = train_sweep(LOSS, lr.sample, TASK, cfg, init, [{"train.seed": s, "train.lr": 1e-2} for s in (0, 1)],
                        progress=False)
    numpy = train_sweep(LOSS, lr.sample, TASK, cfg, init,
                        [{"train.seed": s, "train.lr": np.float64(1e-2)} for s in np.arange(2)], progress=False)
    assert numpy.members == plain.members and type(numpy.members[1]["train.seed"]) is int
    _assert_trees_close(numpy.params, plain.params, rtol=1e-6, atol=1e-7)  # the same program on the same inputs


def test_the_stacked_state_and_batches_are_sharded_over_the_member_and_data_axes():
    from jax.sharding import NamedSharding

    members = [{"train.seed": s} for s in range(4)]
    prog = build_program(LOSS, lr.sample, TASK, _cfg(), init, members, None)
    mesh = sweep_mesh(2, 2)
    with jax.set_mesh(mesh):
        sharding = NamedSharding(mesh, P(MEMBER_AXIS))
        a = prog.inputs(np.arange(4), sharding)
        states, metrics = prog.run_chunk(prog.states(a, sharding), a["task"], 1)
        hlo = prog.run_chunk.lower(prog.states(a, sharding), a["task"], 1).compile().as_text()
    for leaf in jax.tree.leaves(states.params) + [metrics["loss"]]:
        assert leaf.sharding.spec[0] == MEMBER_AXIS and len(leaf.sharding.device_set) == 4
        assert {s.data.shape[0] for s in leaf.addressable_shards} == {2}  # 2 members per device pair
    assert "all-reduce" in hlo  # each member's gradient is summed over its 2 data devices


def test_final_table_and_seed_aggregate_against_hand_computed_values(tmp_path):
    """Member i logs train loss 100 i + step at steps 0..19 and eval loss i + step / 100 at steps 10 and 20; member 2
    diverged. Final train loss: the mean of the last 10% (steps 18, 19); final eval: the last row; the seed aggregate
    leaves the diverged member out of the statistics but counts it."""
    members = [{"train.lr": 0.1, "train.seed": s} for s in range(3)] + [{"train.lr": 0.2, "train.seed": 0}]
    spec = {"fields": ["train.lr", "train.seed"], "members": members, "diverged": {"2": 7}}
    (tmp_path / "sweep.json").write_text(json.dumps(spec))
    rows = [{"step": s, "split": "train", "member": i, "loss": 100.0 * i + s} for s in range(20) for i in range(4)]
    rows += [{"step": s, "split": "eval", "member": i, "loss": i + s / 100} for s in (10, 20) for i in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, table = final_table(str(tmp_path))
    assert [r["diverged_at"] for r in table] == [None, None, 7, None]
    np.testing.assert_allclose([r["train_loss"] for r in table], [18.5, 118.5, 218.5, 318.5])
    np.testing.assert_allclose([r["loss"] for r in table], [0.2, 1.2, 2.2, 3.2])
    agg = aggregate(table, spec["fields"])
    assert [(a["train.lr"], a["seeds"], a["diverged"]) for a in agg] == [(0.1, 3, 1), (0.2, 1, 0)]
    for name, want in (("train_loss", [(68.5, 50.0, 18.5), (318.5, 0.0, 318.5)]),
                       ("loss", [(0.7, 0.5, 0.2), (3.2, 0.0, 3.2)])):
        got = [tuple(a[f"{name}_{s}"] for s in ("mean", "std", "min")) for a in agg]
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_the_sweep_tables_write_a_nan_or_infinite_final_metric_as_null(tmp_path):
    """Member 1's eval metric is undefined (NaN, as jaxicl.analysis.convergence gives), member 2 diverged at
    parameters whose loss overflowed (inf): the tables' JSON holds null (standard JSON has no NaN), their Markdown
    "-"; the seed aggregate's NaN mean (member 1 is in it) is null too."""
    from experiments.common import sweep_report

    members = [{"train.lr": 0.1, "train.seed": s} for s in range(3)]
    spec = {"fields": ["train.lr", "train.seed"], "members": members, "diverged": {"2": 1}, "steps": 1}
    (tmp_path / "sweep.json").write_text(json.dumps(spec))
    rows = [{"step": 0, "split": "train", "member": i, "loss": 1.0} for i in range(3)]
    rows += [{"step": 1, "split": "eval", "member": i, "loss": [1.0, 2.0, float("inf")][i],
              "ratio": [0.5, float("nan"), 0.25][i]} for i in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sweep_report.write_sweep_report(str(tmp_path))

    def strict(name):
        raise ValueError(f"{name} is not standard JSON")
    table = json.loads((tmp_path / "sweep_members.json").read_text(), parse_constant=strict)
    assert [(r["loss"], r["ratio"]) for r in table] == [(1.0, 0.5), (2.0, None), (None, 0.25)]
    (agg,) = json.loads((tmp_path / "sweep_seeds.json").read_text(), parse_constant=strict)
    assert (agg["loss_mean"], agg["ratio_mean"]) == (1.5, None)  # 1.5 = (1 + 2) / 2, exact in binary
    assert (tmp_path / "sweep_members.md").read_text().splitlines()[3].endswith("| 2 | - |")


def test_a_metric_the_first_member_never_logged_keeps_its_column_in_every_sweep_table(tmp_path, capsys):
    """Member 0 diverged at step 0 and logged no train row, member 1 did: the tables take their columns from all rows
    (they took the first row's, and train_loss vanished from both tables), a missing cell is null in the JSON and "-"
    in the Markdown, and the seed aggregate leaves it out of its metric's statistics."""
    from experiments.common import sweep_report

    members = [{"train.lr": lr, "train.seed": 0} for lr in (0.1, 0.2)]
    spec = {"fields": ["train.lr", "train.seed"], "members": members, "diverged": {"0": 0}, "steps": 2}
    (tmp_path / "sweep.json").write_text(json.dumps(spec))
    rows = [{"step": s, "split": "train", "member": 1, "loss": 3.0 + 2 * s} for s in range(2)]
    rows += [{"step": 2, "split": "eval", "member": i, "loss": [float("inf"), 0.5][i]} for i in range(2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sweep_report.write_sweep_report(str(tmp_path))

    assert json.loads((tmp_path / "sweep_members.json").read_text()) == [
        {"member": 0, "train.lr": 0.1, "train.seed": 0, "diverged_at": 0, "last_step": None, "eval_step": 2,
         "loss": None, "train_loss": None},
        {"member": 1, "train.lr": 0.2, "train.seed": 0, "diverged_at": None, "last_step": 1, "eval_step": 2,
         "loss": 0.5, "train_loss": 5.0}]
    assert (tmp_path / "sweep_members.md").read_text().splitlines() == [
        "| member | train.lr | train.seed | diverged_at | last_step | eval_step | loss | train_loss |",
        "|---|---|---|---|---|---|---|---|", "| 0 | 0.1 | 0 | 0 | - | 2 | - | - |",
        "| 1 | 0.2 | 0 | - | 1 | 2 | 0.5 | 5 |"]
    stats = [f"{m}_{s}" for m in ("loss", "train_loss") for s in ("mean", "std", "min")]
    assert json.loads((tmp_path / "sweep_seeds.json").read_text()) == [
        {"train.lr": 0.1, "seeds": 1, "diverged": 1} | dict.fromkeys(stats),
        {"train.lr": 0.2, "seeds": 1, "diverged": 0} | dict(zip(stats, (0.5, 0.0, 0.5, 5.0, 0.0, 5.0)))]
    assert (tmp_path / "sweep_seeds.md").read_text().splitlines()[0] == (
        "| train.lr | seeds | diverged | " + " | ".join(stats) + " |")
    assert capsys.readouterr().err == ""  # finished: member 1 logged step 1 = steps - 1, member 0 diverged


def test_the_report_of_an_interrupted_sweep_says_its_tables_are_partial(tmp_path, capsys):
    """A 10-step sweep stopped with member 1 at step 4 and member 3 not started (member 0 finished at step 9, member 2
    diverged at step 2): its tables held the numbers of step 4 as final, with nothing saying so. Now each member's
    last logged train step is a column, the report warns on stderr and titles both Markdown tables partial."""
    from experiments.common import sweep_report

    members = [{"train.seed": s} for s in range(4)]
    spec = {"fields": ["train.seed"], "members": members, "diverged": {"2": 2}, "steps": 10}
    (tmp_path / "sweep.json").write_text(json.dumps(spec))
    rows = [{"step": s, "split": "train", "member": i, "loss": 1.0} for i, last in enumerate((9, 4, 2)) for s in
            range(last + 1)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sweep_report.write_sweep_report(str(tmp_path))

    partial = "partial: 2 of 4 members unfinished, last logged step below 9 of 10 steps: see last_step"
    assert capsys.readouterr().err == f"warning: {tmp_path}: {partial}\n"
    table = json.loads((tmp_path / "sweep_members.json").read_text())
    assert [r["last_step"] for r in table] == [9, 4, 2, None]
    for name, header in (("sweep_members", "| member | train.seed | diverged_at | last_step | train_loss |"),
                         ("sweep_seeds", "| seeds | diverged | train_loss_mean | train_loss_std | train_loss_min |")):
        assert (tmp_path / f"{name}.md").read_text().splitlines()[:3] == [f"# {name} ({partial})", "", header]


def test_a_sweep_stopped_before_its_final_evaluation_is_reported_partial_with_its_eval_step(tmp_path, capsys):
    """A 10-step sweep interrupted after its last train rows (step 9), before its final evaluation (at step 10), was
    reported as final with the evaluation of step 5. Now the eval step is a column, and the tables are partial until
    every member has its evaluation at step 10."""
    from experiments.common import sweep_report

    members = [{"train.lr": lr} for lr in (0.1, 0.2)]
    (tmp_path / "sweep.json").write_text(json.dumps({"fields": ["train.lr"], "members": members, "diverged": {},
                                                     "steps": 10}))
    train = [{"step": s, "split": "train", "member": i, "loss": 1.0} for s in range(10) for i in range(2)]
    evals = [{"step": s, "split": "eval", "member": i, "loss": 10.0 * i + s} for s in (0, 5) for i in range(2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train + evals))
    sweep_report.write_sweep_report(str(tmp_path))

    partial = ("partial: 2 of 2 members unfinished, last logged step below 9 or last evaluation below step 10 of 10 "
               "steps: see last_step, eval_step")
    assert capsys.readouterr().err == f"warning: {tmp_path}: {partial}\n"
    table = json.loads((tmp_path / "sweep_members.json").read_text())
    assert [(r["last_step"], r["eval_step"], r["loss"]) for r in table] == [(9, 5, 5.0), (9, 5, 15.0)]
    header = "| member | train.lr | diverged_at | last_step | eval_step | train_loss | loss |"
    assert (tmp_path / "sweep_members.md").read_text().splitlines()[:3] == [f"# sweep_members ({partial})", "", header]

    final = [{"step": 10, "split": "eval", "member": i, "loss": 10.0 * i + 10} for i in range(2)]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in final))
    sweep_report.write_sweep_report(str(tmp_path))
    assert capsys.readouterr().err == ""
    table = json.loads((tmp_path / "sweep_members.json").read_text())
    assert [(r["last_step"], r["eval_step"], r["loss"]) for r in table] == [(9, 10, 10.0), (9, 10, 20.0)]
    assert "eval_step_mean" not in json.loads((tmp_path / "sweep_seeds.json").read_text())[0]  # a step, not a metric


def test_the_learning_curves_order_an_infinite_pool_as_the_loss_vs_pool_plot_does(tmp_path, monkeypatch):
    """sweep_curves.png coloured task.n_tasks = 0 (a fresh task per prompt) first, next to pool 1, while the loss-vs-
    pool plot draws it at the right as "inf (0)"; both take axis_layout's order and names now, also where the finite
    pools span less than 20x (the smoke preset's 1, 16, 0, whose loss plot drew 0 at the left)."""
    import matplotlib
    import matplotlib.pyplot as plt

    from experiments.common import sweep_report

    at, names, log_x = sweep_report.axis_layout([16, 1, 0, 16], "task.n_tasks")
    assert (at, names, log_x) == ({0: 128, 1: 1, 16: 16}, {0: "inf (0)", 1: "1", 16: "16"}, True)
    assert sweep_report.axis_layout([0, 1e-3, 1e-1], "train.lr")[1:] == ({0: "0", 1e-3: "0.001", 1e-1: "0.1"}, True)
    assert sweep_report.axis_layout([0, 1, 2], "train.seed") == ({0: 0, 1: 1, 2: 2}, {0: "0", 1: "1", 2: "2"}, False)

    figures = []
    monkeypatch.setattr(sweep_report, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)
    members = [{"task.n_tasks": k, "train.seed": 0} for k in (0, 1, 16)]
    spec = {"fields": ["task.n_tasks", "train.seed"], "members": members, "diverged": {}}
    rows = [{"step": s, "split": "train", "member": i, "loss": 1.0 + i} for s in range(2) for i in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sweep_report.plot_curves(str(tmp_path), spec, str(tmp_path))
    curves = figures[0].axes[0]
    plt.close(figures[0])
    agg = [{"task.n_tasks": k, "loss_mean": 1.0, "loss_std": 0.0, "loss_min": 1.0} for k in (0, 1, 16)]
    fig, pool = plt.subplots()
    sweep_report.plot_vs_axis(agg, spec["fields"], "task.n_tasks", "loss", ax=pool)
    plt.close(fig)
    viridis = matplotlib.colormaps["viridis"]
    lines = {line.get_label(): line.get_color() for line in curves.get_lines()}
    assert lines == {"task.n_tasks=inf (0)": viridis(1.0), "task.n_tasks=1": viridis(0.0),
                     "task.n_tasks=16": viridis(0.5)}
    np.testing.assert_array_equal(pool.get_lines()[0].get_xdata(), [1, 16, 128])  # the infinite pool at the right
    assert [t.get_text() for t in pool.get_xticklabels()] == ["inf (0)", "1", "16"]
