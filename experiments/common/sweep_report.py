"""Reports of a sweep directory (sweep.json + metrics.jsonl): tables and plots, regenerable from disk.

  sweep_members.md / .json   final metrics per member with its values, last logged train step and (where the
                             sweep evaluates) the step of its last evaluation (diverged members marked); the
                             Markdown titled "partial" where a member has not finished
  sweep_seeds.md / .json     aggregated over seeds: mean, std, min and count per other combination
  sweep_<metric>_vs_<axis>.png   the final metric against one swept axis, mean with seed bands
  sweep_curves.png           learning curves (train loss) per member

The final value of a metric is its last eval row when the sweep evaluated, else the mean train
loss over the last 10% of the logged steps (one batch is noisy).
"""

import json
import os
import sys
from collections import defaultdict

import numpy as np

from experiments.common.figures import new_figure, save_figure
from jaxicl import outputs
from jaxicl.train.metrics import read_metrics

SEED_FIELD = "train.seed"


def find_sweeps(root: str) -> list[str]:
    """Every directory under root (root included) holding a sweep.json."""
    return sorted(d for d, _, files in os.walk(root) if "sweep.json" in files)


def final_table(sweep_dir: str) -> tuple[dict, list[dict]]:
    """(sweep.json, one row per member: member, its values, diverged_at, last_step (its last logged train step,
    None without one), eval_step (the step of its last eval row; only where it has one), final metrics)."""
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        spec = json.load(f)
    rows = read_metrics(os.path.join(sweep_dir, "metrics.jsonl"))
    by_member = defaultdict(lambda: {"train": [], "eval": []})
    for r in rows:
        by_member[r["member"]][r["split"]].append(r)
    table = []
    for i, values in enumerate(spec["members"]):
        train, evals = by_member[i]["train"], by_member[i]["eval"]
        row = {"member": i, **values, "diverged_at": spec["diverged"].get(str(i)),
               "last_step": train[-1]["step"] if train else None}
        if evals:
            row["eval_step"] = evals[-1]["step"]
        if train:
            tail = train[-max(1, len(train) // 10):]
            row["train_loss"] = float(np.mean([r["loss"] for r in tail]))
        if evals:
            row.update({k: v for k, v in evals[-1].items() if k not in values and k not in ("step", "split", "member")})
        table.append(row)
    return spec, table


def columns(rows: list[dict]) -> list[str]:
    """The keys of all rows in first-seen order: a member with no train rows (diverged at step 0) has no train_loss,
    so the first row alone may lack a column the others have."""
    return list(dict.fromkeys(k for r in rows for k in r))


def metric_names(table: list[dict], fields: list[str]) -> list[str]:
    skip = set(fields) | {"member", "diverged_at", "last_step", "eval_step"}
    return [k for k in columns(table) if k not in skip]


def partial(spec: dict, table: list[dict]) -> str | None:
    """What says the tables are not final, None where they are: the members neither diverged nor logged the last
    step (steps - 1) and, in a sweep that evaluates, the final evaluation (at steps). A sweep interrupted before its
    end, e.g. by Ctrl-C, reports the numbers of where it stopped; one interrupted after its last step's train rows,
    before its final evaluation, an earlier evaluation's."""
    steps = spec["steps"]
    evaluates = any(r.get("eval_step") is not None for r in table)
    unfinished = [r for r in table if r["diverged_at"] is None and (r["last_step"] is None or r["last_step"] < steps - 1
                                                                     or evaluates and r.get("eval_step") != steps)]
    if not unfinished:
        return None
    evaluation = f" or last evaluation below step {steps}" if evaluates else ""
    return (f"partial: {len(unfinished)} of {len(table)} members unfinished, last logged step below {steps - 1}"
            f"{evaluation} of {steps} steps: see last_step{', eval_step' if evaluates else ''}")


def aggregate(table: list[dict], fields: list[str]) -> list[dict]:
    """Mean, std and min of every metric over seeds, per combination of the other fields."""
    others = [f for f in fields if f != SEED_FIELD]
    groups = defaultdict(list)
    for row in table:
        groups[tuple(row[f] for f in others)].append(row)
    out = []
    for key, rows in groups.items():
        agg = dict(zip(others, key)) | {"seeds": len(rows), "diverged": sum(r["diverged_at"] is not None for r in rows)}
        for m in metric_names(table, fields):
            values = np.array([r[m] for r in rows if r["diverged_at"] is None and r.get(m) is not None], float)
            stats = (values.mean(), values.std(), values.min()) if len(values) else (None,) * 3
            agg |= {f"{m}_{s}": None if v is None else float(v) for s, v in zip(("mean", "std", "min"), stats)}
        out.append(agg)
    return out


def _markdown(rows: list[dict], title: str | None = None) -> str:
    cols = columns(rows)
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ([f"# {title}", ""] if title else []) + ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]) + "\n"


def axis_layout(values, axis: str) -> tuple[dict, dict, bool]:
    """({value: x position}, {value: its name}, logarithmic?) of the numbers values of a swept axis. Positive values
    spanning more than 20x get a log axis, with 0 drawn at the right (8x past the largest), named "0". A pool size
    axis (*n_tasks) holding 0, an infinite pool (a fresh task per prompt), always does, and names it "inf (0)"."""
    values = sorted(set(values))
    positive = [v for v in values if v > 0]
    infinite_pool = axis.endswith("n_tasks") and 0 in values
    log_x = bool(positive) and min(values) >= 0 and (infinite_pool or max(positive) / min(positive) > 20)
    at = {v: (v if v > 0 or not log_x else max(positive) * 8) for v in values}
    names = {v: ("inf (0)" if infinite_pool else "0") if v == 0 and log_x else f"{v:g}" for v in values}
    return at, names, log_x


