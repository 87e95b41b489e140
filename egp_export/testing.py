"""Helpers to make real architectures into test and benchmark subjects without trained weights.

No pretrained weights can be downloaded here, so tests and benchmarks build
torchvision, timm and Hugging Face transformers models with random weights
(transformers from a config: nothing is downloaded), *engineer* some
activations to be linear (a BatchNorm or Linear bias set far into one region
of the activation that follows), and recalibrate every BatchNorm's running
statistics on random data, so activations are normalised the way a trained
network's are rather than vanishing or exploding with depth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from egp_export.analysis.activations import activation_spec
from egp_export.analysis.capture import capture
from egp_export.analysis.fx import activation_nodes
from egp_export.analysis.inputs import Batch
from egp_export.analysis.ops import BATCHNORM_TYPES, CONV_TYPES, LINEAR_TYPES, is_add, is_identity, named_modules


def recalibrate_batchnorm(
    model: nn.Module, shape: tuple[int, ...], seed: int = 1, *, batches: int = 2, batch_size: int = 32
) -> nn.Module:
    """Running statistics measured on random data (cumulative average), then eval mode. Changes ``model``.

    A model without BatchNorm (a transformer) is only put in eval mode: it is never run on the random images."""
    generator = torch.Generator().manual_seed(seed)
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch_size, *shape, generator=generator))
    return model.eval()


def set_parameter(parameter: torch.Tensor, value) -> None:
    """Fill a parameter with a scalar or a broadcastable tensor (engineering a site's bias or scale)."""
    with torch.no_grad():
        parameter.copy_(torch.as_tensor(value, dtype=parameter.dtype).expand_as(parameter))


# Engineering one linear site ------------------------------------------------------

# Where to put a site's pre-activation so that every input a test draws stays in
# one region whose map is affine (the identity unless said otherwise).
_REGION_CENTRES = {
    "relu": 30.0,
    "leaky_relu": 30.0,
    "prelu": 30.0,
    "relu6": 3.0,  # inside (0, 6)
    "hardswish": 30.0,  # hardswish(z) = z for z >= 3
    "hardsigmoid": 30.0,  # constant 1 for z >= 3
    "gelu": 30.0,  # GELU(z) = z to 1e-190 for z > 24
    "silu": 30.0,  # SiLU(z) = z * (1 - 9e-14) at z = 30, below fp32 resolution
    "mish": 30.0,
}
# The pre-activation's spread around the centre: a BatchNorm's scale (its input is
# normalised on data like the calibration data), or a layer's largest weight.
_BATCHNORM_SPREAD = 0.1
_LAYER_WEIGHT_SCALE = 1e-3


@dataclass(frozen=True)
class EngineeredSite:
    """The activation call site made linear by construction and the parameters set to do it."""

    site: str  # node name, as in the compile report's analysis rows
    activation: str
    parameters: tuple[str, ...]


def _producer_parameters(node: fx.Node, modules: dict[str, nn.Module]) -> list[tuple[str, str, str]] | None:
    """(scale parameter, bias parameter, kind) of each layer whose sum feeds an activation, or None.

    A module call (BatchNorm, Linear, Conv with a bias), timm's fused forms
    (``F.batch_norm`` / ``F.linear`` / ``F.conv2d`` on parameters, then an
    identity dropout), or a sum of such (RepVGG's 3x3 + 1x1 + identity branches).
    """
    while is_identity(node, modules) and len(node.users) == 1:
        node = node.args[0]
    if len(node.users) != 1:
        return None
    if is_add(node):
        found = [_producer_parameters(a, modules) if isinstance(a, fx.Node) else None for a in node.args]
        return None if None in found else found[0] + found[1]
    if node.op == "call_module":
        module = modules[str(node.target)]
        if isinstance(module, BATCHNORM_TYPES) and module.affine:
            return [(f"{node.target}.weight", f"{node.target}.bias", "batchnorm")]
        if isinstance(module, CONV_TYPES + LINEAR_TYPES) and module.bias is not None:
            return [(f"{node.target}.weight", f"{node.target}.bias", "layer")]
        return None
    positions = {F.batch_norm: (3, 4, "batchnorm"), F.linear: (1, 2, "layer"), F.conv2d: (1, 2, "layer")}
    if node.op != "call_function" or node.target not in positions:
        return None
    scale_at, bias_at, kind = positions[node.target]
    args = list(node.args)
    scale = args[scale_at] if len(args) > scale_at else node.kwargs.get("weight")
    bias = args[bias_at] if len(args) > bias_at else node.kwargs.get("bias")
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (scale, bias)):
        return None
    return [(str(scale.target), str(bias.target), kind)]


