"""Sweep axis specs: lists, ranges, log and linear ranges, field resolution, clear errors."""

import dataclasses
import typing

import numpy as np
import pytest

from jaxicl.tasks.linear_regression import LinearRegression
from jaxicl.train import TrainConfig
from jaxicl.config_paths import leaf_paths, resolve
from jaxicl.train.sweep_spec import Axis, grid, member_config, parse_axes, parse_axis, resolve_axes
from jaxicl.validation import ConfigError


@dataclasses.dataclass(frozen=True)
class Cfg:
    task: LinearRegression = LinearRegression()
    train: TrainConfig = TrainConfig()
    init_scale: float = 0.01
    eval: TrainConfig = TrainConfig()  # a second `lr` and `seed`, to make the short names ambiguous here


@pytest.mark.parametrize("spec,field,values", [
    ("lr=1e-4,3e-4,1e-3", "lr", (1e-4, 3e-4, 1e-3)),
    ("seed=0:8", "seed", tuple(range(8))),
    ("seed=2:11:3", "seed", (2, 5, 8)),
    ("train.seed=-2:0", "train.seed", (-2, -1)),
    ("n_tasks=1,4,16,0", "n_tasks", (1, 4, 16, 0)),
    ("noise_std=lin:0:1:5", "noise_std", (0.0, 0.25, 0.5, 0.75, 1.0)),
    (" lr = 7 ", "lr", (7,)),
])
def test_axis_specs_parse_to_values(spec, field, values):
    axis = parse_axis(spec)
    assert axis.field == field and axis.values == values


def test_log_range_is_geometric_and_includes_both_ends():
    values = parse_axis("lr=log:1e-4:1e-2:5").values
    np.testing.assert_allclose(values, [1e-4, 10**-3.5, 1e-3, 10**-2.5, 1e-2], rtol=1e-10)
    assert parse_axis("lr=log:1e-3:1e-3:1").values == (1e-3,)


@pytest.mark.parametrize("spec,match", [
    ("lr", "must look like"), ("=1,2", "must look like"), ("lr=", "must look like"), ("1lr=3", "must look like"),
    ("lr=1e-4,,1e-3", "empty value"), ("lr=1e-4;3e-4", "is not a number"), ("lr=a,b", "'a' is not a number"),
    ("seed=0:8:0", "step must not be 0"), ("seed=5:2", "is empty"), ("lr=0.1:0.5", "needs integers"),
    ("seed=0:2:3:4", "start:stop"), ("lr=log:0:1:3", "bounds must be > 0"), ("lr=log:1e-3:1e-1", "needs lo:hi:n"),
    ("lr=log:1e-3:1e-1:2.5", "n must be an integer"), ("lr=lin:0:1:0", "n must be an integer >= 1"),
    ("seed=0:2,5", "mix of ',' and ':'"), ("lr=nan", "not a finite number"),
    # one value is lo: "both included" dropped hi
    ("lr=lin:0:1:1", "lin: one value cannot include both bounds 0 and 1"), ("lr=log:1e-4:1e-2:1", "both bounds"),
    ("lr=1,1", r"^sweep axis 'lr' repeats the value 1: give each value once, got \(1, 1\)$"),  # validation's words
])
def test_malformed_specs_are_clear_errors_quoting_the_spec(spec, match):
    with pytest.raises(ConfigError, match=match) as err:
        parse_axis(spec)
    assert spec.strip().split("=")[0] in str(err.value) or spec.startswith("=")


@pytest.mark.parametrize("specs,message", [
    (["seed=0:3000000000"], "sweep axis 'seed=0:3000000000' has 3000000000 values, more than the 1000000 allowed"),
    (["seed=0:1000001"], "sweep axis 'seed=0:1000001' has 1000001 values, more than the 1000000 allowed"),
    (["lr=log:1e-4:1:2000000"], "sweep axis 'lr=log:1e-4:1:2000000' has 2000000 values, more than the 1000000 allowed"),
    (["seed=0:1000", "lr=lin:0:1:1001"], "the sweep grid seed(1000) x lr(1001) has 1001000 members, more than the "
                                         "1000000 allowed"),
])
def test_an_axis_or_grid_above_a_million_is_refused_before_its_values_are_built(specs, message):
    """seed=0:3000000000 built a list of 3e9 ints and the process was killed for memory, without a message."""
    with pytest.raises(ConfigError) as err:
        parse_axes(specs)
    assert str(err.value) == message


