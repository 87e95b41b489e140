"""Tests for egp_export.io.datasets: calibration inputs from built-ins, tensor files, arrays and image folders."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from egp_export.errors import CalibrationError
from egp_export.io.datasets import load_calibration, load_digits_split

_DIGITS_COUNT = 1797  # samples in scikit-learn's bundled digits set


def _write_image(path, height: int, width: int, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path)


def test_builtin_digits_shape_and_range():
    data = load_calibration("builtin:digits")

    assert data.shape == (_DIGITS_COUNT, 1, 8, 8)
    assert data.dtype == torch.float32
    assert float(data.min()) == 0.0
    assert float(data.max()) == 1.0


def test_builtin_digits_limit_keeps_first_samples():
    full = load_calibration("builtin:digits")
    first = load_calibration("builtin:digits", limit=10)

    assert first.shape == (10, 1, 8, 8)
    torch.testing.assert_close(first, full[:10], rtol=0, atol=0)


def test_unknown_builtin():
    with pytest.raises(CalibrationError, match="the only one is builtin:digits"):
        load_calibration("builtin:mnist")


def test_digits_split_is_deterministic_and_stratified():
    x_train, y_train, x_test, y_test = load_digits_split(seed=0, test_fraction=0.25)
    again = load_digits_split(seed=0, test_fraction=0.25)
    other_seed = load_digits_split(seed=1, test_fraction=0.25)

    assert x_train.shape[1:] == (1, 8, 8) and x_test.shape[1:] == (1, 8, 8)
    assert x_train.shape[0] + x_test.shape[0] == _DIGITS_COUNT
    assert x_test.shape[0] == 450  # ceil(0.25 * 1797)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert float(x_train.max()) <= 1.0 and float(x_train.min()) >= 0.0
    assert set(y_test.tolist()) == set(range(10))
    for first, second in zip((x_train, y_train, x_test, y_test), again, strict=True):
        torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(y_test, other_seed[3])


def test_digits_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=1.0)


def test_pt_tensor(tmp_path):
    tensor = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    path = tmp_path / "calib.pt"
    torch.save(tensor, path)

    data = load_calibration(str(path))

    assert data.dtype == torch.float32
    torch.testing.assert_close(data, tensor.float(), rtol=0, atol=0)


def test_pt_tuple_takes_the_inputs(tmp_path):
    inputs = torch.randn(4, 2)
    path = tmp_path / "pair.pt"
    torch.save((inputs, torch.arange(4)), path)

    torch.testing.assert_close(load_calibration(str(path)), inputs, rtol=0, atol=0)


@pytest.mark.parametrize("key", ["inputs", "input", "x", "data", "images"])
def test_pt_dict_input_keys(tmp_path, key):
    inputs = torch.randn(3, 2)
    path = tmp_path / "dict.pt"
    torch.save({key: inputs, "labels": torch.zeros(3)}, path)

    torch.testing.assert_close(load_calibration(str(path)), inputs, rtol=0, atol=0)


def test_pt_dict_without_input_key_lists_keys(tmp_path):
    path = tmp_path / "dict.pt"
    torch.save({"features": torch.ones(2, 2), "labels": torch.zeros(2)}, path)

    with pytest.raises(CalibrationError, match=r"has the keys 'features', 'labels'.*'inputs'"):
        load_calibration(str(path))


def test_integer_data_keep_their_dtype(tmp_path):
    path = tmp_path / "uint8.pt"
    torch.save(torch.tensor([[0, 128], [255, 7]], dtype=torch.uint8), path)
    data = load_calibration(str(path))
    assert data.dtype == torch.uint8 and data.tolist() == [[0, 128], [255, 7]]

    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([[1, 5, 9], [2, 0, 3]], dtype=np.int64))
    assert load_calibration(str(ids)).dtype == torch.int64


def test_a_float32_npy_file_is_memory_mapped_and_never_written(tmp_path):
    path = tmp_path / "x.npy"
    array = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.save(path, array)
    data = load_calibration(str(path))
    if sys.platform == "linux":
        # Mapped, not read: on Linux a private mapping's untouched pages show later writes to the file.
        writer = np.load(path, mmap_mode="r+")
        writer[3, 5] = 99.0
        writer.flush()
        del writer
        assert float(data[3, 5]) == 99.0
        array[3, 5] = 99.0
    data[0].relu_().mul_(0)  # an inplace first layer writes its input
    assert np.array_equal(np.load(path), array)  # copy-on-write: the file is unchanged


def test_pt_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"inputs": torch.ones(2), "transform": Image.new("RGB", (1, 1))}, path)

    with pytest.raises(CalibrationError, match=r"objects\.pt .*torch\.save\(inputs_tensor"):
        load_calibration(str(path))


def test_npy(tmp_path):
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    path = tmp_path / "calib.npy"
    np.save(path, array)

    data = load_calibration(str(path))

    assert data.shape == (2, 3, 4)
    assert data.dtype == torch.float32
    np.testing.assert_array_equal(data.numpy(), array)


def test_npz_named_key(tmp_path):
    inputs = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, labels=np.zeros(6), x=inputs)

    np.testing.assert_array_equal(load_calibration(str(path)).numpy(), inputs)


def test_npz_single_unknown_key(tmp_path):
    inputs = np.ones((2, 2), dtype=np.float64)
    path = tmp_path / "one.npz"
    np.savez(path, whatever=inputs)

    data = load_calibration(str(path))

    assert data.dtype == torch.float32
    np.testing.assert_array_equal(data.numpy(), inputs)


def test_npz_several_unknown_keys(tmp_path):
    path = tmp_path / "many.npz"
    np.savez(path, features=np.ones(2), labels=np.zeros(2))

    with pytest.raises(CalibrationError) as info:
        load_calibration(str(path))
    message = str(info.value)
    assert "many.npz" in message
    assert "'features', 'labels'" in message


def test_image_folder_with_input_size(tmp_path):
    # Sorted recursively by relative path: a.png, b.jpg, sub/c.bmp.
    _write_image(tmp_path / "b.jpg", 10, 12, (0, 0, 255))
    _write_image(tmp_path / "a.png", 8, 8, (255, 0, 0))
    _write_image(tmp_path / "sub" / "c.bmp", 5, 7, (0, 255, 0))
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")

    data = load_calibration(str(tmp_path), input_size=(6, 4))

    assert data.shape == (3, 3, 6, 4)
    assert data.dtype == torch.float32
    # Uniform colours survive resizing exactly (JPEG only approximately).
    torch.testing.assert_close(data[0], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 6, 4))
    torch.testing.assert_close(data[1], torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 6, 4), atol=0.02, rtol=0)
    torch.testing.assert_close(data[2], torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 6, 4))


def test_image_folder_same_size_without_input_size(tmp_path):
    _write_image(tmp_path / "1.png", 4, 5, (51, 102, 153))
    _write_image(tmp_path / "2.png", 4, 5, (0, 0, 0))
    # Greyscale images are converted to RGB.
    Image.new("L", (5, 4), 255).save(tmp_path / "3.png")

    data = load_calibration(str(tmp_path), limit=3)

    assert data.shape == (3, 3, 4, 5)
    torch.testing.assert_close(data[0, :, 0, 0], torch.tensor([0.2, 0.4, 0.6]))
    assert float(data[1].max()) == 0.0
    assert float(data[2].min()) == 1.0


def test_image_folder_limit_reads_only_the_first(tmp_path):
    _write_image(tmp_path / "a.png", 4, 4, (0, 0, 0))
    _write_image(tmp_path / "b.png", 9, 9, (0, 0, 0))

    assert load_calibration(str(tmp_path), limit=1).shape == (1, 3, 4, 4)


def test_image_folder_mixed_sizes_need_input_size(tmp_path):
    _write_image(tmp_path / "a.png", 4, 4, (0, 0, 0))
    _write_image(tmp_path / "b.png", 6, 5, (0, 0, 0))

    with pytest.raises(CalibrationError, match=r"differ in size \(a\.png is 4x4, b\.png is 6x5.*--input-size H W"):
        load_calibration(str(tmp_path))


def test_image_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here", encoding="utf-8")

    with pytest.raises(CalibrationError, match="contains no images"):
        load_calibration(str(tmp_path))


def test_unreadable_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not really a png")

    with pytest.raises(CalibrationError, match=r"cannot read image .*broken\.png"):
        load_calibration(str(tmp_path))


def test_nan_and_inf_are_counted(tmp_path):
    array = np.ones((4, 3), dtype=np.float32)
    array[0, 0] = np.nan
    array[1, 2] = np.nan
    array[3, 1] = -np.inf
    path = tmp_path / "bad.npy"
    np.save(path, array)

    with pytest.raises(CalibrationError, match=r"bad\.npy contains 2 NaN and 1 Inf values \(of 12\)"):
        load_calibration(str(path))


def test_nan_outside_limit_is_ignored(tmp_path):
    array = np.ones((3, 2), dtype=np.float32)
    array[2, 0] = np.nan
    path = tmp_path / "tail.npy"
    np.save(path, array)

    assert load_calibration(str(path), limit=2).shape == (2, 2)


def test_empty_data(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save(torch.empty(0, 3, 8, 8), path)

    with pytest.raises(CalibrationError, match=r"empty\.pt is empty \(0 samples"):
        load_calibration(str(path))


def test_scalar_data(tmp_path):
    path = tmp_path / "scalar.npy"
    np.save(path, np.float32(3.0))

    with pytest.raises(CalibrationError, match="batch dimension"):
        load_calibration(str(path))


@pytest.mark.parametrize("name", ["calib.csv", "calib.txt"])
def test_unsupported_file_type(tmp_path, name):
    path = tmp_path / name
    path.write_text("1,2,3\n", encoding="utf-8")

    with pytest.raises(CalibrationError, match=r"unsupported type; give builtin:digits, a \.pt"):
        load_calibration(str(path))


def test_missing_path(tmp_path):
    with pytest.raises(CalibrationError, match=r"missing\.npy does not exist"):
        load_calibration(str(tmp_path / "missing.npy"))


@pytest.mark.parametrize(("kwargs", "expected"), [({"limit": 0}, "at least 1"), ({"input_size": (8,)}, "two positive")])
def test_bad_options(kwargs, expected):
    with pytest.raises(CalibrationError, match=expected):
        load_calibration("builtin:digits", **kwargs)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i2", ">u2", ">i8", "<f4"])
def test_arrays_in_either_byte_order_load_in_native_order_said_so(tmp_path, dtype):
    """Regression: a big-endian .npy raised torch's byte-order TypeError (a traceback from the CLI)."""
    array = np.arange(24).reshape(4, 6).astype(dtype)
    native = torch.from_numpy(array.astype(array.dtype.newbyteorder("="))).dtype
    np.save(tmp_path / "x.npy", array)
    np.savez(tmp_path / "x.npz", inputs=array)
    for path in (tmp_path / "x.npy", tmp_path / "x.npz"):
        notes: list[str] = []
        data = load_calibration(str(path), notes=notes)
        assert data.tolist() == array.tolist()
        assert data.dtype == (torch.float32 if array.dtype.kind == "f" else native)
        stated = f"{path} holds big-endian {array.dtype.name} data: converted to this machine's byte order (a copy in memory)"
        assert notes == ([stated] if dtype.startswith(">") else [])


