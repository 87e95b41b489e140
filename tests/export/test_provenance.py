"""Provenance in the ONNX file (export/provenance.py) and ``egp-export inspect``.

Structure: every node of an exported compiled model names a source module of
the ORIGINAL model, or says which tool added it and why. A merged node lists
every conv it came from and the merge's kind. Both exporters; the written
file passes ``onnx.checker``; the file still matches the module numerically
(the export is verified on fresh inputs as always).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.capture import capture
from egp_export.analysis.fx import insert_module_call, propagate_shapes
from egp_export.analysis.numerics import compare
from egp_export.analysis.plans import plan_site, store_plans
from egp_export.analysis.provenance import PROVENANCE_KEY
from egp_export.analysis.stats import calibrate
from egp_export.errors import ExportError
from egp_export.export.inspect import EXPORTER, MODEL, SOURCE_MODULES, format_table, inspect_onnx, read_provenance
from egp_export.export.onnx import export_onnx, ort_session, run_onnx
from egp_export.export.provenance import annotate, scoped_module
from egp_export.passes import GraphPass, PassManager, Recorder, default_steps
from egp_export.passes.modules import ChannelAffine
from egp_export.records import RewriteKind

REPO = Path(__file__).resolve().parents[2]
EXPORTERS = ("torchscript", "dynamo")


class Block(nn.Module):
    """conv(3x3) -> BN -> conv(1x1): a chain merge_conv_chains merges exactly, and a residual add owned by the block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(8, 8, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv_b(self.bn(self.conv_a(x))) + x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block = Block()
        self.drop = nn.Dropout(0.1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x)))
        return self.head(torch.flatten(self.drop(self.pool(x)), 1))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.block.bn.running_mean.uniform_(-0.5, 0.5)
        net.block.bn.running_var.uniform_(0.5, 2.0)
    return net


