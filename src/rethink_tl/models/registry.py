"""One registry of model names, and the classifier every registered trunk is wrapped in.

A model file describes only a trunk: the feature extractor and what ``weights.py`` needs to know
about where its tensors come from (``ModelInfo``). ``build_model`` adds what every model shares:
global average pooling and a fresh ``Linear`` head sized for the task.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

KINDS = ("cbr", "full", "truncated", "slim")


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the program needs to know about a built model.

    source_prefix: prepended to a trunk state_dict key it gives the key of the same tensor in the
        source architecture (``arch``), e.g. "features." for DenseNet trunks.
    reused_prefixes: trunk-key prefixes that ``init=pretrained`` fills from the source architecture's
        ImageNet weights; the rest of the trunk stays freshly initialised. Empty for CBR nets, which
        have no ImageNet weights (a CBR checkpoint passed as ``init.weights`` fills the whole trunk).
    """

    name: str
    kind: str
    arch: str | None
    family: str | None
    source_prefix: str
    reused_prefixes: tuple[str, ...]
    min_image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_features: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


TrunkForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class Trunk:
    """What a registered builder returns. ``forward`` is for trunks whose ``__call__`` is not the
    feature map we want (timm models: ``forward_features`` / ``forward_intermediates``); it must
    return an NCHW map."""

    module: nn.Module
    info: ModelInfo
    forward: TrunkForward | None = None


class Classifier(nn.Module):
    """trunk -> global average pool -> Linear(num_labels)."""

    def __init__(self, trunk: Trunk, num_labels: int):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.trunk = trunk.module
        self.head = nn.Linear(trunk.info.num_features, num_labels)
        self.info = trunk.info
        self._trunk_forward = trunk.forward

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        if self._trunk_forward is None:
            return self.trunk(x)
        return self._trunk_forward(self.trunk, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.adaptive_avg_pool2d(self.forward_trunk(x), 1).flatten(1)
        return self.head(features)


Builder = Callable[[str, Mapping[str, Any]], Trunk]

_BUILDERS: dict[str, Builder] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *aliases: str) -> Callable[[Builder], Builder]:
    """Register ``builder(name, model_cfg) -> Trunk`` under ``name`` (and ``aliases``).

    Each name also needs ``conf/model/NAME.yaml`` so the CLI can select it.
    """

    def add(builder: Builder) -> Builder:
        for n in (name, *aliases):
            if n in _BUILDERS or n in _ALIASES:
                raise ValueError(f"model name {n!r} is registered twice")
        _BUILDERS[name] = builder
        for alias in aliases:
            _ALIASES[alias] = name
        return builder

    return add


def model_names() -> tuple[str, ...]:
    """Every name ``build_model`` accepts: registered names in registration order, then aliases."""
    return tuple(_BUILDERS) + tuple(_ALIASES)


def canonical_name(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in _BUILDERS:
        known = model_names()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown model {name!r}{hint}; known models: {', '.join(known)}")
    return name


def build_model(model_cfg: Mapping[str, Any], num_labels: int) -> Classifier:
    """Build the model named by ``model_cfg['name']`` with a fresh ``num_labels``-way head.

    Extra keys in ``model_cfg`` are passed to the builder, which ignores those it does not use.
    """
    from ..config import ModelConfig, typed

    model_cfg = typed(ModelConfig, model_cfg, where="model")
    name = None if OmegaConf.is_missing(model_cfg, "name") else model_cfg.name
    if not name:
        raise UserError(f"the model config has no name; choose one with model=NAME from: {', '.join(model_names())}")
    name = canonical_name(str(name))
    return Classifier(_BUILDERS[name](name, model_cfg), num_labels)


def check_image_size(model: Classifier, size: int) -> None:
    """Refuse an input size for which the trunk's feature map would be empty."""
    info = model.info
    if size < info.min_image_size:
        raise UserError(
            f"model {info.name} needs images of at least {info.min_image_size} px (got {size}): "
            f"set data.image_size={info.min_image_size} or larger"
        )
