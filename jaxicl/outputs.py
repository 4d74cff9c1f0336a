"""The one writer of every file jaxicl and its experiments produce (orbax checkpoints aside).

In a multi-host run every process runs the same program, but only process 0 writes: metrics, JSON,
arrays, figures and reports all go through `write_with`, which does nothing on the other processes.
Each write is logged at DEBUG level on the "jaxicl.outputs" logger (with the process index), so a
run can be audited for files written twice.
"""

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable

import jax
import numpy as np

log = logging.getLogger("jaxicl.outputs")


def is_primary() -> bool:
    """Whether this process writes files (process 0)."""
    return jax.process_index() == 0


def write_with(path: str, write: Callable[[str], None], *, atomic: bool = True) -> None:
    """Calls write(p) on process 0 only, after creating its directory. atomic: p has path's name in a fresh hidden
    directory beside path, and what write creates there then replaces the file(s) of the same name beside path, so a
    run killed mid-write leaves the old file whole (metrics.jsonl is rewritten on every resume); else p is path
    itself. Either way the files are named as write(path) names them: a writer that adds an extension to a name
    without one (savefig its default format's, np.savez ".npz") adds it to path (the ".partial" name it was given
    had been read as the format, or its extended file not found and left behind)."""
    if not is_primary():
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if atomic:
        staging = tempfile.mkdtemp(prefix=".partial-", dir=directory)
        try:
            write(os.path.join(staging, os.path.basename(path)))
            written = [os.path.join(directory, name) for name in os.listdir(staging)]
            if not written:
                raise FileNotFoundError(f"write_with: the writer created no file for {path!r}")
            for p in written:
                os.replace(os.path.join(staging, os.path.basename(p)), p)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        write(path)
        written = [os.path.abspath(path)]
    for p in written:
        log.debug("process %d wrote %s", jax.process_index(), p)


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
    """obj as standard JSON (numpy scalars as the Python numbers they hold: json_default): a NaN or infinity raises
    ValueError, naming path and the fix (None), and writes nothing (json.dumps would write NaN or Infinity, which
    strict readers refuse); json.dumps' other ValueErrors (a circular reference) name path too."""
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, default=json_default)
    except ValueError as e:
        non_finite = str(e).startswith("Out of range float values")  # json's message for a NaN or infinity
        raise ValueError(f"{path}: {e}" + (" (standard JSON has none: write None)" if non_finite else "")) from None
    write_text(path, text + "\n")


def finite_rows(rows: list[dict]) -> list[dict]:
    """rows with every non-finite float value None (null in write_json: an undefined metric, an overflowed loss)."""
    return [{k: None if isinstance(v, (float, np.floating)) and not math.isfinite(v) else v for k, v in r.items()}
            for r in rows]


def save_arrays(path: str, **arrays) -> str:
    """An .npz of host copies of the arrays, at path with ".npz" added where it does not end so (as np.savez names
    it); returns that path."""
    path = path if path.endswith(".npz") else path + ".npz"

    def write(p):
        with open(p, "wb") as f:  # a file object: np.savez writes it as it is, adding no extension
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})

    write_with(path, write)
    return path
