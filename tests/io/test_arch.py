"""Tests for egp_export.io.arch: resolving --arch specs and parsing --arch-kwargs."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
import torch
import torchvision
from torch import nn

from egp_export.errors import ArchitectureError
from egp_export.io.arch import build_model, parse_kwargs

_FACTORY_MODULE = """
    from torch import nn

    NOT_CALLABLE = 42


    def make_net(width=4, bias=True):
        return nn.Linear(3, width, bias=bias)


    def make_string():
        return "not a model"


    def broken(**kwargs):
        raise ValueError("width must be even")


    class Nets:
        @staticmethod
        def create(width=2):
            return nn.Linear(3, width)
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A throwaway module ``egp_test_factories`` importable for the duration of one test."""
    (tmp_path / "egp_test_factories.py").write_text(textwrap.dedent(_FACTORY_MODULE), encoding="utf-8")
    (tmp_path / "egp_test_broken_import.py").write_text("raise RuntimeError('import-time failure')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    # Each test gets a fresh import even though the module name repeats.
    monkeypatch.delitem(sys.modules, "egp_test_factories", raising=False)
    return "egp_test_factories"


def test_torchvision_resnet18_builds_untrained_with_kwargs():
    model = build_model("torchvision:resnet18", {"num_classes": 7})

    assert type(model).__name__ == "ResNet"
    assert model.fc.out_features == 7
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_torchvision_name_is_case_insensitive():
    assert type(build_model("torchvision:ResNet18")).__name__ == "ResNet"


def test_unknown_torchvision_model_suggests_close_names():
    with pytest.raises(ArchitectureError, match=r"no model 'resnet19' \(close names: .*resnet18"):
        build_model("torchvision:resnet19")


def test_torchvision_refuses_pretrained_weights():
    with pytest.raises(ArchitectureError, match="never downloads"):
        build_model("torchvision:resnet18", {"weights": "DEFAULT"})


def test_torchvision_backbone_weights_are_never_downloaded(monkeypatch):
    def refuse_download(*args, **kwargs):
        raise AssertionError("build_model tried to download weights")

    # Every torchvision weight download goes through WeightsEnum.get_state_dict.
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse_download)

    model = build_model("torchvision:lraspp_mobilenet_v3_large", {"num_classes": 3})

    assert type(model).__name__ == "LRASPP"
    assert model.classifier.low_classifier.out_channels == 3


def test_torchvision_bad_kwarg_reports_the_exception():
    with pytest.raises(ArchitectureError, match=r"raised TypeError: .*no_such_argument.*--arch-kwargs"):
        build_model("torchvision:resnet18", {"no_such_argument": 1})


def test_package_factory_with_kwargs(factory_module):
    model = build_model(f"{factory_module}:make_net", {"width": 6, "bias": False})

    assert isinstance(model, nn.Linear)
    assert model.out_features == 6
    assert model.bias is None


def test_package_factory_attribute_path(factory_module):
    model = build_model(f"{factory_module}:Nets.create", {"width": 5})

    assert isinstance(model, nn.Linear)
    assert model.out_features == 5


@pytest.mark.parametrize("spec", ["resnet18", ":make_net", "torchvision:", "  :  "])
def test_bad_syntax(spec):
    with pytest.raises(ArchitectureError, match="is not of the form"):
        build_model(spec)


def test_module_not_importable():
    with pytest.raises(ArchitectureError, match=r"cannot import 'no_such_pkg_egp\.models'.*PYTHONPATH"):
        build_model("no_such_pkg_egp.models:make")


def test_module_failing_at_import(factory_module):
    with pytest.raises(ArchitectureError, match=r"importing 'egp_test_broken_import' raised RuntimeError: import-time"):
        build_model("egp_test_broken_import:make")


def test_missing_attribute_suggests_close_names(factory_module):
    with pytest.raises(ArchitectureError, match=r"has no attribute 'make_nett' \(close names: make_net"):
        build_model(f"{factory_module}:make_nett")


def test_not_callable_attribute(factory_module):
    with pytest.raises(ArchitectureError, match="is a int, not a function or class"):
        build_model(f"{factory_module}:NOT_CALLABLE")


def test_factory_raising_includes_exception_text(factory_module):
    with pytest.raises(ArchitectureError, match=r"raised ValueError: width must be even when called with width=3"):
        build_model(f"{factory_module}:broken", {"width": 3})


def test_result_must_be_a_module(factory_module):
    with pytest.raises(ArchitectureError, match=r"returned a str, not a torch\.nn\.Module"):
        build_model(f"{factory_module}:make_string")


def test_parse_kwargs_types():
    parsed = parse_kwargs(
        [
            "num_classes=10",
            "dropout=0.25",
            "bias=False",
            "affine=true",
            "track=false",
            "size=(3, 32, 32)",
            "norm=None",
            "act=relu",
            "name='quoted'",
            "path=a b",
            "empty=",
            "expr=1+",
        ]
    )

    assert parsed == {
        "num_classes": 10,
        "dropout": 0.25,
        "bias": False,
        "affine": True,
        "track": False,
        "size": (3, 32, 32),
        "norm": None,
        "act": "relu",
        "name": "quoted",
        "path": "a b",
        "empty": "",
        "expr": "1+",
    }
    assert type(parsed["num_classes"]) is int
    assert type(parsed["affine"]) is bool


def test_parse_kwargs_value_may_contain_equals():
    assert parse_kwargs(["expr=a=b"]) == {"expr": "a=b"}


def test_parse_kwargs_empty():
    assert parse_kwargs([]) == {}


@pytest.mark.parametrize("item", ["novalue", "=5", "two words=1", "1abc=2"])
def test_parse_kwargs_malformed(item):
    with pytest.raises(ArchitectureError, match="is not KEY=VALUE"):
        parse_kwargs([item])


def test_parse_kwargs_duplicate_key():
    with pytest.raises(ArchitectureError, match="more than once"):
        parse_kwargs(["a=1", "a=2"])


# transformers:CLASS ---------------------------------------------------------------------------------------------

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="Hugging Face transformers is not installed (pip install 'egp-export[transformers]')",
)


@needs_transformers
def test_transformers_class_builds_from_its_config_with_kwargs():
    model = build_model(
        "transformers:BertModel",
        parse_kwargs(["hidden_size=32", "num_hidden_layers=1", "num_attention_heads=2", "intermediate_size=64",
                      "vocab_size=50", "hidden_act=linear"]),
    )
    assert model.config.hidden_size == 32 and len(model.encoder.layer) == 1
    assert model.encoder.layer[0].intermediate.dense.out_features == 64
    ids = torch.randint(0, 50, (2, 7))
    assert model.eval()(input_ids=ids).last_hidden_state.shape == (2, 7, 32)


@needs_transformers
def test_transformers_refuses_a_config_field_it_would_ignore():
    with pytest.raises(ArchitectureError, match="hiden_size.*close names:.*hidden_size"):
        build_model("transformers:BertModel", {"hiden_size": 32})


@needs_transformers
def test_unknown_transformers_class_suggests_close_names():
    with pytest.raises(ArchitectureError, match="close names: BertModel"):
        build_model("transformers:BertModle")
    with pytest.raises(ArchitectureError, match="no model class 'AutoConfig'"):
        build_model("transformers:AutoConfig")


def test_transformers_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(ArchitectureError, match=r"pip install 'egp-export\[transformers\]'"):
        build_model("transformers:BertModel")
