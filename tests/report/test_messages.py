"""Report counts come from record kinds: rewording every sentence changes no number."""

from __future__ import annotations

import pytest
import torch

from egp_export.compiler import compile as egp_compile
from egp_export.records import RefusalCode, RewriteKind
from egp_export.report import messages
from egp_export.report.report import is_linearized, to_markdown
from tests.passes.test_pass_manager import PrunedNet


def _counts(report: dict) -> dict:
    return {
        "linearized": report["activations_linearized"],
        "sites": [is_linearized(site) for site in report["analysis"]["sites"]],
        "kinds": sorted(r["kind"] for r in report["rewrites"]),
        "codes": sorted(r["code"] for r in report["refusals"]),
        "depth": report["after"]["depth"],
    }


def test_every_kind_and_code_has_a_sentence():
    assert set(messages.REWRITES) == set(RewriteKind)
    assert set(messages.REASONS) == set(RefusalCode)


def test_renaming_every_message_changes_no_count(monkeypatch):
    calibration = torch.randn(40, 3, 6, 6)
    plain = egp_compile(PrunedNet().eval(), calibration, holdout=0.25, batch_size=10).report

    monkeypatch.setattr(messages, "REWRITES", {kind: (lambda d, k=kind: f"renamed {k.value}") for kind in RewriteKind})
    monkeypatch.setattr(messages, "REASONS", {code: (lambda d, c=code: f"renamed {c.value}") for code in RefusalCode})
    renamed = egp_compile(PrunedNet().eval(), calibration, holdout=0.25, batch_size=10).report

    assert plain["activations_linearized"] == 2
    assert _counts(renamed) == _counts(plain)
    assert all(r["action"].startswith("renamed ") for r in renamed["rewrites"])
    assert "renamed linearized" in to_markdown(renamed)


@pytest.mark.parametrize("kind", list(RewriteKind))
def test_sentences_render_from_json_details(kind):
    # Each template reads only the keys its pass records; a missing key would raise here, not in a user's report.
    sample = {
        "function": "conv2d", "module": "m", "op": "Dropout", "batchnorm": "bn", "layer": "conv", "activation": "relu",
        "identity": 1, "zero": 2, "affine": 0, "dead": 3, "into": ["a"], "removed": 1, "channels": 8,
        "producers": ["a"], "consumers": ["b"], "rule": "linear->linear", "absorbed": "b", "conv": "c", "linear": "fc",
        "chain": ["a", "b"], "kernel": [3, 3], "predicted_us": 1.0, "split_us": 2.0,
    }
    assert messages.describe_rewrite({"kind": kind.value, "detail": sample})
