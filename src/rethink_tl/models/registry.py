"""One registry of model names, and the classifier every registered trunk is wrapped in.

A model file describes only a trunk: the feature extractor and what ``weights.py`` needs to know
about where its tensors come from (``ModelInfo``). ``build_model`` adds what every model shares:
a head of global average pooling (or, with ``model.head=flatten``, the whole feature map), optional
dropout, and a fresh ``Linear`` layer sized for the task.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ..config import SOURCE_INITS, InitSource
from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchxrayvision's input: one grey channel, 8-bit values v scaled to (2 v / 255 - 1) * 1024, in [-1024, 1024]
# (xrv.utils.normalize). In the Batcher's terms, (v / 255 - mean) / std, that is mean 0.5 and std 0.5 / 1024:
# both powers of two, so the scaling is exactly xrv's in float32.
XRAY_MEAN = (0.5,)
XRAY_STD = (0.5 / 1024,)
XRAY_SOURCE = InitSource.torchxrayvision.value  # init.source

KINDS = ("cbr", "full", "truncated", "slim")


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the program needs to know about a built model.

    source_prefix: prepended to a trunk state_dict key it gives the key of the same tensor in the
        source architecture (``arch``), e.g. "features." for DenseNet trunks.
    reused_prefixes: trunk-key prefixes that ``init=pretrained`` fills from the source architecture's
        ImageNet weights; the rest of the trunk stays freshly initialised. Empty for CBR nets, which
        have no ImageNet weights (a CBR checkpoint passed as ``init.weights`` fills the whole trunk).
    family: where ``arch``'s weights come from: torchvision or timm (ImageNet), torchxrayvision (chest X-rays).
    in_chans, mean, std: the input the trunk takes: ``in_chans`` channels, uint8 values v normalised per channel
        to (v / 255 - mean) / std (engine.Batcher); ImageNet's 3 channels, or torchxrayvision's one.
    """

    name: str
    kind: str
    arch: str | None
    family: str | None
    source_prefix: str
    reused_prefixes: tuple[str, ...]
    min_image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_features: int
    in_chans: int = 3

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not len(self.mean) == len(self.std) == self.in_chans:
            raise ValueError(f"mean and std need one value per input channel ({self.in_chans}), got {self.mean}, "
                             f"{self.std}")


