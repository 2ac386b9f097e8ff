"""Slim DenseNet121 ("transfusion" architecture, Raghu et al. 2019).

``dens_sK`` keeps the stem, dense blocks 1..K and transitions 1..K of DenseNet121 exactly (so they can
take ImageNet weights) and rebuilds everything above with growth rate 16 instead of 32: the upper
blocks are thinner and can only start from random weights.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any, Mapping

import torchvision
from torch import nn
from torchvision.models.densenet import _DenseBlock, _Transition

from .registry import IMAGENET_MEAN, IMAGENET_STD, XRAY_SOURCE, ModelInfo, Trunk, chest_xray_input, register
from .truncated import DEEP_MIN_IMAGE_SIZE, densenet_out_channels, grey_stem

SLIM_GROWTH_RATE = 16
SLIM_CUTS = {"dens_s1": 1, "dens_s2": 2, "dens_s3": 3}


def slim_densenet121(keep_blocks: int, growth_rate: int = SLIM_GROWTH_RATE) -> nn.Sequential:
    net = torchvision.models.densenet121(weights=None)
    block_config = (6, 12, 24, 16)  # DenseNet121
    if not 1 <= keep_blocks < len(block_config):
        raise ValueError(f"keep_blocks must be 1..{len(block_config) - 1}, got {keep_blocks}")
    kept = {"conv0", "norm0", "relu0", "pool0"}
    kept |= {f"denseblock{i}" for i in range(1, keep_blocks + 1)}
    kept |= {f"transition{i}" for i in range(1, keep_blocks + 1)}
    children = [(name, module) for name, module in net.features.named_children() if name in kept]

    channels = densenet_out_channels([module for _, module in children])
    new: list[tuple[str, nn.Module]] = []
    for i in range(keep_blocks + 1, len(block_config) + 1):
        new.append((f"denseblock{i}", _DenseBlock(block_config[i - 1], channels, bn_size=4,
                                                  growth_rate=growth_rate, drop_rate=0.0)))
        channels += block_config[i - 1] * growth_rate
        if i < len(block_config):
            new.append((f"transition{i}", _Transition(channels, channels // 2)))
            channels //= 2
    new.append(("norm5", nn.BatchNorm2d(channels)))
    # Match what torchvision's DenseNet constructor does to its own convs, so new and kept layers
    # start from the same random init under init=random.
    for _, module in new:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
    return nn.Sequential(OrderedDict([*children, *new, ("relu5", nn.ReLU(inplace=True))]))


def _build_slim(name: str, cfg: Mapping[str, Any], *, keep_blocks: int, source: str | None = None) -> Trunk:
    trunk = slim_densenet121(keep_blocks)
    reused = ("conv0.", "norm0.") + tuple(
        f"{part}{i}." for i in range(1, keep_blocks + 1) for part in ("denseblock", "transition"))
    info = ModelInfo(
        name=name, kind="slim", arch="densenet121", family="torchvision", source_prefix="features.",
        reused_prefixes=reused, min_image_size=DEEP_MIN_IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        num_features=densenet_out_channels(trunk))
    if source == XRAY_SOURCE:
        grey_stem(trunk)
        info = chest_xray_input(info)
    return Trunk(trunk, info)


for _name, _keep in SLIM_CUTS.items():
    register(_name, sources=(XRAY_SOURCE,))(partial(_build_slim, keep_blocks=_keep))
