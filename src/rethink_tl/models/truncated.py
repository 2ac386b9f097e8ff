"""Deep trunks: ResNet50 and DenseNet121 whole or cut, and any timm backbone whole or cut.

Trunks are assembled from the torchvision / timm modules themselves and keep their key names, so
pretrained tensors map onto them by name (``ModelInfo.source_prefix``) and nothing is re-implemented.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from functools import partial
from typing import Any, Mapping, Sequence

import timm
import torch
import torchvision
from torch import nn

from ..errors import UserError
from .registry import IMAGENET_MEAN, IMAGENET_STD, XRAY_SOURCE, ModelInfo, Trunk, chest_xray_input, register

# Padding lets ResNet shrink any input to a 1x1 map, but DenseNet's un-padded 2x2 average pools after
# a /4 stem need about 30 px, and timm nets reach stride 32: 32 px suits every deep trunk here.
DEEP_MIN_IMAGE_SIZE = 32


# Cut points as the paper states them: the number of convolutions kept, counting the stem conv and
# the three convs of each bottleneck (downsample convs not counted).
RESNET_CUTS = {"res_t1": 25, "res_t2": 37, "res_t3": 43, "res_t4": 46, "res_t5": 49}
DENSENET_CUTS = {"dens_t1": 1, "dens_t2": 2, "dens_t3": 3}


def _state_prefixes(trunk: nn.Module) -> tuple[str, ...]:
    """Every top-level part of the trunk that holds tensors, in state_dict order.

    Children as "name." (the dot keeps "layer1." from matching "layer10."), tensors held by the trunk
    itself (ViT's cls_token, pos_embed) by their own key.
    """
    parts = dict.fromkeys(key.split(".", 1)[0] + ("." if "." in key else "") for key in trunk.state_dict())
    return tuple(parts)


def resnet50_trunk(convs: int) -> nn.Sequential:
    """torchvision ResNet50 up to its first ``convs`` convolutions (``1 + 3 * bottlenecks``)."""
    if (convs - 1) % 3 or not 4 <= convs <= 49:
        raise ValueError(f"a ResNet50 cut must be 1 + 3k convolutions with 1 <= k <= 16, got {convs}")
    net = torchvision.models.resnet50(weights=None)
    children: list[tuple[str, nn.Module]] = [
        ("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu), ("maxpool", net.maxpool)]
    blocks_left = (convs - 1) // 3
    for name in ("layer1", "layer2", "layer3", "layer4"):
        if blocks_left == 0:
            break
        layer: nn.Sequential = getattr(net, name)
        keep = min(blocks_left, len(layer))
        # Slicing an nn.Sequential keeps the "0", "1", ... names, so keys stay torchvision's.
        children.append((name, layer if keep == len(layer) else layer[:keep]))
        blocks_left -= keep
    return nn.Sequential(OrderedDict(children))


def densenet121_trunk(blocks: int | None) -> nn.Sequential:
    """torchvision DenseNet121 ``features`` up to transition ``blocks``, or whole (``None``).

    The whole trunk appends the ReLU that torchvision applies after norm5 in ``forward``.
    """
    features = torchvision.models.densenet121(weights=None).features
    if blocks is None:
        return nn.Sequential(OrderedDict([*features.named_children(), ("relu5", nn.ReLU(inplace=True))]))
    last = f"transition{blocks}"
    if last not in dict(features.named_children()):
        raise ValueError(f"DenseNet121 has no {last}")
    children = []
    for name, module in features.named_children():
        children.append((name, module))
        if name == last:
            break
    return nn.Sequential(OrderedDict(children))


def grey_stem(features: nn.Module) -> None:
    """Make a DenseNet121 ``features`` (or a trunk made of its children) read one grey channel, as
    torchxrayvision's DenseNet does: conv0 becomes [64, 1, 7, 7], freshly initialised as torchvision
    initialises it; every other module, and every key name, stays torchvision's."""
    rgb = features.conv0
    features.conv0 = nn.Conv2d(1, rgb.out_channels, kernel_size=rgb.kernel_size, stride=rgb.stride,
                               padding=rgb.padding, bias=False)
    nn.init.kaiming_normal_(features.conv0.weight)


def _deep_info(name: str, kind: str, arch: str, source_prefix: str, trunk: nn.Module,
               num_features: int) -> ModelInfo:
    return ModelInfo(
        name=name, kind=kind, arch=arch, family="torchvision", source_prefix=source_prefix,
        reused_prefixes=_state_prefixes(trunk), min_image_size=DEEP_MIN_IMAGE_SIZE,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, num_features=num_features)


def _build_resnet(name: str, cfg: Mapping[str, Any], *, convs: int, kind: str) -> Trunk:
    trunk = resnet50_trunk(convs)
    last_block = trunk[-1][-1]
    return Trunk(trunk, _deep_info(name, kind, "resnet50", "", trunk, last_block.conv3.out_channels))


def densenet_out_channels(modules: Sequence[nn.Module]) -> int:
    """Width of what a run of DenseNet modules emits: the last BatchNorm or transition decides."""
    for module in reversed(modules):
        if isinstance(module, nn.BatchNorm2d):
            return module.num_features
        if isinstance(module, torchvision.models.densenet._Transition):
            return module.conv.out_channels
    raise ValueError("trunk has no BatchNorm2d or transition to read its width from")


def _build_densenet(name: str, cfg: Mapping[str, Any], *, blocks: int | None, kind: str,
                    source: str | None = None) -> Trunk:
    trunk = densenet121_trunk(blocks)
    info = _deep_info(name, kind, "densenet121", "features.", trunk, densenet_out_channels(trunk))
    if source == XRAY_SOURCE:
        grey_stem(trunk)
        info = chest_xray_input(info)
    return Trunk(trunk, info)


register("res_f", "resnet50")(partial(_build_resnet, convs=49, kind="full"))
register("dens_f", "densenet121", sources=(XRAY_SOURCE,))(partial(_build_densenet, blocks=None, kind="full"))
for _name, _convs in RESNET_CUTS.items():
    register(_name)(partial(_build_resnet, convs=_convs, kind="truncated"))
for _name, _blocks in DENSENET_CUTS.items():
    register(_name, sources=(XRAY_SOURCE,))(partial(_build_densenet, blocks=_blocks, kind="truncated"))


# --- any timm backbone -----------------------------------------------------------------------

def timm_backbone(cfg: Mapping[str, Any]) -> nn.Module:
    """``cfg['backbone']`` built by timm without classifier or pooling (random weights)."""
    if not cfg.backbone:
        raise UserError("model.backbone is not set: name a timm backbone, e.g. model.backbone=tf_efficientnet_lite0")
    backbone = str(cfg.backbone)
    if not timm.is_model(backbone):
        close = difflib.get_close_matches(backbone, timm.list_models(), n=3)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise UserError(
            f"timm does not know the backbone {backbone!r}.{hint} "
            f"List names with python -c \"import timm; print(timm.list_models('*lite*'))\"")
    return timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="")


