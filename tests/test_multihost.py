import json
import os
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
    for p, (out, err) in zip(procs, outs):
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
