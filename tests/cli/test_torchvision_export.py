"""``egp-export compile`` on the torchvision models torch.export cannot export from a batch-1 example.

The CLI exports with one calibration sample as the example. With a dynamic
batch dimension, torch.export specializes that size-1 dimension on ConvNeXt,
Swin and ViT (torch 2.14.1: "Invalid ranges [2:1]" / a batch fixed to 1);
the compile must still write a file with a dynamic batch that matches the
model at batch 1 and above. Random weights from a seeded factory, saved as a
checkpoint so that the test can compare against the same model; 16 random
3x64x64 samples. Each run takes minutes on 2 CPU cores (export included).
"""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
import torch
import torchvision
from torch import nn

from egp_export.analysis.numerics import compare
from egp_export.export.onnx import ort_session, run_onnx

SUBPROCESS_TIMEOUT_S = 1200
SIZE = 64
MODELS = {
    "convnext_tiny": {"num_classes": 10},
    "swin_t": {"num_classes": 10},
    "vit_b_16": {"num_classes": 10, "image_size": SIZE},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_compile_exports_from_a_batch_one_example(tmp_path, name):
    kwargs = MODELS[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    if name == "vit_b_16":  # its head is zero-initialized: every output would be 0 and every check vacuous
        nn.init.normal_(model.heads.head.weight, std=0.02)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(torch.rand(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), tmp_path / "calibration.pt")
    out = tmp_path / "out"

    run = subprocess.run(
        [sys.executable, "-m", "egp_export", "compile", "--arch", f"torchvision:{name}",
         "--arch-kwargs", *[f"{key}={value}" for key, value in kwargs.items()],
         "--checkpoint", str(tmp_path / "weights.pt"), "--calibration", str(tmp_path / "calibration.pt"),
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )

    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    exported = json.loads((out / "report.json").read_text())["onnx"]
    assert exported["dynamic_batch"] and exported["traced_batch"] == 2
    batch_dim = onnx.load(out / "model.onnx", load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.WhichOneof("value") == "dim_param"
    session = ort_session(out / "model.onnx")
    for batch_size in (1, 3):  # fresh inputs drawn like the calibration data
        fresh = torch.rand(batch_size, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch_size + 100))
        with torch.no_grad():
            expected = model(fresh)
        error = compare(reference=expected, candidate=run_onnx(session, fresh))
        assert error.within(exported["rtol"]), (batch_size, error)