def test_a_pt_list_of_batches_is_concatenated_said_so(tmp_path):
    """Regression: only the first batch of a saved list of batches was used, silently."""
    batches = list(torch.randn(10, 3).split(4))  # 4, 4, 2 samples
    for saved in (batches, tuple(batches), batches[:2] + [batches[2]], [batches[0], batches[2]]):
        path = tmp_path / "batches.pt"
        torch.save(saved, path)
        notes: list[str] = []
        data = load_calibration(str(path), notes=notes)
        assert torch.equal(data, torch.cat(saved))
        assert notes == [f"{path} holds a {type(saved).__name__} of {len(saved)} batches of samples (3,): "
                         f"concatenated ({len(data)} samples)"]


def test_a_pt_pair_of_inputs_and_labels_gives_the_inputs_said_so(tmp_path):
    inputs, labels = torch.randn(6, 3), torch.arange(6)
    path = tmp_path / "pair.pt"
    for saved in ((inputs, labels), [inputs, labels], (inputs, labels, labels.float()), (inputs, inputs.double())):
        torch.save(saved, path)
        notes: list[str] = []
        assert torch.equal(load_calibration(str(path), notes=notes), inputs)
        assert notes == [f"{path} holds a {type(saved).__name__} (inputs, targets, ...) of {len(saved)} entries: "
                         "the first is the inputs"]


@pytest.mark.parametrize("saved", [(torch.randn(6, 3), torch.randn(6, 3)), [torch.randn(6, 3), torch.randn(4, 2)]])
def test_a_pt_pair_that_could_be_batches_or_inputs_and_targets_is_refused(tmp_path, saved):
    path = tmp_path / "pair.pt"
    torch.save(saved, path)
    with pytest.raises(CalibrationError, match=r"could be batches or \(inputs, targets\).*torch.save\(torch.cat"):
        load_calibration(str(path))


def test_bool_data_keep_their_dtype(tmp_path):
    """Regression: bool data became float32 before the model was tried (the command line converts only if refused)."""
    path = tmp_path / "mask.npy"
    np.save(path, np.array([[True, False], [False, True]]))
    data = load_calibration(str(path))
    assert data.dtype == torch.bool and data.tolist() == [[True, False], [False, True]]


def test_an_image_folder_states_its_scale(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((4, 5, 3), 255, dtype=np.uint8)).save(tmp_path / "white.png")
    notes: list[str] = []
    data = load_calibration(str(tmp_path), notes=notes)
    assert data.shape == (1, 3, 4, 5) and float(data.max()) == 1.0
    assert notes == [f"{tmp_path}: images read as RGB float32 in [0, 1] (pixel values / 255, as uint8 arrays are)"]


# Image preprocessing ---------------------------------------------------------------------------------------------


def test_a_preset_normalises_a_folder_and_uint8_pixels_to_the_same_values(tmp_path):
    from egp_export.io.datasets import IMAGENET_MEAN, IMAGENET_STD, image_preprocessing

    folder = tmp_path / "images"
    folder.mkdir()
    _write_image(folder / "a.png", 4, 4, (255, 128, 0))
    _write_image(folder / "b.png", 4, 4, (10, 20, 30))
    pixels = np.stack([np.asarray(Image.open(folder / name)).transpose(2, 0, 1) for name in ("a.png", "b.png")])
    np.save(tmp_path / "pixels.npy", pixels)
    imagenet = image_preprocessing(preset="imagenet")

    from_folder = load_calibration(str(folder), preprocessing=imagenet)
    from_array = load_calibration(str(tmp_path / "pixels.npy"), preprocessing=imagenet, notes=(notes := []))

    expected = (torch.from_numpy(pixels).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.equal(from_folder, from_array) and torch.allclose(from_folder, expected, atol=1e-6)
    assert "uint8 pixels divided by 255" in notes[0] and "(--preset imagenet)" in notes[1]


def test_the_timm_preset_reads_the_models_own_data_config():
    timm = pytest.importorskip("timm", reason="timm is an optional dependency")
    from egp_export.io.datasets import image_preprocessing

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=4)  # timm's ViTs use mean = std = 0.5

    preprocessing = image_preprocessing(preset="timm", model=vit)

    assert preprocessing.mean == (0.5, 0.5, 0.5) and preprocessing.std == (0.5, 0.5, 0.5)
    assert "resolve_data_config of vit_tiny_patch16_224" in preprocessing.source
    assert preprocessing.to_dict()["timm_data_config"]["interpolation"] == "bicubic"
    with pytest.raises(CalibrationError, match="not a timm model"):
        image_preprocessing(preset="timm", model=torch.nn.Linear(2, 2))


def test_image_normalisation_of_several_named_inputs_is_refused(tmp_path):
    """A .npz of keyword inputs has no one image to normalise: --normalize/--preset are refused, not half-applied."""
    from egp_export.analysis.inputs import signature
    from egp_export.io.datasets import image_preprocessing

    class TwoInputs(torch.nn.Module):
        def forward(self, pixels, mask):
            return pixels * mask

    path = tmp_path / "two.npz"
    np.savez(path, pixels=np.random.rand(4, 3, 8, 8).astype(np.float32), mask=np.ones((4, 3, 8, 8), np.float32))
    as_inputs = load_calibration(str(path), signature=signature(TwoInputs()))
    assert set(as_inputs) == {"pixels", "mask"}
    with pytest.raises(CalibrationError, match="several named inputs .*pixels, mask"):
        load_calibration(str(path), signature=signature(TwoInputs()), preprocessing=image_preprocessing(preset="imagenet"))