def timm_features(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``forward_features`` as an NCHW map whatever layout the backbone emits."""
    y = trunk.forward_features(x)
    if y.ndim == 3:
        # A token sequence (ViT family): a 1-pixel-wide map, so the average pool averages the tokens.
        return y.transpose(1, 2).unsqueeze(-1)
    if getattr(trunk, "output_fmt", "NCHW") == "NHWC":
        return y.permute(0, 3, 1, 2)
    return y


def timm_intermediate(trunk: nn.Module, x: torch.Tensor, *, index: int) -> torch.Tensor:
    # forward_intermediates returns NCHW for every timm family, unlike forward_features.
    return trunk.forward_intermediates(x, indices=[index], intermediates_only=True)[0]


def _timm_info(name: str, kind: str, cfg: Mapping[str, Any], trunk: nn.Module, num_features: int) -> ModelInfo:
    pretrained_cfg = getattr(trunk, "pretrained_cfg", {}) or {}
    # Transformers with learned position embeddings accept only their training size.
    fixed = pretrained_cfg.get("fixed_input_size", False)
    min_size = int(pretrained_cfg["input_size"][-1]) if fixed else DEEP_MIN_IMAGE_SIZE
    return ModelInfo(
        name=name, kind=kind, arch=str(cfg.backbone), family="timm",
        source_prefix="", reused_prefixes=_state_prefixes(trunk), min_image_size=min_size,
        mean=tuple(pretrained_cfg.get("mean", IMAGENET_MEAN)), std=tuple(pretrained_cfg.get("std", IMAGENET_STD)),
        num_features=num_features)


@register("timm", reads=("backbone",))
def build_timm(name: str, cfg: Mapping[str, Any]) -> Trunk:
    trunk = timm_backbone(cfg)
    return Trunk(trunk, _timm_info(name, "full", cfg, trunk, int(trunk.num_features)), timm_features)


@register("trunc", reads=("backbone", "cut"))
def build_trunc(name: str, cfg: Mapping[str, Any]) -> Trunk:
    trunk = timm_backbone(cfg)
    backbone = str(cfg.backbone)
    stages = getattr(trunk, "feature_info", None)
    if not hasattr(trunk, "prune_intermediate_layers") or not isinstance(stages, list):
        raise UserError(f"timm backbone {backbone!r} does not support truncation; use model=timm for it whole")
    valid = f"0..{len(stages) - 1}"
    raw_cut = cfg.cut
    try:
        cut = int(raw_cut)
    except (TypeError, ValueError):
        raise UserError(f"model.cut must be an integer in {valid} for {backbone}, got {raw_cut!r}") from None
    if not 0 <= cut < len(stages):
        widths = ", ".join(f"{i}: {s['num_chs']} ch /{s['reduction']}" for i, s in enumerate(stages))
        raise UserError(f"model.cut={cut} is out of range for {backbone}: valid cuts are {valid} ({widths})")
    num_features = int(stages[cut]["num_chs"])
    # A list, not an int: an int means "the last n stages" to timm and would keep the whole net.
    trunk.prune_intermediate_layers(indices=[cut], prune_head=True, prune_norm=True)
    return Trunk(trunk, _timm_info(name, "truncated", cfg, trunk, num_features), partial(timm_intermediate, index=cut))
