"""Where benchmarks write: benchmarks/results/NAME.json (rows + environment) and NAME.md (a table)."""

import json
import os
import platform

import jax

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def environment() -> dict:
    """What a timing depends on: devices, versions, host."""
    import flax
    import optax

    return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}


def write_results(name: str, rows: list[dict], notes: str = "", out_dir: str = RESULTS) -> str:
    """Writes NAME.json and NAME.md (a Markdown table of rows); returns the .md path."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"benchmark": name, "environment": environment(), "notes": notes, "rows": rows}, f, indent=2)
    cols = list(rows[0]) if rows else []
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# {name}", "", notes, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    path = os.path.join(out_dir, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