def test_grid_refuses_more_than_a_million_members_and_a_million_values_parse():
    with pytest.raises(ConfigError, match=r"^the sweep grid a\(1000\) x b\(1001\) has 1001000 members"):
        grid((Axis("a", tuple(range(1000))), Axis("b", tuple(range(1001)))))
    assert [len(a.values) for a in parse_axes(["seed=0:1000000"])] == [1000000]
    assert parse_axes(["seed=10:0:-3"])[0].values == (10, 7, 4, 1)  # the count of a descending range


def test_an_axis_given_twice_is_an_error():
    with pytest.raises(ConfigError, match="'lr' is given twice"):
        parse_axes(["lr=1,2", "lr=3"])


def test_grid_is_the_product_first_axis_slowest():
    members = grid(parse_axes(["lr=1,2", "seed=0:3"]))
    assert members == [{"lr": a, "seed": s} for a in (1, 2) for s in (0, 1, 2)]


def test_short_names_resolve_to_unique_paths_and_values_take_the_field_type():
    cfg = Cfg()
    assert resolve(cfg, "noise_std") == "task.noise_std"
    assert resolve(cfg, "train.lr") == "train.lr"
    assert resolve(cfg, "init_scale") == "init_scale"
    axes = resolve_axes(cfg, (Axis("task.n_tasks", (1.0, 4)), Axis("init_scale", (1, 2))))
    assert axes[0].values == (1, 4) and all(isinstance(v, int) for v in axes[0].values)
    assert axes[1].values == (1.0, 2.0) and all(isinstance(v, float) for v in axes[1].values)


@pytest.mark.parametrize("axis,match", [
    (Axis("lr", (1e-3,)), r"'lr' is ambiguous.*\['train.lr', 'eval.lr'\]"),
    (Axis("learning_rate", (1e-3,)), "unknown field 'learning_rate' in Cfg; fields: .*train.lr"),
    (Axis("task.n_tasks", (1.5,)), "task.n_tasks' takes integers, got 1.5"),
    (Axis("train.optimizer", (1,)), "train.optimizer' has type str; only int and float"),
    (Axis("train.lr", (1e-3,)), None),
])
def test_resolution_errors_name_the_field_and_the_choices(axis, match):
    if match is None:
        assert resolve_axes(Cfg(), (axis,))[0].field == "train.lr"
        return
    with pytest.raises(ConfigError, match=match):
        resolve_axes(Cfg(), (axis,))


def test_a_name_that_is_a_path_is_that_field_even_where_nested_paths_end_in_it():
    """The README's example: ar_gd_step's `init_scale` (its model's) and `task.init_scale` (the first state's scale)
    are set by those names, each leaving the other at its preset's value."""
    from experiments.ar_gd_step import Config

    from jaxicl.config_paths import apply_overrides

    cfg = Config()
    assert (cfg.init_scale, cfg.task.init_scale) == (0.3, 1.0)
    assert resolve(cfg, "init_scale") == "init_scale" and resolve(cfg, "task.init_scale") == "task.init_scale"
    assert [p for p in leaf_paths(cfg) if p.endswith("init_scale")] == ["task.init_scale", "init_scale"]
    top, task = apply_overrides(cfg, ["init_scale=0.5"]), apply_overrides(cfg, ["task.init_scale=0.5"])
    assert (top.init_scale, top.task.init_scale, task.init_scale, task.task.init_scale) == (0.5, 1.0, 0.3, 0.5)


def test_member_config_sets_nested_fields_and_validates_them():
    cfg = member_config(Cfg(), {"train.lr": 3e-4, "task.noise_std": 0.5, "init_scale": 0.2})
    assert (cfg.train.lr, cfg.task.noise_std, cfg.init_scale) == (3e-4, 0.5, 0.2)
    with pytest.raises(ValueError, match="noise_std"):
        member_config(Cfg(), {"task.noise_std": -1.0})


