"""The one writer of every file jaxicl and its experiments produce (orbax checkpoints aside).

In a multi-host run every process runs the same program, but only process 0 writes: metrics, JSON,
arrays, figures and reports all go through `write_with`, which does nothing on the other processes.
Each write is logged at DEBUG level on the "jaxicl.outputs" logger (with the process index), so a
run can be audited for files written twice.
"""

import json
import logging
import os
from collections.abc import Callable

import jax
import numpy as np

log = logging.getLogger("jaxicl.outputs")


def is_primary() -> bool:
    """Whether this process writes files (process 0)."""
    return jax.process_index() == 0


def write_with(path: str, write: Callable[[str], None], *, atomic: bool = True) -> None:
    """Calls write(p) on process 0 only, after creating its directory. atomic: p is a file beside path with the same
    extension (savefig and savez read it), which then replaces path, so a run killed mid-write leaves the old file
    whole (metrics.jsonl is rewritten on every resume); else p is path itself."""
    if not is_primary():
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if atomic:
        stem, ext = os.path.splitext(os.path.basename(path))
        partial = os.path.join(directory, f".{stem}.partial{ext}")
        try:
            write(partial)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    else:
        write(path)
    log.debug("process %d wrote %s", jax.process_index(), os.path.abspath(path))


def write_text(path: str, text: str, *, append: bool = False) -> None:
    """Writes (or appends: a killed append cuts at most its last line, which read_metrics skips) text to path."""
    def write(p):
        with open(p, "a" if append else "w") as f:
            f.write(text)

    write_with(path, write, atomic=not append)


def json_default(x):
    """json.dumps's `default`: a numpy scalar (a config field computed with numpy, steps=np.int64(100)) as the Python
    number it holds, a floating one as the shortest decimal that rounds to it (np.float32(0.1) -> 0.1, as written);
    json's TypeError for anything else."""
    if isinstance(x, np.floating):
        return float(str(x))
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"Object of type {type(x).__name__} is not JSON serializable")


def write_json(path: str, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent, default=json_default) + "\n")


def save_arrays(path: str, **arrays) -> None:
    """An .npz of host copies of the arrays."""
    write_with(path, lambda p: np.savez(p, **{k: np.asarray(v) for k, v in arrays.items()}))
