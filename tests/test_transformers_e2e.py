"""The transformer case end to end (issue 16 item 8): a small Hugging Face BERT and ViT built from a config
(random weights, nothing downloaded) with EASIER-style identity sites in chosen MLPs, compiled through the
torch.export front end: fc1 and fc2 of each identity MLP merge into one linear, with the residual folded in
where that is exact (post-norm BERT),
the other MLPs stay, the compiled module matches on held-out token / image batches and exports to ONNX with a
dynamic batch."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import egp_export
from egp_export.analysis.numerics import NOISE_FACTOR, ORT_CPU_RTOL, compare, fp32_noise
from egp_export.export.onnx import export_onnx, ort_session, run_onnx
from egp_export.testing import ZOO_BY_NAME, identity_mlp_layers

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="Hugging Face transformers is not installed (pip install 'egp-export[transformers]')",
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# BERT is post-norm: x + fc2(fc1(x)) folds into one linear (W + I). ViT is pre-norm, x + fc2(fc1(norm(x))):
# the linear reads norm(x), not x, so there is no identity to add and the residual stays.
@pytest.mark.parametrize(
    "name, identity_layer, residual_folds", [("transformers/bert", 0, True), ("transformers/vit", 1, False)],
    ids=["bert", "vit"],
)
def test_identity_mlps_merge_fold_verify_and_export(name, identity_layer, residual_folds, tmp_path):
    entry = ZOO_BY_NAME[name]
    torch.manual_seed(0)
    model = entry.build().eval()
    (identity,) = identity_mlp_layers(model, (identity_layer,))
    assert not any(module.training for module in model.modules())  # the identity joins in eval mode
    (kept,) = identity_mlp_layers(entry.build(), (1 - identity_layer,))  # the names of the MLP whose GELU stays
    calibration = entry.sample(64, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = egp_export.compile(model, calibration, frontend="export")
    assert result.report["trace"]["frontend"] == "export"

    fc1, fc2 = identity.fc1, identity.fc2
    merged = [r["detail"] for r in result.report["rewrites"] if r["kind"] == "linear_merged"]
    folded = [r["detail"] for r in result.report["rewrites"] if r["kind"] == "residual_folded"]
    assert merged == [{"rule": "linear->linear", "into": fc1, "absorbed": fc2}]
    assert folded == ([{"linear": fc1}] if residual_folds else [])
    modules = dict(result.module.named_modules())  # the other MLP's GELU stays: its fc1 and fc2 too
    assert kept.fc1 in modules and kept.fc2 in modules
    assert fc2 not in modules
    assert result.report["after"]["layers"] == result.report["before"]["layers"] - 1

    fresh = entry.sample(16, seed=3)  # held out: drawn like the calibration data, never seen by the compile
    rtol = max(1e-5, NOISE_FACTOR * fp32_noise(model, [fresh]))
    with torch.no_grad():
        reference = model(fresh)
        assert compare(reference, result.module(fresh)).max_rel <= rtol

    ort_rtol = max(ORT_CPU_RTOL, rtol)
    exported = export_onnx(
        result.module, fresh[:2], tmp_path / "model.onnx", verify_inputs=fresh, rtol=ort_rtol, exporter="dynamo", force=True
    )
    for batch in (1, 5):  # a dynamic batch: other sizes than the export example's
        outputs = run_onnx(ort_session(exported.path), fresh[:batch])
        with torch.no_grad():
            expected = model(fresh[:batch])
        assert compare(expected, tuple(outputs)).max_rel <= 2 * ort_rtol, batch


def _bert_tokens(samples: int, length: int, seed: int) -> dict:
    """Tokenised batches as a tokenizer gives them: ids, a mask with right padding, segment ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (samples, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (samples,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    segments = (torch.arange(length)[None, :] >= length // 2).long().expand(samples, -1).contiguous()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": segments}


def test_bert_with_three_keyword_inputs_compiles_and_exports_with_a_dynamic_sequence(tmp_path):
    """input_ids + attention_mask + token_type_ids through torch.export with the sequence kept symbolic: the identity
    MLP merges, fresh batches match at sequence lengths the compile never saw, and the ONNX file runs at them too."""
    entry = ZOO_BY_NAME["transformers/bert"]
    torch.manual_seed(0)
    model = entry.build().eval()
    (identity,) = identity_mlp_layers(model, (0,))
    dims = {name: {1: "seq"} for name in ("input_ids", "attention_mask", "token_type_ids")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = egp_export.compile(model, _bert_tokens(64, 16, seed=2), frontend="export", dynamic_dims=dims)
    merged = [r["detail"] for r in result.report["rewrites"] if r["kind"] == "linear_merged"]
    assert merged == [{"rule": "linear->linear", "into": identity.fc1, "absorbed": identity.fc2}]
    assert result.report["calibration"]["sample_shape"] == {name: [16] for name in dims}

    for length in (7, 16, 40):  # fresh tokens, other lengths than the calibration's 16
        fresh = _bert_tokens(8, length, seed=length)
        rtol = max(1e-5, NOISE_FACTOR * fp32_noise(model, [fresh]))
        with torch.no_grad():
            assert compare(model(**fresh), result.module(**fresh)).max_rel <= rtol, length

    fresh = _bert_tokens(8, 16, seed=5)
    exported = export_onnx(
        result.module, fresh, tmp_path / "bert.onnx", verify_inputs=fresh, rtol=ORT_CPU_RTOL * 10, exporter="dynamo",
        dynamic_dims=dims, force=True,
    )
    assert exported.input_names == list(dims) and sorted(exported.verified_dim_sizes["seq"]) == [8, 16]
    session, longer = ort_session(exported.path), _bert_tokens(3, 29, seed=9)
    with torch.no_grad():
        expected = model(**longer)
    assert compare(expected, tuple(run_onnx(session, longer))).max_rel <= 1e-4
