import ast
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_and_share_a_checkpoint(tmp_path):
    """Two processes x 2 CPU devices joined by jax.distributed vs one process x 4 devices."""
    script = os.path.join(HERE, "tiny_run.py")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, script, str(tmp_path / "multi"), "--steps", "12", "--devices", "2",
                               "--num-processes", "2", "--process-id", str(i), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    single = subprocess.run([sys.executable, script, str(tmp_path / "single"), "--steps", "12", "--devices", "4"],
                            capture_output=True, text=True, timeout=120)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert single.returncode == 0, single.stderr[-2000:]
    multi = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    ref = json.loads(single.stdout.strip().splitlines()[-1])
    assert len(ref["losses"]) == 12
    for m in multi:
        np.testing.assert_allclose(m["losses"], ref["losses"], rtol=1e-5)
        np.testing.assert_allclose(m["params"], ref["params"], rtol=1e-4, atol=1e-6)
        assert m["restored_equal"] and m["restored_step"] == 12
    # one replicated array: both processes hold replicas that one SPMD program updated with the same all-reduce
    np.testing.assert_array_equal(multi[0]["params"], multi[1]["params"])


_RUN_EXPERIMENT = """
import logging, sys
import jax
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 2)
logging.basicConfig(level=logging.WARNING, format="%(message)s")
logging.getLogger("jaxicl.outputs").setLevel(logging.DEBUG)
from experiments.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_an_experiment_on_two_processes_writes_each_output_file_once_from_process_0(tmp_path):
    """ar_fig3_unitary (smoke) end to end on two processes x 2 CPU devices sharing one output directory."""
    port, out = _free_port(), tmp_path / "out"
    root = os.path.dirname(HERE)
    procs = [subprocess.Popen([sys.executable, "-c", _RUN_EXPERIMENT, "ar_fig3_unitary", "--preset", "smoke",
                               "--out", str(out), "--distributed", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    writes = [w for _, err in outs for w in re.findall(r"process (\d+) wrote (\S+)", err)]  # progress bars share stderr
    assert writes and {w[0] for w in writes} == {"0"}  # only process 0 writes
    written = [w[1] for w in writes]
    run_dir = out / "ar_fig3_unitary"
    files = {str(p) for p in run_dir.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    assert files == set(written)  # every file of the run went through the one writer
    once = [f for f in written if not f.endswith("metrics.jsonl")]  # metrics.jsonl is appended chunk by chunk
    assert len(once) == len(set(once)) and {os.path.basename(f) for f in once} >= {
        "config.json", "result.json", "run.json", "params.npz", "fig3_unitary.png"}
    result = json.loads((run_dir / "result.json").read_text())
    assert result["checks"] and all(np.isfinite(c["value"]) for c in result["checks"])


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [4, 2])
def test_a_sweep_on_two_processes_trains_each_member_as_one_process_does(tmp_path, seeds):
    """gd_equivalence's seed sweep (smoke) on two processes x 2 CPU devices vs one process x 4 devices.
    It failed on two processes: memory statistics of the other process's devices, float64 member values that
    device_put compares with the float32 the devices hold, and host copies of the member-sharded metrics; with 2
    members, a mesh of process 0's devices only (process 1 raised IndexError gathering the results, process 0 hung).
    Each member trains on one device in both layouts (the same program per member), so the losses agree to float
    rounding."""
    port, root = _free_port(), os.path.dirname(HERE)
    argv = ["gd_equivalence", "--preset", "smoke", "train.steps=200", "--sweep", f"seed=0:{seeds}"]
    multi = [subprocess.Popen([sys.executable, "-c", _RUN_EXPERIMENT, *argv, "--out", str(tmp_path / "multi"),
                               "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    four = _RUN_EXPERIMENT.replace('"jax_num_cpu_devices", 2', '"jax_num_cpu_devices", 4')
    assert four != _RUN_EXPERIMENT
    single = subprocess.run([sys.executable, "-c", four, *argv, "--out", str(tmp_path / "single")], cwd=root,
                            capture_output=True, text=True, timeout=180)
    try:
        for p in multi:
            _, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-2000:]
    finally:  # a hung process (one waiting in a collective the other left) would outlive the test
        for p in multi:
            p.kill()
    assert single.returncode == 0, single.stderr[-2000:]
    rows = [json.loads((tmp_path / d / "gd_equivalence" / "sweep_members.json").read_text())
            for d in ("multi", "single")]
    assert [r["train.seed"] for r in rows[0]] == [r["train.seed"] for r in rows[1]] == list(range(seeds))
    for key in ("loss", "train_loss", "gd1_loss"):
        np.testing.assert_allclose([r[key] for r in rows[0]], [r[key] for r in rows[1]], rtol=1e-5)


@pytest.mark.slow
def test_device_scaling_on_two_processes_times_meshes_of_both_and_process_0_writes(tmp_path):
    """benchmarks.device_scaling --smoke --distributed on two processes x 1 CPU device: it timed 1 device (process
    0's alone) and both processes wrote the results; now 1 device per process, written by process 0 (its printed
    row), and 2 per process skipped (there are 2 devices)."""
    port, root = _free_port(), os.path.dirname(HERE)
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.device_scaling", "--smoke", "--out", str(tmp_path),
                               "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i)], cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:  # a hung process would outlive the test
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    printed = [ast.literal_eval(line) for line in outs[0][0].splitlines() if line.startswith("{")]
    written = json.loads((tmp_path / "device_scaling.json").read_text())
    assert [(r["devices"], r["batch"]) for r in written["rows"]] == [(2, 8)] and written["rows"] == printed
    assert "not run: [4] devices (only 2)" in written["notes"]


@pytest.fixture
def two_processes(monkeypatch):
    """The 4 CPU devices as 2 processes x 2 (ids 0, 1 on process 0; 2, 3 on process 1: jax.devices() lists a
    multi-process run's devices process by process), for the meshes' choice of devices; nothing runs across them."""
    import jax

    monkeypatch.setattr(type(jax.devices()[0]), "process_index", property(lambda d: d.id // 2))


def _processes(mesh) -> list[list[int]]:
    """The process of each member (or data) row's devices: [[process, ...], ...]."""
    return [[d.process_index for d in row] for row in mesh.devices.reshape(mesh.devices.shape[0], -1)]


def test_default_sweep_meshes_take_the_same_number_of_devices_from_every_process(two_processes):
    """The first gcd(4, stack) devices put a stack of 1 or 2 members (or 6) on process 0's devices only: there
    process_allgather took another branch than on process 1 (an IndexError on process 1, a hang on process 0)."""
    from jaxicl.train.mesh import default_sweep_mesh

    members = {stack: _processes(default_sweep_mesh(stack)) for stack in (1, 2, 3, 4, 6, 8)}
    one_each, two_each = [[0], [1]], [[0], [0], [1], [1]]  # 2 x gcd(2, ceil(stack / 2)) member devices
    assert members == {1: one_each, 2: one_each, 3: two_each, 4: two_each, 6: one_each, 8: two_each}


def test_data_meshes_spread_over_the_processes_and_refuse_counts_that_cannot(two_processes):
    from jaxicl.train import data_mesh, sweep_mesh
    from jaxicl.validation import ConfigError

    assert [d.id for d in data_mesh(2).devices.flat] == [0, 2]
    assert _processes(sweep_mesh(2, 2)) == [[0, 0], [1, 1]]
    with pytest.raises(ConfigError, match=r"^num_devices=1: a mesh in a run of 2 processes takes the same number of "
                                          r"devices from each, so it needs a multiple of 2 devices up to 4, got 1$"):
        data_mesh(1)
    with pytest.raises(ConfigError, match=r"^sweep mesh 3 x 1: a mesh in a run of 2 processes takes the same "):
        sweep_mesh(3)


def test_a_given_mesh_that_leaves_a_process_out_is_refused_naming_its_processes(two_processes):
    import jax

    from jaxicl.models.attention import sweep_init
    from jaxicl.train import train, train_sweep
    from jaxicl.train.mesh import MEMBER_AXIS
    from jaxicl.validation import ConfigError
    from tiny_run import tiny_setup

    loss_fn, sample, task, cfg, params = tiny_setup(steps=2)
    message = (r"^mesh: its devices belong to process\(es\) \[0\] of this run's \[0, 1\]; every process must hold "
               r"devices of the mesh \(jaxicl.train.data_mesh and sweep_mesh take the same number from each\)$")
    host0 = jax.devices()[:2]
    with pytest.raises(ConfigError, match=message):
        train(loss_fn, sample, task, cfg, params, mesh=jax.make_mesh((2,), ("data",), devices=host0), progress=False)
    init, _ = sweep_init(4)
    sweep_mesh = jax.make_mesh((2, 1), (MEMBER_AXIS, "data"), devices=host0)
    with pytest.raises(ConfigError, match=message):
        train_sweep(loss_fn, sample, task, cfg, init, [{"train.seed": 0}], mesh=sweep_mesh, progress=False)