def plot_vs_axis(agg: list[dict], fields: list[str], axis: str, metric: str, out_dir: str | None = None, ax=None,
                 label_prefix: str = ""):
    """metric (mean over seeds, band +-std, min dotted) against `axis`, one line per other combination.

    Draws into `ax` when given, else saves sweep_<metric>_vs_<axis>.png in out_dir and returns its name.
    """
    own = ax is None
    if own:
        fig, axes = new_figure()
        ax = axes[0, 0]
    others = [f for f in fields if f not in (axis, SEED_FIELD)]
    lines = defaultdict(list)
    for r in agg:
        if r.get(f"{metric}_mean") is not None:
            lines[tuple(r[o] for o in others)].append(r)
    values = sorted({r[axis] for r in agg})
    at, names, log_x = axis_layout(values, axis)
    for key, rows in sorted(lines.items()):
        rows = sorted(rows, key=lambda r: at[r[axis]])
        x = np.array([at[r[axis]] for r in rows], float)
        mean, std = (np.array([r[f"{metric}_{s}"] for r in rows]) for s in ("mean", "std"))
        label = label_prefix + (", ".join(f"{o}={v}" for o, v in zip(others, key)) or "mean over seeds")
        line, = ax.plot(x, mean, "o-", label=label)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.25)
        ax.plot(x, [r[f"{metric}_min"] for r in rows], ":", color=line.get_color(), lw=1)
    if log_x:
        ax.set_xscale("log")
        if 0 in at:  # e.g. n_tasks = 0, an infinite task pool
            ax.set_xticks([at[v] for v in values], [names[v] for v in values])
    ax.set(xlabel=axis, ylabel=f"final {metric}", yscale="log")
    ax.set_title(f"{metric} vs {axis}: mean, ±std band, min (dotted)", fontsize=9)
    ax.legend(fontsize=7)
    if own:
        return save_figure(fig, out_dir, f"sweep_{metric}_vs_{axis.replace('.', '_')}")
    return None


def plot_curves(sweep_dir: str, spec: dict, out_dir: str, color_by: str | None = None) -> str:
    """Train loss against step for every member, coloured by one swept axis (the first non-seed one), its values in
    the order and with the names of plot_vs_axis's x axis (axis_layout: an infinite pool last, "inf (0)")."""
    import matplotlib

    rows = read_metrics(os.path.join(sweep_dir, "metrics.jsonl"), "train")
    fields = spec["fields"]
    color_by = color_by or next((f for f in fields if f != SEED_FIELD), fields[0])
    at, names, _ = axis_layout([m[color_by] for m in spec["members"]], color_by)
    levels = sorted(at, key=at.get)
    cmap = matplotlib.colormaps["viridis"]
    fig, axes = new_figure(size=(5.5, 3.6))
    ax = axes[0, 0]
    labelled = set()
    for i, m in enumerate(spec["members"]):
        r = [x for x in rows if x["member"] == i]
        if not r:
            continue
        c = cmap(levels.index(m[color_by]) / max(len(levels) - 1, 1))
        label = None if m[color_by] in labelled else f"{color_by}={names[m[color_by]]}"
        labelled.add(m[color_by])
        ax.plot([x["step"] for x in r], [x["loss"] for x in r], color=c, lw=0.8, alpha=0.8, label=label)
        if str(i) in spec["diverged"]:  # where a diverged member stopped
            ax.plot(r[-1]["step"], r[-1]["loss"], "rx")
    ax.set(xlabel="step", ylabel="train loss", yscale="log", title=f"learning curves, colour = {color_by}")
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, out_dir, "sweep_curves")


def write_sweep_report(sweep_dir: str, metric: str | None = None) -> list[str]:
    """Writes the tables and plots of the sweep in sweep_dir; returns the files written (relative). Warns on stderr
    where a member has not finished (the tables then hold the numbers of where the sweep stopped)."""
    spec, table = final_table(sweep_dir)
    unfinished = partial(spec, table)
    if unfinished:
        print(f"warning: {sweep_dir}: {unfinished}", file=sys.stderr)
    fields = spec["fields"]
    agg = aggregate(table, fields)
    files = []
    for name, rows in (("sweep_members", table), ("sweep_seeds", agg)):
        # an undefined eval metric (NaN) or a diverged member's overflowed loss: null in the JSON, which has no NaN;
        # so is a metric a member never logged (every row holds every column)
        cols = columns(rows)
        rows = outputs.finite_rows([{c: r.get(c) for c in cols} for r in rows])
        outputs.write_json(os.path.join(sweep_dir, f"{name}.json"), rows)
        title = f"{name} ({unfinished})" if unfinished else None
        outputs.write_text(os.path.join(sweep_dir, f"{name}.md"), _markdown(rows, title))
        files += [f"{name}.md", f"{name}.json"]
    metric = metric or ("loss" if "loss" in metric_names(table, fields) else "train_loss")
    for axis in (f for f in fields if f != SEED_FIELD):
        if len({m[axis] for m in spec["members"]}) > 1 and all(isinstance(m[axis], (int, float)) for m in spec["members"]):
            files.append(plot_vs_axis(agg, fields, axis, metric, sweep_dir))
    files.append(plot_curves(sweep_dir, spec, sweep_dir))
    return files