def chest_xray_input(info: ModelInfo) -> ModelInfo:
    """``info`` of a DenseNet121 trunk rebuilt for torchxrayvision's weights: one grey channel, xrv's scaling."""
    return dataclasses.replace(info, family=XRAY_SOURCE, in_chans=1, mean=XRAY_MEAN, std=XRAY_STD)


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
    """trunk -> global average pool (or flatten) -> [Dropout] -> Linear(num_labels).

    ``head="flatten"`` feeds the whole C x H x W feature map to the Linear layer. H and W depend on the
    input size, so the head is built for ``image_size`` and refuses inputs of any other size.
    """

    def __init__(self, trunk: Trunk, num_labels: int, head: str = "pool", dropout: float = 0.0,
                 image_size: int | None = None):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if head not in ("pool", "flatten"):
            raise ValueError(f"head must be 'pool' or 'flatten', got {head!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.trunk = trunk.module
        self.info = trunk.info
        self._trunk_forward = trunk.forward
        self.image_size = image_size
        # (C, H, W) of the trunk's output for a flatten head; None for a pooling head.
        self.feature_shape: tuple[int, int, int] | None = None
        in_features = trunk.info.num_features
        if head == "flatten":
            if image_size is None:
                raise ValueError(f"model {trunk.info.name}: a flatten head needs the input image size; "
                                 "pass build_model(..., image_size=cfg.data.image_size)")
            _refuse_small(trunk.info, int(image_size))
            self.feature_shape = self._probe(int(image_size))
            in_features = math.prod(self.feature_shape)
        # No module at all without dropout, so a default model is the very module it was before the option.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.head = nn.Linear(in_features, num_labels)

    def _probe(self, size: int) -> tuple[int, int, int]:
        """The trunk's output shape for one ``size`` x ``size`` image, without side effects: eval mode
        keeps BatchNorm's running statistics, and the forked RNG leaves the draws of every later
        initialisation (the Linear layer, apply_init) as they would be with a pooling head."""
        was_training = self.trunk.training
        self.trunk.eval()
        try:
            # The trunk is still on the CPU here, so only the CPU generator needs forking. Batches reach the
            # model with its in_chans channels (engine.Batcher broadcasts or averages the stored ones).
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                features = self.forward_trunk(torch.zeros(1, self.info.in_chans, size, size))
        finally:
            self.trunk.train(was_training)
        if features.ndim != 4:
            raise RuntimeError(f"model {self.info.name}: the trunk gave a {features.ndim}-d output, not NCHW")
        c, h, w = features.shape[1:]
        return int(c), int(h), int(w)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        if self._trunk_forward is None:
            return self.trunk(x)
        return self._trunk_forward(self.trunk, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_trunk(x)
        if self.feature_shape is None:
            features = F.adaptive_avg_pool2d(features, 1).flatten(1)
        else:
            if tuple(features.shape[1:]) != self.feature_shape:
                c, h, w = self.feature_shape
                raise ValueError(
                    f"model {self.info.name} has a flatten head built for {self.image_size} px images "
                    f"({c}x{h}x{w} features), not for {x.shape[-2]}x{x.shape[-1]} px ones "
                    f"({'x'.join(map(str, features.shape[1:]))}): build it with image_size equal to the input size")
            features = features.flatten(1)
        if self.dropout is not None:
            features = self.dropout(features)
        return self.head(features)


Builder = Callable[[str, Mapping[str, Any]], Trunk]

_BUILDERS: dict[str, Builder] = {}
_ALIASES: dict[str, str] = {}
# The optional keys of ModelConfig that only some models read: model name -> the ones it reads (and needs).
OPTIONAL_KEYS = ("backbone", "cut")
_READS: dict[str, tuple[str, ...]] = {}
# Model name -> the weights sources other than ImageNet (init.source) its builder can build it for.
_SOURCES: dict[str, tuple[str, ...]] = {}


def register(name: str, *aliases: str, reads: tuple[str, ...] = (),
             sources: tuple[str, ...] = ()) -> Callable[[Builder], Builder]:
    """Register ``builder(name, model_cfg) -> Trunk`` under ``name`` (and ``aliases``). ``reads``: which of
    OPTIONAL_KEYS the builder needs (``model.backbone`` for any timm net, ``model.cut`` for a cut one); the
    others must be left out, or they would be ignored yet still name another run directory. ``sources``: the
    ``init.source`` values the model takes (torchxrayvision); for them it is called as
    ``builder(name, model_cfg, source=SOURCE)`` and builds the trunk for that source's input.

    Each name also needs ``conf/model/NAME.yaml`` so the CLI can select it.
    """
    unknown = set(reads) - set(OPTIONAL_KEYS)
    if unknown:
        raise ValueError(f"model {name!r} reads unknown keys {sorted(unknown)}; optional keys are {OPTIONAL_KEYS}")

    def add(builder: Builder) -> Builder:
        for n in (name, *aliases):
            if n in _BUILDERS or n in _ALIASES:
                raise ValueError(f"model name {n!r} is registered twice")
        _BUILDERS[name] = builder
        _READS[name] = tuple(reads)
        _SOURCES[name] = tuple(sources)
        for alias in aliases:
            _ALIASES[alias] = name
        return builder

    return add


def check_model_keys(model_cfg: Mapping[str, Any]) -> None:
    """``model.backbone`` and ``model.cut`` where the model reads them, and nowhere else (UserError)."""
    if OmegaConf.is_config(model_cfg) and OmegaConf.is_missing(model_cfg, "name"):
        return
    name = canonical_name(str(model_cfg["name"]))
    for key in OPTIONAL_KEYS:
        value = model_cfg.get(key)
        readers = [n for n, keys in _READS.items() if key in keys]
        if key in _READS[name] and (value is None or str(value).strip() == ""):
            raise UserError(f"model={name} needs model.{key}")
        if key not in _READS[name] and value is not None:
            raise UserError(f"model.{key}={value} does not apply to model={name} (only to model="
                            f"{' / '.join(readers)}): leave it out")


def check_source(model_cfg: Mapping[str, Any], source: str | None) -> None:
    """UserError when ``init.source`` names weights of another architecture than the model's."""
    if source is None:
        return
    name = canonical_name(str(model_cfg["name"]))
    if source not in _SOURCES[name]:
        takers = [n for n, s in _SOURCES.items() if source in s]
        raise UserError(f"init.source={source} (init={SOURCE_INITS[source]}) has weights for the DenseNet121 models "
                        f"only, not for model={name}: use it with model={', '.join(takers)}, or init=pretrained "
                        "without init.source for ImageNet weights")


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


def build_model(model_cfg: Mapping[str, Any], num_labels: int, *, image_size: int | None = None,
                init: Mapping[str, Any] | None = None) -> Classifier:
    """Build the model named by ``model_cfg['name']`` with a fresh ``num_labels``-way head.

    Extra keys in ``model_cfg`` are passed to the builder, which ignores those it does not use.
    ``image_size`` (the side of the square inputs) is needed by ``model.head=flatten`` only. ``init``: the run's
    init config, where ``init.source`` fixes what the model takes in (torchxrayvision: one grey channel); pass it
    wherever a run's model is built, so that the same config always builds the same model.
    """
    from ..config import ModelConfig, init_source, typed

    model_cfg = typed(ModelConfig, model_cfg, where="model")
    name = None if OmegaConf.is_missing(model_cfg, "name") else model_cfg.name
    if not name:
        raise UserError(f"the model config has no name; choose one with model=NAME from: {', '.join(model_names())}")
    name = canonical_name(str(name))
    check_model_keys(model_cfg)
    source = init_source(init)
    check_source(model_cfg, source)
    builder = _BUILDERS[name]
    trunk = builder(name, model_cfg, source=source) if source else builder(name, model_cfg)
    return Classifier(trunk, num_labels, head=str(model_cfg.head), dropout=float(model_cfg.dropout),
                      image_size=image_size)


def check_image_size(model: Classifier, size: int) -> None:
    """Refuse an input size for which the trunk's feature map would be empty, or that a flatten head
    was not built for."""
    _refuse_small(model.info, size)
    if model.feature_shape is not None and size != model.image_size:
        raise UserError(f"model {model.info.name} has a flatten head built for {model.image_size} px images "
                        f"and cannot take {size} px ones")


def _refuse_small(info: ModelInfo, size: int) -> None:
    if size < info.min_image_size:
        raise UserError(
            f"model {info.name} needs images of at least {info.min_image_size} px (got {size}): "
            f"set data.image_size={info.min_image_size} or larger"
        )