def engineer_linear_site(model: nn.Module, example: Batch | None = None, *, frontend: str = "fx") -> EngineeredSite:
    """Make the first activation fed by BatchNorms or biased layers linear on any input a test draws. Changes ``model``.

    The producers' scales shrink and their biases move so that the
    pre-activation sits at a centre of one affine region
    (``_REGION_CENTRES``): the site is linear by construction, not by luck of
    the data. Call ``recalibrate_batchnorm`` afterwards: the shifted
    activations change every later BatchNorm's statistics. ``frontend`` (and
    an ``example`` batch for "export"/"auto") captures the graph the site is
    found in, as the compile will (analysis/capture.py); the site's name is
    the one that compile's report gives it.
    """
    gm = capture(model.eval(), example, frontend=frontend)
    modules = named_modules(gm)
    for node in activation_nodes(gm):
        spec = activation_spec(node, modules)
        producer = node.args[0]
        if spec.kind not in _REGION_CENTRES or not isinstance(producer, fx.Node):
            continue
        found = _producer_parameters(producer, modules)
        if not found:
            continue
        # Each of n summed producers contributes centre / n.
        with torch.no_grad():
            for scale_name, bias_name, kind in found:
                scale, bias = model.get_parameter(scale_name), model.get_parameter(bias_name)
                if kind == "batchnorm":
                    scale.fill_(_BATCHNORM_SPREAD / len(found))
                else:
                    scale.mul_(_LAYER_WEIGHT_SCALE / len(found) / scale.abs().max().clamp_min(1e-12))
                bias.fill_(_REGION_CENTRES[spec.kind] / len(found))
        return EngineeredSite(node.name, spec.kind, tuple(name for names in found for name in names[:2]))
    raise ValueError(f"{type(model).__name__} has no activation fed by BatchNorms or biased layers to engineer")


# The model zoo -------------------------------------------------------------------------




@dataclass(frozen=True)
class ZooModel:
    """One architecture the end-to-end tests compile, as data.

    ``support`` (engineered subject) and ``untouched_support`` (None: the
    same): "compiles", or the project error the compile raises and a phrase of
    its message ("VerificationError: ..."). ``leaves``: submodules traced as
    one call because torch.fx cannot trace through them (their activations are
    not analysed). ``onnx_batch``: the batch size of the example the ONNX export
    starts from (2 where a batch-1 example fails with the dynamo exporter,
    measured; see DESIGN.md). ``exporter``: the one the default test run uses (the TorchScript exporter is
    ten times faster; "dynamo" where it cannot export the model). ``slow``: left out of the default test run.
    ``frontend``: how the compile captures it ("auto" for models torch.fx cannot trace: torch.export captures
    them). ``vocabulary``: 0 for float inputs of ``input_shape``, else token ids below it (``input_shape`` is
    the sequence shape); ``sample`` draws either.
    """

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    support: str = "compiles"
    untouched_support: str | None = None
    leaves: tuple[str, ...] = ()
    onnx_batch: int = 1
    exporter: str = "torchscript"
    slow: bool = True
    frontend: str = "fx"
    vocabulary: int = 0

    @property
    def family(self) -> str:
        return self.name.split("/", 1)[1]

    def expected(self, engineered: bool) -> str:
        return self.support if engineered or self.untouched_support is None else self.untouched_support

    def sample(self, samples: int, seed: int) -> torch.Tensor:
        """``samples`` inputs drawn with ``seed``: standard normal images, or uniform token ids."""
        generator = torch.Generator().manual_seed(seed)
        if self.vocabulary:
            return torch.randint(0, self.vocabulary, (samples, *self.input_shape), generator=generator)
        return torch.randn(samples, *self.input_shape, generator=generator)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


