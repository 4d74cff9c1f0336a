"""metrics.jsonl: one JSON object per line, written by process 0 only (jaxicl.outputs)."""

import json
import os
from collections.abc import Callable

import jax
import numpy as np

from jaxicl import outputs
from jaxicl.train.chunks import EvalSchedule, evaluates_at
from jaxicl.train.config import TrainConfig


def _jsonable(v):
    if isinstance(v, (np.ndarray, np.generic, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    return v


class MetricsWriter:
    """Appends rows {"step": s, "split": ..., name: value} to `path`, first keeping only the existing rows for which
    keep(row) is true (kept_on_resume: those a resumed run does not write again), so an interrupted and resumed run
    leaves the same file as an uninterrupted one.

    keep_until_saved(row): the rows kept until the run saves its first checkpoint (saved()) although keep drops them:
    those the checkpoint's own run keeps. A longer run resumed from a shorter finished run's last checkpoint drops
    that run's last train row and final evaluation; stopped before it saves a checkpoint of its own (Ctrl-C, an
    error), the shorter run's command still finds its run finished, and its file whole.
    """

    def __init__(self, path: str | None, keep: Callable[[dict], bool],
                 keep_until_saved: Callable[[dict], bool] | None = None):
        self.path, self._until_saved = path, []
        if path is None:
            return
        rows = read_metrics(path) if outputs.is_primary() and os.path.exists(path) else []
        kept = [r for r in rows if keep(r) or keep_until_saved is not None and keep_until_saved(r)]
        self._until_saved = [i for i, r in enumerate(kept) if not keep(r)]  # their lines; later writes only append
        outputs.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def saved(self) -> None:
        """The run saved a checkpoint: drops the rows kept until then (keep_until_saved's)."""
        if self._until_saved:
            drop = set(self._until_saved)
            rows = [r for i, r in enumerate(read_metrics(self.path)) if i not in drop]
            outputs.write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
            self._until_saved = []

    def write(self, rows: list[dict]) -> None:
        if self.path is None or not rows:
            return
        outputs.write_text(self.path, "".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n"
                                              for r in rows), append=True)


def kept_on_resume(row: dict, resume_step: int, cfg: TrainConfig, eval_every: EvalSchedule) -> bool:
    """Whether a row survives a resume from resume_step of a run of cfg.steps steps: the rows before resume_step that
    an uninterrupted run writes. Nothing survives a start from step 0. An earlier run of fewer steps that ended at
    resume_step logged its last step and evaluated at its end: those two rows go unless this run logs that step
    (log_every) and evaluates there (eval_every); MetricsWriter keeps them until this run saves a checkpoint. The
    evaluation at resume_step of a run stopped there (stop_loss) goes too; the resumed run stops there again and
    evaluates it anew.
    """
    step = row["step"]
    if row.get("split") == "eval":
        return step < resume_step or step == resume_step > 0 and (step == cfg.steps or evaluates_at(step, eval_every))
    return step < resume_step and (step % cfg.log_every == 0 or step == cfg.steps - 1)


def read_metrics(path: str, split: str | None = None) -> list[dict]:
    """Rows of a metrics.jsonl, optionally only one split ("train" or "eval")."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
    return [r for r in rows if split is None or r.get("split") == split]
