"""Where benchmarks write: benchmarks/results/NAME.json (rows + environment) and NAME.md (a table); at the tests'
sizes (--smoke) without --out, a fresh temporary directory instead (the committed measurements stay as they are)."""

import os
import platform
import tempfile

from jaxicl import outputs

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OUT_HELP = "results directory (default benchmarks/results; with --smoke a fresh temporary directory)"
SMOKE_NOTE = "smoke: true, the tests' sizes, not a measurement"  # in a smoke run's Markdown header line


SIMD_FLAGS = ("avx512f", "avx2", "avx", "sse4_2", "asimd", "neon")  # widest first: the first a CPU has is reported


def results_dir(out: str | None, smoke: bool) -> str:
    """Where a benchmark writes: `out` where given; else benchmarks/results, or for a smoke run a fresh temporary
    directory, printed (smoke-sized numbers never replace the committed measurements)."""
    if out:
        return out
    if not smoke:
        return RESULTS
    out = tempfile.mkdtemp(prefix="jaxicl-benchmarks-smoke-")
    print(f"--smoke without --out: writing into {out} (not {RESULTS})", flush=True)
    return out


def environment() -> dict:
    """What a timing depends on: devices, the precision of float32 products in force (JAX's "default": TF32 on recent
    NVIDIA GPUs), versions, host."""
    import flax
    import jax
    import optax

    return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind,
            "matmul_precision": jax.config.jax_default_matmul_precision or "default",
            "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            **host_cpu()}


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The host CPU: {"cpu": model name (with family/model where Linux gives them), "cpu_simd": the widest vector
    extension of SIMD_FLAGS it reports, or "unknown"}: machines sold under one name ("AMD EPYC") differ in both."""
    try:
        with open(cpuinfo) as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return {"cpu": platform.processor() or platform.machine(), "cpu_simd": "unknown"}
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name") or fields.get("CPU part") or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"cpu": name, "cpu_simd": next((f for f in SIMD_FLAGS if f in flags), "unknown")}


def write_results(name: str, rows: list[dict], notes: str, *, out_dir: str, smoke: bool) -> str:
    """Writes out_dir/NAME.json and NAME.md (a Markdown table of rows: every key of any row, a blank where a row has
    none, as where a failed row has only its name and `failed`; a smoke run's says so in its title, its JSON in
    "smoke"); returns the .md path. Written by process 0 only (jaxicl.outputs: each file replaced whole, so a run
    killed while writing leaves the last one), as every process of a multi-host run calls it."""
    env = environment()
    rows = outputs.finite_rows(rows)  # a ratio of a time too short to resolve: null, not a JSON-breaking NaN
    outputs.write_json(os.path.join(out_dir, f"{name}.json"),
                       {"benchmark": name, "smoke": smoke, "environment": env, "notes": notes, "rows": rows}, indent=2)
    cols = list(dict.fromkeys(c for r in rows for c in r))

    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else " ".join(str(v).split()).replace("|", "\\|")

    host = (f"{len(env['devices'])} x {env['device_kind']} device(s); host CPU {env['cpu']} ({env['cpu_simd']}, "
            f"{env['cpu_count']} cores); jax {env['jax']}; matmul precision {env['matmul_precision']}")
    title = f"# {name} ({SMOKE_NOTE})" if smoke else f"# {name}"
    lines = [title, "", host, "", notes, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    path = os.path.join(out_dir, f"{name}.md")
    outputs.write_text(path, "\n".join(lines) + "\n")
    return path
