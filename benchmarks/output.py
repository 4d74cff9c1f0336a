"""Where benchmarks write: benchmarks/results/NAME.json (rows + environment) and NAME.md (a table)."""

import json
import os
import platform

import jax

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


SIMD_FLAGS = ("avx512f", "avx2", "avx", "sse4_2", "asimd", "neon")  # widest first: the first a CPU has is reported


def environment() -> dict:
    """What a timing depends on: devices, the precision of float32 products in force (JAX's "default": TF32 on recent
    NVIDIA GPUs), versions, host."""
    import flax
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


def write_results(name: str, rows: list[dict], notes: str = "", out_dir: str = RESULTS) -> str:
    """Writes NAME.json and NAME.md (a Markdown table of rows: every key of any row, a blank where a row has none, as
    where a failed row has only its name and `failed`); returns the .md path."""
    os.makedirs(out_dir, exist_ok=True)
    env = environment()
    json_path = os.path.join(out_dir, f"{name}.json")
    with open(json_path + ".partial", "w") as f:  # then renamed: a run killed while writing leaves the last whole file
        json.dump({"benchmark": name, "environment": env, "notes": notes, "rows": rows}, f, indent=2)
    os.replace(json_path + ".partial", json_path)
    cols = list(dict.fromkeys(c for r in rows for c in r))

    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else " ".join(str(v).split()).replace("|", "\\|")

    host = (f"{len(env['devices'])} x {env['device_kind']} device(s); host CPU {env['cpu']} ({env['cpu_simd']}, "
            f"{env['cpu_count']} cores); jax {env['jax']}; matmul precision {env['matmul_precision']}")
    lines = [f"# {name}", "", host, "", notes, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    path = os.path.join(out_dir, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
