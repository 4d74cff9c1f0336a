"""metrics.jsonl: one JSON object per line, written by process 0 only (jaxicl.outputs)."""

import json
import os

import jax
import numpy as np

from jaxicl import outputs


def _jsonable(v):
    if isinstance(v, (np.ndarray, np.generic, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    return v


class MetricsWriter:
    """Appends rows {"step": s, "split": ..., name: value} to `path`.

    On resume from step c it first drops the rows that the resumed run will write again
    (train rows with step >= c, eval rows with step > c, or >= 0 when c = 0), so an interrupted and resumed run
    leaves the same file as an uninterrupted one. `keep(row) -> bool` replaces that rule (a
    chunked sweep resumes one chunk of members and keeps the finished chunks' rows).
    """

    def __init__(self, path: str | None, resume_step: int = 0, keep=None):
        self.path = path
        if path is None:
            return
        keep = keep or (lambda r: kept_on_resume(r, resume_step))
        kept = [r for r in read_metrics(path) if keep(r)] if outputs.is_primary() and os.path.exists(path) else []
        outputs.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, rows: list[dict]) -> None:
        if self.path is None or not rows:
            return
        outputs.write_text(self.path, "".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n"
                                              for r in rows), append=True)


def kept_on_resume(row: dict, resume_step: int) -> bool:
    """Whether a row survives a resume from resume_step (a run from step 0 evaluates step 0 again)."""
    return row["step"] < resume_step or (row.get("split") == "eval" and row["step"] == resume_step > 0)


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
