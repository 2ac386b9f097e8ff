"""How pretrained weights get into a model: by name, strictly, with a report of what was loaded and what is new.

``apply_init(model, cfg.init)`` turns ``init=random|pretrained`` into one of the paper's strategies
(RI, TL, Truncated-TL, Transfusion) and returns an ``InitReport`` of what was loaded and what is new.

Pretrained weights are always those of the *source architecture* (``model.info.arch``: torchvision
ResNet50 / DenseNet121 or a timm backbone). The file's keys are put into the source's own names (by its
dialect's rename map, ``sources.in_source_names``), then loaded strictly into a fresh source model, so a wrong,
tampered or unmapped file fails loudly; only then are the trunk's reused tensors copied over by name.
Weights ``rtl pretrain`` installed (``store``) come first: they are of the model itself, and fill its whole trunk.
``init.source=torchxrayvision`` takes the source architecture's weights from torchxrayvision's chest X-ray DenseNet121
instead of ImageNet (``sources.xrv_state``); the model must have been built for it (``build_model(..., init=...)``:
a grey stem), and everything after the file is read (strict check, copy by name, report) is as for ImageNet.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from .. import runfiles as rf
from ..config import InitConfig, InitName, init_source, typed
from ..errors import UserError
from ..models import XRAY_SOURCE, Classifier, ModelInfo
from ..models.truncated import grey_stem
from .sources import explicit_file, imagenet_state, in_source_names, read_weights_file, xrv_state, xrv_weights_name
from .store import installed, sha256_file, weights_home, weights_slot

log = logging.getLogger(__name__)

INIT_NAMES = tuple(i.value for i in InitName)
STRATEGIES = {"full": "TL", "cbr": "TL", "truncated": "Truncated-TL", "slim": "Transfusion"}
TORCHVISION_CLASSIFIER = {"resnet50": "fc", "densenet121": "classifier"}

_SHOW = 3  # offending keys named in an error message


def strategy_for(kind: str, init_name: str) -> str:
    """The paper's name for what ``init=init_name`` does to a model of ``kind``."""
    if init_name not in INIT_NAMES:
        raise UserError(f"unknown init {init_name!r}; choose init=random or init=pretrained")
    if kind not in STRATEGIES:
        raise ValueError(f"unknown model kind {kind!r}")
    return "RI" if init_name == "random" else STRATEGIES[kind]


@dataclass
class InitReport:
    strategy: str
    source: str  # the weights file used, or "random"
    loaded: list[str] = field(default_factory=list)  # trunk state_dict keys copied from the source
    new: list[str] = field(default_factory=list)  # model modules left freshly initialised
    sha256: str = ""  # of the weights file ("" for random weights and for a download timm keeps to itself)
    about: str = ""  # what an installed rtl pretrain file says about itself

    def summary(self) -> str:
        new = ", ".join(self.new) if self.new else "nothing"
        if not self.loaded:
            return f"{self.strategy}: random weights; freshly initialised: {new}"
        sha = f" (sha256 {self.sha256[:12]})" if self.sha256 else ""
        about = f", {self.about}" if self.about else ""
        return (f"{self.strategy}: {len(self.loaded)} trunk tensors from {self.source}{sha}{about}; freshly "
                f"initialised: {new}")


def apply_init(model: Classifier, init_cfg: Mapping[str, Any], slot: str | None = None) -> InitReport:
    """Initialise ``model`` as ``init_cfg`` says (keys: name, weights, download) and report what happened.
    ``slot`` names the model's installed rtl pretrain weights (``weights_slot(cfg.model)``; default: the
    model's name)."""
    init_cfg = typed(InitConfig, init_cfg, where="init")
    if OmegaConf.is_missing(init_cfg, "name"):
        raise UserError("no init given: choose init=random, init=pretrained (ImageNet) or init=xrv (chest X-rays)")
    init_name = str(init_cfg.name)
    info = model.info
    strategy = strategy_for(info.kind, init_name)
    source = init_source(init_cfg)
    if source != (XRAY_SOURCE if info.family == XRAY_SOURCE else None):
        built = "torchxrayvision's grey input" if info.family == XRAY_SOURCE else "ImageNet's input"
        raise ValueError(f"{info.name} was built for {built} but init.source is {source}: build the model with "
                         "build_model(..., init=init_cfg)")
    weights = init_cfg.weights
    if init_name == "random":
        if weights:
            log.warning("init=random ignores init.weights=%s", weights)
        report = InitReport(strategy, "random", [], fresh_modules(model, set()))
    else:
        if slot is None and info.name not in ("timm", "trunc"):  # those need backbone (and cut) to be named
            slot = weights_slot({"name": info.name})
        own = None if weights or slot is None or source else installed(slot)
        if own is not None:
            report = _init_from_installed(model, *own, strategy)
        else:
            state, where = _source_state_dict(model, weights, bool(init_cfg.download))
            loaded = copy_into_trunk(model, state)
            sha = sha256_file(where) if os.path.isfile(where) else ""
            report = InitReport(strategy, where, loaded, fresh_modules(model, {f"trunk.{k}" for k in loaded}), sha,
                                _about_source(info, where))
    log.info("%s", report.summary())
    return report


