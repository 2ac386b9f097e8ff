"""The shallow CBR nets of Raghu et al. 2019 ("Transfusion"): stacks of Conv-BatchNorm-ReLU units.

Convolutions are unpadded, so every unit and every max-pool shrinks the image; the smallest input
that still leaves a 1x1 map is computed from the layers themselves rather than written down.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Mapping

from torch import nn

from .registry import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, Trunk, register


@dataclass(frozen=True)
class CBRSpec:
    kernel: int
    channels: tuple[int, ...]
    pool_after: tuple[bool, ...]  # one flag per conv: MaxPool2d(3, 2) after it


CBR_NETS: dict[str, CBRSpec] = {
    "cbr_large_t": CBRSpec(7, (32, 64, 128, 256, 512), (True, True, True, True, False)),
    "cbr_large_w": CBRSpec(7, (64, 128, 256, 512), (True, True, True, True)),
    "cbr_small": CBRSpec(7, (32, 64, 128, 256), (True, True, True, True)),
    "cbr_tiny": CBRSpec(5, (64, 128, 256, 512), (True, True, True, True)),
}


def cbr_trunk(spec: CBRSpec, in_channels: int = 3) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = []
    cin = in_channels
    for i, (cout, pool) in enumerate(zip(spec.channels, spec.pool_after, strict=True), start=1):
        conv = nn.Conv2d(cin, cout, spec.kernel, stride=1, padding=0, bias=False)
        # Same init as torchvision's ReLU conv nets, so RI means the same thing for CBR and deep models.
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        layers += [(f"conv{i}", conv), (f"bn{i}", nn.BatchNorm2d(cout)), (f"relu{i}", nn.ReLU(inplace=True))]
        if pool:
            layers.append((f"pool{i}", nn.MaxPool2d(3, stride=2)))
        cin = cout
    return nn.Sequential(OrderedDict(layers))


def _pair_first(v: int | tuple[int, ...]) -> int:
    return v[0] if isinstance(v, tuple) else v


def min_input_size(layers: Iterable[nn.Module]) -> int:
    """Smallest square input for which a chain of convs/pools yields at least a 1x1 map.

    Walks the chain backwards inverting out = floor((in + 2p - d(k-1) - 1) / s) + 1 for the
    smallest ``in``; layers that keep the size (BN, ReLU) are skipped.
    """
    size = 1
    for layer in reversed(list(layers)):
        if not isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            continue
        if isinstance(layer, nn.MaxPool2d) and layer.ceil_mode:
            raise ValueError("ceil_mode pooling is not supported here")
        k, s, p, d = (_pair_first(layer.kernel_size), _pair_first(layer.stride),
                      _pair_first(layer.padding), _pair_first(layer.dilation))
        size = max(1, (size - 1) * s + d * (k - 1) + 1 - 2 * p)
    return size


def _build_cbr(name: str, cfg: Mapping[str, Any], *, spec: CBRSpec) -> Trunk:
    trunk = cbr_trunk(spec)
    info = ModelInfo(
        name=name,
        kind="cbr",
        arch=None,
        family=None,
        source_prefix="",
        reused_prefixes=(),
        min_image_size=min_input_size(trunk),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_features=spec.channels[-1],
    )
    return Trunk(trunk, info)


for _name, _spec in CBR_NETS.items():
    register(_name)(partial(_build_cbr, spec=_spec))
