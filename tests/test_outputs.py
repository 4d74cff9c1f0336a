"""jaxicl.outputs: files are replaced whole, so a run killed while writing one leaves the old file."""

import json
import os
import re

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


@pytest.mark.parametrize("indent", [1, None])  # json's Python encoder, and its C one
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_json_refuses_a_nan_or_infinity_and_writes_nothing(tmp_path, value, indent):
    """json.dumps writes NaN and Infinity, which standard JSON (and strict readers) do not have."""
    path = str(tmp_path / "r.json")
    message = f"{path}: Out of range float values are not JSON compliant: {value} (standard JSON has none: write None)"
    with pytest.raises(ValueError, match=re.escape(message)):
        outputs.write_json(path, {"rows": [{"x": value}]}, indent=indent)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("indent", [1, None])
def test_json_of_a_circular_reference_names_the_path_and_no_none_to_write(tmp_path, indent):
    """Only a NaN or infinity has None to write instead: the hint was added to every ValueError of json.dumps."""
    path, loop = str(tmp_path / "r.json"), []
    loop.append(loop)
    with pytest.raises(ValueError) as e:
        outputs.write_json(path, {"rows": loop}, indent=indent)
    assert str(e.value) == f"{path}: Circular reference detected"
    assert os.listdir(tmp_path) == []


def test_a_name_without_an_extension_gets_the_one_its_writer_adds_and_no_partial_file_is_left(tmp_path):
    """np.savez adds ".npz" and savefig its format's extension to a name without one: the ".acts.partial" temporary
    became ".acts.partial.npz", which os.replace did not find and left behind, and savefig read "partial" as the
    format. Atomic writes now name their files as the writer names them unwrapped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert outputs.save_arrays(str(tmp_path / "acts"), w=w) == str(tmp_path / "acts.npz")
    assert outputs.save_arrays(str(tmp_path / "acts.npy"), w=-w) == str(tmp_path / "acts.npy.npz")  # as np.savez
    for name, want in (("acts.npz", w), ("acts.npy.npz", -w)):
        with np.load(tmp_path / name) as f:
            assert f.files == ["w"] and f["w"].dtype == np.int32
            np.testing.assert_array_equal(f["w"], want)
    fig = plt.figure(figsize=(2, 2))
    fig.gca().plot([0, 1], [1, 0])
    with matplotlib.rc_context({"savefig.format": "png"}):
        outputs.write_with(str(tmp_path / "figure"), lambda p: fig.savefig(p))
        fig.savefig(tmp_path / "plain")  # what savefig writes unwrapped: "plain.png"
    plt.close(fig)
    assert (tmp_path / "figure.png").read_bytes() == (tmp_path / "plain.png").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["acts.npy.npz", "acts.npz", "figure.png", "plain.png"]
    nothing = str(tmp_path / "nothing.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(f"write_with: the writer created no file for {nothing!r}")):
        outputs.write_with(nothing, lambda p: None)
    assert sorted(os.listdir(tmp_path)) == ["acts.npy.npz", "acts.npz", "figure.png", "plain.png"]