@pytest.mark.parametrize("override,match", [
    ("train.seed=1e-3", r"train.seed=1e-3: .*type int, got '1e-3'"),  # was int(0.001) = 0
    ("train.seed=1e400", r"train.seed=1e400: .*type int"),
    # every float field refuses them as text, naming the path: an infinity passed the fields that no check bounds
    # above (gd_equivalence's max_ood_gap), then the run crashed writing config.json, which JSON cannot hold
    ("train.lr=inf", r"^train\.lr=inf: train\.lr expects a finite number, got 'inf'$"),
    ("task.noise_std=nan", r"^task\.noise_std=nan: task\.noise_std expects a finite number, got 'nan'$"),
    ("task.x_scale=-inf", r"^task\.x_scale=-inf: task\.x_scale expects a finite number, got '-inf'$"),
    ("task.x_scale=1e400", r"^task\.x_scale=1e400: task\.x_scale expects a finite number, got '1e400'$"),
    ("train.warmup_steps=5", r"warmup_steps=5 needs schedule='warmup_cosine'"),
])
def test_overrides_refuse_non_integral_ints_non_finite_numbers_and_an_unused_warmup(override, match):
    from jaxicl.config_paths import apply_overrides

    assert apply_overrides(Cfg(), ["train.seed=2e3"]).train.seed == 2000
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Cfg(), [override])


def test_an_override_of_a_fixed_length_tuple_takes_exactly_its_items_each_of_its_own_type():
    """tuple[int, int] took any number of values (abstractions_lea's rfs_ramp=10,20,30 started, then failed 20 s
    later in lea_loss), and every item was parsed by the first item's type."""
    from jaxicl.config_paths import apply_overrides

    @dataclasses.dataclass(frozen=True)
    class Pairs:
        ramp: tuple[int, float] = (1, 0.5)
        sizes: tuple[int, ...] = (1,)

    changed = apply_overrides(Pairs(), ["ramp=3,2.5", "sizes=4,5,6"])
    assert (changed.ramp, changed.sizes) == ((3, 2.5), (4, 5, 6))
    assert [type(v) for v in changed.ramp] == [int, float]
    for text, n in (("1,2,3", 3), ("1", 1)):
        with pytest.raises(ConfigError) as e:
            apply_overrides(Pairs(), [f"ramp={text}"])
        assert str(e.value) == f"ramp={text}: ramp takes 2 comma-separated values (tuple[int, float]), got {n}"
    with pytest.raises(ConfigError, match=r"^ramp=2\.5,1: ramp expects a value of type int, got '2\.5'$"):
        apply_overrides(Pairs(), ["ramp=2.5,1"])


def test_an_override_of_a_literal_field_takes_one_of_its_values_each_parsed_by_its_own_type():
    """A typing.Literal field crashed the override: "TypeError: Cannot instantiate typing.Literal"."""
    from jaxicl.config_paths import apply_overrides

    @dataclasses.dataclass(frozen=True)
    class Kinds:
        kind: typing.Literal["linear", "softmax"] = "linear"
        heads: typing.Literal[1, 2, "auto"] = 1
        mode: typing.Literal["a", None] = "a"
        norm: typing.Literal["pre", "post"] | None = None

    changed = apply_overrides(Kinds(), ["kind=softmax", "heads=2", "mode=none", "norm=post"])
    assert changed == Kinds(kind="softmax", heads=2, mode=None, norm="post")
    assert type(changed.heads) is int
    assert apply_overrides(Kinds(), ["heads=auto", "norm=none"]) == Kinds(heads="auto", norm=None)
    for override, message in (("kind=relu", "kind=relu: kind must be one of ('linear', 'softmax'), got 'relu'"),
                              ("heads=3", "heads=3: heads must be one of (1, 2, 'auto'), got '3'"),
                              ("mode=b", "mode=b: mode must be one of ('a', None), got 'b'")):
        with pytest.raises(ConfigError) as e:
            apply_overrides(Kinds(), [override])
        assert str(e.value) == message


@pytest.mark.parametrize("name,path", [("lr", "train.lr"), ("train.lr", "train.lr"), ("noise_std", "task.noise_std"),
                                       ("init_scale", "init_scale")])
def test_an_override_and_a_sweep_axis_name_the_same_field_the_same_way(name, path):
    from experiments.gd_equivalence import Config

    from jaxicl.config_paths import apply_overrides

    cfg = Config()
    overridden = apply_overrides(cfg, [f"{name}=0.25"])
    changed = [p for p in leaf_paths(cfg) if resolve(overridden, p) and _get(overridden, p) != _get(cfg, p)]
    assert changed == [path]
    assert resolve_axes(cfg, parse_axes([f"{name}=0.25,0.5"]))[0].field == path


def _get(cfg, path):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg
