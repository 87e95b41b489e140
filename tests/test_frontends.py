"""The fx and torch.export front ends compile the same function (issue 16): a sample of the torchvision zoo,
engineered (one site linear by construction), compiled both ways and compared on fresh inputs."""

from __future__ import annotations

import warnings

import pytest
import torch

import egp_export
from egp_export.analysis.numerics import NOISE_FACTOR, compare, fp32_noise
from egp_export.testing import ZOO_BY_NAME
from tests.test_zoo_e2e import CALIBRATION_SAMPLES, FRESH_SAMPLES, _data, build_subject

# One fast model in the default run; the heavier ones are slow-marked.
SAMPLE = [
    pytest.param("torchvision/vit", id="vit"),
    pytest.param("torchvision/resnet18", id="resnet18", marks=pytest.mark.slow),
    pytest.param("torchvision/mobilenet_v3_small", id="mobilenet_v3_small", marks=pytest.mark.slow),
    pytest.param("torchvision/convnext_tiny", id="convnext_tiny", marks=pytest.mark.slow),
    pytest.param("torchvision/swin", id="swin", marks=pytest.mark.slow),
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", SAMPLE)
def test_fx_and_export_compile_the_same_function(name):
    entry = ZOO_BY_NAME[name]
    model, site = build_subject(entry, engineered=True)
    calibration = _data(entry, CALIBRATION_SAMPLES, seed=2)
    tolerance = max(1e-5, NOISE_FACTOR * fp32_noise(model, [calibration[:4]]))
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for frontend in ("fx", "export"):
            results[frontend] = egp_export.compile(model, calibration, tolerance, frontend=frontend)
    assert results["export"].report["trace"]["frontend"] == "export"
    linearized = {
        frontend: {row["name"] for row in result.report["analysis"]["sites"] if row["linearized"]}
        for frontend, result in results.items()
    }
    # the same sites, under the same names, rewritten the same way
    assert site in linearized["fx"] and linearized["fx"] == linearized["export"]
    sites = {frontend: [row["name"] for row in r.report["analysis"]["sites"]] for frontend, r in results.items()}
    assert sites["fx"] == sites["export"]
    fresh = _data(entry, FRESH_SAMPLES, seed=3)
    rtol = max(1e-5, NOISE_FACTOR * fp32_noise(model, [fresh]))
    with torch.no_grad():
        reference = model(fresh)
        outputs = {frontend: result.module(fresh) for frontend, result in results.items()}
    assert compare(outputs["fx"], outputs["export"]).max_rel <= rtol
    for frontend, output in outputs.items():
        assert compare(reference, output).max_rel <= rtol, frontend