def _init_from_installed(model: Classifier, path: Path, meta: dict[str, Any], strategy: str) -> InitReport:
    """Fill the whole trunk from the weights ``rtl pretrain`` installed for this model."""
    info = model.info
    sha = sha256_file(path)
    if sha != meta.get("sha256"):
        raise UserError(f"{path} does not match the sha256 its {rf.WEIGHTS_META} records: reinstall it "
                        "(rtl weights install RUN_DIR --replace) or delete it")
    state = validated_own(model, read_weights_file(path), str(path))
    loaded = copy_into_trunk(model, state, whole=True)
    if info.kind != "cbr":
        strategy = "TL"  # the trunk's own pretraining, not a truncated or scaled-down full model
        log.warning("%s: using the weights rtl pretrain installed in %s, not %s's ImageNet weights; pass "
                    "init.weights=PATH to use another file", info.name, path.parent, info.arch)
    about = (f"rtl pretrain on {meta.get('dataset')} ({meta.get('num_classes')} classes, "
             f"{meta.get('epochs')} epochs, val top-1 {meta.get('val_top1', float('nan')):.4f})")
    return InitReport(strategy, str(path), loaded, fresh_modules(model, {f"trunk.{k}" for k in loaded}), sha, about)


def _source_state_dict(model: Classifier, weights: Any, download: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The validated state dict of the source architecture (CBR: of the trunk), and where it came from."""
    info = model.info
    if info.family == XRAY_SOURCE:
        state, where = xrv_state(weights, download)
        return validated(info, state, where), where
    if info.kind != "cbr":
        state, where = imagenet_state(info, weights, download)
        return validated(info, state, where), where
    if not weights:
        raise UserError(
            f"{info.name}: CBR nets have no public ImageNet weights and none are installed in {weights_home()}: "
            f"make them with rtl pretrain model={info.name} data.root=/data/imagenet (make pretrain-cbr "
            f"IMAGENET=/data/imagenet for all four), pass init.weights=PATH to a checkpoint of the same "
            f"{info.name} net, or use init=random")
    path = explicit_file(weights)
    return validated_cbr(model, read_weights_file(path), str(path)), str(path)


def _about_source(info: ModelInfo, where: str) -> str:
    if info.family != XRAY_SOURCE:
        return ""
    # Which of torchxrayvision's weights, where the file has the name its release gives it.
    return f"torchxrayvision {xrv_weights_name(where) or 'DenseNet121'}"


# --- validating against the source ------------------------------------------------------------

def source_model(info: ModelInfo, with_classifier: bool = False) -> tuple[nn.Module, tuple[str, ...]]:
    """A fresh source-architecture model (by default without classifier), and the classifier's key prefixes.

    Built on the meta device: it only checks and carries the file's tensors, so there is no point in
    allocating and initialising 25M parameters first.
    """
    with torch.device("meta"):
        if info.family in ("torchvision", XRAY_SOURCE):
            net = getattr(torchvision.models, info.arch)(weights=None)
            if info.family == XRAY_SOURCE:  # torchxrayvision's DenseNet: torchvision's names, a grey conv0
                grey_stem(net.features)
            classifier = TORCHVISION_CLASSIFIER[info.arch]
            if not with_classifier:
                setattr(net, classifier, nn.Identity())
            return net, (f"{classifier}.",)
        net = timm.create_model(info.arch, pretrained=False, **({} if with_classifier else {"num_classes": 0}))
    names = net.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return net, tuple(f"{n}." for n in names)


def under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def validated(info: ModelInfo, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``state`` loaded strictly into a fresh ``info.arch`` (its classifier excepted); returns what was loaded.
    A file in another source's key names is renamed by that source's map first; nothing is matched by order."""
    source, classifier = source_model(info)
    expected = {k: v.shape for k, v in source.state_dict().items()}
    if not set(expected) <= set(state):
        state = in_source_names(state, source, info.arch, where)
    state = {k: v for k, v in state.items() if not under(k, classifier)}
    _check_input_channels(info, state, expected, where)
    check_fit(state, expected, where, info.arch)
    source.load_state_dict(state, strict=True, assign=True)
    return source.state_dict()


def _check_input_channels(info: ModelInfo, state: dict[str, torch.Tensor], expected: dict[str, torch.Size],
                          where: str) -> None:
    """A DenseNet121 file for the other input (ImageNet's 3 channels, torchxrayvision's 1) is named as such, not
    just as a wrong shape: the fix is the init, not the file."""
    stem = "features.conv0.weight"
    if info.arch != "densenet121" or stem not in state or state[stem].ndim != 4 \
            or state[stem].shape[1] == expected[stem][1]:
        return
    if info.family == XRAY_SOURCE:
        raise UserError(f"weights file {where} is for {state[stem].shape[1]}-channel input ({stem} "
                        f"{tuple(state[stem].shape)}), not torchxrayvision's grey DenseNet121: ImageNet weights go "
                        "with init=pretrained and no init.source; for chest X-ray weights pass a torchxrayvision file")
    if state[stem].shape[1] == 1:
        raise UserError(f"weights file {where} is for grey, 1-channel input ({stem} {tuple(state[stem].shape)}), as "
                        f"torchxrayvision's are, not {info.arch}'s ImageNet input: load it with init=xrv (init.source="
                        f"{XRAY_SOURCE})")


def validated_cbr(model: Classifier, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    # A whole rethink_tl checkpoint stores the trunk under "trunk." next to a head whose size
    # belongs to the old task; only the trunk is wanted.
    if any(k.startswith("trunk.") for k in state):
        state = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
    expected = {k: v.shape for k, v in model.trunk.state_dict().items()}
    check_fit(state, expected, where, model.info.name)
    return state


def validated_own(model: Classifier, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """An rtl pretrain file (the whole classifier: trunk.* and an ImageNet head) -> its trunk tensors."""
    trunk = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
    expected = {k: v.shape for k, v in model.trunk.state_dict().items()}
    check_fit(trunk, expected, where, model.info.name)
    return trunk


def check_fit(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str, arch: str) -> None:
    """UserError naming the missing, unexpected and wrongly shaped keys, if there are any."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(shape)}" for k, shape in expected.items()
             if k in state and state[k].shape != shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", wrong)):
        if items:
            more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:_SHOW])}{more}")
    if problems:
        raise UserError(f"weights file {where} does not fit {arch}: " + "; ".join(problems))


# --- copying into the model ------------------------------------------------------------------

def copy_into_trunk(model: Classifier, state: dict[str, torch.Tensor], whole: bool = False) -> list[str]:
    """Copy the source tensors of every reused trunk key into ``model.trunk``; returns those keys.
    ``whole``: ``state`` is of this very trunk (an rtl pretrain file), keyed as the trunk is."""
    info = model.info
    trunk_state = model.trunk.state_dict()
    # A CBR checkpoint is of this very trunk, so all of it is reused ("" prefixes every key).
    reused = ("",) if info.kind == "cbr" or whole else info.reused_prefixes
    picked: dict[str, torch.Tensor] = {}
    for key, target in trunk_state.items():
        if not under(key, reused):
            continue
        src_key = key if whole else info.source_prefix + key
        if src_key not in state:
            raise RuntimeError(f"{info.name}: trunk key {key} has no source key {src_key} in {info.arch}")
        if state[src_key].shape != target.shape:
            raise UserError(f"{info.name}: source tensor {src_key} has shape {tuple(state[src_key].shape)} "
                            f"but trunk tensor {key} needs {tuple(target.shape)}")
        picked[key] = state[src_key]
    result = model.trunk.load_state_dict(picked, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return list(picked)


def fresh_modules(model: nn.Module, loaded: set[str]) -> list[str]:
    """The largest modules none of whose tensors were loaded; the head first, then trunk order."""
    keys = list(model.state_dict())
    found: list[str] = []

    def visit(name: str, module: nn.Module) -> None:
        own = [k for k in keys if k.startswith(name + ".")]
        if not own or all(k in loaded for k in own):
            return
        if not any(k in loaded for k in own):
            found.append(name)
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}", child)

    children = dict(model.named_children())
    for name in sorted(children, key=lambda n: n != "head"):
        visit(name, children[name])
    return found