def _compiled(net: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The default pipeline on a fresh capture calibrated on ``example`` (BN folds, conv chains merge, identities go;
    the linearizer requires calibrated sites)."""
    gm = capture(net, example)
    store_plans(gm, {site.name: plan_site(site, 1e-5) for site in calibrate(gm, [example])})
    propagate_shapes(gm, example)
    PassManager(default_steps(), example_input=example).run(gm)
    return gm


def _rows_by_op(rows):
    found: dict[str, list] = {}
    for row in rows:
        found.setdefault(row.op_type, []).append(row)
    return found


def test_merged_conv_carries_both_convs_the_batchnorm_and_the_merge_kind():
    x = torch.randn(2, 3, 16, 16)
    gm = _compiled(_net(), x)
    calls = [n for n in gm.graph.nodes if n.op.startswith("call_")]
    merged = [n for n in calls if RewriteKind.MERGED_EXACT in n.meta[PROVENANCE_KEY].rewrites]
    assert len(merged) == 1, [n.meta.get(PROVENANCE_KEY) for n in calls]
    provenance = merged[0].meta[PROVENANCE_KEY]
    assert provenance.modules[:3] == ("block.conv_a", "block.bn", "block.conv_b")
    assert set(provenance.rewrites) >= {RewriteKind.BN_FOLDED, RewriteKind.MERGED_EXACT}
    assert {"block_conv_a", "block_bn", "block_conv_b"} <= set(provenance.sites)
    # The dropout removed in eval mode is absorbed by the node that now stands for it (the pool).
    pool = next(n for n in gm.graph.nodes if n.target == "pool")
    assert "drop" in pool.meta[PROVENANCE_KEY].modules
    assert RewriteKind.IDENTITY_REMOVED in pool.meta[PROVENANCE_KEY].rewrites


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_every_node_of_the_file_maps_to_source_modules(exporter, tmp_path):
    net = _net()
    x, fresh = torch.randn(2, 3, 16, 16), torch.randn(6, 3, 16, 16)
    gm = _compiled(net, x)
    result = export_onnx(gm, x, tmp_path / "model.onnx", verify_inputs=fresh, exporter=exporter)
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    rows = read_provenance(model)
    assert rows == result.provenance
    assert [r.name for r in rows] == [n.name for n in model.graph.node]
    assert all(row.mapped for row in rows), format_table(rows)
    by_op = _rows_by_op(rows)
    merged = [r for r in by_op["Conv"] if "merged_exact" in r.rewrites]
    assert len(merged) == 1, format_table(rows)
    # conv_a -> BN -> conv_b merged into one conv, and the block's residual add (made by Block.forward) folded in.
    assert merged[0].modules == ("block.conv_a", "block.bn", "block.conv_b", "block"), format_table(rows)
    assert merged[0].rewrites == ("bn_folded", "merged_exact", "residual_folded"), format_table(rows)
    assert merged[0].sites == ("block_conv_a", "block_bn", "block_conv_b", "add"), format_table(rows)
    assert "Add" not in by_op and [r.modules for r in by_op["Gemm"]] == [("head",)], format_table(rows)
    assert [r.modules for r in by_op["Relu"]] == [("",), ("block.act",)], format_table(rows)  # torch.relu in Net.forward
    assert any(r.modules == ("pool", "drop") and r.rewrites == ("identity_removed",) for r in rows), format_table(rows)
    # The file computes what the module does, on fresh inputs (the scoping wrapper changed nothing).
    with torch.no_grad():
        assert compare(net(fresh), run_onnx(ort_session(result.path), fresh)[0]).within(1e-5)


def test_nodes_the_exporter_or_the_simplifier_added_are_labelled_with_the_reason():
    gm = capture(nn.Sequential(nn.ReLU()).eval())
    scoped = scoped_module(gm)
    (scope,) = scoped.scopes
    value = onnx.helper.make_tensor_value_info
    relu = onnx.helper.make_node("Relu", ["x"], ["y"], name=f"/{scope}/module/Relu")
    identity = onnx.helper.make_node("Identity", ["y"], ["z"], name="Identity_0")  # outside every scope
    exported = onnx.helper.make_model(
        onnx.helper.make_graph([relu, identity], "g", [value("x", 1, [2])], [value("z", 1, [2])])
    )
    final = onnx.ModelProto()
    final.CopyFrom(exported)
    final.graph.node.add().CopyFrom(onnx.helper.make_node("Neg", ["z"], ["w"], name="made_later"))
    tensor = onnx.helper.make_tensor("c", 1, [1], [1.0])
    final.graph.node.add().CopyFrom(onnx.helper.make_node("Constant", [], ["c"], name="alone", value=tensor))
    rows = annotate(final, exported, scoped, added_by="onnx-simplifier")
    assert [(r.origin, r.modules) for r in rows] == [(MODEL, ("0",)), (EXPORTER, ()), (MODEL, ("0",)), ("onnx-simplifier", ())]
    assert "outside every graph node" in rows[1].note
    # A node the simplifier wrote computes part of what the model nodes around it compute; one on its own says so.
    assert rows[2].note == f"Neg added by onnx-simplifier after the export, computing part of what /{scope}/module/Relu computes"
    assert rows[3].note == "Constant added by onnx-simplifier after the export"
    assert all(row.mapped for row in rows)
    assert read_provenance(final) == rows


class _InsertWithoutProvenance(GraphPass):
    """A pass that forgets to carry provenance: the guard must show its node as unmapped."""

    name = "forgetful"

    def run(self, gm: fx.GraphModule, record: Recorder) -> None:
        head = next(n for n in gm.graph.nodes if n.target == "head")
        scale = ChannelAffine(torch.full((8,), 2.0), torch.ones(8), -1)  # not an identity: it stays
        node = insert_module_call(gm, head, "forgotten", scale, (head.args[0],))
        head.replace_input_with(head.args[0], node)
        record.rewrote(RewriteKind.AFFINE_FOLDED, [node.name])


def test_a_node_a_pass_inserted_without_provenance_is_reported_unmapped(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    gm = capture(_net(), x)
    propagate_shapes(gm, x)
    PassManager([_InsertWithoutProvenance()], example_input=x).run(gm)
    result = export_onnx(gm, x, tmp_path / "model.onnx", exporter="torchscript")
    unmapped = [row for row in result.provenance if not row.mapped]
    assert unmapped and all("no provenance recorded" in row.note for row in unmapped), format_table(result.provenance)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_plain_module_nodes_name_the_module_scope(exporter, tmp_path):
    """A module that is not a graph module is exported as it is: its nodes name the innermost module scope."""
    x = torch.randn(2, 3, 16, 16)
    result = export_onnx(_net(), x, tmp_path / "model.onnx", exporter=exporter)
    modules = {row.name: row.modules for row in result.provenance}
    assert all(row.mapped for row in result.provenance), format_table(result.provenance)
    assert {"stem", "block", "block.conv_b", "block.act", "pool", "head", ""} <= {m for ms in modules.values() for m in ms}
    # Both exporters fold the eval BatchNorm into conv_a themselves; the fused node names one of the two
    # (TorchScript: the conv, dynamo's optimizer: the BatchNorm). A compiled graph folds it before the export.
    fused = {"block.conv_a", "block.bn"} & {m for ms in modules.values() for m in ms}
    assert len(fused) == 1, format_table(result.provenance)


def test_scoped_module_computes_the_same_and_shares_parameters():
    x = torch.randn(3, 3, 16, 16)
    gm = _compiled(_net(), x)
    scoped = scoped_module(gm)
    with torch.no_grad():
        assert torch.equal(scoped.module(x), gm(x))
    assert {id(p) for p in scoped.module.parameters()} == {id(p) for p in gm.parameters()}
    assert set(scoped.scopes.values()) == {n for n in gm.graph.nodes if n.op.startswith("call_")}
    assert scoped_module(nn.Linear(2, 2)).graph is None


def test_inspect_refuses_files_without_provenance(tmp_path):
    plain = tmp_path / "plain.onnx"
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", 1, [1])], [value("y", 1, [1])])
    onnx.save(onnx.helper.make_model(graph), plain)
    with pytest.raises(ExportError, match="carries no egp-export provenance"):
        inspect_onnx(plain)
    (tmp_path / "bad.onnx").write_bytes(b"\x00not an onnx file at all")
    with pytest.raises(ExportError, match="is not an ONNX model"):
        inspect_onnx(tmp_path / "bad.onnx")
    with pytest.raises(ExportError, match="is not a file"):
        inspect_onnx(tmp_path / "missing.onnx")


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "egp_export", "inspect", *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )


def test_inspect_cli_prints_the_table_and_json_and_one_error_line_for_a_bad_file(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_onnx(_compiled(_net(), x), x, tmp_path / "model.onnx", exporter="torchscript")
    table = _cli(result.path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ONNX", "node", "op", "type", "source", "modules", "rewrites"]
    merged = [line for line in lines if "merged_exact" in line]
    assert len(merged) == 1 and "block.conv_a, block.bn, block.conv_b" in merged[0], table.stdout
    assert lines[-1] == f"{len(result.provenance)} nodes: {len(result.provenance)} from the model's modules"
    as_json = _cli(result.path, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == [row.to_dict() for row in result.provenance]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    failed = _cli(bad)
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("egp-export: error: "), failed.stderr
    assert "Traceback" not in failed.stderr


def test_metadata_is_plain_json_in_node_metadata_props(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    result = export_onnx(_compiled(_net(), x), x, tmp_path / "model.onnx", exporter="dynamo")
    model = onnx.load(str(result.path))
    for node in model.graph.node:
        props = {e.key: e.value for e in node.metadata_props}
        assert json.loads(props[SOURCE_MODULES]), node.name
    assert all(row.origin == MODEL for row in result.provenance)


def _zoo_export(name: str, exporter: str, tmp_path: Path):
    """A zoo model with an engineered linear site, compiled and checked as the zoo test does, then exported."""
    from egp_export.analysis.numerics import ORT_CPU_RTOL
    from egp_export.testing import ZOO_BY_NAME
    from tests.test_zoo_e2e import compile_and_check

    entry = ZOO_BY_NAME[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_and_check(entry, engineered=True)
        return export_onnx(
            compiled.module, compiled.fresh[: max(2, entry.onnx_batch)], tmp_path / "model.onnx",
            verify_inputs=compiled.fresh, rtol=max(ORT_CPU_RTOL, compiled.rtol), exporter=exporter,
        )


@pytest.mark.slow  # a zoo compile; tests/test_zoo_e2e.py's ONNX checks assert every zoo file is mapped, both exporters
def test_every_node_of_a_compiled_resnet18_maps_to_its_source_modules(tmp_path):
    result = _zoo_export("torchvision/resnet18", "torchscript", tmp_path)
    rows = result.provenance
    onnx.checker.check_model(onnx.load(str(result.path)), full_check=True)
    assert rows and all(row.mapped and row.origin == MODEL for row in rows), format_table(rows)
    # The engineered site (the stem's ReLU) was linearized into the identity and absorbed by the stem conv.
    stem = next(row for row in rows if row.op_type == "Conv")
    assert stem.modules == ("conv1", "bn1", "relu") and stem.sites == ("conv1", "bn1", "relu"), format_table(rows)
    assert stem.rewrites == ("bn_folded", "linearized", "affine_removed"), format_table(rows)
    convs = [row for row in rows if row.op_type == "Conv"]
    assert all(len(row.modules) >= 2 and "bn_folded" in row.rewrites for row in convs), format_table(rows)
    sources = {module for row in rows for module in row.modules}
    assert {"layer4.1.conv2", "layer2.0.downsample.0", "fc", "avgpool"} <= sources, format_table(rows)


class TwoHeads(nn.Module):
    """One module called at two sites, an in-place op, and two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.left, self.right = nn.Linear(3, 2), nn.Linear(3, 4)

    def forward(self, x):
        y = self.act(self.conv(x))
        z = self.act(self.conv(y)).mean((2, 3))
        return self.left(z), self.right(y.mean((2, 3)).add_(1.0))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_shared_module_sites_in_place_ops_and_several_outputs_map_exactly(exporter, tmp_path):
    import copy

    x = torch.randn(2, 3, 8, 8)
    gm = copy.deepcopy(_compiled(TwoHeads().eval(), x))  # a copy keeps what the nodes carry
    result = export_onnx(gm, x, tmp_path / "model.onnx", verify_inputs=torch.randn(5, 3, 8, 8), exporter=exporter)
    rows = result.provenance
    assert all(row.mapped and row.origin == MODEL for row in rows), format_table(rows)
    convs = [row for row in rows if row.op_type == "Conv"]
    # The shared conv's two calls are two call sites of one module: each ONNX node names its own.
    assert [row.modules for row in convs] == [("conv",), ("conv",)] and [r.sites for r in convs] == [("conv",), ("conv_1",)]
    assert sorted(row.modules for row in rows if row.op_type == "Gemm") == [("left",), ("right",)], format_table(rows)
    assert any(row.sites == ("add_",) for row in rows), format_table(rows)