def _timm_class(module: str, cls: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import importlib

        return getattr(importlib.import_module(module), cls)(num_classes=10, **kwargs)

    return build


def _poolformer() -> nn.Module:
    """PoolFormer-S12's MetaFormer (pooling token mixer, GELU MLPs), one block per stage."""
    from timm.models.metaformer import MetaFormer, Pooling

    return MetaFormer(
        num_classes=10, depths=(1, 1, 1, 1), dims=(32, 64, 96, 128), token_mixers=Pooling, mlp_act=nn.GELU, mlp_bias=True
    )


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(num_classes=10, **kwargs)

    return build


def _torchvision_class(module: str, cls: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import importlib

        return getattr(importlib.import_module(module), cls)(num_classes=10, **kwargs)

    return build


def _crossvit() -> nn.Module:
    """A small CrossViT (two patch sizes, cross attention): its forward branches on Python values torch.fx cannot trace."""
    from timm.models.crossvit import CrossVit

    return CrossVit(
        img_size=48, img_scale=(1.0, 1.0), patch_size=(8, 16), embed_dim=(32, 64), depth=((1, 1, 0),), num_heads=(2, 2),
        mlp_ratio=(2.0, 2.0, 1.0), num_classes=10,
    )


# Small Hugging Face configurations (random weights, nothing downloaded); tuple outputs (return_dict=False).
HF_BERT_CONFIG = {
    "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
    "max_position_embeddings": 64, "return_dict": False,
}
HF_VIT_CONFIG = {
    "image_size": 32, "patch_size": 8, "num_channels": 3, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "intermediate_size": 128, "return_dict": False,
}
BERT_SEQUENCE = 16


def _transformers(cls: str, config: dict) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        model_class = getattr(transformers, cls)
        return model_class(model_class.config_class(**config))

    return build


@dataclass(frozen=True)
class IdentityMlp:
    """One transformer MLP whose activation was replaced by the identity: the module paths of the activation and
    of the two linears that then compute one linear map."""

    activation: str
    fc1: str
    fc2: str


# Where a Hugging Face encoder keeps its layers and, in each, its MLP: (layer list, activation, fc1, fc2).
_HF_MLP_LAYOUTS = (
    ("encoder.layer", "intermediate.intermediate_act_fn", "intermediate.dense", "output.dense"),  # BERT
    ("layers", "mlp.activation_fn", "mlp.fc1", "mlp.fc2"),  # ViT (transformers 5)
)


def identity_mlp_layers(model: nn.Module, layers: tuple[int, ...]) -> list[IdentityMlp]:
    """EASIER-style identity sites: the MLP activation of each of ``layers`` of a Hugging Face BERT/ViT encoder
    becomes the identity. Changes ``model``; returns what was replaced.

    What entropy-guided depth reduction leaves of a transformer block whose GELU has zero entropy: fc1 and
    fc2 then compute one linear map, which the compile merges (and folds the residual into).
    """
    modules = dict(model.named_modules())
    layout = next((layout for layout in _HF_MLP_LAYOUTS if f"{layout[0]}.0.{layout[1]}" in modules), None)
    if layout is None:
        raise ValueError(f"{type(model).__name__} has none of the Hugging Face BERT/ViT MLP layouts {_HF_MLP_LAYOUTS}")
    stack, activation, fc1, fc2 = layout
    replaced = []
    for index in layers:
        path = f"{stack}.{index}.{activation}"
        owner, _, attribute = path.rpartition(".")
        setattr(model.get_submodule(owner), attribute, nn.Identity().train(model.training))
        replaced.append(IdentityMlp(path, f"{stack}.{index}.{fc1}", f"{stack}.{index}.{fc2}"))
    return replaced


SMALL = (3, 32, 32)
MEDIUM = (3, 64, 64)

# Measured with ``python -m tests.test_zoo_e2e`` (docs/zoo.md has the table). ``slow=False``: the
# default test run, one or two per family, about 3 minutes on 2 cores.
ZOO: list[ZooModel] = [
    # torchvision
    ZooModel("torchvision/resnet18", _torchvision("resnet18"), SMALL, slow=False),
    ZooModel("torchvision/mobilenet_v2", _torchvision("mobilenet_v2"), SMALL),
    ZooModel("torchvision/mobilenet_v3_small", _torchvision("mobilenet_v3_small"), SMALL, slow=False),
    ZooModel("torchvision/efficientnet_b0", _torchvision("efficientnet_b0"), SMALL),
    ZooModel("torchvision/regnet_x_400mf", _torchvision("regnet_x_400mf"), SMALL),
    ZooModel("torchvision/shufflenet_v2_x0_5", _torchvision("shufflenet_v2_x0_5"), SMALL),
    ZooModel("torchvision/squeezenet1_1", _torchvision("squeezenet1_1"), MEDIUM),
    ZooModel("torchvision/mnasnet0_5", _torchvision("mnasnet0_5"), SMALL),
    ZooModel("torchvision/densenet121", _torchvision("densenet121"), SMALL),
    ZooModel("torchvision/convnext_tiny", _torchvision("convnext_tiny"), SMALL, onnx_batch=2),
    ZooModel(
        "torchvision/vgg11_bn", _torchvision("vgg11_bn"), SMALL,
        exporter="dynamo",  # TorchScript: adaptive_avg_pool2d to a size that does not divide the input
    ),
    ZooModel(
        "torchvision/vit",
        _torchvision_class(
            "torchvision.models.vision_transformer", "VisionTransformer",
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        ),
        SMALL,
        onnx_batch=2,
        slow=False,
    ),
    ZooModel(
        "torchvision/swin",
        _torchvision_class(
            "torchvision.models.swin_transformer", "SwinTransformer",
            patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
        ),
        SMALL,
        onnx_batch=2,
        slow=False,
    ),
    # timm
    ZooModel("timm/resnet10t", _timm("resnet10t"), SMALL, slow=False),
    ZooModel("timm/resnetv2_18", _timm("resnetv2_18"), SMALL),
    ZooModel("timm/regnetx_002", _timm("regnetx_002"), SMALL, slow=False),
    ZooModel("timm/mobilenetv2_050", _timm("mobilenetv2_050"), SMALL),
    ZooModel("timm/mobilenetv3_small_050", _timm("mobilenetv3_small_050"), SMALL, slow=False),
    ZooModel("timm/efficientnet_b0", _timm("efficientnet_b0"), SMALL),
    ZooModel("timm/ghostnet_050", _timm("ghostnet_050"), SMALL),
    ZooModel("timm/repvgg_a0", _timm("repvgg_a0"), SMALL, slow=False),
    ZooModel("timm/rexnet_100", _timm("rexnet_100"), SMALL),
    ZooModel("timm/dla46_c", _timm("dla46_c"), SMALL, slow=False),
    ZooModel("timm/hrnet_w18_small", _timm("hrnet_w18_small"), MEDIUM),
    ZooModel("timm/convnext_atto", _timm("convnext_atto"), SMALL, onnx_batch=2, slow=False),
    ZooModel(
        "timm/vit_tiny", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), SMALL,
        exporter="dynamo", slow=False,  # TorchScript: scaled_dot_product_attention's is_causal traced as a Tensor
    ),
    ZooModel("timm/deit_tiny", _timm("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), SMALL, exporter="dynamo"),
    ZooModel("timm/swin_tiny", _timm("swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1, 1, 1)), (3, 56, 56)),
    ZooModel("timm/levit_128s", _timm("levit_128s", img_size=64), MEDIUM, onnx_batch=2),
    ZooModel(
        "timm/mixer",
        _timm_class("timm.models.mlp_mixer", "MlpMixer", img_size=64, patch_size=16, num_blocks=2, embed_dim=64),
        MEDIUM,
        slow=False,
    ),
    ZooModel("timm/poolformer", _poolformer, SMALL, onnx_batch=2, slow=False),
    ZooModel("timm/edgenext_xx_small", _timm("edgenext_xx_small"), MEDIUM, onnx_batch=2),
    ZooModel("timm/fastvit_t8", _timm("fastvit_t8"), MEDIUM),
    ZooModel(
        "timm/mobilevit_xxs", _timm("mobilevit_xxs"), MEDIUM, leaves=("stages.2.1", "stages.3.1", "stages.4.1"), slow=False
    ),
    ZooModel(
        "timm/vgg11", _timm("vgg11", mlp_ratio=1 / 64), SMALL, leaves=("pre_logits",),
        exporter="dynamo", slow=False,  # TorchScript: adaptive_avg_pool2d to a size that does not divide the input
    ),
    # Models torch.fx cannot trace, compiled through --frontend auto (torch.export captures them).
    ZooModel(
        "transformers/bert", _transformers("BertModel", HF_BERT_CONFIG), (BERT_SEQUENCE,), frontend="auto",
        vocabulary=HF_BERT_CONFIG["vocab_size"], exporter="dynamo", onnx_batch=2, slow=False,
    ),
    ZooModel(
        "transformers/vit", _transformers("ViTModel", HF_VIT_CONFIG), SMALL, frontend="auto", exporter="dynamo",
        onnx_batch=2,
    ),
    ZooModel("timm/crossvit", _crossvit, (3, 48, 48), frontend="auto", exporter="dynamo", onnx_batch=2),
    # torch.export keeps sizes as sym_size nodes, which the TorchScript exporter traces as constants (the file would
    # run at the example's batch only, and the ORT check refuses it): this graph exports with dynamo.
    ZooModel("timm/mobilevit_xxs-auto", _timm("mobilevit_xxs"), MEDIUM, frontend="auto", exporter="dynamo", onnx_batch=2),
]
ZOO_BY_NAME = {entry.name: entry for entry in ZOO}
