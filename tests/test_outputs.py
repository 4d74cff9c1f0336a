"""jaxicl.outputs: files are replaced whole, so a run killed while writing one leaves the old file."""

import json
import os

import numpy as np
import pytest

from jaxicl import outputs


def test_a_write_interrupted_before_it_lands_leaves_the_old_file_and_no_partial_one(monkeypatch, tmp_path):
    path = tmp_path / "metrics.jsonl"
    outputs.write_text(str(path), '{"step": 0}\n{"step": 1}\n')

    def killed(src, dst):
        raise KeyboardInterrupt  # a kill after the new text is written, before it replaces the file

    monkeypatch.setattr(outputs.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        outputs.write_text(str(path), '{"step": 0}\n')
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n' and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_text_appends_json_and_arrays_land_under_their_own_names(tmp_path):
    outputs.write_text(str(tmp_path / "log.txt"), "a\n")
    outputs.write_text(str(tmp_path / "log.txt"), "b\n", append=True)
    outputs.write_json(str(tmp_path / "sub" / "r.json"), {"x": 1})
    outputs.save_arrays(str(tmp_path / "params.npz"), w=np.arange(3))  # savez adds .npz to names without it
    assert (tmp_path / "log.txt").read_text() == "a\nb\n"
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"x": 1}
    np.testing.assert_array_equal(np.load(tmp_path / "params.npz")["w"], np.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "params.npz", "sub"]
