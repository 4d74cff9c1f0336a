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
    """

    def __init__(self, path: str | None, keep: Callable[[dict], bool]):
        self.path = path
        if path is None:
            return
        kept = [r for r in read_metrics(path) if keep(r)] if outputs.is_primary() and os.path.exists(path) else []
        outputs.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, rows: list[dict]) -> None:
        if self.path is None or not rows:
            return
        outputs.write_text(self.path, "".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n"
                                              for r in rows), append=True)


def kept_on_resume(row: dict, resume_step: int, cfg: TrainConfig, eval_every: EvalSchedule) -> bool:
    """Whether a row survives a resume from resume_step of a run of cfg.steps steps: the rows before resume_step that
    an uninterrupted run writes. Nothing survives a start from step 0. An earlier run of fewer steps that ended at
    resume_step logged its last step and evaluated at its end: those two rows go unless this run logs that step
    (log_every) and evaluates there (eval_every). The evaluation at resume_step of a run stopped there (stop_loss)
    goes too; the resumed run stops there again and evaluates it anew.
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
