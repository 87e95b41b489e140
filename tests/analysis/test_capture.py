"""The capture seam: the torch.export front end brings its ATen graph into the form the passes handle, and "auto"
chooses between fx and torch.export, saying why."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from egp_export.analysis import ops
from egp_export.analysis.activations import activation_spec
from egp_export.analysis.capture import FRONTENDS, capture, resolved_frontend
from egp_export.analysis.trace import trace_facts
from egp_export.errors import TraceError
from tests.conftest import randomize_batchnorm


class Net(nn.Module):
    """Every layer kind the binding handles, activations in module and functional spellings, a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6(inplace=True)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 1), nn.PReLU(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        randomize_batchnorm(self.bn)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        x = x + self.block(x)
        x = F.leaky_relu(x, 0.1)
        return self.fc(torch.flatten(self.pool(x), 1))


def _computing(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]


def test_export_binds_layers_to_modules_named_like_the_fx_trace():
    model = Net().eval()
    exported = capture(model, torch.randn(1, 3, 8, 8), frontend="export")
    traced = capture(model, frontend="fx")
    modules = ops.named_modules(exported)

    module_calls = {str(n.target): type(modules[str(n.target)]) for n in exported.graph.nodes if n.op == "call_module"}
    assert module_calls == {
        "conv": nn.Conv2d, "bn": nn.BatchNorm2d, "block.0": nn.Conv2d, "block.1": nn.PReLU, "fc": nn.Linear,
    }
    # the module-call and activation nodes carry the names fx gives them (the report's site names)
    fx_names = {n.name for n in _computing(traced)}
    for name in ("conv", "bn", "act", "block_0", "block_1", "pool", "fc", "leaky_relu"):
        assert name in fx_names and name in {n.name for n in _computing(exported)}, name
    sites = [n.name for n in exported.graph.nodes if activation_spec(n, modules) is not None]
    assert sites == ["act", "block_1", "leaky_relu"]
    assert not any("guards" in str(n.target) for n in exported.graph.nodes)
    assert not exported.training and trace_facts(exported).frontend == "export" and resolved_frontend(exported) == "export"


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_an_export_captured_from_one_sample_runs_at_every_batch_size(batch):
    """A batch-1 example would specialise the batch to 1 (DESIGN.md): the capture exports on two samples."""
    model = Net().eval()
    gm = capture(model, torch.randn(1, 3, 8, 8), frontend="export")
    x = torch.randn(batch, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(3, 6)

    def forward(self, x, y):
        return torch.relu(self.a(x) + self.b(y)), self.a(x).sum(-1)


class KeywordInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.proj = nn.Embedding(10, 4), nn.Linear(4, 4)

    def forward(self, input_ids, scale):
        return {"hidden": F.gelu(self.proj(self.embedding(input_ids))) * scale}


def test_export_takes_tuples_and_dicts_of_inputs_and_keeps_the_output_structure():
    two = TwoInputs().eval()
    gm = capture(two, (torch.randn(1, 4), torch.randn(1, 3)), frontend="export")
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    out = gm(x, y)
    assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out, two(x, y))
    # a layer called twice keeps one module per call (each owns a copy of the shared weight)
    assert sum(isinstance(m, nn.Linear) for m in gm.modules()) == 3

    keyword = KeywordInputs().eval()
    gm = capture(keyword, {"input_ids": torch.randint(0, 10, (1, 7)), "scale": torch.rand(1, 1, 1)}, frontend="export")
    ids, scale = torch.randint(0, 10, (4, 7)), torch.rand(4, 1, 1)
    torch.testing.assert_close(gm(input_ids=ids, scale=scale), keyword(input_ids=ids, scale=scale))
    assert isinstance(ops.named_modules(gm)["proj"], nn.Linear)


class ShapeBranch(nn.Module):
    """Python control flow on a shape in the top-level forward: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[-1] > 2:
            x = torch.relu(self.fc(x))
        return x


class ValueBranch(nn.Module):
    """Control flow on a tensor value: neither front end captures it."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_auto_uses_fx_where_it_traces_and_says_so():
    gm = capture(Net().eval(), torch.randn(2, 3, 8, 8), frontend="auto")
    facts = trace_facts(gm)
    assert facts.frontend == "fx" and facts.frontend_reason == "auto: torch.fx traced the whole model"


def test_auto_falls_back_to_export_when_fx_fails_and_says_why():
    with pytest.raises(TraceError):
        capture(ShapeBranch().eval(), frontend="fx")
    model = ShapeBranch().eval()
    gm = capture(model, torch.randn(1, 4), frontend="auto")
    facts = trace_facts(gm)
    assert facts.frontend == "export" and facts.frontend_reason.startswith("auto: torch.fx cannot trace")
    x = torch.randn(6, 4)
    torch.testing.assert_close(gm(x), model(x))
    assert facts.to_dict()["frontend"] == "export"


def test_auto_prefers_export_to_fx_leaves_that_hide_activations():
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.fc(x)) if x.shape[-1] == 4 else x

    model = nn.Sequential(nn.Linear(4, 4), Inner()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [leaf.name for leaf in trace_facts(capture(model)).leaf_modules] == ["1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fx attempt's leaf warning is not shown: its graph is not used
        gm = capture(model, torch.randn(2, 4), frontend="auto")
    assert resolved_frontend(gm) == "export" and "'1'" in trace_facts(gm).frontend_reason
    assert [n.name for n in gm.graph.nodes if activation_spec(n, ops.named_modules(gm))] == ["relu"]


def test_a_model_neither_front_end_captures_names_both_failures():
    with pytest.raises(TraceError, match="neither front end") as error:
        capture(ValueBranch().eval(), torch.randn(2, 4), frontend="auto")
    assert "torch.fx" in str(error.value) and "torch.export" in str(error.value)


def test_export_refuses_what_it_cannot_honour():
    with pytest.raises(TraceError, match="example batch"):
        capture(Net(), frontend="export")
    with pytest.raises(TraceError, match="leaf modules"):
        capture(Net(), torch.randn(2, 3, 8, 8), frontend="export", leaf_modules=["block"])
    with pytest.raises(ValueError, match="frontend must be one of"):
        capture(Net(), torch.randn(2, 3, 8, 8), frontend="dynamo")
    assert FRONTENDS == ("fx", "export", "auto")


def test_export_never_touches_the_model_and_warns_about_training_mode():
    model = Net()  # training mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="training mode"):
        gm = capture(model, torch.randn(2, 3, 8, 8), frontend="export")
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model.eval()(x), rtol=0, atol=0)  # the eval-mode function


def test_auto_on_a_graph_module_records_its_reason():
    gm = capture(Net().eval(), frontend="fx")
    recaptured = capture(gm, torch.randn(2, 3, 8, 8), frontend="auto")
    assert trace_facts(recaptured).frontend_reason == "auto: torch.fx traced the whole model"


class _Positions(nn.Module):
    """Token ids + mask with a position table sliced to the sequence length (as BERT's embeddings do)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.positions = nn.Embedding(50, 8), nn.Parameter(torch.randn(32, 8))
        self.fc = nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask):
        hidden = torch.relu(self.fc(self.embed(input_ids) + self.positions[: input_ids.shape[1]]))
        hidden = hidden * attention_mask[..., None]
        return hidden.reshape(hidden.shape[0], -1).sum(1)


def _tokens(batch: int, length: int) -> dict:
    return {"input_ids": torch.randint(0, 50, (batch, length)), "attention_mask": torch.randint(0, 2, (batch, length))}


def test_named_dynamic_dimensions_stay_symbolic_in_the_exported_graph():
    model, example = _Positions().eval(), _tokens(2, 12)
    fixed = capture(model, example, frontend="export")
    with pytest.raises(RuntimeError):  # the sequence length was specialised to 12
        fixed(**_tokens(3, 5))
    dims = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    gm = capture(model, example, frontend="export", dynamic_dims=dims)
    for length in (3, 12, 29):  # fresh ids at sizes the capture never saw
        batch = _tokens(4, length)
        torch.testing.assert_close(gm(**batch), model(**batch), rtol=0, atol=0)


def test_a_dynamic_dimension_of_an_input_the_model_lacks_is_refused():
    with pytest.raises(TraceError, match="'token_ids', not an input of the model"):
        capture(_Positions().eval(), _tokens(2, 12), frontend="export", dynamic_dims={"token_ids": {1: "seq"}})
