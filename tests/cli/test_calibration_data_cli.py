"""Calibration files on the command line: each source's conversion stated, one scale for images, token ids in any
integer dtype, and a bad sample named in one error line (exit 2). In-process through ``cli.main``."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from egp_export.cli import main as cli

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TokenNet(nn.Module):
        # Token ids -> embedding (vocabulary 50) -> Linear -> ReLU that never switches off -> mean -> Linear.
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(50, 8)
            self.fc = nn.Linear(8, 8)
            self.relu = nn.ReLU()
            self.head = nn.Linear(8, 3)
            with torch.no_grad():
                self.fc.bias.fill_(50.0)

        def forward(self, ids):
            return self.head(self.relu(self.fc(self.embed(ids))).mean(1))


    class RGBNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.relu(self.conv(x)).mean((2, 3)))


    class FloatNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(6, 4)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.fc(x))


    class MaskNet(nn.Module):
        # Takes a bool mask: torch.where refuses a float condition.
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(6, 4)
            self.relu = nn.ReLU()

        def forward(self, mask):
            return self.relu(self.fc(torch.where(mask, 1.0, -1.0)))
    """
)


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """``egp-export ARGS`` in this process, with MODELS importable as data_models."""
    (tmp_path / "data_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def main(*args):
        code = cli.main([str(arg) for arg in args])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, captured.err
        return code, captured.out, captured.err

    yield main
    sys.modules.pop("data_models", None)


def _ids(samples: int, dtype, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50, size=(samples, 6)).astype(dtype)


def test_uint16_token_ids_compile_widened_to_int64(run, tmp_path):
    """Regression: uint16 ids were refused (the embedding takes int32/int64 only)."""
    path = tmp_path / "ids.npy"
    np.save(path, _ids(300, np.uint16))
    code, out, err = run("compile", "--arch", "data_models:TokenNet", "--calibration", path, "--min-observations", 100,
                         "--out", tmp_path / "out")
    assert code == 0, err
    assert f"note: {path} holds uint16 integers, which the model rejects: widened to int64 (token ids" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["sample_shape"] == [6] and report["activations_linearized"] == 1


@pytest.mark.parametrize("dtype", ["int16", "int8", "uint32", ">i2", ">i8"])
def test_token_ids_of_any_integer_dtype_and_byte_order_are_read(run, tmp_path, dtype):
    """Regression: int16/int8/uint32 ids were refused and big-endian files raised a traceback."""
    path = tmp_path / "ids.npy"
    np.save(path, _ids(40, dtype))
    code, out, err = run("analyze", "--arch", "data_models:TokenNet", "--calibration", path, "--out", tmp_path / "out")
    assert code == 0, err
    name = np.dtype(dtype).name
    if dtype.startswith(">"):
        assert f"note: {path} holds big-endian {name} data: converted to this machine's byte order" in out
    if name != "int64":
        assert f"note: {path} holds {name} integers, which the model rejects: widened to int64" in out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["analysis"]["num_sites"] == 1


def test_a_token_id_beyond_the_vocabulary_names_its_sample(run, tmp_path):
    """Regression: an id of 50 in sample 100 of 200 gave a bare IndexError traceback."""
    ids = _ids(200, np.int64)
    ids[100, 2] = 50
    path = tmp_path / "ids.npy"
    np.save(path, ids)
    code, out, err = run("analyze", "--arch", "data_models:TokenNet", "--calibration", path, "--out", tmp_path / "out")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("egp-export: error: the model rejects calibration sample 100 (sample 36 of calibration "
                           "batch 1)"), line


def test_uint8_arrays_and_image_folders_give_the_same_inputs(run, tmp_path):
    """Regression: a uint8 .npy became float32 in [0, 255] while the same images as a folder gave [0, 1]."""
    from PIL import Image

    pixels = np.random.default_rng(2).integers(0, 256, size=(12, 3, 6, 6), dtype=np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(pixels):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{index:02d}.png")
    array = tmp_path / "images.npy"
    np.save(array, pixels)
    analyses = {}
    for name, source in (("folder", folder), ("array", array)):
        code, out, err = run("analyze", "--arch", "data_models:RGBNet", "--calibration", source, "--out", tmp_path / name)
        assert code == 0, err
        analyses[name] = json.loads((tmp_path / name / "report.json").read_text())["analysis"]
        scale = "[0, 1] (pixel values / 255" if name == "folder" else "scaled to [0, 1] (divided by 255"
        assert scale in out
    assert analyses["folder"] == analyses["array"]


def test_bool_inputs_reach_the_model_as_bool(run, tmp_path):
    """Regression: bool data were converted to float32 before the model was tried, so a bool-only model failed."""
    path = tmp_path / "mask.npy"
    np.save(path, np.random.default_rng(3).random((40, 6)) > 0.5)
    code, out, err = run("analyze", "--arch", "data_models:MaskNet", "--calibration", path, "--out", tmp_path / "mask")
    assert code == 0, err
    assert "converted" not in out
    code, out, err = run("analyze", "--arch", "data_models:FloatNet", "--calibration", path, "--out", tmp_path / "float")
    assert code == 0, err
    assert f"note: {path} holds bool data, which the model rejects: converted to float32 (0 and 1)" in out


def test_a_pt_list_of_batches_is_concatenated_and_said_so(run, tmp_path):
    """Regression: a .pt holding a list of batches silently used its first batch."""
    path = tmp_path / "batches.pt"
    torch.save([torch.from_numpy(_ids(64, np.int64, seed)) for seed in range(4)], path)
    code, out, err = run("analyze", "--arch", "data_models:TokenNet", "--calibration", path, "--out", tmp_path / "out")
    assert code == 0, err
    assert f"note: {path} holds a list of 4 batches of samples (6,): concatenated (256 samples)" in out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["calibration"]["samples"] == 256
    torch.save([torch.zeros(5, 6, dtype=torch.int64)] * 2, path)
    code, out, err = run("analyze", "--arch", "data_models:TokenNet", "--calibration", path, "--out", tmp_path / "two",
                         "--force")
    assert code == 2 and "could be batches or (inputs, targets)" in err and len(err.strip().splitlines()) == 1


def _pixels_as_folder_and_array(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(4).integers(0, 256, size=(12, 3, 6, 6), dtype=np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(pixels):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{index:02d}.png")
    array = tmp_path / "images.npy"
    np.save(array, pixels)
    return folder, array


@pytest.mark.parametrize("options", [["--preset", "imagenet"],
                                     ["--normalize", "0.485,0.456,0.406", "0.229,0.224,0.225"]], ids=["preset", "normalize"])
def test_a_normalisation_changes_the_calibration_alike_for_folders_and_uint8_arrays_and_is_recorded(run, tmp_path,
                                                                                                    options):
    folder, array = _pixels_as_folder_and_array(tmp_path)
    reports = {}
    for name, source, extra in (("plain", folder, []), ("folder", folder, options), ("array", array, options)):
        code, out, err = run("analyze", "--arch", "data_models:RGBNet", "--calibration", source, *extra,
                             "--out", tmp_path / name)  # fmt: skip
        assert code == 0, err
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
        if extra:
            assert "normalised (x - mean) / std with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)" in out

    assert reports["folder"]["analysis"] == reports["array"]["analysis"]
    assert reports["folder"]["analysis"] != reports["plain"]["analysis"]  # the model saw other values
    recorded = reports["array"]["calibration"]["preprocessing"]
    assert recorded["mean"] == [0.485, 0.456, 0.406] and recorded["std"] == [0.229, 0.224, 0.225]
    assert recorded["source"] == ("--preset imagenet" if options[0] == "--preset" else "--normalize")
    assert reports["plain"]["calibration"]["preprocessing"]["mean"] is None


@pytest.mark.parametrize(
    "arch, data, options, message",
    [
        ("RGBNet", "images", ["--preset", "timm"], "not a timm model"),
        ("FloatNet", "floats", ["--preset", "imagenet"], "holds float32 data, which is used as stored"),
        ("RGBNet", "images", ["--normalize", "0.5,0.5", "0.2,0.2"], "cannot be normalised with 2 channel means"),
        ("RGBNet", "images", ["--normalize", "0.5", "0"], "positive standard deviations"),
        ("RGBNet", "images", ["--normalize", "0.5", "0.2", "--preset", "imagenet"], "not both"),
    ],
)
def test_normalisations_that_cannot_apply_are_one_error_line(run, tmp_path, arch, data, options, message):
    folder, _ = _pixels_as_folder_and_array(tmp_path)
    floats = tmp_path / "floats.npy"
    np.save(floats, np.random.default_rng(5).random((12, 6)).astype(np.float32))
    source = folder if data == "images" else floats
    code, out, err = run("analyze", "--arch", f"data_models:{arch}", "--calibration", source, *options,
                         "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and message in err, err
