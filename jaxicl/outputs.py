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


def write_with(path: str, write: Callable[[str], None]) -> None:
    """Calls write(path) on process 0 only, after creating its directory."""
    if not is_primary():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write(path)
    log.debug("process %d wrote %s", jax.process_index(), os.path.abspath(path))


def write_text(path: str, text: str, *, append: bool = False) -> None:
    def write(p):
        with open(p, "a" if append else "w") as f:
            f.write(text)

    write_with(path, write)


def write_json(path: str, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def save_arrays(path: str, **arrays) -> None:
    """An .npz of host copies of the arrays."""
    write_with(path, lambda p: np.savez(p, **{k: np.asarray(v) for k, v in arrays.items()}))
